"""Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to a model in place, torchtitan style:
each transformer block first, then the root, so a block's parameters are all-gathered just before
it runs and freed after.

Parameters marked with :func:`heddle.dist.mark_sharded` (MoE experts, which heddle's FSSDP / EP
already place on their owners) are passed as ``ignored_params``: FSDP2 neither shards nor
reduces them.

Gradient scale: FSDP2 divides the reduce-scatter by the number of data-parallel ranks (a mean).
heddle's Trainer contract is a *sum* over ranks of d(loss_sum), divided afterwards by the global
token count (so uneven token counts per rank give the gradient of the global token mean), so the
divide factor is set to 1 on every FSDP module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from heddle.dist.sharding import is_sharded


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 wraps one by one: every element of every ``nn.ModuleList``
    (heddle's GPT ``model.blocks``, HF ``model.model.layers``) that holds parameters, outermost
    lists first (a block's inner lists are not wrapped separately)."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or id(module) in seen:
            continue
        for child in module:
            for inner in child.modules():
                seen.add(id(inner))
            if any(True for _ in child.parameters()):
                blocks.append(child)
    return blocks


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
               blocks: list[nn.Module] | None = None) -> list[FSDPModule]:
    """Shard ``model``'s dense parameters over ``mesh`` (1-D: FSDP; 2-D (replicate, shard): HSDP).

    param_dtype / reduce_dtype: FSDP2's MixedPrecisionPolicy (bf16 compute with fp32 gradient
    reduction keeps the sharded fp32 master weights and optimizer state). Returns the FSDP
    modules, blocks first and the root last."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    ignored = {p for p in model.parameters() if is_sharded(p)}
    wrapped = []
    for block in (transformer_blocks(model) if blocks is None else blocks):
        mine = {p for p in block.parameters() if p in ignored}
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=mine or None)
        wrapped.append(block)
    # the root's parameters (embeddings, final norm, head) are used last in backward: keep them
    # gathered after forward (torchtitan does the same)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False, ignored_params=ignored or None)
    wrapped.append(model)
    for module in wrapped:
        module.set_gradient_divide_factor(1.0)  # sum over ranks: the Trainer divides by the token count
        # a divide factor in fp32/bf16 makes FSDP2 use ReduceOp.PREMUL_SUM, which gloo rejects
        # ("Cannot use ReduceOp.PREMUL_SUM with Gloo"); a plain SUM (factor 1: no division) works
        module.set_force_sum_reduction_for_comms(True)
    return wrapped
