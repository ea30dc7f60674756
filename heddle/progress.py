"""Progress for the long steps before training starts (dataset build, calibration, planning).

    with progress("building documents", total=len(files)) as bar:
        for f in files:
            ...
            bar.advance()

On a terminal it draws a rich progress bar; otherwise (logs, CI, torchrun's piped output) it
prints a start line, a line at most every ``every_s`` seconds, and a done line with the elapsed
time. Only rank 0 prints by default (``RANK`` unset or 0): pass ``enabled`` to choose.
"""

from __future__ import annotations

import os
import sys
import time


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Progress:
    def __init__(self, description: str, total: float | None = None, *, enabled: bool | None = None,
                 every_s: float = 5.0, unit: str = "", stream=None):
        self.description, self.total, self.unit = description, total, unit
        self.enabled = is_rank0() if enabled is None else enabled
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.completed = 0.0
        self._bar = None

    def __enter__(self) -> "Progress":
        self._start = self._last = time.perf_counter()
        if not self.enabled:
            return self
        if self.stream.isatty() and self.total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn(self.description), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(file=self.stream))
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total)
        else:
            total = f" ({self._amount(self.total)})" if self.total else ""
            print(f"{self.description}{total} ...", file=self.stream, flush=True)
        return self

    def _amount(self, value: float) -> str:
        return f"{value:,.0f}{(' ' + self.unit) if self.unit else ''}"

    def advance(self, amount: float = 1) -> None:
        self.completed += amount
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            done = (f"{100 * self.completed / self.total:.0f}% " if self.total else "") + \
                f"({self._amount(self.completed)})"
            print(f"{self.description}: {done}, {now - self._start:.0f} s", file=self.stream, flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
        status = "done" if exc_type is None else f"failed ({exc_type.__name__})"
        print(f"{self.description}: {status} in {time.perf_counter() - self._start:.1f} s",
              file=self.stream, flush=True)


def progress(description: str, total: float | None = None, **kwargs) -> Progress:
    """A context manager that shows the progress of one long step (see the module docstring)."""
    return Progress(description, total, **kwargs)
