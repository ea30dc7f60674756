"""Ulysses with the all-to-alls overlapped with attention: heads in C chunks, pipelined.

Forward: the C packed q/k/v all-to-alls (chunk c: each rank's c-th slice of its head units) are
all started at once, asynchronously; attention on chunk c runs as soon as chunk c has arrived
(chunks c+1.. are still in flight) and chunk c's output all-to-all starts right after it, while
chunk c+1 computes; chunk c's output is unpacked after chunk c+1's attention. Backward mirrors it: the C gradient scatters start at once; chunk c's attention
backward runs (a reentrant ``torch.autograd.backward`` on the sub-graph kept from the forward) as
soon as its gradient is in, and its dq/dk/dv all-to-all starts while chunk c+1's backward runs.

Bytes are those of :class:`ScatterHeads` / :class:`GatherHeads` (the same elements in C pieces);
what changes is that only the first scatter and the last gather are exposed, the rest hides behind
attention. C = 1 is plain Ulysses (one packed all-to-all each way), without overlap.
"""

from __future__ import annotations

import torch

from heddle.sequence.ulysses_communications import (HeadSplit, gather_finish, gather_start, new_outputs,
                                                    scatter_finish, scatter_start)


def chunk_splits(q_split: HeadSplit, kv_split: HeadSplit, chunks: int) -> list[tuple[HeadSplit, HeadSplit]]:
    """Cut every rank's head units into ``chunks`` contiguous pieces (as even as possible):
    [(query split, kv split)] per chunk, each addressing heads of the full tensors."""
    fewest = min(kv_split.counts)
    if not 1 <= chunks <= fewest:
        raise ValueError(f"overlap_chunks={chunks} must be between 1 and the fewest head units on a rank "
                         f"({fewest}; units per rank: {list(kv_split.counts)})")
    per_unit = q_split.counts[0] // kv_split.counts[0]
    out = []
    for c in range(chunks):
        counts, starts = [], []
        for n, start in zip(kv_split.counts, kv_split.starts):
            sizes = [n // chunks + (1 if i < n % chunks else 0) for i in range(chunks)]
            counts.append(sizes[c])
            starts.append(start + sum(sizes[:c]))
        kv = HeadSplit(kv_split.heads, kv_split.repeat, tuple(counts), tuple(starts))
        q = HeadSplit(q_split.heads, 1, tuple(n * per_unit for n in counts), tuple(s * per_unit for s in starts))
        out.append((q, kv))
    return out


class OverlappedUlysses(torch.autograd.Function):
    """q [sl, b, H, d], k/v [sl, b, Hkv, d] (sequence-first views) -> [sl, b, H, d]."""

    @staticmethod
    def forward(ctx, plans, group, batch_first, attn_fn, attn_kwargs, q, k, v):
        sl, b = q.shape[:2]
        needs_grad = any(ctx.needs_input_grad[5:8])
        pending = [scatter_start([q, k, v], (qs, kvs, kvs), group) for qs, kvs in plans]
        (out,) = new_outputs(q, [plans[0][0]], sl, b, batch_first)
        gathers, graphs = [], []
        for (qs, _), p in zip(plans, pending):
            leaves = [t.detach().requires_grad_(needs_grad) for t in scatter_finish(p)]
            with torch.set_grad_enabled(needs_grad):  # inference keeps no sub-graphs
                o = attn_fn(*(t.transpose(0, 1) for t in leaves), **attn_kwargs)  # [b, s, h_c, d]
            graphs.append((leaves, o) if needs_grad else None)
            gathers.append(gather_start([o.detach().transpose(0, 1)], [qs], group))
            if len(gathers) > 1:  # the previous chunk's output arrived while this one computed
                gather_finish(gathers[-2], [out])
        gather_finish(gathers[-1], [out])
        ctx.plans, ctx.group, ctx.batch_first, ctx.graphs = plans, group, batch_first, graphs
        ctx.shapes = (sl, b)
        return out

    @staticmethod
    def backward(ctx, grad):
        plans, group, graphs = ctx.plans, ctx.group, ctx.graphs
        sl, b = ctx.shapes
        pending = [scatter_start([grad], [qs], group) for qs, _ in plans]
        q0, kv0 = plans[0]
        like = graphs[0][1]
        dq, dk, dv = new_outputs(like, [q0, kv0, kv0], sl, b, ctx.batch_first)
        gathers = []
        for c, ((qs, kvs), p) in enumerate(zip(plans, pending)):
            (g,) = scatter_finish(p)
            leaves, o = graphs[c]
            torch.autograd.backward(o, g.transpose(0, 1))
            grads = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]
            graphs[c] = None  # free the chunk's graph as soon as its gradients exist
            gathers.append(gather_start(grads, (qs, kvs, kvs), group))
            if len(gathers) > 1:
                gather_finish(gathers[-2], [dq, dk, dv])
        gather_finish(gathers[-1], [dq, dk, dv])
        ctx.graphs = None
        return None, None, None, None, None, dq, dk, dv
