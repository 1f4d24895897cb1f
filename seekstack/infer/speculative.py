"""Speculative sampling's acceptance rule (Leviathan et al. 2023, Alg. 1) for drafts of the MTP module.

Shapes: B sequences, K drafts per sequence, V vocabulary.
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


def accept_drafts(
    sampling: SamplingBatch, logits: torch.Tensor, drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over K drafts per row (B, K) from the target's logits (B, K+1, V) at [pending, drafts].

    Draft t is judged under the distribution after the drafts before it (penalties count them as generated)
    and accepted while all before it were; the first rejected one is replaced from its residual, and when
    all K pass, a bonus token is drawn from the last column. Returns how many drafts each row accepted (B,)
    and the tokens (B, K+1): the first accepted + 1 are the new ones. Every row draws at every column, so a
    request's generator advances the same way whatever the others do.
    """
    count = drafts.shape[1]
    passed, tokens = [], []
    for t in range(count):
        target = sampling.probabilities(sampling.penalize(logits[:, t], extra_tokens=drafts[:, :t]))
        accepted, replacement = verify_drafts(sampling, target, drafts[:, t])
        passed.append(accepted)
        tokens.append(torch.where(accepted, drafts[:, t], replacement))
    tokens.append(sampling.draw(sampling.probabilities(sampling.penalize(logits[:, count], extra_tokens=drafts))))
    return accepted_prefix(torch.stack(passed, dim=1)), torch.stack(tokens, dim=1)


def accepted_prefix(passed: torch.Tensor) -> torch.Tensor:
    """How many drafts each row keeps (B,): those before its first failed check in passed (B, K)."""
    return passed.long().cumprod(dim=1).sum(dim=1)
