"""heddle's own collectives in the collectives sweep, when their modules exist.

- ``sparse_all_gather`` / ``sparse_reduce_scatter`` (:mod:`heddle.dist.sparse`, Hecate's spAG /
  spRS): a buffer of ``E = 4 n`` chunks owned round-robin (``owners[c] = c mod n``); the first
  ``ceil(lambda E)`` chunks are materialized on every rank (``--sparse-fraction`` lambda), the others
  stay on their owner. "size" is the dense buffer (E chunks: what a full all-gather would produce).
- ``compressed_all_reduce`` (:class:`heddle.compress.GradientCompression` with ``TopK(density)``,
  ``--compress-density``, no error feedback, sum): ``comp.all_reduce([buffer])`` of a ``size``-byte
  fp32 buffer. Checked against an independent fp64 reference: the sum over ranks of each rank's
  k = round(density n) largest-magnitude entries (inputs are seeded Gaussians: no ties).

These ops report algbw on the dense size (the effective bandwidth a user sees) and busbw from the
bytes the CommLedger recorded: mean over ranks of bytes received per call / time. For the dense
collectives that ledger figure equals nccl-tests' factor x size, so the columns compare directly.
"""

from __future__ import annotations

import importlib
import math

import torch

from heddle.bench.scenarios.collectives import Case, _wrong, pattern


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def sparse_placement(n: int, fraction: float) -> tuple[list[int], list[list[int]]]:
    """(owners, target) for E = 4n chunks: chunk c owned by c mod n, the first ceil(fraction E)
    chunks materialized on every rank."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"sparse fraction={fraction} must be in [0, 1]")
    chunks = 4 * n
    wide = math.ceil(fraction * chunks)
    owners = [c % n for c in range(chunks)]
    target = [list(range(n)) if c < wide else [owners[c]] for c in range(chunks)]
    return owners, target


def _sparse_case(ctx, target_bytes, dtype, options, gather: bool):
    fraction = options.sparse_fraction
    fn = _optional("heddle.dist", "sparse_all_gather" if gather else "sparse_reduce_scatter")
    n, r, el = ctx.world_size, ctx.rank, torch.finfo(dtype).bits // 8
    owners, target = sparse_placement(n, fraction)
    chunk = max(1, target_bytes // (el * len(owners)))
    mine = [c for c, o in enumerate(owners) if o == r]
    held = [c for c, t in enumerate(target) if r in t]
    kw = dict(chunk_shape=(chunk,), dtype=dtype, group=ctx.group)
    zeros = {c: torch.zeros(chunk, dtype=dtype, device=ctx.device) for c in (mine if gather else held)}

    def offsets(c):
        return torch.arange(c * chunk, (c + 1) * chunk, device=ctx.device)

    def check():
        if gather:
            out = fn({c: pattern(r, offsets(c), dtype) for c in mine}, owners, target, **kw)
            if sorted(out) != held:
                return len(held) * chunk
            return sum(_wrong(out[c], pattern(owners[c], offsets(c), torch.float64)) for c in held)
        out = fn({c: pattern(r, offsets(c), dtype) for c in held}, owners, target, **kw)
        if sorted(out) != mine:
            return len(mine) * chunk
        return sum(_wrong(out[c], sum(pattern(q, offsets(c), torch.float64) for q in target[c])) for c in mine)
    return Case(len(owners) * chunk * el, len(owners) * chunk, lambda: fn(zeros, owners, target, **kw), check,
                redop="none" if gather else "sum")


def _compressed_case(ctx, target_bytes, dtype, options):
    from heddle.compress import GradientCompression, TopK
    from heddle.compress.compressors import num_kept

    if dtype != torch.float32:
        raise ValueError(f"compressed_all_reduce compresses fp32 gradients; --dtype={dtype} is not supported "
                         "(run it with --dtype float32 or leave it out of --ops)")
    count = max(1, target_bytes // 4)
    comp = GradientCompression(TopK(options.compress_density), group=ctx.group, start_iter=0, reduction="sum")
    buf = torch.zeros(count, device=ctx.device)

    def rank_input(q):
        g = torch.Generator().manual_seed(1000 + q)
        return torch.randn(count, generator=g, dtype=torch.float64).to(ctx.device)

    def check():
        x = rank_input(ctx.rank).float()
        comp.all_reduce([x])
        k = num_kept(count, options.compress_density)
        expected = torch.zeros(count, dtype=torch.float64, device=ctx.device)
        for q in range(ctx.world_size):
            xq = rank_input(q).float().double()
            idx = torch.topk(xq.abs(), k).indices
            expected[idx] += xq[idx]
        return int(((x.double() - expected).abs() > 1e-6 * (1 + expected.abs())).sum())
    return Case(count * 4, count, lambda: comp.all_reduce([buf]), check, redop="sum")


def heddle_ops() -> dict:
    """{name: (builder, bus_op)}; bus_op None: busbw from the ledger's bytes."""
    ops = {}
    if _optional("heddle.dist", "sparse_all_gather") is not None:
        ops["sparse_all_gather"] = (lambda c, t, d, o: _sparse_case(c, t, d, o, True), None)
    if _optional("heddle.dist", "sparse_reduce_scatter") is not None:
        ops["sparse_reduce_scatter"] = (lambda c, t, d, o: _sparse_case(c, t, d, o, False), None)
    if _optional("heddle.compress", "GradientCompression") is not None:
        ops["compressed_all_reduce"] = (_compressed_case, None)
    return ops
