"""Moving expert ownership: Algorithm 2 applied live (with optimizer state), and checkpoint shards.

Live re-sharding (:func:`reshard`) keeps every expert's Parameter object and moves its *data*:
the new owner receives the flat chunk and the optimizer state (every state tensor, by spAG from
the old owner), the old owner drops both. The optimizer's parameter list never changes, so an
optimizer built before re-sharding stays valid and the trajectory is unchanged.

Checkpoints: ``model.state_dict()`` on each rank holds the experts that rank owns (each expert
saved exactly once). :func:`merge_expert_shards` joins the per-rank dicts, refusing an expert that
appears twice; ``model.load_state_dict(merged)`` at any world size takes the experts each rank
owns and reports a missing one as a missing key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from heddle.dist import comm_tag, sparse_all_gather
from heddle.moe.layer import MoE
from heddle.moe.placement import owner_imbalance, reshard_owners

_EXPERT_KEY = re.compile(r"(^|\.)experts\.\d+$")


def _state_template(layer: MoE, optimizer) -> list[tuple[str, tuple[int, ...] | None, torch.dtype]]:
    """(key, shape or None for parameter-shaped, dtype) of the optimizer state to move, read from
    the router's state (the router is replicated, so every rank reads the same template)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(layer.router.weight, {})
    template = []
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}; re-sharding moves tensors only")
        shaped = value.shape == layer.router.weight.shape
        template.append((key, None if shaped else tuple(value.shape), value.dtype))
    return template


def move_experts(layer: MoE, new_owners: Sequence[int], optimizer=None) -> int:
    """Give every expert of ``layer`` to ``new_owners[e]`` (collective on ``layer.group``);
    returns how many experts moved."""
    old = list(layer.owners)
    new = [int(o) for o in new_owners]
    if len(new) != layer.num_experts:
        raise ValueError(f"new_owners has {len(new)} entries, expected num_experts={layer.num_experts}")
    moving = [e for e in range(layer.num_experts) if old[e] != new[e]]
    if not moving:
        return 0
    me, numel = layer.rank, layer.expert_numel
    target = [sorted({old[e], new[e]}) for e in range(layer.num_experts)]
    mine = [e for e in range(layer.num_experts) if old[e] == me]
    with comm_tag("moe-reshard"):
        params = sparse_all_gather({e: layer.experts.expert(e).detach() for e in mine}, old, target,
                                   chunk_shape=(numel,), dtype=layer.dtype, group=layer.group)
        states = {}
        for key, shape, dtype in _state_template(layer, optimizer):
            chunks = {}
            for e in mine:
                value = optimizer.state.get(layer.experts.expert(e), {}).get(key)
                if value is None:
                    raise ValueError(f"expert {e} has no optimizer state {key!r} but the router does")
                chunks[e] = value.reshape(-1) if shape is None else value
            states[key] = sparse_all_gather(chunks, old, target, chunk_shape=(numel,) if shape is None else shape,
                                            dtype=dtype, group=layer.group)
    for e in moving:
        p = layer.experts.expert(e)
        if new[e] == me:
            p.data = params[e].clone()
            if optimizer is not None and states:
                optimizer.state[p] = {k: v[e].clone() for k, v in states.items()}
        elif old[e] == me:
            p.data = torch.empty(0, dtype=layer.dtype)
            p.grad = None
            if optimizer is not None:
                optimizer.state.pop(p, None)
    layer.set_owners(new)
    return len(moving)


def reshard(layers: Sequence[MoE], optimizer=None, *, owners: Sequence[Sequence[int]] | None = None) -> int:
    """Algorithm 2: re-shard the experts of ``layers`` (same group) by their predicted loads, or
    to ``owners`` when given. Moves nothing unless the plan changes and (for a computed plan)
    lowers :func:`owner_imbalance`. Returns the number of experts moved. Collective."""
    layers = list(layers)
    if not layers:
        return 0
    world = layers[0].world_size
    if any(layer.world_size != world for layer in layers):
        raise ValueError("reshard(): all layers must share one group")
    if any(layer.strategy != "fssdp" for layer in layers):
        raise ValueError("reshard(): expert parallelism pins experts; only strategy='fssdp' layers re-shard")
    current = [list(layer.owners) for layer in layers]
    if owners is None:
        loads = [layer.predictor.predict(world, layer.num_experts).sum(axis=0) for layer in layers]
        plan = reshard_owners(loads, world)
        if plan == current or owner_imbalance(loads, plan, world) >= owner_imbalance(loads, current, world) - 1e-9:
            return 0
    else:
        plan = [list(o) for o in owners]
        if len(plan) != len(layers):
            raise ValueError(f"owners has {len(plan)} layers, expected {len(layers)}")
    return sum(move_experts(layer, new, optimizer) for layer, new in zip(layers, plan))


def merge_expert_shards(state_dicts: Sequence[dict]) -> dict:
    """Join per-rank model state dicts: replicated entries from the first rank that has them,
    expert entries (``...experts.<e>``) from their single owner. An expert saved by two ranks is an
    error (a silently wrong resume otherwise)."""
    merged: dict = {}
    source: dict[str, int] = {}
    for rank, sd in enumerate(state_dicts):
        for key, value in sd.items():
            if key in merged:
                if _EXPERT_KEY.search(key):
                    raise ValueError(f"expert {key!r} is saved by ranks {source[key]} and {rank}; "
                                     f"each expert must have exactly one owner")
                continue
            merged[key], source[key] = value, rank
    return merged


def expert_keys(state_dict: dict) -> list[str]:
    """The expert entries of a (merged) state dict, sorted."""
    return sorted(k for k in state_dict if _EXPERT_KEY.search(k))


def loads_of(layers: Sequence[MoE]) -> list[np.ndarray]:
    """Predicted per-expert loads of each layer (for reporting)."""
    return [layer.predictor.predict(layer.world_size, layer.num_experts).sum(axis=0) for layer in layers]
