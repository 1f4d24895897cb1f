"""Progressive quantization: fp32 -> bf16 -> int8 -> int4, each stage checked against the original on held-out
text, stopping at the last stage within the tolerance.

A stage passes when its bits per byte is at most `max_bpb_increase` (relative) above the original's and its mean
KL at most `max_kl`. Stages run in order of size; the first failing stage ends the run (a smaller format is not
tried after a larger one failed), and the model returned is the last passing stage's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from seekstack.compress.quality import Quality
from seekstack.compress.quantize import QuantConfig, layer_names, quantize_model

STAGES = ("float32", "bfloat16", "int8", "int4")


@dataclass
class Stage:
    name: str
    quality: Quality
    bpb_increase: float  # relative to the original
    passed: bool


def build_stage(original: nn.Module, stage: str, config: QuantConfig) -> nn.Module:
    """A copy of `original` at `stage`: float32, bfloat16 (weights cast) or quantized int8/int4 per `config`."""
    model = copy.deepcopy(original)
    if stage == "bfloat16":
        return model.to(torch.bfloat16)
    if stage in ("int8", "int4"):
        quantize_model(model, QuantConfig(**{**vars(config), "scheme": stage}))
    return model


def progressive(
    original: nn.Module,
    evaluate: Callable[[nn.Module], Quality],
    config: QuantConfig,
    max_bpb_increase: float = 0.01,
    max_kl: float = float("inf"),
    stages: tuple[str, ...] = STAGES,
) -> tuple[nn.Module, list[Stage]]:
    """Run `stages` in order with the gate after each; returns the last passing model and every stage's report.
    A `config` pattern naming no layer is refused before the first evaluation, not at the first quantized stage."""
    config.refuse_unmatched_patterns(layer_names(original))
    baseline = evaluate(original).bits_per_byte
    report: list[Stage] = []
    chosen = original
    for name in stages:
        model = build_stage(original, name, config)
        quality = evaluate(model)
        increase = quality.bits_per_byte / baseline - 1
        passed = increase <= max_bpb_increase and quality.mean_kl <= max_kl
        report.append(Stage(name, quality, increase, passed))
        if not passed:
            break
        chosen = model
    return chosen, report
