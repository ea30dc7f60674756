"""Restore: the newest checkpoint every rank can verify, memory first, then peers/parity, then disk,
resharded to this run's world size and mesh.

Candidates are the committed disk steps and every rank's memory snapshots, ordered by run (the
run saved most recently first, by the save time recorded in the index) and then by step, newest
first. For each candidate:

1. *holdings* (collective): every old rank's part must be verified by some new rank. At the same
   world size rank r holds old rank r: its own memory snapshot (checksums verified), else a peer
   copy or XOR parity rebuild, else its disk files. At another world size (disk only) new rank r
   holds every old rank j with ``j % W_new == r``. Each file is checked against the manifest and
   its path (size, CRC-32, step, rank, world size, run). A candidate missing any part is skipped
   with a :class:`CheckpointFallbackWarning` naming the problem.
2. *plan*: the old ranks' indexes (small JSON) are all-gathered. Rank r needs
   - its base rank's plain tensors and non-tensor state: old rank r (same world size), else
     ``r % W_old``;
   - keys saved ``replicated`` (rank 0 only): old rank 0's;
   - for every DTensor: the saved chunks that overlap the region this rank owns under the live
     placement (``compute_local_shape_and_global_offset``), from whichever old ranks saved them.
3. *exchange*: one ``all_to_all_single`` moves each requested tensor from its holder; then the
   DTensors are reassembled and rebuilt on the live mesh (``DTensor.from_local``).
4. *world-size change*: per-rank state (declared, or different between the old ranks) is
   re-initialised from the live objects, and one warning names every path
   (:func:`per_rank_paths`).
"""

from __future__ import annotations

import json
import logging
import warnings

import torch

import heddle.dist as hd
from heddle.checkpoint import codec
from heddle.checkpoint.state import _state_of, is_dtensor, load_into, reinitialise_per_rank
from heddle.checkpoint.storage import (CorruptCheckpoint, NoValidCheckpoint, check_identity, decode_index,
                                       encode_index, list_steps, read_manifest, read_rank, tensors_from_buffer)

log = logging.getLogger("heddle.checkpoint")
MAX_MEMORY_STEPS = 16


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint candidate was skipped (corrupt, incomplete or missing on some rank), or
    per-rank state was re-initialised at a world-size change."""


# -- small collectives ------------------------------------------------------------------------
def _global(ckpt, group_rank: int) -> int:
    return group_rank if ckpt.group is None else torch.distributed.get_global_rank(ckpt.group, group_rank)


hd_global_rank = _global


def _all_ok(ckpt, ok: bool) -> list[bool]:
    flags = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if ckpt.world_size == 1:
        return [ok]
    gathered = [torch.empty_like(flags) for _ in range(ckpt.world_size)]
    hd.all_gather(gathered, flags, group=ckpt.group)
    return [bool(int(g)) for g in gathered]


def _all_gather_bytes(ckpt, data: bytes) -> list[bytes]:
    if ckpt.world_size == 1:
        return [data]
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(ckpt.world_size)]
    hd.all_gather(sizes, size, group=ckpt.group)
    sizes = [int(s) for s in sizes]
    t = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
    if data:
        t[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.empty_like(t) for _ in range(ckpt.world_size)]
    hd.all_gather(out, t, group=ckpt.group)
    return [bytes(o[:n].numpy()) for o, n in zip(out, sizes)]


def _broadcast_ints(ckpt, values: list[int] | None, n: int) -> list[int]:
    t = torch.tensor(values if ckpt.rank == 0 else [0] * n, dtype=torch.int64)
    if ckpt.world_size > 1 and n:
        hd.broadcast(t, src=_global(ckpt, 0), group=ckpt.group)
    return [int(v) for v in t]


# -- candidates ---------------------------------------------------------------------------------
def _keeper_entries(ckpt) -> tuple[dict, list]:
    if ckpt.keeper is None:
        return {}, []
    entries = ckpt._keeper_request("list") or []    # a dead keeper: no memory level on this rank
    own = {step: (path, ib) for rank, kind, step, path, ib in entries if kind == "own" and rank == ckpt.rank}
    return own, entries


def map_buffer(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8)


def _save_info(ckpt, step: int, own_memory: dict) -> tuple[str, float]:
    """(run id, save time) of a candidate as this rank sees it; ("", 0) when unknown."""
    try:
        m = read_manifest(ckpt.directory, step)
        return m["run_id"], float(m.get("saved_at", 0.0))
    except (CorruptCheckpoint, TypeError, ValueError):
        pass
    if step in own_memory:
        try:
            index = decode_index(own_memory[step][1], "memory")
            return index.run_id, index.time
        except CorruptCheckpoint:
            pass
    return "", 0.0


def _candidates(ckpt, own_memory: dict, step: int | None) -> list[int]:
    """Every candidate step in the order to try, identical on every rank (rank 0 decides)."""
    committed, _ = list_steps(ckpt.directory) if "disk" in ckpt.levels else ([], [])
    mem = sorted(own_memory, reverse=True)[:MAX_MEMORY_STEPS]
    local = torch.full((MAX_MEMORY_STEPS,), -1, dtype=torch.int64)
    local[:len(mem)] = torch.tensor(mem, dtype=torch.int64)
    if ckpt.world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(ckpt.world_size)]
        hd.all_gather(gathered, local, group=ckpt.group)
        n = _broadcast_ints(ckpt, [len(committed)], 1)[0]
        committed = _broadcast_ints(ckpt, committed, n)          # rank 0's listing decides
    else:
        gathered = [local]
    steps = set(committed) | {int(s) for g in gathered for s in g if s >= 0}
    if step is not None:
        steps &= {step}
    steps = sorted(steps, reverse=True)
    order = None
    if ckpt.rank == 0:
        info = {s: _save_info(ckpt, s, own_memory) for s in steps}
        recency: dict[str, float] = {"": float("inf")}    # unreadable: tried (and reported) first
        for run, t in info.values():
            if run:
                recency[run] = max(recency.get(run, 0.0), t)
        order = sorted(steps, key=lambda s: (recency[info[s][0]], s), reverse=True)
    return _broadcast_ints(ckpt, order, len(steps))


# -- holdings ------------------------------------------------------------------------------------
def _holdings(ckpt, cand: int, own_memory: dict, entries: list, redundancy) -> tuple[dict, str, str]:
    """Collective: verified (index, private buffer) of the old ranks this rank holds for ``cand``.
    Returns (held, source, reason); an empty ``held`` with a reason means this rank failed."""
    me, W = ckpt.rank, ckpt.world_size
    held, source, reason = {}, None, ""
    if cand in own_memory:
        path, ib = own_memory[cand]
        what = f"memory step {cand} rank {me}"
        try:
            index = decode_index(ib, what)
            check_identity(index, what, step=cand, rank=me)
            if index.world_size != W:
                raise CorruptCheckpoint(f"{what}: made at world size {index.world_size}, this run has {W}")
            buf = map_buffer(path, index.nbytes).clone()   # private: the slot may be reused later
            tensors_from_buffer(index, buf, clone=False, what=what)
            held[me], source = (index, buf), "memory"
        except (CorruptCheckpoint, RuntimeError, OSError) as e:
            reason = str(e)
    have = _all_ok(ckpt, bool(held))
    missing = [r for r, ok in enumerate(have) if not ok]
    if redundancy is not None and missing and len(missing) < W:
        own_buf = held[me][1] if me in held else None
        got = redundancy.recover(ckpt, cand, missing, entries, own_buf)
        if got is not None:
            index, buf, src = got
            what = f"{src} step {cand} rank {me}"
            try:
                check_identity(index, what, step=cand, rank=me, world_size=W)
                tensors_from_buffer(index, buf, clone=False, what=what)
                held[me], source = (index, buf), src
            except CorruptCheckpoint as e:
                reason = f"{reason}; {e}" if reason else str(e)
    if "disk" in ckpt.levels and (me not in held):
        try:
            manifest = read_manifest(ckpt.directory, cand)
            old = manifest["world_size"]
            mine = [me] if old == W else [j for j in range(old) if j % W == me]
            if held and old != W:
                raise CorruptCheckpoint(f"step {cand}: memory snapshots of world {W}, disk of world {old}")
            for j in mine:
                index, buf = read_rank(ckpt.directory, cand, j, manifest)
                tensors_from_buffer(index, buf, clone=False, what=f"step {cand} rank {j}")
                held[j] = (index, buf)
            source = "disk"
            if not mine:
                held[None] = None        # nothing to hold at this world size: still a success
        except CorruptCheckpoint as e:
            reason = f"{reason}; {e}" if reason else str(e)
            held = {}
    return held, source, reason


# -- plan, exchange, assembly --------------------------------------------------------------------
class _Plan:
    def __init__(self, ckpt, state, indexes: dict[int, object]):
        self.ckpt, self.state, self.indexes = ckpt, state, indexes
        self.requests: list[tuple[int, int]] = []       # (old rank, entry index)
        self._seen: set = set()
        self.live: dict = {}
        self.chunks: dict[str, list] = {}               # dtensor path -> [(old rank, entry index, entry)]
        for r in sorted(indexes):
            for i, e in enumerate(indexes[r].entries):
                if e.global_shape is not None:
                    chunks = self.chunks.setdefault(e.path, [])
                    if all((c[2].global_offset, c[2].shape) != (e.global_offset, e.shape) for c in chunks):
                        chunks.append((r, i, e))

    def need(self, r: int, i: int) -> None:
        if (r, i) not in self._seen:
            self._seen.add((r, i))
            self.requests.append((r, i))

    def _live_tree(self, key):
        if key not in self.live:
            obj = self.state.get(key)
            self.live[key] = None if obj is None else _state_of(key, obj)[0]
        return self.live[key]

    def target(self, path: tuple, ref: dict):
        """(mesh, placements, stride) of the live DTensor at ``path``, or None (a full tensor)."""
        node = self._live_tree(path[0])
        try:
            for p in path[1:]:
                node = node[p]
        except (KeyError, IndexError, TypeError):
            node = None
        obj = self.state.get(path[0])
        if not is_dtensor(node) and isinstance(obj, torch.optim.Optimizer) and len(path) == 4 and path[1] == "state":
            params = [p for g in obj.param_groups for p in g["params"]]
            if isinstance(path[2], int) and path[2] < len(params):
                node = params[path[2]]      # optimizer state not created yet: it follows its parameter
        if not is_dtensor(node):
            return None
        if list(node.shape) != ref["shape"]:
            raise CorruptCheckpoint(f"DTensor {ref['path']}: saved with global shape {ref['shape']}, the live "
                                    f"one has {list(node.shape)}")
        return node.device_mesh, tuple(node.placements), node.stride()

    def region(self, path: tuple, ref: dict):
        shape = tuple(ref["shape"])
        target = self.target(path, ref)
        if target is None:
            return target, shape, (0,) * len(shape)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local, offset = compute_local_shape_and_global_offset(shape, target[0], target[1])
        return target, tuple(local), tuple(offset)

    def overlaps(self, ref: dict, shape: tuple, offset: tuple) -> list:
        out = []
        for r, i, e in self.chunks.get(ref["path"], []):
            lo = [max(a, b) for a, b in zip(offset, e.global_offset)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offset, shape, e.global_offset, e.shape)]
            if all(h > l for l, h in zip(lo, hi)) or not shape:
                out.append((r, i, e, lo, hi))
        return out


def _decode_parts(plan: _Plan, base: int, replicated: list, on_ref) -> dict:
    tree = {}
    base_skel, rep_skel = plan.indexes[base].skeleton, plan.indexes[0].skeleton
    for key, sub in base_skel.items():
        if key not in replicated:
            tree[key] = codec.decode(sub, lambda n, p, r=base: on_ref(n, p, r), (key,))
    for key in replicated:
        if key not in rep_skel:
            raise CorruptCheckpoint(f"replicated key {key!r} missing from rank 0's part")
        tree[key] = codec.decode(rep_skel[key], lambda n, p: on_ref(n, p, 0), (key,))
    return tree


def _ref_index(node: dict, r: int, plan: _Plan) -> int:
    i = node.get("i")
    if type(i) is not int or not 0 <= i < len(plan.indexes[r].entries):
        raise CorruptCheckpoint(f"rank {r}: bad tensor reference {node!r:.80}")
    return i


def _plan_requests(plan: _Plan, base: int, replicated: list) -> None:
    def on_ref(node, path, r):
        if node.get(codec.TAG) == "tensor":
            plan.need(r, _ref_index(node, r, plan))
        else:
            _, shape, offset = plan.region(path, node)
            for o, i, *_ in plan.overlaps(node, shape, offset):
                plan.need(o, i)
        return None
    _decode_parts(plan, base, replicated, on_ref)


def _exchange(ckpt, plan: _Plan, held: dict, holder_of: dict, failed: bool) -> dict:
    """Collective: every rank's requested tensors, moved from their holders with one all_to_all."""
    me, W = ckpt.rank, ckpt.world_size
    mine = [] if failed else plan.requests
    everyone = [json.loads(b) for b in _all_gather_bytes(ckpt, json.dumps([failed, mine]).encode())]
    if any(f for f, _ in everyone):
        raise CorruptCheckpoint("the restore plan failed on another rank")
    def raw(r, i):
        e = plan.indexes[r].entries[i]
        return held[r][1][e.offset:e.offset + e.nbytes]
    got = {(r, i): raw(r, i) for r, i in mine if holder_of[r] == me}
    send_split = [sum(plan.indexes[r].entries[i].nbytes for r, i in everyone[d][1] if holder_of[r] == me)
                  if d != me else 0 for d in range(W)]
    recv_split = [sum(plan.indexes[r].entries[i].nbytes for r, i in mine if holder_of[r] == h)
                  if h != me else 0 for h in range(W)]
    traffic = any(holder_of[r] != d for d in range(W) for r, _ in everyone[d][1])
    if not traffic:
        return got
    parts = [raw(r, i) for d in range(W) if d != me for r, i in everyone[d][1] if holder_of[r] == me]
    send = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    recv = torch.empty(sum(recv_split), dtype=torch.uint8)
    hd.all_to_all_single(recv, send, output_split_sizes=recv_split, input_split_sizes=send_split, group=ckpt.group)
    offsets, start = {}, 0
    for h in range(W):
        offsets[h] = start
        start += recv_split[h]
    for r, i in mine:
        h = holder_of[r]
        if h != me:
            n = plan.indexes[r].entries[i].nbytes
            got[(r, i)] = recv[offsets[h]:offsets[h] + n].clone()    # aligned for any dtype view
            offsets[h] += n
    return got


def _assemble(plan: _Plan, base: int, replicated: list, got: dict) -> dict:
    def tensor(r, i):
        e = plan.indexes[r].entries[i]
        return got[(r, i)].view(codec.torch_dtype(e.dtype)).view(e.shape)

    def on_ref(node, path, r):
        if node.get(codec.TAG) == "tensor":   # a private copy: no view into a shared buffer survives
            return tensor(r, _ref_index(node, r, plan)).clone()
        target, shape, offset = plan.region(path, node)
        out = torch.empty(shape, dtype=codec.torch_dtype(node.get("dtype")))
        covered = 0
        for o, i, e, lo, hi in plan.overlaps(node, shape, offset):
            src = tensor(o, i)[tuple(slice(a - b, c - b) for a, c, b in zip(lo, hi, e.global_offset))]
            out[tuple(slice(a - b, c - b) for a, c, b in zip(lo, hi, offset))] = src
            covered += src.numel()
        if covered != out.numel():
            raise CorruptCheckpoint(f"DTensor {node['path']}: the saved chunks cover {covered} of the "
                                    f"{out.numel()} elements this rank needs")
        if target is None:
            return out
        from torch.distributed.tensor import DTensor
        mesh, placements, stride = target
        return DTensor.from_local(out, mesh, placements, run_check=False, shape=torch.Size(node["shape"]),
                                  stride=stride)
    return _decode_parts(plan, base, replicated, on_ref)


# -- world-size change: what is per rank -------------------------------------------------------
def _signature(node, index) -> str:
    def sub(n):
        if isinstance(n, list):
            return [sub(v) for v in n]
        if isinstance(n, dict):
            tag = n.get(codec.TAG)
            if tag == "tensor":
                i = n.get("i")
                e = index.entries[i] if type(i) is int and 0 <= i < len(index.entries) else None
                return ["T", e.dtype, list(e.shape), e.crc] if e else ["T?"]
            if tag == "dtensor":
                return ["D", n.get("path")]       # global state: resharded, never per rank
            return {k: sub(v) for k, v in n.items()}
        return n
    return json.dumps(sub(node), sort_keys=True)


def _children(node) -> dict | None:
    if isinstance(node, dict) and codec.TAG not in node:
        return dict(node)
    if isinstance(node, dict) and node.get(codec.TAG) in ("dict", "odict") and isinstance(node.get("items"), list):
        out = {}
        for pair in node["items"]:
            try:
                out[codec.decode(pair[0], lambda n, p: None)] = pair[1]
            except (codec.CodecError, TypeError, IndexError):
                return None
        return out
    return None


def _differing(nodes: list, indexes: list, path: tuple) -> list[tuple]:
    sigs = {_signature(n, ix) for n, ix in zip(nodes, indexes)}
    if len(sigs) == 1:
        return []
    kids = [_children(n) for n in nodes]
    if all(k is not None for k in kids) and all(set(k) == set(kids[0]) for k in kids):
        parts = [_differing([k[c] for k in kids], indexes, path + (c,)) for c in kids[0]]
        if any(not p for p in parts):      # some entries agree: only the differing ones are per rank
            return [x for p in parts for x in p]
    return [path]


def per_rank_paths(indexes: dict, base: int) -> list[tuple]:
    """Declared per-rank paths plus every subtree whose saved value differs between old ranks."""
    paths = {tuple(p) for p in indexes[base].per_rank_paths}
    replicated = set(indexes[0].replicated)
    old = [indexes[r] for r in sorted(indexes)]
    if len(old) > 1:
        for key in old[0].skeleton:
            if key in replicated or not all(key in ix.skeleton for ix in old):
                continue
            paths.update(_differing([ix.skeleton[key] for ix in old], old, (key,)))
    return sorted((p for p in paths if not any(p[:n] in paths for n in range(1, len(p)))), key=str)


# -- restore ---------------------------------------------------------------------------------------
def _skip(ckpt, cand: int, reason: str, reasons: list) -> None:
    reasons.append(f"step {cand}: {reason}")
    warnings.warn(f"checkpoint restore: skipping step {cand} on rank {ckpt.rank}: {reason}",
                  CheckpointFallbackWarning, stacklevel=4)


def restore(ckpt, state: dict, *, step: int | None = None, start_fresh_on_corrupt: bool = False) -> int | None:
    own_memory, entries = _keeper_entries(ckpt)
    redundancy = None
    if ckpt.redundancy is not None:
        from heddle.checkpoint import redundancy
    candidates = _candidates(ckpt, own_memory, step)
    reasons: list[str] = []
    for cand in candidates:
        held, source, reason = _holdings(ckpt, cand, own_memory, entries, redundancy)
        if not all(_all_ok(ckpt, bool(held))):
            _skip(ckpt, cand, reason if not held else "another rank could not verify its part", reasons)
            continue
        held.pop(None, None)
        contributed = [json.loads(b) for b in _all_gather_bytes(
            ckpt, json.dumps({str(r): encode_index(ix).decode() for r, (ix, _) in held.items()}).encode())]
        holder_of, indexes, failed, err = {}, {}, False, ""
        try:
            for h, part in enumerate(contributed):
                for r, text in part.items():
                    index = decode_index(text.encode(), f"step {cand} rank {r}")
                    if int(r) in indexes:
                        raise CorruptCheckpoint(f"old rank {r} held twice")
                    holder_of[int(r)], indexes[int(r)] = h, index
            old_world = indexes[0].world_size if 0 in indexes else -1
            if sorted(indexes) != list(range(old_world)) or \
                    len({(ix.step, ix.world_size, ix.run_id, tuple(ix.replicated)) for ix in indexes.values()}) != 1:
                raise CorruptCheckpoint(f"the parts do not form one checkpoint (old ranks {sorted(indexes)}, "
                                        f"runs {sorted({ix.run_id for ix in indexes.values()})})")
            base = ckpt.rank if old_world == ckpt.world_size else ckpt.rank % old_world
            replicated = indexes[0].replicated
            plan = _Plan(ckpt, state, indexes)
            _plan_requests(plan, base, replicated)
        except (CorruptCheckpoint, codec.CodecError, KeyError, TypeError, ValueError, RuntimeError) as e:
            failed, err = True, str(e)
        try:
            got = _exchange(ckpt, plan if not failed else None, held, holder_of, failed)
            tree = _assemble(plan, base, replicated, got)
        except (CorruptCheckpoint, codec.CodecError, KeyError, TypeError, ValueError, RuntimeError) as e:
            failed, err = True, err or str(e)
        if not all(_all_ok(ckpt, not failed)):
            _skip(ckpt, cand, err or "another rank could not assemble its part", reasons)
            continue
        changed = []
        if old_world != ckpt.world_size:
            changed = reinitialise_per_rank(tree, per_rank_paths(indexes, base), state)
            if changed:
                warnings.warn(f"checkpoint restore: step {cand} was saved at world size {old_world}, restoring at "
                              f"{ckpt.world_size}: per-rank state {changed}", CheckpointFallbackWarning, stacklevel=3)
        load_into(state, tree)
        run_id = indexes[0].run_id
        ckpt.last_restore = {"run_id": run_id, "step": cand, "source": source, "saved_world_size": old_world,
                             "reinitialised": changed}
        log.info("checkpoint: restored run %s step %s from %s (rank %s)", run_id, cand, source, ckpt.rank)
        return cand
    ckpt.last_restore = {"run_id": None, "step": None, "source": None}
    if candidates:
        message = (f"checkpoint restore: {len(candidates)} checkpoint(s) in {ckpt.directory} but none verified on "
                   f"every rank: {'; '.join(reasons)}")
        if not start_fresh_on_corrupt:
            raise NoValidCheckpoint(message + " (pass start_fresh_on_corrupt=True to start from scratch)")
        warnings.warn(message + "; starting fresh (start_fresh_on_corrupt=True)", CheckpointFallbackWarning,
                      stacklevel=3)
    return None
