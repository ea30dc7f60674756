"""``heddle cluster``: an emulated multi-node cluster on this machine (docs/cluster.md).

    heddle cluster run --nodes 2 --nproc-per-node 2 --rate 10gbit -- train.py --steps 20
    heddle cluster run --nodes 2 --rate 1gbit -- -m heddle.bench.cli collectives --max-bytes 16M
    heddle cluster run --nodes 2 --kill-node 1 --kill-at-step 5 --max-restarts 1 -- job.py
    heddle cluster kill-node 1 [--cluster TAG]     node loss, from another shell
    heddle cluster list                            clusters on this machine
    heddle cluster clean [--all]                   remove clusters whose owner died (--all: every one)
"""

from __future__ import annotations

import argparse
import sys

from heddle.cluster import netns


def _run(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        own, job = argv[:split], argv[split + 1:]
    else:
        own, job = argv, []
    p = argparse.ArgumentParser(prog="heddle cluster run", description="Run a job on N emulated nodes.")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--rate", default=None, help="link rate per node and direction (tc units: 1gbit, 10gbit)")
    p.add_argument("--delay", default=None, help="one-way link delay (netem: 50us); needs netem in the kernel")
    p.add_argument("--loss", default=None, help="packet loss (netem: 0.1%%); needs netem in the kernel")
    p.add_argument("--launcher", choices=("torchrun", "mpirun", "slurm"), default="torchrun")
    p.add_argument("--kill-node", default=None, help="node index, comma list, or 'all'")
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--kill-at-phase", default="step", help="progress phase name to kill at (default 'step')")
    p.add_argument("--kill-after", type=float, default=None, help="kill after this many seconds instead")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="relaunches after a node loss or failure (default 1 with --kill-node, else 0)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--shared-dir", default=None, help="directory every node sees (default: a new one in /var/tmp)")
    args = p.parse_args(own)
    if not job:
        p.error("give the job after '--': heddle cluster run --nodes 2 -- script.py args")
    kill = None
    if args.kill_node is not None:
        kill = "all" if args.kill_node == "all" else [int(x) for x in args.kill_node.split(",")]
    restarts = args.max_restarts if args.max_restarts is not None else (1 if kill is not None else 0)
    from heddle.cluster.cluster import Cluster

    try:
        with Cluster(args.nodes, args.nproc_per_node, args.rate, args.delay, args.loss,
                     shared_dir=args.shared_dir) as cluster:
            print(f"heddle cluster {cluster.tag}: {args.nodes} nodes x {args.nproc_per_node} at "
                  f"{', '.join(cluster.addresses)}; rate {args.rate or 'unshaped'}; shared dir {cluster.shared_dir}",
                  flush=True)
            if args.launcher == "mpirun":
                result = cluster.mpirun(job, timeout=args.timeout)
            else:
                result = cluster.run(job, launcher=args.launcher, kill_node=kill, kill_at_step=args.kill_at_step,
                                     kill_at_phase=args.kill_at_phase, kill_after_s=args.kill_after,
                                     max_restarts=restarts, timeout=args.timeout)
            sys.stdout.write(result.log_text() + "\n")
            for k, rec in zip(result.kills, result.recovery_s + [None] * len(result.kills)):
                lag = f", {k.reaction_s * 1000:.0f} ms after the marker" if k.reaction_s is not None else ""
                took = f"; first step {rec:.2f} s after the kill" if rec is not None else ""
                print(f"heddle cluster: killed node(s) {k.nodes} in attempt {k.attempt}{lag}{took}")
            print(f"heddle cluster: {result.attempts} attempt(s), exit codes {result.returncodes}")
            return 0 if result.ok else 1
    except netns.ClusterUnavailable as e:
        print(str(e), file=sys.stderr)
        return 2
    except ValueError as e:   # bad --rate / --delay / --nodes ...
        print(f"heddle cluster run: {e}", file=sys.stderr)
        return 2


def _find_tag(tag: str | None) -> str:
    clusters = {t: s for t, s in netns.list_clusters().items() if s and netns.pid_alive(s.get("owner_pid"))}
    if tag is not None:
        if tag not in clusters:
            raise ValueError(f"--cluster={tag!r} is not running; running: {', '.join(clusters) or 'none'}")
        return tag
    if len(clusters) != 1:
        raise ValueError(f"{len(clusters)} clusters are running ({', '.join(clusters) or 'none'}): pick one with --cluster")
    return next(iter(clusters))


def _kill_node(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="heddle cluster kill-node")
    p.add_argument("node", type=int)
    p.add_argument("--cluster", default=None, help="cluster tag (heddle cluster list)")
    args = p.parse_args(argv)
    try:
        netns.check_prerequisites()
        tag = _find_tag(args.cluster)
    except (ValueError, netns.ClusterUnavailable) as e:
        print(f"heddle cluster kill-node: {e}", file=sys.stderr)
        return 2
    state = netns.read_state(tag)
    if not 0 <= args.node < state["nodes"]:
        print(f"heddle cluster kill-node: node={args.node} must be in [0, {state['nodes']})", file=sys.stderr)
        return 2
    init = state["init_pids"][args.node]
    ns = state["node_ns"][args.node]
    killed = netns.kill_pids_of_netns(ns, keep=lambda pid: pid == init)
    if init:
        netns.wipe_node_memory(init)
    killed += netns.kill_pids_of_netns(ns)
    print(f"heddle cluster kill-node: node {args.node} of {tag}: killed {len(killed)} process(es), /dev/shm wiped")
    return 0


def _list(argv: list[str]) -> int:
    for tag, state in netns.list_clusters().items():
        if state is None:
            print(f"{tag}: leftovers without state: {', '.join(netns.leftovers(tag))}")
            continue
        alive = "running" if netns.pid_alive(state.get("owner_pid")) else "owner dead"
        print(f"{tag}: {state['nodes']} nodes x {state['nproc_per_node']}, rate {state['rate']}, "
              f"owner pid {state['owner_pid']} ({alive}), shared {state['shared_dir']}")
    return 0


def _clean(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="heddle cluster clean")
    p.add_argument("--all", action="store_true", help="also clusters whose owner is still running")
    args = p.parse_args(argv)
    try:
        netns.check_prerequisites()
    except netns.ClusterUnavailable as e:
        print(f"heddle cluster clean: {e}", file=sys.stderr)
        return 2
    removed = 0
    for tag, state in netns.list_clusters().items():
        if args.all or state is None or not netns.pid_alive(state.get("owner_pid")):
            netns.destroy(tag)
            print(f"removed cluster {tag}")
            removed += 1
    if not removed:
        print("nothing to clean")
    return 0


COMMANDS = {"run": _run, "kill-node": _kill_node, "list": _list, "clean": _clean}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
