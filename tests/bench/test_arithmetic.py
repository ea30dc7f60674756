"""Bus-bandwidth factors, size sweeps, MFU arithmetic and the ledger-pricing inversion."""

import math

import pytest

from heddle.bench.bandwidth import algbw_gbps, bus_factor, busbw_gbps, size_sweep
from heddle.bench.comm_replay import payload_bytes
from heddle.bench.flops import gpt_flops_per_token, mfu, peak_flops
from heddle.dist import CommRecord


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64])
def test_bus_factors_match_nccl_tests(n):
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert bus_factor(op, n) == pytest.approx((n - 1) / n)
    assert bus_factor("broadcast", n) == 1.0 and bus_factor("reduce", n) == 1.0


def test_bandwidth_arithmetic():
    # 1 GiB all-reduce over 8 ranks in 0.1 s: algbw 10.737 GB/s, busbw x 1.75
    size = 1 << 30
    assert algbw_gbps(size, 0.1) == pytest.approx(10.73741824)
    assert busbw_gbps("all_reduce", size, 0.1, 8) == pytest.approx(10.73741824 * 1.75)
    assert busbw_gbps("all_gather", size, 0.1, 4) == pytest.approx(10.73741824 * 0.75)
    assert busbw_gbps("all_reduce", size, 0.1, 1) == 0.0
    with pytest.raises(ValueError, match="seconds=0"):
        algbw_gbps(size, 0)
    with pytest.raises(ValueError, match="op='gossip'"):
        bus_factor("gossip", 2)
    with pytest.raises(ValueError, match="n=0"):
        bus_factor("all_reduce", 0)


def test_size_sweep():
    assert size_sweep(1024, 1 << 20, 4) == [1024, 4096, 16384, 65536, 262144, 1048576]
    assert size_sweep(8, 8, 2) == [8]
    assert size_sweep(1000, 5000, 2) == [1000, 2000, 4000]
    for args, text in (((0, 8, 2), "min_bytes"), ((16, 8, 2), "max_bytes"), ((8, 64, 1.0), "factor")):
        with pytest.raises(ValueError, match=text):
            size_sweep(*args)


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # longest match wins
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None
    with pytest.raises(ValueError, match="dtype='int8'"):
        peak_flops("A100", "int8")
    # 6N + 12 L H Q T
    fpt = gpt_flops_per_token(params_no_embedding=1000, n_layers=2, n_heads=4, head_dim=8, seq_len=16)
    assert fpt == 6 * 1000 + 12 * 2 * 4 * 8 * 16
    assert mfu(fpt, 1e6, 1e12) == pytest.approx(fpt * 1e6 / 1e12)
    assert mfu(fpt, 1e6, None) is None


@pytest.mark.parametrize("n", [2, 3, 4])
def test_payload_inverts_ledger_pricing(n):
    """comm_replay recovers the buffer from the bytes heddle.dist records (collectives.py)."""
    S = 4 * 3 * 1024  # divisible by every n here
    priced = {"all_reduce": 2 * (n - 1) * S // n, "reduce_scatter": (n - 1) * S // n,
              "all_gather": (n - 1) * (S // n), "all_to_all": S - S // n}
    expected = {"all_reduce": S, "reduce_scatter": S, "all_gather": S // n, "all_to_all": S}
    for op, sent in priced.items():
        assert payload_bytes(CommRecord(op, n, sent, sent)) == expected[op], op
    assert payload_bytes(CommRecord("broadcast", n, 0, S)) == S
    assert payload_bytes(CommRecord("all_reduce", 1, 0, 0)) == 0
    with pytest.raises(ValueError, match="gossip"):
        payload_bytes(CommRecord("gossip", n, 1, 1))
    assert math.isclose(bus_factor("all_reduce", n) * S, priced["all_reduce"])
