"""The Trainer's progress line / bar on rank 0 (rich when stdout is a TTY, log lines otherwise)."""

from __future__ import annotations

import sys


class ProgressReporter:
    def __init__(self, config):
        self.config = config
        self._progress = None
        self._task = None

    def report(self, step: int, m: dict[str, float]) -> None:
        cfg = self.config
        if not cfg.progress:
            return
        line = f"loss {m['loss']:.4f}  {m['tokens_per_s']:,.0f} tok/s  {m['bytes_sent'] / 1e6:.2f} MB sent"
        if m.get("skipped_steps"):
            line += f"  {int(m['skipped_steps'])} skipped"
        if sys.stdout.isatty() and cfg.total_steps:
            if self._progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.description}"), TimeRemainingColumn())
                self._progress.start()
                self._task = self._progress.add_task("", total=cfg.total_steps)
            self._progress.update(self._task, completed=step, description=line)
            if step >= cfg.total_steps:
                self.close()
        elif step % cfg.log_every == 0 or step == 1:
            total = f"/{cfg.total_steps}" if cfg.total_steps else ""
            print(f"step {step}{total}  {line}", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
