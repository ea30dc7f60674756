"""An emulated multi-node cluster on one machine (docs/cluster.md).

    from heddle.cluster import Cluster, progress
    with Cluster(nodes=2, nproc_per_node=2, rate="10gbit", delay="50us") as cluster:
        cluster.run(["train.py"])
"""

from heddle.cluster.cluster import Cluster, KillEvent, RunResult
from heddle.cluster.netns import ClusterUnavailable, check_prerequisites
from heddle.cluster.progress import in_cluster, progress

__all__ = ["Cluster", "ClusterUnavailable", "KillEvent", "RunResult", "check_prerequisites", "in_cluster", "progress"]
