"""Sharded data parallelism, side by side on one GPT: heddle DDP, heddle FSDP2, DeepSpeed ZeRO-2, ZeRO-3.

    heddle run -n 2 benchmarks/sharding.py [--d-model 384 --layers 6] [--warmup 2 --trials 6] [--markdown]

Runs the ``sharding`` bench scenario (heddle/bench/scenarios/sharding.py: what is measured and
how) with one torch thread per process, prints the table and the issue's goals marked met / missed:
- per-rank state bytes of FSDP2 <= 1.1/N of DDP's;
- FSDP2 tokens/s >= DeepSpeed ZeRO-3's;
- the four loss curves equal within fp32 noise (max relative difference <= LOSS_RTOL).
"""

from __future__ import annotations

import warnings

from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenario import BenchContext
from heddle.bench.scenarios.sharding import SCENARIO
from heddle.bench.script import script_setup

LOSS_RTOL = 1e-4   # fp32: reduction order differs between the four (sum vs mean, buckets, shards)
COLUMNS = [("label", "implementation"), ("params", "params"), ("state_mb", "state MB/rank"),
           ("params_mb", "params MB"), ("grads_mb", "grads MB"), ("optimizer_mb", "optim MB"),
           ("other_mb", "other MB"), ("state_vs_first", "state vs DDP"), ("peak_rss_over_start_mb", "RSS growth MB"),
           ("tokens_per_s", "tokens/s"), ("step_time_s", "step s"), ("comm_mb_per_step", "MB sent/step"),
           ("loss_last", "last loss"), ("max_loss_rel_diff", "max loss rel diff vs DDP")]


def verdicts(rows, world_size: int) -> list[str]:
    by = {r["impl"]: r for r in rows}
    lines = []
    if "ddp" in by and "fsdp" in by:
        ratio = by["fsdp"]["state_mb"] / by["ddp"]["state_mb"]
        lines.append(f"FSDP2 state {by['fsdp']['state_mb']:.2f} MB/rank = {ratio:.3f}x DDP's "
                     f"{by['ddp']['state_mb']:.2f} MB; goal <= {1.1 / world_size:.3f}x (1.1/N) -> "
                     f"{'met' if ratio <= 1.1 / world_size else 'missed'}")
    if "fsdp" in by and "zero3" in by:
        ratio = by["fsdp"]["tokens_per_s"] / by["zero3"]["tokens_per_s"]
        lines.append(f"FSDP2 {by['fsdp']['tokens_per_s']:,.0f} tokens/s = {ratio:.2f}x ZeRO-3's "
                     f"{by['zero3']['tokens_per_s']:,.0f}; goal >= 1x -> {'met' if ratio >= 1 else 'missed'}")
    worst = max(r["max_loss_rel_diff"] for r in rows)
    lines.append(f"loss curves: max relative difference to {rows[0]['label']} over {len(rows)} implementations "
                 f"and every step = {worst:.2e}; goal <= {LOSS_RTOL:g} -> {'met' if worst <= LOSS_RTOL else 'missed'}")
    return lines


def add_options(parser):
    SCENARIO.add_options(parser)


def main(argv=None):
    options, rank, world = script_setup(__doc__, [add_options], argv, warmup=2, trials=6)
    warnings.filterwarnings("ignore")
    rows = SCENARIO.run(BenchContext(rank, world, verbose=True), options)
    if rank != 0:
        return rows
    print_rows(f"sharded data parallelism at {world} processes", rows, COLUMNS)
    if options.markdown:
        print(markdown_table(rows, COLUMNS))
    print("\n".join(["", "goals:"] + verdicts(rows, world)))
    return rows


if __name__ == "__main__":
    main()
