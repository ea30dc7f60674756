"""Global batches of variable-length documents by token budget, resumable.

Epoch e visits the documents in a permutation seeded by (seed, e); a global batch takes the next
documents in that order while the total stays within ``token_budget`` (and at most
``max_sequences``). The position (epoch, offset) is the whole state: ``state_dict()`` resumes
exactly, and :meth:`peek` shows the next batch without taking it (the background planner plans
step t+1 from it while step t trains). Every rank builds the same sampler and sees the same global
batches; the adaptive-SP plan decides which rank trains which document.
"""

from __future__ import annotations

import numpy as np


class TokenBudgetSampler:
    def __init__(self, lengths, token_budget: int, *, max_sequences: int | None = None, seed: int = 0,
                 shuffle: bool = True):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {self.lengths.shape}")
        if (self.lengths < 1).any():
            raise ValueError(f"lengths must be positive; first bad index {int(np.argmax(self.lengths < 1))}")
        too_long = np.flatnonzero(self.lengths > token_budget)
        if too_long.size:
            raise ValueError(f"token_budget={token_budget} is smaller than {too_long.size} document(s), e.g. "
                             f"index {int(too_long[0])} with {int(self.lengths[too_long[0]])} tokens")
        if max_sequences is not None and max_sequences < 1:
            raise ValueError(f"max_sequences={max_sequences} must be >= 1 or None")
        self.token_budget, self.max_sequences = int(token_budget), max_sequences
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.lengths)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def _batch_at(self, epoch: int, offset: int) -> tuple[list[int], int, int]:
        """(indices, epoch, offset after). A batch never spans two epochs."""
        if offset >= len(self.lengths):
            epoch, offset = epoch + 1, 0
        order = self._permutation(epoch)
        out, tokens = [], 0
        while offset < len(order):
            k = int(order[offset])
            if tokens + self.lengths[k] > self.token_budget or (self.max_sequences and len(out) == self.max_sequences):
                break
            out.append(k)
            tokens += int(self.lengths[k])
            offset += 1
        return out, epoch, offset

    def peek(self) -> list[int]:
        """The next global batch (document indices) without advancing."""
        return self._batch_at(self.epoch, self.offset)[0]

    def next(self) -> list[int]:
        batch, self.epoch, self.offset = self._batch_at(self.epoch, self.offset)
        return batch

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler seed {state['seed']} in the checkpoint differs from this run's {self.seed}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
