"""Heterogeneity-adaptive sequence parallelism (FlexSP): every step, split the devices into
sequence-parallel groups of different power-of-two sizes and give each sequence to one group so
the slowest group finishes as early as possible within memory.

    from heddle.sequence.adaptive import CostModel, plan_batch
    plan = plan_batch(lengths, num_devices=64, cost_model=CostModel.preset("a100-80g-ib"))
    print(plan.table())
"""

from heddle.sequence.adaptive.background import BackgroundPlanner, PlannerError
from heddle.sequence.adaptive.bucketing import Buckets, bucket_lengths
from heddle.sequence.adaptive.cost_model import PRESETS, CostModel, min_degree_for
from heddle.sequence.adaptive.plan import MicroBatch, Plan, layout_groups
from heddle.sequence.adaptive.executor import AdaptiveExecutor, pack_documents
from heddle.sequence.adaptive.greedy import split_lane
from heddle.sequence.adaptive.planner import plan_batch

__all__ = ["AdaptiveExecutor", "pack_documents", "BackgroundPlanner", "PlannerError", "Buckets", "bucket_lengths", "PRESETS", "CostModel", "min_degree_for", "MicroBatch", "Plan",
           "layout_groups", "plan_batch", "split_lane"]
