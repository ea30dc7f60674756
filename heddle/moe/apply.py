"""Apply MoE to a model in place (torchtitan style): every ``block.mlp`` becomes a :class:`MoE`.

Build the optimizer after this (the Trainer takes an optimizer factory and does): it then lists
the MoE layers' parameters (router and every expert's fixed Parameter object, owned or empty).
Ownership moves later change the Parameters' data, never the objects, so the optimizer stays valid.
"""

from __future__ import annotations

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
