"""Issue 13 items 1, 4-7, 10 and 12 for the Checkpointer: a private keeper, runs that own their
checkpoints, one job per directory, all-corrupt is an error, small /dev/shm, disk full, keeper death."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch

from heddle.checkpoint import Checkpointer, CheckpointFallbackWarning, shutdown_keeper
from heddle.checkpoint.keeper import KeeperClient, KeeperError, KeeperUnavailable, keeper_root
from heddle.checkpoint.snapshot import SharedMemoryFull
from heddle.checkpoint.storage import DirectoryLocked, NoValidCheckpoint, list_steps, read_manifest, step_dir


@pytest.fixture
def shm():
    """A private stand-in for /dev/shm; every keeper under it is stopped afterwards."""
    base = tempfile.mkdtemp(prefix="heddle-rel-", dir="/dev/shm")
    yield base
    for root, dirs, _ in os.walk(base):
        for d in dirs:
            if d.startswith("ckpt-"):
                shutdown_keeper(os.path.join(root, d))
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmpfs():
    """Mount small tmpfs file systems (we are root); unmounted afterwards."""
    mounts = []

    def mount(size: str) -> str:
        path = tempfile.mkdtemp(prefix="heddle-tmpfs-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", path], check=True)
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                if d.startswith("ckpt-"):
                    shutdown_keeper(os.path.join(root, d))
        subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


def _state(v, n=1000):
    return {"t": torch.full((n,), float(v), dtype=torch.float64), "meta": {"v": v}}


def _blank(n=1000):
    return {"t": torch.zeros(n, dtype=torch.float64), "meta": {}}


def _crash(ck):
    """What a SIGKILL leaves: no close(), the lock released, the slot pages unmapped; the slot
    files and their registration stay with the keeper."""
    ck._release_lock()
    ck._jobs.put(None)
    for slot in ck.engine.slots:
        if slot is not None:
            slot.buffer = None


# -- item 1: the keeper's directory ------------------------------------------------------------------
def test_keeper_tree_is_private_and_foreign_dirs_are_refused(tmp_path, shm):
    ck = Checkpointer(tmp_path / "c", levels=("memory",), shm_base=shm)
    ck.save(1, _state(1))
    ck.wait()
    user, root = os.path.dirname(ck.shm_root), ck.shm_root
    for path in (user, root, os.path.join(root, "rank0")):
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), path
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if not f.endswith(".sock")]
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files), \
        {f: oct(os.stat(f).st_mode) for f in files}
    with open(os.path.join(root, "secret"), "rb") as f:
        assert len(f.read()) == 32
    ck.close(shutdown_keeper_process=True)
    # a planted directory: another owner, a loose mode, a symlink -> refused, naming it and its owner
    for plant in ("owner", "mode", "symlink"):
        base = tempfile.mkdtemp(dir=shm)
        victim = os.path.join(base, f"heddle-{os.geteuid()}")
        if plant == "symlink":
            os.symlink(tempfile.mkdtemp(dir=shm), victim)
        else:
            os.mkdir(victim, 0o700)
            os.chown(victim, 65534, 65534) if plant == "owner" else os.chmod(victim, 0o755)
        with pytest.raises(KeeperError) as err:
            Checkpointer(tmp_path / f"d-{plant}", levels=("memory",), shm_base=base)
        assert victim in str(err.value), err.value
        assert {"owner": "nobody", "mode": "0755", "symlink": "symlink"}[plant] in str(err.value), err.value


def test_keeper_lock_symlink_and_wrong_key(tmp_path, shm):
    root = keeper_root(str(tmp_path), 0, shm)
    os.makedirs(root, mode=0o700)
    os.chmod(os.path.dirname(root), 0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, os.path.join(root, "keeper.lock"))
    with pytest.raises(OSError):                         # O_NOFOLLOW: never opened, never truncated
        KeeperClient(root)
    assert victim.read_bytes() == b"precious"
    os.unlink(os.path.join(root, "keeper.lock"))
    keeper = KeeperClient(root, linger=30)
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client
    with pytest.raises(AuthenticationError):             # the secret is random, not derived from the path
        Client(os.path.join(root, "keeper.sock"), family="AF_UNIX", authkey=b"x" * 32)
    assert keeper.request("ping")[0] == "pong"           # the keeper survived the intruder
    raw = keeper.conn
    raw.send_bytes(b"\x80\x04K\x01.")                    # a pickle, after authentication: refused, not loaded
    assert "error" in json.loads(raw.recv_bytes())
    keeper.close()
    shutdown_keeper(root)


# -- items 4 and 10: a run owns its checkpoints; one job per directory ---------------------------------
def test_runs_own_their_steps_and_resume_names_the_run(tmp_path):
    d = str(tmp_path / "c")
    old = Checkpointer(d, levels=("disk",), keep=3)
    for s in (48, 49, 50):
        old.save(s, _state(s))
    old.close()
    old_run = read_manifest(d, 50)["run_id"]
    new = Checkpointer(d, levels=("disk",), keep=3)
    assert new.run_id != old_run
    for s in range(1, 6):
        new.save(s, _state(s))
        new.wait()
    new.close()
    assert list_steps(d)[0] == [50, 49, 48, 5, 4, 3]         # retention kept the other run's steps
    ck = Checkpointer(d, levels=("disk",))
    state = _blank()
    assert ck.restore(state) == 5 and state["meta"] == {"v": 5}     # the run saved last, by name
    assert ck.last_restore["run_id"] == new.run_id and ck.last_restore["step"] == 5
    assert ck.last_restore["source"] == "disk" and ck.run_id == new.run_id   # the resumed run continues it
    ck.close()


CHILD = r"""
import sys, time
from heddle.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], levels=("disk",))
print("ready", flush=True)
time.sleep(60)
"""


def test_second_job_on_a_directory_fails_at_once(tmp_path):
    d = str(tmp_path / "c")
    child = subprocess.Popen([sys.executable, "-c", CHILD, d], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        start = time.monotonic()
        with pytest.raises(DirectoryLocked, match=f"in use by another.*{child.pid}"):
            Checkpointer(d, levels=("disk",))
        assert time.monotonic() - start < 10          # an error, not a wait (it used to hang in acquire)
    finally:
        child.kill()
        child.wait()
    ck = Checkpointer(d, levels=("disk",))            # the lock died with its process
    with pytest.raises(DirectoryLocked):               # a second live Checkpointer in this process too
        Checkpointer(d, levels=("disk",))
    del ck                                             # dropped without close(): released when collected
    Checkpointer(d, levels=("disk",)).close()


def test_all_corrupt_is_an_error_unless_asked_to_start_fresh(tmp_path):
    d = str(tmp_path / "c")
    ck = Checkpointer(d, levels=("disk",))
    for s in (1, 2):
        ck.save(s, _state(s))
    ck.close()
    for s in (1, 2):
        os.truncate(os.path.join(step_dir(d, s), "rank_00000.bin"), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointFallbackWarning)
        ck = Checkpointer(d, levels=("disk",))
        with pytest.raises(NoValidCheckpoint, match="2 checkpoint.*none verified.*start_fresh_on_corrupt"):
            ck.restore(_blank())
        ck.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = Checkpointer(d, levels=("disk",), start_fresh_on_corrupt=True)
        assert ck.restore(_blank()) is None
        ck.close()
    assert any("starting fresh" in str(w.message) for w in caught)


def test_regular_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="regular file"):
        Checkpointer(f)


# -- item 5: shared memory -------------------------------------------------------------------------
def test_small_shm_falls_back_or_fails_with_the_fix(tmp_path, tmpfs):
    shm = tmpfs("1m")
    big = _state(1, n=100_000)                        # 800 KB: one slot fits, two (the ring) do not
    with pytest.raises(SharedMemoryFull, match=r"need \d+ bytes.*--shm-size.*num_slots.*levels=\('disk',\)"):
        ck = Checkpointer(tmp_path / "a", levels=("memory",), shm_base=shm)
        try:
            ck.save(1, big)
        finally:
            ck.close(shutdown_keeper_process=True)
    with pytest.warns(RuntimeWarning, match="falling back to disk-only"):
        ck = Checkpointer(tmp_path / "b", levels=("memory", "disk"), shm_base=shm)
        ck.save(1, big)
        ck.save(2, _state(2, n=100_000))
        assert ck.wait() == 2                           # training goes on, durable on disk
    ck.close(shutdown_keeper_process=True)


def test_restart_reuses_the_crashed_workers_slots(tmp_path, tmpfs):
    shm = tmpfs("2m")
    d = str(tmp_path / "c")
    ck = Checkpointer(d, levels=("memory",), shm_base=shm, keeper_linger=30)
    ck.save(1, _state(1, n=100_000))                  # a ring of two 800 KB slots fills most of 2 MB
    ck.wait()
    ck.save(2, _state(2, n=100_000))
    ck.wait()
    _crash(ck)                                         # the worker dies; its slots stay with the keeper
    again = Checkpointer(d, levels=("memory",), shm_base=shm, keeper_linger=30)
    state = _blank(n=100_000)
    assert again.restore(state) == 2 and again.last_restore["source"] == "memory"
    assert state["meta"] == {"v": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no fallback: the old ring is reused
        for s in (3, 4):
            again.save(s, _state(s, n=100_000))
            again.wait()
    slots = [f for f in os.listdir(os.path.join(again.shm_root, "rank0")) if f.startswith("slot")]
    assert len(slots) == 2, slots
    again.close(shutdown_keeper_process=True)


# -- items 6 and 7: disk full, keeper death ------------------------------------------------------------
def test_disk_full_stops_loudly_cleans_up_and_memory_survives(tmp_path, tmpfs, shm):
    d = os.path.join(tmpfs("1m"), "c")
    ck = Checkpointer(d, levels=("memory", "disk"), shm_base=shm, keep=5, keeper_linger=30)
    ck.save(1, _state(1, n=70_000))                   # 560 KB: the first step fits, the second does not
    assert ck.wait() == 1
    ck.save(2, _state(2, n=70_000))
    with pytest.raises(RuntimeError, match="No space left on device.*training stops"):
        ck.wait()
    leftovers = [os.path.join(dp, f) for dp, _, fs in os.walk(d) for f in fs if ".tmp" in f]
    assert not leftovers and list_steps(d) == ([1], []), (leftovers, list_steps(d))
    _crash(ck)                                         # the job stops here; its memory level stays
    again = Checkpointer(d, levels=("memory", "disk"), shm_base=shm, keeper_linger=30)
    state = _blank(n=70_000)
    assert again.restore(state) == 2 and again.last_restore["source"] == "memory"
    assert bool((state["t"] == 2).all())
    again.close(shutdown_keeper_process=True)


def test_keeper_death_is_named_and_disk_saves_continue(tmp_path, shm):
    ck = Checkpointer(tmp_path / "a", levels=("memory", "disk"), shm_base=shm)
    ck.save(1, _state(1))
    ck.wait()
    os.kill(ck.keeper.pid, signal.SIGKILL)            # the keeper this Checkpointer started
    with pytest.warns(RuntimeWarning, match=r"keeper \(pid \d+, socket .*keeper.sock\) is gone.*disk-only"):
        for s in (2, 3):
            ck.save(s, _state(s))
            ck.wait()
    assert ck.wait() == 3 and ck.levels == ("disk",)
    ck.close()
    state = _blank()
    again = Checkpointer(tmp_path / "a", levels=("disk",))
    assert again.restore(state) == 3 and state["meta"] == {"v": 3}
    again.close()
    mem = Checkpointer(tmp_path / "b", levels=("memory",), shm_base=shm)
    mem.save(1, _state(1))
    mem.wait()
    os.kill(mem.keeper.pid, signal.SIGKILL)
    with pytest.raises(KeeperUnavailable, match=r"keeper \(pid \d+.*no disk level"):
        mem.save(2, _state(2))
        mem.wait()
