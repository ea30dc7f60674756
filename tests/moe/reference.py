"""A single-process dense MoE in fp64, written independently of heddle.moe's dispatch: every
token loops over its top-k experts. Used as the ground truth for FSSDP and EP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from heddle.moe import expert_forward


def reference_layer(shards, router_w, experts, *, top_k, activation, d_model, d_ffn,
                    normalize_gates=True, capacity_factor=None):
    """shards: list of x [n_r, d] (one per rank); returns ([y_r], [aux_r]). Differentiable."""
    num_experts = router_w.shape[0]
    ys, auxes = [], []
    for x in shards:
        probs = F.softmax(x @ router_w.t(), dim=-1)
        gates, picks = probs.topk(top_k, dim=-1)
        if normalize_gates and top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        n = x.shape[0]
        freq = torch.zeros(num_experts, dtype=torch.float64)
        for e in picks.flatten().tolist():
            freq[e] += 1
        auxes.append(num_experts * (freq / (n * top_k) * probs.mean(0)).sum())
        keep = torch.ones(n, top_k, dtype=torch.bool)
        if capacity_factor is not None:
            cap = math.ceil(capacity_factor * n * top_k / num_experts)
            used = [0] * num_experts
            for k in range(top_k):          # first choices first, then by token
                for t in range(n):
                    e = int(picks[t, k])
                    keep[t, k] = used[e] < cap
                    used[e] += 1
        rows = []
        for t in range(n):
            acc = torch.zeros(d_model, dtype=torch.float64)
            for k in range(top_k):
                if keep[t, k]:
                    e = int(picks[t, k])
                    acc = acc + gates[t, k] * expert_forward(x[t:t + 1], experts[e], d_model=d_model,
                                                             d_ffn=d_ffn, activation=activation)[0]
            rows.append(acc)
        ys.append(torch.stack(rows))
    return ys, auxes
