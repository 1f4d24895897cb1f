"""Analytic accounting: the published DeepSeek figures, and agreement with real models and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from seekstack.accounting import (
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    main_parameters,
    mtp_checkpoint_parameters,
    mtp_parameters,
    training_flops_per_token,
)
from seekstack.checkpoint import checkpoint_tensors
from seekstack.config import preset
from seekstack.model.attention import ContiguousLatentCache
from seekstack.model.transformer import Transformer

# A spread of architectural switches on the tiny preset: q_proj without LoRA, biases, tied head,
# two MTP depths, MoE every other layer.
TINY_VARIANTS = {
    "tiny": {},
    "tiny-plain-q-bias-tied": {"q_lora_rank": None, "attention_bias": True, "tie_word_embeddings": True},
    "tiny-2-mtp-sparse-moe": {"num_nextn_predict_layers": 2, "moe_layer_freq": 2},
}

# The FLOP counter charges what runs; with v_head_dim below the query width, attention zero-pads V
# (for torch's fused kernel), which the model FLOPs rightly do not count. Equal widths need no pad.
# The counter sees inside the reference (math) attention only; torch's fused CPU kernel reports no FLOPs.
EQUAL_WIDTHS = {"v_head_dim": 48}


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """The routed experts' grouped matmul, which torch's counter has no formula for: every row of `a` meets one
    group's (K, M) matrix, 2 N K M FLOPs; the weight gradient (K, N) @ (N, M) split by group is the same count."""
    rows, inner = a_shape
    return 2 * rows * inner * b_shape[-1]


def build(name: str, meta: bool = False, **overrides) -> Transformer:
    if meta:
        with torch.device("meta"):
            return Transformer(preset(name, **overrides))
    return Transformer(preset(name, **overrides))


def counted(model: Transformer) -> tuple[int, int]:
    """(main, MTP) parameters of a real model, split by the `mtp.` prefix."""
    main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    mtp = sum(p.numel() for name, p in model.named_parameters() if name.startswith("mtp."))
    return main, mtp


def test_deepseek_v3_has_671b_total_and_37b_activated():
    params = main_parameters(preset("deepseek-v3"))
    assert params.total == pytest.approx(671e9, rel=1e-3)
    # 36.63B, which the report rounds to 37B; counting the input embedding too would give 37.55B.
    assert round(params.activated / 1e9) == 37
    assert params.activated == pytest.approx(37e9, rel=0.011)
    assert round((params.activated + params.embedding) / 1e9) != 37


def test_deepseek_v3_checkpoint_holds_685b_of_which_mtp_is_14b():
    config = preset("deepseek-v3")
    mtp = mtp_checkpoint_parameters(config)
    # 13.46B: the "14B" is 685B - 671B of the model card, each rounded.
    assert mtp == pytest.approx(14e9, rel=0.04)
    assert main_parameters(config).total + mtp == pytest.approx(685e9, rel=1e-3)


def test_deepseek_v2_lite_has_15_7b_total_and_2_4b_activated():
    params = main_parameters(preset("deepseek-v2-lite"))
    assert round(params.total / 1e8) == 157
    assert params.activated == pytest.approx(2.4e9, rel=0.025)  # 2.45B
    assert mtp_checkpoint_parameters(preset("deepseek-v2-lite")) == 0


@pytest.mark.parametrize("overrides", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_analytic_counts_equal_tiny_model_parameters(overrides):
    model = build("tiny", **overrides)
    assert counted(model) == (main_parameters(model.config).total, mtp_parameters(model.config).total)


@pytest.mark.parametrize(("name", "meta"), [("small", False), ("deepseek-v2-lite", True), ("deepseek-v3", True)])
def test_analytic_counts_equal_model_parameters(name, meta):
    model = build(name, meta=meta)
    assert counted(model) == (main_parameters(model.config).total, mtp_parameters(model.config).total)


@pytest.mark.parametrize(("name", "meta"), [("tiny", False), ("deepseek-v2-lite", True), ("deepseek-v3", True)])
def test_activated_counts_every_parameter_but_the_embedding_and_unselected_experts(name, meta):
    model = build(name, meta=meta)
    config = model.config
    share = (config.num_experts_per_tok or 0) / (config.n_routed_experts or 1)
    used = 0.0
    for param_name, param in model.named_parameters():
        if param_name.startswith("mtp.") or param_name == "embed_tokens.weight":
            continue
        used += param.numel() * (share if ".mlp.experts." in param_name else 1)
    assert main_parameters(config).activated == used


def test_mtp_checkpoint_count_equals_the_mtp_tensors_a_checkpoint_stores():
    model = build("tiny", num_nextn_predict_layers=2)
    first_mtp = model.config.num_hidden_layers
    mtp_keys = tuple(f"model.layers.{first_mtp + k}." for k in range(2))
    stored_main = stored_mtp = 0
    for key, tensor in checkpoint_tensors(model):
        if key.endswith("e_score_correction_bias"):  # a buffer, not a parameter
            continue
        if key.startswith(mtp_keys):
            stored_mtp += tensor.numel()
        else:
            stored_main += tensor.numel()
    assert stored_mtp == mtp_checkpoint_parameters(model.config)
    assert stored_main == main_parameters(model.config).total


@pytest.mark.parametrize("overrides", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_forward_flops_match_torch_flop_counter(overrides):
    model = build("tiny", **{**EQUAL_WIDTHS, **overrides})
    T = 24
    input_ids = torch.randint(model.config.vocab_size, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids)  # no labels: the MTP modules do not run
    # The counter charges SDPA for the full T x T scores, i.e. a context of T for every token.
    assert counter.get_total_flops() == T * forward_flops_per_token(model.config, T)


def test_training_flops_are_three_forwards_and_match_torch_flop_counter():
    config = preset("tiny", num_nextn_predict_layers=0, **EQUAL_WIDTHS)
    model = Transformer(config)
    T = 24
    input_ids = torch.randint(config.vocab_size, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids, labels=input_ids).loss.backward()
    assert training_flops_per_token(config, T) == 3 * forward_flops_per_token(config, T)
    assert counter.get_total_flops() == T * training_flops_per_token(config, T)


def test_training_flops_include_the_mtp_depths():
    model = build("tiny", num_nextn_predict_layers=2, **EQUAL_WIDTHS)
    T = 64
    input_ids = torch.randint(model.config.vocab_size, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids, labels=input_ids).loss.backward()
    # Depth k runs on T - k positions, the per-token formula on T: equal up to a few 1/T.
    assert counter.get_total_flops() == pytest.approx(T * training_flops_per_token(model.config, T), rel=0.03)


def test_deepseek_v3_forward_flops_are_twice_activated_plus_attention():
    config = preset("deepseek-v3")
    assert forward_flops_per_token(config, 0) == 2 * main_parameters(config).activated_matmul
    attention = forward_flops_per_token(config, 4096) - forward_flops_per_token(config, 0)
    assert attention == 61 * 2 * 128 * (192 + 128) * 4096


def test_latent_cache_bytes_are_latent_and_rope_width_times_layers_times_dtype_size():
    cache = kv_cache_bytes_per_token(preset("deepseek-v3"), torch.bfloat16)
    assert cache.latent == (512 + 64) * 61 * 2 == 70_272
    assert cache.mha == 128 * (128 + 64 + 128) * 61 * 2 == 4_997_120
    assert cache.ratio == pytest.approx(71.11, abs=0.01)
    assert kv_cache_bytes_per_token(preset("tiny"), torch.float32).latent == (32 + 16) * 4 * 4


def test_latent_cache_bytes_equal_what_the_contiguous_cache_allocates_per_token():
    config = preset("small", num_nextn_predict_layers=0)  # the analytic figure counts the main layers only
    for dtype in (torch.bfloat16, torch.float32):
        allocated = ContiguousLatentCache(config, batch_size=1, max_length=1, dtype=dtype).bytes_per_token()
        assert kv_cache_bytes_per_token(config, dtype).latent == allocated
