"""Train a small byte-level GPT on the Python standard library's sources.

    heddle run -n 2 examples/train_lm.py --steps 600                          # DDP over 2 gloo processes
    heddle run -n 2 examples/train_lm.py --data-parallel fsdp --precision bf16  # FSDP2, bf16 compute
    heddle run -n 2 examples/train_lm.py --config run.toml --steps 100        # a TrainerConfig file; flags override it
    python examples/train_lm.py --steps 50                                    # one process

Read top to bottom: arguments, config, model, trainer, data, loop, summary. Every feature is a
TrainerConfig section; the loop is the same for all of them (adaptive SP plans its micro-batches
inside ``trainer.micro_batches``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import heddle
from heddle.data import ByteCorpus, TokenBudgetSampler, WindowSampler, cached_byte_dataset, stdlib_documents
from heddle.dist import all_reduce, is_sharded
from heddle.models import GPT, GPTConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TrainerConfig file (.toml/.yaml/.json; `heddle config` prints one); "
                                                  "the flags below that you give override it")
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
    p.add_argument("--log-dir", default=None, help="rank 0 writes metrics (CSV, JSONL, TensorBoard) there")
    p.add_argument("--data-parallel", choices=("ddp", "fsdp", "hsdp", "none"), default="ddp",
                   help="replicate (DDP) or shard (FSDP2; HSDP: shard inside --dp-shard ranks) the dense weights")
    p.add_argument("--dp-shard", type=int, default=None, help="--data-parallel hsdp: ranks sharding one replica")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision (fp32 master weights and optimizer state)")
    # Feature flags: each switches on a TrainerConfig section (see trainer_config below).
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel ranks per data-parallel replica (heddle.sequence)")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (heddle.checkpoint); off when unset")
    p.add_argument("--ckpt-every", type=int, default=1, help="checkpoint every N optimizer steps")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep on disk")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --ckpt-dir")
    p.add_argument("--moe", type=int, default=0, help="experts per MoE layer (heddle.moe); 0 keeps dense MLPs")
    p.add_argument("--moe-strategy", choices=("fssdp", "ep"), default="fssdp", help="MoE parallelism: FSSDP (Hecate) or expert parallel")
    p.add_argument("--moe-aux-weight", type=float, default=0.01, help="load-balancing aux loss weight (per token; the Trainer adds it)")
    p.add_argument("--compress", default=None, help="compressed gradients (heddle.compress): topk:0.01, randomk:0.01, quantize:4, powersgd:4, identity")
    p.add_argument("--feedback", choices=("none", "ef", "ef21", "econtrol"), default="ef", help="error control for --compress")
    p.add_argument("--eta", type=float, default=0.05, help="EControl's eta")
    p.add_argument("--lgreco", action="store_true", help="L-GreCo: per-layer compression parameters (with --compress)")
    p.add_argument("--compress-start", type=int, default=10, help="uncompressed warm-up steps for --compress")
    p.add_argument("--adaptive-sp", action="store_true", help="adaptive sequence parallelism (heddle.sequence.adaptive) on variable-length stdlib files")
    p.add_argument("--asp-cost-model", default="calibrate", help="--adaptive-sp cost model: calibrate, a preset, or a JSON path")
    p.add_argument("--asp-tokens", type=int, default=4096, help="--adaptive-sp: token budget of a global batch of documents")
    p.add_argument("--asp-max-len", type=int, default=2048, help="--adaptive-sp: documents are cut at this many bytes")
    p.add_argument("--asp-capacity", type=int, default=None, help="--adaptive-sp: activation tokens per device (emulates a memory limit)")
    p.add_argument("--asp-source", default=None, help="--adaptive-sp: a directory of .py files as the documents (default: the stdlib)")
    p.add_argument("--asp-planner", choices=("process", "thread"), default="process", help="--adaptive-sp: background planner")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The arguments, and the names of those given on the command line (they override --config)."""
    args = build_parser().parse_args(argv)
    unset = object()  # argparse leaves a pre-set attribute alone unless the flag is given
    probe = build_parser().parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    return args, {k for k, v in vars(probe).items() if v is not unset}


# command-line flag -> TrainerConfig key ("section.field" for a feature section)
FLAG_KEYS = {
    "accum": "grad_accum_steps", "clip": "max_grad_norm", "steps": "total_steps", "log_every": "log_every",
    "log_dir": "log_dir", "data_parallel": "data_parallel", "dp_shard": "dp_shard", "precision": "precision",
    "sp": "sequence_parallel.sp_size",
    "ckpt_dir": "checkpoint.directory", "ckpt_every": "checkpoint.every", "keep": "checkpoint.keep",
    "moe": "moe.num_experts", "moe_strategy": "moe.strategy", "moe_aux_weight": "moe.aux_loss_weight",
    "compress": "compression.compressor", "feedback": "compression.feedback", "eta": "compression.eta",
    "lgreco": "compression.lgreco", "compress_start": "compression.start_iter",
    "asp_cost_model": "adaptive_sequence_parallel.cost_model",
    "asp_capacity": "adaptive_sequence_parallel.max_tokens_per_device",
    "asp_planner": "adaptive_sequence_parallel.planner",
}
SWITCHES = {"sp": "sequence_parallel", "ckpt_dir": "checkpoint", "moe": "moe", "compress": "compression",
            "adaptive_sp": "adaptive_sequence_parallel"}  # the flag that switches a section on


def trainer_config(args, given: set[str]) -> heddle.TrainerConfig:
    """--config FILE (if any) with the given flags on top; without a file, every flag (a section is
    on when its switch flag is set)."""
    from heddle.config import load_config

    # True == 1 in Python: test the flag's bool separately, or --adaptive-sp would count as off
    on = {section for flag, section in SWITCHES.items()
          if getattr(args, flag) is True or getattr(args, flag) not in (None, 0, 1, False)}
    if args.resume and not args.ckpt_dir and not args.config:
        raise ValueError("--resume needs --ckpt-dir")
    if args.lgreco and "compression" not in on and not args.config:
        raise ValueError("--lgreco needs --compress")
    if "adaptive_sequence_parallel" in on and (args.sp > 1 or args.accum != 1):
        raise ValueError("--adaptive-sp plans its own groups and micro-batches: drop --sp and --accum")
    overrides: dict = {}
    for flag, key in FLAG_KEYS.items():
        section = key.split(".")[0] if "." in key else None
        if (flag in given) if args.config else (section is None or section in on):
            overrides[key] = getattr(args, flag)
    if "compression" in on and not args.config:
        overrides["compression.retune_every"] = max(args.steps // 3, 1)
    for section in on:
        if not any(k.startswith(section + ".") for k in overrides):
            overrides[section] = True
    return load_config(args.config if args.config else {}, overrides)


class Documents:
    """--adaptive-sp data: global batches of whole .py files (byte tokens, cut at --asp-max-len)
    by token budget, the same on every rank; ``next_lengths`` lets the plan of step t+1 be
    computed in the background while step t trains."""

    def __init__(self, args, rank):
        # ByteCorpus.stdlib's bytes cut at file boundaries, built once into the user cache under a
        # content-addressed name (heddle.data.cache): concurrent jobs share it, nothing goes to /tmp
        self.docs = (stdlib_documents(max_len=args.asp_max_len + 1) if args.asp_source is None else
                     cached_byte_dataset(args.asp_source, suffixes=(".py",), max_len=args.asp_max_len + 1))
        self.sampler = TokenBudgetSampler(self.docs.lengths - 1, args.asp_tokens, seed=args.seed)

    def next(self, last: bool) -> dict:
        batch = self.sampler.next()
        return {"documents": [self.docs.tensor(k) for k in batch],
                "next_lengths": None if last else self.docs.lengths[self.sampler.peek()] - 1}


class Windows:
    """Fixed-length windows of the corpus: this data-parallel rank's rows of each global batch."""

    def __init__(self, args, layout):
        corpus = ByteCorpus.stdlib()
        self.sampler = WindowSampler(corpus.train, args.seq_len, args.batch_size * args.accum, seed=args.seed,
                                     dp_rank=layout.dp_rank, dp_size=layout.dp_size)

    def next(self, last: bool) -> dict:
        x, y = self.sampler.next()
        return {"tokens": x, "targets": y}


def main(argv=None):
    args, given = parse_args(argv)
    torch.set_num_threads(args.threads)
    heddle.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = trainer_config(args, given)

    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                          n_kv_heads=args.kv_heads, max_seq_len=args.seq_len))
    # the optimizer is built by the Trainer after the model is parallelized (sharded under fsdp)
    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
                             config=config)
    adaptive = config.adaptive_sequence_parallel is not None
    data = Documents(args, rank) if adaptive else Windows(args, trainer.layout)
    trainer.track("sampler", data.sampler)
    if args.resume:
        resumed = trainer.resume()
        if rank == 0:
            print(f"resumed from step {resumed}" if resumed is not None else "no valid checkpoint: starting fresh",
                  flush=True)
    # MoE experts under FSSDP / EP live on their owner only: count them over all ranks
    # (an FSDP2 DTensor's numel() is already its global size).
    experts = torch.tensor([float(sum(p.numel() for p in model.parameters() if is_sharded(p)))])
    all_reduce(experts)
    params = sum(p.numel() for p in model.parameters() if not is_sharded(p)) + int(experts)
    if rank == 0:
        print(f"heddle train_lm: {world} process(es), {config.data_parallel}, {config.precision}, "
              f"{params / 1e6:.2f}M parameters, " + (f"documents of {args.asp_tokens} tokens per step" if adaptive
                                                     else f"global batch {args.batch_size}x{args.seq_len} bytes"),
              flush=True)

    losses, tokens_per_s, sent, start = [], [], 0.0, time.perf_counter()
    while trainer.step_count < args.steps:
        for batch in trainer.micro_batches(data.next(last=trainer.step_count + 1 >= args.steps)):
            logits = trainer.model(batch["tokens"], position_ids=batch.get("position_ids"),
                                   cu_seqlens=batch.get("cu_seqlens"))
            targets = batch["targets"]
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
            trainer.backward(loss_sum, num_tokens=(targets != -100).sum())
        metrics = trainer.step()
        losses.append(metrics["loss"])
        tokens_per_s.append(metrics["tokens_per_s"])
        sent += metrics["bytes_sent"]
    elapsed = time.perf_counter() - start
    trainer.close()
    if rank == 0:
        k = max(1, min(10, len(losses) // 10))
        steady = sorted(tokens_per_s[len(tokens_per_s) // 10:] or tokens_per_s or [0.0])
        print(f"summary: steps {len(losses)}  loss first {sum(losses[:k]) / k:.3f} -> last "
              f"{sum(losses[-k:]) / k:.3f} (mean of {k})  tokens/s {steady[len(steady) // 2]:,.0f} (median, all ranks)"
              f"  skipped {trainer.skipped_steps}  bytes sent by rank 0 {sent / 1e6:.1f} MB  time {elapsed:.1f}s",
              flush=True)
    return losses


if __name__ == "__main__":
    main()
