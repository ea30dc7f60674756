"""GradientCompression across gloo processes: DDP with many buckets, the all-reduce and
reduce-scatter paths, ledger bytes, replicas, EF21/EControl aggregates, L-GreCo broadcast."""

import numpy as np
import pytest
import torch

from tests.conftest import run_distributed

DDP_CONFIGS = [("identity", None), ("topk", "ef"), ("topk", "ef21"), ("topk", "econtrol"),
               ("randomk", "econtrol"), ("quantize", "ef"), ("quantize", "econtrol"), ("powersgd", "ef"),
               ("powersgd", "ef21"), ("topk", "lgreco"), ("quantize", "lgreco"), ("powersgd", "lgreco")]


def _make(name, fb, **kw):
    from heddle.compress import EF21, EControl, ErrorFeedback, GradientCompression, LGreCo
    from heddle.compress import Identity, PowerSGD, Quantize, RandomK, TopK
    comp = {"identity": Identity(), "topk": TopK(0.1), "randomk": RandomK(0.2), "quantize": Quantize(3, 16),
            "powersgd": PowerSGD(2)}[name]
    feedback = {None: None, "ef": ErrorFeedback(), "ef21": EF21(), "econtrol": EControl(0.1),
                "lgreco": EControl(0.1)}[fb]
    adaptive = LGreCo(retune_every=3, sample_steps=2) if fb == "lgreco" else None
    return GradientCompression(comp, feedback=feedback, adaptive=adaptive, **kw)


def _model():
    import torch.nn as nn
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(24, 24), nn.Tanh()) for _ in range(6)], nn.Linear(24, 3))


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for name, fb in DDP_CONFIGS:
        model = _model()
        ddp = DDP(model, bucket_cap_mb=0.001)   # 1 KB: each weight its own bucket after the rebuild
        comp = _make(name, fb, start_iter=2, reduction="sum").bind(model)
        calls = []
        inner = comp.hook
        def counting(state, bucket, inner=inner):
            calls.append(comp.step)
            return inner(state, bucket)
        ddp.register_comm_hook(comp, counting)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        grads = []
        for step in range(7):
            g = torch.Generator().manual_seed(1000 * step + rank)   # ranks see different data
            x = torch.randn(5, 24, generator=g)
            ddp(x).pow(2).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        buckets_last = sum(1 for c in calls if c == 6)
        h_sum = None
        if "h" in next(iter(comp.state.values()), {}):
            h_sum = {k: st["h"] for k, st in comp.state.items()}
            h_agg = {k: st["H"] for k, st in comp.state.items()}
        out[f"{name}-{fb}"] = {"params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                               "buckets": buckets_last, "grads": torch.stack(grads),
                               "h": h_sum, "H": h_agg if h_sum else None, "choices": sorted(comp.choices.items()),
                               "bpe": comp.stats["bits_per_element"]}
    # plain DDP with the Trainer's sum hook: the Identity compressor must match it bit for bit
    from heddle.trainer import _sum_hook
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.001)
    ddp.register_comm_hook(None, _sum_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(7):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ddp(torch.randn(5, 24, generator=g)).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    out["plain"] = {"grads": torch.stack(grads)}
    return {"ddp": out, "paths": _paths_worker(rank, world),
            "trainer": _trainer_worker(rank, world) if world == 2 else None}


def _trainer_worker(rank, world):
    """The Trainer's compression section: identity == plain DDP bit for bit (sum contract), and a
    compressed run whose plugin state resumes into identical steps."""
    import torch.nn.functional as F

    import heddle
    from heddle.models import GPT, GPTConfig

    def run(section, steps, state=None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = heddle.Trainer(model, opt, config=heddle.TrainerConfig(
            progress=False, bucket_cap_mb=0.01, max_grad_norm=1.0, compression=section))
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            trainer.load_state_dict(state["trainer"])
        metrics = []
        for step in range(trainer.step_count, steps):
            g = torch.Generator().manual_seed(step * 10 + rank)
            x = torch.randint(0, 256, (2, 17), generator=g)
            loss = F.cross_entropy(trainer.model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            trainer.backward(loss, num_tokens=32)
            metrics.append(trainer.step())
        snap = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt": opt.state_dict(), "trainer": trainer.state_dict()}
        trainer.close()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), metrics, snap

    plain, _, _ = run(None, 4)
    ident, _, _ = run({"compressor": "identity", "feedback": "none", "start_iter": 0}, 4)
    section = {"compressor": "topk:0.05", "feedback": "econtrol", "start_iter": 2, "lgreco": True,
               "retune_every": 3, "sample_steps": 2}
    full, metrics, _ = run(section, 7)
    _, _, snap = run(section, 4)
    resumed, _, _ = run(section, 7, state=snap)
    return {"plain": plain, "identity": ident, "full": full, "resumed": resumed,
            "bpe": [m.get("compress_bits_per_element") for m in metrics],
            "losses": [m["loss"] for m in metrics]}


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_many_buckets_every_compressor_and_paths(world):
    both = run_distributed(_ddp_worker, world, timeout=300)
    _check_paths([r["paths"] for r in both], world)
    res = [r["ddp"] for r in both]
    for key, r0 in res[0].items():
        if key == "plain":
            continue
        assert r0["buckets"] >= 4, (key, r0["buckets"])
        for r in res[1:]:   # replicas stay bit-identical (params and synced grads)
            assert np.array_equal(r[key]["params"], r0["params"]), key
            assert np.array_equal(r[key]["grads"], r0["grads"]), key
            assert r[key]["choices"] == r0["choices"], key    # L-GreCo: rank 0's choice everywhere
        if r0["h"] is not None:   # EF21 / EControl: H = sum over ranks of h
            for k in r0["h"]:
                total = sum(np.asarray(r[key]["h"][k], dtype=np.float64) for r in res)
                np.testing.assert_allclose(r0["H"][k], total, rtol=1e-5, atol=1e-5, err_msg=key)
        if key.endswith("lgreco"):
            assert r0["choices"], key
        if not key.startswith("identity"):
            assert r0["bpe"] < 32, key
    assert np.array_equal(res[0]["identity-None"]["grads"], res[0]["plain"]["grads"])
    if world == 2:
        tr = [r["trainer"] for r in both]
        assert np.array_equal(tr[0]["identity"], tr[0]["plain"])        # sum contract, bit for bit
        assert np.array_equal(tr[0]["full"], tr[1]["full"])             # replicas
        assert np.array_equal(tr[0]["resumed"], tr[0]["full"])          # resume: identical steps
        assert tr[0]["bpe"][0] == 32.0 and tr[0]["bpe"][-1] < 32 / 5   # warm-up, then compressed


def _paths_worker(rank, world):
    import heddle.dist as hd
    from heddle.compress import GradientCompression, Identity, PowerSGD, Quantize, RandomK, TopK
    out = {}
    shapes = [(12, 10), (7,), (6, 2, 5), (33,)]
    g = torch.Generator().manual_seed(rank)
    grads = [torch.randn(s, generator=g) for s in shapes]
    # Identity all_reduce == plain all-reduce of the concatenation, bit for bit
    comp = GradientCompression(Identity(), reduction="sum", start_iter=0)
    mine = [t.clone() for t in grads]
    comp.all_reduce(mine)
    flat = torch.cat([t.flatten() for t in grads])
    hd.all_reduce(flat)
    out["identity_exact"] = bool(torch.equal(torch.cat([t.flatten() for t in mine]), flat))
    # ledger bytes equal the bits per element each compressor claims
    for name, c in [("topk", TopK(0.1)), ("quantize", Quantize(3, 16)), ("randomk", RandomK(0.2)),
                    ("powersgd", PowerSGD(2))]:
        comp = GradientCompression(c, start_iter=0)
        with hd.CommLedger() as ledger:
            comp.all_reduce([t.clone() for t in grads])
        claimed = sum(c.bits_per_element(s) * int(np.prod(s)) / 8 for s in shapes)
        out[name] = (ledger.summary(), claimed, comp.stats["payload_bytes"], comp.stats["bytes_sent"])
    # reduce-scatter: this rank's chunk of sum_r C(chunk), all-to-all bytes (P-1)/P-ish of a payload
    x = torch.randn(50, generator=g)
    rs = GradientCompression(TopK(0.2), start_iter=0, reduction="sum")
    with hd.CommLedger() as ledger:
        shard = rs.reduce_scatter(x.clone())
    everyone = torch.zeros(world * 50)
    hd.all_gather_into_tensor(everyone, x)
    out["rs"] = (shard, everyone.view(world, 50), ledger.summary())
    rsi = GradientCompression(Identity(), start_iter=0, reduction="mean")
    out["rs_identity"] = rsi.reduce_scatter(x.clone())
    return out


def test_all_reduce_and_reduce_scatter_paths_four_ranks():
    _check_paths(run_distributed(_paths_worker, 4, timeout=300), 4)


def _check_paths(res, world):
    from heddle.compress import TopK
    from heddle.compress.compressors import num_kept
    for rank, r in enumerate(res):
        assert r["identity_exact"]
        for name in ("topk", "quantize"):     # all-gathered: each rank sends its payload P-1 times
            summary, claimed, payload, sent = r[name]
            assert payload == pytest.approx(claimed)
            assert summary["all_gather"]["bytes_sent"] == (world - 1) * payload == sent
            assert set(summary) == {"all_gather"}
        summary, claimed, payload, sent = r["randomk"]   # values only, summed on the wire
        assert payload == pytest.approx(claimed) and set(summary) == {"all_reduce"}
        assert summary["all_reduce"]["bytes_sent"] == 2 * (world - 1) * payload // world
        summary, claimed, payload, sent = r["powersgd"]  # P and Q factors + uncompressed vectors
        assert payload == pytest.approx(claimed)
        assert summary["all_reduce"]["calls"] == 3
        shard, everyone, summary = r["rs"]
        sizes = [50 // world + (1 if j < 50 % world else 0) for j in range(world)]
        lo = sum(sizes[:rank])
        expected = np.zeros(sizes[rank])
        top = TopK(0.2)
        for row in everyone:
            chunk = torch.from_numpy(row[lo:lo + sizes[rank]].copy())
            expected += top.decode(top.encode(chunk, 0.2, seed=0, shared_seed=0), chunk.numel(), 0.2,
                                   shared_seed=0).double().numpy()
        np.testing.assert_allclose(shard, expected, rtol=1e-6, atol=1e-6)
        sent = sum(8 * num_kept(sizes[j], 0.2) for j in range(world) if j != rank)
        assert summary["all_to_all"]["bytes_sent"] == sent
        np.testing.assert_allclose(r["rs_identity"], r["rs"][1].mean(0)[lo:lo + sizes[rank]], rtol=1e-6)
