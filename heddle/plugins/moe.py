"""Trainer section ``moe``: every block's MLP becomes a Mixture-of-Experts layer (FSSDP or EP).

    heddle.TrainerConfig(moe={"num_experts": 8, "strategy": "fssdp"})

setup: replaces ``block.mlp`` with :class:`heddle.moe.MoE` on ``trainer.group`` (each expert
parameter is marked with :func:`heddle.dist.mark_sharded` by the layer, so the Trainer leaves
experts out of DDP / FSDP2 and its global-norm clipping counts each expert once, on its owner).
The optimizer is built after this (pass it to the Trainer as a factory), so it lists the MoE
parameters from the start. With ``overlap`` a forward pre-hook on each block issues the layer's
spAG before the block's attention runs. ``trainer.plugin("moe").layers`` lists the layers.

Gradients: the router is replicated (DDP sums it); expert gradients arrive on owners by spRS as
the sum over ranks of d(loss_sum), as the Trainer's contract expects. The Trainer adds the aux
loss in ``backward`` (``auxiliary_loss``): with a per-rank token-sum loss it adds
``aux_loss_weight * num_tokens * sum of the layers' aux losses`` so that after the division by the
global token count the objective is token-mean loss + aux_loss_weight * (token-weighted mean of
the ranks' aux losses); with a mean loss it adds ``aux_loss_weight * aux``. Do not add it yourself.

after_optimizer_step: FSSDP re-shards every ``reshard_every`` steps (Algorithm 2), moving
parameters and optimizer state only when the plan changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heddle.moe import STRATEGIES, MoE, reshard
from heddle.moe.apply import replace_mlps
from heddle.moe.hf import HFSparseMoeBlock, from_hf
from heddle.plugins.base import TrainerPlugin
from heddle.sequence.hf import is_transformers_model


@dataclass
class Config:
    num_experts: int = 8
    top_k: int = 2
    strategy: str = "fssdp"
    d_ffn: int | None = None             # None: the replaced MLP's hidden size
    capacity_factor: float | None = None  # None: dropless
    activation: str = "swiglu"
    aux_loss_weight: float = 0.01         # the Trainer adds weight x tokens x aux loss in backward
    reshard_every: int | None = 100       # FSSDP: Algorithm 2 every N steps; None: never
    overlap: bool = True                  # issue spAG before the block's attention
    rematerialize: bool = False
    overlap_degree: int | None = None
    memory_slots: int | None = None
    window: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"moe.strategy={self.strategy!r} is not one of {STRATEGIES}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"moe.num_experts={self.num_experts!r} must be a positive int")
        if self.reshard_every is not None and (not isinstance(self.reshard_every, int) or self.reshard_every < 1):
            raise ValueError(f"moe.reshard_every={self.reshard_every!r} must be a positive int or None")
        if self.aux_loss_weight < 0:
            raise ValueError(f"moe.aux_loss_weight={self.aux_loss_weight} must be >= 0")


class Plugin(TrainerPlugin):
    name = "moe"
    Config = Config

    def setup(self, trainer) -> None:
        c = self.config
        if is_transformers_model(trainer.module):
            return self._setup_hf(trainer)
        swapped = replace_mlps(trainer.module, num_experts=c.num_experts, top_k=c.top_k, group=trainer.group,
                               d_ffn=c.d_ffn, seed=c.seed, strategy=c.strategy,
                               capacity_factor=c.capacity_factor, activation=c.activation,
                               rematerialize=c.rematerialize, overlap_degree=c.overlap_degree,
                               memory_slots=c.memory_slots, window=c.window)
        self.layers: list[MoE] = [moe for _, _, moe in swapped]
        # every layer's aux loss of the micro-batch's forward, collected for auxiliary_loss
        self.aux_losses: dict[int, torch.Tensor] = {}
        self.hooks = [layer.register_forward_hook(self._record_aux(i)) for i, layer in enumerate(self.layers)]
        if c.overlap and c.strategy == "fssdp" and trainer.world_size > 1:
            for block, _, _ in swapped:
                self.hooks.append(block.register_forward_pre_hook(lambda module, args: module.mlp.prefetch()))
        self.moved = 0

    def _setup_hf(self, trainer) -> None:
        """A transformers MoE model: its sparse blocks become heddle MoE with its weights
        (:func:`heddle.moe.from_hf`); num_experts / top_k / d_ffn / activation come from the model,
        the aux loss stays HF's (``output_router_logits``), so ``auxiliary_loss`` adds nothing."""
        c = self.config
        self.layers = from_hf(trainer.module, trainer.group, strategy=c.strategy, rematerialize=c.rematerialize,
                              overlap_degree=c.overlap_degree, memory_slots=c.memory_slots, window=c.window)
        self.aux_losses = {}
        self.hooks = []
        if c.overlap and c.strategy == "fssdp" and trainer.world_size > 1:
            for block in (m for m in trainer.module.modules() if isinstance(m, HFSparseMoeBlock)):
                parent = block._source[0][0]  # the decoder layer: prefetch before its attention
                self.hooks.append(parent.register_forward_pre_hook(
                    lambda module, args, moe=block.experts: moe.prefetch()))
        self.moved = 0

    def _record_aux(self, index: int):
        def hook(module, args, output):
            self.aux_losses[index] = output[1]
        return hook

    def auxiliary_loss(self, trainer, num_tokens):
        losses, self.aux_losses = list(self.aux_losses.values()), {}
        if not self.config.aux_loss_weight or not losses:
            return None
        aux = torch.stack(losses).sum()
        weight = self.config.aux_loss_weight * (1.0 if num_tokens is None else float(num_tokens))
        return weight * aux

    def after_optimizer_step(self, trainer) -> None:
        every = self.config.reshard_every
        if self.config.strategy == "fssdp" and every and trainer.step_count % every == 0:
            self.moved = reshard(self.layers, trainer.optimizer)

    def metrics(self, trainer) -> dict[str, float]:
        stats = [layer.last_stats for layer in self.layers if layer.last_stats]
        if not stats:
            return {}
        return {"moe_max_over_mean": max(s["max_over_mean"] for s in stats),
                "moe_dropped": sum(s["dropped"] for s in stats),
                "moe_replicas": sum(s["replicas"] for s in stats),
                "moe_experts_moved": float(self.moved)}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
