"""The MoE layer: router + experts under FSSDP (Hecate) or expert parallelism (EP).

One iteration of a layer on rank r of D (x [..., d_model] -> y [..., d_model], aux_loss):

1. Route locally (:func:`heddle.moe.router.route`); all-gather the per-expert counts C [D, E].
2. Placement P' for this iteration: FSSDP applies Algorithm 1 to the predicted loads (window mean
   of the past C, identical on every rank) and gathers the experts with spAG(P, P'); EP keeps
   P' = P (round-robin owners, nothing to gather).
3. Dispatch plan [D, E, D] (:func:`heddle.moe.placement.dispatch_plan`): tokens stay local when
   their expert is materialized here, otherwise go to a replica chosen to level the load.
   Uneven all-to-all of the tokens; every held expert runs on its slice; all-to-all back;
   y = sum_k gate_k * expert_k(x).
4. Backward: the mirror all-to-alls, and spRS(P', P) sums the experts' gradients onto owners.

Both strategies share this code path, so they agree to rounding; they differ only in P and P'.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from heddle.dist import all_gather, comm_tag, group_rank_size, mark_sharded
from heddle.moe.communication import MaterializedExperts, gather, uneven_all_to_all
from heddle.moe.experts import ExpertStore, expert_numel, init_expert
from heddle.moe.placement import LoadPredictor, dispatch_plan, materialize, round_robin_owners
from heddle.moe.router import Routing, route

STRATEGIES = ("fssdp", "ep")


class MoE(nn.Module):
    """``y, aux_loss = moe(x)``, x [..., d_model].

    Options (keyword-only): ``strategy`` "fssdp" | "ep"; ``capacity_factor`` None (dropless) or
    > 0; ``activation`` "swiglu" | "gelu"; ``normalize_gates``; ``seed`` (initialization depends on
    it alone); ``dtype``; ``init_std`` / ``out_std``; FSSDP: ``overlap_degree`` t and
    ``memory_slots`` m of Algorithm 1 (default ceil(E/D) each), ``window`` of the load predictor,
    ``rematerialize``.
    """

    def __init__(self, d_model: int, d_ffn: int, num_experts: int, top_k: int = 2, *, group=None,
                 strategy: str = "fssdp", capacity_factor: float | None = None,
                 activation: str = "swiglu", normalize_gates: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32, init_std: float = 0.02,
                 out_std: float | None = None, overlap_degree: int | None = None,
                 memory_slots: int | None = None, window: int = 5, rematerialize: bool = False):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ffn", d_ffn), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k!r} must be an int in [1, num_experts={num_experts}]")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0 or None (dropless)")
        for name, value in (("overlap_degree", overlap_degree), ("memory_slots", memory_slots)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be a non-negative int or None")
        self.d_model, self.d_ffn, self.num_experts, self.top_k = d_model, d_ffn, num_experts, top_k
        self.group, self.strategy, self.capacity_factor = group, strategy, capacity_factor
        self.activation, self.normalize_gates, self.seed = activation, normalize_gates, seed
        self.expert_numel = expert_numel(d_model, d_ffn, activation)
        self.rank, self.world_size = group_rank_size(group)
        default_slots = math.ceil(num_experts / self.world_size)
        self.memory_slots = default_slots if memory_slots is None else memory_slots
        self.overlap_degree = self.memory_slots if overlap_degree is None else overlap_degree
        self.rematerialize = rematerialize
        self.init_std, self.out_std = init_std, init_std if out_std is None else out_std
        g = torch.Generator().manual_seed(int(seed) * 1_000_003)
        self.router = nn.Linear(d_model, num_experts, bias=False, dtype=dtype)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(num_experts, d_model, generator=g, dtype=torch.float64) * init_std)
        self.experts = ExpertStore(num_experts, self.expert_numel)
        self.predictor = LoadPredictor(window)
        # [world_size, owner of expert 0, ...]: saved with the model so a resume at the same world
        # size adopts the owners before the experts load (each rank then finds its own experts).
        self.register_buffer("layout", torch.zeros(1 + num_experts, dtype=torch.int64))
        self.owners: list[int] = []
        self.set_owners(round_robin_owners(num_experts, self.world_size), init=True)
        self._prefetched = None
        self._group_checked = False
        self.last_stats: dict[str, float] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The layer's dtype, read from its router at run time (so ``MoE.to(dtype)`` moves the
        experts' collectives too)."""
        return self.router.weight.dtype

    def _check_group(self) -> None:
        """Once: every rank of the group must build the same layer, or the collectives below would
        disagree on sizes (gloo aborts instead of raising). ValueError on every rank."""
        if self._group_checked or self.world_size == 1:
            return
        mine = torch.tensor([self.num_experts, self.d_model, self.d_ffn, self.top_k,
                             STRATEGIES.index(self.strategy)], dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        with comm_tag("moe"):
            all_gather(parts, mine, group=self.group)
        if any(not torch.equal(p, mine) for p in parts):
            rows = "; ".join(f"rank {r}: num_experts={p[0]}, d_model={p[1]}, d_ffn={p[2]}, top_k={p[3]}, "
                             f"strategy={STRATEGIES[int(p[4])]!r}" for r, p in enumerate(parts))
            raise ValueError(f"MoE layers differ across the {self.world_size} ranks of the group (every rank "
                             f"must build the same layer): {rows}")
        self._group_checked = True

    # -- ownership -------------------------------------------------------------------------
    def _global_rank(self, r: int) -> int:
        if not dist.is_initialized() or self.group is None or self.group is dist.group.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    def set_owners(self, owners: list[int], *, init: bool = False) -> None:
        """Record ``owners`` (group ranks) and mark every expert parameter with its owner's global
        rank. ``init``: also create the owned experts from the seed (data moves are
        :func:`heddle.moe.reshard`'s job)."""
        if len(owners) != self.num_experts or any(not 0 <= o < self.world_size for o in owners):
            raise ValueError(f"owners={owners} must give one rank in [0, {self.world_size}) per expert")
        self.owners = [int(o) for o in owners]
        self.layout.copy_(torch.tensor([self.world_size, *self.owners], dtype=torch.int64))
        for e, o in enumerate(self.owners):
            p = self.experts.expert(e)
            if init:
                p.data = (init_expert(e, d_model=self.d_model, d_ffn=self.d_ffn, activation=self.activation,
                                      seed=self.seed, init_std=self.init_std, out_std=self.out_std,
                                      dtype=self.dtype) if o == self.rank else torch.empty(0, dtype=self.dtype))
            mark_sharded(p, self._global_rank(o))

    def adopt_owners(self, owners: list[int]) -> None:
        """Take ``owners`` without moving data (resume at the same world size, before loading the
        model's state dict): newly owned experts get zero storage for the load to fill."""
        for e, o in enumerate(owners):
            p = self.experts.expert(e)
            if o == self.rank and p.numel() == 0:
                p.data = torch.zeros(self.expert_numel, dtype=self.dtype)
            elif o != self.rank and p.numel():
                p.data, p.grad = torch.empty(0, dtype=self.dtype), None
        self.set_owners(list(owners))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "layout")
        current = self.layout.clone()
        if saved is not None and int(saved[0]) == self.world_size:
            owners = [int(o) for o in saved[1:]]
            if owners != self.owners:
                self.adopt_owners(owners)
            current = self.layout.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.layout.copy_(current)  # another world size: keep this run's owners

    def owned_experts(self) -> list[int]:
        return [e for e, o in enumerate(self.owners) if o == self.rank]

    # -- placement and materialization ----------------------------------------------------
    def plan_placement(self) -> list[list[int]]:
        """P' for the next iteration (Algorithm 1 for FSSDP, the owners for EP)."""
        if self.strategy == "ep" or self.world_size == 1:
            return [[o] for o in self.owners]
        predicted = self.predictor.predict(self.world_size, self.num_experts)
        return materialize(predicted, self.owners, overlap_degree=self.overlap_degree,
                           memory_slots=self.memory_slots)

    def gather_experts(self, owners, target, async_op: bool = False):
        owned = {e: self.experts.expert(e) for e, o in enumerate(owners) if o == self.rank}
        with comm_tag("moe"):
            return gather(owned, owners, target, numel=self.expert_numel, dtype=self.dtype,
                          group=self.group, async_op=async_op)

    def prefetch(self) -> None:
        """Issue this iteration's spAG now (asynchronously) so it overlaps what runs before the
        layer (the attention of the same block); :meth:`forward` waits on it."""
        self._check_group()
        target = self.plan_placement()
        self._prefetched = (target, self.gather_experts(self.owners, target, async_op=True))

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x has last dim {x.shape[-1]}, expected d_model={self.d_model}")
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        r = route(tokens, self.router.weight, top_k=self.top_k, normalize_gates=self.normalize_gates,
                  capacity_factor=self.capacity_factor)
        return self._dispatch(tokens, r).reshape(shape), r.aux_loss

    def forward_routed(self, x: torch.Tensor, expert_index: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The experts under an external router (e.g. a transformers model's own gate):
        x [T, d_model], expert_index / gates [T, top_k] -> y [T, d_model] = sum_k gates * expert(x).
        Dropless; the aux loss is the external router's business."""
        if x.dim() != 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, d_model={self.d_model}]")
        if expert_index.shape != gates.shape or expert_index.shape[0] != x.shape[0]:
            raise ValueError(f"expert_index {tuple(expert_index.shape)} and gates {tuple(gates.shape)} must both be "
                             f"[T={x.shape[0]}, top_k]")
        top_k = expert_index.shape[1]
        expert = expert_index.t().reshape(-1)  # slot-major, as route() orders assignments
        order = torch.argsort(expert, stable=True)
        token = torch.arange(x.shape[0], device=x.device).repeat(top_k)
        r = Routing(expert=expert[order], token=token[order], gate=gates.t().reshape(-1)[order],
                    counts=torch.bincount(expert, minlength=self.num_experts), aux_loss=x.new_zeros(()),
                    dropped=0)
        return self._dispatch(x, r)

    def _dispatch(self, tokens: torch.Tensor, r: Routing) -> torch.Tensor:
        """tokens [T, d_model] and their routing -> y [T, d_model] (steps 2-4 of the module doc)."""
        self._check_group()
        if self._prefetched is not None:
            target, handle = self._prefetched
            self._prefetched = None
        else:
            target, handle = self.plan_placement(), None
        counts = self._all_counts(r.counts)                           # [D, E]
        if self.training and torch.is_grad_enabled():
            self.predictor.update(counts)
        plan = dispatch_plan(counts, target)                          # [D, E, D]
        me, world = self.rank, self.world_size
        # Send order: by destination, then expert; a (rank, expert) group splits over replicas in
        # rank order. Receive order: by source, then expert.
        starts = np.concatenate([[0], np.cumsum(counts[me])])
        send_index = []
        for d in range(world):
            for e in range(self.num_experts):
                lo = starts[e] + plan[me, e, :d].sum()
                send_index.append(np.arange(lo, lo + plan[me, e, d]))
        send_index = torch.from_numpy(np.concatenate(send_index).astype(np.int64))
        send_splits = plan[me].sum(axis=0).tolist()                  # [D]
        recv_splits = plan[:, :, me].sum(axis=1).tolist()            # [D]
        held = [e for e in range(self.num_experts) if me in target[e]]
        recv = plan[:, :, me]                                        # [D(src), E]
        recv_offsets = np.concatenate([[0], np.cumsum(recv.reshape(-1))]).reshape(-1)
        group_index = np.concatenate([np.arange(recv_offsets[s * self.num_experts + e],
                                                recv_offsets[s * self.num_experts + e] + recv[s, e])
                                      for e in held for s in range(world)] or [np.zeros(0)]).astype(np.int64)
        group_index = torch.from_numpy(group_index)
        with comm_tag("moe"):
            x_send = tokens[r.token[send_index]]
            x_recv = uneven_all_to_all(x_send, send_splits, recv_splits, self.group)
            x_grouped = x_recv[group_index]
            owned = [self.experts.expert(e) for e in self.owned_experts()]
            out_grouped = MaterializedExperts.apply(
                x_grouped, [int(recv[:, e].sum()) for e in held], held, list(self.owners), target,
                self, handle, *owned)
            out_recv = torch.empty_like(out_grouped).index_copy(0, group_index, out_grouped) \
                if out_grouped.shape[0] else out_grouped
            out_send = uneven_all_to_all(out_recv, recv_splits, send_splits, self.group)
        contribution = out_send * r.gate[send_index].unsqueeze(-1)
        # The experts' dtype (bf16 under autocast), as a dense MLP under autocast would return.
        y = torch.zeros_like(tokens, dtype=contribution.dtype).index_add(0, r.token[send_index], contribution)
        processed = plan.sum(axis=(0, 1))                             # tokens per rank [D]
        self.last_stats = {"dropped": float(r.dropped),
                           "tokens_processed": float(processed[me]),
                           "max_over_mean": float(processed.max() / max(processed.mean(), 1e-12)),
                           "replicas": float(sum(len(t) - 1 for t in target))}
        self.last_load, self.last_target = processed, target
        return y

    def _all_counts(self, local: torch.Tensor) -> np.ndarray:
        if self.world_size == 1:
            return local.numpy()[None].astype(np.int64)
        parts = [torch.empty(self.num_experts, dtype=torch.int64) for _ in range(self.world_size)]
        with comm_tag("moe"):
            all_gather(parts, local.to(torch.int64).contiguous(), group=self.group)
        return torch.stack(parts).numpy()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ffn={self.d_ffn}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, strategy={self.strategy!r}, world_size={self.world_size}")
