"""Marking parameters that are sharded (owned by one rank) rather than replicated.

Data-parallel machinery (the Trainer's DDP wrapper, gradient clipping, checkpoint resharding)
treats a parameter as replicated on every rank unless it is marked here. A feature that owns
parameters per rank (MoE experts under FSSDP) marks them; the Trainer then leaves them out of DDP
and counts their gradient norm exactly once, on the owner.
"""

from __future__ import annotations

import torch

_ATTR = "_heddle_sharded"


def mark_sharded(param: torch.nn.Parameter, owner_rank: int | None = None) -> torch.nn.Parameter:
    """Mark ``param`` as held by one rank only (``owner_rank``: its global rank, if known)."""
    setattr(param, _ATTR, True if owner_rank is None else int(owner_rank))
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, _ATTR, None) is not None
