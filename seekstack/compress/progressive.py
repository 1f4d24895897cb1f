"""Progressive quantization: fp32 -> bf16 -> int8 -> int4 (a bf16 original starts at bf16), each stage checked
against the original on held-out text, stopping at the last stage within the tolerance.

A stage passes when its bits per byte is at most `max_bpb_increase` (relative) above the original's and its mean
KL at most `max_kl`. Stages run in order of size (int8 and int4 keep their float layers in bf16, as the bf16 stage
has them); the first failing stage ends the run (a smaller format is not tried after a larger one failed), and the
model returned is the smallest passing stage's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from seekstack.compress.quality import Quality
from seekstack.compress.quantize import QuantConfig, layer_names, quantize_model, stored_bytes

STAGES = ("float32", "bfloat16", "int8", "int4")


@dataclass
class Stage:
    name: str
    quality: Quality
    bpb_increase: float  # relative to the original
    passed: bool
    bytes: int  # of its checkpoint's tensors


def build_stage(original: nn.Module, stage: str, config: QuantConfig) -> nn.Module:
    """A copy of `original` at `stage`: float32, bfloat16 (weights cast) or quantized int8/int4 per `config` (from
    the float32 weights) with the layers it keeps in bfloat16."""
    model = copy.deepcopy(original)
    if stage in ("int8", "int4"):
        quantize_model(model, QuantConfig(**{**vars(config), "scheme": stage}))
    return model if stage == "float32" else model.to(torch.bfloat16)


def progressive(
    original: nn.Module,
    evaluate: Callable[[nn.Module], Quality],
    config: QuantConfig,
    max_bpb_increase: float = 0.01,
    max_kl: float = float("inf"),
    stages: tuple[str, ...] = STAGES,
) -> tuple[nn.Module, str, list[Stage]]:
    """Run `stages` in order with the gate after each, from the precision `original` is in (a bfloat16 model starts
    at bfloat16: float32 would double its bytes and add nothing); returns the smallest passing model, its stage's
    name (the original's precision when none passed) and every stage's report. A `config` pattern naming no layer is
    refused before the first evaluation, not at the first quantized stage."""
    config.refuse_unmatched_patterns(layer_names(original))
    first = "bfloat16" if next(original.parameters()).dtype == torch.bfloat16 else "float32"
    stages = stages[stages.index(first) :] if first in stages else stages
    baseline = evaluate(original).bits_per_byte
    report: list[Stage] = []
    chosen, chosen_name, chosen_bytes = original, first, stored_bytes(original)
    for name in stages:
        model = build_stage(original, name, config)
        quality = evaluate(model)
        increase = quality.bits_per_byte / baseline - 1
        passed = increase <= max_bpb_increase and quality.mean_kl <= max_kl
        report.append(Stage(name, quality, increase, passed, stored_bytes(model)))
        if not passed:
            break
        if report[-1].bytes <= chosen_bytes:
            chosen, chosen_name, chosen_bytes = model, name, report[-1].bytes
    return chosen, chosen_name, report
