"""Checkpoints: round trips, sharding, MTP layers, FP8, error messages, atomic saves, loading dtypes."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import seekstack
import seekstack.checkpoint.save
from seekstack import Transformer
from seekstack.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    checkpoint_tensors,
    dequantize_fp8,
    quantize_fp8,
    write_config,
    write_pretrained_files,
    write_shards,
)
from seekstack.checkpoint.load import refuse_unstored_keys
from seekstack.checkpoint.reader import CheckpointReader
from seekstack.compress.quantize import QuantConfig, quantize_model
from seekstack.config import ConfigError
from seekstack.infer.placement import mapped_file
from seekstack.model.moe import RoutedExperts
from tests.conftest import micro_config
from tests.support import edited_json

E4M3_RELATIVE_STEP = 2**-4  # 3 mantissa bits: rounding moves a normal value by at most 1/16 of its size
E4M3_SMALLEST_STEP = 2**-9  # spacing of the e4m3 subnormals, in units of the block scale


def random_model(**overrides) -> Transformer:
    """A micro model with every weight random, norm gains off 1, and a non-zero routing bias."""
    model = Transformer(micro_config(**overrides)).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                tensor.uniform_(-0.5, 0.5)
            elif "norm" in name:
                tensor.uniform_(0.5, 1.5)
            elif "inv_freq" not in name:
                tensor.normal_(0, 0.1)
    return model


def logits(model: Transformer, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def stored_keys(directory: Path) -> dict[str, str]:
    """Every key in the directory's safetensors files -> the dtype it is stored in."""
    keys = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            keys.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})
    return keys


def assert_same_state(a: Transformer, b: Transformer) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype, name
        assert torch.equal(state_a[name], state_b[name]), name


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


INPUT_IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ round trips
def test_save_then_load_gives_equal_state_dict_and_logits(tmp_path):
    model = random_model()
    seekstack.save_pretrained(model, tmp_path / "ckpt")
    loaded = seekstack.load_pretrained(tmp_path / "ckpt").eval()
    assert_same_state(model, loaded)
    assert torch.equal(logits(loaded, INPUT_IDS), logits(model, INPUT_IDS))
    with torch.no_grad():
        assert torch.equal(loaded(INPUT_IDS, labels=INPUT_IDS).mtp_loss, model(INPUT_IDS, labels=INPUT_IDS).mtp_loss)


def test_a_loaded_model_is_in_eval_mode_as_transformers_from_pretrained_returns_it(tmp_path):
    seekstack.save_pretrained(random_model(aux_loss_alpha=0.01), tmp_path / "ckpt")
    loaded = seekstack.load_pretrained(tmp_path / "ckpt")
    assert not any(module.training for module in loaded.modules())
    with torch.no_grad():
        assert loaded(INPUT_IDS, labels=INPUT_IDS).balance_loss is None  # a training-time term, as in transformers


def test_a_model_wrapped_by_torch_compile_saves_as_the_model_it_wraps(tmp_path):
    model = random_model()
    seekstack.save_pretrained(torch.compile(model), tmp_path / "ckpt")  # saving compiles nothing: no forward runs
    seekstack.save_pretrained(model, tmp_path / "plain")
    assert stored_keys(tmp_path / "ckpt") == stored_keys(tmp_path / "plain")
    assert_same_state(model, seekstack.load_pretrained(tmp_path / "ckpt"))


def test_a_peft_model_or_another_module_is_refused_saying_what_to_save_and_nothing_is_written(tmp_path):
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(random_model(), LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(TypeError, match=r"got PeftModel: save .*merge_and_unload\(\), or the adapter alone"):
        seekstack.save_pretrained(adapted, tmp_path / "adapted")
    with pytest.raises(TypeError, match="a checkpoint holds a seekstack Transformer, got Linear"):
        write_pretrained_files(torch.nn.Linear(2, 2), tmp_path)
    assert not (tmp_path / "adapted").exists() and not list(tmp_path.iterdir())


def test_config_json_is_unchanged_by_a_load_and_save(tmp_path):
    model = random_model(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    seekstack.save_pretrained(model, tmp_path / "first")
    seekstack.save_pretrained(seekstack.load_pretrained(tmp_path / "first"), tmp_path / "second")
    first = json.loads((tmp_path / "first" / "config.json").read_text())
    assert first == json.loads((tmp_path / "second" / "config.json").read_text())
    assert first["rope_parameters"]["rope_type"] == "yarn" and first["rope_scaling"]["factor"] == 4.0


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    model = random_model(tie_word_embeddings=True, num_nextn_predict_layers=0)
    seekstack.save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in stored_keys(tmp_path)
    loaded = seekstack.load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(logits(loaded, INPUT_IDS), logits(model, INPUT_IDS))


# ------------------------------------------------------------------ sharding
def test_a_stored_head_that_is_not_the_embedding_is_loaded_untied_under_a_tying_config_as_transformers_does(tmp_path):
    model = random_model(num_nextn_predict_layers=0)
    seekstack.save_pretrained(model, tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config.update(tie_word_embeddings=True)
    with pytest.warns(UserWarning, match=r"tie_word_embeddings is true, but .*model\.safetensors stores an lm_head"):
        loaded = seekstack.load_pretrained(tmp_path).eval()
    assert not loaded.config.tie_word_embeddings and loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert torch.equal(logits(loaded, INPUT_IDS), logits(model, INPUT_IDS))


def test_a_stored_head_equal_to_the_embedding_is_tied_under_a_tying_config(tmp_path):
    model = random_model(num_nextn_predict_layers=0)
    model.lm_head.weight.data.copy_(model.embed_tokens.weight)
    seekstack.save_pretrained(model, tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config.update(tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = seekstack.load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_small_shard_limit_writes_several_shards_and_an_index_that_loads_back(tmp_path):
    model = random_model()
    limit = 40_000
    seekstack.save_pretrained(model, tmp_path, max_shard_bytes=limit)

    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 2
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    total = parameters = 0
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            keys = list(handle.keys())
            sizes = [handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in keys]
            parameters += sum(handle.get_tensor(k).numel() for k in keys)
        assert all(index["weight_map"][k] == shard.name for k in keys)
        assert sum(sizes) <= limit or len(keys) == 1  # a tensor above the limit gets a shard of its own
        total += sum(sizes)
    assert set(index["weight_map"]) == set(stored_keys(tmp_path))
    # as transformers 5's save_pretrained writes them: the parameters stored and their bytes
    assert index["metadata"] == {"total_parameters": parameters, "total_size": total}

    assert_same_state(model, seekstack.load_pretrained(tmp_path))


O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def test_a_stray_safetensors_file_beside_model_safetensors_is_not_read(saved):
    reference = seekstack.load_pretrained(saved)
    save_file({O_PROJ: torch.randn_like(reference.layers[0].self_attn.o_proj.weight)}, saved / "zz_old.safetensors")
    assert_same_state(reference, seekstack.load_pretrained(saved))


def test_safetensors_files_without_model_safetensors_or_an_index_are_refused_naming_them(saved):
    (saved / SINGLE_FILE).rename(saved / "weights.safetensors")
    save_file({O_PROJ: torch.zeros(2)}, saved / "backup.safetensors")
    message = load_error(saved)
    assert message.startswith(f"{saved}: no {SINGLE_FILE} or {INDEX_FILE}; backup.safetensors, weights.safetensors ")


def test_a_key_stored_in_two_shards_of_an_index_is_refused_naming_both(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    holder = weight_map[O_PROJ]
    other = next(file for file in sorted(set(weight_map.values())) if file != holder)
    save_file({**load_file(tmp_path / other), O_PROJ: torch.randn(64, 64)}, tmp_path / other)
    first, second = sorted([holder, other])
    message = load_error(tmp_path)
    assert message.startswith(f"{tmp_path}: key {O_PROJ!r} is stored in both {first} and {second} "), message


def test_the_float_dtype_of_a_sharded_checkpoint_is_read_from_the_embedding_shard_alone(tmp_path, monkeypatch):
    from seekstack.checkpoint import reader

    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    opened, open_safetensors = [], reader._open_safetensors

    def recorded(path):
        opened.append(path.name)
        return open_safetensors(path)

    monkeypatch.setattr(reader, "_open_safetensors", recorded)
    assert reader.stored_float_dtype(tmp_path) == torch.float32
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert opened == [weight_map["model.embed_tokens.weight"]]  # not every shard's header: loading checks those


def test_saving_over_a_sharded_checkpoint_leaves_no_stale_shards(tmp_path):
    model = random_model()
    seekstack.save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    seekstack.save_pretrained(model, tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", "generation_config.json", SINGLE_FILE]
    assert_same_state(model, seekstack.load_pretrained(tmp_path / "ckpt"))


def test_a_stale_index_beside_model_safetensors_is_read_past_as_transformers_reads_it(tmp_path):
    """transformers' save_pretrained of one file into the folder of an earlier sharded save deletes the shards but
    leaves their index, and its from_pretrained reads model.safetensors first; seekstack read the index and refused
    the folder: "model.safetensors.index.json: names shard 'model-00001-of-00005.safetensors', which is missing ...;
    the download is incomplete". It reads model.safetensors, warning of the stale index."""
    from transformers import AutoModelForCausalLM

    model = random_model(num_nextn_predict_layers=0)
    seekstack.save_pretrained(model, tmp_path / "float")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "resaved", max_shard_size="40KB")
    theirs.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / INDEX_FILE).read_text())
    assert not any((tmp_path / "resaved" / shard).exists() for shard in index["weight_map"].values())
    assert (tmp_path / "resaved" / SINGLE_FILE).is_file()
    with pytest.warns(UserWarning) as warned:
        loaded = seekstack.load_pretrained(tmp_path / "resaved")
    assert_same_state(model, loaded)
    first = sorted(set(index["weight_map"].values()))[0]
    assert str(warned[0].message) == (
        f"{tmp_path / 'resaved' / INDEX_FILE}: names shards missing from {tmp_path / 'resaved'} ({first!r} ...) beside "
        f"a {SINGLE_FILE}: reading {SINGLE_FILE}, as transformers does (its save_pretrained of one file leaves an "
        "earlier sharded save's index behind); delete the stale index"
    )


def test_a_key_the_index_lists_that_no_shard_holds_and_the_model_does_not_use_is_read_past_with_a_warning(tmp_path):
    """The unused-keys pass read every listed key's shape, so a key only the index lists (an index out of step with its
    shards) was refused as a damaged shard: "model-00001-of-00037.safetensors: cannot read key 'model.foo.weight'
    (File does not contain tensor ...); re-save or re-download", where transformers (5.x) loads the folder. seekstack
    loads it too, warning of the index."""
    model = random_model()
    seekstack.save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    with edited_json(tmp_path / INDEX_FILE) as index:
        first = sorted(set(index["weight_map"].values()))[0]
        index["weight_map"]["model.foo.weight"] = index["weight_map"]["model.bar.weight"] = first
    with pytest.warns(UserWarning) as warned:
        loaded = seekstack.load_pretrained(tmp_path)
    assert_same_state(model, loaded)
    assert [str(warning.message) for warning in warned] == [
        f"{tmp_path / INDEX_FILE}: lists key 'model.bar.weight' (and 1 more) in {first}, which does not hold it; the "
        "model does not use it, so it is read past, as transformers reads it; the index does not match its shards: "
        "re-save the checkpoint"
    ]


def test_saving_over_a_model_folder_keeps_the_tokenizer_files_it_does_not_write(tmp_path):
    model = random_model()
    seekstack.save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    kept = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}", "generation_config.json": "{}"}
    for name, text in kept.items():
        (tmp_path / "ckpt" / name).write_text(text)
    seekstack.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(["config.json", SINGLE_FILE, *kept])
    assert {name: (tmp_path / "ckpt" / name).read_text() for name in kept} == kept
    assert_same_state(model, seekstack.load_pretrained(tmp_path / "ckpt"))


def test_a_saved_folder_has_the_generation_config_transformers_writes_with_the_models_bos_and_eos(tmp_path):
    """transformers' save_pretrained writes generation_config.json, which GenerationConfig.from_pretrained (and so
    pipelines and servers that read it) needs; seekstack wrote none ('does not appear to have a file named
    generation_config.json')."""
    from transformers import GenerationConfig

    seekstack.save_pretrained(random_model(bos_token_id=5, eos_token_id=6), tmp_path / "ckpt")
    generation_config = GenerationConfig.from_pretrained(tmp_path / "ckpt")
    assert (generation_config.bos_token_id, generation_config.eos_token_id) == (5, 6)
    assert not generation_config.do_sample and generation_config.temperature in (None, 1.0)


def test_a_loaded_model_saved_elsewhere_keeps_its_checkpoints_generation_config_as_transformers_does(tmp_path):
    """load_pretrained then save_pretrained into a new folder wrote the config's BOS and EOS ids alone: the release's
    sampling (temperature, top_p), which transformers' save writes from model.generation_config, was lost."""
    seekstack.save_pretrained(random_model(), tmp_path / "release")
    shipped = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.3, "top_p": 0.95}
    (tmp_path / "release" / "generation_config.json").write_text(json.dumps(shipped))
    seekstack.save_pretrained(seekstack.load_pretrained(tmp_path / "release"), tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text()) == shipped
    (tmp_path / "release" / "generation_config.json").write_text("{not json")  # damaged: loads, not kept
    with pytest.warns(UserWarning, match=r"generation_config.json: not valid JSON .*; a save of this model writes"):
        damaged = seekstack.load_pretrained(tmp_path / "release")
    seekstack.save_pretrained(damaged, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    assert written == {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}


# ------------------------------------------------------------------ multi-token prediction
def test_mtp_modules_are_stored_as_the_layers_after_the_main_ones(tmp_path):
    model = random_model(num_nextn_predict_layers=2)
    seekstack.save_pretrained(model, tmp_path)
    keys = stored_keys(tmp_path)
    L = model.config.num_hidden_layers
    for k in range(2):
        prefix = f"model.layers.{L + k}"
        own = ["enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"]
        block = [
            "input_layernorm", "post_attention_layernorm", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa",
            "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate", "mlp.shared_experts.gate_proj",
            "mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.7.down_proj",
        ]  # fmt: skip
        for name in own + block:
            assert f"{prefix}.{name}.weight" in keys
        assert f"{prefix}.mlp.gate.e_score_correction_bias" in keys
        assert not any(key.startswith(f"{prefix}.block.") for key in keys)
    assert not any(key.startswith(f"model.layers.{L + 2}.") or key.startswith("mtp.") for key in keys)

    files = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(f).items()}
    assert torch.equal(files[f"model.layers.{L + 1}.embed_tokens.weight"], model.embed_tokens.weight)
    assert torch.equal(files[f"model.layers.{L + 1}.shared_head.head.weight"], model.lm_head.weight)
    assert torch.equal(files[f"model.layers.{L}.eh_proj.weight"], model.mtp[0].eh_proj.weight)

    loaded = seekstack.load_pretrained(tmp_path).eval()
    assert len(loaded.mtp) == 2 and loaded.config.num_nextn_predict_layers == 2
    assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(INPUT_IDS, labels=INPUT_IDS).mtp_loss, model(INPUT_IDS, labels=INPUT_IDS).mtp_loss)


def test_config_promising_mtp_without_mtp_weights_loads_without_mtp(tmp_path):
    model = random_model(num_nextn_predict_layers=0)
    seekstack.save_pretrained(model, tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config.update(num_nextn_predict_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = seekstack.load_pretrained(tmp_path)
    assert len(loaded.mtp) == 0 and loaded.config.num_nextn_predict_layers == 0
    assert torch.equal(logits(loaded, INPUT_IDS), logits(model, INPUT_IDS))


def test_config_promising_more_mtp_layers_than_stored_loads_those_stored(tmp_path):
    model = random_model(num_nextn_predict_layers=1)
    seekstack.save_pretrained(model, tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        config.update(num_nextn_predict_layers=3)
    loaded = seekstack.load_pretrained(tmp_path)
    assert len(loaded.mtp) == 1
    assert_same_state(model, loaded)


# ------------------------------------------------------------------ FP8
def e4m3_error_bound(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Largest rounding error per element: 1/16 of the value, or half a subnormal step of its block's scale."""
    rows, cols = weight.shape
    scale = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.abs() * E4M3_RELATIVE_STEP + scale * E4M3_SMALLEST_STEP / 2 + 1e-12


def test_fp8_round_trip_error_is_within_e4m3_precision_of_each_block():
    weight = torch.randn(256, 384) * torch.logspace(-3, 1, 384)  # magnitudes spanning four decades
    quantized, scale_inv = quantize_fp8(weight)
    restored = dequantize_fp8(quantized, scale_inv, (128, 128))
    error = (restored - weight).abs()
    assert (error <= e4m3_error_bound(weight, scale_inv)).all()
    assert error.max() <= scale_inv.max() * 16  # half the e4m3 spacing (32) next to its largest value 448
    assert (error.mean() / weight.abs().mean()).item() < 0.03


def test_fp8_edge_blocks_are_quantized_with_their_own_scale():
    rows, cols = 200, 300  # neither a multiple of 128: the last row and column blocks are partial
    magnitude = torch.tensor([[1.0, 10.0, 1e3], [1e-2, 1e2, 1e-4]])  # one scale per block, far apart
    weight = torch.randn(rows, cols) * magnitude.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    quantized, scale_inv = quantize_fp8(weight)
    assert quantized.shape == (rows, cols) and quantized.dtype == torch.float8_e4m3fn
    assert scale_inv.shape == (math.ceil(rows / 128), math.ceil(cols / 128)) and scale_inv.dtype == torch.float32
    for i, j in [(0, 0), (1, 2), (0, 2), (1, 0)]:
        block = weight[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
        assert scale_inv[i, j].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    restored = dequantize_fp8(quantized, scale_inv, (128, 128))
    assert restored.shape == (rows, cols)
    assert ((restored - weight).abs() <= e4m3_error_bound(weight, scale_inv)).all()


def test_fp8_blocks_that_are_not_square_take_rows_by_the_first_size_and_columns_by_the_second():
    rows, cols, block = 100, 300, (32, 128)  # 4 x 3 blocks, the last of each partial
    magnitude = torch.logspace(-3, 3, 12).view(4, 3)  # one scale per block, far apart
    weight = torch.randn(rows, cols) * magnitude.repeat_interleave(32, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    quantized, scale_inv = quantize_fp8(weight, block)
    assert scale_inv.shape == (4, 3)
    for i, j in [(0, 0), (3, 2), (1, 2), (3, 0)]:
        part = weight[32 * i : 32 * (i + 1), 128 * j : 128 * (j + 1)]
        assert scale_inv[i, j].item() == pytest.approx(part.abs().max().item() / 448, rel=1e-6)
    restored = dequantize_fp8(quantized, scale_inv, block)
    assert ((restored - weight).abs() <= e4m3_error_bound(weight, scale_inv, block)).all()


def test_a_block_longer_than_the_weight_is_one_partial_block_without_padding_the_weight_to_it():
    """quantize_fp8 padded a weight to whole blocks and dequantize_fp8 expanded the scales to them, so a block longer
    than a weight's sides took the block's memory: `seekstack quantize` with fp8_block [100000, 100000] failed
    allocating 40 GB for a (64, 96) down_proj. One partial block covers such a side, with the same scale."""
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    huge = (2**20, 2**20)  # padded, a 4 TiB float32 matrix
    q, scale = quantize_fp8(weight, huge)
    q_whole, scale_whole = quantize_fp8(weight, (48, 80))
    assert scale.shape == (1, 1) and torch.equal(scale, scale_whole)
    assert scale.item() == (weight.abs().max() / 448).item()
    assert torch.equal(q.float(), q_whole.float())
    assert torch.equal(dequantize_fp8(q, scale, huge), dequantize_fp8(q_whole, scale_whole, (48, 80)))
    rows_only = (2**20, 32)  # one block of rows, three of columns (the last partial)
    q, scale = quantize_fp8(weight, rows_only)
    assert scale.shape == (1, 3) and scale[0, 2].item() == (weight[:, 64:].abs().max() / 448).item()
    assert torch.equal(dequantize_fp8(q, scale, rows_only), dequantize_fp8(*quantize_fp8(weight, (48, 32)), (48, 32)))


@pytest.mark.parametrize("shape", [(0, 200), (200, 0), (0, 0)])
def test_an_empty_weight_quantizes_to_fp8_with_no_scales_along_its_empty_side(shape):
    """Cutting the block to a weight's sides made a side of 0 a block of 0 (ZeroDivisionError in quantize_fp8)."""
    quantized, scale_inv = quantize_fp8(torch.zeros(shape))
    assert quantized.shape == shape and quantized.dtype == torch.float8_e4m3fn
    assert scale_inv.shape == {(0, 200): (0, 2), (200, 0): (2, 0), (0, 0): (0, 0)}[shape]
    assert dequantize_fp8(quantized, scale_inv, (128, 128)).shape == shape


FP8_SHAPES = dict(hidden_size=160, intermediate_size=300, moe_intermediate_size=136, q_lora_rank=144)  # crosses 128


@pytest.mark.parametrize("block", [(0, 128), (128,), (128.0, 128), (-1, 64)])
def test_an_fp8_block_that_is_not_two_positive_integers_is_refused_before_anything_is_written(tmp_path, block):
    """(0, 128) raised ZeroDivisionError from inside the quantizer."""
    with pytest.raises(ValueError, match=r"fp8_block=.*two positive integers \(rows, columns\)"):
        seekstack.save_pretrained(random_model(), tmp_path / "out", fp8_block=block)
    assert not (tmp_path / "out").exists()


def test_fp8_save_writes_e4m3_weights_with_block_scales_and_a_quantization_config(tmp_path):
    model = random_model(**FP8_SHAPES)
    seekstack.save_pretrained(model, tmp_path, fp8_block=(128, 128))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
    }  # fmt: skip
    with safe_open(tmp_path / SINGLE_FILE, "pt") as handle:
        checked = 0
        for key in handle.keys():
            if key.endswith("_scale_inv"):
                continue
            tensor = handle.get_tensor(key)
            if tensor.dtype != torch.float8_e4m3fn:
                continue
            scale = handle.get_tensor(key + "_scale_inv")
            assert scale.dtype == torch.float32
            assert scale.shape == (math.ceil(tensor.shape[0] / 128), math.ceil(tensor.shape[1] / 128)), key
            checked += 1
        gate_proj = handle.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv")
    assert gate_proj.shape == (3, 2)  # (300, 160) in 128x128 blocks
    assert checked > 20


def test_fp8_save_of_stacked_experts_stores_them_in_e4m3_and_loads_as_the_per_expert_save(tmp_path):
    model = random_model(**FP8_SHAPES)
    seekstack.save_pretrained(model, tmp_path / "stacked", fp8_block=(128, 128), stacked_experts=True)
    seekstack.save_pretrained(model, tmp_path / "per_expert", fp8_block=(128, 128))
    keys = stored_keys(tmp_path / "stacked")
    experts = "model.layers.1.mlp.experts"  # 8 experts of (136, 160): gate_up (8, 272, 160), down (8, 160, 136)
    assert keys[f"{experts}.gate_up_proj.weight"] == keys[f"{experts}.down_proj.weight"] == "F8_E4M3"
    with safe_open(tmp_path / "stacked" / SINGLE_FILE, "pt") as handle:
        assert handle.get_slice(f"{experts}.gate_up_proj.weight_scale_inv").get_shape() == [8, 4, 2]  # 2 x 2 blocks
        assert handle.get_slice(f"{experts}.down_proj.weight_scale_inv").get_shape() == [8, 2, 2]
    stacked, per_expert = (seekstack.load_pretrained(tmp_path / name).eval() for name in ("stacked", "per_expert"))
    assert torch.equal(logits(stacked, INPUT_IDS), logits(per_expert, INPUT_IDS))


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_dequantize_reads_stacked_quantized_experts_as_their_per_expert_save(tmp_path, scheme):
    model = random_model(**FP8_SHAPES) if scheme == "fp8" else random_model()
    if scheme != "fp8":
        quantize_model(model, QuantConfig(scheme=scheme))
    fp8_block = (128, 128) if scheme == "fp8" else None
    for layout, stacked_experts in (("stacked", True), ("per_expert", False)):
        seekstack.save_pretrained(model, tmp_path / layout, fp8_block=fp8_block, stacked_experts=stacked_experts)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" not in stored_keys(tmp_path / "stacked")
    stacked, per_expert = (
        seekstack.load_pretrained(tmp_path / name, dequantize=True) for name in ("stacked", "per_expert")
    )
    experts = stacked.layers[1].mlp.experts
    assert type(experts) is RoutedExperts and experts.gate_up_proj.dtype == torch.float32
    assert_same_state(stacked, per_expert)
    quantized = seekstack.load_pretrained(tmp_path / "stacked").layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj, quantized.gate_up_proj.dequantize())
    assert torch.equal(experts.down_proj, quantized.down_proj.dequantize())


def test_fp8_save_quantizes_the_matrices_deepseeks_fp8_release_quantizes(tmp_path):
    """DeepSeek-V3's release stores every attention and FFN projection of a block in e4m3 (kv_a_proj_with_mqa
    included, e.g. [576, 7168] with a [5, 56] scale), the MTP block's too, and keeps embeddings, head, norms,
    the gate and MTP's eh_proj (a plain Linear in vLLM's DeepSeekMTP) in high precision.
    """
    seekstack.save_pretrained(random_model(num_nextn_predict_layers=1), tmp_path, fp8_block=(128, 128))
    keys = stored_keys(tmp_path)
    attention = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    quantized = [f"model.layers.{i}.self_attn.{name}.weight" for i in (0, 1, 3) for name in attention]
    quantized += [f"model.layers.0.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")]
    quantized += ["model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"]
    quantized += ["model.layers.3.mlp.experts.0.gate_proj.weight"]  # the MTP module's block
    for key in quantized:
        assert keys[key] == "F8_E4M3" and keys[key + "_scale_inv"] == "F32", key
    kept = [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight", "model.layers.3.embed_tokens.weight",
    ]  # fmt: skip
    for key in kept:
        assert keys[key] == "F32" and key + "_scale_inv" not in keys, key


def test_fp8_checkpoint_loads_to_exactly_the_dequantized_weights(tmp_path):
    model = random_model(**FP8_SHAPES)
    seekstack.save_pretrained(model, tmp_path, fp8_block=(128, 128))
    loaded = seekstack.load_pretrained(tmp_path, dequantize=True)
    expected = dequantize_fp8(*quantize_fp8(model.layers[0].mlp.gate_proj.weight), (128, 128))
    assert torch.equal(loaded.layers[0].mlp.gate_proj.weight, expected)
    expert = model.layers[1].mlp.experts.gate_up_proj[5]  # gate and up are quantized as separate matrices
    gate, up = expert.chunk(2)
    expected = torch.cat([dequantize_fp8(*quantize_fp8(w), (128, 128)) for w in (gate, up)])
    assert torch.equal(loaded.layers[1].mlp.experts.gate_up_proj[5], expected)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)  # never quantized
    assert torch.equal(
        loaded.layers[1].mlp.gate.e_score_correction_bias, model.layers[1].mlp.gate.e_score_correction_bias
    )


def test_fp8_checkpoint_logits_stay_close_to_the_float_model(tmp_path):
    """e4m3 rounding moves each quantized matrix by about 2.7% (Frobenius, measured for Gaussian weights).
    A freshly initialised model passes that through a handful of matrices in series and a few routing
    choices; we allow 15% relative error in the logits (5-7% is observed over seeds). A scale applied inverted,
    or not at all, is off by a factor of up to 448^2, far outside it; misplaced blocks are caught exactly
    by the dequantization test above."""
    model = Transformer(micro_config(**FP8_SHAPES)).eval()  # the usual N(0, 0.02) initialisation
    with torch.no_grad():
        for name, bias in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                bias.uniform_(-0.5, 0.5)
    seekstack.save_pretrained(model, tmp_path, fp8_block=(128, 128))
    reference, quantized = logits(model, INPUT_IDS), logits(seekstack.load_pretrained(tmp_path), INPUT_IDS)
    relative = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.15


def test_a_dequantized_fp8_checkpoint_saves_as_plain_float(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path / "fp8", fp8_block=(128, 128))
    seekstack.save_pretrained(seekstack.load_pretrained(tmp_path / "fp8", dequantize=True), tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    assert set(stored_keys(tmp_path / "float").values()) == {"F32"}


# ------------------------------------------------------------------ errors name the file and the key
@pytest.fixture
def saved(tmp_path) -> Path:
    directory = tmp_path / "ckpt"
    seekstack.save_pretrained(random_model(num_nextn_predict_layers=0), directory)
    return directory


def load_error(directory: Path) -> str:
    """The message of the CheckpointError that loading `directory` raises; it never points at command-line flags."""
    with pytest.raises(CheckpointError) as error:
        seekstack.load_pretrained(directory)
    message = str(error.value)
    assert "--" not in message, message
    return message


DAMAGES = {
    "empty": lambda content: b"",
    "truncated": lambda content: content[: len(content) // 2],
    "header-only": lambda content: content[:12],
    "garbage": lambda content: bytes(range(256)) * 4,
}


def test_a_lora_adapter_given_as_a_checkpoint_is_named_as_one_with_what_to_give_instead(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    message = load_error(tmp_path)
    assert message.startswith(f"{tmp_path}: a LoRA adapter (adapter_config.json), not a model checkpoint")
    assert "give its base model with the adapter" in message and "`seekstack lora merge`" in message


def test_missing_shard_named_in_the_index_is_reported_with_the_index_and_the_shard(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    missing = sorted(tmp_path.glob("model-*.safetensors"))[1]
    missing.unlink()
    message = load_error(tmp_path)
    assert message.startswith(str(tmp_path / INDEX_FILE)) and repr(missing.name) in message
    assert "re-download" in message


def test_missing_key_is_reported_with_the_file_and_the_key(saved):
    tensors = load_file(saved / SINGLE_FILE)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, saved / SINGLE_FILE)
    with pytest.raises(CheckpointError) as error:
        seekstack.load_pretrained(saved)
    assert str(saved / SINGLE_FILE) in str(error.value)
    assert "'model.layers.1.mlp.experts.3.up_proj.weight'" in str(error.value)


@pytest.mark.parametrize("stacked_experts", [True, False], ids=["stacked", "per-expert"])
def test_missing_routed_experts_are_reported_with_their_key_in_either_layout(tmp_path, stacked_experts):
    seekstack.save_pretrained(random_model(), tmp_path, stacked_experts=stacked_experts)
    stack, first_expert = "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.0.down_proj.weight"
    tensors = load_file(tmp_path / SINGLE_FILE)
    del tensors[stack if stacked_experts else first_expert]
    save_file(tensors, tmp_path / SINGLE_FILE)
    assert load_error(tmp_path).startswith(
        f"{tmp_path / SINGLE_FILE}: missing key {stack!r} (routed experts stacked) or {first_expert!r} (per expert); "
    )


def test_shape_mismatch_is_reported_with_the_file_the_key_and_both_shapes(saved):
    tensors = load_file(saved / SINGLE_FILE)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, saved / SINGLE_FILE)
    with pytest.raises(CheckpointError) as error:
        seekstack.load_pretrained(saved)
    message = str(error.value)
    assert str(saved / SINGLE_FILE) in message and repr(key) in message
    assert "(127, 16)" in message and "(128, 16)" in message


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # more than the 8 routed experts
        ({"n_group": 3}, "n_group"),  # does not divide the 8 experts
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 0.5}}, "rope_scaling.factor"),
        ({"quantization_config": "fp8"}, "quantization_config"),
    ],
    ids=[
        "unknown-model-type",
        "top-k-above-experts",
        "groups-not-dividing",
        "odd-rope-dim",
        "string-size",
        "yarn-shrink",
        "quantization-not-an-object",
    ],
)
def test_bad_config_json_is_reported_with_the_file_and_the_field(saved, changes, field):
    with edited_json(saved / CONFIG_FILE) as config:
        config.update(**changes)
    with pytest.raises(ConfigError) as error:
        seekstack.load_pretrained(saved)
    assert str(saved / "config.json") in str(error.value) and field in str(error.value)


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_safetensors_file_is_named_with_what_to_do(saved, damage):
    weights = saved / SINGLE_FILE
    weights.write_bytes(damage(weights.read_bytes()))
    message = load_error(saved)
    assert message.startswith(f"{weights}: not a valid safetensors file")
    assert "truncated or damaged" in message and "re-save or re-download the checkpoint" in message


def test_damaged_shard_of_a_sharded_checkpoint_is_named(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    assert load_error(tmp_path).startswith(f"{shard}: not a valid safetensors file")


def test_a_git_lfs_pointer_in_place_of_a_shard_is_named_as_one_with_how_to_fetch_the_weights(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]  # what `git clone` without Git LFS leaves
    shard.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize 40000\n")
    message = load_error(tmp_path)
    assert message.startswith(f"{shard}: a Git LFS pointer (")
    assert "cloned without Git LFS" in message and "`git lfs pull`" in message


@pytest.mark.parametrize(
    "content",
    [b"", b'{"weight_map": {"a": ', b"\xff\xfe\x00garbage", b"[]", b"{}", b'{"weight_map": {"lm_head.weight": null}}'],
)
def test_damaged_index_is_named(tmp_path, content):
    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    (tmp_path / INDEX_FILE).write_bytes(content)
    message = load_error(tmp_path)
    assert message.startswith(str(tmp_path / INDEX_FILE)) and "re-save or re-download the checkpoint" in message


@pytest.mark.parametrize("outside", ["../other/{shard}", "{other}/{shard}", "../ckpt/{shard}"])
def test_an_index_naming_a_shard_outside_its_folder_is_refused_naming_the_index_the_key_and_the_file(tmp_path, outside):
    """transformers joins the folder and the index's file name, so a weight_map naming "../other/model-00001-of-N"
    reads another folder's shard; seekstack loaded it unsaid, or (the folder's own shard named twice, by two
    paths) refused it as "key ... is stored in both ...". It refuses a shard path leaving the folder."""
    seekstack.save_pretrained(random_model(), tmp_path / "ckpt", max_shard_bytes=40_000)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "other")
    index = json.loads((tmp_path / "ckpt" / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    named = outside.format(other=tmp_path / "other", shard=first)
    index["weight_map"] = {key: named if file == first else file for key, file in index["weight_map"].items()}
    (tmp_path / "ckpt" / INDEX_FILE).write_text(json.dumps(index))
    key = next(key for key, file in index["weight_map"].items() if file == named)
    assert load_error(tmp_path / "ckpt") == (
        f"{tmp_path / 'ckpt' / INDEX_FILE}: weight_map gives key {key!r} the file {named!r}, outside "
        f"{tmp_path / 'ckpt'}; an index names the shards of its own folder: copy that shard into it, or re-save or "
        "re-download the checkpoint"
    )


@pytest.mark.parametrize("content", [b"", b"{'model_type': 'deepseek_v3'", b"\x89PNG\r\n\x1a\n\x00\xff", b"[1, 2]"])
def test_config_json_that_is_not_a_json_object_is_named_with_what_to_do(saved, content):
    (saved / "config.json").write_bytes(content)
    message = load_error(saved)
    assert message.startswith(f"{saved / 'config.json'}: ") and "re-save or re-download the checkpoint" in message


def test_missing_config_json_is_named(saved):
    (saved / "config.json").unlink()
    assert load_error(saved).startswith(f"{saved / 'config.json'}: no such file; ")


def test_missing_weights_are_named_with_the_folder(saved):
    (saved / SINGLE_FILE).unlink()
    assert load_error(saved).startswith(f"{saved}: no {SINGLE_FILE} or {INDEX_FILE}; ")


@pytest.mark.parametrize(
    "files", [["pytorch_model.bin"], ["pytorch_model-00001-of-00001.bin", "pytorch_model.bin.index.json"]]
)
def test_pickled_weights_are_named_as_such_with_how_to_convert_them(saved, files):
    tensors = load_file(saved / SINGLE_FILE)  # transformers' save_pretrained(safe_serialization=False) layout
    (saved / SINGLE_FILE).unlink()
    torch.save(tensors, saved / files[0])
    if len(files) > 1:
        (saved / files[1]).write_text(json.dumps({"weight_map": dict.fromkeys(tensors, files[0])}))
    message = load_error(saved)
    assert message.startswith(f"{saved}: its weights are PyTorch pickle files ({', '.join(files)}), ")
    assert f"M.from_pretrained('{saved}', dtype='auto').save_pretrained('{saved}-safetensors')" in message


def test_a_hugging_face_hub_id_is_refused_with_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # transformers' from_pretrained would download it; seekstack reads folders
    assert load_error("deepseek-ai/DeepSeek-V2-Lite") == (
        "deepseek-ai/DeepSeek-V2-Lite: no such folder; a checkpoint is a folder holding config.json and safetensors "
        "weights; if it names a Hugging Face Hub repository, download it first (`hf download "
        "deepseek-ai/DeepSeek-V2-Lite` prints the folder it downloads to) and give that folder"
    )
    assert "Hub" not in load_error(tmp_path / "nowhere")


def test_missing_folder_is_named(tmp_path):
    assert load_error(tmp_path / "nowhere").startswith(f"{tmp_path / 'nowhere'}: no such folder; ")
    (tmp_path / "file").write_text("")
    assert load_error(tmp_path / "file").startswith(f"{tmp_path / 'file'}: not a folder; ")


def test_fp8_weight_without_its_scale_is_reported_with_the_file_and_the_key(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path, fp8_block=(128, 128))
    tensors = load_file(tmp_path / SINGLE_FILE)
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(CheckpointError) as error:
        seekstack.load_pretrained(tmp_path)
    assert str(tmp_path / SINGLE_FILE) in str(error.value)
    assert "'model.layers.0.self_attn.o_proj.weight_scale_inv'" in str(error.value)


@pytest.mark.parametrize(
    "dtype, stored", [(torch.int32, "I32"), (torch.uint8, "U8"), (torch.bool, "BOOL"), (torch.float8_e5m2, "F8_E5M2")]
)
def test_a_weight_stored_in_no_float_dtype_is_refused_naming_the_file_the_key_and_the_dtype(saved, dtype, stored):
    tensors = load_file(saved / SINGLE_FILE)
    tensors[O_PROJ] = (tensors[O_PROJ] * 100).to(dtype)
    save_file(tensors, saved / SINGLE_FILE)
    assert load_error(saved).startswith(f"{saved / SINGLE_FILE}: key {O_PROJ!r} is stored as {stored}, but ")


def test_unused_checkpoint_keys_are_reported_in_a_warning(saved):
    tensors = load_file(saved / SINGLE_FILE)
    tensors["model.layers.0.mlp.surplus.weight"] = torch.zeros(2)
    save_file(tensors, saved / SINGLE_FILE)
    with pytest.warns(UserWarning, match=r"1 checkpoint keys were not used.*model\.layers\.0\.mlp\.surplus\.weight"):
        seekstack.load_pretrained(saved)


def test_the_unused_keys_warning_names_the_shards_that_hold_them(tmp_path):
    """It named the folder alone ("DIR: 2 checkpoint keys were not used, e.g. [...]"): of a checkpoint of several
    shards, which ones hold the keys to look into was left to find."""
    seekstack.save_pretrained(random_model(), tmp_path, max_shard_bytes=40_000)
    with edited_json(tmp_path / INDEX_FILE) as index:
        shards = sorted(set(index["weight_map"].values()))
        for number, shard in enumerate(shards[:2]):
            tensors = load_file(tmp_path / shard)
            save_file(tensors | {f"model.layers.0.mlp.surplus_{number}.weight": torch.zeros(2)}, tmp_path / shard)
            index["weight_map"][f"model.layers.0.mlp.surplus_{number}.weight"] = shard
    with pytest.warns(UserWarning) as caught:
        seekstack.load_pretrained(tmp_path)
    [message] = [str(warning.message) for warning in caught if "not used" in str(warning.message)]
    assert message.startswith(
        f"{tmp_path}: 2 checkpoint keys were not used (1 in {shards[0]}, 1 in {shards[1]}), e.g. "
        "['model.layers.0.mlp.surplus_0.weight', 'model.layers.0.mlp.surplus_1.weight']"
    )


# ------------------------------------------------------------------ interrupted saves
class ShardWriteFailure(RuntimeError):
    pass


def fail_on_second_shard(monkeypatch) -> list[str]:
    written: list[str] = []

    save_aligned = seekstack.checkpoint.save.save_aligned

    def save_then_fail(tensors, path):
        if written:
            raise ShardWriteFailure("disk full")
        save_aligned(tensors, path)
        written.append(path)

    monkeypatch.setattr(seekstack.checkpoint.save, "save_aligned", save_then_fail)
    return written


def test_interrupted_save_leaves_the_existing_checkpoint_intact_and_no_temporary_files(tmp_path, monkeypatch):
    old = random_model()
    seekstack.save_pretrained(old, tmp_path / "ckpt")
    before = digest(tmp_path / "ckpt")
    written = fail_on_second_shard(monkeypatch)

    with pytest.raises(ShardWriteFailure):
        seekstack.save_pretrained(random_model(), tmp_path / "ckpt", max_shard_bytes=40_000)

    assert len(written) == 1  # it did fail midway, after a shard was on disk
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert digest(tmp_path / "ckpt") == before
    assert_same_state(old, seekstack.load_pretrained(tmp_path / "ckpt"))


def test_interrupted_first_save_creates_nothing(tmp_path, monkeypatch):
    fail_on_second_shard(monkeypatch)
    with pytest.raises(ShardWriteFailure):
        seekstack.save_pretrained(random_model(), tmp_path / "ckpt", max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ dtypes
def test_bfloat16_load_gives_bfloat16_weights_and_keeps_the_routing_bias_float32(tmp_path):
    model = random_model()
    seekstack.save_pretrained(model, tmp_path)
    loaded = seekstack.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    biases = {n: b for n, b in loaded.named_buffers() if n.endswith("e_score_correction_bias")}
    assert len(biases) == 3  # two MoE layers and the MoE block of the MTP module
    for name, bias in biases.items():
        assert bias.dtype == torch.float32
        assert torch.equal(bias, model.get_buffer(name))  # not rounded through bfloat16 on the way
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.bfloat16())
    reference = logits(model, INPUT_IDS)
    assert ((logits(loaded, INPUT_IDS).float() - reference).norm() / reference.norm()).item() < 0.05


def test_transformers_trust_remote_code_and_low_cpu_mem_usage_are_taken_without_effect(tmp_path):
    """load_pretrained(dir, trust_remote_code=True, torch_dtype=...), DeepSeek's model cards' from_pretrained keywords,
    was a TypeError ('unexpected keyword argument 'trust_remote_code''), as was low_cpu_mem_usage."""
    model = random_model()
    seekstack.save_pretrained(model, tmp_path)
    carded = seekstack.load_pretrained(tmp_path, trust_remote_code=True, low_cpu_mem_usage=True, torch_dtype="float32")
    assert_same_state(model, carded)
    assert_same_state(model, seekstack.load_pretrained(tmp_path, trust_remote_code=False, low_cpu_mem_usage=False))


def test_dtype_given_by_name_loads_in_that_dtype_and_auto_in_the_one_the_config_states(tmp_path):
    seekstack.save_pretrained(random_model().bfloat16(), tmp_path / "bfloat16")
    seekstack.save_pretrained(random_model(), tmp_path / "float32")
    seekstack.save_pretrained(random_model().double(), tmp_path / "float64")
    with edited_json(tmp_path / "float32" / CONFIG_FILE) as config:  # a config stating no dtype: float32
        config.update(dtype=None, torch_dtype=None)
    for folder, dtype, expected in [
        ("float32", "bfloat16", torch.bfloat16),
        ("float32", "float16", torch.float16),
        ("bfloat16", "float32", torch.float32),
        ("bfloat16", "auto", torch.bfloat16),
        ("float32", "auto", torch.float32),
        ("float32", torch.float64, torch.float64),
        ("float32", "float64", torch.float64),  # any torch dtype's name, as transformers reads a string
        ("float32", "half", torch.float16),
        ("float64", "auto", torch.float64),
    ]:
        loaded = seekstack.load_pretrained(tmp_path / folder, dtype=dtype)
        assert loaded.embed_tokens.weight.dtype == expected, (folder, dtype)
    refused = ("bf16", "int8", "float8_e4m3fn", "torch.float32", "Tensor", torch.int8, torch.float8_e4m3fn)
    for wrong in (*refused, torch.float8_e5m2):
        with pytest.raises(ValueError, match=r"dtype=.*: .* torch float dtype or its name in torch \(float32, bf"):
            seekstack.load_pretrained(tmp_path / "float32", dtype=wrong)


def test_auto_dtype_of_a_config_stating_none_is_the_one_its_weights_are_stored_in_as_transformers_takes_it(tmp_path):
    """transformers' dtype="auto" takes a dtype config.json does not state from the weights; ours loaded float32."""
    from transformers import AutoModelForCausalLM

    seekstack.save_pretrained(random_model().bfloat16(), tmp_path)
    with edited_json(tmp_path / CONFIG_FILE) as config:
        del config["dtype"], config["torch_dtype"]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    loaded = seekstack.load_pretrained(tmp_path, dtype="auto")
    assert loaded.embed_tokens.weight.dtype == reference.model.embed_tokens.weight.dtype == torch.bfloat16


def test_torch_dtype_the_name_transformers_users_write_loads_in_that_dtype(tmp_path):
    """AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16) still loads in transformers 5; ours
    raised TypeError: load_pretrained() got an unexpected keyword argument 'torch_dtype'."""
    seekstack.save_pretrained(random_model().bfloat16(), tmp_path / "bfloat16")
    for torch_dtype, expected in [(torch.float16, torch.float16), ("float32", torch.float32), ("auto", torch.bfloat16)]:
        loaded = seekstack.load_pretrained(tmp_path / "bfloat16", torch_dtype=torch_dtype)
        assert loaded.embed_tokens.weight.dtype == expected, torch_dtype


def test_saved_config_names_the_dtype_of_the_saved_weights_not_the_dtype_it_was_loaded_from(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path / "float32")
    with edited_json(tmp_path / "float32" / CONFIG_FILE) as config:  # as transformers 5 writes it
        config.update(dtype="float32")
    loaded = seekstack.load_pretrained(tmp_path / "float32", dtype=torch.bfloat16)
    seekstack.save_pretrained(loaded, tmp_path / "bfloat16")
    config = json.loads((tmp_path / "bfloat16" / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("bfloat16", "bfloat16")
    assert set(stored_keys(tmp_path / "bfloat16").values()) == {"BF16", "F32"}  # F32: the routing biases


# ------------------------------------------------------------------ memory-mapped loading
def test_weights_stored_in_the_loaded_dtype_are_memory_mapped_from_the_checkpoint(tmp_path):
    model = random_model()
    seekstack.save_pretrained(model, tmp_path)
    loaded = seekstack.load_pretrained(tmp_path)
    assert mapped_file(loaded.embed_tokens.weight) == tmp_path / SINGLE_FILE
    assert mapped_file(loaded.layers[0].self_attn.o_proj.weight) == tmp_path / SINGLE_FILE
    per_expert = loaded.layers[1].mlp.experts.gate_up_proj  # stacked from per-expert keys: a copy
    assert mapped_file(per_expert) is None
    assert mapped_file(seekstack.load_pretrained(tmp_path, dtype=torch.bfloat16).embed_tokens.weight) is None


def file_offsets(path: Path) -> dict[str, int]:
    """Where each tensor of safetensors file `path` starts, in bytes into the file (from its header)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    return {key: 8 + length + entry["data_offsets"][0] for key, entry in header.items() if key != "__metadata__"}


def test_a_checkpoint_with_unaligned_tensors_loads_parts_placed_on_disk_as_file_pages_only(tmp_path):
    from seekstack.infer.placement import offload_while_loading, units

    model = random_model()
    seekstack.save_pretrained(model, tmp_path / "ours")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
    save_file(load_file(tmp_path / "ours" / SINGLE_FILE), tmp_path / "theirs" / SINGLE_FILE)  # 8-byte aligned only
    assert file_offsets(tmp_path / "theirs" / SINGLE_FILE)["model.embed_tokens.weight"] % 64 != 0
    offload = offload_while_loading("*=disk", tmp_path / "offload")
    loaded = seekstack.load_pretrained(tmp_path / "theirs", offload=offload)
    parts = units(loaded).values()  # the units a device map places: all of them on disk
    held = [tensor.shape for part in parts for tensor in part.state_dict().values() if mapped_file(tensor) is None]
    assert held == []  # none cloned into memory for being unaligned: mapped as stored or written to a copy
    assert mapped_file(loaded.embed_tokens.weight).parent == tmp_path / "offload" / "embed_tokens"
    assert_same_state(loaded, model)
    assert_same_state(seekstack.load_pretrained(tmp_path / "theirs"), model)  # kept in memory: copied, as aligned


def test_writing_to_a_memory_mapped_weight_leaves_the_checkpoint_unchanged(tmp_path):
    seekstack.save_pretrained(random_model(), tmp_path)
    before = digest(tmp_path)
    loaded = seekstack.load_pretrained(tmp_path)
    with torch.no_grad():
        loaded.embed_tokens.weight.add_(1)
    assert digest(tmp_path) == before
    assert torch.equal(seekstack.load_pretrained(tmp_path).embed_tokens.weight + 1, loaded.embed_tokens.weight)


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_stacked_experts_layout_stores_one_tensor_per_stack_and_loads_them_mapped(tmp_path, scheme):
    model = random_model()
    if scheme:
        quantize_model(model, QuantConfig(scheme=scheme))
    seekstack.save_pretrained(model, tmp_path, stacked_experts=True)
    keys = stored_keys(tmp_path)
    assert not any(".experts.0." in key for key in keys)
    suffix = ".weight" if scheme else ""
    assert f"model.layers.1.mlp.experts.gate_up_proj{suffix}" in keys
    loaded = seekstack.load_pretrained(tmp_path)
    experts = loaded.layers[1].mlp.experts
    stack = experts.gate_up_proj.weight if scheme else experts.gate_up_proj
    assert mapped_file(stack) == tmp_path / SINGLE_FILE
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded, INPUT_IDS), logits(model, INPUT_IDS))


def test_a_model_written_part_by_part_equals_the_model_written_whole(tmp_path):
    model = random_model(num_nextn_predict_layers=0)
    quantize_model(model, QuantConfig(scheme="int8"))
    parts = ["embed_tokens", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "lm_head"]
    tensors = (pair for part in parts for pair in checkpoint_tensors(model, stacked_experts=True, part=part))
    (tmp_path / "parts").mkdir()
    write_shards(tensors, tmp_path / "parts", max_shard_bytes=20_000)
    write_config(model, tmp_path / "parts", stacked_experts=True)
    seekstack.save_pretrained(model, tmp_path / "whole", stacked_experts=True)
    assert (tmp_path / "parts" / INDEX_FILE).exists()
    assert stored_keys(tmp_path / "parts") == stored_keys(tmp_path / "whole")
    assert_same_state(seekstack.load_pretrained(tmp_path / "parts"), seekstack.load_pretrained(tmp_path / "whole"))


def test_config_counting_fewer_layers_than_the_weights_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (saved / "config.json").write_text(json.dumps(config))
    message = load_error(saved)
    assert message.startswith(str(saved / "config.json")) and "num_hidden_layers is 1" in message
    assert "decoder layer 1" in message


def test_config_counting_more_layers_than_the_weights_is_refused_naming_the_first_missing_before_any_read(
    saved, monkeypatch
):
    config = json.loads((saved / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers + 2
    (saved / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(CheckpointReader, "read", lambda *args, **kwargs: pytest.fail("a tensor was read"))
    message = load_error(saved)
    assert message.startswith(f"{saved / 'config.json'}: num_hidden_layers is {layers + 2}, but {saved / SINGLE_FILE}")
    assert f"holds no key of layer {layers} " in message and f"they hold {layers} decoder layers" in message
    with pytest.raises(CheckpointError, match=f"holds no key of layer {layers} "):
        refuse_unstored_keys(saved)


def test_plans_check_takes_a_transformers_moe_layout_that_loading_takes(tmp_path):
    """moe_layer_freq 2 over routers in every layer from first_k_dense_replace on (transformers' layout, which ignores
    it) loads in that layout; seekstack plan's check refused it as missing layer 1's dense feed-forward."""
    seekstack.save_pretrained(Transformer(micro_config(num_hidden_layers=3, moe_layer_freq=1)), tmp_path)
    with edited_json(tmp_path / "config.json") as config:
        config["moe_layer_freq"] = 2
    with pytest.warns(UserWarning, match="moe_layer_freq is 2, but the weights hold routed experts in every layer"):
        assert seekstack.load_pretrained(tmp_path).config.moe_layer_freq == 1
        refuse_unstored_keys(tmp_path)


def test_weights_missing_a_layer_before_others_are_refused_as_damaged_not_as_the_configs_count(saved):
    tensors = load_file(saved / SINGLE_FILE)
    save_file(
        {key: tensor for key, tensor in tensors.items() if not key.startswith("model.layers.1.")}, saved / SINGLE_FILE
    )
    message = load_error(saved)
    assert (
        message.startswith(f"{saved / SINGLE_FILE}: missing key 'model.layers.1.")
        and "num_hidden_layers" not in message
    )


def test_config_counting_an_mtp_layer_as_a_decoder_layer_is_refused(tmp_path):
    seekstack.save_pretrained(random_model(num_nextn_predict_layers=1), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = load_error(tmp_path)
    assert f"num_hidden_layers is {layers + 1}" in message and f"they hold {layers} decoder layers" in message


def test_mtp_layers_past_the_config_count_are_skipped_with_a_warning(tmp_path):
    seekstack.save_pretrained(random_model(num_nextn_predict_layers=1), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="checkpoint keys were not used"):
        model = seekstack.load_pretrained(tmp_path)
    assert not model.mtp


def test_loading_a_training_runs_folder_names_its_newest_checkpoint(tmp_path):
    """load_pretrained(RUN) (the folder the command line takes for its newest checkpoint) was told "RUN/config.json:
    no such file; a checkpoint keeps its config.json beside the weights: copy it from where the checkpoint came
    from"."""
    from seekstack.train.state import save_checkpoint

    save_checkpoint(tmp_path / "run", seekstack.Transformer(micro_config()), {"step": 2}, keep=1)
    with pytest.raises(CheckpointError) as refused:
        seekstack.load_pretrained(tmp_path / "run")
    assert str(refused.value) == (
        f"{tmp_path / 'run'}: a training run's folder, not a model checkpoint; its newest checkpoint is "
        f"{tmp_path / 'run' / 'checkpoints' / 'step_2'}: load that folder (the command line takes the run for it)"
    )
    (tmp_path / "run" / "checkpoints" / "step_2" / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="a training run's folder, not a model checkpoint; "):
        seekstack.load_pretrained(tmp_path / "run")
