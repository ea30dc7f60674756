"""The Trainer's device mesh: data-parallel replicate x data-parallel shard x Ulysses sequence.

torchtitan's ``ParallelDims`` pattern: the sizes are validated against the world size once, the
mesh is built from them and handed to whoever needs it (nothing global). Rank order is row-major
over ``(dp_replicate, dp_shard, sp)``: the ``sp`` ranks of one replica are contiguous (Ulysses'
all-to-all stays on neighbouring ranks, inside a node), then the shard ranks, then replicas.

    world 8, data_parallel="hsdp", dp_shard=2, sp=2  ->  dp_replicate=2
    rank = (r * dp_shard + s) * sp + q

What each data-parallel mode shards (``Layout.fsdp_mesh`` is what :func:`heddle.dist.fsdp.apply_fsdp`
gets):

- ``"ddp"``: every rank holds everything; gradients are summed over all ranks (``dp_replicate`` =
  world / sp).
- ``"fsdp"``: parameters, gradients and optimizer state are sharded over all dp x sp ranks
  (ZeRO-3 over the sequence-parallel ranks too, as DeepSpeed does with Ulysses): a 1-D mesh of
  ``dp_shard * sp`` ranks.
- ``"hsdp"``: sharded over ``dp_shard * sp`` ranks inside a replica, replicated across
  ``dp_replicate``: a 2-D mesh ``(dp_replicate, dp_shard_sp)``.
- ``"none"``: no gradient sync by the Trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DATA_PARALLEL = ("ddp", "fsdp", "hsdp", "none")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh dimensions; ``dp_replicate * dp_shard * sp == world_size``."""

    dp_replicate: int
    dp_shard: int
    sp: int
    world_size: int

    def __post_init__(self):
        for name in ("dp_replicate", "dp_shard", "sp", "world_size"):
            _positive_int(name, getattr(self, name))
        if self.dp_replicate * self.dp_shard * self.sp != self.world_size:
            raise ValueError(f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x sp={self.sp} = "
                             f"{self.dp_replicate * self.dp_shard * self.sp} ranks, but the world size is "
                             f"{self.world_size}")

    @classmethod
    def build(cls, data_parallel: str, world_size: int, *, sp: int = 1, dp_shard: int | None = None,
              dp_replicate: int | None = None) -> "ParallelDims":
        """Sizes for a data-parallel mode; the free dimension is inferred from the world size.

        hsdp: give ``dp_shard`` (ranks that shard one replica, before x sp) or ``dp_replicate``; with
        neither, one replica per node (``dp_shard = LOCAL_WORLD_SIZE / sp``)."""
        if data_parallel not in DATA_PARALLEL:
            raise ValueError(f"data_parallel={data_parallel!r}; valid: {', '.join(map(repr, DATA_PARALLEL))}")
        _positive_int("sp", sp)
        if world_size % sp:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(f"sp={sp} must divide the world size {world_size}; valid: {divisors}")
        dp = world_size // sp
        for name, value in (("dp_shard", dp_shard), ("dp_replicate", dp_replicate)):
            if value is not None:
                _positive_int(name, value)
        if data_parallel != "hsdp":
            if dp_shard is not None or dp_replicate is not None:
                raise ValueError(f"dp_shard={dp_shard}, dp_replicate={dp_replicate}: only data_parallel='hsdp' "
                                 f"takes them (got data_parallel={data_parallel!r})")
            if data_parallel == "fsdp":
                return cls(1, dp, sp, world_size)
            return cls(dp, 1, sp, world_size)
        if dp_shard is None and dp_replicate is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            if local % sp or dp % max(local // sp, 1):
                raise ValueError(f"data_parallel='hsdp': give dp_shard or dp_replicate (one replica per node "
                                 f"needs LOCAL_WORLD_SIZE={local} to be a multiple of sp={sp} dividing "
                                 f"world {world_size})")
            dp_shard = max(local // sp, 1)
        if dp_shard is None:
            if dp % dp_replicate:
                raise ValueError(f"dp_replicate={dp_replicate} must divide world / sp = {world_size} / {sp} = {dp}")
            dp_shard = dp // dp_replicate
        if dp_replicate is None:
            if dp % dp_shard:
                raise ValueError(f"dp_shard={dp_shard} must divide world / sp = {world_size} / {sp} = {dp}")
            dp_replicate = dp // dp_shard
        return cls(dp_replicate, dp_shard, sp, world_size)

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas of the batch (ranks that read different rows)."""
        return self.dp_replicate * self.dp_shard


@dataclass
class Layout:
    """Where this rank sits: always present on a Trainer (``trainer.layout``), whatever is on.

    ``dp_rank`` / ``dp_size`` shard the data rows (the ``sp`` ranks of one replica read the same
    rows); ``sp_group`` is this rank's Ulysses group (None without SP); ``mesh`` the 3-D
    ``(dp_replicate, dp_shard, sp)`` DeviceMesh (None at world 1 or on a sub-group);
    ``fsdp_mesh`` the mesh FSDP2 shards over (None unless data_parallel is fsdp/hsdp)."""

    dims: ParallelDims
    data_parallel: str
    rank: int
    dp_rank: int
    sp_rank: int
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    mesh: object | None
    fsdp_mesh: object | None

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    @property
    def sp_size(self) -> int:
        return self.dims.sp


def _is_world(group) -> bool:
    return group is None or group is dist.group.WORLD or (
        dist.is_initialized() and dist.get_process_group_ranks(group) == list(range(dist.get_world_size())))


def build_layout(dims: ParallelDims, data_parallel: str, *, group=None, device_type: str = "cpu") -> Layout:
    """Create the groups and meshes of ``dims`` (collective over ``group``, in a fixed order)."""
    from torch.distributed.device_mesh import DeviceMesh

    from heddle.dist.groups import ParallelLayout

    if dist.is_initialized():
        ranks = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
        rank = ranks.index(dist.get_rank())
    else:
        ranks, rank = [0], 0
    if len(ranks) != dims.world_size:
        raise ValueError(f"dims are for {dims.world_size} ranks but the group has {len(ranks)}")
    sp_group = dp_group = None
    if dims.sp > 1:
        # contiguous SP groups, DP groups across them (the same order as the mesh below)
        groups = ParallelLayout(dims.sp, group=group)
        sp_group, dp_group = groups.sp_group, groups.dp_group
    mesh = fsdp_mesh = None
    on_world = _is_world(group)
    if data_parallel in ("fsdp", "hsdp") and not on_world:
        raise ValueError(f"data_parallel={data_parallel!r} needs the Trainer on the default (world) group: "
                         f"FSDP2's DeviceMesh spans the whole world")
    if dims.world_size > 1 and on_world:
        shape = (dims.dp_replicate, dims.dp_shard, dims.sp)
        mesh = DeviceMesh(device_type, torch.arange(dims.world_size).view(shape),
                          mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
        if data_parallel == "fsdp":
            fsdp_mesh = DeviceMesh(device_type, torch.arange(dims.world_size), mesh_dim_names=("dp_shard_sp",))
        elif data_parallel == "hsdp":
            fsdp_mesh = DeviceMesh(device_type, torch.arange(dims.world_size).view(dims.dp_replicate, -1),
                                   mesh_dim_names=("dp_replicate", "dp_shard_sp"))
    elif data_parallel in ("fsdp", "hsdp"):  # world 1: FSDP2 on a one-rank mesh keeps the code path
        fsdp_mesh = DeviceMesh(device_type, torch.arange(1), mesh_dim_names=("dp_shard_sp",)) \
            if dist.is_initialized() else None
    return Layout(dims=dims, data_parallel=data_parallel, rank=rank, dp_rank=rank // dims.sp, sp_rank=rank % dims.sp,
                  sp_group=sp_group, dp_group=dp_group, mesh=mesh, fsdp_mesh=fsdp_mesh)
