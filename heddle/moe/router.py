"""Top-k softmax router with the load-balancing auxiliary loss and an optional capacity factor.

For tokens x [T, d] and router weight W_r [E, d]:

- p = softmax(x W_r^T) [T, E]; each token picks its top-k experts; gates are the picked
  probabilities, renormalized to sum to 1 over the k picks when ``normalize_gates`` (k > 1).
- Auxiliary loss (Switch Transformer eq. 4, GShard's l_aux): ``aux = E * sum_e f_e * P_e`` with
  f_e the fraction of the T*k assignments that pick e and P_e the mean of p[:, e]; 1.0 when
  balanced. It is computed over the tokens of this rank (as Switch / GShard do per group).
- ``capacity_factor`` c: each expert keeps at most ceil(c * T * k / E) assignments of this rank,
  first choices before second choices, earlier tokens first; the rest are dropped (their gate
  contributes nothing) and counted in ``dropped``. ``None``: dropless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    expert: torch.Tensor   # [A] expert of each kept assignment, sorted by expert (stable)
    token: torch.Tensor    # [A] token index of each assignment
    gate: torch.Tensor     # [A] gate weight (differentiable w.r.t. the router)
    counts: torch.Tensor   # [E] kept assignments per expert (int64)
    aux_loss: torch.Tensor  # scalar
    dropped: int


def route(tokens: torch.Tensor, weight: torch.Tensor, *, top_k: int, normalize_gates: bool = True,
          capacity_factor: float | None = None) -> Routing:
    """tokens [T, d], weight [E, d] -> :class:`Routing` of the T*k assignments (minus drops)."""
    num_tokens, num_experts = tokens.shape[0], weight.shape[0]
    probs = F.softmax(tokens @ weight.t(), dim=-1)                # [T, E]
    gate, expert = probs.topk(top_k, dim=-1)                      # [T, k]
    if normalize_gates and top_k > 1:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    # Slot-major order: all first choices, then all second choices (capacity priority).
    expert = expert.t().reshape(-1)
    gate = gate.t().reshape(-1)
    token = torch.arange(num_tokens, device=tokens.device).repeat(top_k)
    picked = torch.bincount(expert, minlength=num_experts)
    if num_tokens:
        fraction = picked.to(probs.dtype) / (num_tokens * top_k)
        aux = num_experts * (fraction * probs.mean(dim=0)).sum()
    else:
        aux = probs.sum() * 0.0
    dropped = 0
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
        order = torch.argsort(expert, stable=True)
        starts = torch.cumsum(picked, 0) - picked
        position = torch.empty_like(expert)
        position[order] = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
        keep = position < capacity
        dropped = int((~keep).sum())
        expert, gate, token = expert[keep], gate[keep], token[keep]
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    return Routing(expert=expert[order], token=token[order], gate=gate[order], counts=counts,
                   aux_loss=aux, dropped=dropped)
