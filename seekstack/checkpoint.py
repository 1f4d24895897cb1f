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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from seekstack.config import ModelConfig
from seekstack.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
DEFAULT_FP8_BLOCK = (128, 128)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


# ---------------------------------------------------------------------------------------- key mapping
def checkpoint_key(name: str, num_hidden_layers: int) -> str:
    """Our parameter name -> the checkpoint key (experts excluded: see `expert_sources`)."""
    match = re.match(r"mtp\.(\d+)\.(block\.)?(.*)", name)
    if match:
        return f"model.layers.{num_hidden_layers + int(match[1])}.{match[3]}"
    return name if name.startswith("lm_head.") else f"model.{name}"


def expert_sources(key: str, param: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """For a stacked expert parameter, the per-expert checkpoint keys and the views they fill."""
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


def checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model` under its checkpoint key, experts split, MTP embedding/head copies added."""
    layers = model.config.num_hidden_layers
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        key = checkpoint_key(name, layers)
        yield from expert_sources(key, tensor) or [(key, tensor)]
    for k in range(len(model.mtp)):  # copies, not aliases: safetensors refuses two keys over one storage
        yield f"model.layers.{layers + k}.embed_tokens.weight", model.embed_tokens.weight.detach().clone()
        yield f"model.layers.{layers + k}.shared_head.head.weight", model.lm_head.weight.detach().clone()


# ---------------------------------------------------------------------------------------- FP8
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = Q * s for each block (edge blocks partial); scale_inv is (ceil(out/b0), ceil(in/b1)) float32."""
    rows, cols = weight.shape
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
class CheckpointReader:
    """Lazy access to a directory of safetensors shards: one tensor at a time, memory-mapped."""

    def __init__(self, directory: Path, quantization: dict | None):
        self.directory = directory
        self.key_to_file = self._index()
        self._files = contextlib.ExitStack()
        self._handles: dict[str, object] = {}
        self.fp8_block: tuple[int, int] | None = None
        if quantization is not None:
            if quantization.get("quant_method", "fp8") != "fp8" or quantization.get("fmt", "e4m3") != "e4m3":
                raise CheckpointError(f"{directory / 'config.json'}: unsupported quantization_config {quantization}")
            self.fp8_block = tuple(quantization.get("weight_block_size", DEFAULT_FP8_BLOCK))  # type: ignore[assignment]
        self.used: set[str] = set()

    def _index(self) -> dict[str, str]:
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index_path}: not a safetensors index ({error})") from None
            for file in sorted(set(weight_map.values())):
                if not (self.directory / file).exists():
                    raise CheckpointError(f"{index_path}: names shard {file!r}, which is missing from {self.directory}")
            return weight_map
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
        key_to_file = {}
        for file in files:
            with safe_open(file, "pt") as handle:
                key_to_file.update({key: file.name for key in handle.keys()})
        return key_to_file

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._files.close()

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def file_of(self, key: str) -> Path:
        return self.directory / self.key_to_file[key]

    def read(self, key: str) -> torch.Tensor:
        """The tensor under `key`, dequantized to float32 if it is an FP8 weight."""
        if key not in self.key_to_file:
            where = self.directory / (INDEX_FILE if (self.directory / INDEX_FILE).exists() else SINGLE_FILE)
            raise CheckpointError(f"{where}: missing key {key!r}")
        tensor = self._get(key)
        self.used.add(key)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_key = key + "_scale_inv"
            if self.fp8_block is None or scale_key not in self.key_to_file:
                raise CheckpointError(
                    f"{self.file_of(key)}: FP8 tensor {key!r} has no {scale_key!r} / quantization_config"
                )
            self.used.add(scale_key)
            tensor = dequantize_fp8(tensor, self._get(scale_key), self.fp8_block)
        return tensor

    def _get(self, key: str) -> torch.Tensor:
        file = self.key_to_file[key]
        if file not in self._handles:
            self._handles[file] = self._files.enter_context(safe_open(self.directory / file, "pt"))
        try:
            return self._handles[file].get_tensor(key)  # type: ignore[attr-defined]
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{self.directory / file}: cannot read key {key!r} ({error})") from None


def load_pretrained(
    directory: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Transformer:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory (ours or a release) into a `Transformer`.

    Tensors are read one at a time into a model materialised directly on `device`, so peak memory
    stays near one copy of the model. MTP modules are built for the MTP layers the checkpoint holds.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    config = ModelConfig.from_json(config_path)
    reader = CheckpointReader(directory, config.extra.get("quantization_config"))
    present_mtp = 0
    while present_mtp < config.num_nextn_predict_layers and (
        f"model.layers.{config.num_hidden_layers + present_mtp}.eh_proj.weight" in reader
    ):
        present_mtp += 1
    config = config.replace(num_nextn_predict_layers=present_mtp)

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()

    with reader, torch.no_grad():
        for name, target in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            key = checkpoint_key(name, config.num_hidden_layers)
            for source_key, view in expert_sources(key, target) or [(key, target)]:
                tensor = reader.read(source_key)
                if tensor.shape != view.shape:
                    raise CheckpointError(
                        f"{reader.file_of(source_key)}: key {source_key!r} has shape {tuple(tensor.shape)}, "
                        f"the config {config_path} implies {tuple(view.shape)}"
                    )
                view.copy_(tensor)
    model.reset_rope()
    ignorable = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")
    unused = sorted(k for k in reader.key_to_file if k not in reader.used and not ignorable.match(k))
    if unused:
        warnings.warn(f"{directory}: {len(unused)} checkpoint keys were not used, e.g. {unused[:3]}", stacklevel=2)
    return model


# ---------------------------------------------------------------------------------------- writing
def save_pretrained(
    model: Transformer,
    directory: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    fp8_block: tuple[int, int] | None = None,
) -> Path:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`).

    With `fp8_block`, block projections are stored as e4m3 with `weight_scale_inv`, as in DeepSeek's
    FP8 release. The directory is written beside its destination and renamed into place, so an
    interrupted save never leaves a half-written checkpoint.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_checkpoint(model, staging, max_shard_bytes, fp8_block)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_checkpoint(
    model: Transformer, directory: Path, max_shard_bytes: int, fp8_block: tuple[int, int] | None
) -> None:
    """Write shards one at a time (memory stays at one shard), then name them model-000i-of-000n."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0
    shard_keys: list[list[str]] = []

    def flush() -> None:
        save_file(shard, str(directory / f"shard-{len(shard_keys)}.tmp"), metadata={"format": "pt"})
        shard_keys.append(list(shard))
        shard.clear()

    for key, tensor in _stored_tensors(model, fp8_block):
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[key] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
        total_bytes += size
    flush()

    config = model.config.to_dict()
    config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    if fp8_block is not None:
        config["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(fp8_block),
        }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if len(shard_keys) == 1:
        os.replace(directory / "shard-0.tmp", directory / SINGLE_FILE)
        return
    count, weight_map = len(shard_keys), {}
    for number, keys in enumerate(shard_keys):
        name = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
        os.replace(directory / f"shard-{number}.tmp", directory / name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _stored_tensors(model: Transformer, fp8_block: tuple[int, int] | None) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in checkpoint_tensors(model):
        if fp8_block is not None and _is_fp8_quantizable(key, tensor):
            quantized, scale = quantize_fp8(tensor, fp8_block)
            yield key, quantized
            yield key + "_scale_inv", scale
        else:
            yield key, tensor
