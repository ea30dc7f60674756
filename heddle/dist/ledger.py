"""CommLedger: a record of every collective heddle issues.

Every wrapper in :mod:`heddle.dist.collectives` calls :func:`record` once per collective with the
bytes this rank sends and receives under the bandwidth-optimal algorithm the op is priced by
(the same model nccl-tests' bus bandwidth assumes):

| op | bytes sent by one rank (n ranks, S = payload bytes) |
| --- | --- |
| all_reduce | 2 (n-1)/n * S (reduce-scatter then all-gather) |
| all_gather | (n-1) * S_local (its own shard to every other rank) |
| reduce_scatter | (n-1)/n * S_input |
| all_to_all | exact: everything in its input except the chunk it keeps |
| broadcast | root: S; others: 0 (received S) |
| send / recv | exact |

A group of one rank moves nothing and records zero bytes.

Ledgers nest: every active ledger records every collective. By default a ledger records
collectives from all threads (DDP comm hooks run on autograd's device threads on GPUs, a
background planner or checkpoint writer on its own thread); ``CommLedger(thread_local=True)``
records only those issued by the thread that entered it.

Progress: :func:`record` also counts the collectives this process has entered, and
:func:`blocking` notes which one each thread is inside until it returns. That bookkeeping (a
counter and a dict entry, no communication) is what :mod:`heddle.dist.watchdog` reads to name the
last collective a stalled rank entered.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field

_lock = threading.Lock()
_active: list["CommLedger"] = []
_tag_state = threading.local()


@dataclass(frozen=True)
class CommRecord:
    op: str
    group_size: int
    bytes_sent: int
    bytes_received: int
    tag: str | None = None
    thread: int = 0
    time: float = field(default=0.0, compare=False)


class CommLedger:
    """Context manager that records collectives issued while it is active.

    >>> with CommLedger() as ledger:
    ...     heddle.dist.all_reduce(t)
    >>> ledger.bytes_sent("all_reduce")
    """

    def __init__(self, *, thread_local: bool = False):
        self.thread_local = thread_local
        self._thread: int | None = None
        self._records: list[CommRecord] = []
        self._records_lock = threading.Lock()

    def __enter__(self) -> "CommLedger":
        self._thread = threading.get_ident()
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)

    def _add(self, record: CommRecord) -> None:
        if self.thread_local and record.thread != self._thread:
            return
        with self._records_lock:
            self._records.append(record)

    @property
    def records(self) -> list[CommRecord]:
        with self._records_lock:
            return list(self._records)

    def _select(self, op: str | None, tag: str | None) -> list[CommRecord]:
        return [r for r in self.records if (op is None or r.op == op) and (tag is None or r.tag == tag)]

    def bytes_sent(self, op: str | None = None, *, tag: str | None = None) -> int:
        return sum(r.bytes_sent for r in self._select(op, tag))

    def bytes_received(self, op: str | None = None, *, tag: str | None = None) -> int:
        return sum(r.bytes_received for r in self._select(op, tag))

    def count(self, op: str | None = None, *, tag: str | None = None) -> int:
        return len(self._select(op, tag))

    def clear(self) -> None:
        with self._records_lock:
            self._records.clear()

    def summary(self) -> dict[str, dict[str, int]]:
        """{op: {"calls", "bytes_sent", "bytes_received"}} over everything recorded."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            row = out.setdefault(r.op, {"calls": 0, "bytes_sent": 0, "bytes_received": 0})
            row["calls"] += 1
            row["bytes_sent"] += r.bytes_sent
            row["bytes_received"] += r.bytes_received
        return out


@contextlib.contextmanager
def comm_tag(tag: str):
    """Label the collectives issued by this thread inside the block (e.g. "ulysses", "moe")."""
    previous = getattr(_tag_state, "tag", None)
    _tag_state.tag = tag
    try:
        yield
    finally:
        _tag_state.tag = previous


class _Progress:
    """The collectives this process entered: a count, the last one, and the ones threads are
    blocked in right now (thread id -> (op, number, time.monotonic() at entry))."""

    def __init__(self):
        self._counter = itertools.count(1)
        self.entered = 0
        self.last_op = ""
        self.inside: dict[int, tuple[str, int, float]] = {}

    def enter(self, op: str) -> None:
        self.entered = next(self._counter)  # itertools.count is atomic under the GIL
        self.last_op = op

    def oldest_inside(self) -> tuple[str, int, float] | None:
        entries = list(self.inside.values())
        return min(entries, key=lambda e: e[2]) if entries else None


progress = _Progress()


class blocking:
    """``with blocking(op, async_op):`` around a collective call: this thread is inside ``op``
    until the call returns (an async call returns at once and is not tracked)."""

    __slots__ = ("op", "track")

    def __init__(self, op: str, async_op: bool = False):
        self.op, self.track = op, not async_op

    def __enter__(self):
        if self.track:
            progress.inside[threading.get_ident()] = (self.op, progress.entered, time.monotonic())

    def __exit__(self, *exc):
        if self.track:
            progress.inside.pop(threading.get_ident(), None)


def record(op: str, group_size: int, bytes_sent: int, bytes_received: int) -> None:
    """Record one collective in every active ledger (called by heddle.dist's wrappers)."""
    progress.enter(op)
    if not _active:
        return
    rec = CommRecord(
        op=op,
        group_size=int(group_size),
        bytes_sent=int(bytes_sent),
        bytes_received=int(bytes_received),
        tag=getattr(_tag_state, "tag", None),
        thread=threading.get_ident(),
        time=time.perf_counter(),
    )
    with _lock:
        ledgers = list(_active)
    for ledger in ledgers:
        ledger._add(rec)
