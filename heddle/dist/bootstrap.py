"""Distributed bootstrap: one call from torchrun, mpirun/mpiexec or SLURM (srun).

Detection order is the one Accelerate and DeepSpeed use: torchrun's RANK, then Open MPI's
OMPI_COMM_WORLD_RANK, then MPICH/Hydra/PMIx's PMI_RANK / PMIX_RANK, then SLURM_PROCID.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("heddle")

DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process."""

    source: str  # "torchrun" | "mpi" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def _require(env: Mapping[str, str], source: str, names: list[str]) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise ValueError(f"incomplete {source} environment: missing {', '.join(missing)} "
                         f"(set: {', '.join(n for n in names if env.get(n)) or 'none'})")


def expand_first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: "node[01-04,07],gpu3" -> "node01"."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST is empty")
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"SLURM_NODELIST={nodelist!r} is not a host list like 'node[01-04]'")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _check_rank(source: str, rank: int, world_size: int, local_rank: int,
                local_world_size: int | None = None, names: tuple[str, str, str, str] | None = None) -> None:
    """``names``: the variables (rank, world size, local rank, local world size) the values came
    from, so the message names what to fix."""
    rank_n, world_n, local_n, local_world_n = names or ("rank", "world size", "local rank", "local world size")
    if world_size < 1:
        raise ValueError(f"{source}: {world_n}={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"{source}: {rank_n}={rank} must be in [0, {world_n}={world_size}) "
                         f"(rank {rank} is outside a world of {world_size})")
    if local_rank < 0:
        raise ValueError(f"{source}: {local_n}={local_rank} must be >= 0")
    if local_world_size is not None:
        if not 1 <= local_world_size <= world_size:
            raise ValueError(f"{source}: {local_world_n}={local_world_size} must be in [1, {world_n}={world_size}]")
        if local_rank >= local_world_size:
            raise ValueError(f"{source}: {local_n}={local_rank} must be < {local_world_n}={local_world_size}")


def detect_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Parse the launcher's variables. Raises ValueError naming what is missing or contradictory.

    MPI without MASTER_ADDR leaves ``master_addr`` None: :func:`init_distributed` then asks
    mpi4py to broadcast rank 0's address and a free port.
    """
    env = os.environ if env is None else env
    if env.get("RANK") is not None or env.get("WORLD_SIZE") is not None:
        _require(env, "torchrun", ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"])
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if env.get("LOCAL_RANK") else 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") if env.get("LOCAL_WORLD_SIZE") else None
        _check_rank("torchrun", rank, world, local, local_world,
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
        return LaunchEnv("torchrun", rank, world, local, env["MASTER_ADDR"], _int(env, "MASTER_PORT"))

    mpi_rank = next((n for n in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") if env.get(n)), None)
    if mpi_rank is not None:
        size_name = {"OMPI_COMM_WORLD_RANK": "OMPI_COMM_WORLD_SIZE", "PMI_RANK": "PMI_SIZE",
                     "PMIX_RANK": "PMI_SIZE"}[mpi_rank]
        if not env.get(size_name) and env.get("SLURM_NTASKS"):
            size_name = "SLURM_NTASKS"  # srun --mpi=pmix sets PMIX_RANK but no PMI_SIZE
        _require(env, "MPI", [mpi_rank, size_name])
        rank, world = _int(env, mpi_rank), _int(env, size_name)
        local_name = next((n for n in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                                       "SLURM_LOCALID") if env.get(n)), None)
        local = _int(env, local_name) if local_name else -1  # -1: derive from hostnames via mpi4py
        if env.get("SLURM_PROCID") and _int(env, "SLURM_PROCID") != rank:
            raise ValueError(f"contradictory environment: {mpi_rank}={rank} but SLURM_PROCID="
                             f"{env['SLURM_PROCID']}")
        local_world_name = next((n for n in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
                                 if env.get(n)), None)
        local_world = _int(env, local_world_name) if local_world_name and local >= 0 else None
        _check_rank("MPI", rank, world, max(local, 0), local_world,
                    (mpi_rank, size_name, local_name or "local rank", local_world_name or "local world size"))
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
        return LaunchEnv("mpi", rank, world, local, env.get("MASTER_ADDR") or None, port)

    if env.get("SLURM_PROCID") is not None:
        _require(env, "SLURM", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST"])
        rank, world, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID")
        # SLURM_NTASKS_PER_NODE is "4" or "4(x2),2": only a plain count is a bound for every node
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        local_world = _int(env, "SLURM_NTASKS_PER_NODE") if per_node.isdigit() else None
        _check_rank("SLURM", rank, world, local, local_world,
                    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"))
        addr = env.get("MASTER_ADDR") or expand_first_host(env["SLURM_NODELIST"])
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        elif env.get("SLURM_JOB_ID"):
            port = 15000 + int(env["SLURM_JOB_ID"][-4:])  # Lightning's convention
        else:
            raise ValueError("incomplete SLURM environment: set MASTER_PORT or SLURM_JOB_ID")
        return LaunchEnv("slurm", rank, world, local, addr, port)

    return LaunchEnv("single", 0, 1, 0, None, None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _resolve_mpi(launch: LaunchEnv) -> LaunchEnv:
    """Fill the master address/port and local rank through mpi4py (rank 0 broadcasts)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ValueError("MPI launch detected but MASTER_ADDR/MASTER_PORT are not set and mpi4py is "
                         "not installed: pip install 'heddle[mpi]' or export MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    host = socket.gethostname()
    if launch.master_addr is None or launch.master_port is None:
        addr_port = (socket.gethostbyname(host), _free_port()) if comm.Get_rank() == 0 else None
        addr_port = comm.bcast(addr_port, root=0)
        addr = launch.master_addr or addr_port[0]
        port = launch.master_port or addr_port[1]
    else:
        addr, port = launch.master_addr, launch.master_port
    local = launch.local_rank
    if local < 0:  # number of lower ranks on the same host
        hosts = comm.allgather(host)
        local = sum(1 for h in hosts[: comm.Get_rank()] if h == host)
    return LaunchEnv("mpi", launch.rank, launch.world_size, local, addr, port)


def init_distributed(backend: str | None = None, timeout: timedelta | float | None = None, *,
                     env: Mapping[str, str] | None = None) -> dist.ProcessGroup:
    """Start (or adopt) the default process group and return it.

    backend: None picks nccl when CUDA is available, else gloo. A process with no launcher
    variables gets a one-rank group, so the same script runs with ``python script.py``.
    timeout: the process group's timeout (a timedelta or seconds): a collective blocked that long
    raises. None: 10 minutes, or, under ``heddle run --watchdog-timeout T``, max(2 T, T + 30 s)
    with heddle's watchdog (:mod:`heddle.dist.watchdog`) started on every rank, which ends a
    stalled job after T seconds and names the stalled rank.
    """
    from heddle.dist.watchdog import env_timeout, start_watchdog

    if backend not in (None, "gloo", "nccl", "mpi"):
        raise ValueError(f"backend={backend!r}: valid choices are None (auto), 'gloo', 'nccl', 'mpi'")
    if dist.is_initialized():
        return dist.group.WORLD
    watchdog_s = env_timeout() if env is None else None
    if timeout is None:
        timeout = (timedelta(seconds=max(2 * watchdog_s, watchdog_s + 30)) if watchdog_s else DEFAULT_TIMEOUT)
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if not timeout > 0:
            raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
        timeout = timedelta(seconds=timeout)
    elif not isinstance(timeout, timedelta):
        raise TypeError(f"timeout={timeout!r} must be a datetime.timedelta or a number of seconds")
    launch = detect_launch_env(env)
    if launch.source == "mpi":
        launch = _resolve_mpi(launch)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend='nccl' needs CUDA devices; none is available (use 'gloo')")
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if launch.source == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif launch.source == "torchrun" and env is None:
        # env:// lets torch join torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE).
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    log.info("heddle: rank %d/%d (%s, %s)", launch.rank, launch.world_size, launch.source, backend)
    if watchdog_s and launch.world_size > 1:
        start_watchdog(watchdog_s)
    return dist.group.WORLD


def local_rank() -> int:
    """Local rank set by the launcher (0 when unknown)."""
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def device() -> torch.device:
    """The device this rank computes on: its CUDA device under nccl, else the CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
