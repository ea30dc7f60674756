"""On-disk format: per-rank files, checksums, a manifest written last, retention.

    <directory>/step_0000000120/rank_00000.bin   raw snapshot bytes of rank 0 (tensors at 64-byte offsets)
    <directory>/step_0000000120/rank_00000.idx   pickled RankIndex (+ 4-byte CRC-32 trailer)
    <directory>/step_0000000120/MANIFEST.json     written last: world size, per-file size and CRC-32

Every file goes through temp file -> fsync -> rename -> fsync(directory), so a crash at any point
leaves either no file or the complete file. A step directory is a checkpoint only once its
manifest exists (the commit marker); the manifest names each file's size and CRC-32, each index
names every tensor's CRC-32, and all of them are verified on load.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
ALIGN = 64
_CHUNK = 64 << 20


class CorruptCheckpoint(Exception):
    """A checkpoint (or one rank's part of it) that failed verification; the message says why."""


@dataclass
class TensorEntry:
    path: str
    dtype: str
    shape: tuple
    offset: int
    nbytes: int
    crc: int = 0
    per_rank: bool = False


@dataclass
class RankIndex:
    step: int
    rank: int
    world_size: int
    skeleton: bytes
    entries: list[TensorEntry]
    per_rank_paths: list[tuple]
    nbytes: int
    file_crc: int = 0
    extra: dict = field(default_factory=dict)


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


def atomic_write(path: str, data: bytes) -> None:
    """temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def encode_index(index: RankIndex) -> bytes:
    body = pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)
    return body + zlib.crc32(body).to_bytes(4, "little")


def decode_index(data: bytes, what: str) -> RankIndex:
    if len(data) < 5:
        raise CorruptCheckpoint(f"{what}: index is {len(data)} bytes (truncated or empty)")
    body, trailer = data[:-4], int.from_bytes(data[-4:], "little")
    if zlib.crc32(body) != trailer:
        raise CorruptCheckpoint(f"{what}: index checksum mismatch")
    return pickle.loads(body)


def write_rank_files(directory: str, index: RankIndex, data: np.ndarray) -> RankIndex:
    """Write one rank's snapshot ``data`` (uint8 [index.nbytes]) and its index durably.
    Fills ``index.file_crc`` (CRC-32 of the whole .bin file, computed while writing)."""
    sdir = step_dir(directory, index.step)
    os.makedirs(sdir, exist_ok=True)
    final = os.path.join(sdir, rank_file(index.rank, "bin"))
    tmp = f"{final}.tmp{os.getpid()}"
    crc = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
    atomic_write(os.path.join(sdir, rank_file(index.rank, "idx")), encode_index(index))
    return index


def write_manifest(directory: str, step: int, world_size: int) -> None:
    """Commit ``step``: read every rank's index (already durable) and write the manifest last."""
    sdir = step_dir(directory, step)
    files = {}
    for rank in range(world_size):
        with open(os.path.join(sdir, rank_file(rank, "idx")), "rb") as f:
            raw = f.read()
        index = decode_index(raw, f"step {step} rank {rank}")
        files[str(rank)] = {"bin_bytes": index.nbytes, "bin_crc": index.file_crc,
                            "idx_bytes": len(raw), "idx_crc": zlib.crc32(raw)}
    manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size, "files": files}
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
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"step {step}: manifest missing (checkpoint never committed)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"step {step}: manifest unreadable ({e})") from None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("step") != step:
        raise CorruptCheckpoint(f"step {step}: manifest has format {manifest.get('format')} step "
                                f"{manifest.get('step')}, expected format {FORMAT_VERSION} step {step}")
    return manifest


def read_rank(directory: str, step: int, rank: int, manifest: dict) -> tuple[RankIndex, torch.Tensor]:
    """Read and verify one rank's files: sizes and CRC-32 against the manifest, the index trailer.
    Returns (index, uint8 buffer); per-tensor CRCs are checked by :func:`tensors_from_buffer`."""
    sdir = step_dir(directory, step)
    info = manifest["files"].get(str(rank))
    what = f"step {step} rank {rank}"
    if info is None:
        raise CorruptCheckpoint(f"{what}: not in the manifest (world size {manifest['world_size']})")
    idx_path, bin_path = os.path.join(sdir, rank_file(rank, "idx")), os.path.join(sdir, rank_file(rank, "bin"))
    try:
        with open(idx_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{what}: index file {idx_path} missing") from None
    if len(raw) != info["idx_bytes"] or zlib.crc32(raw) != info["idx_crc"]:
        raise CorruptCheckpoint(f"{what}: index file {idx_path} is {len(raw)} bytes, CRC-32 "
                                f"{zlib.crc32(raw):08x}; the manifest says {info['idx_bytes']} bytes, "
                                f"{info['idx_crc']:08x}")
    index = decode_index(raw, what)
    try:
        size = os.path.getsize(bin_path)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{what}: data file {bin_path} missing") from None
    if size != info["bin_bytes"]:
        raise CorruptCheckpoint(f"{what}: data file {bin_path} is {size} bytes, the manifest says "
                                f"{info['bin_bytes']} (truncated or zero-byte file)")
    buf = torch.empty(size, dtype=torch.uint8)
    arr = buf.numpy()
    with open(bin_path, "rb", buffering=0) as f:
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
    arr = buf.numpy()
    out = []
    for e in index.entries:
        if verify and zlib.crc32(arr[e.offset:e.offset + e.nbytes]) != e.crc:
            raise CorruptCheckpoint(f"{what or f'step {index.step} rank {index.rank}'}: tensor {e.path} "
                                    f"fails its CRC-32")
        dtype = getattr(torch, e.dtype)
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


def apply_retention(directory: str, keep: int) -> list[int]:
    """Keep the newest ``keep`` committed steps; delete older committed ones and uncommitted
    leftovers older than the newest committed step (newer ones may still be in flight).
    Never deletes the newest committed checkpoint. Returns the deleted steps."""
    committed, partial = list_steps(directory)
    if not committed:
        return []
    doomed = committed[max(keep, 1):] + [s for s in partial if s < committed[0]]
    for step in doomed:
        remove_step(directory, step)
    return sorted(doomed)


_BLOB_MAGIC = b"HEDDLEB1"


def write_blob(path: str, index: RankIndex, data: np.ndarray) -> None:
    """One self-describing file: magic, index length, index (with its CRC trailer), the data
    bytes, and a CRC-32 of the data; written through temp file + fsync + rename + dir fsync."""
    index.file_crc = 0
    for start in range(0, index.nbytes, _CHUNK):
        index.file_crc = zlib.crc32(data[start:min(start + _CHUNK, index.nbytes)], index.file_crc)
    header = encode_index(index)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(_BLOB_MAGIC + len(header).to_bytes(8, "little") + header)
        f.write(memoryview(data[:index.nbytes]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_blob(path: str) -> tuple[RankIndex, torch.Tensor]:
    """Read and verify a :func:`write_blob` file; per-tensor CRCs via :func:`tensors_from_buffer`."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != _BLOB_MAGIC:
                raise CorruptCheckpoint(f"{path}: not a heddle checkpoint file (bad magic or {len(head)}-byte file)")
            index = decode_index(f.read(int.from_bytes(head[8:], "little")), path)
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
