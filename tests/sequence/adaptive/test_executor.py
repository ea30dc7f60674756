"""Executor: one step under heterogeneous plans equals single-process training on the whole batch
(fp64, world 2, 3 and 4); the background planner gives every rank the identical plan and a
planner failure raises on every rank."""

import pytest
import torch
import torch.nn.functional as F

from heddle.models import GPT, GPTConfig
from heddle.sequence import position_ids_from_cu_seqlens
from heddle.sequence.adaptive import CostModel, MicroBatch, Plan
from heddle.sequence.adaptive.background import BackgroundPlanner, PlannerError
from heddle.sequence.adaptive.executor import AdaptiveExecutor, pack_documents
from tests.conftest import run_distributed

LENGTHS = [9, 4, 13, 6, 3, 11, 7]


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).double()


def _documents():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 32, (s + 1,), generator=g) for s in LENGTHS]


def _plan(world, groups_per_mb):
    mbs = [MicroBatch([(tuple(r), list(i)) for r, i in groups], 0.0) for groups in groups_per_mb]
    return Plan(num_devices=world, lengths=list(LENGTHS), micro_batches=mbs, predicted_time=0.0,
                solver="manual", status="manual", solve_time=0.0)


PLANS = {
    # one group of 2 then two groups of 1
    2: [[((0, 1), [0, 2, 5])], [((0,), [1, 3]), ((1,), [4, 6])]],
    # one group of 2 plus one of 1; then rank 2 idles while 0 and 1 run alone
    3: [[((0, 1), [2, 5]), ((2,), [0, 1, 4])], [((0,), [3]), ((1,), [6])]],
    # 4, then 2 + 1 + 1, then 2 + 2
    4: [[((0, 1, 2, 3), [2])], [((0, 1), [0, 6]), ((2,), [1]), ((3,), [4])], [((0, 1), [5]), ((2, 3), [3])]],
}


def _reference_grads():
    model = _model()
    inputs, targets, cu = pack_documents(_documents())
    pos = position_ids_from_cu_seqlens(cu, len(inputs))
    logits = model(inputs[None], position_ids=pos[None], cu_seqlens=cu)
    loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum") / len(targets)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _step(executor, plan, docs):
    model = executor.model
    model.zero_grad(set_to_none=True)
    loss_sum, tokens = executor.run(plan, docs)
    executor.reduce_gradients()
    totals = torch.tensor([float(loss_sum), float(tokens)], dtype=torch.float64)
    import heddle.dist as hd
    hd.all_reduce(totals)
    for p in model.parameters():
        p.grad /= totals[1]
    return float(totals[0] / totals[1]), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world):
    torch.set_default_dtype(torch.float64)
    ref_loss, ref_grads = _reference_grads()
    model = _model()
    executor = AdaptiveExecutor(model, pack=True)
    docs = _documents()
    errors = {}
    plans = {"manual": _plan(world, PLANS[world])}
    # a plan from the planner with a tiny memory: mixed degrees and several micro-batches
    cm = CostModel(a1=1e-3, a2=1e-2, b1=1e-3, a3=10.0, b2=1e-3, bandwidth={2: 1e3, 4: 8e2},
                   token_bytes=1.0, static_bytes=0.0, device_bytes=8.5, name="tiny")
    planner = BackgroundPlanner(world, cm, time_limit=2.0)
    planner.submit(LENGTHS)
    plans["planned"] = planner.result()
    for name, plan in plans.items():
        plan.validate(cm, capacity=plan.extra.get("capacity", 10**9))
        for pack in (True, False):  # packed varlen micro-batches, and one sequence at a time
            executor.pack = pack
            loss, grads = _step(executor, plan, docs)
            errors[f"{name}-pack={pack}"] = max(abs(loss - ref_loss),
                                               *(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()))
    # failure: a sequence longer than every group can hold -> PlannerError on every rank
    planner.submit([10_000])
    try:
        planner.result()
        failed = "no error"
    except PlannerError as e:
        failed = str(e)
    planner.close()
    degrees = sorted({len(r) for r, _ in plans["planned"].groups})
    return {"errors": errors, "plan": plans["planned"].to_json(), "failed": failed, "degrees": degrees}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_executor_matches_single_process(world):
    results = run_distributed(_worker, world)
    for rank, r in enumerate(results):
        for name, err in r["errors"].items():
            assert err < 1e-10, f"rank {rank}, plan {name}: max error {err}"
        assert r["plan"] == results[0]["plan"], f"rank {rank} got a different plan"
        assert "cannot fit even on the largest group" in r["failed"], r["failed"]
    assert len(Plan.from_json(results[0]["plan"]).micro_batches) >= 2


def _trainer_worker(rank, world, path):
    """One Trainer step through the adaptive_sequence_parallel section (calibrated cost model)
    equals one SGD step of a single process on the whole batch."""
    import heddle

    torch.set_default_dtype(torch.float64)
    ref_loss, ref_grads = _reference_grads()
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = heddle.TrainerConfig(progress=False, adaptive_sequence_parallel={
        "cost_model": "calibrate", "calibration_lengths": (16, 32, 64), "max_tokens_per_device": 8,
        "planner": "thread"})  # test workers are daemonic: they may not spawn a planner process
    trainer = heddle.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), config=config)
    asp = trainer.plugin("adaptive_sequence_parallel")
    assert trainer.ddp is None
    for batch in trainer.micro_batches({"documents": _documents()}):   # this rank's share of the plan
        logits = trainer.model(batch["tokens"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), batch["targets"].flatten(),
                                                 ignore_index=-100, reduction="sum")
        trainer.backward(loss, num_tokens=(batch["targets"] != -100).sum())
    metrics = trainer.step()
    plan = asp.plan
    err = max(float((p.detach() - (start[n] - 0.5 * ref_grads[n])).abs().max()) for n, p in model.named_parameters())
    cm = asp.cost_model
    if rank == 0:
        cm.save(path)
    trainer.close()
    return {"err": max(err, abs(metrics["loss"] - ref_loss)), "cm": cm.to_dict(), "degrees": sorted({len(r) for r, _ in plan.groups})}


def test_trainer_section_and_calibration(tmp_path):
    path = str(tmp_path / "cm.json")
    results = run_distributed(_trainer_worker, 2, path)
    for r in results:
        assert r["err"] < 1e-10
        assert r["cm"] == results[0]["cm"], "ranks calibrated different cost models"
    cm = CostModel.load(path)
    # tiny lengths: the fit may put everything in b1, but the model must predict positive time
    assert cm.group_time([32], 1) > 0 and cm.token_bytes > 0 and set(cm.bandwidth) == {2} and cm.bandwidth[2] > 0
    assert len(cm.measured["compute_s"]) == 3
    assert cm.a3 == 2 * 2 * (2 * 4 + 2 * 2) * 4 * 8  # 2 layers x fwd+bwd x (2H + 2Hkv) x head_dim x fp64
    assert results[0]["degrees"] == [2] or 2 in results[0]["degrees"]  # 13 tokens > 8 per device


def test_background_planner_in_a_process():
    """mode="process" (single rank, no process group): the plan equals a direct call's (greedy is
    deterministic) and an error in the worker process is raised here."""
    from heddle.sequence.adaptive import plan_batch

    cm = CostModel.preset("a100-80g-ib")
    planner = BackgroundPlanner(8, cm, mode="process", solver="greedy")
    try:
        planner.submit([1000, 50_000, 3000, 2000, 70_000])
        plan = planner.result()
        assert plan.groups == plan_batch([1000, 50_000, 3000, 2000, 70_000], 8, cm, solver="greedy").groups
        planner.submit([10**7])
        with pytest.raises(PlannerError, match="cannot fit even on the largest group"):
            planner.result()
    finally:
        planner.close()
