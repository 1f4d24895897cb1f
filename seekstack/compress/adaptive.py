"""Adaptive precision: each layer's sensitivity, then a precision per layer that fits a size budget.

Sensitivity of layer l at option o = the mean KL from the original when l is quantized to o and every other layer
sits at the base option (uniform int4 g32: the operating point adaptive precision is compared with, so the
measurement includes how l's error combines with the others'). Assuming those changes add up (the first-order view
of HAWQ), the assignment starts every layer at its smallest option and repeatedly takes the upgrade with the largest
KL saved per extra byte that still fits the budget (a greedy knapsack). An upgrade may go to any larger option with a
lower KL, past ones that measure worse, so with budget to spare every layer ends at its lowest-KL option. A budget
that allows every layer its widest option (int8, the safest, where its shapes allow) gives it that unmeasured.
Options, smallest first: int4 g128, int4 g64, int4 g32, int8 (a layer only gets those its shapes allow).
Budget: average bits per quantized weight, scales included (uniform int4 g32 is 4.5: 4 bits + a bf16 scale per 32).
The MTP modules' layers are not measured (the KL compares the main model's logits, which MTP does not change): they
take int8, the safest option, outside the budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from seekstack.compress.quantize import (
    QuantConfig,
    quantizable_layers,
    quantize_model,
    split_layer_scheme,
    unsupported_reason,
)

OPTIONS = ("int4-g128", "int4-g64", "int4-g32", "int8")
BASE_OPTION = "int4-g32"
UNMEASURED_OPTION = "int8"  # the MTP layers' (see above); adaptive_config's default scheme
MTP_PREFIX = "mtp."


@dataclass
class LayerChoice:
    name: str
    weights: int  # parameters in the layer's weight
    bits: dict[str, float]  # option -> bits per weight, scales included
    kl: dict[str, float]  # option -> mean KL when only this layer is quantized so


def bits_per_weight(option: str, in_features: int) -> float:
    """Storage bits per weight: codes plus bf16 scales (one per row for int8, per group for int4)."""
    group = split_layer_scheme(option)[1]
    return 8 + 16 / in_features if group is None else 4 + 16 / group


SMALLEST_BITS = bits_per_weight(OPTIONS[0], 1)  # 4.125: no assignment fits a smaller budget


@torch.no_grad()
def sensitivities(
    model: nn.Module,
    kl_of: Callable[[nn.Module], float],
    layers: list[str] | None = None,
    measured: Callable[[int, int, LayerChoice], None] | None = None,
) -> list[LayerChoice]:
    """For each layer (default: `measured_layers`), the KL of each option with the other layers at BASE_OPTION;
    `measured(i, n, choice)` hears of the i-th of n layers as it is done. `model` is float and is left as it was."""
    names = layers if layers is not None else measured_layers(model)
    work = copy.deepcopy(model)  # the trials swap layers in a copy, so `model` is left as it was
    quantize_model(work, QuantConfig(keep=["*"], layers=dict.fromkeys(names, BASE_OPTION)))  # kept where refused
    base_kl = kl_of(work)
    choices = []
    for i, name in enumerate(names, 1):
        original = model.get_submodule(name)
        count, bits = option_bits(original)
        at_base = work.get_submodule(name)
        kl = {}
        for option in bits:
            if option == BASE_OPTION:  # its shapes take it (`option_bits`), so `work` holds it already
                kl[option] = base_kl
                continue
            work.set_submodule(name, _quantized(original, option))
            kl[option] = kl_of(work)
        work.set_submodule(name, at_base)
        if kl:
            choices.append(LayerChoice(name, count, bits, kl))
            if measured is not None:
                measured(i, len(names), choices[-1])
    return choices


def option_bits(layer: nn.Module) -> tuple[int, dict[str, float]]:
    """The weights of float `layer` (nn.Linear or stacked experts) and, for each option the kernels take its shapes
    at, its bits per weight, scales included."""
    weight = layer.weight if isinstance(layer, nn.Linear) else None
    shapes = [weight.shape] if weight is not None else [layer.gate_up_proj.shape, layer.down_proj.shape]
    count = sum(int(torch.Size(s).numel()) for s in shapes)
    bits = {}
    for option in OPTIONS:
        scheme, group = split_layer_scheme(option)
        if unsupported_reason(layer, scheme, group or 0) is None:
            bits[option] = sum(bits_per_weight(option, s[-1]) * torch.Size(s).numel() for s in shapes) / count
    return count, bits


def refuse_budget_below_smallest(choices: list[LayerChoice], budget_bits: float) -> None:
    """ValueError when `budget_bits` is below the smallest assignment `choices` can have, each layer at the smallest
    option its shapes allow: known from the shapes (`unmeasured_choices`), before any measuring."""
    smallest = average_bits(choices, {c.name: min(c.bits, key=c.bits.get) for c in choices})  # type: ignore[arg-type]
    if budget_bits < smallest:
        raise ValueError(_budget_too_small(budget_bits, smallest))


def widest_within(choices: list[LayerChoice], budget_bits: float) -> dict[str, str] | None:
    """Layer -> its widest option (int8 where its shapes allow: the safest) when `budget_bits` allows that for every
    layer, else None: known from the shapes, so no layer needs measuring."""
    widest = {c.name: max(c.bits, key=c.bits.get) for c in choices}  # type: ignore[arg-type]
    return widest if average_bits(choices, widest) <= budget_bits else None


def unmeasured_choices(model: nn.Module, layers: list[str] | None = None) -> list[LayerChoice]:
    """`layers` (default: `measured_layers`) of float `model` that some option takes, their sizes without KLs."""
    names = layers if layers is not None else measured_layers(model)
    sizes = [(name, *option_bits(model.get_submodule(name))) for name in names]
    return [LayerChoice(name, count, bits, kl={}) for name, count, bits in sizes if bits]


def _budget_too_small(budget_bits: float, smallest: float) -> str:
    return (
        f"a budget of {budget_bits} bits per weight is below the smallest assignment ({smallest:.3f} bits per "
        "weight: each layer at the smallest option its shapes allow)"
    )


def measured_layers(model: nn.Module) -> list[str]:
    """The layers adaptive precision measures: the quantizable ones the defaults do not keep, but the MTP modules'."""
    default = QuantConfig()
    return [n for n in quantizable_layers(model) if default.scheme_of(n) and not n.startswith(MTP_PREFIX)]


def unmeasured_notes(model: nn.Module) -> list[str]:
    """A note naming the MTP layers adaptive precision does not measure, and what they take instead."""
    mtp = [n for n in quantizable_layers(model) if n.startswith(MTP_PREFIX) and QuantConfig().scheme_of(n)]
    if not mtp:
        return []
    return [
        f"{len(mtp)} MTP layers ({', '.join(mtp[:2])}, ...) are not measured: the KL compares the main model's "
        f"logits, which the MTP modules do not change; they are quantized {UNMEASURED_OPTION}, the safest option, "
        "outside --budget-bits (average_bits counts the measured layers)"
    ]


def _quantized(layer: nn.Module, option: str) -> nn.Module:
    """A quantized copy of float `layer` at `option`, one its shapes allow (`option_bits`)."""
    holder = nn.Module()
    holder.add_module("layer", copy.deepcopy(layer))
    quantize_model(holder, QuantConfig(keep=[], layers={"layer": option}))  # type: ignore[dict-item]
    return holder.layer


def assign(choices: list[LayerChoice], budget_bits: float) -> dict[str, str]:
    """Layer -> option within `budget_bits` average bits per weight, minimising the summed KL greedily."""
    current = {c.name: min(c.bits, key=c.bits.get) for c in choices}  # type: ignore[arg-type]
    total_weights = sum(c.weights for c in choices)
    budget = budget_bits * total_weights
    used = sum(c.bits[current[c.name]] * c.weights for c in choices)
    if used > budget:
        raise ValueError(_budget_too_small(budget_bits, used / total_weights))
    while True:
        fitting = [
            (saved / extra, c, option, extra)
            for c in choices
            for option, extra, saved in _upgrades(c, current[c.name])
            if used + extra <= budget
        ]
        if not fitting:
            return current
        _, choice, upgrade, extra = max(fitting, key=lambda candidate: candidate[0])
        current[choice.name] = upgrade
        used += extra


def _upgrades(choice: LayerChoice, at: str) -> list[tuple[str, float, float]]:
    """(option, extra bits in all, KL saved) for each option of `choice` with more bits than `at` and a lower KL:
    any of them, not only the next one up (an option between may measure worse than both)."""
    return [
        (option, (choice.bits[option] - choice.bits[at]) * choice.weights, choice.kl[at] - choice.kl[option])
        for option in choice.bits
        if choice.bits[option] > choice.bits[at] and choice.kl[option] < choice.kl[at]
    ]


def average_bits(choices: list[LayerChoice], assignment: dict[str, str]) -> float:
    total = sum(c.weights for c in choices)
    return sum(c.bits[assignment[c.name]] * c.weights for c in choices) / total


def adaptive_config(assignment: dict[str, str]) -> QuantConfig:
    """The QuantConfig that applies `assignment` (layer -> option), other layers (the MTP ones) int8 unless the
    defaults keep them."""
    return QuantConfig(scheme=UNMEASURED_OPTION, layers=dict(assignment))  # type: ignore[arg-type]
