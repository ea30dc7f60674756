"""The interface every ``heddle bench`` scenario implements.

A scenario is a module ``heddle/bench/scenarios/<name>.py`` that defines ``SCENARIO``, an
instance of a :class:`Scenario` subclass; the registry finds it by file name, so adding a scenario
touches no other file. The harness runs ``run`` on every rank of a process group (one process
for simulations) and writes the returned rows to the results dataset.

The default ``run`` compares ``cases`` side by side in one process group: for each case it calls
``setup``, warms up with ``options.warmup`` calls of ``step``, times ``options.trials`` calls
(barrier and device sync around each: ``ctx.timed``), then asks ``metrics`` for the row.
Scenarios that are not step loops (a simulation, a planner sweep) override ``run`` and return
their rows directly.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class BenchContext:
    rank: int
    world_size: int
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    verbose: bool = False  # progress lines on rank 0 (the harness turns it on)

    def log(self, message: str) -> None:
        """A progress line, printed by rank 0 only when ``verbose``."""
        if self.verbose and self.rank == 0:
            print(f"[bench] {message}", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def timed(self, fn) -> float:
        """Seconds one call of ``fn`` takes, measured between synchronised barriers; the
        slowest rank's time (max over ranks) so every rank reports the same number."""
        self.barrier()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        elapsed = time.perf_counter() - start
        if self.world_size > 1:
            t = torch.tensor([elapsed], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            elapsed = float(t)
        return elapsed


def summarize(times: list[float]) -> dict[str, float]:
    """median / p95 / max / mean of a list of seconds."""
    if not times:
        raise ValueError("summarize(): no times")
    s = sorted(times)
    p95 = s[min(len(s) - 1, max(0, int(round(0.95 * (len(s) - 1)))))]
    return {"median_s": s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2]),
            "p95_s": p95, "max_s": s[-1], "mean_s": sum(s) / len(s), "trials": len(s)}


class Scenario:
    name = "scenario"
    help = ""
    min_procs = 1          # the harness refuses fewer processes
    single_process = False  # simulations: run on one process whatever --nproc says
    # Extra command-line arguments `heddle bench quick` passes (small sizes, few trials) so the
    # quick set stays within its time budget; [] runs the scenario's defaults.
    quick_args: list[str] = []

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """Scenario-specific command-line options."""

    def check_options(self, options) -> None:
        """Raise ValueError for a bad option value; called by ``heddle bench`` before any worker
        starts, so a typo is one line instead of a traceback from every rank."""

    def cases(self, options) -> list[dict]:
        """The variants compared side by side (e.g. heddle vs a peer); one row each."""
        return [{}]

    def setup(self, ctx: BenchContext, options, case: dict) -> None:
        pass

    def step(self, ctx: BenchContext, options, case: dict) -> None:
        raise TypeError(f"scenario {self.name!r} must implement step() or override run()")

    def metrics(self, ctx: BenchContext, options, case: dict, times: list[float]) -> dict:
        """Extra columns for this case's row (bytes from a ledger, memory, ratios...)."""
        return {}

    def teardown(self, ctx: BenchContext, options, case: dict) -> None:
        pass

    def run(self, ctx: BenchContext, options) -> list[dict]:
        rows = []
        for case in self.cases(options):
            self.setup(ctx, options, case)
            for _ in range(options.warmup):
                ctx.timed(lambda: self.step(ctx, options, case))
            times = [ctx.timed(lambda: self.step(ctx, options, case)) for _ in range(options.trials)]
            row = {"scenario": self.name, **case, **summarize(times)}
            row.update(self.metrics(ctx, options, case, times))
            self.teardown(ctx, options, case)
            rows.append(row)
            ctx.log(f"{self.name} {case or ''}: median {row['median_s'] * 1e3:.3f} ms over {row['trials']} trials")
        return rows
