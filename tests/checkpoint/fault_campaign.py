"""Seeded fault campaign for the checkpoint (issue 13): SIGKILL at chosen points of the snapshot,
flush, commit and retention, keeper death, disk full. After every fault the newest checkpoint must
restore bit-exact, never older than the last commit the trainer saw, memory never older than disk.

    python -m tests.checkpoint.fault_campaign --trials 40 --seed 0      # make fault-campaign

Each trial runs the save loop of tests/checkpoint/test_sigkill.py (``CHILD``: two tensors filled
with the step number, ``keep=2``, levels memory + disk) behind a prefix that arms one fault. The
fault fires on the trainer's own operations (the n-th fsync, manifest rename, deletion inside the
checkpoint directory, the n-th ``save()``), not on a timer, so a seed replays the same trial.
Restores are checked with test_sigkill's ``_check``.

Fault kinds:
  snapshot      SIGKILL right after the n-th ``save()`` returned (its copy is in flight)
  flush         SIGKILL before the n-th fsync / rename of a data or index file in the directory
  commit        SIGKILL before the n-th fsync / rename of a manifest
  commit-after  SIGKILL right after the n-th manifest rename
  retention     SIGKILL before the n-th unlink / rmdir inside the directory
  keeper        SIGKILL the node's keeper after the n-th save; the trainer goes on (or stops with
                an error naming the keeper) and is killed 3 saves later
  disk-full     the n-th save finds the disk full (a filler leaves 6 MB on a 26 MiB tmpfs mounted
                for the trial); afterwards the filler is removed and a resume must save again
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch

from heddle.checkpoint import Checkpointer
from tests.checkpoint.test_sigkill import CHILD, _check

KINDS = ("snapshot", "flush", "commit", "commit-after", "retention", "keeper", "disk-full")
# n is drawn from 1..MAX_NTH[kind]: about the first 6 saves of CHILD's loop
MAX_NTH = {"snapshot": 8, "flush": 30, "commit": 12, "commit-after": 6, "retention": 14, "keeper": 5,
           "disk-full": 5}
MAX_SAVES = 14            # a fault not reached by then: the trial ends with a plain SIGKILL
TMPFS_BYTES = 26 << 20    # CHILD's state is 8.4 MB: 2 kept + 1 in flight fit, plus 2 MB
READY_TIMEOUT = 600.0    # torch import + Checkpointer, on a machine shared by many jobs
DISK_LEFT = 6 << 20       # free bytes the filler leaves: the failing write stops 6 MB in

PREFIX = r"""
import faulthandler, json, os, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)   # the campaign dumps a hung trainer's stacks
_spec = json.loads(os.environ["HEDDLE_FAULT"])
_dir = os.path.abspath(sys.argv[1])
_events = open(sys.argv[2] + ".events", "w", buffering=1)
_counts = {}

def _die(what):
    _events.write(f"killed {what}\n")
    _events.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def _count(kind, detail):
    _counts[kind] = _counts.get(kind, 0) + 1
    if kind == _spec["kind"] and _counts[kind] == _spec["nth"]:
        _die(f"{kind} #{_counts[kind]} {detail}")

def _fd_path(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""

def _inside(path, dir_fd=None):
    path = os.fsdecode(path)
    if dir_fd is not None:
        path = os.path.join(_fd_path(dir_fd), path)
    path = os.path.abspath(path)
    return path == _dir or path.startswith(_dir + os.sep)

def _kind_of(path):
    return "commit" if "manifest" in os.path.basename(os.fsdecode(path)).lower() else "flush"

_os = {name: getattr(os, name) for name in ("fsync", "replace", "rename", "unlink", "rmdir")}

def _fsync(fd):
    path = _fd_path(fd) if isinstance(fd, int) else ""
    if path and _inside(path):
        _count(_kind_of(path), path)
    return _os["fsync"](fd)

def _renamer(name):
    def rename(src, dst, *a, **k):
        inside = _inside(dst, k.get("dst_dir_fd"))
        kind = _kind_of(dst)
        if inside:
            _count(kind, dst)
        out = _os[name](src, dst, *a, **k)
        if inside and kind == "commit":
            _count("commit-after", dst)
        return out
    return rename

def _remover(name):
    def remove(path, *a, **k):
        if _inside(path, k.get("dir_fd")):
            _count("retention", os.fsdecode(path))
        return _os[name](path, *a, **k)
    return remove

os.fsync = _fsync
os.replace, os.rename = _renamer("replace"), _renamer("rename")
os.unlink, os.rmdir = _remover("unlink"), _remover("rmdir")
if hasattr(os, "remove"):
    os.remove = os.unlink

def _children():
    me, out = str(os.getpid()), []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.append(int(pid))
            except (OSError, IndexError):
                pass
    return out

def _fill_disk(leave):
    filler = os.path.join(os.path.dirname(_dir), "filler")
    st = os.statvfs(_dir)
    todo = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as f:
        while todo > 0:
            n = min(todo, 1 << 20)
            f.write(b"\0" * n)
            todo -= n
    _events.write(f"filled the disk: {leave} bytes left\n")

import heddle.checkpoint as _hc
import torch.distributed.tensor   # noqa: F401 - the save path imports it lazily; "ready" means ready
_save = _hc.Checkpointer.save
_saves = [0]
_keeper_killed = [None]
_keepers = []

def _faulty_save(self, step, state, *a, **k):
    _saves[0] += 1
    if _saves[0] > _spec["max_saves"]:
        _die(f"late (fault {_spec['kind']} #{_spec['nth']} not reached)")
    if _keeper_killed[0] is not None and _saves[0] >= _keeper_killed[0] + 3:
        _die(f"keeper #{_spec['nth']} +3 saves")
    if _spec["kind"] == "disk-full" and _saves[0] == _spec["nth"]:
        self.wait()
        _fill_disk(_spec["leave"])
    handle = _save(self, step, state, *a, **k)
    if not _keepers:
        _keepers.extend(_children())
        for pid in _keepers:
            _events.write(f"child {pid}\n")
    if _spec["kind"] == "snapshot":
        _count("snapshot", f"step {step}")
    if _spec["kind"] == "keeper" and _saves[0] == _spec["nth"]:
        for pid in _children():
            os.kill(pid, signal.SIGKILL)
            _events.write(f"killed keeper pid {pid} after save {step}\n")
        _keeper_killed[0] = _saves[0]
    return handle

_hc.Checkpointer.save = _faulty_save
"""


@dataclass
class Trial:
    kind: str
    nth: int
    directory: str = ""
    log: str = ""
    mount: str | None = None
    proc: subprocess.Popen | None = None
    stderr: str = ""
    # outcome
    committed: int = -1          # newest manifest the trainer reported
    saved: int = 0               # saves it started
    killed_at: str = ""          # where the fault fired ("" = died by itself)
    continued: bool | None = None  # keeper / disk-full: saves committed after the fault
    disk_step: int | None = None
    mem_step: int | None = None
    source: str | None = None
    exact: bool = False
    lost: bool = False
    resumed: bool | None = None  # disk-full: a resume saved again after the disk was freed
    hung: bool = False           # still running at the timeout (killed)
    notes: list = field(default_factory=list)


def make_trials(count: int, seed: int) -> list[Trial]:
    """``count`` trials cycling through every kind, each with a seeded n."""
    rng = random.Random(seed)
    return [Trial(kind, rng.randint(1, MAX_NTH[kind])) for kind in (KINDS[i % len(KINDS)] for i in range(count))]


@contextmanager
def _tmpfs(path: str, nbytes: int):
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path]).returncode != 0:
            subprocess.run(["umount", "-l", path])
        os.rmdir(path)


def _start(trial: Trial) -> None:
    env = {**os.environ, "HEDDLE_FAULT": json.dumps({"kind": trial.kind, "nth": trial.nth, "max_saves": MAX_SAVES,
                                                     "leave": DISK_LEFT})}
    with open(trial.log + ".err", "w") as err:   # a file: a full stderr pipe would stall the trainer
        trial.proc = subprocess.Popen([sys.executable, "-c", PREFIX + CHILD, trial.directory, trial.log], env=env,
                                      stdout=subprocess.PIPE, stderr=err, text=True)


def _wait_ready(batch: list[Trial], deadline: float) -> None:
    """Wait until every trainer printed "ready" (torch imported, Checkpointer built) or exited:
    on a loaded machine the import alone can take a minute, which is not the trainer hanging."""
    waiting = {t.proc.stdout.fileno(): t for t in batch}
    while waiting and time.monotonic() < deadline:
        readable, _, _ = select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))
        for fd in readable:
            waiting.pop(fd).proc.stdout.readline()    # "ready", or "" at exit


def _progress(trial: Trial) -> int:
    """Bytes the trainer has logged so far (a line per save, the fault events)."""
    total = 0
    for path in (trial.log, trial.log + ".events"):
        try:
            total += os.path.getsize(path)
        except FileNotFoundError:
            pass
    return total


def _wait_done(batch: list[Trial], timeout: float) -> None:
    """Wait for every trainer to end; one that logs nothing new for ``timeout`` seconds is hung:
    its stacks are dumped (faulthandler, SIGUSR1) and it is killed."""
    seen = {id(t): (_progress(t), time.monotonic()) for t in batch}
    while any(t.proc.poll() is None for t in batch):
        now = time.monotonic()
        for t in batch:
            if t.proc.poll() is not None:
                continue
            size = _progress(t)
            if size != seen[id(t)][0]:
                seen[id(t)] = (size, now)
            elif now - seen[id(t)][1] > timeout:
                t.proc.send_signal(signal.SIGUSR1)    # faulthandler: every thread's stack
                time.sleep(1.0)                       # let it write them; then kill
                t.proc.kill()
                t.proc.wait()
                t.hung = True
                stderr = "\n".join(_read(t.log + ".err"))
                main = stderr.rsplit("Current thread", 1)[-1]     # the trainer's own thread
                stacks = [x.strip() for x in main.splitlines() if x.strip().startswith("File ")]
                t.notes.append(f"trainer hung: nothing logged for {timeout:.0f}s, killed; innermost frames: "
                               f"{stacks[:3]}")
        time.sleep(0.2)   # polling the trainers' logs, not synchronising with them
    for t in batch:
        t.proc.communicate()
        t.stderr = "\n".join(_read(t.log + ".err"))


def _read(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _restore_check(directory: str, levels: tuple) -> tuple[int | None, bool, str | None]:
    """test_sigkill's ``_check`` (restore, compare with the step number), plus the source."""
    seen = {}
    real = Checkpointer.restore

    def spy(self, *args, **kwargs):
        step = real(self, *args, **kwargs)
        seen.update(getattr(self, "last_restore", None) or {})
        return step
    with mock.patch.object(Checkpointer, "restore", spy):
        step, ok = _check(directory, levels)
    return step, ok, seen.get("source")


def _resume_after_disk_full(trial: Trial) -> None:
    """The operator frees the disk; a resume restores and must save and commit again."""
    filler = os.path.join(os.path.dirname(trial.directory), "filler")
    if not os.path.exists(filler):     # the trainer ended before the save that fills the disk
        trial.notes.append("the disk was never filled")
        return
    os.unlink(filler)
    state = {"a": torch.empty(1_500_000), "b": torch.empty(300_000, dtype=torch.float64), "meta": {}}
    try:
        ck = Checkpointer(trial.directory, levels=("disk",), keep=2)
        step = ck.restore(state) or 0
        state["a"].fill_(step + 1)
        state["b"].fill_(-(step + 1))
        state["meta"]["step"] = step + 1
        ck.save(step + 1, state)
        ck.close()
        got, ok = _check(trial.directory, ("disk",))
        trial.resumed = ok and got == step + 1
        if not trial.resumed:
            trial.notes.append(f"resume saved step {step + 1} but restore gave {got} (exact {ok})")
    except Exception as e:  # noqa: BLE001 - reported as a failed resume
        trial.resumed = False
        trial.notes.append(f"resume after freeing the disk failed: {e!r}"[:300])


def error_line(stderr: str) -> str:
    """The exception line of a traceback (the last line naming an Error / Exception)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if ("Error" in x or "Exception" in x) and not x.startswith("File ")]
    return (errors or lines or [""])[-1][:300]


def _evaluate(trial: Trial) -> None:
    events = _read(trial.log + ".events")
    kills = [e for e in events if e.startswith(("killed ", "filled "))]
    trial.killed_at = "; ".join(k[7:] for k in kills)
    lines = [x.split() for x in _read(trial.log) if x.startswith("committed ")]
    trial.saved = len(lines)
    trial.committed = max([int(x[1]) for x in lines if x[1:]] + [-1])
    if trial.kind in ("keeper", "disk-full"):
        # keeper: disk-only saves go on committing; disk full: saves go on (memory level) at least
        after = [int(x[1]) for x in lines[trial.nth:] if x[1:]]
        before = max([int(x[1]) for x in lines[:trial.nth] if x[1:]] + [-1])
        alive = trial.proc.returncode == -signal.SIGKILL
        if trial.kind == "keeper":
            trial.continued = alive and bool(after) and max(after) > before
        else:
            trial.continued = alive and len(lines) > trial.nth
        if not alive:
            trial.notes.append(f"trainer stopped (exit {trial.proc.returncode}): {error_line(trial.stderr)}")
    elif trial.proc.returncode != -signal.SIGKILL:
        trial.notes.append(f"trainer exited {trial.proc.returncode}: {error_line(trial.stderr)}")
    trial.disk_step, disk_ok, _ = _restore_check(trial.directory, ("disk",))
    trial.mem_step, mem_ok, trial.source = _restore_check(trial.directory, ("memory", "disk"))
    newest = trial.mem_step if trial.mem_step is not None else -1
    disk = trial.disk_step if trial.disk_step is not None else -1
    trial.exact = disk_ok and mem_ok
    trial.lost = not trial.exact or disk < trial.committed or newest < disk
    if disk < trial.committed:
        trial.notes.append(f"disk restore gave {trial.disk_step}, the trainer had committed {trial.committed}")
    if newest < disk:
        trial.notes.append(f"memory+disk restore gave {trial.mem_step}, older than disk's {trial.disk_step}")
    if trial.kind == "disk-full" and trial.mount is not None:
        _resume_after_disk_full(trial)


def _cleanup(trial: Trial) -> None:
    """Stop what the trial started: its trainer, the keepers it spawned, the keeper of the checks."""
    if not trial.directory:
        return
    if trial.proc is not None and trial.proc.poll() is None:
        trial.proc.kill()
        trial.proc.wait()
    try:   # the keeper (the trainer's, or a fresh one) removes its shared memory on the way out
        Checkpointer(trial.directory, levels=("memory",), keeper_linger=5.0).close(shutdown_keeper_process=True)
    except Exception as e:  # noqa: BLE001 - a cleanup failure must not hide the trial's result
        trial.notes.append(f"keeper cleanup: {e!r}"[:200])
    for line in _read(trial.log + ".events"):   # the trainer's children (its keeper) if still alive
        if line.startswith("child "):
            try:
                os.kill(int(line.split()[1]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def run_trials(trials: list[Trial], root: str, *, parallel: int = 8, timeout: float = 60.0) -> list[Trial]:
    """Run the trials ``parallel`` at a time under ``root``; every trial is evaluated and cleaned.
    A trainer that logs nothing new (no save, no fault event) for ``timeout`` seconds is hung."""
    for start in range(0, len(trials), parallel):
        batch = trials[start:start + parallel]
        with ExitStack() as stack:
            stack.callback(lambda: [_cleanup(t) for t in batch])   # runs before the unmounts
            for i, trial in enumerate(batch, start):
                base = os.path.join(root, f"t{i:03d}-{trial.kind}")
                if trial.kind == "disk-full":
                    trial.mount = stack.enter_context(_tmpfs(base, TMPFS_BYTES))
                else:
                    os.makedirs(base)
                trial.directory, trial.log = os.path.join(base, "ckpt"), os.path.join(base, "log")
                _start(trial)
            _wait_ready(batch, time.monotonic() + READY_TIMEOUT)
            _wait_done(batch, timeout)
            for trial in batch:
                _evaluate(trial)
    return trials


def table(trials: list[Trial]) -> str:
    rows = [("fault", "trials", "fired", "restored exact", "from memory", "from disk", "none committed",
             "lost", "hung", "went on after fault", "resumed after disk full")]
    for kind in [k for k in KINDS if any(t.kind == k for t in trials)] + ["all"]:
        ts = [t for t in trials if kind in ("all", t.kind)]
        cont = [t for t in ts if t.continued is not None]
        res = [t for t in ts if t.resumed is not None]
        rows.append((kind, len(ts), sum(bool(t.killed_at) and "late" not in t.killed_at for t in ts),
                     sum(t.exact and t.mem_step is not None for t in ts),
                     sum(t.source == "memory" for t in ts),
                     sum(t.source == "disk" for t in ts),
                     sum(t.mem_step is None and t.committed < 0 for t in ts),
                     sum(t.lost for t in ts), sum(t.hung for t in ts),
                     f"{sum(t.continued for t in cont)}/{len(cont)}" if cont else "-",
                     f"{sum(t.resumed for t in res)}/{len(res)}" if res else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def details(trials: list[Trial]) -> str:
    out = []
    for i, t in enumerate(trials):
        out.append(f"{i:3d} {t.kind:12s} n={t.nth:<3d} fired: {t.killed_at or 'died by itself'}; committed "
                   f"{t.committed}, disk {t.disk_step}, memory+disk {t.mem_step} ({t.source}), exact {t.exact}"
                   + (f"; went on {t.continued}" if t.continued is not None else "")
                   + (f"; resumed {t.resumed}" if t.resumed is not None else "")
                   + "".join(f"\n      {n}" for n in t.notes))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=42)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without a new save before a trainer counts as hung")
    parser.add_argument("--verbose", action="store_true", help="one line per trial")
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise SystemExit(f"--trials={args.trials} must be >= 1")
    if os.geteuid() != 0:
        print("fault campaign: disk-full trials mount a tmpfs and need root", file=sys.stderr)
    root = tempfile.mkdtemp(prefix="heddle-fault-")
    start = time.monotonic()
    try:
        trials = run_trials(make_trials(args.trials, args.seed), root, parallel=args.parallel, timeout=args.timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"fault campaign: {args.trials} trials, seed {args.seed}, {time.monotonic() - start:.0f} s\n")
    print(table(trials))
    if args.verbose or any(t.lost for t in trials):
        print("\n" + details(trials))
    return 1 if any(t.lost or t.hung or t.resumed is False for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
