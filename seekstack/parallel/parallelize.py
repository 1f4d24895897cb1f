"""Training-only changes applied to the model from outside, per decoder block, as torchtitan does.

float8 training (torchao's `convert_to_float8_training`, dynamic per-tensor scaling) swaps the decoder blocks'
linear layers for ones that multiply in e4m3/e5m2 on GPUs with FP8 tensor cores (compute capability 8.9+:
H100/H200, L40, RTX 4090); it goes first, then activation checkpointing, compile and FSDP, as in torchtitan.

Activation checkpointing keeps only each block's input and recomputes its activations in the backward pass
(less memory, about one more forward of compute). torch.compile compiles each block in place, so parameter
names, and with them checkpoints, do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from seekstack.extras import import_extra
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError


def decoder_blocks(model: Transformer) -> list[nn.Module]:
    """The main blocks and the MTP modules' blocks."""
    return [*model.layers, *(depth.block for depth in model.mtp)]


def apply_activation_checkpointing(model: Transformer) -> None:
    """Make every decoder block recompute its activations during the backward pass."""
    for block in decoder_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable[..., Any], *args: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False)


def apply_compile(model: Transformer) -> None:
    """torch.compile every decoder block in place."""
    for block in decoder_blocks(model):
        block.compile()


FLOAT8_CAPABILITY = (8, 9)


def require_float8_support() -> None:
    """ConfigError naming this machine's device where it has no FP8 tensor cores for float8=true; MissingExtra where
    torchao, which converts the layers, is not installed."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < FLOAT8_CAPABILITY:
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "a CPU"
        raise ConfigError(
            f"float8=true needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: H100/H200, L40, "
            f"RTX 4090); this run is on {where}: set float8=false"
        )
    import_extra("torchao", "float8", "float8=true")


def apply_float8(model: Transformer) -> None:
    """Train the decoder blocks' linear layers in float8 (torchao); ConfigError naming the device elsewhere."""
    require_float8_support()
    from torchao.float8 import convert_to_float8_training

    for block in decoder_blocks(model):
        # float8 matmuls need both dimensions divisible by 16
        convert_to_float8_training(
            block,
            module_filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.in_features % 16 == m.out_features % 16 == 0,
        )
