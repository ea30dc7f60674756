"""The ``heddle`` command line.

    heddle run -n N script.py [args]   launch N local processes (multi-node: torch.distributed.run)
    heddle env                         what this machine and launcher provide
    heddle bench SCENARIO [options]    benchmark harness (heddle.bench)
    heddle plan LENGTHS --preset NAME  adaptive sequence-parallel plan (heddle.sequence.adaptive)
    heddle config [--format toml]      TrainerConfig defaults as a file to start from (heddle.config)

Under mpirun / mpiexec / srun no launcher is needed: the script calls
``heddle.init_distributed()``, which reads the MPI or SLURM variables.

A subcommand is one row of ``COMMANDS``: its name, a one-line help, and the module whose
``main(argv) -> int`` runs it (imported only when the subcommand is used).
"""

from __future__ import annotations

import importlib
import os
import sys

from heddle.launch.options import LAUNCH_FLAGS, add_launch_options  # noqa: F401 (re-exported)

# name -> (one-line help, module with main(argv) -> int)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("launch N processes (one node: heddle's launcher; several: torch.distributed.run)",
            "heddle.launch.run"),
    "env": ("print what heddle detects on this machine", "heddle.launch.env"),
    "bench": ("run a benchmark scenario, or 'report DIR'", "heddle.bench.cli"),
    "plan": ("plan adaptive sequence-parallel groups for a length file", "heddle.sequence.adaptive.cli"),
    "config": ("print the TrainerConfig defaults as a file to start from (--format toml|yaml|json)",
               "heddle.config"),
    "cluster": ("an emulated multi-node cluster on this machine: run, kill-node, list, clean",
                "heddle.cluster.cli"),
}


def _delegate(name: str, argv: list[str]) -> int:
    module = COMMANDS[name][1]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"heddle {name}: {module} is not available ({e})", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["run"]:
        # The `heddle run` command: once the workers are gone, end at once. Finalizing an
        # interpreter that imported torch takes seconds on a loaded machine, and the job's end
        # is what a scheduler, a relaunch or the watchdog's timeout bound waits for.
        code = _delegate("run", sys.argv[2:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: heddle {" + ",".join(COMMANDS) + "} ...\n")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:7s} {text}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import heddle

        print(heddle.__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"heddle: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return _delegate(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
