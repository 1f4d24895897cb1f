"""save_pretrained as transformers' save_pretrained is called: its shard size arguments."""

from __future__ import annotations

import json
import re

import pytest
import torch

import seekstack
from seekstack.checkpoint.quantized import quantized_sources
from seekstack.compress.linear import Int4Weight
from seekstack.compress.quantize import QuantConfig, quantize_model
from tests.conftest import micro_config
from tests.support import fp8_block_warnings


def shard_sizes(folder) -> list[int]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return [(folder / name).stat().st_size for name in sorted(set(index["weight_map"].values()))]


@pytest.mark.parametrize(
    ("given", "limit"),
    [
        ({"max_shard_size": "40KB"}, 40_000),
        ({"max_shard_size": "40KiB"}, 40_960),
        ({"max_shard_size": "40 KB"}, 40_000),
        ({"max_shard_size": "320Kb"}, 40_000),
    ],
)
def test_max_shard_size_is_read_as_transformers_reads_it(tmp_path, given, limit):
    """transformers' `save_pretrained(folder, max_shard_size="5GB")` was a TypeError (no such argument); its sizes are
    read as its convert_file_size_to_int reads them: KB 10^3 bytes, KiB 2^10, a decimal unit ending in a lowercase b
    bits, and a space before the unit ("40 KB", which seekstack refused) allowed."""
    model = seekstack.Transformer(micro_config())
    seekstack.save_pretrained(model, tmp_path / "sized", **given)
    seekstack.save_pretrained(model, tmp_path / "bytes", max_shard_bytes=limit)
    assert shard_sizes(tmp_path / "sized") == shard_sizes(tmp_path / "bytes")
    assert len(shard_sizes(tmp_path / "sized")) > 1


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        ({"max_shard_bytes": "40KB"}, "max_shard_bytes='40KB': the largest shard, a positive integer of bytes"),
        ({"max_shard_bytes": 0}, "max_shard_bytes=0: the largest shard, a positive integer of bytes"),
        ({"max_shard_size": "40 parsecs"}, "max_shard_size='40 parsecs': the largest shard, a positive integer of"),
        ({"max_shard_size": "0GB"}, "max_shard_size='0GB': the largest shard, a positive integer of bytes or"),
        ({"max_shard_size": "0.001Kb"}, "max_shard_size='0.001Kb': the largest shard, a positive integer of bytes"),
        (
            {"max_shard_bytes": 40_000, "max_shard_size": "40KiB"},
            "max_shard_bytes=40000 beside max_shard_size='40KiB' (40960 bytes): max_shard_size is transformers'",
        ),
    ],
)
def test_a_shard_size_that_is_no_positive_number_of_bytes_is_refused_naming_it_before_anything_is_written(
    tmp_path, given, refusal
):
    """max_shard_bytes="40KB" failed midway with "'>' not supported between instances of 'int' and 'str'", and 0 (or
    a negative size) wrote every tensor into a shard of its own."""
    with pytest.raises(ValueError) as refused:
        seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path / "out", **given)
    assert str(refused.value).startswith(refusal)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("block", "named"),
    [
        (
            (48, 40),
            r"kv_b_proj.weight of shape \(128, 16\): .* \(3, 1\) scale grid and refuses it ",
        ),  # transformers' first refusal
        ((64, 64), r"down_proj.weight of shape \(64, 96\): .* \(1, 2\) scale grid and dequantizes it in \(64, 48\) "),
        ((128, 128), None),  # one block covers each side of each weight: transformers reads it as seekstack does
        ((8, 8), None),  # the block divides every weight
    ],
)
def test_an_fp8_block_transformers_cpu_loader_misreads_is_warned_about_naming_the_first_weight(tmp_path, block, named):
    """save_pretrained(model, folder, fp8_block=(48, 40)) wrote edge blocks covering part of a block (valid in
    DeepSeek's format) without a word, though transformers 5.23 on CPU takes the block from the scale grid: it refused
    to load the folder ("Weight shape (128, 16) not divisible by scale grid (3, 1)"), and with (64, 64) it loaded the
    micro model's down_proj (64, 96) in (64, 48) blocks, other weights than seekstack reads."""
    model = seekstack.Transformer(micro_config()).eval()
    _, messages = fp8_block_warnings(lambda: seekstack.save_pretrained(model, tmp_path / "fp8", fp8_block=block))
    if named is None:
        assert messages == []
    else:
        assert len(messages) == 1 and re.search(
            re.escape(f"weight_block_size {list(block)} does not divide ") + f".*{named}", messages[0]
        )
        assert str(tmp_path / "fp8") in messages[0] and "transformers' CPU loader" in messages[0]


def test_an_fp8_block_too_small_to_shrink_the_models_float_weights_is_refused_at_save(tmp_path):
    """save_pretrained(bfloat16 model, folder, fp8_block=(1, 1)) quantized while saving into a checkpoint larger than
    the float one (a 4-byte float32 scale per weight fp8 saves a byte of), as quantize refuses; a float32 model's
    (2, 2) blocks (3 bytes a weight saved, 12 a block) are taken."""
    model = seekstack.Transformer(micro_config()).eval()
    with pytest.raises(ValueError, match=r"^field 'fp8_block' must be a block of more than 4 weights for bfloat16"):
        seekstack.save_pretrained(model.to(torch.bfloat16), tmp_path / "refused", fp8_block=(1, 1))
    assert not (tmp_path / "refused").exists()
    seekstack.save_pretrained(model.float(), tmp_path / "taken", fp8_block=(2, 2))
    config = json.loads((tmp_path / "taken" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [2, 2]


def test_a_quantized_checkpoints_index_counts_the_parameters_of_the_float_one(tmp_path):
    """total_parameters counted the elements stored: int8 and int4 codes packed four or eight to an int32 word, scales
    added, so an int4 save of a model gave a quarter of its parameters. Each format's index counts the float one's."""
    from seekstack.compress.quantize import QuantConfig, quantize_model

    # one MoE layer of four experts in a few shards: int4 codes unpacked to be saved, each shard synced to disk
    config = micro_config(num_hidden_layers=2, n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1)
    model = seekstack.Transformer(config).eval()

    def total_parameters(scheme: str, stacked_experts: bool = False) -> int:
        quantized = seekstack.Transformer(config).eval()
        quantized.load_state_dict(model.state_dict())
        if scheme != "float":
            quantize_model(quantized, QuantConfig(scheme=scheme, keep=[], fp8_block=(32, 32)))
        folder = tmp_path / f"{scheme}-{stacked_experts}"
        seekstack.save_pretrained(quantized, folder, max_shard_bytes=100_000, stacked_experts=stacked_experts)
        return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_parameters"]

    float_parameters = total_parameters("float")  # the model's, and the MTP module's copies of embedding and head
    assert float_parameters > sum(parameter.numel() for parameter in model.parameters())
    # int8 packed with its shape, int4 stacked without it, fp8 with a scale per block
    counted = [total_parameters("int8"), total_parameters("int4", stacked_experts=True), total_parameters("fp8")]
    assert counted == [float_parameters] * 3


def test_each_quantized_expert_stack_is_read_back_once_when_saved_per_expert(monkeypatch):
    """The per-expert layout read each stack's stored tensors once per expert (int4's codes back from the kernel's
    tiling): `seekstack quantize --scheme int4` of `small` took 2 minutes, 16 times the work for its 16 experts."""
    model = seekstack.Transformer(micro_config())
    quantize_model(model, QuantConfig(scheme="int4"))
    experts = model.layers[-1].mlp.experts
    read_back = []
    stored = Int4Weight.stored
    monkeypatch.setattr(Int4Weight, "stored", lambda weight: read_back.append(weight) or stored(weight))
    sources = quantized_sources("model.layers.1.mlp.experts", experts)
    assert len(sources) == 3 * 3 * model.config.n_routed_experts  # gate, up, down: codes, scales, shape each
    assert read_back == [experts.gate_up_proj, experts.down_proj]
