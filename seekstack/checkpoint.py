"""Hugging Face DeepSeek-V2/V3 checkpoints in and out: the one place that owns the key mapping.

On disk (the DeepSeek releases' layout)          In seekstack
  model.embed_tokens.weight                        embed_tokens.weight
  model.layers.{i}.mlp.experts.{e}.gate_proj.weight  layers.{i}.mlp.experts.gate_up_proj[e, :I]
  model.layers.{i}.mlp.experts.{e}.up_proj.weight    layers.{i}.mlp.experts.gate_up_proj[e, I:]
  model.layers.{i}.mlp.experts.{e}.down_proj.weight  layers.{i}.mlp.experts.down_proj[e]
  model.layers.{L+k}.{enorm,hnorm,eh_proj,...}       mtp.{k}.{enorm,hnorm,eh_proj,...}
  model.layers.{L+k}.{self_attn,mlp,...}             mtp.{k}.block.{self_attn,mlp,...}
  model.layers.{L+k}.{embed_tokens,shared_head.head} copies of the shared embedding and head
  lm_head.weight                                     lm_head.weight
FP8 releases store `weight` as float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block.
Quantized layers (seekstack.compress) are stored under the same keys in their format's names: int8 and int4 as
`weight_packed` + `weight_scale` + `weight_shape` (compressed-tensors' pack-quantized), fp8 as above.

seekstack's stacked-experts layout (`stacked_experts=True`; transformers 5 reads it for float weights) keeps each
layer's routed experts as the model holds them, one (E, ...) tensor per name:
`model.layers.{i}.mlp.experts.gate_up_proj` (float) or `...experts.gate_up_proj.weight` + `.weight_scale`
(quantized; int8 codes unpacked, compressed-tensors' int-quantized, so they map), and the same for `down_proj`.
Loading memory-maps: a tensor stored in the dtype the model asks for is used in place, its pages read from the file
on first use (copy-on-write: the file is never changed), so the resident set is what a forward touches. Per-expert
keys are copied into the stacked tensors (or, for a part placed on disk, into its disk copy: `offload`); the stacked
layout maps them as they are.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from seekstack.atomic import atomic_directory, refuse_to_replace
from seekstack.compress.formats import SCALE_DTYPE, compressed_tensors_config, dequantize_int, pack_codes, unpack_codes
from seekstack.compress.linear import (
    Fp8Weight,
    QuantizedExperts,
    QuantizedLinear,
    QuantizedWeight,
    layer_weight,
    use_quantized_feed_forwards,
    weight_from_stored,
)
from seekstack.config import ModelConfig
from seekstack.model.moe import RoutedExperts
from seekstack.model.transformer import Transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a model folder written here (or by transformers' save_pretrained) holds: such a folder may be replaced whole.
MODEL_FOLDER_FILES = (
    CONFIG_FILE, "generation_config.json", "*.safetensors", INDEX_FILE, "tokenizer*.json", "special_tokens_map.json",
    "chat_template.jinja",
)  # fmt: skip
# What `save_pretrained` writes. The other files of a model folder it saves over (the tokenizer's, a generation
# config, a chat template) stay, as transformers' save_pretrained leaves them.
SAVED_FILES = (CONFIG_FILE, "*.safetensors", INDEX_FILE)
DAMAGED = "re-save or re-download the checkpoint"  # what to do about a file that is truncated, damaged or missing
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
DEFAULT_FP8_BLOCK = (128, 128)
COMPRESSED_TENSORS_FORMATS = ("int-quantized", "pack-quantized", "mixed-precision")
MAX_SHARD_BYTES = 5 * 2**30  # the largest safetensors file before a checkpoint is split into shards
# The int8 kernel reads weights with aligned vector loads: a weight at an address that is not a multiple of 64 crashes
# it for more than a few rows of input. Memory-mapped tensors are as aligned as their offsets in the file.
ALIGNMENT = 64
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
STORED_WIDTHS = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}  # bytes per element, by name
FLOAT_STORED = ("F64", "F32", "F16", "BF16")  # the dtypes a float weight loads from
# The stored dtypes of each quantization_config's quantized weights: e4m3, or int8 codes and int32 words of packed ones.
QUANTIZED_STORED = {"fp8": ("F8_E4M3",), "compressed-tensors": ("I8", "I32")}
# The MTP modules' copies of the embedding and head: loading uses the main model's, so these stay unread.
MTP_COPIES = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight\w*$")
KEPT_FLOAT = "kv_b_proj"  # the layer loading keeps a float Linear however it is stored (attention absorbs its matrix)
# The projections of an expert each stacked expert weight holds, stacked by rows.
PER_EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
STACKED_EXPERT_PARTS = {stack: len(projections) for stack, projections in PER_EXPERT_PROJECTIONS.items()}


# A tensor held as a file's pages, from the tensor it replaces (its dtype and shape) and a function giving its values
# one piece at a time, in memory order: how `load_pretrained(offload=...)` writes a tensor straight to disk.
MappedCopy = Callable[[torch.Tensor, Callable[[], Iterable[torch.Tensor]]], torch.Tensor]
# Buffer `buffer` (codes or scales) of expert e's quantized weight of a stack of routed experts' (gate_up or down),
# `(buffer, e)`, built from the one stored tensor it comes from, read from a checkpoint.
ExpertBuffer = Callable[[str, int], torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file (and the key) and says what to do."""


# ---------------------------------------------------------------------------------------- key mapping
def checkpoint_key(name: str, num_hidden_layers: int) -> str:
    """Our parameter name -> the checkpoint key (experts excluded: see `expert_sources`)."""
    match = re.match(r"mtp\.(\d+)\.(block\.)?(.*)", name)
    if match:
        return f"model.layers.{num_hidden_layers + int(match[1])}.{match[3]}"
    return name if name.startswith("lm_head.") else f"model.{name}"


def expert_sources(key: str, param: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """For a stacked expert parameter, the per-expert checkpoint keys and the views they fill, in memory order."""
    prefix, _, kind = key.rpartition(".")
    if not prefix.endswith("mlp.experts") or kind not in ("gate_up_proj", "down_proj"):
        return None
    sources = []
    for e in range(param.shape[0]):
        if kind == "down_proj":
            sources.append((f"{prefix}.{e}.down_proj.weight", param[e]))
        else:
            gate, up = param[e].chunk(2, dim=0)
            sources += [(f"{prefix}.{e}.gate_proj.weight", gate), (f"{prefix}.{e}.up_proj.weight", up)]
    return sources


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


# ---------------------------------------------------------------------------------------- quantized layers
def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Our name -> module, for each QuantizedLinear and QuantizedExperts of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}


def _has_int_layers(model: torch.nn.Module) -> bool:
    """Whether `model` has int8/int4 layers (a compressed-tensors checkpoint)."""
    return any(layer_weight(layer).scheme != "fp8" for layer in quantized_layers(model).values())


def layer_key(name: str, num_hidden_layers: int) -> str:
    """Our module name -> its checkpoint prefix (`layers.0.self_attn.o_proj` -> `model.layers.0.self_attn.o_proj`)."""
    return checkpoint_key(f"{name}.weight", num_hidden_layers).removesuffix(".weight")


def quantization_config(
    model: Transformer, quantized: dict[str, torch.nn.Module], stacked_experts: bool = False
) -> dict[str, Any]:
    """The config.json `quantization_config` of a model with quantized layers: DeepSeek's fp8 entry, or a
    compressed-tensors one whose targets name each quantized layer (per-expert Linear modules for experts, or the
    stacked tensors in the stacked-experts layout)."""
    layers = model.config.num_hidden_layers
    weights = {name: layer_weight(m) for name, m in quantized.items()}
    if {w.scheme for w in weights.values()} == {"fp8"}:
        block = next(iter(weights.values())).block
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    groups: dict[tuple[str, int | None], list[str]] = {}
    for name, weight in weights.items():
        if weight.scheme == "fp8":
            raise ValueError(f"layer {name!r} is fp8 among int8/int4 layers; a checkpoint holds one of the two formats")
        target = re.escape(layer_key(name, layers))
        if isinstance(quantized[name], QuantizedExperts):
            target += r"\.(gate_up|down)_proj" if stacked_experts else r"\.\d+\.(gate|up|down)_proj"
        groups.setdefault((weight.scheme, getattr(weight, "group", None)), []).append(f"re:^{target}$")
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return compressed_tensors_config(
        {f"group_{i}": (scheme, group, targets) for i, ((scheme, group), targets) in enumerate(sorted(groups.items()))},
        ignore=[layer_key(name, layers) for name in kept],
        packed_int8=not stacked_experts,
    )


def _pack_quantized(stored: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A matrix's stored tensors in compressed-tensors' pack-quantized layout: int8 codes packed four per int32 word
    (int4's come packed), and the matrix's (rows, columns) recorded."""
    codes = stored.get("weight")
    if codes is not None and codes.dtype == torch.int8:
        stored = {"weight_packed": pack_codes(codes, 8), "weight_scale": stored["weight_scale"]}
        columns = codes.shape[-1]
    elif "weight_packed" in stored:
        columns = stored["weight_packed"].shape[-1] * 8  # eight int4 codes per word
    else:
        return stored
    return {**stored, "weight_shape": torch.tensor([rows, columns], dtype=torch.int64)}


def quantized_sources(key: str, module: torch.nn.Module, stacked: bool = False) -> list[tuple[str, torch.Tensor]]:
    """A quantized layer's stored tensors under checkpoint keys: a Linear's `key.weight...`, or for experts
    `key.{e}.{gate,up,down}_proj.weight...` per expert (gate and up each half of gate_up_proj's rows), or with
    `stacked` `key.{gate_up,down}_proj.weight...` as the model holds them."""
    if isinstance(module, QuantizedLinear):
        stored = module.qweight.stored()
        stored = stored if stacked else _pack_quantized(stored, module.out_features)
        sources = [(f"{key}.{name}", tensor) for name, tensor in stored.items()]
        return sources + ([(f"{key}.bias", module.bias)] if module.bias is not None else [])
    if stacked:
        return [
            (f"{key}.{proj}.{name}", tensor)
            for proj in ("gate_up_proj", "down_proj")
            for name, tensor in getattr(module, proj).stored().items()
        ]
    sources = []
    for e in range(module.gate_up_proj.shape[0]):
        gate_up = {name: tensor[e].chunk(2) for name, tensor in module.gate_up_proj.stored().items()}
        down = {name: tensor[e] for name, tensor in module.down_proj.stored().items()}
        halves = [{name: parts[i] for name, parts in gate_up.items()} for i in (0, 1)]
        for proj, stored in zip(("gate_proj", "up_proj", "down_proj"), (*halves, down), strict=True):
            stored = _pack_quantized(stored, next(iter(stored.values())).shape[0])
            sources += [(f"{key}.{e}.{proj}.{name}", tensor) for name, tensor in stored.items()]
    return sources


def _quantized_from_reader(reader: CheckpointReader, key: str, shape: tuple[int, ...]) -> QuantizedWeight | None:
    """The quantized weight stored under checkpoint layer `key` (`key.weight_packed` / int8 or e4m3 `key.weight`),
    or None when the layer is stored in floating point; CheckpointError unless it is the `shape` the config implies."""
    names = _stored_names(reader, key)
    if names is None:
        return None
    reader.check_quantized_shape(key, shape)
    tensors = {name: reader.read(f"{key}.{name}", dequantize=False) for name in names}
    return weight_from_stored(tensors, reader.fp8_block, bits=reader.packed_bits(key))


def _stored_names(reader: CheckpointReader, key: str) -> list[str] | None:
    """The names of the stored tensors of checkpoint layer `key`'s quantized weight, its codes' then its scales', or
    None for a layer stored in float."""
    if f"{key}.weight_packed" in reader:
        reader.check_stored_format(f"{key}.weight_packed")
        reader.used.add(f"{key}.weight_shape")
        bits = reader.packed_bits(key)
        columns = reader.stored_shape(f"{key}.weight_packed")[-1] * 32 // bits
        reader.check_int_scheme(key, bits, columns, reader.stored_shape(f"{key}.weight_scale")[-1])
        return ["weight_packed", "weight_scale"]
    if f"{key}.weight" not in reader:
        return None
    reader.check_stored_format(f"{key}.weight")
    stored = reader.stored_dtype(f"{key}.weight")
    if stored == "I8":
        columns = reader.stored_shape(f"{key}.weight")[-1]
        reader.check_int_scheme(key, 8, columns, reader.stored_shape(f"{key}.weight_scale")[-1])
        return ["weight", "weight_scale"]
    if stored == "F8_E4M3":
        return ["weight", "weight_scale_inv"]
    return None


def _expert_weights_from_reader(
    reader: CheckpointReader, key: str, experts: RoutedExperts
) -> tuple[tuple[QuantizedWeight, QuantizedWeight], dict[str, ExpertBuffer]] | None:
    """Stacked (gate_up, down) quantized weights for `experts` from the keys under `key` (`...mlp.experts`), or None
    when they are stored in float: the stacked layout's, memory-mapped as they are, or, from per-expert keys, stacks
    left empty (on meta) with the function reading each expert's buffers (`ExpertBuffer`), by stack name
    (`gate_up_proj`, `down_proj`), for `_fill_expert_stack`. CheckpointError naming the file and the key for a weight
    not of the shape the config gives `experts`."""
    shapes = {stack: tuple(getattr(experts, stack).shape) for stack in PER_EXPERT_PROJECTIONS}
    stacked = _stored_names(reader, f"{key}.gate_up_proj")
    if stacked is not None:
        gate_up, down = (
            _stacked_weight(reader, f"{key}.{stack}", _stacked_stored(reader, f"{key}.{stack}", shape, stacked))
            for stack, shape in shapes.items()
        )
        return (gate_up, down), {}
    names = _stored_names(reader, f"{key}.0.gate_proj")
    if names is None:
        return None
    count, gate_up_rows, hidden = shapes["gate_up_proj"]
    half = (gate_up_rows // 2, hidden)
    for e in range(count):
        for proj, shape in {"gate_proj": half, "up_proj": half, "down_proj": shapes["down_proj"][1:]}.items():
            _check_stored_like(reader, f"{key}.{e}.{proj}", f"{key}.0.gate_proj")
            reader.check_quantized_shape(f"{key}.{e}.{proj}", shape)
            reader.used.add(f"{key}.{e}.{proj}.weight_shape")
    (gate_up, read_gate_up), (down, read_down) = (
        _per_expert_stack(reader, key, stack, names, count) for stack in PER_EXPERT_PROJECTIONS
    )
    return (gate_up, down), {"gate_up_proj": read_gate_up, "down_proj": read_down}


def _stacked_stored(
    reader: CheckpointReader, key: str, shape: tuple[int, ...], names: list[str]
) -> dict[str, torch.Tensor]:
    """The stored tensors `names` of stacked expert weight `key` (`...mlp.experts.gate_up_proj` or `.down_proj`) in
    the stacked layout, memory-mapped as they are; CheckpointError naming the file and the key for a missing one or
    a weight not of `shape`, the config's."""
    reader.check_quantized_shape(key, shape, parts=STACKED_EXPERT_PARTS[key.rpartition(".")[2]])
    return {name: reader.read(f"{key}.{name}", dequantize=False) for name in names}


def _stacked_weight(
    reader: CheckpointReader, key: str, stored: dict[str, torch.Tensor], bits_key: str | None = None
) -> QuantizedWeight:
    """The quantized weight holding `stored`, the tensors of stacked expert weight `key` (the stack's or one
    expert's), int codes of the bits checkpoint layer `bits_key` (default: `key`) is packed in."""
    parts = STACKED_EXPERT_PARTS[key.rpartition(".")[2]]
    return weight_from_stored(stored, reader.fp8_block, parts, reader.packed_bits(bits_key or key))


def _per_expert_stack(
    reader: CheckpointReader, key: str, stack: str, names: list[str], count: int
) -> tuple[QuantizedWeight, ExpertBuffer]:
    """Stacked expert weight `stack` (`gate_up_proj`, `down_proj`) of the `count` experts under `key`, stored per
    expert: the stack, empty (on meta) until `_fill_expert_stack` fills it, and the function building a buffer of
    expert e's weight from the one stored tensor (of `names`) it comes from, its projections' stacked by rows."""
    projections, first = PER_EXPERT_PROJECTIONS[stack], f"{key}.0.{PER_EXPERT_PROJECTIONS[stack][0]}"
    expert = {name: _empty_stored(reader, [f"{key}.0.{p}.{name}" for p in projections]) for name in names}
    empty = {name: tensor.expand(count, *tensor.shape) for name, tensor in expert.items()}
    stacked, bits = _stacked_weight(reader, f"{key}.{stack}", empty, bits_key=first), reader.packed_bits(first)

    def expert_buffer(buffer: str, e: int) -> torch.Tensor:
        source = names[stacked.stored_buffers.index(buffer)]  # codes from codes, scales from scales
        read = [reader.read(f"{key}.{e}.{p}.{source}", dequantize=False) for p in projections]
        return stacked.buffer_from_stored(buffer, torch.cat(read), bits)

    return stacked, expert_buffer


def _empty_stored(reader: CheckpointReader, keys: list[str]) -> torch.Tensor:
    """An empty tensor (on meta) of the dtype and shape the stored tensors `keys` have stacked by rows, from their
    headers."""
    shapes = [reader.stored_shape(key) for key in keys]
    rows = sum(shape[0] for shape in shapes)
    return torch.empty((rows, *shapes[0][1:]), dtype=TORCH_DTYPES[reader.stored_dtype(keys[0])], device="meta")


def _fill_expert_stack(
    stack: QuantizedWeight,
    name: str,
    expert_buffer: ExpertBuffer,
    copies: dict[str, MappedCopy],
    device: torch.device | str,
) -> None:
    """Fill the empty buffers of `stack` (state-dict name `name`), a stack of expert weights, with the experts' own,
    one expert at a time (`expert_buffer(buffer, e)`, each stored tensor read once): into memory on `device`, or,
    for a part placed on disk, into its disk copy (`copies`), so that it is never whole in memory."""
    filled = {}
    for buffer, empty in stack.named_buffers():
        pieces = functools.partial(_expert_buffers, expert_buffer, name, buffer, empty)
        copy = copies.get(f"{name}.{buffer}")
        filled[buffer] = copy(empty, pieces) if copy is not None else _stacked(pieces(), empty, device)
    stack.fill_buffers(filled)


def _expert_buffers(expert_buffer: ExpertBuffer, name: str, buffer: str, empty: torch.Tensor) -> Iterator[torch.Tensor]:
    """Buffer `buffer` of each expert's weight (`expert_buffer`), one expert at a time, for the stack `empty` (its
    first dimension the experts); CheckpointError when an expert's is not of the stack's shape (stored with another
    group size than expert 0, whose shapes the stack has), which copying would broadcast or refuse unnamed."""
    for e in range(len(empty)):
        piece = expert_buffer(buffer, e)
        if piece.shape != empty.shape[1:]:
            raise CheckpointError(
                f"{name}: expert {e}'s {buffer} has shape {tuple(piece.shape)}, expert 0's {tuple(empty.shape[1:])}: "
                "the experts of a layer must be stored alike (one format, bits and group size)"
            )
        yield piece


def _stacked(pieces: Iterable[torch.Tensor], empty: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A tensor on `device` of `empty`'s dtype and shape, whose first dimension's slices hold `pieces`, in turn."""
    stack = torch.empty_like(empty, device=device)
    for view, piece in zip(stack, pieces, strict=True):
        view.copy_(piece)
    return stack


def _check_stored_like(reader: CheckpointReader, layer: str, reference: str) -> None:
    """CheckpointError naming the file and the key when checkpoint layer `layer` (an expert's projection) is stored
    in another format than `reference` (expert 0's): a layer's experts load as one stack in one format."""
    weight, reference_weight = reader.weight_key(layer), reader.weight_key(reference)
    stored, expected = reader.stored_dtype(weight), reader.stored_dtype(reference_weight)
    if (weight.removeprefix(layer), stored) != (reference_weight.removeprefix(reference), expected):
        raise CheckpointError(
            f"{reader.file_of(weight)}: key {weight!r} is stored as {stored}, but {reference_weight!r} as {expected}; "
            f"the experts of a layer load as one stack, stored in one format: {DAMAGED}"
        )


def load_quantized_layers(
    model: Transformer, reader: CheckpointReader, device: torch.device | str
) -> tuple[set[str], dict[str, ExpertBuffer]]:
    """Swap in a quantized module for each layer the checkpoint stores quantized; returns their names, and the stacks
    of expert weights stored per expert, left empty (on meta) for `_fill_expert_stack`: the function reading the
    experts' buffers (`ExpertBuffer`), by the stack's name. `kv_b_proj` stays a float Linear (attention absorbs its
    matrix), read dequantized."""
    layers = model.config.num_hidden_layers
    swapped, unfilled = set(), {}
    for name, module in list(model.named_modules()):
        key = layer_key(name, layers)
        replacement: torch.nn.Module | None = None
        per_expert: dict[str, ExpertBuffer] = {}
        if isinstance(module, RoutedExperts):
            read = _expert_weights_from_reader(reader, key, module)
            if read is not None:
                weights, per_expert = read
                replacement = QuantizedExperts(*weights)
        elif isinstance(module, torch.nn.Linear) and not name.endswith(KEPT_FLOAT):
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue
            weight = _quantized_from_reader(reader, key, tuple(module.weight.shape))
            bias = reader.read(f"{key}.bias").to(module.bias.dtype) if module.bias is not None and weight else None
            replacement = QuantizedLinear(weight, bias) if weight else None
        if replacement is not None:
            model.set_submodule(name, replacement if per_expert else replacement.to(device))  # empty: filled later
            swapped.add(name)
            unfilled.update({f"{name}.{stack}": expert for stack, expert in per_expert.items()})
    use_quantized_feed_forwards(model)  # as quantize_model leaves a quantized model, so both compute alike
    return swapped, unfilled


# ---------------------------------------------------------------------------------------- FP8
def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int], parts: int = 1) -> tuple[int, ...]:
    """The `weight_scale_inv` shape of an e4m3 weight of `shape` (..., rows, columns): a scale per block, edge blocks
    partial, for each of `parts` matrices stacked by rows (an expert's [W_gate; W_up])."""
    *leading, rows, cols = shape
    return (*leading, parts * math.ceil(rows // parts / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = Q * s for each block (edge blocks partial); scale_inv is (ceil(out/b0), ceil(in/b1)) float32, else
    ValueError."""
    rows, cols = weight.shape
    expected = fp8_scale_shape((rows, cols), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}; a ({rows}, {cols}) e4m3 weight in {block} blocks takes "
            f"{expected}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.float() * scale


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization: per block s = amax / 448, Q = W / s. Returns (Q, s) as DeepSeek stores them."""
    rows, cols = weight.shape
    pad_rows, pad_cols = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(weight.float(), (0, pad_cols, 0, pad_rows))
    blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (row blocks, col blocks)
    quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized, scale


def _is_fp8_quantizable(key: str, tensor: torch.Tensor) -> bool:
    """DeepSeek's FP8 release quantizes the block projections (kv_a_proj_with_mqa too), not embeddings, head or gate,
    nor MTP's eh_proj (vLLM reads it as a plain Linear)."""
    projection = key.endswith(("_proj.weight", "_proj_with_mqa.weight")) and not key.endswith(".eh_proj.weight")
    return tensor.dim() == 2 and key.startswith("model.layers.") and projection


# ---------------------------------------------------------------------------------------- reading
def read_config(directory: str | Path) -> ModelConfig:
    """The `ModelConfig` of checkpoint folder `directory`: CheckpointError when the folder or its config.json is
    missing or not JSON, ConfigError naming the field when a value is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "not a folder" if directory.exists() else "no such folder"
        raise CheckpointError(
            f"{directory}: {problem}; a checkpoint is a folder holding {CONFIG_FILE} and safetensors weights"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: no such file; a checkpoint keeps its {CONFIG_FILE} beside the weights: "
            f"copy it from where the checkpoint came from, or {DAMAGED}"
        )
    return ModelConfig.from_dict(read_json_object(config_path), source=str(config_path))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; CheckpointError naming the file when it is not valid JSON or not an object."""
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise CheckpointError(
            f"{path}: not valid JSON ({error}); the file is truncated or damaged: {DAMAGED}"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(raw).__name__}, not an object; {DAMAGED}")
    return raw


def _open_safetensors(path: Path) -> Any:
    """`safe_open(path)`, with a damaged file (empty, truncated, not safetensors at all) named as such."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as error:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({error}); it is truncated or damaged: {DAMAGED}"
        ) from None


def check_safetensors(path: Path) -> None:
    """CheckpointError naming `path` unless it is a whole safetensors file (its header and every tensor it lists)."""
    with _open_safetensors(path):
        pass


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`, with a damaged file named as such."""
    with _open_safetensors(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)


class CheckpointReader:
    """Lazy access to a directory of safetensors shards: one tensor at a time, memory-mapped."""

    def __init__(self, directory: Path, quantization: dict | None):
        self.directory = directory
        self.key_to_file = self._index()
        self._files = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.fp8_block: tuple[int, int] | None = None
        self.quantized = quantization is not None
        self.quant_method = (quantization or {}).get("quant_method", "fp8") if self.quantized else None
        if quantization is not None:
            method = quantization.get("quant_method", "fp8")
            fp8 = method == "fp8" and quantization.get("fmt", "e4m3") == "e4m3"
            compressed = method == "compressed-tensors" and quantization.get("format") in COMPRESSED_TENSORS_FORMATS
            if not (fp8 or compressed):
                raise CheckpointError(
                    f"{directory / CONFIG_FILE}: unsupported quantization_config {quantization}; seekstack reads "
                    "unquantized, block-wise fp8 (e4m3) and compressed-tensors weight-only int8/int4 "
                    f"({', '.join(COMPRESSED_TENSORS_FORMATS)}) checkpoints"
                )
            if fp8:
                self.fp8_block = _fp8_block(quantization, directory / CONFIG_FILE)
        self.config_groups: dict[str, Any] = (quantization or {}).get("config_groups") or {}
        self.used: set[str] = set()

    def _index(self) -> dict[str, str]:
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            weight_map = read_json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: not a safetensors index (no 'weight_map' object); {DAMAGED}")
            for file in sorted(set(weight_map.values())):
                if not (self.directory / file).is_file():
                    raise CheckpointError(
                        f"{index_path}: names shard {file!r}, which is missing from {self.directory}; "
                        f"the download is incomplete: fetch that shard, or {DAMAGED}"
                    )
            return weight_map
        single = self.directory / SINGLE_FILE
        if not single.is_file():  # as transformers: other safetensors files are read only through an index
            others = ", ".join(sorted(file.name for file in self.directory.glob("*.safetensors")))
            unread = f"{others} are read only through an index listing their keys, as transformers reads them; "
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; {unread if others else ''}the weights are "
                f"missing: {DAMAGED}"
            )
        with _open_safetensors(single) as handle:
            return {key: SINGLE_FILE for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)

    def refuse_keys_in_two_shards(self) -> None:
        """CheckpointError naming both shards and the key when two shards of the index hold one key: which one
        the model gets would depend on the reader. Reads every shard's header: for loading the whole checkpoint."""
        holder: dict[str, str] = {}
        for file in sorted(set(self.key_to_file.values())):
            with _open_safetensors(self.directory / file) as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle)
                    if key in holder:
                        raise CheckpointError(
                            f"{self.directory}: key {key!r} is stored in both {holder[key]} and {file} (the index "
                            f"{INDEX_FILE} names {self.key_to_file.get(key)!r}); a checkpoint stores each key once: "
                            f"{DAMAGED}"
                        )
                    holder[key] = file

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._files.close()

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def file_of(self, key: str) -> Path:
        return self.directory / self.key_to_file[key]

    def check_int_scheme(self, key: str, bits: int, columns: int, scale_columns: int) -> None:
        """Refuse layer `key`, stored as `bits`-bit integers with `scale_columns` scales over `columns` inputs, when
        the compressed-tensors config group that targets it says otherwise (an edited config.json, swapped weights).
        A target is a module class (`Linear`), an exact layer name, or `re:` and a pattern."""
        config = self.directory / CONFIG_FILE
        for name, group in self._groups_targeting(key):
            weights = group.get("weights") or {}
            if weights.get("num_bits") != bits:
                raise CheckpointError(
                    f"{config}: quantization_config group {name!r} says num_bits={weights.get('num_bits')} for layer "
                    f"{key!r}, but {self.file_of(self.weight_key(key))} stores it as int{bits}; the config and the "
                    f"weights disagree: {DAMAGED}"
                )
            group_size = weights.get("group_size") if weights.get("strategy") == "group" else columns
            if group_size is None or group_size * scale_columns != columns:
                raise CheckpointError(
                    f"{config}: quantization_config group {name!r} says group_size={group_size} for layer {key!r}, "
                    f"but its weight_scale holds {scale_columns} scale(s) per row of {columns} inputs; the config "
                    f"and the weights disagree: {DAMAGED}"
                )
            return
        if self.config_groups:
            raise CheckpointError(
                f"{config}: layer {key!r} is stored as int{bits}, but no quantization_config group targets it; "
                f"the config and the weights disagree: {DAMAGED}"
            )

    def _groups_targeting(self, key: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The compressed-tensors config groups whose targets name layer `key`: a module class (`Linear`), the exact
        name, or `re:` and a pattern."""
        for name, group in self.config_groups.items():
            targets = group.get("targets") or []
            if any(t == "Linear" or t == key or (t.startswith("re:") and re.match(t[3:], key)) for t in targets):
                yield name, group

    def packed_bits(self, key: str) -> int | None:
        """Bits per code of layer `key` when it is stored as pack-quantized int32 words (else None): from the (rows,
        columns) stored beside them, else from the config group targeting the layer (seekstack's stacked-experts
        layout stores no shape)."""
        if f"{key}.weight_packed" not in self:
            return None
        words = self.stored_shape(f"{key}.weight_packed")[-1]
        if f"{key}.weight_shape" in self:
            columns = int(self._get(f"{key}.weight_shape")[-1])
            bits = words * 32 // columns if columns > 0 and words * 32 % columns == 0 else None
            source = f"its weight_shape: {columns} columns in {words} int32 words per row"
        else:
            configured = [(group.get("weights") or {}).get("num_bits") for _, group in self._groups_targeting(key)]
            bits = configured[0] if configured else 4
            source = f"its config group: num_bits={bits}"
        if bits not in (4, 8):
            raise CheckpointError(
                f"{self.file_of(f'{key}.weight_packed')}: layer {key!r} is packed as neither int4 nor int8 ({source}): "
                f"{DAMAGED}"
            )
        return bits

    def weight_key(self, key: str) -> str:
        """The key of checkpoint layer `key`'s stored weight: `key.weight_packed` or `key.weight`."""
        return f"{key}.weight_packed" if f"{key}.weight_packed" in self.key_to_file else f"{key}.weight"

    def stored_shape(self, key: str) -> list[int]:
        """The shape of `key`, read from the header only."""
        return self._from_file(key, lambda handle: handle.get_slice(key).get_shape())

    def stored_dtype(self, key: str) -> str:
        """The safetensors dtype name of `key` ("F32", "I8", "F8_E4M3", ...), read from the header only."""
        return self._from_file(key, lambda handle: handle.get_slice(key).get_dtype())

    def unpacked_shape(self, key: str) -> tuple[int, ...]:
        """The shape of the tensor under `key` as the model holds it, from the headers: a `...weight_packed`'s int32
        words counted as the int4/int8 codes they hold."""
        shape = tuple(self.stored_shape(key))
        if not key.endswith(".weight_packed"):
            return shape
        bits = self.packed_bits(key.removesuffix(".weight_packed"))
        return (*shape[:-1], shape[-1] * 32 // bits)  # type: ignore[operator]

    def check_shape(self, key: str, expected: tuple[int, ...]) -> None:
        """CheckpointError naming the file and the key unless the tensor under `key` (unpacked) is of the shape
        `expected` that the config implies."""
        shape = self.unpacked_shape(key)
        if shape != expected:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} has shape {shape}, the config {self.directory / CONFIG_FILE} "
                f"implies {expected}; use the {CONFIG_FILE} saved with these weights"
            )

    def check_quantized_shape(self, layer: str, expected: tuple[int, ...], parts: int = 1) -> None:
        """CheckpointError naming the file and the key unless the quantized weight of checkpoint layer `layer` is the
        (..., rows, columns) `expected` that the config implies, with scales that fit it (`check_scales`)."""
        weight_key = self.weight_key(layer)
        self.check_shape(weight_key, expected)
        self.check_recorded_shape(weight_key)
        self.check_scales(weight_key, parts)

    def check_recorded_shape(self, weight_key: str) -> None:
        """CheckpointError naming the file and the key when the (rows, columns) compressed-tensors records beside
        packed weight `weight_key` are not its own (transformers would unpack it to them)."""
        shape_key = weight_key.removesuffix("_packed") + "_shape"
        if not weight_key.endswith("_packed") or shape_key not in self.key_to_file:
            return
        recorded, held = self._get(shape_key).tolist(), list(self.unpacked_shape(weight_key))
        if recorded != held:
            raise CheckpointError(
                f"{self.file_of(shape_key)}: key {shape_key!r} is {recorded}, but {weight_key!r} holds a {held} "
                f"matrix; {DAMAGED}"
            )

    def check_scales(self, weight_key: str, parts: int = 1) -> None:
        """CheckpointError naming the file and the key when the scales of quantized weight `weight_key` are missing or
        do not fit its shape: e4m3's `weight_scale_inv` one per fp8 block of each of `parts` matrices stacked by rows,
        int8/int4's `weight_scale` one per row and group of columns."""
        shape = self.unpacked_shape(weight_key)
        if self.stored_dtype(weight_key) == "F8_E4M3":
            scale_key = weight_key + "_scale_inv"
            if self.fp8_block is None or scale_key not in self.key_to_file:
                raise CheckpointError(
                    f"{self.file_of(weight_key)}: FP8 tensor {weight_key!r} has no {scale_key!r} / "
                    f"quantization_config; {DAMAGED}"
                )
            expected = fp8_scale_shape(shape, self.fp8_block, parts)
            scale_shape = tuple(self.stored_shape(scale_key))
            block_rows, block_cols = self.fp8_block
            fits, wanted = scale_shape == expected, f"{expected}, a scale per {block_rows}x{block_cols} block"
        else:
            scale_key = weight_key.removesuffix("_packed") + "_scale"
            scale_shape = tuple(self.stored_shape(scale_key))
            *rows, groups = scale_shape
            fits = tuple(rows) == shape[:-1] and groups > 0 and shape[-1] % groups == 0
            wanted = f"({', '.join(map(str, shape[:-1]))}, G) with G dividing {shape[-1]}, a scale per row and group"
        if not fits:
            raise CheckpointError(
                f"{self.file_of(scale_key)}: key {scale_key!r} has shape {scale_shape}, but the {shape} weight "
                f"{weight_key!r} takes {wanted}; {DAMAGED}"
            )

    def check_stored_format(self, key: str) -> None:
        """CheckpointError naming the file, the key and its dtype unless tensor `key` is stored as loading reads it:
        e4m3 beside a `_scale_inv`, int8 beside a `_scale`, int32 words as `weight_packed`, else a float dtype (or
        e4m3, whose missing scale `check_scales` names); quantized only in the quantization_config's format."""
        stored = self.stored_dtype(key)
        if f"{key}_scale_inv" in self:
            loadable, expected = ("F8_E4M3",), f"fp8 e4m3, as its {key}_scale_inv says"
        elif key.endswith(".weight_packed"):
            loadable, expected = ("I32",), "int4/int8 codes packed in int32 words"
        elif f"{key}_scale" in self:
            loadable, expected = ("I8",), f"int8 codes, as its {key}_scale says"
        else:
            loadable, expected = (*FLOAT_STORED, "F8_E4M3"), f"a float weight ({', '.join(FLOAT_STORED)})"
        if stored not in loadable:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} is stored as {stored}, but seekstack loads it only as {expected}; "
                f"{DAMAGED}"
            )
        configured = QUANTIZED_STORED.get(self.quant_method or "", ())
        if stored not in FLOAT_STORED and self.quant_method is not None and stored not in configured:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} is stored as {stored}, but the quantization_config of "
                f"{self.directory / CONFIG_FILE} is {self.quant_method!r}, whose weights are {', '.join(configured)}; "
                f"the config and the weights disagree: {DAMAGED}"
            )

    def stored_bytes(self, key: str) -> int:
        """The bytes of `key` in its file, from the header only; CheckpointError naming the file and key for a dtype
        seekstack does not read."""
        width = STORED_WIDTHS.get(self.stored_dtype(key))
        if width is None:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} is stored as {self.stored_dtype(key)}, which seekstack does not "
                f"read ({', '.join(STORED_WIDTHS)})"
            )
        return math.prod(self.stored_shape(key)) * width

    def read(self, key: str, dequantize: bool = True, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor under `key`; a quantized weight (FP8, or compressed-tensors int8/int4) is dequantized to
        float32 unless `dequantize` is False, and then starts at an ALIGNMENT boundary (the int kernels use it in
        place; copied where the file's does not). With `shape` (what the config implies), CheckpointError naming the
        file and the key for a tensor stored in another shape, and for quantized weights' scales that do not fit it."""
        packed_key = key + "_packed"
        if dequantize and key.endswith(".weight") and key not in self.key_to_file and packed_key in self.key_to_file:
            self.check_stored_format(packed_key)
            if shape is not None:
                self.check_shape(packed_key, shape)
            self.check_recorded_shape(packed_key)
            self.check_scales(packed_key)
            self.used.update((packed_key, key + "_scale", key + "_shape"))
            codes = unpack_codes(self._get(packed_key), self.packed_bits(key.removesuffix(".weight")))
            return dequantize_int(codes, self._get(key + "_scale"))
        if shape is not None:
            self.check_shape(key, shape)
        self.check_stored_format(key)
        tensor = self._get(key)
        self.used.add(key)
        if not dequantize:  # memory-mapped; the mapping outlives the reader for as long as the tensor does
            return _aligned(tensor)
        if tensor.dtype == torch.int8 and key + "_scale" in self.key_to_file:
            self.check_scales(key)
            self.used.add(key + "_scale")
            return dequantize_int(tensor, self._get(key + "_scale"))
        if tensor.dtype == torch.float8_e4m3fn:
            self.check_scales(key)  # refuses a missing scale or fp8 quantization_config too
            self.used.add(key + "_scale_inv")
            tensor = dequantize_fp8(tensor, self._get(key + "_scale_inv"), self.fp8_block)  # type: ignore[arg-type]
        return tensor  # a float weight memory-mapped as it is, aligned or not (`_maps_in_place` asks)

    def starts_aligned(self, key: str) -> bool:
        """Whether tensor `key` starts at a multiple of ALIGNMENT bytes into its memory map, so into its file: files
        seekstack did not write (safetensors pads a header to 8 bytes only) often hold tensors that do not."""
        return self._get(key).data_ptr() % ALIGNMENT == 0

    def _get(self, key: str) -> torch.Tensor:
        return self._from_file(key, lambda handle: handle.get_tensor(key))

    def _from_file(self, key: str, read: Callable[[Any], Any]) -> Any:
        """`read(handle)` on the open safetensors file the index names for `key`; CheckpointError naming the file and
        the key when the key is missing or the file cannot give it (an index pointing at the wrong shard)."""
        if key not in self.key_to_file:
            where = self.directory / (INDEX_FILE if (self.directory / INDEX_FILE).exists() else SINGLE_FILE)
            raise CheckpointError(f"{where}: missing key {key!r}; the weights do not match {CONFIG_FILE}: {DAMAGED}")
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = self._files.enter_context(_open_safetensors(self.directory / file))
        try:
            return read(self._handles[file])
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{self.directory / file}: cannot read key {key!r} ({error}); {DAMAGED}") from None


def _fp8_block(quantization: dict[str, Any], config_path: Path) -> tuple[int, int]:
    """The (rows, columns) scale block of an fp8 `quantization` config (DeepSeek's 128x128 when it names none);
    CheckpointError naming the file and the field unless `weight_block_size` is two positive integers."""
    block = quantization.get("weight_block_size", DEFAULT_FP8_BLOCK)
    sizes = block if isinstance(block, (list, tuple)) else []
    if len(sizes) != 2 or not all(type(size) is int and size > 0 for size in sizes):
        raise CheckpointError(
            f"{config_path}: quantization_config.weight_block_size is {block!r}; an fp8 checkpoint names its scale "
            f"block as two positive integers [rows, columns] (DeepSeek's: {list(DEFAULT_FP8_BLOCK)}): use the "
            f"{CONFIG_FILE} saved with these weights"
        )
    return sizes[0], sizes[1]


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or an aligned copy of it where it starts off an ALIGNMENT boundary (files not written by us)."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def stored_tensor_bytes(directory: str | Path) -> dict[str, int]:
    """The bytes each tensor of checkpoint `directory` takes once loaded, by key, from its safetensors headers (no
    weight is read; only compressed-tensors' two-number `weight_shape`s): as stored, without what loading leaves unread
    (the MTP modules' copies of the embedding and head, the `weight_shape`s), integer scales as the quantized
    layers hold them: in SCALE_DTYPE, int4's with a zero point each (the CPU kernel's scale-and-zero table), and a
    quantized `kv_b_proj` as loading holds it: expanded to the float dtype of the embedding, without its scales."""
    with CheckpointReader(Path(directory), None) as reader:
        embedding = "model.embed_tokens.weight"
        float_width = reader.stored_bytes(embedding) // math.prod(reader.stored_shape(embedding))
        sizes = {}
        for key in reader.key_to_file:
            layer, _, part = key.rpartition(".")
            if MTP_COPIES.match(key) or key.endswith(".weight_shape"):
                continue
            if layer.endswith(KEPT_FLOAT) and part != "bias":  # read dequantized; its scales are not held
                if part in ("weight", "weight_packed"):
                    sizes[f"{layer}.weight"] = math.prod(reader.unpacked_shape(key)) * float_width
                continue
            if key.endswith(".weight_scale"):
                per_scale = 2 if reader.packed_bits(key.removesuffix(".weight_scale")) == 4 else 1
                sizes[key] = math.prod(reader.stored_shape(key)) * per_scale * SCALE_DTYPE.itemsize
            else:
                sizes[key] = reader.stored_bytes(key)
    return sizes


def stored_float_dtype(directory: str | Path) -> torch.dtype:
    """The dtype checkpoint `directory` stores its float weights in: its embedding's (a quantized checkpoint's
    float layers are in it too)."""
    with CheckpointReader(Path(directory), None) as reader:
        name = reader.stored_dtype("model.embed_tokens.weight")
    return TORCH_DTYPES[name]


def load_pretrained(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    dequantize: bool = False,
    offload: Callable[[Transformer], dict[str, MappedCopy]] | None = None,
) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory (ours or a release) into a `Transformer`.

    Tensors are read one at a time into a model materialised directly on `device`, so peak memory
    stays near one copy of the model. MTP modules are built for the MTP layers the checkpoint holds.
    `offload`, given the model once its layers are built and before its float weights are read, names the tensors
    (state-dict names) that are to be file pages rather than memory, and how to write them (`MappedCopy`): those
    not mapped from the checkpoint as stored are written one piece (one expert's matrix, or a quantized expert's
    codes or scales) at a time, never whole in memory (seekstack.infer.placement's disk parts).
    Layers stored quantized (fp8, int8, int4) load as quantized modules that run their low-bit kernels
    (seekstack.compress), unless `dequantize` asks for plain float weights.
    A missing, truncated or damaged file raises CheckpointError naming it. A config transformers computes
    differently (`ModelConfig.transformers_divergences`) is warned about; MoE layers follow the weights' layout.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = read_config(directory)
    reader = CheckpointReader(directory, config.extra.get("quantization_config"))
    reader.refuse_keys_in_two_shards()
    present_mtp = 0
    while present_mtp < config.num_nextn_predict_layers and any(
        f"model.layers.{config.num_hidden_layers + present_mtp}.eh_proj.{name}" in reader
        for name in ("weight", "weight_packed")
    ):
        present_mtp += 1
    config = follow_moe_layout_of_weights(config.replace(num_nextn_predict_layers=present_mtp), reader, config_path)
    config = untie_a_stored_head(config, reader, config_path)
    warn_transformers_divergences(config, directory)

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()

    with reader, torch.no_grad():
        quantized = reader.quantized and not dequantize
        swapped, unfilled = load_quantized_layers(model, reader, device) if quantized else (set(), {})
        copies = offload(model) if offload is not None else {}
        for name, expert in unfilled.items():
            _fill_expert_stack(model.get_submodule(name), name, expert, copies, device)
        for name, target in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if any(name.startswith(layer + ".") for layer in swapped):
                continue
            key = checkpoint_key(name, config.num_hidden_layers)
            if _maps_in_place(reader, key, target):
                _tensor_of(model, name).data = reader.read(key, shape=tuple(target.shape))  # the file's pages: no copy
                continue
            views, pieces = _float_pieces(reader, key, target)
            if name in copies:
                _tensor_of(model, name).data = copies[name](target, pieces)
            else:
                for view, piece in zip(views, pieces(), strict=True):
                    view.copy_(piece)
    model.reset_rope()
    unused = sorted(k for k in reader.key_to_file if k not in reader.used and not MTP_COPIES.match(k))
    _refuse_miscounted_layers(unused, reader, config_path, config.num_hidden_layers)
    if unused:
        warnings.warn(f"{directory}: {len(unused)} checkpoint keys were not used, e.g. {unused[:3]}", stacklevel=2)
    return model


def _refuse_miscounted_layers(unused: list[str], reader: CheckpointReader, config_path: Path, layers: int) -> None:
    """A config whose `num_hidden_layers` is not the weights' is refused: past it, decoder layers would go unused
    and the model produce garbage (layers there holding an MTP module, `eh_proj`, are skipped MTP depth, which is
    allowed); within it, an MTP layer would run as a decoder layer."""
    mtp_layers = {m[1] for key in reader.key_to_file if (m := re.match(r"model\.layers\.(\d+)\.eh_proj\.", key))}
    first_mtp = min(map(int, mtp_layers), default=layers)
    if first_mtp < layers:
        raise CheckpointError(
            f"{config_path}: num_hidden_layers is {layers}, but layer {first_mtp} of the weights is an MTP module "
            f"(eh_proj), so they hold {first_mtp} decoder layers; use the {CONFIG_FILE} saved with these weights"
        )
    for key in unused:
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        if layer and int(layer[1]) >= layers and layer[1] not in mtp_layers:
            raise CheckpointError(
                f"{config_path}: num_hidden_layers is {layers}, but {reader.file_of(key)} holds decoder layer "
                f"{layer[1]} ({key!r}); use the {CONFIG_FILE} saved with these weights"
            )


def follow_moe_layout_of_weights(config: ModelConfig, reader: CheckpointReader, config_path: Path) -> ModelConfig:
    """`config`, with moe_layer_freq=1 when the weights hold a router in every layer from first_k_dense_replace on:
    transformers ignores moe_layer_freq and writes that layout, so its checkpoints load as it runs them. Weights in
    neither layout are refused, naming the layers."""
    layers = range(config.first_k_dense_replace, config.num_hidden_layers)
    dense_by_config = [i for i in layers if config.n_routed_experts and not config.is_moe_layer(i)]
    routed = [i for i in layers if f"model.layers.{i}.mlp.gate.weight" in reader]
    if not dense_by_config or not set(routed) & set(dense_by_config):
        return config
    if routed == list(layers):
        warnings.warn(
            f"{config_path}: moe_layer_freq is {config.moe_layer_freq}, but the weights hold routed experts in every "
            f"layer from first_k_dense_replace={config.first_k_dense_replace} on, the layout transformers writes (it "
            "ignores moe_layer_freq); loaded as transformers runs it, with moe_layer_freq=1",
            stacklevel=3,
        )
        return config.replace(moe_layer_freq=1)
    raise CheckpointError(
        f"{config_path}: the weights hold routed experts in layers {routed}, which is neither layout of this config: "
        f"moe_layer_freq={config.moe_layer_freq} makes layers {dense_by_config} dense (DeepSeek's V2 code, seekstack) "
        f"and transformers, which ignores moe_layer_freq, makes all of {list(layers)} MoE; use the {CONFIG_FILE} "
        "saved with these weights"
    )


def untie_a_stored_head(config: ModelConfig, reader: CheckpointReader, config_path: Path) -> ModelConfig:
    """`config`, untied (tie_word_embeddings=False, with a warning) when it ties the head to the embedding but the
    weights store a head that is not the embedding: transformers then keeps that head untied, so it is used."""
    if not config.tie_word_embeddings or reader.weight_key("lm_head") not in reader:
        return config
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if head in reader and reader.stored_shape(head) == reader.stored_shape(embedding):
        if torch.equal(reader.read(head), reader.read(embedding)):  # a tied head stored anyway: tie it
            return config
    warnings.warn(
        f"{config_path}: tie_word_embeddings is true, but {reader.file_of(reader.weight_key('lm_head'))} stores an "
        "lm_head that is not the embedding; it is loaded untied (tie_word_embeddings=False), as transformers loads it",
        stacklevel=3,
    )
    return config.replace(tie_word_embeddings=False)


def warn_transformers_divergences(config: ModelConfig, where: str | Path) -> None:
    """Warn that transformers runs the checkpoint at `where` as another model, naming the fields and why."""
    divergences = config.transformers_divergences()
    if divergences:
        reasons = "; ".join(f"{name}={getattr(config, name)!r}: {reason}" for name, reason in divergences.items())
        warnings.warn(
            f"{where}: transformers computes this checkpoint differently from seekstack, so their logits differ: "
            f"{reasons}",
            stacklevel=3,
        )


def _maps_in_place(reader: CheckpointReader, key: str, target: torch.Tensor) -> bool:
    """Whether checkpoint `key` holds all of `target` (a CPU tensor) in its dtype, at an ALIGNMENT boundary: its
    memory-mapped pages are it. Others are copied: into `target`, or, piece by piece, into its disk copy."""
    stored = SAFETENSORS_DTYPES.get(target.dtype)
    in_dtype = target.device.type == "cpu" and key in reader and reader.stored_dtype(key) == stored
    return in_dtype and reader.starts_aligned(key)


def _float_pieces(
    reader: CheckpointReader, key: str, target: torch.Tensor
) -> tuple[list[torch.Tensor], Callable[[], Iterator[torch.Tensor]]]:
    """The views of float tensor `target` (checkpoint key `key`) that the checkpoint fills one at a time, in memory
    order, and the function giving their values in `target`'s dtype: an expert stack's, per expert
    (`expert_sources`; the stacked layout's quantized stack dequantized expert by expert), else `target` itself."""
    sources = expert_sources(key, target)
    names = _stored_names(reader, key) if sources is not None else None
    if names is not None:  # the stacked layout, quantized
        stored = _stacked_stored(reader, key, tuple(target.shape), names)
        return list(target), functools.partial(_dequantized_experts, reader, key, stored, target.dtype)
    sources = None if key in reader else sources  # the stacked layout in float: one key
    sources = sources or [(key, target)]
    return [view for _, view in sources], functools.partial(_read_pieces, reader, sources, target.dtype)


def _dequantized_experts(
    reader: CheckpointReader, key: str, stored: dict[str, torch.Tensor], dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """Each expert's matrix of the stack of quantized expert weights `stored` (stacked expert weight `key`),
    dequantized to `dtype`, one expert at a time."""
    for e in range(len(next(iter(stored.values())))):
        yield _stacked_weight(reader, key, {name: tensor[e] for name, tensor in stored.items()}).dequantize().to(dtype)


def _read_pieces(
    reader: CheckpointReader, sources: list[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """The tensors of the checkpoint keys `sources` names, each in `dtype` and checked against the shape of the view
    it fills; one at a time, in the order `sources` gives (a stacked tensor's memory order: `expert_sources`)."""
    for key, view in sources:
        yield reader.read(key, shape=tuple(view.shape)).to(dtype)


def _tensor_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer named `name` in state-dict terms."""
    module, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module), attribute)


# ---------------------------------------------------------------------------------------- writing
def save_pretrained(
    model: Transformer,
    directory: str | Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    fp8_block: tuple[int, int] | None = None,
    stacked_experts: bool = False,
) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`) as folder `directory`.

    With `fp8_block`, block projections are stored as e4m3 with `weight_scale_inv`, as in DeepSeek's
    FP8 release; with `stacked_experts`, routed experts in seekstack's memory-mappable layout. The folder is
    swapped in whole when complete (`atomic_directory`): an interrupted save never leaves a half-written
    checkpoint, and an existing one stays until the new one is complete; its files this save does not write (the
    tokenizer's) are kept. A config transformers computes differently (`ModelConfig.transformers_divergences`) is
    warned about.
    """
    refuse_hf_export(model.config, directory)
    refuse_to_replace(directory, MODEL_FOLDER_FILES)
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        write_pretrained_files(model, staging, max_shard_bytes, fp8_block, stacked_experts)
        _copy_unsaved_files(directory, staging)
    warn_transformers_divergences(model.config, directory)
    return directory


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
    """Write config.json and the safetensors into the existing folder `directory`, which the caller makes atomic
    (`save_pretrained`, training checkpoints). `stacked_experts` writes seekstack's stacked-experts layout."""
    write_shards(_stored_tensors(model, fp8_block, stacked_experts), directory, max_shard_bytes)
    write_config(model, directory, fp8_block, stacked_experts)


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """Write (checkpoint key, tensor) pairs as safetensors into `directory`: one file, or shards and their index.
    Shards are written as they fill, so memory holds one shard and what `tensors` holds (a lazy iterable can
    make the tensors of a model larger than memory one part at a time)."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0
    shard_keys: list[list[str]] = []

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
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
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


def _stored_tensors(
    model: Transformer, fp8_block: tuple[int, int] | None, stacked_experts: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    fp8_layers = [w for w in map(layer_weight, quantized_layers(model).values()) if w.scheme == "fp8"]
    if fp8_layers and fp8_block is None:  # an fp8 model: the release also stores the layers kept in float (kv_b_proj)
        fp8_block = fp8_layers[0].block
    for key, tensor in checkpoint_tensors(model, stacked_experts):
        stacked_parts = STACKED_EXPERT_PARTS.get(key.rpartition(".")[2]) if ".mlp.experts." in key else None
        if fp8_block is None or tensor.dtype == torch.float8_e4m3fn:
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
