"""The silent bugs of issue 11 item 8, each with a test that fails on the old code:

- adaptive SP with compression summed the gradients twice (grad norm doubled with identity);
- examples/train_lm.py --adaptive-sp ignored --resume (and overwrote the checkpoints);
- moe.aux_loss_weight was never read (tests/trainer/test_features.py: the *_aux MoE cases);
- without the SP section dp_rank was unset (test_features.py::_layout_cases, test_docs_snippet.py)."""

import importlib.util
import os

import torch

import heddle
from tests.conftest import run_distributed
from tests.trainer.common import loss_sum, tiny_gpt

LENGTHS = [9, 4, 13, 6, 3, 11, 7]
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_lm.py")


def _documents():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (n + 1,), generator=g) for n in LENGTHS]


def _adaptive_norms(rank, world):
    ref = tiny_gpt()
    docs = _documents()
    loss = sum(loss_sum(ref(d[None, :-1]), d[None, 1:]) for d in docs)
    (loss / sum(LENGTHS)).backward()
    ref_norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
    out = {"ref": ref_norm}
    for name, comp in (("plain", None), ("identity", {"compressor": "identity", "feedback": "none", "start_iter": 0})):
        cfg = heddle.TrainerConfig(max_grad_norm=1e9, progress=False, compression=comp, adaptive_sequence_parallel={
            "cost_model": "a100-80g-ib", "max_tokens_per_device": 8, "planner": "thread"})
        trainer = heddle.Trainer(tiny_gpt(), lambda p: torch.optim.SGD(p, lr=0.1), config=cfg)
        for batch in trainer.micro_batches({"documents": docs}):
            logits = trainer.model(batch["tokens"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
            trainer.backward(loss_sum(logits, batch["targets"]), num_tokens=(batch["targets"] != -100).sum())
        out[name] = trainer.step()["grad_norm"]
        out[name + "_degrees"] = sorted({len(r) for r, _ in trainer.plugin("adaptive_sequence_parallel").plan.groups})
        trainer.close()
    return out


def _both(rank, world, runs):
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    norms = _adaptive_norms(rank, world)
    return norms, [example.main(argv) for argv in runs]   # one after the other in the same processes


def test_adaptive_sp_sums_once_and_resumes(tmp_path):
    """--adaptive-sp --compress identity: the gradient norm of one process (not twice it);
    --adaptive-sp --resume: the second run continues at the first run's last step."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "heddle", "sequence", "adaptive")
    args = ["--adaptive-sp", "--asp-cost-model", "a100-80g-ib", "--asp-planner", "thread", "--asp-source", src,
            "--asp-tokens", "256", "--asp-max-len", "64", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--log-every", "100", "--ckpt-dir", str(tmp_path / "ck")]
    results = run_distributed(_both, 2, [args + ["--steps", "2"], args + ["--steps", "3", "--resume"]])
    for r, _ in results:
        assert 2 in r["plain_degrees"], "no Ulysses group of 2 in the plan"
        assert abs(r["plain"] - r["ref"]) < 1e-10 * r["ref"], r
        # the compressed exchange carries fp32 values: fp32 rounding, not the old factor 2
        assert abs(r["identity"] - r["ref"]) < 1e-6 * r["ref"], f"compression under adaptive SP: {r}"
    first, resumed = results[0][1]
    # the old adaptive loop ignored --resume: it trained 3 steps from scratch over the checkpoints
    assert len(first) == 2 and len(resumed) == 1, (first, resumed)
    assert os.path.isdir(tmp_path / "ck")
