"""Training equivalence: 5 AdamW steps of the example GPT (fp64) through heddle.Trainer with the
``sequence_parallel`` section, SP=2 at world 2 and SP=2 x DP=2 at world 4, give the losses and
parameters of one process training on the same global batch. Odd sequence length (padding) and
packed documents (cu_seqlens, per-document positions) included; parallelize's group switch."""

import pytest
import torch
import torch.nn.functional as F

import heddle
from heddle.models import GPT, GPTConfig
from heddle.sequence import (UlyssesAttention, gather_sequence, parallelize, position_ids_from_cu_seqlens,
                             shard_sequence)
from tests.conftest import run_distributed

STEPS, BATCH, SEQ = 5, 4, 13
CU = torch.tensor([0, 5, 11, 13])


def _model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ)
    return GPT(cfg).double()


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, 32, (BATCH, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _reference():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pos = position_ids_from_cu_seqlens(CU, SEQ)
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        logits = model(x, position_ids=pos, cu_seqlens=CU)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_group_switch(model, sp_group):
    """The same Ulysses modules on the SP=2 group and on the whole world give the same logits:
    the group is switchable per step without rebuilding anything."""
    handle = parallelize(model, sp_group)
    modules = list(handle)
    x, _ = _batch(STEPS)
    pos = position_ids_from_cu_seqlens(CU, SEQ)
    logits = {}
    for name, group in (("sp", sp_group), ("world", None)):
        handle.set_group(group)
        assert list(handle) == modules and all(m.group is group for m in modules)
        local, shard = shard_sequence(x, group, 1)
        pos_local, _ = shard_sequence(pos, group, 0)
        with torch.no_grad():
            out = model(local, position_ids=pos_local, cu_seqlens=CU)
        logits[name] = gather_sequence(out, shard, group)
    torch.testing.assert_close(logits["world"], logits["sp"], atol=1e-10, rtol=0)


def _train(rank, world, explicit_positions):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = heddle.TrainerConfig(progress=False, sequence_parallel={"sp_size": 2})
    trainer = heddle.Trainer(model, opt, config=config)
    lay = trainer.layout
    assert lay.dp_size == world // 2 and lay.dp_rank == rank // 2 and lay.sp_size == 2 and lay.sp_rank == rank % 2
    assert all(isinstance(b.attn.core_attention, UlyssesAttention) for b in model.blocks)
    per = BATCH // lay.dp_size
    losses = []
    for step in range(STEPS):
        x, y = _batch(step)
        rows = slice(lay.dp_rank * per, (lay.dp_rank + 1) * per)
        batch = {"tokens": x[rows], "targets": y[rows], "cu_seqlens": CU}
        if explicit_positions:
            batch["position_ids"] = position_ids_from_cu_seqlens(CU, SEQ)
        batch = trainer.prepare_batch(batch)
        assert batch["tokens"].shape == (per, 7)  # 13 -> padded 14 -> 7 per rank
        logits = trainer.model(batch["tokens"], position_ids=batch["position_ids"],
                               cu_seqlens=batch["cu_seqlens"])
        targets = batch["targets"]
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        trainer.backward(loss_sum, num_tokens=(targets != -100).sum())
        losses.append(trainer.step()["loss"])
    trainer.close()
    ref_losses, ref_params = _reference()
    assert losses == pytest.approx(ref_losses, abs=1e-10), (losses, ref_losses)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], atol=1e-10, rtol=0, msg=name)
    _check_group_switch(model, lay.sp_group)
    return losses


@pytest.mark.parametrize("world", [2, 4])
def test_sp_training_matches_single_process(world):
    results = run_distributed(_train, world, world == 4)
    assert all(r == results[0] for r in results)
