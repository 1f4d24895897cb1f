"""Reading a checkpoint folder: its config.json, its safetensors files one memory-mapped tensor at a time
(`CheckpointReader`, which checks each against the config), and what it stores (`stored_*`)."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from seekstack.checkpoint.folder import missing_shards, read_json_object, read_weight_map
from seekstack.checkpoint.fp8 import DEFAULT_FP8_BLOCK, dequantize_fp8, fp8_scale_shape
from seekstack.checkpoint.keys import (
    ALIGNMENT,
    CONFIG_FILE,
    DAMAGED,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    TORCH_DTYPES,
    CheckpointError,
)
from seekstack.compress.formats import dequantize_int, dynamic_scales, fake_quantize, unpack_codes
from seekstack.config import ModelConfig
from seekstack.train.runs import run_checkpoint

# naive-quantized: the compressor int-quantized and float-quantized are aliases of in compressed-tensors: the same
# layout (`weight` codes + `weight_scale`), int8 or e4m3 codes; dense: weights stored unquantized, as llm-compressor
# writes a model whose only quantization is its kv_cache_scheme
COMPRESSED_TENSORS_FORMATS = (
    "dense",
    "int-quantized",
    "naive-quantized",
    "float-quantized",
    "pack-quantized",
    "mixed-precision",
)
# The quantization_status of a compressed-tensors checkpoint saved uncompressed (float weights beside their scales and
# zero points), whose weights that library's forward quantizes and dequantizes by them (fake quantization).
FAKE_QUANTIZED_STATUSES = ("initialized", "calibration", "frozen")
INT8_HELD_BITS = range(2, 9)  # the num_bits whose codes compressed-tensors' int-quantized stores as int8
STORED_WIDTHS = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}  # bytes per element, by name
FLOAT_STORED = ("F64", "F32", "F16", "BF16")  # the dtypes a float weight loads from
# The dtypes scales load from: float, or e8m0 (powers of two, exact in float32), which transformers stores an fp8
# checkpoint's weight_scale_inv in where its quantization_config says scale_fmt "ue8m0" (DeepSeek-V3.1's)
SCALE_STORED = (*FLOAT_STORED, "F8_E8M0")
# A layer's static input activation scale: compressed-tensors' (and vLLM's) name, transformers' FP8Linear's
ACTIVATION_SCALES = ("input_scale", "activation_scale")
# The stored dtypes of each quantization_config's quantized weights: e4m3, or int8 codes and int32 words of packed ones.
QUANTIZED_STORED = {"fp8": ("F8_E4M3",), "compressed-tensors": ("I8", "I32", "F8_E4M3")}
# How a Git LFS pointer file begins: what a hub repository cloned without Git LFS holds in place of each weight file.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# How a Git LFS pointer in place of a file is told (weights, a tokenizer): its size, what it stands for, the way out.
LFS_POINTER_FOUND = (
    "a Git LFS pointer ({size} bytes), not the {what}: the repository was cloned without Git LFS; fetch {them} with "
    "`git lfs pull` in the clone, or download the folder with `hf download`"
)
# The scales compressed-tensors' kv_cache_scheme stores on each attention module (an fp8 KV cache's, static).
KV_CACHE_SCALES = (".self_attn.k_scale", ".self_attn.v_scale")
# What a Hugging Face Hub repository id looks like (owner/name), as transformers' from_pretrained takes one.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# The weight files transformers writes with safe_serialization=False (a shard, or one file) and their index.
PICKLED_WEIGHTS = "pytorch_model*.bin*"


def read_config(directory: str | Path) -> ModelConfig:
    """The `ModelConfig` of checkpoint folder `directory`: CheckpointError when the folder or its config.json is
    missing or not JSON, ConfigError naming the field when a value is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "not a folder" if directory.exists() else "no such folder"
        hub = (
            f"; if it names a Hugging Face Hub repository, download it first (`hf download {directory}` prints the "
            "folder it downloads to) and give that folder"
            if not directory.exists() and HUB_ID.fullmatch(str(directory))
            else ""
        )
        raise CheckpointError(
            f"{directory}: {problem}; a checkpoint is a folder holding {CONFIG_FILE} and safetensors weights{hub}"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        from seekstack.adapters.files import ADAPTER_CONFIG_FILE  # here: adapters.files imports this module

        if (directory / ADAPTER_CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{directory}: a LoRA adapter ({ADAPTER_CONFIG_FILE}), not a model checkpoint: give its base model "
                "with the adapter where a command takes one, or merge the two into a model folder (`seekstack lora "
                "merge`) and give that"
            )
        try:
            newest = run_checkpoint(directory)
        except FileNotFoundError as error:  # a run with no checkpoint: said so
            raise CheckpointError(f"{directory}: a training run's folder, not a model checkpoint; {error}") from None
        if newest is not None:
            raise CheckpointError(
                f"{directory}: a training run's folder, not a model checkpoint; its newest checkpoint is {newest}: "
                "load that folder (the command line takes the run for it)"
            )
        raise CheckpointError(
            f"{config_path}: no such file; a checkpoint keeps its {CONFIG_FILE} beside the weights: "
            f"copy it from where the checkpoint came from, or {DAMAGED}"
        )
    return ModelConfig.from_dict(read_json_object(config_path), source=str(config_path))


def stores_quantized_weights(quantization: Any) -> bool:
    """Whether a config.json's quantization_config (None when it has none) says weights are stored quantized. An empty
    one quantizes nothing (transformers loads it as none), nor does a compressed-tensors one of no config_groups nor
    kv_cache_scheme (a transform_config alone: SpinQuant's or QuIP's rotations fused into float weights, as
    compressed-tensors' ModelCompressor writes it)."""
    if not quantization:
        return False
    if isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors":
        return any(quantization.get(key) for key in ("config_groups", "kv_cache_scheme"))
    return True


def _open_safetensors(path: Path) -> Any:
    """`safe_open(path)`, with a damaged file (empty, truncated, not safetensors at all) named as such, and a Git LFS
    pointer (a hub repository cloned without Git LFS) as what it is."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as error:
        if is_lfs_pointer(path):
            pointer = LFS_POINTER_FOUND.format(size=path.stat().st_size, what="weights", them="them")
            raise CheckpointError(f"{path}: {pointer}") from None
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({error}); it is truncated or damaged: {DAMAGED}"
        ) from None


def is_lfs_pointer(path: Path) -> bool:
    """Whether file `path` is a Git LFS pointer (what a clone without Git LFS holds in place of a large file)."""
    with path.open("rb") as file:
        return file.read(len(LFS_POINTER)) == LFS_POINTER


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
        self._held: dict[str, set[str]] = {}  # each open file's keys
        self.fp8_block: tuple[int, int] | None = None
        quantization = quantization or None  # {}: no quantization, as transformers' from_pretrained reads it
        self.quantized = quantization is not None
        self.quant_method = (quantization or {}).get("quant_method", "fp8") if self.quantized else None
        if quantization is not None:
            _refuse_online_transforms(quantization.get("transform_config") or {}, directory / CONFIG_FILE)
            _refuse_sparse_compression(quantization.get("sparsity_config") or {}, directory / CONFIG_FILE)
            method = quantization.get("quant_method", "fp8")
            fp8 = method == "fp8" and quantization.get("fmt", "e4m3") == "e4m3"
            # no format: dense, as transformers' CompressedTensorsConfig reads it (a transform_config alone, its
            # rotations fused into float weights, is written so by compressed-tensors' ModelCompressor)
            stored = quantization.get("format", "dense")
            compressed = method == "compressed-tensors" and stored in COMPRESSED_TENSORS_FORMATS
            if not (fp8 or compressed):
                raise CheckpointError(
                    f"{directory / CONFIG_FILE}: unsupported quantization_config "
                    f"({_quantization_format(quantization)}); seekstack reads unquantized, block-wise fp8 (e4m3) and "
                    "compressed-tensors weight-only int8/int4/fp8 "
                    f"({', '.join(COMPRESSED_TENSORS_FORMATS)}) checkpoints"
                )
            if fp8:
                self.fp8_block = _fp8_block(quantization, directory / CONFIG_FILE)
        self.config_groups: dict[str, Any] = (quantization or {}).get("config_groups") or {}
        self.activation_scheme = (quantization or {}).get("activation_scheme")
        status = (quantization or {}).get("quantization_status", "initialized")
        self.fake_quantized = self.quant_method == "compressed-tensors" and status in FAKE_QUANTIZED_STATUSES
        _refuse_asymmetric_float_groups(self.config_groups, directory / CONFIG_FILE)
        _refuse_activation_ordered_groups(self.config_groups, directory / CONFIG_FILE)
        self.targets = _targets(self.config_groups, directory / CONFIG_FILE)
        self.ignored: dict[str, tuple[str, re.Pattern[str] | None]] = {}  # as `_targets` gives them, named "ignore"
        for target in (quantization or {}).get("ignore") or []:
            where = f"quantization_config's ignore lists {target!r}"
            self.ignored[target] = ("ignore", _target_pattern(target, where, directory / CONFIG_FILE))
        self.kv_cache_scheme: dict[str, Any] | None = (quantization or {}).get("kv_cache_scheme")
        self.used: set[str] = set()
        if self.kv_cache_scheme:  # its scales, read by none (kv_cache_note)
            self.used.update(key for key in self.key_to_file if key.endswith(KV_CACHE_SCALES))

    def _index(self) -> dict[str, str]:
        index_path, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index_path.exists():
            weight_map = read_weight_map(index_path)
            missing = missing_shards(index_path, weight_map)
            if not missing:
                return weight_map
            if not single.is_file():
                raise CheckpointError(
                    f"{index_path}: names shard {missing[0]!r}, which is missing from {self.directory}; "
                    f"the download is incomplete: fetch that shard, or {DAMAGED}"
                )
            # transformers reads a folder's model.safetensors before its index, and its save_pretrained of one file
            # into a folder of an earlier sharded save deletes the shards but leaves their index
            warnings.warn(
                f"{index_path}: names shards missing from {self.directory} ({missing[0]!r} ...) beside a "
                f"{SINGLE_FILE}: reading {SINGLE_FILE}, as transformers does (its save_pretrained of one file leaves "
                "an earlier sharded save's index behind); delete the stale index",
                stacklevel=2,
            )
        if not single.is_file():  # as transformers: other safetensors files are read only through an index
            self._refuse_pickled_weights()
            others = ", ".join(sorted(file.name for file in self.directory.glob("*.safetensors")))
            unread = f"{others} are read only through an index listing their keys, as transformers reads them; "
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; {unread if others else ''}the weights are "
                f"missing: {DAMAGED}"
            )
        with _open_safetensors(single) as handle:
            return {key: SINGLE_FILE for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)

    def _refuse_pickled_weights(self) -> None:
        """CheckpointError naming the PyTorch pickle weight files (transformers' `pytorch_model*.bin`, its index) of a
        folder without safetensors, with how to convert them: they are the weights, not missing ones."""
        pickled = sorted(file.name for file in self.directory.glob(PICKLED_WEIGHTS))
        if pickled:
            raise CheckpointError(
                f"{self.directory}: its weights are PyTorch pickle files ({', '.join(pickled)}), which seekstack does "
                "not read (it memory-maps safetensors, and loading a pickle can run code); convert them once with "
                f'transformers: python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('
                f"'{self.directory}', dtype='auto').save_pretrained('{self.directory}-safetensors')\" (it writes "
                "no MTP layers), copy the tokenizer files beside them and give that folder"
            )

    def refuse_keys_in_two_shards(self) -> None:
        """CheckpointError naming both shards and the key when two shards of the index hold one key: which one
        the model gets would depend on the reader. Reads every shard's header: for loading the whole checkpoint."""
        self._stored_keys(sorted(set(self.key_to_file.values())), once=True)

    def _stored_keys(self, files: list[str] | None = None, *, once: bool = False) -> dict[str, str]:
        """Each key the safetensors `files` of the folder (by name; every one when None) hold -> the first of them,
        in that order, that holds it, read from their headers. With `once`, CheckpointError naming both shards and
        the key when two of them hold one key."""
        if files is None:
            files = sorted(path.name for path in self.directory.glob("*.safetensors"))
        holder: dict[str, str] = {}
        for file in files:
            with _open_safetensors(self.directory / file) as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle)
                    if once and key in holder:
                        raise CheckpointError(
                            f"{self.directory}: key {key!r} is stored in both {holder[key]} and {file} (the index "
                            f"{INDEX_FILE} names {self.key_to_file.get(key)!r}); a checkpoint stores each key once: "
                            f"{DAMAGED}"
                        )
                    holder.setdefault(key, file)
        return holder

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
        the compressed-tensors config group that applies to it (`_group_of`) says otherwise (an edited config.json,
        swapped weights): packed codes of other bits, or int8 codes of more than 8 (int-quantized stores any width up
        to 8 in int8, as W4A16 in its int4 range)."""
        config = self.directory / CONFIG_FILE
        held_bits = (bits,) if f"{key}.weight_packed" in self else INT8_HELD_BITS
        applied = self._group_of(key)
        if applied is not None:
            name, weights = applied
            if weights.get("num_bits") not in held_bits:
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
        elif self.config_groups:
            raise CheckpointError(
                f"{config}: layer {key!r} is stored as int{bits}, but no quantization_config group targets it; "
                f"the config and the weights disagree: {DAMAGED}"
            )

    def _group_of(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """The name and `weights` of the compressed-tensors config group that applies to layer `key`, picked as
        compressed-tensors picks it among the targets naming the layer (a later group's target replacing an earlier
        group's same one): the exact name first, then `re:` patterns (in the order of their text), then a module
        class (`Linear`); None when no target names it."""
        named = _naming(self.targets, key)
        targets = [*sorted(named, key=lambda t: (t.startswith("re:"), t)), *({"Linear"} & self.targets.keys())]
        if not targets:
            return None
        name = self.targets[targets[0]][0]
        return name, self.config_groups[name].get("weights") or {}

    def _group_weights(self, key: str) -> dict[str, Any]:
        """The `weights` of the config group applying to layer `key` (`_group_of`); empty when none does."""
        applied = self._group_of(key)
        return applied[1] if applied is not None else {}

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
            bits = self._group_weights(key).get("num_bits", 4)
            source = f"its config group: num_bits={bits}"
        if bits not in (4, 8):
            raise CheckpointError(
                f"{self.file_of(f'{key}.weight_packed')}: layer {key!r} is packed as neither int4 nor int8 ({source}): "
                f"{DAMAGED}"
            )
        return bits

    def code_bits(self, key: str) -> int | None:
        """Bits per code layer `key`'s quantized weight runs in: its packed words' (`packed_bits`), or for int8 codes
        (int-quantized) 4 where the config group targeting the layer says num_bits 4 or fewer (W4A16's codes, in
        int4's range, run in int4's kernel and its groups), else 8; None for a layer stored otherwise."""
        if f"{key}.weight_packed" in self:
            return self.packed_bits(key)
        if f"{key}.weight" not in self or self.stored_dtype(f"{key}.weight") != "I8":
            return None
        configured = self._group_weights(key).get("num_bits")
        return 4 if configured in INT8_HELD_BITS and configured <= 4 else 8

    def zero_points(self, layer: str) -> torch.Tensor | None:
        """The zero points z of int8/int4 layer `layer`, whose weight is (q - z) x s: its `weight_zero_point` (..., O,
        G), one per scale, in int8 or the int32 it is stored in (unpacked where compressed-tensors packs them), where
        the config group applying to it says `symmetric: false` (llm-compressor's W4A16_ASYM); else None. A layer of
        a symmetric group may store all-zero ones (earlier compressed-tensors versions wrote them): None, the key
        accounted for. CheckpointError naming the file and the key for zero points stored in no int dtype, an
        asymmetric layer's missing or misshapen ones, and a symmetric layer's not all 0 (naming the group)."""
        key, config = f"{layer}.weight_zero_point", self.directory / CONFIG_FILE
        group, weights = self._group_of(layer) or (None, {})
        asymmetric = weights.get("symmetric", True) is not True
        if key not in self:
            if asymmetric:
                raise CheckpointError(
                    f"{self.file_of(self.weight_key(layer))}: layer {layer!r} has no {key!r}, but the quantization_"
                    f"config group {group!r} of {config} says symmetric=false (codes with zero points): {DAMAGED}"
                )
            return None
        self.used.add(key)
        # a symmetric group's zeros may be float: compressed-tensors keeps float8 layers' in e4m3 (its zp_dtype)
        float_zeros = not asymmetric and self.stored_dtype(key) in (*FLOAT_STORED, "F8_E4M3")
        if self.stored_dtype(key) not in ("I8", "I32") and not float_zeros:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} is stored as {self.stored_dtype(key)}, but zero points load only "
                f"as int8, or int32 words packing them (pack-quantized's); {DAMAGED}"
            )
        points = self._get(key)
        # pack-quantized packs a group or channel layer's zero points along the rows, as its codes along the columns;
        # it stores others (a matrix's one, int-quantized's, a frozen checkpoint's) as they are, int32 ones included
        packed = f"{layer}.weight_packed" in self and weights.get("strategy") in ("group", "channel")
        if packed and points.dtype == torch.int32:
            rows = self.unpacked_shape(self.weight_key(layer))[-2]
            points = unpack_codes(points.transpose(-2, -1), self.code_bits(layer)).transpose(-2, -1)[..., :rows, :]
        if not asymmetric:
            if points.float().count_nonzero():
                named = f"group {group!r} of " if group is not None else ""
                raise CheckpointError(
                    f"{self.file_of(key)}: key {key!r} holds zero points other than 0, but the quantization_config "
                    f"{named}{config} says symmetric (codes x scales, no zero point); the config and the weights "
                    f"disagree: {DAMAGED}"
                )
            return None
        scales = tuple(self.stored_shape(f"{layer}.weight_scale"))
        if points.numel() == 1 and weights.get("strategy") == "tensor":
            points = points.reshape(1, 1).expand(scales)  # one for the whole matrix, as its one scale
        if tuple(points.shape) != scales:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} holds {tuple(points.shape)} zero points, but {layer!r} has "
                f"{scales} scales, one zero point each: {DAMAGED}"
            )
        return points

    def float_block(self, key: str) -> tuple[int, int] | None:
        """The (rows, columns) scale block of layer `key` where the compressed-tensors config group applying to it says
        `strategy: "block"` (float-quantized fp8, llm-compressor's FP8_BLOCK: `weight_scale` one per block), else
        None."""
        weights = self._group_weights(key)
        if weights.get("strategy") != "block":
            return None
        rows, columns = weights.get("block_structure") or DEFAULT_FP8_BLOCK
        return rows, columns

    def weight_key(self, key: str) -> str:
        """The key of checkpoint layer `key`'s stored weight: `key.weight_packed` or `key.weight`."""
        return f"{key}.weight_packed" if f"{key}.weight_packed" in self.key_to_file else f"{key}.weight"

    def stored_shape(self, key: str) -> list[int]:
        """The shape of `key`, read from the header only; a whole-matrix scale as the per-row scales it stands for
        (`_whole_matrix_scale`)."""
        shape = self._from_file(key, lambda handle: handle.get_slice(key).get_shape())
        return self._per_row_shape(key) if self._whole_matrix_scale(key, shape) else shape

    def _whole_matrix_scale(self, key: str, shape: list[int]) -> bool:
        """Whether `key`, stored in `shape`, is an int8/int4 weight's one scale for the whole matrix: compressed-
        tensors' `strategy: "tensor"` (a scalar, (1,) or (1, 1) `weight_scale`), as the config group targeting its
        layer says; it loads as a per-row (channel) scale, the one value on every row, as vLLM reads it."""
        layer = key.removesuffix(".weight_scale")
        if layer == key or math.prod(shape) != 1 or len(shape) > 2:
            return False
        return self._group_weights(layer).get("strategy") == "tensor"

    def _per_row_shape(self, scale_key: str) -> list[int]:
        """The (..., rows, 1) shape of the per-row scales of the weight that whole-matrix scale `scale_key` scales."""
        return [*self.unpacked_shape(self.weight_key(scale_key.removesuffix(".weight_scale")))[:-1], 1]

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
        """CheckpointError naming the file and the key when the scales of quantized weight `weight_key` are missing, not
        stored in a float dtype, or do not fit its shape: e4m3's `weight_scale_inv` one per fp8 block of each of
        `parts` matrices stacked by rows, int8/int4's `weight_scale` one per row and group of columns."""
        shape = self.unpacked_shape(weight_key)
        stored = self.stored_dtype(weight_key)
        stored_fp8, in_float = stored == "F8_E4M3", stored in FLOAT_STORED  # float: a frozen layer's (fake-quantized)
        block = self.float_block(weight_key.removesuffix(".weight")) if stored_fp8 or in_float else None
        if block or (stored_fp8 and f"{weight_key}_scale" not in self.key_to_file):
            scale_key = weight_key + ("_scale" if block else "_scale_inv")
            block = block or self.fp8_block
            if block is None or scale_key not in self.key_to_file:
                raise CheckpointError(
                    f"{self.file_of(weight_key)}: FP8 tensor {weight_key!r} has no {scale_key!r} / "
                    f"quantization_config; {DAMAGED}"
                )
            expected = fp8_scale_shape(shape, block, parts)
            scale_shape = tuple(self.stored_shape(scale_key))
            block_rows, block_cols = block
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
        stored = self.stored_dtype(scale_key)
        if stored not in SCALE_STORED:  # an integer, bool or e4m3 scale would be read as another number, silently
            raise CheckpointError(
                f"{self.file_of(scale_key)}: key {scale_key!r} is stored as {stored}, but the scales of {weight_key!r} "
                f"load only from a float dtype ({', '.join(SCALE_STORED)}); {DAMAGED}"
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
        elif f"{key}_scale" in self and self.fake_quantized:
            loadable = ("I8", "F8_E4M3", *FLOAT_STORED)
            expected = f"int8 codes, fp8 e4m3 values or a float weight, as its {key}_scale says"
        elif f"{key}_scale" in self:
            loadable, expected = ("I8", "F8_E4M3"), f"int8 codes or fp8 e4m3 values, as its {key}_scale says"
        elif key.endswith("_scale_inv"):
            loadable, expected = SCALE_STORED, f"a scale ({', '.join(SCALE_STORED)})"
        else:
            loadable, expected = (*FLOAT_STORED, "F8_E4M3"), f"a float weight ({', '.join(FLOAT_STORED)})"
        if stored not in loadable:
            raise CheckpointError(
                f"{self.file_of(key)}: key {key!r} is stored as {stored}, but seekstack loads it only as {expected}; "
                f"{DAMAGED}"
            )
        configured = QUANTIZED_STORED.get(self.quant_method or "", ())
        if stored not in SCALE_STORED and self.quant_method is not None and stored not in configured:
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

    def read(
        self, key: str, dequantize: bool = True, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The tensor under `key`; a quantized weight (FP8, or compressed-tensors int8/int4) is dequantized to
        float32 unless `dequantize` is False, and then starts at an ALIGNMENT boundary (the int kernels use it in
        place; copied where the file's does not). With `shape` (what the config implies), CheckpointError naming the
        file and the key for a tensor stored in another shape, and for quantized weights' scales that do not fit it.
        With `dtype` (the model's), a float weight loaded rounded by its scales (`rounds_in_float`) is rounded in it, as
        compressed-tensors rounds it in the dtype transformers holds the model in."""
        if key.endswith((".weight", ".weight_packed")):  # its layer's activation scale, read by none (activation_note)
            self.used.update(f"{key.rpartition('.')[0]}.{scale}" for scale in ACTIVATION_SCALES)
        packed_key = key + "_packed"
        if dequantize and key.endswith(".weight") and key not in self.key_to_file and packed_key in self.key_to_file:
            self.check_stored_format(packed_key)
            if shape is not None:
                self.check_shape(packed_key, shape)
            self.check_recorded_shape(packed_key)
            self.check_scales(packed_key)
            self.used.update((packed_key, key + "_scale", key + "_shape"))
            points = self.zero_points(key.removesuffix(".weight"))
            codes = unpack_codes(self._get(packed_key), self.packed_bits(key.removesuffix(".weight")))
            return dequantize_int(codes, self._get(key + "_scale"), points)
        if shape is not None:
            self.check_shape(key, shape)
        self.check_stored_format(key)
        tensor = self._get(key)
        self.used.add(key)
        if not dequantize:  # memory-mapped; the mapping outlives the reader for as long as the tensor does
            return _aligned(tensor)
        if tensor.dtype in (torch.int8, torch.float8_e4m3fn) and key + "_scale" in self.key_to_file:
            self.check_scales(key)
            self.used.add(key + "_scale")
            points = self.zero_points(key.removesuffix(".weight")) if tensor.dtype == torch.int8 else None
            scale, block = self._get(key + "_scale"), self.float_block(key.removesuffix(".weight"))
            return dequantize_fp8(tensor, scale, block) if block else dequantize_int(tensor, scale, points)
        if self.rounds_in_float(key):
            return self._fake_quantized(key, tensor if dtype is None else tensor.to(dtype))
        if tensor.dtype == torch.float8_e4m3fn:
            self.check_scales(key)  # refuses a missing scale or fp8 quantization_config too
            self.used.add(key + "_scale_inv")
            tensor = dequantize_fp8(tensor, self._get(key + "_scale_inv"), self.fp8_block)  # type: ignore[arg-type]
        return tensor  # a float weight memory-mapped as it is, aligned or not (`_maps_in_place` asks)

    def rounds_in_float(self, key: str) -> bool:
        """Whether float weight `key` loads quantized and dequantized (`_fake_quantized`): it has a `_scale` beside it,
        or its checkpoint is saved uncompressed and its layer, a linear one not in the config's `ignore`, is of a
        config group that computes its scales dynamically."""
        if not key.endswith(".weight"):
            return False
        layer = key.removesuffix(".weight")
        linear = layer.endswith(("_proj", "_proj_with_mqa", "lm_head")) and not _naming(self.ignored, layer)
        # "local" (nvfp4's tensor_group: local scales dynamic, a stored global one) too: `_fake_quantized` refuses it
        dynamic = self.fake_quantized and linear and self._group_weights(layer).get("dynamic") in (True, "local")
        return f"{key}_scale" in self.key_to_file or dynamic

    def rounded_format(self, weight_key: str) -> str | None:
        """The format (`int8`, `int4`, `fp8`, ...) float weight `weight_key` loads rounded to (`rounds_in_float`: a
        frozen checkpoint's), from its config group; None for a weight loaded as stored."""
        if not self.rounds_in_float(weight_key):
            return None
        weights = self._group_weights(weight_key.removesuffix(".weight"))
        return "fp8" if weights.get("type") == "float" else f"int{weights.get('num_bits')}"

    def _fake_quantized(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """Float weight `key` (`weight`) of a compressed-tensors checkpoint saved uncompressed (quantization_status
        "frozen": its `weight_scale` and `weight_zero_point` beside it, or none where its group is `dynamic: true`
        and the library computes them from the weight, `dynamic_scales`) as that library's forward uses it: quantized
        and dequantized by them (`fake_quantize`). CheckpointError naming config.json and the group where no config
        group targets the layer or its group is in a format seekstack does not round by."""
        layer, config = key.removesuffix(".weight"), self.directory / CONFIG_FILE
        group, weights = self._group_of(layer) or (None, {})
        if group is None:
            raise CheckpointError(
                f"{config}: layer {layer!r} stores a float weight beside its weight_scale, but no quantization_config "
                f"group targets it; the config and the weights disagree: {DAMAGED}"
            )
        kind, bits, strategy = weights.get("type", "int"), weights.get("num_bits"), weights.get("strategy")
        rounded = (kind, bits) == ("float", 8) or (kind == "int" and bits in INT8_HELD_BITS)
        if not rounded or strategy not in ("channel", "group", "tensor", "block"):
            raise CheckpointError(
                f"{config}: quantization_config group {group!r} quantizes {kind}{bits} weights per {strategy}; "
                "seekstack rounds a frozen checkpoint's float weights by their scales as int2 to int8 or float8, per "
                "channel, group, tensor or block only; compress the checkpoint where it was made (compressed-tensors) "
                "or give a float one"
            )
        if weights.get("dynamic") is True:
            size = weights.get("group_size") if strategy == "group" else None
            if strategy not in ("group", "tensor") or (size and weight.shape[-1] % size):
                per = f"group of {size}" if size else strategy
                raise CheckpointError(
                    f"{config}: quantization_config group {group!r} quantizes weights dynamically per {per}, which "
                    f"{key!r} ({weight.shape[-1]} columns) cannot be: compressed-tensors computes dynamic scales per "
                    "tensor or per group of a size dividing the columns; give a checkpoint of stored scales"
                )
            return fake_quantize(weight, *dynamic_scales(weight, weights), weights)
        self.check_scales(key)
        self.used.add(key + "_scale")
        scale = self._get(key + "_scale")
        return fake_quantize(weight, scale, self.zero_points(layer), weights, self.float_block(layer))

    def activation_note(self) -> str | None:
        """What loading does with the compressed-tensors config groups that quantize their layers' input activations
        too (llm-compressor's FP8, FP8_DYNAMIC, W8A8: `input_activations`, static with an `input_scale` per layer or
        dynamic per token), which vLLM rounds before each matmul and seekstack does not, or an fp8 config's
        `activation_scheme: "static"` (an `activation_scale` per layer, transformers' and vLLM's); None without."""
        if self.quant_method == "fp8" and self.activation_scheme == "static":
            return (
                f"{self.directory / CONFIG_FILE}: quantization_config.activation_scheme is static: each fp8 layer's "
                "input is rounded to fp8 by its activation_scale before its matmul in transformers and vLLM; "
                "seekstack reads the weights only and runs those layers on unrounded activations (their weights "
                "expanded to float), so its outputs differ from theirs by that rounding (the activation_scale keys "
                "are not read)"
            )
        described = []
        for name, group in self.config_groups.items():
            args = group.get("input_activations")
            if isinstance(args, dict):
                how = f"dynamic per {args.get('strategy')}" if args.get("dynamic") else "static, by its input_scale"
                described.append(f"{name!r}: {args.get('type')}{args.get('num_bits')} {how}")
        if not described:
            return None
        return (
            f"{self.directory / CONFIG_FILE}: quantization_config groups quantize their layers' input activations "
            f"({', '.join(described)}), which vLLM rounds to that format before each matmul; seekstack reads the "
            "weights only and runs those layers on unrounded activations (int8/int4 kernels on bfloat16 inputs, fp8 "
            "layers dequantized to float), so its outputs differ from vLLM's by that rounding (the input_scale keys "
            "are not read)"
        )

    def kv_cache_note(self) -> str | None:
        """What loading does with a compressed-tensors `kv_cache_scheme` (llm-compressor's fp8 KV cache: the keys and
        values each attention layer caches rounded to fp8 by its static `k_scale` and `v_scale`), which vLLM stores
        its cache in and seekstack does not; None without one."""
        scheme = self.kv_cache_scheme
        if not isinstance(scheme, dict):
            return None
        how = f"dynamic per {scheme.get('strategy')}" if scheme.get("dynamic") else "static, by k_scale and v_scale"
        return (
            f"{self.directory / CONFIG_FILE}: quantization_config.kv_cache_scheme quantizes the KV cache "
            f"({scheme.get('type')}{scheme.get('num_bits')} {how}), which vLLM stores its cache in; seekstack keeps "
            "its cache (MLA's latent) in the model's dtype, so its outputs differ from vLLM's by that rounding (the "
            "k_scale and v_scale keys are not read)"
        )

    def zero_point_note(self) -> str | None:
        """What loading does with the compressed-tensors config groups of asymmetric int weights (`symmetric: false`,
        llm-compressor's W4A16_ASYM), whose zero points seekstack's int8/int4 kernels do not take; None without one, and
        for a checkpoint saved uncompressed (its float weights are read rounded by scales and zero points alike)."""
        if self.fake_quantized:
            return None
        asymmetric = [
            f"{name!r}: int{(group.get('weights') or {}).get('num_bits')}"
            for name, group in self.config_groups.items()
            if (group.get("weights") or {}).get("symmetric", True) is not True
        ]
        if not asymmetric:
            return None
        return (
            f"{self.directory / CONFIG_FILE}: quantization_config groups quantize their layers' weights with zero "
            f"points ({', '.join(asymmetric)}, symmetric=false), which seekstack's int8/int4 kernels do not take; "
            "those layers load dequantized ((q - zero point) x scale, as compressed-tensors reads them) and run in "
            "float, taking the model's float bytes where vLLM holds their codes"
        )

    def starts_aligned(self, key: str) -> bool:
        """Whether tensor `key` starts at a multiple of ALIGNMENT bytes into its memory map, so into its file: files
        seekstack did not write (safetensors pads a header to 8 bytes only) often hold tensors that do not."""
        return self._get(key).data_ptr() % ALIGNMENT == 0

    @property
    def listing(self) -> Path:
        """The file that lists the checkpoint's keys: its index, else its one safetensors file."""
        index = self.directory / INDEX_FILE
        return index if index.exists() else self.directory / SINGLE_FILE

    def missing(self, keys: list[str], described: str | None = None) -> CheckpointError:
        """The error for keys the checkpoint lacks (`described`, else `keys`, as the message names them), naming its
        index or its file; or, where shards hold tensors of their layers that the index does not list (an index out of
        step with its shards), naming the index, those keys and their shards."""
        index = self.directory / INDEX_FILE
        unlisted = []
        if index.exists():
            layers = tuple(key.removesuffix("weight") for key in keys)  # "X.weight" -> "X.": weight_packed too
            stored = self._stored_keys()
            unlisted = [f"{k!r} (in {file})" for k, file in stored.items() if k not in self and k.startswith(layers)]
        if unlisted:
            return CheckpointError(
                f"{index}: does not list key {_first_three(unlisted)}, which its shards hold; the index does not "
                f"match its shards: {DAMAGED}"
            )
        named = described or _first_three(list(map(repr, keys)))
        return CheckpointError(
            f"{self.listing}: missing key {named}; the weights do not match {CONFIG_FILE}: {DAMAGED}"
        )

    def _get(self, key: str) -> torch.Tensor:
        tensor = self._from_file(key, lambda handle: handle.get_tensor(key))
        if key.endswith((".weight_scale", ".weight_scale_inv")):  # small: a pass over them is cheap
            bad = tensor.numel() - int(torch.isfinite(tensor.float()).sum())  # float: isfinite calls e8m0's NaN finite
            if bad:
                raise CheckpointError(
                    f"{self.file_of(key)}: key {key!r} holds {bad:,} NaN or infinite scale(s) of {tensor.numel():,}, "
                    f"which would make every weight they scale NaN or infinite; the file is damaged: {DAMAGED}"
                )
        if self._whole_matrix_scale(key, list(tensor.shape)):
            return tensor.reshape(1, 1).expand(self._per_row_shape(key)).contiguous()
        return tensor

    def stores(self, key: str) -> bool:
        """Whether the file the index names for `key` holds it (an index out of step with its shards lists keys that
        its files do not hold)."""
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = self._files.enter_context(_open_safetensors(self.directory / file))
            self._held[file] = set(self._handles[file].keys())
        return key in self._held[file]

    def _from_file(self, key: str, read: Callable[[Any], Any]) -> Any:
        """`read(handle)` on the open safetensors file the index names for `key`; CheckpointError naming the file and
        the key when the key is missing or the file cannot give it (an index pointing at the wrong shard)."""
        if key not in self.key_to_file:
            raise self.missing([key])
        file, stored = self.key_to_file[key], self.stores(key)  # opens the file
        try:
            return read(self._handles[file])
        except Exception as error:  # safetensors raises its own error types
            holder = None if stored else self._stored_keys().get(key)
            if holder is not None:
                raise CheckpointError(
                    f"{self.directory / INDEX_FILE}: names {file} for key {key!r}, which {holder} holds; the index "
                    f"does not match its shards: {DAMAGED}"
                ) from None
            raise CheckpointError(f"{self.directory / file}: cannot read key {key!r} ({error}); {DAMAGED}") from None


def _first_three(names: list[str]) -> str:
    """The first three of `names`, comma-separated, and how many more there are: "'a', 'b', 'c' (and 2 more)"."""
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _target_pattern(target: str, where: str, config_path: Path) -> re.Pattern[str] | None:
    """A compressed-tensors target, of a config group or of the `ignore` list, compiled when it is a `re:` pattern,
    else None (a module's name or class). CheckpointError naming the config and `where` the target is written when
    it is no regular expression."""
    if not target.startswith("re:"):
        return None
    try:
        return re.compile(target[3:])
    except re.error as error:
        raise CheckpointError(f"{config_path}: {where}, not a regular expression ({error}); {DAMAGED}") from None


def _targets(config_groups: dict[str, Any], config_path: Path) -> dict[str, tuple[str, re.Pattern[str] | None]]:
    """Each target of the compressed-tensors `config_groups` -> its group's name and, for `re:` and a pattern, the
    pattern compiled; a later group's target replaces an earlier group's same one, as compressed-tensors reads them.
    CheckpointError naming the file and the group for a pattern that is no regular expression."""
    targets: dict[str, tuple[str, re.Pattern[str] | None]] = {}
    for name, group in config_groups.items():
        for target in group.get("targets") or []:
            where = f"quantization_config group {name!r} targets {target!r}"
            targets[target] = (name, _target_pattern(target, where, config_path))
    return targets


def _naming(targets: dict[str, tuple[str, re.Pattern[str] | None]], layer: str) -> list[str]:
    """The `targets` (as `_targets` gives them) that name layer `layer`: its exact name, or a `re:` pattern matching
    it from its start, as compressed-tensors matches a target or an `ignore` entry to a module's name."""
    return [target for target, (_, pattern) in targets.items() if target == layer or (pattern and pattern.match(layer))]


def _quantization_format(quantization: dict[str, Any]) -> str:
    """The fields of a quantization_config that say its format (`quant_method`, and fp8's `fmt` or compressed-tensors'
    `format`), as a refusal names them: the whole config can list thousands of targets."""
    fields = ("quant_method", "fmt", "format")
    return ", ".join(f"{field}={quantization[field]!r}" for field in fields if field in quantization)


def _refuse_asymmetric_float_groups(config_groups: dict[str, Any], config_path: Path) -> None:
    """CheckpointError naming the file and the group for a compressed-tensors group of asymmetric float weights
    (`symmetric: false` beside `type: "float"`, which neither llm-compressor's schemes nor vLLM's kernels use):
    seekstack reads the zero points of int weights only (`CheckpointReader.zero_points`)."""
    for name, group in config_groups.items():
        weights = group.get("weights") or {}
        if weights.get("symmetric", True) is not True and weights.get("type", "int") != "int":
            raise CheckpointError(
                f"{config_path}: quantization_config group {name!r} says symmetric=false for {weights.get('type')} "
                "weights; seekstack reads zero points of int weights only (llm-compressor's W4A16_ASYM); dequantize "
                "the checkpoint where it was made (compressed-tensors, transformers) and load the float one"
            )


def _refuse_activation_ordered_groups(config_groups: dict[str, Any], config_path: Path) -> None:
    """CheckpointError naming the file and the group for a compressed-tensors group quantized in activation order
    (`actorder: "group"`, GPTQ's act-order, `true` or `"dynamic"` in older configs): column j's scales are
    `weight_scale[:, weight_g_idx[j]]`, groups of scattered columns, where seekstack's int4 layers read groups of
    consecutive columns, so its weights would load scaled wrong. `actorder: "weight"` stores no g_idx and loads, as
    does a group of one scale per row (`strategy` other than "group"), whose g_idx picks that one."""
    for name, group in config_groups.items():
        weights = group.get("weights") or {}
        order = weights.get("actorder")
        if weights.get("strategy") == "group" and (order is True or order in ("group", "dynamic")):
            raise CheckpointError(
                f"{config_path}: quantization_config group {name!r} says actorder={order!r} (columns grouped by "
                "weight_g_idx); seekstack reads groups of consecutive columns only, and would scale these wrong; "
                'quantize again with actorder="weight" (no g_idx; compressed-tensors 0.20 no longer takes "group"), '
                "or dequantize the checkpoint where it was made (compressed-tensors, transformers) and load the float "
                "one"
            )


def _refuse_online_transforms(transform_config: dict[str, Any], config_path: Path) -> None:
    """CheckpointError naming the file, the transform group and the location for a compressed-tensors transform_config
    (llm-compressor's QuIP, SpinQuant) that rotates activations or the KV cache at run time (`location` input,
    output, q_attn or k_cache), as vLLM runs them: seekstack runs none, so those layers would compute with weights
    rotated against unrotated inputs. Transforms at weight_input and weight_output are fused into the stored weights,
    which load as they are."""
    for name, scheme in (transform_config.get("config_groups") or {}).items():
        for applied in scheme.get("apply") or []:
            location = applied.get("location")
            if location not in ("weight_input", "weight_output"):
                raise CheckpointError(
                    f"{config_path}: quantization_config.transform_config group {name!r} applies its "
                    f"{scheme.get('type')} transform at {location!r} of {applied.get('targets')}, at run time, as vLLM "
                    "runs it; seekstack runs no online transform, and those layers' weights (rotated to match) would "
                    "compute wrong; use a checkpoint made without online rotations (transforms at weight_input and "
                    "weight_output only, fused into the weights, load)"
                )


def _refuse_sparse_compression(sparsity_config: dict[str, Any], config_path: Path) -> None:
    """CheckpointError naming the file and the format for a compressed-tensors sparsity_config whose weights are stored
    compressed (sparse-bitmask, sparse-24-bitmask, marlin-24: their non-zero values beside a bitmask, not a `weight`):
    seekstack reads none of them (compressed-tensors 0.20 has no compressor for them either). Sparse weights stored
    dense (format "dense") load as they are."""
    stored = sparsity_config.get("format", "dense")
    if stored != "dense":
        raise CheckpointError(
            f"{config_path}: quantization_config.sparsity_config stores the weights compressed as {stored!r} (their "
            "non-zero values and a bitmask, not a weight tensor), which seekstack does not read; decompress them with "
            "the compressed-tensors version that wrote them and save the model dense, or give the checkpoint it was "
            "made from"
        )


def _fp8_block(quantization: dict[str, Any], config_path: Path) -> tuple[int, int]:
    """The (rows, columns) scale block of an fp8 `quantization` config (DeepSeek's 128x128 when it names none);
    CheckpointError naming the file and the field unless `weight_block_size` is two positive integers."""
    block = quantization.get("weight_block_size", DEFAULT_FP8_BLOCK)
    if block is None:  # transformers' FineGrainedFP8Config(weight_block_size=None): one scale per matrix
        raise CheckpointError(
            f"{config_path}: quantization_config.weight_block_size is None; null is transformers' per-tensor fp8 (one "
            f"weight_scale_inv per matrix), which seekstack does not read: it reads block-wise fp8 (DeepSeek's "
            f"{list(DEFAULT_FP8_BLOCK)}): give the float checkpoint it was made from (`seekstack quantize --scheme "
            "fp8` writes it block-wise)"
        )
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


def stored_float_dtype(directory: str | Path) -> torch.dtype:
    """The dtype checkpoint `directory` stores its float weights in: its embedding's (a quantized checkpoint's
    float layers are in it too)."""
    with CheckpointReader(Path(directory), None) as reader:
        name = reader.stored_dtype("model.embed_tokens.weight")
    return TORCH_DTYPES[name]
