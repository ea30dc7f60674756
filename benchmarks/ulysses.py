"""Ulysses attention, side by side: heddle vs DeepSpeed DistributedAttention vs local attention.

    heddle run -n 2 benchmarks/ulysses.py [--seq-lens 2048,4096,8192] [--trials 7] [--markdown]

Runs the ``ulysses`` bench scenario (heddle/bench/scenarios/ulysses.py: what is measured and how)
in this process group, one thread per process, and prints a table plus, per sequence length,
heddle's overhead over local attention as a fraction of DeepSpeed's (goal: <= 0.5).
``heddle bench ulysses --nproc 2`` runs the same code through the harness (Parquet results).
"""

from __future__ import annotations


import torch.distributed as dist

from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenario import BenchContext
from heddle.bench.script import script_setup
from heddle.bench.scenarios.ulysses import SCENARIO

COLUMNS = [("s", "s"), ("impl", "impl"), ("median_s", "fwd+bwd median s"), ("min_s", "min s"),
           ("overhead_s", "overhead s (median)"), ("overhead_vs_ds", "heddle/DS (median)"),
           ("overhead_min_s", "overhead s (min)"), ("overhead_vs_ds_min", "heddle/DS (min)"), ("bytes_sent", "bytes sent"),
           ("peak_mem_mb", "peak MB"), ("pool_mb", "pool MB"), ("max_abs_diff_vs_ds", "max |diff| vs DS")]


def main(argv=None):
    options, rank, world = script_setup(__doc__, [SCENARIO.add_options], argv, warmup=1, trials=7)
    rows = SCENARIO.run(BenchContext(rank, world), options)
    if rank == 0:
        print_rows("ulysses", rows, COLUMNS)
        if options.markdown:
            print(markdown_table(rows, COLUMNS))
        for row in rows:
            for key, stat in (("overhead_vs_ds", "medians"), ("overhead_vs_ds_min", "fastest trials")):
                if key not in row:
                    continue
                what = "comm+layout time alone" if row["impl"].endswith("comm") else "overhead over local attention"
                ratio = row[key]
                if ratio != ratio:
                    verdict = "inconclusive: DeepSpeed's overhead is not above local attention's time"
                elif ratio < 0:
                    verdict = "met, but heddle's overhead is below the timing noise (faster than local)"
                else:
                    verdict = "met" if ratio <= 0.5 else "missed"
                print(f"s={row['s']}: {row['impl']} {what} = {ratio:.2f} x DeepSpeed's ({stat}; goal <= 0.5: "
                      f"{verdict})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
