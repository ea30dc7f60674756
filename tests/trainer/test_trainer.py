"""Trainer: a multi-process data-parallel step equals the single-process step on the same
global batch (fp64), with uneven token counts, gradient accumulation and global-norm clipping."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import heddle
from heddle.data import WindowSampler
from heddle.models import GPT, GPTConfig
from tests.conftest import run_distributed

GLOBAL_BATCH, SEQ = 12, 16


def _train(rank, world, accum, steps, clip, mean_loss):
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = heddle.Trainer(model, opt, config=heddle.TrainerConfig(
        grad_accum_steps=accum, max_grad_norm=clip, progress=False, bucket_cap_mb=0.01))
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    sampler = WindowSampler(tokens, SEQ, GLOBAL_BATCH, seed=3, dp_rank=rank, dp_size=world)
    losses, norms = [], []
    for step in range(steps):
        x, y = sampler.next()
        # Mask targets unevenly so ranks hold different token counts: the loss must still be
        # the global token mean.
        drop = torch.rand((GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step)) < 0.3
        per = GLOBAL_BATCH // world
        y = y.masked_fill(drop[rank * per:(rank + 1) * per], -100) if not mean_loss else y
        for mx, my in zip(x.chunk(accum), y.chunk(accum)):
            logits = trainer.model(mx)
            if mean_loss:
                trainer.backward(F.cross_entropy(logits.flatten(0, 1), my.flatten()))
            else:
                loss = F.cross_entropy(logits.flatten(0, 1), my.flatten(), ignore_index=-100, reduction="sum")
                trainer.backward(loss, num_tokens=(my != -100).sum())
        m = trainer.step()
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    trainer.close()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"losses": losses, "norms": norms, "params": params}


def _reference(accum=1, steps=3, clip=0.5, mean_loss=False):
    # The mask above depends on the rank's rows; world 1 holds all rows in the same order.
    return run_distributed(_train, 1, accum, steps, clip, mean_loss)[0]


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("world,accum", [(2, 1), (3, 1), (2, 2)])
def test_data_parallel_matches_single_process(reference, world, accum):
    results = run_distributed(_train, world, accum, 3, 0.5, False)
    for rank, res in enumerate(results):
        np.testing.assert_allclose(res["losses"], reference["losses"], rtol=1e-12, atol=0)
        np.testing.assert_allclose(res["norms"], reference["norms"], rtol=1e-10, atol=0)
        np.testing.assert_allclose(res["params"], reference["params"], rtol=0, atol=1e-12,
                                   err_msg=f"rank {rank}")
    assert reference["norms"][0] > 0.5, "clipping was not exercised"


def test_mean_losses_weight_ranks_equally():
    ref = _reference(mean_loss=True, steps=2)
    results = run_distributed(_train, 2, 1, 2, 0.5, True)
    np.testing.assert_allclose(results[0]["params"], ref["params"], rtol=0, atol=1e-12)


def _bad_use(rank, world):
    model = torch.nn.Linear(2, 1).double()
    trainer = heddle.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             config=heddle.TrainerConfig(progress=False))
    out = []
    try:
        trainer.step()
    except ValueError as e:
        out.append(str(e))
    loss = model(torch.ones(3, 2, dtype=torch.float64)).sum()
    trainer.backward(loss, num_tokens=3)
    try:
        trainer.backward(model(torch.ones(1, 2, dtype=torch.float64)).sum(), num_tokens=1)
    except ValueError as e:
        out.append(str(e))
    trainer.close()
    return out


def test_misuse_raises():
    msgs = run_distributed(_bad_use, 2)[0]
    assert "step() after 0 backward() calls" in msgs[0]
    assert "grad_accum_steps=1" in msgs[1]
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        heddle.TrainerConfig(grad_accum_steps=0)


def test_sections_build_plugins():
    import dataclasses

    from heddle.plugins import SECTIONS
    from heddle.plugins.base import TrainerPlugin
    from heddle.trainer import TrainerConfig, _build_plugin

    # the registry: every section is a TrainerConfig field and its plugin class carries its Config
    assert list(SECTIONS) == ["sequence_parallel", "adaptive_sequence_parallel", "moe", "compression", "checkpoint"]
    assert set(SECTIONS) <= {f.name for f in dataclasses.fields(TrainerConfig)}
    assert all(dataclasses.is_dataclass(cls.Config) and issubclass(cls, TrainerPlugin) for cls in SECTIONS.values())

    @dataclasses.dataclass
    class Config:
        size: int = 2

    class Plugin(TrainerPlugin):
        name = "fake"

    Plugin.Config = Config
    assert _build_plugin("fake_section", True, Plugin).config == Config()
    assert _build_plugin("fake_section", {"size": 4}, Plugin).config.size == 4
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):
        _build_plugin("fake_section", {"bogus": 1}, Plugin)
    with pytest.raises(TypeError, match="expected"):
        _build_plugin("fake_section", 3, Plugin)


def test_parallel_dims_validate():
    from heddle.dist.mesh import ParallelDims

    assert ParallelDims.build("fsdp", 8, sp=2) == ParallelDims(1, 4, 2, 8)
    assert ParallelDims.build("ddp", 8, sp=2) == ParallelDims(4, 1, 2, 8)
    assert ParallelDims.build("hsdp", 8, sp=2, dp_shard=2) == ParallelDims(2, 2, 2, 8)
    assert ParallelDims.build("hsdp", 8, dp_replicate=4) == ParallelDims(4, 2, 1, 8)
    with pytest.raises(ValueError, match=r"dp_replicate=2 x dp_shard=2 x sp=1 = 4 ranks, but the world size is 6"):
        ParallelDims(2, 2, 1, 6)
    with pytest.raises(ValueError, match=r"sp=4 must divide the world size 6"):
        ParallelDims.build("fsdp", 6, sp=4)
    with pytest.raises(ValueError, match=r"dp_shard=4 must divide world / sp = 6 / 1 = 6"):
        ParallelDims.build("hsdp", 6, dp_shard=4)
    with pytest.raises(ValueError, match=r"only data_parallel='hsdp' takes them"):
        ParallelDims.build("fsdp", 4, dp_shard=2)
    with pytest.raises(ValueError, match=r"data_parallel='zero3'"):
        heddle.TrainerConfig(data_parallel="zero3")
    with pytest.raises(ValueError, match=r"precision='fp8'"):
        heddle.TrainerConfig(precision="fp8")
    with pytest.raises(ValueError, match=r"on_nonfinite='ignore'"):
        heddle.TrainerConfig(on_nonfinite="ignore")


def test_train_lm_config_file_and_flag_overrides(tmp_path):
    """examples/train_lm.py --config FILE: the file's values, with the flags given on the command
    line on top (flags not given leave the file alone); without a file every flag applies."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "train_lm", os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_lm.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = str(tmp_path / "run.toml")
    heddle.TrainerConfig(grad_accum_steps=4, max_grad_norm=0.25, data_parallel="fsdp",
                         moe={"num_experts": 6}).to_file(path)
    args, given = example.parse_args(["--config", path, "--accum", "2", "--precision", "bf16"])
    cfg = example.trainer_config(args, given)
    assert (cfg.grad_accum_steps, cfg.max_grad_norm, cfg.data_parallel, cfg.precision) == (2, 0.25, "fsdp", "bf16")
    assert cfg.moe.num_experts == 6 and cfg.compression is None
    args, given = example.parse_args(["--adaptive-sp", "--compress", "identity", "--clip", "0.5"])
    cfg = example.trainer_config(args, given)
    assert cfg.adaptive_sequence_parallel is not None and cfg.compression.compressor == "identity"
    assert cfg.max_grad_norm == 0.5 and cfg.moe is None and cfg.data_parallel == "ddp"
