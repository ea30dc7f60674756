"""Compressors, error control and state, on one process (fp64 references)."""

import math

import pytest
import torch

from heddle.compress import (EF21, EControl, ErrorFeedback, GradientCompression, Identity, LGreCo, PowerSGD,
                             Quantize, RandomK, TopK)
from heddle.compress.compressors import num_kept

SHAPES = [(7,), (32, 16), (8, 4, 4), (100,), (1,)]
ALL = [Identity(), TopK(0.1), RandomK(0.2), Quantize(3, 16), Quantize(8, 64, stochastic=False), PowerSGD(2)]


def test_bits_per_element_equals_encoded_payload():
    for comp in ALL:
        for shape in SHAPES:
            x = torch.randn(shape)
            n = x.numel()
            if isinstance(comp, PowerSGD):
                if not comp.compresses(shape):
                    assert comp.bits_per_element(shape) == 32.0
                    continue
                rows, cols = shape[0], n // shape[0]
                assert comp.bits_per_element(shape) == 32.0 * 2 * (rows + cols) / n
                continue
            payload = comp.encode(x.flatten(), comp.default_param, seed=1, shared_seed=2)
            assert payload.numel() * payload.element_size() * 8 == pytest.approx(comp.bits_per_element(shape) * n)
    # the notes' closed forms
    assert TopK(0.01).bits_per_element((10000,)) == 64 * 0.01
    assert Quantize(4, 512).bits_per_element((1024,)) == 4 + 64 / 512
    assert RandomK(0.01).bits_per_element((10000,)) == 32 * 0.01


def test_decode_properties():
    torch.manual_seed(0)
    x = torch.randn(200)
    top = TopK(0.05)
    d = top.decode(top.encode(x, 0.05, seed=0, shared_seed=0), 200, 0.05, shared_seed=0)
    keep = torch.topk(x.abs(), 10).indices
    assert torch.equal(d[keep], x[keep]) and int((d != 0).sum()) == 10
    assert top.expected_error(x, 0.05) == pytest.approx(float((x - d).double().pow(2).sum()))
    rk = RandomK(0.1)
    d = rk.decode(rk.encode(x, 0.1, seed=0, shared_seed=5), 200, 0.1, shared_seed=5)
    nz = d != 0
    assert int(nz.sum()) == 20 and torch.equal(d[nz], x[nz])
    # RandomK decode is linear: decode(a + b) = decode(a) + decode(b) (why it all-reduces)
    y = torch.randn(200)
    s = rk.encode(x, 0.1, seed=0, shared_seed=5) + rk.encode(y, 0.1, seed=0, shared_seed=5)
    assert torch.allclose(rk.decode(s, 200, 0.1, shared_seed=5), (x + y) * nz)
    # Quantize: expected error of stochastic rounding vs the mean over draws
    q = Quantize(2, 32)
    errs = [float((q.decode(q.encode(x, 2, seed=s, shared_seed=0), 200, 2, shared_seed=0) - x).double().pow(2).sum())
            for s in range(400)]
    assert sum(errs) / len(errs) == pytest.approx(q.expected_error(x, 2), rel=0.05)


def test_powersgd_exact_on_low_rank_and_svd_tail():
    from heddle.compress.exchange import Item
    g = torch.Generator().manual_seed(0)
    m = (torch.randn(20, 2, generator=g) @ torch.randn(2, 12, generator=g)).double().float()
    comp = PowerSGD(2)
    it = Item("w", m, 2, {}, 0, 1)
    comp.exchange([it])
    assert torch.allclose(it.local, m, atol=1e-5) and torch.allclose(it.total, m, atol=1e-5)
    full = torch.randn(20, 12, generator=g)
    it2 = Item("w", full, 2, {}, 0, 1)
    comp.exchange([it2])
    achieved = float((full - it2.local).double().pow(2).sum())
    assert comp.expected_error(full, 2) <= achieved + 1e-6   # SVD tail: the best rank-2 error
    assert comp.expected_error(full, 12) == 0.0              # r (n + m) >= n m: sent uncompressed


def _run(comp, grads_per_step):
    outs = []
    for gs in grads_per_step:
        gs = [g.clone() for g in gs]
        comp.all_reduce(gs)
        outs.append([g.clone() for g in gs])
    return outs


def test_feedback_equations_hand_checked():
    g0, g1, g2 = torch.tensor([3., 1., -2., .5]), torch.ones(4), torch.zeros(4)
    steps = [[g0], [g1], [g2]]
    ef = GradientCompression(TopK(0.25), feedback=ErrorFeedback(), start_iter=0)
    outs = _run(ef, steps[:2])
    assert outs[0][0].tolist() == [3, 0, 0, 0]                 # C(g0), e = [0, 1, -2, .5]
    assert outs[1][0].tolist() == [0, 2, 0, 0]                 # v = g1 + e = [1, 2, -1, 1.5]
    assert ef.state["grad0"]["e"].tolist() == [1, 0, -1, 1.5]
    ef21 = GradientCompression(TopK(0.25), feedback=EF21(), start_iter=0)
    outs = _run(ef21, steps[:2])
    assert outs[0][0].tolist() == g0.tolist()                  # first message uncompressed, h = g0
    assert outs[1][0].tolist() == [3, 1, 1, .5]                # v = g1 - h = [-2, 0, 3, .5] -> C = [0, 0, 3, 0]
    assert ef21.state["grad0"]["h"].tolist() == [3, 1, 1, .5]
    ec = GradientCompression(TopK(0.25), feedback=EControl(eta=0.5), start_iter=0)
    outs = _run(ec, steps)
    assert outs[1][0].tolist() == [3, 1, 1, .5]
    # step 2: e = [-2, 0, 0, .5], h = [3, 1, 1, .5]; v = .5 e + g2 - h = [-4, -1, -1, -.25] -> C = [-4, 0, 0, 0]
    assert ec.state["grad0"]["e"].tolist() == [-1, -1, -1, 0]  # e + g2 - h - C
    assert ec.state["grad0"]["h"].tolist() == [-1, 1, 1, .5]
    assert outs[2][0].tolist() == [-1, 1, 1, .5]
    # eta = 0 with the same first message is EF21
    a = _run(GradientCompression(TopK(0.25), feedback=EControl(eta=0.0), start_iter=0), steps)
    b = _run(GradientCompression(TopK(0.25), feedback=EF21(), start_iter=0), steps)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_warmup_mean_and_reduction_options():
    g = [torch.randn(6, 5), torch.randn(5)]
    comp = GradientCompression(TopK(0.01), start_iter=2)
    out = _run(comp, [g, g])
    assert all(torch.equal(a, b) for a, b in zip(out[1], g))   # warm-up: exact (world 1)
    assert comp.stats["bits_per_element"] == 32.0 and comp.stats["compressed"] == 0.0
    _run(comp, [g])
    assert comp.stats["bits_per_element"] == pytest.approx(64 * (1 + 1) / 35)


def _steps(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(24, 16, generator=g) * (1 + i % 3), torch.randn(16, 8, generator=g),
             torch.randn(16, generator=g)] for i in range(n)]


@pytest.mark.parametrize("make", [
    lambda: GradientCompression(Quantize(3, 32), feedback=EControl(0.1), start_iter=1),
    lambda: GradientCompression(PowerSGD(2), feedback=ErrorFeedback(), start_iter=2,
                                adaptive=LGreCo(retune_every=3, sample_steps=2)),
    lambda: GradientCompression(RandomK(0.2), feedback=EF21(), start_iter=1,
                                adaptive=LGreCo(retune_every=4, sample_steps=2))])
def test_state_round_trip(make):
    data = _steps(10)
    a = make()
    _run(a, data[:5])
    sd = a.state_dict()
    rest = _run(a, data[5:])
    b = make()
    b.load_state_dict(sd)
    again = _run(b, data[5:])
    assert all(torch.equal(x, y) for s1, s2 in zip(rest, again) for x, y in zip(s1, s2))
    assert a.choices == b.choices and a.step == b.step


def test_lgreco_in_the_loop_cuts_bytes_at_equal_error():
    # layers of very different spectra: a fixed rank wastes bytes on the near-low-rank ones
    g = torch.Generator().manual_seed(1)
    def grads():
        low = torch.randn(64, 1, generator=g) @ torch.randn(1, 48, generator=g) + 0.01 * torch.randn(64, 48, generator=g)
        return [low, torch.randn(64, 48, generator=g), torch.randn(48, 32, generator=g)]
    data = [grads() for _ in range(6)]
    uni = GradientCompression(PowerSGD(4), start_iter=3)
    ada = GradientCompression(PowerSGD(4), start_iter=3, adaptive=LGreCo(sample_steps=3))
    _run(uni, data)
    _run(ada, data)
    assert len(set(ada.choices.values())) > 1
    assert ada.choices["grad0"] < 4
    shapes = ada.shapes
    size = lambda c: sum(PowerSGD(4).bits_per_element(shapes[k], c.param_for(k)) * math.prod(shapes[k]) for k in shapes)
    assert size(ada) < size(uni)


def test_bad_arguments():
    with pytest.raises(ValueError, match="density=0"):
        TopK(0)
    with pytest.raises(ValueError, match="density=1.5"):
        RandomK(1.5)
    with pytest.raises(ValueError, match="bits=0"):
        Quantize(0)
    with pytest.raises(ValueError, match="rank=0"):
        PowerSGD(0)
    with pytest.raises(ValueError, match="eta=-1"):
        EControl(-1)
    with pytest.raises(ValueError, match="reduction='avg'"):
        GradientCompression(TopK(), reduction="avg")
    with pytest.raises(ValueError, match="start_iter=-1"):
        GradientCompression(TopK(), start_iter=-1)
    with pytest.raises(TypeError, match="compressor="):
        GradientCompression("topk")
    with pytest.raises(ValueError, match="error_budget=0"):
        LGreCo(error_budget=0)
    with pytest.raises(ValueError, match="density=2"):
        GradientCompression(TopK(), adaptive=LGreCo(candidates=[0.1, 2]))
    with pytest.raises(ValueError, match="reduce_scatter does not support PowerSGD"):
        GradientCompression(PowerSGD(2)).reduce_scatter(torch.randn(10))
    with pytest.raises(ValueError, match="names has 1"):
        GradientCompression(TopK()).all_reduce([torch.randn(3), torch.randn(3)], names=["a"])
    assert num_kept(1000, 0.0001) == 1
