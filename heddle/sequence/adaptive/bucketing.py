"""Dynamic-programming bucketing of sequence lengths (FlexSP, Sec. 5.1).

The planner's integer program works on Q buckets instead of K sequences. Each bucket is a range of
the sorted lengths and is represented by its longest member ``s_hat_q`` (so a plan that fits the
representatives fits the real sequences). The DP chooses the boundaries that minimise the total
padding ``sum_q sum_{k in q} (s_hat_q - s_k)``, which is what the cost model overestimates; naive
quantile buckets pad far more on long-tailed lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Buckets:
    """``members[q]``: indices (into the input) of bucket q; ``lengths[q]``: its representative
    (max) length; buckets ordered by length."""

    members: list[list[int]]
    lengths: list[int]

    @property
    def counts(self) -> list[int]:
        return [len(m) for m in self.members]

    def padding(self, lengths) -> int:
        """Total padding sum(s_hat_q - s_k) of this bucketing for ``lengths``."""
        return int(sum(rep - lengths[k] for rep, m in zip(self.lengths, self.members) for k in m))


def bucket_lengths(lengths, num_buckets: int = 16) -> Buckets:
    """Split ``lengths`` (K positive ints) into at most ``num_buckets`` buckets with minimal padding.

    O(Q * U^2) over the U distinct lengths, vectorised over one axis.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets={num_buckets} must be >= 1")
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {arr.shape}")
    values, counts = np.unique(arr, return_counts=True)  # ascending distinct lengths
    u = len(values)
    q_max = min(num_buckets, u)
    # prefix sums over distinct values: cost(i, j) = padding of values[i:j] rounded up to values[j-1]
    cnt = np.concatenate([[0], np.cumsum(counts)])
    tok = np.concatenate([[0], np.cumsum(counts * values)])
    inf = np.iinfo(np.int64).max // 4
    best = np.full((q_max + 1, u + 1), inf, dtype=np.int64)
    arg = np.zeros((q_max + 1, u + 1), dtype=np.int64)
    best[0, 0] = 0
    i_idx = np.arange(u + 1)
    for q in range(1, q_max + 1):
        for j in range(q, u + 1):
            i = i_idx[q - 1:j]
            cost = best[q - 1, i] + (cnt[j] - cnt[i]) * values[j - 1] - (tok[j] - tok[i])
            k = int(np.argmin(cost))
            best[q, j], arg[q, j] = cost[k], i[k]
    # walk back the boundaries of the q_max-bucket solution (more buckets never pad more)
    bounds, j = [], u
    for q in range(q_max, 0, -1):
        i = int(arg[q, j])
        bounds.append((i, j))
        j = i
    bounds.reverse()
    order = np.argsort(arr, kind="stable")
    sorted_vals = arr[order]
    members, reps = [], []
    for i, j in bounds:
        lo = np.searchsorted(sorted_vals, values[i], side="left")
        hi = np.searchsorted(sorted_vals, values[j - 1], side="right")
        members.append([int(x) for x in order[lo:hi]])
        reps.append(int(values[j - 1]))
    return Buckets(members=members, lengths=reps)
