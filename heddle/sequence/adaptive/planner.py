"""``plan_batch``: split the devices into lanes (sequence-parallel groups of power-of-two sizes
that keep their ranks for the step) and give every sequence of the global batch to one lane.

Each lane runs its sequences in micro-batches that fit its memory (sorted, balanced:
:func:`split_lane`), so the step time is the slowest lane's sum (see :mod:`.greedy`). The greedy
plan comes first (always valid); with ``solver="milp"`` the exact program over DP buckets
(:mod:`.milp`) is warm-started from the greedy plan on the bucket representatives and bounded by
what is left of ``time_limit`` (incumbent accepted); the better plan on the real lengths wins.
The best homogeneous plan (one degree for every lane, DeepSpeed-style static Ulysses with
accumulation) is priced the same way: it is the baseline in the plan's table and a candidate, so
the result is never predicted slower than it.

Deviation from FlexSP, on purpose: FlexSP re-plans the groups for every micro-batch and adds up
the micro-batches' makespans, a barrier after each. With memory forcing several micro-batches and
one long sequence dominating each, those barriers cost more than re-grouping gains; lanes
accumulate independently like static SP does and still mix degrees.
"""

from __future__ import annotations

import time

from heddle.sequence.adaptive.bucketing import bucket_lengths
from heddle.sequence.adaptive.cost_model import CostModel, min_degree_for
from heddle.sequence.adaptive.greedy import (assignment_time, greedy_assignment, homogeneous_lpt, lane_time,
                                             split_lane, within_micro)
from heddle.sequence.adaptive.milp import solve_lanes
from heddle.sequence.adaptive.plan import MicroBatch, Plan, layout_groups


def _check_lengths(lengths) -> list[int]:
    try:
        out = [int(s) for s in lengths]
    except (TypeError, ValueError):
        raise TypeError(f"lengths must be a sequence of integers, got {type(lengths).__name__}") from None
    if not out:
        raise ValueError("lengths is empty: a batch needs at least one sequence")
    bad = [(i, s) for i, s in enumerate(out) if s < 1 or s != float(lengths[i])]
    if bad:
        raise ValueError(f"lengths must be positive integers; bad entries (index, value): {bad[:5]}")
    return out


def allowed_degrees(num_devices: int, cm: CostModel, degrees=None) -> list[int]:
    """Powers of two <= num_devices that the cost model has a bandwidth for (and in ``degrees``)."""
    pool = [d for d in (1 << i for i in range(num_devices.bit_length())) if d == 1 or d in cm.bandwidth]
    if degrees is None:
        return pool
    bad = [d for d in degrees if d not in pool]
    if bad or not degrees:
        raise ValueError(f"degrees={list(degrees)}: each must be one of {pool} (powers of two <= "
                         f"num_devices={num_devices} with a bandwidth in cost model {cm.name!r})")
    return sorted(set(int(d) for d in degrees))


def plan_batch(lengths, num_devices: int, cost_model: CostModel, *, max_tokens_per_device: int | None = None,
               time_limit: float = 0.5, micro_batches="auto", num_buckets: int = 16, solver: str = "milp",
               degrees=None, mip_rel_gap: float = 1e-3) -> Plan:
    """Plan one global batch of sequences (``lengths[k]`` tokens) on ``num_devices`` devices.

    ``max_tokens_per_device``: activation tokens per device (default: the cost model's memory
    capacity; the smaller of the two is used). ``micro_batches``: "auto" (each lane runs as many
    memory-bounded micro-batches as it needs) or an int M, the most any lane may run (M=1: the
    whole batch at once, FlexSP's single micro-batch).
    ``solver``: "milp" (HiGHS, greedy warm start) or "greedy". ``degrees``: restrict the group
    sizes (e.g. ``(4,)`` for a homogeneous plan). ``time_limit``: seconds for the whole call; the
    MILP gets what the greedy search leaves (the greedy plan is always there to fall back on).
    """
    start = time.perf_counter()
    lengths = _check_lengths(lengths)
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be a positive integer")
    if solver not in ("milp", "greedy"):
        raise ValueError(f"solver={solver!r}: valid are 'milp', 'greedy'")
    if not time_limit > 0:
        raise ValueError(f"time_limit={time_limit} must be positive (seconds)")
    if micro_batches != "auto" and (isinstance(micro_batches, bool) or not isinstance(micro_batches, int)
                                    or micro_batches < 1):
        raise ValueError(f"micro_batches={micro_batches!r} must be 'auto' or a positive integer")
    max_micro = None if micro_batches == "auto" else micro_batches
    capacity = cost_model.token_capacity
    if max_tokens_per_device is not None:
        if max_tokens_per_device < 1:
            raise ValueError(f"max_tokens_per_device={max_tokens_per_device} must be >= 1")
        capacity = min(capacity, int(max_tokens_per_device))
    pool = allowed_degrees(num_devices, cost_model, degrees)
    too_long = [(k, s) for k, s in enumerate(lengths) if min_degree_for(s, capacity) > pool[-1]]
    if too_long:
        raise ValueError(f"{len(too_long)} sequence(s) cannot fit even on the largest group ({pool[-1]} "
                         f"devices x {capacity} tokens = {pool[-1] * capacity} tokens): (index, length) "
                         f"{too_long[:5]}; use more devices, shorter sequences or less memory per token")
    everyone = list(range(len(lengths)))
    best = greedy_assignment(everyone, lengths, num_devices, cost_model, pool, capacity, max_micro=max_micro)
    if best is None:
        raise ValueError(f"no valid plan for {len(lengths)} sequences ({sum(lengths)} tokens) on {num_devices} "
                         f"devices with capacity {capacity} tokens/device, degrees {pool} and micro_batches="
                         f"{micro_batches!r}; allow more micro-batches or devices")
    best_time = assignment_time(best, lengths, cost_model, capacity)
    base_time, base_degree, base = float("nan"), 0, None
    for d in pool:
        a = homogeneous_lpt(everyone, lengths, num_devices, cost_model, d, capacity)
        if within_micro(a, lengths, capacity, max_micro):
            t = assignment_time(a, lengths, cost_model, capacity)
            if base is None or t < base_time:
                base_time, base_degree, base = t, d, a
    solver_used, status, gap = "greedy", "greedy", float("nan")
    # keep a tenth of the budget for turning the solution into a plan
    remaining = 0.9 * time_limit - (time.perf_counter() - start)
    if solver == "milp" and remaining < 5e-3:
        status = "skipped"  # the greedy search spent the budget
    elif solver == "milp":
        buckets = bucket_lengths(lengths, num_buckets)
        rounded = [0] * len(lengths)
        for rep, members in zip(buckets.lengths, buckets.members):
            for k in members:
                rounded[k] = rep
        # warm start: greedy on the bucket representatives (valid for the program as well)
        warm = greedy_assignment(everyone, rounded, num_devices, cost_model, pool, capacity, with_homogeneous=False,
                                 max_micro=max_micro)
        remaining = 0.9 * time_limit - (time.perf_counter() - start)
        result = solve_lanes(buckets, num_devices, cost_model, pool, capacity, warm_start=warm,
                             time_limit=max(remaining, 1e-3), mip_rel_gap=mip_rel_gap, max_micro=max_micro)
        status, gap, solver_used = result.status, result.gap, "milp"
        for candidate in (warm, result.assignment):
            if within_micro(candidate, lengths, capacity, max_micro):
                t = assignment_time(candidate, lengths, cost_model, capacity)
                if t < best_time:
                    best, best_time = candidate, t
    if base is not None and base_time < best_time:
        best, best_time, solver_used = base, base_time, "homogeneous"
    ranks = layout_groups([d for d, _ in best])
    lanes = [(r, split_lane(members, lengths, d, capacity)) for r, (d, members) in zip(ranks, best)]
    group_times = {f"{r[0]}": lane_time(sum(parts, []), lengths, len(r), capacity, cost_model) for r, parts in lanes}
    mbs = []
    for i in range(max(len(parts) for _, parts in lanes)):
        groups = [(r, sorted(parts[i])) for r, parts in lanes if i < len(parts)]
        mbs.append(MicroBatch(groups, max(cost_model.group_time([lengths[k] for k in idx], len(r))
                                          for r, idx in groups)))
    return Plan(num_devices=num_devices, lengths=lengths, micro_batches=mbs, predicted_time=best_time,
                solver=solver_used, status=status, solve_time=time.perf_counter() - start, gap=gap,
                baseline_time=base_time, baseline_degree=base_degree, cost_model=cost_model.name,
                extra={"lane_times": group_times, "capacity": capacity})
