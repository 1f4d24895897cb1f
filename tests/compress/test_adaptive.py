"""Adaptive precision: per-layer sensitivity, and the assignment that fits a size budget."""

from __future__ import annotations

import pytest
import torch

from seekstack import Transformer
from seekstack.compress.adaptive import (
    LayerChoice,
    adaptive_config,
    assign,
    average_bits,
    measured_layers,
    refuse_budget_below_smallest,
    sensitivities,
    unmeasured_choices,
    unmeasured_notes,
)
from seekstack.compress.linear import Int4Weight, Int8Weight, QuantizedExperts, QuantizedLinear
from seekstack.compress.quality import log_probs, measure
from seekstack.compress.quantize import QuantConfig, quantizable_layers, quantize_model
from tests.conftest import micro_config

ONE_BYTE = torch.ones(128)  # each token id of the micro model's vocabulary: bits per byte are bits per token
SHAPES = dict(hidden_size=128, moe_intermediate_size=32, intermediate_size=128, kv_lora_rank=32, q_lora_rank=128)


def choice(name: str, weights: int, kl_int8: float, kl_g32: float, kl_g128: float) -> LayerChoice:
    bits = {"int4-g128": 4.125, "int4-g32": 4.5, "int8": 8.125}
    return LayerChoice(name, weights, bits, {"int4-g128": kl_g128, "int4-g32": kl_g32, "int8": kl_int8})


def test_budget_goes_to_the_layers_where_a_bit_saves_the_most_kl():
    choices = [
        choice("sensitive", 1000, kl_int8=0.0, kl_g32=0.5, kl_g128=1.0),
        choice("robust", 1000, kl_int8=0.0, kl_g32=0.001, kl_g128=0.002),
        choice("big", 8000, kl_int8=0.0, kl_g32=0.01, kl_g128=0.02),
    ]
    assignment = assign(choices, budget_bits=4.6)
    # sensitive first (0.5 KL saved per step); what is left fits robust's small step but not big's
    assert assignment == {"sensitive": "int8", "robust": "int4-g32", "big": "int4-g128"}
    assert average_bits(choices, assignment) <= 4.6
    assert assign(choices, budget_bits=8.125) == {"sensitive": "int8", "robust": "int8", "big": "int8"}
    with pytest.raises(ValueError, match="below the smallest assignment"):
        assign(choices, budget_bits=4.0)


def test_a_layer_upgrades_past_options_that_measure_worse_to_its_lowest_kl_option():
    # measured by `seekstack quantize --adaptive` for layers.0.mlp.gate_proj on the demo checkpoint
    bits = {"int4-g128": 4.125, "int4-g64": 4.25, "int4-g32": 4.5, "int8": 8 + 16 / 128}
    kl = {"int4-g128": 0.004938, "int4-g64": 0.005085, "int4-g32": 0.005201, "int8": 0.004488}
    layer = LayerChoice("layers.0.mlp.gate_proj", 128 * 384, bits, kl)
    assert assign([layer], budget_bits=100.0) == {"layers.0.mlp.gate_proj": "int8"}
    assert assign([layer], budget_bits=8.0) == {"layers.0.mlp.gate_proj": "int4-g128"}  # g64 and g32 never help


def test_a_budget_below_the_smallest_assignment_the_shapes_allow_is_refused_as_assign_refuses_it():
    model = Transformer(micro_config(**SHAPES)).eval()  # the experts' 32-wide down_proj takes int4 g32 at the least
    choices = sensitivities(model, kl_of=lambda _model: 0.0)
    smallest = average_bits(choices, {c.name: min(c.bits, key=c.bits.get) for c in choices})
    assert 4.125 < smallest < 4.5
    with pytest.raises(ValueError) as measured:
        assign(choices, budget_bits=4.13)
    with pytest.raises(ValueError) as from_shapes:
        refuse_budget_below_smallest(unmeasured_choices(model), budget_bits=4.13)
    assert str(from_shapes.value) == str(measured.value)
    assert f"below the smallest assignment ({smallest:.3f} bits per weight" in str(from_shapes.value)
    refuse_budget_below_smallest(unmeasured_choices(model), budget_bits=smallest)


def test_sensitivities_are_measured_around_uniform_int4_g32_and_leave_the_model_unchanged():
    model = Transformer(micro_config(**SHAPES)).eval()
    with torch.no_grad():  # weights large enough that each layer moves the logits measurably
        for name, tensor in model.named_parameters():
            if "norm" not in name:
                tensor.normal_(0, 0.1)
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))]
    reference = [log_probs(model, batch) for batch in batches]
    names = ["layers.0.self_attn.q_a_proj", "layers.0.mlp.down_proj", "layers.1.mlp.experts"]
    choices = sensitivities(model, lambda m: measure(m, reference, batches, ONE_BYTE).mean_kl, names)
    assert [c.name for c in choices] == names
    assert not any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in model.modules())
    layer = next(c for c in choices if c.name == "layers.0.self_attn.q_a_proj")
    assert set(layer.kl) == {"int4-g128", "int4-g64", "int4-g32", "int8"}
    assert all(c.kl["int8"] < c.kl["int4-g32"] for c in choices)
    uniform = Transformer(micro_config(**SHAPES)).eval()
    uniform.load_state_dict(model.state_dict())
    quantize_model(uniform, QuantConfig(keep=["*"], layers=dict.fromkeys(names, "int4-g32")))
    base_kl = measure(uniform, reference, batches, ONE_BYTE).mean_kl  # the others sit at int4 g32 in every measurement
    assert all(c.kl["int4-g32"] == pytest.approx(base_kl, rel=1e-6) for c in choices)
    experts = next(c for c in choices if c.name == "layers.1.mlp.experts")
    assert "int4-g128" not in experts.kl  # down_proj has 32 inputs: no group of 128


def test_adaptive_config_applies_each_layers_choice():
    model = Transformer(micro_config(**SHAPES)).eval()
    assignment = {"layers.0.self_attn.o_proj": "int8", "layers.0.mlp.up_proj": "int4-g128"}
    done = quantize_model(model, adaptive_config(assignment))
    assert isinstance(model.layers[0].self_attn.o_proj.qweight, Int8Weight)
    assert (
        isinstance(model.layers[0].mlp.up_proj.qweight, Int4Weight) and model.layers[0].mlp.up_proj.qweight.group == 128
    )
    assert done["layers.0.mlp.up_proj"] == "int4 g128" and done["lm_head"] == "kept"


def test_mtp_layers_are_not_measured_and_a_note_says_they_take_int8_outside_the_budget():
    model = Transformer(micro_config(**SHAPES)).eval()
    measured = measured_layers(model)
    assert "layers.0.self_attn.o_proj" in measured and not any(name.startswith("mtp.") for name in measured)
    assert "mtp.0.eh_proj" in quantizable_layers(model)
    (note,) = unmeasured_notes(model)
    assert note.startswith("9 MTP layers (mtp.0.eh_proj, mtp.0.block.self_attn.q_a_proj, ...) are not measured")
    assert "quantized int8, the safest option, outside --budget-bits" in note
    assignment = quantize_model(model, adaptive_config(dict.fromkeys(measured, "int4-g32")))
    assert assignment["mtp.0.eh_proj"] == assignment["mtp.0.block.mlp.experts"] == "int8"
