"""Bitwise resume of examples/train_lm.py at world 2: SIGKILL both workers after step k, restart
with --resume (the keeper survived the kill and serves the memory snapshot), and the losses of
the remaining steps equal the uninterrupted run exactly."""

import importlib.util
import os
import signal

import pytest

from heddle.checkpoint import shutdown_keeper
from heddle.checkpoint.keeper import KeeperClient, keeper_root
from tests.conftest import DistributedTestError, run_distributed

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_lm.py")
ARGS = ["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--d-model", "32", "--layers", "2",
        "--heads", "2", "--log-every", "100"]


def _train(rank, world, argv, kill_after):
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    if kill_after is not None:
        import heddle

        step = heddle.Trainer.step

        def step_then_die(self):
            metrics = step(self)
            if self.step_count == kill_after:   # the save of this step has just started
                os.kill(os.getpid(), signal.SIGKILL)
            return metrics

        heddle.Trainer.step = step_then_die
    return example.main(argv)


def test_killed_run_resumes_bit_exactly(tmp_path):
    directory = str(tmp_path / "ck")
    reference = run_distributed(_train, 2, ARGS, None)[0]
    assert len(reference) == 8
    ck_args = ARGS + ["--ckpt-dir", directory, "--ckpt-every", "1", "--keep", "2"]
    try:
        with pytest.raises(DistributedTestError, match="exited with code -9|code -9"):
            run_distributed(_train, 2, ck_args, 5)
        keeper = KeeperClient(keeper_root(directory, 0))      # survived the workers' SIGKILL
        held = {step for rank, kind, step, _, _ in keeper.request("list") if kind == "own"}
        keeper.close()
        assert held and max(held) <= 5, held
        resumed = run_distributed(_train, 2, ck_args + ["--resume"], None)[0]
    finally:
        shutdown_keeper(keeper_root(directory, 0))
    start = 8 - len(resumed)
    assert 1 <= start <= 5, start
    assert resumed == reference[start:], (start, resumed, reference)
