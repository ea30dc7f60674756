"""UlyssesAttention against single-process fp64 attention, world sizes 1-4: outputs and dq/dk/dv,
causal / non-causal, b in {1, 3}, both layouts, H in {4, 6, 8} (and 7), Hkv in {1, 2, H}, odd
lengths through shard_sequence, packed documents; layout "hash" placement; ledger bytes; errors."""

import itertools

import pytest
import torch

from heddle.dist import CommLedger
from heddle.models.attention import local_attention
from heddle.sequence import (UlyssesAttention, gather_sequence, local_position_ids, padding_cu_seqlens,
                             plan_heads, position_ids_from_cu_seqlens, shard_sequence)
from tests.conftest import run_distributed

HEADS = [(h, kv) for h in (4, 6, 8) for kv in (1, 2, h)] + [(7, 7), (7, 1)]
MODES = ("even", "odd", "packed")  # sequence length multiple of P / odd / odd with documents


def _case_tensors(seed, b, length, heads, kv_heads, d=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, length, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, length, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, length, kv_heads, d, generator=g, dtype=torch.float64)
    w = torch.randn(b, length, heads, d, generator=g, dtype=torch.float64)
    return q, k, v, w


def _check_case(rank, world, seed, causal, b, layout, heads, kv_heads, mode, chunks=1):
    length = {"even": 4 * world, "odd": 4 * world + 3, "packed": 5 * world + 1}[mode]
    cu = torch.tensor([0, 3, 3 + length // 3, length - 1]) if mode == "packed" else None
    q, k, v, w = _case_tensors(seed, b, length, heads, kv_heads)
    # Reference: one process, whole sequence, fp64.
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_out = local_attention(*ref, causal=causal, cu_seqlens=cu)
    (ref_out * w).sum().backward()
    # Ulysses: each rank cuts its shard of the global tensors (differentiable slice).
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    shards = [shard_sequence(t, None, 1) for t in leaves]
    info = shards[0][1]
    w_local, _ = shard_sequence(w, None, 1, pad_value=0.0)
    attn = UlyssesAttention(layout=layout, overlap_chunks=chunks)
    local = [s for s, _ in shards]
    if layout == "sbhd":
        local = [t.transpose(0, 1) for t in local]
    out = attn(*local, causal=causal, cu_seqlens=padding_cu_seqlens(cu, info))
    if layout == "sbhd":
        out = out.transpose(0, 1)
    (out * w_local).sum().backward()
    what = f"world={world} causal={causal} b={b} {layout} H={heads} Hkv={kv_heads} {mode} chunks={chunks}"
    full = gather_sequence(out.detach(), info)
    torch.testing.assert_close(full, ref_out.detach(), atol=1e-10, rtol=0, msg=what)
    lo, hi = info.start, min(info.start + info.local_length, length)
    for name, leaf, r in zip("qkv", leaves, ref):
        torch.testing.assert_close(leaf.grad[:, lo:hi], r.grad[:, lo:hi], atol=1e-10, rtol=0,
                                   msg=f"d{name} {what}")
        assert not leaf.grad[:, :lo].any() and not leaf.grad[:, hi:].any(), f"d{name} outside shard {what}"


def _hash(b, length, heads, d):
    """Value = 1e6 * batch + 1e3 * global position + head (exact in fp64)."""
    bi = torch.arange(b, dtype=torch.float64)[:, None, None, None]
    si = torch.arange(length, dtype=torch.float64)[None, :, None, None]
    hi = torch.arange(heads, dtype=torch.float64)[None, None, :, None]
    return (1e6 * bi + 1e3 * si + hi).expand(b, length, heads, d).clone()


def _check_hash(rank, world, layout, b, heads, kv_heads):
    length, d = 2 * world, 3
    q, kv = _hash(b, length, heads, d), _hash(b, length, kv_heads, d) + 0.5
    seen = {}

    def capture(q_full, k_full, v_full, *, causal, cu_seqlens):
        seen.update(q=q_full.detach().clone(), k=k_full.detach().clone())
        return q_full * 1.0  # identity: the round trip must give back q exactly

    attn = UlyssesAttention(attn_fn=capture, layout=layout)
    sl = length // world
    local = [t[:, rank * sl:(rank + 1) * sl] for t in (q, kv, kv)]
    if layout == "sbhd":
        local = [t.transpose(0, 1).contiguous() for t in local]
    out = attn(*local)
    assert torch.equal(out, local[0]), f"round trip {layout} b={b} H={heads}"
    q_split, kv_split = plan_heads(heads, kv_heads, world)
    q_heads = torch.arange(q_split.starts[rank], q_split.starts[rank] + q_split.counts[rank])
    kv_heads_me = torch.arange(kv_split.starts[rank], kv_split.starts[rank] + kv_split.counts[rank]) // kv_split.repeat
    assert torch.equal(seen["q"], q[:, :, q_heads]), f"q placement {layout} b={b} H={heads}"
    assert torch.equal(seen["k"], kv[:, :, kv_heads_me]), f"k placement {layout} b={b} Hkv={kv_heads}"
    # GQA convention: local query head i uses local kv head i // (h_me / hkv_me) -> global h // (H/Hkv).
    ratio = q_split.counts[rank] // kv_split.counts[rank]
    for i, h in enumerate(q_heads.tolist()):
        assert kv_heads_me[i // ratio] == h // (heads // kv_heads)


def _check_ledger(rank, world):
    b, heads, kv_heads, d = 2, 2 * world, world, 4  # divisible: the analytic formula is exact
    s = 4 * world
    q = torch.randn(b, s // world, heads, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, s // world, kv_heads, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, s // world, kv_heads, d, dtype=torch.float64, requires_grad=True)
    attn = UlyssesAttention(check="never")
    with CommLedger() as fwd:
        out = attn(q, k, v)
    with CommLedger() as bwd:
        out.sum().backward()
    expected = (world - 1) * b * (s // world) * d * (2 * heads + 2 * kv_heads) // world * 8
    assert fwd.bytes_sent("all_to_all", tag="ulysses") == expected, (fwd.records, expected)
    assert bwd.bytes_sent("all_to_all", tag="ulysses") == expected, (bwd.records, expected)
    calls = 2 if world > 1 else 0
    assert fwd.count("all_to_all") == calls and bwd.count("all_to_all") == calls
    assert fwd.count() == calls  # nothing else communicates (check="never")
    if world > 1:  # overlapped: the same bytes in 2 chunks each way (2 kv units per rank)
        q2, k2, v2 = (torch.randn(b, s // world, h, d, dtype=torch.float64, requires_grad=True)
                      for h in (4 * world, 2 * world, 2 * world))
        attn = UlyssesAttention(check="never", overlap_chunks=2)
        with CommLedger() as both:
            out2 = attn(q2, k2, v2)
            out2.sum().backward()
        with torch.no_grad():  # inference: same values, no sub-graphs kept
            assert torch.equal(attn(q2, k2, v2), out2.detach())
        assert both.bytes_sent("all_to_all", tag="ulysses") == 4 * expected and both.count("all_to_all") == 8
        with pytest.raises(ValueError, match="overlap_chunks=3"):
            UlyssesAttention(check="never", overlap_chunks=3)(q2, k2, v2)
    return expected


def _check_errors(rank, world):
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        UlyssesAttention()(x.long(), x, x)
    # q/k upcast (RoPE under autocast) while v is not: computed in the common dtype, q's dtype out
    mixed = UlyssesAttention()(x.float(), x.float(), x.bfloat16())
    assert mixed.dtype == torch.float32
    with pytest.raises(ValueError, match="layout"):
        UlyssesAttention(layout="bhsd")
    with pytest.raises(ValueError, match=r"H=2, Hkv=1 .* P=3"):
        plan_heads(2, 1, 3)
    if world > 1:
        with pytest.raises(ValueError, match=rf"H={world - 1}, Hkv={world - 1} cannot be split over P={world}"):
            UlyssesAttention()(*(torch.randn(1, 2, world - 1, 3, dtype=torch.float64),) * 3)
        # A rank with a different shard length: every rank raises, nobody hangs.
        s = 2 if rank == 0 else 3
        y = torch.randn(1, s, 4, 3, dtype=torch.float64)
        with pytest.raises(ValueError, match="differ across"):
            UlyssesAttention()(y, y, y)


def _check_positions(rank, world):
    cu = torch.tensor([0, 3, 7, 9])
    full = position_ids_from_cu_seqlens(cu, 11)
    assert full.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]
    local = local_position_ids(cu, 11, None)
    padded = -(-11 // world) * world
    n = padded // world
    assert torch.equal(local, position_ids_from_cu_seqlens(cu, padded)[rank * n:(rank + 1) * n])
    x, info = shard_sequence(torch.arange(11)[None], None, 1, pad_value=-100)
    assert x.shape[1] == n and info.padding == padded - 11
    assert torch.equal(gather_sequence(x, info), torch.arange(11)[None])


def _all_checks(rank, world):
    # A different quarter of the full product per world size (every combination runs at one world
    # size; every world size sees every value of every option).
    cases = list(itertools.product((True, False), (1, 3), ("bshd", "sbhd"), HEADS, MODES))
    done = overlapped = 0
    for i, (causal, b, layout, (heads, kv_heads), mode) in enumerate(cases):
        if heads < world or i % 4 != world % 4:
            continue
        _check_case(rank, world, i, causal, b, layout, heads, kv_heads, mode)
        done += 1
        # Overlapped (chunked) Ulysses on the cases whose every rank has >= 2 head units.
        if world > 1 and min(plan_heads(heads, kv_heads, world)[1].counts) >= 2 and i % 8 == world % 8:
            _check_case(rank, world, i, causal, b, layout, heads, kv_heads, mode, chunks=2)
            overlapped += 1
    for layout, b, (heads, kv_heads) in itertools.product(("bshd", "sbhd"), (1, 3), ((4, 4), (6, 2), (8, 1), (7, 7))):
        if heads >= world:
            _check_hash(rank, world, layout, b, heads, kv_heads)
    _check_positions(rank, world)
    _check_errors(rank, world)
    assert world == 1 or overlapped >= 3, overlapped
    return done, _check_ledger(rank, world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ulysses_matches_single_process(world):
    results = run_distributed(_all_checks, world)
    done, sent = results[0]
    assert done >= 50 and all(r[0] == done for r in results)
    if world == 1:
        assert sent == 0


def test_bad_cu_seqlens_raise_value_error():
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    attn = UlyssesAttention()
    for bad, match in ((torch.tensor([0.0, 4.0, 8.0]), "integer"), (torch.tensor([0, 6, 3, 8]), "non-decreasing"),
                       (torch.tensor([0, 4, 9]), "exceeds"), (torch.tensor([1, 8]), "1-d")):
        with pytest.raises(ValueError, match=match):
            attn(q, q, q, cu_seqlens=bad)
        with pytest.raises(ValueError, match=match):
            position_ids_from_cu_seqlens(bad, 8)
