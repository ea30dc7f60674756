"""Trainer section ``sequence_parallel``: Ulysses inside every data-parallel replica.

    heddle.TrainerConfig(sequence_parallel={"sp_size": 2})

The Trainer's mesh gets an ``sp`` dimension of ``sp_size`` (contiguous ranks; ``trainer.layout``
has ``sp_group`` / ``sp_rank`` and ``dp_rank`` / ``dp_size``: the sampler shards rows by them, the
``sp_size`` ranks of one replica read the same rows). setup swaps the model's core attention for
:class:`heddle.sequence.UlyssesAttention` on ``trainer.layout.sp_group``.

prepare_batch: ``tokens`` / ``targets`` ``[b, s]`` (this replica's rows, whole sequences) ->
this rank's ``[b, s_pad/P]`` shard; targets are padded with -100 so padding leaves the loss;
``position_ids`` ``[s_pad/P]`` are the global ones (restarting per document of ``cu_seqlens``)
and ``cu_seqlens`` masks padding out of attention. Gradients need nothing special: the Trainer
sums them over every rank (SP x DP) and divides by the global count of non-padding targets, the
gradient of the global token mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from heddle.plugins.base import TrainerPlugin
from heddle.sequence.hf import is_transformers_model
from heddle.sequence import local_position_ids, padding_cu_seqlens, parallelize, shard_sequence


@dataclass
class Config:
    sp_size: int = 2                  # ranks per sequence-parallel group (divides the world size)
    attn_fn: Callable | None = None   # core attention on full-sequence, head-sharded tensors
    check: str = "first"              # UlyssesAttention cross-rank input check
    overlap_chunks: int = 1           # > 1: pipeline head chunks so all-to-alls overlap attention
    ignore_index: int = -100          # padding value of targets

    def __post_init__(self):
        if not isinstance(self.sp_size, int) or self.sp_size < 1:
            raise ValueError(f"sequence_parallel.sp_size={self.sp_size!r} must be a positive integer")


class Plugin(TrainerPlugin):
    name = "sequence_parallel"
    Config = Config

    def setup(self, trainer) -> None:
        self.sp_group = trainer.layout.sp_group
        self.handle = parallelize(trainer.module, self.sp_group, attn_fn=self.config.attn_fn,
                                  check=self.config.check, overlap_chunks=self.config.overlap_chunks)

    def prepare_batch(self, trainer, batch: dict) -> dict:
        for key in ("tokens", "targets"):
            if key not in batch:
                raise ValueError(f"sequence_parallel needs batch[{key!r}] ([b, s]); got keys {sorted(batch)}")
        tokens, targets = batch["tokens"], batch["targets"]
        if tokens.dim() != 2 or tokens.shape != targets.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} must both "
                             f"be [b, s]")
        group = self.sp_group
        cu_seqlens = batch.get("cu_seqlens")
        local_tokens, shard = shard_sequence(tokens, group, 1, pad_value=0)
        local_targets, _ = shard_sequence(targets, group, 1, pad_value=self.config.ignore_index)
        out: dict[str, Any] = dict(batch, tokens=local_tokens, targets=local_targets, sequence_shard=shard)
        if batch.get("position_ids") is not None:
            pos = batch["position_ids"]
            dim = pos.dim() - 1  # [s] or [b, s]
            last = pos.select(dim, -1).unsqueeze(dim)  # padding keeps counting
            steps = torch.arange(1, shard.padding + 1, device=pos.device)
            pad = last + (steps if dim == 0 else steps.expand(pos.shape[0], -1))
            out["position_ids"] = torch.cat([pos, pad], dim).narrow(dim, shard.start, shard.local_length)
        else:
            out["position_ids"] = local_position_ids(cu_seqlens, shard.length, group).to(tokens.device)
        cu = padding_cu_seqlens(cu_seqlens, shard)
        if cu is not None:
            out["cu_seqlens"] = cu.to(tokens.device)
        if is_transformers_model(trainer.module) and out["position_ids"].dim() == 1:
            out["position_ids"] = out["position_ids"].unsqueeze(0)  # HF's RoPE wants [b or 1, s]
        return out

    def metrics(self, trainer) -> dict[str, float]:
        return {"sp_size": float(trainer.layout.sp_size)}
