"""Collectives heddle issues, each recorded in the CommLedger.

Thin wrappers over ``torch.distributed`` with the same argument names, plus ``all_to_all``: an
autograd-aware all-to-all whose backward is the inverse all-to-all (the exact adjoint). Every
feature module calls these instead of ``torch.distributed`` so that tests and benchmarks read
communication volume from one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from heddle.dist.ledger import blocking, record

ReduceOp = dist.ReduceOp

# torch 2.13 renamed the single-tensor collectives and warns (FutureWarning) on the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_rank_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank inside ``group``, size of ``group``); (0, 1) when torch.distributed is not running."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None, async_op: bool = False):
    _, n = group_rank_size(group)
    moved = 2 * (n - 1) * _nbytes(tensor) // n if n > 1 else 0
    record("all_reduce", n, moved, moved)
    with blocking("all_reduce", async_op):
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    _, n = group_rank_size(group)
    record("all_gather", n, (n - 1) * _nbytes(input), (n - 1) * _nbytes(input))
    with blocking("all_gather", async_op):
        return _all_gather_single(output, input, group=group, async_op=async_op)


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group=None, async_op: bool = False):
    rank, n = group_rank_size(group)
    received = sum(_nbytes(t) for i, t in enumerate(tensor_list) if i != rank)
    record("all_gather", n, (n - 1) * _nbytes(tensor), received)
    with blocking("all_gather", async_op):
        return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, op=ReduceOp.SUM, group=None,
                          async_op: bool = False):
    _, n = group_rank_size(group)
    moved = (n - 1) * _nbytes(input) // n if n > 1 else 0
    record("reduce_scatter", n, moved, moved)
    with blocking("reduce_scatter", async_op):
        return _reduce_scatter_single(output, input, op=op, group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int, group=None, async_op: bool = False):
    """``src`` is a global rank, as in torch.distributed."""
    _, n = group_rank_size(group)
    is_root = not dist.is_initialized() or dist.get_rank() == src
    size = _nbytes(tensor) if n > 1 else 0
    record("broadcast", n, size if is_root else 0, 0 if is_root else size)
    with blocking("broadcast", async_op):
        return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def reduce(tensor: torch.Tensor, dst: int, op=ReduceOp.SUM, group=None, async_op: bool = False):
    """``dst`` is a global rank. Priced as every non-root rank sending its tensor once."""
    _, n = group_rank_size(group)
    is_root = dist.get_rank() == dst
    size = _nbytes(tensor) if n > 1 else 0
    record("reduce", n, 0 if is_root else size, (n - 1) * size if is_root else 0)
    with blocking("reduce", async_op):
        return dist.reduce(tensor, dst=dst, op=op, group=group, async_op=async_op)


def all_to_all_single(output: torch.Tensor, input: torch.Tensor,
                      output_split_sizes: Sequence[int] | None = None,
                      input_split_sizes: Sequence[int] | None = None,
                      group=None, async_op: bool = False):
    """Split sizes count rows of dim 0, as in torch.distributed.all_to_all_single."""
    rank, n = group_rank_size(group)
    in_row = _nbytes(input) // max(input.shape[0], 1) if input.dim() else _nbytes(input)
    out_row = _nbytes(output) // max(output.shape[0], 1) if output.dim() else _nbytes(output)
    in_own = (input_split_sizes[rank] if input_split_sizes else input.shape[0] // n) * in_row
    out_own = (output_split_sizes[rank] if output_split_sizes else output.shape[0] // n) * out_row
    record("all_to_all", n, _nbytes(input) - in_own, _nbytes(output) - out_own)
    if n == 1:
        output.copy_(input)
        return None
    with blocking("all_to_all", async_op):
        return dist.all_to_all_single(output, input, output_split_sizes=output_split_sizes,
                                      input_split_sizes=input_split_sizes, group=group, async_op=async_op)


def batch_isend_irecv(p2p_ops: list[dist.P2POp]):
    """Point-to-point batch; records one "send" and one "recv" entry for the batch."""
    sent = sum(_nbytes(op.tensor) for op in p2p_ops if op.op in (dist.isend, dist.send))
    received = sum(_nbytes(op.tensor) for op in p2p_ops if op.op in (dist.irecv, dist.recv))
    group = p2p_ops[0].group if p2p_ops else None
    _, n = group_rank_size(group)
    if sent:
        record("send", n, sent, 0)
    if received:
        record("recv", n, 0, received)
    if not p2p_ops:
        return []
    return dist.batch_isend_irecv(p2p_ops)


def barrier(group=None) -> None:
    _, n = group_rank_size(group)
    record("barrier", n, 0, 0)
    with blocking("barrier"):
        dist.barrier(group=group)


def _even_sizes(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _check_sizes(name: str, sizes: Sequence[int] | None, n: int, total: int | None) -> list[int] | None:
    if sizes is None:
        return None
    sizes = [int(s) for s in sizes]
    if len(sizes) != n or any(s < 0 for s in sizes):
        raise ValueError(f"{name}={sizes} must list {n} non-negative sizes, one per rank of the group")
    if total is not None and sum(sizes) != total:
        raise ValueError(f"{name}={sizes} sums to {sum(sizes)}, but the tensor has {total} along that dim")
    return sizes


def _all_to_all_forward(x: torch.Tensor, scatter_dim: int, gather_dim: int,
                        scatter_sizes: list[int], gather_sizes: list[int], group) -> torch.Tensor:
    rank, n = group_rank_size(group)
    # Send buffer: chunk j (destined to rank j) flattened, chunks back to back. One copy of x.
    send = torch.cat([x.narrow(scatter_dim, sum(scatter_sizes[:j]), scatter_sizes[j]).reshape(-1)
                      for j in range(n)])
    chunk_shapes = []
    for j in range(n):
        shape = list(x.shape)
        shape[scatter_dim] = scatter_sizes[rank]
        shape[gather_dim] = gather_sizes[j]
        chunk_shapes.append(shape)
    recv_counts = [int(torch.Size(s).numel()) for s in chunk_shapes]
    other = 1
    for i, size in enumerate(x.shape):
        if i != scatter_dim:
            other *= size
    send_counts = [scatter_sizes[j] * other for j in range(n)]
    recv = send.new_empty(sum(recv_counts))
    all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    del send
    pieces = torch.split(recv, recv_counts)
    return torch.cat([p.view(s) for p, s in zip(pieces, chunk_shapes)], dim=gather_dim)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None, *,
               scatter_sizes: Sequence[int] | None = None,
               gather_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Autograd all-to-all: split ``x`` along ``scatter_dim``, send chunk j to rank j, and
    concatenate what every rank sends along ``gather_dim``.

    ``scatter_sizes[j]``: size of the chunk for rank j along ``scatter_dim`` (default: as even as
    possible, the first ranks taking one more). ``gather_sizes[j]``: size of rank j's ``x`` along
    ``gather_dim`` (default: every rank's equals this rank's). With Ulysses, ``x`` is
    ``[b, s/P, H, d]``, scatter_dim=2, gather_dim=1 and the result is ``[b, s, H/P, d]``.
    """
    rank, n = group_rank_size(group)
    ndim = x.dim()
    for name, dim in (("scatter_dim", scatter_dim), ("gather_dim", gather_dim)):
        if not -ndim <= dim < ndim:
            raise ValueError(f"{name}={dim} is out of range for a tensor of {ndim} dims {tuple(x.shape)}")
    scatter_dim, gather_dim = scatter_dim % ndim, gather_dim % ndim
    if scatter_dim == gather_dim:
        raise ValueError(f"scatter_dim and gather_dim must differ, both are {scatter_dim}")
    sizes_s = _check_sizes("scatter_sizes", scatter_sizes, n, x.shape[scatter_dim])
    sizes_g = _check_sizes("gather_sizes", gather_sizes, n, None)
    if sizes_s is None:
        sizes_s = _even_sizes(x.shape[scatter_dim], n)
    if sizes_g is None:
        sizes_g = [x.shape[gather_dim]] * n
    elif sizes_g[rank] != x.shape[gather_dim]:
        raise ValueError(f"gather_sizes[{rank}]={sizes_g[rank]} must equal this rank's size "
                         f"{x.shape[gather_dim]} along gather_dim={gather_dim}")
    if n == 1:
        return x
    # The custom op (heddle.dist.custom_ops) lets torch.compile trace it; its autograd is the adjoint.
    from heddle.dist.custom_ops import all_to_all_op, group_name
    return all_to_all_op(x.contiguous(), scatter_dim, gather_dim, sizes_s, sizes_g, group_name(group))
