"""Lanes, their micro-batches and their time; the greedy planner (always valid, the MILP's warm start).

A *lane* is one sequence-parallel group that lives for the whole step: ``(degree, [sequence
indices])``. A lane runs its sequences in micro-batches of at most ``degree * capacity`` tokens
(memory, eq. 4), one after the other, so its time is

    T_lane = sum_k work(s_k, d) + n_micro * overhead(d)              (eqs. 2-3 summed over micro-batches)

and the step time is the slowest lane (lanes own disjoint ranks, so nothing else waits). Two
heuristics, the better one wins:

- *Target-time packing* (bisection on the step time C): sequences, longest first, go first-fit
  into an open lane (smallest degree first) that stays within C; otherwise they open a lane of the
  smallest degree that runs them within C (small groups waste the least on all-to-all). C is
  feasible when the lanes use at most N devices.
- *Homogeneous LPT*: for every allowed degree d, N/d lanes, longest work first onto the least
  loaded lane (DeepSpeed-style static Ulysses with gradient accumulation).
"""

from __future__ import annotations

import math

from heddle.sequence.adaptive.cost_model import CostModel

Assignment = list[tuple[int, list[int]]]


def split_lane(indices, lengths, degree: int, capacity: int) -> list[list[int]]:
    """A lane's micro-batches: sorted longest first, each sequence onto the micro-batch with the
    fewest tokens that has room (balanced); as few micro-batches as that packing allows."""
    if not indices:
        return []
    cap = degree * capacity
    total = sum(lengths[k] for k in indices)
    count = max(1, math.ceil(total / cap))
    order = sorted(indices, key=lambda k: -lengths[k])
    while True:
        tokens = [0] * count
        parts: list[list[int]] = [[] for _ in range(count)]
        for k in order:
            m = min(range(count), key=lambda i: tokens[i])
            if tokens[m] + lengths[k] > cap:
                room = [i for i in range(count) if tokens[i] + lengths[k] <= cap]
                if not room:
                    break
                m = room[0]
            tokens[m] += lengths[k]
            parts[m].append(k)
        else:
            return [p for p in parts if p]
        count += 1


def lane_time(indices, lengths, degree: int, capacity: int, cm: CostModel) -> float:
    if not indices:
        return 0.0
    work = sum(cm.work(lengths[k], degree) for k in indices)
    return work + len(split_lane(indices, lengths, degree, capacity)) * cm.overhead(degree)


def assignment_time(assignment: Assignment, lengths, cm: CostModel, capacity: int) -> float:
    """Step time: the slowest lane."""
    return max((lane_time(idx, lengths, d, capacity, cm) for d, idx in assignment if idx), default=0.0)


def homogeneous_lpt(indices, lengths, num_devices: int, cm: CostModel, degree: int,
                    capacity: int) -> Assignment | None:
    """N/d lanes of ``degree``; longest work first onto the least-loaded lane. None if a
    sequence does not fit the degree's memory."""
    lanes = num_devices // degree
    if lanes < 1 or any(lengths[k] > degree * capacity for k in indices):
        return None
    load = [0.0] * lanes
    members: list[list[int]] = [[] for _ in range(lanes)]
    for k in sorted(indices, key=lambda k: -lengths[k]):
        g = min(range(lanes), key=lambda g: load[g])
        load[g] += cm.work(lengths[k], degree)
        members[g].append(k)
    return [(degree, m) for m in members if m]


def _pack_at(target, order, lengths, num_devices, cm, degrees, capacity, work, max_micro=None) -> Assignment | None:
    lanes: dict[int, list[list]] = {d: [] for d in degrees}  # degree -> [[work, tokens, members]]
    used = 0

    def estimate(d, w, tokens):
        micro = math.ceil(tokens / (d * capacity))
        if max_micro is not None and micro > max_micro:
            return float("inf")
        return w + cm.overhead(d) * micro

    for k in order:
        s = lengths[k]
        fitting = [d for d in degrees if s <= d * capacity and estimate(d, work[k][d], s) <= target]
        if not fitting:
            return None
        placed = False
        for d in fitting:
            for lane in lanes[d]:
                if estimate(d, lane[0] + work[k][d], lane[1] + s) <= target:
                    lane[0] += work[k][d]
                    lane[1] += s
                    lane[2].append(k)
                    placed = True
                    break
            if placed:
                break
        if not placed:
            d = fitting[0]
            used += d
            if used > num_devices:
                return None
            lanes[d].append([work[k][d], s, [k]])
    return [(d, lane[2]) for d in degrees for lane in lanes[d]]


def target_packing(indices, lengths, num_devices: int, cm: CostModel, degrees, capacity: int,
                   iterations: int = 30, max_micro: int | None = None) -> Assignment | None:
    """Bisection on the step time with first-fit lanes; None when no target works."""
    degrees = sorted(d for d in degrees if d <= num_devices)
    if not degrees or not indices:
        return None
    fits = {k: [d for d in degrees if lengths[k] <= d * capacity] for k in indices}
    if any(not f for f in fits.values()):
        return None
    order = sorted(indices, key=lambda k: -lengths[k])
    work = {k: {d: cm.work(lengths[k], d) for d in fits[k]} for k in indices}
    lo = max(min(work[k][d] + cm.overhead(d) for d in fits[k]) for k in indices)
    hi = sum(max(work[k].values()) + max(cm.overhead(d) for d in fits[k]) for k in indices) + lo
    best = _pack_at(hi, order, lengths, num_devices, cm, degrees, capacity, work, max_micro)
    if best is None:
        return None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        got = _pack_at(mid, order, lengths, num_devices, cm, degrees, capacity, work, max_micro)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-4 * hi:
            break
    return best


def within_micro(assignment: Assignment | None, lengths, capacity: int, max_micro: int | None) -> bool:
    """True if every lane of ``assignment`` needs at most ``max_micro`` micro-batches (None: any)."""
    if assignment is None:
        return False
    return max_micro is None or all(len(split_lane(idx, lengths, d, capacity)) <= max_micro for d, idx in assignment)


def greedy_assignment(indices, lengths, num_devices: int, cm: CostModel, degrees, capacity: int,
                      with_homogeneous: bool = True, max_micro: int | None = None) -> Assignment | None:
    """The better of target-time packing and every homogeneous LPT (lanes within ``max_micro``
    micro-batches); None if nothing fits."""
    candidates = [target_packing(indices, lengths, num_devices, cm, degrees, capacity, max_micro=max_micro)]
    if with_homogeneous:
        candidates += [homogeneous_lpt(indices, lengths, num_devices, cm, d, capacity) for d in degrees]
    valid = [c for c in candidates if within_micro(c, lengths, capacity, max_micro)]
    if not valid:
        return None
    return min(valid, key=lambda a: assignment_time(a, lengths, cm, capacity))
