"""The one-node launcher behind ``heddle run``: N workers on this machine, supervised.

It does what torchrun's agent does for one node, with three differences that matter here:

- the store the workers rendezvous through listens on 127.0.0.1 only (torchrun's standalone
  store listens on every interface);
- a worker that exits with code C makes the launcher exit with C (the first failure), after it
  stops the other workers; a worker killed by signal S counts as 128 + S;
- the workers die with the launcher: SIGTERM, SIGINT or SIGHUP to the launcher stop them (SIGTERM,
  and SIGCONT for a stopped one, then SIGKILL after a grace period), and a SIGKILLed launcher
  takes them along through ``PR_SET_PDEATHSIG`` (see :mod:`heddle.launch.worker`).

Workers get torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
ROLE_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT, ...) with
TORCHELASTIC_USE_AGENT_STORE=True, so ``init_process_group("env://")`` joins the launcher's store
as a client, exactly as under torchrun. ``--max-restarts K`` restarts every worker up to K times
after a failure (TORCHELASTIC_RESTART_COUNT counts them; the store keys of each attempt are
prefixed by it, as torch does).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from heddle.launch.worker import LAUNCHER_PID_ENV, WORKER_PATH

STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL
POLL_S = 0.05
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def log(message: str) -> None:
    print(f"heddle run: {message}", file=sys.stderr, flush=True)


def loopback_store():
    """A TCPStore server that listens on 127.0.0.1 only (a free port): (store, port).

    TCPStore binds every interface when it opens its own socket; handing it a socket already
    bound to the loopback address (``master_listen_fd``) keeps it off the network."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, None, True, wait_for_workers=False, multi_tenant=True,
                          master_listen_fd=sock.detach())
    return store, port


def exit_code(returncode: int) -> int:
    """A Popen return code as a shell reports it: -S (killed by signal S) -> 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class LocalLauncher:
    """Start ``nproc`` workers running ``target`` (a script path, or a module with ``module=True``)."""

    def __init__(self, target: str, args: list[str], nproc: int, *, module: bool = False,
                 max_restarts: int = 0, stop_grace_s: float = STOP_GRACE_S, extra_env: dict | None = None):
        if nproc < 1:
            raise ValueError(f"nproc={nproc} must be >= 1")
        self.target, self.args, self.nproc, self.module = target, list(args), nproc, module
        self.max_restarts, self.stop_grace_s = max_restarts, stop_grace_s
        self.extra_env = dict(extra_env or {})
        self.run_id = uuid.uuid4().hex[:12]
        self.procs: list[subprocess.Popen] = []
        self._signal: int | None = None

    def _env(self, rank: int, port: int, attempt: int) -> dict:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.setdefault("OMP_NUM_THREADS", "1")
        n = str(self.nproc)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_NAME="default",
                   WORLD_SIZE=n, LOCAL_WORLD_SIZE=n, GROUP_WORLD_SIZE="1", ROLE_WORLD_SIZE=n,
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                   TORCHELASTIC_RESTART_COUNT=str(attempt), TORCHELASTIC_MAX_RESTARTS=str(self.max_restarts),
                   TORCHELASTIC_RUN_ID=self.run_id, TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
                   **{LAUNCHER_PID_ENV: str(os.getpid())})
        return env

    def _command(self) -> list[str]:
        return [sys.executable, WORKER_PATH, *(["-m"] if self.module else []),
                self.target, *self.args]

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal while stopping: no more grace
            self._send(signal.SIGKILL)
            return
        self._signal = signum
        self._send(signal.SIGTERM)
        raise _Stop(signum)

    def _send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                    if sig == signal.SIGTERM:
                        p.send_signal(signal.SIGCONT)  # a stopped worker acts on SIGTERM only once continued
                except ProcessLookupError:
                    pass

    def stop_workers(self) -> None:
        """SIGTERM (+ SIGCONT) every live worker; SIGKILL whatever is left after the grace period."""
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self._send(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def _attempt(self, port: int, attempt: int) -> tuple[int, int] | None:
        """Run the workers once: None when all exit 0, else (rank, exit code) of the first failure."""
        self.procs = []
        for rank in range(self.nproc):
            self.procs.append(subprocess.Popen(self._command(), env=self._env(rank, port, attempt)))
        while True:
            running = False
            for rank, p in enumerate(self.procs):
                code = p.poll()
                if code is None:
                    running = True
                elif code != 0:
                    return rank, exit_code(code)
            if not running:
                return None
            time.sleep(POLL_S)

    def run(self) -> int:
        """Launch, supervise, restart; the exit code ``heddle run`` returns."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        store = None
        try:
            store, port = loopback_store()
            for attempt in range(self.max_restarts + 1):
                failure = self._attempt(port, attempt)
                if failure is None:
                    return 0
                rank, code = failure
                others = sum(p.poll() is None for p in self.procs)
                log(f"rank {rank} exited with code {code}" + (f"; stopping the other {others} worker(s)"
                                                               if others else ""))
                self.stop_workers()
                if attempt < self.max_restarts:
                    log(f"restart {attempt + 1} of {self.max_restarts}")
            return code
        except _Stop as stop:
            name = signal.Signals(stop.signum).name
            log(f"{name} received: stopping {sum(p.poll() is None for p in self.procs)} worker(s)")
            self.stop_workers()
            return 128 + stop.signum
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if any(p.poll() is None for p in self.procs):  # an unexpected error in the launcher
                self.stop_workers()
            del store
