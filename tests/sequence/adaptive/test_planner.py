"""Planner: validity under property tests, MILP == brute force on small instances, never worse
than the best homogeneous plan, clear errors, bucketing optimality, cost model round trip."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heddle.sequence.adaptive import CostModel, Plan, bucket_lengths, min_degree_for, plan_batch
from heddle.sequence.adaptive.greedy import assignment_time
from heddle.sequence.adaptive.milp import solve_lanes


def small_model(capacity_tokens: int = 100) -> CostModel:
    """A model with a tiny memory so that min degrees > 1 show up at small lengths."""
    return CostModel(a1=1e-4, a2=1e-2, b1=0.05, a3=1000.0, b2=0.02,
                     bandwidth={2: 4e5, 4: 3e5, 8: 1e5, 16: 5e4},
                     token_bytes=1.0, static_bytes=0.0, device_bytes=float(capacity_tokens) + 0.5, name="tiny")


def check_plan(plan: Plan, cm: CostModel, capacity: int) -> None:
    plan.validate(cm, capacity=capacity)
    for mb in plan.micro_batches:
        for ranks, idx in mb.groups:
            for k in idx:  # minimum degree per sequence
                assert len(ranks) >= min_degree_for(plan.lengths[k], capacity)
    lanes = plan.lanes()
    seen = [r for r, _ in lanes]
    assert all(not set(a) & set(b) for i, a in enumerate(seen) for b in seen[i + 1:]), "lanes share ranks"
    slowest = max(cm.group_time([plan.lengths[k] for idx in parts for k in idx], len(r))
                  + (len(parts) - 1) * cm.overhead(len(r)) for r, parts in lanes)
    assert abs(slowest - plan.predicted_time) <= 1e-9 * max(1.0, slowest)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 400), min_size=1, max_size=24),
       devices=st.integers(1, 16), solver=st.sampled_from(["greedy", "milp"]))
def test_plan_is_valid(lengths, devices, solver):
    cm = small_model()
    largest = 1 << (devices.bit_length() - 1)
    if any(min_degree_for(s, cm.token_capacity) > largest for s in lengths):
        with pytest.raises(ValueError, match="cannot fit even on the largest group"):
            plan_batch(lengths, devices, cm, solver=solver, time_limit=0.3)
        return
    plan = plan_batch(lengths, devices, cm, solver=solver, time_limit=0.3)
    check_plan(plan, cm, cm.token_capacity)
    # never predicted worse than the best homogeneous plan (same micro-batching model)
    for d in (1, 2, 4, 8, 16):
        if d > devices:
            break
        try:
            homo = plan_batch(lengths, devices, cm, solver="greedy", degrees=(d,))
        except ValueError:
            continue
        assert set(len(r) for r, _ in homo.groups) == {d}
        assert plan.predicted_time <= homo.predicted_time * (1 + 1e-9)
    restored = Plan.from_json(plan.to_json())
    assert restored.groups == plan.groups and restored.predicted_time == plan.predicted_time


def brute_force(lengths, devices, cm, capacity):
    """Optimal step time over every multiset of power-of-two lane sizes and every assignment, a lane
    costing its work plus one overhead per ceil(tokens / (d * capacity)) micro-batches."""
    sizes = [d for d in (1, 2, 4, 8) if d <= devices]
    best = float("inf")
    for count in range(1, len(lengths) + 1):
        for config in itertools.combinations_with_replacement(sizes, count):
            if sum(config) > devices:
                continue
            for assign in itertools.product(range(count), repeat=len(lengths)):
                members = [[] for _ in config]
                for k, g in enumerate(assign):
                    members[g].append(lengths[k])
                if any(s > d * capacity for m, d in zip(members, config) for s in m):
                    continue
                best = min(best, max(sum(cm.work(s, d) for s in m) + -(-sum(m) // (d * capacity)) * cm.overhead(d)
                                     for m, d in zip(members, config)))
    return best


@pytest.mark.parametrize("seed", range(10))
def test_milp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    cm = small_model()
    devices = int(rng.choice([2, 3, 4]))
    lengths = [int(x) for x in rng.integers(5, 190, size=int(rng.integers(2, 6)))]
    lengths = [s for s in lengths if min_degree_for(s, cm.token_capacity) <= 2 ** (devices.bit_length() - 1)]
    if not lengths:
        lengths = [50]
    buckets = bucket_lengths(lengths, num_buckets=len(lengths))  # one bucket per distinct length: exact
    result = solve_lanes(buckets, devices, cm, [1, 2, 4], cm.token_capacity, time_limit=10.0, mip_rel_gap=0.0)
    expected = brute_force(lengths, devices, cm, cm.token_capacity)
    assert result.status == "optimal"
    assert result.objective == pytest.approx(expected, rel=1e-6), (lengths, devices, result.assignment)
    # the real micro-batch packing can only add micro-batches to what the program counted
    assert assignment_time(result.assignment, lengths, cm, cm.token_capacity) >= expected * (1 - 1e-9)


def test_bucketing_is_optimal_and_beats_quantiles():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.exp(rng.normal(6, 1.2, 30)).astype(int) + 1]
    b = bucket_lengths(lengths, 4)
    assert sorted(k for m in b.members for k in m) == list(range(30))
    assert all(max(lengths[k] for k in m) == rep for m, rep in zip(b.members, b.lengths))
    vals = sorted(set(lengths))  # brute force over every choice of 4 representatives
    best = min(sum(min(r for r in reps if r >= s) - s for s in lengths)
               for cut in itertools.combinations(vals[:-1], 3) for reps in [list(cut) + [vals[-1]]])
    assert b.padding(lengths) == best
    q = np.quantile(lengths, [0.25, 0.5, 0.75, 1.0], method="higher")
    quantile_pad = sum(int(next(v for v in q if s <= v)) - s for s in lengths)
    assert b.padding(lengths) <= quantile_pad


def test_errors_and_microbatches(tmp_path):
    cm = small_model()
    with pytest.raises(ValueError, match=r"cannot fit even on the largest group \(4 devices"):
        plan_batch([50, 401], 4, cm)
    with pytest.raises(ValueError, match="lengths must be positive"):
        plan_batch([10, 0], 4, cm)
    with pytest.raises(ValueError, match="lengths is empty"):
        plan_batch([], 4, cm)
    with pytest.raises(ValueError, match="degrees=\\[3\\]"):
        plan_batch([10], 4, cm, degrees=[3])
    with pytest.raises(ValueError, match="solver='cplex'"):
        plan_batch([10], 4, cm, solver="cplex")
    with pytest.raises(ValueError, match="unknown cost-model preset 'tpu'"):
        CostModel.preset("tpu")
    # 4 devices x 100 tokens per micro-batch: 1000 tokens need >= 3 micro-batches
    plan = plan_batch([100] * 10, 4, cm, time_limit=1.0)
    check_plan(plan, cm, 100)
    assert len(plan.micro_batches) >= 3
    assert "predicted step time" in plan.table() and "best homogeneous plan" in plan.table()
    capped = plan_batch([100] * 10, 8, cm, micro_batches=2, time_limit=1.0)  # 8 lanes, <= 2 micro-batches
    check_plan(capped, cm, 100)
    assert len(capped.micro_batches) <= 2
    with pytest.raises(ValueError, match="no valid plan .* micro_batches=2"):
        plan_batch([100] * 10, 4, cm, micro_batches=2)  # 1000 tokens > 4 devices x 100 x 2
    with pytest.raises(ValueError, match="micro_batches=0"):
        plan_batch([10], 4, cm, micro_batches=0)
    # max_tokens_per_device tightens the memory
    tight = plan_batch([60, 60], 2, cm, max_tokens_per_device=60, solver="greedy")
    check_plan(tight, cm, 60)
    # cost model JSON round trip and presets
    for name in ("a100-80g-ib", "h100-80g-ib"):
        preset = CostModel.preset(name)
        path = tmp_path / f"{name}.json"
        preset.save(str(path))
        assert CostModel.load(str(path)) == preset
        json.loads(path.read_text())
    a100 = CostModel.preset("a100-80g-ib")
    assert a100.bandwidth[8] == pytest.approx(96.5e9) and a100.bandwidth[16] == pytest.approx(10.3e9)
    with pytest.raises(ValueError, match="token_bytes"):
        CostModel(a1=0, a2=0, b1=0, a3=0, b2=0, bandwidth={}, token_bytes=0, static_bytes=0, device_bytes=1)


def test_preset_scale_plan_beats_homogeneous():
    """64 simulated A100s, long-tailed lengths: valid, and predicted faster than the best single degree."""
    rng = np.random.default_rng(1)
    lengths = np.minimum(np.exp(rng.normal(8.5, 1.3, 256)).astype(int) + 16, 192 * 1024).tolist()
    cm = CostModel.preset("a100-80g-ib")
    plan = plan_batch(lengths, 64, cm, time_limit=1.0)
    check_plan(plan, cm, cm.token_capacity)
    assert plan.predicted_time < plan.baseline_time


def test_simulation_baselines_are_consistent():
    """The benchmark's balanced static baseline is the planner's homogeneous baseline, so the
    adaptive plan is never predicted slower; data-order static is never faster than balanced."""
    from heddle.bench.scenarios.adaptive_sp import simulate, static_time

    cm = CostModel.preset("a100-80g-ib")
    lengths = np.minimum(np.exp(np.random.default_rng(2).normal(8.5, 1.3, 96)).astype(int) + 16, 120_000).tolist()
    plan = plan_batch(lengths, 16, cm, solver="greedy")
    times = {d: static_time(lengths, 16, cm, d, cm.token_capacity) for d in (1, 2, 4, 8, 16)}
    assert plan.baseline_time == pytest.approx(min(times.values()))
    for d, t in times.items():
        assert static_time(lengths, 16, cm, d, cm.token_capacity, balanced=False) >= t * (1 - 1e-9)
    row = simulate("encyclopedia", devices=16, seqs=48, batches=2, max_len=60_000)
    assert row["speedup_vs_static"] >= 1 - 1e-9 and row["speedup_vs_per_batch"] >= 1 - 1e-9
    assert row["best_per_batch_s"] <= row["best_static_s"] * (1 + 1e-9)


def test_milp_accepts_the_greedy_warm_start():
    """With almost no time, the MILP still returns an incumbent: the greedy plan it was seeded with."""
    from heddle.data import sample_lengths
    from heddle.sequence.adaptive.greedy import greedy_assignment

    cm = CostModel.preset("a100-80g-ib")
    cap = cm.token_capacity
    lengths = sample_lengths("encyclopedia", 512, seed=3).tolist()
    buckets = bucket_lengths(lengths, 16)
    rounded = [0] * len(lengths)
    for rep, members in zip(buckets.lengths, buckets.members):
        for k in members:
            rounded[k] = rep
    degrees = [1, 2, 4, 8, 16, 32, 64]
    warm = greedy_assignment(list(range(512)), rounded, 64, cm, degrees, cap, with_homogeneous=False)
    result = solve_lanes(buckets, 64, cm, degrees, cap, warm_start=warm, time_limit=0.01)
    assert result.assignment is not None
    assert result.objective <= assignment_time(warm, rounded, cm, cap) * (1 + 1e-9)
