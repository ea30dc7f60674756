"""Parity across nodes with several ranks per node: a whole node (2 of 4 ranks) loses its memory
and its files, and every rank is rebuilt from the XOR parity of its stripe (one rank per node)."""


import torch

from heddle.checkpoint import Checkpointer
from tests.checkpoint.test_distributed import lose_node
from tests.conftest import run_distributed


def _worker(rank, world, directory, per_node, lost_node):
    opts = dict(levels=("memory", "disk"), redundancy="parity", ranks_per_node=per_node)
    ck = Checkpointer(directory, **opts)
    torch.manual_seed(rank)
    own = torch.randn(1000 + 123 * rank, dtype=torch.float64)   # per-rank state of per-rank size
    for step in (1, 2):
        ck.wait_for_snapshot()
        own.add_(1.0)
        ck.save(step, {"own": own})
    ck.wait()
    ck.close()
    expected = own.clone()
    if rank // per_node == lost_node:       # the node loses its memory and its files
        lose_node(ck, directory, rank, steps=(1, 2), stop_keeper=rank % per_node == 0)
    torch.distributed.barrier()
    ck2 = Checkpointer(directory, **opts)
    got = torch.zeros_like(own)
    step = ck2.restore({"own": got})
    out = {"step": step, "source": ck2.last_restore["source"], "exact": torch.equal(got, expected)}
    ck2.close(shutdown_keeper_process=True)
    return out


def test_parity_rebuilds_a_whole_node_of_two_ranks(tmp_path):
    per_node, lost_node = 2, 1
    results = run_distributed(_worker, 4, str(tmp_path / "ckpt"), per_node, lost_node)
    for rank, r in enumerate(results):
        assert r["step"] == 2 and r["exact"], (rank, r)
        assert r["source"] == ("parity" if rank // per_node == lost_node else "memory"), (rank, r)
