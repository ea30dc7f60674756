"""A small GPT (byte-level by default) written for the parallelisms heddle applies.

Module contract the features rely on:
- ``block.attn`` (:class:`Attention`) projects to q [b, s, H, d], k/v [b, s, Hkv, d], applies RoPE
  with the *global* ``position_ids`` and calls ``block.attn.core_attention(q, k, v, causal=...,
  cu_seqlens=...)``; sequence parallelism swaps ``core_attention`` for a distributed one.
- ``block.mlp`` maps [b, s, d_model] -> [b, s, d_model], or returns ``(y, aux_loss)``
  (Mixture-of-Experts); :meth:`GPT.aux_loss` sums the aux losses of the last forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from heddle.models.attention import local_attention


@dataclass
class GPTConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads
    d_ffn: int | None = None       # None: 4 * d_model
    max_seq_len: int = 4096
    rope_theta: float = 10000.0

    def __post_init__(self):
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")


class LocalAttention(nn.Module):
    """Default core attention: :func:`local_attention` on the full local sequence."""

    def forward(self, q, k, v, *, causal=True, cu_seqlens=None, position_ids=None):
        return local_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)


def rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding. x [b, s, h, d]; position_ids [b, s] or [s] (global positions)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    pos = position_ids.to(torch.float64)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    ang = (pos[..., None] * inv).to(x.dtype)  # [b, s, d/2]
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.core_attention: nn.Module = LocalAttention()

    def forward(self, x, position_ids, cu_seqlens=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = rope(q, position_ids, self.rope_theta), rope(k, position_ids, self.rope_theta)
        out = self.core_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, position_ids=position_ids)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ffn or 4 * cfg.d_model)
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x, position_ids, cu_seqlens=None):
        x = x + self.attn(self.attn_norm(x), position_ids, cu_seqlens)
        out = self.mlp(self.mlp_norm(x))
        if isinstance(out, tuple):
            out, self.last_aux_loss = out
        else:
            self.last_aux_loss = None
        return x + out


class GPT(nn.Module):
    """tokens [b, s] (the local shard under sequence parallelism) -> logits [b, s, vocab]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2 scaled init of residual projections
            std = 0.02 / math.sqrt(2 * cfg.n_layers)
            nn.init.normal_(block.attn.o_proj.weight, std=std)
            if isinstance(block.mlp, MLP):
                nn.init.normal_(block.mlp.down.weight, std=std)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, position_ids, cu_seqlens)
        return self.head(self.norm(x))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the blocks' auxiliary losses from the last forward (0 when there are none)."""
        losses = [b.last_aux_loss for b in self.blocks if b.last_aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())
