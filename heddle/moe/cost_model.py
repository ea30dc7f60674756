"""A cost model of one MoE layer (forward + backward) at cluster scale: EP vs FSSDP vs FSDP over
experts, for simulating the paper's setting (32 devices, 64 experts) where we have no cluster.

Routing: each device routes ``tokens`` tokens to top-k experts drawn from a Zipf(s) popularity
(p_e proportional to 1 / (e+1)^s; the k picks of a token are distinct). The plans come from
heddle.moe.placement itself (Algorithm 1, dispatch, Algorithm 2), so the simulation exercises
the same code the layer runs.

Per device j (h = d_model, f = d_ffn, b = bytes per element, expert bytes P = n_mat * h * f * b):
- compute_j = tokens_processed_j * 3 * 2 * n_mat * h * f / flops  (forward + 2x backward)
- all-to-all: 4 per layer (dispatch + combine, forward and backward), each priced by the busiest
  device: max_j(max(sent_j, received_j)) * h * b / bandwidth (a token row is h * b bytes);
- EP: layer = max_j compute_j + 4 * a2a;
- FSSDP: the same with FSSDP's dispatch (most tokens stay local), plus the sparse collectives:
  spAG and spRS each max_j(max(sent_j, recv_j)) * P / bandwidth, of which the part beyond
  ``overlap_s`` (the non-MoE time of the layer they overlap with) is exposed;
- FSDP over experts: every device holds every expert for its own tokens (perfect balance, no
  all-to-all) and moves ~3 (D-1)/D * S bytes per layer (all-gather in forward, again in backward,
  reduce-scatter), S = E * P, exposed beyond ``2 * overlap_s``.
The overlap degree of Algorithm 1 is t = overlap_s * bandwidth / P (rounded down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from heddle.moe.placement import dispatch_plan, materialize, reshard_owners, round_robin_owners


@dataclass
class Hardware:
    flops: float = 312e12 * 0.4        # A100 bf16 peak x 40 % achieved
    bandwidth: float = 50e9            # bytes/s per device (400 Gbps)
    name: str = "a100-400gbps"


def zipf_counts(num_devices: int, num_experts: int, tokens: int, top_k: int, skew: float,
                rng: np.random.Generator) -> np.ndarray:
    """[D, E] token-expert assignments under Zipf(skew) popularity, k distinct picks per token."""
    p = 1.0 / np.arange(1, num_experts + 1) ** skew
    p /= p.sum()
    counts = np.zeros((num_devices, num_experts), dtype=np.int64)
    for d in range(num_devices):
        # Gumbel top-k = sampling k distinct experts with probability proportional to p.
        keys = np.log(p)[None, :] + rng.gumbel(size=(tokens, num_experts))
        picks = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
        counts[d] = np.bincount(picks.reshape(-1), minlength=num_experts)
    return counts


def _a2a_time(plan: np.ndarray, row_bytes: float, bandwidth: float) -> float:
    moved = plan.sum(axis=1)                       # [src, dst]
    np.fill_diagonal(moved, 0)
    busiest = max(moved.sum(axis=1).max(), moved.sum(axis=0).max())
    return busiest * row_bytes / bandwidth


def _sparse_time(owners, target, expert_bytes: float, num_devices: int, bandwidth: float) -> float:
    sent = np.zeros(num_devices)
    recv = np.zeros(num_devices)
    for e, ranks in enumerate(target):
        for d in ranks:
            if d != owners[e]:
                sent[owners[e]] += 1
                recv[d] += 1
    return max(sent.max(), recv.max()) * expert_bytes / bandwidth


def simulate(*, num_devices: int = 32, num_experts: int = 64, d_model: int = 1024, d_ffn: int | None = None,
             top_k: int = 2, tokens: int = 4096, skew: float = 1.0, bytes_per_elem: int = 2,
             n_mat: int = 2, overlap_s: float | None = None, memory_slots: int | None = None,
             hardware: Hardware | None = None, seed: int = 0) -> list[dict]:
    """One row per strategy (ep, fssdp, fsdp) with the predicted layer time and its parts."""
    hw = hardware or Hardware()
    d_ffn = d_ffn or 2 * d_model
    rng = np.random.default_rng(seed)
    expert_bytes = n_mat * d_model * d_ffn * bytes_per_elem
    flop_per_token = 3 * 2 * n_mat * d_model * d_ffn
    if overlap_s is None:   # the attention block of the same layer: 4 projections, fwd + bwd
        overlap_s = tokens * 3 * 2 * 4 * d_model * d_model / hw.flops
    history = zipf_counts(num_devices, num_experts, tokens, top_k, skew, rng)   # the predictor's window
    counts = zipf_counts(num_devices, num_experts, tokens, top_k, skew, rng)    # this iteration
    row_bytes = d_model * bytes_per_elem
    rows = []
    # EP: round-robin pinning, all tokens to the owner.
    owners = round_robin_owners(num_experts, num_devices)
    plan = dispatch_plan(counts, [[o] for o in owners])
    load = plan.sum(axis=(0, 1))
    compute = load.max() * flop_per_token / hw.flops
    a2a = _a2a_time(plan, row_bytes, hw.bandwidth)
    rows.append(dict(strategy="ep", max_over_mean=load.max() / load.mean(), compute_s=compute,
                     a2a_s=4 * a2a, sparse_s=0.0, layer_s=compute + 4 * a2a, comm_bytes=0.0))
    # FSSDP: Algorithm 2 owners from the history, Algorithm 1 placement, local-first dispatch.
    slots = memory_slots if memory_slots is not None else math.ceil(num_experts / num_devices)
    t = int(overlap_s * hw.bandwidth // expert_bytes)
    f_owners = reshard_owners([history.sum(axis=0)], num_devices)[0]
    target = materialize(history.astype(np.float64), f_owners, overlap_degree=t, memory_slots=slots)
    plan = dispatch_plan(counts, target)
    load = plan.sum(axis=(0, 1))
    compute = load.max() * flop_per_token / hw.flops
    a2a = _a2a_time(plan, row_bytes, hw.bandwidth)
    sparse = _sparse_time(f_owners, target, expert_bytes, num_devices, hw.bandwidth)
    exposed = 2 * max(0.0, sparse - overlap_s)
    extra = sum(len(x) - 1 for x in target)
    rows.append(dict(strategy="fssdp", max_over_mean=load.max() / load.mean(), compute_s=compute,
                     a2a_s=4 * a2a, sparse_s=exposed, layer_s=compute + 4 * a2a + exposed,
                     comm_bytes=2.0 * extra * expert_bytes, overlap_degree=t,
                     lam=extra / (num_experts * (num_devices - 1))))
    # FSDP over experts: every device runs every expert on its own tokens.
    load = counts.sum(axis=1)
    compute = load.max() * flop_per_token / hw.flops
    layer_bytes = num_experts * expert_bytes
    fsdp = 3 * (num_devices - 1) / num_devices * layer_bytes / hw.bandwidth
    exposed = max(0.0, fsdp - 2 * overlap_s)
    rows.append(dict(strategy="fsdp", max_over_mean=load.max() / load.mean(), compute_s=compute, a2a_s=0.0,
                     sparse_s=exposed, layer_s=compute + exposed,
                     comm_bytes=3 * (num_devices - 1) / num_devices * layer_bytes * num_devices))
    for r in rows:
        r.update(devices=num_devices, experts=num_experts, d_model=d_model, skew=skew, hardware=hw.name,
                 overlap_s=overlap_s)
    return rows
