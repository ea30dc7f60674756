"""MoE layer, real run: FSSDP vs EP (and optionally DeepSpeed-MoE) under Zipf-skewed routing.

    heddle bench moe --nproc 2 --trials 7
    heddle run -n 2 benchmarks/moe.py [--skews 0,1.0,1.5] [--deepspeed]

Per skew s, one :class:`heddle.moe.MoE` layer per strategy (E=8 GELU experts 512->1024->512,
top-2, 4096 tokens per rank, fp32, dropless). Routing is controlled exactly: the router is a real
linear router whose inputs carry Gumbel noise on E features and a constant feature weighted by
log p_e, p_e proportional to 1/(e+1)^s, so each token's top-k is a draw of k distinct experts
from Zipf(s) (the Gumbel-top-k trick). Each rank has its own tokens; the routing repeats every
iteration, so FSSDP's load predictor (window 5) sees the true loads after warmup, and FSSDP
re-shards once (Algorithm 2) after the first warmup calls.

Columns: forward+backward time of the layer (median over interleaved trials, slowest rank);
``max_over_mean``: the most loaded rank's processed tokens over the mean; ``recv_MB``: bytes the
busiest rank receives per iteration (all the layer's collectives); ``cpu_busiest_s``: the
median CPU seconds (process time, all threads) of one call on the busiest rank, the critical-path
work without the noise of a shared machine (``cpu_vs_ep``: EP's / this); ``spag_MB``: spAG + spRS bytes
(whole group), with ``lambda`` = spAG chunks moved / (E * (D-1)) (1.0 would be a full
all-gather); ``vs_ep`` = EP's time / this time at the same skew.
Overlap cases (skew 1.0) put a dense 4-projection "attention" (forward + backward) before the
layer: ``+attn`` issues the spAG after it, ``+attn+prefetch`` before it (async), as the Trainer
plugin does.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.bench.scenario import BenchContext, Scenario, summarize
from heddle.dist import CommLedger
from heddle.moe import MoE, reshard


def zipf_router_inputs(tokens: int, d_model: int, num_experts: int, skew: float, seed: int):
    """(x [tokens, d_model], router weight [E, d_model]) whose top-k routing samples Zipf(skew)."""
    if d_model < num_experts + 1:
        raise ValueError(f"d_model={d_model} must exceed num_experts={num_experts} to encode the routing")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=g) * 0.1
    x[:, 0] = 1.0
    u = torch.rand(tokens, num_experts, generator=g).clamp_(1e-9, 1 - 1e-9)
    x[:, 1:num_experts + 1] = -torch.log(-torch.log(u))            # Gumbel(0, 1)
    w = torch.zeros(num_experts, d_model)
    w[:, 0] = torch.tensor([-skew * math.log(e + 1) for e in range(num_experts)])
    w[:, 1:num_experts + 1] = torch.eye(num_experts)
    return x, w


class MoEScenario(Scenario):
    name = "moe"
    help = "MoE layer fwd+bwd: FSSDP vs EP (vs DeepSpeed-MoE) at Zipf skew 0 / 1.0 / 1.5"
    min_procs = 2
    quick_args = ["--tokens", "1024", "--skews", "1.0"]

    def add_options(self, parser) -> None:
        g = parser.add_argument_group("moe")
        g.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
        g.add_argument("--d-model", type=int, default=512)
        g.add_argument("--d-ffn", type=int, default=1024)
        g.add_argument("--experts", type=int, default=8)
        g.add_argument("--top-k", type=int, default=2)
        g.add_argument("--skews", default="0,1.0,1.5", help="comma-separated Zipf skews")
        g.add_argument("--no-overlap-cases", action="store_true", help="skip the +attn / +prefetch cases")
        g.add_argument("--deepspeed", action="store_true", help="add DeepSpeed-MoE (EP, capacity 1.25) as a peer")

    def cases(self, options) -> list[dict]:
        out = []
        for s in [float(v) for v in options.skews.split(",")]:
            out += [dict(skew=s, impl="ep"), dict(skew=s, impl="fssdp")]
            if options.deepspeed:
                out.append(dict(skew=s, impl="deepspeed"))
        if not options.no_overlap_cases:
            out += [dict(skew=1.0, impl=f"{impl}+attn") for impl in ("ep", "fssdp")]
            out.append(dict(skew=1.0, impl="fssdp+attn+prefetch"))
        return out

    # -- one case ----------------------------------------------------------------------------
    def setup(self, ctx: BenchContext, options, case: dict) -> None:
        x, w = zipf_router_inputs(options.tokens, options.d_model, options.experts, case["skew"],
                                  seed=1000 + ctx.rank)
        case["_x"] = x.requires_grad_(True)
        case["_grad"] = torch.randn(options.tokens, options.d_model, generator=torch.Generator().manual_seed(ctx.rank))
        impl = case["impl"].split("+")[0]
        if "attn" in case["impl"]:
            g = torch.Generator().manual_seed(7)
            case["_attn"] = [torch.nn.Linear(options.d_model, options.d_model, bias=False) for _ in range(4)]
            for lin in case["_attn"]:
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.02)
        if impl == "deepspeed":
            case["_layer"] = _deepspeed_layer(options, w)
            return
        layer = MoE(options.d_model, options.d_ffn, options.experts, options.top_k, strategy=impl,
                    activation="gelu", seed=0, group=ctx.group)
        with torch.no_grad():
            layer.router.weight.copy_(w)
        case["_layer"] = layer
        for i in range(options.warmup + 2):
            self.step(ctx, options, case)
            if impl == "fssdp" and i == 1:
                reshard([layer])

    def step(self, ctx: BenchContext, options, case: dict) -> None:
        layer, x = case["_layer"], case["_x"]
        if "attn" in case["impl"]:
            if "prefetch" in case["impl"]:
                layer.prefetch()
            h = x
            for lin in case["_attn"]:
                h = lin(h)
            x = x + h
        if case["impl"] == "deepspeed":
            y, aux, _ = layer(x.unsqueeze(0))
            y = y.squeeze(0)
        else:
            y, aux = layer(x)
        (y * case["_grad"]).sum().add(aux).backward()

    def metrics(self, ctx: BenchContext, options, case: dict, times: list[float]) -> dict:
        if case["impl"] == "deepspeed":
            return {}
        layer = case["_layer"]
        with CommLedger() as ledger:
            self.step(ctx, options, case)
        stats = torch.tensor([float(ledger.bytes_received()),
                              float(ledger.bytes_received("recv", tag="moe"))], dtype=torch.float64)
        total = stats.clone()
        hd.all_reduce(stats, op=dist.ReduceOp.MAX, group=ctx.group)
        hd.all_reduce(total, group=ctx.group)
        extra = sum(len(t) - 1 for t in layer.last_target)
        return {"max_over_mean": layer.last_stats["max_over_mean"], "recv_MB": float(stats[0]) / 1e6,
                "spag_MB": float(total[1]) / 1e6, "layer_MB": options.experts * layer.expert_numel * 4 / 1e6,
                "lambda": extra / (options.experts * max(ctx.world_size - 1, 1))}

    def run(self, ctx: BenchContext, options) -> list[dict]:
        """Cases interleaved (one trial of each per round) so load drift hits all alike."""
        cases = self.cases(options)
        for case in cases:
            ctx.log(f"moe: setup {case['impl']} skew {case['skew']}")
            self.setup(ctx, options, case)
        times = {i: [] for i in range(len(cases))}
        cpu = {i: [] for i in range(len(cases))}
        for _ in range(options.trials):
            for i, case in enumerate(cases):
                def call(i=i, case=case):
                    start = time.process_time()
                    self.step(ctx, options, case)
                    cpu[i].append(time.process_time() - start)
                times[i].append(ctx.timed(call))
        rows = []
        for i, case in enumerate(cases):
            row = {"scenario": self.name, "skew": case["skew"], "impl": case["impl"], **summarize(times[i])}
            busiest = torch.tensor([sorted(cpu[i])[len(cpu[i]) // 2]], dtype=torch.float64)
            hd.all_reduce(busiest, op=dist.ReduceOp.MAX, group=ctx.group)
            row["cpu_busiest_s"] = float(busiest)
            row.update(self.metrics(ctx, options, case, times[i]))
            rows.append(row)
        for row in rows:
            ep = next(r for r in rows if r["skew"] == row["skew"] and r["impl"] == "ep")
            base = next((r for r in rows if r["impl"] == "ep+attn"), ep) if "attn" in row["impl"] else ep
            row["vs_ep"] = base["median_s"] / row["median_s"]
            row["cpu_vs_ep"] = base["cpu_busiest_s"] / row["cpu_busiest_s"]
        return rows


def _deepspeed_layer(options, router_weight):
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    if not getattr(_deepspeed_layer, "initialized", False):
        deepspeed.init_distributed(dist_backend="gloo")
        _deepspeed_layer.initialized = True
    expert = torch.nn.Sequential(torch.nn.Linear(options.d_model, options.d_ffn, bias=False), torch.nn.GELU(),
                                 torch.nn.Linear(options.d_ffn, options.d_model, bias=False))
    layer = DeepSpeedMoE(hidden_size=options.d_model, expert=expert, num_experts=options.experts,
                         ep_size=dist.get_world_size(), k=options.top_k, capacity_factor=1.25,
                         drop_tokens=True, use_rts=False)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(router_weight)
    return layer


SCENARIO = MoEScenario()
