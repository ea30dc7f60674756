"""MoE from Hugging Face transformers models: sparse MoE blocks -> heddle :class:`MoE`, and back.

    from heddle.moe import from_hf, to_hf
    layers = from_hf(model, group, strategy="fssdp")   # Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE blocks
    ...train...
    to_hf(model); model.save_pretrained(path)           # experts gathered from their owners

transformers 5 stores a block's experts fused: ``experts.gate_up_proj [E, 2F, d]`` (gate rows
first) and ``experts.down_proj [E, d, F]``, with ``y_e = down_e (silu(gate_e x) * (up_e x))``.
heddle's flat swiglu chunk is ``W_gate [d, F] | W_up [d, F] | W_out [F, d]`` (``x @ W``), so
``W_gate = gate_up_proj[e, :F].T``, ``W_up = gate_up_proj[e, F:].T``, ``W_out = down_proj[e].T``.

The converted block (:class:`HFSparseMoeBlock`) keeps the model's own router module (its softmax
runs in fp32, its top-k normalisation follows the config) as ``experts.router``, so HF's
``output_router_logits`` still records the router logits and HF's load-balancing loss includes the
aux term unchanged; the experts run under heddle's FSSDP (or EP) through
:meth:`MoE.forward_routed`, dropless. A shared expert and its sigmoid gate (Qwen2-MoE) stay dense
modules. The block returns the tensor the decoder layer expects, ``[b, s, d]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from heddle.dist import comm_tag, group_rank_size, sparse_all_gather
from heddle.moe.layer import MoE

SUPPORTED = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock")


class HFSparseMoeBlock(nn.Module):
    """hidden [b, s, d] -> [b, s, d]: the model's router, heddle experts, optional shared expert."""

    def __init__(self, moe: MoE, *, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None, jitter_noise: float = 0.0, source=None):
        super().__init__()
        self.experts = moe
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate
        self.jitter_noise = jitter_noise
        self._source = [source]  # (parent, name, original block with empty experts): not a submodule

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:  # Mixtral's router jitter, as HF applies it
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = hidden_states.reshape(-1, shape[-1])
        _, gates, expert_index = self.experts.router(x)  # HF's router (recorded as router_logits)
        y = self.experts.forward_routed(x, expert_index, gates)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y.reshape(shape)


def _check_block(name: str, block: nn.Module) -> tuple[int, int, int, int]:
    """(num_experts, d_model, d_ffn, top_k) of a supported block, or ValueError naming what is wrong."""
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() != 3:
        raise ValueError(f"from_hf: {name} ({type(block).__name__}) has no fused experts "
                         f"(experts.gate_up_proj [E, 2F, d], experts.down_proj [E, d, F]); supported: {SUPPORTED}")
    if getattr(experts, "gate_up_proj_bias", None) is not None or getattr(experts, "has_bias", False):
        raise ValueError(f"from_hf: {name} has expert biases, which heddle experts do not support")
    act = getattr(experts, "act_fn", None)
    probe = torch.linspace(-3, 3, 7, dtype=torch.float64)
    if act is None or not torch.allclose(act(probe), F.silu(probe), atol=1e-12, rtol=0):
        raise ValueError(f"from_hf: {name} uses activation {type(act).__name__}; heddle experts are swiglu (SiLU)")
    num_experts, two_f, d_model = up.shape
    if tuple(down.shape) != (num_experts, d_model, two_f // 2):
        raise ValueError(f"from_hf: {name} has down_proj {tuple(down.shape)}, expected "
                         f"{(num_experts, d_model, two_f // 2)}")
    top_k = getattr(gate, "top_k", None)
    if not isinstance(top_k, int) or getattr(gate, "weight", None) is None:
        raise ValueError(f"from_hf: {name}.gate ({type(gate).__name__}) is not a top-k router with a weight")
    return num_experts, d_model, two_f // 2, top_k


def _moe_blocks(model: nn.Module):
    for parent in model.modules():
        for attr, child in list(parent.named_children()):
            if type(child).__name__ in SUPPORTED:
                yield parent, attr, child


def from_hf(model: nn.Module, group=None, strategy: str = "fssdp", **options) -> list[MoE]:
    """Replace every sparse MoE block of a transformers model in place by an
    :class:`HFSparseMoeBlock` whose experts are a heddle :class:`MoE` on ``group``, with the
    block's weights imported (each rank keeps the experts it owns). Returns the MoE layers in
    module order. ``options`` go to :class:`MoE` (e.g. ``overlap_degree``, ``memory_slots``)."""
    found = list(_moe_blocks(model))
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Moe" in type(m).__name__})
        raise ValueError(f"from_hf: {type(model).__name__} has no sparse MoE block; supported: {SUPPORTED}"
                         + (f" (found {kinds})" if kinds else ""))
    layers = []
    for index, (parent, attr, block) in enumerate(found):
        num_experts, d_model, d_ffn, top_k = _check_block(f"{attr}[{index}]", block)
        up, down = block.experts.gate_up_proj, block.experts.down_proj
        moe = MoE(d_model, d_ffn, num_experts, top_k, group=group, strategy=strategy, activation="swiglu",
                  dtype=up.dtype, seed=index, **options)
        moe.router = block.gate
        with torch.no_grad():
            for e in moe.owned_experts():
                flat = torch.cat([up[e, :d_ffn].t().reshape(-1), up[e, d_ffn:].t().reshape(-1),
                                  down[e].t().reshape(-1)])
                moe.experts.expert(e).copy_(flat.to(up.device))
        new = HFSparseMoeBlock(moe, shared_expert=getattr(block, "shared_expert", None),
                               shared_expert_gate=getattr(block, "shared_expert_gate", None),
                               jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0),
                               source=(parent, attr, block))
        # The original block is kept (for to_hf) without its dense experts' memory.
        block.experts.gate_up_proj = nn.Parameter(up.detach().new_empty(0))
        block.experts.down_proj = nn.Parameter(down.detach().new_empty(0))
        setattr(parent, attr, new)
        layers.append(moe)
    return layers


def _all_experts(moe: MoE) -> dict[int, torch.Tensor]:
    """Every expert's flat chunk on every rank, gathered from its owner (collective)."""
    _, world = group_rank_size(moe.group)
    owned = {e: moe.experts.expert(e).detach() for e in moe.owned_experts()}
    if world == 1:
        return owned
    with comm_tag("moe"):
        return sparse_all_gather(owned, moe.owners, [list(range(world))] * moe.num_experts,
                                 chunk_shape=(moe.expert_numel,), dtype=moe.dtype, group=moe.group)


def to_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`from_hf` in place: every :class:`HFSparseMoeBlock` becomes the original HF block
    again, its fused experts filled with the current weights gathered from their owners. Collective:
    every rank of each layer's group calls it. Returns ``model``."""
    blocks = [m for m in model.modules() if isinstance(m, HFSparseMoeBlock)]
    if not blocks:
        raise ValueError(f"to_hf: {type(model).__name__} has no block converted by heddle.moe.from_hf")
    for block in blocks:
        moe = block.experts
        parent, attr, source = block._source[0]
        chunks = _all_experts(moe)
        d, f = moe.d_model, moe.d_ffn
        df = d * f
        up = torch.stack([torch.cat([chunks[e][:df].view(d, f).t(), chunks[e][df:2 * df].view(d, f).t()])
                          for e in range(moe.num_experts)])                      # [E, 2F, d]
        down = torch.stack([chunks[e][2 * df:].view(f, d).t() for e in range(moe.num_experts)])  # [E, d, F]
        source.experts.gate_up_proj = nn.Parameter(up.contiguous())
        source.experts.down_proj = nn.Parameter(down.contiguous())
        source.gate = moe.router
        if block.shared_expert is not None:
            source.shared_expert = block.shared_expert
        if block.shared_expert_gate is not None:
            source.shared_expert_gate = block.shared_expert_gate
        setattr(parent, attr, source)
    return model
