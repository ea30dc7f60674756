"""MoE layer, side by side: FSSDP vs EP (vs DeepSpeed-MoE) for real, and the paper's scale simulated.

    heddle run -n 2 benchmarks/moe.py [--skews 0,1.0,1.5] [--trials 7] [--deepspeed] [--markdown]

Runs the ``moe`` bench scenario (heddle/bench/scenarios/moe.py: what is measured and how) in
this process group, one thread per process, then (rank 0) the ``moe_sim`` cost model
(heddle/moe/cost_model.py) and prints both tables with the goals:
- skew 1.0: the most loaded rank processes <= 1.3x the mean tokens under FSSDP;
- skew 1.0: FSSDP layer time <= 0.6x EP's (real run);
- spAG bytes = lambda * (D-1) * S exactly, lambda < 1 (never a full all-gather).
"""

from __future__ import annotations

import os


from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenario import BenchContext
from heddle.bench.script import script_setup
from heddle.bench.scenarios.moe import SCENARIO
from heddle.bench.scenarios.moe_sim import SCENARIO as SIM, simulation_rows

REAL = [("skew", "skew"), ("impl", "impl"), ("median_s", "fwd+bwd median s"), ("p95_s", "p95 s"),
        ("vs_ep", "EP time / this"), ("cpu_busiest_s", "busiest rank CPU s"), ("cpu_vs_ep", "EP CPU / this"),
        ("max_over_mean", "max/mean tokens"), ("recv_MB", "recv MB (busiest)"),
        ("spag_MB", "spAG+spRS MB"), ("lambda", "lambda")]
SIMULATED = [("d_model", "d_model"), ("skew", "skew"), ("strategy", "strategy"), ("layer_ms", "layer ms"),
             ("vs_ep", "EP time / this"), ("max_over_mean", "max/mean tokens"), ("compute_s", "compute s"),
             ("a2a_s", "all-to-all s"), ("sparse_s", "exposed spAG/spRS s")]


def main(argv=None):
    options, rank, world = script_setup(__doc__, [SCENARIO.add_options, SIM.add_options], argv, warmup=2, trials=7)
    ctx = BenchContext(rank, world, None)
    rows = SCENARIO.run(ctx, options)
    if rank != 0:
        return
    load = os.getloadavg()
    print(f"moe real run: {world} processes x {options.threads} thread(s), {options.tokens} tokens/rank, "
          f"E={options.experts}, d_model={options.d_model}, d_ffn={options.d_ffn}, top-{options.top_k}; "
          f"load average {load[0]:.2f}", flush=True)
    print_rows("moe (real)", rows, REAL)
    sim = simulation_rows(options)
    print_rows("moe (simulated: 32 devices, 64 experts)", sim, SIMULATED)
    fs = next((r for r in rows if r["impl"] == "fssdp" and r["skew"] == 1.0), None)
    ep = next((r for r in rows if r["impl"] == "ep" and r["skew"] == 1.0), None)
    if fs and ep:
        print(f"goal real, skew 1.0: FSSDP max/mean {fs['max_over_mean']:.2f} (<= 1.3: "
              f"{'met' if fs['max_over_mean'] <= 1.3 else 'missed'}; EP {ep['max_over_mean']:.2f}); "
              f"FSSDP time / EP {fs['median_s'] / ep['median_s']:.2f} (<= 0.6: "
              f"{'met' if fs['median_s'] / ep['median_s'] <= 0.6 else 'missed'}); busiest-rank CPU / EP "
              f"{fs['cpu_busiest_s'] / ep['cpu_busiest_s']:.2f}; lambda {fs['lambda']:.2f}")
    for h in sorted({r["d_model"] for r in sim}):
        f = next((r for r in sim if r["d_model"] == h and r["skew"] == 1.0 and r["strategy"] == "fssdp"), None)
        e = next((r for r in sim if r["d_model"] == h and r["skew"] == 1.0 and r["strategy"] == "ep"), None)
        if f and e:
            print(f"goal sim d_model {h}, skew 1.0: FSSDP max/mean {f['max_over_mean']:.2f} (EP {e['max_over_mean']:.2f}); "
                  f"FSSDP time / EP {f['layer_s'] / e['layer_s']:.2f}")
    if options.markdown:
        print(markdown_table(rows, REAL))
        print()
        print(markdown_table(sim, SIMULATED))


if __name__ == "__main__":
    main()
