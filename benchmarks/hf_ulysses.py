"""A transformers Llama under Ulysses, side by side: heddle vs DeepSpeed's UlyssesSPAttentionHF vs no SP.

    heddle run -n 2 benchmarks/hf_ulysses.py [--seq-len 4096] [--hidden 512] [--trials 3] [--markdown]

One model architecture (default: hidden 512, 8 heads, 2 kv heads, 2 layers, s=4096, b=1, fp32),
three copies with the same weights:

- ``no SP``: every rank runs the whole sequence with HF's own sdpa (the reference);
- ``heddle``: ``heddle.sequence.parallelize(model)`` + ``shard_for_causal_lm``;
- ``DeepSpeed``: ``UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", P, 1)`` (which
  replaces HF's "sdpa" process-wide, so the reference runs an untouched copy of the original sdpa
  registered as "sdpa_reference"), fed by its ``UlyssesSPDataLoaderAdapter`` (labels shifted
  globally, then every tensor cut into P shards).

Timed: forward + token-sum cross-entropy + backward, median of ``--trials`` after ``--warmup``,
one thread per process; peak memory from torch's profiler memory events. Differences: the loss
(summed over ranks, over the global count) and every gradient (summed over ranks) against no SP.
The correctness table runs the same architecture in fp64 at s=256 on the cases DeepSpeed's notes
flag: an odd length, uneven heads (3 over P), and packed documents with sdpa.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from heddle.bench.report import markdown_table, print_rows
from heddle.bench.scenarios.ulysses import _peak_bytes
from heddle.bench.script import script_setup
from heddle.sequence import parallelize, shard_for_causal_lm, shift_causal_labels


def add_options(parser):
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)


def build(options, dtype, heads=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    head_dim = options.hidden // options.heads
    heads = heads or options.heads
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                         num_key_value_heads=options.kv_heads if heads == options.heads else heads, num_hidden_layers=options.layers,
                         intermediate_size=2 * options.hidden, vocab_size=options.vocab,
                         max_position_embeddings=max(options.seq_len, 256) + 64, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def loss_sum(model, inputs, labels):
    logits = model(**inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def deepspeed_inputs(ids, position_ids, rank, world, group):
    """This rank's first micro-batch from DeepSpeed's own ``UlyssesSPDataLoaderAdapter`` (every rank's
    loader yields the same sample): (model inputs, its shift_labels)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    loader = [{"input_ids": ids, "position_ids": position_ids, "labels": ids.clone()}]
    batch = next(UlyssesSPDataLoaderAdapter(loader, rank, group, world, ids.device))
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, batch["shift_labels"]


def run_step(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, inputs, labels)
    loss.backward()
    return loss.detach()


def summed(model, loss, count, group, world):
    """(global loss, gradients) of a sharded run: sums over ranks over the global count."""
    loss = loss.clone()
    grads = [p.grad.clone() for p in model.parameters()]
    if world > 1:
        dist.all_reduce(loss, group=group)
        for g in grads:
            dist.all_reduce(g, group=group)
    return loss / count, [g / count for g in grads]


def diffs(ref, other):
    return float((ref[0] - other[0]).abs()), max(float((a - b).abs().max()) for a, b in zip(ref[1], other[1]))


def timed(fn, warmup, trials):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def correctness(options, rank, world, ds_group):
    """Rows of the correctness table (fp64, s=256)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    small = copy.copy(options)
    small.seq_len = 256
    rows = []
    g = torch.Generator().manual_seed(1)
    cases = {"even length, one document": (256, None), "odd length (255)": (255, None),
             "packed documents (100 + 156)": (256, [100, 156])}
    for case, (s, docs) in cases.items():
        ids = torch.randint(0, options.vocab, (1, s), generator=g)
        pos = (torch.arange(s) if docs is None else torch.cat([torch.arange(n) for n in docs])).unsqueeze(0)
        base = build(small, torch.float64)
        ref_model, heddle_model, ds_model = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
        ref_model.set_attn_implementation("sdpa_reference")
        batch = shard_for_causal_lm(ids, ds_group, position_ids=pos)
        ref_loss = run_step(ref_model, {"input_ids": ids, "position_ids": pos}, shift_causal_labels(ids, pos))
        ref = (ref_loss / batch.num_tokens, [p.grad / batch.num_tokens for p in ref_model.parameters()])
        parallelize(heddle_model, ds_group)
        loss = run_step(heddle_model, {"input_ids": batch.input_ids, "position_ids": batch.position_ids}, batch.labels)
        h = diffs(ref, summed(heddle_model, loss, batch.num_tokens, ds_group, world))
        try:
            inputs, labels = deepspeed_inputs(ids, pos, rank, world, ds_group)
            # its reference: HF's own full-sequence model with DeepSpeed's labels (shifted across
            # documents), so that only the attention differs
            full_labels = F.pad(ids, (0, 1), value=-100)[..., 1:]
            count = int((full_labels != -100).sum())
            ds_ref_model = copy.deepcopy(base)
            ds_ref_model.set_attn_implementation("sdpa_reference")
            ds_ref_loss = run_step(ds_ref_model, {"input_ids": ids, "position_ids": pos}, full_labels)
            ds_ref = (ds_ref_loss / count, [p.grad / count for p in ds_ref_model.parameters()])
            loss = run_step(ds_model, inputs, labels)
            d = diffs(ds_ref, summed(ds_model, loss, count, ds_group, world))
            ds = f"loss {d[0]:.1e}, grads {d[1]:.1e}"
        except (ValueError, AssertionError, RuntimeError) as e:
            ds = f"rejects: {str(e).splitlines()[0][:70]}"
        rows.append({"case": case, "heddle": f"loss {h[0]:.1e}, grads {h[1]:.1e}", "DeepSpeed": ds})
    try:  # uneven heads: DeepSpeed's attention refuses at construction
        UlyssesSPAttentionHF(sdpa_attention_forward, 1, 3, 64, 3, 2, ds_group, seq_length_is_variable=True)
        ds = "accepted"
    except ValueError as e:
        ds = f"rejects: {str(e)[:70]}"
    small3 = copy.copy(small)
    ids = torch.randint(0, options.vocab, (1, 256), generator=g)
    base = build(small3, torch.float64, heads=3)
    ref_model, heddle_model = base, copy.deepcopy(base)
    ref_model.set_attn_implementation("sdpa_reference")
    batch = shard_for_causal_lm(ids, ds_group)
    ref_loss = run_step(ref_model, {"input_ids": ids}, shift_causal_labels(ids, torch.arange(256).unsqueeze(0)))
    ref = (ref_loss / batch.num_tokens, [p.grad / batch.num_tokens for p in ref_model.parameters()])
    parallelize(heddle_model, ds_group)
    loss = run_step(heddle_model, {"input_ids": batch.input_ids, "position_ids": batch.position_ids}, batch.labels)
    h = diffs(ref, summed(heddle_model, loss, batch.num_tokens, ds_group, world))
    rows.append({"case": f"uneven heads (3 over {world})", "heddle": f"loss {h[0]:.1e}, grads {h[1]:.1e}",
                 "DeepSpeed": ds})
    return rows


def main(argv=None):
    options, rank, world = script_setup(__doc__, [add_options], argv, warmup=1, trials=3)
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the torch process group
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    # HF's own sdpa (attention and mask builder) under a name DeepSpeed does not replace
    AttentionInterface.register("sdpa_reference", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_reference", sdpa_mask)

    base = build(options, torch.float32)
    ref_model, heddle_model, ds_model = base, copy.deepcopy(base), copy.deepcopy(base)
    ref_model.set_attn_implementation("sdpa_reference")
    mpu = UlyssesSPAttentionHF.register_with_transformers(ds_model, "sdpa", world, 1)
    group = mpu.get_sequence_parallel_group()
    parallelize(heddle_model, group)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, options.vocab, (1, options.seq_len), generator=g)
    pos = torch.arange(options.seq_len).unsqueeze(0)
    batch = shard_for_causal_lm(ids, group, position_ids=pos)
    ds_in, ds_labels = deepspeed_inputs(ids, pos, rank, world, group)
    runs = {
        "no SP": (ref_model, {"input_ids": ids, "position_ids": pos}, shift_causal_labels(ids, pos), False),
        "heddle": (heddle_model, {"input_ids": batch.input_ids, "position_ids": batch.position_ids}, batch.labels, True),
        "DeepSpeed": (ds_model, ds_in, ds_labels, True),
    }
    results, rows = {}, []
    for name, (model, inputs, labels, sharded) in runs.items():
        seconds = timed(lambda: run_step(model, inputs, labels), options.warmup, options.trials)
        peak = _peak_bytes(lambda: run_step(model, inputs, labels))
        loss = run_step(model, inputs, labels)
        if sharded:
            results[name] = summed(model, loss, batch.num_tokens, group, world)
        else:
            results[name] = (loss / batch.num_tokens, [p.grad / batch.num_tokens for p in model.parameters()])
        rows.append({"impl": name, "s": options.seq_len, "fwd_bwd_s": seconds, "peak_mb": peak / 2**20})
    for row in rows:
        row["loss_diff"], row["grad_diff"] = diffs(results["no SP"], results[row["impl"]])
    table = correctness(options, rank, world, group)
    if rank == 0:
        columns = [("impl", "impl"), ("s", "s"), ("fwd_bwd_s", "fwd+bwd median s"), ("peak_mb", "peak MB"),
                   ("loss_diff", "max |diff| loss vs no SP"), ("grad_diff", "max |diff| grads vs no SP")]
        print_rows("hf_ulysses", rows, columns)
        case_columns = [("case", "case (fp64, s=256)"), ("heddle", "heddle vs no SP"), ("DeepSpeed", "DeepSpeed vs no SP")]
        print_rows("hf_ulysses correctness", table, case_columns)
        ds, hd = (next(r["fwd_bwd_s"] for r in rows if r["impl"] == k) for k in ("DeepSpeed", "heddle"))
        print(f"heddle / DeepSpeed time: {hd / ds:.2f} (goal <= 1: {'met' if hd <= ds else 'missed'})")
        if options.markdown:
            print(markdown_table(rows, columns))
            print(markdown_table(table, case_columns))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
