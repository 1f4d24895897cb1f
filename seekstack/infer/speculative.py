"""Speculative sampling's acceptance rule for one drafted token per sequence (Leviathan et al. 2023, Alg. 1).

Shapes: B sequences, V vocabulary.
"""

from __future__ import annotations

import torch

from seekstack.infer.sampling import SamplingBatch


def verify_drafts(
    sampling: SamplingBatch, target: torch.Tensor, drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept each draft (B,) against the target distribution (B, V); return accepted (B,) and replacements (B,).

    The drafts are the MTP module's argmax, so the draft distribution q is one-hot: accept with probability
    min(1, p/q) = p(draft), else draw from norm(max(0, p - q)) = p without the draft. Either way the token
    follows p exactly. A replacement is drawn for every row (it is used only where the draft is rejected),
    so each request's generator advances the same way whatever happens to the others.
    """
    accepted = sampling.uniform() < target.gather(1, drafts[:, None])[:, 0]
    residual = target.scatter(1, drafts[:, None], 0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target)  # p one-hot on the draft: never used
    return accepted, sampling.draw(residual)
