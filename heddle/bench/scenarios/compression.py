"""Compressed gradients: bytes and sync time per step, L-GreCo's savings, convergence.

    heddle bench compression --nproc 2 --parts comm,lgreco,train
    heddle run -n 2 benchmarks/compression.py                 # the same as a script (tables, PNG)

Parts (``--parts``):
- ``comm``: DDP over L matrices (1M-64M fp32 elements; 2048 x 2048 layers from 16M up), a
  backward that is one multiply per layer, default 25 MB buckets. One synchronised DDP step per
  case: ``noop`` (hook returns the bucket: compute only), ``fp32`` (the Trainer's sum all-reduce),
  heddle settings, and torch's ``powerSGD_hook`` (rank 4, start iter 2) run in a separate pair of
  spawned processes so an abort cannot take the benchmark down. ``sync_s`` = step median - noop
  median. Bytes per step from the CommLedger (torch's hook: r (n + m) fp32 per matrix for P and Q,
  counted from its algorithm, since it bypasses the ledger).
- ``lgreco``: per family, bytes and summed error of the uniform setting vs L-GreCo's per-layer
  choice (error budget 1.0) on the example GPT's gradients summed over 10 steps.
- ``train``: the example GPT, 2 processes, seeds x configurations (see _compression_train.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.bench.scenario import BenchContext, Scenario, summarize
from heddle.compress import (EControl, ErrorFeedback, GradientCompression, Identity, PowerSGD, Quantize,
                             RandomK, TopK)

LAYOUTS = {1: (4, 512), 4: (4, 1024), 16: (4, 2048), 64: (16, 2048)}   # M elements -> (layers, n)
HEDDLE_CASES = {
    "heddle topk:0.01+ef": lambda: GradientCompression(TopK(0.01), feedback=ErrorFeedback(), start_iter=2, reduction="sum"),
    "heddle topk:0.01+econtrol": lambda: GradientCompression(TopK(0.01), feedback=EControl(0.05), start_iter=2,
                                                             reduction="sum"),
    "heddle randomk:0.01+ef": lambda: GradientCompression(RandomK(0.01), feedback=ErrorFeedback(), start_iter=2,
                                                          reduction="sum"),
    "heddle quantize:4+ef": lambda: GradientCompression(Quantize(4), feedback=ErrorFeedback(), start_iter=2,
                                                        reduction="sum"),
    "heddle powersgd:4+ef": lambda: GradientCompression(PowerSGD(4), feedback=ErrorFeedback(), start_iter=2,
                                                        reduction="sum"),
    "heddle identity": lambda: GradientCompression(Identity(), start_iter=0, reduction="sum"),
}


class _Layers(torch.nn.Module):
    """L weights [n, n]; loss = sum_i <W_i, C_i>: the gradient of W_i is C_i (this rank's)."""

    def __init__(self, layers: int, n: int, rank: int):
        super().__init__()
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n, n)) for _ in range(layers))
        g = torch.Generator().manual_seed(rank + 1)
        self.consts = [torch.randn(n, n, generator=g) for _ in range(layers)]

    def forward(self):
        return sum((w * c).sum() for w, c in zip(self.weights, self.consts))


def _noop_hook(state, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _time_ddp(ctx, size_m: int, hook_state, hook, warmup: int, trials: int, rank: int):
    from torch.nn.parallel import DistributedDataParallel as DDP
    layers, n = LAYOUTS[size_m]
    model = _Layers(layers, n, rank)
    ddp = DDP(model, process_group=ctx.group)
    ddp.register_comm_hook(hook_state, hook)

    def step():
        ddp().backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(max(warmup, 3)):      # DDP rebuilds buckets after iteration 0; heddle starts at 2
        ctx.timed(step)
    times, sent = [], 0
    for _ in range(trials):
        with hd.CommLedger() as ledger:
            times.append(ctx.timed(step))
        sent = ledger.bytes_sent()
    del ddp, model
    return times, sent


def _torch_powersgd_child(rank, world, init_file, sizes, warmup, trials, results):
    """One process of torch's powerSGD_hook run (spawned; failures come back as text)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    torch.set_num_threads(1)
    out = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        ctx = BenchContext(rank, world)
        for size in sizes:
            try:
                noop, _ = _time_ddp(ctx, size, None, _noop_hook, warmup, trials, rank)
                state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                           start_powerSGD_iter=2, min_compression_rate=1, use_error_feedback=True,
                                           warm_start=True)
                times, _ = _time_ddp(ctx, size, state, psgd.powerSGD_hook, warmup, trials, rank)
                out[size] = {"times": times, "noop": noop}
            except Exception as exc:  # noqa: BLE001 - the failure is the result
                text = " ".join(str(exc).split())
                innermost = text.split("RuntimeError: ")[-1].split(" At: ")[0]
                innermost = innermost.split("] ", 1)[-1] if innermost.startswith("[") else innermost
                where = [w.split("(")[1].split(")")[1] for w in text.split(" At: ")[1:2] if "(" in w]
                out[size] = {"error": f"{type(exc).__name__}: {innermost}" + (f" in {where[0]}" if where else "")}
                break      # the group is unusable after a collective mismatch
    except Exception as exc:  # noqa: BLE001
        out["setup"] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
    results.put((rank, out))


def torch_powersgd(sizes, warmup, trials, timeout=240.0) -> dict:
    """Run torch's powerSGD_hook in two fresh processes; {size: {times, noop} | {error}}. The
    ``timeout`` stays under the process group's 10-minute barrier the other ranks wait in."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="heddle-psgd-")
    procs = [ctx.Process(target=_torch_powersgd_child, daemon=True,
                         args=(r, 2, os.path.join(tmp, "init"), sizes, warmup, trials, results)) for r in range(2)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < 2 and time.monotonic() < deadline:
        try:
            rank, out = results.get(timeout=1.0)
            got[rank] = out
            deadline = min(deadline, time.monotonic() + 30)   # a peer may be stuck in a collective
        except Exception:  # noqa: BLE001 - queue.Empty: check for crashed children
            if all(p.exitcode is not None for p in procs) and results.empty():
                break
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=10)
    if not got:
        codes = [p.exitcode for p in procs]
        return {s: {"error": f"processes exited with codes {codes} and no result (gloo abort)"} for s in sizes}
    merged = dict(got.get(0, {}))
    for rank, out in sorted(got.items()):     # the first error any rank saw
        for size, res in out.items():
            if "error" in res and "error" not in merged.get(size, {}):
                merged[size] = {"error": f"rank {rank}: {res['error']}"}
    stuck = [r for r in range(2) if r not in got]
    for size, res in merged.items():
        if stuck and "error" in res:
            res["error"] += f" (rank(s) {stuck} hung in the hook's collectives)"
    return merged


def comm_rows(ctx: BenchContext, options) -> list[dict]:
    sizes = [int(s) for s in options.sizes.split(",")]
    for s in sizes:
        if s not in LAYOUTS:
            raise ValueError(f"--sizes: {s} not in {sorted(LAYOUTS)} (M elements)")
    from heddle.trainer import _sum_hook
    rows = []
    psgd = None
    if ctx.rank == 0 and not options.skip_torch:
        psgd = torch_powersgd(sizes, options.warmup, options.trials)
    ctx.barrier()
    for size in sizes:
        layers, n = LAYOUTS[size]
        numel = layers * n * n
        noop, _ = _time_ddp(ctx, size, None, _noop_hook, options.warmup, options.trials, ctx.rank)
        base = summarize(noop)["median_s"]
        cases = [("fp32 all-reduce", ctx.group, _sum_hook)]
        for name, make in HEDDLE_CASES.items():
            comp = make()
            cases.append((name, comp, comp.hook))
        fp32_bytes = None
        for name, state, hook in cases:
            times, sent = _time_ddp(ctx, size, state, hook, options.warmup, options.trials, ctx.rank)
            med = summarize(times)["median_s"]
            fp32_bytes = sent if name.startswith("fp32") else fp32_bytes
            rows.append({"part": "comm", "elements_m": size, "case": name, "step_s": med,
                         "sync_s": med - base, "bytes_per_step": sent, "bytes_vs_fp32": fp32_bytes / max(sent, 1),
                         "bits_per_element": 8.0 * sent / numel, "status": "ok"})
        if ctx.rank == 0 and psgd is not None:
            res = psgd.get(size, {"error": "not run (an earlier size failed)"})
            # P [n, 4] and Q [n, 4] fp32 per matrix, all-reduced: 2 (P-1)/P x payload = 1 x at P = 2
            psgd_bytes = layers * 4 * 4 * (n + n)
            row = {"part": "comm", "elements_m": size, "case": "torch powerSGD_hook r4",
                   "bytes_per_step": psgd_bytes, "bytes_vs_fp32": fp32_bytes / psgd_bytes,
                   "bits_per_element": 8.0 * psgd_bytes / numel}
            if "error" in res:
                row.update(status=f"FAILED: {res['error'][:200]}", step_s=None, sync_s=None)
            else:
                med = summarize(res["times"])["median_s"]
                row.update(status="ok", step_s=med, sync_s=med - summarize(res["noop"])["median_s"])
            rows.append(row)
    return rows


class CompressionScenario(Scenario):
    name = "compression"
    help = "compressed gradient sync: bytes, time, L-GreCo, convergence (heddle.compress)"
    min_procs = 2

    def add_options(self, parser):
        g = parser.add_argument_group("compression")
        g.add_argument("--parts", default="comm,lgreco,train", help="comma list of comm, lgreco, train")
        g.add_argument("--sizes", default="1,4,16,64", help="gradient sizes in M elements (comm)")
        g.add_argument("--skip-torch", action="store_true", help="do not run torch's powerSGD_hook")
        g.add_argument("--steps", type=int, default=200, help="training steps per run (train)")
        g.add_argument("--seeds", type=int, default=3, help="seeds per configuration (train)")
        g.add_argument("--configs", default="", help="comma list of train configs (default: all)")

    def run(self, ctx: BenchContext, options) -> list[dict]:
        from heddle.bench.scenarios import _compression_train as train
        parts = options.parts.split(",")
        unknown = set(parts) - {"comm", "lgreco", "train"}
        if unknown:
            raise ValueError(f"--parts: unknown {sorted(unknown)}; valid: comm, lgreco, train")
        rows = []
        if "comm" in parts:
            rows += comm_rows(ctx, options)
        if "lgreco" in parts:
            rows += train.lgreco_rows(ctx, options)
        if "train" in parts:
            rows += train.train_rows(ctx, options)
        return rows


SCENARIO = CompressionScenario()
