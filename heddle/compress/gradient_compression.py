"""GradientCompression: compressed gradient sync as a DDP comm hook, an all-reduce, a
reduce-scatter or FSDP2's reduce-scatter, with error control (EF / EF21 / EControl) and L-GreCo
per-layer parameters.

Per step and per layer (parameter) with key k: the feedback picks v from g and its buffers, the
compressor exchanges v (layers batched: one collective per phase per call), the feedback updates
its buffers and returns the sum over ranks the step uses (divided by P for ``reduction="mean"``).

The DDP hook overlaps with backward (:mod:`heddle.compress.ddp_hook`): each bucket's exchange is
issued asynchronously when DDP hands the bucket over and decoded at the last bucket (or in the
collective's callback with ``decode_in_callback=True``).
DDP calls the hook for buckets in index order on every rank, and collectives are issued only
from the hook (never from a callback), so every rank issues the same collectives in the same
order whatever the timing (torch's PowerSGD hook issues its second phase from a callback and
mismatches on gloo). ``overlap=False`` keeps the blocking hook (same numbers, bit for bit).

Steps are staged (the reliability contract, docs/compress.md): a step's new buffers (error,
EF21/EControl h and H, PowerSGD's warm-start Q, L-GreCo samples and choices) go live only when the
step ends with every value finite; ``discard_step()`` restores the state before the step (the
Trainer calls it when it skips a step on every rank), ``commit_step()`` makes it final, and a step
that saw a non-finite value on this rank (``saw_nonfinite``) is never absorbed.
State is keyed by parameter name (``bind(module)``) or by first-seen order, never by bucket
index, so DDP's bucket rebuild after the first iterations does not scramble error buffers.
"""

from __future__ import annotations

import logging
import threading
import zlib
from typing import Any

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.compress.compressors import Compressor, Identity, PayloadCompressor
from heddle.compress.exchange import Item, exchange_scatter, start_exchange
from heddle.compress.feedback import NoFeedback
from heddle.compress.lgreco import LGreCo

log = logging.getLogger(__name__)
_IDENTITY = Identity()


def _seed(*parts) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


class _Batch:
    """Layers of one hook call / all_reduce call: ``plain`` go uncompressed (warm-up, first
    message, layers the compressor skips), ``packed`` compressed; ``grads`` by key (fp32)."""

    def __init__(self):
        self.plain: list[Item] = []
        self.packed: list[Item] = []
        self.firsts: set[str] = set()
        self.grads: dict[str, torch.Tensor] = {}
        self.keys: list[str] = []
        self.warm = False


class GradientCompression:
    """``comp = GradientCompression(TopK(0.01), feedback=EControl(), adaptive=LGreCo())``;
    DDP: ``ddp.register_comm_hook(comp, comp.hook)``; without DDP: ``comp.all_reduce(grads)``;
    FSDP2: ``comp.attach_fsdp(model)``.

    ``start_iter`` (default 10): steps sent uncompressed first (>= 2 under DDP: it rebuilds its
    buckets after the first iterations); a run shorter than that is never compressed.
    ``reduction``: "mean" (torch's comm-hook convention) or "sum". ``overlap``: the DDP hook
    issues each bucket asynchronously (default) or blocks per bucket. ``decode_in_callback``:
    decode each bucket in its collective's callback instead of all at the last bucket.
    """

    def __init__(self, compressor: Compressor, *, feedback=None, adaptive: LGreCo | None = None,
                 group=None, start_iter: int = 10, reduction: str = "mean", seed: int = 0,
                 overlap: bool = True, decode_in_callback: bool = False):
        if not isinstance(compressor, Compressor):
            raise TypeError(f"compressor={compressor!r} must be a heddle.compress Compressor")
        if not isinstance(start_iter, int) or isinstance(start_iter, bool) or start_iter < 0:
            raise ValueError(f"start_iter={start_iter!r} must be an int >= 0")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: valid are 'mean' and 'sum'")
        if adaptive is not None and not isinstance(adaptive, LGreCo):
            raise TypeError(f"adaptive={adaptive!r} must be an LGreCo or None")
        if adaptive is not None:
            adaptive.candidate_set(compressor)  # validates the candidates early
        self.compressor, self.feedback = compressor, feedback or NoFeedback()
        self.adaptive, self.group, self.start_iter = adaptive, group, start_iter
        self.reduction, self.seed, self.overlap = reduction, seed, bool(overlap)
        self.decode_in_callback = bool(decode_in_callback)
        self.step = 0
        self.state: dict[str, dict[str, torch.Tensor]] = {}   # per layer: e, h, H, q
        self.choices: dict[str, Any] = {}                      # L-GreCo: key -> parameter
        self.samples: dict[str, torch.Tensor] = {}             # L-GreCo: accumulated v (rank 0)
        self.shapes: dict[str, tuple] = {}
        self.stats: dict[str, float] = {}                      # last finished step
        self._names: dict[int, str] = {}
        self._order: dict[int, str] = {}
        self._lock = threading.Lock()
        self._in_step = False
        self._undo: dict | None = None      # the state before the last ended step (until commit)
        self._nonfinite = False             # the last ended step saw a non-finite value
        self._pipeline = None
        self._fresh_step()

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
        choices = self._staged_choices if self._staged_choices is not None else self.choices
        return choices.get(key, self.compressor.default_param)

    # -- public entry points ---------------------------------------------------------------
    def hook(self, state, bucket):
        """DDP comm hook (registered as ``ddp.register_comm_hook(comp, comp.hook)``)."""
        if self._pipeline is None:
            from heddle.compress.ddp_hook import BucketPipeline
            self._pipeline = BucketPipeline(self)
        return self._pipeline.submit(bucket)

    def all_reduce(self, grads: list[torch.Tensor], *, names: list[str] | None = None) -> None:
        """Compressed sum (or mean) of ``grads`` over the group, in place; one call = one step."""
        if names is not None and len(names) != len(grads):
            raise ValueError(f"names has {len(names)} entries for {len(grads)} gradients")
        keys = names or [f"grad{i}" for i in range(len(grads))]
        batch = self._prepare(keys, grads)
        for ex in self._issue(batch):
            while not ex.issued:
                self._advance(ex)
            ex.finish()
        outs = self._finish(batch)
        for g, o in zip(grads, outs):
            g.copy_(o.view_as(g))
        self._end_step()

    def reduce_scatter(self, flat: torch.Tensor, *, key: str = "flat") -> torch.Tensor:
        """flat [N] -> [N_rank]: this rank's chunk (even split, first ranks one more) of the
        compressed sum (or mean). Each rank sends chunk j only to rank j: (P-1)/P of one payload
        instead of an all-gather's P-1. One call = one step. Not for PowerSGD (needs matrices)."""
        self._check_scatter("reduce_scatter")
        if flat.dim() != 1:
            raise ValueError(f"flat must be 1-D, got shape {tuple(flat.shape)}")
        _, world = hd.group_rank_size(self.group)
        sizes = [flat.numel() // world + (1 if j < flat.numel() % world else 0) for j in range(world)]
        self._begin_step()
        out = self.scatter_chunks(key, list(torch.split(flat.float(), sizes)), self.group)
        self._end_step()
        return (out / world if self.reduction == "mean" else out).to(flat.dtype)

    def attach_fsdp(self, module: torch.nn.Module, *, all_gather_bits: int | None = None) -> list[str]:
        """Compress the gradient reduce-scatter of every FSDP2 module under ``module`` (see
        :mod:`heddle.compress.fsdp`); ``all_gather_bits`` also quantizes the parameter all-gather.
        Returns the names of the modules attached."""
        from heddle.compress.fsdp import attach
        return attach(self, module, all_gather_bits=all_gather_bits)

    # -- the non-finite contract -----------------------------------------------------------
    @property
    def saw_nonfinite(self) -> bool:
        """This rank saw a NaN/Inf in its gradients or in the aggregate it received, this step
        (the step in progress, else the last one that ended)."""
        if self._in_step:
            return self._bad_now()
        return self._nonfinite

    def commit_step(self) -> None:
        """Make the last ended step final (the Trainer: after the optimizer step)."""
        self._undo = None

    def discard_step(self) -> None:
        """Restore the state from before the last step (the Trainer: the step was skipped on every
        rank). A step that saw a non-finite value was never applied; this only clears it."""
        with self._lock:
            if self._in_step:
                self._fresh_step()
                self._in_step = False
            if self._undo is not None:
                undo, self._undo = self._undo, None
                for k, st in undo["state"].items():
                    if st is None:
                        self.state.pop(k, None)
                    else:
                        self.state[k] = st
                self.samples, self.choices, self.step = undo["samples"], undo["choices"], undo["step"]

    # -- one batch of layers: prepare, issue, finish ----------------------------------------
    def _prepare(self, keys: list[str], grads: list[torch.Tensor]) -> _Batch:
        """Begin the step if needed; pick v per layer from g and the committed buffers."""
        if not self._in_step:
            self._begin_step()
        rank, _ = hd.group_rank_size(self.group)
        batch = _Batch()
        batch.keys, batch.warm = list(keys), self.step < self.start_iter
        compresses = getattr(self.compressor, "compresses", None)
        for key, grad in zip(keys, grads):
            g = grad.detach().float()
            batch.grads[key] = g
            self.shapes[key] = tuple(grad.shape)
            st = dict(self.state.get(key, {}))     # staged copy: the committed dict stays intact
            item = Item(key, g, self.param_for(key), st, _seed(self.seed, self.step, key, rank),
                        _seed(self.seed, self.step, key))
            if batch.warm or (self.feedback.needs_first_message and "h" not in st):
                if not batch.warm:
                    batch.firsts.add(key)
                batch.plain.append(item)
                continue
            item.x = self.feedback.prepare(g, st)
            (batch.packed if compresses is None or compresses(g.shape, item.param) else batch.plain).append(item)
        return batch

    def _issue(self, batch: _Batch) -> list:
        """Encode and issue the batch's collectives (async), plain layers first."""
        with hd.CommLedger(thread_local=True) as ledger:
            exchanges = [start_exchange(c, items, self.group)
                         for c, items in ((_IDENTITY, batch.plain), (self.compressor, batch.packed)) if items]
        self._add_bytes(ledger)
        return exchanges

    def _advance(self, ex) -> None:
        """Issue the next phase of a two-phase exchange (on the issuing thread, in order)."""
        with hd.CommLedger(thread_local=True) as ledger:
            ex.advance()
        self._add_bytes(ledger)

    def _add_bytes(self, ledger) -> None:
        with self._lock:
            self._acc["bytes_sent"] += ledger.bytes_sent()

    def _finish(self, batch: _Batch) -> list[torch.Tensor]:
        """After the batch's exchanges finished: feedback updates into the staged state,
        L-GreCo samples, accounting; returns the outputs in key order. Issues no collective."""
        rank, world = hd.group_rank_size(self.group)
        sample = (self.adaptive is not None and rank == 0
                  and self.adaptive.samples_at(self.step, self.start_iter))
        outs, bad = {}, []
        for it in batch.plain + batch.packed:
            g = batch.grads[it.key]
            bad += [torch.isfinite(g).all(), torch.isfinite(it.total).all()]
            if batch.warm:
                out = it.total
            elif it.key in batch.firsts:
                self.feedback.init_local(g, it.state)
                out = self.feedback.init_total(it.total, it.state)
            else:
                self.feedback.update_local(g, it.x, it.local, it.state)
                out = self.feedback.aggregate(it.total, it.state)
            outs[it.key] = out / world if self.reduction == "mean" else out
        with self._lock:
            for it in batch.plain + batch.packed:
                self._staged[it.key] = it.state
                if sample:
                    nxt = self._samples_next()
                    acc = nxt.get(it.key)
                    nxt[it.key] = it.x.clone() if acc is None else acc + it.x
                self._account(it)
            self._bad.extend(bad)
        return [outs[k] for k in batch.keys]

    def scatter_chunks(self, key: str, chunks: list[torch.Tensor], group) -> torch.Tensor:
        """One reduce-scatter inside a step: ``chunks[j]`` [n_j] goes to rank j; returns the sum
        over ranks of this rank's chunk, after error feedback (per chunk, per rank: this rank keeps
        e and h for every chunk it sends, H for the chunk it owns)."""
        rank, world = hd.group_rank_size(group)
        keys = [f"{key}.{j}" for j in range(world)]
        warm = self.step < self.start_iter
        first = not warm and self.feedback.needs_first_message and "h" not in self.state.get(keys[0], {})
        compressor = _IDENTITY if warm or first else self.compressor
        items, states = [], []
        for k, g in zip(keys, chunks):
            st = dict(self.state.get(k, {}))
            states.append(st)
            v = g if warm or first else self.feedback.prepare(g, st)
            items.append(Item(k, v, self.param_for(k), {}, _seed(self.seed, self.step, k, rank),
                              _seed(self.seed, self.step, k)))
        with hd.CommLedger(thread_local=True) as ledger:
            total = exchange_scatter(compressor, items, group)
        self._add_bytes(ledger)
        bad = [torch.isfinite(g).all() for g in chunks] + [torch.isfinite(total).all()]
        for g, it, st in zip(chunks, items, states):
            if first:
                self.feedback.init_local(g, st)
            elif not warm:
                self.feedback.update_local(g, it.x, it.local, st)
        if first:
            out = self.feedback.init_total(total, states[rank])
        elif warm:
            out = total
        else:
            out = self.feedback.aggregate(total, states[rank])
        with self._lock:
            for k, it, st in zip(keys, items, states):
                self._staged[k] = st
                self.shapes[k] = tuple(it.x.shape)
                self._account(it)
            self._bad.extend(bad)
        return out

    def _note_plain(self, key: str, rows: torch.Tensor, out: torch.Tensor) -> None:
        """An uncompressed reduce-scatter inside a step (FSDP2 warm-up / Identity): accounting and
        the non-finite check only."""
        with self._lock:
            self._acc["elements"] += rows.numel()
            self._acc["payload_bytes"] += rows.numel() * rows.element_size()
            self._bad.extend([torch.isfinite(rows).all(), torch.isfinite(out).all()])

    def _check_scatter(self, what: str) -> None:
        if not isinstance(self.compressor, PayloadCompressor):
            raise ValueError(f"{what} does not support {self.compressor!r}: its factors need whole "
                             "matrices; use all_reduce or the DDP hook")
        if self.adaptive is not None:
            raise ValueError(f"{what} does not support adaptive=LGreCo (one flat vector per call)")

    def _account(self, it: Item) -> None:
        """Per-layer totals as tensors (no host sync per layer); read at the end of the step."""
        x = it.x.reshape(-1)
        acc = self._acc
        acc["elements"] += x.numel()
        acc["payload_bytes"] += it.payload_bytes
        acc["norm"] = acc["norm"] + torch.dot(x, x).double()
        if it.local.data_ptr() != it.x.data_ptr():   # uncompressed layers (local is x) lose nothing
            diff = x - it.local.reshape(-1)
            acc["error"] = acc["error"] + torch.dot(diff, diff).double()

    # -- step lifecycle ---------------------------------------------------------------------
    def _fresh_step(self) -> None:
        self._acc = {"elements": 0, "payload_bytes": 0, "bytes_sent": 0, "error": 0.0, "norm": 0.0}
        self._staged: dict[str, dict] = {}
        self._staged_samples: dict | None = None     # None: samples unchanged this step
        self._staged_choices: dict | None = None     # None: no re-tune this step
        self._bad: list[torch.Tensor] = []

    def _samples_next(self) -> dict:
        if self._staged_samples is None:
            self._staged_samples = dict(self.samples)
        return self._staged_samples

    def _bad_now(self) -> bool:
        return bool(self._bad) and not bool(torch.stack(self._bad).all())

    def _begin_step(self) -> None:
        self._undo = None              # the previous step can no longer be discarded
        self._fresh_step()
        self._in_step = True
        if self.adaptive is not None and self.adaptive.is_retune_step(self.step, self.start_iter):
            self._retune()

    def _retune(self) -> None:
        """Rank 0 solves the L-GreCo program on its samples and broadcasts the choices (staged:
        they and the emptied samples go live with the step)."""
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
        self._staged_choices = {k: cands[int(i)] for k, i in zip(keys, picks)}
        self._staged_samples = {}

    def _end_step(self) -> None:
        """Apply the staged step when every value was finite (keeping the old state for
        ``discard_step``); otherwise drop it: a non-finite step is never absorbed."""
        with self._lock:
            acc = self._acc
            n = max(acc["elements"], 1)
            norm, error = float(acc["norm"]), float(acc["error"])
            self._nonfinite = self._bad_now()
            self.stats = {"step": self.step, "compressed": float(self.step >= self.start_iter),
                          "bits_per_element": 8.0 * acc["payload_bytes"] / n,
                          "payload_bytes": acc["payload_bytes"], "bytes_sent": acc["bytes_sent"],
                          "compression_error": error / norm if norm > 0 else 0.0,
                          "nonfinite": float(self._nonfinite)}
            if self._nonfinite:
                log.warning("heddle.compress: step %d saw a non-finite gradient; its compressor and "
                            "error-feedback state are discarded", self.step)
                self._undo = None
            else:
                self._undo = {"state": {k: self.state.get(k) for k in self._staged},
                              "samples": self.samples, "choices": self.choices, "step": self.step}
                self.state.update(self._staged)
                if self._staged_samples is not None:
                    self.samples = self._staged_samples
                if self._staged_choices is not None:
                    self.choices = self._staged_choices
                self.step += 1
            self._fresh_step()
            self._in_step = False

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
        self._undo = None
        self._fresh_step()

    def __repr__(self):
        return (f"GradientCompression({self.compressor!r}, feedback={self.feedback!r}, "
                f"adaptive={self.adaptive!r}, start_iter={self.start_iter}, reduction={self.reduction!r})")
