"""Shared test fixtures and the multi-process harness.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on ``world_size``
spawned processes joined in a gloo process group, and returns the per-rank results (torch tensors
converted to numpy arrays: tensors sent through a multiprocessing queue share file descriptors that
die with the child). ``fn`` must be a module-level function (it is pickled by reference). A rank's
exception fails the test with that rank's traceback; a hang fails it at ``timeout`` seconds; no
process outlives the call.
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
import time
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.multiprocessing as mp

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests


def _to_plain(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    return value


def _worker(fn, rank, world_size, init_file, timeout, args, kwargs, results):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, "ok", _to_plain(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedTestError(AssertionError):
    pass


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="heddle-test-")
    init_file = os.path.join(tmp, "init")
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, timeout, args, kwargs, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    grace_deadline = None
    try:
        while len(out) + len(errors) < world_size:
            now = time.monotonic()
            if now > deadline or (grace_deadline is not None and now > grace_deadline):
                break
            try:
                rank, status, value = results.get(timeout=0.2)
                if status == "ok":
                    out[rank] = value
                else:
                    errors[rank] = value
                    grace_deadline = grace_deadline or time.monotonic() + 10.0  # peers may hang
                continue
            except queue_module.Empty:
                pass
            for rank, p in enumerate(procs):
                if rank not in out and rank not in errors and p.exitcode not in (None, 0):
                    try:  # its result may still be in the pipe
                        rank2, status, value = results.get(timeout=1.0)
                        (out if status == "ok" else errors)[rank2] = value
                    except queue_module.Empty:
                        errors[rank] = f"process exited with code {p.exitcode} and no result"
                    grace_deadline = grace_deadline or time.monotonic() + 10.0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        first = next(iter(errors))  # the first failure to arrive: usually the cause, not a victim
        others = sorted(set(range(world_size)) - set(out) - set(errors))
        raise DistributedTestError(f"rank {first} of {world_size} failed"
                                   + (f" (ranks {others} gave no result)" if others else "")
                                   + f":\n{errors[first]}"
                                   + "".join(f"\n--- rank {r} also failed:\n{errors[r][-1500:]}"
                                             for r in errors if r != first))
    if len(out) < world_size:
        missing = sorted(set(range(world_size)) - set(out))
        raise DistributedTestError(f"timeout after {timeout:.0f}s: ranks {missing} of {world_size} gave no result")
    return [out[r] for r in range(world_size)]


def assert_close(actual, expected, atol=1e-10, rtol=0.0, what=""):
    """np.testing.assert_allclose on tensors or arrays, with a label."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)
