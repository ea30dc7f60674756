"""Training metrics where users already look: CSV and JSON Lines files, and TensorBoard.

    logger = build_logger("runs/exp1")      # metrics.csv + metrics.jsonl (+ TensorBoard events)
    logger.log(step, {"loss": 2.31, "tokens_per_s": 15400.0})
    logger.close()

:class:`heddle.Trainer` does this on rank 0 when ``TrainerConfig(log_dir=...)`` is set. Columns
(one row per logged step; a metric a run does not produce is left empty in the CSV and absent in
the JSONL):

| column | meaning |
| --- | --- |
| ``step`` | optimizer steps done |
| ``loss`` | global token-mean loss of the step |
| ``tokens_per_s`` | tokens of the global batch / step wall time |
| ``grad_norm`` | global gradient norm before clipping (empty without clipping) |
| ``bytes_sent`` | bytes this rank sent in the step's collectives (the CommLedger) |
| ``checkpoint_stall_s`` | seconds the step waited for a checkpoint snapshot |
| ``skipped_steps`` | steps skipped so far for a non-finite loss or gradient |

plus every other metric the Trainer and its plugins return (``lr``, ``step_time``, ...), as extra
columns. A metric first seen after the CSV header was written goes to the JSONL only (the CSV
header is fixed by the first row; the JSONL holds everything).

A logger is anything with ``log(step, metrics)`` and ``close()``. A Weights & Biases logger:

    class WandbLogger:
        def __init__(self, **init):
            import wandb
            self.run = wandb.init(**init)
        def log(self, step, metrics):
            self.run.log(metrics, step=step)
        def close(self):
            self.run.finish()
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Protocol, runtime_checkable

COLUMNS = ("step", "loss", "tokens_per_s", "grad_norm", "bytes_sent", "checkpoint_stall_s", "skipped_steps")


@runtime_checkable
class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (``log_dir=None``)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _number(value):
    """A JSON-safe float (NaN and inf become None: JSON has no spelling for them)."""
    value = float(value)
    return value if math.isfinite(value) else None


class CSVLogger:
    """``metrics.csv``: the documented columns first, then the first row's extra metrics."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a", newline="")
        self._writer = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is None:
            header = self._existing_header()  # a resumed run appends under the first run's header
            fieldnames = header or [*COLUMNS, *(k for k in metrics if k not in COLUMNS)]
            self._writer = csv.DictWriter(self._file, fieldnames=fieldnames, extrasaction="ignore")
            if not header:
                self._writer.writeheader()
        row = {k: ("" if _number(v) is None else v) for k, v in metrics.items() if k != "step"}
        self._writer.writerow({**row, "step": int(step)})
        self._file.flush()

    def _existing_header(self) -> list[str] | None:
        if self._file.tell() == 0:
            return None
        with open(self.path, newline="") as f:
            return next(csv.reader(f), None)

    def close(self) -> None:
        self._file.close()


class JSONLLogger:
    """``metrics.jsonl``: one JSON object per logged step, every metric."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": int(step), **{k: _number(v) for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """TensorBoard scalars under ``log_dir`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key != "step" and _number(value) is not None:
                self.writer.add_scalar(key, float(value), global_step=int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MultiLogger:
    """Sends every row to each of ``loggers``."""

    def __init__(self, loggers):
        self.loggers = list(loggers)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_logger(log_dir: str | None, *, tensorboard: bool | None = None) -> MetricsLogger:
    """The default logger: CSV + JSONL in ``log_dir`` (created), plus TensorBoard when
    ``torch.utils.tensorboard`` imports (``tensorboard=None``), always (True: raises with the
    install hint when missing) or never (False). ``log_dir=None``: a logger that does nothing."""
    if log_dir is None:
        return NullLogger()
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir={log_dir!r}: expected a directory path or None")
    os.makedirs(log_dir, exist_ok=True)
    loggers = [CSVLogger(os.path.join(log_dir, "metrics.csv")), JSONLLogger(os.path.join(log_dir, "metrics.jsonl"))]
    if tensorboard is not False:
        try:
            loggers.append(TensorBoardLogger(str(log_dir)))
        except ImportError as e:
            if tensorboard:
                raise ImportError(f"build_logger(tensorboard=True): {e}; pip install tensorboard") from None
            print(f"heddle: TensorBoard logging off (pip install tensorboard); metrics go to "
                  f"{os.path.join(log_dir, 'metrics.csv')} and metrics.jsonl", file=sys.stderr)
    return MultiLogger(loggers)
