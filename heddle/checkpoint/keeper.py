"""The keeper: one process per node that holds the latest snapshots in shared memory (REFT).

Snapshot slots are files in a tmpfs directory (``/dev/shm/heddle-ckpt-<id>-node<k>``) that the
trainers map and fill. The keeper owns them: it keeps the registry of complete snapshots
(rank, kind, step, file, index) in its own memory, serves it to a restarted trainer, and removes
the files at shutdown or after ``linger`` idle seconds. It runs in its own session, so a worker
crash (or torchrun killing the worker group) does not take it down.

Protocol (``multiprocessing.connection`` over a Unix socket, authenticated): tuples
``("commit", rank, kind, step, path, index_bytes)``, ``("invalidate", path)``, ``("list",)``,
``("ping",)``, ``("shutdown",)``. ``kind`` is "own" (a rank's snapshot), "peer" (a partner's copy)
or "parity" (this rank's XOR parity chunk).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener

SOCKET = "keeper.sock"


def keeper_root(directory: str, node: int, base: str = "/dev/shm") -> str:
    tag = hashlib.sha1(os.path.abspath(directory).encode()).hexdigest()[:12]
    return os.path.join(base, f"heddle-ckpt-{tag}-node{node}")


def _authkey(root: str) -> bytes:
    return hashlib.sha1(("heddle-keeper:" + root).encode()).digest()


class KeeperServer:
    def __init__(self, root: str, linger: float):
        self.root, self.linger = root, linger
        self.registry: dict[str, tuple] = {}     # path -> (rank, kind, step, path, index_bytes)
        self.lock = threading.Lock()
        self.last_activity = time.monotonic()
        self.clients = 0
        self.stop = threading.Event()

    def handle(self, conn) -> None:
        with self.lock:
            self.clients += 1
        try:
            while not self.stop.is_set():
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self.dispatch(msg))
        finally:
            with self.lock:
                self.clients -= 1
                self.last_activity = time.monotonic()
            conn.close()

    def dispatch(self, msg):
        op = msg[0]
        with self.lock:
            self.last_activity = time.monotonic()
            if op == "ping":
                return ("pong", os.getpid())
            if op == "commit":
                _, rank, kind, step, path, index_bytes = msg
                self.registry[path] = (rank, kind, step, path, index_bytes)
                return True
            if op == "invalidate":
                self.registry.pop(msg[1], None)
                return True
            if op == "list":
                return sorted(self.registry.values(), key=lambda e: (e[0], e[1], -e[2]))
            if op == "shutdown":
                self.stop.set()
                return True
        return ValueError(f"keeper: unknown request {op!r}")

    def serve(self) -> None:
        address = os.path.join(self.root, SOCKET)
        if os.path.exists(address):
            os.unlink(address)
        listener = Listener(address, family="AF_UNIX", authkey=_authkey(self.root))
        listener._listener._socket.settimeout(0.5)
        try:
            while not self.stop.is_set():
                try:
                    conn = listener.accept()
                except (TimeoutError, OSError):
                    with self.lock:
                        idle = self.clients == 0 and time.monotonic() - self.last_activity > self.linger
                    if idle or not os.path.isdir(self.root):
                        break
                    continue
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        finally:
            listener.close()
            shutil.rmtree(self.root, ignore_errors=True)


class KeeperClient:
    """Connection from a trainer to its node's keeper; starts the keeper if none is running."""

    def __init__(self, root: str, *, linger: float = 1800.0, start_timeout: float = 30.0):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.conn = self._connect_or_start(linger, start_timeout)
        self.lock = threading.Lock()
        self.pid = self.request("ping")[1]

    def _try_connect(self):
        try:
            return Client(os.path.join(self.root, SOCKET), family="AF_UNIX", authkey=_authkey(self.root))
        except (FileNotFoundError, ConnectionRefusedError):
            return None

    def _connect_or_start(self, linger: float, timeout: float):
        conn = self._try_connect()
        if conn is not None:
            return conn
        with open(os.path.join(self.root, "keeper.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # one starter per node
            conn = self._try_connect()
            if conn is None:
                # run this file as a script: stdlib only, no torch import, starts in ~50 ms
                subprocess.Popen([sys.executable, os.path.abspath(__file__), self.root, str(linger)],
                                 start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + timeout
                while conn is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"keeper for {self.root} did not start within {timeout:.0f}s")
                    time.sleep(0.02)  # the new process binds its socket
                    conn = self._try_connect()
            return conn

    def request(self, *msg):
        with self.lock:
            self.conn.send(msg)
            reply = self.conn.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        self.conn.close()


def shutdown_keeper(root: str) -> None:
    """Stop the keeper of ``root`` (it removes its shared-memory files) if it is running."""
    try:
        conn = Client(os.path.join(root, SOCKET), family="AF_UNIX", authkey=_authkey(root))
    except (FileNotFoundError, ConnectionRefusedError):
        shutil.rmtree(root, ignore_errors=True)
        return
    conn.send(("shutdown",))
    conn.recv()
    conn.close()
    deadline = time.monotonic() + 30.0
    while os.path.exists(root) and time.monotonic() < deadline:
        time.sleep(0.01)   # the keeper closes its socket and removes the files on its way out


if __name__ == "__main__":
    KeeperServer(sys.argv[1], float(sys.argv[2])).serve()
