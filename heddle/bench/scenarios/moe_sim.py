"""MoE at the paper's scale, simulated with :mod:`heddle.moe.cost_model` (one process).

    heddle bench moe_sim

32 devices, 64 experts, d_model 1024 and 2048 (d_ffn = 2 d_model), top-2, 4096 tokens per device,
bf16, Zipf skew 0 / 1.0 / 1.5, A100-class device (125 TFLOP/s achieved, 50 GB/s): predicted layer
time (forward + backward) of EP, FSSDP and FSDP over experts, the most loaded device over the
mean, and ``vs_ep`` = EP's time / this time. The plans are heddle.moe.placement's own.
"""

from __future__ import annotations

from heddle.bench.scenario import BenchContext, Scenario
from heddle.moe.cost_model import simulate


class MoESimScenario(Scenario):
    name = "moe_sim"
    help = "MoE layer at 32 devices / 64 experts: EP vs FSSDP vs FSDP (cost model)"
    single_process = True
    quick_args = ["--sim-d-models", "1024", "--sim-skews", "1.0"]

    def add_options(self, parser) -> None:
        g = parser.add_argument_group("moe_sim")
        g.add_argument("--sim-devices", type=int, default=32)
        g.add_argument("--sim-experts", type=int, default=64)
        g.add_argument("--sim-d-models", default="1024,2048")
        g.add_argument("--sim-skews", default="0,1.0,1.5")
        g.add_argument("--sim-tokens", type=int, default=4096)

    def run(self, ctx: BenchContext, options) -> list[dict]:
        return simulation_rows(options)


def simulation_rows(options) -> list[dict]:
    rows = []
    for h in [int(v) for v in options.sim_d_models.split(",")]:
        for s in [float(v) for v in options.sim_skews.split(",")]:
            sim = simulate(num_devices=options.sim_devices, num_experts=options.sim_experts, d_model=h,
                           skew=s, tokens=options.sim_tokens)
            ep = next(r for r in sim if r["strategy"] == "ep")["layer_s"]
            for r in sim:
                rows.append({"scenario": "moe_sim", **r, "layer_ms": r["layer_s"] * 1e3,
                             "vs_ep": ep / r["layer_s"]})
    return rows


SCENARIO = MoESimScenario()
