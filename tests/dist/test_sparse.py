"""sparse_all_gather / sparse_reduce_scatter on random placements: exact results, exact bytes."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heddle.dist import CommLedger, sparse_all_gather, sparse_reduce_scatter
from tests.conftest import run_distributed

CHUNK_SHAPE = (3, 2)


def _chunk(c: int, r: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * c + r)
    return torch.randn(CHUNK_SHAPE, generator=g, dtype=torch.float64)


def _run(rank, world, placements):
    out = []
    for owners, target in placements:
        owned = {c: _chunk(c) for c, o in enumerate(owners) if o == rank}
        with CommLedger() as ledger:
            gathered = sparse_all_gather(owned, owners, target, chunk_shape=CHUNK_SHAPE, dtype=torch.float64)
        held = sorted(c for c, t in enumerate(target) if rank in t)
        assert sorted(gathered) == held, (gathered.keys(), held)
        for c in held:  # spAG copies exactly: bit-identical chunks
            assert torch.equal(gathered[c], _chunk(c)), c
        ag_recv, ag_sent = ledger.bytes_received(), ledger.bytes_sent()
        replicas = {c: _chunk(c, rank + 1) for c in held}
        with CommLedger() as ledger:
            work = sparse_reduce_scatter(replicas, owners, target, chunk_shape=CHUNK_SHAPE,
                                         dtype=torch.float64, async_op=True)
            reduced = work.wait()
        assert sorted(reduced) == sorted(owned)
        for c, value in reduced.items():
            expected = sum(_chunk(c, r + 1) for r in sorted(target[c]))
            torch.testing.assert_close(value, expected, atol=1e-14, rtol=0)
        out.append((ag_recv, ag_sent, ledger.bytes_received(), ledger.bytes_sent()))
    return out


@st.composite
def placements(draw, world):
    items = []
    for _ in range(draw(st.integers(8, 16))):
        num_chunks = draw(st.integers(0, 7))
        owners = [draw(st.integers(0, world - 1)) for _ in range(num_chunks)]
        target = [sorted({o} | set(draw(st.lists(st.integers(0, world - 1), max_size=world))))
                  for o in owners]
        items.append((owners, target))
    return items


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sparse_collectives_random_placements(world):
    @settings(max_examples=1, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        items = data.draw(placements(world))
        results = run_distributed(_run, world, items)
        chunk_bytes = int(np.prod(CHUNK_SHAPE)) * 8
        for i, (owners, target) in enumerate(items):
            extra = sum(len(t) - 1 for t in target)  # |P' \ P|
            for col in range(4):  # spAG recv/sent, spRS recv/sent: each totals |P' \ P| chunks
                assert sum(r[i][col] for r in results) == chunk_bytes * extra, (i, col, results)
            for rank in range(world):  # per rank: spAG receives one chunk per (c, rank) it lacks
                lacking = sum(1 for o, t in zip(owners, target) if rank in t and o != rank)
                assert results[rank][i][0] == chunk_bytes * lacking
    check()


def test_sparse_placement_validation():
    with pytest.raises(ValueError, match="must contain the owner"):
        sparse_all_gather({0: _chunk(0)}, [0], [[]], chunk_shape=CHUNK_SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="owners\\[0\\]=2"):
        sparse_all_gather({}, [2], [[2]], chunk_shape=CHUNK_SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="owns"):
        sparse_all_gather({}, [0], [[0]], chunk_shape=CHUNK_SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_shape"):
        sparse_reduce_scatter({0: torch.zeros(2)}, [0], [[0]], chunk_shape=CHUNK_SHAPE, dtype=torch.float64)
