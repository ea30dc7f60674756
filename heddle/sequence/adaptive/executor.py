"""Run one step of a :class:`Plan`: every rank trains its group's sequences with Ulysses on that
group's cached subgroup, micro-batch after micro-batch, then gradients are summed over all ranks.

Per micro-batch, the ranks ``start .. start+d-1`` of a group pack their sequences into one
varlen sequence (``cu_seqlens`` = document boundaries, position ids restarting per document),
pad it to a multiple of d, and each takes its contiguous shard ``[1, s_pad/d]``
(:func:`heddle.sequence.shard_sequence`); the model's Ulysses modules are pointed at the group
(``UlyssesHandle.set_group``: nothing created on the hot path, the groups come from the
:class:`heddle.dist.SubgroupCache` built once). A rank outside every group of a micro-batch
idles through it. ``pack="auto"`` packs only where attention has a varlen kernel (flash-attn on
CUDA); elsewhere the masked dense attention of a packed sequence costs (sum s)^2, so each
sequence of the micro-batch runs on its own (same memory bound, same gradients).

Loss scaling (the Trainer contract): each rank backpropagates the *sum* of its tokens' losses;
:meth:`AdaptiveExecutor.reduce_gradients` sums the gradients over every rank of ``group``; the
caller divides by the global token count. Within a Ulysses group the backward all-to-alls route
every token's gradient to where its activations live, so the sum over all ranks is the gradient
of the whole batch's loss sum whatever the plan: one step equals single-process training.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

import heddle.dist as hd
from heddle.dist import SubgroupCache
from heddle.sequence import local_position_ids, parallelize, shard_sequence
from heddle.sequence.adaptive.plan import Plan


def pack_documents(documents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents (1-D token tensors of length s_k + 1) -> inputs [S], targets [S], cu_seqlens
    [K + 1] with S = sum s_k: document k contributes inputs doc[:-1] and targets doc[1:]."""
    inputs = torch.cat([d[:-1] for d in documents])
    targets = torch.cat([d[1:] for d in documents])
    lengths = torch.tensor([len(d) - 1 for d in documents], dtype=torch.int64)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return inputs, targets, cu


def default_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (half precision upcast to fp32); targets -100 (padding) skipped."""
    flat = logits.flatten(0, -2)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return F.cross_entropy(flat, targets.flatten(), ignore_index=-100, reduction="sum")


class AdaptiveExecutor:
    """Executes plans on ``model`` (which follows the ``core_attention`` contract of
    :func:`heddle.sequence.parallelize`) over the ranks of ``group``.

    Creating it is collective (it builds the subgroup cache unless ``pool`` is given).
    """

    def __init__(self, model: nn.Module, *, group=None, pool: SubgroupCache | None = None,
                 loss_fn=default_loss, check: str = "never", pack="auto"):
        if pack not in (True, False, "auto"):
            raise ValueError(f"pack={pack!r}: valid are True, False, 'auto'")
        if pack == "auto":
            # Packing pays off only with a varlen kernel (flash-attn on CUDA); torch SDPA with a
            # document mask costs (sum s)^2, which the cost model's sum of s^2 does not describe.
            on_cuda = any(p.is_cuda for p in model.parameters())
            pack = on_cuda and importlib.util.find_spec("flash_attn") is not None
        self.pack = pack
        self.model = model
        self.group = group
        self.rank, self.world_size = hd.group_rank_size(group)
        self.pool = pool if pool is not None else SubgroupCache(group)
        if self.pool.world_size != self.world_size:
            raise ValueError(f"pool covers {self.pool.world_size} ranks but group has {self.world_size}")
        self.handle = parallelize(model, self.pool.get(self.rank, 1), check=check)
        self.loss_fn = loss_fn

    def run(self, plan: Plan, documents: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Forward and backward of this rank's share of ``plan``. ``documents[k]``: 1-D tokens of
        length ``plan.lengths[k] + 1``. Returns (this rank's loss sum, detached; its token count)."""
        if plan.num_devices != self.world_size:
            raise ValueError(f"plan is for {plan.num_devices} devices but the group has {self.world_size} ranks")
        if len(documents) != len(plan.lengths):
            raise ValueError(f"{len(documents)} documents for a plan of {len(plan.lengths)} sequences")
        bad = [k for k, (d, s) in enumerate(zip(documents, plan.lengths)) if d.dim() != 1 or len(d) != s + 1]
        if bad:
            k = bad[0]
            raise ValueError(f"documents[{k}] has shape {tuple(documents[k].shape)}; the plan expects "
                             f"{plan.lengths[k] + 1} tokens (length + 1 for the shifted targets)")
        loss_total = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for x, y, pos, cu in self.local_shards(plan, documents):
            logits = self.model(x, position_ids=pos, cu_seqlens=cu)
            loss = self.loss_fn(logits, y)
            loss.backward()
            loss_total += loss.detach().double()
            tokens += int((y != -100).sum())
        return loss_total, tokens

    def local_shards(self, plan: Plan, documents: list[torch.Tensor]):
        """This rank's share of ``plan``, one forward unit at a time: switches the model's Ulysses
        group to the unit's lane and yields (tokens [1, s/P], targets [1, s/P] padded with -100,
        global position ids [1, s/P], cu_seqlens [docs + 1]). Ranks outside a micro-batch's
        lanes skip it."""
        for mb in plan.micro_batches:
            mine = mb.group_of(self.rank)
            if mine is None:
                continue
            ranks, idx = mine
            sub = self.pool.get(ranks[0], len(ranks))
            self.handle.set_group(sub)
            for unit in ([idx] if self.pack else [[k] for k in idx]):
                inputs, targets, cu = pack_documents([documents[k] for k in unit])
                x, shard = shard_sequence(inputs[None], sub, dim=1)
                y, _ = shard_sequence(targets[None], sub, dim=1, pad_value=-100)
                pos = local_position_ids(cu, shard.length, sub)[None]
                yield x, y, pos, cu

    def reduce_gradients(self) -> None:
        """SUM every parameter's gradient over all ranks of ``group`` (one flat all-reduce; ranks
        that trained nothing contribute zeros)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        hd.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
