"""Expert pruning: the pruned model is the unpruned one with those experts masked out of routing."""

from __future__ import annotations

import copy

import pytest
import torch

import seekstack
from seekstack import Transformer
from seekstack.compress.prune import experts_to_keep, gate_mass, prune_experts
from tests.conftest import micro_config

BATCHES = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def test_least_used_experts_go_the_same_number_per_group():
    mass = torch.tensor([5.0, 1.0, 7.0, 3.0, 0.5, 9.0, 2.0, 8.0])  # groups {0..3}, {4..7}
    assert experts_to_keep(mass, groups=2, fraction=0.25).tolist() == [0, 2, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="group routing needs 2"):
        experts_to_keep(mass, groups=2, fraction=0.75)


def test_pruned_model_equals_the_model_with_pruned_experts_masked_out(tmp_path):
    model = Transformer(micro_config(n_routed_experts=8, n_group=2, topk_group=1)).eval()
    with torch.no_grad():
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensor.uniform_(-0.1, 0.1)
    masked = copy.deepcopy(model)
    removed = prune_experts(model, gate_mass(model, BATCHES), fraction=0.25)
    assert all(len(ids) == 2 for ids in removed.values()) and model.config.n_routed_experts == 6
    with torch.no_grad():
        for name, ids in removed.items():
            masked.get_submodule(name).gate.e_score_correction_bias[ids] = float("-inf")
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
        assert torch.allclose(model(ids).logits, masked(ids).logits, atol=1e-5)
    seekstack.save_pretrained(model, tmp_path)
    reloaded = seekstack.load_pretrained(tmp_path)
    assert reloaded.config.n_routed_experts == 6
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
