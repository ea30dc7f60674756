"""Checkpointing inside a training loop, side by side: heddle vs torch.save (+fsync) vs dcp.save vs
dcp.async_save (fresh copy; cached stager).

    heddle run -n 1 benchmarks/checkpoint.py [--sizes 50,200,1000] [--every 1,5] [--steps 10] [--markdown]

Runs the ``checkpoint`` bench scenario (heddle/bench/scenarios/checkpoint.py: what is measured
and how) with one torch thread, prints the tables and the issue's goals marked met / missed:
- stall per checkpoint <= 0.1x torch.save and <= 0.5x dcp.async_save;
- with a checkpoint every step, >= 0.9x the steps/s of no checkpointing;
- recovery from memory >= 5x faster than from disk.
"""

from __future__ import annotations

import warnings

import torch

from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenario import BenchContext
from heddle.bench.script import script_setup
from heddle.bench.scenarios.checkpoint import SCENARIO

TRAIN = [("size_mb", "state MB"), ("every", "every"), ("method", "method"), ("step_s", "step s"),
         ("steps_per_s", "steps/s"), ("throughput_vs_none", "vs none"), ("stall_median_s", "stall med s"),
         ("stall_p95_s", "stall p95 s"),
         ("save_call_median_s", "of which save() s"), ("lazy_wait_median_s", "lazy wait s"), ("save_to_durable_s", "save->durable s"),
         ("peak_extra_rss_mb", "peak extra RSS MB")]
RECOVERY = [("size_mb", "state MB"), ("every", "every"), ("method", "method"), ("recover_memory_s", "memory s"),
            ("recover_disk_cold_s", "disk (cold) s"), ("recover_disk_warm_s", "disk (warm) s"),
            ("memory_speedup", "cold disk / memory")]
GIL = [("writer", "writer"), ("step_ms", "python-bound step ms"), ("slowdown", "slowdown")]


def verdicts(rows):
    lines = []
    train = [r for r in rows if r.get("part") == "train"]
    for r in (r for r in train if r["method"].startswith("heddle")):
        same = {x["method"]: x for x in train if x["size_mb"] == r["size_mb"] and x["every"] == r["every"]}
        where = f"{r['method']} {r['size_mb']:g} MB every {r['every']}"
        if "torch.save" in same:
            ratio = r["stall_median_s"] / same["torch.save"]["stall_median_s"]
            lines.append(f"{where}: stall {r['stall_median_s']:.4f}s = {ratio:.3f}x torch.save -> goal (<=0.1x) "
                         f"{'met' if ratio <= 0.1 else 'missed'}")
        if "dcp.async_save" in same:
            ratio = r["stall_median_s"] / same["dcp.async_save"]["stall_median_s"]
            lines.append(f"{where}: stall = {ratio:.3f}x dcp.async_save -> goal (<=0.5x) "
                         f"{'met' if ratio <= 0.5 else 'missed'}")
        if r["every"] == 1 and "throughput_vs_none" in r:
            t = r["throughput_vs_none"]
            lines.append(f"{where}: {t:.3f}x the steps/s of no checkpointing -> goal (>=0.9x) "
                         f"{'met' if t >= 0.9 else 'missed'}")
        if "recover_memory_s" in r:
            s = r["recover_disk_cold_s"] / r["recover_memory_s"]
            lines.append(f"{where}: recovery from memory {r['recover_memory_s']:.3f}s vs cold disk "
                         f"{r['recover_disk_cold_s']:.3f}s = {s:.1f}x (warm disk {r['recover_disk_warm_s']:.3f}s) "
                         f"-> goal (>=5x) {'met' if s >= 5 else 'missed'}")
    return lines


def main(argv=None):
    options, rank, world = script_setup(__doc__, [SCENARIO.add_options], argv, threads=False)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")
    rows = SCENARIO.run(BenchContext(rank, world, verbose=True), options)
    if rank != 0:
        return rows
    train = [r for r in rows if r.get("part") == "train"]
    recovery = [dict(r, memory_speedup=r["recover_disk_cold_s"] / r["recover_memory_s"]) for r in train
                if "recover_memory_s" in r]
    gil = [r for r in rows if r.get("part") == "gil"]
    for title, part, cols in (("checkpointing in a training loop", train, TRAIN), ("recovery", recovery, RECOVERY),
                              ("GIL cost of the writer", gil, GIL)):
        if part:
            print_rows(title, part, cols)
            if options.markdown:
                print(markdown_table(part, cols))
    print("\n".join(["", "goals:"] + verdicts(rows)))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
