"""Moving compressed layers between ranks: one batched collective per phase for a list of layers.

Every rank runs these with the same layers in the same order (same keys, shapes, parameters), so
the collectives match across ranks whatever the DDP bucket timing. Payloads of all layers of a
call are concatenated into one buffer: summable payloads are all-reduced, the others all-gathered
and decoded rank by rank in rank order (bit-identical sums on every rank).

An :class:`Exchange` is one such batch in flight, split where the data allows it:

- ``start()`` encodes (the only compression work the wire has to wait for) and issues the first
  collective asynchronously;
- ``advance()`` (two-phase compressors, PowerSGD) waits for the current collective and issues the
  next one: the second phase's input depends on the first phase's sum;
- ``finish()`` waits for the last collective and decodes: ``local`` = C(x) of this rank and
  ``total`` = sum over ranks. It issues no collective, so it may run in a future's callback on
  another thread, while ``start`` / ``advance`` run on the caller's thread in one fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import heddle.dist as hd


@dataclass
class Item:
    """One layer in one exchange. ``x`` [*shape] fp32 is the vector to compress; after the
    exchange ``local`` = C(x) of this rank and ``total`` = sum over ranks of C(x_j), both
    [*shape]; ``payload_bytes`` is what this rank contributed to the wire buffer."""

    key: str
    x: torch.Tensor
    param: Any = None
    state: dict = field(default_factory=dict)
    seed: int = 0
    shared_seed: int = 0
    local: torch.Tensor | None = None
    total: torch.Tensor | None = None
    payload_bytes: int = 0


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t


def _done_future() -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(None)
    return fut


class Exchange:
    """A single-phase compressor's exchange (``compressor.encode/decode``) of ``items``."""

    phases = 1

    def __init__(self, compressor, items: list[Item], group=None):
        self.compressor, self.items, self.group = compressor, items, group
        self.rank, self.world = hd.group_rank_size(group)
        self.phase = 0
        self.work = None

    @property
    def issued(self) -> bool:
        """Every collective of this exchange has been issued."""
        return self.phase >= self.phases

    def future(self) -> torch.futures.Future:
        """Completes when the collective issued last is done."""
        if self.work is None:
            return _done_future()
        if getattr(self, "_future_of", None) is not self.work:
            self._future_of, self._future = self.work, self.work.get_future()
        return self._future

    def wait(self) -> None:
        """Wait for the collective issued last. Through its future, not ``Work.wait``: this runs
        inside that future's callbacks too, where gloo's ``Work.wait`` never returns."""
        if self.work is not None:
            self.future().wait()

    def start(self) -> "Exchange":
        self.payloads = [self.compressor.encode(it.x.reshape(-1), it.param, seed=it.seed,
                                                shared_seed=it.shared_seed) for it in self.items]
        for it, p in zip(self.items, self.payloads):
            it.payload_bytes = p.numel() * p.element_size()
        if self.compressor.summable:
            self.flat = torch.cat(self.payloads) if self.items else None
            if self.world > 1 and self.items:
                self.work = hd.all_reduce(self.flat, group=self.group, async_op=True)
        else:
            self.flat = torch.cat([_as_bytes(p) for p in self.payloads]) if self.items else None
            if self.world > 1 and self.items:
                self.gathered = self.flat.new_empty(self.world * self.flat.numel())
                self.work = hd.all_gather_into_tensor(self.gathered, self.flat, group=self.group,
                                                      async_op=True)
        self.phase = 1
        return self

    def advance(self) -> None:
        raise AssertionError("a single-phase exchange has nothing to advance")

    def finish(self) -> None:
        self.wait()
        compressor = self.compressor
        for it, p in zip(self.items, self.payloads):
            it.local = compressor.decode(p, it.x.numel(), it.param, shared_seed=it.shared_seed).view_as(it.x)
        if not self.items:
            return
        if compressor.summable:
            for it, seg in zip(self.items, torch.split(self.flat, [p.numel() for p in self.payloads])):
                it.total = compressor.decode(seg, it.x.numel(), it.param,
                                             shared_seed=it.shared_seed).view_as(it.x)
            return
        per_rank = self.gathered.view(self.world, -1) if self.world > 1 else self.flat.view(1, -1)
        sizes = [it.payload_bytes for it in self.items]
        for it in self.items:
            it.total = torch.zeros_like(it.x)
        for r in range(self.world):
            if r == self.rank:
                for it in self.items:
                    it.total += it.local
                continue
            for it, seg in zip(self.items, torch.split(per_rank[r], sizes)):
                it.total += compressor.decode(seg, it.x.numel(), it.param,
                                              shared_seed=it.shared_seed).view_as(it.x)


def start_exchange(compressor, items: list[Item], group=None) -> Exchange:
    """Encode ``items`` and issue the first collective (async): single- or two-phase."""
    if getattr(compressor, "two_phase", False):
        return compressor.start_exchange(items, group)
    return Exchange(compressor, items, group).start()


def exchange(compressor, items: list[Item], group=None) -> None:
    """Blocking exchange: every phase, then decode (sets ``local`` and ``total``)."""
    if not items:
        return
    ex = start_exchange(compressor, items, group)
    while not ex.issued:
        ex.advance()
    ex.finish()


def exchange_scatter(compressor, chunks: list[Item], group=None) -> torch.Tensor:
    """Reduce-scatter: ``chunks[j]`` is this rank's part destined to rank j. Returns the sum over
    ranks of C(chunk_rank) [*shape of chunks[rank]] and sets ``local`` on every chunk (for error
    feedback). Summable payloads of equal size (every chunk the same shape) go through one
    reduce-scatter (Identity: exactly the plain reduce-scatter's sum); otherwise each rank sends
    only chunk j's payload to rank j (all-to-all) and the receiver decodes in rank order."""
    rank, world = hd.group_rank_size(group)
    if len(chunks) != world:
        raise ValueError(f"exchange_scatter needs one chunk per rank ({world}), got {len(chunks)}")
    payloads = [_as_bytes(compressor.encode(c.x.reshape(-1), c.param, seed=c.seed, shared_seed=c.shared_seed))
                for c in chunks]
    for c, p in zip(chunks, payloads):
        c.payload_bytes = p.numel()
        raw = p.view(torch.float32) if compressor.summable else p
        c.local = compressor.decode(raw, c.x.numel(), c.param, shared_seed=c.shared_seed).view_as(c.x)
    mine = chunks[rank]
    size = payloads[rank].numel()   # every rank's payload for my chunk has this size
    if world == 1:
        mine.total = mine.local.clone()
        return mine.total
    if compressor.summable and len({p.numel() for p in payloads}) == 1:
        out = torch.empty(size // 4, dtype=torch.float32, device=mine.x.device)
        hd.reduce_scatter_tensor(out, torch.cat(payloads).view(torch.float32), group=group)
        mine.total = compressor.decode(out, mine.x.numel(), mine.param,
                                       shared_seed=mine.shared_seed).view_as(mine.x)
        return mine.total
    recv = payloads[0].new_empty(world * size)
    hd.all_to_all_single(recv, torch.cat(payloads), [size] * world, [p.numel() for p in payloads], group=group)
    total = torch.zeros_like(mine.x)
    for r in range(world):
        if r == rank:
            total += mine.local
            continue
        seg = recv[r * size:(r + 1) * size].clone()
        raw = seg.view(torch.float32) if compressor.summable else seg
        total += compressor.decode(raw, mine.x.numel(), mine.param, shared_seed=mine.shared_seed).view_as(mine.x)
    mine.total = total
    return total
