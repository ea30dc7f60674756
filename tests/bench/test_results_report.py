"""Parquet schema round trip, dataset appends across runs, report generation from a small set."""

import json
import math

import pyarrow.parquet as pq
import pytest

from heddle.bench import report, results


def _rows():
    return [
        {"op": "all_reduce", "size_bytes": 1024, "time_us": 12.5, "wrong": 0, "ok": True, "note": None,
         "case": {"a": 1}, "mixed": 3},
        {"op": "all_gather", "size_bytes": 2048, "time_us": 20.0, "wrong": 0, "ok": False, "note": "x",
         "case": {"a": 2}, "mixed": 3.5},
    ]


def test_parquet_schema_round_trip(tmp_path):
    path = results.write_rows(tmp_path, "demo", _rows(), run_id="r1", stamp="20260101T000000")
    assert path == tmp_path / "demo" / "20260101T000000-r1.parquet"
    schema = pq.read_schema(path)
    types = {f.name: str(f.type) for f in schema}
    assert types == {"op": "string", "size_bytes": "int64", "time_us": "double", "wrong": "int64", "ok": "bool",
                     "note": "string", "case": "string", "mixed": "double"}
    back = results.read_rows(tmp_path)
    assert [r["op"] for r in back] == ["all_reduce", "all_gather"]
    assert back[0]["note"] is None and back[1]["note"] == "x"
    assert json.loads(back[1]["case"]) == {"a": 2}
    assert back[0]["mixed"] == 3.0 and back[1]["mixed"] == 3.5
    # a later run with other columns appends a file; reading unifies (missing -> null)
    results.write_rows(tmp_path, "demo", [{"op": "broadcast", "size_bytes": 4.5, "extra": "y"}], run_id="r2",
                       stamp="20260101T000001")
    both = results.read_rows(tmp_path)
    assert len(both) == 3 and both[2]["extra"] == "y" and both[0]["extra"] is None
    assert both[2]["size_bytes"] == 4.5 and both[0]["size_bytes"] == 1024
    # a column that changes type between runs reads back as text, nothing dropped
    results.write_rows(tmp_path, "demo", [{"op": 7}], run_id="r4", stamp="20260101T000002")
    assert [r["op"] for r in results.read_rows(tmp_path)] == ["all_reduce", "all_gather", "broadcast", "7"]
    with pytest.raises(ValueError, match="no rows"):
        results.write_rows(tmp_path, "demo", [], run_id="r3")
    with pytest.raises(ValueError, match="does not exist"):
        results.read_rows(tmp_path / "missing")


def test_environment_columns():
    env = results.environment(hosts=["a", "b", "a"], devices=["cpu: X"] * 3, backend="gloo", world_size=3,
                              launcher="torchrun")
    assert env["nnodes"] == 2 and env["hosts"] == "a,b" and env["world_size"] == 3
    for key in ("torch_version", "heddle_version", "python_version", "pyarrow_version", "git_commit", "platform"):
        assert key in env


def _write_small_set(root):
    common = {"world_size": 2, "nnodes": 1, "hosts": "h", "devices": "cpu", "backend": "gloo",
              "torch_version": "t", "heddle_version": "v", "git_commit": "abc"}
    old = [{**common, "run_id": "old", "timestamp": "20260101T000000", "scenario": "collectives", "op": "all_reduce",
            "size_bytes": 1024, "time_us": 99.0, "algbw_gbps": 0.01, "busbw_gbps": 0.01, "wrong": 0,
            "command": "heddle bench collectives"}]
    coll = [{**common, "run_id": "new", "timestamp": "20260102T000000", "scenario": "collectives", "op": op,
             "size_bytes": s, "count": s // 4, "dtype": "float32", "time_us": 10.0 + s / 100,
             "algbw_gbps": s / 1e4, "busbw_gbps": s / 2e4, "wrong": 0, "command": "heddle bench collectives",
             "tele_cpu_pct_mean": 55.0, "tele_rss_mb_max": 300.0}
            for op in ("all_reduce", "all_gather") for s in (1024, 4096)]
    train = [{**common, "run_id": "t1", "timestamp": "20260102T000000", "scenario": "training", "config": c,
              "tokens_per_s_per_device": tps, "step_time_s": 0.1, "compute_s": 0.08, "comm_s": 0.02,
              "comm_mb_per_step": 1.5, "checkpoint_stall_s": 0.0, "peak_memory_mb": 400.0, "mfu": None,
              "command": "heddle bench training"} for c, tps in (("ddp", 5000.0), ("ddp clip", 4000.0))]
    other = [{**common, "run_id": "m1", "timestamp": "20260102T000000", "scenario": "moe", "variant": "fssdp",
              "median_s": 0.5, "speedup": 1.7}]
    for rows in (old, coll, train, other):
        results.write_rows(root, rows[0]["scenario"], rows, run_id=rows[0]["run_id"], stamp=rows[0]["timestamp"])


def test_report_from_small_set(tmp_path, capsys):
    _write_small_set(tmp_path)
    md = tmp_path / "docs" / "benchmarks.md"
    assert report.main([str(tmp_path), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "busbw (GB/s)" in out and "tokens/s/dev" in out and "speedup" in out
    summary = (tmp_path / "report" / "summary.md").read_text()
    for png in ("bandwidth_vs_size.png", "tokens_per_s.png", "step_breakdown.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert (md.parent / "img" / "benchmarks" / png).exists()
        assert f"](img/benchmarks/{png})" in md.read_text() and f"]({png})" in summary
    # only the newest collectives run is summarised: 4 rows, not the old 99 us one
    coll = summary.split("## collectives")[1].split("##")[0]
    assert coll.count("| all_") == 4 and "| 99 |" not in coll
    assert "| ddp clip | 2 | 4000 |" in summary
    assert "## moe" in summary and "| fssdp | 0.5 | 1.7 |" in summary
    assert "CPU % (mean over ranks) 55" in summary
    assert "| 99 |" in report.summary_markdown(results.read_rows(tmp_path), [], "")  # --all keeps it
    assert report.main([str(tmp_path / "empty")]) == 2


def test_fmt():
    assert report.fmt(None) == "-" and report.fmt(3) == "3" and report.fmt(0.5) == "0.5"
    assert report.fmt(1.5e-5) == "1.500e-05" and report.fmt(math.nan) == "nan"
