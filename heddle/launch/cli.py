"""The ``heddle`` command line.

    heddle run -n N script.py [args]   launch N local processes through torch.distributed.run
    heddle env                         what this machine and launcher provide
    heddle bench SCENARIO [options]    benchmark harness (heddle.bench)
    heddle plan LENGTHS --preset NAME  adaptive sequence-parallel plan (heddle.sequence.adaptive)
    heddle config [--format toml]      TrainerConfig defaults as a file to start from (heddle.config)

Under mpirun / mpiexec / srun no launcher is needed: the script calls
``heddle.init_distributed()``, which reads the MPI or SLURM variables.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

RUN_HELP = """Launch a script on N local processes (torch.distributed.run with a standalone
rendezvous, one thread per process unless OMP_NUM_THREADS is set). Multi-node: give --nnodes,
--node-rank and --master-addr/--master-port, or --rdzv-endpoint/--rdzv-backend/--rdzv-id."""


# torchrun's multi-node flags, passed through by `heddle run` and `heddle bench`.
LAUNCH_FLAGS = ("nnodes", "node_rank", "master_addr", "master_port", "rdzv_backend", "rdzv_endpoint", "rdzv_id")


def add_launch_options(parser) -> None:
    """Add torchrun's multi-node flags (``LAUNCH_FLAGS``) to a parser or argument group."""
    parser.add_argument("--nnodes", default="1", help="nodes (torchrun's --nnodes, e.g. 2 or 1:4)")
    parser.add_argument("--node-rank", type=int, default=None)
    parser.add_argument("--master-addr", default=None)
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--rdzv-backend", default=None)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--rdzv-id", default=None)


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="heddle run", description=RUN_HELP)
    p.add_argument("-n", "--nproc", "--nproc-per-node", dest="nproc", default="1",
                   help="processes per node (an integer, or 'gpu'/'cpu'/'auto' as torchrun takes)")
    add_launch_options(p)
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("-m", "--module", action="store_true", help="run script as a module (python -m)")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.nproc not in ("gpu", "cpu", "auto"):
        try:
            if int(args.nproc) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--nproc={args.nproc!r} must be a positive integer or one of gpu, cpu, auto")
    if not args.module and not os.path.exists(args.script):
        p.error(f"script {args.script!r} does not exist")
    multi_node = args.nnodes != "1" or args.rdzv_endpoint or args.master_addr
    torchrun = [f"--nproc-per-node={args.nproc}", f"--nnodes={args.nnodes}", f"--max-restarts={args.max_restarts}"]
    if not multi_node:
        torchrun.append("--standalone")
    for flag in LAUNCH_FLAGS[1:]:
        value = getattr(args, flag)
        if value is not None:
            torchrun.append(f"--{flag.replace('_', '-')}={value}")
    if args.module:
        torchrun.append("-m")
    torchrun += [args.script, *args.script_args]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun)
    except SystemExit as e:  # torchrun exits with the failing worker's code
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError: torchrun already printed the worker's traceback
        print(f"heddle run: {type(e).__name__}", file=sys.stderr)
        return 1
    return 0


def _delegate(module: str, what: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"heddle {what}: {module} is not available ({e})", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "run": ("launch N processes through torch.distributed.run", _run),
        "env": ("print what heddle detects on this machine",
                lambda a: _delegate("heddle.launch.env", "env", a)),
        "bench": ("run a benchmark scenario, or 'report DIR'",
                  lambda a: _delegate("heddle.bench.cli", "bench", a)),
        "plan": ("plan adaptive sequence-parallel groups for a length file",
                 lambda a: _delegate("heddle.sequence.adaptive.cli", "plan", a)),
        "cluster": ("an emulated multi-node cluster on this machine: run, kill-node, list, clean",
                    lambda a: _delegate("heddle.cluster.cli", "cluster", a)),
        "config": ("print the TrainerConfig defaults as a file to start from (--format toml|yaml|json)",
                   lambda a: _delegate("heddle.config", "config", a)),
    }
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: heddle {" + ",".join(commands) + "} ...\n")
        for name, (text, _) in commands.items():
            print(f"  {name:6s} {text}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import heddle

        print(heddle.__version__)
        return 0
    if argv[0] not in commands:
        print(f"heddle: unknown command {argv[0]!r}; valid: {', '.join(commands)}", file=sys.stderr)
        return 2
    return commands[argv[0]][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
