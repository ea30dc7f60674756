"""Ulysses attention: heddle vs DeepSpeed's DistributedAttention vs local attention alone.

    heddle bench ulysses --nproc 2 --trials 7          # the harness (Parquet + table)
    heddle run -n 2 benchmarks/ulysses.py              # the same, as a script that prints a table

Per sequence length s (b=1, H=16, d=64, causal by default), one forward+backward of:
- ``local``: the per-rank attention work alone, ``local_attention`` on ``[b, s, H/P, d]`` (no
  communication): the floor both sequence-parallel implementations sit on;
- ``heddle``: :class:`heddle.sequence.UlyssesAttention` on ``[b, s/P, H, d]``;
- ``deepspeed``: ``deepspeed.sequence.layer.DistributedAttention`` on the same shards, batch-first
  (scatter_idx=2, gather_idx=1, batch_dim_idx=0), the same ``local_attention`` inside;
- ``heddle-overlap``: the same with ``overlap_chunks=C`` (all-to-alls pipelined with attention);
- ``heddle-comm`` / ``deepspeed-comm``: the same with attention replaced by ``q + k + v`` (all
  the all-to-alls and layout copies, no attention FLOPs): the overhead measured directly.
Cases run interleaved, one trial of each per round, so load drift hits all alike.
``overhead_s`` = median - local's median; ``overhead_vs_ds`` = heddle's / DeepSpeed's (the goal:
<= 0.5); ``overhead_min_s`` / ``overhead_vs_ds_min`` the same from the fastest trial of each
case (the less load-sensitive estimate on a shared machine). Bytes: heddle's from the CommLedger, DeepSpeed's by counting its all_to_all_single calls
the same way (all sent but the chunk a rank keeps). Peak memory: the largest net bytes allocated
through torch during one forward+backward (torch profiler memory events), inputs excluded, heddle's
buffer pool emptied first (so its buffers count); ``pool_mb``: what the pool keeps afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
import torch.distributed as dist

from heddle.bench.scenario import BenchContext, Scenario, summarize
from heddle.dist import CommLedger
from heddle.models.attention import local_attention
from heddle.sequence import UlyssesAttention
from heddle.sequence.ulysses_communications import POOL

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _sum_attention(q, k, v, *args, causal=True, cu_seqlens=None, **kwargs):
    """Stand-in attention with the same inputs and output shape, no FLOPs (MHA only)."""
    return q + k + v


@contextlib.contextmanager
def _count_torch_all_to_all(counter: list[int]):
    """Count bytes a rank sends through torch.distributed.all_to_all_single (equal splits)."""
    original = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        n = dist.get_world_size(group)
        if input_split_sizes:
            own = input_split_sizes[dist.get_rank(group)] * (input.numel() // max(input.shape[0], 1))
        else:
            own = input.numel() // n
        counter[0] += (input.numel() - own) * input.element_size()
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    try:
        yield
    finally:
        dist.all_to_all_single = original


def _peak_bytes(fn) -> int:
    """Largest net bytes allocated through torch while ``fn`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


class UlyssesScenario(Scenario):
    name = "ulysses"
    help = "Ulysses attention: heddle vs DeepSpeed DistributedAttention vs local attention"
    min_procs = 2

    def add_options(self, parser) -> None:
        parser.add_argument("--seq-lens", default="2048,4096,8192", help="global sequence lengths")
        parser.add_argument("--batch", type=int, default=1)
        parser.add_argument("--heads", type=int, default=16)
        parser.add_argument("--head-dim", type=int, default=64)
        parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        parser.add_argument("--non-causal", action="store_true")
        parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed cases")
        parser.add_argument("--overlap-chunks", type=int, default=4,
                            help="head chunks of the heddle-overlap case (1: leave the case out)")

    def _impls(self, ctx, options):
        causal = not options.non_causal
        impls = {
            "local": lambda q, k, v: local_attention(q, k, v, causal=causal),
            "heddle": lambda q, k, v, m=UlyssesAttention(ctx.group, check="never"): m(q, k, v, causal=causal),
            "heddle-comm": lambda q, k, v, m=UlyssesAttention(ctx.group, _sum_attention, check="never"): m(q, k, v),
        }
        if options.overlap_chunks > 1:
            overlapped = UlyssesAttention(ctx.group, check="never", overlap_chunks=options.overlap_chunks)
            impls["heddle-overlap"] = lambda q, k, v: overlapped(q, k, v, causal=causal)
        if not options.no_deepspeed:
            import deepspeed
            from deepspeed.sequence.layer import DistributedAttention

            deepspeed.init_distributed(dist_backend="gloo")
            group = ctx.group if ctx.group is not None else dist.group.WORLD
            ds = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)
            ds_comm = DistributedAttention(_sum_attention, group, scatter_idx=2, gather_idx=1)
            impls["deepspeed"] = lambda q, k, v: ds(q, k, v, 0, causal=causal)
            impls["deepspeed-comm"] = lambda q, k, v: ds_comm(q, k, v, 0)
        return impls

    def run(self, ctx: BenchContext, options) -> list[dict]:
        rank, world = ctx.rank, ctx.world_size
        dtype = DTYPES[options.dtype]
        impls = self._impls(ctx, options)
        rows = []
        for s in (int(x) for x in options.seq_lens.split(",")):
            if s % world or options.heads % world:
                raise ValueError(f"--seq-lens {s} and --heads {options.heads} must be multiples of {world}")
            g = torch.Generator().manual_seed(s)
            b, h, d = options.batch, options.heads, options.head_dim
            full = [torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(4)]
            sl, hl = s // world, h // world
            shard = [t[:, rank * sl:(rank + 1) * sl].contiguous() for t in full]
            # local: this rank's heads over the whole sequence (the work after the all-to-all).
            local = [t[:, :, rank * hl:(rank + 1) * hl].contiguous() for t in full]
            inputs = {name: (local if name == "local" else shard) for name in impls}

            def step(name, keep=None):
                q, k, v, grad = (t.detach().requires_grad_(i < 3) for i, t in enumerate(inputs[name]))
                out = impls[name](q, k, v)
                out.backward(grad)
                if keep is not None:
                    keep[name] = (out.detach(), q.grad, k.grad, v.grad)

            results, sent = {}, {}
            for name in impls:  # warm-up, bytes and numerics
                counter = [0]
                with CommLedger() as ledger, _count_torch_all_to_all(counter):
                    step(name, results)
                sent[name] = ledger.bytes_sent("all_to_all") if name.startswith("heddle") else counter[0]
                for _ in range(options.warmup):
                    step(name)
            times = {name: [] for name in impls}
            for _ in range(options.trials):
                for name in impls:
                    times[name].append(ctx.timed(lambda: step(name)))
            peaks, pooled = {}, {}
            for name in impls:
                POOL.clear()  # heddle's pooled buffers are allocated inside the measured step
                peaks[name] = _peak_bytes(lambda: step(name))
                pooled[name] = POOL.nbytes()
            stats = {name: {**summarize(t), "min_s": min(t)} for name, t in times.items()}
            base, base_min = stats["local"]["median_s"], stats["local"]["min_s"]
            ds_over = stats["deepspeed"]["median_s"] - base if "deepspeed" in stats else float("nan")
            ds_over_min = stats["deepspeed"]["min_s"] - base_min if "deepspeed" in stats else float("nan")
            for name in impls:
                over = stats[name]["median_s"] - base
                row = {"scenario": self.name, "impl": name, "b": b, "s": s, "H": h, "d": d, "P": world,
                       "dtype": options.dtype, "causal": not options.non_causal, **stats[name],
                       "overhead_s": over if not name.endswith("comm") and name != "local" else float("nan"),
                       "bytes_sent": sent[name], "peak_mem_mb": peaks[name] / 2**20,
                       "pool_mb": pooled[name] / 2**20}
                if not name.endswith("comm") and name != "local":
                    row["overhead_min_s"] = stats[name]["min_s"] - base_min
                if name in ("heddle", "heddle-overlap"):
                    # A ratio of overheads only means something when DeepSpeed's is measurably > 0.
                    row["overhead_vs_ds"] = over / ds_over if ds_over > 0 else float("nan")
                    row["overhead_vs_ds_min"] = row["overhead_min_s"] / ds_over_min if ds_over_min > 0 else float("nan")
                if name == "heddle-comm" and "deepspeed-comm" in stats:
                    row["overhead_vs_ds"] = stats[name]["median_s"] / stats["deepspeed-comm"]["median_s"]
                    row["overhead_vs_ds_min"] = stats[name]["min_s"] / stats["deepspeed-comm"]["min_s"]
                if name.startswith("heddle") and "deepspeed" in results:
                    other = results["deepspeed-comm" if name.endswith("comm") else "deepspeed"]
                    diff = max(float((a - c).abs().max()) for a, c in zip(results[name], other))
                    worst = torch.tensor([diff], dtype=torch.float64)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ctx.group)  # bookkeeping, not timed
                    row["max_abs_diff_vs_ds"] = float(worst)
                rows.append(row)
        return rows


SCENARIO = UlyssesScenario()
