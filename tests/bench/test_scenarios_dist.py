"""Multi-process runs: the collectives sweep at tiny sizes verifies every result (and its check
catches a broken collective), the training scenario's ledger bytes and breakdown, the CLI paths."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from heddle.bench import registry, results
from heddle.bench.bandwidth import bus_factor
from heddle.bench.runner import add_common_options
from tests.conftest import run_distributed


def _options(scenario, argv):
    parser = argparse.ArgumentParser()
    add_common_options(parser)
    scenario.add_options(parser)
    return parser.parse_args(argv)


def _collectives(rank, world_size):
    import heddle.dist as hd
    from heddle.bench.scenario import BenchContext
    from heddle.bench.scenarios import collectives

    scenario = registry.get("collectives")
    ctx = BenchContext(rank, world_size)
    rows = scenario.run(ctx, _options(scenario, ["--min-bytes", "100", "--max-bytes", "3000", "--factor", "25",
                                                 "--warmup", "1", "--trials", "2"]))
    # The check must be able to fail: a "collective" that does nothing is caught.
    broken = {}
    ops = collectives.available_ops()
    opts = _options(scenario, [])
    for name in ("all_reduce", "all_to_all_uneven", "broadcast", "compressed_all_reduce"):
        if name not in ops:  # heddle.compress not installed
            continue
        case = ops[name][0](ctx, 256, collectives.DTYPES["float32"], opts)
        real = (hd.all_reduce, hd.all_to_all_single, hd.broadcast, hd.all_gather_into_tensor)
        hd.all_reduce = hd.all_to_all_single = hd.broadcast = lambda *a, **k: _no_op_work(k)
        # peers' payloads never arrive
        hd.all_gather_into_tensor = lambda out, inp, **k: (out.zero_(), _no_op_work(k))[1]
        try:
            broken[name] = case.check()
        finally:
            hd.all_reduce, hd.all_to_all_single, hd.broadcast, hd.all_gather_into_tensor = real
    return rows, broken


class _DoneWork:
    """What a broken collective returns for async_op=True: already complete, nothing moved."""

    def wait(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_result(None)
        return future


def _no_op_work(kwargs: dict):
    return _DoneWork() if kwargs.get("async_op") else None


@pytest.mark.parametrize("world_size", [2, 3])
def test_collectives_sweep_verifies_every_result(world_size):
    per_rank = run_distributed(_collectives, world_size)
    rows, broken = per_rank[0]
    ops = {r["op"] for r in rows}
    assert {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven", "broadcast"} <= ops
    assert len(rows) == len(ops) * 2  # sizes 100, 2500
    for r in rows:
        assert r["wrong"] == 0, r
        assert r["time_us"] > 0 and r["trials"] == 2
        if r["bus_from"] == "nccl-tests":
            bus_op = {"all_to_all_uneven": "all_to_all"}.get(r["op"], r["op"])
            assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * bus_factor(bus_op, world_size))
            # the ledger's priced bytes agree with nccl-tests' factor;
            # broadcast: every rank but the root receives S, while its bus factor is 1 (pipelined)
            factor = (world_size - 1) / world_size if r["op"] == "broadcast" else r["bus_factor"]
            if r["op"] != "all_to_all_uneven":  # uneven: the chunk a rank keeps differs by rank
                assert r["ledger_recv_bytes_mean"] == pytest.approx(r["size_bytes"] * factor, rel=0.02)
            assert 0 < r["ledger_recv_bytes_mean"] <= r["size_bytes"] * 2
        else:  # heddle's sparse collectives: bytes from the ledger, less than the dense op moves
            assert 0 < r["bus_factor"] < bus_factor("all_gather", world_size)
            dense = next(d for d in rows if d["op"] == r["dense_op"] and d["target_bytes"] == r["target_bytes"])
            assert r["speedup_vs_dense"] == pytest.approx(dense["time_us"] / r["time_us"])
    # every rank reports the same (max-over-ranks) times
    assert [r["time_us"] for r in rows] == [r["time_us"] for r in per_rank[-1][0]]
    for name in broken:  # summed over ranks (a no-op broadcast is right on the root)
        assert sum(rank_result[1][name] for rank_result in per_rank) > 0, name


def _training(rank, world_size):
    from heddle.bench.scenario import BenchContext

    scenario = registry.get("training")
    opts = _options(scenario, ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
                               "--batch-size", "4", "--warmup", "1", "--trials", "2", "--replays", "1",
                               "--config", '{"label": "ddp"}',
                               "--config", '{"label": "clip", "max_grad_norm": 1.0, "grad_accum_steps": 2}'])
    return scenario.run(BenchContext(rank, world_size), opts)


def test_training_rows_and_ledger_bytes():
    rows = run_distributed(_training, 2)[0]
    ddp, clip = rows
    assert ddp["config"] == "ddp" and clip["config"] == "clip"
    assert ddp["tokens_per_step"] == 4 * 16 and clip["tokens_per_step"] == 2 * 4 * 16
    assert ddp["tokens_per_s_per_device"] == pytest.approx(64 / ddp["step_time_s"] / 2)
    assert ddp["vs_first"] == 1.0
    assert clip["vs_first"] == pytest.approx(clip["tokens_per_s_per_device"] / ddp["tokens_per_s_per_device"])
    # DDP at n=2 sends (n-1)/n * 2 = 1x the fp32 gradient bytes, plus the Trainer's [loss, tokens]
    # fp64 all-reduce (16 B); clipping adds the sharded norm (8 B) to that same all-reduce.
    assert ddp["comm_mb_per_step"] * 1e6 == pytest.approx(ddp["params"] * 4 + 16)
    assert clip["comm_mb_per_step"] * 1e6 == pytest.approx(clip["params"] * 4 + 16 + 8)
    for r in rows:
        assert r["comm_replayed_calls"] >= 2 and r["comm_s"] > 0
        assert r["compute_s"] == pytest.approx(max(0.0, r["step_time_s"] - r["comm_s"] - r["checkpoint_stall_s"]))
        assert r["peak_memory_mb"] > 10 and r["mfu"] is None and "peak-tflops" in r["peak_source"]
        assert r["flops_per_token"] > 6 * (r["params"] - 256 * 32)
        assert json.loads(r["comm_ops_json"])["all_reduce"]["calls"] >= 2


def test_registry_and_bad_options(tmp_path):
    found, broken = registry.discover()
    assert {"collectives", "training"} <= set(found)
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        registry.get("nope")
    from heddle.bench.scenarios.training import split_config

    with pytest.raises(ValueError, match=r"unknown TrainerConfig field\(s\) \['bogus'\]"):
        split_config({"bogus": 1})
    assert split_config({"label": "x", "model": {"d_model": 64}, "max_grad_norm": 1.0}) == (
        "x", {"d_model": 64}, {"max_grad_norm": 1.0})
    coll = found["collectives"]
    with pytest.raises(ValueError, match="--ops='gossip'"):
        coll.selected_ops(_options(coll, ["--ops", "gossip"]))


def test_cli_single_process_in_place(tmp_path, monkeypatch):
    from heddle.bench.cli import main

    monkeypatch.setenv("LOCAL_RANK", "0")  # init_distributed exports it; restored after the test

    out = tmp_path / "res"
    assert main(["collectives", "--ops", "all_reduce,broadcast", "--max-bytes", "2K", "--factor", "2",
                 "--trials", "2", "--out", str(out), "--quiet"]) == 0
    rows = results.read_rows(out)
    assert len(rows) == 4 and {r["world_size"] for r in rows} == {1}
    assert all(r["wrong"] == 0 for r in rows) and rows[0]["launcher"] == "single"
    assert rows[0]["command"].startswith("heddle bench collectives")
    assert json.loads(rows[0]["config_json"])["trials"] == 2
    assert results.read_rows(out, telemetry=True)[0]["rank"] == 0


def test_cli_two_processes_through_the_launcher(tmp_path):
    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "heddle.bench.cli", "collectives", "--nproc", "2",
                           "--ops", "all_reduce,all_to_all_uneven,sparse_all_gather", "--min-bytes", "512",
                           "--max-bytes", "512", "--trials", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = results.read_rows(out)
    assert {r["op"] for r in rows} >= {"all_reduce", "all_to_all_uneven"}
    assert all(r["wrong"] == 0 and r["world_size"] == 2 and r["launcher"] == "torchrun" for r in rows)
    assert rows[0]["tele_rss_mb_max"] > 10 and "telemetry_samples" not in rows[0]
    samples = results.read_rows(out, telemetry=True)
    assert {s["rank"] for s in samples} == {0, 1}


def test_quick_reports_timeouts_and_fails(tmp_path, capsys):
    from heddle.bench.quick import main as quick_main

    code = quick_main(["--only", "collectives", "--scenario-timeout", "0.5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1 and "timed out after 0 s" in out and "collectives" in out
    with pytest.raises(SystemExit):
        quick_main(["--only", "nope"])


def test_registry_accepts_file_names():
    assert registry.get("training").name == "training"
    found, _ = registry.discover()
    for name, scenario in found.items():
        assert registry.get(type(scenario).__module__.rsplit(".", 1)[-1]) is scenario


def test_runs_inside_mpiexec_without_a_second_launch(tmp_path):
    import shutil as _shutil

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = _shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not installed (pip install mpich mpi4py)")
    out = tmp_path / "res"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "heddle.bench.cli", "collectives",
                           "--ops", "all_reduce,broadcast", "--min-bytes", "256", "--max-bytes", "256",
                           "--trials", "2", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = results.read_rows(out)
    assert len(rows) == 2 and all(r["launcher"] == "mpi" and r["world_size"] == 2 and r["wrong"] == 0 for r in rows)
