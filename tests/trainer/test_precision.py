"""bf16: 50 steps of the example GPT (examples/train_lm.py, small) under DDP (autocast) and under
FSDP2 (MixedPrecisionPolicy: bf16 parameters for compute, fp32 reduction, fp32 master weights and
AdamW state) track the fp32 loss within 2%, at world 2: the mean loss of every window of 10 steps
within 2% of fp32's (single steps of a 8-sequence batch are noisier; their largest gap is printed)."""

import importlib.util
import os

from tests.conftest import run_distributed

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_lm.py")
ARGS = ["--steps", "50", "--batch-size", "8", "--seq-len", "32", "--d-model", "32", "--layers", "2", "--heads", "2",
        "--log-every", "1000", "--lr", "3e-3"]


def _runs(rank, world):
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return {name: example.main(ARGS + flags) for name, flags in (
        ("fp32", []), ("bf16_ddp", ["--precision", "bf16"]),
        ("bf16_fsdp", ["--precision", "bf16", "--data-parallel", "fsdp"]))}


def test_bf16_tracks_fp32():
    runs = run_distributed(_runs, 2)[0]
    fp32 = runs["fp32"]
    assert fp32[-1] < fp32[0] - 1.0, f"the fp32 run did not train: {fp32[0]:.3f} -> {fp32[-1]:.3f}"
    for name in ("bf16_ddp", "bf16_fsdp"):
        run = runs[name]
        assert len(run) == 50
        step_gap = max(abs(a - b) / b for a, b in zip(run, fp32))
        window_gap = max(abs(sum(run[i:i + 10]) - sum(fp32[i:i + 10])) / sum(fp32[i:i + 10]) for i in range(0, 50, 10))
        print(f"{name}: relative loss gap vs fp32: 10-step windows {window_gap:.4f}, single steps {step_gap:.4f}, "
              f"last loss {run[-1]:.4f} vs {fp32[-1]:.4f}")
        assert window_gap < 0.02, f"{name}: 10-step mean loss gap {window_gap:.4f} vs fp32"
