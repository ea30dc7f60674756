"""The keeper: one process per node that holds the latest snapshots in shared memory (REFT).

Snapshot slots are files in a private tmpfs directory that the trainers map and fill:

    /dev/shm/heddle-<uid>/                      0700, owned by the user (verified, never a symlink)
    /dev/shm/heddle-<uid>/ckpt-<id>-node<k>/    0700: keeper.sock, keeper.lock, secret (0600), rank<r>/slot*.bin (0600)

The keeper owns them: it keeps the registry of complete snapshots (rank, kind, step, file, index)
in its own memory, serves it to a restarted trainer, and removes the files at shutdown or after
``linger`` idle seconds. It runs in its own session, so a worker crash (or torchrun killing the
worker group) does not take it down.

Security: a directory that exists but belongs to another user, is a symlink, or is open to group
or others is refused with an error naming it and its owner. The socket authenticates both ends
with ``multiprocessing.connection``'s HMAC challenge on a random 32-byte secret
(``secrets.token_bytes``, in the 0600 file ``secret``) before any message is read, and messages are
JSON (``send_bytes``/``recv_bytes``), never pickle: ``["commit", rank, kind, step, path, index]``,
``["invalidate", path]``, ``["list"]``, ``["ping"]``, ``["shutdown"]``. ``kind`` is "own" (a rank's
snapshot), "peer" (a partner's copy) or "parity" (this rank's XOR parity chunk).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener

SOCKET = "keeper.sock"
SECRET = "secret"
LOCK = "keeper.lock"
_KINDS = ("own", "peer", "parity")


class KeeperError(RuntimeError):
    """The keeper refused a request, or its directory is not safe to use."""


class KeeperUnavailable(KeeperError):
    """The keeper process is gone (killed, crashed, or its socket removed)."""


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ensure_private_dir(path: str, *, create: bool = True) -> None:
    """``path`` is a real directory (not a symlink), owned by this user, mode 0700; created so
    when missing. Anything else is refused with an error naming the directory and its owner."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeeperError(f"checkpoint keeper directory {path} does not exist") from None
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise KeeperError(f"checkpoint keeper directory {path} is a symlink owned by {_owner(st.st_uid)}; "
                          f"refusing to follow it (remove it, or pass another shm_base)")
    if not stat.S_ISDIR(st.st_mode):
        raise KeeperError(f"checkpoint keeper path {path} is not a directory (owner {_owner(st.st_uid)})")
    try:   # the same check on the opened directory: no symlink swapped in between
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise KeeperError(f"checkpoint keeper directory {path} cannot be opened safely ({e})") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != me:
        raise KeeperError(f"checkpoint keeper directory {path} is owned by {_owner(st.st_uid)}, not by this user "
                          f"({_owner(me)}); another user may have planted it: remove it, or pass another shm_base")
    if st.st_mode & 0o077:
        raise KeeperError(f"checkpoint keeper directory {path} (owner {_owner(st.st_uid)}) has mode "
                          f"{stat.S_IMODE(st.st_mode):04o}; it must be 0700 so no other user can read the "
                          f"snapshots or reach the keeper (chmod 700 it, or remove it)")


def user_root(base: str = "/dev/shm") -> str:
    return os.path.join(base, f"heddle-{os.geteuid()}")


def keeper_root(directory: str, node: int, base: str = "/dev/shm") -> str:
    """Where the keeper of ``directory`` on ``node`` keeps its files (the path is not secret; the
    per-user parent directory is private)."""
    tag = hashlib.sha1(os.path.abspath(directory).encode()).hexdigest()[:12]
    return os.path.join(user_root(base), f"ckpt-{tag}-node{node}")


def prepare_root(root: str) -> None:
    ensure_private_dir(os.path.dirname(root))
    ensure_private_dir(root)


def _open_private(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077 or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise KeeperError(f"{path} is owned by {_owner(st.st_uid)} with mode {stat.S_IMODE(st.st_mode):04o}; "
                          f"expected a 0600 file of this user")
    return fd


def read_secret(root: str) -> bytes:
    path = os.path.join(root, SECRET)
    try:
        fd = _open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeeperUnavailable(f"checkpoint keeper in {root} has no secret (not started)") from None
    with os.fdopen(fd, "rb") as f:
        key = f.read(64)
    if len(key) != 32:
        raise KeeperError(f"{path} holds {len(key)} bytes, expected a 32-byte secret")
    return key


def _create_secret(root: str) -> None:
    """A fresh random secret for a new keeper (called under the start lock, keeper not running)."""
    path = os.path.join(root, SECRET)
    tmp = f"{path}.new{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    os.replace(tmp, path)


def _send(conn, obj) -> None:
    conn.send_bytes(json.dumps(obj, separators=(",", ":")).encode())


def _recv(conn, maxlength: int | None = None):
    return json.loads(conn.recv_bytes(maxlength).decode())


class KeeperServer:
    def __init__(self, root: str, linger: float):
        self.root, self.linger = os.path.abspath(root), linger
        self.registry: dict[str, list] = {}     # path -> [rank, kind, step, path, index]
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
                    raw = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    reply = self.dispatch(json.loads(raw.decode()))
                except (TypeError, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
                    reply = {"error": f"bad request (JSON lists only): {type(e).__name__}"}
                _send(conn, reply)
        finally:
            with self.lock:
                self.clients -= 1
                self.last_activity = time.monotonic()
            conn.close()

    def dispatch(self, msg):
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            return {"error": "request must be a JSON list starting with an operation name"}
        op = msg[0]
        with self.lock:
            self.last_activity = time.monotonic()
            if op == "ping":
                return ["pong", os.getpid()]
            if op == "commit":
                _, rank, kind, step, path, index = msg
                if type(rank) is not int or kind not in _KINDS or type(step) is not int or \
                        not isinstance(path, str) or not isinstance(index, str) or \
                        os.path.commonpath([os.path.abspath(path), self.root]) != self.root:
                    return {"error": "commit: expected rank, kind, step, a path inside the keeper directory, index"}
                self.registry[path] = [rank, kind, step, path, index]
                return True
            if op == "invalidate":
                self.registry.pop(str(msg[1]), None)
                return True
            if op == "list":
                return sorted(self.registry.values(), key=lambda e: (e[0], e[1], -e[2]))
            if op == "shutdown":
                self.stop.set()
                return True
        return {"error": f"keeper: unknown request {op!r}"}

    def serve(self) -> None:
        prepare_root(self.root)
        address = os.path.join(self.root, SOCKET)
        if os.path.lexists(address):
            os.unlink(address)
        listener = Listener(address, family="AF_UNIX", authkey=read_secret(self.root))
        listener._listener._socket.settimeout(0.5)
        try:
            while not self.stop.is_set():
                try:
                    conn = listener.accept()     # the HMAC handshake runs here, before any message
                except AuthenticationError:
                    continue
                except (TimeoutError, OSError, EOFError):
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
        prepare_root(root)
        self.address = os.path.join(root, SOCKET)
        self.pid = None
        self.conn = self._connect_or_start(linger, start_timeout)
        self.lock = threading.Lock()
        self.pid = self.request("ping")[1]

    def describe(self) -> str:
        return f"checkpoint keeper (pid {self.pid}, socket {self.address})"

    def _try_connect(self):
        try:
            key = read_secret(self.root)
            return Client(self.address, family="AF_UNIX", authkey=key)
        except (FileNotFoundError, ConnectionRefusedError, KeeperUnavailable):
            return None
        except (AuthenticationError, EOFError, ConnectionResetError):
            return None      # a stale socket of an older keeper (another secret): start a new one

    def _connect_or_start(self, linger: float, timeout: float):
        conn = self._try_connect()
        if conn is not None:
            return conn
        fd = _open_private(os.path.join(self.root, LOCK), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)   # one starter per node
            conn = self._try_connect()
            if conn is None:
                _create_secret(self.root)
                # run this file as a script: stdlib only, no torch import, starts in ~50 ms
                subprocess.Popen([sys.executable, os.path.abspath(__file__), self.root, str(linger)],
                                 start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + timeout
                while conn is None:
                    if time.monotonic() > deadline:
                        raise KeeperError(f"keeper for {self.root} did not start within {timeout:.0f}s")
                    time.sleep(0.02)  # the new process binds its socket
                    conn = self._try_connect()
            return conn
        finally:
            os.close(fd)

    def request(self, *msg):
        msg = [m.decode() if isinstance(m, bytes) else m for m in msg]
        try:
            with self.lock:
                _send(self.conn, msg)
                reply = _recv(self.conn)
        except (EOFError, OSError, ValueError) as e:
            raise KeeperUnavailable(f"{self.describe()} is gone ({type(e).__name__}: {e}); its memory snapshots "
                                    f"are lost") from None
        if isinstance(reply, dict) and "error" in reply:
            raise KeeperError(f"{self.describe()}: {reply['error']}")
        if msg[0] == "list":
            return [(r, k, s, p, i.encode()) for r, k, s, p, i in reply]
        return reply

    def close(self) -> None:
        self.conn.close()


def shutdown_keeper(root: str) -> None:
    """Stop the keeper of ``root`` (it removes its shared-memory files) if it is running."""
    if not os.path.isdir(root):
        return
    try:
        ensure_private_dir(root, create=False)
        conn = Client(os.path.join(root, SOCKET), family="AF_UNIX", authkey=read_secret(root))
    except KeeperUnavailable:
        shutil.rmtree(root, ignore_errors=True)
        return
    except (FileNotFoundError, ConnectionRefusedError, AuthenticationError, EOFError, ConnectionResetError):
        shutil.rmtree(root, ignore_errors=True)
        return
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        shutil.rmtree(root, ignore_errors=True)
        return
    _send(conn, ["shutdown"])
    try:
        _recv(conn)
    except (EOFError, OSError):
        pass
    conn.close()
    deadline = time.monotonic() + 30.0
    while os.path.exists(root) and time.monotonic() < deadline:
        time.sleep(0.01)   # the keeper closes its socket and removes the files on its way out


if __name__ == "__main__":
    KeeperServer(sys.argv[1], float(sys.argv[2])).serve()
