"""Greedy group assignment for one micro-batch: always valid, fast, and the MILP's warm start.

An assignment is a list of ``(degree, [sequence indices])``: one entry per group. Two heuristics,
the better one wins:

- *Target-time packing* (bisection on the makespan C): sequences, longest first, go first-fit
  into an open group (smallest degree first) whose time stays within C and memory within
  capacity; otherwise they open a group of the smallest degree that runs them within C (small
  groups waste the least on all-to-all). C is feasible when the groups use at most N devices.
- *Homogeneous LPT*: for every allowed degree d, N/d groups, longest-processing-time-first.
"""

from __future__ import annotations

from heddle.sequence.adaptive.cost_model import CostModel

Assignment = list[tuple[int, list[int]]]


def assignment_time(assignment: Assignment, lengths, cm: CostModel) -> float:
    """Makespan: the slowest group's predicted time (eqs. 2-3)."""
    return max((cm.group_time([lengths[k] for k in idx], d) for d, idx in assignment if idx), default=0.0)


def homogeneous_lpt(indices, lengths, num_devices: int, cm: CostModel, degree: int,
                    capacity: int) -> Assignment | None:
    """N/d groups of ``degree``; longest work first onto the least-loaded group with room.
    None if some sequence does not fit."""
    groups = num_devices // degree
    if groups < 1:
        return None
    load = [0.0] * groups
    tokens = [0] * groups
    members: list[list[int]] = [[] for _ in range(groups)]
    cap = degree * capacity
    for k in sorted(indices, key=lambda k: -lengths[k]):
        s = lengths[k]
        best = None
        for g in range(groups):
            if tokens[g] + s <= cap and (best is None or load[g] < load[best]):
                best = g
        if best is None:
            return None
        load[best] += cm.work(s, degree)
        tokens[best] += s
        members[best].append(k)
    return [(degree, m) for m in members if m]


def _pack_at(target: float, order, lengths, num_devices: int, cm: CostModel, degrees, capacity: int,
             work) -> Assignment | None:
    """Pack every sequence into groups of time <= target using at most num_devices; or None."""
    bins: dict[int, list[list]] = {d: [] for d in degrees}  # degree -> [[time, tokens, members]]
    used = 0
    for k in order:
        s = lengths[k]
        fitting = [d for d in degrees if s <= d * capacity and work[k][d] + cm.overhead(d) <= target]
        if not fitting:
            return None
        placed = False
        for d in fitting:  # first fit into an open group, smallest degree first
            w = work[k][d]
            for b in bins[d]:
                if b[0] + w <= target and b[1] + s <= d * capacity:
                    b[0] += w
                    b[1] += s
                    b[2].append(k)
                    placed = True
                    break
            if placed:
                break
        if not placed:  # open a group of the smallest degree that runs it within the target
            d = fitting[0]
            used += d
            if used > num_devices:
                return None
            bins[d].append([cm.overhead(d) + work[k][d], s, [k]])
    return [(d, b[2]) for d in degrees for b in bins[d]]


def target_packing(indices, lengths, num_devices: int, cm: CostModel, degrees, capacity: int,
                   iterations: int = 30) -> Assignment | None:
    """Bisection on the makespan with :func:`_pack_at`; None when no target works."""
    degrees = sorted(d for d in degrees if d <= num_devices)
    if not degrees or not indices:
        return None
    order = sorted(indices, key=lambda k: -lengths[k])
    work = {k: {d: cm.work(lengths[k], d) for d in degrees} for k in indices}
    # lower bound: the slowest single sequence at its best degree; upper bound: everything serial
    lo = max(min(work[k][d] + cm.overhead(d) for d in degrees if lengths[k] <= d * capacity)
             if any(lengths[k] <= d * capacity for d in degrees) else float("inf") for k in indices)
    if lo == float("inf"):
        return None
    hi = sum(min(work[k].values()) for k in indices) + max(cm.overhead(d) for d in degrees)
    hi = max(hi, lo) * 2
    best = _pack_at(hi, order, lengths, num_devices, cm, degrees, capacity, work)
    if best is None:
        return None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        got = _pack_at(mid, order, lengths, num_devices, cm, degrees, capacity, work)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-4 * hi:
            break
    return best


def greedy_assignment(indices, lengths, num_devices: int, cm: CostModel, degrees,
                      capacity: int) -> Assignment | None:
    """The better of target-time packing and every homogeneous LPT; None if nothing fits."""
    candidates = [target_packing(indices, lengths, num_devices, cm, degrees, capacity)]
    candidates += [homogeneous_lpt(indices, lengths, num_devices, cm, d, capacity) for d in degrees]
    valid = [c for c in candidates if c is not None]
    if not valid:
        return None
    return min(valid, key=lambda a: assignment_time(a, lengths, cm))
