"""GradientCompression: compressed gradient sync as a DDP comm hook, an all-reduce, or a
reduce-scatter, with error control (EF / EF21 / EControl) and L-GreCo per-layer parameters.

Per step and per layer (parameter) with key k: the feedback picks v from g and its buffers, the
compressor exchanges v (layers batched: one collective per phase per call), the feedback updates
its buffers and returns the sum over ranks the step uses (divided by P for ``reduction="mean"``).

Ordering: collectives are issued synchronously inside each call, and DDP calls the hook for
buckets in index order, so every rank issues the same collectives in the same order whatever the
bucket timing (torch's PowerSGD hook chains async collectives across buckets and mismatches on
gloo). The price: no overlap of communication with the rest of the backward pass.
State is keyed by parameter name (``bind(module)``) or by first-seen order, never by bucket
index, so DDP's bucket rebuild after the first iterations does not scramble error buffers.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.compress.compressors import Compressor, Identity
from heddle.compress.exchange import Item, exchange, exchange_scatter
from heddle.compress.feedback import NoFeedback
from heddle.compress.lgreco import LGreCo

_IDENTITY = Identity()


def _seed(*parts) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


class GradientCompression:
    """``comp = GradientCompression(TopK(0.01), feedback=EControl(), adaptive=LGreCo())``;
    DDP: ``ddp.register_comm_hook(comp, comp.hook)``; without DDP: ``comp.all_reduce(grads)``.

    ``start_iter``: steps sent uncompressed first (>= 2: DDP rebuilds its buckets after the first
    iterations). ``reduction``: "mean" (torch's comm-hook convention) or "sum".
    """

    def __init__(self, compressor: Compressor, *, feedback=None, adaptive: LGreCo | None = None,
                 group=None, start_iter: int = 10, reduction: str = "mean", seed: int = 0):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor={compressor!r} must be a heddle.compress Compressor")
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter={start_iter!r} must be an int >= 0")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: valid are 'mean' and 'sum'")
        if adaptive is not None and not isinstance(adaptive, LGreCo):
            raise TypeError(f"adaptive={adaptive!r} must be an LGreCo or None")
        if adaptive is not None:
            adaptive.candidate_set(compressor)  # validates the candidates early
        self.compressor, self.feedback = compressor, feedback or NoFeedback()
        self.adaptive, self.group, self.start_iter = adaptive, group, start_iter
        self.reduction, self.seed = reduction, seed
        self.step = 0
        self.state: dict[str, dict[str, torch.Tensor]] = {}   # per layer: e, h, H, q
        self.choices: dict[str, Any] = {}                      # L-GreCo: key -> parameter
        self.samples: dict[str, torch.Tensor] = {}             # L-GreCo: accumulated v (rank 0)
        self.shapes: dict[str, tuple] = {}
        self.stats: dict[str, float] = {}                      # last finished step
        self._names: dict[int, str] = {}
        self._order: dict[int, str] = {}
        self._in_step = False
        self._acc = self._fresh_acc()

    # -- keys ------------------------------------------------------------------------------
    def bind(self, module: torch.nn.Module) -> "GradientCompression":
        """Key state by parameter name (stable across processes: needed to resume by name)."""
        self._names = {id(p): name for name, p in module.named_parameters()}
        return self

    def _key(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is not None:
            return name
        return self._order.setdefault(id(param), f"param{len(self._order)}")

    def param_for(self, key: str):
        return self.choices.get(key, self.compressor.default_param)

    # -- public entry points ---------------------------------------------------------------
    def hook(self, state, bucket):
        """DDP comm hook (registered as ``ddp.register_comm_hook(comp, comp.hook)``)."""
        grads = bucket.gradients()
        keys = [self._key(p) for p in bucket.parameters()]
        outs = self._sync(keys, grads)
        buffer = bucket.buffer()
        flat = torch.cat([o.reshape(-1) for o in outs]).to(buffer.dtype)
        if flat.numel() != buffer.numel():  # invariant: DDP's CPU/GPU buckets pack grads densely
            raise RuntimeError(f"bucket buffer has {buffer.numel()} elements, gradients {flat.numel()}")
        buffer.copy_(flat)
        if bucket.is_last():
            self._end_step()
        fut = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    def all_reduce(self, grads: list[torch.Tensor], *, names: list[str] | None = None) -> None:
        """Compressed sum (or mean) of ``grads`` over the group, in place; one call = one step."""
        if names is not None and len(names) != len(grads):
            raise ValueError(f"names has {len(names)} entries for {len(grads)} gradients")
        keys = names or [f"grad{i}" for i in range(len(grads))]
        outs = self._sync(keys, grads)
        for g, o in zip(grads, outs):
            g.copy_(o.view_as(g))
        self._end_step()

    def reduce_scatter(self, flat: torch.Tensor, *, key: str = "flat") -> torch.Tensor:
        """flat [N] -> [N_rank]: this rank's chunk (even split, first ranks one more) of the
        compressed sum (or mean). Each rank sends chunk j only to rank j: (P-1)/P of one payload
        instead of an all-gather's P-1. One call = one step. Not for PowerSGD (needs matrices)."""
        if getattr(self.compressor, "two_phase", False):
            raise ValueError(f"reduce_scatter does not support {self.compressor!r}: its factors "
                             "need whole matrices; use all_reduce")
        if self.adaptive is not None:
            raise ValueError("reduce_scatter does not support adaptive=LGreCo (one flat vector)")
        if flat.dim() != 1:
            raise ValueError(f"flat must be 1-D, got shape {tuple(flat.shape)}")
        rank, world = hd.group_rank_size(self.group)
        sizes = [flat.numel() // world + (1 if j < flat.numel() % world else 0) for j in range(world)]
        chunks = torch.split(flat.float(), sizes)
        keys = [f"{key}.{j}" for j in range(world)]
        warm = self.step < self.start_iter
        first = not warm and self.feedback.needs_first_message and "h" not in self.state.get(keys[0], {})
        compressor = _IDENTITY if warm or first else self.compressor
        items = []
        for k, g in zip(keys, chunks):
            st = self.state.setdefault(k, {})
            v = g if warm or first else self.feedback.prepare(g, st)
            items.append(Item(k, v, self.param_for(k), {}, _seed(self.seed, self.step, k, rank),
                              _seed(self.seed, self.step, k)))
        with hd.CommLedger(thread_local=True) as ledger:
            total = exchange_scatter(compressor, items, self.group)
        for k, g, it in zip(keys, chunks, items):
            if not warm and not first:
                self.feedback.update_local(g, it.x, it.local, self.state[k])
            self._account(it)
        mine = self.state[keys[rank]]
        if first:
            for k, g in zip(keys, chunks):
                self.feedback.init_local(g, self.state[k])
            out = self.feedback.init_total(total, mine)
        elif warm:
            out = total
        else:
            out = self.feedback.aggregate(total, mine)
        self._acc["bytes_sent"] += ledger.bytes_sent()
        self._end_step()
        return (out / world if self.reduction == "mean" else out).to(flat.dtype)

    # -- one bucket / batch of layers -------------------------------------------------------
    def _sync(self, keys: list[str], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        rank, world = hd.group_rank_size(self.group)
        if not self._in_step:
            self._begin_step(keys, grads)
        sample = self.adaptive is not None and rank == 0 and self.adaptive.samples_at(self.step, self.start_iter)
        plain, packed, firsts = [], [], set()
        warm = self.step < self.start_iter
        for key, grad in zip(keys, grads):
            g = grad.detach().reshape(grad.shape).float()
            self.shapes[key] = tuple(grad.shape)
            st = self.state.setdefault(key, {})
            item = Item(key, g, self.param_for(key), st, _seed(self.seed, self.step, key, rank),
                        _seed(self.seed, self.step, key))
            if warm or (self.feedback.needs_first_message and "h" not in st):
                if not warm:
                    firsts.add(key)
                plain.append(item)
                continue
            item.x = self.feedback.prepare(g, st)
            compresses = getattr(self.compressor, "compresses", None)
            (packed if compresses is None or compresses(g.shape, item.param) else plain).append(item)
        if sample:
            for it in plain + packed:
                acc = self.samples.get(it.key)
                self.samples[it.key] = it.x.clone() if acc is None else acc.add_(it.x)
        with hd.CommLedger(thread_local=True) as ledger:
            exchange(_IDENTITY, plain, self.group)
            if getattr(self.compressor, "two_phase", False):
                self.compressor.exchange(packed, self.group)
            else:
                exchange(self.compressor, packed, self.group)
        self._acc["bytes_sent"] += ledger.bytes_sent()
        outs = {}
        by_key = dict(zip(keys, grads))
        for it in plain + packed:
            g = by_key[it.key].detach().float()
            if warm:
                out = it.total
            elif it.key in firsts:
                self.feedback.init_local(g, it.state)
                out = self.feedback.init_total(it.total, it.state)
            else:
                self.feedback.update_local(g, it.x, it.local, it.state)
                out = self.feedback.aggregate(it.total, it.state)
            self._account(it)
            outs[it.key] = out / world if self.reduction == "mean" else out
        return [outs[k] for k in keys]

    def _account(self, it: Item) -> None:
        x = it.x.reshape(-1)
        self._acc["elements"] += x.numel()
        self._acc["payload_bytes"] += it.payload_bytes
        self._acc["norm"] += float(torch.dot(x, x))
        if it.local.data_ptr() != it.x.data_ptr():   # uncompressed layers (local is x) lose nothing
            diff = x - it.local.reshape(-1)
            self._acc["error"] += float(torch.dot(diff, diff))

    @staticmethod
    def _fresh_acc() -> dict[str, float]:
        return {"elements": 0, "payload_bytes": 0, "bytes_sent": 0, "error": 0.0, "norm": 0.0}

    def _begin_step(self, keys, grads) -> None:
        self._in_step = True
        if self.adaptive is None or not self.adaptive.is_retune_step(self.step, self.start_iter):
            return
        self._retune()

    def _retune(self) -> None:
        """Rank 0 solves the L-GreCo program on its samples and broadcasts the choices."""
        rank, world = hd.group_rank_size(self.group)
        keys = sorted(self.shapes)
        cands = self.adaptive.candidate_set(self.compressor)
        picks = torch.zeros(len(keys), dtype=torch.int64)
        if rank == 0:
            if set(self.samples) != set(keys):
                raise RuntimeError(f"L-GreCo at step {self.step}: samples for {len(self.samples)} of "
                                   f"{len(keys)} layers; every layer must sync in the sample window")
            chosen = self.adaptive.choose(self.compressor, self.samples, self.shapes)
            picks = torch.tensor([cands.index(chosen[k]) for k in keys], dtype=torch.int64)
        if world > 1:
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            hd.broadcast(picks, src=src, group=self.group)
        self.choices = {k: cands[int(i)] for k, i in zip(keys, picks)}
        self.samples = {}

    def _end_step(self) -> None:
        acc = self._acc
        n = max(acc["elements"], 1)
        self.stats = {"step": self.step, "compressed": float(self.step >= self.start_iter),
                      "bits_per_element": 8.0 * acc["payload_bytes"] / n,
                      "payload_bytes": acc["payload_bytes"], "bytes_sent": acc["bytes_sent"],
                      "compression_error": acc["error"] / acc["norm"] if acc["norm"] > 0 else 0.0}
        self._acc = self._fresh_acc()
        self._in_step = False
        self.step += 1

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: step, per-layer buffers (e, h, H, PowerSGD q), L-GreCo choices and
        samples. Ranks differ (error buffers are per rank): save one per rank."""
        return {"step": self.step,
                "state": {k: {n: t.clone() for n, t in st.items()} for k, st in self.state.items()},
                "choices": dict(self.choices),
                "samples": {k: t.clone() for k, t in self.samples.items()},
                "shapes": dict(self.shapes)}

    def load_state_dict(self, sd: dict) -> None:
        missing = {"step", "state", "choices"} - set(sd)
        if missing:
            raise ValueError(f"load_state_dict: missing entries {sorted(missing)}")
        self.step = int(sd["step"])
        self.state = {k: {n: t.clone() for n, t in st.items()} for k, st in sd["state"].items()}
        self.choices = dict(sd["choices"])
        self.samples = {k: t.clone() for k, t in sd.get("samples", {}).items()}
        self.shapes = {k: tuple(v) for k, v in sd.get("shapes", {}).items()}
        self._in_step = False
        self._acc = self._fresh_acc()

    def __repr__(self):
        return (f"GradientCompression({self.compressor!r}, feedback={self.feedback!r}, "
                f"adaptive={self.adaptive!r}, start_iter={self.start_iter}, reduction={self.reduction!r})")
