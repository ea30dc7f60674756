"""``make gpu-check`` (``python -m heddle.gpu_check``): every CUDA path heddle has, on one GPU.

Prints one row per check (PASS / FAIL, seconds, what was compared) and exits 1 if any failed:

- ``kernels``: the Triton kernels (:mod:`heddle.kernels`) against the torch reference, bit for bit:
  stochastic quantize + pack (same noise) at 2/3/4/8 bits, unpack + dequantize, top-k indices;
  with the time of each backend at the largest size.
- ``ulysses-<backend>``: :class:`heddle.sequence.UlyssesAttention` at world 1 in bf16 with each
  attention kernel the device has (SDPA flash, SDPA memory-efficient with a document mask,
  flash-attn varlen when installed) against an fp32 reference, forward and backward.
- ``checkpoint``: :class:`heddle.checkpoint.Checkpointer` on CUDA tensors: host slots in pinned
  memory, the copy on a side stream, the restore bit for bit (disk-only and memory+disk levels).
- ``trainer-bf16``: a bf16 :class:`heddle.Trainer` step loop of the example GPT: the loss is finite
  and falls; tokens/s and MFU against the device's dense bf16 peak (:mod:`heddle.bench.flops`).

On a machine without CUDA it says so in one line and exits 0. ``--device cpu`` runs the same
checks on the CPU at small sizes (the Triton kernels under ``TRITON_INTERPRET=1``): the test suite
does that, so the checks' own logic is tested without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

BUDGET_S = 480.0  # the bound: the whole check in under 8 minutes


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    detail: str
    extra: dict = field(default_factory=dict)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# -- the checks ------------------------------------------------------------------------------
def check_kernels(device, quick: bool) -> tuple[bool, str, dict]:
    import torch

    from heddle import kernels

    if not kernels.triton_available():
        return False, f"Triton does not import ({kernels._triton_error}); pip install triton", {}
    sizes = [777] if quick else [1000, 1 << 20, (1 << 24) + 7]
    g = torch.Generator(device="cpu").manual_seed(0)
    mismatches, compared = [], 0
    for n in sizes:
        x = torch.randn(n, generator=g).to(device)
        noise = torch.rand(n, generator=g).to(device)
        for bits in (2, 3, 4, 8):
            bucket = 512
            ref = kernels.quantize_pack(x, bits, bucket, noise=noise, backend="torch")
            tri = kernels.quantize_pack(x, bits, bucket, noise=noise, backend="triton")
            compared += 1
            if not (torch.equal(ref[0], tri[0]) and torch.equal(ref[1], tri[1])):
                mismatches.append(f"quantize_pack n={n} bits={bits}")
            back_ref = kernels.unpack_dequantize(*ref, n, bits, bucket, backend="torch")
            back_tri = kernels.unpack_dequantize(*ref, n, bits, bucket, backend="triton")
            compared += 1
            if not torch.equal(back_ref, back_tri):
                mismatches.append(f"unpack_dequantize n={n} bits={bits}")
        for k in (1, max(1, n // 100), n):
            compared += 1
            if not torch.equal(kernels.topk_indices(x, k, backend="torch"), kernels.topk_indices(x, k, backend="triton")):
                mismatches.append(f"topk_indices n={n} k={k}")
    n = sizes[-1]
    x = torch.randn(n, device=device)
    noise = torch.rand(n, device=device)
    timing = {}
    if device.type == "cuda":  # interpreted Triton on the CPU has no meaningful speed
        for backend in ("torch", "triton"):
            timing[f"quantize4_{backend}_ms"] = 1e3 * _timed(
                lambda b=backend: kernels.quantize_pack(x, 4, 512, noise=noise, backend=b), device)
            timing[f"topk1%_{backend}_ms"] = 1e3 * _timed(
                lambda b=backend: kernels.topk_indices(x, max(1, n // 100), backend=b), device)
    if mismatches:
        return False, f"{len(mismatches)}/{compared} differ: " + "; ".join(mismatches[:4]), timing
    speed = ""
    if timing:
        speed = (f"; at n={n:,}: quantize 4-bit triton {timing['quantize4_triton_ms']:.2f} ms vs torch "
                 f"{timing['quantize4_torch_ms']:.2f} ms, top-1% {timing['topk1%_triton_ms']:.2f} vs "
                 f"{timing['topk1%_torch_ms']:.2f} ms")
    return True, f"{compared} comparisons bit for bit (n up to {n:,}){speed}", timing


def ulysses_backends(device) -> list[str]:
    """The attention kernels to try: what this device and install have."""
    import importlib.util

    if device.type != "cuda":
        return ["sdpa-math"]
    out = ["sdpa-flash", "sdpa-efficient"]
    if importlib.util.find_spec("flash_attn") is not None:
        out.append("flash-attn-varlen")
    return out


def check_ulysses(device, quick: bool, backend: str) -> tuple[bool, str, dict]:
    """UlyssesAttention at world 1 (the all-to-alls are identities) with one attention kernel,
    bf16 on CUDA (fp32 on the CPU), against an fp32 math reference; forward and backward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import heddle
    from heddle.models.attention import local_attention
    from heddle.sequence import UlyssesAttention

    group = heddle.init_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, s, heads, kv, d = (1, 256, 4, 2, 32) if quick else (2, 4096, 16, 4, 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for h in (heads, kv, kv))
    cu = None
    if backend in ("sdpa-efficient", "flash-attn-varlen", "sdpa-math"):
        cu = torch.tensor([0, s // 3, s], device=device)  # two packed documents: a masked kernel
    if backend == "flash-attn-varlen":
        from heddle.sequence.ulysses import default_attention as attn_fn  # flash-attn on CUDA when installed
        kernel = None
    else:
        attn_fn = local_attention  # torch SDPA, restricted to one kernel below
        kernel = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "sdpa-math": SDPBackend.MATH}[backend]
    attn = UlyssesAttention(group, attn_fn=attn_fn)

    def run(dt, use_kernel):
        leaves = [t.to(device=device, dtype=dt).requires_grad_() for t in (q, k, v)]
        ctx = sdpa_kernel([use_kernel]) if use_kernel is not None else _Null()
        with ctx:
            out = attn(*leaves, causal=True, cu_seqlens=cu)
        out.float().square().sum().backward()
        return out.float(), [t.grad.float() for t in leaves]

    out, grads = run(dtype, kernel)
    q64, k64, v64 = (t.to(device=device, dtype=torch.float32).requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = local_attention(q64, k64, v64, causal=True, cu_seqlens=cu)
    ref.square().sum().backward()
    ref_grads = [q64.grad, k64.grad, v64.grad]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    err = float((out - ref).detach().abs().max())
    gerr = max(float((a - r).abs().max() / (r.abs().max() + 1e-12)) for a, r in zip(grads, ref_grads))
    ok = err <= tol and gerr <= 10 * tol
    seconds = _timed(lambda: run(dtype, kernel), device, repeats=3)
    return ok, (f"{str(dtype).split('.')[-1]} [{b}, {s}, {heads}/{kv}, {d}]{' 2 docs' if cu is not None else ''}: "
                f"max |out - fp32| {err:.1e} (tol {tol:.0e}), grads rel {gerr:.1e}; fwd+bwd {seconds * 1e3:.1f} ms"), \
        {"max_err": err, "grad_rel_err": gerr, "fwd_bwd_ms": seconds * 1e3}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_checkpoint(device, quick: bool) -> tuple[bool, str, dict]:
    """Save CUDA tensors (model + Adam state) through the snapshot engine, restore bit for bit."""
    import torch

    from heddle.checkpoint import Checkpointer

    torch.manual_seed(0)
    width = 64 if quick else 2048
    notes, ok = [], True
    for levels in (("disk",), ("memory", "disk")):
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(8, width, device=device)).square().mean().backward()
        opt.step()
        with tempfile.TemporaryDirectory(prefix="heddle-gpu-check-") as root:
            ckpt = Checkpointer(os.path.join(root, "ckpt"), keep=2, levels=levels)
            start = time.perf_counter()
            ckpt.save(1, {"model": model, "optimizer": opt})
            returned = time.perf_counter() - start
            ckpt.wait_for_snapshot()
            slots = [s for s in ckpt.engine.slots if s is not None]
            if device.type != "cuda":
                pinned = "n/a on the CPU"
            elif slots and all(s.path is None for s in slots):  # in-process slots: pinned host memory
                pinned = "yes" if all(s.buffer.is_pinned() for s in slots) else "NO"
            else:  # memory level: shared-memory files the keeper holds
                pinned = "yes" if all(s.buffer.is_pinned() for s in slots) else "no (shared-memory files)"
            side_stream = ckpt.engine._stream is not None
            expected = {k: v.clone() for k, v in model.state_dict().items()}
            ckpt.close()  # the keeper keeps the memory snapshot for the restore below
            fresh = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)
            fresh_opt = torch.optim.Adam(fresh.parameters())
            again = Checkpointer(os.path.join(root, "ckpt"), keep=2, levels=levels)
            step = again.restore({"model": fresh, "optimizer": fresh_opt})
            source = (getattr(again, "last_restore", None) or {}).get("source", "?")
            again.close(shutdown_keeper_process=True)
        same = step == 1 and all(torch.equal(expected[k], v) for k, v in fresh.state_dict().items())
        same = same and all(torch.equal(a, b) for a, b in zip(
            (t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)),
            (t for st in fresh_opt.state.values() for t in st.values() if torch.is_tensor(t))))
        want_stream = device.type == "cuda"
        want_source = "memory" if "memory" in levels else "disk"
        level_ok = same and side_stream == want_stream and pinned != "NO" and source in (want_source, "?")
        ok = ok and level_ok
        notes.append(f"{'+'.join(levels)}: restore {'bit for bit' if same else 'DIFFERS'} (from {source}), "
                     f"side stream {'yes' if side_stream else 'no'}, pinned slots {pinned}, save() returned in "
                     f"{returned * 1e3:.1f} ms")
    return ok, "; ".join(notes), {}


def check_trainer(device, quick: bool) -> tuple[bool, str, dict]:
    """bf16 Trainer steps of the example GPT: finite, falling loss; tokens/s and MFU vs the peak."""
    import torch
    import torch.nn.functional as F

    import heddle
    from heddle.bench import flops
    from heddle.data import ByteCorpus, WindowSampler
    from heddle.models import GPT, GPTConfig

    heddle.init_distributed()
    cfg = (GPTConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64) if quick else
           GPTConfig(d_model=1024, n_layers=12, n_heads=16, max_seq_len=1024))
    batch, steps = (4, 6) if quick else (16, 30)
    torch.manual_seed(0)
    model = GPT(cfg)
    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=1e-3),
                             config=heddle.TrainerConfig(precision="bf16", max_grad_norm=1.0, progress=False))
    sampler = WindowSampler(ByteCorpus.stdlib(1 << 20).train, cfg.max_seq_len, batch, seed=0)
    losses, times = [], []
    for _ in range(steps):
        x, y = sampler.next()
        _sync(device)
        start = time.perf_counter()
        b = trainer.prepare_batch({"tokens": x, "targets": y})
        logits = trainer.model(b["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].flatten(), reduction="sum")
        trainer.backward(loss, num_tokens=b["targets"].numel())
        metrics = trainer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    trainer.close()
    on_device = next(model.parameters()).device.type == device.type
    steady = sorted(times[len(times) // 3:])
    tokens_per_s = batch * cfg.max_seq_len / steady[len(steady) // 2]
    embed = model.embed.weight.numel()
    fpt = flops.gpt_flops_per_token(params_no_embedding=sum(p.numel() for p in model.parameters()) - embed,
                                    n_layers=cfg.n_layers, n_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
                                    seq_len=cfg.max_seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = flops.peak_flops(name, "bf16")
    mfu = flops.mfu(fpt, tokens_per_s, peak)
    finite = all(loss == loss and abs(loss) != float("inf") for loss in losses)
    falling = losses[-1] < losses[0]
    ok = finite and falling and on_device
    mfu_text = f"MFU {mfu:.1%} of {name}'s {peak / 1e12:.0f} TFLOP/s bf16 peak" if mfu is not None else \
        f"MFU n/a ({name} is not in heddle.bench.flops' peak table)"
    return ok, (f"GPT {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, batch {batch}x{cfg.max_seq_len}, "
                f"{steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}{'' if on_device else ', MODEL NOT ON DEVICE'}; "
                f"{tokens_per_s:,.0f} tokens/s, {mfu_text}"), {"tokens_per_s": tokens_per_s, "mfu": mfu}


# -- the runner ------------------------------------------------------------------------------
def planned_checks(device) -> list[tuple[str, callable]]:
    checks = [("kernels", check_kernels)]
    for backend in ulysses_backends(device):
        checks.append((f"ulysses-{backend}", lambda dev, quick, b=backend: check_ulysses(dev, quick, b)))
    checks += [("checkpoint", check_checkpoint), ("trainer-bf16", check_trainer)]
    return checks


def run_checks(device, *, quick: bool = False, budget_s: float = BUDGET_S, only=None) -> list[Result]:
    results, start = [], time.perf_counter()
    for name, fn in planned_checks(device):
        if only and name not in only:
            continue
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            results.append(Result(name, False, 0.0, f"not run: the {budget_s:.0f} s budget was spent"))
            continue
        t0 = time.perf_counter()
        try:
            ok, detail, extra = fn(device, quick)
        except Exception as e:  # noqa: BLE001 - a failing check is a row, not a crash
            ok, detail, extra = False, f"{type(e).__name__}: {e}".replace("\n", " ")[:300], {}
            traceback.print_exc(file=sys.stderr)
        results.append(Result(name, ok, time.perf_counter() - t0, detail, extra))
    return results


def format_table(results: list[Result], header: str) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [header, f"{'check':<{width}}  result  seconds  detail"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.seconds:>7.1f}  {r.detail}")
    passed = sum(r.ok for r in results)
    lines.append(f"{passed} passed, {len(results) - passed} failed in {sum(r.seconds for r in results):.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m heddle.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (small sizes; for tests)")
    p.add_argument("--quick", action="store_true", help="small sizes (default on the CPU)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every check together")
    p.add_argument("--only", default=None, help="comma-separated check names")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        if not torch.cuda.is_available():
            print(f"gpu-check: no CUDA device on this machine (torch {torch.__version__}): nothing to check")
            return 0
        args.device = "cuda"
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device={args.device!r}: valid are cuda, cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device=cuda: torch sees no CUDA device")
    if not args.budget > 0:
        p.error(f"--budget={args.budget} must be positive")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import faulthandler

    faulthandler.dump_traceback_later(args.budget + 120, exit=True)  # a hung kernel still ends the run
    quick = args.quick or device.type == "cpu"
    if device.type == "cpu":  # the Triton kernels run interpreted on CPU tensors (set before triton imports)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = run_checks(device, quick=quick, budget_s=args.budget, only=only)
    header = (f"heddle gpu-check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{'quick sizes' if quick else 'full sizes'}, budget {args.budget:.0f} s)")
    print(format_table(results, header), flush=True)
    faulthandler.cancel_dump_traceback_later()
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
