"""heddle's collectives as ``torch.library`` custom ops, so that ``torch.compile`` traces through them.

Dynamo cannot trace into a ``torch.autograd.Function`` that calls ``torch.distributed`` (an
``async_op`` work handle, a Python context manager, a ``.tolist()`` each break the graph). A custom
op is opaque to Dynamo instead: its fake (meta) implementation gives the output shapes from the
arguments, its real implementation (the eager code, ledger bookkeeping included) runs at run time,
and ``register_autograd`` gives it the exact adjoint, itself a custom op, so the backward graph
traces too. A process group travels as its name (``group.group_name``), resolved at run time.

| op | shapes | backward |
| --- | --- | --- |
| ``heddle::all_to_all`` | x -> x with ``scatter_dim`` cut and ``gather_dim`` joined | all_to_all, dims swapped |
| ``heddle::ulysses_scatter`` | xs ``[b, s/P, H_t, d]`` -> ``[b, s, h_t_me, d]`` | ``heddle::ulysses_gather`` |
| ``heddle::ulysses_gather`` | ys ``[b, s, h_t_me, d]`` -> ``[b, s/P, H_t, d]`` | ``heddle::ulysses_scatter`` |
| ``heddle::all_gather`` | x ``[n, ...]`` -> ``[P * n, ...]`` (no gradient) | |
| ``heddle::sparse_all_gather`` | owned chunks -> held chunks (placement P -> P') | ``heddle::sparse_reduce_scatter`` |
| ``heddle::sparse_reduce_scatter`` | held chunks -> owned chunks (P' -> P) | ``heddle::sparse_all_gather`` |

Outputs never alias inputs (a custom op's rule), so these return fresh tensors where the eager
autograd Functions of :mod:`heddle.sequence` return views of a receive buffer; eager Ulysses keeps
its zero-copy path and switches to these ops only under ``torch.compiler.is_compiling()``.
Head splits and placements are flattened into ``int[]`` arguments (see :func:`encode_splits`,
:func:`encode_placement`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from heddle.dist.collectives import group_rank_size


def group_name(group) -> str:
    """The name a custom op takes for ``group`` (None: the default group)."""
    return (dist.group.WORLD if group is None else group).group_name


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _rank_size(name: str) -> tuple[int, int]:
    return group_rank_size(_group(name))


# -- autograd all-to-all --------------------------------------------------------------------------

@torch.library.custom_op("heddle::all_to_all", mutates_args=())
def all_to_all_op(x: Tensor, scatter_dim: int, gather_dim: int, scatter_sizes: list[int],
                  gather_sizes: list[int], group: str) -> Tensor:
    from heddle.dist.collectives import _all_to_all_forward
    return _all_to_all_forward(x.contiguous(), scatter_dim, gather_dim, list(scatter_sizes),
                               list(gather_sizes), _group(group))


@all_to_all_op.register_fake
def _(x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, group):
    rank, _ = _rank_size(group)
    shape = list(x.shape)
    shape[scatter_dim] = scatter_sizes[rank]
    shape[gather_dim] = sum(gather_sizes)
    return x.new_empty(shape)


def _all_to_all_setup(ctx, inputs, output):
    _, ctx.scatter_dim, ctx.gather_dim, ctx.scatter_sizes, ctx.gather_sizes, ctx.group = inputs


def _all_to_all_backward(ctx, grad):
    # The adjoint: what rank j sent along scatter_dim comes back from it along gather_dim.
    back = all_to_all_op(grad, ctx.gather_dim, ctx.scatter_dim, ctx.gather_sizes, ctx.scatter_sizes, ctx.group)
    return back, None, None, None, None, None


all_to_all_op.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


# -- plain all-gather (masks, positions: no gradient) ----------------------------------------------

@torch.library.custom_op("heddle::all_gather", mutates_args=())
def all_gather_op(x: Tensor, group: str) -> Tensor:
    from heddle.dist.collectives import all_gather_into_tensor
    _, world = _rank_size(group)
    out = x.new_empty(world * x.numel())  # gloo wants flat buffers
    all_gather_into_tensor(out, x.contiguous().view(-1), group=_group(group))
    return out.view(world * x.shape[0], *x.shape[1:])


@all_gather_op.register_fake
def _(x, group):
    _, world = _rank_size(group)
    return x.new_empty(world * x.shape[0], *x.shape[1:])


# -- Ulysses head scatter / gather -----------------------------------------------------------------

def encode_splits(splits) -> list[int]:
    """HeadSplits -> int[]: per tensor ``heads, repeat, counts[P], starts[P]``."""
    out = []
    for sp in splits:
        out += [sp.heads, sp.repeat, *sp.counts, *sp.starts]
    return out


def decode_splits(code: list[int], world: int):
    from heddle.sequence.ulysses_communications import HeadSplit
    step, splits = 2 + 2 * world, []
    for i in range(0, len(code), step):
        c = code[i:i + step]
        splits.append(HeadSplit(c[0], c[1], tuple(c[2:2 + world]), tuple(c[2 + world:])))
    return splits


@torch.library.custom_op("heddle::ulysses_scatter", mutates_args=())
def ulysses_scatter_op(xs: list[Tensor], splits: list[int], group: str) -> list[Tensor]:
    """xs [b, s/P, H_t, d] -> [b, s, h_t_me, d] each (contiguous copies)."""
    from heddle.sequence.ulysses_communications import scatter_heads
    _, world = _rank_size(group)
    outs = scatter_heads([x.transpose(0, 1) for x in xs], decode_splits(splits, world), _group(group))
    return [o.transpose(0, 1).contiguous() for o in outs]


@ulysses_scatter_op.register_fake
def _(xs, splits, group):
    rank, world = _rank_size(group)
    return [x.new_empty(x.shape[0], x.shape[1] * world, sp.counts[rank], x.shape[3])
            for x, sp in zip(xs, decode_splits(splits, world))]


@torch.library.custom_op("heddle::ulysses_gather", mutates_args=())
def ulysses_gather_op(ys: list[Tensor], splits: list[int], group: str) -> list[Tensor]:
    """ys [b, s, h_t_me, d] -> [b, s/P, H_t, d] each (contiguous)."""
    from heddle.sequence.ulysses_communications import gather_heads
    _, world = _rank_size(group)
    outs = gather_heads([y.transpose(0, 1) for y in ys], decode_splits(splits, world), _group(group),
                        batch_first=True)
    return [o.transpose(0, 1).contiguous() for o in outs]


@ulysses_gather_op.register_fake
def _(ys, splits, group):
    _, world = _rank_size(group)
    return [y.new_empty(y.shape[0], y.shape[1] // world, sp.heads, y.shape[3])
            for y, sp in zip(ys, decode_splits(splits, world))]


def _ulysses_setup(ctx, inputs, output):
    ctx.splits, ctx.group = inputs[1], inputs[2]


def _scatter_backward(ctx, grads):
    grads = [g.contiguous() for g in grads]
    return ulysses_gather_op(grads, ctx.splits, ctx.group), None, None


def _gather_backward(ctx, grads):
    grads = [g.contiguous() for g in grads]
    return ulysses_scatter_op(grads, ctx.splits, ctx.group), None, None


ulysses_scatter_op.register_autograd(_scatter_backward, setup_context=_ulysses_setup)
ulysses_gather_op.register_autograd(_gather_backward, setup_context=_ulysses_setup)


# -- sparse collectives (FSSDP) ---------------------------------------------------------------------

def encode_placement(owners, target) -> tuple[list[int], list[int]]:
    """(owners, target) -> (owners as int[], target flattened: per chunk its size then its ranks)."""
    flat = []
    for ranks in target:
        ranks = sorted(int(r) for r in ranks)
        flat += [len(ranks), *ranks]
    return [int(o) for o in owners], flat


def _decode_target(flat: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(flat):
        n = flat[i]
        out.append(list(flat[i + 1:i + 1 + n]))
        i += 1 + n
    return out


@torch.library.custom_op("heddle::sparse_all_gather", mutates_args=())
def sparse_all_gather_op(owned: list[Tensor], owners: list[int], target: list[int], chunk_shape: list[int],
                         dtype: torch.dtype, group: str) -> list[Tensor]:
    """Owned chunks (ascending chunk order) -> every chunk this rank holds in P' (ascending)."""
    from heddle.dist.sparse import sparse_all_gather
    rank, _ = _rank_size(group)
    mine = [c for c, o in enumerate(owners) if o == rank]
    out = sparse_all_gather(dict(zip(mine, owned)), owners, _decode_target(target), chunk_shape=chunk_shape,
                            dtype=dtype, group=_group(group))
    return [t.clone() if c in mine else t for c, t in out.items()]


@sparse_all_gather_op.register_fake
def _(owned, owners, target, chunk_shape, dtype, group):
    rank, _ = _rank_size(group)
    held = [c for c, ranks in enumerate(_decode_target(target)) if rank in ranks]
    like = owned[0] if owned else torch.empty(0)
    return [like.new_empty(chunk_shape, dtype=dtype) for _ in held]


@torch.library.custom_op("heddle::sparse_reduce_scatter", mutates_args=())
def sparse_reduce_scatter_op(replicas: list[Tensor], owners: list[int], target: list[int],
                             chunk_shape: list[int], dtype: torch.dtype, group: str) -> list[Tensor]:
    """Held chunks (ascending) -> the summed chunks this rank owns (ascending)."""
    from heddle.dist.sparse import sparse_reduce_scatter
    rank, _ = _rank_size(group)
    placement = _decode_target(target)
    held = [c for c, ranks in enumerate(placement) if rank in ranks]
    out = sparse_reduce_scatter(dict(zip(held, replicas)), owners, placement, chunk_shape=chunk_shape,
                                 dtype=dtype, group=_group(group))
    return [out[c] for c in sorted(out)]


@sparse_reduce_scatter_op.register_fake
def _(replicas, owners, target, chunk_shape, dtype, group):
    rank, _ = _rank_size(group)
    like = replicas[0] if replicas else torch.empty(0)
    return [like.new_empty(chunk_shape, dtype=dtype) for o in owners if o == rank]


def _sparse_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _sparse_all_gather_backward(ctx, grads):
    return sparse_reduce_scatter_op([g.contiguous() for g in grads], *ctx.args), None, None, None, None, None


def _sparse_reduce_scatter_backward(ctx, grads):
    return sparse_all_gather_op([g.contiguous() for g in grads], *ctx.args), None, None, None, None, None


sparse_all_gather_op.register_autograd(_sparse_all_gather_backward, setup_context=_sparse_setup)
sparse_reduce_scatter_op.register_autograd(_sparse_reduce_scatter_backward, setup_context=_sparse_setup)
