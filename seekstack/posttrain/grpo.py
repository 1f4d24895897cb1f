"""The GRPO objective (DeepSeek-Math §4.1.2, eq. 3 and 21), with the variants TRL names by `loss_type`.

Shapes: N completions (prompts x G), T completion positions; `mask` (N, T) is 1 on a completion's tokens.

  ratio   r = exp(log pi(o_t) - log pi_old(o_t))
          sequence level (GSPO, Zheng et al. 2025; TRL's importance_sampling_level="sequence"): one ratio per
          completion, exp(mean_t of its log ratios), clipped and weighting each of its tokens
  token   l_t = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta * KL_t,
          KL_t = exp(ref - logp) - (ref - logp) - 1            (k3, Schulman 2020; DeepSeek-Math eq. 4)
  grpo    mean over completions of (sum_t l_t mask / |o|)      (each completion's mean, then their mean)
  dr_grpo sum_t l_t mask / (N x max_completion_length)         (Dr. GRPO, Liu et al. 2025: no length bias)
  dapo    sum_t l_t mask / sum mask                            (DAPO, Yu et al. 2025: token-level mean)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
ScaleRewards = Literal["group", "batch", "none"]
STD_EPS = 1e-4  # added to the std the advantages are divided by (as TRL)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4), rewards (N,) in consecutive groups of `group_size`.

    The std is that of the group (`group`, GRPO), of the whole batch (`batch`), or not used (`none`, Dr. GRPO).
    """
    grouped = rewards.view(-1, group_size)  # (P, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale_rewards == "none":
        return centred
    return centred / (reward_std(rewards, group_size, scale_rewards) + STD_EPS)


def reward_std(rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards) -> torch.Tensor:
    """(N,) the std each reward's advantage is divided by: the batch's with `batch`, else its group's (with `none`
    it divides nothing, and says whether the group has any advantage). Unbiased (n - 1), as torch.std and TRL."""
    if scale_rewards == "batch":
        return rewards.std().expand_as(rewards)
    return rewards.view(-1, group_size).std(dim=1).repeat_interleave(group_size)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1, >= 0, unbiased."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLoss:
    """The loss and what to log of it: the mean KL (None at beta 0, where no reference is scored) and the fraction of
    tokens whose ratio was clipped."""

    loss: torch.Tensor
    kl: float | None
    clip_fraction: float
    clip_low_fraction: float
    clip_high_fraction: float


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    epsilon: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
) -> PolicyLoss:
    """The clipped surrogate loss of one batch: logps, old_logps, ref_logps, mask (N, T); advantages (N,). At the
    sequence level the clipped fractions count the tokens of the completions whose ratio was clipped."""
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps  # (N, T)
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (N, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities (ref_logps)")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        width = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * width)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"loss_type must be grpo, dr_grpo or dapo, got {loss_type!r}")
    tokens = mask.sum().clamp(min=1)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (A < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (A > 0)).to(mask.dtype)
        low_fraction, high_fraction = (low * mask).sum() / tokens, (high * mask).sum() / tokens
    return PolicyLoss(
        loss=loss,
        kl=None if kl is None else float((kl.detach() * mask).sum() / tokens),
        clip_fraction=float(low_fraction + high_fraction),
        clip_low_fraction=float(low_fraction),
        clip_high_fraction=float(high_fraction),
    )
