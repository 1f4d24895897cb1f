"""Training-only changes applied to the model from outside, per decoder block, as torchtitan does.

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

from seekstack.model.transformer import Transformer


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
