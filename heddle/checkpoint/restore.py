"""Restore: the newest checkpoint every rank can verify, memory first, then peers/parity, then disk.

Candidates are the union of the committed disk steps and every rank's memory snapshots, newest
first. For each candidate a rank tries its own memory snapshot (checksums verified), the group
recovers ranks that miss theirs from a peer copy or XOR parity (collective), and a rank still
missing reads the disk files. The candidate is taken only when every rank verified its part
(``all_reduce(MIN)``); otherwise a :class:`CheckpointFallbackWarning` names what was wrong and the
next older candidate is tried.

World-size change: memory snapshots are used only at the world size that made them; from disk,
rank r reads rank ``r % old_world``'s files (replicated state is identical on every rank) and
per-rank state follows the rule in :func:`heddle.checkpoint.state.reinitialise_per_rank`.
"""

from __future__ import annotations

import pickle
import warnings

import torch

import heddle.dist as hd
from heddle.checkpoint.state import fill, load_into, reinitialise_per_rank
from heddle.checkpoint.storage import (CorruptCheckpoint, decode_index, list_steps, read_manifest, read_rank,
                                       tensors_from_buffer)

MAX_MEMORY_STEPS = 16


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint candidate was skipped (corrupt, incomplete or missing on some rank)."""


def _keeper_entries(ckpt) -> tuple[dict, list]:
    if ckpt.keeper is None:
        return {}, []
    entries = ckpt.keeper.request("list")
    own = {step: (path, ib) for rank, kind, step, path, ib in entries if kind == "own" and rank == ckpt.rank}
    return own, entries


def map_buffer(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8)


def _candidates(ckpt, own_memory: dict, step: int | None) -> list[int]:
    committed, _ = list_steps(ckpt.directory) if "disk" in ckpt.levels else ([], [])
    mem = sorted(own_memory, reverse=True)[:MAX_MEMORY_STEPS]
    local = torch.full((MAX_MEMORY_STEPS,), -1, dtype=torch.int64)
    local[:len(mem)] = torch.tensor(mem, dtype=torch.int64)
    if ckpt.world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(ckpt.world_size)]
        hd.all_gather(gathered, local, group=ckpt.group)
        disk = torch.tensor(committed[:64] + [-1] * (64 - len(committed[:64])), dtype=torch.int64)
        hd.broadcast(disk, src=hd_global_rank(ckpt, 0), group=ckpt.group)  # rank 0's listing decides
        committed = [int(s) for s in disk if s >= 0]
    else:
        gathered = [local]
    steps = set(committed) | {int(s) for g in gathered for s in g if s >= 0}
    if step is not None:
        steps &= {step}
    return sorted(steps, reverse=True)


def hd_global_rank(ckpt, group_rank: int) -> int:
    if ckpt.group is None:
        return group_rank
    return torch.distributed.get_global_rank(ckpt.group, group_rank)


def _all_ok(ckpt, ok: bool) -> list[bool]:
    flags = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if ckpt.world_size == 1:
        return [ok]
    gathered = [torch.empty_like(flags) for _ in range(ckpt.world_size)]
    hd.all_gather(gathered, flags, group=ckpt.group)
    return [bool(int(g)) for g in gathered]


def restore(ckpt, state: dict, *, step: int | None = None) -> int | None:
    own_memory, entries = _keeper_entries(ckpt)
    redundancy = None
    if ckpt.redundancy is not None:
        from heddle.checkpoint import redundancy
    for cand in _candidates(ckpt, own_memory, step):
        index = tensors = own_buf = None
        source, reason = None, ""
        if cand in own_memory:
            path, ib = own_memory[cand]
            try:
                index = decode_index(ib, f"memory step {cand} rank {ckpt.rank}")
                if index.world_size != ckpt.world_size:
                    raise CorruptCheckpoint(f"memory step {cand}: made at world size {index.world_size}")
                own_buf = map_buffer(path, index.nbytes)
                tensors = tensors_from_buffer(index, own_buf, what=f"memory step {cand} rank {ckpt.rank}")
                source = "memory"
            except (CorruptCheckpoint, RuntimeError, OSError) as e:
                reason, index, tensors, own_buf = str(e), None, None, None
        have = _all_ok(ckpt, tensors is not None)
        missing = [r for r, ok in enumerate(have) if not ok]
        if redundancy is not None and missing and len(missing) < ckpt.world_size:
            got = redundancy.recover(ckpt, cand, missing, entries, own_buf)
            if got is not None:
                index, buf, source = got
                try:
                    tensors = tensors_from_buffer(index, buf, what=f"{source} step {cand} rank {ckpt.rank}")
                except CorruptCheckpoint as e:
                    reason, index, tensors = str(e), None, None
        if tensors is None and "disk" in ckpt.levels:
            try:
                manifest = read_manifest(ckpt.directory, cand)
                src_rank = ckpt.rank % manifest["world_size"]
                index, buf = read_rank(ckpt.directory, cand, src_rank, manifest)
                tensors = tensors_from_buffer(index, buf, what=f"step {cand} rank {src_rank}")
                source = "disk"
            except CorruptCheckpoint as e:
                reason = f"{reason}; {e}" if reason else str(e)
                index, tensors = None, None
        if not all(_all_ok(ckpt, tensors is not None)):
            if tensors is None:
                message = f"checkpoint restore: skipping step {cand} on rank {ckpt.rank}: {reason or 'no copy'}"
            else:
                message = f"checkpoint restore: skipping step {cand}: another rank could not verify its part"
            warnings.warn(message, CheckpointFallbackWarning, stacklevel=3)
            continue
        tree = fill(pickle.loads(index.skeleton), tensors)
        changed = []
        if index.world_size != ckpt.world_size:
            changed = reinitialise_per_rank(tree, index.per_rank_paths, state)
            if changed:
                warnings.warn(f"checkpoint restore: step {cand} was saved at world size {index.world_size}, "
                              f"restoring at {ckpt.world_size}: per-rank state {changed}",
                              CheckpointFallbackWarning, stacklevel=3)
        load_into(state, tree)
        ckpt.last_restore = {"step": cand, "source": source, "saved_world_size": index.world_size,
                             "reinitialised": changed}
        return cand
    ckpt.last_restore = {"step": None, "source": None}
    return None
