"""Routed-expert pruning by router statistics: drop the experts the router uses least, shrinking the expert tensors
and the router together.

Over calibration text, each routed expert's gate mass (the sum of its combine weights g_{i,t} over the tokens routed
to it) is counted per MoE layer; in every layer the `fraction` of experts with the least mass goes, the same number
from each expert group, so group-limited routing keeps its groups and the config keeps one `n_routed_experts`.
Removing an expert is exactly masking it out of selection (its selection bias at -inf): the tests check that.
Shapes: E routed experts, G groups, N tokens, K experts per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import nn

from seekstack.model.moe import MoE, Routing
from seekstack.schema import ConfigError

if TYPE_CHECKING:
    from seekstack.config import ModelConfig


@torch.no_grad()
def gate_mass(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoE layer name -> (E,) summed combine weight each routed expert received over `batches` (main layers and MTP)."""
    totals: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            totals[name] = torch.zeros(module.gate.num_experts)

            def record(_module, _inputs, routing: Routing, name: str = name) -> None:
                totals[name].index_add_(0, routing.experts.flatten(), routing.weights.flatten().float())

            hooks.append(module.gate.register_forward_hook(record))
    try:
        for batch in batches:
            model(batch, labels=batch)  # labels: the MTP blocks run too
    finally:
        for hook in hooks:
            hook.remove()
    return totals


def removed_count(count: int, fraction: float) -> int:
    """How many of `count` experts (or heads) `fraction` removes: the nearest whole number, a half rounded down, one
    fewer removed (0.25 of 2 is 0, 0.75 of 2 is 1, 0.4 of 4 is 2), `fraction` as written in decimal (0.15 of 10 is 1).
    Not Python's round, which takes a half to the even number (as torch.nn.utils.prune's amount does): 0.25 of 2
    removed none and 0.75 of 2 both."""
    return math.ceil(Fraction(str(fraction)) * count - Fraction(1, 2))


def has_moe_layers(config: ModelConfig) -> bool:
    """Whether any block of `config`'s model, an MTP module's too, routes to experts: n_routed_experts can be set where
    every block is dense (first_k_dense_replace), and then no expert can be pruned."""
    return bool(config.moe_layer_count or config.mtp_moe_blocks)


def rounding_notes(config: ModelConfig, experts: float, heads: float) -> list[str]:
    """What pruning `config`'s model removes where the asked fractions round to whole experts (per routing group) or
    heads (removed_count), or that a model without MoE layers has no experts to remove; ValueError, before any
    calibration, when it would remove nothing at all."""
    has_moe = has_moe_layers(config)
    notes = ["the model has no MoE layers; nothing for --experts to remove"] if experts and not has_moe else []
    groups, _ = config.routing_groups
    expert_step = groups / (config.n_routed_experts or 1)  # one expert of each routing group
    experts_removed = groups * removed_count(config.n_routed_experts // groups, experts) if has_moe else 0
    heads_removed = removed_count(config.num_attention_heads, heads)
    for option, asked, count, gone, step in (
        ("--experts", experts if has_moe else 0.0, config.n_routed_experts, experts_removed, expert_step),
        ("--heads", heads, config.num_attention_heads, heads_removed, 1 / config.num_attention_heads),
    ):
        share = gone / count if count else 0.0
        if asked and abs(share - asked) > 1e-9:
            notes.append(
                f"{option} {asked:g} removed {gone} of {count} per layer ({share:.1%}): pruning takes whole "
                f"ones, a step of {step:.3g}"
            )
    if not experts_removed and not heads_removed:
        raise ValueError("nothing to remove: " + "; ".join(notes or ["--experts and --heads are both 0"]))
    return notes


def _kept_per_group(per_group: int, fraction: float) -> int:
    """Experts a group of `per_group` keeps when `fraction` of them go (whole experts: removed_count)."""
    return per_group - removed_count(per_group, fraction)


def refuse_too_few_kept(config: ModelConfig, fraction: float) -> None:
    """ValueError, before anything is pruned, when removing `fraction` of each group's routed experts leaves fewer
    than the config's routing takes (num_experts_per_tok, topk_group, noaux_tc's top-2 group score), naming the
    largest fraction that leaves enough; a model without MoE layers has none to prune and is refused nothing."""
    if not has_moe_layers(config):
        return
    groups, _ = config.routing_groups
    per_group = config.n_routed_experts // groups

    def refusal(keep: int) -> str | None:
        if keep == 0:
            return "none left"
        try:
            config.replace(n_routed_experts=keep * groups)
        except ConfigError as error:
            return str(error)
        return None

    keep = _kept_per_group(per_group, fraction)
    problem = refusal(keep)
    if problem is None:
        return
    fewest = next(count for count in range(keep + 1, per_group + 1) if refusal(count) is None)
    where = "per layer" if groups == 1 else f"in each of the {groups} routing groups"
    advice = (
        f"prune {(per_group - fewest) / per_group:g} of them or less"
        if fewest < per_group
        else "its routing takes every one of them, so none can go (--experts 0)"
    )
    raise ValueError(
        f"pruning {fraction:g} of the routed experts leaves {keep} of {per_group} {where}, too few for the model's "
        f"routing ({problem}): {advice}"
    )


def experts_to_keep(mass: torch.Tensor, groups: int, fraction: float) -> torch.Tensor:
    """Sorted ids of the experts kept: in each of `groups` groups, all but the `fraction` with the least mass."""
    per_group = mass.view(groups, -1)  # (G, E/G)
    keep = _kept_per_group(per_group.shape[1], fraction)
    kept = per_group.topk(keep, dim=1).indices + torch.arange(groups)[:, None] * per_group.shape[1]
    return kept.flatten().sort().values


@torch.no_grad()
def prune_experts(model: nn.Module, mass: dict[str, torch.Tensor], fraction: float) -> dict[str, list[int]]:
    """Remove `fraction` of each MoE layer's routed experts (least gate mass first), in place; returns the removed ids
    per layer. The config's n_routed_experts shrinks to match."""
    config = model.config
    refuse_too_few_kept(config, fraction)
    groups, _ = config.routing_groups
    removed = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        kept = experts_to_keep(mass[name], groups, fraction)
        removed[name] = sorted(set(range(module.gate.num_experts)) - set(kept.tolist()))
        experts, gate = module.experts, module.gate
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[kept].clone())
        experts.down_proj = nn.Parameter(experts.down_proj[kept].clone())
        gate.weight = nn.Parameter(gate.weight[kept].clone())
        if gate.aux_free:
            gate.e_score_correction_bias = gate.e_score_correction_bias[kept].clone()
        gate.num_experts = len(kept)
    count = len(next(iter(removed.values()))) if removed else 0
    model.config = config.replace(n_routed_experts=config.n_routed_experts - count)
    return removed
