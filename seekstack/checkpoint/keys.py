"""The checkpoint layout: our parameter names <-> Hugging Face DeepSeek-V2/V3 checkpoint keys, the files and
dtypes of a checkpoint folder, and the error for one that cannot be loaded.

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
"""

from __future__ import annotations

import re

import torch

# the folder's files and the error, named where they are read without torch
from seekstack.checkpoint.folder import CONFIG_FILE as CONFIG_FILE
from seekstack.checkpoint.folder import DAMAGED as DAMAGED
from seekstack.checkpoint.folder import INDEX_FILE as INDEX_FILE
from seekstack.checkpoint.folder import SINGLE_FILE as SINGLE_FILE
from seekstack.checkpoint.folder import CheckpointError as CheckpointError

# The int8 kernel reads weights with aligned vector loads: a weight at an address that is not a multiple of 64 crashes
# it for more than a few rows of input. Memory-mapped tensors are as aligned as their offsets in the file.
ALIGNMENT = 64
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# The MTP modules' copies of the embedding and head: loading uses the main model's, so these stay unread.
MTP_COPIES = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight\w*$")
# The layer loading keeps a float Linear however it is stored (attention absorbs its matrix); DeepSeek's FP8 release,
# and an fp8 model's save, store it in fp8
KEPT_FLOAT = "kv_b_proj"
# The projections of an expert each stacked expert weight holds, stacked by rows.
PER_EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
STACKED_EXPERT_PARTS = {stack: len(projections) for stack, projections in PER_EXPERT_PROJECTIONS.items()}


def refused_global(error: BaseException) -> str | None:
    """The object (`module.name`) that `torch.load(weights_only=True)` refused to make, a pickle that would run code
    as it loads; None for any other error."""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return refused[1] if refused else None


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


def layer_key(name: str, num_hidden_layers: int) -> str:
    """Our module name -> its checkpoint prefix (`layers.0.self_attn.o_proj` -> `model.layers.0.self_attn.o_proj`)."""
    return checkpoint_key(f"{name}.weight", num_hidden_layers).removesuffix(".weight")
