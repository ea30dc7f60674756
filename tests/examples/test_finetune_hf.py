"""examples/finetune_hf.py through the Trainer's HF paths (sequence_parallel on a transformers
model, moe converting Mixtral's sparse blocks with from_hf, bf16, checkpoint and resume) at 2
processes: a run stopped at step 4 and resumed reaches the same step-6 loss as an uninterrupted one."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEDDLE = os.path.join(os.path.dirname(sys.executable), "heddle")


def _run(ckpt_dir, steps, *extra):
    cmd = [HEDDLE, "run", "-n", "2", os.path.join(ROOT, "examples", "finetune_hf.py"), "--model", "mixtral",
           "--steps", str(steps), "--seq-len", "64", "--ckpt-dir", str(ckpt_dir), "--ckpt-every", "2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _loss_at(out, step):
    found = re.findall(rf"^step {step}\s+loss ([0-9.]+)$", out, re.M)
    assert found, out
    return float(found[-1])


def test_mixtral_sp_moe_bf16_resume_matches_uninterrupted(tmp_path):
    straight = _run(tmp_path / "straight", 6)
    assert "MixtralForCausalLM, bf16, SP=2, MoE=fssdp" in straight
    first = _run(tmp_path / "resumed", 4)
    resumed = _run(tmp_path / "resumed", 6, "--resume")
    assert "resumed from step 4" in resumed, resumed
    assert _loss_at(resumed, 6) == _loss_at(straight, 6)
    assert _loss_at(straight, 6) < _loss_at(first, 4) + 1.0  # it trains (finite, no blow-up)
