"""Apply Ulysses to a model in place.

A transformers ``PreTrainedModel`` needs no contract: :func:`parallelize` registers heddle's attention
with transformers' attention interface (:mod:`heddle.sequence.hf`).

Module contract (heddle's GPT, users' own models): every attention module exposes its core attention (the softmax(QK^T)V part, after
the q/k/v projections and RoPE) as a submodule attribute ``core_attention``, called as
``core_attention(q, k, v, *, causal=..., cu_seqlens=..., position_ids=...)`` with q
``[b, s, H, d]`` and k/v ``[b, s, Hkv, d]`` (batch-first; ``layout="sbhd"`` for sequence-first
models), returning ``[b, s, H, d]``. :func:`parallelize` swaps each one for a
:class:`UlyssesAttention`; the model then runs on its sequence shard ``s = s_global / P``, and it
must apply RoPE with *global* position ids (:func:`heddle.sequence.local_position_ids`). Everything
else in a transformer (projections, norms, MLPs) is per-token and needs no change. The example
:class:`heddle.models.GPT` follows this contract.
"""

from __future__ import annotations

import torch.nn as nn

from heddle.sequence.ulysses import UlyssesAttention


class UlyssesHandle:
    """The Ulysses modules :func:`parallelize` installed. ``set_group(g)`` moves all of them to
    another sequence-parallel group (e.g. a different subgroup every step); nothing is rebuilt."""

    def __init__(self, modules: list[UlyssesAttention], names: list[str]):
        self.modules, self.names = modules, names

    def set_group(self, group) -> None:
        for module in self.modules:
            module.group = group

    @property
    def group(self):
        return self.modules[0].group

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    def __repr__(self) -> str:
        return f"UlyssesHandle({len(self.modules)} attention modules: {self.names})"


def parallelize(model: nn.Module, group=None, *, attn_fn=None, layout: str = "bshd",
                check: str = "first", overlap_chunks: int = 1) -> UlyssesHandle:
    """Replace every ``core_attention`` submodule of ``model`` by ``UlyssesAttention(group, ...)``.

    Returns a :class:`UlyssesHandle`. Options are those of :class:`UlyssesAttention`. ``attn_fn=None`` keeps the default (flash-attn varlen on CUDA
    when installed, else torch SDPA). Calling it again on a parallelized model only re-targets the
    existing Ulysses modules (same as ``set_group``). ``ValueError`` when the model has no
    ``core_attention`` submodule.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from heddle.sequence.hf import is_transformers_model, parallelize_hf
    if is_transformers_model(model) and not any(hasattr(m, "core_attention") for m in model.modules()):
        if attn_fn is not None or layout != "bshd":
            raise ValueError(f"parallelize: attn_fn={attn_fn!r} and layout={layout!r} belong to the core_attention "
                             f"contract; a transformers model ({type(model).__name__}) attends with heddle's SDPA "
                             f"through transformers' attention interface")
        return parallelize_hf(model, group, check=check, overlap_chunks=overlap_chunks)
    modules, names = [], []
    for name, parent in list(model.named_modules()):
        core = getattr(parent, "core_attention", None)
        if not isinstance(core, nn.Module):
            continue
        if not isinstance(core, UlyssesAttention):
            core = UlyssesAttention(group, attn_fn, layout=layout, check=check, overlap_chunks=overlap_chunks)
            parent.core_attention = core
        else:
            core.group = group
        modules.append(core)
        names.append(f"{name}.core_attention" if name else "core_attention")
    if not modules:
        raise ValueError(f"parallelize: {type(model).__name__} has no submodule with a `core_attention` "
                         f"nn.Module attribute; see heddle.sequence.parallelize's docstring for the contract")
    return UlyssesHandle(modules, names)
