"""Autograd functions around the MoE layer's collectives (picotron-style).

- :func:`uneven_all_to_all`: token dispatch / combine, an uneven ``all_to_all_single`` whose
  backward is the same exchange with the splits swapped (its exact adjoint).
- :class:`MaterializedExperts`: FSSDP's iteration for one layer. Forward: spAG(P, P') of the
  owned expert chunks (or wait on the one :meth:`heddle.moe.MoE.prefetch` issued), then every
  materialized expert on its token slice. Backward: expert gradients on every replica, then
  spRS(P', P) sums them onto the owners, which is what autograd hands to the owned parameters.
  With ``rematerialize`` the gathered chunks are freed after forward and gathered again in
  backward (less memory, twice the sparse-collective traffic).

Every materialized expert runs even on zero tokens so each rank reaches the collective in
backward: no hang when an expert (or a whole rank) receives no tokens.
"""

from __future__ import annotations

import torch

from heddle.dist import all_to_all_single, comm_tag, group_rank_size, sparse_all_gather, sparse_reduce_scatter
from heddle.moe.experts import expert_forward


class _UnevenAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.args = (send_splits, recv_splits, group)
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        with comm_tag("moe"):
            all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits, group = ctx.args
        back = grad.new_empty((sum(send_splits), *grad.shape[1:]))
        with comm_tag("moe"):
            all_to_all_single(back, grad.contiguous(), send_splits, recv_splits, group=group)
        return back, None, None, None


def uneven_all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None):
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]; rows send_splits[j] go to rank j."""
    _, world = group_rank_size(group)
    if world == 1:
        return x
    return _UnevenAllToAll.apply(x, list(send_splits), list(recv_splits), group)


class MaterializedExperts(torch.autograd.Function):
    """tokens [N, d] grouped by expert (``counts[i]`` rows for ``held[i]``) -> outputs [N, d].

    ``layer`` supplies the expert shapes, the group and (optionally) a prefetched spAG;
    ``owners`` / ``target``: P and P' for this iteration; ``owned``: this rank's expert
    parameters in ascending expert order (the autograd inputs that receive the spRS result).
    """

    @staticmethod
    def forward(ctx, tokens, counts, held, owners, target, layer, prefetched, *owned):
        ctx.meta = (counts, held, owners, target, layer)
        weights = prefetched.wait() if prefetched is not None else layer.gather_experts(owners, target)
        if layer.rematerialize:
            with torch.no_grad():
                out = _run_experts(tokens, counts, held, weights, layer)
            ctx.save_for_backward(tokens)
            ctx.graph = None
            return out
        with torch.enable_grad():
            x_leaf = tokens.detach().requires_grad_(True)
            leaves = {e: weights[e].detach().requires_grad_(True) for e in held}
            out = _run_experts(x_leaf, counts, held, leaves, layer)
        ctx.graph = (x_leaf, leaves, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        counts, held, owners, target, layer = ctx.meta
        if ctx.graph is None:  # re-materialize: gather again and recompute the experts
            (tokens,) = ctx.saved_tensors
            weights = layer.gather_experts(owners, target)
            with torch.enable_grad():
                x_leaf = tokens.detach().requires_grad_(True)
                leaves = {e: weights[e].detach().requires_grad_(True) for e in held}
                out = _run_experts(x_leaf, counts, held, leaves, layer)
        else:
            x_leaf, leaves, out = ctx.graph
            ctx.graph = None
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_x = x_leaf.grad if x_leaf.grad is not None else torch.zeros_like(x_leaf)
        replicas = {e: (w.grad if w.grad is not None else torch.zeros_like(w)) for e, w in leaves.items()}
        with comm_tag("moe"):
            reduced = sparse_reduce_scatter(replicas, owners, target, chunk_shape=(layer.expert_numel,),
                                            dtype=grad_out.dtype, group=layer.group)
        return (grad_x, None, None, None, None, None, None, *[reduced[e] for e in sorted(reduced)])


def _run_experts(tokens, counts, held, weights, layer) -> torch.Tensor:
    outs, offset = [], 0
    for e, n in zip(held, counts):
        outs.append(expert_forward(tokens[offset:offset + n], weights[e], d_model=layer.d_model,
                                   d_ffn=layer.d_ffn, activation=layer.activation))
        offset += n
    if not outs:
        return tokens[:0] * 0
    return torch.cat(outs)


def gather(owned: dict[int, torch.Tensor], owners, target, *, numel: int, dtype, group, async_op=False):
    """spAG of flat expert chunks ``[P]`` (detached: autograd goes through MaterializedExperts)."""
    return sparse_all_gather({e: p.detach() for e, p in owned.items()}, owners, target,
                             chunk_shape=(numel,), dtype=dtype, group=group, async_op=async_op)
