"""torch.compile through heddle's Ulysses on a transformers Llama: the custom ops of
heddle.dist.custom_ops let Dynamo trace the all-to-alls, so SP=2 compiles into no more graphs than
the same model without SP, and the compiled run (aot_eager) equals eager fp64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F


def _compile_counts(rank, world):
    import transformers
    from torch._dynamo.testing import CompileCounterWithBackend

    from heddle.dist import CommLedger
    from heddle.sequence import parallelize, shard_for_causal_lm, shift_causal_labels

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                      num_hidden_layers=1, intermediate_size=128, vocab_size=128, use_cache=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))

    def step(model, input_ids, position_ids, labels):
        logits = model(input_ids=input_ids, position_ids=position_ids).logits
        loss = F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), reduction="sum")
        loss.backward()
        return loss.detach()

    plain = copy.deepcopy(base)
    counter_plain = CompileCounterWithBackend("aot_eager")
    pos = torch.arange(64).unsqueeze(0)
    step(torch.compile(plain, backend=counter_plain), ids, pos, shift_causal_labels(ids, pos.expand(2, -1)))
    compiled, eager = copy.deepcopy(base), copy.deepcopy(base)
    parallelize(compiled, None)
    parallelize(eager, None)
    batch = shard_for_causal_lm(ids, None)
    counter_sp = CompileCounterWithBackend("aot_eager")
    with CommLedger() as ledger:
        loss = step(torch.compile(compiled, backend=counter_sp), batch.input_ids, batch.position_ids, batch.labels)
    loss_eager = step(eager, batch.input_ids, batch.position_ids, batch.labels)
    diff = max([float((loss - loss_eager).abs())] + [float((a.grad - b.grad).abs().max())
                                                      for a, b in zip(compiled.parameters(), eager.parameters())])
    return {"plain": counter_plain.frame_count, "sp": counter_sp.frame_count, "diff": diff,
            "all_to_alls": ledger.count("all_to_all")}


@pytest.mark.timeout(900)
def test_hf_llama_compiles_under_sp_into_no_more_graphs():
    from tests.conftest import run_distributed
    for r in run_distributed(_compile_counts, 2, timeout=800):
        assert r["sp"] <= r["plain"], r
        assert r["diff"] < 1e-10, r
        assert r["all_to_alls"] == 4, r  # 1 layer: q/k/v and output forward, their adjoints backward
