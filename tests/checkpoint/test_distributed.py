"""Multi-rank checks: peer and parity recovery after one rank loses its memory and its files,
and resume at a different world size (replicated state exact, per-rank state re-initialised)."""

import os
import shutil
import warnings

import torch

import heddle.dist as hd
from heddle.checkpoint import Checkpointer, CheckpointFallbackWarning, shutdown_keeper
from heddle.checkpoint.storage import rank_file, step_dir
from tests.conftest import run_distributed


def lose_node(ck, directory, rank, *, steps, stop_keeper=True) -> None:
    """What a lost node loses: its keeper (with the shared memory) and this rank's files of ``steps``."""
    if stop_keeper:
        shutdown_keeper(ck.shm_root)
    for step in steps:
        for suffix in ("bin", "idx"):
            os.unlink(os.path.join(step_dir(directory, step), rank_file(rank, suffix)))


def _state(rank, fill):
    """Replicated model + Adam state, and a per-rank tensor of a rank-dependent size."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).double()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    opt.step()
    own = hd.mark_sharded(torch.nn.Parameter(torch.full((100 + 37 * rank,), float(fill))))
    with torch.no_grad():
        if fill == 0:
            for p in model.parameters():
                p.zero_()
    return model, opt, own


def _redundancy_worker(rank, world, root, lost):
    out = {}
    for redundancy in ("peer", "parity"):
        directory = os.path.join(root, redundancy)
        opts = dict(levels=("memory", "disk"), redundancy=redundancy, ranks_per_node=1)
        ck = Checkpointer(directory, **opts)
        model, opt, own = _state(rank, fill=rank + 1)
        ref = [p.detach().clone() for p in model.parameters()]
        for step in (1, 2):
            ck.wait_for_snapshot()       # the contract: mutate only after the lazy copy
            with torch.no_grad():
                own.add_(10.0)
            ck.save(step, {"model": model, "optimizer": opt, "own": own})
        ck.wait()
        ck.close()
        if rank == lost:   # this node loses its memory (keeper and shared memory) and its files
            lose_node(ck, directory, rank, steps=(1, 2))
        torch.distributed.barrier()
        ck2 = Checkpointer(directory, **opts)
        model2, opt2, own2 = _state(rank, fill=0)
        step = ck2.restore({"model": model2, "optimizer": opt2, "own": own2})
        out[redundancy] = {"step": step, "source": ck2.last_restore["source"],
                           "model_ok": all(torch.equal(a, b) for a, b in zip(model2.parameters(), ref)),
                           "own_ok": torch.equal(own2.detach(), torch.full_like(own2, rank + 21.0)),
                           "adam_ok": torch.equal(opt2.state_dict()["state"][0]["exp_avg"],
                                                  opt.state_dict()["state"][0]["exp_avg"])}
        ck2.close(shutdown_keeper_process=True)
    return out


def test_peer_and_parity_recover_a_lost_rank(tmp_path):
    lost = 1
    results = run_distributed(_redundancy_worker, 3, str(tmp_path), lost)
    for rank, res in enumerate(results):
        for redundancy, r in res.items():
            assert r["step"] == 2, (rank, redundancy, r)
            assert r["source"] == (redundancy if rank == lost else "memory"), (rank, redundancy, r)
            assert r["model_ok"] and r["own_ok"] and r["adam_ok"], (rank, redundancy, r)


def _save_world(rank, world, directory):
    model, opt, own = _state(rank, fill=rank + 1)
    ck = Checkpointer(directory, levels=("disk",))
    comp = {"step": 5, "state": {"layer0": {"e": torch.full((3,), float(rank))}}}   # error buffers differ per rank
    ck.save(5, {"model": model, "optimizer": opt, "own": own, "rank_note": {"rank": rank}, "comp": comp})
    ck.close()


def _load_world(rank, world, directory):
    model, opt, own = _state(rank, fill=0)
    _, _, ref_own = _state(rank, fill=-7)
    model_ref, opt_ref, _ = _state(0, fill=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = Checkpointer(directory, levels=("disk",))
        note, comp = {}, {"step": 0, "state": {}}
        step = ck.restore({"model": model, "optimizer": opt, "own": own, "rank_note": note, "comp": comp})
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointFallbackWarning)]
    ck.close()
    return {"step": step, "model_ok": all(torch.equal(a, b) for a, b in zip(model.parameters(), model_ref.parameters())),
            "adam_ok": torch.equal(opt.state_dict()["state"][1]["exp_avg_sq"], opt_ref.state_dict()["state"][1]["exp_avg_sq"]),
            "own_kept_live": torch.equal(own.detach(), torch.zeros_like(own)),
            "note": note, "comp": comp, "warned": msgs}


def test_resume_at_another_world_size(tmp_path):
    directory = str(tmp_path / "ck")
    run_distributed(_save_world, 2, directory)
    for world in (1, 3):
        for rank, r in enumerate(run_distributed(_load_world, world, directory)):
            assert r["step"] == 5 and r["model_ok"] and r["adam_ok"], (world, rank, r)
            assert r["own_kept_live"], (world, rank, r)      # per-rank: re-initialised (live value kept)
            assert r["note"] == {}, r            # differed between the saving ranks: per-rank, re-initialised
            assert r["comp"] == {"step": 5, "state": {}}, r     # equal entries kept, per-rank buffers re-initialised
            warned = [m for m in r["warned"] if "world size 2" in m]
            assert len(warned) == 1 and all(p in warned[0] for p in ("own", "rank_note", "__rng__", "comp/state")), \
                r["warned"]
    shutil.rmtree(directory)
