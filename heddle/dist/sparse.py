"""Sparse collectives over chunked buffers (Hecate, FSSDP): SparseAllGather and SparseReduceScatter.

A buffer is ``num_chunks`` chunks of one shape (one chunk per MoE expert). A placement is a set of
(chunk, rank) pairs, given here as:

- ``owners[c]``: the rank (inside ``group``) that owns chunk ``c``: the source placement P, with
  exactly one owner per chunk;
- ``target[c]``: the ranks that hold chunk ``c`` in the target placement P'; P must be a subset
  of P', so ``owners[c] in target[c]``.

``sparse_all_gather`` (spAG(P, P')) sends chunk ``c`` from its owner to every rank of
``target[c] \\ {owners[c]}``; ``sparse_reduce_scatter`` (spRS(P', P)) sums the copies of chunk ``c``
held by ``target[c]`` onto its owner. Both move exactly ``chunk_bytes * |P' \\ P|`` bytes: the
O(lambda * S) volume of the paper, where a full all-gather would move O(S). They are built on one
``heddle.dist.batch_isend_irecv`` batch (one message per (source, destination) pair, the chunks
packed in chunk order), so the CommLedger records them as "send" / "recv".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.distributed as dist

from heddle.dist.collectives import batch_isend_irecv, group_rank_size


def _check_placement(owners: Sequence[int], target: Sequence[Collection[int]], world: int):
    if len(owners) != len(target):
        raise ValueError(f"owners has {len(owners)} chunks but target has {len(target)}; one entry per chunk")
    out = []
    for c, (o, t) in enumerate(zip(owners, target)):
        o = int(o)
        if not 0 <= o < world:
            raise ValueError(f"owners[{c}]={o} is not a rank of the group (size {world})")
        ranks = sorted({int(r) for r in t})
        if any(not 0 <= r < world for r in ranks):
            raise ValueError(f"target[{c}]={ranks} holds ranks outside the group (size {world})")
        if o not in ranks:
            raise ValueError(f"target[{c}]={ranks} must contain the owner {o}: the target placement "
                             f"must be a superset of the source placement")
        out.append((o, ranks))
    return out


def _global_rank(group, r: int) -> int:
    if group is None or group is dist.group.WORLD:
        return r
    return dist.get_global_rank(group, r)


class SparseWork:
    """Handle of an asynchronous sparse collective: ``wait()`` returns its result."""

    def __init__(self, works, finish):
        self._works, self._finish, self._result, self._done = works, finish, None, False

    def wait(self) -> dict[int, torch.Tensor]:
        if not self._done:
            for w in self._works:
                w.wait()
            self._result, self._done = self._finish(), True
        return self._result


def _exchange(sends: dict[int, list[torch.Tensor]], recv_counts: dict[int, int], chunk_shape, dtype,
              device, group):
    """Post one packed message per peer; returns (works, {peer: received [n, *chunk_shape]})."""
    ops, received = [], {}
    for peer, chunks in sorted(sends.items()):
        if len(chunks) == 1 and chunks[0].dtype == dtype and chunks[0].is_contiguous():
            payload = chunks[0].reshape(1, *chunk_shape)   # one chunk: send it as it is, no copy
        else:
            payload = torch.stack([c.reshape(chunk_shape) for c in chunks]).to(dtype).contiguous()
        ops.append(dist.P2POp(dist.isend, payload, _global_rank(group, peer), group))
    for peer, n in sorted(recv_counts.items()):
        buf = torch.empty((n, *chunk_shape), dtype=dtype, device=device)
        received[peer] = buf
        ops.append(dist.P2POp(dist.irecv, buf, _global_rank(group, peer), group))
    return batch_isend_irecv(ops), received


def _route(plan, rank: int, *, gather: bool) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """This rank's messages as ({peer: [chunk]} to send, {peer: [chunk]} to receive), chunks in
    ascending order. All-gather sends each chunk from its owner to every other holder in P';
    reduce-scatter is the mirror image (every other holder sends its copy to the owner)."""
    send: dict[int, list[int]] = {}
    recv: dict[int, list[int]] = {}
    for c, (owner, ranks) in enumerate(plan):
        for r in ranks:
            if r == owner:
                continue
            src, dst = (owner, r) if gather else (r, owner)
            if src == rank:
                send.setdefault(dst, []).append(c)
            elif dst == rank:
                recv.setdefault(src, []).append(c)
    return send, recv


def _check_shapes(name: str, chunks: Mapping[int, torch.Tensor], chunk_shape: tuple[int, ...]) -> None:
    for c, t in chunks.items():
        if tuple(t.shape) != chunk_shape:
            raise ValueError(f"{name}[{c}] has shape {tuple(t.shape)}, expected chunk_shape={chunk_shape}")


def sparse_all_gather(owned: Mapping[int, torch.Tensor], owners: Sequence[int],
                      target: Sequence[Collection[int]], *, chunk_shape: Sequence[int],
                      dtype: torch.dtype, group=None, async_op: bool = False):
    """spAG(P, P'): every rank ends with every chunk ``c`` whose ``target[c]`` contains it.

    ``owned``: {chunk: tensor of ``chunk_shape``} for exactly the chunks this rank owns.
    Returns {chunk: tensor} for every chunk this rank holds in P' (owned chunks are returned as
    given, not copied), or a :class:`SparseWork` whose ``wait()`` returns it when ``async_op``.
    """
    rank, world = group_rank_size(group)
    plan = _check_placement(owners, target, world)
    chunk_shape = tuple(int(s) for s in chunk_shape)
    if torch.compiler.is_compiling() and not async_op:  # traceable: heddle::sparse_all_gather
        from heddle.dist.custom_ops import encode_placement, group_name, sparse_all_gather_op
        outs = sparse_all_gather_op([owned[c] for c in sorted(owned)], *encode_placement(owners, target),
                                    list(chunk_shape), dtype, group_name(group))
        return dict(zip([c for c, (_, ranks) in enumerate(plan) if rank in ranks], outs))
    mine = {c for c, (o, _) in enumerate(plan) if o == rank}
    if set(owned) != mine:
        raise ValueError(f"owned holds chunks {sorted(owned)} but this rank ({rank}) owns {sorted(mine)}")
    _check_shapes("owned", owned, chunk_shape)
    send_chunks, recv_chunks = _route(plan, rank, gather=True)
    sends = {peer: [owned[c] for c in chunks] for peer, chunks in send_chunks.items()}
    device = next(iter(owned.values())).device if owned else torch.device("cpu")
    works, received = _exchange(sends, {p: len(cs) for p, cs in recv_chunks.items()}, chunk_shape,
                                dtype, device, group)

    def finish():
        out = dict(owned)
        for peer, chunks in recv_chunks.items():
            for i, c in enumerate(chunks):
                out[c] = received[peer][i]
        return dict(sorted(out.items()))

    work = SparseWork(works, finish)
    return work if async_op else work.wait()


def sparse_reduce_scatter(replicas: Mapping[int, torch.Tensor], owners: Sequence[int],
                          target: Sequence[Collection[int]], *, chunk_shape: Sequence[int],
                          dtype: torch.dtype, group=None, async_op: bool = False):
    """spRS(P', P): the owner of chunk ``c`` receives the sum of the copies held by ``target[c]``.

    ``replicas``: {chunk: tensor} for exactly the chunks this rank holds in P' (its own copies,
    e.g. the gradients of its materialized experts). Returns {chunk: summed tensor} for the chunks
    this rank owns. The sum runs in ascending rank order on every owner, so the result does not
    depend on message arrival order.
    """
    rank, world = group_rank_size(group)
    plan = _check_placement(owners, target, world)
    chunk_shape = tuple(int(s) for s in chunk_shape)
    if torch.compiler.is_compiling() and not async_op:  # traceable: heddle::sparse_reduce_scatter
        from heddle.dist.custom_ops import encode_placement, group_name, sparse_reduce_scatter_op
        outs = sparse_reduce_scatter_op([replicas[c] for c in sorted(replicas)], *encode_placement(owners, target),
                                        list(chunk_shape), dtype, group_name(group))
        return dict(zip([c for c, (o, _) in enumerate(plan) if o == rank], outs))
    held = {c for c, (_, ranks) in enumerate(plan) if rank in ranks}
    if set(replicas) != held:
        raise ValueError(f"replicas holds chunks {sorted(replicas)} but this rank ({rank}) holds "
                         f"{sorted(held)} in the target placement")
    _check_shapes("replicas", replicas, chunk_shape)
    send_chunks, recv_chunks = _route(plan, rank, gather=False)
    sends = {peer: [replicas[c] for c in chunks] for peer, chunks in send_chunks.items()}
    device = next(iter(replicas.values())).device if replicas else torch.device("cpu")
    works, received = _exchange(sends, {p: len(cs) for p, cs in recv_chunks.items()}, chunk_shape,
                                dtype, device, group)

    def finish():
        out = {}
        for c, (o, ranks) in enumerate(plan):
            if o != rank:
                continue
            total = None
            for r in ranks:  # ascending rank order: deterministic sums
                part = replicas[c] if r == rank else received[r][recv_chunks[r].index(c)]
                total = part.to(dtype).clone() if total is None else total.add_(part)
            out[c] = total
        return out

    work = SparseWork(works, finish)
    return work if async_op else work.wait()
