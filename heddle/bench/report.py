"""``heddle bench report DIR``: tables (rich), PNG plots (matplotlib) and a Markdown summary.

    heddle bench report heddle-results                       latest run of every scenario
    heddle bench report heddle-results --all                 every run
    heddle bench report heddle-results --markdown docs/benchmarks.md

Writes ``DIR/report/summary.md`` and ``DIR/report/*.png``: bus bandwidth vs size (one line per
collective), tokens/s per device vs config (every row with a ``tokens_per_s_per_device``
column) and the training step-time breakdown (compute / communication / checkpoint stall). ``--markdown PATH`` also writes the summary to PATH with its plots copied to
``PATH's folder/img/<PATH's stem>/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from heddle.bench import results

# Columns that describe the run rather than the case: left out of per-scenario tables.
RUN_COLUMNS = {"run_id", "timestamp", "scenario", "tag", "command", "config_json", "run_wall_s", "world_size",
               "nnodes", "hosts", "devices", "backend", "launcher", "heddle_version", "torch_version",
               "cuda_version", "python_version", "pyarrow_version", "deepspeed_version", "platform",
               "git_commit", "mean_s", "trials"}
COLLECTIVE_COLUMNS = [("op", "op"), ("size_bytes", "size (B)"), ("count", "count"), ("dtype", "type"),
                      ("redop", "redop"), ("root", "root"), ("time_us", "time (us)"),
                      ("time_p95_us", "p95 (us)"), ("algbw_gbps", "algbw (GB/s)"), ("busbw_gbps", "busbw (GB/s)"),
                      ("wrong", "#wrong"), ("speedup_vs_dense", "x dense")]
TRAINING_COLUMNS = [("config", "config"), ("world_size", "procs"), ("global_batch", "global batch (seqs)"),
                    ("tokens_per_s_per_device", "tokens/s/dev"), ("vs_first", "x first"),
                    ("step_time_s", "step (s)"), ("compute_s", "compute (s)"), ("comm_s", "comm (s)"),
                    ("comm_mb_per_step", "comm MB/step"), ("checkpoint_stall_s", "ckpt stall (s)"),
                    ("peak_memory_mb", "peak mem (MB)"), ("mfu", "MFU"), ("final_loss", "loss")]

# benchmarks/cluster.py (scenario "cross-node"): one table per part, every row naming its link.
CROSS_NODE_COLUMNS = [("link_rate", "tbf rate"), ("measured_ceiling_gbit", "link busbw (Gbit/s)"),
                      ("procs_per_node", "procs/node"), ("config", "config"), ("seed", "seed"),
                      ("busbw_gbit", "busbw (Gbit/s)"), ("steps_per_s", "steps/s"), ("speedup_vs_fp32", "x fp32"),
                      ("backward_sync_s", "bwd+sync (s)"), ("vs_ddp", "/ plain DDP"),
                      ("bytes_sent_per_step", "bytes/step"), ("val_loss", "val loss"),
                      ("val_in_spread", "in fp32 spread"), ("sp_layout", "SP group"), ("s", "seq"),
                      ("median_s", "median (s)"), ("vs_ep", "EP / this"), ("lambda", "lambda"),
                      ("overhead_s", "overhead (s)"), ("overhead_vs_ds", "overhead / DeepSpeed"),
                      ("predicted_s", "predicted (s)"), ("measured_s", "measured (s)"),
                      ("prediction_error", "pred error"), ("speedup_vs_static", "static / this"),
                      ("ledger_MB", "ledger MB"), ("wire_MB", "link MB"), ("wire_over_ledger", "link / ledger"),
                      ("load_avg_start", "load avg")]

# Scenario parts whose numbers come from a cost model, not from a run (what they predict for).
PREDICTED = {
    ("adaptive-sp", "sim"): lambda rows: f"the FlexSP cost model, preset {_one(rows, 'preset')}, 64 simulated devices",
    ("moe_sim", None): lambda rows: f"heddle.moe.cost_model, hardware {_one(rows, 'hardware')}, 32 simulated devices",
}
# Parts that are measured, but not as a distributed run on the launched processes.
MEASURED_NOTE = {("adaptive-sp", "planner"): "planner wall time on one CPU process"}


def _one(rows: list[dict], key: str, default: str = "?") -> str:
    values = sorted({str(r[key]) for r in rows if r.get(key) is not None})
    return ", ".join(values) if values else default


def link_of(row: dict) -> str:
    """What connected the processes: a link the scenario recorded, else one host or N nodes."""
    for key in ("link", "link_rate"):
        if row.get(key):
            return str(row[key])
    nnodes = row.get("nnodes") or 1
    if row.get("world_size") == 1:
        return "no link (one process)"
    return "within one host" if nnodes == 1 else f"{nnodes} nodes over the network"


def environment(row: dict) -> str:
    """'cpu: AMD EPYC, gloo, 2 processes, within one host' for a row's run."""
    procs = row.get("world_size")
    return (f"{row.get('devices')}, {row.get('backend')}, {procs} process{'es' if procs != 1 else ''}, "
            f"{link_of(row)}")


def provenance(scenario: str, part, rows: list[dict]) -> str:
    """'predicted by ...' or 'measured on ...' for one table."""
    model = PREDICTED.get((scenario, part))
    if model is not None:
        return f"Predicted by a cost model ({model(rows)}); not measured."
    note = MEASURED_NOTE.get((scenario, part))
    return f"Measured on {environment(rows[0])}" + (f" ({note})." if note else ".")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _columns_for(scenario: str, rows: list[dict]) -> list[tuple[str, str]]:
    present = {k for r in rows for k, v in r.items() if v is not None}
    if scenario == "collectives":
        return [(k, h) for k, h in COLLECTIVE_COLUMNS if k in present]
    if scenario == "training":
        return [(k, h) for k, h in TRAINING_COLUMNS if k in present]
    if scenario == "cross-node":
        return [(k, h) for k, h in CROSS_NODE_COLUMNS if k in present]
    cols = []
    for r in rows:
        for k in r:
            if k in present and k not in RUN_COLUMNS and not k.startswith("tele_") and k not in dict(cols):
                cols.append((k, k))
    return cols


def groups(scenario: str, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """A scenario's rows split by their ``part`` column when they have one (scenarios that mix a
    simulation, a planner sweep and a real run), so each table shows only its own columns."""
    parts = []
    for r in rows:
        if r.get("part") not in parts:
            parts.append(r.get("part"))
    if parts == [None]:
        return [(scenario, rows)]
    return [(f"{scenario}: {part}" if part is not None else scenario, [r for r in rows if r.get("part") == part])
            for part in parts]


def print_rows(title: str, rows: list[dict], columns: list[tuple[str, str]] | None = None) -> None:
    """A rich table of ``rows`` (the runner prints every run's rows with it)."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    columns = columns or _columns_for(title, rows)
    table = Table(title=title, show_lines=False)
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(fmt(row.get(k)) for k, _ in columns))
    Console(width=max(120, shutil.get_terminal_size((160, 20)).columns)).print(table)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)).replace("|", "\\|") for k, _ in columns) + " |")
    return "\n".join(lines)


def latest_runs(rows: list[dict]) -> list[dict]:
    """Rows of the newest run of every scenario."""
    newest: dict[str, tuple[str, str]] = {}
    for r in rows:
        key = (r.get("timestamp") or "", r.get("run_id") or "")
        if r["scenario"] not in newest or key > newest[r["scenario"]]:
            newest[r["scenario"]] = key
    return [r for r in rows if (r.get("timestamp") or "", r.get("run_id") or "") == newest[r["scenario"]]]


def plot_bandwidth(rows: list[dict], path: Path) -> Path | None:
    """Two panels, log-log, one line per (op, world size). Left: nccl-tests busbw of the dense
    collectives. Right: heddle's sparse / compressed collectives, whose bytes on the wire are not
    the dense size: their effective bandwidth (dense size / time, the algbw column) next to
    their dense peer's, so the axis compares like with like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coll = [r for r in rows if r["scenario"] == "collectives" and results.is_number(r.get("busbw_gbps"))]
    if not coll:
        return None
    dense = [r for r in coll if r.get("bus_from", "nccl-tests") != "ledger"]
    special = [r for r in coll if r.get("bus_from") == "ledger"]
    peers = {r.get("dense_op") for r in special if r.get("dense_op")}
    fig, axes = plt.subplots(1, 2 if special else 1, figsize=(13 if special else 8, 5), squeeze=False)

    def draw(ax, subset, key, style="-"):
        for op, n in sorted({(r["op"], r.get("world_size")) for r in subset}, key=str):
            pts = sorted((r["size_bytes"], r[key]) for r in subset if (r["op"], r.get("world_size")) == (op, n))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{op} (n={n})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size (bytes; dense buffer)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    draw(axes[0][0], dense, "busbw_gbps")
    axes[0][0].set_ylabel("bus bandwidth (GB/s, nccl-tests definition)")
    axes[0][0].set_title("dense collectives: bus bandwidth", fontsize=10)
    if special:
        ax = axes[0][1]
        draw(ax, [r for r in dense if r["op"] in peers], "algbw_gbps", "--")
        draw(ax, special, "algbw_gbps")
        ax.set_ylabel("effective bandwidth (GB/s) = dense size / time")
        ax.set_title("sparse / compressed vs their dense peer (dashed): effective bandwidth\n"
                     "(bytes actually sent are fewer: see busbw and x dense in the table)", fontsize=9)
    fig.suptitle(f"collectives, measured: {environment(coll[0])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _config_label(r: dict, rows: list[dict] = ()) -> str:
    """'training: ddp (n=2)'; ', batch 16' added when the rows' global batches differ (a
    grad_accum_steps=2 row takes twice the others' batch per step)."""
    label = r.get("config") or r.get("case") or r.get("variant") or ""
    batches = {x.get("global_batch") for x in rows if x.get("global_batch") is not None}
    batch = f", batch {r['global_batch']}" if len(batches) > 1 and r.get("global_batch") is not None else ""
    return f"{r['scenario']}: {label} (n={r.get('world_size')}{batch})"


def rows_with(rows: list[dict], key: str) -> list[dict]:
    return [r for r in rows if results.is_number(r.get(key))]


def plot_tokens(rows: list[dict], path: Path) -> Path | None:
    """Horizontal bars: tokens/s per device for every row that has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = rows_with(rows, "tokens_per_s_per_device")
    pts = [(_config_label(r, have), r["tokens_per_s_per_device"]) for r in have]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(pts)))
    ax.barh([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s per device")
    ax.set_xlim(0, max(p[1] for p in pts) * 1.08)
    ax.set_title(f"tokens/s per device, measured: {environment(rows_with(rows, 'tokens_per_s_per_device')[0])}",
                 fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(rows: list[dict], path: Path) -> Path | None:
    """Stacked bars: a training step split into compute, communication and checkpoint stall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("compute_s", "comm_s", "checkpoint_stall_s")
    sub = [r for r in rows if all(results.is_number(r.get(k)) for k in parts)]
    if not sub:
        return None
    labels = [_config_label(r, sub) for r in sub]
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.45 * len(sub)))
    left = [0.0] * len(sub)
    for key, color, name in zip(parts, ("tab:blue", "tab:orange", "tab:red"), ("compute", "comm", "checkpoint stall")):
        values = [r[key] * 1e3 for r in sub]
        ax.barh(labels, values, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.08)  # headroom: the longest bar is not cut at the frame
    ax.set_xlabel("ms per step (comm: ledger replayed alone; compute: the rest)")
    ax.set_title(f"training step-time breakdown, measured: {environment(sub[0])}", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def summary_markdown(rows: list[dict], plots: list[Path], image_prefix: str) -> str:
    out = ["# heddle benchmark results", ""]
    runs = sorted({(r["scenario"], r["run_id"]) for r in rows})
    first = rows[0]
    out.append(f"Generated by `heddle bench report` from {len(runs)} run(s). Environment of the first "
               f"row: {first.get('world_size')} process(es) on {first.get('nnodes')} node(s) "
               f"({first.get('hosts')}), devices `{first.get('devices')}`, backend {first.get('backend')}, "
               f"torch {first.get('torch_version')}, heddle {first.get('heddle_version')}, "
               f"git `{first.get('git_commit')}`.")
    out.append("")
    out += ["Every table says whether its numbers were **measured** (a run on the processes and devices "
            "named) or **predicted** by a cost model (a simulation of hardware that did not run here). "
            "Timings on a shared CPU machine with gloo check the code paths and the ratios between "
            "configurations run side by side; they are not cluster speeds.", ""]
    captions = {"bandwidth_vs_size": "Measured collectives: left, busbw of the dense collectives; right, "
                                     "heddle's sparse / compressed collectives as effective bandwidth (dense "
                                     "size / time) next to their dense peer, since their bytes on the wire differ.",
                "tokens_per_s": "Measured training throughput per device for every configuration.",
                "step_breakdown": "Measured training step split into compute, communication (the step's "
                                  "ledger replayed alone) and checkpoint stall."}
    for plot in plots:
        out += [f"![{plot.stem}]({image_prefix}{plot.name})", ""]
        if plot.stem in captions:
            out += [captions[plot.stem], ""]
    for scenario in sorted({r["scenario"] for r in rows}):
        sub = [r for r in rows if r["scenario"] == scenario]
        commands = sorted({r.get("command") or "" for r in sub})
        out += [f"## {scenario}", ""]
        out += [f"Command: `{c}`  " for c in commands]
        for run in sorted({r["run_id"] for r in sub}):
            e = next(r for r in sub if r["run_id"] == run)
            out.append(f"Run {e.get('timestamp')} (`{run}`): {e.get('world_size')} process(es) on "
                       f"{e.get('hosts')}, `{e.get('devices')}`, {e.get('backend')}, git `{e.get('git_commit')}`, "
                       f"{fmt(e.get('run_wall_s'))} s  ")
        tele = sub[0]
        load = []
        for key, label in (("tele_cpu_pct_mean", "CPU % (mean over ranks)"), ("tele_rss_mb_max", "RSS max (MB)"),
                           ("tele_gpu_util_pct_mean", "GPU util %"), ("tele_gpu_power_w_mean", "power (W)")):
            if results.is_number(tele.get(key)):
                load.append(f"{label} {fmt(tele[key])}")
        if load:
            out += ["", "Telemetry: " + ", ".join(load) + (f" ({tele['tele_note']})" if tele.get("tele_note") else "")]
        for title, part in groups(scenario, sub):
            if title != scenario:
                out += ["", f"### {title}"]
            out += ["", provenance(scenario, part[0].get("part"), part)]
            if scenario == "collectives" and any(r.get("bus_from") == "ledger" for r in part):
                out += ["", "For heddle's sparse / compressed collectives, busbw is the bytes the CommLedger "
                            "recorded (what they actually sent) / time and algbw the dense size / time; "
                            "`x dense` is the dense peer's time / theirs at the same size."]
            if scenario == "training" and any(r.get("global_batch") for r in part):
                out += ["", "`global batch` is sequences per optimizer step: a `grad_accum_steps=2` row "
                            "takes twice the batch of the others per step, so compare it by tokens/s, not step time."]
            out += ["", markdown_table(part, _columns_for(scenario, part)), ""]
    return "\n".join(out) + "\n"


def build_report(out_dir: str | os.PathLike, *, all_runs: bool = False, markdown: str | None = None,
                 plots: bool = True, show: bool = True) -> Path:
    """Tables, plots and summary for ``out_dir``; returns the summary's path."""
    rows = results.read_rows(out_dir)
    if not rows:
        raise ValueError(f"no results under {str(out_dir)!r} (run `heddle bench NAME --out {out_dir}` first)")
    if not all_runs:
        rows = latest_runs(rows)
    report_dir = Path(out_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        for fn, name in ((plot_bandwidth, "bandwidth_vs_size.png"), (plot_tokens, "tokens_per_s.png"),
                         (plot_breakdown, "step_breakdown.png")):
            path = fn(rows, report_dir / name)
            if path is not None:
                written.append(path)
    if show:
        for scenario in sorted({r["scenario"] for r in rows}):
            for title, sub in groups(scenario, [r for r in rows if r["scenario"] == scenario]):
                print_rows(title, sub, _columns_for(scenario, sub))
    summary = report_dir / "summary.md"
    summary.write_text(summary_markdown(rows, written, ""))
    if markdown:
        target = Path(markdown)
        img = target.parent / "img" / target.stem
        img.mkdir(parents=True, exist_ok=True)
        for p in written:
            shutil.copyfile(p, img / p.name)
        target.write_text(summary_markdown(rows, written, f"img/{target.stem}/"))
    if show:
        print(f"report: {summary}" + "".join(f"\n        {p}" for p in written)
              + (f"\n        {markdown}" if markdown else ""))
    return summary


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="heddle bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="results directory (heddle bench --out)")
    p.add_argument("--all", action="store_true", help="every run, not only the newest of each scenario")
    p.add_argument("--markdown", default=None, help="also write the Markdown summary here (docs/benchmarks.md)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    try:
        build_report(args.dir, all_runs=args.all, markdown=args.markdown, plots=not args.no_plots)
    except ValueError as e:
        print(f"heddle bench report: {e}")
        return 2
    return 0
