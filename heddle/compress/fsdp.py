"""Compression inside FSDP2: a compressed gradient reduce-scatter and a quantized parameter
all-gather, through ``FSDPModule.set_custom_reduce_scatter`` / ``set_custom_all_gather``.

FSDP2 (torch 2.13) calls ``comm(output_tensor, input_tensor, group, op)`` once per FSDP module per
backward with ``input_tensor`` [P * n] (reduce dtype): row j of ``input.view(P, n)`` is the part of
every gradient of the module destined to rank j (dim-0 shards, padded), and expects this rank's
reduced row in ``output_tensor`` [n]. The compressed reduce-scatter
(:meth:`GradientCompression.scatter_chunks`) sends each rank only the payload of its own row:

    out_rank = scale(op) * sum_i C(v_i,rank)     v_i,j = feedback.prepare(row j of rank i)

with the error feedback kept per rank and per row: this rank keeps e (and h) for every row it
sends and H for the row it owns (ZeRO++'s qgZ quantizes the same exchange without feedback).
``op`` is FSDP2's: SUM, AVG (scale 1/P) or PREMUL_SUM(f) (scale f); feedback works on sums.
Identity without feedback, and warm-up steps, pass ``op`` straight to the plain reduce-scatter,
so they equal FSDP2 bit for bit. HSDP: the all-reduce across replicas that FSDP2 runs after the
reduce-scatter stays uncompressed. Not for PowerSGD or L-GreCo (one flat row per module).

A compression step spans one backward: it begins at the first reduce-scatter and ends in an
autograd final callback queued then (after FSDP2's own final callback has reduced the rest).

:class:`QuantizedAllGather` quantizes each rank's parameter shard to ``bits`` bits (bucketed
max-min, round to nearest) for the all-gather, and every rank, the owner included, uses the
dequantized values, so the unsharded parameters are identical on every rank. Error bound, per
element i of bucket j (``bucket_size`` consecutive elements of a rank's flat shard):

    |w^_i - w_i| <= (max_j - min_j) / (2 (2^bits - 1))  (+ fp32 rounding of code * step + min,
                                                          + the cast to the parameter dtype)

The optimizer keeps updating the exact sharded parameters; only the forward/backward see w^.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

import heddle.dist as hd
from heddle import kernels
from heddle.compress.compressors import Identity
from heddle.compress.feedback import NoFeedback
from heddle.kernels import reference


def _op_scale(op, world: int) -> float:
    """The factor FSDP2's reduce op applies to the sum over ranks."""
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.SUM:
        return 1.0
    if kind == dist.ReduceOp.AVG:
        return 1.0 / world
    if kind == dist.ReduceOp.PREMUL_SUM:
        return float(op.factor)
    raise ValueError(f"compressed reduce-scatter: FSDP2 asked for op={op!r}; valid are SUM, AVG, PREMUL_SUM")


class _Alloc:
    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)


class CompressedReduceScatter(_Alloc, ReduceScatter):
    """FSDP2 reduce-scatter through ``comp`` for the FSDP module named ``key``."""

    def __init__(self, comp, key: str):
        self.comp, self.key = comp, key

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        comp = self.comp
        if not comp._in_step:
            comp._begin_step()
            try:   # end the step after the whole backward (FSDP2's final callback included)
                torch.autograd.Variable._execution_engine.queue_callback(comp._end_step)
            except RuntimeError:   # called outside backward: the step ends when a key repeats
                comp._fsdp_manual = True
        elif getattr(comp, "_fsdp_manual", False) and f"{self.key}.0" in comp._staged:
            comp._end_step()
            comp._begin_step()
        _, world = hd.group_rank_size(group)
        rows = input_tensor.view(world, -1)
        passthrough = (comp.step < comp.start_iter
                       or (isinstance(comp.compressor, Identity) and isinstance(comp.feedback, NoFeedback)))
        if passthrough:
            premul_on_gloo = (getattr(op, "op", op) == dist.ReduceOp.PREMUL_SUM
                              and dist.get_backend(group) == "gloo")   # gloo has no PREMUL_SUM
            with hd.CommLedger(thread_local=True) as ledger:
                hd.reduce_scatter_tensor(output_tensor, input_tensor, op=dist.ReduceOp.SUM if premul_on_gloo else op,
                                         group=group)
            if premul_on_gloo:
                output_tensor.mul_(float(op.factor))
            comp._add_bytes(ledger)
            comp._note_plain(self.key, rows, output_tensor)
            return None
        scale = _op_scale(op, world)
        out = comp.scatter_chunks(self.key, [r.float() for r in rows.unbind(0)], group)
        output_tensor.copy_(out * scale if scale != 1.0 else out)
        return None


class QuantizedAllGather(_Alloc, AllGather):
    """FSDP2 parameter all-gather at ``bits`` bits per element (see the module docstring for the
    error bound). Blocking: FSDP2 skips its wait when no Work is returned."""

    def __init__(self, bits: int = 8, bucket_size: int = 512):
        reference.check_quant_args(bits, bucket_size)
        self.bits, self.bucket_size = bits, bucket_size

    def error_bound(self, shard: torch.Tensor) -> torch.Tensor:
        """Per element of a flat shard: (max_j - min_j) / (2 (2^bits - 1)) of its bucket."""
        scales = reference.bucket_scales(shard.float().reshape(-1), self.bucket_size, self.bits)
        return (scales[:, 1] / 2).repeat_interleave(self.bucket_size)[: shard.numel()]

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        if not input_tensor.is_floating_point():   # mixed-dtype groups travel as raw bytes
            hd.all_gather_into_tensor(output_tensor, input_tensor, group=group)
            return None
        _, world = hd.group_rank_size(group)
        n = input_tensor.numel()
        packed, scales = kernels.quantize_pack(input_tensor.float().reshape(-1), self.bits, self.bucket_size,
                                               stochastic=False)
        payload = torch.cat([scales.reshape(-1).view(torch.uint8), packed])
        gathered = payload.new_empty(world * payload.numel())
        hd.all_gather_into_tensor(gathered, payload, group=group)
        nb = reference.num_buckets(n, self.bucket_size)
        out = output_tensor.view(world, n)
        for r, row in enumerate(gathered.view(world, -1)):
            sc = row[: 8 * nb].clone().view(torch.float32).view(nb, 2)
            out[r].copy_(kernels.unpack_dequantize(row[8 * nb:].contiguous(), sc, n, self.bits, self.bucket_size))
        return None

    def __repr__(self):
        return f"QuantizedAllGather(bits={self.bits}, bucket_size={self.bucket_size})"


def attach(comp, module: torch.nn.Module, *, all_gather_bits: int | None = None) -> list[str]:
    """Set the compressed reduce-scatter (and with ``all_gather_bits`` the quantized all-gather)
    on every FSDP2 module under ``module``; returns their names ("" is ``module`` itself)."""
    comp._check_scatter("attach_fsdp")
    gather = QuantizedAllGather(all_gather_bits) if all_gather_bits is not None else None
    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, FSDPModule):
            sub.set_custom_reduce_scatter(CompressedReduceScatter(comp, name or "<root>"))
            if gather is not None:
                sub.set_custom_all_gather(gather)
            names.append(name)
    if not names:
        raise ValueError(f"attach_fsdp: no FSDP2 module under {type(module).__name__} "
                         "(apply torch.distributed.fsdp.fully_shard first)")
    return names
