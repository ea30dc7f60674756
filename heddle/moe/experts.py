"""Expert feed-forward networks stored one flat chunk per expert, and their sharded storage.

An expert's parameters are one flat vector ``[P]`` (the chunk the sparse collectives move):

- ``"gelu"``:   ``W_in [d_model, d_ffn] | W_out [d_ffn, d_model]``; ``y = gelu(x W_in) W_out``
- ``"swiglu"``: ``W_gate | W_up [d_model, d_ffn] | W_out [d_ffn, d_model]``;
  ``y = (silu(x W_gate) * (x W_up)) W_out``

Initialization depends only on ``(seed, expert index)`` (a generator per expert, drawn in fp64),
never on the strategy, the world size or which rank owns the expert: the same seed gives the
same experts everywhere, so strategies compare directly and checkpoints move between world sizes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "swiglu")


def expert_numel(d_model: int, d_ffn: int, activation: str) -> int:
    """Number of elements P of one expert's flat chunk."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
    return (3 if activation == "swiglu" else 2) * d_model * d_ffn


def init_expert(expert: int, *, d_model: int, d_ffn: int, activation: str, seed: int,
                init_std: float, out_std: float, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``expert``'s flat parameters ``[P]``, a function of ``(seed, expert)`` only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (int(expert) + 1))
    n_in = (2 if activation == "swiglu" else 1) * d_model * d_ffn
    w_in = torch.randn(n_in, generator=g, dtype=torch.float64) * init_std
    w_out = torch.randn(d_ffn * d_model, generator=g, dtype=torch.float64) * out_std
    return torch.cat([w_in, w_out]).to(dtype)


def expert_forward(x: torch.Tensor, flat: torch.Tensor, *, d_model: int, d_ffn: int,
                   activation: str) -> torch.Tensor:
    """x [n, d_model], flat [P] -> [n, d_model] (n may be 0)."""
    df = d_model * d_ffn
    if activation == "swiglu":
        w_gate = flat[:df].view(d_model, d_ffn)
        w_up = flat[df:2 * df].view(d_model, d_ffn)
        w_out = flat[2 * df:].view(d_ffn, d_model)
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_out
    w_in = flat[:df].view(d_model, d_ffn)
    w_out = flat[df:].view(d_ffn, d_model)
    return F.gelu(x @ w_in) @ w_out


class ExpertStore(nn.Module):
    """The experts of one MoE layer as parameters named ``"0" .. "E-1"``, one flat ``[P]`` each.

    Each rank holds the full chunk of the experts it owns and an empty ``[0]`` tensor for the
    others; the Parameter objects never change (their data moves when experts are re-sharded), so
    an optimizer built over them stays valid. ``state_dict`` saves owned experts only (each expert
    is saved exactly once, by its owner); ``load_state_dict`` takes the owned experts from a state
    dict holding any superset of the experts (see :func:`heddle.moe.merge_expert_shards`).
    """

    def __init__(self, num_experts: int, numel: int):
        super().__init__()
        self.num_experts, self.numel = num_experts, numel
        for e in range(num_experts):
            self.register_parameter(str(e), nn.Parameter(torch.empty(0)))

    def expert(self, e: int) -> nn.Parameter:
        return self._parameters[str(e)]

    def owned(self) -> list[int]:
        return [e for e in range(self.num_experts) if self.expert(e).numel() == self.numel]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for e in self.owned():
            p = self.expert(e)
            destination[prefix + str(e)] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for e in self.owned():
            key = prefix + str(e)
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != (self.numel,):
                error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected ({self.numel},)")
                continue
            with torch.no_grad():
                self.expert(e).copy_(value)
        # Experts owned by other ranks are theirs to load: not unexpected here.
