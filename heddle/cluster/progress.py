"""Progress markers a script running on an emulated cluster sends to the supervisor.

    from heddle.cluster import progress
    progress(step)                     # "step": this rank finished step ``step``
    progress(step, "snapshot")         # any phase name the supervisor may kill at

Each call appends one JSON line to ``$HEDDLE_CLUSTER_DIR/progress/node{i}-rank{r}.jsonl`` (the
shared directory every node sees); outside a cluster it does nothing. The supervisor reads them to
kill a node at a given (step, phase) and to time recovery (kill -> first step of the next attempt).
"""

from __future__ import annotations

import json
import os
import time

DIR_ENV = "HEDDLE_CLUSTER_DIR"


def in_cluster() -> bool:
    return bool(os.environ.get(DIR_ENV))


def progress(step: int, phase: str = "step", **info) -> None:
    root = os.environ.get(DIR_ENV)
    if not root:
        return
    node = int(os.environ.get("HEDDLE_CLUSTER_NODE", "0"))
    rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("SLURM_PROCID", "0"))))
    record = {"t": time.time(), "node": node, "rank": rank, "step": int(step), "phase": str(phase),
              "attempt": int(os.environ.get("HEDDLE_CLUSTER_ATTEMPT", "0")), **info}
    os.makedirs(os.path.join(root, "progress"), exist_ok=True)
    with open(os.path.join(root, "progress", f"node{node}-rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_progress(root: str) -> list[dict]:
    """Every marker written so far, in time order."""
    out = []
    folder = os.path.join(root, "progress")
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return sorted(out, key=lambda r: r["t"])


class ProgressTail:
    """Incremental reader of the progress files (the supervisor polls it)."""

    def __init__(self, root: str):
        self.folder = os.path.join(root, "progress")
        self.offsets: dict[str, int] = {}

    def poll(self) -> list[dict]:
        out = []
        if not os.path.isdir(self.folder):
            return out
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            with open(path) as f:
                f.seek(self.offsets.get(name, 0))
                data = f.read()
            end = data.rfind("\n") + 1
            self.offsets[name] = self.offsets.get(name, 0) + len(data[:end].encode())
            for line in data[:end].splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return sorted(out, key=lambda r: r["t"])
