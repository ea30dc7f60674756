"""Launcher flags: declaration (shared by ``heddle run`` and ``heddle bench``) and validation.

Everything here is checked in the launcher, before any worker starts, and a bad value is one
line naming the flag, its value and what is valid (``check_launch_options``).
"""

from __future__ import annotations

import argparse
import sys

# torchrun's multi-node flags, passed through by `heddle run` and `heddle bench`.
LAUNCH_FLAGS = ("nnodes", "node_rank", "master_addr", "master_port", "rdzv_backend", "rdzv_endpoint", "rdzv_id")
RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: message``), not usage + message."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def add_launch_options(parser) -> None:
    """Add torchrun's multi-node flags (``LAUNCH_FLAGS``) to a parser or argument group.

    Values stay strings here so that ``check_launch_options`` can name a bad one in its message."""
    parser.add_argument("--nnodes", default="1", help="nodes: N or MIN:MAX (default 1)")
    parser.add_argument("--node-rank", default=None, help="this node's rank, 0 <= R < nnodes")
    parser.add_argument("--master-addr", default=None, help="address of node 0 (static rendezvous)")
    parser.add_argument("--master-port", default=None, help="port on node 0, 1-65535")
    parser.add_argument("--rdzv-backend", default=None, help="rendezvous backend: " + ", ".join(RDZV_BACKENDS))
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST[:PORT] of the rendezvous")
    parser.add_argument("--rdzv-id", default=None, help="job id shared by every node")


def _int(flag: str, value, valid: str) -> int:
    try:
        return int(str(value), 10)
    except ValueError:
        raise ValueError(f"{flag}={value!r} is not an integer; valid: {valid}") from None


def parse_nnodes(value) -> tuple[int, int]:
    """``"2"`` -> (2, 2), ``"1:4"`` -> (1, 4); ValueError naming --nnodes otherwise."""
    valid = "N or MIN:MAX with 1 <= MIN <= MAX"
    text = str(value)
    parts = text.split(":")
    if len(parts) > 2:
        raise ValueError(f"--nnodes={text!r} is not N or MIN:MAX; valid: {valid}")
    low = _int("--nnodes", parts[0], valid) if parts[0] else None
    high = _int("--nnodes", parts[-1], valid) if parts[-1] else None
    if low is None or high is None or low < 1 or high < low:
        raise ValueError(f"--nnodes={text!r} is out of range; valid: {valid}")
    return low, high


def check_port(flag: str, value) -> int:
    port = _int(flag, value, "an integer in 1-65535")
    if not 1 <= port <= 65535:
        raise ValueError(f"{flag}={value!r} is out of range; valid: 1-65535")
    return port


def check_launch_options(args) -> None:
    """Validate the ``LAUNCH_FLAGS`` of parsed ``args`` (and ``max_restarts`` when present).

    Converts ``node_rank`` and ``master_port`` to ints in place; raises ValueError (one line)."""
    _, max_nodes = parse_nnodes(args.nnodes)
    if args.node_rank is not None:
        rank = _int("--node-rank", args.node_rank, f"0 <= R < {max_nodes} (--nnodes={args.nnodes})")
        if not 0 <= rank < max_nodes:
            raise ValueError(f"--node-rank={args.node_rank!r} is out of range; valid: 0 <= R < {max_nodes} "
                             f"(--nnodes={args.nnodes})")
        args.node_rank = rank
    if args.master_port is not None:
        args.master_port = check_port("--master-port", args.master_port)
    if args.master_addr is not None and not str(args.master_addr).strip():
        raise ValueError("--master-addr='' is empty; valid: a host name or IP address")
    if args.rdzv_backend is not None and args.rdzv_backend not in RDZV_BACKENDS:
        raise ValueError(f"--rdzv-backend={args.rdzv_backend!r} is unknown; valid: {', '.join(RDZV_BACKENDS)}")
    if args.rdzv_endpoint is not None:
        host, _, port = str(args.rdzv_endpoint).rpartition(":") if ":" in str(args.rdzv_endpoint) else (
            args.rdzv_endpoint, "", None)
        if not host:
            raise ValueError(f"--rdzv-endpoint={args.rdzv_endpoint!r} has no host; valid: HOST or HOST:PORT")
        if port is not None:
            check_port("--rdzv-endpoint port", port)
    max_restarts = getattr(args, "max_restarts", None)
    if max_restarts is not None:
        restarts = _int("--max-restarts", max_restarts, "an integer >= 0")
        if restarts < 0:
            raise ValueError(f"--max-restarts={max_restarts!r} is out of range; valid: an integer >= 0")
        args.max_restarts = restarts


def is_multi_node(args) -> bool:
    """More than one node, or an address given: torchrun's rendezvous. Otherwise the run stays
    on this machine and its store listens on 127.0.0.1 only."""
    _, max_nodes = parse_nnodes(args.nnodes)
    return max_nodes > 1 or any(getattr(args, f) is not None for f in ("master_addr", "rdzv_endpoint"))
