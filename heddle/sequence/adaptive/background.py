"""Planning off the critical path: the plan for step t+1 is computed while step t trains.

One rank (``src``, default the group's rank 0) plans in the background and broadcasts the finished
plan as JSON, so every rank gets the identical plan even though a time-limited solve is not
reproducible. A failure in the planner is broadcast too and raised on every rank: no rank waits
forever for a plan. ``mode="process"`` plans in a spawned worker process: the greedy search is
Python and HiGHS holds the GIL for part of its run, so a thread would take time from the training
loop's Python (measured: a busy main thread kept ~60% of its speed next to a planning thread).
``mode="thread"`` needs no extra process (and works inside daemonic processes, which may not
spawn children).

    planner = BackgroundPlanner(world, cost_model)
    planner.submit(lengths_of_step(0))
    for step in ...:
        plan = planner.result()                   # collective: every rank calls it
        planner.submit(lengths_of_step(step + 1))  # overlaps with this step's training
        train(plan)
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

import torch

import heddle.dist as hd
from heddle.sequence.adaptive.cost_model import CostModel
from heddle.sequence.adaptive.plan import Plan
from heddle.sequence.adaptive.planner import plan_batch


class PlannerError(RuntimeError):
    """The planner failed on the planning rank; raised on every rank."""


class BackgroundPlanner:
    def __init__(self, num_devices: int, cost_model: CostModel, *, group=None, src: int = 0,
                 mode: str = "thread", **plan_kwargs):
        if mode not in ("thread", "process"):
            raise ValueError(f"mode={mode!r}: valid are 'thread', 'process'")
        self.group = group
        self.rank, self.world_size = hd.group_rank_size(group)
        if not 0 <= src < self.world_size:
            raise ValueError(f"src={src} must be a rank of the group (0..{self.world_size - 1})")
        self.src = src
        self.num_devices, self.cost_model, self.plan_kwargs = num_devices, cost_model, plan_kwargs
        self._pool = None
        if self.rank == src:
            if mode == "process":
                self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
            else:
                self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="heddle-planner")
        self._future: cf.Future | None = None
        self._pending = False

    def submit(self, lengths) -> None:
        """Start planning ``lengths`` (every rank calls it; only ``src`` computes)."""
        if self._pending:
            raise RuntimeError("submit() called twice without result(): one plan in flight at a time")
        self._pending = True
        if self._pool is not None:
            self._future = self._pool.submit(plan_batch, list(lengths), self.num_devices, self.cost_model,
                                             **self.plan_kwargs)

    def result(self) -> Plan:
        """The submitted plan on every rank (collective over ``group``); raises PlannerError on every
        rank if planning failed."""
        if not self._pending:
            raise RuntimeError("result() without a submit()")
        self._pending = False
        payload, status = b"", 0
        if self._future is not None:
            try:
                payload = self._future.result().to_json().encode()
            except Exception as e:  # noqa: BLE001 - surfaces on every rank below
                payload, status = f"{type(e).__name__}: {e}".encode(), 1
            self._future = None
        if self.world_size > 1:
            global_src = self._global_src()
            header = torch.tensor([status, len(payload)], dtype=torch.int64)
            hd.broadcast(header, src=global_src, group=self.group)
            status, size = int(header[0]), int(header[1])
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(size, dtype=torch.uint8)
            if len(buf) != size:
                buf = torch.empty(size, dtype=torch.uint8)
            hd.broadcast(buf, src=global_src, group=self.group)
            payload = bytes(buf.numpy())
        if status:
            raise PlannerError(f"planner failed on rank {self.src}: {payload.decode()}")
        return Plan.from_json(payload.decode())

    def _global_src(self) -> int:
        import torch.distributed as dist

        if self.group is None:
            return self.src
        return dist.get_global_rank(self.group, self.src)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
