"""all_to_all forward/backward against a single-process fp64 reference, world sizes 1-4."""

import pytest
import torch

from heddle.dist import CommLedger, all_to_all
from tests.conftest import run_distributed

CASES = [
    # (scatter_dim, gather_dim, scatter_total, gather sizes per rank or None for even)
    (2, 1, 8, None),
    (2, 1, 7, None),          # uneven scatter: 7 heads
    (1, 2, 6, "uneven"),      # uneven gather sizes
    (0, 3, 5, None),
]


def _inputs(world, scatter_dim, gather_dim, scatter_total, gather_mode):
    gather = [3 + (r % 2 if gather_mode == "uneven" else 0) for r in range(world)]
    xs, ws = [], []
    for r in range(world):
        shape = [2, 4, 4, 3]
        shape[scatter_dim] = scatter_total
        shape[gather_dim] = gather[r]
        g = torch.Generator().manual_seed(100 + r)
        xs.append(torch.randn(*shape, generator=g, dtype=torch.float64))
    return xs, gather


def _reference(xs, world, scatter_dim, gather_dim, scatter_sizes):
    xs = [x.clone().requires_grad_(True) for x in xs]
    offsets = [sum(scatter_sizes[:j]) for j in range(world)]
    outs = [torch.cat([xs[j].narrow(scatter_dim, offsets[r], scatter_sizes[r]) for j in range(world)], gather_dim)
            for r in range(world)]
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + r), dtype=torch.float64)
               for r, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return [o.detach() for o in outs], [x.grad for x in xs], weights


def _check(rank, world):
    report = []
    for scatter_dim, gather_dim, total, mode in CASES:
        xs, gather = _inputs(world, scatter_dim, gather_dim, total, mode)
        sizes = [total // world + (1 if i < total % world else 0) for i in range(world)]
        ref_out, ref_grad, weights = _reference(xs, world, scatter_dim, gather_dim, sizes)
        x = xs[rank].clone().requires_grad_(True)
        with CommLedger() as ledger:
            out = all_to_all(x, scatter_dim, gather_dim, gather_sizes=gather if mode else None)
            (out * weights[rank]).sum().backward()
        assert torch.equal(out, ref_out[rank]), (scatter_dim, gather_dim, total, mode)
        torch.testing.assert_close(x.grad, ref_grad[rank], atol=1e-12, rtol=0)
        # Ledger: forward sends all of x but the chunk kept; backward sends all of grad(out) but own.
        elem = x.element_size()
        inner = x.numel() // x.shape[scatter_dim]
        fwd_sent = (x.numel() - sizes[rank] * inner) * elem
        out_inner = out.numel() // out.shape[gather_dim]
        bwd_sent = (out.numel() - gather[rank] * out_inner) * elem
        expected = fwd_sent + bwd_sent if world > 1 else 0
        assert ledger.bytes_sent("all_to_all") == expected, (ledger.records, expected)
        report.append(ledger.bytes_sent())
    return report


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_all_to_all_matches_reference(world):
    run_distributed(_check, world)


def _errors(rank, world):
    x = torch.zeros(2, 3, 4)
    for kwargs, fragment in [
        (dict(scatter_dim=1, gather_dim=1), "must differ"),
        (dict(scatter_dim=5, gather_dim=1), "scatter_dim=5"),
        (dict(scatter_dim=2, gather_dim=1, scatter_sizes=[4]), "scatter_sizes"),
    ]:
        try:
            all_to_all(x, **kwargs)
        except ValueError as e:
            assert fragment in str(e), str(e)
        else:
            raise AssertionError(f"no ValueError for {kwargs}")


def test_all_to_all_bad_arguments():
    run_distributed(_errors, 2)
