"""`save_pretrained`: a model as a checkpoint folder (config.json and safetensors, sharded above a size, each
tensor 64-byte aligned), every tensor of the model under its checkpoint key."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from seekstack.atomic import atomic_directory, refuse_to_replace
from seekstack.checkpoint.fp8 import DEFAULT_FP8_BLOCK, _is_fp8_quantizable, quantize_fp8
from seekstack.checkpoint.keys import (
    ALIGNMENT,
    CONFIG_FILE,
    INDEX_FILE,
    KEPT_FLOAT,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    STACKED_EXPERT_PARTS,
    CheckpointError,
    checkpoint_key,
    expert_sources,
    layer_key,
)
from seekstack.checkpoint.load import warn_fp8_blocks_transformers_misreads, warn_transformers_divergences
from seekstack.checkpoint.quantized import _has_int_layers, quantization_config, quantized_layers, quantized_sources
from seekstack.compress.linear import Fp8Weight, layer_weight
from seekstack.config import ModelConfig
from seekstack.infer.generation_config import GENERATION_CONFIG_FILE
from seekstack.infer.params import BYTE_UNITS, parse_bytes
from seekstack.model.transformer import Transformer

# What a model folder written here (or by transformers' save_pretrained) holds: such a folder may be replaced whole.
MODEL_FOLDER_FILES = (
    CONFIG_FILE, GENERATION_CONFIG_FILE, "*.safetensors", INDEX_FILE, "tokenizer*.json", "special_tokens_map.json",
    "chat_template.jinja",
)  # fmt: skip
# What `save_pretrained` writes. The other files of a model folder it saves over (the tokenizer's, a generation
# config, a chat template) stay, as transformers' save_pretrained leaves them; a folder without a generation config
# gets one (`write_generation_config`).
SAVED_FILES = (CONFIG_FILE, "*.safetensors", INDEX_FILE)
QUANTIZATION_SCALES = ("weight_scale", "weight_scale_inv")  # a quantized weight's scales: no parameters of the model
MAX_SHARD_BYTES = 5 * 2**30  # the largest safetensors file before a checkpoint is split into shards


def save_pretrained(
    model: Transformer,
    directory: str | Path,
    max_shard_bytes: int | None = None,
    fp8_block: tuple[int, int] | None = None,
    stacked_experts: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`, 5 GiB where not given) as
    folder `directory`. `max_shard_size`, transformers' name, is read as it reads it: bytes, or an integer and its unit
    ("2GB", "500MiB"); given both, they must say the same size (`shard_limit`).

    With `fp8_block`, block projections are stored as e4m3 with `weight_scale_inv`, as in DeepSeek's
    FP8 release (an fp8-quantized model is stored in its own blocks, another `fp8_block` refused, and the layers its
    quantization kept stay in float; a float model's blocks too small to shrink its weights are refused, as
    `QuantConfig.refuse_growing_fp8_block` refuses them); with `stacked_experts`, routed experts in seekstack's
    memory-mappable layout. The folder is swapped in whole when complete (`atomic_directory`): an interrupted save
    never leaves a half-written checkpoint, and an existing one stays until the new one is complete; its files this
    save does not write (the tokenizer's) are kept. A config transformers computes differently
    (`ModelConfig.transformers_divergences`) is warned about, and so is an fp8 block that does not divide a weight,
    which transformers' CPU loader refuses or misreads (`warn_fp8_blocks_transformers_misreads`).
    """
    if fp8_block is not None and not (len(fp8_block) == 2 and all(type(s) is int and s > 0 for s in fp8_block)):
        raise ValueError(
            f"fp8_block={fp8_block!r}: the scale block is two positive integers (rows, columns), e.g. DeepSeek's "
            f"{DEFAULT_FP8_BLOCK}"
        )
    limit = shard_limit(max_shard_bytes, max_shard_size)
    refuse_hf_export(model.config, directory)
    refuse_to_replace(directory, MODEL_FOLDER_FILES)
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        write_pretrained_files(model, staging, limit, fp8_block, stacked_experts)
        _copy_unsaved_files(directory, staging)
    warn_transformers_divergences(model.config, directory)
    warn_fp8_blocks_transformers_misreads(directory)
    return directory


def shard_limit(max_shard_bytes: int | None, max_shard_size: int | str | None) -> int:
    """The largest shard in bytes `save_pretrained` is given: `max_shard_bytes`, or transformers' `max_shard_size`
    (`_size_bytes`), MAX_SHARD_BYTES where neither is given; ValueError naming the argument for a size that is no
    positive number of bytes (where a save would fail midway, or write each tensor in a shard of its own), or for both
    given unequal."""
    given = {}
    if max_shard_bytes is not None:
        if type(max_shard_bytes) is not int or max_shard_bytes <= 0:
            raise ValueError(
                f"max_shard_bytes={max_shard_bytes!r}: the largest shard, a positive integer of bytes (or "
                "max_shard_size='5GB', as transformers' save_pretrained takes it)"
            )
        given["max_shard_bytes"] = max_shard_bytes
    if max_shard_size is not None:
        given["max_shard_size"] = _size_bytes(max_shard_size)
    if len(set(given.values())) > 1:
        raise ValueError(
            f"max_shard_bytes={max_shard_bytes!r} beside max_shard_size={max_shard_size!r} "
            f"({given['max_shard_size']} bytes): max_shard_size is transformers' name for it: give one of them"
        )
    return next(iter(given.values()), MAX_SHARD_BYTES)


def _size_bytes(size: int | str) -> int:
    """`size` (transformers' max_shard_size) in bytes, as transformers' convert_file_size_to_int reads it: bytes, or a
    number and its unit (`parse_bytes`: binary with an "i", decimal without), where a decimal unit ending in a
    lowercase "b" ("5Gb", "500mb") counts bits."""
    if type(size) is int and size > 0:
        return size
    refusal = ValueError(
        f"max_shard_size={size!r}: the largest shard, a positive integer of bytes or a number followed by its unit, "
        f"as transformers takes it ('5GB', '500MB', '2GiB'; units {', '.join(BYTE_UNITS)})"
    )
    if not isinstance(size, str):
        raise refusal
    try:
        count = parse_bytes(size)
    except ValueError:
        raise refusal from None
    unit = size.strip()[-2:]
    count = count // 8 if unit[-1] == "b" and unit[0].upper() in "KMGT" else count
    if count < 1:  # bits of less than a byte ("0.001Kb"): a shard per tensor
        raise refusal
    return count


def _copy_unsaved_files(directory: Path, staging: Path) -> None:
    """Copy the files of model folder `directory` (if it exists) that `save_pretrained` does not write
    (`SAVED_FILES`) into `staging`, the folder that replaces it."""
    if not directory.is_dir():
        return
    for entry in sorted(directory.iterdir()):
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in SAVED_FILES):
            shutil.copy2(entry, staging / entry.name)


def refuse_hf_export(config: ModelConfig, destination: str | Path) -> None:
    """CheckpointError when `config` is a seekstack-only variant that transformers would load as a different model."""
    if config.attention_variant != "mla":
        raise CheckpointError(
            f"{destination}: attention_variant={config.attention_variant!r} is a seekstack ablation, not a DeepSeek "
            "architecture; transformers would load it as plain MLA and drop its extra weights. It stays a training "
            "checkpoint (resume, evaluate with `seekstack train`'s validation); nothing was written"
        )


def write_pretrained_files(
    model: Transformer,
    directory: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    fp8_block: tuple[int, int] | None = None,
    stacked_experts: bool = False,
) -> None:
    """Write config.json, generation_config.json and the safetensors into the existing folder `directory`, which the
    caller makes atomic (`save_pretrained`, training checkpoints). `stacked_experts` writes seekstack's
    stacked-experts layout."""
    model = _saved_model(model)
    write_shards(_stored_tensors(model, fp8_block, stacked_experts), directory, max_shard_bytes)
    write_config(model, directory, fp8_block, stacked_experts)
    write_generation_config(model.config, directory, model.generation_config)


def _saved_model(model: torch.nn.Module) -> Transformer:
    """The Transformer to save: a model wrapped by torch.compile is saved as the model it wraps (its state_dict's keys
    carry the wrapper's `_orig_mod.`); TypeError for any other module, whose keys no checkpoint could be loaded from
    (a peft model's carry `base_model.model.` and its LoRA factors)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, Transformer):
        return model
    advice = "a seekstack Transformer (seekstack.load_pretrained, seekstack.Transformer)"
    if hasattr(model, "merge_and_unload"):
        advice = (
            "the model with its adapter merged in, model.merge_and_unload(), or the adapter alone with peft's "
            "model.save_pretrained(folder)"
        )
    raise TypeError(f"a checkpoint holds a seekstack Transformer, got {type(model).__name__}: save {advice}")


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Write (checkpoint key, tensor) pairs as safetensors into `directory`: one file, or shards and their index,
    which gives the parameters (the weights the tensors hold, as DeepSeek-V3's 685B counts the MTP module's copies of
    the embedding and head: a quantized matrix's at its shape, not its packed codes nor its scales) beside the bytes
    stored, as transformers 5's save_pretrained writes them (its from_pretrained reads neither). Shards are written as
    they fill, so memory holds one shard and what `tensors` holds (a lazy iterable can make the tensors of a model
    larger than memory one part at a time)."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = total_parameters = 0
    shard_keys: list[list[str]] = []
    packed_words: dict[str, int] = {}  # a matrix's packed codes (int32 words), by layer key, until its shape is read

    def flush() -> None:
        save_aligned(shard, directory / f"shard-{len(shard_keys)}.safetensors")
        shard_keys.append(list(shard))
        shard.clear()

    for key, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
        total_bytes += size
        layer, _, name = key.rpartition(".")
        if name == "weight_packed":
            packed_words[layer] = tensor.numel()
        elif name == "weight_shape":  # compressed-tensors' (rows, columns) of int8 or int4 codes packed in int32
            packed_words.pop(layer)
            total_parameters += int(tensor.prod())
        elif name not in QUANTIZATION_SCALES:
            total_parameters += tensor.numel()
    total_parameters += 8 * sum(packed_words.values())  # seekstack's stacked layout: int4's codes, eight a word, alone
    flush()
    # The release names (model-0000i-of-0000n) need the shard count, known only now.
    if len(shard_keys) == 1:
        os.replace(directory / "shard-0.safetensors", directory / SINGLE_FILE)
        return
    count, weight_map = len(shard_keys), {}
    for number, keys in enumerate(shard_keys):
        name = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
        os.replace(directory / f"shard-{number}.safetensors", directory / name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file whose tensors start at multiples of ALIGNMENT bytes into the file, so into a memory map:
    the header is padded with spaces (as safetensors pads it) and tensors whose sizes are multiples of ALIGNMENT
    come first (the others, small in our models, are copied when loaded)."""
    order = sorted(tensors, key=lambda key: _nbytes(tensors[key]) % ALIGNMENT != 0)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        tensor = tensors[key]
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + _nbytes(tensor)],
        }
        offset += _nbytes(tensor)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for key in order:
            file.write(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_config(
    model: Transformer, directory: Path, fp8_block: tuple[int, int] | None = None, stacked_experts: bool = False
) -> None:
    """Write the config.json of `model`'s checkpoint (with its quantization_config); `model` may be on meta."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    stored_dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = stored_dtype  # transformers 5 reads `dtype`, 4.x `torch_dtype`
    quantized = quantized_layers(model)
    if quantized:
        config["quantization_config"] = quantization_config(model, quantized, stacked_experts)
    elif fp8_block is not None:
        config["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(fp8_block),
        }  # fmt: skip
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_generation_config(config: ModelConfig, directory: Path, settings: dict[str, Any] | None = None) -> None:
    """Write `settings` (a loaded model's generation_config.json, as transformers writes its model.generation_config)
    as generation_config.json, else the one transformers' save_pretrained writes of a model with no generation settings
    of its own (`GenerationConfig.from_model_config`): the config's BOS, EOS and pad ids, where generate starts and
    stops, and no sampling, so the commands keep their defaults. A release's own (its sampling), copied into the
    folder after the model (quantize, lora merge, a run from it) or kept by `save_pretrained`, replaces it."""
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    ids = {name: getattr(config, name) for name in names if getattr(config, name) is not None}
    generation_config = settings or {"_from_model_config": True, **ids}
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config, indent=2) + "\n")


def _stored_tensors(
    model: Transformer, fp8_block: tuple[int, int] | None, stacked_experts: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    fp8_layers = [w for w in map(layer_weight, quantized_layers(model).values()) if w.scheme == "fp8"]
    # an fp8 model: the release also stores kv_b_proj in fp8 (its values rounded so), in the model's blocks; the layers
    # quantization kept stay in float (listed in its modules_to_not_convert), whether or not `fp8_block` is given;
    # with `fp8_block` alone, every one the release quantizes is
    if fp8_layers:
        block = fp8_layers[0].block
        if fp8_block is not None and tuple(fp8_block) != tuple(block):
            raise ValueError(
                f"fp8_block={fp8_block!r}: the model is quantized to fp8 in {tuple(block)} blocks, which its "
                "checkpoint keeps; leave fp8_block out (or requantize the float model in other blocks)"
            )
        fp8_block = block
    elif fp8_block is not None:  # quantized while saving: blocks whose scale outweighs what fp8 saves are refused
        from seekstack.compress.quantize import QuantConfig

        QuantConfig(scheme="fp8", fp8_block=fp8_block).refuse_growing_fp8_block(model.embed_tokens.weight.dtype)
    for key, tensor in checkpoint_tensors(model, stacked_experts):
        stacked_parts = STACKED_EXPERT_PARTS.get(key.rpartition(".")[2]) if ".mlp.experts." in key else None
        if (
            fp8_block is None
            or tensor.dtype == torch.float8_e4m3fn
            or (fp8_layers and not key.endswith(f".{KEPT_FLOAT}.weight"))
        ):
            yield key, tensor
        elif _is_fp8_quantizable(key, tensor):
            quantized, scale = quantize_fp8(tensor, fp8_block)
            yield key, quantized
            yield key + "_scale_inv", scale
        elif stacked_parts is not None:  # as an fp8 QuantizedExperts stores them: gate and up each in their blocks
            stored = Fp8Weight.from_float(tensor, fp8_block, stacked_parts).stored()
            yield from ((f"{key}.{name}", part) for name, part in stored.items())
        else:
            yield key, tensor


def checkpoint_tensors(
    model: Transformer, stacked_experts: bool = False, part: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model` under its checkpoint key, experts split (unless `stacked_experts`), MTP embedding/head
    copies added. `part` (a module name such as `layers.3`) gives only that module's tensors, for writing a model
    one part at a time; the MTP copies come with the whole model only. Routed experts left in float in a model with
    int8/int4 layers are written stacked: transformers reads a compressed-tensors checkpoint's float experts only so."""
    layers = model.config.num_hidden_layers
    module, prefix = model.get_submodule(part), f"{part}." if part else ""
    quantized = {prefix + name: layer for name, layer in quantized_layers(module).items()}
    stack_float_experts = stacked_experts or _has_int_layers(model)
    for name, tensor in module.state_dict(prefix=prefix).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if any(name.startswith(layer + ".") for layer in quantized):
            continue
        key = checkpoint_key(name, layers)
        yield from (None if stack_float_experts else expert_sources(key, tensor)) or [(key, tensor)]
    for name, layer in quantized.items():
        yield from quantized_sources(layer_key(name, layers), layer, stacked_experts)
    if part:
        return
    head = quantized.get("lm_head")
    for k in range(len(model.mtp)):  # copies, not aliases: safetensors refuses two keys over one storage
        yield f"model.layers.{layers + k}.embed_tokens.weight", model.embed_tokens.weight.detach().clone()
        if head is None:
            yield f"model.layers.{layers + k}.shared_head.head.weight", model.lm_head.weight.detach().clone()
        else:  # a quantized head's stored tensors, as the main one's
            copies = quantized_sources(f"model.layers.{layers + k}.shared_head.head", head)
            yield from ((key, tensor.detach().clone()) for key, tensor in copies)
