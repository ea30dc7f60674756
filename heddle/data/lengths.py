"""Sequence-length generators that mimic long-tailed corpora (FlexSP, Fig. 1: GitHub code,
CommonCrawl web text, Wikipedia): a log-normal body plus a Pareto tail, cut at the context length.

| kind           | body median | body sigma | tail share | tail from | Pareto alpha | shape mimicked |
| -------------- | ----------- | ---------- | ---------- | --------- | ------------ | -------------- |
| "code"         | 2,000       | 1.3        | 12%        | 16K       | 0.9          | GitHub: many files, heavy tail of long ones |
| "web"          | 800         | 1.0        | 3%         | 8K        | 1.3          | CommonCrawl: mostly short pages |
| "encyclopedia" | 1,500       | 1.1        | 6%         | 12K       | 1.1          | Wikipedia: short articles, some very long |

The parameters are chosen to reproduce the qualitative shapes FlexSP plots (most sequences short,
a few reaching the context length, code the heaviest tail); they are not fitted to the corpora.
Lengths above ``max_len`` are truncated to it, as a trainer cuts a document at the context length.
"""

from __future__ import annotations

import numpy as np

DISTRIBUTIONS = {
    "code": dict(median=2000, sigma=1.3, tail=0.12, tail_from=16384, alpha=0.9),
    "web": dict(median=800, sigma=1.0, tail=0.03, tail_from=8192, alpha=1.3),
    "encyclopedia": dict(median=1500, sigma=1.1, tail=0.06, tail_from=12288, alpha=1.1),
}


def sample_lengths(kind: str, n: int, *, max_len: int = 192 * 1024, min_len: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` sequence lengths (int64) of corpus ``kind`` in [min_len, max_len]."""
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"kind={kind!r}; valid: {sorted(DISTRIBUTIONS)}")
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    p = DISTRIBUTIONS[kind]
    rng = np.random.default_rng(seed)
    body = rng.lognormal(np.log(p["median"]), p["sigma"], n)
    tail = p["tail_from"] * (1.0 + rng.pareto(p["alpha"], n))
    lengths = np.where(rng.random(n) < p["tail"], tail, body)
    return np.clip(np.round(lengths), min_len, max_len).astype(np.int64)
