"""Ulysses attention (DeepSpeed-Ulysses, Jacobs et al. 2023): sequence-sharded in, sequence-sharded
out, full-sequence attention on a slice of the heads in between.

With P ranks, rank r holds q ``[b, s/P, H, d]``, k/v ``[b, s/P, Hkv, d]``. The first all-to-all
(paper: "all-to-all ... transforms sequence-partitioned Q, K, V into head-partitioned") gives every
rank the full sequence on H/P heads; ``attn_fn`` runs locally; the second all-to-all returns
``[b, s/P, H, d]``. Per layer and rank, forward, the elements sent are the paper's
``(P-1)/P * (b s/P d) (2H + 2Hkv)`` (q, k, v out, the attention output back), the same in backward:
constant when s and P grow together.

GQA / MQA: query head h uses kv head ``h // (H // Hkv)``. Heads are split in *units* of
one kv head and its ``H / (Hkv * repeat)`` query heads; when there are fewer kv heads than ranks,
each kv head is repeated ``repeat`` times (while packing: no extra tensor) and the gradients of
the copies are summed back. Units are split as evenly as possible (7 heads on 4 ranks -> 2,2,2,1).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

from heddle.dist import all_gather_into_tensor, group_rank_size
from heddle.models.attention import local_attention
from heddle.sequence.sharding import check_cu_seqlens
from heddle.sequence.ulysses_communications import GatherHeads, HeadSplit, ScatterHeads
from heddle.sequence.ulysses_overlap import OverlappedUlysses, chunk_splits

log = logging.getLogger(__name__)
LAYOUTS = ("bshd", "sbhd")


def plan_heads(num_heads: int, num_kv_heads: int, world: int) -> tuple[HeadSplit, HeadSplit]:
    """(query split, kv split) for H query and Hkv kv heads on ``world`` ranks.

    Among unit counts U (a multiple of Hkv dividing H, with U >= world so no rank is idle) pick
    the one with the fewest query heads on the busiest rank (attention time is set by it), then
    the smallest U (least kv traffic). ``ValueError`` when no U exists, i.e. H < P.
    """
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads H={num_heads} must be a positive multiple of num_kv_heads "
                         f"Hkv={num_kv_heads} (GQA: query head h uses kv head h // (H // Hkv))")
    options = [u for u in range(num_kv_heads, num_heads + 1, num_kv_heads)
               if num_heads % u == 0 and u >= world]
    if not options:
        raise ValueError(
            f"Ulysses needs at least one query head per rank: H={num_heads}, Hkv={num_kv_heads} cannot "
            f"be split over P={world} ranks; valid group sizes are P <= H, i.e. P in 1..{num_heads}")
    units = min(options, key=lambda u: (math.ceil(u / world) * (num_heads // u), u))
    per_unit = num_heads // units
    kv = HeadSplit.even(num_kv_heads, units // num_kv_heads, world)
    q = HeadSplit(num_heads, 1, tuple(c * per_unit for c in kv.counts),
                  tuple(s * per_unit for s in kv.starts))
    return q, kv


def default_attention(q, k, v, *, causal=True, cu_seqlens=None):
    """q [b, s, h, d], k/v [b, s, hkv, d] -> [b, s, h, d]: flash-attn varlen on CUDA when installed,
    else :func:`heddle.models.attention.local_attention` (torch SDPA, document mask)."""
    if q.is_cuda and _flash_varlen() is not None:
        return _flash_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
    return local_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)


_FLASH = []


def _flash_varlen():
    if not _FLASH:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            log.info("heddle.sequence: flash-attn not installed; CUDA attention uses torch SDPA")
            flash_attn_varlen_func = None
        _FLASH.append(flash_attn_varlen_func)
    return _FLASH[0]


def _flash_attention(q, k, v, *, causal, cu_seqlens):
    """Every batch row is its own set of documents; padding after cu_seqlens[-1] is one more."""
    b, s = q.shape[:2]
    cu = torch.tensor([0, s], device=q.device) if cu_seqlens is None else cu_seqlens.to(q.device)
    if int(cu[-1]) < s:
        cu = torch.cat([cu, cu.new_tensor([s])])
    lengths = cu[1:] - cu[:-1]
    rows = torch.cat([cu[:-1] + i * s for i in range(b)] + [cu.new_tensor([b * s])]).to(torch.int32)
    out = _flash_varlen()(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                          v.reshape(b * s, *v.shape[2:]), rows, rows, int(lengths.max()),
                          int(lengths.max()), causal=causal)
    return out.view(b, s, *out.shape[1:])


class UlyssesAttention(nn.Module):
    """Sequence-parallel core attention over the ranks of ``group``.

    ``attn(q, k, v, *, causal=True, cu_seqlens=None, position_ids=None)``: q ``[b, s/P, H, d]``,
    k/v ``[b, s/P, Hkv, d]`` (``layout="sbhd"``: ``[s/P, b, ., d]``) -> ``[b, s/P, H, d]``.
    ``cu_seqlens`` are global document boundaries (``[num_docs + 1]``, from 0); positions at or
    after ``cu_seqlens[-1]`` are padding, masked out. ``position_ids`` are accepted for the module
    contract (RoPE is applied before this module, with global positions) and not used here.

    ``attn_fn(q, k, v, *, causal, cu_seqlens)`` gets batch-first, full-sequence, head-sharded
    views ``[b, s, h_me, d]`` (strided: not necessarily contiguous) and returns ``[b, s, h_me, d]``.

    ``group`` is a plain attribute: set it between steps to run the same module on another
    sequence-parallel group (nothing is rebuilt; head plans are cached per group size).
    ``overlap_chunks`` = C > 1 pipelines the heads in C chunks so that all-to-alls run while
    attention computes (:mod:`heddle.sequence.ulysses_overlap`): C packed all-to-alls each way
    instead of one, the same bytes. It needs C <= the fewest head units on a rank.
    ``check`` = "first" (default) compares shapes, dtypes and options across the group with one
    small all-gather on the first call after construction or after ``group`` is set, "always" on
    every call, "never" not at all.
    """

    def __init__(self, group=None, attn_fn=None, *, layout: str = "bshd", check: str = "first",
                 overlap_chunks: int = 1):
        super().__init__()
        if not isinstance(overlap_chunks, int) or overlap_chunks < 1:
            raise ValueError(f"overlap_chunks={overlap_chunks!r} must be a positive integer")
        self.overlap_chunks = overlap_chunks
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not supported; valid: {LAYOUTS}")
        if check not in ("first", "always", "never"):
            raise ValueError(f"check={check!r}; valid: 'first', 'always', 'never'")
        if attn_fn is not None and not callable(attn_fn):
            raise TypeError(f"attn_fn={attn_fn!r} must be callable")
        self.layout, self.check = layout, check
        self.attn_fn = attn_fn or default_attention
        self._plans: dict[tuple, object] = {}
        self.group = group

    @property
    def group(self):
        return self._group

    @group.setter
    def group(self, group) -> None:
        self._group = group
        self._checked = False

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, world={group_rank_size(self._group)[1]}"

    def _validate(self, q, k, v, causal, cu_seqlens) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-d tensor ({self.layout}), got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}.dtype={t.dtype}: Ulysses attention needs floating-point tensors")
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
        if k.shape != v.shape:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
        seq_dim = 1 if self.layout == "bshd" else 0
        if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} ({self.layout}) must agree "
                             f"on batch, sequence and head_dim")
        rank, world = group_rank_size(self._group)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, q.shape[seq_dim] * world)
        if world == 1 or self.check == "never" or (self.check == "first" and self._checked):
            return
        dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        info = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                dtypes.index(q.dtype) if q.dtype in dtypes else -1, int(bool(causal)),
                -1 if cu_seqlens is None else int(cu_seqlens[-1]),
                -1 if cu_seqlens is None else cu_seqlens.numel()]
        mine = torch.tensor(info, dtype=torch.int64, device=q.device)
        every = mine.new_empty(world * len(info))  # gloo wants flat buffers
        all_gather_into_tensor(every, mine, group=self._group)
        every = every.view(world, len(info))
        if not bool((every == mine).all()):
            names = ["b", f"s/P (dim {seq_dim})", "H", "Hkv", "d", "dtype", "causal", "cu_seqlens[-1]",
                     "len(cu_seqlens)"]
            rows = "; ".join(f"rank {j}: " + ", ".join(f"{n}={x}" for n, x in zip(names, every[j].tolist()))
                             for j in range(world))
            raise ValueError(f"Ulysses inputs differ across the {world} ranks of the group (every rank "
                             f"must hold an equal shard: pad with shard_sequence): {rows}")
        self._checked = True

    def forward(self, q, k, v, *, causal: bool = True, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """q/k/v may differ in dtype (RoPE upcasts q and k under autocast while v stays bf16): they
        travel and attend in :func:`compute_dtype`, and the result comes back in q's dtype."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and not t.is_floating_point():
                raise TypeError(f"{name}.dtype={t.dtype}: Ulysses attention needs floating-point tensors")
        out_dtype = q.dtype
        dtype = compute_dtype(q, k, v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        self._validate(q, k, v, causal, cu_seqlens)
        attn_kwargs = {"causal": causal, "cu_seqlens": cu_seqlens}
        return self.run(q, k, v, lambda q, k, v: self.attn_fn(q, k, v, **attn_kwargs)).to(out_dtype)

    def run(self, q, k, v, attend) -> torch.Tensor:
        """The exchange around ``attend(q, k, v)``, which gets batch-first full-sequence views
        ``[b, s, h_me, d]`` and returns ``[b, s, h_me, d]``; q/k/v of one dtype, not validated."""
        rank, world = group_rank_size(self._group)
        batch_first = self.layout == "bshd"
        if batch_first:  # sequence-first views: every all-to-all block is then contiguous
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        heads, kv_heads = q.shape[2], k.shape[2]
        key = (heads, kv_heads, world)
        if key not in self._plans:
            self._plans[key] = plan_heads(heads, kv_heads, world)
        q_split, kv_split = self._plans[key]
        if world > 1 and self.overlap_chunks > 1:
            chunk_key = (*key, self.overlap_chunks)
            if chunk_key not in self._plans:
                self._plans[chunk_key] = chunk_splits(q_split, kv_split, self.overlap_chunks)
            out = OverlappedUlysses.apply(self._plans[chunk_key], self._group, batch_first, attend, {}, q, k, v)
            return out.transpose(0, 1) if batch_first else out
        if world > 1 and torch.compiler.is_compiling():
            return self._run_traceable(q, k, v, attend, q_split, kv_split, batch_first)
        if world == 1:
            q_full, k_full, v_full = q, k, v
        else:
            q_full, k_full, v_full = ScatterHeads.apply((q_split, kv_split, kv_split), self._group,
                                                        batch_first, q, k, v)
        # [s, b, h_me, d] -> batch-first views for attend.
        out = attend(q_full.transpose(0, 1), k_full.transpose(0, 1), v_full.transpose(0, 1))
        if world > 1:
            out = GatherHeads.apply(q_split, self._group, batch_first, out.transpose(0, 1))  # [s/P, b, H, d]
            return out.transpose(0, 1) if batch_first else out
        return out if batch_first else out.transpose(0, 1)

    def _run_traceable(self, q, k, v, attend, q_split, kv_split, batch_first):
        """Under torch.compile: the same exchange through the custom ops of
        :mod:`heddle.dist.custom_ops` (Dynamo traces them; outputs are copies, not views)."""
        from heddle.dist.custom_ops import encode_splits, group_name, ulysses_gather_op, ulysses_scatter_op
        name = group_name(self._group)
        # the ops are batch-first: [b, s/P, H, d]
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        q_full, k_full, v_full = ulysses_scatter_op([q, k, v], encode_splits((q_split, kv_split, kv_split)), name)
        out = attend(q_full, k_full, v_full)
        (out,) = ulysses_gather_op([out.contiguous()], encode_splits((q_split,)), name)
        return out if batch_first else out.transpose(0, 1)


def compute_dtype(q, k, v) -> torch.dtype:
    """The dtype Ulysses moves and attends q/k/v in: autocast's dtype when autocast is on for
    their device (what SDPA would run in), else the promotion of the three dtypes."""
    device = q.device.type
    low = (torch.float32, torch.float16, torch.bfloat16)
    if torch.is_autocast_enabled(device) and all(t.dtype in low for t in (q, k, v)):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
