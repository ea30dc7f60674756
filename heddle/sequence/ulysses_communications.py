"""The two Ulysses all-to-alls as autograd Functions, each ONE ``all_to_all_single``.

Both work on sequence-first views ``[s, b, h, d]`` (a batch-first tensor is passed as its
``transpose(0, 1)`` view, which costs nothing): packing into the send buffer is the only copy
before the collective, and because every block a rank sends is sequence-major, the receive
buffer of the head scatter *is* the full-sequence tensor ``[s, b, h_me, d]`` and is returned as
views (no unpack copy).

Head bookkeeping (``HeadSplit``): a tensor with ``heads`` heads is cut into ``units`` head
units; unit ``u`` is head ``u // repeat`` (``repeat > 1`` replicates GQA kv heads so that every
rank gets one, the DeepSpeed-Ulysses recipe for P > Hkv); rank j gets the units
``starts[j] .. starts[j] + counts[j] - 1``.

- :class:`ScatterHeads` (Ulysses eq. "first all-to-all"): tensors ``[s/P, b, H_t, d]`` ->
  views ``[s, b, counts_t[me], d]``. Its backward gathers the gradients back (the inverse
  all-to-all) and sums the gradients of repeated kv heads into their source head.
- :class:`GatherHeads` (the output all-to-all): ``[s, b, h_me, d]`` -> ``[s/P, b, H, d]``;
  backward is the head scatter of the gradient.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from heddle.dist import all_to_all_single, comm_tag, group_rank_size


@dataclass(frozen=True)
class HeadSplit:
    """How one tensor's heads are distributed over the ranks of the sequence-parallel group."""

    heads: int            # heads of the tensor as the caller holds it (H or Hkv)
    repeat: int           # unit u is head u // repeat
    counts: tuple         # units per rank
    starts: tuple         # first unit of each rank

    @classmethod
    def even(cls, heads: int, repeat: int, world: int) -> "HeadSplit":
        """``heads * repeat`` units over ``world`` ranks, the first ranks taking one more."""
        units = heads * repeat
        counts = tuple(units // world + (1 if j < units % world else 0) for j in range(world))
        starts = tuple(sum(counts[:j]) for j in range(world))
        return cls(heads, repeat, counts, starts)

    def source_heads(self, rank: int, device=None) -> torch.Tensor | None:
        """Head index of each unit rank ``rank`` gets; None when it is a plain contiguous range."""
        if self.repeat == 1:
            return None
        units = torch.arange(self.starts[rank], self.starts[rank] + self.counts[rank], device=device)
        return units // self.repeat


def _storage_use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:  # a private torch helper; without it every buffer is simply allocated fresh
    _ALONE = _storage_use_count(torch.empty(1))
except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
    _ALONE = None


class BufferPool:
    """Reused CPU send / receive buffers for the all-to-alls.

    On the CPU every fresh multi-MB buffer is fresh pages from the OS (page faults and zeroing on
    first touch: measured here, a fresh 24 MB send+receive pair doubles an all-to-all's time).
    A pooled buffer is handed out as a new view; it is free again once nothing but the pool
    references its storage (the views autograd saved for backward keep it busy until then).
    CUDA tensors go to torch's caching allocator, which does this already.
    """

    def __init__(self, *, max_per_size: int = 4, max_sizes: int = 8):
        self.max_per_size, self.max_sizes = max_per_size, max_sizes
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu" or _ALONE is None:
            return like.new_empty(numel)
        key = (like.dtype, int(numel))
        with self._lock:
            buffers = self._buffers.pop(key, [])
            self._buffers[key] = buffers  # most recently used last
            for buffer in buffers:
                if _storage_use_count(buffer) == _ALONE:
                    return buffer.view(-1)
            buffer = like.new_empty(numel)
            if len(buffers) < self.max_per_size:
                buffers.append(buffer)
            while len(self._buffers) > self.max_sizes:
                del self._buffers[next(iter(self._buffers))]
            return buffer.view(-1)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()

    def nbytes(self) -> int:
        """Bytes the pool holds (busy or free)."""
        with self._lock:
            return sum(b.numel() * b.element_size() for bufs in self._buffers.values() for b in bufs)


POOL = BufferPool()


def _pack_heads(block: torch.Tensor, xs, splits, rank: int) -> None:
    """Copy the units of every x destined to ``rank`` side by side into ``block`` [sl, b, W, d]."""
    offset = 0
    for x, split in zip(xs, splits):
        n = split.counts[rank]
        index = split.source_heads(rank, x.device)
        src = x.narrow(2, split.starts[rank], n) if index is None else x.index_select(2, index)
        block.narrow(2, offset, n).copy_(src)
        offset += n


def _unpack_heads(block: torch.Tensor, outs, splits, rank: int) -> None:
    """Inverse of :func:`_pack_heads`: add the units of ``rank`` in ``block`` into ``outs``
    (``index_add_`` sums the gradients of repeated kv units into their source head)."""
    offset = 0
    for out, split in zip(outs, splits):
        n = split.counts[rank]
        index = split.source_heads(rank, out.device)
        piece = block.narrow(2, offset, n)
        if index is None:
            out.narrow(2, split.starts[rank], n).copy_(piece)
        else:
            out.index_add_(2, index, piece)
        offset += n


class _Pending:
    """An all-to-all in flight: its work handle and what finishing it needs."""

    def __init__(self, work, send, recv, shape, widths, splits, rank):
        self.work, self.send, self.recv, self.rank = work, send, recv, rank
        self.shape, self.widths, self.splits = shape, widths, splits

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.send = None  # the send buffer can go as soon as the collective is done


def scatter_start(xs, splits, group) -> _Pending:
    """Pack xs [sl, b, H_t, d] (every tensor's units for rank j side by side, block j) and start the
    one all-to-all, asynchronously. Finish with :func:`scatter_finish`."""
    rank, world = group_rank_size(group)
    sl, b, _, d = xs[0].shape
    widths = [sum(sp.counts[j] for sp in splits) for j in range(world)]
    row = sl * b * d
    send = POOL.get(row * sum(widths), xs[0])
    offset = 0
    for j in range(world):
        _pack_heads(send.narrow(0, offset, row * widths[j]).view(sl, b, widths[j], d), xs, splits, j)
        offset += row * widths[j]
    recv = POOL.get(world * row * widths[rank], send)
    with comm_tag("ulysses"):
        work = all_to_all_single(recv, send, [row * widths[rank]] * world, [row * w for w in widths],
                                 group=group, async_op=True)
    return _Pending(work, send, recv, (sl, b, d), widths, splits, rank)


def scatter_finish(pending: _Pending) -> list[torch.Tensor]:
    """Wait; the results [P*sl, b, counts_t[me], d] are views of the receive buffer (no copy)."""
    pending.wait()
    rank, world = pending.rank, len(pending.widths)
    sl, b, d = pending.shape
    full = pending.recv.view(world * sl, b, pending.widths[rank], d)
    outs, offset = [], 0
    for split in pending.splits:
        outs.append(full.narrow(2, offset, split.counts[rank]))
        offset += split.counts[rank]
    return outs


def scatter_heads(xs, splits, group) -> list[torch.Tensor]:
    """xs: tensors [sl, b, H_t, d] (local sequence shard, all heads) -> [P*sl, b, counts_t[me], d].

    One all-to-all for all tensors together; the results are views of the receive buffer.
    """
    return scatter_finish(scatter_start(xs, splits, group))


def gather_start(ys, splits, group) -> _Pending:
    """Start the inverse all-to-all of ys [s, b, counts_t[me], d]; finish with :func:`gather_finish`.
    A single sequence-major contiguous tensor is sent as it is (no pack copy)."""
    rank, world = group_rank_size(group)
    s, b, _, d = ys[0].shape
    sl = s // world
    widths = [sum(sp.counts[j] for sp in splits) for j in range(world)]
    row = sl * b * d
    if len(ys) == 1 and ys[0].is_contiguous():
        send = ys[0]
    else:  # sequence-major send buffer: the block for rank j is rows j*sl .. (j+1)*sl, contiguous
        send = POOL.get(s * b * widths[rank] * d, ys[0]).view(s, b, widths[rank], d)
        offset = 0
        for y, split in zip(ys, splits):
            send.narrow(2, offset, split.counts[rank]).copy_(y)
            offset += split.counts[rank]
    recv = POOL.get(row * sum(widths), send)
    with comm_tag("ulysses"):
        work = all_to_all_single(recv, send.view(-1), [row * w for w in widths], [row * widths[rank]] * world,
                                 group=group, async_op=True)
    return _Pending(work, send, recv, (sl, b, d), widths, splits, rank)


def gather_finish(pending: _Pending, outs) -> list[torch.Tensor]:
    """Wait and unpack into ``outs`` ([sl, b, H_t, d] each, possibly strided views); returns outs."""
    pending.wait()
    sl, b, d = pending.shape
    row, offset = sl * b * d, 0
    for j, width in enumerate(pending.widths):
        _unpack_heads(pending.recv.narrow(0, offset, row * width).view(sl, b, width, d), outs, pending.splits, j)
        offset += row * width
    return outs


def new_outputs(like: torch.Tensor, splits, sl: int, b: int, batch_first: bool) -> list[torch.Tensor]:
    """[sl, b, H_t, d] result tensors (zeroed where repeated units are summed into them);
    ``batch_first``: transposed views of contiguous [b, sl, H_t, d] tensors."""
    d = like.shape[-1]
    shape = (b, sl) if batch_first else (sl, b)
    outs = []
    for sp in splits:
        out = POOL.get(b * sl * sp.heads * d, like).view(*shape, sp.heads, d)
        outs.append(out.zero_() if sp.repeat > 1 else out)
    return [o.transpose(0, 1) for o in outs] if batch_first else outs


def gather_heads(ys, splits, group, batch_first: bool = False) -> list[torch.Tensor]:
    """ys: tensors [s, b, counts_t[me], d] (full sequence, this rank's heads) -> [s/P, b, H_t, d].

    One all-to-all for all tensors together (the inverse of :func:`scatter_heads`).
    ``batch_first``: the results are transposed views of contiguous ``[b, s/P, H_t, d]`` tensors.
    """
    _, world = group_rank_size(group)
    s, b = ys[0].shape[:2]
    return gather_finish(gather_start(ys, splits, group), new_outputs(ys[0], splits, s // world, b, batch_first))


class ScatterHeads(torch.autograd.Function):
    """[s/P, b, H_t, d] per tensor -> [s, b, h_t_me, d]; backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, splits, group, batch_first, *xs):
        ctx.splits, ctx.group, ctx.batch_first = splits, group, batch_first
        ctx.dtype_device = [(x.dtype, x.device) for x in xs]
        return tuple(scatter_heads(xs, splits, group))

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros(out_shape, dtype=dt, device=dev) if g is None else g
                 for g, out_shape, (dt, dev) in zip(grads, _full_shapes(ctx, grads), ctx.dtype_device)]
        return (None, None, None, *gather_heads(grads, ctx.splits, ctx.group, ctx.batch_first))


def _full_shapes(ctx, grads):
    # Shape of a missing gradient (an output that did not reach the loss) from a present one.
    present = next(g for g in grads if g is not None)
    rank, _ = group_rank_size(ctx.group)
    return [(present.shape[0], present.shape[1], sp.counts[rank], present.shape[3]) for sp in ctx.splits]


class GatherHeads(torch.autograd.Function):
    """[s, b, h_me, d] -> [s/P, b, H, d]; backward: the head scatter of the gradient."""

    @staticmethod
    def forward(ctx, split, group, batch_first, y):
        ctx.split, ctx.group = split, group
        return gather_heads([y], [split], group, batch_first)[0]

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, scatter_heads([grad], [ctx.split], ctx.group)[0]
