"""The collective watchdog: names the rank that stalled and ends the job within the timeout."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.conftest import run_distributed

BIN = os.path.dirname(sys.executable)
STALL_SCRIPT = os.path.join(os.path.dirname(__file__), "stall_script.py")


def _late_rank(rank, world_size, late_rank, delay_s):
    import heddle.dist as hd
    from heddle.dist.watchdog import start_watchdog

    messages = []
    watchdog = start_watchdog(1.0, on_stall=messages.append)
    hd.all_reduce(torch.ones(2))  # everyone has entered one collective
    if rank == late_rank:
        time.sleep(delay_s)       # busy outside any collective, heart still beating
    hd.barrier()
    watchdog.close()
    return messages


def test_names_the_rank_that_has_not_entered():
    out = run_distributed(_late_rank, 3, 2, 3.0, timeout=120)
    late, (waiting0, waiting1) = out[2], (out[0], out[1])
    # The late rank itself was never blocked; it ends because a peer's watchdog fired.
    assert len(late) == 1 and "watchdog fired" in late[0], late
    for messages in (waiting0, waiting1):
        assert len(messages) == 1, messages
        text = messages[0]
        assert "blocked in barrier (collective #2)" in text
        assert "rank 2 has not entered it" in text and "last collective it entered: all_reduce (#1)" in text
        assert "\n" not in text


def _quiet(rank, world_size):
    import heddle.dist as hd
    from heddle.dist.watchdog import start_watchdog

    messages = []
    watchdog = start_watchdog(0.5, on_stall=messages.append)
    for _ in range(20):
        hd.all_reduce(torch.ones(2))
        time.sleep(0.05)
    if rank == 0:
        watchdog.close()  # a rank that finished is never judged stale
        time.sleep(1.5)
    else:
        time.sleep(1.5)
        watchdog.close()
    return messages


def test_healthy_job_and_closed_peer_never_fire():
    assert run_distributed(_quiet, 2, timeout=120) == [[], []]


def test_bad_timeout():
    from heddle.dist.watchdog import Watchdog

    for bad in (0, -1.0, True, "3"):
        with pytest.raises(ValueError, match="timeout_s="):
            Watchdog(bad)


def test_sigstop_ends_the_job_within_the_timeout_and_names_the_rank():
    timeout_s = 3.0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(STALL_RANK="1", STALL_AFTER_S="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([os.path.join(BIN, "heddle"), "run", "-n", "3", "--watchdog-timeout", str(timeout_s),
                             STALL_SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr))
    reader.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("SIGSTOP 1"), (line, "".join(stderr))
        stopped = time.time()
        code = proc.wait(timeout=120)
        elapsed = time.time() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    text = "".join(stderr)
    assert code == 124, text
    watchdog_lines = [l for l in text.splitlines() if l.startswith("heddle watchdog")]
    assert watchdog_lines, text
    assert all("rank 1 stalled: no heartbeat" in l or "rank 1 has not entered it" in l for l in watchdog_lines), text
    assert "last collective it entered: all_reduce" in text
    # Bounded: within the timeout plus the launcher's teardown (a loose bound: the machine is shared).
    assert elapsed < timeout_s + 30, (elapsed, text)
    print(f"SIGSTOP -> job end: {elapsed:.2f} s at timeout {timeout_s} s")
