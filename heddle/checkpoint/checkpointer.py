"""Checkpointer: lazy snapshots -> keeper memory -> durable disk commits; restore with fallback.

    ckpt = Checkpointer("ckpts/", keep=3)                       # levels=("memory", "disk")
    ckpt.save(step, {"model": model, "optimizer": opt, "sampler": sampler})   # returns at once
    ...                                                        # forward/backward overlap the copy
    opt.step()                                                 # pre-step hook: wait_for_snapshot()
    step = ckpt.restore({"model": model, "optimizer": opt, "sampler": sampler})

Levels (DataStates-LLM's multi-level flush, REFT's in-memory tier):
1. host snapshot: ``save`` returns after ``state_dict()`` and a pickle of the non-tensor parts; the
   tensor copy runs in the background (:mod:`heddle.checkpoint.snapshot`).
2. memory: with "memory" in ``levels`` the slots are shared-memory files held by the node's keeper
   (:mod:`heddle.checkpoint.keeper`); a copied snapshot is registered there at once and survives a
   worker crash. ``redundancy="peer"|"parity"`` adds a partner copy or XOR parity across nodes.
3. disk: a writer thread writes per-rank files (temp + fsync + rename); ``poll`` (collective, run
   at every ``save`` and ``wait``) agrees on the newest step every rank has made durable and rank
   0 writes its manifest last, then applies ``keep``.
``flush="every"`` makes every save durable (back-pressure when the disk is slower than the
saves); ``flush="latest"`` writes the newest snapshot whenever the writer is free and skips
superseded ones (every save still reaches memory).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.checkpoint import restore as restore_mod
from heddle.checkpoint.keeper import KeeperClient, keeper_root, shutdown_keeper
from heddle.checkpoint.snapshot import Snapshot, SnapshotEngine
from heddle.checkpoint.state import RNG_KEY, capture_rng, flatten
from heddle.checkpoint.storage import apply_retention, encode_index, write_manifest, write_rank_files

log = logging.getLogger("heddle.checkpoint")

LEVELS = ("memory", "disk")


class SaveHandle:
    """What ``save`` returns: ``snapshot_done()``, ``durable()`` (this rank's files written),
    ``wait_snapshot()``, ``wait_durable()``."""

    def __init__(self, snapshot: Snapshot):
        self.step = snapshot.step
        self._snapshot = snapshot
        self._durable = threading.Event()
        self.created_at = time.perf_counter()
        self.durable_at: float | None = None   # perf_counter() when this rank's files were fsynced
        self.skipped = False       # flush="latest" dropped it in favour of a newer snapshot

    def snapshot_done(self) -> bool:
        return self._snapshot.copied.is_set()

    def durable(self) -> bool:
        return self._durable.is_set()

    def wait_snapshot(self) -> None:
        self._snapshot.copied.wait()

    def wait_durable(self, timeout: float | None = None) -> bool:
        return self._durable.wait(timeout)


class Checkpointer:
    def __init__(self, directory: str, *, group: dist.ProcessGroup | None = None, keep: int = 3,
                 levels: tuple[str, ...] = LEVELS, redundancy: str | None = None, flush: str = "every",
                 num_slots: int = 2, ranks_per_node: int | None = None, rng: bool = True,
                 shm_base: str = "/dev/shm", keeper_linger: float = 1800.0):
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise ValueError(f"directory={directory!r} must be a non-empty path")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} must be an int >= 1")
        levels = tuple(levels)
        if not levels or any(level not in LEVELS for level in levels):
            raise ValueError(f"levels={levels!r}: each must be one of {LEVELS}, at least one")
        if redundancy not in (None, "peer", "parity"):
            raise ValueError(f"redundancy={redundancy!r}: valid are None, 'peer', 'parity'")
        if redundancy is not None and "memory" not in levels:
            raise ValueError(f"redundancy={redundancy!r} protects the memory level; add 'memory' to levels={levels}")
        if flush not in ("every", "latest"):
            raise ValueError(f"flush={flush!r}: valid are 'every', 'latest'")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.directory, self.group, self.keep, self.levels = os.fspath(directory), group, keep, levels
        self.redundancy, self.flush_policy, self.rng = redundancy, flush, rng
        self.rank, self.world_size = hd.group_rank_size(group)
        if ranks_per_node is None:
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node} must be >= 1")
        self.ranks_per_node = ranks_per_node
        self.node = self.rank // ranks_per_node
        if redundancy is not None and self.world_size < 2:
            raise ValueError(f"redundancy={redundancy!r} needs at least 2 ranks, group has {self.world_size}")
        if self.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
        self.keeper = None
        slot_path = None
        if "memory" in levels:
            self.shm_root = keeper_root(self.directory, self.node, shm_base)
            self.keeper = KeeperClient(self.shm_root, linger=keeper_linger)
            own = os.path.join(self.shm_root, f"rank{self.rank}")
            os.makedirs(own, exist_ok=True)
            self._gen = os.getpid()   # a restarted worker must not overwrite the slots it restores from
            slot_path = lambda i: os.path.join(own, f"slot{i}-{self._gen}.bin")  # noqa: E731
        self.engine = SnapshotEngine(num_slots=num_slots, rank=self.rank, world_size=self.world_size,
                                     slot_path=slot_path, pin=torch.cuda.is_available())
        self.engine.on_copied = self._on_copied
        self._handles: dict[int, SaveHandle] = {}
        self._memory_steps: list[Snapshot] = []      # copied, held as memory snapshots (oldest first)
        self._durable_step = -1
        self._durable_steps: list[int] = []
        self._committed_step = -1          # newest step whose commit was decided (all ranks)
        self.committed_step = -1           # rank 0: newest manifest on disk
        self._protected_step = -1
        self._stale_cleaned = False
        self._writer_error: BaseException | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._pending_flush: list[Snapshot] = []
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._writer_loop, name="heddle-ckpt-writer", daemon=True)
        self._writer.start()
        self._hooked: weakref.WeakSet = weakref.WeakSet()
        self.last_stats: dict = {}

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int, state: dict) -> SaveHandle:
        """Start a checkpoint of ``state`` at ``step``; returns once the background copy started.
        Collective: every rank of ``group`` calls it with the same ``step``."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        # the previous snapshot's checksums (computed during this step's forward/backward) must be
        # done so poll() sees it registered and can free the slot it supersedes
        self.engine.wait_indexed()
        self.poll()
        if step in self._handles or step <= self._committed_step:
            raise ValueError(f"step={step} was already saved (newest committed {self._committed_step})")
        if self.rng:
            if RNG_KEY in state:
                raise ValueError(f"state key {RNG_KEY!r} is reserved for the RNG states (pass rng=False)")
            state = {**state, RNG_KEY: capture_rng()}
        for value in state.values():
            if isinstance(value, torch.optim.Optimizer) and value not in self._hooked:
                value.register_step_pre_hook(_lazy_wait_hook(weakref.ref(self)))
                self._hooked.add(value)
        flat = flatten(state)
        holds = set()
        if "disk" in self.levels:
            holds.add("flush")
        if "memory" in self.levels:
            holds.add("memory")
        snap = self.engine.start(step, flat, holds)
        handle = self._handles[step] = SaveHandle(snap)
        snap.handle = handle
        if "disk" in self.levels:
            if self.flush_policy == "latest":
                self._drop_queued_flushes()
            self._jobs.put(("flush", snap))
        else:
            handle._durable.set()
        return handle

    def _drop_queued_flushes(self) -> None:
        """flush="latest": a newer snapshot supersedes flushes not started yet; free their slots now
        (not when the writer reaches them) so the next save finds a slot without waiting."""
        jobs = self._jobs
        with jobs.mutex:
            dropped = [j for j in jobs.queue if j is not None and j[0] == "flush"]
            for job in dropped:
                jobs.queue.remove(job)
                jobs.unfinished_tasks -= 1
            if dropped and jobs.unfinished_tasks == 0:
                jobs.all_tasks_done.notify_all()
        for _, snap in dropped:
            handle = getattr(snap, "handle", None)
            if handle is not None:
                handle.skipped = True
            snap.indexed.wait()    # the "flush" hold is added once the CRCs are done
            self.engine.release(snap.slot, "flush")

    def wait_for_snapshot(self) -> None:
        """Block until the in-flight snapshot has copied every tensor (the lazy wait)."""
        self.engine.wait()

    def _on_copied(self, snap: Snapshot) -> None:
        if self.keeper is not None:
            self.keeper.request("commit", self.rank, "own", snap.step, snap.slot.path, encode_index(snap.index))
            with self._lock:
                self._memory_steps.append(snap)

    # -- background writer -----------------------------------------------------------------
    def _writer_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, arg = job
            try:
                if kind == "flush":
                    self._flush(arg)
                elif kind == "commit":
                    steps, world = arg
                    for step in steps:
                        try:
                            write_manifest(self.directory, step, world)
                            self.committed_step = max(self.committed_step, step)
                        except FileNotFoundError:   # flush="latest": some rank skipped this step
                            log.debug("checkpoint: step %s not on every rank, not committed", step)
                    deleted = apply_retention(self.directory, self.keep)
                    if deleted:
                        log.debug("checkpoint: retention removed steps %s", deleted)
            except BaseException as e:  # noqa: BLE001 - surfaced at the next poll/wait
                self._writer_error = e
            finally:
                self._jobs.task_done()

    def _flush(self, snap: Snapshot) -> None:
        snap.indexed.wait()
        handle = getattr(snap, "handle", None)
        try:
            if snap.error is not None:     # torn: raised by wait_for_snapshot(), never written
                return
            if snap.late_error is not None:
                raise snap.late_error
            newer = any(j is not None and j[0] == "flush" for j in list(self._jobs.queue))
            if self.flush_policy == "latest" and newer:
                if handle is not None:       # a newer snapshot is queued: skip this one
                    handle.skipped = True
                return
            write_rank_files(self.directory, snap.index, snap.slot.buffer.numpy())
            with self._lock:
                self._durable_step = max(self._durable_step, snap.step)
                self._durable_steps.append(snap.step)
            if handle is not None:
                handle.durable_at = time.perf_counter()
                handle._durable.set()
        finally:
            self.engine.release(snap.slot, "flush")

    # -- commit (collective) ----------------------------------------------------------------
    def _check_errors(self) -> None:
        if self._writer_error is not None:
            err, self._writer_error = self._writer_error, None
            raise RuntimeError(f"checkpoint writer failed on rank {self.rank}: {err!r}") from err

    def poll(self) -> int:
        """Collective: commit the newest step every rank has made durable (rank 0 writes its
        manifest, through the writer thread), release memory snapshots that a newer complete one
        on every rank supersedes, and run the redundancy exchange. Returns the committed step."""
        self._check_errors()
        with self._lock:
            newest_mem = self._memory_steps[-1].step if self._memory_steps else -1
            local = torch.tensor([self._durable_step, newest_mem], dtype=torch.int64)
        if self.world_size > 1:
            hd.all_reduce(local, op=hd.ReduceOp.MIN, group=self.group)
        durable, memory = int(local[0]), int(local[1])
        if durable > self._committed_step and "disk" in self.levels:
            if self.rank == 0:
                with self._lock:
                    steps = sorted(s for s in self._durable_steps if self._committed_step < s <= durable)
                    self._durable_steps = [s for s in self._durable_steps if s > durable]
                self._jobs.put(("commit", (steps, self.world_size)))
            self._committed_step = durable
        if memory >= 0:
            if self.redundancy is not None and memory > self._protected_step:
                snap = next((s for s in self._memory_steps if s.step == memory), None)
                if snap is not None:
                    from heddle.checkpoint.redundancy import protect
                    protect(self, snap)
                    self._protected_step = memory
            with self._lock:
                old = [s for s in self._memory_steps if s.step < memory]
                self._memory_steps = [s for s in self._memory_steps if s.step >= memory]
            for snap in old:
                self.keeper.request("invalidate", snap.slot.path)
                self.engine.release(snap.slot, "memory")
            if not self._stale_cleaned:   # slots a previous (crashed) worker of this rank left
                mine = {s.path for s in self.engine.slots if s is not None}
                for rank, kind, step, path, _ in self.keeper.request("list"):
                    if rank == self.rank and kind == "own" and path not in mine and step < memory:
                        self.keeper.request("invalidate", path)
                        _unlink(path)
                self._stale_cleaned = True
        for step in [s for s in self._handles if s <= max(durable, memory)]:
            self._handles.pop(step)
        return self._committed_step

    def wait(self) -> int:
        """Collective: finish the in-flight snapshot and every queued write, then commit.
        Returns the newest committed step (-1 if none)."""
        self.engine.wait_indexed()
        self._jobs.join()
        self.poll()
        self._jobs.join()
        self._check_errors()
        if self.world_size > 1:
            hd.barrier(group=self.group)
        return self._committed_step

    # -- restore ----------------------------------------------------------------------------
    def restore(self, state: dict, *, step: int | None = None) -> int | None:
        """Load the newest checkpoint that verifies on every rank (memory, then peers/parity,
        then disk) into ``state`` in place; a corrupt or incomplete one is skipped with a
        :class:`CheckpointFallbackWarning` naming the problem. Returns its step, or None."""
        self.engine.wait()
        if self.rng and RNG_KEY in state:
            raise ValueError(f"state key {RNG_KEY!r} is reserved for the RNG states (pass rng=False)")
        found = restore_mod.restore(self, state, step=step)
        if found is not None:
            self._committed_step = max(self._committed_step, found)
        return found

    def close(self, *, shutdown_keeper_process: bool = False) -> None:
        """Finish pending work (collective) and stop the writer; optionally stop the keeper
        (it then removes every shared-memory snapshot of this node)."""
        try:
            self.wait()
        finally:
            self._jobs.put(None)
            self._writer.join()
            if self.keeper is not None:
                self.keeper.close()
                if shutdown_keeper_process:
                    if self.world_size > 1:
                        hd.barrier(group=self.group)
                    if self.rank % self.ranks_per_node == 0:
                        shutdown_keeper(self.shm_root)
                    self.engine.slots = [None] * self.engine.num_slots
                    return
            if self.keeper is None:
                self.engine.close()


def _lazy_wait_hook(ref):
    """Optimizer pre-step hook: the step is about to change the tensors of the last save."""
    def hook(optimizer, args, kwargs):
        ckpt = ref()
        if ckpt is not None:
            ckpt.wait_for_snapshot()
        return None
    return hook


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

