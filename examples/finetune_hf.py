"""Fine-tune a Hugging Face transformers causal LM with heddle: Ulysses SP, MoE (FSSDP), bf16,
checkpoint and resume, through heddle.Trainer.

    heddle run -n 2 examples/finetune_hf.py                       # tiny Llama from a config, SP=2
    heddle run -n 2 examples/finetune_hf.py --model mixtral       # tiny Mixtral: SP=2 + MoE (FSSDP)
    heddle run -n 2 examples/finetune_hf.py --model path/to/dir   # a local config.json (+ weights)
    heddle run -n 2 examples/finetune_hf.py --resume              # continue from --ckpt-dir

Nothing is downloaded: the default models are built from configs; a directory is read with
``from_pretrained`` when it holds weights, else ``from_config``. Data: byte windows of Python's
standard library (vocabulary 256). The Trainer's ``sequence_parallel`` section parallelizes the
HF model (heddle attention registered with transformers) and shards each batch with global
targets and positions; its ``moe`` section converts the model's sparse MoE blocks with
``heddle.moe.from_hf``. HF's router aux loss is added as ``aux_weight * tokens * aux_loss`` to the
token-sum loss (the Trainer divides by the global token count).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import heddle
from heddle.data import ByteCorpus, WindowSampler


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama", help="llama | mixtral | a local directory with config.json")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="rows per data-parallel replica and step")
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel group size")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--aux-weight", type=float, default=0.01)
    p.add_argument("--ckpt-dir", default="ckpts/finetune_hf")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(name: str):
    import transformers as t
    tiny = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                vocab_size=256, max_position_embeddings=4096, use_cache=False)
    if name == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**tiny, intermediate_size=256))
    if name == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(**tiny, intermediate_size=128, num_local_experts=4,
                                                    num_experts_per_tok=2, experts_implementation="eager"))
    if not os.path.isdir(name):
        raise ValueError(f"--model={name!r}: expected 'llama', 'mixtral' or a local directory with config.json")
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name))
    if has_weights:
        return t.AutoModelForCausalLM.from_pretrained(name, local_files_only=True, experts_implementation="eager")
    config = t.AutoConfig.from_pretrained(name, local_files_only=True)
    return t.AutoModelForCausalLM.from_config(config, experts_implementation="eager")


def is_moe(model) -> bool:
    return any(type(m).__name__.endswith("SparseMoeBlock") for m in model.modules())


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    heddle.init_distributed()
    rank = torch.distributed.get_rank()
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    moe = is_moe(model)
    if model.config.vocab_size < 256:
        raise ValueError(f"the model's vocab_size={model.config.vocab_size} is below the 256 byte tokens of the data")
    config = heddle.TrainerConfig(
        precision=args.precision,
        sequence_parallel={"sp_size": args.sp} if args.sp > 1 else None,
        moe={"strategy": "fssdp", "reshard_every": 10} if moe else None,
        checkpoint={"directory": args.ckpt_dir, "every": args.ckpt_every},
        progress=False)
    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=args.lr), config=config)
    corpus = ByteCorpus.stdlib()
    sampler = WindowSampler(corpus.train, args.seq_len, args.batch_size, seed=args.seed,
                            dp_rank=trainer.layout.dp_rank, dp_size=trainer.layout.dp_size)
    trainer.track("sampler", sampler)
    if args.resume:
        step = trainer.resume()
        if rank == 0:
            print(f"resumed from step {step}" if step is not None else "no checkpoint: starting fresh", flush=True)
    if rank == 0:
        print(f"finetune_hf: {type(model).__name__}, {args.precision}, SP={args.sp}, MoE={'fssdp' if moe else 'no'}, "
              f"batch {args.batch_size}x{args.seq_len} per replica", flush=True)
    start, losses = time.perf_counter(), []
    while trainer.step_count < args.steps:
        x, y = sampler.next()
        for batch in trainer.micro_batches({"tokens": x, "targets": y}):
            out = trainer.model(input_ids=batch["tokens"], position_ids=batch.get("position_ids"),
                                output_router_logits=moe)
            targets = batch["targets"]
            num_tokens = (targets != -100).sum()
            loss_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
            if moe and out.aux_loss is not None:  # HF's load-balancing loss of this rank's tokens
                loss_sum = loss_sum + args.aux_weight * num_tokens * out.aux_loss
            trainer.backward(loss_sum, num_tokens=num_tokens)
        metrics = trainer.step()
        losses.append(metrics["loss"])
        if rank == 0 and (trainer.step_count % 10 == 0 or trainer.step_count == args.steps):
            print(f"step {trainer.step_count}  loss {metrics['loss']:.4f}", flush=True)
    trainer.close()
    if rank == 0 and losses:
        print(f"summary: steps {len(losses)}  loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
              f"time {time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
