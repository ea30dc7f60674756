"""Checkpointing inside a training loop: heddle vs torch.save (+fsync) vs dcp.save vs dcp.async_save.

    heddle bench checkpoint --sizes 50,200,1000 --every 1,5 --steps 10
    heddle run -n 1 benchmarks/checkpoint.py          # same, prints the tables and the goals

One training loop (an MLP + Adam whose parameters and two moments total ``size`` MB, one torch
thread) per (size, every, method). Per checkpoint the *stall* is every second the loop is blocked
by checkpointing: the save call, plus heddle's lazy wait before the next optimizer step, plus
dcp.async_save's wait for the previous save (one in flight). Also: steps/s relative to no
checkpointing, save -> durable (files fsynced), peak extra RSS (sampled every 10 ms, includes
mapped shared memory), recovery from the keeper's memory vs from disk (page cache dropped with
posix_fadvise), and the GIL cost of a writer thread vs a writer process on a Python-bound loop.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time

import torch

import heddle.dist as hd

from heddle.bench.scenario import BenchContext, Scenario, summarize

METHODS = ("none", "torch.save", "dcp.save", "dcp.async_save", "dcp.async_save+cached", "heddle", "heddle-latest")


def build(size_mb: float, width: int = 1024):
    """MLP + Adam with ~size_mb MB of fp32 state (params + exp_avg + exp_avg_sq = 12 B/param)."""
    layers = max(1, round(size_mb * 1e6 / 12 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(32, width)
    return model, opt, x


class _RssPeak:
    """Peak resident set size (bytes) of this process, sampled by a thread."""

    def __init__(self):
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.base = self.peak = self.rss()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class _Saver:
    """One checkpointing method behind a common interface; records stalls and durable times."""

    def __init__(self, method: str, directory: str, group):
        import torch.distributed.checkpoint as dcp

        self.method, self.directory, self.group, self.dcp = method, directory, group, dcp
        self.pending, self.durable, self.ckpt, self.stager = None, [], None, None
        if method.startswith("heddle"):
            from heddle.checkpoint import Checkpointer
            # "heddle": every save becomes durable (back-pressure when the disk is slower than
            # the saves); "heddle-latest": every save reaches the keeper's memory, the disk gets the
            # newest snapshot whenever the writer is free (3 slots: flushing, newest in memory, copying)
            latest = method == "heddle-latest"
            self.ckpt = Checkpointer(directory, group=group, keep=2, keeper_linger=120,
                                     flush="latest" if latest else "every", num_slots=3 if latest else 2)
        if method == "dcp.async_save+cached":
            # a stager kept across saves reuses its CPU copies (cached per storage); no pinning
            # or non-blocking copies on a CPU-only machine
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                       use_async_staging=False, use_non_blocking_copy=False))

    def before_step(self) -> None:
        if self.ckpt is not None:
            self.ckpt.wait_for_snapshot()

    def save(self, step: int, model, opt) -> None:
        path = os.path.join(self.directory, f"step{step}")
        start = time.perf_counter()
        if self.method == "torch.save":   # one file per rank, as every rank holds a copy
            path = f"{path}-rank{hd.group_rank_size(self.group)[0]}"
            tmp = path + ".pt.tmp"
            with open(tmp, "wb") as f:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path + ".pt")
            self.durable.append(time.perf_counter() - start)
        elif self.method == "dcp.save":
            self.dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path,
                          process_group=self.group)
            self.durable.append(time.perf_counter() - start)
        elif self.method.startswith("dcp.async_save"):
            if self.pending is not None:
                self.pending.result()          # one save in flight: the wait is part of the stall
            fut = self.dcp.async_save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                                      checkpoint_id=path, process_group=self.group, async_stager=self.stager)
            fut.add_done_callback(lambda _f, t=start: self.durable.append(time.perf_counter() - t))
            self.pending = fut
        elif self.ckpt is not None:
            self.ckpt.save(step, {"model": model, "optimizer": opt})

    def drain(self) -> None:
        """Wait for every checkpoint in flight (durable)."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        if self.ckpt is not None:
            self.ckpt.wait()

    def finish(self) -> None:
        if self.pending is not None:
            self.pending.result()
        if self.stager is not None:
            self.stager.close()
        if self.ckpt is not None:
            self.ckpt.wait()
            self.durable = [h.durable_at - h.created_at for h in self._heddle_handles if h.durable_at]


def shared_tempdir(parent: str | None, prefix: str, group) -> str:
    """A temporary directory rank 0 creates and every rank of ``group`` uses (a checkpoint's
    ranks must agree on its directory: the keeper and the manifest are keyed by it)."""
    import torch.distributed as dist

    rank, world = hd.group_rank_size(group)
    if rank == 0 and parent is not None:
        os.makedirs(parent, exist_ok=True)  # --dir X: X need not exist yet
    holder = [tempfile.mkdtemp(dir=parent, prefix=prefix) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return holder[0]


def train_case(size_mb: float, every: int, method: str, steps: int, root: str, group) -> dict:
    model, opt, x = build(size_mb)
    for _ in range(2):   # Adam state exists before the first checkpoint
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    directory = shared_tempdir(root, method.replace("+", "_") + "-", group)
    saver = _Saver(method, directory, group)
    saver._heddle_handles = []
    if method != "none":   # one untimed checkpoint first: buffers and caches exist (steady state)
        saver.save(0, model, opt)
        saver.drain()
        saver.durable = []
    stalls, step_times, calls, waits = [], [], [], []
    gc.collect()
    with _RssPeak() as rss:
        start = time.perf_counter()
        pending_stall = None
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            tw = time.perf_counter()
            saver.before_step()
            waited = time.perf_counter() - tw
            if pending_stall is not None:
                stalls[pending_stall] += waited
                waits.append(waited)
                pending_stall = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if method != "none" and step % every == 0:
                ts = time.perf_counter()
                saver.save(step, model, opt)
                stalls.append(time.perf_counter() - ts)
                calls.append(stalls[-1])
                pending_stall = len(stalls) - 1
                if saver.ckpt is not None:
                    saver._heddle_handles.append(saver.ckpt._handles.get(step))
            step_times.append(time.perf_counter() - t0)
        loop = time.perf_counter() - start
        saver._heddle_handles = [h for h in saver._heddle_handles if h is not None]
        saver.finish()
    row = {"size_mb": size_mb, "every": every, "method": method, "steps": steps,
           "state_mb": sum(p.numel() for p in model.parameters()) * 12 / 1e6,
           "steps_per_s": steps / loop, "step_s": summarize(step_times)["median_s"],
           "peak_extra_rss_mb": (rss.peak - rss.base) / 1e6}
    if stalls:
        s = summarize(stalls)
        row.update(stall_median_s=s["median_s"], stall_p95_s=s["p95_s"],
                   save_call_median_s=summarize(calls)["median_s"],
                   lazy_wait_median_s=summarize(waits)["median_s"] if waits else 0.0)
    if saver.durable:
        row["save_to_durable_s"] = summarize(saver.durable)["median_s"]
    rank, world = hd.group_rank_size(group)
    if method.startswith("heddle"):
        saver.ckpt.close()   # one live Checkpointer per directory; the keeper keeps the memory level
        row.update(recovery_rows(saver.ckpt, directory, model, opt, group))
        if world > 1:
            hd.barrier(group=group)
        if rank % saver.ckpt.ranks_per_node == 0:
            from heddle.checkpoint import shutdown_keeper
            shutdown_keeper(saver.ckpt.shm_root)
    if world > 1:
        hd.barrier(group=group)
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
    return row


def _drop_page_cache(directory: str) -> None:
    for dirpath, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def recovery_rows(ckpt, directory: str, model, opt, group) -> dict:
    """Restart-style restores of the newest checkpoint: a fresh Checkpointer each time."""
    from heddle.checkpoint import Checkpointer

    state = {"model": model, "optimizer": opt}
    out = {}
    for label, levels, cold in (("memory", ("memory",), False), ("disk_cold", ("disk",), True),
                                ("disk_warm", ("disk",), False)):
        if cold:
            _drop_page_cache(directory)
        start = time.perf_counter()
        restorer = Checkpointer(directory, group=group, levels=levels)
        step = restorer.restore(state)
        out[f"recover_{label}_s"] = time.perf_counter() - start
        assert step is not None and restorer.last_restore["source"] == levels[0], restorer.last_restore
        restorer.close()
    return out


# -- GIL cost: writer thread vs writer process -----------------------------------------------
def _write_forever(nbytes: int, directory: str, stop) -> None:
    from heddle.checkpoint.storage import RankIndex, write_rank_files

    data = torch.ones(nbytes, dtype=torch.uint8).numpy()
    step = 0
    while not stop.is_set():
        write_rank_files(directory, RankIndex(step % 2, 0, 1, None, [], [], nbytes), data)
        step += 1


def gil_rows(root: str, steps: int = 200, write_mb: int = 200) -> list[dict]:
    """A Python-bound loop (40 tiny layers, batch 4) alone, with a writer thread, with a writer
    process, both flushing a ``write_mb`` MB snapshot (CRC-32 + write + fsync) in a loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(40)])
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(4, 32)

    def loop():
        start = time.perf_counter()
        for _ in range(steps):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - start) / steps

    loop()
    rows = []
    for mode in ("alone", "thread", "process"):
        directory = tempfile.mkdtemp(dir=root, prefix=f"gil-{mode}-")
        worker = stop = None
        if mode == "thread":
            stop = threading.Event()
            worker = threading.Thread(target=_write_forever, args=(write_mb << 20, directory, stop), daemon=True)
        elif mode == "process":
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            worker = ctx.Process(target=_write_forever, args=(write_mb << 20, directory, stop), daemon=True)
        if worker is not None:
            worker.start()
            time.sleep(2.0 if mode == "process" else 0.2)   # let it import and reach its write loop
        per_step = loop()
        if worker is not None:
            stop.set()
            worker.join()
        shutil.rmtree(directory, ignore_errors=True)
        rows.append({"part": "gil", "writer": mode, "step_ms": per_step * 1e3})
    for r in rows:
        r["slowdown"] = r["step_ms"] / rows[0]["step_ms"]
    return rows


class CheckpointScenario(Scenario):
    name = "checkpoint"
    help = "checkpoint stall, throughput, durability, memory and recovery: heddle vs torch.save vs DCP"
    quick_args = ["--sizes", "50", "--every", "1", "--steps", "6", "--parts", "train"]

    def add_options(self, parser):
        parser.add_argument("--sizes", default="50,200,1000", help="total state in MB, comma separated")
        parser.add_argument("--every", default="1,5", help="checkpoint every N steps, comma separated")
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument("--methods", default=",".join(METHODS))
        parser.add_argument("--parts", default="train,gil", help="train, gil")
        parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")

    def run(self, ctx: BenchContext, options) -> list[dict]:
        torch.set_num_threads(1)
        root = shared_tempdir(options.dir, "heddle-bench-ckpt-", ctx.group)
        rows = []
        parts = options.parts.split(",")
        methods = [m for m in options.methods.split(",") if m]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; valid: {METHODS}")
        try:
            if "train" in parts:
                for size in [float(s) for s in options.sizes.split(",")]:
                    for every in [int(e) for e in options.every.split(",")]:
                        base = None
                        for method in methods:
                            row = train_case(size, every, method, options.steps, root, ctx.group)
                            row["part"] = "train"
                            if method == "none":
                                base = row
                            if base is not None:
                                row["throughput_vs_none"] = row["steps_per_s"] / base["steps_per_s"]
                            rows.append(row)
                            ctx.log(f"checkpoint {size:g} MB every {every}: {method} "
                                    f"{row['steps_per_s']:.2f} steps/s stall {row.get('stall_median_s', 0):.3f}s")
            if "gil" in parts and ctx.rank == 0:
                rows.extend(gil_rows(root))
        finally:
            if ctx.rank == 0:
                shutil.rmtree(root, ignore_errors=True)
        return [{"scenario": self.name, **r} for r in rows]


SCENARIO = CheckpointScenario()
