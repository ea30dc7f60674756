"""Local (single-device) attention with GQA, causal masking and packed documents.

This is the reference core attention: the example GPT calls it, Ulysses runs it (or a user's
``attn_fn``) on full-sequence, head-sharded tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_mask(cu_seqlens: torch.Tensor, seq_len: int, causal: bool,
                  valid_len: int | None = None) -> torch.Tensor:
    """Boolean [s, s] mask, True where query i may attend key j.

    cu_seqlens: [num_docs + 1] cumulative document boundaries on the (global) sequence, starting
    at 0; tokens at or after ``cu_seqlens[-1]`` (padding) attend only to themselves so no row is
    empty and nothing real attends to them. ``valid_len`` masks padding the same way without
    document boundaries.
    """
    pos = torch.arange(seq_len, device=cu_seqlens.device if cu_seqlens is not None else None)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(pos.device)
        doc = torch.bucketize(pos, cu[1:], right=True)  # document index of each position
        end = int(cu[-1])
    else:
        doc = torch.zeros_like(pos)
        end = seq_len if valid_len is None else valid_len
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    pad = pos >= end
    mask &= ~pad[None, :]
    mask |= torch.diag(pad)
    return mask


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    cu_seqlens: torch.Tensor | None = None, valid_len: int | None = None) -> torch.Tensor:
    """q [b, s, H, d], k/v [b, s, Hkv, d] -> [b, s, H, d].

    Query head h uses kv head h // (H // Hkv) (the HF / SDPA ``enable_gqa`` convention).
    """
    h, hkv = q.shape[2], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads H={h} must be a multiple of kv heads Hkv={hkv}")
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [b, H, s, d]
    if cu_seqlens is None and valid_len is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    else:
        mask = document_mask(cu_seqlens, q.shape[1], causal, valid_len)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.to(q.device))
    return out.transpose(1, 2)
