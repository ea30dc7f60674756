"""Torch implementations of the compression kernels (the CPU path and the Triton reference).

Bucketed max-min quantization with stochastic rounding (QSGD-style, one (min, step) pair of fp32
scales per bucket of ``bucket_size`` elements) and b-bit packing:

    step_j = (max_j - min_j) / (2^b - 1)              for bucket j
    u_i    = (x_i - min_j) * (1 / step_j)             in [0, 2^b - 1]
    c_i    = floor(u_i + xi_i),  xi_i ~ U[0, 1)       so E[c_i] = u_i (unbiased)
    x^_i   = c_i * step_j + min_j

Packing: every 8 consecutive codes of b bits fill exactly b bytes (8 b bits), code k of a group at
bit offset k * b, little-endian; the element count is padded to a multiple of 8 with zero codes.
Payload per n elements: b * ceil(n / 8) bytes + 8 bytes per bucket.
"""

from __future__ import annotations

import torch


def check_quant_args(bits: int, bucket_size: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int in 1..8")
    if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size < 8 or bucket_size % 8:
        raise ValueError(f"bucket_size={bucket_size!r} must be a positive multiple of 8")


def packed_size(numel: int, bits: int) -> int:
    """Bytes of the packed codes for ``numel`` elements."""
    return bits * ((numel + 7) // 8)


def num_buckets(numel: int, bucket_size: int) -> int:
    return (numel + bucket_size - 1) // bucket_size


def bucket_scales(x: torch.Tensor, bucket_size: int, bits: int) -> torch.Tensor:
    """x [n] fp32 -> scales [num_buckets, 2] fp32: (min, step) per bucket."""
    n = x.numel()
    nb = num_buckets(n, bucket_size)
    pad = nb * bucket_size - n
    lo = torch.nn.functional.pad(x, (0, pad), value=float("inf")).view(nb, bucket_size).amin(1)
    hi = torch.nn.functional.pad(x, (0, pad), value=float("-inf")).view(nb, bucket_size).amax(1)
    step = (hi - lo) / float(2 ** bits - 1)
    return torch.stack([lo, step], dim=1)


def quantize_codes(x: torch.Tensor, scales: torch.Tensor, bits: int, bucket_size: int,
                   noise: torch.Tensor | None) -> torch.Tensor:
    """x [n] fp32, scales [nb, 2] -> codes [n] int64 in 0..2^b-1 (noise None: round to nearest)."""
    n = x.numel()
    lo = scales[:, 0].repeat_interleave(bucket_size)[:n]
    step = scales[:, 1]
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0).repeat_interleave(bucket_size)[:n]
    u = (x - lo) * inv
    u = u + (noise if noise is not None else 0.5)
    # u <= 2^b - 1 + 1 only through fp rounding at the top level: clamp is an invariant, not a clip.
    return u.floor().clamp_(0, 2 ** bits - 1).to(torch.int64)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [n] int64 -> packed [bits * ceil(n/8)] uint8."""
    n = codes.numel()
    groups = (n + 7) // 8
    c = torch.nn.functional.pad(codes, (0, groups * 8 - n)).view(groups, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(1)                                  # bits never overlap: sum == or
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((word[:, None] >> byte_shifts) & 255).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """packed [bits * ceil(n/8)] uint8 -> codes [n] int64."""
    groups = (numel + 7) // 8
    b = packed.view(groups, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    return ((word[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:numel]


def quantize_pack(x: torch.Tensor, bits: int, bucket_size: int, noise: torch.Tensor | None):
    """x [n] fp32 -> (packed [bits*ceil(n/8)] uint8, scales [nb, 2] fp32)."""
    scales = bucket_scales(x, bucket_size, bits)
    return pack_codes(quantize_codes(x, scales, bits, bucket_size, noise), bits), scales


def unpack_dequantize(packed: torch.Tensor, scales: torch.Tensor, numel: int, bits: int,
                      bucket_size: int) -> torch.Tensor:
    """(packed, scales [nb, 2]) -> x^ [numel] fp32 = code * step + min."""
    codes = unpack_codes(packed, numel, bits).to(torch.float32)
    lo = scales[:, 0].repeat_interleave(bucket_size)[:numel]
    step = scales[:, 1].repeat_interleave(bucket_size)[:numel]
    return codes * step + lo


def count_at_least(abs_bits: torch.Tensor, threshold: int) -> int:
    """Number of entries whose (non-negative float) bit pattern is >= threshold."""
    return int((abs_bits >= threshold).sum())


def kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (a 0-dim fp32 tensor)."""
    return torch.topk(x.abs(), k, sorted=False).values.min()
