"""A DeepSpeed checkpoint engine backed by heddle's lazy snapshots and durable writes.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    heddle.checkpoint.deepspeed_engine.install(engine)   # reads ds_config["heddle_checkpoint"]
    engine.save_checkpoint("ckpts")                      # files as DeepSpeed names them
    engine.load_checkpoint("ckpts")

With ``"heddle_checkpoint": {"enabled": true, "decoupled": true}`` in the DeepSpeed config the
engine switches on (``install`` leaves DeepSpeed's engine alone when the section is absent or
disabled). DeepSpeed's interface (deepspeed 0.19: ``create / save / load / commit /
is_decoupled / cleanup``) maps onto heddle as:

- ``save(state_dict, path)``: flatten now, copy the tensors into a reused host slot in the
  background, then write ``path`` (one self-describing file with per-tensor and file CRC-32)
  through temp file + fsync + rename on the writer thread; returns at once.
- ``commit(info)``: wait for every copy and write of the tag, then write ``<tag>/HEDDLE_COMMIT``
  atomically. With ``decoupled`` DeepSpeed calls it just before the next optimizer step (the lazy
  wait of DataStates-LLM), otherwise at the end of ``save_checkpoint``.
- ``load(path)``: refuses a tag without its commit marker and verifies every checksum.
"""

from __future__ import annotations

import os
import queue
import threading

import torch

from heddle.checkpoint.snapshot import SnapshotEngine
from heddle.checkpoint.state import fill, flatten
from heddle.checkpoint.storage import CorruptCheckpoint, atomic_write, read_blob, tensors_from_buffer, write_blob

try:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
except ImportError as e:  # explicit request for the DeepSpeed engine: say how to get it
    raise ImportError("heddle.checkpoint.deepspeed_engine needs DeepSpeed: pip install deepspeed") from e

COMMIT_MARKER = "HEDDLE_COMMIT"


class HeddleCheckpointEngine(CheckpointEngine):
    def __init__(self, config_params=None, *, decoupled: bool = False, num_slots: int = 4):
        super().__init__(config_params)
        self.name = "HeddleCheckpointEngine"
        self.decoupled = bool(decoupled)
        self.snapshots = SnapshotEngine(num_slots=num_slots, rank=_rank(), world_size=1,
                                        pin=torch.cuda.is_available())
        self.commit_info: CheckpointCommitInfo | None = None
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="heddle-ds-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                snap, path = job
                snap.indexed.wait()
                try:
                    if snap.late_error is not None:
                        raise snap.late_error
                    if snap.error is None:
                        write_blob(path, snap.index, snap.slot.buffer.numpy())
                finally:
                    self.snapshots.release(snap.slot, "flush")
            except BaseException as e:  # noqa: BLE001 - raised by commit()
                self._error = e
            finally:
                self._jobs.task_done()

    # -- DeepSpeed's interface ---------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo):
        self.commit_info = info

    def save(self, state_dict, path: str):
        flat = flatten({"payload": state_dict})
        snap = self.snapshots.start(0, flat, {"flush"})
        self._jobs.put((snap, path))

    def load(self, path: str, map_location=None):
        marker = os.path.join(os.path.dirname(path), COMMIT_MARKER)
        if not os.path.exists(marker):
            raise CorruptCheckpoint(f"{path}: its tag has no {COMMIT_MARKER} (the save never committed)")
        index, buf = read_blob(path)
        tensors = tensors_from_buffer(index, buf, what=path)
        if isinstance(map_location, (str, torch.device)):
            tensors = [t.to(map_location) for t in tensors]
        elif callable(map_location):   # torch.load's storage hook: call it on each CPU storage
            tensors = [_apply_storage_hook(t, map_location) for t in tensors]
        elif map_location is not None:
            raise TypeError(f"map_location={map_location!r}: expected a device, a device string or a callable")
        return fill(index.skeleton, tensors)["payload"]

    def commit(self, info: CheckpointCommitInfo):
        if info is None:
            return None
        self.snapshots.wait()
        self._jobs.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"heddle checkpoint engine: writing tag {info.tag} failed: {err!r}") from err
        tag_dir = os.path.join(info.save_dir, str(info.tag))
        if _rank() == 0:
            os.makedirs(tag_dir, exist_ok=True)
            atomic_write(os.path.join(tag_dir, COMMIT_MARKER), str(info.tag).encode())
        self.commit_info = None
        return True

    def is_decoupled(self):
        return self.decoupled

    def get_commit_info(self):
        return self.commit_info

    def cleanup(self):
        if self.commit_info is not None:
            self.commit(self.commit_info)
        self._jobs.put(None)
        self._writer.join()

    def preserves_storage_sharing(self):
        return False


def _apply_storage_hook(t: torch.Tensor, hook) -> torch.Tensor:
    storage = hook(t.untyped_storage(), "cpu")
    if storage is t.untyped_storage() or storage is None:
        return t
    return torch.empty(0, dtype=t.dtype, device=storage.device).set_(storage, t.storage_offset(), t.shape, t.stride())


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def install(engine, config: dict | None = None) -> bool:
    """Switch a DeepSpeed engine to heddle's checkpoint engine when its config (or ``config``)
    has ``"heddle_checkpoint": {"enabled": true, ...}``. Returns True if switched."""
    params = config if config is not None else getattr(engine._config, "_param_dict", {})
    section = params.get("heddle_checkpoint")
    if not section or not section.get("enabled", True):
        return False
    unknown = sorted(set(section) - {"enabled", "decoupled", "num_slots"})
    if unknown:
        raise ValueError(f"heddle_checkpoint: unknown option(s) {unknown}; valid: enabled, decoupled, num_slots")
    old = engine.checkpoint_engine
    if old is not None and old.is_decoupled():
        old.cleanup()
    engine.checkpoint_engine = HeddleCheckpointEngine(decoupled=section.get("decoupled", False),
                                                      num_slots=section.get("num_slots", 4))
    return True
