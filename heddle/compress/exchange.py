"""Moving compressed layers between ranks: one batched collective per phase for a list of layers.

Every rank calls these with the same layers in the same order (same keys, shapes, parameters), so
the collectives match across ranks whatever the DDP bucket timing. Payloads of all layers of a
call are concatenated into one buffer: summable payloads are all-reduced, the others all-gathered
and decoded rank by rank in rank order (bit-identical sums on every rank).
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


def exchange(compressor, items: list[Item], group=None) -> None:
    """All-reduce-like exchange of single-phase compressors (``compressor.encode/decode``)."""
    if not items:
        return
    rank, world = hd.group_rank_size(group)
    payloads = [compressor.encode(it.x.reshape(-1), it.param, seed=it.seed, shared_seed=it.shared_seed)
                for it in items]
    for it, p in zip(items, payloads):
        it.payload_bytes = p.numel() * p.element_size()
        it.local = compressor.decode(p, it.x.numel(), it.param, shared_seed=it.shared_seed).view_as(it.x)
    if compressor.summable:
        flat = torch.cat(payloads)
        if world > 1:
            hd.all_reduce(flat, group=group)
        for it, seg in zip(items, torch.split(flat, [p.numel() for p in payloads])):
            it.total = compressor.decode(seg, it.x.numel(), it.param, shared_seed=it.shared_seed).view_as(it.x)
        return
    flat = torch.cat([_as_bytes(p) for p in payloads])
    sizes = [it.payload_bytes for it in items]
    if world > 1:
        gathered = flat.new_empty(world * flat.numel())
        hd.all_gather_into_tensor(gathered, flat, group=group)
        per_rank = gathered.view(world, flat.numel())
    else:
        per_rank = flat.view(1, -1)
    for it in items:
        it.total = torch.zeros_like(it.x)
    for r in range(world):
        if r == rank:
            for it in items:
                it.total += it.local
            continue
        for it, seg in zip(items, torch.split(per_rank[r], sizes)):
            it.total += compressor.decode(seg, it.x.numel(), it.param, shared_seed=it.shared_seed).view_as(it.x)


def exchange_scatter(compressor, chunks: list[Item], group=None) -> torch.Tensor:
    """Reduce-scatter: ``chunks[j]`` is this rank's part destined to rank j. Each rank sends only
    chunk j's payload to rank j (all-to-all) and returns the sum over ranks of C(chunk_rank)
    [*shape of chunks[rank]]. Sets ``local`` on every chunk (for error feedback)."""
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
    recv = payloads[0].new_empty(world * size)
    if world > 1:
        hd.all_to_all_single(recv, torch.cat(payloads), [size] * world, [p.numel() for p in payloads],
                             group=group)
    else:
        recv = payloads[0]
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
