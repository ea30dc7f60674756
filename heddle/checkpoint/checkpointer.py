"""Checkpointer: lazy snapshots -> keeper memory -> durable disk commits; restore with fallback.

    ckpt = Checkpointer("ckpts/", keep=3)                       # levels=("memory", "disk")
    ckpt.save(step, {"model": model, "optimizer": opt, "sampler": sampler})   # returns at once
    ...                                                        # forward/backward overlap the copy
    opt.step()                                                 # pre-step hook: wait_for_snapshot()
    step = ckpt.restore({"model": model, "optimizer": opt, "sampler": sampler})

Levels (DataStates-LLM's multi-level flush, REFT's in-memory tier):
1. host snapshot: ``save`` returns after ``state_dict()`` and a JSON encoding of the non-tensor parts; the
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
import secrets
import threading
import time
import warnings
import weakref

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.checkpoint import restore as restore_mod
from heddle.checkpoint.keeper import KeeperClient, KeeperUnavailable, keeper_root, shutdown_keeper
from heddle.checkpoint.snapshot import SharedMemoryFull, Snapshot, SnapshotEngine, shm_free_bytes
from heddle.checkpoint.state import RNG_KEY, capture_rng, flatten
from heddle.checkpoint.storage import (apply_retention, clean_directory, decode_index, encode_index, list_steps,
                                       lock_directory, remove_step, unlock_directory, write_manifest,
                                       write_rank_files)

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
                 shm_base: str = "/dev/shm", keeper_linger: float = 1800.0, start_fresh_on_corrupt: bool = False,
                 run_id: str | None = None):
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise ValueError(f"directory={directory!r} must be a non-empty path")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"directory={os.fspath(directory)!r} is a regular file, not a directory; give the "
                             f"checkpoint directory (it is created when missing)")
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
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} must be an int >= 1")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id={run_id!r} must be a non-empty str or None")
        self.directory, self.group, self.keep, self.levels = os.fspath(directory), group, keep, levels
        self.redundancy, self.flush_policy, self.rng = redundancy, flush, rng
        self.start_fresh_on_corrupt = bool(start_fresh_on_corrupt)
        self.rank, self.world_size = hd.group_rank_size(group)
        if ranks_per_node is None:
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node} must be >= 1")
        self.ranks_per_node = ranks_per_node
        self.node = self.rank // ranks_per_node
        if redundancy is not None and self.world_size < 2:
            raise ValueError(f"redundancy={redundancy!r} needs at least 2 ranks, group has {self.world_size}")
        self.last_restore: dict = {"run_id": None, "step": None, "source": None}
        self.last_stats: dict = {}
        self._lock_fd = None
        self.keeper = None
        # rank 0 owns the directory for the job: lock (one live job per directory), clean what
        # crashed jobs left (temp files, uncommitted steps), choose the run id; all ranks agree
        run = run_id or secrets.token_hex(8)
        error = None
        if self.rank == 0:
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._lock_fd = lock_directory(self.directory, run)
                removed = clean_directory(self.directory)
                if removed:
                    log.warning("checkpoint: removed leftovers of an interrupted job in %s: %s", self.directory,
                                removed[:10])
            except (OSError, RuntimeError) as e:
                error = e
        self._jobs: queue.Queue = queue.Queue()
        # a Checkpointer dropped without close() releases its directory (and its writer) when collected
        self._finalizer = weakref.finalize(self, _release, self._lock_fd, self._jobs)
        self._agree(error, "could not take the checkpoint directory")
        self.run_id = self._broadcast_run_id(run)
        slot_path = None
        self._memory_ok = "memory" in levels
        self._keeper_error: BaseException | None = None
        if "memory" in levels:
            error = None
            try:
                self.shm_root = keeper_root(self.directory, self.node, shm_base)
                self.keeper = KeeperClient(self.shm_root, linger=keeper_linger)
                self._own_dir = os.path.join(self.shm_root, f"rank{self.rank}")
                from heddle.checkpoint.keeper import ensure_private_dir
                ensure_private_dir(self._own_dir)
            except (OSError, RuntimeError) as e:
                error = e
            self._agree(error, "could not set up its checkpoint keeper")
            self._gen = f"{os.getpid()}-{secrets.token_hex(3)}"   # never the name of a slot a previous worker left
            slot_path = lambda i: os.path.join(self._own_dir, f"slot{i}-{self._gen}.bin")  # noqa: E731
        self.engine = SnapshotEngine(num_slots=num_slots, rank=self.rank, world_size=self.world_size,
                                     slot_path=slot_path, pin=torch.cuda.is_available())
        self.engine.on_copied = self._on_copied
        if "memory" in levels:
            self.engine.before_allocate = self._before_allocate
        self._handles: dict[int, SaveHandle] = {}
        self._memory_steps: list[Snapshot] = []      # copied, held as memory snapshots (oldest first)
        self._durable_step = -1
        self._durable_steps: list[int] = []
        self._copied_step = -1
        self._committed_step = -1          # newest step whose commit was decided (all ranks)
        self.committed_step = -1           # rank 0: newest manifest on disk
        self._protected_step = -1
        self._stale_cleaned = False
        self._writer_error: BaseException | None = None
        self._pending_flush: list[Snapshot] = []
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=_writer_main, args=(weakref.ref(self), self._jobs),
                                        name="heddle-ckpt-writer", daemon=True)
        self._writer.start()
        self._hooked: weakref.WeakSet = weakref.WeakSet()
        self._closed = False

    # -- agreement between ranks ------------------------------------------------------------
    def _agree(self, error: BaseException | None, what: str) -> None:
        """Collective: raise on every rank when any rank failed (no rank is left in a collective)."""
        flag = torch.tensor([self.rank + 1 if error is not None else 0], dtype=torch.int64)
        if self.world_size > 1:
            hd.all_reduce(flag, op=hd.ReduceOp.MAX, group=self.group)
        if error is not None:
            self._release_lock()
            raise error
        if int(flag) > 0:
            self._release_lock()
            raise RuntimeError(f"checkpoint rank {int(flag) - 1} {what} in {self.directory}; see its error")

    def _broadcast_run_id(self, run: str) -> str:
        if self.world_size == 1:
            return run
        data = torch.zeros(64, dtype=torch.uint8)
        raw = run.encode()[:64]
        data[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        hd.broadcast(data, src=restore_mod.hd_global_rank(self, 0), group=self.group)
        return bytes(data.numpy()).rstrip(b"\0").decode()

    def _release_lock(self) -> None:
        self._finalizer()

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int, state: dict, *, replicated=()) -> SaveHandle:
        """Start a checkpoint of ``state`` at ``step``; returns once the background copy started.
        Collective: every rank of ``group`` calls it with the same ``step``. ``replicated`` names
        top-level keys whose state is identical on every rank: rank 0 saves them once. DTensors
        anywhere in the state are saved as this rank's chunks plus their placement."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        if isinstance(replicated, str) or not all(isinstance(k, str) for k in replicated):
            raise ValueError(f"replicated={replicated!r} must be a tuple of top-level state keys")
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
        flat = flatten(state, replicated=tuple(replicated), rank=self.rank)
        holds = set()
        if "disk" in self.levels:
            holds.add("flush")
        if "memory" in self.levels:
            holds.add("memory")
        try:
            snap = self.engine.start(step, flat, holds, run_id=self.run_id)
        except SharedMemoryFull as e:
            self._shm_fallback(e)
            holds.discard("memory")
            snap = self.engine.start(step, flat, holds, run_id=self.run_id)
        handle = self._handles[step] = SaveHandle(snap)
        snap.handle = handle
        if "disk" in self.levels:
            if self.flush_policy == "latest":
                self._drop_queued_flushes()
            self._jobs.put(("flush", snap))
        else:
            handle._durable.set()
        return handle

    # -- shared memory: free-space check, fallback, reuse of a crashed worker's slots ---------------
    def _before_allocate(self, nbytes: int, count: int) -> None:
        self._free_stale_slots()
        needed = count * max(nbytes, 64)
        free = shm_free_bytes(self._own_dir)
        if needed > free:
            raise SharedMemoryFull(f"checkpoint rank {self.rank}: {count} snapshot slot(s) of {nbytes} bytes need "
                                   f"{needed} bytes in {self.shm_root}, only {free} are free", needed=needed, free=free)

    def _shm_fallback(self, err: SharedMemoryFull) -> None:
        """Too little shared memory: disk-only saves with a warning when the levels allow it."""
        fix = (f"fix: give the container more shared memory (docker run --shm-size={(err.needed * 2 >> 20) + 1}m), "
               f"use fewer slots (num_slots={self.engine.num_slots}), or levels=('disk',) for disk-only checkpoints")
        if "disk" not in self.levels or self.redundancy is not None:
            raise SharedMemoryFull(f"{err}; {fix}", needed=err.needed, free=err.free) from None
        message = f"{err}; falling back to disk-only checkpoints on this rank (no memory level); {fix}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        self._memory_ok = False
        with self.engine.cond:
            for slot in self.engine.slots:
                if slot is not None and not slot.holds:
                    slot.release()
            self.engine.slots = [s if s is not None and s.holds else None for s in self.engine.slots]
        self.engine.slot_path = None
        self.engine.before_allocate = None

    def _free_stale_slots(self) -> None:
        """Files of this rank that a previous (crashed) worker left and no slot uses: freed before
        a new ring is allocated, so a restart never needs twice the shared memory."""
        mine = {s.path for s in self.engine.slots if s is not None}
        try:
            names = os.listdir(self._own_dir)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self._own_dir, name)
            if name.startswith("slot") and path not in mine:
                self._keeper_request("invalidate", path)
                _unlink(path)

    def _adopt_slots(self, restored_step: int | None, source: str | None) -> None:
        """After a restore: take over the slots a previous worker of this rank left in the keeper
        (the restored memory snapshot stays registered until a newer one exists)."""
        if self.keeper is None or not self._memory_ok:
            return
        entries = self._keeper_request("list") or []
        mine = {s.path for s in self.engine.slots if s is not None}
        for rank, kind, step, path, ib in sorted(entries, key=lambda e: -e[2]):
            if rank != self.rank or kind != "own" or path in mine or os.path.dirname(path) != self._own_dir:
                continue
            keep = step == restored_step and source == "memory"
            slot = self.engine.adopt(path, {"memory"} if keep else set()) if os.path.exists(path) else None
            if slot is None:
                self._keeper_request("invalidate", path)
                _unlink(path)
                continue
            slot.step = step
            if keep:
                try:
                    snap = Snapshot(step, slot, decode_index(ib, "adopted slot"))
                except Exception:  # noqa: BLE001 - a bad registry entry: just free it
                    self.engine.release(slot, "memory")
                    continue
                snap.copied.set(), snap.validated.set(), snap.indexed.set()
                with self._lock:
                    self._memory_steps.insert(0, snap)
            else:
                self._keeper_request("invalidate", path)

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

    # -- keeper ----------------------------------------------------------------------------
    def _keeper_request(self, *msg):
        """A keeper request; a dead keeper is recorded (the next poll switches every rank to
        disk-only saves, or stops when the levels have no disk)."""
        keeper = self.keeper
        if keeper is None:
            return None
        try:
            return keeper.request(*msg)
        except KeeperUnavailable as e:
            if self._keeper_error is None:
                self._keeper_error = e
            return None

    def _on_copied(self, snap: Snapshot) -> None:
        with self._lock:
            self._copied_step = max(self._copied_step, snap.step)
        if self.keeper is None or not self._memory_ok or "memory" not in snap.slot.holds:
            if "memory" in snap.slot.holds:
                self.engine.release(snap.slot, "memory")
            return
        ok = self._keeper_request("commit", self.rank, "own", snap.step, snap.slot.path, encode_index(snap.index))
        if ok is None:     # the keeper is gone: this snapshot is not in memory
            self.engine.release(snap.slot, "memory")
            return
        with self._lock:
            self._memory_steps.append(snap)

    def _lose_keeper(self, rank: int) -> None:
        """Collective outcome of a dead keeper on some rank: disk-only from now on, or stop."""
        err, self._keeper_error = self._keeper_error, None
        what = err if err is not None else f"the checkpoint keeper of rank {rank} is gone"
        if "disk" not in self.levels:
            raise KeeperUnavailable(f"{what}; levels={self.levels} has no disk level to continue on") from err
        message = f"{what}; continuing with disk-only checkpoints (memory level and redundancy off)"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        keeper, self.keeper = self.keeper, None
        if keeper is not None:
            try:
                keeper.close()
            except OSError:
                pass
        self.levels = tuple(level for level in self.levels if level != "memory")
        self.redundancy, self._memory_ok = None, False
        with self._lock:
            old, self._memory_steps = self._memory_steps, []
        for snap in old:
            self.engine.release(snap.slot, "memory")
        self.engine.before_allocate = None

    # -- background writer -----------------------------------------------------------------
    def _run_job(self, job) -> None:
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
                deleted = apply_retention(self.directory, self.keep, self.run_id)
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
            if self._writer_error is not None:
                return                       # a failed write stops the disk level (raised at poll)
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
    def _fail_writes(self, failed_rank: int) -> None:
        """Every rank saw a writer error: drain the writers, remove the steps that can no longer
        be committed (so a resume does not meet ENOSPC again), raise on every rank."""
        self._jobs.join()
        if self.world_size > 1:
            hd.barrier(group=self.group)
        if self.rank == 0:
            _, partial = list_steps(self.directory)
            for step in partial:
                remove_step(self.directory, step)
            clean_directory(self.directory)
        err, self._writer_error = self._writer_error, None
        if err is not None:
            raise RuntimeError(f"checkpoint writer failed on rank {self.rank}: {err!r}; training stops (the memory "
                               f"level still holds the newest snapshot for a restart; uncommitted steps were "
                               f"removed from {self.directory})") from err
        raise RuntimeError(f"checkpoint writer failed on rank {failed_rank} (see its error); training stops")

    def poll(self) -> int:
        """Collective: commit the newest step every rank has made durable (rank 0 writes its
        manifest, through the writer thread), release memory snapshots that a newer complete one
        on every rank supersedes, and run the redundancy exchange. Returns the committed step."""
        with self._lock:
            if self._memory_ok and self.keeper is not None:
                newest_mem = self._memory_steps[-1].step if self._memory_steps else -1
            else:     # no memory level on this rank: never hold the others' slots back
                newest_mem = max(self._copied_step, 0) if "memory" in self.levels else -1
            failed = self.rank + 1 if self._writer_error is not None else 0
            keeper_lost = self.rank + 1 if self._keeper_error is not None else 0
            local = torch.tensor([self._durable_step, newest_mem, -failed, -keeper_lost], dtype=torch.int64)
        if self.world_size > 1:
            hd.all_reduce(local, op=hd.ReduceOp.MIN, group=self.group)
        durable, memory, failed, keeper_lost = (int(v) for v in local)
        if failed < 0:
            self._fail_writes(-failed - 1)
        if keeper_lost < 0:
            self._lose_keeper(-keeper_lost - 1)
            memory = -1
        if durable > self._committed_step and "disk" in self.levels:
            if self.rank == 0:
                with self._lock:
                    steps = sorted(s for s in self._durable_steps if self._committed_step < s <= durable)
                    self._durable_steps = [s for s in self._durable_steps if s > durable]
                self._jobs.put(("commit", (steps, self.world_size)))
            self._committed_step = durable
        if memory >= 0 and "memory" in self.levels:
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
                self._keeper_request("invalidate", snap.slot.path)
                self.engine.release(snap.slot, "memory")
            if not self._stale_cleaned and self.keeper is not None:   # a previous worker's registrations
                mine = {s.path for s in self.engine.slots if s is not None}
                for rank, kind, step, path, _ in self._keeper_request("list") or []:
                    if rank == self.rank and kind == "own" and path not in mine and step < memory:
                        self._keeper_request("invalidate", path)
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
        self.poll()        # collective again: a failed commit is raised on every rank
        self._jobs.join()
        if self.world_size > 1:
            hd.barrier(group=self.group)
        return self._committed_step

    # -- restore ----------------------------------------------------------------------------
    def restore(self, state: dict, *, step: int | None = None,
                start_fresh_on_corrupt: bool | None = None) -> int | None:
        """Load the newest checkpoint that verifies on every rank (memory, then peers/parity,
        then disk) into ``state`` in place, resharded to this world size and mesh; a corrupt or
        incomplete one is skipped with a :class:`CheckpointFallbackWarning` naming the problem.
        Returns its step, or None when there is none. When checkpoints exist but none verifies
        it raises :class:`NoValidCheckpoint`, unless ``start_fresh_on_corrupt`` (default: the
        Checkpointer's). Sets ``last_restore`` = {run_id, step, source, ...}; the run continues
        under the restored run id (retention applies to its steps)."""
        self.engine.wait()
        if self.rng and RNG_KEY in state:
            raise ValueError(f"state key {RNG_KEY!r} is reserved for the RNG states (pass rng=False)")
        fresh = self.start_fresh_on_corrupt if start_fresh_on_corrupt is None else bool(start_fresh_on_corrupt)
        found = restore_mod.restore(self, state, step=step, start_fresh_on_corrupt=fresh)
        if found is not None:
            self._committed_step = max(self._committed_step, found)
            self.run_id = self.last_restore["run_id"]
        if self.keeper is not None:
            self._adopt_slots(found, self.last_restore.get("source"))
        return found

    def close(self, *, shutdown_keeper_process: bool = False) -> None:
        """Finish pending work (collective) and stop the writer; optionally stop the keeper
        (it then removes every shared-memory snapshot of this node). Releases the directory."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._jobs.put(None)
            self._writer.join()
            self._release_lock()
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


def _writer_main(ref, jobs: queue.Queue) -> None:
    """The writer thread: holds its Checkpointer only while running a job."""
    while True:
        job = jobs.get()
        if job is None:
            return
        ckpt = ref()
        if ckpt is None:
            return
        ckpt._run_job(job)
        del ckpt


def _release(lock_fd, jobs: queue.Queue) -> None:
    unlock_directory(lock_fd)
    jobs.put(None)


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

