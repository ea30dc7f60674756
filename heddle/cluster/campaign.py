"""Node-loss campaign on an emulated 2 x 2 cluster (``make cluster-campaign``).

    python -m heddle.cluster.campaign [--steps 12] [--state-mb 16] [--only peer-step,disk-1g]

One uninterrupted run gives the reference losses and final state digests (checkpointing never
changes the math, so one reference serves every trial). Each trial then runs the same job on a
fresh cluster, loses a node (or both) at a chosen point, and lets heddle's relaunch bring it back:

    kill "step"      the supervisor kills node 1 when one of its ranks reports step S
    kill "snapshot"  node 1 kills itself right after save(S) returns (copy in flight)
    kill "flush"     ... once the snapshot is copied and its disk write is under way
    kill "transfer"  ... 20 ms into save(S), which sends step S-1's peer copy / parity
    kill "both"      both nodes die at step S: only disk can restore

The table: trial, redundancy, link rate, kill point, restored exact (every loss of every attempt
and the final state of every rank equal the reference bit for bit), the source each rank of the
replaced node restored from, the restored step, seconds from the kill to the first step after it
and seconds spent inside restore() by the replaced node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from heddle.cluster import elastic_job
from heddle.cluster.cluster import Cluster

# name, redundancy, rate, kill point, levels
TRIALS = [
    ("peer-step", "peer", "1gbit", "step", "memory,disk"),
    ("peer-snapshot", "peer", "1gbit", "snapshot", "memory,disk"),
    ("peer-flush", "peer", "1gbit", "flush", "memory,disk"),
    ("peer-transfer", "peer", "1gbit", "transfer", "memory,disk"),
    ("parity-step", "parity", "1gbit", "step", "memory,disk"),
    ("parity-snapshot", "parity", "1gbit", "snapshot", "memory,disk"),
    ("parity-flush", "parity", "1gbit", "flush", "memory,disk"),
    ("parity-transfer", "parity", "1gbit", "transfer", "memory,disk"),
    ("peer-both", "peer", "1gbit", "both", "memory,disk"),
    ("parity-both", "parity", "1gbit", "both", "memory,disk"),
    ("peer-10g", "peer", "10gbit", "step", "memory,disk"),
    ("disk-1g", "none", "1gbit", "step", "memory,disk"),
    ("disk-10g", "none", "10gbit", "step", "memory,disk"),
    ("parity-2x1-step", "parity", "1gbit", "step", "memory,disk"),   # one rank per node: parity spans nodes
]


def _job_argv(out: str, args, redundancy: str, levels: str) -> list[str]:
    return ["-m", "heddle.cluster.elastic_job", "--out", out, "--steps", str(args.steps),
            "--state-mb", str(args.state_mb), "--redundancy", redundancy, "--levels", levels,
            "--step-sleep", str(args.step_sleep)]


def reference(args, workdir: str) -> tuple[dict, dict]:
    out = os.path.join(workdir, "reference")
    with Cluster(2, 2, rate="10gbit", shared_dir=os.path.join(workdir, "ref-shared")) as cluster:
        result = cluster.run(_job_argv(out, args, "none", "memory"), timeout=args.timeout)
        if not result.ok:
            raise RuntimeError("reference run failed:\n" + result.log_text()[-6000:])
    losses = {s: v[0] for s, v in elastic_job.read_losses(out).items()}
    digests = {r["rank"]: r["digest"] for r in elastic_job.read_reports(out, "final")}
    return losses, digests


def run_trial(trial, args, workdir: str, refs: dict) -> dict:
    name, redundancy, rate, kill, levels = trial
    nproc = 1 if "-2x1-" in name else 2
    if nproc not in refs:   # 2 x 1: the in-process 2-rank reference is exact
        ref = elastic_job.simulate(elastic_job.parse_args(_job_argv("-", args, redundancy, levels)[2:]))
        refs[nproc] = (ref[0], dict(enumerate(ref[1])))
    ref_losses, ref_digests = refs[nproc]
    out = os.path.join(workdir, name)
    argv = _job_argv(out, args, redundancy, levels)
    kw = dict(max_restarts=1, timeout=args.timeout)
    if kill == "step":
        kw.update(kill_node=1, kill_at_step=args.kill_step)
    elif kill == "both":
        kw.update(kill_node="all", kill_at_step=args.kill_step)
    else:
        argv += ["--self-kill-node", "1", "--self-kill-step", str(args.kill_step), "--self-kill-phase", kill]
    started = time.time()
    with Cluster(2, nproc, rate=rate, shared_dir=os.path.join(workdir, f"{name}-shared")) as cluster:
        result = cluster.run(argv, **kw)
    row = {"trial": name, "nodes x procs": f"2x{nproc}", "redundancy": redundancy, "rate": rate, "kill": kill, "levels": levels,
           "ok": result.ok, "attempts": result.attempts, "wall_s": time.time() - started}
    losses = elastic_job.read_losses(out) if os.path.exists(os.path.join(out, "losses.jsonl")) else {}
    final = {r["rank"]: r["digest"] for r in elastic_job.read_reports(out, "final")}
    row["exact"] = (result.ok and sorted(losses) == sorted(ref_losses)
                    and all(v == [ref_losses[s]] * len(v) for s, v in losses.items()) and final == ref_digests)
    reports = [r for r in elastic_job.read_reports(out) if r["attempt"] == 1]
    replaced = [r for r in reports if kill == "both" or r["node"] == 1]
    row["source"] = "/".join(sorted({str(r["last_restore"].get("source")) for r in replaced})) or "-"
    row["survivor_source"] = "/".join(sorted({str(r["last_restore"].get("source")) for r in reports
                                              if r not in replaced})) or "-"
    steps = {r["last_restore"].get("step") for r in reports}
    row["restored_step"] = steps.pop() if len(steps) == 1 else sorted(steps, key=str)
    row["recover_s"] = result.recovery_s[0] if result.recovery_s else None
    row["restore_s"] = max((r["restore_s"] for r in replaced), default=None)
    row["killed"] = bool(result.kills)
    if not result.ok:
        row["log"] = result.log_text()[-3000:]
    return row


def format_table(rows: list[dict]) -> str:
    head = ["trial", "nodes x procs", "redundancy", "rate", "kill at", "restored exact", "source (replaced)", "source (survivors)",
            "step", "kill->step (s)", "restore() (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rec = f"{r['recover_s']:.2f}" if r.get("recover_s") is not None else "-"
        res = f"{r['restore_s']:.3f}" if r.get("restore_s") is not None else "-"
        lines.append(f"| {r['trial']} | {r['nodes x procs']} | {r['redundancy']} | {r['rate']} | {r['kill']} | "
                     f"{'yes' if r['exact'] else 'NO'} | {r['source']} | {r['survivor_source']} | "
                     f"{r['restored_step']} | {rec} | {res} |")
    exact = sum(1 for r in rows if r["exact"])
    lines.append(f"\n{len(rows)} trials, {exact} restored exact")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m heddle.cluster.campaign", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kill-step", type=int, default=5)
    p.add_argument("--state-mb", type=float, default=8.0, help="model + Adam state per rank (MB)")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--only", default=None, help="comma list of trial names")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--workdir", default=None, help="keep results here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    trials = TRIALS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {t[0] for t in TRIALS}]
        if unknown:
            p.error(f"--only: unknown trial(s) {unknown}; valid: {', '.join(t[0] for t in TRIALS)}")
        trials = [t for t in TRIALS if t[0] in wanted]
    workdir = args.workdir or tempfile.mkdtemp(prefix="heddle-campaign-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"cluster campaign: 2 nodes x 2 processes, {args.steps} steps, kill at step {args.kill_step}, "
              f"{args.state_mb} MB state per rank; reference run ...", flush=True)
        refs = {2: reference(args, workdir)}
        rows = []
        for trial in trials:
            row = run_trial(trial, args, workdir, refs)
            rows.append(row)
            print(f"  {row['trial']}: exact={row['exact']} source={row['source']} "
                  f"recover={row['recover_s']} ({row['wall_s']:.0f} s)", flush=True)
            if "log" in row:
                print(row["log"], flush=True)
        print(format_table(rows))
        return 0 if all(r["exact"] for r in rows) else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
