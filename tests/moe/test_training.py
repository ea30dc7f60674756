"""The moe Trainer section on a GPT (world 1 vs 2, FSSDP vs EP, periodic re-sharding with the
optimizer state moving, clipping by the global norm) and checkpoints saved at world 2 loaded at
world 3 and 1."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import heddle
from heddle.models import GPT, GPTConfig
from heddle.moe import MoE, merge_expert_shards, reshard
from tests.conftest import run_distributed

STEPS, GLOBAL_BATCH, SEQ = 6, 4, 8


def _train(rank, world, strategy, aux_weight, reshard_every):
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ffn=24, max_seq_len=SEQ)).double()
    dense = {id(p) for b in model.blocks for p in b.mlp.parameters()}
    config = heddle.TrainerConfig(max_grad_norm=0.5, progress=False, moe=dict(
        num_experts=5, top_k=2, strategy=strategy, aux_loss_weight=aux_weight, reshard_every=reshard_every,
        memory_slots=1, overlap_degree=2))
    trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1), config=config)
    optimizer = trainer.optimizer  # built after the MLPs became MoE layers
    listed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not listed & dense, "dense MLP parameters left in the optimizer"
    assert all(id(p) in listed for b in model.blocks for p in b.mlp.parameters())
    g = torch.Generator().manual_seed(1)
    losses, norms, moved = [], [], 0
    for step in range(STEPS):
        data = torch.randint(0, 256, (GLOBAL_BATCH, SEQ + 1), generator=g)
        data[:, 1::2] = data[:, :1] % 7       # skew the routing a little
        rows = data.chunk(world)[rank]
        x, y = rows[:, :-1], rows[:, 1:]
        logits = trainer.model(x)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        trainer.backward(loss_sum, num_tokens=y.numel())
        m = trainer.step()
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        moved += int(m.get("moe_experts_moved", 0))
        for layer in trainer.plugin("moe").layers:   # optimizer state lives with the owner only
            for e in range(layer.num_experts):
                p = layer.experts.expert(e)
                assert (p in optimizer.state) == (layer.owners[e] == layer.rank), (step, e)
    trainer.close()
    return {"losses": losses, "norms": norms, "moved": moved}


def _train_cases(rank, world):
    out = {"fssdp": _train(rank, world, "fssdp", 0.0, 2)}
    if world > 1:
        out["ep"] = _train(rank, world, "ep", 0.0, None)
        out["fssdp-aux"] = _train(rank, world, "fssdp", 0.05, 1)
        out["ep-aux"] = _train(rank, world, "ep", 0.05, None)
    return out


def test_trainer_moe_world1_world2_fssdp_ep_agree():
    one = run_distributed(_train_cases, 1)[0]
    two = run_distributed(_train_cases, 2)
    # Without the aux loss the objective is the global token mean: world size and strategy
    # change nothing, and the clipped global norm counts every expert once.
    for name in ("fssdp", "ep"):
        np.testing.assert_allclose(two[0][name]["losses"], one["fssdp"]["losses"], rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(two[0][name]["norms"], one["fssdp"]["norms"], rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(two[0]["fssdp-aux"]["losses"], two[0]["ep-aux"]["losses"], rtol=1e-9)
    np.testing.assert_allclose(two[0]["fssdp-aux"]["norms"], two[0]["ep-aux"]["norms"], rtol=1e-9)
    assert two[0]["fssdp-aux"]["moved"] + two[0]["fssdp"]["moved"] > 0, "Algorithm 2 never re-sharded"


D, F_, E = 6, 8, 5


def _probe(n):
    g = torch.Generator().manual_seed(42)
    return torch.randn(n, D, generator=g, dtype=torch.float64)


def _save(rank, world):
    layer = MoE(D, F_, E, 2, dtype=torch.float64, seed=9)
    reshard([layer], owners=[[1, 1, 1, 0, 0]])           # heterogeneous: rank 1 owns 3 experts
    with torch.no_grad():
        for e in layer.owned_experts():                   # make the weights differ from the init
            layer.experts.expert(e).add_(0.1 * (e + 1))
    x = _probe(12).chunk(world)[rank]
    y, _ = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    # Resume at the same world size from this rank's own file: a fresh layer (round-robin owners)
    # adopts the saved owners from the `layout` entry before its experts load.
    fresh = MoE(D, F_, E, 2, dtype=torch.float64, seed=123)
    fresh.load_state_dict(state)
    assert fresh.owners == [1, 1, 1, 0, 0]
    torch.testing.assert_close(fresh(x)[0], y, atol=1e-13, rtol=0)
    return {"state": {k: v.numpy() for k, v in state.items()}, "y": y.detach().numpy()}


def _load(rank, world, shards, expected_y):
    layer = MoE(D, F_, E, 2, dtype=torch.float64, seed=123)  # another seed: everything must come from the file
    merged = merge_expert_shards([{k: torch.from_numpy(v) for k, v in s.items()} for s in shards])
    layer.load_state_dict(merged)
    x = _probe(12).tensor_split(world)[rank]
    y, _ = layer(x)
    ref = torch.from_numpy(np.concatenate(expected_y)).tensor_split(world)[rank]
    torch.testing.assert_close(y.detach(), ref, atol=1e-13, rtol=0)
    with pytest.raises(RuntimeError, match="Missing key"):   # a lost shard is an error, not a silent init
        if layer.owned_experts():
            partial = {k: v for k, v in merged.items() if not k.endswith(f"experts.{layer.owned_experts()[0]}")}
            layer.load_state_dict(partial)
        else:
            raise RuntimeError("Missing key (rank owns nothing)")
    return layer.owned_experts()


def test_checkpoint_world2_to_world3_and_world1():
    saved = run_distributed(_save, 2)
    shards = [s["state"] for s in saved]
    keys = [sorted(k for k in s if "experts." in k) for s in shards]
    assert keys == [["experts.3", "experts.4"], ["experts.0", "experts.1", "experts.2"]]  # each once, by owner
    expected = [s["y"] for s in saved]
    for world in (3, 1):
        owned = run_distributed(_load, world, shards, expected)
        assert sorted(e for o in owned for e in o) == list(range(E))
