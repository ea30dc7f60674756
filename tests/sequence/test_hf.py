"""Ulysses on Hugging Face transformers decoders, against the single-process full-sequence HF model.

Every check runs fp64 in the same reduction order on both sides (backward of the token-sum loss,
gradients divided by the global count afterwards): HF's RMSNorm and RoPE compute in fp32, so a
token-mean backward would round differently per token. One spawned run per world size batches
every model and case.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from heddle.sequence import parallelize, shard_for_causal_lm, shift_causal_labels
from heddle.sequence.hf import ATTENTION, ulysses_attention
from tests.conftest import run_distributed

VOCAB = 128
TINY = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    t = transformers
    table = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, {}),
        "llama_mqa": (t.LlamaConfig, t.LlamaForCausalLM, {"num_key_value_heads": 1}),
        "llama_3heads": (t.LlamaConfig, t.LlamaForCausalLM, {"hidden_size": 48, "num_attention_heads": 3,
                                                             "num_key_value_heads": 3, "head_dim": 16}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {"sliding_window": 16}),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {"head_dim": 8}),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                            "intermediate_size": 32}),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2,
                                                                "moe_intermediate_size": 32,
                                                                "shared_expert_intermediate_size": 64}),
    }
    config_cls, model_cls, extra = table[name]
    config = config_cls(**{**TINY, **extra}, experts_implementation="eager")
    torch.manual_seed(seed)
    return model_cls(config).double()


def make_case(case: str, seed: int = 1):
    """(input_ids, position_ids or None, attention_mask or None, labels [unshifted]) of one case."""
    g = torch.Generator().manual_seed(seed)
    length = 63 if case == "odd" else 64
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    pos = mask = None
    labels = ids.clone()
    if case == "packed":
        pos = torch.stack([torch.cat([torch.arange(n) for n in (20, 30, 14)]),
                           torch.cat([torch.arange(n) for n in (40, 24)])])
    if case == "padded":
        mask = torch.ones(2, length, dtype=torch.long)
        mask[0, -10:] = 0   # right padding
        mask[1, :3] = 0     # left padding
        labels = labels.masked_fill(mask == 0, -100)
    return ids, pos, mask, labels


def reference_targets(labels, pos):
    """Shifted labels written out by hand: next token, none across a document start."""
    b, s = labels.shape
    out = torch.full_like(labels, -100)
    for r in range(b):
        for i in range(s - 1):
            starts_doc = pos is not None and int(pos[r, i + 1]) != int(pos[r, i]) + 1
            out[r, i] = -100 if starts_doc else labels[r, i + 1]
    return out


def token_sum_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def reference_run(model, ids, pos, mask, labels):
    targets = reference_targets(labels, pos)
    count = int((targets != -100).sum())
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    loss = token_sum_loss(logits, targets)
    loss.backward()
    return loss.detach() / count, {n: p.grad / count for n, p in model.named_parameters()}, count


def sp_run(model, group, ids, pos, mask, labels):
    _, world = _rank_size(group)
    parallelize(model, group)
    batch = shard_for_causal_lm(ids, group, labels=labels, position_ids=pos, attention_mask=mask)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask).logits
    loss = token_sum_loss(logits, batch.labels)
    loss.backward()
    total = loss.detach().clone()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if world > 1:
        dist.all_reduce(total, group=group)
        for g in grads.values():
            dist.all_reduce(g, group=group)
    return total / batch.num_tokens, {n: g / batch.num_tokens for n, g in grads.items()}, batch


def _rank_size(group):
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


CASES = [("llama", "base"), ("llama", "odd"), ("llama", "packed"), ("llama", "padded"),
         ("llama_mqa", "odd"), ("llama_3heads", "base"), ("qwen2", "odd"), ("mistral", "packed"),
         ("mistral", "base"), ("qwen3", "odd"), ("mixtral", "padded"), ("qwen2_moe", "packed")]


def compare(name, case, group=None):
    ref = build(name)
    sp = copy.deepcopy(ref)
    ids, pos, mask, labels = make_case(case)
    ref_loss, ref_grads, count = reference_run(ref, ids, pos, mask, labels)
    loss, grads, batch = sp_run(sp, group, ids, pos, mask, labels)
    assert batch.num_tokens == count, (name, case, batch.num_tokens, count)
    return {"loss": float((loss - ref_loss).abs()),
            "grad": max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads),
            "grad_scale": max(float(g.abs().max()) for g in ref_grads.values())}


def _two_models_two_groups(world):
    """Two models with different head counts on two SP groups in one process, interleaved."""
    ranks = list(range(world))
    group_a, group_b = dist.new_group(ranks), dist.new_group(ranks)
    models = {"llama": (build("llama"), group_a), "llama_3heads": (build("llama_3heads"), group_b)}
    copies = {k: copy.deepcopy(m) for k, (m, _) in models.items()}
    for (m, g) in models.values():
        parallelize(m, g)
    out = {}
    for k, (m, g) in models.items():  # parallelizing B must not have disturbed A
        ids, pos, mask, labels = make_case("odd", seed=3)
        ref_loss, ref_grads, _ = reference_run(copies[k], ids, pos, mask, labels)
        loss, grads, _ = sp_run(m, g, ids, pos, mask, labels)
        out[k] = max([float((loss - ref_loss).abs())] + [float((grads[n] - ref_grads[n]).abs().max())
                                                         for n in ref_grads])
    return out


def _bf16_autocast(group):
    """bf16 autocast under SP (RoPE returns fp32 q/k, v is bf16) against the fp32 full model."""
    torch.manual_seed(0)
    ref = build("llama").float()
    sp = copy.deepcopy(ref)
    ids, pos, mask, labels = make_case("packed")
    targets = reference_targets(labels, pos)
    ref_loss = token_sum_loss(ref(input_ids=ids, position_ids=pos, use_cache=False).logits, targets) \
        / int((targets != -100).sum())
    ref_loss = ref_loss.detach()
    parallelize(sp, group)
    batch = shard_for_causal_lm(ids, group, labels=labels, position_ids=pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = sp(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    loss = token_sum_loss(logits.float(), batch.labels).detach()
    if dist.is_initialized():
        dist.all_reduce(loss, group=group)
    return float((loss / batch.num_tokens - ref_loss).abs() / ref_loss)


def _hf_loss_function(group):
    """HF's own loss (shift_labels, num_items_in_batch) is this rank's share of the global mean."""
    model = build("llama")
    ids, pos, _, labels = make_case("packed")
    batch = shard_for_causal_lm(ids, group, labels=labels, position_ids=pos)
    parallelize(model, group)
    out = model(**batch.hf_inputs())
    mine = token_sum_loss(out.logits, batch.labels) / batch.num_tokens
    return float((out.loss - mine).abs())


def check_everything(rank, world):
    results = {f"{name}/{case}": compare(name, case) for name, case in CASES}
    results["two_models_two_groups"] = _two_models_two_groups(world) if world > 1 else None
    results["bf16_rel"] = _bf16_autocast(None)
    results["hf_loss"] = _hf_loss_function(None)
    return results


def _assert_results(results):
    for key, value in results.items():
        if key.count("/") == 1:
            assert value["loss"] < 1e-10, (key, value)
            assert value["grad"] < 1e-10, (key, value)
            assert value["grad_scale"] > 1e-4, (key, value)  # a gradient that could be wrong
    if results["two_models_two_groups"] is not None:
        assert max(results["two_models_two_groups"].values()) < 1e-10, results["two_models_two_groups"]
    assert results["bf16_rel"] < 2e-2, results["bf16_rel"]
    assert results["hf_loss"] < 1e-6, results["hf_loss"]  # HF computes its loss in fp32


def test_hf_ulysses_world1_in_process():
    _assert_results(check_everything(0, 1))


@pytest.mark.timeout(900)  # a few seconds on a quiet machine; the shared box is not quiet
@pytest.mark.parametrize("world", [2, 3])
def test_hf_ulysses_equals_full_sequence(world):
    results = run_distributed(check_everything, world, timeout=800)
    for r in results:
        _assert_results(r)


def test_shard_for_causal_lm_labels_and_counts():
    ids = torch.arange(10).view(1, 10) + 100
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])
    want = reference_targets(ids, pos)
    assert torch.equal(shift_causal_labels(ids, pos), want)
    batch = shard_for_causal_lm(ids, None, position_ids=pos[0])
    assert torch.equal(batch.labels, want) and batch.num_tokens == 7
    assert batch.hf_inputs()["shift_labels"] is batch.labels and batch.hf_inputs()["use_cache"] is False
    for bad in (dict(labels=torch.zeros(1, 9, dtype=torch.long)), dict(position_ids=torch.arange(9)),
                dict(attention_mask=torch.ones(2, 10))):
        with pytest.raises(ValueError):
            shard_for_causal_lm(ids, None, **bad)
    with pytest.raises(ValueError, match="input_ids"):
        shard_for_causal_lm(ids.float(), None)


def test_hf_unsupported_inputs_raise():
    model = build("llama")
    with pytest.raises(ValueError, match="attn_fn"):
        parallelize(model, None, attn_fn=lambda *a, **k: None)
    handle = parallelize(model, None)
    assert len(handle) == 2 and model.config._attn_implementation == ATTENTION
    assert model.config.use_cache is False
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="use_cache"):
        model(ids, use_cache=True)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    kv = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="softcap"):
        ulysses_attention(attn, q, kv, kv, None, softcap=30.0)
    with pytest.raises(ValueError, match="s_aux"):
        ulysses_attention(attn, q, kv, kv, None, s_aux=torch.zeros(8))
    with pytest.raises(ValueError, match="KV cache"):
        ulysses_attention(attn, q, torch.randn(1, 2, 6, 8, dtype=torch.float64), kv, None)
    with pytest.raises(ValueError, match="4-d"):
        ulysses_attention(attn, q, kv, kv, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not parallelized"):
        ulysses_attention(build("llama").model.layers[0].self_attn, q, kv, kv, None)
