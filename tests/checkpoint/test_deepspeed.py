"""heddle's DeepSpeed checkpoint engine, switched on by the DeepSpeed config, on CPU (gloo)."""

import os

import pytest

from tests.conftest import run_distributed

pytest.importorskip("deepspeed")


def _ds_worker(rank, world, directory):
    import deepspeed
    import torch

    from heddle.checkpoint.deepspeed_engine import HeddleCheckpointEngine, install

    config = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2,
              "heddle_checkpoint": {"enabled": True, "decoupled": True}}

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                                          config=config)
        assert install(engine) and isinstance(engine.checkpoint_engine, HeddleCheckpointEngine)
        return engine

    def train(engine, steps):
        for _ in range(steps):
            x = torch.randn(2, 8)
            engine.backward(engine(x).square().sum())
            engine.step()

    engine = build(0)
    train(engine, 2)
    engine.save_checkpoint(directory, tag="t2")
    saved = [p.detach().clone() for p in engine.module.parameters()]
    saved_opt = [s["exp_avg"].clone() for s in engine.optimizer.state_dict()["state"].values()]
    train(engine, 2)   # the decoupled commit runs before the next optimizer step
    committed = os.path.exists(os.path.join(directory, "t2", "HEDDLE_COMMIT"))
    engine2 = build(1)
    engine2.load_checkpoint(directory, tag="t2")
    same = all(torch.equal(a, b) for a, b in zip(engine2.module.parameters(), saved))
    same_opt = all(torch.equal(s["exp_avg"], r) for s, r in zip(engine2.optimizer.state_dict()["state"].values(),
                                                                   saved_opt))
    engine.checkpoint_engine.cleanup()
    engine2.checkpoint_engine.cleanup()
    return {"committed": committed, "same": same, "same_opt": same_opt,
            "files": sorted(os.listdir(os.path.join(directory, "t2")))}


def test_deepspeed_engine_round_trip(tmp_path):
    results = run_distributed(_ds_worker, 2, str(tmp_path / "ds"))
    for r in results:
        assert r["committed"] and r["same"] and r["same_opt"], r
    assert "HEDDLE_COMMIT" in results[0]["files"] and any(f.endswith("model_states.pt") for f in results[0]["files"])


def test_deepspeed_engine_refuses_uncommitted_and_corrupt(tmp_path):
    import torch

    from heddle.checkpoint import CorruptCheckpoint
    from heddle.checkpoint.deepspeed_engine import HeddleCheckpointEngine
    from deepspeed.runtime.checkpoint_engine import CheckpointCommitInfo

    eng = HeddleCheckpointEngine()
    info = CheckpointCommitInfo(tag="a", save_dir=str(tmp_path), save_latest=False)
    eng.create(info)
    os.makedirs(tmp_path / "a")
    path = str(tmp_path / "a" / "x.pt")
    eng.save({"w": torch.arange(1000.0), "n": 3}, path)
    with pytest.raises(CorruptCheckpoint, match="HEDDLE_COMMIT"):   # not committed yet
        eng.load(path)
    eng.commit(info)
    assert eng.load(path)["n"] == 3 and torch.equal(eng.load(path)["w"], torch.arange(1000.0))
    with open(path, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(CorruptCheckpoint, match="CRC-32"):
        eng.load(path)
    eng.cleanup()
