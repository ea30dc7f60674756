"""Cutting a global sequence into equal per-rank shards (with padding) and putting it back, and the
global position ids of packed (varlen) batches.

A sequence of length s on P ranks is padded to ``s_pad = ceil(s / P) * P`` and rank r holds
positions ``r * s_pad/P .. (r+1) * s_pad/P - 1``. Padding sits at the end of the global sequence;
Ulysses masks it out of attention when ``cu_seqlens[-1] = s`` (see :func:`padding_cu_seqlens`)
and the loss skips it when the padded targets are ``-100``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heddle.dist import all_gather_into_tensor, group_rank_size, reduce_scatter_tensor


@dataclass(frozen=True)
class SequenceShard:
    """What :func:`gather_sequence` needs to undo :func:`shard_sequence`."""

    length: int        # global length before padding
    padded_length: int  # multiple of the group size
    dim: int
    rank: int
    world: int

    @property
    def local_length(self) -> int:
        return self.padded_length // self.world

    @property
    def start(self) -> int:
        """Global position of this rank's first element."""
        return self.rank * self.local_length

    @property
    def padding(self) -> int:
        return self.padded_length - self.length


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1, *, pad_value=0) -> tuple[torch.Tensor, SequenceShard]:
    """x [..., s, ...] (global, identical on every rank) -> (this rank's shard [..., s_pad/P, ...],
    SequenceShard). Padding with ``pad_value`` (use -100 for targets). Differentiable (a slice)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    dim %= x.dim()
    rank, world = group_rank_size(group)
    length = x.shape[dim]
    if length < 1:
        raise ValueError(f"x has an empty sequence (dim={dim}, shape {tuple(x.shape)})")
    padded = -(-length // world) * world
    if padded != length:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, padded - length]
        x = F.pad(x, pad, value=pad_value)
    info = SequenceShard(length, padded, dim, rank, world)
    return x.narrow(dim, info.start, info.local_length), info


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0; backward is its adjoint, the reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group = group
        out = x.new_empty(world * x.numel())  # gloo wants flat buffers
        all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
        return out.view(world * x.shape[0], *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        _, world = group_rank_size(ctx.group)
        out = grad.new_empty(grad.numel() // world)
        reduce_scatter_tensor(out, grad.contiguous().view(-1), group=ctx.group)
        return out.view(grad.shape[0] // world, *grad.shape[1:]), None, None


def gather_sequence(x: torch.Tensor, shard: SequenceShard, group=None) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the shards of every rank [..., s_pad/P, ...] -> the global,
    unpadded [..., s, ...] on every rank. Differentiable (backward: reduce-scatter of the gradient,
    i.e. the sum over ranks of what each rank's loss puts on this shard)."""
    rank, world = group_rank_size(group)
    if (rank, world) != (shard.rank, shard.world):
        raise ValueError(f"shard was cut for rank {shard.rank} of {shard.world}, but this is rank {rank} "
                         f"of {world} in group={group}")
    if x.shape[shard.dim] != shard.local_length:
        raise ValueError(f"x has {x.shape[shard.dim]} positions along dim={shard.dim}, the shard has "
                         f"{shard.local_length}")
    if world == 1:
        full = x
    else:
        full = _GatherSequence.apply(x.movedim(shard.dim, 0), group, world).movedim(0, shard.dim)
    return full.narrow(shard.dim, 0, shard.length)


def check_cu_seqlens(cu_seqlens, length: int, name: str = "cu_seqlens") -> None:
    """``ValueError`` unless ``cu_seqlens`` is a 1-d integer tensor ``[0, ..., total]`` with at
    least two entries, non-decreasing, and ``total <= length`` (the global sequence length)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {cu_seqlens.dtype}; document boundaries must be an integer tensor "
                         f"(int32 or int64)")
    values = cu_seqlens.tolist() if cu_seqlens.dim() == 1 else None
    if values is None or len(values) < 2 or values[0] != 0:
        raise ValueError(f"{name}={cu_seqlens.tolist()} must be 1-d [0, ..., total] with >= 2 entries")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}={values} must be non-decreasing (cumulative document lengths)")
    if values[-1] > length:
        raise ValueError(f"{name}[-1]={values[-1]} exceeds the sequence length {length}")


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor | None, length: int) -> torch.Tensor:
    """Global position ids [length] (int64): 0, 1, ... restarting at each document start of
    ``cu_seqlens`` ([num_docs + 1], from 0); positions after ``cu_seqlens[-1]`` (padding) keep
    counting from the last document. Without ``cu_seqlens``: ``arange(length)``."""
    pos = torch.arange(length)
    if cu_seqlens is None:
        return pos
    check_cu_seqlens(cu_seqlens, length)
    cu = cu_seqlens.to("cpu", torch.int64)
    doc = torch.bucketize(pos, cu[1:-1], right=True)
    return pos - cu[doc]


def local_position_ids(cu_seqlens: torch.Tensor | None, length: int, group=None) -> torch.Tensor:
    """This rank's slice [s_pad/P] of the global position ids of a sequence of ``length`` tokens
    (padded like :func:`shard_sequence`), for RoPE applied before the Ulysses all-to-all."""
    rank, world = group_rank_size(group)
    padded = -(-length // world) * world
    pos = position_ids_from_cu_seqlens(cu_seqlens, padded)
    local = padded // world
    return pos[rank * local:(rank + 1) * local]


def padding_cu_seqlens(cu_seqlens: torch.Tensor | None, shard: SequenceShard) -> torch.Tensor | None:
    """``cu_seqlens`` that mask ``shard``'s padding out of attention: unchanged when given (padding
    lies after its last entry) or when there is no padding, else ``[0, length]``."""
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, shard.length)
        return cu_seqlens
    if shard.padding == 0:
        return None
    return torch.tensor([0, shard.length], dtype=torch.int64)
