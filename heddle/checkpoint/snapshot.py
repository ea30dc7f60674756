"""Lazy snapshots into reused host buffers (DataStates-LLM, section 4).

``SnapshotEngine.start(step, flat)`` takes a free slot (a pre-allocated uint8 host buffer, pinned
on CUDA, or a file in /dev/shm owned by the keeper) and returns at once; a background thread copies
the referenced tensors into the slot (async copies on a side stream on CUDA) and computes each
tensor's CRC-32 while the next forward/backward runs. The only blocking points are

- :meth:`wait` (called by the optimizer pre-step hook): the next step would change the tensors,
- :meth:`acquire` when every slot is still held (by the writer or as the newest memory snapshot):
  back-pressure, so host memory is ``num_slots x state size`` for ever, never more.

Mutation after ``save()`` and before the copy is detected through the tensors' version counters:
the snapshot is then marked torn and never committed (loud, not silent).
"""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from dataclasses import dataclass, field, replace

import torch

from heddle.checkpoint.state import FlatState
from heddle.checkpoint.storage import ALIGN, RankIndex


class TornSnapshot(RuntimeError):
    """A tensor changed in place between ``save()`` and the background copy."""


class SharedMemoryFull(RuntimeError):
    """/dev/shm (or ``shm_base``) has no room for a snapshot slot."""

    def __init__(self, message: str, *, needed: int, free: int):
        super().__init__(message)
        self.needed, self.free = needed, free


def create_private_file(path: str, nbytes: int) -> None:
    """Create ``path`` (0600, never through a symlink, never an existing file) and reserve
    ``nbytes`` of it with posix_fallocate, so a full tmpfs gives ENOSPC now instead of SIGBUS
    when the pages are touched."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            free = shm_free_bytes(os.path.dirname(path))
            raise SharedMemoryFull(f"checkpoint: {os.path.dirname(path)} has {free} bytes free, a snapshot slot "
                                   f"needs {nbytes}", needed=nbytes, free=free) from None
        raise
    os.close(fd)


def shm_free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class HostSlot:
    """One reusable host buffer: in process memory, or a shared-memory file (``path``)."""

    def __init__(self, nbytes: int, *, path: str | None = None, pin: bool = False, adopt: bool = False):
        self.path, self.nbytes = path, max(int(nbytes), ALIGN)
        if path is not None:
            if adopt:      # a slot a crashed worker of this rank left: reuse its pages
                self.nbytes = os.stat(path, follow_symlinks=False).st_size
            else:
                create_private_file(path, self.nbytes)
            self.buffer = torch.from_file(path, shared=True, size=self.nbytes, dtype=torch.uint8)
        else:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        if not adopt:
            self.buffer.zero_()  # fault the pages in now, not during the first snapshot
        self.holds: set[str] = set()
        self.step: int | None = None

    def release(self) -> None:
        self.buffer = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass
class Snapshot:
    step: int
    slot: HostSlot
    index: RankIndex
    copied: threading.Event = field(default_factory=threading.Event)    # tensors copied: may change now
    validated: threading.Event = field(default_factory=threading.Event)  # wait() saw no mutation
    indexed: threading.Event = field(default_factory=threading.Event)   # CRCs done, registered: writable
    tensors: list | None = None
    versions: list | None = None
    error: BaseException | None = None        # the copy failed (torn): raised by wait()
    late_error: BaseException | None = None   # checksumming / registration failed: raised by the writer


class SnapshotEngine:
    def __init__(self, *, num_slots: int, rank: int, world_size: int, slot_path=None, pin: bool = False):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots, self.rank, self.world_size = num_slots, rank, world_size
        self.slot_path, self.pin = slot_path, pin   # slot_path(i) -> file path, or None
        self.slots: list[HostSlot | None] = [None] * num_slots
        self.cond = threading.Condition()
        self.current: Snapshot | None = None
        self.last: Snapshot | None = None
        self.on_copied = None                        # callback(snapshot), on the copy thread
        self.before_allocate = None                  # callback(nbytes, slots to allocate)
        self.acquire_timeout: float | None = None
        self.stalls = {"acquire_s": 0.0}
        self._stream = None

    # -- slots ----------------------------------------------------------------------------
    def _free_index(self, nbytes: int) -> int | None:
        best = None
        for i, slot in enumerate(self.slots):
            if slot is None:
                best = i if best is None else best
            elif not slot.holds:
                if slot.nbytes >= nbytes:
                    return i
                best = i
        return best

    def acquire(self, nbytes: int) -> HostSlot:
        """A slot of at least ``nbytes``; waits (back-pressure) while all are held. Raises
        RuntimeError at once when every slot is held by something that no save can free."""
        with self.cond:
            if not self.cond.wait_for(lambda: self._free_index(nbytes) is not None, timeout=self.acquire_timeout):
                held = [sorted(s.holds) if s is not None else [] for s in self.slots]
                raise RuntimeError(f"checkpoint rank {self.rank}: no snapshot slot became free within "
                                   f"{self.acquire_timeout:.0f}s (holds {held}); is the writer stuck?")
            i = self._free_index(nbytes)
            slot = self.slots[i]
            if slot is None or slot.nbytes < nbytes:
                if slot is not None:
                    slot.release()
                    self.slots[i] = None
                if self.before_allocate is not None:   # free-space check / fallback (Checkpointer)
                    self.before_allocate(nbytes, sum(s is None for s in self.slots))
                path = self.slot_path(i) if self.slot_path else None
                slot = self.slots[i] = HostSlot(nbytes, path=path, pin=self.pin)
                for j, other in enumerate(self.slots):   # first save: pre-allocate the whole ring
                    if other is None:
                        self.slots[j] = HostSlot(nbytes, path=self.slot_path(j) if self.slot_path else None,
                                                 pin=self.pin)
            slot.holds.add("copy")
            return slot

    def adopt(self, path: str, holds: set[str]) -> HostSlot | None:
        """Take over a slot file a previous worker of this rank left (restart: no second ring)."""
        with self.cond:
            for i, slot in enumerate(self.slots):
                if slot is None:
                    slot = self.slots[i] = HostSlot(0, path=path, pin=False, adopt=True)
                    slot.holds |= holds
                    return slot
        return None

    def release(self, slot: HostSlot, reason: str) -> None:
        with self.cond:
            slot.holds.discard(reason)
            self.cond.notify_all()

    # -- snapshot -------------------------------------------------------------------------
    def start(self, step: int, flat: FlatState, holds: set[str], *, run_id: str = "") -> Snapshot:
        """Begin the background copy of ``flat`` for ``step``; ``holds`` are the reasons the
        slot stays reserved after the copy ("flush", "memory")."""
        self.wait()
        entries, offset = [], 0
        for e in flat.entries:
            entries.append(replace(e, offset=offset))
            offset = _aligned(offset + e.nbytes)
        index = RankIndex(step, self.rank, self.world_size, flat.skeleton, entries, flat.per_rank_paths, offset,
                          run_id=run_id, replicated=list(flat.replicated), time=time.time())
        slot = self.acquire(offset)
        slot.step = step
        snap = Snapshot(step, slot, index, tensors=list(flat.tensors), versions=[t._version for t in flat.tensors])
        self.current = self.last = snap
        threading.Thread(target=self._copy, args=(snap, snap.tensors, snap.versions, holds),
                         name=f"heddle-snapshot-{step}", daemon=True).start()
        return snap

    def _copy(self, snap: Snapshot, tensors, versions, holds) -> None:
        """Copy (the lazy wait ends here), then checksum and register off the critical path."""
        try:
            try:
                buf = snap.slot.buffer
                cuda = any(t.is_cuda for t in tensors)
                if cuda and self._stream is None:
                    self._stream = torch.cuda.Stream()
                ctx = torch.cuda.stream(self._stream) if cuda else _nullcontext()
                with ctx:
                    for t, e in zip(tensors, snap.index.entries):
                        dst = buf[e.offset:e.offset + e.nbytes].view(t.dtype).view(t.shape)
                        dst.copy_(t, non_blocking=t.is_cuda)
                if cuda:
                    self._stream.synchronize()
                _check_versions(snap, tensors, versions)
            except BaseException as e:  # noqa: BLE001 - surfaced by wait()
                snap.error = e
                snap.validated.set()
                return
            finally:
                snap.copied.set()
            try:
                arr = snap.slot.buffer.numpy()
                for e in snap.index.entries:
                    e.crc = zlib.crc32(arr[e.offset:e.offset + e.nbytes])
                # registered and written only after wait() checked the versions again on the
                # caller's thread: an in-place op that was still running during the copy has
                # bumped its tensor's version by then
                snap.validated.wait()
                if snap.error is not None:
                    return
                with self.cond:
                    snap.slot.holds |= holds
                if self.on_copied is not None:
                    self.on_copied(snap)
            except BaseException as e:  # noqa: BLE001 - surfaced by the writer
                snap.late_error = e
        finally:
            self.release(snap.slot, "copy")
            snap.indexed.set()

    def wait(self) -> None:
        """Block until the in-flight copy is done (the lazy wait); re-raise its error."""
        snap = self.current
        if snap is None:
            return
        snap.copied.wait()
        self.current = None
        try:
            if snap.error is None:
                _check_versions(snap, snap.tensors, snap.versions)
        except TornSnapshot as e:
            snap.error = e
        finally:
            snap.tensors = None   # no references to the live tensors beyond this point
            snap.validated.set()
        if snap.error is not None:
            raise snap.error

    def wait_indexed(self) -> None:
        """Also wait for the checksums and registration of the newest snapshot."""
        self.wait()
        if self.last is not None:
            self.last.indexed.wait()

    def close(self) -> None:
        try:
            self.wait_indexed()
        finally:
            for slot in self.slots:
                if slot is not None:
                    slot.release()
            self.slots = [None] * self.num_slots


def _check_versions(snap: Snapshot, tensors, versions) -> None:
    changed = [e.path for t, v, e in zip(tensors, versions, snap.index.entries) if t._version != v]
    if changed:
        raise TornSnapshot(f"checkpoint step {snap.step}: {changed[:5]} changed in place after save() and "
                           f"before the snapshot copied them; call wait_for_snapshot() (or step the "
                           f"optimizer, which waits) before mutating state")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
