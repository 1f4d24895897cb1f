"""Head pruning: importance by the gradient of a head mask, and a pruned model equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import seekstack
from seekstack import Transformer
from seekstack.compress.heads import head_importance, head_masks, heads_to_keep, prune_heads
from seekstack.model.attention import ContiguousLatentCache
from tests.conftest import micro_config

BATCHES = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))


def test_a_head_that_writes_nothing_has_no_importance_and_goes_first():
    model = Transformer(micro_config()).eval()
    attention = model.layers[1].self_attn
    with torch.no_grad():
        attention.o_proj.weight.view(attention.o_proj.out_features, 4, -1)[:, 2] = 0  # head 2 writes nothing
    importance = head_importance(model, BATCHES)
    assert set(importance) == {f"layers.{i}.self_attn" for i in range(3)} | {"mtp.0.block.self_attn"}
    assert importance["layers.1.self_attn"][2] == 0
    assert (importance["layers.1.self_attn"][[0, 1, 3]] > 0).all()
    assert prune_heads(model, importance, fraction=0.25)["layers.1.self_attn"] == [2]
    assert all(p.grad is None for p in model.parameters())


def test_importance_sums_each_sequences_own_gradient_magnitude():
    """Michel et al. 2019: |dL/dxi_h| per sequence, then summed; gradients of opposite sign do not cancel."""
    model = Transformer(micro_config()).eval()
    together = head_importance(model, BATCHES[:1])
    apart = head_importance(model, [BATCHES[0][:1], BATCHES[0][1:]])
    for name in together:
        torch.testing.assert_close(together[name], apart[name], rtol=1e-4, atol=1e-7)


def test_heads_to_keep_drops_the_least_important():
    assert heads_to_keep(torch.tensor([0.3, 0.1, 0.9, 0.2]), 0.5).tolist() == [0, 2]
    with pytest.raises(ValueError, match="leaves none"):
        heads_to_keep(torch.tensor([0.3, 0.1]), 1.0)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_pruned_model_equals_the_model_with_pruned_heads_masked_out(tmp_path, q_lora_rank):
    model = Transformer(micro_config(q_lora_rank=q_lora_rank, n_group=2, topk_group=1)).eval()
    masked = copy.deepcopy(model)
    parameters = sum(p.numel() for p in model.parameters())
    removed = prune_heads(model, head_importance(model, BATCHES), fraction=0.5)
    assert all(len(ids) == 2 for ids in removed.values()) and model.config.num_attention_heads == 2
    assert sum(p.numel() for p in model.parameters()) < parameters
    masks = {name: torch.tensor([0.0 if h in ids else 1.0 for h in range(4)]) for name, ids in removed.items()}
    with torch.no_grad():
        unpruned = masked(IDS).logits
    with torch.no_grad(), head_masks(masked, masks):
        expected = masked(IDS).logits
        cache = ContiguousLatentCache(masked.config, 2, 12)  # the absorbed decode path, prompt then one token
        expected_decode = torch.cat(
            [masked(IDS[:, :8], cache=cache).logits, masked(IDS[:, 8:9], cache=cache).logits], 1
        )
    assert (unpruned - expected).abs().max() > 1e-3  # the removed heads mattered
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5)
        cache = ContiguousLatentCache(model.config, 2, 12)
        decode = torch.cat([model(IDS[:, :8], cache=cache).logits, model(IDS[:, 8:9], cache=cache).logits], 1)
        assert torch.allclose(decode, expected_decode, atol=1e-5)
    seekstack.save_pretrained(model, tmp_path)
    reloaded = seekstack.load_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert reloaded.config.num_attention_heads == 2 and torch.equal(reloaded(IDS).logits, model(IDS).logits)
    if q_lora_rank is not None:  # the config expresses a uniform head count: transformers loads it too
        reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.allclose(reference(IDS).logits, expected, atol=1e-4)
