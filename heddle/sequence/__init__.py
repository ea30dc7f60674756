"""Ulysses sequence parallelism (DeepSpeed-Ulysses): one packed all-to-all for q, k, v, one for the
output, GQA/MQA, uneven heads, padded uneven lengths, packed documents.

    from heddle.sequence import UlyssesAttention, shard_sequence, gather_sequence, parallelize
    attn = UlyssesAttention(group=sp_group)          # q [b, s/P, H, d], k/v [b, s/P, Hkv, d]
    out = attn(q, k, v, causal=True)                 # -> [b, s/P, H, d]

    handle = parallelize(model, sp_group)            # swaps every `core_attention` in place
    handle.set_group(other_group)                    # per step, nothing rebuilt

Switching groups per step (adaptive SP): ``UlyssesAttention.group`` is a settable attribute and
``parallelize`` returns a :class:`UlyssesHandle` whose ``set_group(group)`` re-targets all the
model's Ulysses modules. Head plans are cached per (H, Hkv, group size); the only per-group cost is
the one cross-rank input check on the first call after a switch (``check="never"`` removes it).
Every rank of the new group must switch before the next forward.

Overlap: ``UlyssesAttention(group, overlap_chunks=C)`` (or ``parallelize(..., overlap_chunks=C)``)
pipelines C head chunks so the all-to-alls run while attention computes; C = 1 (the default) is
exactly one packed all-to-all each way.

Hugging Face transformers models (``pip install heddle[hf]``): ``parallelize(hf_model, group)``
registers heddle's attention with transformers' attention interface (:mod:`heddle.sequence.hf`);
``shard_for_causal_lm(input_ids, group)`` cuts a causal-LM batch with globally shifted labels.

Global positions: :func:`local_position_ids` gives this rank's slice of the global position ids
(restarting at each document of ``cu_seqlens``), for RoPE before the first all-to-all.
"""

from heddle.sequence.causal_lm import CausalLMShard, shard_for_causal_lm, shift_causal_labels
from heddle.sequence.parallelize import UlyssesHandle, parallelize
from heddle.sequence.sharding import (
    SequenceShard,
    check_cu_seqlens,
    gather_sequence,
    local_position_ids,
    padding_cu_seqlens,
    position_ids_from_cu_seqlens,
    shard_sequence,
)
from heddle.sequence.ulysses import UlyssesAttention, default_attention, plan_heads

__all__ = [
    "UlyssesAttention", "UlyssesHandle", "parallelize", "plan_heads", "default_attention",
    "SequenceShard", "shard_sequence", "gather_sequence",
    "position_ids_from_cu_seqlens", "local_position_ids", "padding_cu_seqlens", "check_cu_seqlens",
    "shard_for_causal_lm", "shift_causal_labels", "CausalLMShard",
]
