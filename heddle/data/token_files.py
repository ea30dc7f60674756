"""Variable-length token sequences on disk: Arrow IPC / Parquet files with one ``list<int32>``
column, read memory-mapped, and a tokenizer-free builder that turns text files into byte tokens.

    write_token_file("docs.arrow", [[1, 2, 3], [4, 5]])
    ds = TokenDataset("docs.arrow")        # memory-mapped: nothing is copied until you index
    ds.lengths                              # int64 [num_docs]
    ds[1]                                   # int32 numpy view [len]; ds.tensor(1) -> int64 tensor
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

FORMATS = ("arrow", "parquet")


def _format_of(path: str, fmt: str | None) -> str:
    if fmt is None:
        fmt = "parquet" if str(path).endswith(".parquet") else "arrow"
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; valid: {FORMATS}")
    return fmt


def write_token_file(path: str, sequences, *, column: str = "tokens", format: str | None = None) -> str:
    """Write ``sequences`` (iterables of ints in int32 range) as a ``list<int32>`` column."""
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    if not arrays:
        raise ValueError("sequences is empty: nothing to write")
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"sequences[{i}] must be 1-D, got shape {a.shape}")
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError(f"sequences[{i}] has values outside int32: [{a.min()}, {a.max()}]")
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    values = pa.array(np.concatenate(arrays).astype(np.int32), type=pa.int32())
    table = pa.table({column: pa.ListArray.from_arrays(pa.array(offsets), values)})
    if _format_of(path, format) == "parquet":
        pq.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return str(path)


class TokenDataset:
    """Token sequences from an Arrow IPC file (memory-mapped, zero copy) or a Parquet file
    (``memory_map=True``; Parquet pages are decoded once into Arrow buffers)."""

    def __init__(self, path: str, *, column: str = "tokens", format: str | None = None):
        if not os.path.exists(path):
            raise FileNotFoundError(f"token file {path!r} does not exist")
        self.path, self.column = str(path), column
        if _format_of(path, format) == "parquet":
            names = pq.read_schema(path).names
            if column not in names:
                raise ValueError(f"column={column!r} not in {path!r}; columns: {names}")
            table = pq.read_table(path, columns=[column], memory_map=True)
        else:
            self._source = pa.memory_map(str(path), "r")
            table = pa.ipc.open_file(self._source).read_all()
        if column not in table.column_names:
            raise ValueError(f"column={column!r} not in {path!r}; columns: {table.column_names}")
        col = table.column(column)
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or \
                not pa.types.is_integer(col.type.value_type):
            raise ValueError(f"column {column!r} of {path!r} has type {col.type}; expected list<int32>")
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if arr.null_count:
            raise ValueError(f"column {column!r} of {path!r} has {arr.null_count} null rows")
        self._offsets = arr.offsets.to_numpy().astype(np.int64)
        self._values = arr.values.to_numpy(zero_copy_only=False)
        self.lengths = np.diff(self._offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        i %= len(self)
        return self._values[self._offsets[i]:self._offsets[i + 1]]

    def tensor(self, i: int) -> torch.Tensor:
        """Sequence i as an int64 tensor (a copy)."""
        return torch.from_numpy(self[i].astype(np.int64))


def build_byte_dataset(sources, out_path: str, *, suffixes=(".txt", ".md", ".py", ".rst"),
                       max_len: int | None = None, min_len: int = 2, format: str | None = None) -> str:
    """Tokenizer-free dataset: every text file under ``sources`` (files or directories, walked in
    sorted order) becomes one document of byte tokens (0-255); documents longer than ``max_len``
    are cut into consecutive pieces of at most ``max_len``; pieces shorter than ``min_len`` (empty
    files, a file's last short piece) are skipped: they hold no training pair. Returns the path."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if max_len is not None and max_len < min_len:
        raise ValueError(f"max_len={max_len} must be >= min_len={min_len}")
    if min_len < 2:
        raise ValueError(f"min_len={min_len} must be >= 2 (a document needs an input and a target)")
    files = []
    for src in sources:
        p = Path(src)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes))
        else:
            raise FileNotFoundError(f"source {str(src)!r} is neither a file nor a directory")
    docs = []
    for f in files:
        data = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        step = max_len or max(len(data), 1)
        docs.extend(data[i:i + step] for i in range(0, len(data), step) if len(data[i:i + step]) >= min_len)
    if not docs:
        raise ValueError(f"no document of at least {min_len} bytes in {len(files)} file(s) under {list(map(str, sources))}")
    return write_token_file(out_path, docs, format=format)
