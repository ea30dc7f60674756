"""Adaptive sequence parallelism (FlexSP): simulation, planner time, and a real gloo run.

    heddle bench adaptive-sp                      # simulation + planner time (one process)
    heddle bench adaptive-sp --nproc 4            # real run: adaptive vs static SP=4 vs SP=1
    python benchmarks/adaptive_sp.py              # the same as a script that prints tables

Parts (``--part``, default: sim,planner on one process, real on several):
- ``sim``: preset cost model (default a100-80g-ib), 64 devices, global batches of 512 sequences
  from each generated corpus (context up to 192K). Predicted step time of the adaptive plan vs the
  best static Ulysses degree (one degree for every batch) vs the best single degree chosen per
  batch, both priced generously: the sequences are balanced over the groups by work (LPT) and
  each group accumulates its micro-batches without barriers, exactly like the planner's lanes.
  ``deepspeed_*``: the static degree with DeepSpeed/Megatron data parallelism (equal sequence
  counts per group in sampler order), what a static-SP framework does today.
- ``planner``: wall time of ``plan_batch`` (default settings) at 64 and 256 devices, 512 sequences.
- ``real``: the example GPT on variable-length byte documents over the launched processes, cost
  model calibrated here; measured time of the planned micro-batches (forward+backward) and of the
  whole step for adaptive / static SP=world / static SP=1, and the cost model's prediction error.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from heddle.bench.scenario import BenchContext, Scenario, summarize
from heddle.data import sample_lengths
from heddle.sequence.adaptive import CostModel, plan_batch
from heddle.sequence.adaptive.greedy import assignment_time, homogeneous_lpt
from heddle.sequence.adaptive.planner import allowed_degrees


def static_time(lengths, num_devices: int, cm: CostModel, degree: int, capacity: int, *,
                balanced: bool = True) -> float:
    """One degree everywhere: N/d lanes, each running its sequences in memory-bounded
    micro-batches (:func:`split_lane`) without barriers. ``balanced``: longest work first onto the
    least-loaded lane (exactly the planner's homogeneous baseline; better than any static-SP
    framework balances today); else DeepSpeed/Megatron data parallelism: equal numbers of
    sequences per group in sampler order. inf if a sequence does not fit."""
    idx = list(range(len(lengths)))
    if balanced:
        lanes = homogeneous_lpt(idx, lengths, num_devices, cm, degree, capacity)
    elif all(s <= degree * capacity for s in lengths):
        groups = num_devices // degree
        lanes = [(degree, [k for k in idx if k * groups // len(lengths) == g]) for g in range(groups)]
    else:
        lanes = None
    return float("inf") if lanes is None else assignment_time(lanes, lengths, cm, capacity)


def simulate(kind: str, *, preset: str = "a100-80g-ib", devices: int = 64, seqs: int = 512, batches: int = 4,
             max_len: int = 192 * 1024, seed: int = 0, time_limit: float = 0.5) -> dict:
    cm = CostModel.preset(preset)
    cap = cm.token_capacity
    pool = allowed_degrees(devices, cm)
    lengths = sample_lengths(kind, seqs * batches, max_len=max_len, seed=seed).reshape(batches, seqs)
    adaptive, per_batch = [], []
    static, naive = {d: 0.0 for d in pool}, {d: 0.0 for d in pool}
    for b in range(batches):
        ls = lengths[b].tolist()
        plan = plan_batch(ls, devices, cm, time_limit=time_limit)
        adaptive.append(plan.predicted_time)
        times = {d: static_time(ls, devices, cm, d, cap) for d in pool}
        for d in pool:
            static[d] += times[d]
            naive[d] += static_time(ls, devices, cm, d, cap, balanced=False)
        per_batch.append(min(times.values()))
    best_static = min(static, key=static.get)
    best_naive = min(naive, key=naive.get)
    t_ad, t_pb, t_st, t_nv = sum(adaptive), sum(per_batch), static[best_static], naive[best_naive]
    return {"part": "sim", "case": kind, "preset": preset, "devices": devices, "seqs": seqs, "batches": batches,
            "max_len": max_len, "tokens_per_batch": float(lengths.sum() / batches),
            "adaptive_s": t_ad / batches, "best_per_batch_s": t_pb / batches, "best_static_s": t_st / batches,
            "best_static_degree": best_static, "deepspeed_static_s": t_nv / batches, "deepspeed_degree": best_naive,
            "speedup_vs_static": t_st / t_ad, "speedup_vs_per_batch": t_pb / t_ad,
            "speedup_vs_deepspeed": t_nv / t_ad}


def planner_times(devices: int, *, seqs: int = 512, trials: int = 10, kind: str = "code", seed: int = 100,
                  preset: str = "a100-80g-ib", time_limit: float = 0.5, solver: str = "milp") -> dict:
    cm = CostModel.preset(preset)
    times, statuses, mbs, gains = [], [], [], []
    for t in range(trials):
        lengths = sample_lengths(kind, seqs, seed=seed + t).tolist()
        start = time.perf_counter()
        plan = plan_batch(lengths, devices, cm, time_limit=time_limit, solver=solver)
        times.append(time.perf_counter() - start)
        statuses.append(plan.status)
        mbs.append(len(plan.micro_batches))
        if solver == "milp":  # what the MILP bought over the greedy plan alone
            greedy = plan_batch(lengths, devices, cm, solver="greedy").predicted_time
            gains.append(greedy / plan.predicted_time)
    s = summarize(times)
    optimal = sum(x == "optimal" for x in statuses)
    return {"part": "planner", "case": f"{devices} devices {solver}", "devices": devices, "seqs": seqs,
            "solver": solver, "time_limit": time_limit, **s,
            "milp_solves": sum(x not in ("greedy", "skipped") for x in statuses), "milp_optimal": optimal,
            "micro_batches_mean": float(np.mean(mbs)),
            "gain_over_greedy_max": float(max(gains)) if gains else float("nan"),
            "improved_over_greedy": sum(g > 1 + 1e-9 for g in gains)}


def _max(values: list[float], world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def real_run(ctx: BenchContext, options) -> list[dict]:
    """Adaptive vs static SP=world vs static SP=1 on the example GPT, every rank of the job."""
    from heddle.data import ByteCorpus
    from heddle.models import GPT, GPTConfig
    from heddle.sequence.adaptive.background import BackgroundPlanner
    from heddle.sequence.adaptive.executor import AdaptiveExecutor

    world = ctx.world_size
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=options.real_max_len))
    executor = AdaptiveExecutor(model)
    cm = CostModel.calibrate(model, executor.pool, lengths=(128, 256, 512, 1024))
    cap = options.real_capacity
    corpus = ByteCorpus.stdlib().train
    cases = {"adaptive": {}, f"static-sp{world}": {"degrees": (world,)}, "static-sp1": {"degrees": (1,)}}
    planners = {name: BackgroundPlanner(world, cm, time_limit=options.time_limit, **kw) for name, kw in cases.items()}
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    fits = {name: True for name in cases}
    for step in range(options.real_steps + 1):
        lengths = sample_lengths("code", options.real_docs, max_len=options.real_max_len, seed=step)
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(corpus) - options.real_max_len - 2, (len(lengths),), generator=g)
        docs = [corpus[int(a):int(a) + int(n) + 1].long() for a, n in zip(starts, lengths)]
        for name, kw in cases.items():
            # SP=1 only fits when every document fits one device: else it runs over the budget
            budget = cap if name != "static-sp1" or lengths.max() <= cap else int(lengths.max())
            fits[name] &= budget == cap
            planners[name].plan_kwargs["max_tokens_per_device"] = budget
            planners[name].submit(lengths.tolist())
            plan = planners[name].result()
            model.zero_grad(set_to_none=True)
            ctx.barrier()
            t0 = time.perf_counter()
            executor.run(plan, docs)
            t1 = time.perf_counter()
            ctx.barrier()
            t2 = time.perf_counter()
            executor.reduce_gradients()
            t3 = time.perf_counter()
            compute, step_time = _max([t1 - t0, (t2 - t0) + (t3 - t2)], world)
            if step:  # step 0 warms up
                samples[name].append((plan.predicted_time, compute, step_time))
    for p in planners.values():
        p.close()
    rows = []
    for name, got in samples.items():
        pred, comp, full = (np.array(x) for x in zip(*got))
        rows.append({"part": "real", "case": name, "world": world, "capacity": cap, "within_budget": fits[name],
                     "predicted_s": float(np.median(pred)), "measured_s": float(np.median(comp)),
                     "step_s": float(np.median(full)),
                     "prediction_error": float(np.mean(np.abs(pred - comp) / comp)), "steps": len(got)})
    base = next(r for r in rows if r["case"] == "adaptive")["step_s"]
    for r in rows:
        r["adaptive_speedup"] = r["step_s"] / base
    return rows


class AdaptiveSPScenario(Scenario):
    name = "adaptive-sp"
    help = "FlexSP adaptive SP: simulated speedup (a100 preset), planner time, real gloo run"
    quick_args = ["--part", "sim,planner", "--batches", "1", "--planner-trials", "3", "--kinds", "code"]

    def add_options(self, parser):
        g = parser.add_argument_group("adaptive-sp")
        g.add_argument("--part", default=None, help="comma list of sim, planner, real (default: by process count)")
        g.add_argument("--preset", default="a100-80g-ib")
        g.add_argument("--kinds", default="code,web,encyclopedia")
        g.add_argument("--devices", type=int, default=64)
        g.add_argument("--seqs", type=int, default=512)
        g.add_argument("--batches", type=int, default=4)
        g.add_argument("--max-len", type=int, default=192 * 1024)
        g.add_argument("--time-limit", type=float, default=0.5)
        g.add_argument("--planner-devices", default="64,256")
        g.add_argument("--planner-trials", type=int, default=10)
        g.add_argument("--real-steps", type=int, default=6)
        g.add_argument("--real-docs", type=int, default=16, help="documents per global batch (real run)")
        g.add_argument("--real-max-len", type=int, default=2048)
        g.add_argument("--real-capacity", type=int, default=1024, help="emulated activation tokens per device")

    def run(self, ctx: BenchContext, options) -> list[dict]:
        parts = (options.part or ("sim,planner" if ctx.world_size == 1 else "real")).split(",")
        bad = set(parts) - {"sim", "planner", "real"}
        if bad:
            raise ValueError(f"--part {options.part!r}: unknown {sorted(bad)}; valid: sim, planner, real")
        rows = []
        if "sim" in parts and ctx.rank == 0:
            for kind in options.kinds.split(","):
                rows.append({"scenario": self.name, **simulate(
                    kind, preset=options.preset, devices=options.devices, seqs=options.seqs,
                    batches=options.batches, max_len=options.max_len, time_limit=options.time_limit)})
                ctx.log(f"sim {kind}: {rows[-1]['speedup_vs_static']:.2f}x vs static, "
                        f"{rows[-1]['speedup_vs_per_batch']:.2f}x vs per-batch") if hasattr(ctx, "log") else None
        if "planner" in parts and ctx.rank == 0:
            for n in (int(x) for x in options.planner_devices.split(",")):
                for solver in ("milp", "greedy"):
                    rows.append({"scenario": self.name, **planner_times(
                        n, seqs=options.seqs, trials=options.planner_trials, preset=options.preset,
                        time_limit=options.time_limit, solver=solver)})
        if "real" in parts:
            rows += [{"scenario": self.name, **r} for r in real_run(ctx, options)]
        return rows


SCENARIO = AdaptiveSPScenario()
