"""The cross-node benchmark set (benchmarks/cluster.py) at a tiny size on a 2 x 1 emulated cluster:
every part runs and its results check out (speed goals stay in the benchmark). Needs root and
iproute2 like tests/cluster: without them it FAILS with the reason, never skips."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

from heddle.cluster import ClusterUnavailable, check_prerequisites

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("cluster_bench", os.path.join(ROOT, "benchmarks", "cluster.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cross_node_benchmark_parts_run_tiny_on_2x1(tmp_path):
    try:
        check_prerequisites()
    except ClusterUnavailable as e:
        pytest.fail(f"the cluster benchmark needs root and iproute2: {e}")
    bench = _bench()
    out = tmp_path / "rows.json"
    rc = bench.main(["--rates", "200mbit", "--parts", "link,hook,compression,fsdp,moe,ulysses,adaptive", "--tiny",
                     "--steps", "8", "--seeds", "2", "--json", str(out), "--out", str(tmp_path / "parquet"),
                     "--timeout", "600"])
    assert rc == 0
    import json
    rows = json.loads(out.read_text())
    parts = {r["part"] for r in rows}
    assert parts == {"link", "hook", "compression", "fsdp", "moe", "ulysses", "adaptive"}, parts
    hook = {r["config"]: r for r in rows if r["part"] == "hook"}
    assert set(hook) == {name for name, _, _ in bench.HOOK_CASES} and hook["ddp fp32"]["vs_ddp"] == 1.0
    assert all(r["backward_sync_s"] > 0 for r in hook.values())
    for r in rows:
        assert r["link_rate"] == "200mbit" and r["nodes"] == 2 and r["measured"] is True
        assert "error" not in r, r
    link = next(r for r in rows if r["part"] == "link")
    assert 0 < link["busbw_gbit"] <= 0.2 * 1.1      # tbf holds the rate
    comp = {r["config"]: r for r in rows if r["part"] == "compression" and "steps_per_s" in r}
    assert set(comp) == set(bench.DDP_CONFIGS)
    for name, r in comp.items():
        assert math.isfinite(r["val_loss"]) and r["steps_per_s"] > 0
        if name != "fp32":   # compressed steps send fewer bytes than fp32's
            assert r["bytes_sent_per_step"] < comp["fp32"]["bytes_sent_per_step"], name
    for part in ("compression", "moe"):   # what crossed the link is what the ledger counted (+ headers)
        check = next(r for r in rows if r["part"] == part and r["config"] == "bytes: link vs ledger")
        assert 1.0 <= check["wire_over_ledger"] <= 1.3, check
    fsdp = {r["config"]: r for r in rows if r["part"] == "fsdp" and "steps_per_s" in r}
    assert set(fsdp) == set(bench.FSDP_CONFIGS) and all(math.isfinite(r["val_loss"]) for r in fsdp.values())
    assert {r["config"] for r in rows if r["part"] == "moe" and "median_s" in r} >= {"ep", "fssdp"}
    assert any(r["config"].startswith("heddle") for r in rows if r["part"] == "ulysses")
    assert list((tmp_path / "parquet").rglob("*.parquet"))
