"""Ledger byte counts equal the analytic values; subgroup cache and DP x SP layout."""

import threading

import pytest
import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.dist import CommLedger, ParallelLayout, SubgroupCache, aligned_ranges
from tests.conftest import run_distributed


def _collectives(rank, world):
    n = 1000
    t = torch.full((n,), float(rank + 1), dtype=torch.float64)
    with CommLedger() as outer:
        with CommLedger() as inner:
            hd.all_reduce(t)
        assert torch.all(t == world * (world + 1) / 2)
        out = torch.empty(n * world, dtype=torch.float64)
        hd.all_gather_into_tensor(out, torch.full((n,), float(rank), dtype=torch.float64))
        assert torch.equal(out.view(world, n)[:, 0], torch.arange(world, dtype=torch.float64))
        rs_out = torch.empty(n, dtype=torch.float64)
        hd.reduce_scatter_tensor(rs_out, torch.ones(n * world, dtype=torch.float64))
        assert torch.all(rs_out == world)
        b = torch.full((n,), float(rank), dtype=torch.float64)
        hd.broadcast(b, src=world - 1)
        assert torch.all(b == world - 1)
    size = n * 8
    expect = {
        "all_reduce": 2 * (world - 1) * size // world,
        "all_gather": (world - 1) * size,
        "reduce_scatter": (world - 1) * size * world // world,
        "broadcast": size if (rank == world - 1 and world > 1) else 0,
    }
    for op, value in expect.items():
        assert outer.bytes_sent(op) == value, (op, outer.bytes_sent(op), value)
    assert inner.count() == 1 and outer.count() == 4
    assert inner.bytes_sent() == expect["all_reduce"]
    # send/recv in a ring
    if world > 1:
        send = torch.full((10,), float(rank))
        recv = torch.empty(10)
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        with CommLedger() as p2p:
            for w in hd.batch_isend_irecv(ops):
                w.wait()
        assert recv[0] == (rank - 1) % world
        assert p2p.bytes_sent() == 40 and p2p.bytes_received() == 40
    return outer.summary()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ledger_counts_analytic_bytes(world):
    run_distributed(_collectives, world)


def test_ledger_nesting_and_threads():
    seen = []
    from heddle.dist.ledger import record

    with CommLedger() as everything, CommLedger(thread_local=True) as mine:
        record("all_reduce", 2, 10, 10)
        t = threading.Thread(target=lambda: record("all_reduce", 2, 5, 5))
        t.start()
        t.join()
        seen.append(everything.bytes_sent())
    record("all_reduce", 2, 99, 99)  # no ledger active: not recorded anywhere
    assert everything.bytes_sent() == 15 and mine.bytes_sent() == 10
    with hd.comm_tag("x"), CommLedger() as tagged:
        record("all_to_all", 2, 3, 3)
    assert tagged.bytes_sent(tag="x") == 3 and tagged.bytes_sent(tag="y") == 0


def test_aligned_ranges():
    assert aligned_ranges(3) == [(0, 1), (1, 1), (2, 1), (0, 2)]
    assert aligned_ranges(4)[-1] == (0, 4)
    assert len(aligned_ranges(8)) == 8 + 4 + 2 + 1
    with pytest.raises(ValueError, match="world_size=0"):
        aligned_ranges(0)


def _groups(rank, world):
    cache = SubgroupCache()
    sizes = {}
    for start, size in aligned_ranges(world):
        g = cache.get(start, size)
        if start <= rank < start + size:
            t = torch.ones(1)
            hd.all_reduce(t, group=g)
            sizes[(start, size)] = (int(t.item()), dist.get_world_size(g))
    try:
        cache.get(1, 2)
    except ValueError as e:
        assert "start=1, size=2" in str(e)
    else:
        raise AssertionError("misaligned range accepted")
    layout = ParallelLayout(sp_size=2) if world % 2 == 0 else None
    lay = None
    if layout is not None:
        sp = torch.tensor([float(rank)])
        hd.all_reduce(sp, group=layout.sp_group)
        dp = torch.tensor([float(rank)])
        hd.all_reduce(dp, group=layout.dp_group)
        lay = (layout.sp_rank, layout.dp_rank, sp.item(), dp.item())
    else:
        try:
            ParallelLayout(sp_size=2)
        except ValueError as e:
            assert "sp_size=2" in str(e)
        else:
            raise AssertionError("sp_size=2 accepted on world 3")
    return {"sizes": {f"{k}": v for k, v in sizes.items()}, "layout": lay}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_subgroup_cache_and_layout(world):
    results = run_distributed(_groups, world)
    for rank, res in enumerate(results):
        for key, (total, size) in res["sizes"].items():
            assert total == size, (rank, key)
    if world == 4:
        # SP groups {0,1},{2,3}; DP groups {0,2},{1,3}
        assert [r["layout"] for r in results] == [(0, 0, 1.0, 2.0), (1, 0, 1.0, 4.0),
                                                  (0, 1, 5.0, 2.0), (1, 1, 5.0, 4.0)]
