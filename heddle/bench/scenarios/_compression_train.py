"""Training parts of the ``compression`` scenario: L-GreCo's byte savings and GPT convergence.

``train``: the example GPT (d_model 64, 2 layers, 4 heads, seq 64, global batch 16, AdamW 3e-3,
clip 1.0) on the standard-library byte corpus through :class:`heddle.Trainer` and its
``compression`` section, ``--steps`` steps, ``--seeds`` seeds per configuration. ``hetero`` runs
give each rank a different half of the corpus (different modules: the data-heterogeneity regime
EControl targets). Reported: final train loss (mean of the last 10% of steps), validation loss on
8 fixed held-out batches, bytes sent per step by rank 0 (CommLedger: everything the step sends,
over all steps with the ``WARMUP`` uncompressed ones, and over the compressed steps alone), the
mean relative compression error ||v - C(v)||^2 / ||v||^2 of the compressed steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import heddle
from heddle.data import ByteCorpus, WindowSampler
from heddle.models import GPT, GPTConfig

CONFIGS = {
    "fp32": None,
    "topk:0.01+ef": {"compressor": "topk:0.01", "feedback": "ef"},
    "topk:0.01+econtrol": {"compressor": "topk:0.01", "feedback": "econtrol"},
    "quantize:4+econtrol": {"compressor": "quantize:4", "feedback": "econtrol"},
    "quantize:4+econtrol+lgreco": {"compressor": "quantize:4", "feedback": "econtrol", "lgreco": True},
    "quantize:3+econtrol+lgreco": {"compressor": "quantize:3", "feedback": "econtrol", "lgreco": True},
    "powersgd:4+ef+lgreco": {"compressor": "powersgd:4", "feedback": "ef", "lgreco": True},
    "powersgd:4+ef": {"compressor": "powersgd:4", "feedback": "ef"},
    "hetero fp32": None,
    "hetero topk:0.01+ef": {"compressor": "topk:0.01", "feedback": "ef"},
    "hetero topk:0.01+econtrol": {"compressor": "topk:0.01", "feedback": "econtrol"},
    # not in the default set (kept short for wall time; run them with --configs)
    "hetero quantize:4+econtrol": {"compressor": "quantize:4", "feedback": "econtrol"},
    "quantize:2+econtrol": {"compressor": "quantize:2", "feedback": "econtrol"},
    "quantize:2+ef": {"compressor": "quantize:2", "feedback": "ef"},
    "topk:0.05+ef": {"compressor": "topk:0.05", "feedback": "ef"},
    "topk:0.01+econtrol eta=0.5": {"compressor": "topk:0.01", "feedback": "econtrol", "eta": 0.5},
}
DEFAULT = list(CONFIGS)[:11]
MODEL = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
SEQ, BATCH = 64, 16
WARMUP = 5     # uncompressed steps; L-GreCo samples them for its first choice
_corpus = None


def corpus() -> ByteCorpus:
    global _corpus
    if _corpus is None:
        _corpus = ByteCorpus.stdlib()
    return _corpus


def _val_loss(model) -> float:
    sampler = WindowSampler(corpus().val, SEQ, 32, seed=12345)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(8):
            x, y = sampler.next()
            total += float(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    return total / count


def train_once(ctx, name: str, seed: int, steps: int) -> dict:
    section = CONFIGS[name]
    hetero = name.startswith("hetero")
    if section is not None:
        section = dict(section, start_iter=WARMUP, retune_every=max(steps // 2, 1), sample_steps=WARMUP, seed=seed)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    trainer = heddle.Trainer(model, opt, group=ctx.group, config=heddle.TrainerConfig(
        max_grad_norm=1.0, progress=False, compression=section))
    tokens = corpus().train
    if hetero:   # rank r of P trains on the r-th of P contiguous parts of the corpus
        part = len(tokens) // ctx.world_size
        sampler = WindowSampler(tokens[ctx.rank * part:(ctx.rank + 1) * part], SEQ, BATCH // ctx.world_size,
                                seed=seed * 7 + ctx.rank)
    else:
        sampler = WindowSampler(tokens, SEQ, BATCH, seed=seed, dp_rank=ctx.rank, dp_size=ctx.world_size)
    losses, sent, steady, errors = [], 0.0, 0.0, []
    for _ in range(steps):
        x, y = sampler.next()
        loss = F.cross_entropy(trainer.model(x).flatten(0, 1), y.flatten(), reduction="sum")
        trainer.backward(loss, num_tokens=y.numel())
        m = trainer.step()
        losses.append(m["loss"])
        sent += m["bytes_sent"]
        steady += m["bytes_sent"] if trainer.step_count > WARMUP else 0.0
        if "compress_error" in m and trainer.step_count > WARMUP:
            errors.append(m["compress_error"])
    trainer.close()
    tail = max(1, steps // 10)
    return {"part": "train", "config": name, "seed": seed, "steps": steps,
            "final_loss": sum(losses[-tail:]) / tail, "val_loss": _val_loss(model),
            "bytes_per_step": sent / steps, "steady_bytes_per_step": steady / max(steps - WARMUP, 1),
            "compression_error": sum(errors) / len(errors) if errors else 0.0,
            "curve": losses}


def train_rows(ctx, options) -> list[dict]:
    names = [c for c in options.configs.split(",") if c] or DEFAULT
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; valid: {list(CONFIGS)}")
    rows = []
    for name in names:
        for seed in range(options.seeds):
            row = train_once(ctx, name, seed, options.steps)
            ctx.log(f"[compression] {name} seed {seed}: val {row['val_loss']:.4f} "
                    f"final {row['final_loss']:.4f} {row['bytes_per_step'] / 1e3:.1f} kB/step")
            rows.append(row)
    return rows


def lgreco_rows(ctx, options) -> list[dict]:
    """Uniform vs L-GreCo per family on the example GPT's (d_model 128, 4 layers) gradients
    summed over 10 steps after 20 steps of training (rank 0's local gradients)."""
    from heddle.compress import LGreCo, PowerSGD, Quantize, RandomK, TopK
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = WindowSampler(corpus().train, 128, 8, seed=ctx.rank)
    acc = {}
    for step in range(30):
        x, y = sampler.next()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        if step >= 20:
            for n, p in model.named_parameters():
                acc[n] = acc[n] + p.grad if n in acc else p.grad.clone()
        opt.step()
        opt.zero_grad()
    shapes = {n: tuple(t.shape) for n, t in acc.items()}
    rows = []
    for comp in (PowerSGD(4), TopK(0.01), Quantize(4), RandomK(0.01)):
        lg = LGreCo(error_budget=1.0)
        choice = lg.choose(comp, acc, shapes)

        def totals(pick):
            bits = sum(comp.bits_per_element(shapes[k], pick(k)) * math.prod(shapes[k]) for k in shapes)
            err = sum(comp.expected_error(acc[k], pick(k)) for k in shapes)
            return bits / 8, err

        ub, ue = totals(lambda k: comp.default_param)
        ab, ae = totals(lambda k: choice[k])
        norm = sum(float(t.double().pow(2).sum()) for t in acc.values())
        rows.append({"part": "lgreco", "compressor": repr(comp), "uniform_bytes": ub, "lgreco_bytes": ab,
                     "bytes_ratio": ub / ab, "uniform_rel_error": ue / norm, "lgreco_rel_error": ae / norm,
                     "choices": ",".join(sorted({str(v) for v in choice.values()}))})
    return rows
