"""What every worker of ``heddle run`` runs first: ``python .../heddle/launch/worker.py [-m] TARGET ARGS``.

It runs as a file, not as ``-m heddle.launch.worker``: importing the ``heddle`` package would
import torch before the script does, and it uses nothing but the standard library.

1. The worker dies with its launcher: ``PR_SET_PDEATHSIG`` = SIGKILL, so a launcher killed even
   with SIGKILL leaves no worker training and writing checkpoints next to a relaunch. (A launcher
   that dies before the call is caught by comparing the parent pid afterwards.)
2. stdout is line-buffered: each line reaches the shared terminal in one write, so the lines of
   two ranks never land on one line (``python -u`` writes every piece of a ``print`` apart).
3. The script (or ``-m`` module) then runs as ``__main__``, as ``python script.py`` would run it
   (``runpy``: ``sys.argv``, ``sys.path[0]``, ``__file__``; multiprocessing's spawn finds it).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

LAUNCHER_PID_ENV = "HEDDLE_LAUNCHER_PID"
WORKER_PATH = os.path.abspath(__file__)
PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the launcher) exits."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no libc prctl: the launcher's signal handlers still stop us
        return
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        os._exit(128 + signal.SIGKILL)


def main(argv: list[str]) -> None:
    die_with_launcher()
    try:
        sys.stdout.reconfigure(line_buffering=True, write_through=False)
    except (AttributeError, ValueError):  # stdout replaced by something without reconfigure
        pass
    if not argv or argv == ["-m"]:
        raise SystemExit(f"usage: python {WORKER_PATH} [-m] SCRIPT_OR_MODULE [ARGS...]")
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()  # as python -m does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
