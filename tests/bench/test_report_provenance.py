"""heddle bench report says what each table and plot is: measured (on what) or predicted."""

import matplotlib

matplotlib.use("Agg")

from heddle.bench import report

ENV = dict(world_size=2, nnodes=1, hosts="vm", devices="cpu: test", backend="gloo", run_id="r1",
           timestamp="20260101T000000")


def _coll(op, size, seconds, bus_from="nccl-tests", dense_op=None):
    algbw = size / seconds / 1e9
    return {**ENV, "scenario": "collectives", "op": op, "size_bytes": size, "target_bytes": size,
            "time_us": seconds * 1e6, "algbw_gbps": algbw, "busbw_gbps": algbw * (0.01 if bus_from == "ledger" else 1),
            "bus_from": bus_from, "dense_op": dense_op}


def test_provenance_lines():
    measured = report.provenance("training", None, [dict(ENV)])
    assert measured == "Measured on cpu: test, gloo, 2 processes, within one host."
    assert "2 nodes over the network" in report.provenance("training", None, [{**ENV, "nnodes": 2}])
    assert "10gbit" in report.provenance("training", None, [{**ENV, "link": "10gbit, 50us"}])
    sim = report.provenance("adaptive-sp", "sim", [{**ENV, "part": "sim", "preset": "a100-80g-ib"}])
    assert sim.startswith("Predicted by a cost model") and "a100-80g-ib" in sim and "not measured" in sim
    assert report.provenance("moe_sim", None, [{**ENV, "hardware": "h100"}]).startswith("Predicted")


def test_summary_marks_every_table_and_batch(tmp_path):
    rows = [_coll("all_reduce", 1024, 1e-4), _coll("compressed_all_reduce", 1024, 2e-4, "ledger", "all_reduce"),
            {**ENV, "scenario": "training", "config": "ddp", "global_batch": 8, "tokens_per_s_per_device": 10.0,
             "compute_s": 0.01, "comm_s": 0.002, "checkpoint_stall_s": 0.0},
            {**ENV, "scenario": "training", "config": "ddp accum2", "global_batch": 16,
             "tokens_per_s_per_device": 11.0, "compute_s": 0.02, "comm_s": 0.004, "checkpoint_stall_s": 0.0},
            {**ENV, "scenario": "moe_sim", "hardware": "a100", "strategy": "ep", "layer_s": 0.1}]
    text = report.summary_markdown(rows, [], "")
    assert text.count("Measured on cpu: test, gloo, 2 processes") == 2
    assert "Predicted by a cost model (heddle.moe.cost_model, hardware a100" in text
    assert "global batch (seqs)" in text and "twice the batch" in text
    assert "bytes the CommLedger recorded" in text
    assert report._config_label(rows[3], rows[2:4]) == "training: ddp accum2 (n=2, batch 16)"
    assert report._config_label(rows[2], rows[2:3]) == "training: ddp (n=2)"
    for fn in (report.plot_bandwidth, report.plot_tokens, report.plot_breakdown):
        assert fn(rows, tmp_path / f"{fn.__name__}.png").stat().st_size > 0


def test_bandwidth_plot_keeps_compressed_bytes_off_the_busbw_axis(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        captured["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    rows = [_coll("all_reduce", s, s / 1e9) for s in (1024, 8192)]
    rows += [_coll("compressed_all_reduce", s, s / 5e8, "ledger", "all_reduce") for s in (1024, 8192)]
    report.plot_bandwidth(rows, tmp_path / "bw.png")
    left, right = captured["fig"].axes[:2]
    assert [line.get_label() for line in left.get_lines()] == ["all_reduce (n=2)"]
    assert "busbw" in left.get_ylabel() or "bus bandwidth" in left.get_ylabel()
    assert sorted(line.get_label() for line in right.get_lines()) == ["all_reduce (n=2)", "compressed_all_reduce (n=2)"]
    assert "effective" in right.get_ylabel()
    assert "measured" in captured["fig"]._suptitle.get_text()


def test_breakdown_bar_has_headroom(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig
    monkeypatch.setattr(plt.Figure, "savefig",
                        lambda fig, *a, **k: (captured.setdefault("fig", fig), real_savefig(fig, *a, **k))[1])
    rows = [{**ENV, "scenario": "training", "config": c, "compute_s": t, "comm_s": t / 2, "checkpoint_stall_s": 0.0}
            for c, t in (("a", 0.01), ("b", 0.03))]
    report.plot_breakdown(rows, tmp_path / "b.png")
    ax = captured["fig"].axes[0]
    assert ax.get_xlim()[1] > 45.0  # the longest bar is 45 ms: not cut at the frame
    assert "measured" in ax.get_title()
