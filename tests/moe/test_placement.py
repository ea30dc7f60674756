"""Pure planning functions: Algorithm 1, dispatch, Algorithm 2, the router's capacity, validation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heddle.moe import (MoE, dispatch_plan, init_expert, materialize, merge_expert_shards, reshard_owners,
                        round_robin_owners, route)
from heddle.moe.placement import LoadPredictor, waterfill


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.data())
def test_dispatch_conserves_tokens_and_respects_placement(world, experts, data):
    counts = np.array(data.draw(st.lists(st.integers(0, 30), min_size=world * experts,
                                         max_size=world * experts))).reshape(world, experts)
    owners = round_robin_owners(experts, world)
    t = data.draw(st.integers(0, experts))
    m = data.draw(st.integers(0, experts))
    target = materialize(counts + 1.0, owners, overlap_degree=t, memory_slots=m)
    for e in range(experts):
        assert owners[e] in target[e] and target[e] == sorted(set(target[e]))
    extra = np.zeros(world, dtype=int)
    for e in range(experts):
        for d in target[e]:
            extra[d] += d != owners[e]
    if t <= m:   # top-t everywhere
        assert sum(len(x) == world for x in target) >= min(t, experts) or world == 1
    assert extra.max(initial=0) <= m   # never more replicas on a rank than its memory slots
    plan = dispatch_plan(counts, target)
    assert (plan.sum(axis=2) == counts).all()                       # every token goes somewhere
    for e in range(experts):
        for d in range(world):
            if d not in target[e]:
                assert plan[:, e, d].sum() == 0                     # only to holders
        for r in target[e]:
            assert plan[r, e, r] == counts[r, e]                    # local when present


def test_dispatch_levels_load_and_ep_goes_to_owner():
    counts = np.array([[90, 10, 0, 0], [90, 0, 10, 0]])
    ep = dispatch_plan(counts, [[0], [1], [0], [1]])
    assert ep[:, 0, 0].sum() == 180 and ep[1, 0, 1] == 0
    both = dispatch_plan(counts, [[0, 1], [1], [0], [1]])
    load = both.sum(axis=(0, 1))
    assert load.tolist() == [100, 100]


def test_balance_pass_uses_free_slots():
    counts = np.full((4, 8), 100)
    owners = round_robin_owners(8, 4)
    plain = materialize(counts * 1.0, owners, overlap_degree=2, memory_slots=2, balance=False)
    balanced = materialize(counts * 1.0, owners, overlap_degree=2, memory_slots=2)
    ratio = [dispatch_plan(counts, t).sum(axis=(0, 1)).max() / 800 for t in (plain, balanced)]
    assert ratio[0] >= 1.25 and ratio[1] <= 1.1, ratio


@given(st.lists(st.integers(0, 50), min_size=1, max_size=6), st.integers(0, 200))
def test_waterfill_sums_and_levels(loads, amount):
    loads = np.array(loads)
    alloc = waterfill(loads, amount)
    assert alloc.sum() == amount and (alloc >= 0).all()
    after = loads + alloc
    receiving = alloc > 0
    if receiving.any():   # nobody receiving ends more than 1 above a device that could have taken more
        assert after[receiving].max() <= after.min() + 1


def test_reshard_owners_balances_layers_with_global_slots():
    loads = [np.array([100, 1, 1, 1, 1, 1, 1, 100.0]), np.array([5, 5, 5, 5.0])]
    owners = reshard_owners(loads, 2)
    slots = np.bincount([o for layer in owners for o in layer], minlength=2)
    assert slots.tolist() == [6, 6]
    assert owners[0][0] != owners[0][7]          # the two heavy experts on different ranks
    for layer in owners:
        assert all(0 <= o < 2 for o in layer)
    owners3 = reshard_owners([np.ones(5)], 3)
    assert sorted(np.bincount(owners3[0], minlength=3).tolist()) == [1, 2, 2]


def test_predictor_window():
    p = LoadPredictor(window=2)
    assert (p.predict(2, 3) == 1).all()
    for v in (1, 2, 4):
        p.update(np.full((2, 3), v))
    assert (p.predict(2, 3) == 3).all()


def test_capacity_drops_second_choices_first_and_counts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[0, 0] = 50.0
    x[:, 0] = 1.0
    full = route(x, w, top_k=2)
    capped = route(x, w, top_k=2, capacity_factor=0.5)   # capacity ceil(0.5*24/3) = 4
    assert full.dropped == 0 and capped.dropped > 0
    assert capped.counts.max() <= 4 and int(capped.counts.sum()) + capped.dropped == 24


def test_init_independent_of_strategy_and_validation():
    a = MoE(8, 4, 3, dtype=torch.float64, seed=5)
    b = MoE(8, 4, 3, dtype=torch.float64, seed=5, strategy="ep", activation="swiglu")
    assert torch.equal(a.router.weight, b.router.weight)
    for e in range(3):
        ref = init_expert(e, d_model=8, d_ffn=4, activation="swiglu", seed=5, init_std=0.02, out_std=0.02,
                          dtype=torch.float64)
        assert torch.equal(a.experts.expert(e), ref) and torch.equal(b.experts.expert(e), ref)
    assert not torch.equal(a.experts.expert(0), a.experts.expert(1))
    for kwargs, match in ((dict(strategy="tp"), "strategy"), (dict(top_k=4), "top_k"),
                          (dict(capacity_factor=0.0), "capacity_factor"), (dict(activation="relu"), "activation"),
                          (dict(memory_slots=-1), "memory_slots")):
        with pytest.raises(ValueError, match=match):
            MoE(8, 4, 3, **kwargs)
    with pytest.raises(ValueError, match="d_model"):
        a(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="saved by ranks 0 and 1"):
        merge_expert_shards([{"mlp.experts.0": torch.zeros(1)}, {"mlp.experts.0": torch.zeros(1)}])


def test_cost_model_rows_and_orderings():
    from heddle.moe.cost_model import simulate, zipf_counts

    counts = zipf_counts(4, 16, 512, 2, 1.0, np.random.default_rng(0))
    assert (counts.sum(axis=1) == 1024).all() and counts[:, 0].sum() > counts[:, -1].sum()
    flat = {r["strategy"]: r for r in simulate(num_devices=8, num_experts=16, d_model=256, tokens=512, skew=0.0)}
    skewed = {r["strategy"]: r for r in simulate(num_devices=8, num_experts=16, d_model=256, tokens=512, skew=1.5)}
    assert set(skewed) == {"ep", "fssdp", "fsdp"}
    assert skewed["ep"]["max_over_mean"] > 2 * skewed["fssdp"]["max_over_mean"]
    assert skewed["ep"]["layer_s"] > skewed["fssdp"]["layer_s"]
    assert flat["ep"]["max_over_mean"] < 1.2
    assert 0 < skewed["fssdp"]["lam"] < 1   # sparse, never a full all-gather
