"""`QuantConfig` and `quantize_model`: which layers get which format, and the swap of their modules.

What is quantized: every nn.Linear of the decoder blocks and the MTP modules, and the stacked routed experts.
What stays in the model's dtype, always: the embedding, the router gate (`mlp.gate`, selection is sensitive and
tiny), the norms and biases, and `kv_b_proj` (MLA's decode path absorbs it as a matrix, W^UK and W^UV; vLLM also
keeps it unquantized). By default also `lm_head` (the vocabulary projection decides every token; DeepSeek's FP8
release keeps it in bf16), and with fp8 the MTP `eh_proj` (as DeepSeek's FP8 release does). `keep` replaces the
default lm_head (an empty one keeps none; fp8 keeps lm_head and eh_proj whatever `keep` and `layers` say, as that
format's readers take them in float: vLLM builds them unquantized, transformers leaves the head out of its fp8
layers); `layers` assigns a scheme per layer (what adaptive precision writes).
Layer names are fnmatch patterns, of our names (`lm_head`, `layers.3.mlp.experts`, `*.self_attn.o_proj`) or of the
checkpoint's (`model.layers.3.mlp.experts`, `model.layers.*.self_attn.o_proj`); one that names no layer is refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from seekstack.checkpoint.fp8 import fp8_format
from seekstack.compress.linear import (
    INT8_KERNEL_COLUMNS,
    Fp8Weight,
    Int4Weight,
    Int8Weight,
    QuantizedExperts,
    QuantizedFeedForward,
    QuantizedLinear,
    layer_weight,
    use_quantized_feed_forwards,
)
from seekstack.model.moe import FeedForward, RoutedExperts
from seekstack.schema import ConfigError, Positive, counted, recheck, require

Scheme = Literal["int8", "int4", "fp8"]
ALWAYS_KEPT = ("*.kv_b_proj",)  # absorbed into attention as a matrix (see above)
ABSORBED_KEPT = "kv_b_proj, which MLA's absorbed attention multiplies as a float matrix"  # ALWAYS_KEPT's reason
KEPT = "kept"  # the format an assignment gives a layer stored in float
DEFAULT_KEEP = ("lm_head",)
FP8_KEEP = ("lm_head", "mtp.*.eh_proj")  # float in DeepSeek's FP8 release, and where vLLM, transformers read them
FP8_SCALE_BYTES = 4  # an fp8 block's float32 weight_scale_inv
INT4_GROUPS = (32, 64, 128, 256)  # QuantConfig.group_size's values, as torch's int4 CPU kernel takes them
INT4_ROW_MULTIPLE = 16  # the CPU int4 kernel tiles output rows by 16
_RECHECKING: ContextVar[bool] = ContextVar("quant_config_rechecking", default=False)  # the copy recheck builds


def assigned(layer_format: str, reason: str = "") -> str:
    """One layer's entry in an assignment (as the report's JSON gives it): the format it is stored in (KEPT: float),
    then why, where it was kept or took another format than asked ("int4 g16: 48 input features are ...")."""
    return f"{layer_format}: {reason}" if reason else layer_format


def read_assigned(entry: str) -> tuple[str, str]:
    """An assignment entry's format and reason ("" where it gives none): `assigned` read back."""
    layer_format, _, reason = entry.partition(": ")
    return layer_format, reason


def split_layer_scheme(layer_scheme: str) -> tuple[str, int | None]:
    """A `layers` value ("int8", "int4", "int4-g64") as its scheme and its int4 group, None where it names none."""
    scheme, _, group = layer_scheme.partition("-g")
    return scheme, int(group) if group else None


ABSORBED_IN_FP8 = assigned(KEPT, "fp8 values on disk, expanded in memory (absorbed by MLA)")  # kv_b_proj's in fp8


@dataclass
class QuantConfig:
    """How `seekstack quantize` quantizes a model."""

    scheme: Scheme = "int8"  # int8: per output channel; int4: per group of input columns; fp8: e4m3, 2-D blocks
    group_size: Literal[32, 64, 128, 256] = 32  # int4: input columns sharing one scale
    fp8_block: tuple[Positive, Positive] = (128, 128)  # fp8: block shape (rows, columns), DeepSeek-V3's 128x128
    keep: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP))  # layers left in the model's dtype
    # per-layer schemes (first matching pattern wins); int4-gN also sets the group; adaptive precision writes these
    layers: dict[str, Literal["int8", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g256", "fp8", "none"]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        """ConfigError naming the field: each checked against its annotation, as a config file's values are (a
        dataclass built in Python checks nothing), then the rule across them."""
        if not _RECHECKING.get():  # recheck builds a checked copy, whose own __post_init__ must not recheck again
            token = _RECHECKING.set(True)
            try:
                recheck(self)
            finally:
                _RECHECKING.reset(token)
        schemes = {self.scheme, *(split_layer_scheme(v)[0] for v in self.layers.values())} - {"none"}
        require("fp8" not in schemes or schemes == {"fp8"}, "layers", "all fp8 or none fp8 (one checkpoint format)")

    def refuse_growing_fp8_block(self, dtype: torch.dtype) -> None:
        """ConfigError naming `fp8_block` where fp8 quantizes layers of `dtype` (the checkpoint's float weights) in
        blocks whose float32 scale outweighs what fp8 saves over `dtype` (a bfloat16 block of 4 weights saves 4
        bytes, a float32 one 12): the checkpoint would be no smaller than the float one."""
        rows, columns = self.fp8_block
        saved, name = dtype.itemsize - 1, str(dtype).removeprefix("torch.")  # bytes a 1-byte fp8 weight saves
        require(
            self.scheme != "fp8" or rows * columns * saved > FP8_SCALE_BYTES,  # others do not read it (all fp8 or none)
            "fp8_block",
            f"a block of more than {counted(FP8_SCALE_BYTES // saved, 'weight')} for {name} weights, such as "
            f"DeepSeek-V3's [128, 128]: [{rows}, {columns}] stores a float32 scale ({FP8_SCALE_BYTES} bytes) per block "
            f"of {counted(rows * columns, 'weight')}, as much as or more than fp8 saves over {name} "
            f"({counted(saved, 'byte')} a weight): the checkpoint would be no smaller than the float one",
        )

    def scheme_of(self, name: str, key: str | None = None) -> str | None:
        """The scheme layer `name` (checkpoint name `key`) gets (`int4-gN` when its group is set per layer), or None
        when it stays in high precision."""
        names = (name,) if key is None else (name, key)
        if _matches(ALWAYS_KEPT, (name,)) or (self.scheme == "fp8" and _matches(FP8_KEEP, names)):
            return None
        for pattern, scheme in self.layers.items():
            if _matches((pattern,), names):
                return None if scheme == "none" else scheme
        return None if _matches(self.keep, names) else self.scheme

    def refuse_unmatched_patterns(self, layers: dict[str, str]) -> None:
        """ConfigError naming the first `keep` or `layers` pattern that matches none of `layers` (our name ->
        checkpoint name), with a few layer names as examples."""
        for field_name, patterns in (("keep", self.keep), ("layers", self.layers)):
            for pattern in patterns:
                if not any(_matches((pattern,), names) for names in layers.items()):
                    examples = list(layers)[:: max(1, len(layers) // 4)][:4]
                    raise ConfigError(
                        f": pattern {pattern!r} matches no layer of the model; a pattern names layers as seekstack "
                        "does (`layers.1.mlp.experts`, `*.o_proj`) or as the checkpoint does "
                        f"(`model.layers.1.mlp.experts`); this model's layers include {', '.join(examples)}",
                        field=field_name,
                    )


def _matches(patterns: Iterable[str], names: Iterable[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns for name in names)


def layer_names(model: nn.Module) -> dict[str, str]:
    """Our name -> checkpoint name (`layers.1.mlp.experts` -> `model.layers.1.mlp.experts`) of each layer a pattern
    can name: the quantizable ones and a tied lm_head (the default keeps it)."""
    from seekstack.checkpoint import layer_key

    config = getattr(model, "config", None)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, RoutedExperts))]
    return {n: layer_key(n, config.num_hidden_layers) if config is not None else n for n in names}


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers a scheme could apply to: nn.Linear modules and stacked routed experts."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and not (tied and name == "lm_head"))
        or (isinstance(module, RoutedExperts) and not isinstance(module, QuantizedExperts))
    ]


def quantize_model(model: nn.Module, config: QuantConfig, stored: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """Swap each chosen layer of `model` for its quantized module, in place (a SwiGLU whose three projections end up
    quantized becomes one QuantizedFeedForward). `stored`: the quantized modules a checkpoint held (see
    `dequantize_layers`), put back as they are where a layer is assigned their format, so re-quantizing to the same
    format is lossless. An fp8 block too small to shrink the narrowest float dtype of the layers is refused before any
    swap (`QuantConfig.refuse_growing_fp8_block`). Returns layer -> scheme, or why kept."""
    names = layer_names(model)
    config.refuse_unmatched_patterns(names)
    layers = quantizable_layers(model)
    dtypes = {next(model.get_submodule(name).parameters()).dtype for name in layers}
    config.refuse_growing_fp8_block(min(dtypes, key=lambda dtype: dtype.itemsize, default=torch.float32))
    stored = stored or {}
    assignment = {}
    for name in layers:
        scheme = config.scheme_of(name, names[name])
        module = model.get_submodule(name)
        if scheme is None and config.scheme == "fp8" and is_absorbed(name):
            _refuse_non_finite(module, names[name])
            _round_through_fp8(module, tuple(config.fp8_block))
            assignment[name] = ABSORBED_IN_FP8
            continue
        if scheme is None:
            assignment[name] = KEPT
            continue
        scheme, named_group = split_layer_scheme(scheme)
        group = named_group or config.group_size
        problem = unsupported_reason(module, scheme, group)
        fallback = _fallback_group(module, group) if problem and scheme == "int4" and not named_group else None
        if problem and fallback is None:
            assignment[name] = assigned(KEPT, problem)
            continue
        group = fallback or group
        label = int4_format(group) if scheme == "int4" else scheme
        if name in stored and stored_format(stored[name]) == _target_format(label, config):
            model.set_submodule(name, stored[name])
        else:
            _refuse_non_finite(module, names[name])
            model.set_submodule(name, quantized_module(module, scheme, config, group))
        assignment[name] = assigned(label, problem if fallback else "")
    use_quantized_feed_forwards(model)
    return assignment


def _refuse_non_finite(module: nn.Module, name: str) -> None:
    """ValueError naming layer `name` (the checkpoint's) where its weights hold a NaN or an infinity, which a scale
    computed from the largest magnitude would spread over the whole row, group or block (as llama.cpp's quantize
    refuses such a tensor). The count, over all of the layer's parameters (a routed experts layer's gate_up_proj and
    down_proj), is made only where a parameter's float32 sum is not finite: a NaN or an infinity anywhere makes it so,
    and finite weights whose sum overflows come to the exact count, which finds none."""
    weights = [weight.detach() for weight in module.parameters()]
    if all(torch.isfinite(weight.sum(dtype=torch.float32)) for weight in weights):
        return
    bad = sum(weight.numel() - int(torch.isfinite(weight).sum()) for weight in weights)
    if bad:
        raise ValueError(
            f"{name}: {bad:,} of its {sum(weight.numel() for weight in weights):,} weights are NaN or infinite, and "
            "quantizing would spread them over each row, group or block they share a scale with; the checkpoint is "
            "damaged (a run that diverged?): quantize one whose weights are all finite"
        )


def _fallback_group(module: nn.Module, group: int) -> int | None:
    """The largest int4 group below `group` that `module`'s shapes take, where `group` does not divide its input
    width (as llama.cpp quantizes a tensor a k-quant's 256-block does not fit with a 32-block type), or None."""
    smaller = [size for size in sorted(INT4_GROUPS, reverse=True) if size < group]
    return next((size for size in smaller if not unsupported_reason(module, "int4", size)), None)


def stored_format(layer: nn.Module) -> str:
    """The format of a quantized layer: `int8`, `int4 gN` or `fp8 RxC` (its block)."""
    weight = layer_weight(layer)
    if isinstance(weight, Int4Weight):
        return int4_format(weight.group)
    if isinstance(weight, Fp8Weight):
        return fp8_format(weight.block)
    return weight.scheme


def int4_format(group: int) -> str:
    """An int4 layer's format as assignments and `stored_format` name it: `int4 gN`."""
    return f"int4 g{group}"


def _target_format(label: str, config: QuantConfig) -> str:
    return fp8_format(tuple(config.fp8_block)) if label == "fp8" else label


def dequantize_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Swap each quantized layer of `model` (loaded from a quantized checkpoint) for a float one holding its
    dequantized weights, in place, quantized SwiGLUs back to FeedForward; returns the quantized modules by name."""
    stored = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedFeedForward):
            with torch.device("meta"):
                plain = FeedForward(1, 1)
            plain.gate_proj, plain.up_proj, plain.down_proj = module.gate_proj, module.up_proj, module.down_proj
            model.set_submodule(name, plain)
        elif isinstance(module, (QuantizedLinear, QuantizedExperts)):
            stored[name] = module
            model.set_submodule(name, _dequantized(module, model))
    return stored


def _dequantized(layer: nn.Module, model: nn.Module) -> nn.Module:
    """The float module (nn.Linear, RoutedExperts) with the weights quantized `layer` represents."""
    if isinstance(layer, QuantizedLinear):
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(layer.qweight.dequantize())
        linear.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float())
        return linear
    with torch.device("meta"):
        experts = RoutedExperts(model.config)  # type: ignore[arg-type]
    experts.gate_up_proj = nn.Parameter(layer.gate_up_proj.dequantize())
    experts.down_proj = nn.Parameter(layer.down_proj.dequantize())
    return experts


def quantized_module(module: nn.Module, scheme: str, config: QuantConfig, group: int) -> nn.Module:
    """The quantized replacement of an nn.Linear or RoutedExperts (`group`: int4's columns per scale)."""

    def weight(tensor, parts: int = 1):  # type: ignore[no-untyped-def]
        tensor = tensor.detach().float()
        if scheme == "int8":
            return Int8Weight.from_float(tensor)
        if scheme == "int4":
            return Int4Weight.from_float(tensor, group)
        if scheme == "fp8":
            return Fp8Weight.from_float(tensor, tuple(config.fp8_block), parts)
        raise ValueError(f"quantization scheme {scheme!r}: expected int8, int4 or fp8")

    if isinstance(module, RoutedExperts):
        return QuantizedExperts(weight(module.gate_up_proj, parts=2), weight(module.down_proj))
    return QuantizedLinear(weight(module.weight), module.bias)


def is_absorbed(name: str) -> bool:
    """Whether layer `name` is one of ALWAYS_KEPT, which MLA's absorbed attention takes as a matrix."""
    return any(fnmatch(name, pattern) for pattern in ALWAYS_KEPT)


@torch.no_grad()
def _round_through_fp8(module: nn.Module, block: tuple[int, int]) -> None:
    """DeepSeek's FP8 release stores kv_b_proj in fp8 too; the model holds those values (so it is what a reload
    gives) in its own dtype, expanded, because attention absorbs the matrix."""
    from seekstack.checkpoint import dequantize_fp8, quantize_fp8

    module.weight.copy_(dequantize_fp8(*quantize_fp8(module.weight, block), block))


def unsupported_reason(module: nn.Module, scheme: str, group: int) -> str | None:
    """Why `module`'s shape cannot take `scheme`, or None when it can."""
    shapes = [module.gate_up_proj.shape, module.down_proj.shape] if isinstance(module, RoutedExperts) else [
        module.weight.shape
    ]  # fmt: skip
    # the input width that takes the smallest int4 group first: the one a reason names is the one that limits the group
    shapes.sort(key=lambda shape: max((size for size in INT4_GROUPS if shape[-1] % size == 0), default=0))
    for rows, cols in ((shape[-2], shape[-1]) for shape in shapes):
        if scheme == "int8" and cols % INT8_KERNEL_COLUMNS:  # a multiple of the 4 codes a stored int32 packs too
            return f"{cols} input features are not a multiple of {INT8_KERNEL_COLUMNS} (the int8 kernel's columns)"
        if scheme == "int4" and cols % group:
            return f"{cols} input features are not a multiple of the group size {group}"
        if scheme == "int4" and rows % INT4_ROW_MULTIPLE:
            return f"{rows} output features are not a multiple of {INT4_ROW_MULTIPLE} (the int4 kernel's tile)"
    return None


def checkpoint_bytes(directory: str | Path) -> int:
    """Bytes of a checkpoint's weight files (safetensors: codes and scales together): those loading reads (the
    shards its index names, or model.safetensors), not stray ones beside them (a backup)."""
    from seekstack.checkpoint import CheckpointReader

    with CheckpointReader(Path(directory), None) as reader:
        files = set(reader.key_to_file.values())
    return sum((Path(directory) / file).stat().st_size for file in files)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `model`'s checkpoint holds: what `checkpoint_bytes` of it would be less the files'
    safetensors headers (their JSON, a few hundred bytes per layer)."""
    from seekstack.checkpoint import checkpoint_tensors

    return sum(tensor.numel() * tensor.element_size() for _, tensor in checkpoint_tensors(model))  # type: ignore[arg-type]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model` (shared tensors once): what it holds in memory."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def refuse_out(source: str | Path, out: str | Path) -> None:
    """FileExistsError where the checkpoint folder `out` written from checkpoint `source` could not replace what is
    there: it is `source` itself, a file, or holds other files. save_with_tokenizer checks it; the CLI checks it first,
    before any model work (a quantization or calibration of hours, on a large model)."""
    from seekstack.atomic import refuse_to_replace
    from seekstack.checkpoint import MODEL_FOLDER_FILES

    refuse_to_replace(out, MODEL_FOLDER_FILES, inputs=(source,))


def save_with_tokenizer(model: nn.Module, source: str | Path, out: str | Path) -> Path:
    """Write `model` as checkpoint folder `out` (atomically), with the tokenizer files of checkpoint `source` and its
    generation_config.json (the sampling its authors ship), so `out` is a model folder generate/chat/serve load as
    `source` loads. An fp8 block transformers' CPU loader misreads is warned about as `save_pretrained` warns."""
    from seekstack.atomic import atomic_directory
    from seekstack.checkpoint import write_pretrained_files
    from seekstack.checkpoint.load import warn_fp8_blocks_transformers_misreads
    from seekstack.infer.generation_config import GENERATION_CONFIG_FILE
    from seekstack.train.state import copy_model_folder_file

    refuse_out(source, out)
    out = Path(out)
    with atomic_directory(out) as staging:
        write_pretrained_files(model, staging)  # type: ignore[arg-type]
        for file in [*sorted(Path(source).glob("tokenizer*.json")), *Path(source).glob(GENERATION_CONFIG_FILE)]:
            copy_model_folder_file(file, staging, model.config.max_position_embeddings)  # type: ignore[union-attr]
    warn_fp8_blocks_transformers_misreads(out)
    return out


def quantize_checkpoint(
    model_dir: str | Path, out: str | Path, config: QuantConfig
) -> tuple[dict[str, str], list[str]]:
    """Quantize checkpoint `model_dir` per `config` and save it as `out`: layers kept in float stay in the
    checkpoint's dtype, layers it stores quantized in their assigned format keep their codes and scales, others are
    quantized from float32 weights. Returns the assignment (layer -> scheme, or why it was kept) and notes on how
    other readers take the result."""
    from seekstack.checkpoint import load_pretrained, stored_float_dtype
    from seekstack.checkpoint.quantized import quantized_in_float

    # before loading: the model is quantized from float32 weights, its float layers saved back in the stored dtype
    config.refuse_growing_fp8_block(stored_float_dtype(model_dir))
    model = load_pretrained(model_dir)
    in_float = quantized_in_float(model_dir, model)
    stored = dequantize_layers(model)
    assignment = quantize_model(model, config, stored)
    if not stored and not in_float:  # else every layer kept in float is a dequantization, the one way to ask for it
        _refuse_nothing_quantized(assignment, config, layer_names(model))
    model.to(stored_float_dtype(model_dir))
    save_with_tokenizer(model, model_dir, out)
    notes = _requantized_notes(stored, in_float, assignment, model) + mixed_experts_notes(model)
    return assignment, notes


def _refuse_nothing_quantized(assignment: dict[str, str], config: QuantConfig, names: dict[str, str]) -> None:
    """A quantization of a float checkpoint that leaves every layer in float would write a copy of it: ConfigError
    naming the `layers` "none" (else `keep`) patterns that kept layers the scheme would quantize, or, where none did,
    ValueError with the reasons no layer could be quantized. `names`: our layer names -> the checkpoint's."""
    if any(read_assigned(value)[0] != KEPT for value in assignment.values()):
        return
    unpatterned = QuantConfig(scheme=config.scheme, keep=[])
    by_pattern = [
        names[name]
        for name, value in assignment.items()
        if value == KEPT and unpatterned.scheme_of(name, names[name]) is not None
    ]
    if not by_pattern:
        reasons = Counter(read_assigned(value)[1] or "always kept" for value in assignment.values())
        listed = "; ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        raise ValueError(f"nothing to quantize: no layer can be quantized to {config.scheme} ({listed})")
    unquantized = [pattern for pattern, scheme in config.layers.items() if scheme == "none"]
    field_name, patterns = ("layers", unquantized) if unquantized else ("keep", config.keep)
    absorbed = sum(value == ABSORBED_IN_FP8 for value in assignment.values())
    # fp8 rounds the kv_b_proj it always keeps through fp8, which no fp8 layer beside them leaves written in float
    rounded = f" but for its {absorbed} kv_b_proj layers' weights, rounded through fp8" if absorbed else ""
    raise ConfigError(
        f": {', '.join(map(repr, patterns))} keep{'s' if len(patterns) == 1 else ''} in float every layer that "
        f"{config.scheme} would quantize ({len(by_pattern)}, {by_pattern[0]} first): nothing is left to quantize, and "
        f"the output would be a float copy of the checkpoint{rounded}",
        field=field_name,
    )


def _requantized_notes(
    stored: dict[str, nn.Module], in_float: dict[str, str], assignment: dict[str, str], model: nn.Module
) -> list[str]:
    """A note per (stored format -> new assignment) of the layers a quantized checkpoint held that were not kept as
    stored: quantized again from their dequantized weights (a second rounding), or written in float from them (the
    first rounding kept, in more bytes). `stored`: the layers loaded quantized, by name; `in_float`: the stored format
    of those loaded in float from their dequantized weights (`quantized_in_float`), which are never kept as stored,
    but an fp8 kv_b_proj an fp8 quantization stores in fp8 again."""
    changed = Counter(
        (stored_format(module), read_assigned(assignment[name])[0])
        for name, module in stored.items()
        if model.get_submodule(name) is not module
    )
    changed.update(
        (before, read_assigned(assignment[name])[0])
        for name, before in in_float.items()
        if assignment[name] != ABSORBED_IN_FP8
    )
    notes = []
    for (before, after), count in sorted(changed.items()):
        layers = f"{counted(count, 'layer')} stored {before} {'was' if count == 1 else 'were'}"
        if after == KEPT:
            notes.append(
                f"{layers} written in float from the dequantized weights: {before}'s rounding error stays, in more "
                f"bytes than {before}; keep such layers from the float checkpoint instead where you have it"
            )
        else:
            notes.append(
                f"{layers} re-quantized to {after} from the dequantized weights: a second rounding (llama.cpp asks "
                "--allow-requantize for the same); quantize the float checkpoint instead where you have it"
            )
    return notes


def mixed_experts_notes(model: nn.Module) -> list[str]:
    """A note when the main model's routed experts are quantized in more than one format: transformers 5.23 reads
    every layer's routed experts in one format (its first config group naming experts), so it misreads the others."""
    formats = Counter(
        stored_format(module)
        for name, module in model.named_modules()
        if isinstance(module, QuantizedExperts) and name.startswith("layers.")
    )
    if len(formats) < 2:
        return []
    layers = ", ".join(f"{count} layers {fmt}" for fmt, count in sorted(formats.items()))
    return [
        f"the routed experts are stored in {len(formats)} formats ({layers}): seekstack reads each as written, "
        "but transformers 5.23 reads every layer's routed experts in one format (its first config group "
        "naming experts) and misreads the others; for transformers give all routed experts one scheme"
    ]
