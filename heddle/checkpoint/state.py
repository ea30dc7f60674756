"""Turning a dict of stateful objects into (tensors, picklable skeleton) and back, in place.

``flatten(state)`` calls ``state_dict()`` on every entry, walks the result and replaces each
tensor with a :class:`TensorRef`; the skeleton (everything that is not a tensor: step counters,
sampler positions, RNG states, hyper-parameters) is pickled at once, so later mutation of a Python
object never reaches the checkpoint. Tensors are only *referenced* here; the lazy snapshot copies
them later (DataStates-LLM: they do not change until the next optimizer step).

Per-rank state (the resharding rule, see docs/checkpoint.md). A leaf or subtree is *per-rank* when

- the tensor is marked with :func:`heddle.dist.mark_sharded` (compression error buffers, ...),
- it is a module ``state_dict`` entry of a sharded parameter (MoE experts owned by one rank),
- it is the optimizer state (``state[i]``) of a sharded parameter,
- it is the RNG entry, or an entry whose object sets ``checkpoint_per_rank = True``.

Everything else is data-parallel replicated: identical on every rank, loadable at any world size.
"""

from __future__ import annotations

import io
import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from heddle.dist import is_sharded

RNG_KEY = "__rng__"


@dataclass(frozen=True)
class TensorRef:
    """Placeholder for the ``index``-th tensor of a flattened state."""

    index: int


@dataclass
class FlatState:
    tensors: list[torch.Tensor]       # referenced, not copied
    paths: list[str]                  # "model/layers.0.w", for messages
    tensor_per_rank: list[bool]
    skeleton: bytes                   # pickle of {key: tree with TensorRef leaves}
    per_rank_paths: list[tuple]       # subtrees that are per-rank (tuples of keys)


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
    return value, []


def flatten(state: dict) -> FlatState:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of name -> stateful object, got {type(state).__name__}")
    tensors, paths, flags, per_rank_paths = [], [], [], []

    def walk(node, path, per_rank):
        if isinstance(node, torch.Tensor):
            tensors.append(node.detach())
            paths.append("/".join(str(p) for p in path))
            flags.append(per_rank or is_sharded(node))
            return TensorRef(len(tensors) - 1)
        if tuple(path) in per_rank_set:
            per_rank = True
        if isinstance(node, dict):
            out = type(node)() if isinstance(node, OrderedDict) else {}
            for k, v in node.items():
                out[k] = walk(v, path + [k], per_rank or tuple(path + [k]) in per_rank_set)
            if hasattr(node, "_metadata"):  # module state_dict version info
                out._metadata = node._metadata
            return out
        if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
            return type(node)(walk(v, path + [i], per_rank) for i, v in enumerate(node))
        return node

    tree = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be str, got {key!r}")
        sub, rel = _state_of(key, value)
        per_rank_set = {(key,) + r for r in rel}
        per_rank_paths.extend(sorted(per_rank_set, key=str))
        tree[key] = walk(sub, [key], (key,) in per_rank_set)
    buf = io.BytesIO()
    pickle.dump(tree, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return FlatState(tensors, paths, flags, buf.getvalue(), per_rank_paths)


def fill(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace every TensorRef in ``tree`` by its tensor."""
    if isinstance(tree, TensorRef):
        return tensors[tree.index]
    if isinstance(tree, dict):
        out = type(tree)() if isinstance(tree, OrderedDict) else {}
        for k, v in tree.items():
            out[k] = fill(v, tensors)
        if hasattr(tree, "_metadata"):
            out._metadata = tree._metadata
        return out
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(fill(v, tensors) for v in tree)
    return tree


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
