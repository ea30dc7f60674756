"""A small training job for node-loss experiments on an emulated cluster.

    heddle cluster run --nodes 2 --nproc-per-node 2 --kill-node 1 --kill-at-step 6 -- \\
        -m heddle.cluster.elastic_job --out /var/tmp/run1 --steps 12 --redundancy peer

Every rank trains a shared MLP (gradients averaged over all ranks) and its own "expert" layer
(per-rank state, never reduced: a rank restored from the wrong copy gives different losses).
Data for (step, rank) come from a generator seeded by both, so a resumed run sees exactly what
an uninterrupted one sees. The job checkpoints with :class:`heddle.checkpoint.Checkpointer`
every ``--save-every`` steps and restores at start; it writes into ``--out`` (a shared path):

    losses.jsonl            rank 0: {"step", "loss" (float.hex, bit exact), "attempt"}
    restore-a{A}-rank{r}.json  what restore found: ckpt.last_restore, seconds, attempt
    final-rank{r}.json      SHA-256 of every tensor of the final state

``--self-kill-step S --self-kill-phase snapshot|flush|transfer`` makes local rank 0 of node
``--self-kill-node`` kill its whole node from inside at a precise point: "snapshot" right after
``save(S)`` returns (the copy runs in the background), "flush" once the snapshot of S is copied
and its disk write is under way, "transfer" while ``save(S)`` sends the previous step's
peer/parity redundancy (a timer thread fires ``--self-kill-delay-ms`` after the call starts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time

import torch
import torch.distributed as dist

import heddle
import heddle.dist as hd
from heddle.checkpoint import Checkpointer
from heddle.cluster.progress import progress


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None, help="checkpoint directory (default OUT/ckpt)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=1)
    p.add_argument("--redundancy", choices=("none", "peer", "parity"), default="peer")
    p.add_argument("--levels", default="memory,disk")
    p.add_argument("--flush", choices=("every", "latest"), default="every")
    p.add_argument("--state-mb", type=float, default=2.0, help="model + Adam state per rank (MB)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of idle per step (slower kills)")
    p.add_argument("--self-kill-node", type=int, default=None)
    p.add_argument("--self-kill-step", type=int, default=None)
    p.add_argument("--self-kill-phase", choices=("snapshot", "flush", "transfer"), default="snapshot")
    p.add_argument("--self-kill-delay-ms", type=float, default=20.0)
    return p.parse_args(argv)


def build(args, rank: int):
    """Shared MLP [d -> h -> d] (same init on every rank) and a per-rank expert [d -> d]."""
    d = args.dim
    params = max(1, int(args.state_mb * 1e6 / 12))           # fp32 parameter + Adam m and v
    hidden = max(8, (params - d * d) // (2 * d + 1))
    torch.manual_seed(args.seed)
    shared = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d))
    torch.manual_seed(args.seed * 7919 + 1 + rank)
    expert = torch.nn.Linear(d, d)
    opt = torch.optim.Adam(list(shared.parameters()) + list(expert.parameters()), lr=1e-3)
    return shared, expert, opt


def forward_backward(args, shared, expert, opt, step: int, rank: int):
    """Loss and the flat shared gradient [P] of rank ``rank`` at ``step`` (data seeded by both)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(args.batch, args.dim, generator=g)
    y = torch.randn(args.batch, args.dim, generator=g)
    loss = torch.nn.functional.mse_loss(expert(shared(x)), y)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    return loss.detach().clone(), torch.cat([p.grad.flatten() for p in shared.parameters()])


def finish_step(shared, opt, loss, summed_grads, world: int, reduce) -> torch.Tensor:
    """Average the summed shared gradient, step, and return the mean loss over ranks."""
    summed_grads /= world
    offset = 0
    for p in shared.parameters():
        p.grad.copy_(summed_grads[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    opt.step()
    reduce(loss)
    return loss / world


def simulate(args, world: int = 2) -> tuple[dict[int, str], list[str]]:
    """The uninterrupted job in this process: {step: loss hex}, per-rank final digests. Exact for
    world=2 only (a sum of two floats does not depend on the order; gloo's ring over more ranks
    adds in its own order)."""
    if world != 2:
        raise ValueError(f"world={world}: the in-process reference is bit exact only for 2 ranks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the job: matmul reductions split over threads round differently
    try:
        return _simulate(args, world)
    finally:
        torch.set_num_threads(threads)


def _simulate(args, world: int):
    ranks = [build(args, r) for r in range(world)]
    losses = {}
    for step in range(args.steps):
        outs = [forward_backward(args, *ranks[r], step, r) for r in range(world)]
        total_grads = outs[0][1] + outs[1][1]
        total_loss = outs[0][0] + outs[1][0]
        mean = None
        for r in range(world):
            mean = finish_step(ranks[r][0], ranks[r][2], outs[r][0], total_grads.clone(), world,
                               lambda t: t.copy_(total_loss))
        losses[step] = float(mean).hex()
    digests = [state_digest({"shared": s, "expert": e, "optimizer": o}) for s, e, o in ranks]
    return losses, digests


def read_losses(out: str) -> dict[int, list[str]]:
    """{step: [loss hex of every attempt that ran it]} from ``out/losses.jsonl``."""
    seen: dict[int, list[str]] = {}
    with open(os.path.join(out, "losses.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            seen.setdefault(record["step"], []).append(record["loss"])
    return seen


def read_reports(out: str, prefix: str = "restore") -> list[dict]:
    reports = []
    for name in sorted(os.listdir(out)):
        if name.startswith(prefix) and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                reports.append(json.load(f))
    return reports


def state_digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        sd = state[name].state_dict()
        flat = []
        _walk(sd, name, flat)
        for key, t in sorted(flat, key=lambda kv: kv[0]):
            h.update(key.encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _walk(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out.append((prefix, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}.{i}", out)


def kill_own_node() -> None:
    """Node loss from inside: freeze every process of this node, wipe its /dev/shm and /tmp,
    SIGKILL them (the keeper and the namespace holder included), then this process."""
    from heddle.cluster import netns

    tag, node = os.environ["HEDDLE_CLUSTER_TAG"], int(os.environ["HEDDLE_CLUSTER_NODE"])
    state = netns.read_state(tag)
    ns = state["node_ns"][node]
    me = os.getpid()
    progress(-1, "kill")
    netns.kill_pids_of_netns(ns, keep=lambda p: p == me)
    os.system(netns.WIPE_NODE_MEMORY)  # run inside the node: its own /dev/shm and /tmp
    os.kill(me, 9)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    heddle.init_distributed(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("HEDDLE_CLUSTER_ATTEMPT", "0"))
    node = int(os.environ.get("HEDDLE_CLUSTER_NODE", "0"))
    local_rank = hd.local_rank()
    os.makedirs(args.out, exist_ok=True)
    shared, expert, opt = build(args, rank)
    state = {"shared": shared, "expert": expert, "optimizer": opt}
    ckpt = Checkpointer(args.ckpt or os.path.join(args.out, "ckpt"), keep=2,
                        levels=tuple(args.levels.split(",")), flush=args.flush,
                        redundancy=None if args.redundancy == "none" else args.redundancy, keeper_linger=600)
    t0 = time.time()
    restored = ckpt.restore(state)
    restore_s = time.time() - t0
    report = {"rank": rank, "node": node, "attempt": attempt, "restore_s": restore_s, "t": time.time(),
              "last_restore": {k: v for k, v in getattr(ckpt, "last_restore", {}).items()
                               if isinstance(v, (int, float, str, type(None)))}}
    with open(os.path.join(args.out, f"restore-a{attempt}-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    start = 0 if restored is None else restored + 1
    self_kill = (args.self_kill_step is not None and node == args.self_kill_node and local_rank == 0
                 and attempt == 0)
    for step in range(start, args.steps):
        loss, grads = forward_backward(args, shared, expert, opt, step, rank)
        hd.all_reduce(grads)
        mean = finish_step(shared, opt, loss, grads, world, hd.all_reduce)
        if rank == 0:
            with open(os.path.join(args.out, "losses.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": float(mean).hex(), "attempt": attempt}) + "\n")
        progress(step)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % args.save_every == 0:
            killing = self_kill and step == args.self_kill_step
            if killing and args.self_kill_phase == "transfer":
                timer = threading.Timer(args.self_kill_delay_ms / 1e3, kill_own_node)
                timer.daemon = True
                progress(step, "transfer")
                timer.start()
            handle = ckpt.save(step, state)
            progress(step, "snapshot")
            if killing and args.self_kill_phase == "snapshot":
                kill_own_node()
            if killing and args.self_kill_phase == "flush":
                handle.wait_snapshot()
                progress(step, "flush", durable=handle.durable())
                kill_own_node()
    ckpt.wait()
    with open(os.path.join(args.out, f"final-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "digest": state_digest(state), "steps": args.steps}, f)
    ckpt.close(shutdown_keeper_process=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
