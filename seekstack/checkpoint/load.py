"""`load_pretrained`: a checkpoint folder into a `Transformer`, and the config changes its weights call for.

Loading memory-maps: a tensor stored in the dtype the model asks for is used in place, its pages read from the file
on first use (copy-on-write: the file is never changed), so the resident set is what a forward touches. Per-expert
keys are copied into the stacked tensors (or, for a part placed on disk, into its disk copy: `offload`); the stacked
layout maps them as they are.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from seekstack.checkpoint.fp8 import fp8_scale_shape
from seekstack.checkpoint.keys import (
    CONFIG_FILE,
    INDEX_FILE,
    MTP_COPIES,
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    CheckpointError,
    checkpoint_key,
    expert_sources,
)
from seekstack.checkpoint.quantized import (
    MappedCopy,
    _fill_expert_stack,
    _stacked_stored,
    _stacked_weight,
    _stored_names,
    load_quantized_layers,
)
from seekstack.checkpoint.reader import CheckpointReader, read_config
from seekstack.config import ModelConfig
from seekstack.infer.generation_config import read_generation_config
from seekstack.infer.params import DTYPES
from seekstack.infer.placement import (
    OffloadRefused,
    check_reachable,
    device_map_for,
    device_map_text,
    offload_while_loading,
    place,
    runtime_device,
)
from seekstack.infer.precision import map_devices
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError, refuse_a_non_bool

FLOAT_DTYPES = tuple(name for name in DTYPES if name != "auto")  # what a model loads in; "auto": the one stated
# transformers' from_pretrained(attn_implementation=...) kernels, which load_pretrained takes without effect
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def load_pretrained(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = "cpu",
    dequantize: bool = False,
    offload: Callable[[Transformer], dict[str, MappedCopy]] | None = None,
    mtp: bool = True,
    torch_dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    low_cpu_mem_usage: bool = True,
    local_files_only: bool = False,
    device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None = None,
    max_memory: Mapping[str | int, str | int] | None = None,
    offload_folder: str | Path | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    ignore_mismatched_sizes: bool = False,
) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory (ours or a release) into a `Transformer`, in eval
    mode as transformers' `from_pretrained` returns a model (no balance loss; `model.train()` to train it).

    Tensors are read one at a time into a model materialised directly on `device`, so peak memory
    stays near one copy of the model. MTP modules are built for the MTP layers the checkpoint holds; `mtp=False`
    leaves them out, their weights unread, for a model that will not draft (generation without speculative decoding:
    DeepSeek-V3's MTP layer is ~11 GB of fp8 experts), as transformers and vLLM load the main model alone.
    `offload`, given the model once its layers are built and before its float weights are read, names the tensors
    (state-dict names) that are to be file pages rather than memory, and how to write them (`MappedCopy`): those
    not mapped from the checkpoint as stored are written one piece (one expert's matrix, or a quantized expert's
    codes or scales) at a time, never whole in memory (seekstack.infer.placement's disk parts).
    Layers stored quantized (fp8, int8, int4) load as quantized modules that run their low-bit kernels
    (seekstack.compress), unless `dequantize` asks for plain float weights.
    `dtype` is a torch dtype or its name, as transformers' `from_pretrained` takes it (`model_dtype`), float32 where
    not given; `torch_dtype`, its earlier name there, which transformers still takes, is read as `dtype`: given both,
    they must name the same dtype (`loading_dtype`). `trust_remote_code` (DeepSeek's model cards pass it to
    from_pretrained) and `low_cpu_mem_usage` are taken without effect, as Engine.from_pretrained takes them: no code
    from a checkpoint runs, and the weights are always read one tensor at a time into a model built without them
    (what low_cpu_mem_usage=True asks); so is `local_files_only` (offline scripts pass True): `directory` is a local
    folder, nothing is downloaded either way (a Hub repository's name is refused as no such folder), and `revision`,
    a Hub revision, is refused (`refuse_a_revision`, as Engine.from_pretrained refuses it), and so is
    `ignore_mismatched_sizes=True`: a tensor of another shape than the config's is always refused. `device` is read
    as an engine reads it (`loading_device`: "CPU", "auto", an int N); meta, and one this torch cannot reach, are
    refused before any weight is read. `dequantize`, `mtp` and the three bool keywords taken without effect must be
    True or False (`refuse_a_non_bool`).
    `attn_implementation`, one of transformers' (ATTN_IMPLEMENTATIONS: DeepSeek's model cards pass "eager"), is taken
    without effect too: MLA runs here as seekstack writes it (torch's SDPA kernel on the naive or absorbed form), the
    same attention; another value is refused naming them.
    `device_map` (with `max_memory` for accelerate's "auto" or "sequential") spreads the model over devices as
    transformers' and Engine.from_pretrained's does (seekstack.infer.placement: the model loads on the CPU, each part
    then moves to its device, `disk` parts memory-mapped, their copies written under `offload_folder`, default
    `directory`/offload, as they are read); `device` must then be left as cpu.
    A missing, truncated or damaged file raises CheckpointError naming it. A config transformers computes
    differently (`ModelConfig.transformers_divergences`) is warned about; MoE layers follow the weights' layout.
    """
    directory = Path(directory)
    refuse_a_revision(revision, directory)
    for name, value in (("dequantize", dequantize), ("mtp", mtp), ("trust_remote_code", trust_remote_code),
                        ("low_cpu_mem_usage", low_cpu_mem_usage), ("local_files_only", local_files_only)):  # fmt: skip
        refuse_a_non_bool(name, value)
    if ignore_mismatched_sizes is not False:
        raise ValueError(
            f"ignore_mismatched_sizes={ignore_mismatched_sizes!r} is transformers' from_pretrained keyword, taken here "
            f"only as False: a tensor whose shape differs from what {CONFIG_FILE} implies is always refused, naming "
            "it; fix the config or the weights and leave ignore_mismatched_sizes out"
        )
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r}: seekstack runs its own MLA attention and takes "
            f"transformers' names for theirs without effect ({', '.join(ATTN_IMPLEMENTATIONS)}); give one of them or "
            "leave it out"
        )
    config_path = directory / CONFIG_FILE
    config = read_config(directory)
    reader = CheckpointReader(directory, config.extra.get("quantization_config"))
    dtype = loading_dtype(dtype, torch_dtype, config, reader)
    device = "cpu" if device is None else device  # as Engine.from_pretrained reads device=None
    placement = placement_asked(device_map, max_memory, offload_folder, device)
    folder = offload_folder or directory / "offload"  # read only where a map places parts
    if placement is None:
        device = loading_device(device)
    else:  # the disk parts' copies are written as the weights are read
        offload = offload or offload_while_loading(placement, folder)
        device = "cpu"  # however it was written (placement_asked): the map places the parts from there
    reader.refuse_keys_in_two_shards()
    unbuilt_mtp = range(0 if mtp else stored_mtp_layers(config, reader))
    left_out = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in unbuilt_mtp)
    config = config_of_weights(config, reader, config_path, mtp)
    warn_transformers_divergences(config, directory)

    with torch.device("meta"):
        model = Transformer(config)
    refuse_stored_shapes_unlike(model, reader, config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()

    try:
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
                    _tensor_of(model, name).data = reader.read(key, shape=tuple(target.shape))  # its pages, no copy
                    continue
                views, pieces = _float_pieces(reader, key, target)
                if name in copies:
                    _tensor_of(model, name).data = copies[name](target, pieces)
                else:
                    for view, piece in zip(views, pieces(), strict=True):
                        view.copy_(piece)
            unread = sorted(
                k
                for k in reader.key_to_file
                if k not in reader.used and not MTP_COPIES.match(k) and not k.startswith(left_out)
            )
            unstored = [k for k in unread if not reader.stores(k)]  # read from the headers, while the files are open
            unused = [k for k in unread if k not in unstored and _holds_values(reader, k)]
        model.reset_rope()
        if placement is not None:  # its disk parts' copies written by then
            model = place(model, device_map_for(model, placement), offload_dir=folder)
    except OffloadRefused as refusal:  # a folder that cannot be written: named by the keyword that chose it
        if placement is None:
            raise
        raise refusal.named("offload_folder") from refusal.__cause__
    try:  # written back by save_pretrained; a damaged one is not, as transformers' from_pretrained loads past it
        model.generation_config = read_generation_config(directory) or None
    except ConfigError as error:
        warnings.warn(f"{error}; a save of this model writes the config's BOS, EOS and pad ids there", stacklevel=2)
    if unstored:  # transformers warns of them as checkpoint weights not used
        more = f" (and {len(unstored) - 1} more)" if len(unstored) > 1 else ""
        warnings.warn(
            f"{directory / INDEX_FILE}: lists key {unstored[0]!r}{more} in {reader.key_to_file[unstored[0]]}, which "
            "does not hold it; the model does not use it, so it is read past, as transformers reads it; the index "
            "does not match its shards: re-save the checkpoint",
            stacklevel=2,
        )
    if unused:
        warnings.warn(f"{directory}: {_unused_note(unused, reader)}", stacklevel=2)
    return model.eval()


def refuse_a_revision(revision: str | None, directory: Path) -> None:
    """ValueError for transformers' `revision` (a Hub revision) but None: `directory` is read as it is on disk."""
    if revision is not None:
        raise ValueError(
            f"revision={revision!r} names a revision of a Hugging Face Hub repository, but seekstack reads the folder "
            f"{directory} as it is on disk and downloads nothing: fetch that revision with `hf download REPO "
            f"--revision {revision} --local-dir FOLDER`, give FOLDER and leave revision out"
        )


def loading_device(device: torch.device | str | int) -> torch.device:
    """The device to load onto for `device`, read as an engine reads it (`runtime_device`: auto, cpu, cuda, cuda:N or
    an int N, a CUDA index as torch.device and transformers read it, in any case); ValueError, before any weight is
    read, for meta (a model without weights, unasked) and for one that is no device or that this torch cannot reach."""
    if str(device).strip().lower() == "meta":
        raise ValueError(
            f"device={device!r} holds no weights: the model would be returned with none read; load on a device "
            "(cpu, cuda) or, for its shapes alone, build Transformer(loaded_config(directory)) under "
            "`with torch.device('meta'):`"
        )
    return runtime_device(device)


def placement_asked(
    device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None,
    max_memory: Mapping[str | int, str | int] | None,
    offload_folder: str | Path | None,
    device: torch.device | str,
    *,
    folder_keyword: str = "offload_folder",
) -> str | None:
    """The device map (seekstack.infer.placement's text) transformers' `device_map` and `max_memory` ask for, None
    where neither is given; ValueError before any weight is read for a map naming a device this torch cannot reach,
    `offload_folder` without a map (it holds the disk parts' copies; named as the caller's `folder_keyword`) and a map
    beside a `device` other than cpu, read as an engine reads it (`runtime_device`: "CPU" and "cpu:0" are cpu; "auto"
    is refused too)."""
    if device_map is None and max_memory is None:
        if offload_folder is not None:
            raise ValueError(
                f"{folder_keyword} is given without device_map: it holds the copies of parts placed on disk; give "
                "device_map= placing some on disk ({'': 'cpu', 'lm_head': 'disk'}) or leave it out"
            )
        return None
    if device == "auto" or runtime_device(device).type != "cpu":  # CPU, cpu:0 are the CPU, as the engine reads them
        raise ValueError(
            f"device={device!r} beside device_map={device_map!r}: the device map places every part; give one of them"
        )
    placement = device_map_text(device_map, max_memory)
    check_reachable(map_devices(placement))
    return placement


def _unused_note(unused: list[str], reader: CheckpointReader) -> str:
    """How many of the checkpoint's keys `unused` are, in which files (the first 3, by name), and the first 3 keys."""
    files = Counter(reader.key_to_file[key] for key in unused)
    where = ", ".join(f"{count} in {file}" for file, count in sorted(files.items())[:3])
    more = f", and {len(files) - 3} more files" if len(files) > 3 else ""
    return f"{len(unused)} checkpoint keys were not used ({where}{more}), e.g. {unused[:3]}"


def config_of_weights(
    config: ModelConfig, reader: CheckpointReader, config_path: Path, mtp: bool = True
) -> ModelConfig:
    """`config` (read from `config_path`) as the weights `reader` reads call for it: with the MTP layers they hold
    (none with `mtp=False`), its MoE layers in their layout, and a head they store apart from the embedding untied;
    a num_hidden_layers that miscounts their decoder layers is refused (`refuse_miscounted_layers`)."""
    refuse_miscounted_layers(reader, config_path, config.num_hidden_layers)
    config = config.replace(num_nextn_predict_layers=stored_mtp_layers(config, reader) if mtp else 0)
    config = follow_moe_layout_of_weights(config, reader, config_path)
    return untie_a_stored_head(config, reader, config_path)


def loaded_config(directory: str | Path) -> ModelConfig:
    """The config of the model `load_pretrained(directory)` builds (`config_of_weights`), without reading the weights
    but to compare a stored head with the embedding: config.json's as it is for a folder whose weights cannot be
    read (a config and shard index downloaded to plan before the weights, Git LFS pointers), as it describes them,
    with a warning naming what loading would refuse where the folder holds safetensors files (pointers, damaged)."""
    config = read_config(directory)
    try:
        with CheckpointReader(Path(directory), None) as reader, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loading warns of what it changes, once; describing the model does not
            return config_of_weights(config, reader, Path(directory) / CONFIG_FILE)
    except CheckpointError as error:
        if any(Path(directory).glob("*.safetensors")):
            warnings.warn(f"{error}; described as its {CONFIG_FILE} states", stacklevel=2)
        return config


def stored_mtp_layers(config: ModelConfig, reader: CheckpointReader) -> int:
    """How many of `config`'s MTP layers the checkpoint `reader` reads stores, counted from the first (by their
    eh_proj): the MTP modules loading builds (a transformers save of DeepSeek-V3 leaves them out)."""
    present = 0
    while present < config.num_nextn_predict_layers and any(
        f"model.layers.{config.num_hidden_layers + present}.eh_proj.{name}" in reader
        for name in ("weight", "weight_packed")
    ):
        present += 1
    return present


def refuse_unstored_keys(directory: str | Path) -> None:
    """CheckpointError naming the checkpoint keys loading `directory` reads (the model of its config.json as the
    weights call for it, `config_of_weights`, a tied head aside) that its index and headers name in no layout loading
    takes (float or quantized; routed experts stacked or per expert, then each expert's missing key), or a miscounted
    num_hidden_layers, before any tensor is read (but a tied head stored beside the embedding, compared with it)."""
    with CheckpointReader(Path(directory), None) as reader:
        config = config_of_weights(read_config(directory), reader, Path(directory) / CONFIG_FILE)
        with torch.device("meta"):
            model = Transformer(config)
        missing = [key for key, _, stored in stored_tensors(model, reader, config) if stored is None]
        if missing:
            raise reader.missing(missing)


def stored_as(key: str) -> list[str]:
    """The keys checkpoint tensor `key` is stored under in the layouts loading takes: in float, quantized (a layer's
    `weight`, int codes packed in `weight_packed`), a stacked expert weight quantized (`.weight`, `.weight_packed`)."""
    return [key, f"{key}.weight_packed", f"{key}.weight", f"{key.removesuffix('.weight')}.weight_packed"]


def stored_tensors(
    model: Transformer, reader: CheckpointReader, config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """Each checkpoint tensor loading `model` (built from `config`) reads from `reader`, a tied head aside: its key,
    the view of the model it fills and the key it is stored under (`stored_as`), None where it is stored in no
    layout loading takes; routed experts stacked where they are stored so, else per expert."""
    for name, target in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        key = checkpoint_key(name, config.num_hidden_layers)
        sources = [(key, target)]
        if not any(k in reader for k in stored_as(key)):
            sources = expert_sources(key, target) or sources  # the per-expert layout
        for source, view in sources:
            yield source, view, next((k for k in stored_as(source) if k in reader), None)


def refuse_stored_shapes_unlike(model: Transformer, reader: CheckpointReader, config: ModelConfig) -> None:
    """CheckpointError naming the file, the key and both shapes (`CheckpointReader.check_shape`) for the first tensor
    checkpoint `reader` stores (`stored_tensors`) in another shape than `model`, built on meta from `config`, holds
    it: read from the headers, before the model is allocated (a config.json far larger than its weights would fail
    there, as an allocator error)."""
    for _, view, stored in stored_tensors(model, reader, config):
        if stored is not None:
            reader.check_shape(stored, tuple(view.shape))


def loading_dtype(
    dtype: torch.dtype | str | None,
    torch_dtype: torch.dtype | str | None,
    config: ModelConfig,
    reader: CheckpointReader,
) -> torch.dtype:
    """The torch dtype a model loads in given load_pretrained's `dtype` and `torch_dtype` (transformers' earlier name
    for it): the one given (`model_dtype`), float32 where neither is. Given both, they are compared as dtypes
    ("bfloat16" is torch.bfloat16; "auto" the checkpoint's): ValueError where they name different ones."""
    if dtype is None or torch_dtype is None:
        return model_dtype(next((d for d in (dtype, torch_dtype) if d is not None), torch.float32), config, reader)
    resolved, theirs = model_dtype(dtype, config, reader), model_dtype(torch_dtype, config, reader)
    if resolved != theirs:
        raise ValueError(
            f"torch_dtype={torch_dtype!r} beside dtype={dtype!r}: it is transformers' name for dtype, and they load "
            f"{str(theirs).removeprefix('torch.')} and {str(resolved).removeprefix('torch.')}: give one of them"
        )
    return resolved


def model_dtype(dtype: torch.dtype | str, config: ModelConfig, reader: CheckpointReader) -> torch.dtype:
    """`dtype` as a torch dtype: a torch float dtype of 16 bits or more (a float8 or float4 one, whose arithmetic torch
    lacks, is refused at load, not at the first forward) or its name in torch, as transformers reads a string
    (getattr(torch, name): "float64", "bfloat16", "half"), or "auto": the dtype the checkpoint's config.json states
    (`dtype`, or transformers 4.x's `torch_dtype`), else the one `reader`'s embedding is stored in, as transformers'
    `dtype="auto"` takes a float dtype the config does not state from the weights (the first float tensor's, the
    embedding's in a checkpoint of one float dtype); float32 where neither names one a model loads in.
    ValueError naming any other value."""
    if dtype == "auto":
        if (stated := stated_dtype(config, reader.directory / CONFIG_FILE)) is None:
            embedding = checkpoint_key("embed_tokens.weight", config.num_hidden_layers)
            stated = _loadable(TORCH_DTYPES.get(reader.stored_dtype(embedding))) if embedding in reader else None
        return stated or torch.float32
    loadable = _loadable(dtype)
    if loadable is None:
        raise ValueError(
            f"dtype={dtype!r}: a model loads in a 16-, 32- or 64-bit torch float dtype or its name in torch "
            f"({', '.join(FLOAT_DTYPES)}, float64, ...), or auto (the checkpoint's dtype); fp8 weights load from a "
            "checkpoint stored in fp8, as quantized layers"
        )
    return loadable


def stated_dtype(config: ModelConfig, config_path: Path) -> torch.dtype | None:
    """The float dtype a model loads in that `config`'s config.json (`config_path`) states: `dtype` (transformers 5),
    else its legacy name `torch_dtype` (4.x), read as transformers reads them (a name in torch: "bfloat16", "half",
    "double"); None where it states neither. CheckpointError naming the file and key where the value is no float dtype
    a model loads in (5, "int8", a list: transformers' from_pretrained refuses them too)."""
    key = "dtype" if config.extra.get("dtype") is not None else "torch_dtype"
    if (value := config.extra.get(key)) is None:
        return None
    if (loadable := _loadable(value)) is None:
        raise CheckpointError(
            f"{config_path}: {key} is {value!r}, no float dtype a model loads in: state one of "
            f"{', '.join(FLOAT_DTYPES)}, float64 (or its name in torch: half, double), or remove it"
        )
    return loadable


def _loadable(dtype: object) -> torch.dtype | None:
    """`dtype` (a torch dtype or its name in torch) as a torch float dtype of 16 bits or more, None if it names none."""
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(named, torch.dtype) and named.is_floating_point and named.itemsize >= 2:
        return named
    return None


def _holds_values(reader: CheckpointReader, key: str) -> bool:
    """Whether checkpoint `key` stores any value (from its header): transformers builds and saves a shared expert of
    width 0 where `n_shared_experts` is 0, tensors with nothing in them for a model without one to use."""
    return 0 not in reader.stored_shape(key)


def refuse_miscounted_layers(reader: CheckpointReader, config_path: Path, layers: int) -> None:
    """CheckpointError where `num_hidden_layers` (`layers`) is not the count of decoder layers the checkpoint
    `reader` reads lists, before any tensor is read: a layer within it past the last one stored, or one stored as
    an MTP module (`eh_proj`), which would run as a decoder layer; a decoder layer past it, which would go unused
    and the model produce garbage (layers there holding an MTP module are skipped MTP depth, which is allowed)."""
    stored: dict[int, str] = {}  # each stored layer -> its first key
    for key in sorted(reader.key_to_file):
        if layer := re.match(r"model\.layers\.(\d+)\.", key):
            stored.setdefault(int(layer[1]), key)
    mtp_layers = {int(m[1]) for key in reader.key_to_file if (m := re.match(r"model\.layers\.(\d+)\.eh_proj\.", key))}
    held = next((layer for layer in range(layers) if layer not in stored or layer in mtp_layers), layers)
    ended = 0 < held and max(stored) < held  # the weights stop there; a layer missing before others is damage
    if held < layers and (held in mtp_layers or ended):
        found = (
            f"layer {held} of the weights is an MTP module (eh_proj)"
            if held in mtp_layers
            else f"{reader.listing} holds no key of layer {held} (model.layers.{held}.*)"
        )
        raise CheckpointError(
            f"{config_path}: num_hidden_layers is {layers}, but {found}, so they hold {held} decoder layers; use the "
            f"{CONFIG_FILE} saved with these weights"
        )
    past = min((layer for layer in stored if layer >= layers and layer not in mtp_layers), default=None)
    if past is not None:
        raise CheckpointError(
            f"{config_path}: num_hidden_layers is {layers}, but {reader.file_of(stored[past])} holds decoder layer "
            f"{past} ({stored[past]!r}); use the {CONFIG_FILE} saved with these weights"
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
            stacklevel=4,
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
        stacklevel=4,
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


def warn_fp8_blocks_transformers_misreads(directory: Path) -> None:
    """Warn when fp8 checkpoint `directory`'s scale block does not divide one of its weights that spans more than one
    block, naming the block and the first such weight (one transformers refuses first): its edge blocks cover part of
    a block (valid in DeepSeek's format, read so by seekstack), but transformers' CPU loader (Fp8Dequantize) takes the
    block from the scale grid (a weight's sides over its scales'), so it refuses the weight or dequantizes it in
    another block."""
    quantization = read_config(directory).extra.get("quantization_config")
    if not quantization or quantization.get("quant_method", "fp8") != "fp8":
        return
    found = []  # (whether transformers refuses it, weight, shape, scale grid)
    with CheckpointReader(directory, quantization) as reader:
        block = reader.fp8_block
        for key in reader.key_to_file:
            weight = key.removesuffix("_scale_inv")
            shape = tuple(reader.stored_shape(weight)) if key.endswith(".weight_scale_inv") else ()
            if len(shape) == 2 and any(size > side and size % side for size, side in zip(shape, block, strict=True)):
                grid = fp8_scale_shape(shape, block)
                found.append((any(size % count for size, count in zip(shape, grid, strict=True)), weight, shape, grid))
    if not found:
        return
    refused, weight, shape, grid = max(found, key=lambda misread: misread[0])  # the first refused, else the first
    if refused:
        outcome = f'refuses it ("Weight shape {shape} not divisible by scale grid {grid}")'
    else:
        read_as = tuple(size // count for size, count in zip(shape, grid, strict=True))
        outcome = f"dequantizes it in {read_as} blocks, so its values differ from seekstack's"
    warnings.warn(
        f"{directory}: weight_block_size {list(block)} does not divide {weight} of shape {shape}: its edge blocks "
        "cover part of a block, as DeepSeek's format allows (seekstack and transformers' GPU fp8 layers read it so), "
        f"but transformers' CPU loader takes the block from the {grid} scale grid and {outcome}; to load it there, "
        "save with a block that divides each projection's sides",
        stacklevel=3,
    )


def _maps_in_place(reader: CheckpointReader, key: str, target: torch.Tensor) -> bool:
    """Whether checkpoint `key` holds all of `target` (a CPU tensor) in its dtype, at an ALIGNMENT boundary: its
    memory-mapped pages are it (not a weight computed with scales: a frozen one's, fake-quantized). Others are
    copied: into `target`, or, piece by piece, into its disk copy."""
    stored = SAFETENSORS_DTYPES.get(target.dtype)
    in_dtype = target.device.type == "cpu" and key in reader and reader.stored_dtype(key) == stored
    in_dtype = in_dtype and not reader.rounds_in_float(key)
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
    if sources is not None and key not in reader:  # per expert, or in neither layout
        first_expert = sources[0][0]
        if reader.weight_key(first_expert.removesuffix(".weight")) not in reader:
            raise reader.missing(
                [key, first_expert], f"{key!r} (routed experts stacked) or {first_expert!r} (per expert)"
            )
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
        yield reader.read(key, shape=tuple(view.shape), dtype=dtype).to(dtype)


def _tensor_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer named `name` in state-dict terms."""
    module, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module), attribute)
