"""Every file in examples/configs trains at tiny size through examples/train_lm.py --config, on
2 gloo processes (the file's sections as written; only the model size and step count come from
flags, see run_configs.TINY), and its metrics log has one row per step."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heddle.config import load_config
from heddle.loggers import COLUMNS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.*"))
FEATURES = ("sequence_parallel", "adaptive_sequence_parallel", "moe", "compression", "checkpoint", "fsdp", "bf16")


def test_one_config_per_feature_and_a_combined_one():
    stems = {c.stem for c in CONFIGS}
    assert set(FEATURES) <= stems and "combined" in stems
    combined = load_config(ROOT / "examples" / "configs" / "combined.toml")
    on = [name for name in FEATURES[:5] if getattr(combined, name) is not None]
    assert len(on) >= 3, on
    for config in CONFIGS:
        load_config(config)  # unknown keys and wrong types fail here, before any worker starts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train every config; a launch that fails on one file is restarted for the files after it."""
    out = tmp_path_factory.mktemp("configs")
    results, logs, left = {}, {}, list(CONFIGS)
    while left:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(Path(__file__).with_name("run_configs.py")), str(out), *map(str, left)]
        run = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        done = []
        for config in left:
            per_rank = [out / f"{config.name}.r{r}.json" for r in (0, 1)]
            if not any(p.exists() for p in per_rank):
                break
            parsed = [json.loads(p.read_text()) for p in per_rank if p.exists()]
            errors = [p["traceback"] for p in parsed if p["status"] == "error"]
            results[config.name] = errors[0] if errors else ("ok" if len(parsed) == 2 else "one rank never finished")
            logs[config.name] = run.stdout[-3000:] + run.stderr[-3000:]
            done.append(config)
            if errors:
                break
        if not done:  # the launch died before any file: report it on the first one
            results[left[0].name] = f"launch exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
            done.append(left[0])
        left = [c for c in left if c not in done]
    return out, results, logs


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_trains(config, runs):
    out, results, logs = runs
    assert results[config.name] == "ok", f"{config.name}:\n{results[config.name]}\n{logs.get(config.name, '')}"
    with open(out / config.stem / "metrics" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert list(rows[0])[:len(COLUMNS)] == list(COLUMNS)  # the documented columns, in order
    assert all(float(r["loss"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    cfg = load_config(config)
    if cfg.checkpoint is not None:
        assert any((out / config.stem / cfg.checkpoint.directory).iterdir())
        assert all(r["checkpoint_stall_s"] != "" for r in rows)
