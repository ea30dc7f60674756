"""The sharding benchmark (heddle bench sharding) at a tiny size, 2 processes: the four
implementations train the same GPT to the same losses, and the bytes read from the tensors and
the ledger are what sharding predicts (so the measurement code can fail: a scenario that counted
nothing, or missed FSDP2's / DeepSpeed's collectives, would not pass)."""

import argparse
import json

from heddle.bench import registry
from heddle.bench.runner import add_common_options
from tests.conftest import run_distributed

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--warmup", "1", "--trials", "2"]


def _bench(rank, world_size):
    from heddle.bench.scenario import BenchContext

    scenario = registry.get("sharding")
    parser = argparse.ArgumentParser()
    add_common_options(parser)
    scenario.add_options(parser)
    return scenario.run(BenchContext(rank, world_size), parser.parse_args(TINY))


def test_sharding_scenario_tiny():
    world = 2
    rows = run_distributed(_bench, world, timeout=600)[0]
    by = {r["impl"]: r for r in rows}
    assert list(by) == ["ddp", "fsdp", "zero2", "zero3"]
    param_bytes = by["ddp"]["params"] * 4
    assert all(r["params"] == by["ddp"]["params"] for r in rows)            # the same GPT
    # DDP: every rank holds all parameters, gradients and both AdamW moments (+ 0-d step counters)
    assert by["ddp"]["params_mb"] * 1e6 == param_bytes and by["ddp"]["grads_mb"] * 1e6 == param_bytes
    assert 2 * param_bytes <= by["ddp"]["optimizer_mb"] * 1e6 < 2 * param_bytes + 4096
    # FSDP2 holds 1/N of each; ZeRO-2 and ZeRO-3 keep 1/N of the optimizer state and of the fp32
    # master copy ("other"), ZeRO-2 the full parameters (ZeRO-3 too at this size: every tensor is
    # under its default persistence threshold of 1e5 elements, so it stays gathered)
    assert by["fsdp"]["state_mb"] <= 1.1 / world * by["ddp"]["state_mb"]
    assert by["zero2"]["params_mb"] * 1e6 >= param_bytes
    for zero in ("zero2", "zero3"):
        assert by[zero]["optimizer_mb"] * 1e6 <= 1.1 / world * 2 * param_bytes + 4096, by[zero]
        assert 0 < by[zero]["other_mb"] * 1e6 <= 1.1 / world * param_bytes + 4096, by[zero]
    # bytes on the wire: at least the gradient reduction ((N-1)/N of the gradients per rank), for
    # FSDP2 and DeepSpeed only visible through the tap into torch.distributed
    for r in rows:
        ops = json.loads(r["comm_ops_json"])
        assert r["comm_mb_per_step"] * 1e6 >= (world - 1) / world * param_bytes, (r["impl"], ops)
    assert "all_gather" in json.loads(by["fsdp"]["comm_ops_json"])
    # the same training: every step's loss within fp32 noise of DDP's
    for r in rows:
        losses = json.loads(r["losses_json"])
        assert len(losses) == 4 and all(loss == loss for loss in losses), r["impl"]
        assert r["max_loss_rel_diff"] <= 1e-4, (r["impl"], losses, json.loads(by["ddp"]["losses_json"]))
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
