"""Turning a dict of stateful objects into (tensors, JSON skeleton) and back, in place.

``flatten(state)`` calls ``state_dict()`` on every entry, walks the result and replaces each
tensor with a reference; the skeleton (everything that is not a tensor: step counters, sampler
positions, RNG states, hyper-parameters) is encoded to JSON at once (:mod:`heddle.checkpoint.codec`,
no pickle), so later mutation of a Python object never reaches the checkpoint. Tensors are only
*referenced* here; the lazy snapshot copies them later (DataStates-LLM: they do not change until
the next optimizer step).

DTensors (FSDP2 parameters and optimizer state, any mesh): the rank's local chunk is saved with
its placement (global shape, the chunk's global offset); a chunk that is replicated over a mesh
dimension is saved only by the rank at coordinate 0 of that dimension. ``replicated`` top-level
keys (identical on every rank) are saved by rank 0 only. Restore reassembles both for any world
size or mesh (:mod:`heddle.checkpoint.restore`).

Per-rank state (the resharding rule, see docs/checkpoint.md). A leaf or subtree is declared
*per-rank* when

- the tensor is marked with :func:`heddle.dist.mark_sharded` (compression error buffers, ...),
- it is a module ``state_dict`` entry of a sharded parameter (MoE experts owned by one rank),
- it is the optimizer state (``state[i]``) of a sharded parameter,
- it is the RNG entry, or an entry whose object sets ``checkpoint_per_rank = True``.

At a world-size change restore also treats as per-rank every subtree whose saved values differ
between the old ranks (detected from the indexes: same JSON, same tensor CRCs, or not).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from heddle.checkpoint import codec
from heddle.checkpoint.storage import TensorEntry
from heddle.dist import is_sharded

RNG_KEY = "__rng__"


def is_dtensor(t) -> bool:
    if type(t) in _PLAIN:
        return False
    # no import here: a DTensor can only exist once torch.distributed.tensor was imported (the
    # import costs ~0.5 s of CPU, too much for the first save() of a run that has none)
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, getattr(module, "DTensor", ()))


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DTYPE_NAMES: dict = {}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


@dataclass
class FlatState:
    tensors: list[torch.Tensor]       # local tensors to copy (referenced, not copied)
    entries: list[TensorEntry]        # one per tensor (offsets filled by the snapshot engine)
    skeleton: Any                     # JSON value: {key: tree with tensor / dtensor references}
    per_rank_paths: list[tuple]       # subtrees that are declared per-rank (tuples of keys)
    replicated: list[str]             # top-level keys saved by rank 0 only

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]


def capture_rng() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states of this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_of(key: str, value: Any) -> tuple[Any, list[tuple]]:
    """(state tree of one entry, per-rank subtree paths relative to the entry)."""
    if isinstance(value, torch.nn.Module):
        sharded = {n for n, p in value.named_parameters(remove_duplicate=False) if is_sharded(p)}
        sharded |= {n for n, b in value.named_buffers(remove_duplicate=False) if is_sharded(b)}
        return value.state_dict(), [(n,) for n in sorted(sharded)]
    if isinstance(value, torch.optim.Optimizer):
        params = [p for group in value.param_groups for p in group["params"]]
        return value.state_dict(), [("state", i) for i, p in enumerate(params) if is_sharded(p)]
    if isinstance(value, torch.Tensor):
        return value, ([()] if is_sharded(value) else [])
    if hasattr(value, "state_dict") and callable(value.state_dict):
        return value.state_dict(), ([()] if getattr(value, "checkpoint_per_rank", False) else [])
    if key == RNG_KEY:          # every process has its own RNG streams
        return value, [()]
    return value, []


def _placement_name(p) -> str:
    from torch.distributed.tensor import Replicate, Shard
    if type(p) is Shard:
        return f"S({p.dim})"
    if type(p) is Replicate:
        return "R"
    raise ValueError(f"placement {p!r}: heddle checkpoints DTensors with Shard(dim) and Replicate "
                     f"placements only (reduce a Partial DTensor first)")


def _dtensor_leaf(t, label: str, tensors: list, entries: list, per_rank: bool) -> dict:
    """Reference for a DTensor; its local chunk is saved unless another rank saves the same one."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, tuple(t.placements)
    names = [_placement_name(p) for p in placements]
    local = t.to_local().detach()
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"state {label}: DTensor local shape {tuple(local.shape)} differs from its placement's "
                         f"{tuple(shape)} (padded local tensors are not supported)")
    coord = mesh.get_coordinate()
    saves = coord is not None and all(c == 0 for c, n in zip(coord, names) if n == "R")
    if saves:
        tensors.append(local)
        entries.append(TensorEntry(label, str(local.dtype).removeprefix("torch."), tuple(local.shape), 0,
                                   local.numel() * local.element_size(), per_rank=per_rank,
                                   global_shape=tuple(t.shape), global_offset=tuple(offset)))
    return {codec.TAG: "dtensor", "path": label, "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape), "placements": names, "mesh": list(mesh.shape)}


def flatten(state: dict, *, replicated=(), rank: int = 0) -> FlatState:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of name -> stateful object, got {type(state).__name__}")
    replicated = list(replicated)
    unknown = [k for k in replicated if k not in state]
    if unknown:
        raise ValueError(f"replicated={replicated!r}: {unknown} not in the state; its keys are {sorted(map(str, state))}")
    tensors, entries, per_rank_paths = [], [], []
    tree = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be str, got {key!r}")
        if key in replicated and rank != 0:
            continue                    # identical on every rank: rank 0's copy is the checkpoint's
        sub, rel = _state_of(key, value)
        per_rank_set = {(key,) + r for r in rel}
        per_rank_paths.extend(sorted(per_rank_set, key=str))

        def on_tensor(t, path, per_rank_set=per_rank_set):
            label = "/".join(map(str, path))
            flag = is_sharded(t) or bool(per_rank_set) and any(path[:n] in per_rank_set
                                                               for n in range(1, len(path) + 1))
            if is_dtensor(t):
                return _dtensor_leaf(t, label, tensors, entries, flag)
            t = t.detach()
            tensors.append(t)
            entries.append(TensorEntry(label, dtype_name(t.dtype), tuple(t.shape), 0,
                                       t.numel() * t.element_size(), per_rank=flag))
            return {codec.TAG: "tensor", "i": len(entries) - 1}

        tree[key] = codec.encode(sub, on_tensor, (key,))
    return FlatState(tensors, entries, tree, per_rank_paths, replicated)


def fill(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """Decode a skeleton whose tensor references index ``tensors`` (plain tensors only)."""
    def on_ref(node, path):
        i = node.get("i")
        if node.get(codec.TAG) != "tensor" or type(i) is not int or not 0 <= i < len(tensors):
            raise codec.CodecError(f"{'/'.join(map(str, path))}: bad tensor reference {node!r:.80}")
        return tensors[i]
    return codec.decode(skeleton, on_ref)


def _get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def reinitialise_per_rank(tree: dict, per_rank_paths: list[tuple], state: dict) -> list[str]:
    """Resharding rule for a world-size change: every per-rank subtree is replaced by the live
    value (the new run's initialisation) at the same path, or dropped when the live state has
    none (optimizer state of a sharded parameter: the optimizer restarts it from zero).
    Returns the affected paths, for the warning."""
    changed = []
    for path in per_rank_paths:
        key, rest = path[0], path[1:]
        if key not in tree:
            continue
        label = "/".join(str(p) for p in path)
        live_obj = state.get(key)
        live = None
        if live_obj is not None:
            live, _ = _state_of(key, live_obj)
        if not rest:
            if key == RNG_KEY:
                tree.pop(key)
                changed.append(f"{label} (kept this process's RNG)")
            else:
                tree[key] = _clone_tree(live)
                changed.append(f"{label} (re-initialised)")
            continue
        parent = _get(tree, path[:-1])
        try:
            parent[path[-1]] = _clone_tree(_get(live, rest))
            changed.append(f"{label} (re-initialised)")
        except (KeyError, IndexError, TypeError):
            parent.pop(path[-1], None)
            changed.append(f"{label} (dropped: restarts from zero)")
    return changed


def _clone_tree(node):
    if isinstance(node, torch.Tensor):
        return node.detach().clone()
    if isinstance(node, dict):
        return {k: _clone_tree(v) for k, v in node.items()}
    return node


def load_into(state: dict, tree: dict) -> None:
    """Load a restored tree into the live objects of ``state`` in place."""
    missing = sorted(set(state) - set(tree) - {RNG_KEY})
    if missing:
        raise ValueError(f"restore: the checkpoint has no entry for {missing}; it holds {sorted(tree)}")
    for key, value in state.items():
        if key == RNG_KEY:
            continue
        saved = tree[key]
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                value.copy_(saved)
        elif hasattr(value, "load_state_dict") and callable(value.load_state_dict):
            value.load_state_dict(saved)
        elif isinstance(value, dict):
            value.clear()
            value.update(saved)
        elif isinstance(value, list):
            value[:] = saved
        else:
            state[key] = saved
    if RNG_KEY in tree:
        restore_rng(tree[RNG_KEY])
