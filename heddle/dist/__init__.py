"""Foundation layer: bootstrap, process groups, recorded collectives, byte ledger."""

from heddle.dist.bootstrap import LaunchEnv, detect_launch_env, device, init_distributed, local_rank
from heddle.dist.collectives import (
    ReduceOp,
    all_gather,
    all_gather_into_tensor,
    all_reduce,
    all_to_all,
    all_to_all_single,
    barrier,
    batch_isend_irecv,
    broadcast,
    group_rank_size,
    reduce,
    reduce_scatter_tensor,
)
from heddle.dist.groups import ParallelLayout, SubgroupCache, aligned_ranges
from heddle.dist.ledger import CommLedger, CommRecord, comm_tag
from heddle.dist.sharding import is_sharded, mark_sharded
from heddle.dist.sparse import SparseWork, sparse_all_gather, sparse_reduce_scatter

__all__ = [
    "LaunchEnv", "detect_launch_env", "device", "init_distributed", "local_rank",
    "ReduceOp", "all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all", "all_to_all_single",
    "barrier", "batch_isend_irecv", "broadcast", "group_rank_size", "reduce", "reduce_scatter_tensor",
    "ParallelLayout", "SubgroupCache", "aligned_ranges",
    "CommLedger", "CommRecord", "comm_tag",
    "is_sharded", "mark_sharded",
    "SparseWork", "sparse_all_gather", "sparse_reduce_scatter",
]
