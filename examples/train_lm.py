"""Train a small byte-level GPT on the Python standard library's sources.

    heddle run -n 2 examples/train_lm.py --steps 600        # data parallel over 2 gloo processes
    python examples/train_lm.py --steps 50                   # one process

Read top to bottom: arguments, data, model, trainer, loop, summary.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import heddle
from heddle.data import ByteCorpus, WindowSampler
from heddle.dist import CommLedger, all_reduce, is_sharded
from heddle.models import GPT, GPTConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=24, help="global batch (sequences per step; divisible by the data-parallel size)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--log-every", type=int, default=25)
    # Feature flags: each feature adds its own below and its section in feature_sections().
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel ranks per data-parallel replica (heddle.sequence)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (heddle.checkpoint); off when unset")
    p.add_argument("--ckpt-every", type=int, default=1, help="checkpoint every N optimizer steps")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep on disk")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --ckpt-dir")
    p.add_argument("--moe", type=int, default=0, help="experts per MoE layer (heddle.moe); 0 keeps dense MLPs")
    p.add_argument("--moe-strategy", choices=("fssdp", "ep"), default="fssdp", help="MoE parallelism: FSSDP (Hecate) or expert parallel")
    p.add_argument("--moe-aux-weight", type=float, default=0.01, help="load-balancing aux loss weight (per token)")
    p.add_argument("--compress", default=None, help="compressed gradients (heddle.compress): topk:0.01, randomk:0.01, quantize:4, powersgd:4")
    p.add_argument("--feedback", choices=("none", "ef", "ef21", "econtrol"), default="ef", help="error control for --compress")
    p.add_argument("--eta", type=float, default=0.05, help="EControl's eta")
    p.add_argument("--lgreco", action="store_true", help="L-GreCo: per-layer compression parameters (with --compress)")
    p.add_argument("--compress-start", type=int, default=10, help="uncompressed warm-up steps for --compress")
    p.add_argument("--adaptive-sp", action="store_true", help="adaptive sequence parallelism (heddle.sequence.adaptive) on variable-length stdlib files")
    p.add_argument("--asp-cost-model", default="calibrate", help="--adaptive-sp cost model: calibrate, a preset, or a JSON path")
    p.add_argument("--asp-tokens", type=int, default=4096, help="--adaptive-sp: token budget of a global batch of documents")
    p.add_argument("--asp-max-len", type=int, default=2048, help="--adaptive-sp: documents are cut at this many bytes")
    p.add_argument("--asp-capacity", type=int, default=None, help="--adaptive-sp: activation tokens per device (emulates a memory limit)")
    return p.parse_args(argv)


def feature_sections(args) -> dict:
    """TrainerConfig sections switched on by the command line."""
    sections = {}
    if args.sp > 1:
        sections["sequence_parallel"] = {"sp_size": args.sp}
    if args.ckpt_dir:
        sections["checkpoint"] = {"directory": args.ckpt_dir, "every": args.ckpt_every, "keep": args.keep}
    elif args.resume:
        raise ValueError("--resume needs --ckpt-dir")
    if args.moe:
        sections["moe"] = {"num_experts": args.moe, "strategy": args.moe_strategy, "aux_loss_weight": args.moe_aux_weight}
    if args.compress:
        sections["compression"] = {"compressor": args.compress, "feedback": args.feedback, "eta": args.eta,
                                   "lgreco": args.lgreco, "start_iter": args.compress_start,
                                   "retune_every": max(args.steps // 3, 1)}
    elif args.lgreco:
        raise ValueError("--lgreco needs --compress")
    if args.adaptive_sp:
        if args.sp > 1 or args.accum != 1:
            raise ValueError("--adaptive-sp plans its own groups and micro-batches: drop --sp and --accum")
        sections["adaptive_sequence_parallel"] = {"cost_model": args.asp_cost_model,
                                                  "max_tokens_per_device": args.asp_capacity}
    return sections


def adaptive_sp_loop(args, trainer, rank):
    """--adaptive-sp: global batches of whole stdlib files (byte tokens, cut at --asp-max-len) by
    token budget; the plan for step t+1 is computed in the background while step t trains."""
    from heddle.data import TokenBudgetSampler, stdlib_documents

    # the ByteCorpus.stdlib bytes as documents, built once into the user cache (see heddle.data.cache)
    docs = stdlib_documents(max_len=args.asp_max_len + 1)
    sampler = trainer.track("sampler", TokenBudgetSampler(docs.lengths - 1, args.asp_tokens, seed=args.seed))
    asp = trainer.adaptive_sp
    if rank == 0:
        print(f"heddle train_lm --adaptive-sp: {len(docs)} documents, {args.asp_tokens} tokens per step, "
              f"cost model {asp.cost_model.name} ({asp.cost_model.token_capacity} tokens/device)", flush=True)
    asp.submit(docs.lengths[sampler.peek()] - 1)
    losses, start = [], time.perf_counter()
    while trainer.step_count < args.steps:
        batch = sampler.next()
        plan = asp.next_plan()
        if trainer.step_count + 1 < args.steps:
            asp.submit(docs.lengths[sampler.peek()] - 1)  # planned while this step trains
        asp.run(trainer, plan, [docs.tensor(k) for k in batch])
        metrics = trainer.step()
        losses.append(metrics["loss"])
        if rank == 0 and trainer.step_count % args.log_every == 0:
            print(f"  step {trainer.step_count}: {len(batch)} docs, {len(plan.lanes())} lanes "
                  f"{sorted(len(r) for r, _ in plan.lanes())}, predicted {plan.predicted_time:.3f}s, "
                  f"measured {metrics['asp_compute_s']:.3f}s, waited {metrics['asp_plan_wait_s'] * 1e3:.0f} ms "
                  f"for the plan", flush=True)
    trainer.close()
    if rank == 0:
        k = max(1, min(10, len(losses) // 10))
        print(f"summary: steps {len(losses)}  loss first {sum(losses[:k]) / k:.3f} -> last "
              f"{sum(losses[-k:]) / k:.3f} (mean of {k})  time {time.perf_counter() - start:.1f}s", flush=True)
    return losses


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    heddle.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    corpus = ByteCorpus.stdlib()
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                          n_kv_heads=args.kv_heads, max_seq_len=args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    config = heddle.TrainerConfig(grad_accum_steps=args.accum, max_grad_norm=args.clip,
                                  total_steps=args.steps, log_every=args.log_every, **feature_sections(args))
    trainer = heddle.Trainer(model, optimizer, config=config)
    if args.adaptive_sp:
        return adaptive_sp_loop(args, trainer, rank)
    dp_rank, dp_size = getattr(trainer, "dp_rank", rank), getattr(trainer, "dp_size", world)
    sampler = trainer.track("sampler", WindowSampler(corpus.train, args.seq_len, args.batch_size * args.accum,
                                                     seed=args.seed, dp_rank=dp_rank, dp_size=dp_size))
    if args.resume:
        resumed = trainer.resume_from_checkpoint()
        if rank == 0:
            print(f"resumed from step {resumed}" if resumed is not None else "no valid checkpoint: starting fresh",
                  flush=True)
    # Sharded parameters (MoE experts under FSSDP) live on one rank each: count them over all ranks.
    sharded = torch.tensor([float(sum(p.numel() for p in model.parameters() if is_sharded(p)))])
    all_reduce(sharded)
    params = sum(p.numel() for p in model.parameters() if not is_sharded(p)) + int(sharded)
    if rank == 0:
        print(f"heddle train_lm: {world} process(es), {params / 1e6:.2f}M parameters, "
              f"global batch {args.batch_size}x{args.seq_len} bytes", flush=True)

    losses, tokens_per_s, sent = [], [], 0.0
    start = time.perf_counter()
    with CommLedger() as ledger:
        while trainer.step_count < args.steps:
            x, y = sampler.next()
            for micro_x, micro_y in zip(x.chunk(args.accum), y.chunk(args.accum)):
                batch = trainer.prepare_batch({"tokens": micro_x, "targets": micro_y})
                logits = trainer.model(batch["tokens"], position_ids=batch.get("position_ids"),
                                       cu_seqlens=batch.get("cu_seqlens"))
                targets = batch["targets"]
                loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                           ignore_index=-100, reduction="sum")
                if args.moe:  # loss_sum is a token sum: weight the MoE aux loss by this rank's tokens
                    loss_sum = loss_sum + args.moe_aux_weight * (targets != -100).sum() * model.aux_loss()
                trainer.backward(loss_sum, num_tokens=(targets != -100).sum())
            metrics = trainer.step()
            losses.append(metrics["loss"])
            tokens_per_s.append(metrics["tokens_per_s"])
        sent = ledger.bytes_sent()
    elapsed = time.perf_counter() - start
    trainer.close()
    if rank == 0:
        k = max(1, min(10, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        steady = sorted(tokens_per_s[len(tokens_per_s) // 10:] or tokens_per_s)
        print(f"summary: steps {len(losses)}  loss first {first:.3f} -> last {last:.3f} (mean of {k})  "
              f"tokens/s {steady[len(steady) // 2]:,.0f} (median, all ranks)  "
              f"bytes sent by rank 0 {sent / 1e6:.1f} MB  time {elapsed:.1f}s", flush=True)
    return losses


if __name__ == "__main__":
    main()
