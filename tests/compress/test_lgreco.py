"""L-GreCo's dynamic program against brute force."""

import itertools

import numpy as np
import pytest

from heddle.compress import solve


def _brute(errors, sizes, limit):
    best, best_pick = None, None
    for pick in itertools.product(*[range(len(e)) for e in errors]):
        err = sum(errors[l][c] for l, c in enumerate(pick))
        size = sum(sizes[l][c] for l, c in enumerate(pick))
        if err <= limit and (best is None or size < best):
            best, best_pick = size, pick
    return best, best_pick


def test_dp_equals_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        layers, cands = rng.integers(1, 5), rng.integers(1, 5)
        # integer errors and a budget of exactly num_buckets units: the rounding is exact
        errors = [sorted(rng.integers(0, 40, cands).tolist(), reverse=True) for _ in range(layers)]
        sizes = [sorted(rng.integers(1, 100, cands).tolist()) for _ in range(layers)]
        default = [int(rng.integers(0, cands)) for _ in range(layers)]
        default_err = sum(errors[l][default[l]] for l in range(layers))
        if default_err == 0:
            continue
        budget = float(rng.choice([0.5, 1.0, 1.5]))
        limit = budget * default_err
        if limit != int(limit):
            continue
        picks = solve(errors, sizes, default, budget, num_buckets=int(limit))
        size = sum(sizes[l][c] for l, c in enumerate(picks))
        err = sum(errors[l][c] for l, c in enumerate(picks))
        best, _ = _brute(errors, sizes, limit)
        if best is None:       # nothing meets a tighter budget: the least-error candidates
            assert err == sum(min(e) for e in errors)
            continue
        assert err <= limit
        default_size = sum(sizes[l][default[l]] for l in range(layers))
        assert size == (min(best, default_size) if default_err <= limit else best)
        checked += 1
    assert checked > 100


def test_choice_meets_budget_with_real_valued_errors():
    rng = np.random.default_rng(1)
    for _ in range(12):
        layers, cands = 5, 5
        errors = [np.sort(rng.random(cands) * 10)[::-1].tolist() for _ in range(layers)]
        sizes = [np.sort(rng.random(cands) * 100).tolist() for _ in range(layers)]
        default = [2] * layers
        for budget in (0.7, 1.0, 2.0):
            picks = solve(errors, sizes, default, budget, num_buckets=1000)
            limit = budget * sum(e[2] for e in errors)
            assert sum(errors[l][c] for l, c in enumerate(picks)) <= limit * (1 + 1e-12)
            if budget >= 1:
                assert sum(sizes[l][c] for l, c in enumerate(picks)) <= sum(s[2] for s in sizes)
            best, _ = _brute(errors, sizes, limit)
            got = sum(sizes[l][c] for l, c in enumerate(picks))
            assert got <= best * 1.05 + 1e-9   # within the bucket rounding of the optimum


def test_excluded_candidates_never_chosen():
    errors = [[float("inf"), 1.0, 0.5], [float("inf"), 2.0, 0.1]]
    sizes = [[1.0, 5.0, 9.0], [1.0, 5.0, 9.0]]
    picks = solve(errors, sizes, [1, 1], 1.0)
    assert picks == [1, 1]
    assert solve(errors, sizes, [1, 1], 2.0) == [1, 1]
    assert solve(errors, sizes, [2, 2], 0.01) == [2, 2]


def test_solve_bad_input():
    with pytest.raises(ValueError, match="one entry per layer"):
        solve([[1.0]], [[1.0], [2.0]], [0])
    with pytest.raises(ValueError, match="budget=0"):
        solve([[1.0]], [[1.0]], [0], 0)
