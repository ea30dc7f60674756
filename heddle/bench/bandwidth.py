"""Algorithm and bus bandwidth, as nccl-tests defines them.

For a collective over ``n`` ranks that takes ``t`` seconds on a buffer of ``S`` bytes
(nccl-tests' "size": the all-reduce buffer, the all-gather *output*, the reduce-scatter *input*,
the all-to-all send buffer, the broadcast buffer):

    algbw = S / t
    busbw = algbw * factor(op, n)

with factor 2(n-1)/n for all-reduce (a reduce-scatter then an all-gather, each moving
(n-1)/n of S over every link), (n-1)/n for all-gather, reduce-scatter and all-to-all, and 1 for
broadcast and reduce. busbw is the figure that compares against a link's peak bandwidth, whatever
n is. Bandwidths are in GB/s (10^9 bytes per second), as nccl-tests prints them.
"""

from __future__ import annotations

BUS_FACTOR_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce")


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor for ``op`` over ``n`` ranks."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer (ranks in the group)")
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op in ("broadcast", "reduce"):
        return 1.0
    raise ValueError(f"op={op!r} has no bus-bandwidth factor; valid: {', '.join(BUS_FACTOR_OPS)}")


def algbw_gbps(size_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth S / t in GB/s."""
    if size_bytes < 0:
        raise ValueError(f"size_bytes={size_bytes} must be >= 0")
    if not seconds > 0:
        raise ValueError(f"seconds={seconds} must be > 0")
    return size_bytes / seconds / 1e9


def busbw_gbps(op: str, size_bytes: float, seconds: float, n: int) -> float:
    """Bus bandwidth algbw * factor(op, n) in GB/s."""
    return algbw_gbps(size_bytes, seconds) * bus_factor(op, n)


def size_sweep(min_bytes: int, max_bytes: int, factor: float) -> list[int]:
    """Sizes min, min*factor, ... up to max inclusive (nccl-tests' -b/-e/-f)."""
    if min_bytes < 1:
        raise ValueError(f"min_bytes={min_bytes} must be >= 1")
    if max_bytes < min_bytes:
        raise ValueError(f"max_bytes={max_bytes} must be >= min_bytes={min_bytes}")
    if not factor > 1:
        raise ValueError(f"factor={factor} must be > 1")
    sizes, size = [], float(min_bytes)
    while size <= max_bytes * (1 + 1e-9):
        sizes.append(int(round(size)))
        size *= factor
    return sizes
