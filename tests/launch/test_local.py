"""heddle's one-node launcher, run in-process (its workers are small scripts without torch, so
each launch costs a fraction of a second): exit codes, signals, restarts, whole output lines."""

import os
import re
import signal
import threading
import time

import pytest

from heddle.launch.local import LocalLauncher

PIDS_SCRIPT = """
import os, sys, time
path = sys.argv[1] + "." + os.environ["RANK"]
with open(path + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_exit_code_is_the_launchers(tmp_path, capfd):
    script = tmp_path / "exit3.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n")
    assert LocalLauncher(str(script), [], 2).run() == 3  # rank 0 (sleeping 120 s) was stopped
    assert "heddle run: rank 1 exited with code 3; stopping the other 1 worker(s)" in capfd.readouterr().err


def test_killed_worker_counts_as_128_plus_signal(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert LocalLauncher(str(script), [], 1).run() == 128 + signal.SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_the_launcher_stops_every_worker(tmp_path, sig, capfd):
    script = tmp_path / "pids.py"
    script.write_text(PIDS_SCRIPT)
    prefix = str(tmp_path / "pid")
    pids = []

    def signal_when_started():
        deadline = time.monotonic() + 60
        while not all(os.path.exists(f"{prefix}.{r}") for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.02)
        pids.extend(int(open(f"{prefix}.{r}").read()) for r in range(2))
        os.kill(os.getpid(), sig)  # the handler runs on the main thread, inside run()

    sender = threading.Thread(target=signal_when_started)
    sender.start()
    try:
        code = LocalLauncher(str(script), [prefix], 2).run()
    finally:
        sender.join()
        for p in pids:
            if _running(p):
                os.kill(p, signal.SIGKILL)
    assert code == 128 + sig
    assert len(pids) == 2 and not any(_running(p) for p in pids)
    assert f"{sig.name} received: stopping 2 worker(s)" in capfd.readouterr().err


def test_max_restarts_restarts_every_worker(tmp_path, capfd):
    script = tmp_path / "flaky.py"
    script.write_text("import os, sys\n"
                      "attempt = int(os.environ['TORCHELASTIC_RESTART_COUNT'])\n"
                      "print('attempt', attempt, 'rank', os.environ['RANK'], 'max', os.environ['TORCHELASTIC_MAX_RESTARTS'])\n"
                      "sys.exit(5 if attempt == 0 and os.environ['RANK'] == '0' else 0)\n")
    assert LocalLauncher(str(script), [], 2, max_restarts=1).run() == 0
    out, err = capfd.readouterr()
    assert "restart 1 of 1" in err
    assert sorted(out.splitlines())[-2:] == ["attempt 1 rank 0 max 1", "attempt 1 rank 1 max 1"]
    assert LocalLauncher(str(script), [], 2, max_restarts=0).run() == 5


def test_torchrun_variables(tmp_path, capfd):
    script = tmp_path / "env.py"
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS"]
    script.write_text(f"import os\nprint(' '.join(os.environ.get(n, '-') for n in {names!r}))\n")
    assert LocalLauncher(str(script), [], 2).run() == 0
    rows = sorted(capfd.readouterr().out.splitlines())
    omp = os.environ.get("OMP_NUM_THREADS", "1")
    assert rows == [f"0 0 2 2 0 127.0.0.1 True {omp}", f"1 1 2 2 0 127.0.0.1 True {omp}"]


LINES_SCRIPT = """
import os
rank = os.environ["RANK"]
for i in range(300):
    print("rank", rank, "line", i, "of", 300, "end")
"""


def test_lines_of_two_ranks_never_share_a_line(tmp_path, capfd):
    """The dist.md snippet's output from both ranks used to land on one line (python -u writes
    each piece of a print apart); workers' stdout is now line-buffered."""
    script = tmp_path / "lines.py"
    script.write_text(LINES_SCRIPT)
    assert LocalLauncher(str(script), [], 2).run() == 0
    lines = capfd.readouterr().out.splitlines()
    pattern = re.compile(r"^rank [01] line \d+ of 300 end$")
    assert len(lines) == 600 and all(pattern.match(line) for line in lines), \
        [line for line in lines if not pattern.match(line)][:5]


def test_module_target_and_arguments(tmp_path, capfd):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "job.py").write_text("import sys\nif __name__ == '__main__':\n    print('args', sys.argv[1:])\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert LocalLauncher("mypkg.job", ["--x", "1"], 1, module=True).run() == 0
    finally:
        os.chdir(cwd)
    assert "args ['--x', '1']" in capfd.readouterr().out
