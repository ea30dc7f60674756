"""Shared pieces of the Trainer tests: a tiny fp64 GPT, a deterministic global batch with uneven
token counts per rank, the single-process fp64 reference (plain torch: token-mean loss over the
global batch, torch's global-norm clipping, AdamW), and a loop that trains through the Trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import heddle
from heddle.models import GPT, GPTConfig

ROWS, SEQ, LR = 12, 8, 1e-2


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ffn=24, max_seq_len=SEQ)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).double()


def global_batch(step: int, rows: int = ROWS, seq: int = SEQ, drop: float = 0.3):
    """tokens [rows, seq], targets [rows, seq] with ~30% of the targets masked (-100)."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, 256, (rows, seq + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:].clone()
    y[torch.rand((rows, seq), generator=g) < drop] = -100
    return x, y


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), ignore_index=-100, reduction="sum")


def reference(steps: int, clip: float | None, *, model=None, lr: float = LR, skip=(), aux_weight: float = 0.0,
              chunks: int = 1) -> dict:
    """One process, the whole global batch: the numbers every layout must reproduce.
    skip: batches never applied (a skipped step); aux_weight: MoE aux loss per token of each of
    ``chunks`` data-parallel row blocks."""
    model = model or tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, norms = [], []
    for step in range(steps + len(skip)):
        if step in skip:
            continue
        x, y = global_batch(step)
        tokens = int((y != -100).sum())
        if aux_weight:  # the aux loss is per rank (its rows), weighted by the rank's tokens
            loss = 0.0
            for xr, yr in zip(x.chunk(chunks), y.chunk(chunks)):
                loss = loss + loss_sum(model(xr), yr) + aux_weight * int((yr != -100).sum()) * model.aux_loss()
        else:
            loss = loss_sum(model(x), y)
        (loss / tokens).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()) / tokens)
    return {"losses": losses, "norms": norms, "params": full_params(model)}


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full plain tensor (DTensors gathered)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def max_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train(config: heddle.TrainerConfig, steps: int, *, model=None, lr: float = LR, lr_scheduler=None,
          poison=None, fixed_batch: bool = False, optimizer_steps: bool = False,
          skip=()) -> tuple[heddle.Trainer, list[dict]]:
    """Train ``steps`` steps through the Trainer on this rank's rows of :func:`global_batch`.
    poison(step, rank) -> True: this rank's loss of that step becomes NaN; fixed_batch: batch 0 every step;
    optimizer_steps: count applied steps (trainer.step_count), not step() calls; skip: batches left out."""
    model = model or tiny_gpt()
    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=lr), config=config,
                             lr_scheduler=lr_scheduler)
    lay = trainer.layout
    out, step = [], 0
    while (trainer.step_count if optimizer_steps else len(out)) < steps and len(out) < steps + 50:
        if step in skip:
            step += 1
            continue
        x, y = global_batch(0 if fixed_batch else step)
        per = ROWS // lay.dp_size
        rows = slice(lay.dp_rank * per, (lay.dp_rank + 1) * per)
        for batch in trainer.micro_batches({"tokens": x[rows], "targets": y[rows]}):
            logits = trainer.model(batch["tokens"], position_ids=batch.get("position_ids"),
                                   cu_seqlens=batch.get("cu_seqlens"))
            loss = loss_sum(logits, batch["targets"])
            if poison is not None and poison(step, lay.rank):
                loss = loss * float("nan")
            trainer.backward(loss, num_tokens=(batch["targets"] != -100).sum())
        out.append(trainer.step())
        step += 1
    return trainer, out
