"""Process-group helpers: a cache of aligned power-of-two subgroups and a data x sequence layout.

Creating a process group is collective (every rank of the parent must call ``new_group`` in the
same order) and slow, so groups are created once, up front, in a fixed order, and reused: nothing
on a training step's hot path creates a group.
"""

from __future__ import annotations

import torch.distributed as dist


def _parent_ranks(group) -> list[int]:
    if not dist.is_initialized():
        return [0]
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def aligned_ranges(world_size: int) -> list[tuple[int, int]]:
    """Every (start, size) with size a power of two and start a multiple of size, inside world.

    Ordered by size, then start: the fixed creation order every rank follows.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    out, size = [], 1
    while size <= world_size:
        out.extend((start, size) for start in range(0, world_size - size + 1, size))
        size *= 2
    return out


class SubgroupCache:
    """All aligned power-of-two rank ranges of ``group``, created once, collectively.

    ``cache.get(start, size)`` returns the group of ranks ``start .. start+size-1`` (ranks inside
    the parent group). The parent itself is returned for the full range; size-1 groups are real
    one-rank groups so code can treat every group alike.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, max_size: int | None = None):
        self.parent = group
        self.ranks = _parent_ranks(group)
        self.world_size = len(self.ranks)
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size={max_size} must be >= 1")
        self._groups: dict[tuple[int, int], dist.ProcessGroup | None] = {}
        for start, size in aligned_ranges(self.world_size):
            if max_size is not None and size > max_size:
                continue
            if size == self.world_size:
                self._groups[(start, size)] = group if group is not None else (
                    dist.group.WORLD if dist.is_initialized() else None)
            else:
                # Every rank calls new_group for every range, in the same order (collective).
                self._groups[(start, size)] = dist.new_group(self.ranks[start:start + size])

    def get(self, start: int, size: int) -> dist.ProcessGroup | None:
        key = (int(start), int(size))
        if key not in self._groups:
            valid = ", ".join(f"({s},{n})" for s, n in self._groups)
            raise ValueError(f"no cached subgroup for start={start}, size={size}: groups are aligned "
                             f"power-of-two ranges of a {self.world_size}-rank group; valid: {valid}")
        return self._groups[key]

    def containing(self, rank: int, size: int) -> tuple[int, dist.ProcessGroup | None]:
        """(start, group) of the aligned range of ``size`` that holds ``rank``."""
        start = (rank // size) * size
        return start, self.get(start, size)

    def __len__(self) -> int:
        return len(self._groups)


class ParallelLayout:
    """Data x sequence parallel layout: contiguous sequence-parallel groups of ``sp_size`` ranks,
    data-parallel groups across them (ranks with the same position in their SP group).

    World 4, sp_size 2: SP groups {0,1} {2,3}; DP groups {0,2} {1,3}.
    """

    def __init__(self, sp_size: int = 1, group: dist.ProcessGroup | None = None):
        ranks = _parent_ranks(group)
        world = len(ranks)
        if sp_size < 1 or world % sp_size:
            divisors = [d for d in range(1, world + 1) if world % d == 0]
            raise ValueError(f"sp_size={sp_size} must divide the world size {world}; valid: {divisors}")
        self.world_size = world
        self.sp_size = sp_size
        self.dp_size = world // sp_size
        me = ranks.index(dist.get_rank()) if dist.is_initialized() else 0
        self.sp_rank, self.dp_rank = me % sp_size, me // sp_size
        self.sp_group = self.dp_group = None
        whole = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
        # Collective creation in a fixed order: all SP groups, then all DP groups.
        for d in range(self.dp_size):
            members = ranks[d * sp_size:(d + 1) * sp_size]
            g = whole if sp_size == world else dist.new_group(members) if world > 1 else whole
            if d == self.dp_rank:
                self.sp_group = g
        for s in range(sp_size):
            members = ranks[s::sp_size]
            g = whole if self.dp_size == world else dist.new_group(members) if world > 1 else whole
            if s == self.sp_rank:
                self.dp_group = g

    def __repr__(self) -> str:
        return (f"ParallelLayout(world={self.world_size}, dp={self.dp_size} (rank {self.dp_rank}), "
                f"sp={self.sp_size} (rank {self.sp_rank}))")
