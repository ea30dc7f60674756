"""Cross-node redundancy of the memory level (REFT): a partner copy or XOR parity.

"peer": rank r's snapshot is also kept by ``partner(r) = (r + ranks_per_node) % W`` (on the next
node), registered with that node's keeper as kind "peer".

"parity" (RAID-5 layout over the W ranks of the group): every rank's snapshot, zero-padded to
``L = max nbytes``, is cut into W-1 chunks of C bytes. Stripe s holds one chunk of every rank
r != s, namely chunk ``c(r, s) = s if s < r else s - 1``, and rank s keeps its parity

    P_s = XOR_{r != s} chunk_{c(r,s)}(r)                                     (one all_to_all)

Losing rank j's memory loses its data chunks and P_j, and for every s != j

    chunk_{c(j,s)}(j) = P_s XOR  XOR_{r not in {s, j}} chunk_{c(r,s)}(r)

so every survivor r sends rank j one W-1 block tensor (P_r in block r's stripe, its own chunk
elsewhere) and rank j XORs them: memory cost C = L/(W-1) per rank instead of L for a full copy.
One lost rank per group is recoverable. With several ranks per node the RAID-5 group is a
*stripe* of one rank per node (the ranks with the same local index, :class:`_Stripe`), so losing a
whole node costs every stripe one member and stays recoverable; with one rank per node (or a
world that is not whole nodes) the stripe is the whole group.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

import heddle.dist as hd
from heddle.checkpoint.snapshot import create_private_file
from heddle.checkpoint.storage import CorruptCheckpoint, decode_index, encode_index, tensors_from_buffer


def partner(rank: int, world: int, ranks_per_node: int) -> int:
    step = ranks_per_node % world or 1
    return (rank + step) % world


def _global(ckpt, r: int) -> int:
    return r if ckpt.group is None else dist.get_global_rank(ckpt.group, r)


def _exchange(ckpt, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> None:
    ops = [dist.P2POp(dist.isend, t, _global(ckpt, r), group=ckpt.group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, _global(ckpt, r), group=ckpt.group) for r, t in recvs]
    if ops:
        for work in hd.batch_isend_irecv(ops):
            work.wait()


def _shm_tensor(path: str, nbytes: int) -> torch.Tensor:
    try:
        os.unlink(path)              # a previous copy of this name: a fresh private file instead
    except FileNotFoundError:
        pass
    create_private_file(path, max(nbytes, 1))
    return torch.from_file(path, shared=True, size=max(nbytes, 1), dtype=torch.uint8)


def _meta_bytes(meta: dict) -> bytes:
    """Parity metadata as JSON (the indexes it carries are JSON text already): never pickle."""
    return json.dumps({k: (v.decode() if isinstance(v, bytes) else
                           [x.decode() for x in v] if k == "indexes" else v) for k, v in meta.items()}).encode()


def _meta(data: bytes, what: str) -> dict:
    try:
        meta = json.loads(bytes(data).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{what}: unreadable parity metadata ({e})") from None
    if not isinstance(meta, dict) or type(meta.get("C")) is not int or meta["C"] <= 0 or meta["C"] % 8:
        raise CorruptCheckpoint(f"{what}: malformed parity metadata")
    return meta


def _own_dir(ckpt) -> str:
    return os.path.join(ckpt.shm_root, f"rank{ckpt.rank}")


def _all_gather_ints(ckpt, values: list[int]) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(t) for _ in range(ckpt.world_size)]
    hd.all_gather(out, t, group=ckpt.group)
    return [[int(v) for v in o] for o in out]


def _all_gather_bytes(ckpt, data: bytes) -> list[bytes]:
    sizes = [s[0] for s in _all_gather_ints(ckpt, [len(data)])]
    longest = max(sizes)
    t = torch.zeros(longest, dtype=torch.uint8)
    t[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else t[:0]
    out = [torch.empty_like(t) for _ in range(ckpt.world_size)]
    hd.all_gather(out, t, group=ckpt.group)
    return [bytes(o[:n].numpy()) for o, n in zip(out, sizes)]


def _layout(sizes: list[int], world: int) -> int:
    per = -(-max(sizes) // (world - 1))
    return max(8, -(-per // 8) * 8)


def _chunk_of(r: int, s: int) -> int:
    return s if s < r else s - 1


class _Stripe:
    """This rank's parity group: ``members`` (ranks of the checkpoint group), ``rank`` (its index
    there), ``world_size`` and ``group`` (a process group over them, or the checkpoint's group)."""

    def __init__(self, ckpt):
        W, per_node = ckpt.world_size, ckpt.ranks_per_node
        nodes = W // per_node if per_node > 0 else 0
        if per_node > 1 and W % per_node == 0 and nodes >= 2:
            local = ckpt.rank % per_node
            self.members = [local + k * per_node for k in range(nodes)]
            # only the stripe's members create (and synchronise on) its group; hashed name
            self.group = dist.new_group([_global(ckpt, r) for r in self.members], backend="gloo",
                                        use_local_synchronization=True)
        else:
            self.members, self.group = list(range(W)), ckpt.group
        self.rank, self.world_size = self.members.index(ckpt.rank), len(self.members)


def _stripe(ckpt) -> _Stripe:
    stripe = getattr(ckpt, "_parity_stripe", None)
    if stripe is None:
        stripe = ckpt._parity_stripe = _Stripe(ckpt)
    return stripe


def protect(ckpt, snap) -> None:
    """Collective: add the redundancy for memory snapshot ``snap`` (held by every rank)."""
    W, me, step = ckpt.world_size, ckpt.rank, snap.step
    data = snap.slot.buffer[:snap.index.nbytes]
    index_bytes = encode_index(snap.index)
    if ckpt.redundancy == "peer":
        dst, src = partner(me, W, ckpt.ranks_per_node), None
        src = next(r for r in range(W) if partner(r, W, ckpt.ranks_per_node) == me)
        size_out, size_in = torch.tensor([len(index_bytes), data.numel()]), torch.empty(2, dtype=torch.int64)
        _exchange(ckpt, [(dst, size_out)], [(src, size_in)])
        path = os.path.join(_own_dir(ckpt), f"peer-from{src}-{step % 2}.bin")
        ckpt.keeper.request("invalidate", path)
        idx_in, buf_in = torch.empty(int(size_in[0]), dtype=torch.uint8), _shm_tensor(path, int(size_in[1]))
        idx_out = torch.frombuffer(bytearray(index_bytes), dtype=torch.uint8)
        _exchange(ckpt, [(dst, idx_out), (dst, data)], [(src, idx_in), (src, buf_in[:int(size_in[1])])])
        ckpt.keeper.request("commit", src, "peer", step, path, bytes(idx_in.numpy()))
        return
    stripe = _stripe(ckpt)   # the RAID-5 group: one rank per node (W, me are stripe-local from here)
    W, me = stripe.world_size, stripe.rank
    sizes = [s[0] for s in _all_gather_ints(stripe, [data.numel()])]
    indexes = _all_gather_bytes(stripe, index_bytes)
    C = _layout(sizes, W)
    send = torch.zeros(W * C, dtype=torch.uint8)
    for s in range(W):
        if s != me:
            k = _chunk_of(me, s)
            piece = data[k * C:min((k + 1) * C, data.numel())]
            if piece.numel() > 0:
                send[s * C:s * C + piece.numel()] = piece
    recv = torch.empty(W * C, dtype=torch.uint8)
    hd.all_to_all_single(recv, send, group=stripe.group)
    blocks = recv.view(W, C // 8, 8).view(torch.int64).view(W, C // 8)
    parity = torch.zeros(C // 8, dtype=torch.int64)
    for r in range(W):
        if r != me:
            parity.bitwise_xor_(blocks[r])
    path = os.path.join(_own_dir(ckpt), f"parity-{step % 2}.bin")
    ckpt.keeper.request("invalidate", path)
    _shm_tensor(path, C).copy_(parity.view(torch.uint8))
    meta = _meta_bytes({"C": C, "sizes": sizes, "indexes": indexes})
    ckpt.keeper.request("commit", ckpt.rank, "parity", step, path, meta)


def recover(ckpt, step: int, missing: list[int], entries: list, own_buf):
    """Collective: rebuild the memory snapshots of the ``missing`` ranks for ``step``.
    Returns (index, buffer, source) on a rank that got its snapshot back, else None."""
    W, me = ckpt.world_size, ckpt.rank
    mine = _own_dir(ckpt)
    if ckpt.redundancy == "peer":
        copies = {r: (p, ib) for r, kind, s, p, ib in entries
                  if kind == "peer" and s == step and os.path.dirname(p) == mine}
        offer = [0] * W
        payload = {}
        for m in missing:
            if partner(m, W, ckpt.ranks_per_node) == me and m in copies:
                try:
                    index = decode_index(copies[m][1], f"peer copy of rank {m}")
                    buf = torch.from_file(copies[m][0], shared=False, size=index.nbytes, dtype=torch.uint8)
                    tensors_from_buffer(index, buf, clone=False, what=f"peer copy of rank {m} step {step}")
                    payload[m], offer[m] = (copies[m][1], buf), 1
                except (CorruptCheckpoint, RuntimeError, OSError):
                    pass
        offers = _all_gather_ints(ckpt, offer)
        holder_of = {m: partner(m, W, ckpt.ranks_per_node) for m in missing
                     if offers[partner(m, W, ckpt.ranks_per_node)][m]}
        sends = []
        for m, holder in holder_of.items():
            if holder == me:
                ib, buf = payload[m]
                sends.append((m, torch.tensor([len(ib), buf.numel()])))
        size_in = torch.empty(2, dtype=torch.int64)
        _exchange(ckpt, sends, [(holder_of[me], size_in)] if me in holder_of else [])
        sends = [(m, t) for m, _ in sends for t in (torch.frombuffer(bytearray(payload[m][0]), dtype=torch.uint8),
                                                    payload[m][1])]
        recvs = []
        if me in holder_of:
            idx_in = torch.empty(int(size_in[0]), dtype=torch.uint8)
            buf_in = torch.empty(int(size_in[1]), dtype=torch.uint8)
            recvs = [(holder_of[me], idx_in), (holder_of[me], buf_in)]
        _exchange(ckpt, sends, recvs)
        if me in holder_of:
            return decode_index(bytes(idx_in.numpy()), f"peer copy of rank {me}"), buf_in, "peer"
        return None
    # parity: one missing rank per stripe (W, me and missing are stripe-local from here)
    stripe = _stripe(ckpt)
    W, me = stripe.world_size, stripe.rank
    missing = [stripe.members.index(m) for m in missing if m in stripe.members]
    parity = {s: (p, meta) for r, kind, s, p, meta in entries if kind == "parity" and r == ckpt.rank}
    ready = int(len(missing) == 1 and me not in missing and own_buf is not None and step in parity)
    flags = [f[0] for f in _all_gather_ints(stripe, [ready])]
    if len(missing) != 1 or not all(flags[r] for r in range(W) if r != missing[0]):
        return None
    j = missing[0]
    if me != j:
        meta = _meta(parity[step][1], f"parity of rank {me} step {step}")
        C = meta["C"]
        own = own_buf[:meta["sizes"][me]]
        block = torch.zeros((W - 1) * C, dtype=torch.uint8)
        for k in range(W - 1):
            s = k if k < j else k + 1
            if s == me:
                block[k * C:(k + 1) * C] = torch.from_file(parity[step][0], shared=False, size=C, dtype=torch.uint8)
            else:
                c = _chunk_of(me, s)
                piece = own[c * C:min((c + 1) * C, own.numel())]
                block[k * C:k * C + piece.numel()] = piece
        info = _meta_bytes({"C": C, "size": meta["sizes"][j], "index": meta["indexes"][j]})
    else:
        block, info = torch.zeros(0, dtype=torch.uint8), b""
    infos = _all_gather_bytes(stripe, info)
    C = _meta(infos[(j + 1) % W], f"parity rebuild of rank {j}")["C"]
    recv = torch.empty(((W - 1) * (W - 1) * C) if me == j else 0, dtype=torch.uint8)
    in_splits = [block.numel() if r == j else 0 for r in range(W)]
    out_splits = [((W - 1) * C if (me == j and r != j) else 0) for r in range(W)]
    hd.all_to_all_single(recv, block, output_split_sizes=out_splits, input_split_sizes=in_splits, group=stripe.group)
    if me != j:
        return None
    meta = _meta(infos[(j + 1) % W], f"parity rebuild of rank {j}")
    acc = torch.zeros((W - 1) * C // 8, dtype=torch.int64)
    for part in recv.view(W - 1, (W - 1) * C):
        acc.bitwise_xor_(part.view(torch.int64))
    return decode_index(meta["index"].encode(), f"parity rebuild of rank {j}"), acc.view(torch.uint8)[:meta["size"]].clone(), \
        "parity"
