"""heddle.kernels: the Triton kernels (interpreted on the CPU) equal the torch reference."""

import pytest
import torch

from heddle import kernels
from heddle.kernels import reference


@pytest.mark.parametrize("n,bits,bucket", [(1, 1, 8), (37, 8, 8), (100, 4, 16), (513, 1, 128),
                                           (64, 7, 32), (300, 3, 64), (250, 5, 24), (96, 2, 40), (77, 6, 16)])
def test_triton_matches_torch_bit_for_bit(n, bits, bucket):
    g = torch.Generator().manual_seed(n * 10 + bits)
    x = torch.randn(n, generator=g) * 3
    noise = torch.rand(n, generator=g)
    for stochastic in (True, False):
        p1, s1 = kernels.quantize_pack(x, bits, bucket, noise=noise, stochastic=stochastic, backend="torch")
        p2, s2 = kernels.quantize_pack(x, bits, bucket, noise=noise, stochastic=stochastic, backend="triton")
        assert p1.dtype == torch.uint8 and p1.numel() == bits * ((n + 7) // 8)
        assert torch.equal(p1, p2) and torch.equal(s1, s2)
        d1 = kernels.unpack_dequantize(p1, s1, n, bits, bucket, backend="torch")
        d2 = kernels.unpack_dequantize(p1, s1, n, bits, bucket, backend="triton")
        assert torch.equal(d1, d2)
        # every value lands on one of the two levels around it
        step = s1[:, 1].repeat_interleave(bucket)[:n]
        assert torch.all((d1 - x).abs() <= step * (1.0 if stochastic else 0.5) + 1e-5)
    k = max(1, n // 7)
    assert torch.equal(kernels.topk_indices(x, k, backend="torch"), kernels.topk_indices(x, k, backend="triton"))


def test_pack_roundtrip_all_codes():
    for bits in range(1, 9):
        codes = torch.randint(0, 2 ** bits, (203,), generator=torch.Generator().manual_seed(bits))
        packed = reference.pack_codes(codes, bits)
        assert packed.numel() == bits * 26
        assert torch.equal(reference.unpack_codes(packed, 203, bits), codes)


def test_stochastic_rounding_is_unbiased():
    # fixed seeds; x [64] repeated 4000 times, one bucket per copy (same scales): the mean of the
    # draws lies within 4 standard errors of x for every element (torch RNG)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, generator=g, dtype=torch.float64).float() * 2 - 1
    step = float(x.max() - x.min()) / 3
    reps = 4000
    xs = x.repeat(reps)
    draws = kernels.unpack_dequantize(*kernels.quantize_pack(xs, 2, 64, generator=g), xs.numel(), 2, 64)
    draws = draws.view(reps, 64).double()
    assert (draws.mean(0) - x.double()).abs().max() < 4 * 0.5 * step / reps ** 0.5  # noise sd <= step/2
    assert draws.std(0).max() > 0.1 * step       # it is random (nearest rounding is biased)
    # Triton's own RNG (tl.rand): 16 buckets of 2048; the mean error over all 32768 elements is
    # within 4 standard errors of 0 (floor or nearest rounding would be off by ~step/4 or more)
    y = torch.rand(2048, generator=g) * 2 - 1
    ys = y.repeat(16)
    out = kernels.unpack_dequantize(*kernels.quantize_pack(ys, 2, 2048, seed=3, backend="triton"),
                                    ys.numel(), 2, 2048, backend="triton")
    step_y = float(y.max() - y.min()) / 3
    err = (out - ys).double()
    assert abs(float(err.mean())) < 4 * 0.5 * step_y / ys.numel() ** 0.5
    assert float((out.view(16, 2048).std(0) > 0).double().mean()) > 0.5


def test_topk_ties_and_values():
    x = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 3.0, 0.0, -1.0])
    for backend in ("torch", "triton"):
        assert kernels.topk_indices(x, 3, backend=backend).tolist() == [1, 2, 5]   # |1| ties: lowest index
        assert kernels.topk_indices(x, 5, backend=backend).tolist() == [1, 2, 3, 4, 5]
        assert kernels.topk_indices(x, 8, backend=backend).tolist() == list(range(8))


def test_bad_input():
    x = torch.randn(16)
    with pytest.raises(ValueError, match="bits=9"):
        kernels.quantize_pack(x, 9, 16)
    with pytest.raises(ValueError, match="bucket_size=12"):
        kernels.quantize_pack(x, 4, 12)
    with pytest.raises(ValueError, match="k=17"):
        kernels.topk_indices(x, 17)
    with pytest.raises(ValueError, match="backend="):
        kernels.topk_indices(x, 2, backend="cuda")
    with pytest.raises(ValueError, match="1-D"):
        kernels.topk_indices(x.view(4, 4), 2)
    with pytest.raises(ValueError, match="packed has"):
        kernels.unpack_dequantize(torch.zeros(3, dtype=torch.uint8), torch.zeros(1, 2), 16, 4, 16)
