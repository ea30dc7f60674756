"""Collectives in the style of nccl-tests: time, algorithm and bus bandwidth over a size sweep,
every result checked.

    heddle bench collectives --nproc 2 --min-bytes 1K --max-bytes 64M --factor 4
    heddle bench collectives --ops all_reduce,all_to_all_uneven --dtype bfloat16

One row per (op, size) with nccl-tests' columns: size (B), count, type, redop, root, time (us,
median over trials), algbw and busbw (GB/s, :mod:`heddle.bench.bandwidth`), #wrong. Timed calls run
on a zero-filled buffer (the values do not change the cost); then one call on rank-dependent
small integers (exact in every dtype) is compared element by element with the expected result and
``wrong`` counts the mismatches summed over ranks.

"size" follows nccl-tests: all-reduce and broadcast buffer, all-gather output, reduce-scatter
input, all-to-all send buffer (uneven all-to-all: the mean over ranks). heddle's own collectives
(sparse all-gather / reduce-scatter, compressed all-reduce) live in ``_heddle_ops.py`` and
join the sweep when their feature modules are installed.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Callable

import torch

import heddle.dist as hd
from heddle.bench.bandwidth import algbw_gbps, bus_factor, size_sweep
from heddle.bench.scenario import BenchContext, Scenario, summarize

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    """"4096", "64K", "16M", "1G" (binary units, as nccl-tests) -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(text).upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 64K, 16M or 1G")
    return int(match.group(1)) * _UNITS[match.group(2)]


def pattern(rank: int, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s value at element ``offsets``: small integers (<= 8), exact in bf16/fp16
    and exact when summed over up to 32 ranks."""
    return ((rank % 4) + (offsets % 4) + 1).to(dtype)


@dataclass
class Case:
    """One built collective: ``call`` runs it on the timing buffers, ``check`` on patterned data
    and returns this rank's number of wrong elements."""
    size_bytes: int
    count: int
    call: Callable[[], None]
    check: Callable[[], int]
    redop: str = "none"
    root: int = -1


def _wrong(actual: torch.Tensor, expected: torch.Tensor) -> int:
    return int((actual.double() != expected.double()).sum())


def build_all_reduce(ctx, target, dtype, options=None):
    el = torch.finfo(dtype).bits // 8
    count = max(1, target // el)
    buf = torch.zeros(count, dtype=dtype, device=ctx.device)
    idx = torch.arange(count, device=ctx.device)

    def check():
        x = pattern(ctx.rank, idx, dtype)
        hd.all_reduce(x, group=ctx.group)
        expected = sum(pattern(r, idx, torch.float64) for r in range(ctx.world_size))
        return _wrong(x, expected)
    return Case(count * el, count, lambda: hd.all_reduce(buf, group=ctx.group), check, redop="sum")


def build_all_gather(ctx, target, dtype, options=None):
    n, el = ctx.world_size, torch.finfo(dtype).bits // 8
    chunk = max(1, target // (el * n))
    inp = torch.zeros(chunk, dtype=dtype, device=ctx.device)
    out = torch.empty(n * chunk, dtype=dtype, device=ctx.device)
    idx = torch.arange(chunk, device=ctx.device)

    def check():
        got = torch.empty_like(out)
        hd.all_gather_into_tensor(got, pattern(ctx.rank, idx, dtype), group=ctx.group)
        return _wrong(got, torch.cat([pattern(r, idx, torch.float64) for r in range(n)]))
    return Case(n * chunk * el, n * chunk, lambda: hd.all_gather_into_tensor(out, inp, group=ctx.group), check)


def build_reduce_scatter(ctx, target, dtype, options=None):
    n, el = ctx.world_size, torch.finfo(dtype).bits // 8
    chunk = max(1, target // (el * n))
    inp = torch.zeros(n * chunk, dtype=dtype, device=ctx.device)
    out = torch.empty(chunk, dtype=dtype, device=ctx.device)
    idx = torch.arange(n * chunk, device=ctx.device)

    def check():
        got = torch.empty_like(out)
        hd.reduce_scatter_tensor(got, pattern(ctx.rank, idx, dtype), group=ctx.group)
        mine = idx[ctx.rank * chunk:(ctx.rank + 1) * chunk]
        return _wrong(got, sum(pattern(r, mine, torch.float64) for r in range(n)))
    return Case(n * chunk * el, n * chunk, lambda: hd.reduce_scatter_tensor(out, inp, group=ctx.group), check,
                redop="sum")


def uneven_splits(n: int, base: int) -> list[list[int]]:
    """splits[q][j]: elements rank q sends to rank j = base * (((q + 2 j) mod n) + 1): every
    rank sends different amounts to different peers, and ranks send different totals."""
    return [[base * (((q + 2 * j) % n) + 1) for j in range(n)] for q in range(n)]


def _build_all_to_all(ctx, target, dtype, even: bool):
    n, r, el = ctx.world_size, ctx.rank, torch.finfo(dtype).bits // 8
    if even:
        splits = [[max(1, target // (el * n))] * n for _ in range(n)]
    else:
        mean_weight = sum(((q + 2 * j) % n) + 1 for q in range(n) for j in range(n)) / n
        splits = uneven_splits(n, max(1, int(target / (el * mean_weight))))
    send_sizes = splits[r]
    recv_sizes = [splits[q][r] for q in range(n)]
    inp = torch.zeros(sum(send_sizes), dtype=dtype, device=ctx.device)
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=ctx.device)
    mean_send = sum(sum(s) for s in splits) / n

    def call():
        hd.all_to_all_single(out, inp, recv_sizes, send_sizes, group=ctx.group)

    def check():
        got = torch.empty_like(out)
        offsets = torch.arange(sum(send_sizes), device=ctx.device)
        hd.all_to_all_single(got, pattern(r, offsets, dtype), recv_sizes, send_sizes, group=ctx.group)
        expected = []
        for q in range(n):  # rank q's chunk for r starts after its chunks for ranks < r
            start = sum(splits[q][:r])
            expected.append(pattern(q, torch.arange(start, start + splits[q][r], device=ctx.device),
                                    torch.float64))
        return _wrong(got, torch.cat(expected))
    return Case(int(round(mean_send * el)), int(round(mean_send)), call, check)


def build_broadcast(ctx, target, dtype, options=None):
    el = torch.finfo(dtype).bits // 8
    count = max(1, target // el)
    buf = torch.zeros(count, dtype=dtype, device=ctx.device)
    idx = torch.arange(count, device=ctx.device)
    root = 0  # a global rank: the harness benchmarks the default group

    def check():
        x = pattern(ctx.rank, idx, dtype) if ctx.rank == root else torch.zeros(count, dtype=dtype, device=ctx.device)
        hd.broadcast(x, src=root, group=ctx.group)
        return _wrong(x, pattern(root, idx, torch.float64))
    return Case(count * el, count, lambda: hd.broadcast(buf, src=root, group=ctx.group), check, root=root)


# name -> (builder(ctx, target_bytes, dtype, options) -> Case, op whose bus-bandwidth factor applies;
# None: busbw from the bytes the CommLedger recorded)
BUILTIN_OPS: dict[str, tuple[Callable, str]] = {
    "all_reduce": (build_all_reduce, "all_reduce"),
    "all_gather": (build_all_gather, "all_gather"),
    "reduce_scatter": (build_reduce_scatter, "reduce_scatter"),
    "all_to_all": (lambda c, t, d, o: _build_all_to_all(c, t, d, True), "all_to_all"),
    "all_to_all_uneven": (lambda c, t, d, o: _build_all_to_all(c, t, d, False), "all_to_all"),
    "broadcast": (build_broadcast, "broadcast"),
}


def available_ops() -> dict[str, tuple[Callable, str]]:
    """Built-in collectives plus heddle's own where their feature modules exist."""
    from heddle.bench.scenarios._heddle_ops import heddle_ops

    return {**BUILTIN_OPS, **heddle_ops()}


class Collectives(Scenario):
    name = "collectives"
    help = "nccl-tests-style sweep: time, algbw, busbw, #wrong for every collective and size"
    quick_args = ["--min-bytes", "1K", "--max-bytes", "4M", "--factor", "8", "--warmup", "2", "--trials", "8"]

    def add_options(self, parser):
        parser.add_argument("--ops", default="all",
                            help="comma-separated ops or 'all': " + ", ".join(BUILTIN_OPS) +
                                 " (+ sparse_all_gather, sparse_reduce_scatter, compressed_all_reduce "
                                 "when those modules exist)")
        parser.add_argument("-b", "--min-bytes", type=parse_bytes, default=parse_bytes("1K"))
        parser.add_argument("-e", "--max-bytes", type=parse_bytes, default=parse_bytes("16M"))
        parser.add_argument("-f", "--factor", type=float, default=4.0, help="size multiplier (default 4)")
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        parser.add_argument("--iters", type=int, default=1,
                            help="back-to-back calls per timed trial, time divided by it (nccl-tests -n)")
        parser.add_argument("--compress-density", type=float, default=0.01,
                            help="compressed all-reduce: top-k density")
        parser.add_argument("--sparse-fraction", type=float, default=0.5,
                            help="sparse collectives: fraction of chunks materialized on every rank")

    def selected_ops(self, options) -> dict:
        ops = available_ops()
        if options.ops == "all":
            return ops
        names = [s.strip() for s in options.ops.split(",") if s.strip()]
        unknown = [s for s in names if s not in ops]
        if unknown or not names:
            raise ValueError(f"--ops={options.ops!r}: unknown {unknown}; valid: all, {', '.join(ops)}")
        return {name: ops[name] for name in names}

    def check_options(self, options) -> None:
        self.selected_ops(options)
        self._check_values(options)
        size_sweep(options.min_bytes, options.max_bytes, options.factor)

    @staticmethod
    def _check_values(options) -> None:
        if options.iters < 1:
            raise ValueError(f"--iters={options.iters} must be >= 1")
        if not 0 < options.compress_density <= 1:
            raise ValueError(f"--compress-density={options.compress_density} must be in (0, 1]")
        if not 0 <= options.sparse_fraction <= 1:
            raise ValueError(f"--sparse-fraction={options.sparse_fraction} must be in [0, 1]")

    def run(self, ctx: BenchContext, options) -> list[dict]:
        dtype = DTYPES[options.dtype]
        self._check_values(options)
        sizes = size_sweep(options.min_bytes, options.max_bytes, options.factor)
        rows = []
        for name, (build, bus_op) in self.selected_ops(options).items():
            for target in sizes:
                case = build(ctx, target, dtype, options)
                def repeated(call=case.call, iters=options.iters):
                    for _ in range(iters):
                        call()
                for _ in range(options.warmup):
                    ctx.timed(repeated)
                times = [ctx.timed(repeated) / options.iters for _ in range(options.trials)]
                with hd.CommLedger() as ledger:
                    checked = case.check()
                # [wrong elements, bytes received by this rank in one call]
                totals = torch.tensor([checked, ledger.bytes_received()], dtype=torch.float64)
                if ctx.world_size > 1:
                    hd.all_reduce(totals, group=ctx.group)
                wrong, received_mean = int(totals[0]), float(totals[1]) / ctx.world_size
                stats = summarize(times)
                algbw = algbw_gbps(case.size_bytes, stats["median_s"])
                factor = (bus_factor(bus_op, ctx.world_size) if bus_op is not None
                          else received_mean / case.size_bytes)
                rows.append({
                    "op": name, "target_bytes": target, "size_bytes": case.size_bytes, "count": case.count, "dtype": options.dtype,
                    "redop": case.redop, "root": case.root, "time_us": stats["median_s"] * 1e6,
                    "time_p95_us": stats["p95_s"] * 1e6, "time_max_us": stats["max_s"] * 1e6,
                    "algbw_gbps": algbw, "busbw_gbps": algbw * factor, "bus_factor": factor,
                    "bus_from": "ledger" if bus_op is None else "nccl-tests", "wrong": wrong,
                    "ledger_recv_bytes_mean": received_mean, **stats})
            last = rows[-1]
            ctx.log(f"{name}: {len(sizes)} sizes, largest {last['size_bytes']} B {last['time_us']:.1f} us "
                    f"busbw {last['busbw_gbps']:.3f} GB/s, wrong {sum(r['wrong'] for r in rows if r['op'] == name)}")
        add_dense_ratios(rows)
        return rows


# heddle's collective -> the dense collective it replaces
DENSE_PEER = {"sparse_all_gather": "all_gather", "sparse_reduce_scatter": "reduce_scatter",
              "compressed_all_reduce": "all_reduce"}


def add_dense_ratios(rows: list[dict]) -> None:
    """``speedup_vs_dense`` = the dense peer's median time / this op's, at the same requested
    size, when both ran (> 1: heddle's collective is faster)."""
    dense = {(r["op"], r["target_bytes"]): r["time_us"] for r in rows}
    for r in rows:
        peer = DENSE_PEER.get(r["op"])
        if peer is not None and (peer, r["target_bytes"]) in dense:
            r["dense_op"] = peer
            r["speedup_vs_dense"] = dense[(peer, r["target_bytes"])] / r["time_us"]


SCENARIO = Collectives()
