"""Byte-level text from the Python standard library's sources, and a resumable window sampler."""

from __future__ import annotations

import os
import sysconfig

import torch


def stdlib_source_files() -> list[str]:
    """The corpus definition shared by :meth:`ByteCorpus.stdlib` and
    :func:`heddle.data.stdlib_documents`: this interpreter's standard-library ``.py`` files in
    sorted path order, without site-packages, test directories and caches."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        files.extend(os.path.join(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    return files


def stdlib_source_chunks(max_bytes: int = 8 << 20) -> list[bytes]:
    """The files of :func:`stdlib_source_files`, one bytes object each, until ``max_bytes`` in
    total (the last one cut there)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    chunks, total = [], 0
    for path in stdlib_source_files():
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data[:max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return chunks


def stdlib_source_bytes(max_bytes: int = 8 << 20) -> bytes:
    """Concatenated ``.py`` files of this interpreter's standard library, in sorted path order
    (the same bytes on every machine with the same Python), capped at ``max_bytes``."""
    return b"".join(stdlib_source_chunks(max_bytes))


class ByteCorpus:
    """A byte string as a uint8 tensor with a train/validation split (last ``val_fraction``)."""

    def __init__(self, data: bytes, val_fraction: float = 0.05):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        split = int(len(tokens) * (1 - val_fraction))
        self.train, self.val = tokens[:split], tokens[split:]

    @classmethod
    def stdlib(cls, max_bytes: int = 8 << 20, val_fraction: float = 0.05) -> "ByteCorpus":
        return cls(stdlib_source_bytes(max_bytes), val_fraction)


class WindowSampler:
    """Global batches of random windows, identical for every world size.

    Step k's global batch is ``global_batch`` windows of ``seq_len + 1`` bytes drawn with a
    generator seeded by (seed, k); data-parallel rank r of D takes rows r*B/D .. (r+1)*B/D. So a
    2-rank run sees exactly the rows of a 1-rank run, and ``state_dict()`` (the step) is all it
    takes to resume exactly.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch: int, *, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if global_batch % dp_size:
            raise ValueError(f"global_batch={global_batch} must be divisible by dp_size={dp_size}")
        if len(tokens) < seq_len + 2:
            raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 2} tokens, corpus has {len(tokens)}")
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.step = 0

    def global_batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [global_batch, seq_len] int64, for ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.global_batch,), generator=g)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        windows = self.tokens[idx].long()
        return windows[:, :-1], windows[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) for the next step; advances the position."""
        x, y = self.global_batch_at(self.step)
        self.step += 1
        per = self.global_batch // self.dp_size
        rows = slice(self.dp_rank * per, (self.dp_rank + 1) * per)
        return x[rows], y[rows]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler seed {state['seed']} in the checkpoint differs from this run's {self.seed}")
        self.step = int(state["step"])
