"""``heddle run``: check everything, then launch.

    heddle run -n 2 train.py --config run.toml       one node: heddle's launcher (local.py)
    heddle run --nnodes 2 --node-rank 0 --master-addr HOST -n 8 train.py   several: torchrun

Every flag, and a ``--config`` file the script is given, is checked here before any worker
starts; a bad one is one line naming the flag, its value and what is valid (exit code 2). A
worker's exit code becomes the launcher's.
"""

from __future__ import annotations

import os
import sys

from heddle.launch.options import (LAUNCH_FLAGS, OneLineParser, add_launch_options, check_launch_options,
                                   is_multi_node)

RUN_HELP = """Launch a script on N processes of this machine (heddle's launcher: its store listens on
127.0.0.1 only, one thread per process unless OMP_NUM_THREADS is set). Multi-node: give --nnodes,
--node-rank and --master-addr/--master-port, or --rdzv-endpoint/--rdzv-backend/--rdzv-id; that goes
through torch.distributed.run. The exit code is the first failing worker's."""

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")
WATCHDOG_ENV = "HEDDLE_WATCHDOG_TIMEOUT_S"  # read by heddle.init_distributed


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="heddle run", description=RUN_HELP)
    p.add_argument("-n", "--nproc", "--nproc-per-node", dest="nproc", default="1",
                   help="processes per node: an integer, or gpu / cpu / auto as torchrun takes them")
    add_launch_options(p)
    p.add_argument("--max-restarts", default="0", help="restart every worker up to K times after a failure")
    p.add_argument("--watchdog-timeout", default=None, metavar="SECONDS",
                   help="every rank's heddle.init_distributed starts heddle's collective watchdog: a rank "
                        "stuck that long ends the job, naming the stalled rank")
    p.add_argument("--no-config-check", action="store_true",
                   help="do not validate the script's --config file as a TrainerConfig before starting")
    p.add_argument("-m", "--module", action="store_true", help="run script as a module (python -m)")
    p.add_argument("script")
    p.add_argument("script_args", nargs="...")
    return p


def resolve_nproc(value: str) -> int | str:
    """--nproc: a positive integer, or gpu / cpu / auto (resolved here for one node)."""
    text = str(value)
    if text in ("gpu", "cpu", "auto"):
        if text == "cpu":
            return os.cpu_count() or 1
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if text == "gpu" and gpus == 0:
            raise ValueError("--nproc='gpu' but no CUDA device is visible; valid: a positive integer, cpu, auto")
        return gpus or (os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--nproc={text!r} must be a positive integer or one of gpu, cpu, auto")
    return n


def config_paths(script_args: list[str]) -> list[str]:
    """The values of ``--config X`` / ``--config=X`` among the script's arguments that name
    TrainerConfig files (by suffix)."""
    out = []
    for i, arg in enumerate(script_args):
        value = None
        if arg == "--config" and i + 1 < len(script_args):
            value = script_args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None and value.lower().endswith(CONFIG_SUFFIXES):
            out.append(value)
    return out


def check_configs(script_args: list[str]) -> None:
    """Load every ``--config`` file with heddle.config.load_config; ValueError (one line) if bad."""
    paths = config_paths(script_args)
    if not paths:
        return
    from heddle.config import load_config

    for path in paths:
        try:
            load_config(path)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise ValueError(f"--config {path}: {' '.join(str(e).split())}") from None


def check_args(args) -> None:
    """Every check that needs no worker; ValueError with one line."""
    check_launch_options(args)
    if args.watchdog_timeout is not None:
        try:
            seconds = float(args.watchdog_timeout)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ValueError(f"--watchdog-timeout={args.watchdog_timeout!r} must be a number of seconds > 0")
        args.watchdog_timeout = seconds
    if not args.module and not os.path.exists(args.script):
        raise ValueError(f"script {args.script!r} does not exist")
    if is_multi_node(args):
        if args.nproc not in ("gpu", "cpu", "auto"):
            resolve_nproc(args.nproc)
    else:
        args.nproc = resolve_nproc(args.nproc)
    if not args.no_config_check:
        check_configs(args.script_args)


def torchrun_argv(args) -> list[str]:
    """torch.distributed.run's arguments for a multi-node launch (workers start through
    heddle.launch.worker, so they die with this launcher)."""
    out = [f"--nproc-per-node={args.nproc}", f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    for flag in LAUNCH_FLAGS[1:]:
        value = getattr(args, flag)
        if value is not None:
            out.append(f"--{flag.replace('_', '-')}={value}")
    from heddle.launch.worker import WORKER_PATH

    out += ["--no-python", sys.executable, WORKER_PATH, *(["-m"] if args.module else []), args.script,
            *args.script_args]
    return out


def _run_torchrun(args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from heddle.launch.local import exit_code, log
    from heddle.launch.worker import LAUNCHER_PID_ENV

    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        torchrun_main(torchrun_argv(args))
    except SystemExit as e:
        return int(e.code or 0)
    except ChildFailedError as e:  # torchrun printed the failure table; return the worker's own code
        rank, failure = e.get_first_failure()
        code = exit_code(int(failure.exitcode))
        log(f"rank {rank} exited with code {code}")
        return code
    except SignalException as e:
        log(f"{e.sigval.name} received: workers stopped")
        return 128 + int(e.sigval)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"heddle run: {e}", file=sys.stderr)
        return 2
    if args.watchdog_timeout is not None:
        os.environ[WATCHDOG_ENV] = repr(args.watchdog_timeout)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if is_multi_node(args):
        return _run_torchrun(args)
    from heddle.launch.local import LocalLauncher

    return LocalLauncher(args.script, args.script_args, args.nproc, module=args.module,
                         max_restarts=args.max_restarts).run()
