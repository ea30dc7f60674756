"""Cross-node benchmarks on `heddle cluster`: 2 emulated nodes joined by a tbf-shaped link.

    python benchmarks/cluster.py [--rates 1gbit,10gbit,25gbit] [--nproc-per-node 1]
        [--parts link,compression,fsdp,moe,ulysses,adaptive] [--steps 40] [--seeds 3] [--tiny]
        [--out bench-results]      # then: heddle bench report bench-results

For each link rate one cluster (heddle.cluster.Cluster: network namespaces, veth + tbf) runs this
file as the worker (``--worker``) on every node, all parts side by side in one run:

- link: the ceiling tbf holds here: a 16 MB all-reduce across the nodes, busbw in Gbit/s.
- compression: the example GPT (examples/train_lm.py defaults: d_model 128, 4 layers, 4 heads,
  seq 128, global batch 24, AdamW 3e-3, clip 1) through heddle.Trainer under DDP: fp32 (``--seeds``
  seeds: the spread), quantize:4+EControl (+L-GreCo), top-k 1% + EF, PowerSGD rank 4, and
  quantize:4+EControl with the blocking hook. Per config: steps/s over the compressed steps,
  backward+sync s per step (``Trainer.backward``: DDP's hook runs inside it), time to reach the
  fp32 seed-0 final loss, validation loss against fp32's [min, max] over seeds.
- fsdp: the same GPT under FSDP2 (Trainer ``data_parallel="fsdp"``): plain, compressed
  reduce-scatter (quantize:4+EControl, top-k+EF), and the 8-bit quantized all-gather.
- moe: the ``moe`` bench scenario (EP vs FSSDP, Zipf 1.0, experts spread over both nodes).
- ulysses: the ``ulysses`` scenario (heddle, heddle with head-chunk overlap, DeepSpeed
  DistributedAttention) on an SP group across the nodes, and inside a node with 2 procs per node.
- adaptive: heddle.cluster.sp_calibration (helper E's): planner calibrated on the cluster, adaptive
  vs static SP, measured and predicted.

Rows go to ``--out`` (Parquet, scenario "cross-node"), every row naming its link rate, the measured
ceiling, nodes x processes, CPU and load average. Goals are printed met / missed with the number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.abspath(__file__)
GPT_MODEL = dict(d_model=128, n_layers=4, n_heads=4, max_seq_len=128)
SEQ, BATCH, WARMUP = 128, 24, 5
DDP_CONFIGS = {
    "fp32": None,
    "quantize:4+econtrol": {"compressor": "quantize:4", "feedback": "econtrol"},
    "quantize:4+econtrol+lgreco": {"compressor": "quantize:4", "feedback": "econtrol", "lgreco": True},
    "topk:0.01+ef": {"compressor": "topk:0.01", "feedback": "ef"},
    "powersgd:4+ef": {"compressor": "powersgd:4", "feedback": "ef"},
    "quantize:4+econtrol blocking hook": {"compressor": "quantize:4", "feedback": "econtrol"},
}
FSDP_CONFIGS = {"fsdp fp32": None,
                "fsdp quantize:4+econtrol": {"compressor": "quantize:4", "feedback": "econtrol"},
                "fsdp topk:0.01+ef": {"compressor": "topk:0.01", "feedback": "ef"},
                "fsdp 8-bit all-gather": "qag"}


# -- worker side (runs on every rank inside the cluster) ----------------------------------------
def _link_rows(rank, world):
    import torch
    import torch.distributed as dist
    t = torch.ones(4 * 2 ** 20)   # 16 MB
    dist.all_reduce(t)
    times = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    s = min(times)
    busbw = 2 * (world - 1) / world * t.numel() * 4 * 8 / s / 1e9
    return [{"part": "link", "config": "16 MB all-reduce", "time_s": s, "busbw_gbit": busbw}]


def _train(name, section, seed, steps, *, fsdp=False, tiny=False):
    import torch
    import torch.nn.functional as F

    import heddle
    from heddle.bench.scenarios._compression_train import corpus
    from heddle.data import WindowSampler
    from heddle.models import GPT, GPTConfig
    model_cfg = dict(GPT_MODEL, d_model=32, n_layers=1) if tiny else GPT_MODEL
    qag = section == "qag"
    if isinstance(section, dict):
        section = dict(section, start_iter=WARMUP, retune_every=max(steps // 2, 1), sample_steps=WARMUP, seed=seed)
    else:
        section = None
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_cfg))
    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0),
                             config=heddle.TrainerConfig(max_grad_norm=1.0, progress=False, compression=section,
                                                         data_parallel="fsdp" if fsdp else "ddp"))
    if qag:
        from heddle.compress.fsdp import QuantizedAllGather
        gather = QuantizedAllGather(8)
        for m in trainer.fsdp_modules:
            m.set_custom_all_gather(gather)
    if "blocking" in name:
        trainer.plugin("compression").comp.overlap = False
    rank, world = trainer.layout.dp_rank, trainer.layout.dp_size
    sampler = WindowSampler(corpus().train, SEQ, BATCH, seed=seed, dp_rank=rank, dp_size=world)
    losses, step_s, back_s, sent, t_total = [], [], [], [], []
    elapsed = 0.0
    for step in range(steps):
        x, y = sampler.next()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        loss = F.cross_entropy(trainer.model(x).flatten(0, 1), y.flatten(), reduction="sum")
        t1 = time.perf_counter()
        trainer.backward(loss, num_tokens=y.numel())
        t2 = time.perf_counter()
        m = trainer.step()
        t3 = time.perf_counter()
        elapsed += t3 - t0
        losses.append(m["loss"])
        t_total.append(elapsed)
        if step >= WARMUP:
            step_s.append(t3 - t0)
            back_s.append(t2 - t1)
            sent.append(m.get("bytes_sent", 0.0))
    from heddle.bench.scenarios._compression_train import _val_loss
    val = _val_loss(model)   # FSDP2: every rank runs it (the forward all-gathers the parameters)
    trainer.close()
    times = torch.tensor([statistics.median(step_s), statistics.median(back_s)], dtype=torch.float64)
    torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)   # the slowest rank
    return {"part": "fsdp" if fsdp else "compression", "config": name, "seed": seed, "steps": steps,
            "step_s": float(times[0]), "steps_per_s": 1.0 / float(times[0]), "backward_sync_s": float(times[1]),
            "bytes_sent_per_step": statistics.mean(sent), "val_loss": val,
            "final_loss": statistics.mean(losses[-max(1, steps // 10):]), "curve": losses, "elapsed": t_total}


def _time_to(row, target):
    """Wall time until the 5-step running mean of the loss first reaches ``target``."""
    curve, elapsed = row["curve"], row["elapsed"]
    for i in range(4, len(curve)):
        if statistics.mean(curve[i - 4:i + 1]) <= target:
            return elapsed[i]
    return None


def _compression_rows(options, fsdp=False):
    rows = []
    configs = FSDP_CONFIGS if fsdp else DDP_CONFIGS
    for name, section in configs.items():
        seeds = options.seeds if name in ("fp32", "fsdp fp32") else 1
        for seed in range(seeds):
            rows.append(_train(name, section, seed, options.steps, fsdp=fsdp, tiny=options.tiny))
    base = [r for r in rows if r["config"] in ("fp32", "fsdp fp32")]
    target = base[0]["final_loss"]
    spread = (min(r["val_loss"] for r in base), max(r["val_loss"] for r in base))
    ref = next(r for r in base if r["seed"] == 0)
    for r in rows:
        r["speedup_vs_fp32"] = r["steps_per_s"] / ref["steps_per_s"]
        r["backward_sync_vs_fp32"] = ref["backward_sync_s"] / r["backward_sync_s"]
        r["time_to_target_s"] = _time_to(r, target)
        r["target_loss"] = target
        r["fp32_val_min"], r["fp32_val_max"] = spread
        r["val_in_spread"] = spread[0] - 1e-9 <= r["val_loss"] <= spread[1] + 1e-9 if len(base) > 1 else None
        r["curve"] = json.dumps([round(v, 4) for v in r["curve"]])
        r.pop("elapsed")
    return rows


HOOK_CASES = [("ddp fp32", None, None), ("quantize:4+econtrol overlapped", "quantize", True),
              ("quantize:4+econtrol blocking", "quantize", False), ("topk:0.01+ef overlapped", "topk", True),
              ("topk:0.01+ef blocking", "topk", False), ("powersgd:4+ef overlapped", "powersgd", True),
              ("powersgd:4+ef blocking", "powersgd", False)]


def _hook_rows(options):
    """Backward+sync time of the compressed DDP hook vs plain DDP, cases interleaved step by step
    (one round = one step of every case on the same batch), so load drift hits all alike."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from heddle.bench.scenarios._compression_train import corpus
    from heddle.compress import EControl, ErrorFeedback, GradientCompression, PowerSGD, Quantize, TopK
    from heddle.data import WindowSampler
    from heddle.models import GPT, GPTConfig
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model_cfg = dict(GPT_MODEL, d_model=32, n_layers=1) if options.tiny else GPT_MODEL
    cases = []
    for name, kind, overlap in HOOK_CASES:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**model_cfg))
        ddp = DDP(model)
        if kind is not None:
            compressor, feedback = {"quantize": (Quantize(4), EControl(0.05)), "topk": (TopK(0.01), ErrorFeedback()),
                                    "powersgd": (PowerSGD(4), ErrorFeedback())}[kind]
            comp = GradientCompression(compressor, feedback=feedback, start_iter=2, overlap=overlap).bind(model)
            ddp.register_comm_hook(comp, comp.hook)
        cases.append((name, ddp))
    sampler = WindowSampler(corpus().train, SEQ, BATCH, seed=0, dp_rank=rank, dp_size=world)
    times = {name: [] for name, _ in cases}
    rounds = 3 if options.tiny else 12
    for step in range(rounds + 3):
        x, y = sampler.next()
        for name, ddp in cases:
            loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
            torch.distributed.barrier()
            t0 = time.perf_counter()
            loss.backward()
            elapsed = time.perf_counter() - t0
            ddp.zero_grad(set_to_none=True)
            if step >= 3:
                times[name].append(elapsed)
    rows = []
    for name, _ in cases:
        t = torch.tensor([statistics.median(times[name])], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        rows.append({"part": "hook", "config": name, "backward_sync_s": float(t), "rounds": rounds})
    base = rows[0]["backward_sync_s"]
    for r in rows:
        r["vs_ddp"] = r["backward_sync_s"] / base
    return rows


def _scenario_rows(module, argv, ctx):
    import importlib
    scenario = importlib.import_module(f"heddle.bench.scenarios.{module}").SCENARIO
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3)
    scenario.add_options(parser)
    return scenario.run(ctx, parser.parse_args(argv))


def _ulysses_rows(options, rank, world):
    import torch.distributed as dist

    from heddle.bench.scenario import BenchContext
    argv = ["--seq-lens", "512" if options.tiny else "4096", "--heads", "8", "--head-dim", "64"]
    # tiny (the make-test check): no DeepSpeed case (its first use JIT-builds a comm op: minutes)
    argv += ["--trials", "1", "--no-deepspeed"] if options.tiny else ["--trials", "5"]
    layouts = {"across nodes": [list(range(i, world, options.nproc_per_node)) for i in range(options.nproc_per_node)]}
    if options.nproc_per_node > 1:
        layouts["inside a node"] = [list(range(n * options.nproc_per_node, (n + 1) * options.nproc_per_node))
                                    for n in range(world // options.nproc_per_node)]
    rows = []
    for label, groups in layouts.items():
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine, my_ranks = g, ranks
        ctx = BenchContext(my_ranks.index(rank), len(my_ranks), mine)
        for r in _scenario_rows("ulysses", argv, ctx):
            rows.append(dict(r, part="ulysses", config=f"{r.get('impl')} ({label})", sp_layout=label,
                             reporter=my_ranks[0]))
    return [r for r in rows if r["reporter"] == 0]


def _wire_bytes() -> int:
    """Bytes this node sent on its links (not loopback): /proc/net/dev inside the node's netns."""
    total = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, data = line.split(":", 1)
            if name.strip() != "lo":
                total += int(data.split()[8])
    return total


def _with_wire_check(part, fn, rank, world, nproc_per_node):
    """Run ``fn`` under a CommLedger; with one process per node, also count what crossed the
    link (the node's tx bytes) and add a row comparing the two."""
    import torch
    import torch.distributed as dist

    import heddle.dist as hd
    dist.barrier()
    wire0 = _wire_bytes()
    with hd.CommLedger() as ledger:
        rows = fn()
    dist.barrier()
    wire = _wire_bytes() - wire0
    counts = torch.tensor([float(ledger.bytes_sent()), float(wire)], dtype=torch.float64)
    dist.all_reduce(counts)   # over both nodes
    if nproc_per_node == 1:
        rows.append({"part": part, "config": "bytes: link vs ledger", "ledger_MB": float(counts[0]) / 1e6,
                     "wire_MB": float(counts[1]) / 1e6, "wire_over_ledger": float(counts[1] / counts[0])})
    return rows


def worker(options) -> None:
    import torch
    import torch.distributed as dist

    import heddle
    from heddle.bench.scenario import BenchContext
    torch.set_num_threads(1)
    heddle.init_distributed(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    parts = options.parts.split(",")
    for part in parts:
        t0 = time.perf_counter()
        if part == "link":
            rows += _link_rows(rank, world)
        elif part == "compression":
            rows += _with_wire_check("compression", lambda: _compression_rows(options), rank, world,
                                     options.nproc_per_node)
        elif part == "hook":
            rows += _hook_rows(options)
        elif part == "fsdp":
            rows += _compression_rows(options, fsdp=True)
        elif part == "moe":
            argv = ["--skews", "1.0", "--no-overlap-cases", "--trials", "1" if options.tiny else "5"]
            argv += ["--tokens", "256", "--d-model", "64", "--d-ffn", "128"] if options.tiny else []
            rows += _with_wire_check("moe", lambda: [dict(r, part="moe", config=r.get("impl")) for r in
                                     _scenario_rows("moe", argv, BenchContext(rank, world, None))],
                                     rank, world, options.nproc_per_node)
        elif part == "ulysses":
            rows += _ulysses_rows(options, rank, world)
        if rank == 0:
            print(f"[cluster bench] {part}: {time.perf_counter() - t0:.1f} s", flush=True)
    if rank == 0:
        with open(options.result, "w") as f:
            json.dump(rows, f, default=float)


# -- driver side (runs on the host, starts one cluster per rate) ---------------------------------
def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {os.cpu_count()} cores"


def _adaptive_rows(data: dict) -> list[dict]:
    """sp_calibration's JSON -> one row per case (predicted and measured step time)."""
    cases = data.get("cases", {})
    static = next((c for name, c in cases.items() if name.startswith("static")), None)
    rows = []
    for name, c in cases.items():
        rows.append({"part": "adaptive", "config": name, "predicted_s": c["predicted_s"], "measured_s": c["measured_s"],
                     "prediction_error": c["error"], "steps": c.get("steps"),
                     "speedup_vs_static": static["measured_s"] / c["measured_s"] if static else None,
                     "calibration": json.dumps({k: v for k, v in data.items() if k != "cases"}, default=float)})
    return rows


def run_rate(options, rate: str) -> list[dict]:
    from heddle.cluster import Cluster
    worker_parts = [p for p in options.parts.split(",") if p != "adaptive"]
    rows = []
    with Cluster(nodes=2, nproc_per_node=options.nproc_per_node, rate=rate) as cluster:
        load = os.getloadavg()[0]
        if worker_parts:
            result = os.path.join(cluster.shared_dir, "rows.json")
            argv = [HERE, "--worker", "--parts", ",".join(worker_parts), "--steps", str(options.steps),
                    "--seeds", str(options.seeds), "--nproc-per-node", str(options.nproc_per_node),
                    "--result", result] + (["--tiny"] if options.tiny else [])
            res = cluster.run(argv, timeout=options.timeout)
            if not res.ok:
                raise RuntimeError(f"cluster run at {rate} failed: {res.returncodes}\n{res.log_text()[-6000:]}")
            with open(result) as f:
                rows += json.load(f)
        if "adaptive" in options.parts.split(","):
            out = os.path.join(cluster.shared_dir, "adaptive.json")
            argv = ["-m", "heddle.cluster.sp_calibration", "--json", out]
            argv += ["--steps", "1", "--docs", "4", "--max-len", "256", "--capacity", "256"] if options.tiny else []
            res = cluster.run(argv, timeout=options.timeout)
            if res.ok and os.path.exists(out):
                with open(out) as f:
                    data = json.load(f)
                rows += _adaptive_rows(data)
            else:
                rows.append({"part": "adaptive", "config": "sp_calibration failed", "error": res.log_text()[-500:]})
    ceiling = next((r["busbw_gbit"] for r in rows if r["part"] == "link"), None)
    for r in rows:
        r.update(scenario="cross-node", link_rate=rate, nodes=2, procs_per_node=options.nproc_per_node,
                 link=f"2 nodes x {options.nproc_per_node} proc, tbf {rate}"
                      + (f" (measured {ceiling:.2f} Gbit/s busbw)" if ceiling else ""),
                 measured_ceiling_gbit=ceiling, cpu=_cpu(), load_avg_start=load, measured=True)
    return rows


def goals(rows) -> list[str]:
    out = []
    for rate in sorted({r["link_rate"] for r in rows}):
        sub = [r for r in rows if r["link_rate"] == rate]
        need = {"1gbit": 2.0, "10gbit": 1.3}.get(rate)
        for r in sub:
            if r["part"] == "compression" and "speedup_vs_fp32" in r and r["config"] != "fp32" and need:
                ok = r["speedup_vs_fp32"] >= need and r.get("val_in_spread") is not False
                out.append(f"{rate} {r['config']}: {r['speedup_vs_fp32']:.2f}x fp32 steps/s, val "
                           f"{r['val_loss']:.4f} (fp32 spread {r['fp32_val_min']:.4f}..{r['fp32_val_max']:.4f}): "
                           f"goal >= {need}x in spread {'met' if ok else 'missed'}")
        for r in sub:
            if r["part"] == "ulysses" and r.get("impl") in ("heddle", "heddle-overlap") and rate == "10gbit":
                v = r.get("overhead_vs_ds")
                out.append(f"{rate} Ulysses {r['config']}: overhead / DeepSpeed's {_f(v)}: goal <= 0.5 "
                           f"{'met' if v is not None and v == v and v <= 0.5 else 'missed'}")
            if r["part"] == "adaptive" and r.get("config") == "adaptive" and "measured_s" in r:
                sp, err = r.get("speedup_vs_static"), r["prediction_error"]
                out.append(f"{rate} adaptive SP: {_f(sp)}x the static plan (goal >= 1.3: "
                           f"{'met' if sp and sp >= 1.3 else 'missed'}), prediction error {err:.2f} (goal <= 0.2: "
                           f"{'met' if err <= 0.2 else 'missed'})")
        ep = next((r for r in sub if r["part"] == "moe" and r["config"] == "ep"), None)
        fs = next((r for r in sub if r["part"] == "moe" and r["config"] == "fssdp"), None)
        if ep and fs and rate == "1gbit":
            ratio = fs["median_s"] / ep["median_s"]
            out.append(f"{rate} MoE FSSDP / EP layer time {ratio:.2f}: goal <= 0.6 {'met' if ratio <= 0.6 else 'missed'}")
    return out


def _f(v, digits=3):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _steps_to_target(row, rows):
    """Steps until the 5-step running mean of the loss reaches fp32 seed 0's final running mean
    (same part and link rate); None if never within the run."""
    def running(curve):
        curve = json.loads(curve) if isinstance(curve, str) else curve
        return [statistics.mean(curve[i - 4:i + 1]) for i in range(4, len(curve))]
    ref = next((r for r in rows if r["config"] in ("fp32", "fsdp fp32") and r["seed"] == 0
                and r["part"] == row["part"] and r["link_rate"] == row["link_rate"]), None)
    if ref is None or "curve" not in row:
        return None
    target = running(ref["curve"])[-1]
    return next((i + 5 for i, v in enumerate(running(row["curve"])) if v <= target), None)


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def markdown(rows) -> str:
    """The docs' cross-node tables from the rows of one or more runs (``--report``)."""
    out = []
    env = rows[0]
    out.append(f"Measured on `heddle cluster`: 2 network-namespace nodes on one machine ({env['cpu']}), gloo, "
               "tbf-shaped veth link; processes per node and the link's measured ceiling in each table.")
    link = [(r["link_rate"], f"2 x {r['procs_per_node']}", r["busbw_gbit"], r["load_avg_start"])
            for r in rows if r["part"] == "link"]
    out += ["", "Link ceiling (16 MB all-reduce across the nodes, measured busbw):", "",
            _table(["tbf rate", "nodes x procs", "busbw Gbit/s", "load avg at start"], link)]
    for part, title in (("compression", "Compression under DDP (example GPT, Trainer)"),
                        ("fsdp", "Compression under FSDP2 (example GPT, Trainer data_parallel=fsdp)")):
        sub = [r for r in rows if r["part"] == part and "steps_per_s" in r]
        if not sub:
            continue
        lines = []
        for r in sub:
            to = _steps_to_target(r, rows)
            lines.append((r["link_rate"], r["config"], r["seed"], r["steps_per_s"], r["speedup_vs_fp32"],
                          r["backward_sync_s"], r["backward_sync_vs_fp32"], r["bytes_sent_per_step"] / 1e3,
                          to, to / r["steps_per_s"] if to else None, f"{r['val_loss']:.4f}",
                          f"{r['fp32_val_min']:.4f}..{r['fp32_val_max']:.4f}",
                          "in" if r["val_in_spread"] else ("below" if r["val_loss"] < r["fp32_val_min"] else "above")))
        note = (" (kB sent/step: the CommLedger's count; FSDP2's own all-gathers and plain reduce-scatters do "
                "not go through heddle.dist and are not in it)" if part == "fsdp" else "")
        out += ["", f"{title}, measured, 2 nodes x 1 proc{note}:", "",
                _table(["link", "config", "seed", "steps/s", "x fp32", "bwd+sync s", "fp32 bwd+sync / this",
                        "kB sent/step", "steps to fp32 loss", "s to fp32 loss", "val loss", "fp32 val spread",
                        "vs spread"], lines)]
    checks = [(r["link_rate"], r["part"], r["ledger_MB"], r["wire_MB"], r["wire_over_ledger"])
              for r in rows if r.get("config") == "bytes: link vs ledger"]
    if checks:
        out += ["", "Bytes that crossed the link (the nodes' tx counters) vs the CommLedger's count, whole part:", "",
                _table(["link", "part", "ledger MB", "link MB", "link / ledger"], checks)]
    hook = [(r["link_rate"], r["config"], r["backward_sync_s"], r["vs_ddp"], r["rounds"])
            for r in rows if r["part"] == "hook"]
    if hook:
        out += ["", "DDP backward+sync of the example GPT, cases interleaved step by step (same batch), "
                "measured, 2 x 1 (median over rounds, slowest rank):", "",
                _table(["link", "hook", "backward+sync s", "/ plain DDP", "rounds"], hook)]
    moe = [(r["link_rate"], r["config"], r["median_s"], r.get("vs_ep"), r.get("max_over_mean"), r.get("spag_MB"),
            r.get("lambda")) for r in rows if r["part"] == "moe" and "median_s" in r]
    if moe:
        out += ["", "MoE layer fwd+bwd, Zipf 1.0, experts spread over both nodes, measured, 2 x 1:", "",
                _table(["link", "impl", "median s", "EP time / this", "max/mean tokens", "spAG+spRS MB", "lambda"], moe)]
    uly = [(r["link_rate"], r.get("sp_layout"), r.get("impl"), r.get("s"), r["median_s"], r.get("overhead_s"),
            r.get("overhead_vs_ds"), r.get("overhead_vs_ds_min")) for r in rows if r["part"] == "ulysses"]
    if uly:
        out += ["", "Ulysses attention fwd+bwd (H 8, d 64), measured:", "",
                _table(["link", "SP group", "impl", "s", "median s", "overhead s", "overhead / DeepSpeed's",
                        "same, fastest trials"], uly)]
    ada = [(r["link_rate"], r["config"], r["predicted_s"], r["measured_s"], r["prediction_error"],
            r["speedup_vs_static"]) for r in rows if r["part"] == "adaptive" and "measured_s" in r]
    if ada:
        out += ["", "Adaptive SP (heddle.cluster.sp_calibration, code lengths), measured and predicted, 2 x 1:", "",
                _table(["link", "plan", "predicted s", "measured s", "|pred - meas| / meas", "static / this"], ada)]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--rates", default="1gbit,10gbit,25gbit")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--parts", default="link,hook,compression,fsdp,moe,ulysses,adaptive")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: check that every part runs")
    p.add_argument("--timeout", type=float, default=3000)
    p.add_argument("--out", default=None, help="write Parquet rows here (heddle bench report reads them)")
    p.add_argument("--json", default=None, help="also write all rows as JSON")
    p.add_argument("--report", nargs="+", default=None, help="print the docs' Markdown tables from these JSON files")
    options = p.parse_args(argv)
    if options.worker:
        return worker(options)
    if options.report:
        rows = []
        for path in options.report:
            with open(path) as f:
                rows += json.load(f)
        print(markdown(rows))
        print("\n".join(goals(rows)))
        if options.out:
            _write_parquet(options, rows, "python benchmarks/cluster.py " + " ".join(argv or sys.argv[1:]))
        return 0
    rows = []
    for rate in options.rates.split(","):
        t0 = time.perf_counter()
        rows += run_rate(options, rate)
        print(f"[cluster bench] rate {rate}: {time.perf_counter() - t0:.0f} s", flush=True)
    from heddle.bench.report import print_rows
    cols = [("link_rate", "link"), ("part", "part"), ("config", "config"), ("steps_per_s", "steps/s"),
            ("speedup_vs_fp32", "x fp32"), ("backward_sync_s", "bwd+sync s"), ("time_to_target_s", "to target s"),
            ("val_loss", "val loss"), ("val_in_spread", "in fp32 spread"), ("median_s", "median s"),
            ("vs_ep", "EP / this"), ("busbw_gbit", "busbw Gbit/s"), ("wire_over_ledger", "link / ledger bytes")]
    print_rows("cross-node (measured)", rows, cols)
    for line in goals(rows):
        print(line)
    if options.json:
        with open(options.json, "w") as f:
            json.dump(rows, f, default=float, indent=1)
    if options.out:
        _write_parquet(options, rows, "python benchmarks/cluster.py " + " ".join(argv or sys.argv[1:]))
    return 0


def _write_parquet(options, rows, command) -> None:
    from heddle.bench import results
    run_id = results.new_run_id()
    drop = ("curve", "calibration", "error")   # long blobs stay in the JSON
    out = []
    for r in rows:
        procs = 2 * int(r.get("procs_per_node", 1))
        env = results.environment(hosts=["node0", "node1"] * (procs // 2), devices=["cpu"] * procs, backend="gloo",
                                  world_size=procs, launcher="heddle cluster (torchrun)")
        out.append(dict(env, **{k: v for k, v in r.items() if k not in drop}, run_id=run_id, command=command))
    print(f"rows: {results.write_rows(options.out, 'cross-node', out, run_id=run_id)}")


if __name__ == "__main__":
    sys.exit(main() or 0)
