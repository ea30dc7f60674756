"""End to end: `heddle run` (torchrun underneath) and `mpiexec -n 2` bootstrapping heddle."""

import json
import os
import shutil
import subprocess
import sys


SCRIPT = os.path.join(os.path.dirname(__file__), "allreduce_script.py")
BIN = os.path.dirname(sys.executable)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _read(prefix, n):
    return [json.load(open(f"{prefix}.{r}")) for r in range(n)]


def test_heddle_run_two_processes(tmp_path):
    out = str(tmp_path / "res")
    proc = subprocess.run([os.path.join(BIN, "heddle"), "run", "-n", "2", SCRIPT, out],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _read(out, 2)
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in res)
    assert [r["local_rank"] for r in res] == [0, 1]


def test_heddle_run_reports_failure(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit(3)\n")
    proc = subprocess.run([os.path.join(BIN, "heddle"), "run", "-n", "2", str(bad)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    proc = subprocess.run([os.path.join(BIN, "heddle"), "run", "-n", "0", str(bad)],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--nproc='0'" in proc.stderr


def test_mpiexec_bootstraps_through_init_distributed(tmp_path):
    mpiexec = shutil.which("mpiexec", path=BIN)
    assert mpiexec is not None, "mpiexec is missing: the test extra installs the mpich wheel"
    out = str(tmp_path / "res")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, SCRIPT, out],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = _read(out, 2)
    assert sorted(r["rank"] for r in res) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in res)
    assert sorted(r["local_rank"] for r in res) == [0, 1]


def test_heddle_env_and_help():
    proc = subprocess.run([os.path.join(BIN, "heddle"), "env", "--json"], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "gloo" and info["cpus"] >= 1 and info["torch"]
    assert info["launcher"].startswith("single")
    proc = subprocess.run([os.path.join(BIN, "heddle"), "nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr
