"""Collective watchdog: a stalled rank ends the job within a bounded time, and is named.

    from heddle.dist.watchdog import start_watchdog
    watchdog = start_watchdog(timeout_s=60)      # every rank of the group calls it
    ...                                          # training
    watchdog.close()

Each rank runs two daemon threads and no collective:

- a *heartbeat* thread writes, every ``period`` (timeout/10, between 0.05 s and 5 s), this rank's
  heartbeat to the process group's store (the c10d store every rank already talks to): a beat
  counter, how many collectives it entered, the last one, and the one it is blocked in (the
  ledger's progress, :data:`heddle.dist.ledger.progress`), and reads every peer's heartbeat;
- a *judge* thread decides on this rank's own clock (a peer's heartbeat changing is observed
  locally, so clock skew between hosts does not matter).

The job is ended when, for longer than ``timeout_s - 2 * period`` (so the decision falls within
``timeout_s``):

1. this rank is blocked inside one heddle collective, or
2. a peer's heartbeat stopped changing (a SIGSTOPped, dead, or natively hung process), or
3. the store stopped answering (its host is stopped), or
4. a peer's watchdog fired (its reason is repeated).

It then prints one line naming the stalled rank(s) and the last collective each entered, and
ends this process with ``os._exit(EXIT_CODE)``; the launcher (``heddle run``, torchrun) then
stops the others, or their own watchdogs do. A rank that never sent a heartbeat (it has not
started its watchdog yet) is never judged stale on its own, only named when this rank is blocked.
Collectives issued with ``async_op=True`` and collectives torch issues itself (DDP's bucket
all-reduce, FSDP's all-gathers) are not "blocked inside" events; a stalled peer is still caught
by rule 2, and the process-group timeout (``init_distributed(timeout=...)``) is the backstop.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable

import torch.distributed as dist

from heddle.dist.ledger import progress

EXIT_CODE = 124  # as timeout(1): the job was ended for taking too long
WATCHDOG_ENV = "HEDDLE_WATCHDOG_TIMEOUT_S"  # set by `heddle run --watchdog-timeout`
_active: dict[str, "Watchdog"] = {}
_active_lock = threading.Lock()


def _group_ranks(group) -> list[int]:
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def _default_store():
    return dist.distributed_c10d._get_default_store()


class Watchdog:
    """See the module docstring. ``on_stall(message)`` replaces the default print-and-exit
    (for tests); the watchdog fires at most once."""

    def __init__(self, timeout_s: float, group=None, *, store=None,
                 on_stall: Callable[[str], None] | None = None):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be a number of seconds > 0")
        if not dist.is_initialized():
            raise ValueError("start_watchdog() needs an initialized process group (heddle.init_distributed())")
        self.timeout_s = float(timeout_s)
        self.period = min(max(self.timeout_s / 10, 0.05), 5.0)
        self.limit = self.timeout_s - 2 * self.period
        self.rank = dist.get_rank()
        self.ranks = _group_ranks(group)
        self.peers = [r for r in self.ranks if r != self.rank]
        self.store = store if store is not None else _default_store()
        self.prefix = f"heddle/watchdog/{zlib.crc32(json.dumps(self.ranks).encode()):08x}"
        self.on_stall = on_stall
        self.message: str | None = None
        start = time.monotonic()
        self._seen: dict[int, tuple[str | None, float]] = {r: (None, start) for r in self.peers}
        self._store_ok = start
        self._store_error: str | None = None
        self._beat = 0
        self._state = "run"
        self._stop = threading.Event()
        self._fired = threading.Event()
        self._threads = [threading.Thread(target=self._heartbeat_loop, name="heddle-watchdog-beat", daemon=True),
                         threading.Thread(target=self._judge_loop, name="heddle-watchdog-judge", daemon=True)]
        for t in self._threads:
            t.start()

    # -- heartbeat: write mine, read theirs ----------------------------------------------
    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def _payload(self) -> str:
        inside = progress.oldest_inside()
        now = time.monotonic()
        return json.dumps({"beat": self._beat, "entered": progress.entered, "last": progress.last_op,
                           "inside": [inside[0], inside[1], round(now - inside[2], 1)] if inside else None,
                           "state": self._state, "reason": self.message or ""})

    def _read_peers(self) -> dict[int, str]:
        keys = [self._key(r) for r in self.peers]
        if not keys:
            return {}
        if self.store.check(keys):
            try:
                return {r: v.decode() for r, v in zip(self.peers, self.store.multi_get(keys))}
            except (RuntimeError, AttributeError, NotImplementedError):  # a store without multi_get
                pass
        return {r: self.store.get(k).decode() for r, k in zip(self.peers, keys) if self.store.check([k])}

    def _publish(self) -> None:
        self._beat += 1
        self.store.set(self._key(self.rank), self._payload())

    def _heartbeat_loop(self) -> None:
        while True:
            try:
                self._publish()
                values = self._read_peers()
                now = time.monotonic()
                for r, value in values.items():
                    if value != self._seen[r][0]:
                        self._seen[r] = (value, now)
                self._store_ok = now
            except Exception as e:  # noqa: BLE001 - a store that went away must not kill training
                self._store_error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if self._stop.wait(self.period):
                break
        if not self._fired.is_set():
            self._state = "closed"
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - the store's host may have exited first
                pass

    # -- judge ------------------------------------------------------------------------------
    def _peer(self, rank: int) -> dict | None:
        value = self._seen[rank][0]
        return json.loads(value) if value is not None else None

    @staticmethod
    def _describe(rank: int, peer: dict | None) -> str:
        if peer is None:
            return f"rank {rank} never sent a heartbeat (its watchdog has not started)"
        last = (f"last collective it entered: {peer['last']} (#{peer['entered']})" if peer["entered"]
                else "it had entered no collective yet")
        where = (f", blocked in {peer['inside'][0]} (#{peer['inside'][1]}) for {peer['inside'][2]} s"
                 if peer["inside"] else ", not inside one")
        return f"{last}{where} (as of its last heartbeat)"

    def _verdict(self) -> str | None:
        now = time.monotonic()
        parts = []
        inside = progress.oldest_inside()
        stuck = inside is not None and now - inside[2] > self.limit
        stale = []
        for r in self.peers:
            peer = self._peer(r)
            if peer is not None and peer["state"] == "run" and self._store_ok - self._seen[r][1] > self.limit:
                stale.append(r)
        fired = [r for r in self.peers if (self._peer(r) or {}).get("state") == "fired"]
        store_dead = now - self._store_ok > self.limit
        if not (stuck or stale or fired or store_dead):
            return None
        if stuck:
            parts.append(f"blocked in {inside[0]} (collective #{inside[1]}) for {now - inside[2]:.1f} s")
            # Already firing: a peer silent for a few periods (healthy ones beat every period) is
            # the one to name, even before it is silent for the whole limit.
            quiet = max(3 * self.period, 1.0)
            stale += [r for r in self.peers if r not in stale and self._peer(r) is not None
                      and self._peer(r)["state"] == "run" and self._store_ok - self._seen[r][1] > quiet]
        for r in stale:
            parts.append(f"rank {r} stalled: no heartbeat for {self._store_ok - self._seen[r][1]:.1f} s "
                         f"(stopped, hung in native code, or dead); {self._describe(r, self._peer(r))}")
        if stuck and not stale:
            waiting = [r for r in self.peers if r not in fired]
            absent = [r for r in waiting if (self._peer(r) or {}).get("inside") is None]
            for r in absent or waiting:
                peer = self._peer(r)
                state = "has not entered it" if peer is not None and peer["inside"] is None else "is waiting too"
                parts.append(f"rank {r} {state}; {self._describe(r, peer)}")
        for r in fired:
            parts.append(f"rank {r}'s watchdog fired ({(self._peer(r) or {}).get('reason', '')[:300]})")
        if store_dead:
            parts.append(f"the store has not answered for {now - self._store_ok:.1f} s (its host may be "
                         f"stopped: the launcher, or rank 0 under tcp:// init)"
                         + (f"; last error {self._store_error}" if self._store_error else ""))
        return (f"heddle watchdog (rank {self.rank}, timeout {self.timeout_s:g} s): " + "; ".join(parts)
                + f"; ending the job (exit {EXIT_CODE})")

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.period):
            message = self._verdict()
            if message is None:
                continue
            self._fire(message)
            return

    def _fire(self, message: str) -> None:
        self.message = message
        self._state = "fired"
        self._fired.set()
        # Tell the peers (best effort: a stopped store host must not keep this rank alive).
        publisher = threading.Thread(target=self._try_publish, daemon=True)
        publisher.start()
        publisher.join(timeout=min(self.period, 0.2))
        if self.on_stall is not None:
            self._stop.set()
            self.on_stall(message)
            return
        print(message, file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def _try_publish(self) -> None:
        try:
            self._publish()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        """Stop both threads and tell the peers this rank is done (so they never judge it stale)."""
        if self._stop.is_set() and not any(t.is_alive() for t in self._threads):
            return
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=2 * self.period + 1.0)
        with _active_lock:
            if _active.get(self.prefix) is self:
                del _active[self.prefix]

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_watchdog(timeout_s: float, group=None, *, store=None,
                   on_stall: Callable[[str], None] | None = None) -> Watchdog:
    """Start this rank's watchdog over ``group`` (None: the default group); every rank of the
    group calls it. A watchdog already running on the same ranks is replaced."""
    watchdog = Watchdog(timeout_s, group, store=store, on_stall=on_stall)
    with _active_lock:
        previous = _active.get(watchdog.prefix)
        _active[watchdog.prefix] = watchdog
    if previous is not None:
        previous._stop.set()
    return watchdog


def env_timeout() -> float | None:
    """``HEDDLE_WATCHDOG_TIMEOUT_S`` as seconds (set by ``heddle run --watchdog-timeout``)."""
    text = os.environ.get(WATCHDOG_ENV)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{WATCHDOG_ENV}={text!r} must be a number of seconds > 0")
    return value


@atexit.register
def _close_all() -> None:
    with _active_lock:
        watchdogs = list(_active.values())
    for watchdog in watchdogs:
        watchdog.close()
