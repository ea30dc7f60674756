"""Mixture-of-Experts with fully sharded sparse data parallelism (Hecate / FSSDP) and an
expert-parallel baseline. See docs/moe.md; transformers MoE models: :func:`from_hf` / :func:`to_hf`."""

from heddle.moe.experts import ExpertStore, expert_forward, expert_numel, init_expert
from heddle.moe.hf import HFSparseMoeBlock, from_hf, to_hf
from heddle.moe.layer import STRATEGIES, MoE
from heddle.moe.placement import (
    LoadPredictor,
    dispatch_plan,
    materialize,
    owner_imbalance,
    reshard_owners,
    round_robin_owners,
)
from heddle.moe.resharding import expert_keys, merge_expert_shards, move_experts, reshard
from heddle.moe.router import Routing, route

__all__ = [
    "MoE", "STRATEGIES", "ExpertStore", "expert_forward", "expert_numel", "init_expert",
    "LoadPredictor", "dispatch_plan", "materialize", "owner_imbalance", "reshard_owners",
    "round_robin_owners", "expert_keys", "merge_expert_shards", "move_experts", "reshard",
    "Routing", "route", "from_hf", "to_hf", "HFSparseMoeBlock",
]
