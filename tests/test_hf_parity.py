"""Parity with Hugging Face transformers: the same checkpoint gives the same logits in both, both ways.

Every weight of the reference is randomised (norm gains and the routing bias included), so a weight
read into the wrong place, or a switch ignored, changes the logits. Each case that turns on one
feature also checks that turning the feature off moves the logits far beyond the tolerance, so the
parity assertion cannot pass by accident.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

import seekstack
from seekstack import ModelConfig, Transformer

ATOL = 1e-4  # float32 throughout; observed differences are ~1e-7
ABLATION_MIN_DIFF = 100 * ATOL  # what switching the feature under test off must change the logits by

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=64, routed_scaling_factor=1.0,
)  # fmt: skip
SEQ_LEN = 24
ORIGINAL_CONTEXT = 16  # YaRN cases run SEQ_LEN_LONG tokens, three times the original context
SEQ_LEN_LONG = 48
YARN_4X = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL_CONTEXT)
YARN_V3 = dict(**YARN_4X, mscale=1.0, mscale_all_dim=1.0)
YARN_V2_LITE = dict(**YARN_4X, mscale=0.707, mscale_all_dim=0.707)
YARN_UNEQUAL_MSCALE = dict(
    rope_type="yarn", factor=8.0, original_max_position_embeddings=ORIGINAL_CONTEXT, mscale=1.0, mscale_all_dim=0.8,
    beta_fast=16, beta_slow=2,
)  # fmt: skip
YARN_UNEQUAL_MSCALE_CONTEXT = ORIGINAL_CONTEXT * 8  # max_position_embeddings consistent with factor 8
YARN_NO_MSCALE = YARN_4X
# Position interpolation; transformers scales the softmax by mscale_all_dim under any rope type that gives it
LINEAR_4X_MSCALE = dict(rope_type="linear", factor=4.0, mscale_all_dim=1.0)


@dataclass
class Case:
    """A transformers configuration, and what to switch off in ours to show the case tests something."""

    name: str
    version: int  # 2 or 3
    overrides: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None  # ModelConfig changes that must move the logits
    seq_len: int = SEQ_LEN
    legacy_rope_scaling: bool = False  # rewrite config.json with the 4.x `rope_scaling` dict
    max_shard_size: str | None = None


CASES = [
    Case("v3-q-lora-grouped", 3, dict(q_lora_rank=16, n_group=2, topk_group=1), ablation=dict(topk_group=2)),
    Case("v3-no-q-lora-ungrouped", 3, dict(q_lora_rank=None, n_group=1, topk_group=1)),
    Case(
        "v3-group-limited-4-of-2",
        3,
        dict(q_lora_rank=16, n_group=4, topk_group=2, num_experts_per_tok=3),
        ablation=dict(topk_group=4),
    ),
    Case(
        "v3-rotate-half",
        3,
        dict(q_lora_rank=16, n_group=2, topk_group=1, rope_interleave=False),
        ablation=dict(rope_interleave=True),
    ),
    Case(
        "v3-interleaved",
        3,
        dict(q_lora_rank=16, n_group=2, topk_group=1, rope_interleave=True),
        ablation=dict(rope_interleave=False),
    ),
    Case(
        "v3-yarn",
        3,
        dict(q_lora_rank=16, n_group=2, topk_group=1, rope_parameters=YARN_V3),
        ablation=dict(rope_scaling=None),
        seq_len=SEQ_LEN_LONG,
    ),
    Case(
        "v3-yarn-legacy-rope-scaling",
        3,
        dict(q_lora_rank=None, n_group=2, topk_group=1, rope_parameters=YARN_V2_LITE),
        ablation=dict(rope_scaling=None),
        seq_len=SEQ_LEN_LONG,
        legacy_rope_scaling=True,
    ),
    Case(
        "v3-linear-mscale-rotate-half",
        3,
        dict(q_lora_rank=16, n_group=2, topk_group=1, rope_interleave=False, rope_parameters=LINEAR_4X_MSCALE),
        ablation=dict(rope_scaling=None),
        seq_len=SEQ_LEN_LONG,
    ),
    Case(
        "v3-yarn-unequal-mscale-rotate-half",
        3,
        dict(
            q_lora_rank=16,
            n_group=2,
            topk_group=1,
            rope_interleave=False,
            rope_parameters=YARN_UNEQUAL_MSCALE,
            max_position_embeddings=YARN_UNEQUAL_MSCALE_CONTEXT,
        ),
        ablation=dict(rope_scaling=YARN_V3),
        seq_len=SEQ_LEN_LONG,
    ),
    Case(
        "v3-dense-prefix-2-shared-experts-2",
        3,
        dict(
            q_lora_rank=16,
            n_group=2,
            topk_group=1,
            num_hidden_layers=3,
            first_k_dense_replace=2,
            n_shared_experts=2,
            routed_scaling_factor=2.5,
        ),
        ablation=dict(norm_topk_prob=False),
    ),
    Case("v3-attention-bias", 3, dict(q_lora_rank=16, n_group=2, topk_group=1, attention_bias=True)),
    Case(  # the latent norms (q_a_layernorm, kv_a_layernorm) keep eps 1e-6 whatever rms_norm_eps says
        "v3-rms-norm-eps-not-1e-6",
        3,
        dict(q_lora_rank=16, n_group=2, topk_group=1, rms_norm_eps=0.5),
        ablation=dict(rms_norm_eps=1e-6),
    ),
    Case("v3-tied-embeddings", 3, dict(q_lora_rank=16, n_group=2, topk_group=1, tie_word_embeddings=True)),
    Case("v3-sharded-by-transformers", 3, dict(q_lora_rank=16, n_group=2, topk_group=1), max_shard_size="20KB"),
    Case("v2-greedy-no-q-lora", 2, dict(q_lora_rank=None, topk_method="greedy", n_shared_experts=2)),
    Case("v2-greedy-q-lora", 2, dict(q_lora_rank=16, topk_method="greedy", routed_scaling_factor=16.0)),
    Case(
        "v2-rms-norm-eps-not-1e-6",
        2,
        dict(q_lora_rank=16, topk_method="greedy", rms_norm_eps=0.05),
        ablation=dict(rms_norm_eps=1e-6),
    ),
    Case(
        "v2-group-limited-greedy",
        2,
        dict(q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3),
        ablation=dict(topk_method="greedy"),
    ),
    Case(
        "v2-yarn-v2-lite-mscale",
        2,
        dict(q_lora_rank=None, topk_method="greedy", rope_parameters=YARN_V2_LITE),
        ablation=dict(rope_scaling=None),
        seq_len=SEQ_LEN_LONG,
    ),
    Case(
        "v2-yarn-unequal-mscale-legacy",
        2,
        dict(
            q_lora_rank=None,
            topk_method="greedy",
            rope_parameters=YARN_UNEQUAL_MSCALE,
            max_position_embeddings=YARN_UNEQUAL_MSCALE_CONTEXT,
        ),
        ablation=dict(rope_scaling=YARN_V2_LITE),
        seq_len=SEQ_LEN_LONG,
        legacy_rope_scaling=True,
    ),
    Case(
        "v2-yarn-without-mscale",
        2,
        dict(q_lora_rank=16, topk_method="greedy", rope_parameters=YARN_NO_MSCALE),
        ablation=dict(rope_scaling=None),
        seq_len=SEQ_LEN_LONG,
    ),
]


@dataclass
class Pair:
    reference: torch.nn.Module  # the transformers model
    ours: Transformer  # loaded from the reference's save_pretrained directory
    input_ids: torch.Tensor
    reference_logits: torch.Tensor
    directory: Path


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and routing bias to random values: norms near 1, the rest N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("e_score_correction_bias"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) - 0.5)
        elif "norm" in name:
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        elif tensor.is_floating_point() and "inv_freq" not in name:
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def to_legacy_rope_scaling(config_path: Path) -> None:
    """Rewrite config.json as transformers 4.x and the DeepSeek releases write it: `rope_theta` + `rope_scaling`."""
    raw = json.loads(config_path.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config_path.write_text(json.dumps(raw))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ablated(model: Transformer, **changes: Any) -> Transformer:
    """The same weights under a config with `changes`."""
    other = Transformer(model.config.replace(**changes)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Build (once per case) a random transformers model, save it, load it with seekstack."""
    built: dict[str, Pair] = {}

    def build(case: Case) -> Pair:
        if case.name in built:
            return built[case.name]
        seed = CASES.index(case)
        torch.manual_seed(seed)
        config_class, model_class = (
            (DeepseekV3Config, DeepseekV3ForCausalLM)
            if case.version == 3
            else (DeepseekV2Config, DeepseekV2ForCausalLM)
        )
        # transformers writes rope_theta into the rope dict it is given: hand it a copy
        reference = model_class(config_class(**copy.deepcopy({**TINY, **case.overrides}))).eval()
        randomise(reference, seed)
        directory = tmp_path_factory.mktemp(case.name)
        save_kwargs = {"max_shard_size": case.max_shard_size} if case.max_shard_size else {}
        reference.save_pretrained(directory, **save_kwargs)
        if case.legacy_rope_scaling:
            to_legacy_rope_scaling(directory / "config.json")
        ours = seekstack.load_pretrained(directory).eval()
        input_ids = torch.randint(
            0, TINY["vocab_size"], (2, case.seq_len), generator=torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            reference_logits = reference(input_ids).logits
        built[case.name] = Pair(reference, ours, input_ids, reference_logits, directory)
        return built[case.name]

    return build


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_logits_match_transformers_for_its_checkpoint(hf_pair, case):
    pair = hf_pair(case)
    with torch.no_grad():
        logits = pair.ours(pair.input_ids).logits
    assert logits.shape == pair.reference_logits.shape
    assert pair.reference_logits.std().item() > 0.1  # the reference is not degenerate
    assert max_diff(logits, pair.reference_logits) < ATOL


ABLATED = [c for c in CASES if c.ablation]


@pytest.mark.parametrize("case", ABLATED, ids=[c.name for c in ABLATED])
def test_switching_the_feature_off_breaks_parity(hf_pair, case):
    """The parity above is not vacuous: without its feature, each case's logits differ from the reference."""
    pair = hf_pair(case)
    with torch.no_grad():
        logits = ablated(pair.ours, **case.ablation)(pair.input_ids).logits
    assert max_diff(logits, pair.reference_logits) > ABLATION_MIN_DIFF


def test_zeroing_the_correction_bias_breaks_parity(hf_pair):
    pair = hf_pair(CASES[0])
    biases = [b for name, b in pair.ours.named_buffers() if name.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().min() > 0 for b in biases)
    model = ablated(pair.ours)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.zero_()
    with torch.no_grad():
        assert max_diff(model(pair.input_ids).logits, pair.reference_logits) > ABLATION_MIN_DIFF


def test_yarn_cases_run_beyond_the_original_context(hf_pair):
    for case in CASES:
        if case.overrides.get("rope_parameters", {}).get("rope_type") == "yarn":
            pair = hf_pair(case)
            assert pair.input_ids.shape[1] > case.overrides["rope_parameters"]["original_max_position_embeddings"]
            assert pair.ours.config.rope_type == "yarn"


def test_legacy_rope_scaling_reads_like_rope_parameters(hf_pair):
    legacy = hf_pair(next(c for c in CASES if c.legacy_rope_scaling))
    raw = json.loads((legacy.directory / "config.json").read_text())
    assert "rope_parameters" not in raw and raw["rope_scaling"]["type"] == "yarn"
    assert legacy.ours.config.rope_scaling == YARN_V2_LITE


def test_config_with_disagreeing_rope_scaling_and_rope_parameters_is_read_as_transformers_reads_it(hf_pair, tmp_path):
    pair = hf_pair(CASES[0])
    for file in pair.directory.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "default"
    raw["rope_scaling"] = {"type": "yarn", **copy.deepcopy(YARN_V3)}  # e.g. a hand edit of the legacy field
    (tmp_path / "config.json").write_text(json.dumps(raw))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = seekstack.load_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, SEQ_LEN_LONG))
    with torch.no_grad():
        assert max_diff(ours(input_ids).logits, reference(input_ids).logits) < ATOL


def test_transformers_sharded_checkpoint_is_read_through_its_index(hf_pair):
    pair = hf_pair(next(c for c in CASES if c.max_shard_size))
    assert (pair.directory / "model.safetensors.index.json").exists()
    assert len(list(pair.directory.glob("*.safetensors"))) > 1


# ------------------------------------------------------------------ our checkpoints in transformers
OURS = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
    max_position_embeddings=64, routed_scaling_factor=2.5,
)  # fmt: skip
V2_OURS = dict(model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", norm_topk_prob=False)
OUR_CASES = {
    "v3-no-mtp": dict(num_nextn_predict_layers=0),
    "v3-one-mtp": dict(num_nextn_predict_layers=1),
    "v3-two-mtp-yarn-rotate-half": dict(num_nextn_predict_layers=2, rope_interleave=False, rope_scaling=YARN_V3),
    "v2-greedy": dict(**V2_OURS, q_lora_rank=None, num_nextn_predict_layers=0),
    "v2-group-limited-yarn": dict(
        **{**V2_OURS, "topk_method": "group_limited_greedy"},
        n_group=4,
        topk_group=2,
        rope_scaling=YARN_V2_LITE,
        num_nextn_predict_layers=0,
    ),
}


@pytest.mark.parametrize("overrides", OUR_CASES.values(), ids=OUR_CASES.keys())
def test_transformers_loads_our_checkpoint_with_the_same_logits(tmp_path, overrides):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, **copy.deepcopy(overrides)})
    ours = Transformer(config).eval()
    randomise(ours, seed=1)
    seekstack.save_pretrained(ours, tmp_path)

    reference, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reference.eval()
    input_ids = torch.randint(0, config.vocab_size, (2, SEQ_LEN_LONG))
    with torch.no_grad():
        expected, got = ours(input_ids).logits, reference(input_ids).logits

    assert type(reference).__name__ == config.to_dict()["architectures"][0]
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    # transformers has no MTP; it skips only `model.layers.61.*` silently and reports ours as unexpected.
    mtp_layers = {str(config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)}
    assert {re.match(r"model\.layers\.(\d+)\.", key)[1] for key in info["unexpected_keys"]} == mtp_layers
    assert max_diff(got, expected) < ATOL


def test_a_release_saved_again_loads_in_transformers_with_trust_remote_code(tmp_path):
    """DeepSeek's releases name their remote code in config.json (`auto_map`: configuration_deepseek.py, ...), which
    seekstack kept on saving, without the code: `from_pretrained(..., trust_remote_code=True)`, as DeepSeek's model
    cards and `vllm serve --trust-remote-code` load, failed with OSError "does not appear to have a file named
    configuration_deepseek.py". Saved again, the model loads in transformers' own class with the same logits."""
    from tests.interop.release import deepseek_v3_release

    ours = seekstack.load_pretrained(deepseek_v3_release(tmp_path / "release"), dtype=torch.float32).eval()
    seekstack.save_pretrained(ours, tmp_path / "saved")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.float32)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(input_ids).logits, reference.eval()(input_ids).logits
    assert type(reference) is DeepseekV3ForCausalLM and max_diff(got, expected) < ATOL


@pytest.mark.parametrize("overrides", [OUR_CASES["v3-one-mtp"], OUR_CASES["v2-greedy"]], ids=["v3", "v2"])
def test_transformers_loads_our_stacked_experts_layout_with_the_same_logits(tmp_path, overrides):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, **copy.deepcopy(overrides)})
    ours = Transformer(config).eval()
    randomise(ours, seed=2)
    seekstack.save_pretrained(ours, tmp_path, stacked_experts=True)  # model.layers.{i}.mlp.experts.gate_up_proj

    reference, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    input_ids = torch.randint(0, config.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        expected, got = ours(input_ids).logits, reference.eval()(input_ids).logits
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    mtp_layers = {str(config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)}
    assert {re.match(r"model\.layers\.(\d+)\.", key)[1] for key in info["unexpected_keys"]} == mtp_layers
    assert max_diff(got, expected) < ATOL


NO_EXPERTS = {  # what seekstack reads as no shared / no routed expert; transformers' configs refuse null for both
    "no-shared-experts": dict(n_shared_experts=None),
    "dense-none": dict(n_routed_experts=None),  # transformers makes layers from first_k_dense_replace on MoE
    "dense-zero": dict(n_routed_experts=0),
}


@pytest.mark.parametrize("none", NO_EXPERTS.values(), ids=NO_EXPERTS.keys())
@pytest.mark.parametrize("overrides", [OUR_CASES["v3-no-mtp"], OUR_CASES["v2-greedy"]], ids=["v3", "v2"])
def test_transformers_loads_our_checkpoint_without_shared_or_routed_experts_with_the_same_logits(
    tmp_path, overrides, none
):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, **overrides, **none})
    ours = Transformer(config).eval()
    randomise(ours, seed=3)
    seekstack.save_pretrained(ours, tmp_path)

    reference, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    input_ids = torch.randint(0, config.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        expected, got = ours(input_ids).logits, reference.eval()(input_ids).logits
    assert all(".shared_experts." in key for key in info["missing_keys"])  # a zero-width shared FFN: no weights
    assert max_diff(got, expected) < ATOL
    with torch.no_grad():
        assert max_diff(seekstack.load_pretrained(tmp_path)(input_ids).logits, expected) == 0


def test_a_transformers_checkpoint_of_no_shared_expert_loads_with_no_key_left_unused(tmp_path):
    """transformers builds `n_shared_experts: 0` as a shared FFN of width 0 and saves its empty weights; loading warned
    "3 checkpoint keys were not used, e.g. ['model.layers.1.mlp.shared_experts.down_proj.weight', ...]", as of a
    damaged checkpoint, for tensors holding nothing."""
    config = DeepseekV3Config(**{**TINY, "q_lora_rank": 16, "n_group": 2, "topk_group": 1, "n_shared_experts": 0})
    reference = DeepseekV3ForCausalLM(config).eval()
    randomise(reference, seed=4)
    reference.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = seekstack.load_pretrained(tmp_path)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_diff(ours(input_ids).logits, reference(input_ids).logits) < ATOL


def test_transformers_reports_every_mtp_layer_key_and_nothing_else(tmp_path):
    config = ModelConfig.from_dict({"model_type": "deepseek_v3", **OURS, "num_nextn_predict_layers": 1})
    seekstack.save_pretrained(Transformer(config), tmp_path)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    mtp = f"model.layers.{config.num_hidden_layers}"
    expected = {f"{mtp}.{name}.weight" for name in ("enorm", "hnorm", "eh_proj", "embed_tokens", "shared_head.norm")}
    expected |= {f"{mtp}.shared_head.head.weight", f"{mtp}.mlp.gate.e_score_correction_bias"}
    assert expected <= info["unexpected_keys"]
    assert all(key.startswith(mtp + ".") for key in info["unexpected_keys"])


def test_left_padded_logits_match_transformers_under_the_same_attention_mask(hf_pair):
    pair = hf_pair(CASES[0])
    input_ids = pair.input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :9] = 0  # the second row left-padded by 9
    with torch.no_grad():
        expected = pair.reference(input_ids, attention_mask=attention_mask).logits
        got = pair.ours(input_ids, attention_mask=attention_mask).logits
    tokens = attention_mask.bool()
    assert max_diff(got[tokens], expected[tokens]) < ATOL
    assert max_diff(got[1, 9:], pair.reference_logits[1, 9:]) > ABLATION_MIN_DIFF  # the mask changed the logits
