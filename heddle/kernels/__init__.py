"""Compression kernels: Triton on CUDA when Triton is installed, torch otherwise (same results).

``backend=None`` picks Triton for CUDA tensors when Triton imports, torch otherwise (one log line
when a CUDA tensor falls back); ``backend="triton"`` forces the Triton kernels (also on the CPU
under ``TRITON_INTERPRET=1``, as the tests do) and raises with the install hint when Triton is
missing; ``backend="torch"`` forces the reference.

- :func:`quantize_pack` / :func:`unpack_dequantize`: bucketed max-min b-bit quantization with
  unbiased stochastic rounding, bit-packed (see :mod:`heddle.kernels.reference`).
- :func:`topk_indices`: indices of the k largest |x| (sorted ascending; ties at the threshold
  broken by lowest index; NaN counts as +inf), via the exact k-th largest |x|.
"""

from __future__ import annotations

import logging

import torch

from heddle.kernels import reference

log = logging.getLogger(__name__)
_triton = None
_triton_error: Exception | None = None
_warned = False

__all__ = ["quantize_pack", "unpack_dequantize", "topk_indices", "triton_available"]


def triton_available() -> bool:
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            from heddle.kernels import triton_kernels
            _triton = triton_kernels
        except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton"
            _triton_error = exc
    return _triton is not None


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    global _warned
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend={backend!r}: valid are None (auto), 'torch', 'triton'")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise ImportError(f"backend='triton' needs Triton (pip install triton): {_triton_error}")
        return True
    if x.device.type != "cuda":
        return False
    if triton_available():
        return True
    if not _warned:
        log.warning("heddle.kernels: Triton not available (%s); using the torch kernels", _triton_error)
        _warned = True
    return False


def _check_flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x.contiguous()


def quantize_pack(x: torch.Tensor, bits: int, bucket_size: int, *, stochastic: bool = True,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  seed: int = 0, backend: str | None = None):
    """x [n] -> (packed [bits*ceil(n/8)] uint8, scales [ceil(n/bucket_size), 2] fp32 (min, step)).

    Stochastic rounding draws ``noise`` ~ U[0,1) [n] when not given: from ``generator`` on the
    torch path, from ``tl.rand(seed, index)`` in Triton. With the same ``noise`` both backends
    give identical bytes.
    """
    reference.check_quant_args(bits, bucket_size)
    x = _check_flat(x, "x").float()
    if noise is not None and (noise.shape != x.shape or noise.dtype != torch.float32):
        raise ValueError(f"noise must be fp32 of shape {tuple(x.shape)}, got {noise.dtype} {tuple(noise.shape)}")
    if _use_triton(x, backend):
        return _triton.quantize_pack(x, bits, bucket_size, noise.contiguous() if noise is not None else None,
                                     stochastic=stochastic, seed=seed)
    if stochastic and noise is None:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
    return reference.quantize_pack(x, bits, bucket_size, noise if stochastic else None)


def unpack_dequantize(packed: torch.Tensor, scales: torch.Tensor, numel: int, bits: int,
                      bucket_size: int, *, backend: str | None = None) -> torch.Tensor:
    """(packed uint8, scales [nb, 2]) -> [numel] fp32."""
    reference.check_quant_args(bits, bucket_size)
    if packed.numel() != reference.packed_size(numel, bits):
        raise ValueError(f"packed has {packed.numel()} bytes, {numel} elements at {bits} bits need "
                         f"{reference.packed_size(numel, bits)}")
    if tuple(scales.shape) != (reference.num_buckets(numel, bucket_size), 2):
        raise ValueError(f"scales shape {tuple(scales.shape)} != ({reference.num_buckets(numel, bucket_size)}, 2)")
    if _use_triton(packed, backend):
        return _triton.unpack_dequantize(packed.contiguous(), scales.contiguous(), numel, bits, bucket_size)
    return reference.unpack_dequantize(packed, scales, numel, bits, bucket_size)


def _kth_largest_abs_bits(a_bits: torch.Tensor, k: int, count) -> int:
    """Largest T with count(bits >= T) >= k, by bisection over the 31-bit pattern space."""
    lo, hi = 0, 0x7F800001  # count(>= 0) = n >= k; count(>= inf + 1) = 0 (NaNs excluded upstream)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(a_bits, mid) >= k:
            lo = mid
        else:
            hi = mid
    return lo


def topk_indices(x: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """x [n] -> int64 [k]: indices of the k largest |x|, ascending. Ties at the k-th value are
    broken by lowest index, so both backends return the same set."""
    x = _check_flat(x, "x")
    n = x.numel()
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an int in 1..{n}")
    # NaN ranks as +inf (as in torch.topk): a poisoned gradient still yields k indices, so the
    # collective sizes stay the same on every rank and the NaN reaches the aggregate, where the
    # non-finite check sees it (heddle.compress never absorbs it into its state).
    a = torch.nan_to_num(x.float().abs(), nan=float("inf"))
    if _use_triton(x, backend):
        t_bits = _kth_largest_abs_bits(a.view(torch.int32).contiguous(), k, _triton.count_at_least)
        t = torch.tensor(t_bits, dtype=torch.int32, device=x.device).view(torch.float32)
    else:
        t = reference.kth_largest_abs(a, k)
    above = torch.nonzero(a > t).flatten()
    ties = torch.nonzero(a == t).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values
