"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2) and the MaxVio imbalance metric."""

from __future__ import annotations

import torch

from seekstack.model.transformer import Transformer


def max_violation(expert_load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load, over the last dimension (Wang et al. 2024)."""
    load = expert_load.float()
    mean = load.mean(dim=-1)
    return (load.amax(dim=-1) - mean) / mean.clamp(min=1e-9)


@torch.no_grad()
def update_expert_bias(model: Transformer, expert_load: torch.Tensor, rate: float = 0.001) -> None:
    """b_i += gamma * sign(mean load - load_i) for every MoE layer: overloaded experts become less likely. A model of
    greedy routing (DeepSeek-V2's) has no bias to update: its balance is the auxiliary loss's (`aux_loss_alpha`).

    `expert_load` is `ModelOutput.expert_load` (rows in `model.moe_layer_ids` order), summed over the
    step's micro-batches (and all-reduced across ranks by the caller). Outside the gradient by design.
    """
    for layer_idx, load in zip(model.moe_layer_ids, expert_load, strict=False):  # MTP rows may be absent
        router = model.block(layer_idx).mlp.gate
        if not router.aux_free:
            continue
        load = load.float()
        router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
