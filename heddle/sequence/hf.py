"""Ulysses on Hugging Face transformers decoders (transformers >= 5), through its attention interface.

    from heddle.sequence import parallelize, shard_for_causal_lm
    parallelize(model, sp_group)                  # any LlamaForCausalLM, Qwen2/3, Mistral, Mixtral, ...
    batch = shard_for_causal_lm(input_ids, sp_group)
    out = model(**batch.hf_inputs())              # out.loss: this rank's share of the global token mean

:func:`parallelize_hf` registers one function, :func:`ulysses_attention`, with
``transformers.AttentionInterface`` under the name ``"heddle_ulysses"`` and switches the model to it
(``model.set_attn_implementation``). Nothing about the model's classes changes: each attention
module gets a :class:`~heddle.sequence.UlyssesAttention` submodule ``heddle_ulysses`` holding its
group, so two models (different head counts) on two sequence-parallel groups live in one process.
``"heddle_ulysses"`` is also registered with ``AttentionMaskInterface`` so that HF's mask builders
hand the attention function the local 2-D padding mask instead of a local 4-D mask.

Each rank runs the model on its sequence shard ``[b, s/P]`` (per-token layers need nothing). In
every attention layer, q ``[b, H, s/P, d]`` and k/v ``[b, Hkv, s/P, d]`` arrive after RoPE (applied
with the global ``position_ids`` of :func:`~heddle.sequence.shard_for_causal_lm`); one packed
all-to-all gives the full sequence on this rank's heads, SDPA runs with HF's semantics
(``scaling``, ``dropout``, GQA/MQA, ``sliding_window``), one all-to-all returns ``[b, s/P, H, d]``.

The mask is rebuilt globally: the ranks' ``position_ids`` and padding masks are all-gathered once
per forward (cached across layers in eager mode); a position that does not continue the previous
one starts a new document (HF's packed-sequence rule); key j is visible to query i when both lie in
one document, j <= i, i - j < sliding_window and j is not padding. With no documents, padding or
window in effect, SDPA runs with ``is_causal`` and no mask (HF's sdpa does the same). Under
``torch.compile`` the mask is always built (no data-dependent branch) and the exchanges are the
custom ops of :mod:`heddle.dist.custom_ops`.

Not supported (``ValueError`` naming it): a KV cache / ``use_cache=True`` (with a cache HF would
silently stop masking documents), softcapping, attention sinks, 4-d attention masks, cross-attention.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from heddle.dist import group_rank_size
from heddle.sequence.ulysses import UlyssesAttention, compute_dtype

log = logging.getLogger(__name__)
ATTENTION = "heddle_ulysses"
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def is_transformers_model(model) -> bool:
    """True for a ``transformers.PreTrainedModel`` (False when transformers is not installed)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _padding_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """HF mask builder for "heddle_ulysses": pass the local 2-D padding mask (bool [b, s/P]) through."""
    return attention_mask


def register() -> None:
    """Register "heddle_ulysses" with transformers (idempotent: one function serves every model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION, ulysses_attention)
    AttentionMaskInterface.register(ATTENTION, _padding_mask)


def _attention_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "config") and hasattr(m, "layer_idx")]


def parallelize_hf(model: nn.Module, group=None, *, check: str = "first", overlap_chunks: int = 1):
    """Ulysses on every attention layer of a transformers model, in place; returns the
    :class:`~heddle.sequence.UlyssesHandle` (``set_group`` moves the model to another group).

    Sets ``model.config.use_cache = False`` (a KV cache under SP is an error, see module doc).
    """
    from heddle.sequence.parallelize import UlyssesHandle
    register()
    found = _attention_modules(model)
    if not found:
        raise ValueError(f"parallelize: {type(model).__name__} has no transformers attention module "
                         f"(a submodule named *Attention with `config` and `layer_idx`)")
    modules, names = [], []
    for name, module in found:
        core = getattr(module, "heddle_ulysses", None)
        if isinstance(core, UlyssesAttention):
            core.group = group
        else:
            core = UlyssesAttention(group, check=check, overlap_chunks=overlap_chunks)
            module.heddle_ulysses = core
        modules.append(core)
        names.append(f"{name}.heddle_ulysses")
    model.set_attn_implementation(ATTENTION)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        log.info("heddle.sequence.parallelize: config.use_cache set to False (no KV cache under sequence parallelism)")
        config.use_cache = False
    return UlyssesHandle(modules, names)


_mask_cache: list = []  # one entry: (position_ids, padding, key, mask); eager mode only


def _global_mask(group, position_ids, padding, batch: int, local: int, device, causal: bool, window):
    """The global attention mask ([b, 1, s, s] bool, True = attend) or None for plain causal."""
    compiling = torch.compiler.is_compiling()
    key = (id(group), batch, local, causal, window,
           None if position_ids is None else position_ids._version)
    if not compiling and _mask_cache:
        pos0, pad0, key0, mask0 = _mask_cache[0]
        if pos0 is position_ids and pad0 is padding and key0 == key:
            return mask0
    rank, world = group_rank_size(group)
    if position_ids is None:
        position_ids = torch.arange(rank * local, (rank + 1) * local, device=device).unsqueeze(0)
    pos = position_ids.to(device=device, dtype=torch.int64).expand(batch, local)
    valid = torch.ones(batch, local, dtype=torch.int64, device=device) if padding is None else \
        padding.to(device=device, dtype=torch.int64).expand(batch, local)
    both = torch.stack([pos, valid])                                   # [2, b, s/P]
    if world > 1:
        from heddle.dist.custom_ops import all_gather_op, group_name
        gathered = all_gather_op(both.unsqueeze(0), group_name(group))  # [P, 2, b, s/P]
        both = gathered.permute(1, 2, 0, 3).reshape(2, batch, world * local)
    pos, valid = both[0], both[1] != 0
    length = pos.shape[1]
    doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)   # [b, s]
    windowed = window is not None and window < length
    mask = None
    if compiling or not (bool((doc[:, -1] == 0).all()) and bool(valid.all()) and not windowed and causal):
        i = torch.arange(length, device=device)
        mask = doc[:, :, None] == doc[:, None, :]
        if causal:
            mask = mask & (i[:, None] >= i[None, :])
        if windowed:
            mask = mask & ((i[:, None] - i[None, :]) < window)
        mask = (mask & valid[:, None, :]).unsqueeze(1)
    if not compiling:
        _mask_cache[:] = [(position_ids, padding, key, mask)]
    return mask


def ulysses_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q ``[b, H, s/P, d]``, k/v ``[b, Hkv, s/P, d]`` (this rank's
    sequence shard) -> ``(out [b, s/P, H, d], None)``."""
    ulysses = getattr(module, "heddle_ulysses", None)
    if not isinstance(ulysses, UlyssesAttention):
        raise ValueError(f"{type(module).__name__} runs attn_implementation={ATTENTION!r} but was not "
                         f"parallelized: call heddle.sequence.parallelize(model, group)")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"heddle Ulysses does not support {name}={kwargs[name]!r} "
                             f"({type(module).__name__}); supported: causal/bidirectional SDPA with scaling, "
                             f"dropout, sliding_window, GQA/MQA")
    if kwargs.get("use_cache"):
        raise ValueError("use_cache=True under sequence parallelism: a KV cache is not supported (and HF "
                         "would stop masking packed documents); pass use_cache=False")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"key length {key.shape[2]} != query length {query.shape[2]}: a KV cache or "
                         f"cross-attention, which heddle Ulysses does not support")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: under sequence parallelism "
                         f"pass the 2-d padding mask [b, s] (a 4-d mask is not supported)")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    window = kwargs.get("sliding_window")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))         # [b, s/P, H, d] views
    out_dtype = q.dtype
    dtype = compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not torch.compiler.is_compiling():
        ulysses._validate(q, k, v, causal, None)
    batch, local = q.shape[:2]
    mask = _global_mask(ulysses.group, kwargs.get("position_ids"), attention_mask, batch, local, q.device,
                        causal, window)
    p = dropout if module.training else 0.0

    def attend(qf, kf, vf):  # [b, s, h_me, d] views -> [b, s, h_me, d]
        qf, kf, vf = qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2)
        gqa = {}
        if qf.shape[1] != kf.shape[1]:  # GQA inside this rank's heads, as HF's sdpa chooses
            if mask is None:
                gqa["enable_gqa"] = True
            else:
                repeat = qf.shape[1] // kf.shape[1]
                kf, vf = kf.repeat_interleave(repeat, dim=1), vf.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, dropout_p=p,
                                             is_causal=mask is None and causal, scale=scaling, **gqa)
        return out.transpose(1, 2)

    return ulysses.run(q, k, v, attend).to(out_dtype), None
