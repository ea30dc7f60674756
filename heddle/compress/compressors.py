"""Gradient compressors: what one rank puts on the wire for one layer, and how it is aggregated.

A compressor maps a layer's vector x (any shape, fp32) to a payload and back, with one parameter
per layer (density, bits or rank) that L-GreCo may change layer by layer. ``summable``
compressors produce payloads that add on the wire (all-reduce); the others are all-gathered and
every rank decodes and sums the P payloads in rank order (so every rank gets bit-identical sums).

``bits_per_element(shape, param)`` is the payload this rank contributes, in bits per gradient
element, counting values, indices and scales (the ledger check in the tests holds it to that).
``expected_error(x, param)`` is E||x - C(x)||^2, the error L-GreCo's dynamic program budgets.
"""

from __future__ import annotations

import abc
import math

import torch

from heddle import kernels
from heddle.kernels import reference


def _numel(shape) -> int:
    return int(math.prod(shape)) if len(shape) else 1


class Compressor(abc.ABC):
    family = "compressor"
    summable = False

    @property
    def default_param(self):
        raise TypeError(f"{type(self).__name__} has no parameter")

    def candidates(self) -> list:
        """Per-layer parameter choices for L-GreCo around the default."""
        return [self.default_param]

    def check_param(self, param) -> None:
        pass

    @abc.abstractmethod
    def bits_per_element(self, shape, param=None) -> float:
        """Payload bits per element of a layer of ``shape`` under ``param`` (None: the default)."""

    @abc.abstractmethod
    def expected_error(self, x: torch.Tensor, param) -> float:
        """E||x - C(x)||^2 (fp64 sum) for a layer x under ``param``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PayloadCompressor(Compressor):
    """A single-phase compressor: one payload per layer, ``encode`` / ``decode`` (the exchange in
    :mod:`heddle.compress.exchange` all-reduces or all-gathers it)."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, param, *, seed: int, shared_seed: int) -> torch.Tensor:
        """x [n] fp32 -> payload (fp32 values when summable, else uint8 bytes). ``seed`` differs
        per rank (stochastic rounding), ``shared_seed`` is the same on every rank (random-k)."""

    @abc.abstractmethod
    def decode(self, payload: torch.Tensor, numel: int, param, *, shared_seed: int) -> torch.Tensor:
        """payload -> [numel] fp32 (for summable payloads: decode(sum) = sum of decodes)."""


class Identity(PayloadCompressor):
    """No compression (fp32 on the wire, all-reduced): for checks and warm-up."""

    family = "identity"
    summable = True

    @property
    def default_param(self):
        return None

    def bits_per_element(self, shape, param=None) -> float:
        return 32.0

    def encode(self, x, param, *, seed, shared_seed):
        return x

    def decode(self, payload, numel, param, *, shared_seed):
        return payload

    def expected_error(self, x, param) -> float:
        return 0.0


def _check_density(name: str, density) -> float:
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
        raise ValueError(f"{name}={density!r} must be a number in (0, 1]")
    return float(density)


def num_kept(numel: int, density: float) -> int:
    """k = max(1, round(density * n)): the entries a sparsifier keeps."""
    return max(1, min(numel, int(round(density * numel))))


def _density_candidates(density: float) -> list[float]:
    return sorted({min(1.0, density * f) for f in (0.25, 0.5, 1.0, 2.0, 4.0)})


class _Sparsifier(PayloadCompressor):
    """Keeps k = density * n entries; ``bits_per_kept`` counts what travels per kept entry. The
    tuned parameter (L-GreCo) is the density."""

    bits_per_kept = 32.0

    def __init__(self, density: float = 0.01):
        self.density = _check_density("density", density)

    @property
    def default_param(self):
        return self.density

    def candidates(self):
        return _density_candidates(self.density)

    def check_param(self, param):
        _check_density("density", param)

    def bits_per_element(self, shape, param=None):
        n = _numel(shape)
        return self.bits_per_kept * num_kept(n, self.density if param is None else param) / n

    def __repr__(self):
        return f"{type(self).__name__}(density={self.density})"


class TopK(_Sparsifier):
    """Keep the k = density * n largest |x_i|: fp32 values + int32 indices (64 k bits), gathered."""

    family = "topk"
    bits_per_kept = 64.0

    def encode(self, x, param, *, seed, shared_seed):
        idx = kernels.topk_indices(x, num_kept(x.numel(), param))
        return torch.cat([x[idx].contiguous().view(torch.uint8), idx.to(torch.int32).view(torch.uint8)])

    def decode(self, payload, numel, param, *, shared_seed):
        k = num_kept(numel, param)
        values = payload[: 4 * k].clone().view(torch.float32)
        idx = payload[4 * k:].clone().view(torch.int32).long()
        return torch.zeros(numel, dtype=torch.float32, device=payload.device).index_put_((idx,), values)

    def expected_error(self, x, param):
        a = x.flatten().double().pow(2)
        k = num_kept(a.numel(), param)
        return float(a.sum() - torch.topk(a, k, sorted=False).values.sum())


class RandomK(_Sparsifier):
    """Keep k = density * n entries chosen by a generator seeded identically on every rank: only
    the fp32 values travel (32 k bits), and they add on the wire (all-reduce)."""

    family = "randomk"
    summable = True
    bits_per_kept = 32.0

    @staticmethod
    def indices(numel: int, k: int, shared_seed: int) -> torch.Tensor:
        """A uniform k-subset of range(numel), sorted, the same on every rank for ``shared_seed``.
        Sparse case in O(k): draw with replacement until k distinct, then a uniform k-subset of
        those (uniform by symmetry); a full permutation only when k is a large share of n."""
        g = torch.Generator().manual_seed(shared_seed)
        if 4 * k >= numel:
            return torch.sort(torch.randperm(numel, generator=g)[:k]).values
        draws = k + k // 8 + 16
        distinct = torch.randint(numel, (draws,), generator=g).unique()
        while distinct.numel() < k:
            distinct = torch.cat([distinct, torch.randint(numel, (draws,), generator=g)]).unique()
        return torch.sort(distinct[torch.randperm(distinct.numel(), generator=g)[:k]]).values

    def encode(self, x, param, *, seed, shared_seed):
        idx = self.indices(x.numel(), num_kept(x.numel(), param), shared_seed).to(x.device)
        return x[idx].contiguous()

    def decode(self, payload, numel, param, *, shared_seed):
        idx = self.indices(numel, num_kept(numel, param), shared_seed).to(payload.device)
        return torch.zeros(numel, dtype=torch.float32, device=payload.device).index_put_((idx,), payload)

    def expected_error(self, x, param):
        n = x.numel()
        return float((1.0 - num_kept(n, param) / n) * x.double().pow(2).sum())


class Quantize(PayloadCompressor):
    """Bucketed max-min quantization to ``bits`` bits with unbiased stochastic rounding, bit-packed:
    b * ceil(n/8) bytes of codes + two fp32 scales (min, step) per bucket, all-gathered."""

    family = "quantize"

    def __init__(self, bits: int = 4, bucket_size: int = 512, stochastic: bool = True):
        reference.check_quant_args(bits, bucket_size)
        self.bits, self.bucket_size, self.stochastic = bits, bucket_size, bool(stochastic)

    @property
    def default_param(self):
        return self.bits

    def candidates(self):
        """2..8 bits: 1-bit max-min rounding is not contractive (its expected error exceeds
        ||x||^2 on typical gradients), which error feedback cannot absorb."""
        return list(range(2, 9))

    def check_param(self, param):
        reference.check_quant_args(param, self.bucket_size)

    def bits_per_element(self, shape, param=None):
        n, b = _numel(shape), self.bits if param is None else param
        return 8.0 * (reference.packed_size(n, b) + 8 * reference.num_buckets(n, self.bucket_size)) / n

    def encode(self, x, param, *, seed, shared_seed):
        g = torch.Generator(device=x.device).manual_seed(seed) if self.stochastic else None
        packed, scales = kernels.quantize_pack(x, param, self.bucket_size, stochastic=self.stochastic,
                                               generator=g, seed=seed % (2 ** 31))
        return torch.cat([scales.reshape(-1).view(torch.uint8), packed])

    def decode(self, payload, numel, param, *, shared_seed):
        nb = reference.num_buckets(numel, self.bucket_size)
        scales = payload[: 8 * nb].clone().view(torch.float32).view(nb, 2)
        return kernels.unpack_dequantize(payload[8 * nb:].contiguous(), scales, numel, param, self.bucket_size)

    def expected_error(self, x, param):
        """Stochastic rounding: sum step^2 f (1 - f), f the fractional level; nearest: (x - x^)^2."""
        x = x.flatten().float()
        scales = reference.bucket_scales(x, self.bucket_size, param).double()
        step = scales[:, 1].repeat_interleave(self.bucket_size)[: x.numel()]
        lo = scales[:, 0].repeat_interleave(self.bucket_size)[: x.numel()]
        u = torch.where(step > 0, (x.double() - lo) / torch.where(step > 0, step, 1.0), 0.0)
        f = u - u.floor()
        if self.stochastic:
            return float((step.pow(2) * f * (1 - f)).sum())
        return float((step.pow(2) * torch.minimum(f, 1 - f).pow(2)).sum())

    def __repr__(self):
        return f"Quantize(bits={self.bits}, bucket_size={self.bucket_size}, stochastic={self.stochastic})"
