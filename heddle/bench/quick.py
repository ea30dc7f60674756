"""``heddle bench quick``: every registered scenario at small sizes, within a time budget.

Used by ``make bench``. Each scenario runs in its own ``heddle bench NAME`` subprocess (a crash or
a hang in one does not take the others down) with the scenario's ``quick_args``; a scenario
whose run fails, times out or does not fit in the remaining budget is reported and makes the
exit status 1, after every other scenario has run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

from heddle.bench.registry import discover

FIRST = ("collectives", "training")  # the harness's own scenarios run first
# Small-size arguments for scenarios that define no ``quick_args`` of their own.
QUICK_FALLBACK = {
    "ulysses": ["--seq-lens", "1024,2048", "--warmup", "1", "--trials", "5"],
    "compression": ["--parts", "comm", "--sizes", "1", "--warmup", "1", "--trials", "3"],
}


def quick_args(name: str, scenario) -> list[str]:
    return list(scenario.quick_args) or QUICK_FALLBACK.get(name, ["--warmup", "1", "--trials", "3"])


def _kill_group(proc: subprocess.Popen) -> None:
    """End the subprocess we started and everything it launched (its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="heddle bench quick", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--nproc", type=int, default=2)
    p.add_argument("--out", default="heddle-results")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole set (default 540)")
    p.add_argument("--scenario-timeout", type=float, default=180.0, help="seconds per scenario at most")
    p.add_argument("--only", default=None, help="comma-separated scenario names")
    p.add_argument("--skip", default="", help="comma-separated scenario names to leave out")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.budget <= 0 or args.scenario_timeout <= 0:
        p.error(f"--nproc={args.nproc}, --budget={args.budget}, --scenario-timeout={args.scenario_timeout} "
                "must all be positive")
    found, broken = discover()
    names = sorted(found, key=lambda n: (n not in FIRST, FIRST.index(n) if n in FIRST else 0, n))
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in found]
        if unknown:
            p.error(f"--only: unknown scenario(s) {unknown}; valid: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    names = [n for n in names if n not in skip]
    status: list[tuple[str, str, float]] = [(m, f"import failed: {e}", 0.0) for m, e in sorted(broken.items())]
    for module, error in sorted(broken.items()):
        print(f"[quick] scenario module {module} is broken: {error}", flush=True)
    start = time.perf_counter()
    for i, name in enumerate(names):
        remaining = args.budget - (time.perf_counter() - start)
        if remaining < 15:
            status.append((name, "skipped: budget spent", 0.0))
            continue
        scenario = found[name]
        cmd = [sys.executable, "-m", "heddle.bench.cli", name, "--nproc", str(args.nproc), "--out", args.out,
               *quick_args(name, scenario)]
        print(f"\n[quick] ({i + 1}/{len(names)}) heddle bench {shlex.join(cmd[3:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = proc.wait(timeout=min(args.scenario_timeout, remaining))
            result = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            result = f"timed out after {min(args.scenario_timeout, remaining):.0f} s"
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        status.append((name, result, time.perf_counter() - t0))
    total = time.perf_counter() - start
    print("\n[quick] scenario            status                          seconds")
    for name, result, seconds in status:
        print(f"[quick] {name:20s} {result:32s} {seconds:7.1f}")
    print(f"[quick] total {total:.1f} s for {len(names)} scenario(s) at {args.nproc} process(es) -> {args.out}")
    return 0 if all(r == "ok" for _, r, _ in status) else 1
