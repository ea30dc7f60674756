"""Run one scenario: launch processes (or join the launcher's), time, gather rows, write Parquet.

    heddle bench NAME --nproc N      N local processes through torch.distributed.run (`heddle run`)
    heddle bench NAME --nnodes 2 --node-rank R --master-addr HOST --nproc 8   one command per node
    mpirun -n 16 heddle bench NAME   /  srun heddle bench NAME   / torchrun ... -m heddle.bench.cli NAME
                                     the launcher's variables are found and no second launch happens

Every rank runs ``scenario.run(ctx, options)`` inside a :class:`~heddle.bench.telemetry.Telemetry`
sampler; rank 0 gathers every rank's host, device and telemetry (a gather of Python objects:
harness bookkeeping, after the timed region) and appends the rows to the results dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.bench import results
from heddle.bench.scenario import BenchContext, Scenario
from heddle.bench.telemetry import Telemetry
from heddle.launch.cli import LAUNCH_FLAGS, add_launch_options

ARGV_ENV = "HEDDLE_BENCH_ARGV"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("harness")
    g.add_argument("-n", "--nproc", type=int, default=1, help="processes per node (default 1)")
    add_launch_options(g)
    g.add_argument("--warmup", type=int, default=2, help="untimed calls before the trials (default 2)")
    g.add_argument("--trials", type=int, default=10, help="timed calls; median / p95 / max over them")
    g.add_argument("--out", default="heddle-results", help="results directory (Parquet dataset)")
    g.add_argument("--tag", default="", help="free-form label stored with every row")
    g.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    g.add_argument("--backend", choices=("auto", "gloo", "nccl", "mpi"), default="auto")
    g.add_argument("--telemetry-interval", type=float, default=0.25, help="seconds between samples")
    g.add_argument("--no-telemetry", action="store_true", help="do not sample CPU/RSS/NVML")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def check_common_options(options) -> None:
    for name, low in (("nproc", 1), ("warmup", 0), ("trials", 1), ("threads", 1)):
        value = getattr(options, name)
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= {low}")
    if not options.telemetry_interval > 0:
        raise ValueError(f"--telemetry-interval={options.telemetry_interval} must be > 0")


def _launcher_present() -> bool:
    return hd.detect_launch_env().source != "single"


def _multi_node(options) -> bool:
    return options.nnodes != "1" or any(getattr(options, f) is not None for f in LAUNCH_FLAGS[1:])


def run(scenario: Scenario, options, argv: list[str]) -> int:
    """Entry point of ``heddle bench NAME``: decide where to run, then run."""
    check_common_options(options)
    if _launcher_present() or scenario.single_process or (options.nproc == 1 and not _multi_node(options)):
        return worker(scenario, options, argv)
    from heddle.launch.cli import main as heddle_main

    launch = ["run", "--nproc", str(options.nproc), "--nnodes", str(options.nnodes)]
    for flag in LAUNCH_FLAGS[1:]:
        value = getattr(options, flag)
        if value is not None:
            launch += [f"--{flag.replace('_', '-')}", str(value)]
    # Each worker re-parses the same arguments (handed over in the environment: torchrun's own
    # parser would claim options such as --nproc) and finds torchrun's variables.
    os.environ[ARGV_ENV] = json.dumps(argv)
    return heddle_main(launch + ["-m", "heddle.bench.cli"])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def nvml_index(cuda_index: int | None) -> int:
    """NVML numbers every GPU of the machine; CUDA only the visible ones: map through
    CUDA_VISIBLE_DEVICES when it lists integers (UUIDs or MIG names: the CUDA index is used)."""
    cuda_index = cuda_index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and cuda_index < len(visible):
        return int(visible[cuda_index])
    return cuda_index


def _aggregate_telemetry(summaries: list[dict]) -> dict:
    """Per-rank summaries -> one set of columns: means averaged, maxima and totals over ranks."""
    out: dict = {}
    keys = sorted({k for s in summaries for k in s})
    for key in keys:
        values = [s[key] for s in summaries if key in s]
        if key == "telemetry_note":
            out["tele_note"] = "; ".join(sorted(set(values)))
        elif key.endswith("_max") or key == "telemetry_samples":
            out[f"tele_{key}"] = max(values)
        elif key.endswith("_total"):
            out[f"tele_{key}"] = sum(values)
        else:
            out[f"tele_{key}"] = sum(values) / len(values)
    return out


def _config(options) -> str:
    return json.dumps({k: v for k, v in sorted(vars(options).items())}, default=str, sort_keys=True)


def worker(scenario: Scenario, options, argv: list[str]) -> int:
    """Body of every rank: run the scenario, gather, write (rank 0)."""
    torch.set_num_threads(options.threads)
    # torch 2.13 renamed collectives heddle.dist wraps; one warning per rank per size is noise here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    backend = None if options.backend == "auto" else options.backend
    hd.init_distributed(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < scenario.min_procs and not scenario.single_process:
        raise ValueError(f"scenario {scenario.name!r} needs at least {scenario.min_procs} processes; "
                         f"got {world} (use --nproc {scenario.min_procs})")
    runs_here = rank == 0 or not scenario.single_process
    ctx_world = 1 if scenario.single_process else world
    device = hd.device()
    ctx = BenchContext(rank if runs_here and not scenario.single_process else 0, ctx_world, None, device,
                       verbose=not options.quiet)
    gpu_index = nvml_index(device.index) if device.type == "cuda" else None
    if rank == 0 and not options.quiet:
        print(f"[bench] {scenario.name}: {world} process(es), {dist.get_backend()}, "
              f"warmup {options.warmup}, trials {options.trials}", flush=True)
    start = time.perf_counter()
    telemetry = Telemetry(interval=options.telemetry_interval, gpu_index=gpu_index)
    rows: list[dict] = []
    if options.no_telemetry:
        rows = scenario.run(ctx, options) if runs_here else []
    else:
        with telemetry:
            rows = scenario.run(ctx, options) if runs_here else []
    wall = time.perf_counter() - start
    mine = {"host": socket.gethostname(), "device": _device_name(device), "rank": rank,
            "telemetry": telemetry.summary() if not options.no_telemetry else {},
            "samples": telemetry.samples}
    gathered = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if rank == 0:
        _write(scenario, options, argv, rows, gathered, wall)
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()
    return 0


def _write(scenario: Scenario, options, argv: list[str], rows: list[dict], ranks: list[dict],
           wall: float) -> None:
    from heddle.bench.report import print_rows

    run_id, stamp = results.new_run_id(), results.utc_stamp()
    hosts = [r["host"] for r in ranks]
    env = results.environment(hosts=hosts, devices=[r["device"] for r in ranks], backend=dist.get_backend(),
                              world_size=len(ranks), launcher=hd.detect_launch_env().source)
    common = {"run_id": run_id, "timestamp": stamp, "scenario": scenario.name, "tag": options.tag,
              "command": "heddle bench " + shlex.join(argv), "config_json": _config(options),
              "run_wall_s": wall}
    tele = _aggregate_telemetry([r["telemetry"] for r in ranks if r["telemetry"]])
    full = [{**common, **row, **tele, **env} for row in rows]
    for row in full:
        row["scenario"] = scenario.name
    path = results.write_rows(options.out, scenario.name, full, run_id=run_id, stamp=stamp)
    samples = [{"run_id": run_id, "scenario": scenario.name, "rank": r["rank"], "host": r["host"],
                "device": r["device"], **s} for r in ranks for s in r["samples"]]
    if samples:
        results.write_rows(options.out, scenario.name, samples, run_id=run_id, stamp=stamp,
                           subdir=results.TELEMETRY_DIR)
    if not options.quiet:
        print_rows(scenario.name, rows)
        print(f"[bench] {len(rows)} row(s) -> {path}  ({wall:.1f} s)", flush=True)
    sys.stdout.flush()
