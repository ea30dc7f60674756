"""Attacks on the checkpoint as a hostile local user (issue 13, security items 1 and 2).

The trainer is this (root) test process. The attacker runs as ``nobody`` (``setpriv --reuid=65534``,
stdlib Python only) and plants what it can: a squatted keeper directory, a fake keeper that answers
with a pickle that would run a command, a ``keeper.lock`` symlink to a root-owned 0600 file, a step
directory whose index carries a pickle payload. Every test asserts behaviour only: no marker file
written by a payload, no victim file changed, no step accepted that is not what it claims to be.

Paths the trainer uses are discovered, not assumed: a first, clean run records what the memory
level creates under ``shm_base`` (a private 1777 directory in /dev/shm, like /dev/shm itself), then
the attacker pre-creates exactly those names. A design whose names cannot be predicted passes the
squatting tests by construction; one that reuses a predictable name must refuse a foreign-owned
directory with an error that names it and its owner.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import tempfile
import warnings
import zlib

import pytest
import torch

from heddle.checkpoint import Checkpointer

from tests.conftest import run_distributed

NOBODY = 65534
ATTACKER = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-c"]
NUMEL = 16384            # 64 KiB per tensor: data files are far larger than any index or manifest

pytestmark = pytest.mark.timeout(120)


# -- the attacker's side (stdlib only, runs as nobody) ----------------------------------------
SQUAT = r"""
import json, os, sys
base, plan = sys.argv[1], json.loads(sys.argv[2])
for rel, kind, target in plan:
    path = os.path.join(base, rel)
    if kind == "dir":
        os.mkdir(path, 0o700)
    elif kind == "link":
        os.symlink(target, path)
print("squatted", flush=True)
"""

FAKE_KEEPER = r"""
import hashlib, os, sys, threading
from multiprocessing.connection import Listener
marker, addresses = sys.argv[1], sys.argv[2:]

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + marker,))

def talk(conn):
    try:
        while True:
            conn.recv_bytes()            # never unpickle what the victim sends
            conn.send(Payload())
    except Exception:
        pass

def serve(listener):
    while True:
        try:
            conn = listener.accept()
        except Exception:
            continue
        threading.Thread(target=talk, args=(conn,), daemon=True).start()

listeners = []
for address in addresses:
    # the key derivation is public (heddle's source): sha1 of the directory the socket lives in
    key = hashlib.sha1(("heddle-keeper:" + os.path.dirname(address)).encode()).digest()
    listeners.append(Listener(address, family="AF_UNIX", authkey=key))
    os.chmod(address, 0o777)
for listener in listeners[1:]:
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
print("serving", flush=True)
serve(listeners[0])
"""

PROBE = r"""
import json, os, socket, sys
from multiprocessing.connection import Client
marker, paths = sys.argv[1], json.loads(sys.argv[2])
readable, connected = [], []
payload = ("cos\nsystem\n(S'touch " + marker + "'\ntR.").encode()   # protocol-0 pickle: os.system(...)
for path, kind in paths:
    try:
        if kind == "file":
            with open(path, "rb") as f:
                f.read(16)
            readable.append(path)
        elif kind == "dir":
            os.listdir(path)
            readable.append(path)
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2.0)
            s.connect(path)
            connected.append(path)
            s.sendall(len(payload).to_bytes(4, "big") + payload)   # multiprocessing framing, no auth
            s.close()
    except OSError:
        pass
print(json.dumps({"readable": readable, "connected": connected}), flush=True)
"""

COPY = r"""
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2])
print("planted", flush=True)
"""


def as_nobody(script: str, *args: str, timeout: float = 30.0) -> str:
    out = subprocess.run(ATTACKER + [script, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"the attacker script failed (exit {out.returncode}):\n{out.stderr[-2000:]}"
    return out.stdout


class Payload:
    """Unpickling this runs ``touch <marker>`` (as whoever unpickles it)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def arena():
    """A world-traversable scratch directory (pytest's tmp_path is root-only)."""
    path = tempfile.mkdtemp(prefix="heddle-sec-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shm_base():
    """A private stand-in for /dev/shm (tmpfs, mode 1777); removed with every keeper under it."""
    path = tempfile.mkdtemp(prefix="heddle-sec-", dir="/dev/shm")
    os.chmod(path, 0o1777)
    yield path
    _kill_processes_mentioning(path)
    shutil.rmtree(path, ignore_errors=True)


def _kill_processes_mentioning(path: str) -> None:
    """Keepers (and fake keepers) this test started carry its unique directory in their argv."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if path.encode() in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _private_dir(tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    os.makedirs(path, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _victim(directory: str, name: str) -> tuple[str, bytes]:
    path = os.path.join(directory, name)
    content = f"root-owned secret {name}\n".encode() * 8
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    return path, content


def _assert_victim_intact(path: str, content: bytes) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0, f"victim {path} replaced"
    assert stat.S_IMODE(st.st_mode) == 0o600, f"victim {path} mode changed to {oct(st.st_mode)}"
    with open(path, "rb") as f:
        assert f.read() == content, f"victim {path} was modified"


def _state(value: float) -> dict:
    return {"w": torch.arange(NUMEL, dtype=torch.float32) + value, "meta": {"value": value}}


def _blank() -> dict:
    return {"w": torch.zeros(NUMEL, dtype=torch.float32), "meta": {}}


# -- discovery of the keeper's tree -----------------------------------------------------------
def _walk(base: str, names: list[str]) -> list[tuple[str, str]]:
    """[(path relative to base, kind)] for every entry under ``names``, parents before children."""
    out = []
    for name in sorted(names):
        top = os.path.join(base, name)
        stack = [top]
        while stack:
            path = stack.pop(0)
            mode = os.lstat(path).st_mode
            rel = os.path.relpath(path, base)
            if stat.S_ISDIR(mode):
                out.append((rel, "dir"))
                stack.extend(sorted(os.path.join(path, n) for n in os.listdir(path)))
            elif stat.S_ISSOCK(mode):
                out.append((rel, "socket"))
            elif stat.S_ISLNK(mode):
                out.append((rel, "link"))
            else:
                out.append((rel, "file"))
    return out


def _remove_new(base: str, before: set) -> None:
    for name in set(os.listdir(base)) - before:
        path = os.path.join(base, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _memory_checkpointer(directory: str, base: str) -> Checkpointer:
    return Checkpointer(directory, levels=("memory", "disk"), keep=2, shm_base=base, keeper_linger=20.0)


def _discover(directory: str, base: str) -> list[tuple[str, str]]:
    """What a clean run of the memory level creates under ``base`` (then removed again)."""
    before = set(os.listdir(base))
    ck = _memory_checkpointer(directory, base)
    ck.save(1, _state(1.0))
    ck.wait()
    tree = _walk(base, sorted(set(os.listdir(base)) - before))
    ck.close(shutdown_keeper_process=True)
    _kill_processes_mentioning(base)
    _remove_new(base, before)
    shutil.rmtree(directory, ignore_errors=True)
    assert tree, f"the memory level created nothing under shm_base={base}"
    return tree


def _run_victim(directory: str, base: str, probe=None) -> BaseException | None:
    """A root trainer on ``directory``: save, commit, restore, close; ``probe()`` runs after the
    first commit (the keeper removes its tree at shutdown). Returns what the trainer raised."""
    try:
        ck = _memory_checkpointer(directory, base)
        try:
            ck.save(1, _state(1.0))
            ck.wait()
            if probe is not None:
                probe()
            ck.save(2, _state(2.0))
            ck.wait()
            ck.restore(_blank())
        finally:
            ck.close(shutdown_keeper_process=True)
    except Exception as e:  # noqa: BLE001 - refusing is a valid outcome; the caller checks the rest
        return e
    return None


def _root_files_under(base: str, tree: list[tuple[str, str]]) -> list[str]:
    """Entries owned by root below the squatted directories (what the trainer wrote there)."""
    found = []
    for rel, kind in tree:
        top = os.path.join(base, rel)
        if kind != "dir" or os.path.islink(top) or not os.path.isdir(top):
            continue
        for name in os.listdir(top):
            path = os.path.join(top, name)
            if os.lstat(path).st_uid == 0:
                found.append(path)
    return found


def _assert_refused_naming_owner(err: BaseException | None, squatted: list[str], wrote: list[str]) -> None:
    if err is None:
        assert not wrote, f"the trainer accepted the squatted directory and wrote {wrote[:5]}"
        return
    message = str(err)
    assert any(path in message for path in squatted), \
        f"the refusal does not name the squatted directory {squatted[:3]}: {err!r}"
    assert "nobody" in message or str(NOBODY) in message, f"the refusal does not name the owner: {err!r}"


# -- 1. the keeper ------------------------------------------------------------------------------
def test_squatted_keeper_directory_is_refused(arena, shm_base):
    directory = os.path.join(arena, "ckpt")
    tree = _discover(directory, shm_base)
    dirs = [(rel, "dir", None) for rel, kind in tree if kind == "dir"]
    as_nobody(SQUAT, shm_base, json.dumps(dirs))
    wrote = []
    err = _run_victim(directory, shm_base, probe=lambda: wrote.extend(_root_files_under(shm_base, tree)))
    squatted = [os.path.join(shm_base, rel) for rel, _, _ in dirs]
    _assert_refused_naming_owner(err, squatted, wrote)


def test_fake_keeper_cannot_run_code_in_the_trainer(arena, shm_base, tmp_path):
    directory = os.path.join(arena, "ckpt")
    marker = os.path.join(_private_dir(tmp_path, "root-only"), "PWNED")
    tree = _discover(directory, shm_base)
    as_nobody(SQUAT, shm_base, json.dumps([(rel, "dir", None) for rel, kind in tree if kind == "dir"]))
    sockets = [os.path.join(shm_base, rel) for rel, kind in tree if kind == "socket"]
    assert sockets, f"the clean run created no socket under {shm_base}: {tree}"
    fake = subprocess.Popen(ATTACKER + [FAKE_KEEPER, marker, *sockets], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline().strip() == "serving", fake.stderr.read()
        _run_victim(directory, shm_base)
    finally:
        fake.kill()
        fake.wait()
    assert not os.path.exists(marker), "a fake keeper run as nobody got a command executed in the root trainer"


def test_planted_symlinks_do_not_touch_root_files(arena, shm_base, tmp_path):
    """keeper.lock (and every other file the keeper creates) planted as a symlink to a root-owned
    0600 file; a second run plants the directories themselves as symlinks to a root-only directory."""
    directory = os.path.join(arena, "ckpt")
    private = _private_dir(tmp_path, "root-only")
    tree = _discover(directory, shm_base)
    files = [(rel, kind) for rel, kind in tree if kind == "file"]
    assert files, f"the clean run created no regular file under {shm_base}: {tree}"
    victims = {rel: _victim(private, f"victim{i}") for i, (rel, _) in enumerate(files)}
    plan = [(rel, "dir", None) for rel, kind in tree if kind == "dir"]
    plan += [(rel, "link", victims[rel][0]) for rel, _ in files]
    as_nobody(SQUAT, shm_base, json.dumps(plan))
    _run_victim(directory, shm_base)
    for path, content in victims.values():
        _assert_victim_intact(path, content)

    # the top-level directories as symlinks to a root-only directory holding a victim
    _kill_processes_mentioning(shm_base)
    for name in os.listdir(shm_base):
        path = os.path.join(shm_base, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    target = _private_dir(tmp_path, "root-dir")
    victim, content = _victim(target, "secret")
    tops = sorted({rel.split(os.sep)[0] for rel, _ in tree})
    as_nobody(SQUAT, shm_base, json.dumps([(top, "link", target) for top in tops]))
    _run_victim(directory, shm_base)
    assert sorted(os.listdir(target)) == ["secret"], \
        f"the trainer followed a planted directory symlink into {target}: {sorted(os.listdir(target))}"
    _assert_victim_intact(victim, content)


def test_snapshot_slots_are_private(arena, shm_base, tmp_path):
    """Slots 0600 in a 0700 directory: nobody reads the weights, lists the tree or reaches the
    keeper's socket (a pickle sent there without authentication must not run either)."""
    directory = os.path.join(arena, "ckpt")
    marker = os.path.join(_private_dir(tmp_path, "root-only"), "PWNED")
    before = set(os.listdir(shm_base))
    ck = _memory_checkpointer(directory, shm_base)
    try:
        ck.save(1, _state(1.0))
        ck.wait()
        ck.save(2, _state(2.0))
        ck.wait()
        tops = sorted(set(os.listdir(shm_base)) - before)
        tree = _walk(shm_base, tops)
        files = [os.path.join(shm_base, rel) for rel, kind in tree if kind == "file"]
        slots = [p for p in files if os.path.getsize(p) >= NUMEL * 4]
        assert slots, f"no snapshot slot found under {shm_base}: {tree}"
        loose = {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in slots
                 if stat.S_IMODE(os.stat(p).st_mode) & 0o077}
        assert not loose, f"snapshot slots readable or writable by others (expected 0600): {loose}"
        for top in tops:
            mode = stat.S_IMODE(os.lstat(os.path.join(shm_base, top)).st_mode)
            assert mode & 0o077 == 0, f"{top} has mode {oct(mode)}, expected 0700"
        probe = json.loads(as_nobody(PROBE, marker, json.dumps(
            [(os.path.join(shm_base, rel), kind) for rel, kind in tree])))
        assert not probe["readable"], f"nobody read {probe['readable']}"
        assert not probe["connected"], f"nobody connected to the keeper at {probe['connected']}"
        ck.restore(_blank())
    finally:
        ck.close(shutdown_keeper_process=True)
    assert not os.path.exists(marker), "an unauthenticated pickle sent to the keeper ran a command"


# -- 2. restore reads nothing that can execute, and checks what it reads ------------------------
def _disk_checkpointer(directory: str) -> Checkpointer:
    return Checkpointer(directory, levels=("disk",), keep=5)


def _save_steps(directory: str, steps) -> None:
    ck = _disk_checkpointer(directory)
    for step in steps:
        ck.save(step, _state(float(step)))
        ck.wait()
    ck.close()


def _step_dirs(directory: str) -> dict[int, str]:
    """{step: path} of the step directories (named after their step, whatever the prefix)."""
    out = {}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        digits = "".join(c for c in name if c.isdigit())
        if os.path.isdir(path) and digits and not name.endswith((".tmp", ".deleting")):
            out[int(digits)] = path
    return out


def _is_manifest(name: str) -> bool:
    return "manifest" in name.lower()


def _restore(directory: str) -> tuple[int | None, dict | None, BaseException | None]:
    """(step, restored state, None) or (None, None, what restore raised)."""
    state = _blank()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = _disk_checkpointer(directory)
            try:
                step = ck.restore(state)
            finally:
                ck.close()
    except Exception as e:  # noqa: BLE001 - refusing by raising is allowed; the caller checks
        return None, None, e
    return step, state, None


def _assert_refused(directory: str, bad_step: int, fallback: int, what: str) -> None:
    step, state, err = _restore(directory)
    if err is not None:
        return
    assert step != bad_step, f"{what}: restore accepted step {bad_step}"
    assert step == fallback, f"{what}: restore gave step {step}, expected the fallback {fallback}"
    assert torch.equal(state["w"], _state(float(fallback))["w"]) and state["meta"] == {"value": float(fallback)}


def _digests(data: bytes) -> dict:
    """Every checksum of ``data`` an attacker would recompute, as ints and hex strings."""
    out = {zlib.crc32(data): None, zlib.crc32(data[:-4]): "body"}
    hexes = {f"{zlib.crc32(data):08x}": None, f"{zlib.crc32(data[:-4]):08x}": "body"}
    for name in ("sha256", "sha1", "md5", "blake2b", "sha512"):
        hexes[hashlib.new(name, data).hexdigest()] = name
    return {"ints": out, "hexes": hexes}


def _recompute(manifest: object, old: dict[str, bytes], new: dict[str, bytes]) -> object:
    """Rewrite every size and checksum of the old files found in a manifest to the new files'."""
    swaps_int, swaps_str = {}, {}
    for name, data in old.items():
        fresh = new[name]
        if len(data) > 16:
            swaps_int[len(data)] = len(fresh)
        for value, kind in _digests(data)["ints"].items():
            swaps_int[value] = zlib.crc32(fresh[:-4]) if kind == "body" else zlib.crc32(fresh)
        for value, kind in _digests(data)["hexes"].items():
            if kind == "body":
                swaps_str[value] = f"{zlib.crc32(fresh[:-4]):08x}"
            elif kind is None:
                swaps_str[value] = f"{zlib.crc32(fresh):08x}"
            else:
                swaps_str[value] = hashlib.new(kind, fresh).hexdigest()

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, bool):
            return node
        if isinstance(node, int):
            return swaps_int.get(node, node)
        if isinstance(node, str):
            return swaps_str.get(node, node)
        return node
    return walk(manifest)


def _with_crc_trailer(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


def _inject(data: bytes, payload: bytes) -> bytes | None:
    """``data`` with every pickle it carries replaced by ``payload`` (None: no pickle found).
    Handles a pickle file (with or without a CRC-32 trailer) and JSON carrying base64 pickles."""
    trailer = len(data) > 4 and zlib.crc32(data[:-4]) == int.from_bytes(data[-4:], "little")
    body = data[:-4] if trailer else data
    if body[:1] == b"\x80":
        return _with_crc_trailer(payload) if trailer else payload
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    found = []

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and len(node) >= 8:
            try:
                raw = base64.b64decode(node, validate=True)
            except ValueError:
                return node
            if raw[:1] == b"\x80":
                found.append(node)
                return base64.b64encode(payload).decode()
        return node
    doc = walk(doc)
    if not found:
        return None
    out = json.dumps(doc).encode()
    return _with_crc_trailer(out) if trailer else out


_STYLES = [dict(indent=i, sort_keys=k, separators=sep) for i in (None, 1, 2) for k in (False, True)
           for sep in (None, (",", ":"))]


def _reseal(original: bytes, doc: dict) -> bytes:
    """Serialise ``doc`` like the ``original`` manifest and, when the original carries a checksum
    of itself (learnt from the genuine file: CRC-32 of some JSON serialisation of the rest),
    recompute it: what an attacker who reads the source would do."""
    genuine = json.loads(original)
    layout = next((st for st in _STYLES if json.dumps(genuine, **st).encode() == original), {"indent": 1})
    for key, value in genuine.items():
        if isinstance(value, int) and not isinstance(value, bool):
            body = {k: v for k, v in genuine.items() if k != key}
            style = next((st for st in _STYLES if zlib.crc32(json.dumps(body, **st).encode()) == value), None)
            if style is not None and key in doc:
                rest = {k: v for k, v in doc.items() if k != key}
                doc = {**rest, key: zlib.crc32(json.dumps(rest, **style).encode())}
                break
    return json.dumps(doc, **layout).encode()


def _b64_fields_to(node, payload: bytes):
    """Every ``{"b64": ...}`` field replaced by the payload (and its dtype, if any, made object)."""
    if isinstance(node, dict):
        out = {k: _b64_fields_to(v, payload) for k, v in node.items()}
        if isinstance(node.get("b64"), str):
            out["b64"] = base64.b64encode(payload).decode()
            if "dtype" in node:
                out["dtype"] = "|O"
        return out
    if isinstance(node, list):
        return [_b64_fields_to(v, payload) for v in node]
    return node


def _planted_variants(template_dir: str, payload: bytes) -> dict[str, dict[str, bytes]]:
    """{variant: {file name: bytes}} of the attacker's own step with a payload in its index."""
    src = _step_dirs(template_dir)[99]
    files = {}
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as f:
            files[name] = f.read()
    indexes = [n for n in files if not _is_manifest(n) and len(files[n]) < NUMEL * 2]
    assert indexes, f"no index file (smaller than the data, not the manifest) in {sorted(files)}"
    variants = {}
    whole = {n: (_inject(files[n], payload) or payload) if n in indexes else files[n] for n in files}
    variants["index replaced by a pickle"] = whole
    fields = dict(files)
    for n in indexes:
        body = files[n]
        trailer = len(body) > 4 and zlib.crc32(body[:-4]) == int.from_bytes(body[-4:], "little")
        try:
            doc = json.loads(body[:-4] if trailer else body)
        except ValueError:
            continue
        out = json.dumps(_b64_fields_to(doc, payload)).encode()
        fields[n] = _with_crc_trailer(out) if trailer else out
    if fields != files:
        variants["pickle in every base64 field of the index"] = fields
    for name, new in variants.items():   # every size and checksum the manifest holds, recomputed
        for m in (n for n in files if _is_manifest(n)):
            others_old = {k: v for k, v in files.items() if k != m}
            others_new = {k: v for k, v in new.items() if k != m}
            new[m] = _reseal(files[m], _recompute(json.loads(files[m]), others_old, others_new))
    return variants


def test_planted_step_with_a_pickle_payload_never_runs(arena, tmp_path):
    """nobody plants a newer step into a shared directory, made from its own heddle checkpoint:
    (a) the index replaced by a pickle, (b) a pickle in every base64 field of the index, each with
    every size and checksum of the manifest recomputed, and (c) a checkpoint it saved of a state
    holding an object whose unpickling runs a command (if the library lets it save one)."""
    victim_dir = os.path.join(arena, "ckpt")
    _save_steps(victim_dir, [1, 2])
    os.chmod(victim_dir, 0o777)      # a shared checkpoint directory
    marker = os.path.join(_private_dir(tmp_path, "root-only"), "PWNED")
    payload = pickle.dumps(Payload(marker), protocol=2)
    template = os.path.join(str(tmp_path), "attacker-own")
    _save_steps(template, [99])
    variants = _planted_variants(template, payload)
    own = os.path.join(str(tmp_path), "attacker-object")
    try:
        ck = _disk_checkpointer(own)
        ck.save(99, {"w": torch.zeros(NUMEL), "meta": {"value": Payload(marker)}})
        ck.close()
    except Exception:  # noqa: BLE001 - a format that cannot carry the object refuses it: safe
        pass
    else:
        src = _step_dirs(own)[99]
        variants["its own checkpoint of a payload object"] = {
            n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}
    ran = []
    for i, (variant, files) in enumerate(variants.items()):
        staging = os.path.join(arena, f"staging{i}")
        os.makedirs(staging)
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(staging, name), 0o644)
        planted = os.path.join(victim_dir, os.path.basename(_step_dirs(template)[99]))
        as_nobody(COPY, staging, planted)
        _restore(victim_dir)
        if os.path.exists(marker):
            ran.append(variant)
            os.unlink(marker)
        shutil.rmtree(planted)
    assert not ran, f"restoring a planted step ran the payload: {ran}"


def test_index_with_a_recomputed_crc_is_refused(arena, tmp_path):
    """The newest step's index replaced by a pickle payload with a valid CRC-32 trailer, the
    manifest left alone: the manifest's checksum of the index must catch it (today it is the
    CRC residue, the same for any file with a valid trailer), and the payload must never run."""
    directory = os.path.join(arena, "ckpt")
    _save_steps(directory, [1, 2])
    marker = os.path.join(_private_dir(tmp_path, "root-only"), "PWNED")
    sdir = _step_dirs(directory)[2]
    indexes = [n for n in os.listdir(sdir) if not _is_manifest(n) and os.path.getsize(os.path.join(sdir, n)) < NUMEL * 2]
    assert indexes, f"no index file (smaller than the data, not the manifest) in {sorted(os.listdir(sdir))}"
    payload = pickle.dumps(Payload(marker), protocol=2)
    for name in indexes:
        path = os.path.join(sdir, name)
        size = os.path.getsize(path)    # same size as the genuine index: the unpickler stops at STOP
        with open(path, "wb") as f:
            f.write(_with_crc_trailer(payload + b"\0" * (size - 4 - len(payload))))
    _assert_refused(directory, 2, 1, "an index replaced by a pickle with a recomputed CRC")
    assert not os.path.exists(marker), "restore unpickled a tampered index and ran its payload"


def test_a_flipped_byte_anywhere_is_caught(arena):
    directory = os.path.join(arena, "ckpt")
    _save_steps(directory, [1, 2])
    sdir = _step_dirs(directory)[2]
    pristine = {}
    for name in sorted(os.listdir(sdir)):
        with open(os.path.join(sdir, name), "rb") as f:
            pristine[name] = f.read()
    assert len(pristine) >= 2, sorted(pristine)
    for name, data in pristine.items():
        for pos in sorted({0, 1, len(data) // 3, len(data) // 2, len(data) - 5, len(data) - 1}):
            flipped = bytearray(data)
            flipped[pos] ^= 0x01        # the smallest change: one bit
            with open(os.path.join(sdir, name), "wb") as f:
                f.write(flipped)
            _assert_refused(directory, 2, 1, f"bit 0 of byte {pos} of {name} flipped")
            with open(os.path.join(sdir, name), "wb") as f:
                f.write(data)


def _rewrite_manifests(sdir: str, walk) -> None:
    """Rewrite every manifest of step dir ``sdir`` as ``walk(its JSON)`` (checksums left stale)."""
    for name in os.listdir(sdir):
        if _is_manifest(name):
            path = os.path.join(sdir, name)
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            with open(path, "wb") as f:
                f.write(json.dumps(walk(doc)).encode())


def _relabel_manifest(sdir: str, old_step: int, new_step: int) -> None:
    def walk(node):
        if isinstance(node, dict):
            return {k: (new_step if k == "step" and v == old_step else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    _rewrite_manifests(sdir, walk)


def test_step_relabelled_is_refused(arena):
    """Step 39's directory renamed to 40 and its manifest's step field edited to match."""
    directory = os.path.join(arena, "ckpt")
    _save_steps(directory, [38, 39])
    src = _step_dirs(directory)[39]
    dst = os.path.join(directory, os.path.basename(src).replace("39", "40"))
    os.rename(src, dst)
    _relabel_manifest(dst, 39, 40)
    _assert_refused(directory, 40, 38, "step 39 relabelled as 40")


def _swap_ranks(directory: str, step: int) -> None:
    """Exchange every file of rank 0 and rank 1 (names differing only in the rank number) and the
    manifest's entries for them, consistently: each file keeps its own checksum."""
    sdir = _step_dirs(directory)[step]
    names = [n for n in os.listdir(sdir) if not _is_manifest(n)]
    pairs = {}
    for name in names:
        for other in names:
            if name < other and name.replace("1", "0") == other.replace("1", "0") and \
                    sum(a != b for a, b in zip(name, other)) == 1:
                pairs[name] = other
    assert pairs, f"no per-rank file pairs in {sorted(names)}"
    for a, b in pairs.items():
        os.rename(os.path.join(sdir, a), os.path.join(sdir, a + ".swap"))
        os.rename(os.path.join(sdir, b), os.path.join(sdir, a))
        os.rename(os.path.join(sdir, a + ".swap"), os.path.join(sdir, b))
    rename = {**pairs, **{b: a for a, b in pairs.items()}}

    def walk(node):
        if isinstance(node, dict):
            keys = dict(node)
            if "0" in keys and "1" in keys:
                keys["0"], keys["1"] = keys["1"], keys["0"]
            return {rename.get(k, k): walk(v) for k, v in keys.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            return rename.get(node, node)
        return node
    _rewrite_manifests(sdir, walk)


def _rank_swap_worker(rank, world_size, directory):
    import torch.distributed as dist
    ck = _disk_checkpointer(directory)
    for step in (1, 2):
        ck.save(step, _state(100.0 * rank + step))
        ck.wait()
    ck.close()
    dist.barrier()
    if rank == 0:
        _swap_ranks(directory, 2)
    dist.barrier()
    state = _blank()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck = _disk_checkpointer(directory)
            step = ck.restore(state)
            ck.close()
    except Exception as e:  # noqa: BLE001 - a refusal on every rank is a valid outcome
        return {"raised": repr(e)}
    return {"step": step, "value": state["meta"].get("value"),
            "exact": bool(torch.equal(state["w"], _state(state["meta"].get("value", -1.0))["w"]))}


def test_consistent_rank_swap_is_refused(arena):
    directory = os.path.join(arena, "ckpt")
    results = run_distributed(_rank_swap_worker, 2, directory, timeout=120)
    for rank, got in enumerate(results):
        if "raised" in got:
            continue
        assert got["value"] in (100.0 * rank + 1, 100.0 * rank + 2), \
            f"rank {rank} restored step {got['step']} holding rank {int(got['value'] // 100)}'s state: {results}"
        assert got["exact"], results
