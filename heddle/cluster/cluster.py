"""An emulated cluster on one machine: N nodes with their own network, memory and tmp.

    from heddle.cluster import Cluster
    with Cluster(nodes=2, nproc_per_node=2, rate="10gbit", delay="50us") as cluster:
        result = cluster.run(["train.py", "--steps", "20"])          # heddle run on every node
        result = cluster.run(["train.py"], kill_node=1, kill_at_step=5, max_restarts=1)
        cluster.exec(0, ["cat", "/proc/net/dev"])                    # any command on node 0
        cluster.kill_node(1)                                          # SIGKILL + wipe /dev/shm

``run`` starts ``heddle run --nnodes N --node-rank i --master-addr <node 0> -n K ...`` on every
node (``launcher="mpirun"`` / ``"slurm"`` for the other bootstraps) and supervises them. Node
loss and recovery is heddle's own relaunch (docs/cluster.md says why not torchrun's elastic
agent): when a node is killed, the job processes of the survivors are killed too (their keepers
and memory stay), the lost node comes back as a fresh node (new mount namespace: empty /dev/shm
and /tmp, same address), and every node starts the next attempt with a new rendezvous.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time

from heddle.cluster import netns
from heddle.cluster.progress import DIR_ENV, ProgressTail

MASTER_PORT = 29400


@dataclasses.dataclass
class KillEvent:
    nodes: list[int]
    t: float                 # time.time() of the SIGKILL
    attempt: int             # the attempt it ended
    trigger: dict | None     # the progress marker that triggered it (None: by hand or timer)
    reaction_s: float | None # marker written -> kill done


@dataclasses.dataclass
class RunResult:
    returncodes: list[int]
    attempts: int
    kills: list[KillEvent]
    logs: list[str]                      # one log file per (attempt, node)
    progress: list[dict]
    recovery_s: list[float]              # per kill: kill -> first "step" marker of the next attempt

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def log_text(self) -> str:
        out = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                out.append(f"===== {os.path.basename(path)}\n{f.read()}")
        return "\n".join(out)


class Cluster:
    """Context manager; see the module docstring. ``shared_dir`` is a directory every node sees
    (scripts, checkpoints, results); /tmp and /dev/shm are private to each node."""

    def __init__(self, nodes: int, nproc_per_node: int = 1, rate: str | None = None, delay: str | None = None,
                 loss: str | None = None, *, tag: str | None = None, shared_dir: str | None = None,
                 shm_size: str = "50%", python: str | None = None):
        if not isinstance(nodes, int) or nodes < 1 or nodes > 250:
            raise ValueError(f"nodes={nodes!r} must be an int in [1, 250]")
        if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={nproc_per_node!r} must be an int >= 1")
        netns.parse_rate(rate), netns.parse_delay(delay), netns.parse_loss(loss)   # validate early
        self.num_nodes, self.nproc_per_node = nodes, nproc_per_node
        self.rate, self.delay, self.loss = rate, delay, loss
        self.tag = tag or f"p{os.getpid()}x{int(time.time() * 1000) % 100000}"
        if not all(c.isalnum() for c in self.tag) or len(self.tag) > 24:
            raise ValueError(f"tag={self.tag!r} must be alphanumeric, at most 24 characters")
        self.shm_size = shm_size
        self.python = python or sys.executable
        self._remove_shared = shared_dir is None
        self.shared_dir = shared_dir   # made in start(), after the prerequisites are checked
        self.names = netns.names(self.tag, nodes)
        self.addresses: list[str] = self.names["addresses"]
        self.init_pids: list[int | None] = [None] * nodes
        self._inits: list[subprocess.Popen | None] = [None] * nodes
        self._reaper: subprocess.Popen | None = None
        self._attempt = 0
        self.started = False

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        netns.check_prerequisites()
        if self.shared_dir is None:
            self.shared_dir = tempfile.mkdtemp(prefix=f"heddle-cluster-{self.tag}-", dir="/var/tmp")
        os.makedirs(self.shared_dir, exist_ok=True)
        self._save_state()
        # the reaper tears everything down if this process dies without close() (SIGKILL included)
        self._reaper = subprocess.Popen([self.python, "-m", "heddle.cluster.reaper", self.tag, str(os.getpid())],
                                        start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started = True
        try:
            self._save_state()
            netns.create_network(self.tag, self.num_nodes, self.rate, self.delay, self.loss)
            hosts = os.path.join(netns.STATE_ROOT, self.tag, "hosts")
            with open(hosts, "w") as f:
                f.write("127.0.0.1 localhost\n")
                f.writelines(f"{addr} node{i}\n" for i, addr in enumerate(self.addresses))
            for i in range(self.num_nodes):
                self._start_node(i)
        except BaseException:
            self.close()
            raise

    def _save_state(self) -> None:
        netns.write_state(self.tag, {
            "tag": self.tag, "owner_pid": os.getpid(), "nodes": self.num_nodes,
            "nproc_per_node": self.nproc_per_node, "rate": self.rate, "delay": self.delay, "loss": self.loss,
            "addresses": self.addresses, "node_ns": self.names["node_ns"], "init_pids": self.init_pids,
            "shared_dir": self.shared_dir, "remove_shared": self._remove_shared,
            "reaper_pid": self._reaper.pid if self._reaper else None, "python": self.python})

    def _start_node(self, i: int) -> None:
        hosts = os.path.join(netns.STATE_ROOT, self.tag, "hosts")
        import heddle

        # a checkout, venv or working directory under /tmp stays visible inside the node
        keep = netns.paths_kept_under_tmp([sys.prefix, sys.executable, os.getcwd(), self.shared_dir,
                                           os.path.dirname(os.path.dirname(os.path.abspath(heddle.__file__)))])
        argv = netns.node_init_argv(self.names["node_ns"][i], i, hosts, self.shm_size, tuple(keep))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True, env={**os.environ, "HEDDLE_CLUSTER_TAG": self.tag})
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise RuntimeError(f"node {i} did not start: {line} {proc.stderr.read().strip()}")
        # the sleeping process is the holder of the namespaces (sh exec'd into sleep)
        self._inits[i], self.init_pids[i] = proc, proc.pid
        self._save_state()

    def close(self) -> None:
        if not self.started:
            return
        self.started = False
        for proc in self._inits:
            if proc is not None:
                proc.stdout.close()
                proc.stderr.close()
        netns.destroy(self.tag)
        for proc in self._inits:
            if proc is not None:
                proc.wait()
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper.wait()

    # -- commands on nodes ------------------------------------------------------------------
    def node_env(self, i: int, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env.update({"GLOO_SOCKET_IFNAME": netns.NODE_IFACE, "TP_SOCKET_IFNAME": netns.NODE_IFACE,
                    "HEDDLE_CLUSTER_NODE": str(i), "HEDDLE_CLUSTER_NODES": str(self.num_nodes),
                    "HEDDLE_CLUSTER_TAG": self.tag, DIR_ENV: self.shared_dir,
                    "HEDDLE_CLUSTER_ATTEMPT": str(self._attempt), "TMPDIR": "/tmp"})
        env.setdefault("OMP_NUM_THREADS", "1")
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
            env.pop(name, None)
        env.update(extra or {})
        return env

    def popen(self, i: int, argv: list[str], *, env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``i`` (its own session, so the supervisor can signal it)."""
        if self.init_pids[i] is None:
            raise RuntimeError(f"node {i} is down")
        return subprocess.Popen(netns.enter_argv(self.init_pids[i]) + list(argv), env=self.node_env(i, env),
                                start_new_session=True, **kwargs)

    def exec(self, i: int, argv: list[str], *, env: dict | None = None, timeout: float | None = 120,
             check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on node ``i`` and wait; returns the CompletedProcess (text output)."""
        proc = self.popen(i, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"node {i}: {shlex.join(argv)} timed out after {timeout}s: {err[-2000:]}") from None
        done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise RuntimeError(f"node {i}: {shlex.join(argv)} failed ({proc.returncode}): {err[-4000:]}")
        return done

    # -- node loss --------------------------------------------------------------------------
    def kill_node(self, i: int) -> float:
        """SIGKILL every process of node ``i`` (keeper included) and wipe its /dev/shm and /tmp.
        The node stays down until :meth:`replace_node`. Returns the time.time() of the kill."""
        if not 0 <= i < self.num_nodes:
            raise ValueError(f"node={i} must be in [0, {self.num_nodes})")
        ns = self.names["node_ns"][i]
        init = self.init_pids[i]
        netns.kill_pids_of_netns(ns, keep=lambda p: p == init)   # freeze-and-kill everything but the holder
        t = time.time()
        if init is not None:
            netns.wipe_node_memory(init)
            netns.kill_pids_of_netns(ns)
        if self._inits[i] is not None:
            self._inits[i].wait()
            self._inits[i].stdout.close()
            self._inits[i].stderr.close()
        self._inits[i], self.init_pids[i] = None, None
        self._save_state()
        return t

    def replace_node(self, i: int) -> None:
        """Bring node ``i`` back as a fresh machine: same address, empty /dev/shm and /tmp."""
        if self.init_pids[i] is not None:
            raise RuntimeError(f"node {i} is up; kill_node({i}) first")
        self._start_node(i)

    def stop_jobs(self, i: int) -> None:
        """Kill the job processes of node ``i`` but leave its checkpoint keeper and memory alone
        (a surviving node whose workers are restarted)."""
        init = self.init_pids[i]
        netns.kill_pids_of_netns(self.names["node_ns"][i], keep=lambda p: p == init or netns.is_keeper(p))

    # -- jobs -------------------------------------------------------------------------------
    def launch_argv(self, i: int, argv: list[str], launcher: str, port: int) -> tuple[list[str], dict]:
        """The command (and extra environment) that starts ``argv`` on node ``i``."""
        argv = list(argv)
        module = bool(argv) and argv[0] == "-m"
        master = self.addresses[0]
        if launcher == "torchrun":
            cmd = [self.python, "-m", "heddle.launch.cli", "run", "--nnodes", str(self.num_nodes),
                   "--node-rank", str(i), "--master-addr", master, "--master-port", str(port),
                   "-n", str(self.nproc_per_node)]
            return (cmd + (["-m"] + argv[1:] if module else argv)), {}
        if launcher == "slurm":
            # what srun would set, by hand: one task per process, nodes named node0..node{N-1}
            k = self.nproc_per_node
            env = {"SLURM_NTASKS": str(self.num_nodes * k), "SLURM_NODEID": str(i), "SLURM_NNODES": str(self.num_nodes),
                   "SLURM_NODELIST": f"node[0-{self.num_nodes - 1}]", "SLURM_JOB_ID": str(port),
                   "SLURM_JOB_NODELIST": f"node[0-{self.num_nodes - 1}]", "SLURMD_NODENAME": f"node{i}",
                   "SLURM_NTASKS_PER_NODE": str(k), "MASTER_PORT": str(port)}
            tasks = " ".join(f"SLURM_PROCID={i * k + local} SLURM_LOCALID={local} {shlex.join([self.python] + argv)} "
                             f"& p{local}=$!;" for local in range(k))
            # every task in the background; the node fails when any task fails
            waits = " ".join(f"wait $p{local} || rc=1;" for local in range(k))
            script = f"{tasks} rc=0; {waits} exit $rc"
            return ["sh", "-c", script], env
        raise ValueError(f"launcher={launcher!r}: valid are 'torchrun', 'slurm' (mpirun: Cluster.mpirun)")

    def run(self, argv: list[str], *, launcher: str = "torchrun", kill_node=None, kill_at_step: int | None = None,
            kill_at_phase: str = "step", kill_after_s: float | None = None, max_restarts: int = 0,
            replace_delay_s: float = 0.0, timeout: float | None = 600, env: dict | None = None) -> RunResult:
        """Run ``argv`` (a script and its arguments, or ``["-m", module, ...]``) on every node and
        supervise it. ``kill_node`` (an int, a list of ints, or "all") is killed when a rank of it
        reports ``progress(kill_at_step, kill_at_phase)`` (any rank when killing several nodes),
        or ``kill_after_s`` seconds after the start. After a kill or a failure the job is
        relaunched up to ``max_restarts`` times (see the module docstring)."""
        if not self.started:
            raise RuntimeError("cluster is not started (use it as a context manager or call start())")
        kill_nodes = self._kill_nodes(kill_node)
        if kill_nodes and kill_at_step is None and kill_after_s is None:
            raise ValueError("kill_node needs kill_at_step or kill_after_s")
        logs_dir = os.path.join(self.shared_dir, "logs")
        os.makedirs(logs_dir, exist_ok=True)
        tail = ProgressTail(self.shared_dir)
        tail.poll()   # markers of earlier runs are not this run's
        markers: list[dict] = []
        kills: list[KillEvent] = []
        logs: list[str] = []
        armed = bool(kill_nodes)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        restarts = 0
        while True:
            port = MASTER_PORT + (self._attempt % 500)
            procs = []
            for i in range(self.num_nodes):
                cmd, extra = self.launch_argv(i, argv, launcher, port)
                log_path = os.path.join(logs_dir, f"attempt{self._attempt}-node{i}.log")
                logs.append(log_path)
                with open(log_path, "w") as log:
                    procs.append(self.popen(i, cmd, env={**(env or {}), **extra}, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            attempt_start = time.time()
            killed = None
            while True:
                new = tail.poll()
                markers += new
                if armed:
                    hit = next((m for m in new if kill_at_step is not None and m["step"] == kill_at_step
                                and m["phase"] == kill_at_phase
                                and (len(kill_nodes) > 1 or m["node"] in kill_nodes)), None)
                    timer = kill_after_s is not None and time.time() - attempt_start >= kill_after_s
                    if hit is not None or timer:
                        for i in kill_nodes:
                            self.kill_node(i)
                        t = time.time()
                        killed = KillEvent(kill_nodes, t, self._attempt, hit, (t - hit["t"]) if hit else None)
                        kills.append(killed)
                        armed = False
                        break
                lost = [i for i, init in enumerate(self._inits) if init is not None and init.poll() is not None]
                if lost:   # `heddle cluster kill-node` from another shell
                    for i in lost:
                        self.kill_node(i)
                    markers += tail.poll()
                    own = [m for m in markers if m["phase"] == "kill" and m["node"] in lost
                           and m["attempt"] == self._attempt]
                    # a job that kills its own node (elastic_job --self-kill-*) marks the moment
                    killed = KillEvent(lost, own[0]["t"] if own else time.time(), self._attempt,
                                       own[0] if own else None, None)
                    kills.append(killed)
                    break
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0) for c in codes) and restarts < max_restarts:
                    break   # a failed node: relaunch everything
                if deadline is not None and time.monotonic() > deadline:
                    for i in range(self.num_nodes):
                        if self.init_pids[i] is not None:
                            self.stop_jobs(i)
                    for p in procs:
                        p.wait()
                    raise TimeoutError(f"cluster run timed out after {timeout}s; logs in {logs_dir}")
                time.sleep(0.01)
            codes = [p.poll() for p in procs]
            if killed is None and all(c is not None for c in codes) and (
                    all(c == 0 for c in codes) or restarts >= max_restarts):
                break
            if killed is None:
                # a failure may be a node killed from outside (`heddle cluster kill-node`) whose
                # holder is still dying: give it a moment, then count it as a node loss
                time.sleep(0.5)
                lost = [i for i, init in enumerate(self._inits) if init is not None and init.poll() is not None]
                if lost:
                    for i in lost:
                        self.kill_node(i)
                    killed = KillEvent(lost, time.time(), self._attempt, None, None)
                    kills.append(killed)
            # relaunch: survivors' jobs stop (keepers and /dev/shm stay); lost nodes come back fresh
            for i in range(self.num_nodes):
                if self.init_pids[i] is not None:
                    self.stop_jobs(i)
            for p in procs:
                p.wait()
            if killed is not None:
                time.sleep(replace_delay_s)
                for i in killed.nodes:
                    self.replace_node(i)
            if restarts >= max_restarts:
                break
            restarts += 1
            self._attempt += 1
        markers += tail.poll()
        recovery = []
        for k in kills:
            first = next((m for m in markers if m["phase"] == "step" and m["attempt"] > k.attempt
                          and m["t"] > k.t), None)
            if first is not None:
                recovery.append(first["t"] - k.t)
        self._attempt += 1
        return RunResult([p.returncode for p in procs], restarts + 1, kills, logs, markers, recovery)

    def mpirun(self, argv: list[str], *, timeout: float | None = 600, env: dict | None = None,
               mpiexec: str | None = None) -> RunResult:
        """Run ``argv`` under MPICH's Hydra (``mpiexec``) started on node 0, with
        ``nproc_per_node`` ranks on every node. Hydra reaches the other nodes through its "ssh"
        launcher pointed at a small script that enters the node's namespaces instead of ssh."""
        if not self.started:
            raise RuntimeError("cluster is not started")
        if any(pid is None for pid in self.init_pids):
            raise RuntimeError(f"every node must be up for mpirun; down: "
                               f"{[i for i, pid in enumerate(self.init_pids) if pid is None]}")
        mpiexec = mpiexec or os.path.join(os.path.dirname(self.python), "mpiexec")
        if not os.path.exists(mpiexec):
            raise RuntimeError(f"{mpiexec} not found: pip install mpich mpi4py (heddle[test])")
        wrapper = os.path.join(netns.STATE_ROOT, self.tag, "node-exec.sh")
        cases = "".join(f"  node{i}|{addr}) pid={pid} ;;\n"
                        for i, (addr, pid) in enumerate(zip(self.addresses, self.init_pids)))
        with open(wrapper, "w") as f:
            # called as an ssh stand-in: [ssh options] HOST COMMAND...
            f.write("#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nhost=$1; shift\n"
                    f"case $host in\n{cases}  *) echo \"node-exec: unknown host $host\" >&2; exit 255 ;;\nesac\n"
                    'exec nsenter --target $pid --net --mount --uts -- sh -c "$*"\n')
        os.chmod(wrapper, 0o755)
        hosts = ",".join(f"node{i}:{self.nproc_per_node}" for i in range(self.num_nodes))
        module = bool(argv) and argv[0] == "-m"
        cmd = [mpiexec, "-launcher", "ssh", "-launcher-exec", wrapper, "-iface", netns.NODE_IFACE,
               "-hosts", hosts, "-wdir", os.getcwd(), "-n", str(self.num_nodes * self.nproc_per_node),
               "-genv", "GLOO_SOCKET_IFNAME", netns.NODE_IFACE, "-genv", DIR_ENV, self.shared_dir,
               "-genv", "HEDDLE_CLUSTER_TAG", self.tag, "-genv", "OMP_NUM_THREADS", "1",
               self.python] + list(argv if module else argv)
        logs_dir = os.path.join(self.shared_dir, "logs")
        os.makedirs(logs_dir, exist_ok=True)
        log_path = os.path.join(logs_dir, f"attempt{self._attempt}-mpirun.log")
        with open(log_path, "w") as log:
            proc = self.popen(0, cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for i in range(self.num_nodes):
                    self.stop_jobs(i)
                proc.wait()
                raise TimeoutError(f"mpirun timed out after {timeout}s; log {log_path}") from None
        self._attempt += 1
        return RunResult([proc.returncode], 1, [], [log_path], [], [])

    def _kill_nodes(self, kill_node) -> list[int]:
        if kill_node is None:
            return []
        if kill_node == "all":
            return list(range(self.num_nodes))
        nodes = [kill_node] if isinstance(kill_node, int) else list(kill_node)
        for i in nodes:
            if not isinstance(i, int) or not 0 <= i < self.num_nodes:
                raise ValueError(f"kill_node={kill_node!r}: each must be a node index in [0, {self.num_nodes}) or 'all'")
        return sorted(set(nodes))
