"""Trainer: wraps a model and an optimizer; the user keeps the training loop (Accelerate-style).

    trainer = heddle.Trainer(model, optimizer, config=heddle.TrainerConfig(max_grad_norm=1.0))
    for step in range(steps):
        for micro in range(config.grad_accum_steps):
            batch = trainer.prepare_batch({"tokens": x, "targets": y})
            logits = trainer.model(batch["tokens"], position_ids=batch.get("position_ids"))
            loss_sum = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum")
            trainer.backward(loss_sum, num_tokens=batch["targets"].numel())
        metrics = trainer.step()

Loss scaling: ``backward(loss_sum, num_tokens=n)`` takes a per-rank *sum* of token losses; after
the gradients are summed across every rank of ``group`` they are divided by the global token
count, so the update is the gradient of the global token mean whatever the data / sequence /
expert layout (per-rank means of uneven shards are a classic bug). Without ``num_tokens`` the loss
is taken as a mean and weighted equally per rank and micro-batch, as plain DDP does.

Features plug in through config sections (see :mod:`heddle.plugins.base`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import heddle.dist as hd
from heddle.dist import CommLedger, is_sharded
from heddle.plugins import SECTIONS, TrainerPlugin


@dataclass
class TrainerConfig:
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    data_parallel: bool = True        # sum gradients across the group with DDP
    bucket_cap_mb: float = 25.0
    find_unused_parameters: bool = False
    total_steps: int | None = None    # for the progress bar
    progress: bool = True             # rich progress bar on rank 0 (a log line when not a TTY)
    log_every: int = 10
    # Feature sections: a section's Config, a dict of its fields, True for its defaults, or None.
    sequence_parallel: Any = None
    adaptive_sequence_parallel: Any = None
    moe: Any = None
    compression: Any = None
    checkpoint: Any = None

    def __post_init__(self):
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be positive or None")
        if self.bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb={self.bucket_cap_mb} must be positive")


def _build_plugin(section: str, value: Any, plugin_cls: type[TrainerPlugin] | None = None) -> TrainerPlugin:
    plugin_cls = plugin_cls or SECTIONS[section]
    config_cls = plugin_cls.Config
    if value is True:
        value = config_cls()
    elif isinstance(value, dict):
        valid = {f.name for f in fields(config_cls)}
        unknown = sorted(set(value) - valid)
        if unknown:
            raise ValueError(f"TrainerConfig.{section}: unknown option(s) {unknown}; valid: {sorted(valid)}")
        value = config_cls(**value)
    elif not isinstance(value, config_cls):
        raise TypeError(f"TrainerConfig.{section}={value!r}: expected {config_cls.__module__}.Config, "
                        f"a dict of its fields, True or None")
    return plugin_cls(value)


def _sum_hook(group, bucket):
    """DDP comm hook: sum (not average) each bucket across the group, recorded in the ledger."""
    work = hd.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: TrainerConfig | None = None, *, group: dist.ProcessGroup | None = None):
        self.config = config or TrainerConfig()
        if not dist.is_initialized():
            hd.init_distributed()
        self.group = group
        self.rank, self.world_size = hd.group_rank_size(group)
        self.module = model
        self.optimizer = optimizer
        self.stateful: dict[str, Any] = {}   # extra objects with state_dict() to checkpoint
        self.plugins: list[TrainerPlugin] = [
            _build_plugin(name, getattr(self.config, name)) for name in SECTIONS
            if getattr(self.config, name) not in (None, False)]
        for plugin in self.plugins:
            plugin.setup(self)
        self.ddp: DistributedDataParallel | None = None
        owners = [p.name for p in self.plugins if p.replaces_ddp]
        if self.world_size > 1 and self.config.data_parallel and not owners:
            self.ddp = self._wrap_ddp()
        self.model = self.ddp if self.ddp is not None else self.module
        self.step_count = 0
        self._micro = 0
        self._loss_sum = 0.0
        self._tokens = 0
        self._mean_losses: bool | None = None
        self._progress = None
        self._open_step()

    # -- setup -----------------------------------------------------------------------------
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

    # -- the loop --------------------------------------------------------------------------
    def track(self, name: str, obj: Any) -> Any:
        """Register an object with ``state_dict()``/``load_state_dict()`` (a sampler, a scheduler)
        so checkpoints include it."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"track({name!r}, ...): {type(obj).__name__} has no state_dict/load_state_dict")
        self.stateful[name] = obj
        return obj

    def prepare_batch(self, batch: dict) -> dict:
        for plugin in self.plugins:
            batch = plugin.prepare_batch(self, batch)
        return batch

    def backward(self, loss: torch.Tensor, num_tokens: int | torch.Tensor | None = None) -> None:
        """Backpropagate one micro-batch. ``loss``: sum of token losses on this rank when
        ``num_tokens`` is given (the scaling to the global token mean happens in :meth:`step`)."""
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self._check_micro(num_tokens)
        loss.backward()
        self.record_micro_batch(float(loss.detach()), num_tokens)

    def record_micro_batch(self, loss: float, num_tokens: int | torch.Tensor | None = None) -> None:
        """Account for a micro-batch whose backward already ran elsewhere (a plugin's executor):
        same bookkeeping as :meth:`backward` without calling ``loss.backward()``."""
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
        if self._micro >= self.config.grad_accum_steps:
            raise ValueError(f"backward() called {self._micro + 1} times before step(); "
                             f"grad_accum_steps={self.config.grad_accum_steps}")

    def _all_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def _sq_norm(self, *, sharded: bool) -> torch.Tensor:
        """Squared L2 norm (fp64, 0-dim, on the CPU) of this rank's sharded or replicated gradients;
        one host sync, not one per parameter."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None and is_sharded(p) == sharded]
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square().sum().cpu()

    def clip_grad_norm_(self, max_norm: float, *, sharded_sq: float | None = None) -> float:
        """Clip by the global norm, counting every parameter exactly once: replicated gradients
        (identical on every rank after the sync) locally, sharded ones summed over their owners.

        sharded_sq: the sharded gradients' squared norm already summed over the group
        (:meth:`step` folds it into its token-count all-reduce); None: one all-reduce here."""
        if sharded_sq is None:
            total = self._sq_norm(sharded=True).reshape(1)
            if self.world_size > 1:
                hd.all_reduce(total, group=self.group)
            sharded_sq = float(total)
        norm = math.sqrt(float(self._sq_norm(sharded=False)) + sharded_sq)
        if norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for g in self._all_grads():
                g.mul_(scale)
        return norm

    def step(self) -> dict[str, float]:
        """Synchronise, scale, clip and apply the gradients of the accumulated micro-batches."""
        if self._micro != self.config.grad_accum_steps:
            raise ValueError(f"step() after {self._micro} backward() calls; grad_accum_steps="
                             f"{self.config.grad_accum_steps}")
        synced = [plugin.name for plugin in self.plugins if plugin.reduce_gradients(self)]
        owners = [plugin.name for plugin in self.plugins if plugin.replaces_ddp]
        if owners and not synced and self.world_size > 1 and self.config.data_parallel:
            raise RuntimeError(f"plugins {owners} replace DDP but none summed the gradients in reduce_gradients")
        clip = self.config.max_grad_norm
        # One all-reduce for the step's loss, token count and (when clipping) the sharded
        # gradients' squared norm, taken before the 1/tokens scaling and rescaled below.
        parts = [torch.tensor(self._loss_sum, dtype=torch.float64), torch.tensor(float(self._tokens), dtype=torch.float64)]
        if clip:
            parts.append(self._sq_norm(sharded=True))
        totals = torch.stack(parts)
        if self.world_size > 1:
            hd.all_reduce(totals, group=self.group)
        loss_total, tokens = float(totals[0]), float(totals[1])
        if tokens <= 0:
            raise ValueError("step(): the global batch has no tokens (num_tokens summed to 0)")
        # Sum over ranks of d(loss_sum) -> d(global token mean); mean losses: mean over ranks x micro.
        scale = 1.0 / tokens
        for g in self._all_grads():
            g.mul_(scale)
        grad_norm = (self.clip_grad_norm_(clip, sharded_sq=float(totals[2]) * scale * scale) if clip
                     else float("nan"))
        for plugin in self.plugins:
            plugin.before_optimizer_step(self)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
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
        }
        for plugin in self.plugins:
            metrics.update(plugin.metrics(self))
        self._micro, self._loss_sum, self._tokens, self._mean_losses = 0, 0.0, 0, None
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = self.config.grad_accum_steps == 1
        self._report(metrics)
        self._open_step()
        return metrics

    # -- reporting and state ---------------------------------------------------------------
    def _report(self, m: dict[str, float]) -> None:
        if self.rank != 0 or not self.config.progress:
            return
        line = f"loss {m['loss']:.4f}  {m['tokens_per_s']:,.0f} tok/s  {m['bytes_sent'] / 1e6:.2f} MB sent"
        if sys.stdout.isatty() and self.config.total_steps:
            if self._progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.description}"), TimeRemainingColumn())
                self._progress.start()
                self._task = self._progress.add_task("", total=self.config.total_steps)
            self._progress.update(self._task, completed=self.step_count, description=line)
            if self.step_count >= self.config.total_steps:
                self._progress.stop()
        elif self.step_count % self.config.log_every == 0 or self.step_count == 1:
            total = f"/{self.config.total_steps}" if self.config.total_steps else ""
            print(f"step {self.step_count}{total}  {line}", flush=True)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "plugins": {p.name: p.state_dict() for p in self.plugins}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for plugin in self.plugins:
            if plugin.name in state.get("plugins", {}):
                plugin.load_state_dict(state["plugins"][plugin.name])

    def close(self) -> None:
        for plugin in self.plugins:
            plugin.close()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        try:
            self._ledger.__exit__(None, None, None)
        except ValueError:
            pass
