"""Time a training step's communication alone: replay its CommLedger records.

Each record says which collective ran, over how many ranks and how many bytes this rank sent
under the ledger's pricing (see :mod:`heddle.dist.ledger`). Inverting that pricing gives the
payload (all-reduce S = sent n / (2 (n-1)); all-gather S_local = sent / (n-1); reduce-scatter
S_in = sent n / (n-1); all-to-all input = sent n / (n-1), split evenly; broadcast/reduce S = the
larger of sent and received). Replaying the same sequence on fp32 buffers of those sizes, with
nothing else running, times what the step's communication costs when no computation overlaps
it. Point-to-point batches (send/recv) replay as an even all-to-all of the same bytes; a record
over a group smaller than the world replays on consecutive-rank subgroups of that size (the
ParallelLayout convention), or on the world when the size does not divide it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.dist import CommRecord


def payload_bytes(record: CommRecord) -> int:
    """The buffer size (bytes) a record's collective moved, inverted from the ledger's pricing."""
    n, sent = record.group_size, record.bytes_sent
    if n <= 1:
        return 0
    if record.op == "all_reduce":
        return math.ceil(sent * n / (2 * (n - 1)))
    if record.op == "all_gather":
        return math.ceil(sent / (n - 1))
    if record.op in ("reduce_scatter", "all_to_all", "send", "recv"):
        return math.ceil(sent * n / (n - 1))
    if record.op in ("broadcast", "reduce"):
        return max(sent, record.bytes_received)
    if record.op == "barrier":
        return 0
    raise ValueError(f"cannot replay ledger op {record.op!r}")


class Replayer:
    """Builds buffers and subgroups once for a list of records; ``__call__`` replays them."""

    def __init__(self, records: list[CommRecord], *, world_size: int, device: torch.device):
        self.world_size = world_size
        self._subgroups: dict[int, object] = {}
        self._calls = []
        for rec in records:
            if rec.op == "recv":  # its send twin carries the same pair of messages
                continue
            n = rec.group_size if world_size % max(rec.group_size, 1) == 0 else world_size
            if n <= 1:
                continue
            group = self._group(n)
            elements = max(n, math.ceil(payload_bytes(rec) / 4 / n) * n)
            self._calls.append(self._build(rec.op, n, elements, group, device))

    def _group(self, n: int):
        if n == self.world_size:
            return None
        if n not in self._subgroups:  # every rank creates every subgroup, in the same order
            self._subgroups[n], _ = dist.new_subgroups(group_size=n)
        return self._subgroups[n]

    @staticmethod
    def _build(op: str, n: int, elements: int, group, device):
        buf = torch.zeros(elements, device=device)
        if op == "all_reduce":
            return lambda: hd.all_reduce(buf, group=group)
        if op == "all_gather":
            out = torch.empty(elements * n, device=device)
            return lambda: hd.all_gather_into_tensor(out, buf, group=group)
        if op == "reduce_scatter":
            out = torch.empty(elements // n, device=device)
            return lambda: hd.reduce_scatter_tensor(out, buf, group=group)
        if op in ("all_to_all", "send"):
            out = torch.empty_like(buf)
            return lambda: hd.all_to_all_single(out, buf, group=group)
        if op in ("broadcast", "reduce"):
            root = dist.get_global_rank(group, 0) if group is not None else 0
            if op == "broadcast":
                return lambda: hd.broadcast(buf, src=root, group=group)
            return lambda: hd.reduce(buf, dst=root, group=group)
        if op == "barrier":
            return lambda: hd.barrier(group=group)
        raise ValueError(f"cannot replay ledger op {op!r}")

    def __len__(self) -> int:
        return len(self._calls)

    def __call__(self) -> None:
        for call in self._calls:
            call()
