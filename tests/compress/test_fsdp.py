"""Compression inside FSDP2 (fp64, gloo): Identity equals plain FSDP2 bit for bit, compressed
reduce-scatters train with per-rank, per-row error feedback, a NaN step is discarded, and the
quantized parameter all-gather stays inside its stated error bound."""

import numpy as np
import pytest
import torch

from tests.conftest import run_distributed


def _model(world):
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    # dims not divisible by 2 or 3: FSDP2 pads the dim-0 shards
    model = nn.Sequential(nn.Linear(10, 13), nn.Tanh(), nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 2)).double()
    mesh = init_device_mesh("cpu", (world,))
    for block in (model[0], model[2]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(rank, world, comp=None, steps=5, poison_step=None, all_gather_bits=None, seen=None):
    model = _model(world)
    if comp is not None:
        comp.attach_fsdp(model, all_gather_bits=all_gather_bits)
    if seen is not None:
        model[2].register_forward_pre_hook(lambda m, a: seen.append(torch.cat([m.weight.detach().flatten(), m.bias.detach()])))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, info = [], {}
    step = 0
    while step < steps:
        g = torch.Generator().manual_seed(100 * step + rank)   # ranks see different data
        x = torch.randn(6, 10, generator=g, dtype=torch.float64)
        loss = model(x).pow(2).mean()
        poisoned = poison_step == step and "done" not in info
        if poisoned:
            info["before"] = {k: {n: t.clone() for n, t in st.items()} for k, st in comp.state.items()}
            if rank == 0:
                loss = loss * float("nan")
        loss.backward()
        if poisoned:
            info["done"], info["flag"] = True, comp.saw_nonfinite
            opt.zero_grad()
            comp.discard_step()
            info["same"] = (info["before"].keys() == comp.state.keys() and all(
                torch.equal(info["before"][k][n], comp.state[k][n]) for k in comp.state for n in comp.state[k]))
            continue
        opt.step()
        opt.zero_grad()
        if comp is not None:
            comp.commit_step()
        losses.append(float(loss))
        step += 1
    params = torch.cat([p.full_tensor().flatten() for p in model.parameters()])
    return params, losses, info


def _fsdp_worker(rank, world):
    from heddle.compress import EControl, ErrorFeedback, GradientCompression, Identity, Quantize, TopK
    out = {}
    out["plain"], out["plain_losses"], _ = _train(rank, world)
    out["identity"], _, _ = _train(rank, world, GradientCompression(Identity(), start_iter=0))
    comps = {"topk-ef": GradientCompression(TopK(0.3), feedback=ErrorFeedback(), start_iter=1),
             "quantize-econtrol": GradientCompression(Quantize(4, 16), feedback=EControl(0.1), start_iter=1)}
    for key, comp in comps.items():
        params, losses, _ = _train(rank, world, comp, steps=6)
        out[key] = {"params": params, "losses": losses, "bpe": comp.stats["bits_per_element"],
                    "keys": sorted(k for k in comp.state if "e" in comp.state[k])}
    if world == 2:   # NaN on rank 0 in a compressed step: discarded, the run goes on as if clean
        clean, _, _ = _train(rank, world, GradientCompression(TopK(0.3), feedback=EControl(0.1), start_iter=1))
        got, _, info = _train(rank, world, GradientCompression(TopK(0.3), feedback=EControl(0.1), start_iter=1),
                              poison_step=2)
        out["nan"] = {"equal": bool(torch.equal(clean, got)), "finite": bool(torch.isfinite(got).all()),
                      "flag": info["flag"], "same": info["same"]}
        seen, exact = [], []
        _train(rank, world, steps=1, seen=exact)
        qparams, qlosses, _ = _train(rank, world, GradientCompression(Identity(), start_iter=0), steps=5,
                                     all_gather_bits=8, seen=seen)
        out["qag"] = {"seen": seen[0], "exact": exact[0], "losses": qlosses}
    out["qag_unit"] = _all_gather_unit(rank, world)
    return out


def _all_gather_unit(rank, world):
    import heddle.dist as hd
    from heddle.compress.fsdp import QuantizedAllGather
    g = torch.Generator().manual_seed(rank)
    shard = torch.randn(100, generator=g, dtype=torch.float64) * (rank + 1)
    exact = torch.empty(world * 100, dtype=torch.float64)
    hd.all_gather_into_tensor(exact, shard)
    res = {}
    for bits in (2, 4, 8):
        qag = QuantizedAllGather(bits, 16)
        out = torch.empty(world * 100, dtype=torch.float64)
        with hd.CommLedger() as ledger:
            qag(out, shard, None)
        bounds = torch.cat([qag.error_bound(row) for row in exact.view(world, 100)]).double()
        res[bits] = {"err": (out - exact).abs(), "bound": bounds, "sent": ledger.bytes_sent()}
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_compressed_reduce_scatter_and_quantized_all_gather(world):
    res = run_distributed(_fsdp_worker, world, timeout=300)
    r0 = res[0]
    assert np.array_equal(r0["identity"], r0["plain"])            # bit for bit with plain FSDP2
    for key in ("topk-ef", "quantize-econtrol"):
        for r in res:
            assert np.array_equal(r[key]["params"], r0[key]["params"]), key   # one model everywhere
            # error feedback per rank, for every row it sends: keys <module>.<row> for all rows
            assert {k.rsplit(".", 1)[1] for k in r[key]["keys"]} == {str(j) for j in range(world)}, key
        losses = r0[key]["losses"]
        assert np.isfinite(losses).all() and losses[-1] < losses[0], key      # it trains
        assert r0[key]["bpe"] < 32, key
    for r in res:
        for bits, u in r["qag_unit"].items():   # |w^ - w| <= (max - min) / (2 (2^b - 1)) per bucket
            assert (u["err"] <= u["bound"] * (1 + 1e-6) + 1e-12).all(), bits
            assert u["sent"] == (world - 1) * (bits * 13 + 8 * 7), bits  # codes + scales
    if world == 2:
        for r in res:
            n = r["nan"]
            assert n["same"] and n["finite"] and n["equal"] and (n["flag"] or r is not res[0])
        q = r0["qag"]   # the unsharded weight FSDP2 ran with: within the bound of the exact one
        span = max(q["exact"].max(), 0) - min(q["exact"].min(), 0)
        err = np.abs(q["seen"] - q["exact"]).max()
        assert 0 < err <= span / (2 * 255) * (1 + 1e-6)
        assert np.isfinite(q["losses"]).all() and q["losses"][-1] < q["losses"][0]
