"""Triton kernels for the compression pipeline (CUDA, or the CPU under TRITON_INTERPRET=1).

Each kernel computes exactly what :mod:`heddle.kernels.reference` computes, in the same fp32
operation order, so with the same ``noise`` the outputs are bit-identical:

- ``_quantize_pack_kernel``: one program per bucket: min/max, step, stochastic rounding
  (``tl.rand`` when no noise tensor is given) and b-bit packing of groups of 8 codes into b bytes.
- ``_unpack_dequantize_kernel``: one program per bucket: unpack and ``code * step + min``.
- ``_count_at_least_kernel``: per-block counts of |x| bit patterns >= a threshold; the host
  bisects the 31-bit pattern space to find the exact k-th largest |x| (top-k threshold selection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_pack_kernel(x_ptr, noise_ptr, packed_ptr, scales_ptr, n, seed,
                          BUCKET: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                          HAS_NOISE: tl.constexpr, STOCHASTIC: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    idx = pid * BUCKET + offs
    valid = (offs < BUCKET) & (idx < n)
    x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(valid, x, float("inf")), axis=0)
    hi = tl.max(tl.where(valid, x, float("-inf")), axis=0)
    step = (hi - lo) / (2 ** BITS - 1)
    inv = tl.where(step > 0, 1.0 / tl.where(step > 0, step, 1.0), 0.0)
    u = (x - lo) * inv
    if STOCHASTIC:
        if HAS_NOISE:
            xi = tl.load(noise_ptr + idx, mask=valid, other=0.0)
        else:
            xi = tl.rand(seed, idx)
        u = u + xi
    else:
        u = u + 0.5
    c = tl.minimum(tl.maximum(tl.floor(u), 0.0), 2 ** BITS - 1).to(tl.int64)
    c = tl.where(valid, c, 0)
    c2 = tl.reshape(c, (BLOCK // 8, 8))
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    word = tl.sum(c2 << shifts[None, :], axis=1)                 # [BLOCK // 8]
    group = tl.arange(0, BLOCK // 8)
    gidx = pid * (BUCKET // 8) + group
    gvalid = (group < BUCKET // 8) & (gidx * 8 < n)
    for m in tl.static_range(BITS):
        byte = ((word >> (8 * m)) & 255).to(tl.uint8)
        tl.store(packed_ptr + gidx * BITS + m, byte, mask=gvalid)
    tl.store(scales_ptr + 2 * pid, lo)
    tl.store(scales_ptr + 2 * pid + 1, step)


@triton.jit
def _unpack_dequantize_kernel(packed_ptr, scales_ptr, out_ptr, n,
                              BUCKET: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
    pid = tl.program_id(0)
    group = tl.arange(0, BLOCK // 8)
    gidx = pid * (BUCKET // 8) + group
    gvalid = (group < BUCKET // 8) & (gidx * 8 < n)
    word = tl.zeros((BLOCK // 8,), dtype=tl.int64)
    for m in tl.static_range(BITS):
        byte = tl.load(packed_ptr + gidx * BITS + m, mask=gvalid, other=0).to(tl.int64)
        word = word | (byte << (8 * m))
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    codes = (word[:, None] >> shifts[None, :]) & (2 ** BITS - 1)  # [BLOCK // 8, 8]
    codes = tl.reshape(codes, (BLOCK,)).to(tl.float32)
    lo = tl.load(scales_ptr + 2 * pid)
    step = tl.load(scales_ptr + 2 * pid + 1)
    offs = tl.arange(0, BLOCK)
    idx = pid * BUCKET + offs
    tl.store(out_ptr + idx, codes * step + lo, mask=(offs < BUCKET) & (idx < n))


@triton.jit
def _count_at_least_kernel(bits_ptr, counts_ptr, n, threshold, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(bits_ptr + idx, mask=idx < n, other=-1)
    tl.store(counts_ptr + pid, tl.sum((b >= threshold).to(tl.int32), axis=0))


def quantize_pack(x: torch.Tensor, bits: int, bucket_size: int, noise: torch.Tensor | None,
                  *, stochastic: bool = True, seed: int = 0):
    """x [n] fp32 contiguous -> (packed [bits*ceil(n/8)] uint8, scales [nb, 2] fp32)."""
    n = x.numel()
    nb = (n + bucket_size - 1) // bucket_size
    packed = torch.empty(bits * ((n + 7) // 8), dtype=torch.uint8, device=x.device)
    scales = torch.empty(nb, 2, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(bucket_size)
    _quantize_pack_kernel[(nb,)](x, noise if noise is not None else x, packed, scales, n, seed,
                                 BUCKET=bucket_size, BLOCK=block, BITS=bits,
                                 HAS_NOISE=noise is not None, STOCHASTIC=stochastic)
    return packed, scales


def unpack_dequantize(packed: torch.Tensor, scales: torch.Tensor, numel: int, bits: int,
                      bucket_size: int) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    block = triton.next_power_of_2(bucket_size)
    _unpack_dequantize_kernel[(scales.shape[0],)](packed, scales, out, numel,
                                                  BUCKET=bucket_size, BLOCK=block, BITS=bits)
    return out


def count_at_least(abs_bits: torch.Tensor, threshold: int, block: int = 1024) -> int:
    n = abs_bits.numel()
    grid = (n + block - 1) // block
    counts = torch.empty(grid, dtype=torch.int32, device=abs_bits.device)
    _count_at_least_kernel[(grid,)](abs_bits, counts, n, threshold, BLOCK=block)
    return int(counts.sum())
