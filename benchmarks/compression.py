"""Compressed gradients side by side: bytes and sync time, L-GreCo savings, GPT convergence.

    heddle run -n 2 benchmarks/compression.py [--parts comm,lgreco,train] [--sizes 1,4,16,64]
        [--steps 200] [--seeds 3] [--plot docs/compress_loss.png] [--markdown]

Runs the ``compression`` bench scenario (heddle/bench/scenarios/compression.py: what is measured
and how) in this process group, one thread per process, prints one table per part and the
issue's goals marked met / missed:
- >= 10x fewer bytes than fp32 with final (validation) loss within the uncompressed seed spread;
- L-GreCo >= 1.5x fewer bytes than the uniform setting at equal (budgeted) error.
"""

from __future__ import annotations

import statistics

import torch.distributed as dist

from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenario import BenchContext
from heddle.bench.script import script_setup
from heddle.bench.scenarios.compression import SCENARIO

COMM = [("elements_m", "M elems"), ("case", "case"), ("bytes_per_step", "bytes/step"),
        ("bytes_vs_fp32", "fp32/x"), ("bits_per_element", "bits/elem"), ("step_s", "step s"),
        ("sync_s", "sync s"), ("status", "status")]
LGRECO = [("compressor", "compressor"), ("uniform_bytes", "uniform B"), ("lgreco_bytes", "L-GreCo B"),
          ("bytes_ratio", "uniform/L-GreCo"), ("uniform_rel_error", "uniform rel err"),
          ("lgreco_rel_error", "L-GreCo rel err"), ("choices", "chosen params")]
TRAIN = [("config", "config"), ("seeds", "seeds"), ("val_loss", "val loss mean"), ("val_min", "min"),
         ("val_max", "max"), ("final_loss", "train loss"), ("bytes_per_step", "bytes/step"),
         ("bytes_vs_fp32", "fp32/x"), ("steady_vs_fp32", "fp32/x compressed steps"),
         ("compression_error", "rel err"), ("within_spread", "in fp32 spread")]


def summarize_train(rows):
    out = []
    groups = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    for name, rs in groups.items():
        vals = [r["val_loss"] for r in rs]
        out.append({"config": name, "seeds": len(rs), "val_loss": statistics.mean(vals), "val_min": min(vals),
                    "val_max": max(vals), "final_loss": statistics.mean(r["final_loss"] for r in rs),
                    "bytes_per_step": statistics.mean(r["bytes_per_step"] for r in rs),
                    "steady_bytes_per_step": statistics.mean(r["steady_bytes_per_step"] for r in rs),
                    "compression_error": statistics.mean(r["compression_error"] for r in rs)})
    for row in out:
        base = next((b for b in out if b["config"] == ("hetero fp32" if row["config"].startswith("hetero") else "fp32")), None)
        if base is not None:
            row["bytes_vs_fp32"] = base["bytes_per_step"] / row["bytes_per_step"]
            row["steady_vs_fp32"] = base["steady_bytes_per_step"] / row["steady_bytes_per_step"]
            row["within_spread"] = base["val_min"] <= row["val_loss"] <= base["val_max"]
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, hetero in zip(axes, (False, True)):
        names = [n for n in dict.fromkeys(r["config"] for r in rows) if n.startswith("hetero") == hetero]
        for name in names:
            curves = [r["curve"] for r in rows if r["config"] == name]
            mean = [statistics.mean(v) for v in zip(*curves)]
            k = 10  # moving average for readability
            smooth = [statistics.mean(mean[max(0, i - k + 1):i + 1]) for i in range(len(mean))]
            ax.plot(range(1, len(smooth) + 1), smooth, label=f"{name} ({len(curves)} seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds, 10-step average)")
        ax.set_title("heterogeneous data per rank" if hetero else "same data distribution")
        ax.set_ylim(top=3.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"loss curves: {path}")


def verdicts(rows, summary):
    lines = []
    for row in summary:
        if row["config"] in ("fp32", "hetero fp32") or "bytes_vs_fp32" not in row:
            continue
        ok = row["bytes_vs_fp32"] >= 10 and row["within_spread"]
        lines.append(f"{row['config']}: {row['bytes_vs_fp32']:.1f}x fewer bytes than fp32 over the run "
                     f"({row['steady_vs_fp32']:.1f}x on compressed steps), val loss "
                     f"{row['val_loss']:.4f} {'inside' if row['within_spread'] else 'outside'} the fp32 seed "
                     f"range -> goal (>=10x, in spread) {'met' if ok else 'missed'}")
    for r in (r for r in rows if r.get("part") == "lgreco"):
        ok = r["bytes_ratio"] >= 1.5 and r["lgreco_rel_error"] <= r["uniform_rel_error"] * (1 + 1e-9)
        lines.append(f"L-GreCo {r['compressor']}: {r['bytes_ratio']:.2f}x fewer bytes than uniform at error "
                     f"{r['lgreco_rel_error']:.4f} vs {r['uniform_rel_error']:.4f} -> goal (>=1.5x) "
                     f"{'met' if ok else 'missed'}")
    by = {r["config"]: r for r in summary}
    if "powersgd:4+ef" in by and "powersgd:4+ef+lgreco" in by:
        u, a = by["powersgd:4+ef"], by["powersgd:4+ef+lgreco"]
        lines.append(f"training, PowerSGD: L-GreCo {u['bytes_per_step'] / a['bytes_per_step']:.2f}x fewer bytes/step "
                     f"than uniform rank 4 (all steps incl. warm-up), rel error {a['compression_error']:.4f} vs "
                     f"{u['compression_error']:.4f}, val loss {a['val_loss']:.4f} vs {u['val_loss']:.4f}")
    return lines


def main(argv=None):
    def plot_option(parser):
        parser.add_argument("--plot", default="docs/compress_loss.png", help="loss-curve PNG (train part)")

    options, rank, world = script_setup(__doc__, [plot_option, SCENARIO.add_options], argv, warmup=1, trials=3)
    rows = SCENARIO.run(BenchContext(rank, world, verbose=True), options)
    if rank == 0:
        tables = []
        comm = [r for r in rows if r["part"] == "comm"]
        lg = [r for r in rows if r["part"] == "lgreco"]
        tr = [r for r in rows if r["part"] == "train"]
        summary = summarize_train(tr)
        for title, part, cols in (("comm", comm, COMM), ("lgreco", lg, LGRECO), ("train", summary, TRAIN)):
            if part:
                print_rows(f"compression: {title}", part, cols)
                tables.append(markdown_table(part, cols))
        if options.markdown:
            print("\n\n".join(tables))
        for line in verdicts(rows, summary):
            print(line)
        if tr and options.plot:
            plot(tr, options.plot)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
