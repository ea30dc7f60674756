"""``plan_batch``: split a global batch into micro-batches and each into mixed SP groups.

FlexSP (Sec. 5): sort the sequences, split them into M balanced micro-batches for M in
M_min .. M_min + extra (M_min from total memory), plan every micro-batch, keep the M with the
smallest total (micro-batches run one after the other, so the step time is the sum of their
makespans). Every micro-batch gets the greedy plan first; with ``solver="milp"`` the chosen M's
micro-batches are then solved exactly over DP buckets (warm-started from greedy, bounded by the
remaining time budget, incumbent accepted) and the better plan, evaluated on the real lengths,
is kept. The best homogeneous plan (one degree everywhere) is computed the same way: it is the
baseline in the plan's table and a candidate, so the result is never predicted slower than it.
"""

from __future__ import annotations

import math
import time

from heddle.sequence.adaptive.bucketing import bucket_lengths
from heddle.sequence.adaptive.cost_model import CostModel, min_degree_for
from heddle.sequence.adaptive.greedy import assignment_time, greedy_assignment
from heddle.sequence.adaptive.milp import solve_microbatch
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


def split_micro_batches(lengths, num_micro: int, token_budget: int, cm: CostModel) -> list[list[int]] | None:
    """Longest work first onto the micro-batch with the least work that has token room."""
    work = [0.0] * num_micro
    tokens = [0] * num_micro
    out: list[list[int]] = [[] for _ in range(num_micro)]
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        s = lengths[k]
        room = [m for m in range(num_micro) if tokens[m] + s <= token_budget]
        if not room:
            return None
        m = min(room, key=lambda m: work[m])
        work[m] += cm.a1 * s * s + cm.a2 * s
        tokens[m] += s
        out[m].append(k)
    return out if all(out) else None


def _search(lengths, num_devices, cm, degrees, capacity, micro_batches, extra):
    """[(total greedy time, [assignment per micro-batch])] for the candidate micro-batch counts."""
    total_tokens = sum(lengths)
    budget = num_devices * capacity
    if max(min_degree_for(s, capacity) for s in lengths) > max(degrees):
        return []  # some sequence needs a bigger group than the allowed degrees give
    if micro_batches == "auto":
        first = max(1, math.ceil(total_tokens / budget))
        candidates, m = [], first
        # fragmentation can make M_min infeasible; look a bounded way further
        while len(candidates) <= extra and m <= min(len(lengths), first + 4 * (extra + 4)):
            found = _try(lengths, m, num_devices, cm, degrees, capacity, budget)
            if found is not None:
                candidates.append(found)
            m += 1
        return candidates
    found = _try(lengths, micro_batches, num_devices, cm, degrees, capacity, budget)
    return [found] if found is not None else []


def _try(lengths, m, num_devices, cm, degrees, capacity, budget):
    parts = split_micro_batches(lengths, m, budget, cm)
    if parts is None:
        return None
    assignments = []
    for idx in parts:
        a = greedy_assignment(idx, lengths, num_devices, cm, degrees, capacity)
        if a is None:
            return None
        assignments.append(a)
    return sum(assignment_time(a, lengths, cm) for a in assignments), assignments


def plan_batch(lengths, num_devices: int, cost_model: CostModel, *, max_tokens_per_device: int | None = None,
               time_limit: float = 0.8, micro_batches="auto", num_buckets: int = 16, solver: str = "milp",
               degrees=None, extra_micro_batches: int = 3, mip_rel_gap: float = 1e-3) -> Plan:
    """Plan one global batch of sequences (``lengths[k]`` tokens) on ``num_devices`` devices.

    ``max_tokens_per_device``: activation tokens per device (default: the cost model's memory
    capacity; the smaller of the two is used). ``micro_batches``: "auto" or a fixed count.
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
    if micro_batches != "auto" and (not isinstance(micro_batches, int) or micro_batches < 1):
        raise ValueError(f"micro_batches={micro_batches!r} must be 'auto' or a positive integer")
    if extra_micro_batches < 0:
        raise ValueError(f"extra_micro_batches={extra_micro_batches} must be >= 0")
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
    candidates = _search(lengths, num_devices, cost_model, pool, capacity, micro_batches, extra_micro_batches)
    if not candidates:
        raise ValueError(f"no valid plan for {len(lengths)} sequences in micro_batches={micro_batches!r} on "
                         f"{num_devices} devices with capacity {capacity} tokens/device")
    best_total, best = min(candidates, key=lambda c: c[0])
    base_time, base_degree, base = float("nan"), 0, None
    for d in pool:
        found = _search(lengths, num_devices, cost_model, [d], capacity, micro_batches, extra_micro_batches)
        if found:
            t, a = min(found, key=lambda c: c[0])
            if base is None or t < base_time:
                base_time, base_degree, base = t, d, a
    solver_used, status, gap = "greedy", "greedy", float("nan")
    statuses = []
    if solver == "milp":
        improved = []
        for i, assignment in enumerate(best):
            remaining = time_limit - (time.perf_counter() - start)
            if remaining < 5e-3:  # budget spent: keep the greedy plan for the rest
                statuses.append("skipped")
                improved.append(assignment)
                continue
            idx = [k for _, members in assignment for k in members]
            buckets = bucket_lengths([lengths[k] for k in idx], num_buckets)
            buckets.members = [[idx[j] for j in m] for m in buckets.members]
            # warm start: greedy on the bucket representatives (valid for the program as well)
            rounded = {k: rep for rep, m in zip(buckets.lengths, buckets.members) for k in m}
            warm = greedy_assignment(idx, rounded, num_devices, cost_model, pool, capacity)
            result = solve_microbatch(buckets, num_devices, cost_model, pool, capacity, warm_start=warm,
                                      time_limit=max(remaining / (len(best) - i), 1e-3), mip_rel_gap=mip_rel_gap)
            status, gap = result.status, result.gap
            statuses.append(result.status)
            for candidate in (warm, result.assignment):
                if candidate is not None and (assignment_time(candidate, lengths, cost_model)
                                              < assignment_time(assignment, lengths, cost_model)):
                    assignment = candidate
            improved.append(assignment)
        best = improved
        best_total = sum(assignment_time(a, lengths, cost_model) for a in best)
        solver_used = "milp"
    if base is not None and base_time < best_total:
        best, best_total, solver_used = base, base_time, "homogeneous"
    mbs, group_times = [], {}
    for i, assignment in enumerate(best):
        ranks = layout_groups([d for d, _ in assignment])
        groups = [(r, sorted(members)) for r, (_, members) in zip(ranks, assignment)]
        for r, members in groups:
            group_times[f"{i}:{r[0]}"] = cost_model.group_time([lengths[k] for k in members], len(r))
        mbs.append(MicroBatch(groups, assignment_time(assignment, lengths, cost_model)))
    return Plan(num_devices=num_devices, lengths=lengths, micro_batches=mbs, predicted_time=best_total,
                solver=solver_used, status=status, solve_time=time.perf_counter() - start, gap=gap,
                baseline_time=base_time, baseline_degree=base_degree, cost_model=cost_model.name,
                extra={"group_times": group_times, "capacity": capacity, "milp_status": statuses})
