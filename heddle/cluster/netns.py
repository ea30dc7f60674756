"""The plumbing of an emulated cluster: network namespaces, a bridge, veth links, tc shaping,
one mount namespace per node, and teardown that leaves nothing behind.

Layout of a cluster with tag T and N nodes (every name lives in a namespace this module creates,
so two clusters with different tags never collide and no address exists in the host's namespace):

    netns heddle-T-br : bridge br0, ports n0 .. n{N-1}       (the "switch")
    netns heddle-T-n{i}: lo, eth0 = 10.77.0.{i+1}/24          (node i)
    eth0 <-veth-> n{i}

Shaping (only on the inter-node veths; ranks of one node talk over the node's loopback, which
the kernel uses for the node's own address too):
    eth0 (node egress)  root tbf rate R  ->  child netem delay D loss L
    n{i} (node ingress) root tbf rate R
so every node's NIC carries at most R in each direction and a packet crosses the wire with
one-way delay D (round trip 2D).

A node's processes run in a mount + UTS namespace held by a small "node init" process (see
:func:`node_init_argv`): private tmpfs on /dev/shm and /tmp, /etc/hosts naming node0..node{N-1},
hostname node{i}. When every process of a node dies the namespace and its tmpfs die with it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

PREFIX = "heddle-"
STATE_ROOT = "/run/heddle-cluster"
SUBNET = "10.77.0"
NODE_IFACE = "eth0"
KEEPER_MARK = "heddle/checkpoint/keeper.py"


class ClusterUnavailable(RuntimeError):
    """This machine cannot host an emulated cluster (not root, or iproute2 missing)."""


def check_prerequisites() -> None:
    """Raise :class:`ClusterUnavailable` with a one-line reason when namespaces cannot be made."""
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"heddle cluster needs root (network and mount namespaces); running as uid {os.geteuid()}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterUnavailable(f"heddle cluster needs iproute2 ({', '.join(missing)} not found): apt-get install iproute2")
    missing = [tool for tool in ("nsenter", "unshare", "mount") if shutil.which(tool) is None]
    if missing:
        raise ClusterUnavailable(f"heddle cluster needs util-linux ({', '.join(missing)} not found): apt-get install util-linux")


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_LOSS = re.compile(r"^(\d+(?:\.\d+)?)%$")


def parse_rate(rate: str | None) -> float | None:
    """"10gbit" -> 1e10 bits/s (tc's decimal units); None/"none" -> None (unshaped)."""
    if rate is None or str(rate).lower() in ("", "none"):
        return None
    match = _RATE.match(str(rate).lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"rate={rate!r} must be a positive tc rate like 100mbit, 1gbit, 10gbit (or None)")
    scale = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}[match.group(2)]
    return float(match.group(1)) * scale


def parse_delay(delay: str | None) -> float:
    """"50us" -> 5e-5 seconds; None -> 0."""
    if delay is None or str(delay) in ("", "0"):
        return 0.0
    match = _TIME.match(str(delay).lower())
    if match is None:
        raise ValueError(f"delay={delay!r} must be a tc time like 50us, 2ms (or None)")
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]


def parse_loss(loss: str | None) -> float:
    if loss is None or str(loss) in ("", "0", "0%"):
        return 0.0
    match = _LOSS.match(str(loss))
    if match is None or float(match.group(1)) >= 100:
        raise ValueError(f"loss={loss!r} must be a percentage below 100 like 0.1%")
    return float(match.group(1))


def names(tag: str, num_nodes: int) -> dict:
    return {"bridge_ns": f"{PREFIX}{tag}-br",
            "node_ns": [f"{PREFIX}{tag}-n{i}" for i in range(num_nodes)],
            "addresses": [f"{SUBNET}.{i + 1}" for i in range(num_nodes)]}


def _tbf(dev_args: list[str], rate_bps: float, parent: list[str]) -> None:
    # burst: at least two 64 KiB GSO super-packets, else about 2 ms of traffic at the rate (with
    # 1 ms a single TCP stream reached 81% of 1gbit here, with 2 ms 95%)
    burst = max(128 * 1024, int(rate_bps / 8 * 2e-3))
    sh(*dev_args, *parent, "tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "100ms")


def _netem(*argv: str) -> None:
    try:
        sh(*argv)
    except RuntimeError as e:
        if "unknown" in str(e).lower():
            raise ClusterUnavailable("--delay/--loss need the netem qdisc, which this kernel does not have "
                                     "(tc: 'Specified qdisc kind is unknown'); rate shaping (tbf) works") from None
        raise


def create_network(tag: str, num_nodes: int, rate: str | None, delay: str | None, loss: str | None) -> dict:
    """Make the bridge namespace, one namespace per node, the veths and the shaping."""
    n = names(tag, num_nodes)
    rate_bps, delay_s, loss_pct = parse_rate(rate), parse_delay(delay), parse_loss(loss)
    br = n["bridge_ns"]
    sh("ip", "netns", "add", br)
    sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", br, "link", "set", "br0", "up")
    for i, (ns, addr) in enumerate(zip(n["node_ns"], n["addresses"])):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", NODE_IFACE, "netns", ns, "type", "veth", "peer", "name", f"n{i}", "netns", br)
        sh("ip", "-n", br, "link", "set", f"n{i}", "master", "br0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", NODE_IFACE)
        sh("ip", "-n", ns, "link", "set", NODE_IFACE, "up")
        node_dev = ["tc", "-n", ns, "qdisc", "add", "dev", NODE_IFACE]
        netem = []
        if delay_s > 0:
            netem += ["delay", f"{delay_s * 1e6:.0f}us"]
        if loss_pct > 0:
            netem += ["loss", f"{loss_pct}%"]
        if rate_bps is not None:
            _tbf(node_dev, rate_bps, ["root", "handle", "1:"])
            if netem:
                _netem(*node_dev, "parent", "1:1", "handle", "10:", "netem", "limit", "100000", *netem)
            _tbf(["tc", "-n", br, "qdisc", "add", "dev", f"n{i}"], rate_bps, ["root"])
        elif netem:
            _netem(*node_dev, "root", "netem", "limit", "100000", *netem)
    return n


def paths_kept_under_tmp(paths) -> list[str]:
    """The top-level entries of /tmp that ``paths`` live in (a checkout or a venv under /tmp): a
    node's private /tmp would hide them from its own processes, so each node binds them back."""
    kept = set()
    for path in paths:
        parts = os.path.realpath(path).split(os.sep)
        if len(parts) > 2 and parts[1] == "tmp" and parts[2]:
            kept.add(os.path.join("/tmp", parts[2]))
    return sorted(kept)


def node_init_argv(ns: str, node: int, hosts_file: str, shm_size: str = "50%", keep: tuple[str, ...] = ()) -> list[str]:
    """The process that holds node ``node``'s mount and UTS namespaces: it mounts the private
    tmpfs, names the host, prints "ready" and sleeps until killed.

    keep: entries of the machine's /tmp (see :func:`paths_kept_under_tmp`) bound into the node's
    private /tmp, reached through a bind of the old /tmp staged on the new /dev/shm and removed
    again, so nothing else of the machine's /tmp is visible."""
    binds = "".join(f"mkdir -p {q} && mount --bind /dev/shm/.heddle-host-tmp{q[len('/tmp'):]} {q} && "
                    for q in map(shlex.quote, keep))
    stage = ("mkdir /dev/shm/.heddle-host-tmp && mount --bind /tmp /dev/shm/.heddle-host-tmp && " if keep else "")
    unstage = ("umount /dev/shm/.heddle-host-tmp && rmdir /dev/shm/.heddle-host-tmp && " if keep else "")
    script = (f"mount -t tmpfs -o size={shm_size},mode=1777 heddle-shm /dev/shm && {stage}"
              f"mount -t tmpfs -o mode=1777 heddle-tmp /tmp && {binds}{unstage}"
              f"mount --bind {hosts_file} /etc/hosts && hostname node{node} && "
              f"echo ready && exec sleep infinity")
    return ["ip", "netns", "exec", ns, "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", script]


def enter_argv(init_pid: int) -> list[str]:
    """Prefix that runs a command inside a node (its network, mount and UTS namespaces)."""
    return ["nsenter", "--target", str(init_pid), "--net", "--mount", "--uts", "--"]


def netns_pids(ns: str) -> list[int]:
    proc = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def is_keeper(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return KEEPER_MARK.encode() in f.read()
    except OSError:
        return False


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_pids_of_netns(ns: str, *, keep=lambda pid: False, timeout: float = 10.0) -> list[int]:
    """SIGSTOP every process of netns ``ns`` (except ``keep``) until no new one appears (a
    forking process cannot escape), then SIGKILL them and wait until they are gone."""
    stopped: set[int] = set()
    for _ in range(50):
        pids = {p for p in netns_pids(ns) if not keep(p)} - stopped
        if not pids:
            break
        _signal_all(pids, signal.SIGSTOP)
        stopped |= pids
    _signal_all(stopped, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in netns_pids(ns) if not keep(p) and p in stopped]
        new = [p for p in netns_pids(ns) if not keep(p) and p not in stopped]
        if new:
            _signal_all(new, signal.SIGKILL)
            stopped |= set(new)
        if not alive and not new:
            break
        time.sleep(0.01)
    return sorted(stopped)


WIPE_NODE_MEMORY = "find /dev/shm /tmp -xdev -mindepth 1 -delete 2>/dev/null; true"


def wipe_node_memory(init_pid: int) -> None:
    """Empty the node's /dev/shm and /tmp (as a power loss would). ``-xdev``: never into what a
    node binds back from the machine's /tmp (a checkout or venv, see :func:`node_init_argv`)."""
    sh("nsenter", "--target", str(init_pid), "--mount", "--", "sh", "-c", WIPE_NODE_MEMORY, check=False)


def destroy(tag: str) -> list[str]:
    """Remove every process, namespace and state file of cluster ``tag``. Returns what it removed."""
    removed = []
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    mine = sorted({line.split()[0] for line in listed if line.strip() and line.split()[0].startswith(f"{PREFIX}{tag}-")})
    for ns in mine:
        if ns.endswith("-br"):
            continue
        if kill_pids_of_netns(ns):
            removed.append(f"processes of {ns}")
    for ns in mine:
        kill_pids_of_netns(ns)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    state_dir = os.path.join(STATE_ROOT, tag)
    state = read_state(tag)
    if state is not None:
        reaper = state.get("reaper_pid")
        if reaper and reaper != os.getpid():
            _signal_all([reaper], signal.SIGKILL)
        if state.get("remove_shared") and state.get("shared_dir"):
            shutil.rmtree(state["shared_dir"], ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return removed


def write_state(tag: str, state: dict) -> None:
    os.makedirs(os.path.join(STATE_ROOT, tag), exist_ok=True)
    path = os.path.join(STATE_ROOT, tag, "state.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def read_state(tag: str) -> dict | None:
    try:
        with open(os.path.join(STATE_ROOT, tag, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_clusters() -> dict[str, dict | None]:
    """Every cluster tag with a namespace or a state file on this machine -> its state (or None)."""
    tags = set()
    for line in sh("ip", "netns", "list", check=False).stdout.split("\n"):
        if line.strip().startswith(PREFIX):
            match = re.match(rf"^{PREFIX}(.+)-(br|n\d+)$", line.split()[0])
            if match:
                tags.add(match.group(1))
    if os.path.isdir(STATE_ROOT):
        tags |= set(os.listdir(STATE_ROOT))
    return {tag: read_state(tag) for tag in sorted(tags)}


def leftovers(tag: str) -> list[str]:
    """What of cluster ``tag`` still exists (namespaces, state): empty after a complete teardown."""
    found = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.split("\n")
             if line.strip() and line.split()[0].startswith(f"{PREFIX}{tag}-")]
    if os.path.exists(os.path.join(STATE_ROOT, tag)):
        found.append(os.path.join(STATE_ROOT, tag))
    return found
