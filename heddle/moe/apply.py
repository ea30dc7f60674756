"""Apply MoE to a model in place (torchtitan style): every ``block.mlp`` becomes a :class:`MoE`.

The optimizer a user built before the swap still lists the dense MLP's parameters;
:func:`swap_optimizer_params` takes them out and puts the MoE layers' parameters (router and every
expert's fixed Parameter object, owned or empty) in the param group that held them. Ownership
moves later change the Parameters' data, never the objects, so the optimizer stays valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from heddle.moe.layer import MoE


def _ffn_dims(mlp: nn.Module) -> tuple[int, int]:
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot infer d_model / d_ffn from {type(mlp).__name__}: it has no nn.Linear")
    return linears[0].in_features, linears[0].out_features


def replace_mlps(model: nn.Module, *, num_experts: int, top_k: int = 2, group=None, d_ffn: int | None = None,
                 seed: int = 0, **options) -> list[tuple[nn.Module, nn.Module, MoE]]:
    """Swap ``block.mlp`` for an MoE in every submodule that has an ``mlp`` attribute.

    d_model and (unless ``d_ffn`` is given) d_ffn come from the replaced MLP's first nn.Linear;
    layer i gets seed ``seed * 1000 + i`` (initialization stays independent of the world size).
    Returns [(block, old_mlp, moe)] in module order. ``options`` go to :class:`MoE`.
    """
    swapped = []
    for block in model.modules():
        old = getattr(block, "mlp", None)
        if not isinstance(old, nn.Module) or isinstance(old, MoE):
            continue
        d_model, hidden = _ffn_dims(old)
        param = next(old.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        moe = MoE(d_model, d_ffn or hidden, num_experts, top_k, group=group, seed=seed * 1000 + len(swapped),
                  dtype=dtype, **options)
        block.mlp = moe
        swapped.append((block, old, moe))
    if not swapped:
        raise ValueError(f"{type(model).__name__} has no submodule with an `mlp` attribute to replace")
    return swapped


def swap_optimizer_params(optimizer: torch.optim.Optimizer, old: Sequence[nn.Parameter],
                          new: Sequence[nn.Parameter]) -> None:
    """Remove ``old`` parameters (and their state) from ``optimizer``; add ``new`` to the param
    group that held the first old parameter (group 0 if none did)."""
    old_ids = {id(p) for p in old}
    home = None
    for i, group in enumerate(optimizer.param_groups):
        kept = [p for p in group["params"] if id(p) not in old_ids]
        if len(kept) != len(group["params"]) and home is None:
            home = i
        group["params"] = kept
    for p in old:
        optimizer.state.pop(p, None)
    present = {id(p) for g in optimizer.param_groups for p in g["params"]}
    optimizer.param_groups[home or 0]["params"].extend(p for p in new if id(p) not in present)
