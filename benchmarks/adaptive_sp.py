"""Adaptive sequence parallelism (FlexSP), side by side: simulation, planner time, real run.

    python benchmarks/adaptive_sp.py [--batches 4] [--markdown]      # simulation + planner time
    heddle run -n 4 benchmarks/adaptive_sp.py                          # + real gloo run (rank 0 prints)

Runs the ``adaptive-sp`` bench scenario (heddle/bench/scenarios/adaptive_sp.py: what is measured
and how) and prints one table per part with the issue's goals marked met / missed:
simulation >= 1.5x over the best static degree and >= 1.2x over the best degree per batch on the
long-tailed corpora; planner p95 < 1 s at 64 devices. ``heddle bench adaptive-sp`` runs the same
code through the harness (Parquet results).
"""

from __future__ import annotations


import torch.distributed as dist

from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenario import BenchContext
from heddle.bench.script import script_setup
from heddle.bench.scenarios.adaptive_sp import SCENARIO

COLUMNS = {
    "sim": [("case", "corpus"), ("tokens_per_batch", "tokens/batch"), ("adaptive_s", "adaptive s"),
            ("best_per_batch_s", "best degree per batch s"), ("best_static_s", "best static s"),
            ("best_static_degree", "static degree"), ("deepspeed_static_s", "DeepSpeed-order static s"),
            ("speedup_vs_static", "vs static"), ("speedup_vs_per_batch", "vs per batch"),
            ("speedup_vs_deepspeed", "vs DeepSpeed-order")],
    "planner": [("devices", "devices"), ("solver", "solver"), ("seqs", "seqs"), ("median_s", "median s"), ("p95_s", "p95 s"),
                ("max_s", "max s"), ("milp_solves", "MILP solves"), ("milp_optimal", "optimal"),
                ("improved_over_greedy", "MILP beat greedy"), ("gain_over_greedy_max", "max gain"), ("trials", "trials")],
    "real": [("case", "plan"), ("within_budget", "fits memory"), ("predicted_s", "predicted s"),
             ("measured_s", "measured fwd+bwd s"), ("step_s", "step s"), ("prediction_error", "pred. error"),
             ("adaptive_speedup", "step / adaptive"), ("steps", "steps")],
}


def main(argv=None):
    options, rank, world = script_setup(__doc__, [SCENARIO.add_options], argv)
    if options.part is None:
        options.part = "sim,planner" if world == 1 else "sim,planner,real"
    rows = SCENARIO.run(BenchContext(rank, world), options)
    if rank == 0:
        for part, columns in COLUMNS.items():
            mine = [r for r in rows if r["part"] == part]
            if not mine:
                continue
            print_rows(f"adaptive-sp: {part}", mine, columns)
            if options.markdown:
                print(markdown_table(mine, columns))
        for r in rows:
            if r["part"] == "sim":
                ok = r["speedup_vs_static"] >= 1.5 and r["speedup_vs_per_batch"] >= 1.2
                print(f"sim {r['case']}: {r['speedup_vs_static']:.2f}x vs best static (goal 1.5x), "
                      f"{r['speedup_vs_per_batch']:.2f}x vs best degree per batch (goal 1.2x): "
                      f"{'met' if ok else 'missed'}")
            elif r["part"] == "planner" and r["devices"] == 64:
                print(f"planner ({r['solver']}) at 64 devices: p95 {r['p95_s']:.3f} s (goal < 1 s: "
                      f"{'met' if r['p95_s'] < 1 else 'missed'})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
