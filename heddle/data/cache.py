"""Built datasets cached under a content-addressed name, written once, atomically.

    docs = stdlib_documents(max_len=2049)   # TokenDataset; the first call builds, later ones open

The cache lives in ``$HEDDLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/heddle``, else
``~/.cache/heddle``. A file's name is the SHA-256 of everything that defines its content (the
source bytes, the build parameters, the format version), so concurrent jobs with the same inputs
share one file and jobs with different inputs never collide. The first process takes a lock
(``fcntl.flock`` on ``NAME.lock``), builds into a temporary file in the same directory and renames
it into place; the others wait on the lock and then open the finished file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from heddle.data.text import stdlib_source_chunks
from heddle.data.token_files import TokenDataset, build_byte_dataset, write_token_file
from heddle.progress import progress

FORMAT_VERSION = 1  # bump when the layout of a cached file changes


def cache_dir() -> Path:
    """The user cache directory for heddle (created)."""
    root = os.environ.get("HEDDLE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "heddle")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_file(name: str, build: Callable[[str], None], *, directory: str | os.PathLike | None = None) -> str:
    """Path of ``directory/name`` (default: :func:`cache_dir`), calling ``build(tmp_path)`` to
    create it when it is missing. ``name`` must already be content-addressed; the build runs once
    across concurrent processes and the file appears complete or not at all."""
    if not name or os.sep in name:
        raise ValueError(f"name={name!r}: expected a plain file name")
    directory = Path(directory) if directory is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if path.exists():
        return str(path)
    with open(directory / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if path.exists():  # another process built it while this one waited
            return str(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            build(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return str(path)


def split_documents(chunks, max_len: int | None, min_len: int = 2) -> list[bytes]:
    """One document per chunk (file), cut into pieces of at most ``max_len`` bytes; pieces shorter
    than ``min_len`` hold no training pair and are skipped (as :func:`build_byte_dataset` does)."""
    if max_len is not None and max_len < min_len:
        raise ValueError(f"max_len={max_len} must be >= min_len={min_len}")
    if min_len < 2:
        raise ValueError(f"min_len={min_len} must be >= 2 (a document needs an input and a target)")
    docs = []
    for data in chunks:
        step = max_len or max(len(data), 1)
        docs.extend(data[i:i + step] for i in range(0, len(data), step) if len(data[i:i + step]) >= min_len)
    return docs


def stdlib_documents(max_len: int | None = 2049, *, max_bytes: int = 8 << 20, min_len: int = 2,
                     directory: str | os.PathLike | None = None, show_progress: bool | None = None) -> TokenDataset:
    """The bytes of :meth:`ByteCorpus.stdlib` (same files, order and ``max_bytes`` cap) as
    variable-length documents: one per standard-library file, cut at ``max_len`` bytes. Built
    once per content into the cache (a few MB), then memory-mapped."""
    import numpy as np

    chunks = stdlib_source_chunks(max_bytes)
    key = hashlib.sha256(f"heddle-stdlib-docs v{FORMAT_VERSION} max_len={max_len} min_len={min_len}\n".encode())
    for data in chunks:  # the content itself, with file boundaries
        key.update(len(data).to_bytes(8, "little"))
        key.update(data)
    name = f"stdlib-docs-{key.hexdigest()[:24]}.arrow"

    def build(tmp: str) -> None:
        docs = split_documents(chunks, max_len, min_len)
        where = Path(cache_dir() if directory is None else directory) / name
        with progress(f"heddle: building {len(docs):,} stdlib documents ({sum(map(len, docs)) / 1e6:.1f} MB) "
                      f"into {where}", enabled=show_progress):
            write_token_file(tmp, [np.frombuffer(d, dtype=np.uint8) for d in docs], format="arrow")

    return TokenDataset(cached_file(name, build, directory=directory))


def cached_byte_dataset(sources, *, suffixes=(".txt", ".md", ".py", ".rst"), max_len: int | None = None,
                        min_len: int = 2, directory: str | os.PathLike | None = None,
                        show_progress: bool | None = None) -> TokenDataset:
    """:func:`build_byte_dataset` of ``sources`` (files or directories), cached like
    :func:`stdlib_documents`: the name hashes every file's path relative to its source, its
    bytes and the build parameters, so a changed file builds a new dataset."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    key = hashlib.sha256(f"heddle-byte-dataset v{FORMAT_VERSION} suffixes={sorted(suffixes)} max_len={max_len} "
                         f"min_len={min_len}\n".encode())
    for src in sources:
        root = Path(src)
        if not root.exists():
            raise FileNotFoundError(f"source {str(src)!r} is neither a file nor a directory")
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in suffixes)
        for f in files:
            data = f.read_bytes()
            key.update(f"{f.relative_to(root) if f != root else f.name}\0{len(data)}\0".encode())
            key.update(data)
    name = f"bytes-{key.hexdigest()[:24]}.arrow"

    def build(tmp: str) -> None:
        with progress(f"heddle: building a byte dataset of {', '.join(map(str, sources))}", enabled=show_progress):
            build_byte_dataset(sources, tmp, suffixes=suffixes, max_len=max_len, min_len=min_len, format="arrow")

    return TokenDataset(cached_file(name, build, directory=directory))
