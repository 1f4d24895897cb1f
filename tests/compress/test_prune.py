"""Expert pruning: the pruned model is the unpruned one with those experts masked out of routing."""

from __future__ import annotations

import copy

import pytest
import torch

import seekstack
from seekstack import Transformer
from seekstack.compress.heads import heads_to_keep
from seekstack.compress.prune import experts_to_keep, gate_mass, prune_experts, removed_count, rounding_notes
from seekstack.model.moe import MoE
from tests.conftest import micro_config

BATCHES = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]


def test_least_used_experts_go_the_same_number_per_group():
    mass = torch.tensor([5.0, 1.0, 7.0, 3.0, 0.5, 9.0, 2.0, 8.0])  # groups {0..3}, {4..7}
    assert experts_to_keep(mass, groups=2, fraction=0.25).tolist() == [0, 2, 3, 5, 6, 7]
    assert experts_to_keep(mass, groups=2, fraction=0.4).tolist() == [0, 2, 5, 7]  # 1.6 of 4 per group: 2 go


def test_greedy_routing_prunes_its_experts_as_one_group_whatever_n_group_says():
    """Greedy routing picks among all experts and its config's n_group goes unchecked: pruning split 8 experts into
    n_group=3 groups ("shape '[3, -1]' is invalid for input of size 8"); the router, pruning and its notes now read the
    groups the routing uses (`ModelConfig.routing_groups`), one for greedy."""
    config = micro_config(n_routed_experts=8, n_group=3, topk_group=1, topk_method="greedy")
    assert config.routing_groups == (1, 1)
    model = Transformer(config)
    mass = {name: torch.arange(8.0) for name, module in model.named_modules() if isinstance(module, MoE)}
    removed = prune_experts(model, mass, 0.5)
    assert set(map(tuple, removed.values())) == {(0, 1, 2, 3)} and model.config.n_routed_experts == 4


@pytest.mark.parametrize("dense", [dict(n_routed_experts=0), dict(first_k_dense_replace=4)], ids=["none", "unused"])
def test_a_model_without_moe_layers_has_none_pruned_and_none_refused(dense):
    """A dense model (n_routed_experts=0) ended any expert pruning, bench/prune.py's default --experts 0.25 or 0, in a
    StopIteration traceback: no count of experts kept was found to leave enough. One whose routed experts no block
    uses (first_k_dense_replace past the MTP block) was refused 0.5 ('leaves 1 of 2 in each of the 4 routing
    groups') by bench/prune.py, where `seekstack prune` said there is nothing for --experts to remove."""
    model = Transformer(micro_config(**dense))
    experts = model.config.n_routed_experts
    for fraction in (0.5, 0.25, 0.0):
        assert prune_experts(model, {}, fraction) == {} and model.config.n_routed_experts == experts


def test_a_dense_config_with_null_routing_groups_is_told_it_has_no_experts_to_prune():
    """A dense model's group fields go unchecked, null included (a V3 config.json may give "n_group": null): its
    routing groups read as the null, and pruning's notes failed dividing it (TypeError: unsupported operand type(s)
    for /: 'NoneType' and 'int') where they say there are no experts to remove."""
    config = micro_config(n_routed_experts=0, n_group=None, topk_group=None)
    assert config.routing_groups == (1, 1)
    assert rounding_notes(config, experts=0.5, heads=0.5) == [
        "the model has no MoE layers; nothing for --experts to remove"
    ]


def test_half_an_expert_or_a_head_rounds_down_whichever_the_neighbours():
    """With 2 experts a group, 0.25 removed none (Python's round takes 0.5 to 0) while 0.75 removed both (1.5 to 2,
    then refused as leaving none): half an expert or head now always rounds down, the fraction read as written in
    decimal (0.15 of 10 is 1.5, though the float 0.15 is a little less)."""
    cases = [(2, 0.25), (2, 0.75), (10, 0.25), (10, 0.15), (4, 0.4), (10, 0.35)]
    assert [removed_count(count, fraction) for count, fraction in cases] == [0, 1, 2, 1, 2, 3]
    mass = torch.tensor([5.0, 1.0, 0.5, 9.0])  # groups {0, 1}, {2, 3}
    assert experts_to_keep(mass, groups=2, fraction=0.75).tolist() == [0, 3]
    assert heads_to_keep(torch.tensor([3.0, 1.0]), fraction=0.75).tolist() == [0]


def test_gate_mass_sums_the_combine_weights_each_expert_received():
    """Normalised top-k weights sum to 1 per token: a layer's mass is its tokens (2 batches x 2 rows x 16 in the main
    layers, 15 a row in the MTP block, which has no input for the last), not its K = 2 routed slots per token."""
    mass = gate_mass(Transformer(micro_config()).eval(), BATCHES)
    totals = {name: round(total.sum().item(), 3) for name, total in mass.items()}
    assert totals == {"layers.1.mlp": 64, "layers.2.mlp": 64, "mtp.0.block.mlp": 60}


@pytest.mark.parametrize(
    "routing, fraction, message",
    [
        (dict(n_group=1, topk_group=1, num_experts_per_tok=4), 0.75,
         "leaves 2 of 8 per layer, too few for the model's routing (field 'num_experts_per_tok' has value 4: must "
         "be between 1 and n_routed_experts=2): prune 0.5 of them or less"),
        (dict(n_group=2, topk_group=1, num_experts_per_tok=1), 0.75,
         "leaves 1 of 4 in each of the 2 routing groups, too few for the model's routing (field 'n_group' has value 2: "
         "must be small enough that each group has >= 2 experts (noaux_tc sums a group's top-2)): prune 0.5 of them "
         "or less"),
        (dict(n_group=2, topk_group=1, num_experts_per_tok=3), 0.5,
         "leaves 2 of 4 in each of the 2 routing groups, too few for the model's routing (field "
         "'num_experts_per_tok' has value 3: must be <= topk_group x experts per group = 2): prune 0.25 of them or "
         "less"),
        (dict(n_group=2, topk_group=1, num_experts_per_tok=2), 1.0,
         "leaves 0 of 4 in each of the 2 routing groups, too few for the model's routing (none left): prune 0.5 of "
         "them or less"),
        (dict(n_group=1, topk_group=1, num_experts_per_tok=8), 0.25,
         "leaves 6 of 8 per layer, too few for the model's routing (field 'num_experts_per_tok' has value 8: must "
         "be between 1 and n_routed_experts=6): its routing takes every one of them, so none can go (--experts 0)"),
    ],
)  # fmt: skip
def test_pruning_refuses_to_leave_fewer_experts_than_routing_takes_and_names_the_largest_fraction(
    routing, fraction, message
):
    model = Transformer(micro_config(n_routed_experts=8, **routing)).eval()
    with pytest.raises(ValueError) as refused:
        prune_experts(model, gate_mass(model, BATCHES), fraction)
    assert str(refused.value) == f"pruning {fraction:g} of the routed experts {message}"
    assert model.config.n_routed_experts == 8 and model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8


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
