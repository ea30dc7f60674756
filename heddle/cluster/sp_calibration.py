"""The adaptive-SP cost model meets a link: calibrate on an emulated cluster, then compare a plan's
predicted time with the measured one.

    heddle cluster run --nodes 2 --nproc-per-node 2 --rate 1gbit -- -m heddle.cluster.sp_calibration

Every rank: the example GPT under :class:`AdaptiveExecutor`, ``CostModel.calibrate`` (compute fit,
all-to-all per group size, intra-node and inter-node separately, the link alone), then ``--steps``
batches of long-tailed document lengths, each planned (adaptive, and static SP=world which puts
every sequence across the link) and run; rank 0 prints the calibration and, per case, the median
predicted and measured forward+backward time and the mean relative error |pred - meas| / meas.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist

import heddle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    heddle.init_distributed(backend="gloo")
    from heddle.data import ByteCorpus, sample_lengths
    from heddle.models import GPT, GPTConfig
    from heddle.sequence.adaptive import CostModel, plan_batch
    from heddle.sequence.adaptive.executor import AdaptiveExecutor

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=args.max_len))
    executor = AdaptiveExecutor(model)
    cm = CostModel.calibrate(model, executor.pool, lengths=(128, 256, 512, 1024))
    corpus = ByteCorpus.stdlib().train
    cases = {"adaptive": {}, f"static-sp{world}": {"degrees": (world,)}}
    samples = {name: [] for name in cases}
    for step in range(args.steps + 1):
        lengths = sample_lengths("code", args.docs, max_len=args.max_len, seed=step)
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(corpus) - args.max_len - 2, (len(lengths),), generator=g)
        docs = [corpus[int(a):int(a) + int(n) + 1].long() for a, n in zip(starts, lengths)]
        for name, kw in cases.items():
            plan = plan_batch(lengths.tolist(), world, cm, max_tokens_per_device=args.capacity, **kw)
            model.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            executor.run(plan, docs)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step:   # step 0 warms up
                samples[name].append((plan.predicted_time, float(elapsed)))
    if rank == 0:
        m = cm.measured
        out = {"world": world, "ranks_per_node": m.get("ranks_per_node"),
               "intra_node_GBps": {k: v / 1e9 for k, v in m.get("intra_node_bandwidth", {}).items()},
               "inter_node_GBps": {k: v / 1e9 for k, v in m.get("inter_node_bandwidth", {}).items()},
               "link_GBps": (m["link_bandwidth"] / 1e9) if m.get("link_bandwidth") else None,
               "plan_bandwidth_GBps": {str(k): v / 1e9 for k, v in cm.bandwidth.items()}, "cases": {}}
        for name, got in samples.items():
            pred, meas = (np.array(x) for x in zip(*got))
            out["cases"][name] = {"predicted_s": float(np.median(pred)), "measured_s": float(np.median(meas)),
                                  "error": float(np.mean(np.abs(pred - meas) / meas)), "steps": len(got)}
        print("sp-calibration " + json.dumps(out), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
