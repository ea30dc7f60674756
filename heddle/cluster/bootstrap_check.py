"""Multi-node bootstrap across real addresses: torchrun, MPICH Hydra (mpirun) and a SLURM-style
environment set by hand, each at 2 nodes of an emulated cluster.

    python -m heddle.cluster.bootstrap_check [--nproc-per-node 2]

Each launcher starts ``python -m heddle.cluster.bootstrap_check --probe OUT`` on every rank: the
probe calls ``heddle.init_distributed()`` (which finds torchrun's, Hydra's or SLURM's variables),
all-reduces its rank + 1 across the nodes and writes what it saw. The check passes when every
rank reports the launcher it was started by, the world size, the right sum and its node's name.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import sys


def probe(out: str) -> int:
    import torch
    import torch.distributed as dist

    import heddle
    import heddle.dist as hd

    source = hd.detect_launch_env().source
    heddle.init_distributed(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    hd.all_reduce(t)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "sum": float(t), "source": source, "host": socket.gethostname(),
                   "local_rank": hd.local_rank(), "master_addr": os.environ.get("MASTER_ADDR")}, f)
    dist.destroy_process_group()
    return 0


def check(launcher: str, nodes: int = 2, nproc_per_node: int = 1, rate: str | None = "1gbit") -> dict:
    """Run the probe under ``launcher`` on a fresh cluster; returns a summary row (``ok`` bool)."""
    from heddle.cluster import Cluster

    with Cluster(nodes, nproc_per_node, rate=rate) as cluster:
        out = os.path.join(cluster.shared_dir, f"probe-{launcher}")
        argv = ["-m", "heddle.cluster.bootstrap_check", "--probe", out]
        if launcher == "mpirun":
            result = cluster.mpirun(argv, timeout=300)
        else:
            result = cluster.run(argv, launcher=launcher, timeout=300)
        seen = []
        for path in sorted(glob.glob(os.path.join(out, "rank*.json"))):
            with open(path) as f:
                seen.append(json.load(f))
        world = nodes * nproc_per_node
        expected_source = {"torchrun": "torchrun", "mpirun": "mpi", "slurm": "slurm"}[launcher]
        ok = (result.ok and len(seen) == world and all(
            r["world"] == world and r["sum"] == world * (world + 1) / 2 and r["source"] == expected_source
            and r["host"] == f"node{r['rank'] // nproc_per_node}" for r in seen))
        return {"launcher": launcher, "ok": ok, "ranks": len(seen), "world": world,
                "hosts": sorted({r["host"] for r in seen}), "sources": sorted({r["source"] for r in seen}),
                "log": "" if ok else result.log_text()[-3000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m heddle.cluster.bootstrap_check", description=__doc__.split("\n")[0])
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--launchers", default="torchrun,mpirun,slurm")
    args = p.parse_args(argv)
    if args.probe:
        return probe(args.probe)
    rows = []
    for launcher in args.launchers.split(","):
        nproc = args.nproc_per_node
        rows.append(check(launcher, 2, nproc))
        row = rows[-1]
        print(f"{launcher:9s} 2 nodes x {nproc}: {'ok' if row['ok'] else 'FAILED'}  ranks {row['ranks']}/"
              f"{row['world']} on {','.join(row['hosts'])}, detected as {','.join(row['sources'])}", flush=True)
        if row["log"]:
            print(row["log"])
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
