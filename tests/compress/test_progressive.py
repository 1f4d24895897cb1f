"""Progressive quantization: the gate stops at the last stage within the tolerance and reports every stage."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from seekstack import Transformer
from seekstack.compress.linear import Int4Weight, Int8Weight, QuantizedLinear
from seekstack.compress.progressive import progressive
from seekstack.compress.quality import Quality, log_probs, measure
from seekstack.compress.quantize import QuantConfig, quantize_model, stored_bytes
from seekstack.schema import ConfigError
from tests.conftest import micro_config

SHAPES = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, kv_lora_rank=24)


def stage_of(model: torch.nn.Module) -> str:
    weights = [m.qweight for m in model.modules() if isinstance(m, QuantizedLinear)]
    if any(isinstance(w, Int4Weight) for w in weights):
        return "int4"
    if any(isinstance(w, Int8Weight) for w in weights):
        return "int8"
    return "bfloat16" if model.embed_tokens.weight.dtype == torch.bfloat16 else "float32"


def scripted(bits_per_byte: dict[str, float]):
    """An evaluation that gives each stage a chosen bits/byte: the gate's decisions alone are under test."""
    return lambda model: Quality(bits_per_byte[stage_of(model)], 0.0, 1.0)


def test_gate_stops_at_the_last_stage_within_tolerance():
    original = Transformer(micro_config(**SHAPES)).eval()
    bpb = {"float32": 2.0, "bfloat16": 2.001, "int8": 2.01, "int4": 2.2}  # +0.05%, +0.5%, +10%
    chosen, name, report = progressive(original, scripted(bpb), QuantConfig(), max_bpb_increase=0.01)
    assert [(s.name, s.passed) for s in report] == [
        ("float32", True),
        ("bfloat16", True),
        ("int8", True),
        ("int4", False),
    ]
    assert stage_of(chosen) == "int8" and name == "int8"
    assert abs(report[2].bpb_increase - 0.005) < 1e-9


def test_gate_stops_at_the_first_failure_even_if_a_later_stage_would_pass():
    original = Transformer(micro_config(**SHAPES)).eval()
    bpb = {"float32": 2.0, "bfloat16": 2.1, "int8": 2.0, "int4": 2.0}
    chosen, name, report = progressive(original, scripted(bpb), QuantConfig(), max_bpb_increase=0.01)
    assert [s.name for s in report] == ["float32", "bfloat16"] and not report[1].passed
    assert stage_of(chosen) == "float32" and name == "float32"


def test_a_bfloat16_original_starts_at_bfloat16_and_stays_bfloat16_when_nothing_smaller_passes():
    """A float32 stage of bfloat16 weights would double their bytes and add nothing."""
    original = Transformer(micro_config(**SHAPES)).eval().to(torch.bfloat16)
    bpb = {"float32": 2.0, "bfloat16": 2.0, "int8": 2.5, "int4": 2.5}
    chosen, name, report = progressive(original, scripted(bpb), QuantConfig(), max_bpb_increase=0.01)
    assert [(s.name, s.passed) for s in report] == [("bfloat16", True), ("int8", False)]
    assert stage_of(chosen) == "bfloat16" and name == "bfloat16"


def test_bits_per_byte_count_the_bytes_the_scored_tokens_spell():
    """Each target counts its own token's bytes (was: the val split's mean bytes per token for every target), and a
    target of 0 bytes (a special token) no loss, as nanochat's evaluate_bpb (its loss was charged to the text)."""
    model = Transformer(micro_config(**SHAPES)).eval()
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    byte_lengths = torch.arange(128) % 4  # 0 to 3 bytes, as special tokens, ASCII and CJK pieces
    with torch.no_grad():
        logits = model(batch).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    nats = losses[batch[:, 1:] % 4 > 0].sum().item()
    spelled = (batch[:, 1:] % 4).sum().item()
    quality = measure(model, [log_probs(model, batch)], [batch], byte_lengths)
    assert quality.bits_per_byte == pytest.approx(nats / (math.log(2) * spelled), rel=1e-5)


def test_kl_and_top1_agreement_are_those_computed_directly_from_both_models_logits():
    """The gate's KL(original || quantized) and top-1 agreement, against the same figures computed from both models'
    logits over every predicted position (special tokens' positions too: only bits per byte leaves them out)."""
    original = Transformer(micro_config(**SHAPES)).eval()
    quantized = copy.deepcopy(original)
    quantize_model(quantized, QuantConfig(scheme="int4"))
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    quality = measure(quantized, [log_probs(original, b) for b in batches], batches, torch.arange(128) % 4)
    with torch.no_grad():  # in float64: float32's rounding alone moves a KL this small by ~1e-4 of itself
        log_p = torch.cat([original(b).logits[:, :-1].flatten(0, 1) for b in batches]).double().log_softmax(-1)
        log_q = torch.cat([quantized(b).logits[:, :-1].flatten(0, 1) for b in batches]).double().log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1)  # (positions,); KL(quantized || original) is 3.6e-4 of itself away here
    assert quality.mean_kl == pytest.approx(kl.mean().item(), rel=2e-4) and quality.mean_kl > 0
    assert quality.top1_agreement == (p.argmax(-1) == q.argmax(-1)).sum().item() / len(p) < 1


def test_gate_measures_real_stages_and_int4_drifts_further_than_int8():
    original = Transformer(micro_config(**SHAPES)).eval()
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    _, _, report = progressive(
        original,
        lambda m: measure(m, [log_probs(original, b) for b in batches], batches, torch.ones(128)),
        QuantConfig(),
        max_bpb_increase=1.0,
    )
    quality = {s.name: s.quality for s in report}
    assert quality["float32"].mean_kl == 0 and quality["float32"].top1_agreement == 1
    assert 0 < quality["int8"].mean_kl < quality["int4"].mean_kl
    assert all(s.passed for s in report)


def test_a_keep_pattern_naming_no_layer_is_refused_before_any_stage_is_measured():
    original = Transformer(micro_config(**SHAPES)).eval()
    measured = []
    with pytest.raises(ConfigError, match="field 'keep': pattern 'nosuchlayer' matches no layer"):
        progressive(original, measured.append, QuantConfig(keep=("nosuchlayer",)))
    assert measured == []  # the float32 baseline and bfloat16 stage (minutes on a real model) were not run first


def test_stages_shrink_in_order_int8_and_int4_keeping_float_layers_in_bfloat16():
    original = Transformer(micro_config(**SHAPES)).eval()
    bpb = {"float32": 2.0, "bfloat16": 2.0, "int8": 2.0, "int4": 2.0}
    chosen, name, report = progressive(original, scripted(bpb), QuantConfig(), max_bpb_increase=0.01)
    sizes = [s.bytes for s in report]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert stage_of(chosen) == name == "int4" and chosen.lm_head.weight.dtype == torch.bfloat16
    assert stored_bytes(chosen) == sizes[-1]
