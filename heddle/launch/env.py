"""``heddle env``: what heddle detects: torch and backend, devices, MPI, launcher variables."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import socket
import sys

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK",
                 "MPI_LOCALRANKID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST",
                 "SLURM_JOB_ID")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_info() -> tuple[list[dict], str | None]:
    """GPUs through NVML: ([{"index", "name", "memory_gb"}], note when NVML is absent)."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound on machines without a driver
        return [], f"NVML unavailable ({type(e).__name__})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_gb": round(mem, 1)})
        return out, None
    finally:
        pynvml.nvmlShutdown()


def collect() -> dict:
    import torch
    import torch.distributed as dist

    from heddle.dist import detect_launch_env

    gpus, gpu_note = gpu_info()
    try:
        launch = detect_launch_env()
        launch_desc = f"{launch.source} rank {launch.rank}/{launch.world_size} local {launch.local_rank}"
    except ValueError as e:
        launch_desc = f"invalid: {e}"
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "backend": "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo",
        "gloo": dist.is_gloo_available(),
        "nccl": dist.is_nccl_available(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "gpu_note": gpu_note,
        "mpi4py": _version("mpi4py"),
        "mpiexec": shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.join(sys.prefix, "bin")),
        "deepspeed": _version("deepspeed"),
        "triton": _version("triton"),
        "launcher": launch_desc,
        "launcher_vars": {k: os.environ[k] for k in LAUNCHER_VARS if k in os.environ},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="heddle env", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="heddle env", show_header=False)
    for key, value in info.items():
        if key == "gpus":
            value = "; ".join(f"{g['index']}: {g['name']} {g['memory_gb']} GB" for g in value) or "none"
        elif key == "launcher_vars":
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "none"
        table.add_row(key, str(value))
    Console().print(table)
    return 0
