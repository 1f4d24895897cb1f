"""Damaged quantized checkpoints (fp8, int8, int4) are refused on load, naming the file and the key, as float ones
are: weights or scales not of the shapes the config implies, and an index that names the wrong shard."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import seekstack
from seekstack import Transformer
from seekstack.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    dequantize_fp8,
    quantize_fp8,
)
from seekstack.compress.formats import pack_codes
from seekstack.compress.quantize import QuantConfig, quantize_model
from tests.conftest import micro_config
from tests.support import edited_json

SHAPES = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, kv_lora_rank=24)  # int4-tileable
FP8_BLOCK = (16, 16)
Q_B = "model.layers.1.self_attn.q_b_proj"  # (96, 32); in fp8 scale_inv (6, 2)
UP = "model.layers.1.mlp.experts.3.up_proj"  # (32, 64)
STACKED = "model.layers.1.mlp.experts.gate_up_proj"  # (8, 64, 64) in fp8: scale_inv (8, 4, 4)

Damage = Callable[[dict[str, torch.Tensor]], None]


def save_fp8(directory: Path, **options) -> Path:
    seekstack.save_pretrained(Transformer(micro_config(**SHAPES)), directory, fp8_block=FP8_BLOCK, **options)
    return directory


def save_quantized(directory: Path, scheme: str, **options) -> Path:
    model = Transformer(micro_config(**SHAPES))
    quantize_model(model, QuantConfig(scheme=scheme, fp8_block=FP8_BLOCK))
    seekstack.save_pretrained(model, directory, **options)
    return directory


def damage(file: Path, change: Damage) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Damage:
    return lambda tensors: tensors.__setitem__(key, make(tensors[key]).contiguous())


def load_error(directory: Path, dequantize: bool) -> str:
    with pytest.raises(CheckpointError) as error:
        seekstack.load_pretrained(directory, dequantize=dequantize)
    return str(error.value)


FP8_DAMAGES = {
    "scale-too-small": (f"{Q_B}.weight_scale_inv", lambda scale: scale[:1], "(1, 2)"),
    "scale-too-big": (f"{Q_B}.weight_scale_inv", lambda scale: torch.ones(7, 9), "(7, 9)"),
    "weight-row-short": (f"{Q_B}.weight", lambda weight: weight[:-1], "(95, 32)"),
    "expert-column-short": (f"{UP}.weight", lambda weight: weight[:, :-1], "(32, 63)"),
}


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
@pytest.mark.parametrize("key, make, shape", FP8_DAMAGES.values(), ids=FP8_DAMAGES.keys())
def test_fp8_weight_or_scale_of_the_wrong_shape_is_refused_naming_the_file_and_the_key(
    tmp_path, key, make, shape, dequantize
):
    directory = save_fp8(tmp_path / "fp8")
    damage(directory / SINGLE_FILE, replace(key, make))
    message = load_error(directory, dequantize)
    assert message.startswith(f"{directory / SINGLE_FILE}: key {key!r} has shape {shape}"), message


def test_fp8_stacked_experts_scale_of_the_wrong_shape_is_refused_naming_the_file_and_the_key(tmp_path):
    directory = save_quantized(tmp_path / "fp8", "fp8", stacked_experts=True)
    damage(directory / SINGLE_FILE, replace(f"{STACKED}.weight_scale_inv", lambda s: s[:, :-1]))
    message = load_error(directory, dequantize=False)
    assert message.startswith(f"{directory / SINGLE_FILE}: key '{STACKED}.weight_scale_inv' has shape (8, 3, 4)")
    assert "takes (8, 4, 4)" in message


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
@pytest.mark.parametrize(
    "scheme, key, stored_as",
    [("fp8", f"{Q_B}.weight_scale_inv", torch.int32), ("fp8", f"{UP}.weight_scale_inv", torch.float8_e4m3fn),
     ("fp8", f"{Q_B}.weight_scale_inv", torch.bool), ("int8", f"{Q_B}.weight_scale", torch.int8)],
)  # fmt: skip
def test_a_scale_stored_in_no_float_dtype_is_refused_naming_the_file_the_key_and_the_dtype(
    tmp_path, scheme, key, stored_as, dequantize
):
    directory = save_fp8(tmp_path / "fp8") if scheme == "fp8" else save_quantized(tmp_path / scheme, scheme)
    damage(directory / SINGLE_FILE, replace(key, lambda scale: scale.to(stored_as)))
    message = load_error(directory, dequantize)
    dtype = {torch.int32: "I32", torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL", torch.int8: "I8"}[stored_as]
    assert message.startswith(f"{directory / SINGLE_FILE}: key {key!r} is stored as {dtype}, but the scales "), message


def with_one(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda scale: scale.flatten().index_fill(0, torch.tensor([1]), value).view(scale.shape)


@pytest.mark.parametrize(
    "scheme, key, value, dequantize",
    [("fp8", f"{Q_B}.weight_scale_inv", float("nan"), False), ("int8", f"{Q_B}.weight_scale", float("inf"), True),
     ("int4", f"{UP}.weight_scale", float("nan"), False)],
)  # fmt: skip
def test_a_nan_or_infinite_scale_is_refused_naming_the_file_and_the_key(tmp_path, scheme, key, value, dequantize):
    """It loaded, and generation then failed on NaN logits, blaming float16 overflow, an adapter or a penalty."""
    directory = save_fp8(tmp_path / "fp8") if scheme == "fp8" else save_quantized(tmp_path / scheme, scheme)
    damage(directory / SINGLE_FILE, replace(key, with_one(value)))
    message = load_error(directory, dequantize)
    assert message.startswith(f"{directory / SINGLE_FILE}: key {key!r} holds 1 NaN or infinite scale(s) of "), message


def test_a_nan_e8m0_scale_is_refused_though_torch_counts_it_finite(tmp_path):
    """e8m0 (DeepSeek-V3.1's ue8m0 scales, as transformers stores them) has a NaN, 0xFF, and no infinity, and
    torch.isfinite on e8m0 itself calls every value finite: the scales are checked as float32."""
    directory = save_fp8(tmp_path / "fp8")
    key = f"{Q_B}.weight_scale_inv"
    damage(directory / SINGLE_FILE, replace(key, lambda scale: with_one(float("nan"))(scale).to(torch.float8_e8m0fnu)))
    message = load_error(directory, dequantize=False)
    assert message.startswith(f"{directory / SINGLE_FILE}: key {key!r} holds 1 NaN or infinite scale(s) of "), message


INT_DAMAGES = {
    "int8-weight-row-short": ("int8", f"{Q_B}.weight_packed", lambda words: words[:-1]),
    "int8-scale-row-short": ("int8", f"{Q_B}.weight_scale", lambda scale: scale[:-1]),
    "int4-weight-row-short": ("int4", f"{Q_B}.weight_packed", lambda words: words[:-1]),
    "int4-scale-row-short": ("int4", f"{Q_B}.weight_scale", lambda scale: scale[:-1]),
    "int4-expert-row-short": ("int4", f"{UP}.weight_packed", lambda words: words[:-1]),
}


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
@pytest.mark.parametrize("scheme, key, make", INT_DAMAGES.values(), ids=INT_DAMAGES.keys())
def test_int_weight_or_scale_of_the_wrong_shape_is_refused_naming_the_file_and_the_key(
    tmp_path, scheme, key, make, dequantize
):
    directory = save_quantized(tmp_path / scheme, scheme)
    damage(directory / SINGLE_FILE, replace(key, make))
    assert load_error(directory, dequantize).startswith(f"{directory / SINGLE_FILE}: key {key!r} has shape ")


def test_dequantize_fp8_refuses_scales_that_do_not_cover_the_weight_in_blocks():
    weight, scale_inv = quantize_fp8(torch.randn(32, 16), FP8_BLOCK)
    with pytest.raises(ValueError, match=r"scale_inv has shape \(7, 9\).*takes \(2, 1\)"):
        dequantize_fp8(weight, torch.ones(7, 9), FP8_BLOCK)
    assert dequantize_fp8(weight, scale_inv, FP8_BLOCK).shape == (32, 16)


def test_fp8_key_the_index_places_in_a_shard_without_it_is_refused_naming_the_shard_and_the_key(tmp_path):
    directory = save_fp8(tmp_path / "fp8", max_shard_bytes=8_000)
    shard = directory / json.loads((directory / INDEX_FILE).read_text())["weight_map"][f"{Q_B}.weight"]
    damage(shard, lambda tensors: tensors.pop(f"{Q_B}.weight"))
    message = load_error(directory, dequantize=False)
    assert message.startswith(f"{shard}: cannot read key '{Q_B}.weight'"), message


def test_a_key_the_index_places_in_another_shard_than_its_own_is_refused_naming_the_index_and_both_shards(tmp_path):
    """The refusal named the shard the index gives as unable to give the key ("cannot read key ... re-download"), as
    if that shard were damaged, where the index is the one out of step with its shards."""
    directory = save_fp8(tmp_path / "fp8", max_shard_bytes=8_000)
    with edited_json(directory / INDEX_FILE) as index:
        holder = index["weight_map"][f"{Q_B}.weight"]
        index["weight_map"][f"{Q_B}.weight"] = other = index["weight_map"]["model.embed_tokens.weight"]
    assert holder != other
    assert load_error(directory, dequantize=False) == (
        f"{directory / INDEX_FILE}: names {other} for key '{Q_B}.weight', which {holder} holds; the index does not "
        "match its shards: re-save or re-download the checkpoint"
    )


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int_weight_shape_that_is_not_the_packed_weights_is_refused_naming_the_file_and_the_key(
    tmp_path, scheme, dequantize
):
    directory = save_quantized(tmp_path / scheme, scheme)  # q_b_proj: (96, 32)
    damage(directory / SINGLE_FILE, replace(f"{Q_B}.weight_shape", lambda _: torch.tensor([32, 32])))
    message = load_error(directory, dequantize)
    assert message.startswith(f"{directory / SINGLE_FILE}: key '{Q_B}.weight_shape' is [32, 32], but "), message
    assert f"'{Q_B}.weight_packed' holds a [96, 32] matrix" in message


@pytest.mark.parametrize("block", [None, [16, 16, 16], [16], [16, 0], "16x16", [16.0, 16]])
def test_fp8_weight_block_size_that_is_not_two_positive_integers_is_refused_naming_the_field(tmp_path, block):
    directory = save_fp8(tmp_path / "fp8")
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["weight_block_size"] = block
    message = load_error(directory, dequantize=False)
    assert message.startswith(f"{directory / 'config.json'}: quantization_config.weight_block_size is {block!r}; ")


def test_fp8_weight_block_size_null_is_refused_as_transformers_per_tensor_format_not_as_a_damaged_config(tmp_path):
    """transformers' FineGrainedFP8Config writes weight_block_size null for fp8 of one scale per matrix; the refusal
    called its config one to replace ("use the config.json saved with these weights"), though it is that one."""
    directory = save_fp8(tmp_path / "fp8")
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["weight_block_size"] = None
    assert load_error(directory, dequantize=False) == (
        f"{directory / 'config.json'}: quantization_config.weight_block_size is None; null is transformers' "
        "per-tensor fp8 (one weight_scale_inv per matrix), which seekstack does not read: it reads block-wise fp8 "
        "(DeepSeek's [128, 128]): give the float checkpoint it was made from (`seekstack quantize --scheme fp8` "
        "writes it block-wise)"
    )


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
@pytest.mark.parametrize("dtype, stored", [(torch.float8_e5m2, "F8_E5M2"), (torch.int8, "I8"), (torch.float32, "F32")])
def test_fp8_weight_stored_in_another_dtype_beside_its_scale_is_refused_naming_the_file_the_key_and_the_dtype(
    tmp_path, dtype, stored, dequantize
):
    directory = save_fp8(tmp_path / "fp8")
    damage(directory / SINGLE_FILE, replace(f"{Q_B}.weight", lambda weight: weight.float().to(dtype)))
    message = load_error(directory, dequantize)
    assert message.startswith(f"{directory / SINGLE_FILE}: key '{Q_B}.weight' is stored as {stored}, but "), message


@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
def test_int_weights_under_an_fp8_quantization_config_are_refused_naming_the_file_and_the_config(tmp_path, dequantize):
    directory = save_quantized(tmp_path / "int8", "int8")
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(FP8_BLOCK)}
    message = load_error(directory, dequantize)
    assert message.startswith(f"{directory / SINGLE_FILE}: key "), message
    assert f"is stored as I32, but the quantization_config of {directory / 'config.json'} is 'fp8'" in message


def test_an_unsupported_format_is_refused_naming_its_fields_not_the_whole_config(tmp_path):
    """compressed-tensors' nvfp4-pack-quantized (NVFP4): the refusal printed the whole quantization_config, every
    layer's target with it (thousands of patterns for a full model), before saying what seekstack reads."""
    directory = save_quantized(tmp_path / "int8", "int8")
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["format"] = "nvfp4-pack-quantized"
    message = load_error(directory, dequantize=False)
    assert message.startswith(
        f"{directory / 'config.json'}: unsupported quantization_config (quant_method='compressed-tensors', "
        "format='nvfp4-pack-quantized'); seekstack reads "
    ), message
    assert "targets" not in message


ASYMMETRIC_DAMAGES = {
    "missing": ({}, "layer '{layer}' has no '{layer}.weight_zero_point', but the quantization_config group "
                "'asymmetric' of {config} says symmetric=false (codes with zero points): re-save or re-download the "
                "checkpoint"),
    "float": ({"weight_zero_point": torch.ones(96, 1)}, "key '{layer}.weight_zero_point' is stored as F32, but zero "
              "points load only as int8, or int32 words packing them (pack-quantized's); re-save or re-download the "
              "checkpoint"),
    "misshapen": ({"weight_zero_point": torch.ones(96, 2, dtype=torch.int8)}, "key '{layer}.weight_zero_point' holds "
                  "(96, 2) zero points, but '{layer}' has (96, 1) scales, one zero point each: re-save or re-download "
                  "the checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("damaged", ASYMMETRIC_DAMAGES)
@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
def test_asymmetric_int_weights_without_their_zero_points_are_refused_naming_the_file_and_the_key(
    tmp_path, dequantize, damaged
):
    """llm-compressor's W4A16_ASYM: codes with zero points, read as (q - z) x s; its layer's zero points missing,
    or not one an int per scale. (Asymmetric groups were refused whole before they were read.)"""
    directory = save_quantized(tmp_path / "int4", "int4")
    added, expected = ASYMMETRIC_DAMAGES[damaged]
    damage(directory / SINGLE_FILE, lambda tensors: tensors.update({f"{Q_B}.{k}": v for k, v in added.items()}))
    with edited_json(directory / CONFIG_FILE) as config:
        groups = config["quantization_config"]["config_groups"]
        groups["asymmetric"] = {**groups["group_0"], "targets": [Q_B]}  # q_b_proj's: its exact name comes first
        groups["asymmetric"]["weights"] = {**groups["group_0"]["weights"], "symmetric": False}
    message = load_error(directory, dequantize)
    assert message == f"{directory / SINGLE_FILE}: " + expected.format(layer=Q_B, config=directory / "config.json")


def test_asymmetric_float_weights_are_refused_naming_the_config_and_the_group(tmp_path):
    """Zero points are read for int weights only; no scheme of llm-compressor's writes float ones."""
    directory = save_quantized(tmp_path / "int4", "int4")
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["config_groups"]["group_0"]["weights"].update(symmetric=False, type="float")
    assert load_error(directory, dequantize=True).startswith(
        f"{directory / 'config.json'}: quantization_config group 'group_0' says symmetric=false for float weights; "
    )


# q_b_proj's (96 rows, 1 group) zero points: int8, or packed along the rows as pack-quantized packs them
ZERO_POINTS = {
    "int8": lambda point: torch.full((96, 1), point, dtype=torch.int8),
    "packed": lambda point: pack_codes(torch.full((1, 96), point, dtype=torch.int8), 4).t().contiguous(),
}


@pytest.mark.parametrize("stored", ZERO_POINTS)
@pytest.mark.parametrize("dequantize", [False, True], ids=["quantized", "dequantized"])
def test_a_symmetric_layers_zero_points_load_when_zero_and_are_refused_otherwise(tmp_path, dequantize, stored):
    """A symmetric group's `weight_zero_point` (earlier compressed-tensors versions wrote all-zero ones) was never
    read: zero ones were warned of as unused keys, and others, which shift the weights, were ignored silently."""
    directory = save_quantized(tmp_path / "int4", "int4")
    expected = seekstack.load_pretrained(directory, dequantize=dequantize)(torch.arange(10)[None]).logits
    damage(
        directory / SINGLE_FILE, lambda tensors: tensors.__setitem__(f"{Q_B}.weight_zero_point", ZERO_POINTS[stored](0))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key left unused
        loaded = seekstack.load_pretrained(directory, dequantize=dequantize)
    assert torch.equal(loaded(torch.arange(10)[None]).logits, expected)
    damage(
        directory / SINGLE_FILE, lambda tensors: tensors.__setitem__(f"{Q_B}.weight_zero_point", ZERO_POINTS[stored](3))
    )
    assert load_error(directory, dequantize) == (
        f"{directory / SINGLE_FILE}: key '{Q_B}.weight_zero_point' holds zero points other than 0, but the "
        f"quantization_config group 'group_0' of {directory / 'config.json'} says symmetric (codes x scales, no zero "
        "point); the config and the weights disagree: re-save or re-download the checkpoint"
    )


@pytest.mark.parametrize("order", ["group", True])
def test_int4_groups_in_activation_order_are_refused_naming_the_config_and_the_group(tmp_path, order):
    """GPTQ's act-order (`actorder: "group"`): column j's scales are weight_scale[:, weight_g_idx[j]], which reading
    groups of consecutive columns scaled wrong, silently (the g_idx warned of as unused keys only)."""
    directory = save_quantized(tmp_path / "int4", "int4")
    g_idx = torch.zeros(32, dtype=torch.int32)  # the group of each of q_b_proj's 32 columns (one group of 32)
    damage(directory / SINGLE_FILE, lambda tensors: tensors.__setitem__(f"{Q_B}.weight_g_idx", g_idx))
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = order
    message = load_error(directory, dequantize=False)
    assert message.startswith(
        f"{directory / 'config.json'}: quantization_config group 'group_0' says actorder={order!r}"
    )


def quip_transform_config(*locations: str) -> dict:
    """A compressed-tensors transform_config as llm-compressor's QuIP writes it: a Hadamard transform of each
    down_proj at `locations`, the config's dict as ModelCompressor.update_config stores it."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    apply = [
        TransformArgs(targets=["re:.*down_proj$"], location=where, inverse=where == "input") for where in locations
    ]
    return TransformConfig(config_groups={"u": TransformScheme(type="hadamard", apply=apply)}).model_dump()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_transform_config_rotating_activations_at_run_time_is_refused_and_fused_rotations_load(tmp_path, scheme):
    """A compressed-tensors checkpoint whose transform_config rotates a layer's input at run time (QuIP's, SpinQuant's
    online Hadamards, as vLLM runs them; its weights stored rotated to match) loaded with the rotation left out, its
    outputs wrong (0.12 off in the logits on the test model) with only "1 checkpoint keys were not used, e.g.
    ['...down_proj.u_input.weight']". It is refused naming config.json, the group and the location; rotations fused
    into the weights (weight_input, weight_output) load as the weights they are."""
    directory = save_quantized(tmp_path / scheme, scheme)
    reference = seekstack.load_pretrained(directory).eval()
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["transform_config"] = quip_transform_config("weight_input")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(seekstack.load_pretrained(directory).eval()(ids).logits, reference(ids).logits)
    with edited_json(directory / CONFIG_FILE) as config:
        config["quantization_config"]["transform_config"] = quip_transform_config("weight_input", "input")
    for dequantize in (False, True):
        assert load_error(directory, dequantize) == (
            f"{directory / 'config.json'}: quantization_config.transform_config group 'u' applies its hadamard "
            "transform at 'input' of ['re:.*down_proj$'], at run time, as vLLM runs it; seekstack runs no online "
            "transform, and those layers' weights (rotated to match) would compute wrong; use a checkpoint made "
            "without online rotations (transforms at weight_input and weight_output only, fused into the weights, "
            "load)"
        )


def test_a_transform_config_alone_of_fused_rotations_loads_as_the_float_weights_it_stores(tmp_path):
    """compressed-tensors' ModelCompressor writes a model rotated but not quantized (SpinQuant's or QuIP's fused
    rotations alone) as a quantization_config of a transform_config and no format nor config_groups, which
    transformers' CompressedTensorsConfig reads as format "dense". It was refused as "unsupported quantization_config
    (quant_method='compressed-tensors')", saying nothing of why; it loads as the float weights it holds."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.transform import TransformConfig

    model = Transformer(micro_config(**SHAPES)).eval()
    seekstack.save_pretrained(model, tmp_path / "rotated")
    transforms = TransformConfig.model_validate(quip_transform_config("weight_input"))
    ModelCompressor(transform_config=transforms).update_config(str(tmp_path / "rotated"))
    assert "format" not in json.loads((tmp_path / "rotated" / "config.json").read_text())["quantization_config"]
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for dequantize in (False, True):
        loaded = seekstack.load_pretrained(tmp_path / "rotated", dequantize=dequantize).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_an_empty_quantization_config_is_no_quantization_as_transformers_reads_it(tmp_path):
    """transformers' from_pretrained reads `"quantization_config": {}` as none (a falsy config: no quantizer). seekstack
    loaded the float weights too, but read the config as fp8 elsewhere: a LoRA run refused the checkpoint as "the base
    model is quantized (fp8)", and prune as quantized. It is no quantization everywhere."""
    from seekstack.adapters.training import refuse_quantized_checkpoint

    model = Transformer(micro_config(**SHAPES)).eval()
    seekstack.save_pretrained(model, tmp_path / "float")
    with edited_json(tmp_path / "float" / CONFIG_FILE) as config:
        config["quantization_config"] = {}
    refuse_quantized_checkpoint(tmp_path / "float")
    loaded = seekstack.load_pretrained(tmp_path / "float").eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("sparse_format", ["dense", "sparse-24-bitmask"])
def test_weights_compressed_by_a_sparsity_config_are_refused_and_sparse_dense_ones_load(tmp_path, sparse_format):
    """A compressed-tensors checkpoint whose sparsity_config stores its weights compressed (llm-compressor's 2:4
    sparse checkpoints: sparse-24-bitmask, their non-zero values beside a bitmask) was read as if its weights were
    plain ones, the sparsity_config never looked at: refused as damaged ("missing key '...q_a_proj.weight'; the
    weights do not match config.json: re-save or re-download the checkpoint"). It is refused naming config.json and
    the format; a sparsity_config of format "dense" (sparse weights stored as they are) loads."""
    directory = save_quantized(tmp_path / "int8", "int8")
    reference = seekstack.load_pretrained(directory).eval()
    with edited_json(directory / CONFIG_FILE) as config:
        sparsity = {"format": sparse_format, "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"]}
        config["quantization_config"]["sparsity_config"] = sparsity
    if sparse_format == "dense":
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(seekstack.load_pretrained(directory).eval()(ids).logits, reference(ids).logits)
        return
    for dequantize in (False, True):
        assert load_error(directory, dequantize) == (
            f"{directory / 'config.json'}: quantization_config.sparsity_config stores the weights compressed as "
            "'sparse-24-bitmask' (their non-zero values and a bitmask, not a weight tensor), which seekstack does not "
            "read; decompress them with the compressed-tensors version that wrote them and save the model dense, or "
            "give the checkpoint it was made from"
        )


@pytest.mark.parametrize("scheme, key", [("fp8", f"{Q_B}.weight"), ("int4", f"{Q_B}.weight_packed")])
def test_a_key_a_shard_holds_that_the_index_does_not_list_is_refused_naming_the_index_the_shard_and_the_key(
    tmp_path, scheme, key
):
    """The index out of step with its shards: the refusal said the weights lack the key ("missing key ...; the weights
    do not match config.json"), though a shard holds it."""
    directory = save_quantized(tmp_path / scheme, scheme, max_shard_bytes=8_000)
    with edited_json(directory / INDEX_FILE) as index:
        shard = index["weight_map"].pop(key)
    assert load_error(directory, dequantize=False) == (
        f"{directory / INDEX_FILE}: does not list key {key!r} (in {shard}), which its shards hold; the index does "
        "not match its shards: re-save or re-download the checkpoint"
    )


@pytest.mark.parametrize("dtype, stored", [(torch.float32, "F32"), (torch.float8_e5m2, "F8_E5M2")])
def test_an_expert_stored_unlike_the_others_is_refused_naming_its_shard_its_key_and_both_formats(
    tmp_path, dtype, stored
):
    directory = save_fp8(tmp_path / "fp8", max_shard_bytes=8_000)
    shard = directory / json.loads((directory / INDEX_FILE).read_text())["weight_map"][f"{UP}.weight"]
    damage(shard, replace(f"{UP}.weight", lambda weight: weight.float().to(dtype)))
    message = load_error(directory, dequantize=False)
    assert message.startswith(f"{shard}: key '{UP}.weight' is stored as {stored}, but "), message
    assert "'model.layers.1.mlp.experts.0.gate_proj.weight' as F8_E4M3" in message


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_experts_of_one_layer_stored_at_other_group_sizes_are_refused_naming_the_expert(tmp_path, where):
    """Expert 3 re-stored at int4 g64 among g32 experts: its scales were broadcast into the stack (in memory) or its
    disk copy never filled, and written again for good."""
    from seekstack.checkpoint import load_pretrained, read_safetensors, save_aligned
    from seekstack.compress.formats import pack_codes, quantize_int4
    from seekstack.infer.placement import offload_while_loading

    torch.manual_seed(0)
    model = Transformer(micro_config(hidden_size=64, moe_intermediate_size=32, intermediate_size=128))
    quantize_model(model, QuantConfig(scheme="int4", group_size=32))
    seekstack.save_pretrained(model, tmp_path / "model")
    tensors = {name: tensor.clone() for name, tensor in read_safetensors(tmp_path / "model" / SINGLE_FILE).items()}
    for projection in ("gate_proj", "up_proj"):
        codes, scales = quantize_int4(torch.randn(32, 64), 64)
        key = f"model.layers.1.mlp.experts.3.{projection}"
        tensors[f"{key}.weight_packed"], tensors[f"{key}.weight_scale"] = pack_codes(codes, 4), scales
    save_aligned(tensors, tmp_path / "model" / SINGLE_FILE)
    offload = {"offload": offload_while_loading("*=disk", tmp_path / "offload")} if where == "disk" else {}
    odd = r"key 'model.layers.1.mlp.experts.3.gate_proj.weight_scale' has shape \(32, 1\), but '.*experts.0.gate_proj"
    with pytest.raises(CheckpointError, match=odd + r".weight_scale' \(32, 2\)"):
        load_pretrained(tmp_path / "model", **offload)


NVFP4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
FROZEN_REFUSALS = {
    "nvfp4": ([Q_B], "quantization_config group 'group_0' quantizes float4 weights per tensor_group; seekstack rounds "
              "a frozen checkpoint's float weights by their scales as int2 to int8 or float8, per channel, group, "
              "tensor or block only; compress the checkpoint where it was made (compressed-tensors) or give a float "
              "one"),
    "untargeted": (["re:.*o_proj$"], f"layer '{Q_B}' stores a float weight beside its weight_scale, but no "
                   "quantization_config group targets it; the config and the weights disagree: re-save or "
                   "re-download the checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("case", FROZEN_REFUSALS)
def test_a_frozen_layer_seekstack_cannot_round_as_compressed_tensors_does_is_refused_naming_the_config(tmp_path, case):
    """A checkpoint saved uncompressed (quantization_status "frozen") loads its float weights rounded by their scales;
    one of a format that rounding does not cover (nvfp4's float4 with a global scale), or of no config group, is
    refused naming config.json, not loaded unrounded."""
    seekstack.save_pretrained(Transformer(micro_config(**SHAPES)), tmp_path)
    damage(tmp_path / SINGLE_FILE, lambda tensors: tensors.update({f"{Q_B}.weight_scale": torch.ones(96, 2)}))
    targets, expected = FROZEN_REFUSALS[case]
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "dense", "quantization_status": "frozen",
            "config_groups": {"group_0": {"targets": targets, "weights": NVFP4}},
        }  # fmt: skip
    for dequantize in (False, True):
        assert load_error(tmp_path, dequantize) == f"{tmp_path / 'config.json'}: {expected}"
