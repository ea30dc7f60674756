"""On-disk format: per-rank files, checksums, a manifest written last, run-aware retention.

    <directory>/step_0000000120/rank_00000.bin   raw snapshot bytes of rank 0 (tensors at 64-byte offsets)
    <directory>/step_0000000120/rank_00000.idx   JSON RankIndex: run id, step, rank, world size, the
                                                 non-tensor state (heddle.checkpoint.codec), every
                                                 tensor's dtype/shape/offset/CRC-32 (+ DTensor placement)
    <directory>/step_0000000120/MANIFEST.json     written last: run id, world size, per-file size and
                                                 CRC-32, and a CRC-32 of the manifest itself
    <directory>/.heddle-lock                      held (flock) by rank 0 of the job using the directory

Every file goes through temp file -> fsync -> rename -> fsync(directory), so a crash at any point
leaves either no file or the complete file. A step directory is a checkpoint only once its
manifest exists (the commit marker). Nothing here is unpickled: every file restore reads is JSON
or raw tensor bytes, so a planted file can give wrong values but never run code. The checksums
find accidental damage (flipped bits, truncation, a mixed-up file); they are not signatures
(anyone who can write the directory can write a consistent forgery; see docs/checkpoint.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from heddle.checkpoint import codec

FORMAT_VERSION = 2
MANIFEST = "MANIFEST.json"
LOCK_FILE = ".heddle-lock"
ALIGN = 64
_CHUNK = 64 << 20


class CorruptCheckpoint(Exception):
    """A checkpoint (or one rank's part of it) that failed verification; the message says why."""


class NoValidCheckpoint(CorruptCheckpoint):
    """Checkpoints exist but none verified on every rank (``start_fresh_on_corrupt=True`` to start over)."""


class DirectoryLocked(RuntimeError):
    """Another live job (or Checkpointer) uses this checkpoint directory."""


@dataclass
class TensorEntry:
    path: str
    dtype: str
    shape: tuple
    offset: int
    nbytes: int
    crc: int = 0
    per_rank: bool = False
    global_shape: tuple | None = None     # DTensor chunk: shape of the whole tensor
    global_offset: tuple | None = None    # DTensor chunk: where this rank's chunk starts


@dataclass
class RankIndex:
    step: int
    rank: int
    world_size: int
    skeleton: object                  # codec-encoded state tree (JSON value) with tensor references
    entries: list[TensorEntry]
    per_rank_paths: list[tuple]
    nbytes: int
    file_crc: int = 0
    extra: dict = field(default_factory=dict)
    run_id: str = ""
    replicated: list = field(default_factory=list)   # top-level keys saved by rank 0 only
    time: float = 0.0


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:010d}")


def rank_file(rank: int, suffix: str) -> str:
    return f"rank_{rank:05d}.{suffix}"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def atomic_write(path: str, data: bytes) -> None:
    """temp file, fsync, rename, fsync the directory (the temp file goes away on failure)."""
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- the index (JSON) -----------------------------------------------------------------------
def _entry_json(e: TensorEntry) -> dict:
    out = {"path": e.path, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset, "nbytes": e.nbytes,
           "crc": e.crc, "per_rank": e.per_rank}
    if e.global_shape is not None:
        out["global_shape"], out["global_offset"] = list(e.global_shape), list(e.global_offset)
    return out


def index_json(index: RankIndex) -> dict:
    return {"format": FORMAT_VERSION, "run_id": index.run_id, "step": index.step, "rank": index.rank,
            "world_size": index.world_size, "nbytes": index.nbytes, "file_crc": index.file_crc,
            "time": index.time, "replicated": list(index.replicated),
            "per_rank_paths": [list(p) for p in index.per_rank_paths],
            "entries": [_entry_json(e) for e in index.entries], "extra": index.extra,
            "skeleton": index.skeleton}


def encode_index(index: RankIndex) -> bytes:
    return codec.dumps(index_json(index))


def _int(d: dict, key: str, what: str, minimum: int = 0) -> int:
    v = d.get(key)
    if type(v) is not int or v < minimum:
        raise CorruptCheckpoint(f"{what}: index field {key!r} = {v!r} is not an int >= {minimum}")
    return v


def _ints(v, what: str, key: str) -> tuple:
    if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
        raise CorruptCheckpoint(f"{what}: index field {key!r} = {v!r} is not a list of ints >= 0")
    return tuple(v)


def index_from_json(d, what: str) -> RankIndex:
    """Validate the structure of a decoded index: types, ranges, dtypes, sizes."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise CorruptCheckpoint(f"{what}: not a heddle index of format {FORMAT_VERSION} (got {got!r})")
    nbytes = _int(d, "nbytes", what)
    entries = []
    raw_entries = d.get("entries")
    if not isinstance(raw_entries, list):
        raise CorruptCheckpoint(f"{what}: index has no entry list")
    for e in raw_entries:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise CorruptCheckpoint(f"{what}: malformed tensor entry {e!r:.80}")
        try:
            dtype = codec.torch_dtype(e.get("dtype"))
        except codec.CodecError as err:
            raise CorruptCheckpoint(f"{what}: tensor {e['path']}: {err}") from None
        shape = _ints(e.get("shape"), what, "shape")
        offset, size = _int(e, "offset", what), _int(e, "nbytes", what)
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if size != numel * torch.empty(0, dtype=dtype).element_size() or offset + size > nbytes:
            raise CorruptCheckpoint(f"{what}: tensor {e['path']} ({shape}, {e['dtype']}, {size} bytes at "
                                    f"{offset}) does not fit its shape or the {nbytes}-byte buffer")
        gshape = goff = None
        if "global_shape" in e:
            gshape = _ints(e.get("global_shape"), what, "global_shape")
            goff = _ints(e.get("global_offset"), what, "global_offset")
            if len(gshape) != len(shape) or len(goff) != len(shape) or \
                    any(o + s > g for o, s, g in zip(goff, shape, gshape)):
                raise CorruptCheckpoint(f"{what}: DTensor chunk {e['path']} {shape} at {goff} lies outside {gshape}")
        entries.append(TensorEntry(e["path"], e["dtype"], shape, offset, size, _int(e, "crc", what),
                                   bool(e.get("per_rank")), gshape, goff))
    paths = d.get("per_rank_paths")
    if not isinstance(paths, list) or not all(isinstance(p, list) and all(type(x) in (int, str) for x in p)
                                              for p in paths):
        raise CorruptCheckpoint(f"{what}: malformed per_rank_paths")
    replicated = d.get("replicated")
    if not isinstance(replicated, list) or not all(isinstance(k, str) for k in replicated):
        raise CorruptCheckpoint(f"{what}: malformed replicated keys")
    run_id = d.get("run_id")
    if not isinstance(run_id, str) or not isinstance(d.get("extra", {}), dict):
        raise CorruptCheckpoint(f"{what}: malformed run id or extra")
    t = d.get("time", 0.0)
    return RankIndex(_int(d, "step", what), _int(d, "rank", what), _int(d, "world_size", what, 1),
                     d.get("skeleton"), entries, [tuple(p) for p in paths], nbytes, _int(d, "file_crc", what),
                     d.get("extra", {}), run_id, replicated, float(t) if type(t) in (int, float) else 0.0)


def decode_index(data: bytes, what: str) -> RankIndex:
    if len(data) < 2:
        raise CorruptCheckpoint(f"{what}: index is {len(data)} bytes (truncated or empty)")
    try:
        d = codec.loads(bytes(data))
    except codec.CodecError as e:
        raise CorruptCheckpoint(f"{what}: index unreadable: {e}") from None
    return index_from_json(d, what)


def check_identity(index: RankIndex, what: str, *, step: int, rank: int, world_size: int | None = None,
                   run_id: str | None = None) -> None:
    """The index must say what its place says: a relabelled step or a swapped rank is refused."""
    got = (index.step, index.rank)
    if got != (step, rank):
        raise CorruptCheckpoint(f"{what}: the index says step {index.step} rank {index.rank}, but it was read "
                                f"as step {step} rank {rank} (renamed or swapped files)")
    if world_size is not None and index.world_size != world_size:
        raise CorruptCheckpoint(f"{what}: the index says world size {index.world_size}, expected {world_size}")
    if run_id is not None and index.run_id != run_id:
        raise CorruptCheckpoint(f"{what}: the index belongs to run {index.run_id!r}, the manifest to {run_id!r}")


def _read_small(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def manifest_run(sdir: str) -> str | None:
    """The run id of the manifest in ``sdir`` (None: no manifest; "" unreadable)."""
    try:
        return str(json.loads(_read_small(os.path.join(sdir, MANIFEST))).get("run_id", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return ""


def write_rank_files(directory: str, index: RankIndex, data: np.ndarray) -> RankIndex:
    """Write one rank's snapshot ``data`` (uint8 [index.nbytes]) and its index durably.
    Fills ``index.file_crc`` (CRC-32 of the whole .bin file, computed while writing). A step that
    another run committed is never overwritten; on any failure (ENOSPC...) this rank's temp files
    and partial files of the step are removed before the error propagates."""
    sdir = step_dir(directory, index.step)
    os.makedirs(sdir, exist_ok=True)
    owner = manifest_run(sdir)
    if owner is not None:
        if owner != index.run_id:
            raise RuntimeError(f"checkpoint: {sdir} holds a committed checkpoint of run {owner!r}; run "
                               f"{index.run_id!r} will not overwrite it (resume that run, or use a new directory)")
        _unlink(os.path.join(sdir, MANIFEST))     # re-saving a step of this run: uncommit it first
    final = os.path.join(sdir, rank_file(index.rank, "bin"))
    idx_final = os.path.join(sdir, rank_file(index.rank, "idx"))
    tmp = _tmp_name(final)
    crc = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data[: index.nbytes])
            for start in range(0, index.nbytes, _CHUNK):
                chunk = view[start:start + _CHUNK]
                crc = zlib.crc32(chunk, crc)
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        index.file_crc = crc
        atomic_write(idx_final, encode_index(index))
    except BaseException:
        for path in (tmp, final, idx_final):
            _unlink(path)
        raise
    return index


def _manifest_crc(manifest: dict) -> int:
    body = {k: v for k, v in manifest.items() if k != "crc"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(directory: str, step: int, world_size: int) -> None:
    """Commit ``step``: read every rank's index (already durable) and write the manifest last.
    The manifest's ``idx_crc`` is the CRC-32 of each index file's exact bytes; ``crc`` covers the
    manifest itself."""
    sdir = step_dir(directory, step)
    files, run_id, saved_at = {}, None, 0.0
    for rank in range(world_size):
        raw = _read_small(os.path.join(sdir, rank_file(rank, "idx")))
        what = f"step {step} rank {rank}"
        index = decode_index(raw, what)
        check_identity(index, what, step=step, rank=rank, world_size=world_size, run_id=run_id)
        run_id = index.run_id
        saved_at = index.time if rank == 0 else saved_at
        files[str(rank)] = {"bin_bytes": index.nbytes, "bin_crc": index.file_crc,
                            "idx_bytes": len(raw), "idx_crc": zlib.crc32(raw)}
    manifest = {"format": FORMAT_VERSION, "run_id": run_id, "step": step, "world_size": world_size,
                "saved_at": saved_at, "committed_at": time.time(), "files": files}
    manifest["crc"] = _manifest_crc(manifest)
    atomic_write(os.path.join(sdir, MANIFEST), json.dumps(manifest, indent=1).encode())
    fsync_dir(directory)


def list_steps(directory: str) -> tuple[list[int], list[int]]:
    """(committed steps, uncommitted step directories), each newest first."""
    committed, partial = [], []
    if not os.path.isdir(directory):
        return committed, partial
    for name in os.listdir(directory):
        if not name.startswith("step_") or name.endswith(".deleting"):
            continue
        try:
            step = int(name[5:])
        except ValueError:
            continue
        exists = os.path.exists(os.path.join(directory, name, MANIFEST))
        (committed if exists else partial).append(step)
    return sorted(committed, reverse=True), sorted(partial, reverse=True)


def read_manifest(directory: str, step: int) -> dict:
    path = os.path.join(step_dir(directory, step), MANIFEST)
    try:
        manifest = json.loads(_read_small(path))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"step {step}: manifest missing (checkpoint never committed)") from None
    except OSError as e:
        raise CorruptCheckpoint(f"step {step}: manifest unreadable ({e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"step {step}: manifest unreadable ({e}; flipped bytes?)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or manifest.get("step") != step:
        got = (manifest.get("format"), manifest.get("step")) if isinstance(manifest, dict) else (None, None)
        raise CorruptCheckpoint(f"step {step}: manifest has format {got[0]} step {got[1]}, expected format "
                                f"{FORMAT_VERSION} step {step} (relabelled or foreign directory)")
    if manifest.get("crc") != _manifest_crc(manifest):
        raise CorruptCheckpoint(f"step {step}: manifest CRC-32 mismatch (flipped bytes in {path})")
    files, world = manifest.get("files"), manifest.get("world_size")
    if type(world) is not int or world < 1 or not isinstance(files, dict) or \
            sorted(files) != sorted(str(r) for r in range(world)) or not isinstance(manifest.get("run_id"), str):
        raise CorruptCheckpoint(f"step {step}: manifest lists files {sorted(files or {})} for world size {world}")
    for info in files.values():
        if not isinstance(info, dict) or any(type(info.get(k)) is not int for k in
                                             ("bin_bytes", "bin_crc", "idx_bytes", "idx_crc")):
            raise CorruptCheckpoint(f"step {step}: malformed file entry in the manifest")
    return manifest


def read_rank(directory: str, step: int, rank: int, manifest: dict) -> tuple[RankIndex, torch.Tensor]:
    """Read and verify one rank's files: sizes and CRC-32 against the manifest, the index's step,
    rank, world size and run against the manifest and the path. Returns (index, uint8 buffer);
    per-tensor CRCs are checked by :func:`tensors_from_buffer`."""
    sdir = step_dir(directory, step)
    info = manifest["files"].get(str(rank))
    what = f"step {step} rank {rank}"
    if info is None:
        raise CorruptCheckpoint(f"{what}: not in the manifest (world size {manifest['world_size']})")
    idx_path, bin_path = os.path.join(sdir, rank_file(rank, "idx")), os.path.join(sdir, rank_file(rank, "bin"))
    try:
        raw = _read_small(idx_path)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{what}: index file {idx_path} missing") from None
    except OSError as e:
        raise CorruptCheckpoint(f"{what}: index file {idx_path} unreadable ({e})") from None
    if len(raw) != info["idx_bytes"] or zlib.crc32(raw) != info["idx_crc"]:
        raise CorruptCheckpoint(f"{what}: index file {idx_path} is {len(raw)} bytes, CRC-32 "
                                f"{zlib.crc32(raw):08x}; the manifest says {info['idx_bytes']} bytes, "
                                f"{info['idx_crc']:08x}")
    index = decode_index(raw, what)
    check_identity(index, what, step=step, rank=rank, world_size=manifest["world_size"], run_id=manifest["run_id"])
    if index.nbytes != info["bin_bytes"] or index.file_crc != info["bin_crc"]:
        raise CorruptCheckpoint(f"{what}: index and manifest disagree on the data file ({index.nbytes} bytes "
                                f"{index.file_crc:08x} vs {info['bin_bytes']} bytes {info['bin_crc']:08x})")
    try:
        fd = os.open(bin_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{what}: data file {bin_path} missing") from None
    except OSError as e:
        raise CorruptCheckpoint(f"{what}: data file {bin_path} unreadable ({e})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != info["bin_bytes"]:
            raise CorruptCheckpoint(f"{what}: data file {bin_path} is {size} bytes, the manifest says "
                                    f"{info['bin_bytes']} (truncated or zero-byte file)")
        buf = torch.empty(size, dtype=torch.uint8)
        arr = buf.numpy()
        got = 0
        while got < size:
            n = f.readinto(memoryview(arr)[got:])
            if not n:
                raise CorruptCheckpoint(f"{what}: data file {bin_path} ended at byte {got} of {size}")
            got += n
    crc = 0
    for start in range(0, size, _CHUNK):
        crc = zlib.crc32(arr[start:start + _CHUNK], crc)
    if crc != info["bin_crc"]:
        raise CorruptCheckpoint(f"{what}: data file {bin_path} CRC-32 {crc:08x} != {info['bin_crc']:08x} "
                                f"in the manifest (flipped bytes)")
    return index, buf


def tensors_from_buffer(index: RankIndex, buf: torch.Tensor, *, verify: bool = True,
                        clone: bool = True, what: str = "") -> list[torch.Tensor]:
    """The tensors of ``index`` laid out in ``buf`` (uint8), each checked against its CRC-32."""
    if buf.numel() < index.nbytes:
        raise CorruptCheckpoint(f"{what or f'step {index.step} rank {index.rank}'}: buffer of {buf.numel()} "
                                f"bytes, the index needs {index.nbytes}")
    arr = buf.numpy()
    out = []
    for e in index.entries:
        if verify and zlib.crc32(arr[e.offset:e.offset + e.nbytes]) != e.crc:
            raise CorruptCheckpoint(f"{what or f'step {index.step} rank {index.rank}'}: tensor {e.path} "
                                    f"fails its CRC-32")
        dtype = codec.torch_dtype(e.dtype)
        t = buf[e.offset:e.offset + e.nbytes].view(dtype).view(e.shape)
        out.append(t.clone() if clone else t)
    return out


def remove_step(directory: str, step: int) -> None:
    """Delete a step: the manifest first (so a half-deleted checkpoint never looks valid)."""
    sdir = step_dir(directory, step)
    try:
        os.unlink(os.path.join(sdir, MANIFEST))
        fsync_dir(sdir)
    except FileNotFoundError:
        pass
    shutil.rmtree(sdir, ignore_errors=True)


def apply_retention(directory: str, keep: int, run_id: str | None = None) -> list[int]:
    """Keep the newest ``keep`` committed steps of run ``run_id``; delete its older committed steps
    and uncommitted leftovers older than its newest committed step (newer ones may be in flight).
    Steps of other runs are never touched (``run_id=None``: every step counts as this run's).
    Never deletes the newest committed checkpoint. Returns the deleted steps."""
    committed, partial = list_steps(directory)
    if run_id is not None:
        committed = [s for s in committed if manifest_run(step_dir(directory, s)) == run_id]
    if not committed:
        return []
    doomed = committed[max(keep, 1):] + [s for s in partial if s < committed[0]]
    for step in doomed:
        remove_step(directory, step)
    return sorted(doomed)


def clean_directory(directory: str) -> list[str]:
    """Remove what no checkpoint needs: temp files of interrupted writes and step directories
    without a manifest (never a checkpoint). Only safe while holding the directory lock (no writer
    is running). Returns what was removed."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if ".tmp" in name and os.path.isfile(path) and not os.path.islink(path):
            _unlink(path)
            removed.append(name)
            continue
        if not name.startswith("step_") or os.path.islink(path) or not os.path.isdir(path):
            continue
        if name.endswith(".deleting") or not os.path.exists(os.path.join(path, MANIFEST)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
            continue
        for inner in os.listdir(path):
            if ".tmp" in inner:
                _unlink(os.path.join(path, inner))
                removed.append(f"{name}/{inner}")
    return removed


# -- one job per directory ------------------------------------------------------------------------
def lock_directory(directory: str, run_id: str, *, _retried: bool = False) -> int:
    """Take ``<directory>/.heddle-lock`` (flock, released when the process dies). Returns the fd;
    raises :class:`DirectoryLocked` naming the holder when another process has it."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DirectoryLocked(f"checkpoint directory {directory}: cannot open its lock file {path} ({e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        if f'"pid": {os.getpid()},' in holder and not _retried:
            import gc
            gc.collect()    # a Checkpointer of this process dropped without close() releases it when collected
            return lock_directory(directory, run_id, _retried=True)
        raise DirectoryLocked(f"checkpoint directory {directory} is in use by another live job or Checkpointer "
                              f"({holder}); two jobs must not share a checkpoint directory: stop the other one, "
                              f"close() the other Checkpointer, or use another directory") from None
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return fd


def unlock_directory(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


_BLOB_MAGIC = b"HEDDLEB2"


def write_blob(path: str, index: RankIndex, data: np.ndarray) -> None:
    """One self-describing file: magic, index length, JSON index, the data bytes (whose CRC-32 is
    in the index); written through temp file + fsync + rename + dir fsync."""
    index.file_crc = 0
    for start in range(0, index.nbytes, _CHUNK):
        index.file_crc = zlib.crc32(data[start:min(start + _CHUNK, index.nbytes)], index.file_crc)
    header = encode_index(index)
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(_BLOB_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(memoryview(data[:index.nbytes]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_blob(path: str) -> tuple[RankIndex, torch.Tensor]:
    """Read and verify a :func:`write_blob` file; per-tensor CRCs via :func:`tensors_from_buffer`."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != _BLOB_MAGIC:
                raise CorruptCheckpoint(f"{path}: not a heddle checkpoint file (bad magic or {len(head)}-byte file)")
            size = int.from_bytes(head[8:], "little")
            if size > 1 << 31:
                raise CorruptCheckpoint(f"{path}: index length {size} is implausible")
            index = decode_index(f.read(size), path)
            buf = torch.empty(index.nbytes, dtype=torch.uint8)
            got = f.readinto(memoryview(buf.numpy()))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path}: missing") from None
    if got != index.nbytes:
        raise CorruptCheckpoint(f"{path}: data is {got} bytes, the index says {index.nbytes} (truncated)")
    crc = 0
    arr = buf.numpy()
    for start in range(0, index.nbytes, _CHUNK):
        crc = zlib.crc32(arr[start:start + _CHUNK], crc)
    if crc != index.file_crc:
        raise CorruptCheckpoint(f"{path}: data CRC-32 {crc:08x} != {index.file_crc:08x} (flipped bytes)")
    return index, buf
