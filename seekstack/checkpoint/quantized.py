"""Quantized layers in a checkpoint: the stored tensors and quantization_config of a model's int8/int4/fp8 layers,
and loading a checkpoint's quantized layers and routed-expert stacks as the quantized modules that run them."""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from seekstack.checkpoint.fp8 import _is_fp8_quantizable, fp8_format
from seekstack.checkpoint.keys import (
    DAMAGED,
    KEPT_FLOAT,
    MTP_COPIES,
    PER_EXPERT_PROJECTIONS,
    STACKED_EXPERT_PARTS,
    TORCH_DTYPES,
    CheckpointError,
    layer_key,
)
from seekstack.checkpoint.reader import ACTIVATION_SCALES, FLOAT_STORED, CheckpointReader, read_config
from seekstack.compress.formats import compressed_tensors_config, pack_codes
from seekstack.compress.linear import (
    QuantizedExperts,
    QuantizedLinear,
    QuantizedWeight,
    kernels_run,
    layer_weight,
    use_quantized_feed_forwards,
    weight_from_stored,
)
from seekstack.model.moe import RoutedExperts
from seekstack.model.transformer import Transformer

# A tensor held as a file's pages, from the tensor it replaces (its dtype and shape) and a function giving its values
# one piece at a time, in memory order: how `load_pretrained(offload=...)` writes a tensor straight to disk.
MappedCopy = Callable[[torch.Tensor, Callable[[], Iterable[torch.Tensor]]], torch.Tensor]
# Buffer `buffer` (codes or scales) of expert e's quantized weight of a stack of routed experts' (gate_up or down),
# `(buffer, e)`, built from the one stored tensor it comes from, read from a checkpoint.
ExpertBuffer = Callable[[str, int], torch.Tensor]
# The stored tensors of a quantized layer that `stored_tensor_bytes` prices with its weight (`_held_layer_bytes`), or
# not at all: loading reads no `weight_shape` (the shape is the config's), activations' `input_scale` or
# `activation_scale` nor the KV cache's `k_scale` and `v_scale`.
QUANTIZATION_PARTS = (
    "weight_scale", "weight_scale_inv", "weight_shape", "weight_zero_point", *ACTIVATION_SCALES, "k_scale", "v_scale"
)  # fmt: skip
# A routed expert's projection or stacked weight: the layer (`...mlp.experts`), and its expert's number if per expert.
EXPERT_WEIGHT = re.compile(r"(.*\.mlp\.experts)\.(?:(\d+)\.)?\w+$")


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Our name -> module, for each QuantizedLinear and QuantizedExperts of `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}


def _has_int_layers(model: torch.nn.Module) -> bool:
    """Whether `model` has int8/int4 layers (a compressed-tensors checkpoint)."""
    return any(layer_weight(layer).scheme != "fp8" for layer in quantized_layers(model).values())


def quantization_config(
    model: Transformer, quantized: dict[str, torch.nn.Module], stacked_experts: bool = False
) -> dict[str, Any]:
    """The config.json `quantization_config` of a model with quantized layers: DeepSeek's fp8 entry, or a
    compressed-tensors one whose targets name each quantized layer (per-expert Linear modules for experts, or the
    stacked tensors in the stacked-experts layout)."""
    layers = model.config.num_hidden_layers
    weights = {name: layer_weight(m) for name, m in quantized.items()}
    if {w.scheme for w in weights.values()} == {"fp8"}:
        block, kept = next(iter(weights.values())).block, _fp8_kept_layers(model)
        config = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
        }
        if kept:
            config["modules_to_not_convert"] = kept
        return config
    formats = {name: (weight.scheme, getattr(weight, "group", None)) for name, weight in weights.items()}
    groups: dict[tuple[str, int | None], list[str]] = {}
    for name, weight in weights.items():
        if weight.scheme == "fp8":
            raise ValueError(f"layer {name!r} is fp8 among int8/int4 layers; a checkpoint holds one of the two formats")
        target = re.escape(layer_key(name, layers))
        if isinstance(quantized[name], QuantizedExperts):
            target += r"\.(gate_up|down)_proj" if stacked_experts else r"\.\d+\.(gate|up|down)_proj"
        groups.setdefault(formats[name], []).append(f"re:^{target}$")
    # transformers 5.23 reads every layer's routed experts in the format of the first group whose targets name
    # experts: the main model's routed experts' group goes first (it does not load the MTP layers)
    routed = {formats[n] for n, m in quantized.items() if isinstance(m, QuantizedExperts) and n.startswith("layers.")}
    ordered = sorted(groups.items(), key=lambda item: (item[0] not in routed, item[0]))
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return compressed_tensors_config(
        {f"group_{i}": (scheme, group, targets) for i, ((scheme, group), targets) in enumerate(ordered)},
        ignore=[layer_key(name, layers) for name in kept],
        packed_int8=not stacked_experts,
    )


def _fp8_kept_layers(model: Transformer) -> list[str]:
    """The checkpoint names of the layers of fp8 `model` that quantizing kept in float (`--keep`, a layer's "none")
    though DeepSeek's release quantizes them (kv_b_proj aside, stored fp8): the fp8 `modules_to_not_convert` that
    transformers and vLLM read to load them as plain layers. A float lm_head comes first where there are any: a
    list replaces transformers' default one, which holds the head."""
    layers = model.config.num_hidden_layers
    kept = []
    for name, module in model.named_modules():
        key = layer_key(name, layers)
        routed = isinstance(module, RoutedExperts) and not isinstance(module, QuantizedExperts)
        linear = isinstance(module, torch.nn.Linear) and _is_fp8_quantizable(f"{key}.weight", module.weight)
        if routed or (linear and not key.endswith(KEPT_FLOAT)):
            kept.append(key)
    head = ["lm_head"] if kept and isinstance(model.lm_head, torch.nn.Linear) else []
    return head + kept


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
    stacks = module.gate_up_proj.stored(), module.down_proj.stored()  # once: int4's reads the whole stack back
    for e in range(module.gate_up_proj.shape[0]):
        gate_up = {name: tensor[e].chunk(2) for name, tensor in stacks[0].items()}
        down = {name: tensor[e] for name, tensor in stacks[1].items()}
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
    return weight_from_stored(tensors, reader.fp8_block, bits=reader.code_bits(key))


def _stored_names(reader: CheckpointReader, key: str) -> list[str] | None:
    """The names of the stored tensors of checkpoint layer `key`'s quantized weight, its codes' then its scales', or
    None for a layer read in float: stored so, or in a format loading dequantizes (float-quantized fp8, int codes
    with zero points: the int8 kernel takes none, and the int4 kernel's bfloat16 offset -z x s would round them)."""
    if f"{key}.weight_packed" in reader:
        reader.check_stored_format(f"{key}.weight_packed")
        reader.used.add(f"{key}.weight_shape")
        bits = reader.packed_bits(key)
        columns = reader.stored_shape(f"{key}.weight_packed")[-1] * 32 // bits
        reader.check_int_scheme(key, bits, columns, reader.stored_shape(f"{key}.weight_scale")[-1])
        return ["weight_packed", "weight_scale"] if reader.zero_points(key) is None else None
    if f"{key}.weight" not in reader:
        return None
    reader.check_stored_format(f"{key}.weight")
    stored = reader.stored_dtype(f"{key}.weight")
    if stored == "I8":
        columns = reader.stored_shape(f"{key}.weight")[-1]
        reader.check_int_scheme(key, 8, columns, reader.stored_shape(f"{key}.weight_scale")[-1])
        return ["weight", "weight_scale"] if reader.zero_points(key) is None else None
    if stored == "F8_E4M3" and f"{key}.weight_scale_inv" in reader:  # DeepSeek's; float-quantized's load as float
        return ["weight", "weight_scale_inv"]
    return None


def stored_tensor_bytes(directory: str | Path) -> dict[str, int]:
    """The bytes each tensor of checkpoint `directory` takes once loaded (`load_pretrained(dtype="auto")`), by key,
    from its safetensors headers (no weight is read; only compressed-tensors' two-number `weight_shape`s and a symmetric
    layer's zero points, `CheckpointReader.zero_points`): float
    tensors as stored, without what loading leaves unread (the MTP modules' copies of the embedding and head, the
    `weight_shape`s, activations' `input_scale`s), and each quantized layer as loading holds it
    (`_held_layer_bytes`)."""
    directory = Path(directory)
    with CheckpointReader(directory, read_config(directory).extra.get("quantization_config")) as reader:
        embedding = "model.embed_tokens.weight"
        float_width = reader.stored_bytes(embedding) // math.prod(reader.stored_shape(embedding))
        sizes, runs_quantized = {}, {}
        for key in reader.key_to_file:
            layer, _, part = key.rpartition(".")
            quantized = reader.stored_dtype(key) not in FLOAT_STORED or layer.endswith(KEPT_FLOAT)
            if part in ("weight", "weight_packed") and quantized:
                sizes.update(_held_layer_bytes(reader, layer, float_width, runs_quantized))
            elif not (MTP_COPIES.match(key) or part in QUANTIZATION_PARTS):
                sizes[key] = reader.stored_bytes(key)
    return sizes


def _held_layer_bytes(
    reader: CheckpointReader, layer: str, float_width: int, runs_quantized: dict[str, bool]
) -> dict[str, int]:
    """What loading holds of checkpoint layer `layer`, stored quantized (or `kv_b_proj`), by key: the buffers of the
    quantized weight it runs, built on meta from the headers as loading builds it (int4's kernel packing and
    scale-and-zero table, int8 codes of 4 bits as int4, DeepSeek's fp8 scales in float32), or its weight dequantized
    to the float dtype (`float_width` bytes an element) where loading keeps it in float: kv_b_proj, float-quantized
    fp8, weights whose kernel `load_quantized_layers` finds cannot run them. `runs_quantized` caches that finding
    by the module loading swaps (a routed experts' layer runs all its stacks quantized or none)."""
    held = None if layer.endswith(KEPT_FLOAT) else _meta_weight(reader, layer)
    experts = EXPERT_WEIGHT.match(layer)
    module = experts[1] if experts else layer
    if held is not None and module not in runs_quantized:
        stacks = ["0.gate_proj", "0.down_proj"] if experts and experts[2] else ["gate_up_proj", "down_proj"]
        peers = [_meta_weight(reader, f"{module}.{stack}") for stack in stacks] if experts else [held]
        runs_quantized[module] = all(peer is not None and peer[1].kernel_runs() for peer in peers)
    if held is not None and runs_quantized[module]:
        names, weight = held
        buffers = zip(names, weight.stored_buffers, strict=True)
        return {f"{layer}.{name}": getattr(weight, buffer).nbytes for name, buffer in buffers}
    return {f"{layer}.weight": math.prod(reader.unpacked_shape(reader.weight_key(layer))) * float_width}


def _meta_weight(reader: CheckpointReader, layer: str) -> tuple[list[str], QuantizedWeight] | None:
    """The names of checkpoint layer `layer`'s stored tensors and the quantized weight loading builds of them, on meta
    (from the headers: dtypes and shapes, nothing read); None for a layer it reads in float."""
    names = _stored_names(reader, layer)
    if names is None:
        return None
    stored = {name: _empty_stored(reader, [f"{layer}.{name}"]) for name in names}
    return names, weight_from_stored(stored, reader.fp8_block, bits=reader.code_bits(layer))


def quantized_in_float(directory: str | Path, model: Transformer) -> dict[str, str]:
    """Our name -> stored format (`fp8 RxC` as `fp8_format` names a block, `fp8`, `int8`, `int4`) of each layer of
    `model`, loaded from checkpoint `directory`, that the checkpoint stores quantized and loading holds in float
    (compressed-tensors' float-quantized fp8, weights whose kernel cannot run them, a frozen checkpoint's float weights
    it rounds by their scales, kv_b_proj always); from the safetensors headers."""
    directory, layers = Path(directory), model.config.num_hidden_layers
    formats = {}
    with CheckpointReader(directory, read_config(directory).extra.get("quantization_config")) as reader:
        for name, module in model.named_modules():
            if type(module) not in (torch.nn.Linear, RoutedExperts):
                continue
            key = layer_key(name, layers)
            if isinstance(module, RoutedExperts):
                key += ".gate_up_proj" if f"{key}.gate_up_proj.weight" in reader else ".0.gate_proj"
            weight = reader.weight_key(key)
            if weight not in reader:
                continue
            if reader.stored_dtype(weight) not in FLOAT_STORED:
                bits = reader.code_bits(key)
                formats[name] = f"int{bits}" if bits else fp8_format(reader.fp8_block)
            elif (rounded := reader.rounded_format(weight)) is not None:
                formats[name] = rounded
    return formats


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
            _check_shaped_like(reader, f"{key}.{e}.{proj}", f"{key}.0.{proj}", names)
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
    return weight_from_stored(stored, reader.fp8_block, parts, reader.code_bits(bits_key or key))


def _per_expert_stack(
    reader: CheckpointReader, key: str, stack: str, names: list[str], count: int
) -> tuple[QuantizedWeight, ExpertBuffer]:
    """Stacked expert weight `stack` (`gate_up_proj`, `down_proj`) of the `count` experts under `key`, stored per
    expert: the stack, empty (on meta) until `_fill_expert_stack` fills it, and the function building a buffer of
    expert e's weight from the one stored tensor (of `names`) it comes from, its projections' stacked by rows."""
    projections, first = PER_EXPERT_PROJECTIONS[stack], f"{key}.0.{PER_EXPERT_PROJECTIONS[stack][0]}"
    expert = {name: _empty_stored(reader, [f"{key}.0.{p}.{name}" for p in projections]) for name in names}
    empty = {name: tensor.expand(count, *tensor.shape) for name, tensor in expert.items()}
    stacked, bits = _stacked_weight(reader, f"{key}.{stack}", empty, bits_key=first), reader.code_bits(first)

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
        pieces = functools.partial(_expert_buffers, expert_buffer, buffer, len(empty))
        copy = copies.get(f"{name}.{buffer}")
        filled[buffer] = copy(empty, pieces) if copy is not None else _stacked(pieces(), empty, device)
    stack.fill_buffers(filled)


def _expert_buffers(expert_buffer: ExpertBuffer, buffer: str, count: int) -> Iterator[torch.Tensor]:
    """Buffer `buffer` of each of the `count` experts' weights (`expert_buffer`), one expert at a time."""
    for e in range(count):
        yield expert_buffer(buffer, e)


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


def _check_shaped_like(reader: CheckpointReader, layer: str, reference: str, names: list[str]) -> None:
    """CheckpointError naming the file and the key when a stored tensor (of `names`) of checkpoint layer `layer` (an
    expert's projection) has another shape than `reference`'s (expert 0's same projection, whose shapes the stack
    takes): its weight of the config's shape, but codes or scales of other bits or group size, which stacking would
    broadcast or refuse unnamed. From the headers, before anything is read."""
    for name in names:
        key, reference_key = f"{layer}.{name}", f"{reference}.{name}"
        shape, expected = reader.stored_shape(key), reader.stored_shape(reference_key)
        if shape != expected:
            raise CheckpointError(
                f"{reader.file_of(key)}: key {key!r} has shape {tuple(shape)}, but {reference_key!r} "
                f"{tuple(expected)}: the experts of a layer load as one stack, stored alike (one format, bits and "
                "group size)"
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
    unrunnable: dict[type[QuantizedWeight], list[str]] = {}  # layers left in float, by a weight of their format
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
        if replacement is not None and not kernels_run(replacement):
            unrunnable.setdefault(type(layer_weight(replacement)), []).append(name)  # read dequantized, as float ones
            continue
        if replacement is not None:
            model.set_submodule(name, replacement if per_expert else replacement.to(device))  # empty: filled later
            swapped.add(name)
            unfilled.update({f"{name}.{stack}": expert for stack, expert in per_expert.items()})
    use_quantized_feed_forwards(model)  # as quantize_model leaves a quantized model, so both compute alike
    for note in (reader.activation_note(), reader.kv_cache_note(), reader.zero_point_note()):
        if note is not None:
            warnings.warn(note, stacklevel=3)
    for weight, names in unrunnable.items():
        warnings.warn(
            f"{reader.directory}: {len(names)} {weight.scheme} layers ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) have {weight.kernel_limit}; they run in float from their "
            "dequantized weights",
            stacklevel=3,
        )
    return swapped, unfilled
