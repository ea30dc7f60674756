"""Sharded checkpoints: FSDP2 (DTensor Shard(0), uneven chunks) and HSDP (Replicate x Shard) state
saved at world 4 as each rank's own chunks, restored bit-exactly at world 2 and 3 (FSDP2) and at
world 1 into a plain model; replicated state is saved once."""

import json
import os

import numpy as np
import torch

from heddle.checkpoint import Checkpointer
from heddle.checkpoint.storage import rank_file, step_dir
from tests.conftest import run_distributed


def _model(seed: int, mesh=None):
    torch.manual_seed(seed)
    # 7 and 3 rows over 2, 3 and 4 ranks: uneven chunks, and empty ones at world 4
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy().copy()


def _values(model, opt):
    out = {f"p/{k}": _full(v) for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"o/{i}/{k}": _full(v) for k, v in st.items()})
    return out


def _train(model, opt, steps=2):
    torch.manual_seed(100 + torch.distributed.get_rank() if torch.distributed.is_initialized() else 100)
    for _ in range(steps):
        model(torch.randn(4, 5, dtype=torch.float64)).square().sum().backward()
        opt.step()
        opt.zero_grad()


def _save(rank, world, directory):
    from torch.distributed.device_mesh import init_device_mesh
    model = _model(0, init_device_mesh("cpu", (world,)))
    hsdp = _model(1, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")))
    opt = torch.optim.Adam(list(model.parameters()), lr=1e-2)
    hopt = torch.optim.Adam(list(hsdp.parameters()), lr=1e-2)
    _train(model, opt)
    _train(hsdp, hopt)
    meta = {"schedule": torch.arange(6, dtype=torch.float64), "epoch": 3}
    ck = Checkpointer(directory, levels=("disk",))
    state = {"model": model, "optimizer": opt, "hsdp": hsdp, "hopt": hopt, "meta": meta}
    ck.save(7, state, replicated=("meta",))
    ck.close()
    return {**_values(model, opt), **{f"h{k}": v for k, v in _values(hsdp, hopt).items()}}


def _load(rank, world, directory):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    model, hsdp = _model(5, mesh), _model(6, mesh)      # other values, other mesh; no optimizer state yet
    opt = torch.optim.Adam(list(model.parameters()), lr=1e-2)
    hopt = torch.optim.Adam(list(hsdp.parameters()), lr=1e-2)
    meta = {}
    ck = Checkpointer(directory, levels=("disk",))
    step = ck.restore({"model": model, "optimizer": opt, "hsdp": hsdp, "hopt": hopt, "meta": meta})
    got = {**_values(model, opt), **{f"h{k}": v for k, v in _values(hsdp, hopt).items()}}
    placements = {str(p.placements) for p in list(model.parameters()) + [
        v for st in opt.state_dict()["state"].values() for v in st.values() if hasattr(v, "placements")]}
    _train(model, opt, 1)           # the restored optimizer state steps on the new mesh
    ck.close()
    return {"step": step, "values": got, "meta_epoch": meta["epoch"], "schedule": meta["schedule"],
            "placements": sorted(placements), "source": ck.last_restore["source"]}


def test_sharded_save_at_4_restores_exactly_at_2_3_and_1(tmp_path):
    directory = str(tmp_path / "ck")
    saved = run_distributed(_save, 4, directory)[0]
    # every DTensor chunk and the replicated entry are stored once across the 4 ranks
    stored = {}
    for r in range(4):
        with open(os.path.join(step_dir(directory, 7), rank_file(r, "idx"))) as f:
            index = json.load(f)
        assert ("meta" in index["skeleton"]) == (r == 0), (r, sorted(index["skeleton"]))
        for e in index["entries"]:
            stored[e["path"]] = stored.get(e["path"], 0) + e["nbytes"]
    for key, value in saved.items():
        kind, rest = key.split("/", 1)
        prefix = {"p": "model/", "o": "optimizer/state/", "hp": "hsdp/", "ho": "hopt/state/"}[kind]
        if value.ndim > 0:    # Adam's step counter is a plain tensor, saved by every rank
            assert stored[prefix + rest] == value.nbytes, (key, stored[prefix + rest], value.nbytes)
    for world in (2, 3):
        for rank, r in enumerate(run_distributed(_load, world, directory)):
            assert r["step"] == 7 and r["source"] == "disk", r
            assert r["placements"] == ["(Shard(dim=0),)"], r["placements"]
            assert r["meta_epoch"] == 3 and np.array_equal(r["schedule"], np.arange(6.0))
            assert set(r["values"]) == set(saved)
            for key, value in saved.items():
                assert np.array_equal(r["values"][key], value), (world, rank, key)
    # world 1, no process group: a plain (unsharded) model gets the full tensors
    model, hsdp = _model(5), _model(6)
    opt, hopt = torch.optim.Adam(model.parameters()), torch.optim.Adam(hsdp.parameters())
    _train(model, opt, 1)
    _train(hsdp, hopt, 1)
    ck = Checkpointer(directory, levels=("disk",))
    assert ck.restore({"model": model, "optimizer": opt, "hsdp": hsdp, "hopt": hopt, "meta": {}}) == 7
    got = {**_values(model, opt), **{f"h{k}": v for k, v in _values(hsdp, hopt).items()}}
    for key, value in saved.items():
        assert np.array_equal(got[key], value), key
    ck.close()
