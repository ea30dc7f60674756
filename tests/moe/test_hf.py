"""heddle.moe.from_hf / to_hf on transformers MoE models (fp64), MoE.to(dtype) and mismatched layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from heddle.moe import MoE, from_hf, to_hf
from tests.conftest import run_distributed

VOCAB = 128
TINY = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=128, vocab_size=VOCAB, experts_implementation="eager")


def build(name: str):
    t = transformers
    config_cls, model_cls, extra = {
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, {"num_local_experts": 4, "intermediate_size": 32}),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM, {"num_experts": 4, "moe_intermediate_size": 32,
                                                                "shared_expert_intermediate_size": 64}),
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM, {"num_experts": 4, "moe_intermediate_size": 32,
                                                                "head_dim": 8}),
    }[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**TINY, **extra}, num_experts_per_tok=2)).double()


def _fused_experts(model):
    """{name: tensor} of the HF models' fused expert weights."""
    return {n: p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3}


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_from_hf_equals_hf_at_world1_and_round_trips(name, tmp_path):
    model = build(name)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(ids, labels=ids, output_router_logits=True)
    layers = from_hf(model)
    assert len(layers) == 2 and not _fused_experts(model)
    out = model(ids, labels=ids, output_router_logits=True)
    assert (out.logits - ref.logits).abs().max() < 1e-12
    assert (out.aux_loss - ref.aux_loss).abs() < 1e-12  # HF's own aux term, from the kept router
    to_hf(model)
    state = model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float64, experts_implementation="eager")
    assert torch.equal(loaded(ids).logits, ref.logits)


def _strategies_agree(rank, world, name):
    """FSSDP vs EP vs the plain HF model, each rank on its own tokens (data parallel)."""
    import torch.distributed as dist
    ref = build(name)
    fssdp, ep = copy.deepcopy(ref), copy.deepcopy(ref)
    from_hf(fssdp, None, "fssdp")
    from_hf(ep, None, "ep")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(10 + rank))
    out = {}
    for key, model in (("ref", ref), ("fssdp", fssdp), ("ep", ep)):
        for _ in range(2):  # the second step runs FSSDP with replicas planned from the first's loads
            model.zero_grad(set_to_none=True)
            logits = model(ids).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids.roll(-1, 1).reshape(-1), reduction="sum")
            loss.backward()
        out[key] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    # the HF model's expert gradients summed over ranks, in heddle's flat layout per expert
    fused = {n: g.clone() for n, g in out["ref"][1].items() if n.endswith(("gate_up_proj", "down_proj"))}
    for g in fused.values():
        dist.all_reduce(g)
    worst = {"logits": 0.0, "dense": 0.0, "experts": 0.0}
    for key in ("fssdp", "ep"):
        logits, grads = out[key]
        worst["logits"] = max(worst["logits"], float((logits - out["ref"][0]).abs().max()))
        dense = [n for n in grads if ".experts.experts." not in n]
        hf_name = {n: n.replace(".mlp.experts.router.", ".mlp.gate.") for n in dense}  # the kept HF router
        worst["dense"] = max(worst["dense"], max(float((grads[n] - out["ref"][1][hf_name[n]]).abs().max())
                                                 for n in dense))
        layers = [m for m in (fssdp if key == "fssdp" else ep).modules() if isinstance(m, MoE)]
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}.mlp.experts."
            up, down = fused[prefix + "gate_up_proj"], fused[prefix + "down_proj"]
            f = layer.d_ffn
            for e in layer.owned_experts():
                want = torch.cat([up[e, :f].t().reshape(-1), up[e, f:].t().reshape(-1), down[e].t().reshape(-1)])
                got = layer.experts.expert(e).grad
                worst["experts"] = max(worst["experts"], float((got - want).abs().max()))
    original = {k: v.clone() for k, v in build(name).state_dict().items()}
    to_hf(fssdp)  # gathers every expert from its owner
    worst["round_trip"] = max(float((fssdp.state_dict()[k] - v).abs().max()) for k, v in original.items())
    return worst


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", [2, 3])
def test_fssdp_equals_ep_equals_hf(world):
    for r in run_distributed(_strategies_agree, world, "qwen2_moe", timeout=800):
        assert max(r.values()) < 1e-12, r


def _to_dtype_and_mismatch(rank, world):
    out = {}
    moe = MoE(16, 32, 4, 2, strategy="fssdp").to(torch.float64)  # built fp32, moved after construction
    want = MoE(16, 32, 4, 2, strategy="fssdp", dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    ys = []
    for layer in (moe, want):
        x_leaf = x.clone().requires_grad_(True)
        y, aux = layer(x_leaf)
        (y.square().sum() + aux).backward()
        ys.append((y.detach(), x_leaf.grad))
    out["to_dtype"] = max(float((a - b).abs().max()) for a, b in zip(ys[0], ys[1]))
    try:
        MoE(16, 32, 4 + 2 * rank, 2)(torch.randn(8, 16))
        out["mismatch"] = "no error"
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def test_moe_to_dtype_and_num_experts_mismatch():
    for r in run_distributed(_to_dtype_and_mismatch, 2):
        assert r["to_dtype"] < 1e-6, r   # fp32-initialized weights in fp64 vs fp64-initialized
        assert "num_experts=4" in r["mismatch"] and "num_experts=6" in r["mismatch"], r


def test_from_hf_rejects_models_without_moe_blocks():
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in TINY.items()
                                                                       if k != "experts_implementation"}))
    with pytest.raises(ValueError, match="no sparse MoE block"):
        from_hf(dense)
    with pytest.raises(ValueError, match="from_hf"):
        to_hf(dense)
