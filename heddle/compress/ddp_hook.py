"""The compressed DDP comm hook, overlapped with backward, in one fixed collective order.

DDP calls the hook for bucket 0, 1, ..., n-1 in index order on every rank, each as soon as the
bucket's gradients are ready, and waits for the returned futures only at the end of backward.
Per bucket the hook:

1. picks v per layer from g and the error buffers, encodes it (the wire waits on that: the data
   dependence) and issues the bucket's collective(s) with ``async_op=True``;
2. advances the two-phase exchanges of earlier buckets (PowerSGD: sum Q needs sum P, so bucket
   i-1's second phase is issued at bucket i, after its first phase overlapped bucket i's
   backward); at the last bucket every pending phase is issued;
3. returns a future for the bucket. By default the payloads are decoded at the last bucket, on
   the hook's thread, for all buckets in order (the feedback updates its staged buffers and the
   bucket buffers are filled): the wire never waits for a decode. With
   ``decode_in_callback=True`` each bucket is decoded in its collective's callback instead
   (overlapping decode with backward: good where the callback thread has a core to itself; on a
   CPU box with busy cores, gloo runs the callback on its worker thread and the next bucket's
   transfer waits behind the decode, measured slower, docs/compress.md).

Collectives are issued only in steps 1-2, on the hook's thread, in bucket order: the sequence is
the same on every rank whatever the timing. Callbacks (step 3) issue none. The last bucket's
future also waits for every other bucket and then ends the compression step.
``GradientCompression(overlap=False)`` runs the same three steps back to back per bucket (the
blocking hook): the same arithmetic, so the same bits.
"""

from __future__ import annotations

import threading

import torch


class _BucketJob:
    """One bucket in flight: completes its future once every exchange of the bucket is done."""

    def __init__(self, comp, batch, exchanges, buffer):
        self.comp, self.batch, self.exchanges, self.buffer = comp, batch, exchanges, buffer
        self.future = torch.futures.Future()
        self.remaining = len(exchanges)
        self._lock = threading.Lock()

    def watch(self, exchange) -> None:
        """Called once ``exchange`` has issued its last collective."""
        def on_done(fut):
            try:
                fut.wait()
            except Exception as exc:  # noqa: BLE001 - the bucket's future carries the error
                self._fail(exc)
                return
            with self._lock:
                self.remaining -= 1
                last = self.remaining == 0
            if last:
                self._complete()
        exchange.future().then(on_done)

    def _complete(self) -> None:
        try:
            for ex in self.exchanges:
                ex.finish()
            write_bucket(self.buffer, self.comp._finish(self.batch))
            self.future.set_result(self.buffer)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _fail(self, exc) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def write_bucket(buffer: torch.Tensor, outs: list[torch.Tensor]) -> None:
    flat = torch.cat([o.reshape(-1) for o in outs]).to(buffer.dtype)
    if flat.numel() != buffer.numel():  # invariant: DDP's CPU/GPU buckets pack grads densely
        raise RuntimeError(f"bucket buffer has {buffer.numel()} elements, gradients {flat.numel()}")
    buffer.copy_(flat)


class BucketPipeline:
    """Per-step bucket bookkeeping of one GradientCompression's DDP hook."""

    def __init__(self, comp):
        self.comp = comp
        self.pending: list = []     # exchanges with phases still to issue, in issue order
        self.jobs: list[_BucketJob] = []
        self.owner: dict[int, _BucketJob] = {}

    def submit(self, bucket) -> torch.futures.Future:
        comp = self.comp
        if bucket.index() == 0:
            self.pending, self.jobs, self.owner = [], [], {}
        keys = [comp._key(p) for p in bucket.parameters()]
        batch = comp._prepare(keys, bucket.gradients())
        exchanges = comp._issue(batch)
        job = _BucketJob(comp, batch, exchanges, bucket.buffer())
        if not comp.overlap:                 # the blocking hook: every phase now, then wait
            for ex in exchanges:
                while not ex.issued:
                    comp._advance(ex)
        for ex in self.pending:              # earlier buckets' next phase, in issue order
            comp._advance(ex)
        self._watch_issued()
        for ex in exchanges:
            if ex.issued:
                self._watch(job, ex)
            else:
                self.pending.append(ex)
                self.owner[id(ex)] = job
        if bucket.is_last():
            while self.pending:
                for ex in self.pending:
                    comp._advance(ex)
                self._watch_issued()
        if not comp.overlap:
            job.future.wait()
        self.jobs.append(job)
        if not bucket.is_last():
            return job.future
        jobs, self.jobs = self.jobs, []
        last_buffer = bucket.buffer()
        if comp.overlap and not comp.decode_in_callback:   # decode every bucket now, in order
            for j in jobs:
                j._complete()
            for j in jobs:
                j.future.wait()              # re-raises a bucket's error (the step is not ended)
            comp._end_step()
            done = torch.futures.Future()
            done.set_result(last_buffer)
            return done

        def end_step(fut):
            for f in fut.value():
                f.value()                    # re-raises a bucket's error
            comp._end_step()
            return last_buffer
        return torch.futures.collect_all([j.future for j in jobs]).then(end_step)

    def _watch(self, job, ex) -> None:
        comp = self.comp
        if not comp.overlap or comp.decode_in_callback:
            job.watch(ex)

    def _watch_issued(self) -> None:
        still = []
        for ex in self.pending:
            if ex.issued:
                self._watch(self.owner.pop(id(ex)), ex)
            else:
                still.append(ex)
        self.pending = still
