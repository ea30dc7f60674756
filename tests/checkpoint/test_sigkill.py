"""SIGKILL at seeded random points of a save loop (snapshot, flush, commit): restore always gives
a complete checkpoint, never a torn one, and never one older than the last commit seen."""

import os
import random
import signal
import subprocess
import sys
import time

import torch

from heddle.checkpoint import Checkpointer, shutdown_keeper
from heddle.checkpoint.keeper import keeper_root

CHILD = r"""
import sys, torch
from heddle.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], levels=("memory", "disk"), keep=2, keeper_linger=60)
state = {"a": torch.zeros(1_500_000), "b": torch.zeros(300_000, dtype=torch.float64), "meta": {"step": 0}}
log = open(sys.argv[2], "w")
print("ready", flush=True)
step = 0
while True:
    step += 1
    ck.wait_for_snapshot()
    state["a"].fill_(step); state["b"].fill_(-step); state["meta"]["step"] = step
    ck.save(step, state)
    log.write(f"committed {ck.committed_step}\n"); log.flush()   # newest manifest on disk
"""


def _check(directory, levels):
    state = {"a": torch.empty(1_500_000), "b": torch.empty(300_000, dtype=torch.float64), "meta": {}}
    ck = Checkpointer(directory, levels=levels, keep=2, keeper_linger=60)
    step = ck.restore(state)
    ok = step is None or bool((state["a"] == step).all()) and bool((state["b"] == -step).all()) \
        and state["meta"] == {"step": step}
    ck.close()
    return step, ok


def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path):
    rng = random.Random(1234)
    trials = 10
    dirs = [str(tmp_path / f"t{i}") for i in range(trials)]
    # all children at once (each pays the torch import once, in parallel), each killed at a seeded
    # random time, i.e. at a random point of its snapshot / flush / commit cycle
    logs = [d + ".log" for d in dirs]
    children = [subprocess.Popen([sys.executable, "-c", CHILD, d, log], stdout=subprocess.PIPE, text=True)
                for d, log in zip(dirs, logs)]
    restored = []
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        start = time.monotonic()
        for child, when in sorted(zip(children, sorted(rng.uniform(0.05, 3.0) for _ in dirs)), key=lambda c: c[1]):
            time.sleep(max(0.0, start + when - time.monotonic()))   # the kill time, not a synchronisation
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        for directory, log in zip(dirs, logs):
            with open(log) as f:
                lines = [x for x in f.read().splitlines() if x.startswith("committed ")]
            committed = max([int(x.split()[1]) for x in lines if x.split()[1:]] + [-1])
            disk_step, disk_ok = _check(directory, ("disk",))
            mem_step, mem_ok = _check(directory, ("memory", "disk"))
            assert disk_ok and (disk_step if disk_step is not None else -1) >= committed, (committed, disk_step)
            assert mem_ok and (mem_step or -1) >= (disk_step or -1), (disk_step, mem_step)
            restored.append(disk_step or -1)
    finally:
        for child, directory in zip(children, dirs):
            if child.poll() is None:
                child.kill()
                child.wait()
            shutdown_keeper(keeper_root(directory, 0))
    assert max(restored) >= 2, restored   # the trials did reach committed checkpoints
