"""Trainer: wraps a model and an optimizer; the user keeps the training loop (Accelerate-style).

    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=3e-4),
                             config=heddle.TrainerConfig(data_parallel="fsdp", max_grad_norm=1.0))
    for step in range(steps):
        for batch in trainer.micro_batches({"tokens": x, "targets": y}):   # this rank's rows
            logits = trainer.model(batch["tokens"], position_ids=batch.get("position_ids"))
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                       ignore_index=-100, reduction="sum")
            trainer.backward(loss_sum, num_tokens=(batch["targets"] != -100).sum())
        metrics = trainer.step()

Order of construction (torchtitan's): layout (mesh) -> place the model on the local device ->
feature plugins change the model in place -> data parallelism (DDP, FSDP2 / HSDP over the mesh)
-> the optimizer is built from the (sharded) parameters when ``optimizer`` is a factory -> the LR
scheduler from the optimizer.

Loss scaling: ``backward(loss_sum, num_tokens=n)`` takes a per-rank *sum* of token losses; after
the gradients are summed across every rank they are divided by the global token count, so the
update is the gradient of the global token mean whatever the data / sequence / expert layout
(per-rank means of uneven shards are a classic bug). Without ``num_tokens`` the loss is taken as
a mean and weighted equally per rank and micro-batch, as plain DDP does.

Non-finite values: every rank ORs (loss not finite, its gradients not finite, any
``plugin.local_nonfinite``) into a flag carried by the step's one [loss, tokens] all-reduce (as
+inf / NaN in the loss sum: no extra bytes); a
flagged step is skipped on every rank alike (``on_nonfinite="skip"``: no parameter, optimizer,
scheduler or plugin state changes; counted in ``metrics["skipped_steps"]``) or raises
``FloatingPointError`` on every rank (``"raise"``). Under fp16, non-finite gradients with a finite
loss are a loss-scale overflow: the step is skipped and the scale halves.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import heddle.dist as hd
from heddle.dist import CommLedger, is_sharded
from heddle.dist.mesh import Layout, ParallelDims, build_layout
from heddle.plugins import SECTIONS, TrainerPlugin
from heddle.trainer_config import PRECISIONS, TrainerConfig, _build_plugin
from heddle.trainer_report import ProgressReporter

__all__ = ["Trainer", "TrainerConfig"]

def _sum_hook(group, bucket):
    """DDP comm hook: sum (not average) each bucket across the group, recorded in the ledger."""
    work = hd.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _Autocast(nn.Module):
    """DDP / no-wrapper mixed precision: the forward runs under ``torch.autocast``."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(*args, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor -> this rank's shard


class Trainer:
    """Declared fields: ``model`` (what to call forward on), ``module`` (the user's model,
    parallelized in place), ``optimizer``, ``lr_scheduler``, ``layout`` (:class:`heddle.dist.mesh.Layout`),
    ``checkpointer`` (None or the :class:`heddle.checkpoint.Checkpointer`), ``ddp`` (None or the
    DDP wrapper), ``plugins``, ``step_count``, ``skipped_steps``, ``loss_scale``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer],
                 config: TrainerConfig | None = None, *, group: dist.ProcessGroup | None = None,
                 lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None):
        self.config = cfg = config or TrainerConfig()
        if not dist.is_initialized():
            hd.init_distributed()
        self.group = group
        self.rank, self.world_size = hd.group_rank_size(group)
        self.device = hd.device()
        self.watchdog = None
        if cfg.collective_timeout_s is not None:
            from heddle.dist.watchdog import start_watchdog

            self.watchdog = start_watchdog(cfg.collective_timeout_s, group=group)
        self.plugins: list[TrainerPlugin] = [_build_plugin(name, getattr(cfg, name)) for name in SECTIONS
                                             if getattr(cfg, name) not in (None, False)]
        self._by_name = {p.name: p for p in self.plugins}
        sp = self._by_name["sequence_parallel"].config.sp_size if "sequence_parallel" in self._by_name else 1
        dims = ParallelDims.build(cfg.data_parallel, self.world_size, sp=sp, dp_shard=cfg.dp_shard,
                                  dp_replicate=cfg.dp_replicate)
        self.layout: Layout = build_layout(dims, cfg.data_parallel, group=group, device_type=self.device.type)
        self.module = model
        if cfg.place_model:
            model.to(self.device)
        self.stateful: dict[str, Any] = {}   # extra objects with state_dict() to checkpoint
        self.checkpointer = None
        owners = [p.name for p in self.plugins if p.replaces_ddp]
        if owners and cfg.data_parallel in ("fsdp", "hsdp"):
            raise ValueError(f"{owners} with data_parallel={cfg.data_parallel!r}: ranks run different numbers of "
                             f"micro-batches per step, but FSDP2 all-gathers the parameters collectively in every "
                             f"forward; use data_parallel='ddp' (gradients summed once per step)")
        for plugin in self.plugins:
            plugin.setup(self)
            if plugin.checkpointer is not None:
                self.checkpointer = plugin.checkpointer
        if cfg.place_model:
            model.to(self.device)  # what the plugins added
        self._check_optimizer(optimizer)
        dtype = PRECISIONS[cfg.precision]
        self.ddp: DistributedDataParallel | None = None
        self.fsdp_modules: list = []
        self._manual_sync = False
        parallel = self.world_size > 1 or cfg.data_parallel in ("fsdp", "hsdp")
        if cfg.data_parallel in ("fsdp", "hsdp") and parallel:
            from heddle.dist.fsdp import apply_fsdp

            self.fsdp_modules = apply_fsdp(model, self.layout.fsdp_mesh, param_dtype=dtype,
                                           reduce_dtype=torch.float32 if dtype is not None else None,
                                           reshard_after_forward=cfg.reshard_after_forward)
            hooked = [p.name for p in self.plugins if p.configure_fsdp(self, self.fsdp_modules)]
            if len(hooked) > 1:
                raise ValueError(f"plugins {hooked} each registered a custom reduce-scatter; only one can")
        elif cfg.data_parallel == "ddp" and self.world_size > 1:
            if owners:
                self._manual_sync = True  # the Trainer sums the gradients once per step
            else:
                self.ddp = self._wrap_ddp()
        self.model: nn.Module = self.ddp if self.ddp is not None else self.module
        if dtype is not None and not self.fsdp_modules:
            self.model = _Autocast(self.model, self.device.type, dtype)
        self.optimizer = optimizer(list(p for p in model.parameters() if p.requires_grad)) \
            if not isinstance(optimizer, torch.optim.Optimizer) else optimizer
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(self.optimizer).__name__}, not a torch.optim.Optimizer")
        self.lr_scheduler = lr_scheduler(self.optimizer) if lr_scheduler is not None else None
        self.loss_scale = float(cfg.loss_scale) if cfg.precision == "fp16" else 1.0
        self._good_steps = 0
        self.step_count = 0
        self.skipped_steps = 0
        self._micro = 0
        self._loss_sum = 0.0
        self._tokens = 0
        self._mean_losses: bool | None = None
        self._variable_micro = any(p.variable_micro_batches for p in self.plugins)
        self.logger = None
        if self.rank == 0 and cfg.log_dir is not None:
            from heddle.loggers import build_logger

            self.logger = build_logger(cfg.log_dir)
        self._reporter = ProgressReporter(cfg) if self.rank == 0 else None
        self._open_step()

    # -- setup -----------------------------------------------------------------------------
    def _check_optimizer(self, optimizer) -> None:
        if isinstance(optimizer, torch.optim.Optimizer):
            if self.config.data_parallel in ("fsdp", "hsdp"):
                raise ValueError(f"data_parallel={self.config.data_parallel!r} replaces the parameters by sharded "
                                 f"ones: pass the optimizer as a factory, e.g. "
                                 f"optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4)")
            present = {id(p) for p in self.module.parameters()}
            stale = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in present)
            if stale:
                raise ValueError(f"the optimizer holds {stale} parameter(s) the model no longer has (a section such "
                                 f"as moe replaced modules): pass the optimizer as a factory, "
                                 f"optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4)")
        elif not callable(optimizer):
            raise TypeError(f"optimizer={optimizer!r}: expected a torch.optim.Optimizer or a factory params -> optimizer")

    def _wrap_ddp(self) -> DistributedDataParallel:
        sharded = [n for n, p in self.module.named_parameters() if is_sharded(p)]
        if sharded:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.module, sharded)
        ddp = DistributedDataParallel(self.module, process_group=self.group,
                                      bucket_cap_mb=self.config.bucket_cap_mb,
                                      find_unused_parameters=self.config.find_unused_parameters)
        hooked = [p.name for p in self.plugins if p.configure_ddp(self, ddp)]
        if len(hooked) > 1:
            raise ValueError(f"plugins {hooked} each registered a DDP comm hook; only one can")
        if not hooked:
            ddp.register_comm_hook(self.group, _sum_hook)
        ddp.require_backward_grad_sync = self.config.grad_accum_steps == 1
        return ddp

    def _open_step(self) -> None:
        self._ledger = CommLedger()
        self._ledger.__enter__()
        self._step_start = time.perf_counter()

    def plugin(self, name: str) -> TrainerPlugin:
        """The plugin of a config section that is on (e.g. ``trainer.plugin("moe").layers``)."""
        if name not in self._by_name:
            raise KeyError(f"section {name!r} is not on; on: {sorted(self._by_name)}")
        return self._by_name[name]

    # -- the loop --------------------------------------------------------------------------
    def track(self, name: str, obj: Any) -> Any:
        """Register an object with ``state_dict()``/``load_state_dict()`` (a sampler, a scheduler)
        so checkpoints include it."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"track({name!r}, ...): {type(obj).__name__} has no state_dict/load_state_dict")
        self.stateful[name] = obj
        return obj

    def _to_device(self, batch: dict) -> dict:
        if not self.config.place_model:
            return batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def prepare_batch(self, batch: dict) -> dict:
        """One micro-batch of this rank's rows -> what it feeds the model (tensors on the device,
        then each section's transform, e.g. the sequence shard)."""
        batch = self._to_device(batch)
        for plugin in self.plugins:
            batch = plugin.prepare_batch(self, batch)
        return batch

    def micro_batches(self, batch: dict) -> Iterator[dict]:
        """This rank's step batch -> its prepared micro-batches: ``grad_accum_steps`` slices along
        dim 0 of every tensor of 2+ dims (1-D tensors such as ``cu_seqlens`` go to each), or what a
        section plans (adaptive SP: ``{"documents": [...]}`` -> this rank's share of the plan)."""
        for plugin in self.plugins:
            planned = plugin.split_batch(self, self._to_device(batch))
            if planned is not None:
                yield from planned
                return
        n = self.config.grad_accum_steps
        split = {k: v.chunk(n) if isinstance(v, torch.Tensor) and v.dim() >= 2 else None for k, v in batch.items()}
        sizes = {len(v) for v in split.values() if v is not None}
        if sizes and sizes != {n}:
            raise ValueError(f"micro_batches: rows {[tuple(v.shape) for v in batch.values() if isinstance(v, torch.Tensor)]}"
                             f" do not split into grad_accum_steps={n} parts")
        for i in range(n):
            yield self.prepare_batch({k: (split[k][i] if split[k] is not None else v) for k, v in batch.items()})

    def backward(self, loss: torch.Tensor, num_tokens: int | torch.Tensor | None = None) -> None:
        """Backpropagate one micro-batch. ``loss``: sum of token losses on this rank when
        ``num_tokens`` is given (the scaling to the global token mean happens in :meth:`step`).
        Sections may add to it (moe: ``aux_loss_weight`` x tokens x the layers' aux loss)."""
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self._check_micro(num_tokens)
        for plugin in self.plugins:
            extra = plugin.auxiliary_loss(self, num_tokens)
            if extra is not None:
                loss = loss + extra
        last = self._micro == self.config.grad_accum_steps - 1 or self._variable_micro
        for module in self.fsdp_modules:  # reduce-scatter only after the last micro-batch
            module.set_requires_gradient_sync(last, recurse=False)
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        self.record_micro_batch(float(loss.detach()), num_tokens)

    def record_micro_batch(self, loss: float, num_tokens: int | torch.Tensor | None = None) -> None:
        """Account for a micro-batch whose backward already ran elsewhere: same bookkeeping as
        :meth:`backward` without calling ``loss.backward()``."""
        self._check_micro(num_tokens)
        mean = num_tokens is None
        self._mean_losses = mean
        self._loss_sum += float(loss)
        self._tokens += 1 if mean else int(num_tokens)
        self._micro += 1
        if self.ddp is not None:  # DDP reads this flag at the next forward
            self.ddp.require_backward_grad_sync = self._micro == self.config.grad_accum_steps - 1

    def _check_micro(self, num_tokens) -> None:
        mean = num_tokens is None
        if self._mean_losses is not None and self._mean_losses != mean:
            raise ValueError("backward(): pass num_tokens for every micro-batch of a step or for none")
        if self._micro >= self.config.grad_accum_steps and not self._variable_micro:
            raise ValueError(f"backward() called {self._micro + 1} times before step(); "
                             f"grad_accum_steps={self.config.grad_accum_steps}")

    def _grads(self, kind: str | None = None) -> list[torch.Tensor]:
        """Gradients (``kind``: "fsdp" DTensor shards, "sharded" heddle-sharded, "replicated")."""
        out = []
        for p in self.module.parameters():
            if p.grad is None:
                continue
            k = "fsdp" if hasattr(p, "to_local") else "sharded" if is_sharded(p) else "replicated"
            if kind is None or k == kind:
                out.append(p.grad)
        return out

    @staticmethod
    def _sq(grads: list[torch.Tensor]) -> torch.Tensor:
        """Squared L2 norm (fp64, 0-dim, on the CPU) of local tensors; one host sync."""
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([torch.linalg.vector_norm(_local(g), dtype=torch.float64) for g in grads]).square().sum().cpu()

    def _sharded_sq(self) -> torch.Tensor:
        """This rank's share of the squared norm of the gradients that differ between ranks: summed
        over all ranks it counts FSDP shards once per replica group and heddle-sharded ones once."""
        return self._sq(self._grads("fsdp")) / self.layout.dims.dp_replicate + self._sq(self._grads("sharded"))

    def clip_grad_norm_(self, max_norm: float, *, sharded_sq: float | None = None) -> float:
        """Clip by the global norm, counting every parameter exactly once: replicated gradients
        (identical on every rank after the sync) locally, sharded ones summed over their owners.

        sharded_sq: the sharded gradients' squared norm already summed over the group
        (:meth:`step` folds it into its token-count all-reduce); None: one all-reduce here."""
        if sharded_sq is None:
            total = self._sharded_sq().reshape(1)
            if self.world_size > 1:
                hd.all_reduce(total, group=self.group)
            sharded_sq = float(total)
        norm = math.sqrt(float(self._sq(self._grads("replicated"))) + sharded_sq)
        if norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in self._grads():
                _local(g).mul_(scale)
        return norm

    def _sum_gradients(self) -> None:
        """No DDP / FSDP wrapper (a section runs its own micro-batches): sum the replicated
        gradients over the group once, by exactly one owner (a section, e.g. compression, or the
        Trainer's flat all-reduce). Ranks that trained nothing contribute zeros."""
        params = [p for p in self.module.parameters() if p.requires_grad and not is_sharded(p)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        synced = [plugin.name for plugin in self.plugins if plugin.reduce_gradients(self)]
        if len(synced) > 1:
            raise RuntimeError(f"plugins {synced} each summed the gradients; only one may")
        if not synced and params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            hd.all_reduce(flat, group=self.group)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def _local_nonfinite(self) -> tuple[bool, bool]:
        loss_bad = not math.isfinite(self._loss_sum)
        grads = self._grads()
        grads_bad = bool(grads) and not bool(torch.stack([torch.isfinite(_local(g)).all() for g in grads]).all())
        return loss_bad, grads_bad or any(p.local_nonfinite(self) for p in self.plugins)

    def step(self) -> dict[str, float]:
        """Synchronise, scale, clip and apply the gradients of the accumulated micro-batches."""
        if self._micro != self.config.grad_accum_steps and not self._variable_micro:
            raise ValueError(f"step() after {self._micro} backward() calls; grad_accum_steps="
                             f"{self.config.grad_accum_steps}")
        if self._manual_sync:
            self._sum_gradients()
        clip = self.config.max_grad_norm
        loss_bad, grads_bad = self._local_nonfinite()
        # One all-reduce for the step's loss, token count and (when clipping) the sharded
        # gradients' squared norm, taken before the 1/tokens scaling and rescaled below. The
        # non-finite flag rides the loss: a rank whose gradients (or a section) saw a non-finite
        # value sends +inf, one with a non-finite loss sends it (NaN), so the summed loss is
        # finite iff every rank's step is, and NaN iff some loss was.
        local_loss = self._loss_sum if loss_bad or not grads_bad else math.inf
        totals = torch.tensor([local_loss, float(self._tokens)], dtype=torch.float64)
        if clip:
            totals = torch.cat([totals, self._sharded_sq().reshape(1)])
        if self.world_size > 1:
            hd.all_reduce(totals, group=self.group)
        loss_total, tokens = float(totals[0]), float(totals[1])
        if tokens <= 0:
            raise ValueError("step(): the global batch has no tokens (num_tokens summed to 0)")
        skip = not math.isfinite(loss_total)
        bad_loss = math.isnan(loss_total)
        if skip and self.config.on_nonfinite == "raise" and (bad_loss or self.config.precision != "fp16"):
            raise FloatingPointError(f"step {self.step_count + 1}: non-finite {'loss' if bad_loss else 'gradients'} "
                                     f"on some rank (on_nonfinite='raise')")
        grad_norm = float("nan")
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._good_steps = 0
            if self.config.precision == "fp16":
                self.loss_scale /= 2.0
            for plugin in self.plugins:
                plugin.on_skipped_step(self)
        else:
            # Sum over ranks of d(loss_sum) -> d(global token mean); mean losses: mean over ranks x micro.
            local_tokens = self._tokens if self.config.data_parallel == "none" else tokens
            scale = 1.0 / (local_tokens * self.loss_scale)
            for g in self._grads():
                _local(g).mul_(scale)
            if clip:
                grad_norm = self.clip_grad_norm_(clip, sharded_sq=float(totals[2]) * scale * scale)
            for plugin in self.plugins:
                plugin.before_optimizer_step(self)
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            self._good_steps += 1
            if self.config.precision == "fp16" and self._good_steps % self.config.loss_scale_growth_interval == 0:
                self.loss_scale *= 2.0
            for plugin in self.plugins:
                plugin.after_optimizer_step(self)
        elapsed = time.perf_counter() - self._step_start
        self._ledger.__exit__(None, None, None)
        metrics = {
            "step": self.step_count,
            "loss": loss_total / tokens,
            "tokens": tokens if not self._mean_losses else float("nan"),
            "tokens_per_s": (tokens / elapsed) if not self._mean_losses else float("nan"),
            "step_time": elapsed,
            "grad_norm": grad_norm,
            "bytes_sent": float(self._ledger.bytes_sent()),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "skipped": float(skip),
            "skipped_steps": float(self.skipped_steps),
        }
        if self.config.precision == "fp16":
            metrics["loss_scale"] = self.loss_scale
        for plugin in self.plugins:
            metrics.update(plugin.metrics(self))
        self._micro, self._loss_sum, self._tokens, self._mean_losses = 0, 0.0, 0, None
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = self.config.grad_accum_steps == 1
        if self._reporter is not None:
            self._reporter.report(self.step_count, metrics)
        if self.logger is not None:
            self.logger.log(self.step_count, {k: float(v) for k, v in metrics.items() if k != "step"})
        self._open_step()
        return metrics

    # -- state -----------------------------------------------------------------------------
    def resume(self, step: int | None = None) -> int | None:
        """Load the newest valid checkpoint (or ``step``) in place, collectively; its step or None."""
        if self.checkpointer is None:
            raise ValueError("resume() needs the checkpoint section: TrainerConfig(checkpoint={'directory': ...})")
        return self.plugin("checkpoint").resume(self, step=step)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "skipped_steps": self.skipped_steps, "loss_scale": self.loss_scale,
                "good_steps": self._good_steps,
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                "plugins": {p.name: p.state_dict() for p in self.plugins}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loss_scale = float(state.get("loss_scale", self.loss_scale))
        self._good_steps = int(state.get("good_steps", 0))
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for plugin in self.plugins:
            if plugin.name in state.get("plugins", {}):
                plugin.load_state_dict(state["plugins"][plugin.name])

    def close(self) -> None:
        for plugin in self.plugins:
            plugin.close()
        if self._reporter is not None:
            self._reporter.close()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        try:
            self._ledger.__exit__(None, None, None)
        except ValueError:
            pass
