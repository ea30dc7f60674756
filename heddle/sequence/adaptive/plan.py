"""A plan: which aligned rank range (lane) runs which sequences, in which micro-batches, and why.

``Plan.groups`` is the flat list ``[(ranks, [sequence indices]), ...]`` over all micro-batches;
``Plan.micro_batches[i].groups`` holds every lane's i-th micro-batch (a lane with fewer idles).
Lanes own disjoint ranks and do not wait for each other between micro-batches, so the predicted
step time is the slowest lane's (``Plan.lanes()``, ``extra["lane_times"]``). A plan is plain
data: ``to_dict``/``from_dict`` round-trip through JSON (rank 0 broadcasts it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from heddle.sequence.adaptive.cost_model import CostModel


def layout_groups(degrees: list[int]) -> list[tuple[int, ...]]:
    """Aligned rank ranges for a multiset of power-of-two degrees: largest first, back to back
    (each start is then a multiple of its size). Returns ranks in the input order."""
    order = sorted(range(len(degrees)), key=lambda i: -degrees[i])
    ranks: list[tuple[int, ...]] = [()] * len(degrees)
    start = 0
    for i in order:
        d = degrees[i]
        assert start % d == 0
        ranks[i] = tuple(range(start, start + d))
        start += d
    return ranks


@dataclass
class MicroBatch:
    groups: list[tuple[tuple[int, ...], list[int]]]
    predicted_time: float

    def group_of(self, rank: int) -> tuple[tuple[int, ...], list[int]] | None:
        for ranks, idx in self.groups:
            if rank in ranks:
                return ranks, idx
        return None


@dataclass
class Plan:
    num_devices: int
    lengths: list[int]
    micro_batches: list[MicroBatch]
    predicted_time: float
    solver: str                 # "milp" | "greedy" | "homogeneous" | "manual"
    status: str                 # solver status: "optimal", "time_limit", "greedy", ...
    solve_time: float
    gap: float = float("nan")   # MILP relative gap of the last solve (nan for greedy)
    baseline_time: float = float("nan")  # best homogeneous plan, same micro-batching model
    baseline_degree: int = 0
    cost_model: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def groups(self) -> list[tuple[tuple[int, ...], list[int]]]:
        return [g for mb in self.micro_batches for g in mb.groups]

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["micro_batches"] = [{"groups": [[list(r), list(i)] for r, i in mb.groups],
                               "predicted_time": mb.predicted_time} for mb in self.micro_batches]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["micro_batches"] = [MicroBatch([(tuple(r), list(i)) for r, i in mb["groups"]], mb["predicted_time"])
                              for mb in d["micro_batches"]]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def validate(self, cm: CostModel, *, capacity: int | None = None) -> None:
        """Raise AssertionError unless: every sequence exactly once, groups aligned powers of two,
        no rank in two groups of a micro-batch, memory within capacity (hence min degree)."""
        cap = cm.token_capacity if capacity is None else capacity
        seen = []
        for i, mb in enumerate(self.micro_batches):
            used = set()
            for ranks, idx in mb.groups:
                d = len(ranks)
                assert d >= 1 and d & (d - 1) == 0, f"micro-batch {i}: group size {d} not a power of two"
                assert ranks == tuple(range(ranks[0], ranks[0] + d)) and ranks[0] % d == 0, \
                    f"micro-batch {i}: ranks {ranks} are not an aligned range"
                assert ranks[-1] < self.num_devices, f"micro-batch {i}: rank {ranks[-1]} >= {self.num_devices}"
                assert not used & set(ranks), f"micro-batch {i}: ranks {sorted(used & set(ranks))} in two groups"
                used |= set(ranks)
                tokens = sum(self.lengths[k] for k in idx)
                assert tokens <= d * cap, f"micro-batch {i}: {tokens} tokens on {d} devices > capacity {cap}/device"
                seen.extend(idx)
        assert sorted(seen) == list(range(len(self.lengths))), "sequences not assigned exactly once"

    def lanes(self) -> list[tuple[tuple[int, ...], list[list[int]]]]:
        """Per rank range: its micro-batches (sequence indices), in order."""
        out: dict[tuple[int, ...], list[list[int]]] = {}
        for mb in self.micro_batches:
            for ranks, idx in mb.groups:
                out.setdefault(ranks, []).append(idx)
        return sorted(out.items(), key=lambda item: item[0][0])

    def table(self, max_rows: int = 40) -> str:
        """A readable account of the plan: one line per lane, then the totals and the baseline."""
        lines = [f"plan for {len(self.lengths)} sequences ({sum(self.lengths):,} tokens) on "
                 f"{self.num_devices} devices, cost model {self.cost_model!r}",
                 f"{'ranks':>11} {'deg':>4} {'seqs':>5} {'tokens':>11} {'longest':>8} {'micro':>5} {'time s':>9}"]
        lanes = self.lanes()
        for ranks, parts in lanes[:max_rows]:
            toks = [self.lengths[k] for idx in parts for k in idx]
            t = self.extra.get("lane_times", {}).get(f"{ranks[0]}", float("nan"))
            lines.append(f"{f'{ranks[0]}-{ranks[-1]}':>11} {len(ranks):>4} {len(toks):>5} {sum(toks):>11,} "
                         f"{max(toks):>8,} {len(parts):>5} {t:>9.3f}")
        if len(lanes) > max_rows:
            lines.append(f"({len(lanes) - max_rows} of {len(lanes)} lanes not shown)")
        used = sum(len(r) for r, _ in lanes)
        lines.append(f"predicted step time {self.predicted_time:.3f} s (slowest lane), {len(lanes)} lanes on "
                     f"{used}/{self.num_devices} devices, up to {len(self.micro_batches)} micro-batch(es); "
                     f"solver {self.solver} ({self.status}), {self.solve_time * 1e3:.0f} ms")
        if self.gap == float("inf"):
            lines.append("MILP gap unbounded: the solver proved no lower bound within its time limit; the plan "
                         "is the best solution found (the homogeneous plan below is the comparison that counts)")
        elif self.gap == self.gap and self.gap > 0:
            # HiGHS's relative gap (best solution - proven bound) / best solution, on the bucketed
            # program: how far the proof got in the time limit, not how far this plan is from the
            # best one (a makespan program's lower bound stays loose for long)
            lines.append(f"MILP gap {self.gap:.0%}: the solver's proven lower bound was {self.gap:.0%} below its "
                         f"best solution when the time limit hit; a loose bound, not this plan's distance "
                         f"from the optimum (the homogeneous plan below is the comparison that counts)")
        if self.baseline_degree:
            lines.append(f"best homogeneous plan: degree {self.baseline_degree}, {self.baseline_time:.3f} s "
                         f"-> adaptive speedup {self.baseline_time / self.predicted_time:.2f}x")
        return "\n".join(lines)
