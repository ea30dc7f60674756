"""Every feature under FSDP2 against a single-process fp64 reference, and the Trainer's step
contract (non-finite skip, LR scheduler, fp16 loss scale, MoE aux loss), in as few spawned runs
as possible: one at world 2, one at world 3.

The single-process references run inside each worker on plain torch (MoE layers on a one-rank
group), so no extra process is spawned for them."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist

import heddle
from heddle.moe.apply import replace_mlps
from tests.conftest import run_distributed
from tests.trainer.common import full_params, max_error, reference, tiny_gpt, train

STEPS, CLIP = 5, 0.5
MOE = dict(num_experts=4, top_k=2, reshard_every=2, overlap=False)


def _moe_reference(solo_group, aux_weight, world):
    model = tiny_gpt()
    replace_mlps(model, num_experts=MOE["num_experts"], top_k=MOE["top_k"], group=solo_group, seed=0)
    return reference(STEPS, CLIP, model=model, aux_weight=aux_weight, chunks=world)


def _moe_cases(rank, world, errors):
    # one-rank groups for the references (every rank creates every group, in the same order)
    solos = [dist.new_group([r]) for r in range(world)]
    for aux in (0.0, 0.05):
        ref = _moe_reference(solos[rank], aux, world)
        for strategy in ("fssdp", "ep"):
            for dp in ("fsdp",):  # MoE under DDP: tests/moe/test_training.py
                cfg = heddle.TrainerConfig(data_parallel=dp, max_grad_norm=CLIP, progress=False,
                                           moe=dict(MOE, strategy=strategy, aux_loss_weight=aux))
                trainer, metrics = train(cfg, STEPS)
                losses = [m["loss"] for m in metrics]
                norms = [m["grad_norm"] for m in metrics]
                dense = {k: v for k, v in full_params(trainer.module).items() if ".mlp.experts" not in k}
                ref_dense = {k: v for k, v in ref["params"].items() if ".mlp.experts" not in k}
                trainer.close()
                err = max(max_error(dense, ref_dense), max(abs(a - b) for a, b in zip(losses, ref["losses"])),
                          max(abs(a - b) for a, b in zip(norms, ref["norms"])))
                name = f"moe_{strategy}_{dp}" + ("_aux" if aux else "")
                assert err < 1e-10, f"{name}: error {err:.3g} vs one process"
                errors[name] = err


def _world3(rank, world):
    errors = {}
    _moe_cases(rank, world, errors)
    return errors


def test_fsdp_moe_world3():
    errors = run_distributed(_world3, 3)[0]
    print({k: f"{v:.2e}" for k, v in errors.items()})


# -- world 2: MoE, compression, non-finite skip, scheduler, precision, layout --------------------------
def _skip_nan_cases(rank, errors):
    ref = reference(STEPS, CLIP, skip={2})
    for dp in ("ddp", "fsdp"):
        cfg = heddle.TrainerConfig(data_parallel=dp, max_grad_norm=CLIP, progress=False)
        trainer, metrics = train(cfg, STEPS + 1, poison=lambda step, r: step == 2 and r == 1)
        skipped = [m["skipped"] for m in metrics]
        assert skipped == [0, 0, 1, 0, 0, 0], (dp, rank, skipped)  # on every rank, rank 0's loss was finite
        assert metrics[-1]["skipped_steps"] == 1 and trainer.step_count == STEPS
        assert all(math.isfinite(m["loss"]) for i, m in enumerate(metrics) if i != 2)
        errors[f"skip_nan_{dp}"] = max_error(full_params(trainer.module), ref["params"])
        assert errors[f"skip_nan_{dp}"] < 1e-10, errors
        trainer.close()
    cfg = heddle.TrainerConfig(on_nonfinite="raise", progress=False)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(cfg, 3, poison=lambda step, r: step == 1 and r == 0)


def _scheduler_cases(rank, errors):
    def factory(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    trainer, metrics = train(heddle.TrainerConfig(data_parallel="fsdp", progress=False), 3, lr_scheduler=factory,
                             poison=lambda step, r: step == 1)
    lrs = [m["lr"] for m in metrics]
    # stepped with the optimizer: a skipped step (the 2nd) leaves it alone
    assert lrs == pytest.approx([0.005, 0.005, 0.0025]), lrs
    state = trainer.state_dict()
    assert state["lr_scheduler"]["last_epoch"] == 2
    fresh = heddle.Trainer(tiny_gpt(), lambda p: torch.optim.AdamW(p, lr=0.01), lr_scheduler=factory,
                           config=heddle.TrainerConfig(data_parallel="fsdp", progress=False))
    fresh.load_state_dict(state)
    assert fresh.lr_scheduler.last_epoch == 2 and fresh.step_count == 2
    trainer.close()
    fresh.close()


def _fp16_cases(rank, errors, tmp):
    # fp32 master weights, fp16 autocast: an initial scale of 2^24 overflows the fp16 backward, so the
    # first steps are skipped with the scale halving each time (no raise: under fp16 an overflow is
    # the scaler's job); the scale is saved in the checkpoint and restored by resume()
    cfg = dict(precision="fp16", loss_scale=2.0 ** 24, progress=False,
               checkpoint={"directory": tmp, "levels": ("disk",)})
    logs = tmp + "-logs"
    trainer, metrics = train(heddle.TrainerConfig(**cfg, on_nonfinite="raise", log_dir=logs), 2,
                             model=tiny_gpt().float(), optimizer_steps=True)
    assert metrics[0]["skipped"] == 1 and metrics[0]["loss_scale"] == 2.0 ** 23, metrics[0]
    assert trainer.step_count == 2 and all(m["loss"] < 6 for m in metrics if not m["skipped"])
    scale = trainer.loss_scale
    errors["fp16_skipped_before_first_step"] = float(trainer.skipped_steps)
    trainer.checkpointer.wait()
    trainer.close()
    if rank == 0:  # rank 0 logs every step's metrics, skipped ones included
        with open(os.path.join(logs, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == len(metrics) and rows[-1]["skipped_steps"] == trainer.skipped_steps
        for key in ("loss", "tokens_per_s", "grad_norm", "bytes_sent", "checkpoint_stall_s", "skipped_steps"):
            assert key in rows[-1], (key, sorted(rows[-1]))
    else:
        assert not os.path.exists(os.path.join(logs, "rank1"))
    again = heddle.Trainer(tiny_gpt().float(), lambda p: torch.optim.AdamW(p, lr=0.01),
                           config=heddle.TrainerConfig(**cfg))
    assert again.loss_scale == 2.0 ** 24
    assert again.resume() == 2 and again.loss_scale == scale and again.skipped_steps == trainer.skipped_steps
    again.close()


def _compression_cases(rank, errors):
    plain, _ = train(heddle.TrainerConfig(data_parallel="fsdp", max_grad_norm=CLIP, progress=False), STEPS)
    ident, m = train(heddle.TrainerConfig(data_parallel="fsdp", max_grad_norm=CLIP, progress=False, compression=dict(
        compressor="identity", feedback="none", start_iter=0)), STEPS)
    a, b = full_params(plain.module), full_params(ident.module)
    assert all(torch.equal(a[k], b[k]) for k in a), "Identity under FSDP2 is not bit-identical to plain FSDP2"
    errors["compress_identity_fsdp"] = max_error(a, b)
    plain.close()
    ident.close()
    # a NaN on one rank: the skipped step leaves the compressor's error feedback as it was on every
    # rank, so the run equals one that never saw that batch
    for dp in ("ddp", "fsdp"):
        comp = dict(compressor="topk:0.1", feedback="ef", start_iter=0)
        cfg = heddle.TrainerConfig(data_parallel=dp, progress=False, compression=comp)
        poisoned, m = train(cfg, 4, poison=lambda step, r: step == 2 and r == 1)
        clean, _ = train(cfg, 3, skip={2})
        assert [x["skipped"] for x in m] == [0, 0, 1, 0]
        err = max_error(full_params(poisoned.module), full_params(clean.module))
        assert err < 1e-12, f"compression state changed by a skipped step under {dp}: {err:.3g}"
        errors[f"compress_skip_nan_{dp}"] = err
        poisoned.close()
        clean.close()
    for spec, feedback in (("topk:0.1", "ef"), ("quantize:4", "econtrol")):
        trainer, metrics = train(heddle.TrainerConfig(data_parallel="fsdp", progress=False, compression=dict(
            compressor=spec, feedback=feedback, start_iter=0)), 12, fixed_batch=True, lr=3e-2)
        losses = [m["loss"] for m in metrics]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], (spec, losses)
        errors[f"compress_{spec}_{feedback}_loss_ratio"] = losses[-1] / losses[0]
        trainer.close()


def _layout_cases(rank, world, errors):
    trainer = heddle.Trainer(tiny_gpt(), lambda p: torch.optim.SGD(p, lr=0.1),
                             config=heddle.TrainerConfig(progress=False, collective_timeout_s=120))
    assert trainer.watchdog is not None  # heddle.dist.watchdog, closed by trainer.close()
    lay = trainer.layout  # without the SP section: every rank is its own data-parallel rank
    assert (lay.dp_rank, lay.dp_size, lay.sp_rank, lay.sp_size, lay.sp_group) == (rank, world, 0, 1, None)
    assert trainer.checkpointer is None
    with pytest.raises(ValueError, match="checkpoint section"):
        trainer.resume()
    trainer.close()
    with pytest.raises(ValueError, match="FSDP2 all-gathers the parameters collectively"):
        heddle.Trainer(tiny_gpt(), lambda p: torch.optim.SGD(p, lr=0.1), config=heddle.TrainerConfig(
            data_parallel="fsdp", progress=False, adaptive_sequence_parallel={"cost_model": "a100-80g-ib"}))
    with pytest.raises(ValueError, match="pass the optimizer as a factory"):
        model = tiny_gpt()
        heddle.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       config=heddle.TrainerConfig(data_parallel="fsdp", progress=False))


def _world2(rank, world, tmp):
    errors = {}
    _layout_cases(rank, world, errors)
    _skip_nan_cases(rank, errors)
    _scheduler_cases(rank, errors)
    _fp16_cases(rank, errors, tmp)
    _moe_cases(rank, world, errors)
    _compression_cases(rank, errors)
    return errors


def test_features_world2(tmp_path):
    errors = run_distributed(_world2, 2, str(tmp_path / "ckpt"), timeout=600)[0]
    print({k: f"{v:.2e}" for k, v in errors.items()})
