"""Measure the cost model's constants on this machine and model (FlexSP, Sec. 4: "profiled").

- compute: forward+backward of the whole model on one packed sequence at a few lengths on every
  rank at once (so contention is what training sees); ``a1 s^2 + a2 s + b1`` fitted by
  non-negative least squares to the mean over ranks.
- all-to-all: for every cached group size d > 1, every rank times ``all_to_all_single`` in its
  aligned group at two payloads; ``t = latency + bytes_out / v_d`` gives v_d and the latency
  (b2 = latency x the 4 all-to-alls per layer per micro-batch, forward and backward). Then the
  model itself runs on each group size at the longest length (``in_situ_check``) and v_d is
  lowered to what its time implies when Ulysses' layout copies make it slower than the bare link.
- intra- vs inter-node: with ``ranks_per_node`` (default ``LOCAL_WORLD_SIZE``) smaller than the
  world, aligned groups of d <= ranks_per_node ranks stay inside a node (loopback / NVLink) and
  larger ones cross the link; both are timed as above, and one extra all-to-all over a group with
  one rank per node times the link alone. ``measured["intra_node_bandwidth"]``,
  ``measured["inter_node_bandwidth"]`` (per group size) and ``measured["link_bandwidth"]`` report
  them separately; the plan uses v_d of the group size it places, so it sees both. Groups that
  cross the link are timed at ``inter_payload_bytes`` (1 and 8 MiB): at 16 KiB a 1 Gbit/s link
  is all latency and scheduling noise.
- a3: bytes one token sends through Ulysses' all-to-alls, counted from the attention modules
  (q, k, v and output, forward and backward) -- exact, not fitted.
- memory: bytes autograd saves for backward per token (``saved_tensors_hooks`` at the longest
  length); static = parameters x 16 bytes (fp32 weights, gradients, Adam's two moments).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from scipy.optimize import nnls

import heddle.dist as hd
from heddle.sequence import UlyssesAttention, local_position_ids, shard_sequence
from heddle.sequence.adaptive.cost_model import CostModel


def _attention_modules(model):
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("n_heads", "n_kv_heads", "head_dim"))]


def ulysses_bytes_per_token(model, element_size: int | None = None) -> float:
    """a3: all-to-all bytes per token over the whole model, forward + backward."""
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention module with n_heads, n_kv_heads and "
                         f"head_dim; pass a3= to calibrate()")
    elt = element_size or next(model.parameters()).element_size()
    return float(sum(2 * (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim * elt for m in mods))


def _time_model(model, length: int, vocab: int, repeats: int, group=None) -> tuple[float, float]:
    """(median seconds of fwd+bwd, saved bytes per token) on one sequence of ``length``; with a
    ``group``, this rank's shard of it (the model's Ulysses modules must be on that group)."""
    g = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, vocab, (1, length), generator=g)
    cu = torch.tensor([0, length])
    pos = torch.arange(length)[None]
    if group is not None:
        tokens, _ = shard_sequence(tokens, group, dim=1)
        pos = local_position_ids(cu, length, group)[None]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times = []
    for i in range(repeats + 1):
        saved[0] = 0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(tokens, position_ids=pos, cu_seqlens=cu)
        out.float().square().mean().backward()
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return float(np.median(times)), saved[0] / length


def _a2a_bandwidth(sub, size: int, payload_bytes, repeats: int, parent) -> tuple[float, float]:
    """(bytes/s per device, latency s) of all_to_all_single on ``sub`` (``size`` ranks), from two
    payloads: t = latency + bytes_out / v. The slowest rank of ``parent`` sets each time."""
    points = []
    for nbytes in payload_bytes:
        n = max(size, nbytes // 4 // size * size)
        send, recv = torch.ones(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
        runs = []
        for i in range(repeats + 1):
            hd.barrier(group=sub)
            start = time.perf_counter()
            hd.all_to_all_single(recv, send, group=sub)
            if i:
                runs.append(time.perf_counter() - start)
        points.append((n * 4 * (size - 1) / size, float(np.median(runs))))
    vals = torch.tensor([p[1] for p in points], dtype=torch.float64)
    hd.all_reduce(vals, op=hd.ReduceOp.MAX, group=parent)
    (x0, t0), (x1, t1) = (points[0][0], float(vals[0])), (points[1][0], float(vals[1]))
    slope = max((t1 - t0) / (x1 - x0), 1e-15)
    return 1.0 / slope, max(t0 - x0 * slope, 0.0)


def _link_bandwidth(group_pool, world: int, ranks_per_node: int, payload_bytes, repeats: int) -> float | None:
    """All-to-all bandwidth per device over groups of one rank per node (every byte crosses the
    link): the inter-node link alone. Collective over the pool's parent group."""
    nodes = world // ranks_per_node
    if nodes < 2 or world % ranks_per_node:
        return None
    ranks = group_pool.ranks
    sub, _ = torch.distributed.new_subgroups_by_enumeration(
        [[ranks[local + k * ranks_per_node] for k in range(nodes)] for local in range(ranks_per_node)],
        backend="gloo")
    try:
        v, _ = _a2a_bandwidth(sub, nodes, payload_bytes, repeats, group_pool.parent)
    finally:
        torch.distributed.destroy_process_group(sub)
    return v


def calibrate(model, group_pool, *, lengths=(128, 256, 512, 1024), repeats: int = 3, vocab: int | None = None,
              payload_bytes=(1 << 14, 1 << 20), device_bytes: float | None = None, a3: float | None = None,
              name: str = "calibrated", in_situ_check: bool = True, ranks_per_node: int | None = None,
              inter_payload_bytes=(1 << 20, 1 << 23)) -> CostModel:
    """Collective over ``group_pool.parent``. ``model`` must already run under Ulysses modules whose
    group is a one-rank group (as :class:`AdaptiveExecutor` leaves it) or plain local attention."""
    if len(lengths) < 3:
        raise ValueError(f"lengths={lengths}: need at least 3 lengths to fit a1, a2, b1")
    group = group_pool.parent
    _, world = hd.group_rank_size(group)
    vocab = vocab or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("vocab=None and the model has no config.vocab_size: pass vocab=")
    samples = [_time_model(model, int(s), vocab, repeats) for s in lengths]
    t = torch.tensor([x[0] for x in samples], dtype=torch.float64)
    if world > 1:
        hd.all_reduce(t, group=group)
        t /= world
    s = np.asarray(lengths, dtype=np.float64)
    design = np.stack([s * s, s, np.ones_like(s)], axis=1)
    (a1, a2, b1), _ = nnls(design, t.numpy())
    fit = design @ np.array([a1, a2, b1])
    compute_err = float(np.max(np.abs(fit - t.numpy()) / t.numpy()))
    bandwidth, latencies = {}, []
    rank = group_pool.ranks.index(torch.distributed.get_rank()) if world > 1 else 0
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if ranks_per_node < 1:
        raise ValueError(f"ranks_per_node={ranks_per_node} must be >= 1")
    size = 2
    while size <= world:
        _, sub = group_pool.containing(rank, size)
        # across a link, small payloads are all latency and noise: time larger ones there
        payloads = payload_bytes if size <= ranks_per_node else inter_payload_bytes
        bandwidth[size], latency = _a2a_bandwidth(sub, size, payloads, repeats, group)
        latencies.append(latency)
        size *= 2
    link = (_link_bandwidth(group_pool, world, ranks_per_node, inter_payload_bytes, repeats)
            if world > ranks_per_node else None)
    intra = {d: v for d, v in bandwidth.items() if d <= ranks_per_node}
    inter = {d: v for d, v in bandwidth.items() if d > ranks_per_node}
    n_layers = len(_attention_modules(model)) or 1
    b2 = 4 * n_layers * float(np.mean(latencies)) if latencies else 0.0
    a3 = a3 if a3 is not None else ulysses_bytes_per_token(model)
    in_situ = _in_situ_bandwidth(model, group_pool, rank, world, int(max(lengths)), vocab, repeats,
                                 (a1, a2, b1, a3, b2)) if in_situ_check else {}
    for size, v in in_situ.items():
        # Ulysses moves more than a bare all-to-all (layout copies, padding): the model's own
        # all-to-all time, if slower, is what the plan will see; it cannot be faster than the link.
        bandwidth[size] = min(bandwidth[size], v)
    saved_per_token = float(np.max([x[1] for x in samples]))
    params = sum(p.numel() for p in model.parameters())
    static = float(params * 16)
    if device_bytes is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        device_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(local, 1)
    return CostModel(a1=float(a1), a2=float(a2), b1=float(b1), a3=a3,
                     b2=b2, bandwidth=bandwidth, token_bytes=saved_per_token, static_bytes=static,
                     device_bytes=float(device_bytes), name=name,
                     notes=f"calibrated on {world} process(es): lengths {list(lengths)}, {repeats} repeats",
                     measured={"lengths": list(map(int, lengths)), "compute_s": t.tolist(),
                               "compute_fit_max_rel_error": compute_err, "latency_s": latencies,
                               "in_situ_bandwidth": {str(k): v for k, v in in_situ.items()},
                               "ranks_per_node": ranks_per_node,
                               "intra_node_bandwidth": {str(k): v for k, v in intra.items()},
                               "inter_node_bandwidth": {str(k): v for k, v in inter.items()},
                               "link_bandwidth": link})


def _in_situ_bandwidth(model, pool, rank, world, length, vocab, repeats, constants) -> dict[int, float]:
    """Per group size d: time the model on its d-rank group at ``length`` and read the all-to-all
    bandwidth from what the compute fit does not explain:
    v_d = a3 (L/d) (d-1)/d / (t_d - (a1 L^2 + a2 L)/d - b1 - b2). Sizes where the excess is not
    positive (noise) are left out."""
    modules = [m for m in model.modules() if isinstance(m, UlyssesAttention)]
    if not modules or world == 1:
        return {}
    a1, a2, b1, a3, b2 = constants
    before = [m.group for m in modules]
    out, size = {}, 2
    try:
        while size <= world:
            _, sub = pool.containing(rank, size)
            for m in modules:
                m.group = sub
            t = torch.tensor([_time_model(model, length, vocab, repeats, group=sub)[0]], dtype=torch.float64)
            hd.all_reduce(t, op=hd.ReduceOp.MAX, group=pool.parent)
            excess = float(t) - (a1 * length * length + a2 * length) / size - b1 - b2
            if excess > 0:
                out[size] = a3 * length / size * (size - 1) / size / excess
            size *= 2
    finally:
        for m, g in zip(modules, before):
            m.group = g
    return out
