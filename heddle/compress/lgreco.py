"""L-GreCo (Markov et al., MLSys'24): one compression parameter per layer, chosen by a dynamic
program so that the total payload is minimal while the summed compression error stays within
``error_budget`` x the error of the uniform default setting.

Errors e[l][c] = E||G_l - C_c(G_l)||^2 on G_l, the vectors each layer compressed (error feedback
included) summed over the ``sample_steps`` steps before a re-tune; sizes s[l][c] = payload bits of
layer l under candidate c. The knapsack over layers x error buckets (:func:`solve`):

    B = budget * sum_l e[l][default_l],  u[l][c] = round(e[l][c] / B * num_buckets)
    D[l][j] = min_c D[l-1][j - u[l][c]] + s[l][c]        (D[-1][0] = 0, min total size at j units)

then back-tracking from the cheapest j whose chosen setting meets the *true* budget (rounding never
lets a setting over the budget through; the uniform default always qualifies). Rank 0 solves and
broadcasts the choices. Works for every compressor family through ``compressor.candidates()``.
"""

from __future__ import annotations

import numpy as np


def solve(errors, sizes, default: list[int], budget: float = 1.0, *, num_buckets: int = 10_000) -> list[int]:
    """errors, sizes: per layer a list over its candidates; default[l] the uniform choice.
    Returns one candidate index per layer: minimum sum of sizes s.t. sum of errors <= budget *
    sum of default errors (the default when nothing cheaper meets it; the least-error candidates
    when nothing at all does)."""
    num_layers = len(errors)
    if len(sizes) != num_layers or len(default) != num_layers:
        raise ValueError(f"errors ({num_layers}), sizes ({len(sizes)}) and default ({len(default)}) "
                         "must have one entry per layer")
    if not budget > 0:
        raise ValueError(f"budget={budget!r} must be positive")
    err = [np.asarray(e, dtype=np.float64) for e in errors]   # inf: candidate not allowed
    size = [np.asarray(s, dtype=np.float64) for s in sizes]
    limit = budget * sum(float(err[l][default[l]]) for l in range(num_layers))
    default_size = sum(float(size[l][default[l]]) for l in range(num_layers))
    if limit <= 0:  # the default loses nothing: only zero-error settings qualify
        return [int(np.argmin(np.where(e <= 0, s, np.inf))) if (e <= 0).any() else d
                for e, s, d in zip(err, size, default)]
    cap = num_buckets + num_layers  # rounding can push a qualifying setting past num_buckets
    units = [np.where(np.isfinite(e), np.rint(np.minimum(e / limit, 2.0) * num_buckets), cap + 1).astype(np.int64)
             for e in err]   # errors above 2 x the budget can never fit: capped before the cast
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.full((num_layers, cap + 1), -1, dtype=np.int64)
    for l in range(num_layers):
        nxt = np.full(cap + 1, np.inf)
        for c in range(len(err[l])):
            u = int(units[l][c])
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + size[l][c]
            better = cand < nxt
            nxt[better] = cand[better]
            choice[l][better] = c
        best = nxt
    default_ok = sum(float(err[l][default[l]]) for l in range(num_layers)) <= limit * (1 + 1e-12)
    for j in np.argsort(best, kind="stable"):
        if not np.isfinite(best[j]):
            break
        if default_ok and best[j] >= default_size:
            return list(default)
        picks, at = [], int(j)
        for l in range(num_layers - 1, -1, -1):
            c = int(choice[l][at])
            picks.append(c)
            at -= int(units[l][c])
        picks.reverse()
        if sum(float(err[l][picks[l]]) for l in range(num_layers)) <= limit * (1 + 1e-12):
            return picks
    if default_ok:
        return list(default)
    # nothing meets a budget below the default's error: the least error there is (cheapest on ties)
    return [int(np.lexsort((s, e))[0]) for e, s in zip(err, size)]


class LGreCo:
    """Layer-wise adaptive compression for :class:`~heddle.compress.GradientCompression`.

    ``candidates``: parameters to choose from (default: the compressor's family set around its
    default: ranks r/2..2r, densities x{1/4..4}, bits 1..8). Re-tunes at the first compressed step
    and then every ``retune_every`` steps, from the ``sample_steps`` steps before.
    """

    def __init__(self, error_budget: float = 1.0, candidates=None, retune_every: int = 1000,
                 sample_steps: int = 10, num_buckets: int = 10_000):
        if not isinstance(error_budget, (int, float)) or not error_budget > 0:
            raise ValueError(f"error_budget={error_budget!r} must be a positive number")
        for name, v in (("retune_every", retune_every), ("sample_steps", sample_steps), ("num_buckets", num_buckets)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if candidates is not None and len(candidates) == 0:
            raise ValueError("candidates=[]: give at least one parameter, or None for the family's set")
        self.error_budget = float(error_budget)
        self.candidates = None if candidates is None else list(candidates)
        self.retune_every, self.sample_steps, self.num_buckets = retune_every, sample_steps, num_buckets

    def candidate_set(self, compressor) -> list:
        cands = self.candidates if self.candidates is not None else compressor.candidates()
        for c in cands:
            compressor.check_param(c)
        if compressor.default_param not in cands:
            cands = sorted(set(cands) | {compressor.default_param})
        return list(cands)

    def is_retune_step(self, step: int, start_iter: int) -> bool:
        return step >= start_iter and (step - start_iter) % self.retune_every == 0

    def samples_at(self, step: int, start_iter: int) -> bool:
        """Whether ``step`` lies in the ``sample_steps`` window before the next re-tune."""
        if step < start_iter:
            nxt = start_iter
        else:
            nxt = start_iter + ((step - start_iter) // self.retune_every + 1) * self.retune_every
        return nxt - step <= self.sample_steps

    def choose(self, compressor, samples: dict, shapes: dict) -> dict:
        """{key: accumulated vector} -> {key: parameter}: errors and sizes, then :func:`solve`."""
        cands = self.candidate_set(compressor)
        keys = sorted(shapes)
        errors, sizes, default = [], [], []
        default_idx = cands.index(compressor.default_param)
        for key in keys:
            n = int(np.prod(shapes[key])) if len(shapes[key]) else 1
            x = samples[key]
            norm = float(x.double().pow(2).sum())
            # error feedback needs a contractive compressor: a candidate whose expected error is
            # not below ||x||^2 on this layer is left out (the default always stays in)
            errors.append([e if e < norm or i == default_idx else float("inf")
                           for i, e in enumerate(compressor.expected_error(x, c) for c in cands)])
            sizes.append([compressor.bits_per_element(shapes[key], c) * n for c in cands])
            default.append(cands.index(compressor.default_param))
        picks = solve(errors, sizes, default, self.error_budget, num_buckets=self.num_buckets)
        return {key: cands[p] for key, p in zip(keys, picks)}

    def __repr__(self):
        return (f"LGreCo(error_budget={self.error_budget}, candidates={self.candidates}, "
                f"retune_every={self.retune_every}, sample_steps={self.sample_steps})")
