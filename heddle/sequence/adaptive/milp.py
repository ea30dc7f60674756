"""The FlexSP mixed-integer program over lanes, solved with HiGHS (highspy).

FlexSP plans each micro-batch separately and sums their makespans. heddle plans the whole step
at once: a lane (group) keeps its ranks for the step and runs its sequences in n_g micro-batches
of at most d_g * cap tokens, so memory (eq. 4) bounds each micro-batch and the time adds up per
lane. Over Q buckets (representative length s_hat_q, count c_q, minimum degree mindeg_q) and
candidate lane slots g (degree d_g, K_d <= N/d slots per degree):

    minimise C
    s.t.  sum_g d_g m_g                          <= N            (devices; m_g in {0,1}: lane used)
          sum_g x_qg                             =  c_q          (each sequence exactly once)
          b_{d_g} n_g + sum_q t_q(d_g) x_qg      <= C            (step time, eqs. 2-3 with
                                                                   t_q(d) = cm.work(s_hat_q, d))
          sum_q s_hat_q x_qg                     <= d_g cap n_g  (memory per micro-batch, eq. 4)
          n_g <= n_max m_g                                        (micro-batches only in used lanes)
          x_qg = 0 where d_g < mindeg_q                           (minimum degree)
          m_{d,j} >= m_{d,j+1},  load_{d,j} >= load_{d,j+1}       (symmetry breaking within a degree)

x_qg integer in [0, c_q], n_g integer. The memory row counts tokens, not the packing of whole
sequences into micro-batches: the plan's real micro-batches come from :func:`split_lane` and the
planner re-prices them (one more micro-batch is possible when sequences do not pack). Lanes of
one degree are interchangeable, so slots are ordered; any multiset of power-of-two degrees with
sum <= N lays out as aligned rank ranges (largest first). Warm-started from the greedy plan; a
time limit returns the incumbent.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import highspy
import numpy as np

from heddle.sequence.adaptive.bucketing import Buckets
from heddle.sequence.adaptive.cost_model import CostModel, min_degree_for


@dataclass
class MilpResult:
    assignment: list[tuple[int, list[int]]] | None  # (degree, sequence indices) per used group
    status: str           # "optimal" | "time_limit" | "infeasible" | HiGHS status text
    objective: float      # step time over bucket representatives (token-count micro-batches)
    gap: float
    solve_time: float


def solve_lanes(buckets: Buckets, num_devices: int, cm: CostModel, degrees, capacity: int, *,
                warm_start: list[tuple[int, list[int]]] | None = None, time_limit: float = 1.0,
                mip_rel_gap: float = 1e-3, max_micro: int | None = None) -> MilpResult:
    """Solve the program above. ``buckets.members`` hold sequence indices; the returned assignment
    gives each used lane ``(degree, [indices])``, bucket members dealt out in order. ``capacity``:
    tokens per device; ``max_micro``: cap on n_g (None: none); ``warm_start``: an assignment over
    the same indices (e.g. the greedy plan on the bucket representatives)."""
    start = time.perf_counter()
    reps, counts = buckets.lengths, buckets.counts
    nq = len(reps)
    mindeg = [min_degree_for(s, capacity) for s in reps]
    degrees = sorted(d for d in degrees if d <= num_devices)
    slots = []  # (degree, eligible buckets)
    for d in degrees:
        eligible = [q for q in range(nq) if mindeg[q] <= d]
        k = min(num_devices // d, sum(counts[q] for q in eligible))
        slots.extend((d, eligible) for _ in range(k))
    # columns: per slot m_g, n_g, then x_qg (eligible q); C last
    col_of_m, col_of_n, n_max, col_of_x, lower, upper, integ = [], [], [], {}, [], [], []
    for g, (d, eligible) in enumerate(slots):
        col_of_m.append(len(lower))
        lower.append(0.0), upper.append(1.0), integ.append(1)
        n_max.append(float(-(-sum(reps[q] * counts[q] for q in eligible) // (d * capacity))))
        if max_micro is not None:
            n_max[-1] = float(min(n_max[-1], max_micro))
        col_of_n.append(len(lower))
        lower.append(0.0), upper.append(n_max[-1]), integ.append(1)
        for q in eligible:
            col_of_x[(q, g)] = len(lower)
            lower.append(0.0), upper.append(float(counts[q])), integ.append(1)
    col_c = len(lower)
    lower.append(0.0), upper.append(highspy.kHighsInf), integ.append(0)
    ncol = len(lower)
    rows_lo, rows_hi, starts, index, value = [], [], [0], [], []

    def add_row(entries, lo, hi):
        for c, v in entries:
            index.append(c)
            value.append(v)
        starts.append(len(index))
        rows_lo.append(lo)
        rows_hi.append(hi)

    inf = highspy.kHighsInf
    add_row([(col_of_m[g], float(d)) for g, (d, _) in enumerate(slots)], -inf, float(num_devices))
    for q in range(nq):
        add_row([(col_of_x[(q, g)], 1.0) for g in range(len(slots)) if (q, g) in col_of_x],
                float(counts[q]), float(counts[q]))
    work = {(q, d): cm.work(reps[q], d) for q in range(nq) for d in degrees}
    for g, (d, eligible) in enumerate(slots):
        add_row([(col_of_n[g], cm.overhead(d))] + [(col_of_x[(q, g)], work[(q, d)]) for q in eligible]
                + [(col_c, -1.0)], -inf, 0.0)
        add_row([(col_of_x[(q, g)], float(reps[q])) for q in eligible] + [(col_of_n[g], -float(d * capacity))],
                -inf, 0.0)
        add_row([(col_of_n[g], 1.0), (col_of_m[g], -n_max[g])], -inf, 0.0)
        if g + 1 < len(slots) and slots[g + 1][0] == d:
            add_row([(col_of_m[g], 1.0), (col_of_m[g + 1], -1.0)], 0.0, inf)
            add_row([(col_of_x[(q, g)], work[(q, d)]) for q in eligible]
                    + [(col_of_x[(q, g + 1)], -work[(q, d)]) for q in eligible], 0.0, inf)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = ncol, len(rows_lo)
    lp.col_cost_ = np.eye(1, ncol, col_c).ravel()
    lp.col_lower_, lp.col_upper_ = np.array(lower), np.array(upper)
    lp.row_lower_, lp.row_upper_ = np.array(rows_lo), np.array(rows_hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = ncol, len(rows_lo)
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value)
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integ]
    h = _new_highs()
    h.setOptionValue("threads", 1)
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("time_limit", float(max(time_limit - (time.perf_counter() - start), 1e-3)))
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.passModel(lp)
    if warm_start is not None:
        x0 = _warm_values(warm_start, buckets, slots, col_of_m, col_of_n, col_of_x, col_c, ncol, cm, work, capacity)
        if x0 is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(x0)
            sol.value_valid = True
            h.setSolution(sol)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    text = h.modelStatusToString(status)
    elapsed = time.perf_counter() - start
    if status == highspy.HighsModelStatus.kInfeasible:
        return MilpResult(None, "infeasible", float("inf"), float("inf"), elapsed)
    if info.primal_solution_status != 2:  # no feasible incumbent
        return MilpResult(None, text, float("inf"), float("inf"), elapsed)
    values = np.asarray(h.getSolution().col_value)
    assignment = []
    pools = [list(m) for m in buckets.members]
    for g, (d, eligible) in enumerate(slots):
        members = []
        for q in eligible:
            n = int(round(values[col_of_x[(q, g)]]))
            members.extend(pools[q][:n])
            del pools[q][:n]
        if members:
            assignment.append((d, members))
    assert all(not p for p in pools), "MILP solution left sequences unassigned"
    name = {highspy.HighsModelStatus.kOptimal: "optimal",
            highspy.HighsModelStatus.kTimeLimit: "time_limit"}.get(status, text)
    return MilpResult(assignment, name, float(values[col_c]), float(info.mip_gap), elapsed)


_BANNER_SHOWN = []


def _new_highs() -> highspy.Highs:
    """A silent HiGHS instance. The first construction in a process prints HiGHS' banner from C++
    to stdout; it is swallowed so ``heddle plan`` prints only the plan."""
    if _BANNER_SHOWN:
        h = highspy.Highs()
    else:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        _BANNER_SHOWN.append(True)
    h.setOptionValue("output_flag", False)
    return h


def _warm_values(assignment, buckets, slots, col_of_m, col_of_n, col_of_x, col_c, ncol, cm, work, capacity):
    """The greedy plan as a column vector (HiGHS checks it against the bucketed constraints)."""
    bucket_of = {k: q for q, m in enumerate(buckets.members) for k in m}
    x = np.zeros(ncol)
    free = {}
    for g, (d, _) in enumerate(slots):
        free.setdefault(d, []).append(g)
    groups = []
    for d, idx in assignment:
        load = sum(work[(bucket_of[k], d)] for k in idx)
        groups.append((d, load, idx))
    groups.sort(key=lambda t: (t[0], -t[1]))  # slots of a degree take loads in descending order
    makespan = 0.0
    for d, load, idx in groups:
        if not free.get(d):
            return None
        g = free[d].pop(0)
        x[col_of_m[g]] = 1.0
        tokens = 0
        for k in idx:
            q = bucket_of[k]
            if (q, g) not in col_of_x:
                return None
            x[col_of_x[(q, g)]] += 1
            tokens += buckets.lengths[q]
        n = -(-tokens // (d * capacity))
        x[col_of_n[g]] = n
        makespan = max(makespan, load + n * cm.overhead(d))
    x[col_c] = makespan
    return x
