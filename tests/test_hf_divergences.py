"""Config fields transformers ignores: seekstack honours them and says so when such a checkpoint is loaded or saved.

transformers' DeepseekV3 always routes with sigmoid scores and `noaux_tc`, its DeepseekV2 with softmax scores and no
renormalisation, and both make every layer from `first_k_dense_replace` on MoE whatever `moe_layer_freq` says.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import seekstack
from seekstack import ModelConfig, Transformer
from seekstack.checkpoint import CheckpointError
from seekstack.config import ConfigError
from tests.test_hf_parity import ATOL, OURS, SEQ_LEN, TINY, V2_OURS, max_diff, randomise

V3_ROUTING = dict(q_lora_rank=16, n_group=2, topk_group=1)
V2_ROUTING = dict(q_lora_rank=16, topk_method="greedy")
DIVERGENT = {  # transformers config -> the field it ignores there
    "v3-softmax": (3, dict(V3_ROUTING, scoring_func="softmax"), "scoring_func"),
    "v3-greedy": (3, dict(V3_ROUTING, topk_method="greedy"), "topk_method"),
    "v2-sigmoid": (2, dict(V2_ROUTING, scoring_func="sigmoid"), "scoring_func"),
    "v2-norm-topk-prob": (2, dict(V2_ROUTING, norm_topk_prob=True), "norm_topk_prob"),
    "v2-rotate-half": (2, dict(V2_ROUTING, rope_interleave=False), "rope_interleave"),
}
# 4 layers, the first dense: DeepSeek's V2 code (and seekstack) make layers 1 and 3 dense, transformers none of them.
MOE_EVERY_OTHER_LAYER = dict(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)


def save_transformers_model(version: int, overrides: dict, directory) -> torch.nn.Module:
    """A random transformers DeepseekV2/V3 model with `overrides`, saved to `directory`."""
    torch.manual_seed(0)
    config_class, model_class = (
        (DeepseekV3Config, DeepseekV3ForCausalLM) if version == 3 else (DeepseekV2Config, DeepseekV2ForCausalLM)
    )
    reference = model_class(config_class(**copy.deepcopy({**TINY, **overrides}))).eval()
    randomise(reference, seed=0)
    reference.save_pretrained(directory)
    return reference


def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", DIVERGENT.values(), ids=DIVERGENT.keys())
def test_loading_a_checkpoint_transformers_computes_differently_warns_naming_the_field(tmp_path, case):
    version, overrides, ignored = case
    reference = save_transformers_model(version, overrides, tmp_path)
    with pytest.warns(UserWarning, match=f"transformers computes this checkpoint differently.*{ignored}="):
        ours = seekstack.load_pretrained(tmp_path).eval()
    assert list(ours.config.transformers_divergences()) == [ignored]
    with torch.no_grad():  # the warning is true: seekstack follows the field, transformers does not
        assert max_diff(ours(input_ids()).logits, reference(input_ids()).logits) > 100 * ATOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(scoring_func="softmax", topk_method="greedy"),
        dict(model_type="deepseek_v2", scoring_func="sigmoid"),
        dict(**V2_OURS, rope_interleave=False, n_routed_experts=None),  # dense too: attention alone diverges
    ],
    ids=["v3-softmax-greedy", "v2-sigmoid", "v2-dense-rotate-half"],
)
def test_saving_a_checkpoint_transformers_computes_differently_warns_naming_the_fields(tmp_path, overrides):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, **overrides})
    with pytest.warns(UserWarning, match="transformers computes this checkpoint differently") as caught:
        seekstack.save_pretrained(Transformer(config), tmp_path)
    message, divergent = str(caught[0].message), config.transformers_divergences()
    assert divergent and all(f"{name}=" in message for name in divergent)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(model_type="deepseek_v3"),
        V2_OURS,
        {**V2_OURS, "topk_method": "group_limited_greedy"},
    ],
    ids=["v3", "v2-greedy", "v2-group-limited"],
)
def test_a_config_transformers_computes_alike_saves_and_loads_without_warning(tmp_path, overrides):
    config = ModelConfig.from_dict({**OURS, **overrides})
    assert config.transformers_divergences() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seekstack.save_pretrained(Transformer(config), tmp_path)
        seekstack.load_pretrained(tmp_path)


@pytest.mark.parametrize("version", [3, 2])
def test_transformers_checkpoint_with_moe_layer_freq_loads_in_its_layout_with_its_logits(tmp_path, version):
    routing = V3_ROUTING if version == 3 else V2_ROUTING
    reference = save_transformers_model(version, {**routing, **MOE_EVERY_OTHER_LAYER}, tmp_path)
    with pytest.warns(UserWarning, match="moe_layer_freq is 2, but the weights hold routed experts in every layer"):
        ours = seekstack.load_pretrained(tmp_path).eval()
    assert ours.config.moe_layer_freq == 1
    assert all(ours.config.is_moe_layer(i) for i in range(1, 4))
    with torch.no_grad():
        assert max_diff(ours(input_ids()).logits, reference(input_ids()).logits) < ATOL


def test_our_checkpoint_with_moe_layer_freq_keeps_its_dense_layers_and_warns_transformers_ignores_it(tmp_path):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, **MOE_EVERY_OTHER_LAYER})
    model = Transformer(config).eval()
    randomise(model, seed=0)
    with pytest.warns(UserWarning, match=r"moe_layer_freq=2: transformers ignores it .* keeps layers \[1, 3\] dense"):
        seekstack.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="moe_layer_freq=2: transformers ignores it"):
        loaded = seekstack.load_pretrained(tmp_path).eval()
    assert loaded.config.moe_layer_freq == 2
    with torch.no_grad():
        assert max_diff(loaded(input_ids()).logits, model(input_ids()).logits) == 0


def test_weights_in_neither_moe_layout_are_refused_naming_the_layers(tmp_path):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, **MOE_EVERY_OTHER_LAYER})
    with pytest.warns(UserWarning):
        seekstack.save_pretrained(Transformer(config), tmp_path)  # routed experts in layer 2 only
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "moe_layer_freq": 3}))  # would make 1, 2 dense
    with pytest.raises(CheckpointError, match=r"routed experts in layers \[2\].*all of \[1, 2, 3\] MoE"):
        seekstack.load_pretrained(tmp_path)


def test_a_deepseek_v2_checkpoint_with_mlp_bias_is_refused_naming_the_field_not_run_without_its_biases(tmp_path):
    save_transformers_model(2, {**V2_ROUTING, "mlp_bias": True}, tmp_path)  # biases on the dense and shared FFNs
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: field 'mlp_bias' must be false"):
        seekstack.load_pretrained(tmp_path)


def test_mlp_bias_in_a_deepseek_v3_config_is_kept_as_transformers_ignores_it_there(tmp_path):
    reference = save_transformers_model(3, V3_ROUTING, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "mlp_bias": True}))
    ours = seekstack.load_pretrained(tmp_path).eval()
    assert ours.config.extra["mlp_bias"] is True
    with torch.no_grad():
        assert max_diff(ours(input_ids()).logits, reference(input_ids()).logits) < ATOL
