"""Results dataset: Parquet files under one directory, one file per run.

Layout: ``DIR/<scenario>/<UTC time>-<run id>.parquet`` holds a run's rows (one per case or
collective size), ``DIR/_telemetry/<scenario>-<UTC time>-<run id>.parquet`` its telemetry samples.
Every row carries the run's identity, configuration (``config_json``: every option, as JSON),
environment (versions, hosts, devices, git commit) and the scenario's metrics as flat columns.
Appending a run never rewrites earlier files; :func:`read_rows` unifies schemas across runs
(columns a run lacks read as null).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TELEMETRY_DIR = "_telemetry"


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """HEAD of the git checkout holding ``path`` (default: heddle's source), "+dirty" when
    tracked files differ; None outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(*, hosts: list[str], devices: list[str], backend: str, world_size: int,
                launcher: str) -> dict:
    """Environment columns for every row of a run. ``hosts``/``devices``: one entry per rank."""
    import torch

    import heddle

    return {
        "world_size": world_size,
        "nnodes": len(set(hosts)),
        "hosts": ",".join(sorted(set(hosts))),
        "devices": ",".join(sorted(set(devices))),
        "backend": backend,
        "launcher": launcher,
        "heddle_version": heddle.__version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "pyarrow_version": pa.__version__,
        "deepspeed_version": _version("deepspeed"),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def _cell(value):
    """A Parquet-friendly scalar: numbers, strings, bools and None stay; the rest becomes JSON."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    return json.dumps(value, default=str, sort_keys=True)


def normalize_rows(rows: list[dict]) -> list[dict]:
    """Flat rows with one type per column: an int column with a float in it becomes float, a
    column mixing text with numbers becomes text; missing keys become None."""
    if not rows:
        raise ValueError("normalize_rows(): no rows")
    cells = [{str(k): _cell(v) for k, v in row.items()} for row in rows]
    columns: list[str] = []
    for row in cells:
        columns += [k for k in row if k not in columns]
    for col in columns:
        kinds = {type(r.get(col)) for r in cells if r.get(col) is not None}
        if kinds <= {int, float} and float in kinds:
            for r in cells:
                if r.get(col) is not None:
                    r[col] = float(r[col])
        elif len(kinds) > 1:
            for r in cells:
                if r.get(col) is not None and not isinstance(r[col], str):
                    r[col] = json.dumps(r[col])
    return [{col: r.get(col) for col in columns} for r in cells]


def write_rows(out_dir: str | os.PathLike, scenario: str, rows: list[dict], *, run_id: str,
               stamp: str | None = None, subdir: str | None = None) -> Path:
    """Write one run's rows as a new Parquet file; returns its path."""
    if not rows:
        raise ValueError(f"write_rows(): scenario {scenario!r} returned no rows")
    stamp = stamp or utc_stamp()
    folder = Path(out_dir) / (subdir or scenario)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{scenario}-" if subdir else ""
    path = folder / f"{prefix}{stamp}-{run_id}.parquet"
    table = pa.Table.from_pylist(normalize_rows(rows))
    pq.write_table(table, path)
    return path


def read_table(out_dir: str | os.PathLike, *, telemetry: bool = False) -> pa.Table | None:
    """Every run's rows (or telemetry samples) under ``out_dir`` as one table; None when empty."""
    root = Path(out_dir)
    if not root.is_dir():
        raise ValueError(f"results directory {str(root)!r} does not exist")
    if telemetry:
        files = sorted((root / TELEMETRY_DIR).glob("*.parquet"))
    else:
        files = sorted(p for p in root.glob("*/*.parquet") if not p.parent.name.startswith("_"))
    if not files:
        return None
    tables = [pq.read_table(f) for f in files]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column changed type between runs: text wins
        return pa.Table.from_pylist(normalize_rows([row for t in tables for row in t.to_pylist()]))


def read_rows(out_dir: str | os.PathLike, *, telemetry: bool = False) -> list[dict]:
    table = read_table(out_dir, telemetry=telemetry)
    return [] if table is None else table.to_pylist()


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))
