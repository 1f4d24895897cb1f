"""MTP speculative decoding: the MTP module's drafts, and their verification by the main model, greedy or by
speculative sampling's acceptance rule (Leviathan et al. 2023, Alg. 1).

Shapes: B sequences, T tokens per sequence, K drafts per sequence, V vocabulary, D hidden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from seekstack.infer.sampling import SamplingBatch

if TYPE_CHECKING:
    from seekstack.infer.cache import PagedLatentCache
    from seekstack.model.transformer import Transformer


def mtp_drafts(
    model: Transformer,
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    positions: torch.Tensor,
    last: torch.Tensor,
    cache: PagedLatentCache,
    count: int,
) -> torch.Tensor:
    """`count` drafts (B, K) after column last[b] of a main forward: its hidden (B, T, D) at positions (B, T), with
    the tokens one position on (B, T).

    MTP depth 1 runs over all T columns (position i reads h_i and the embedding of token i+1, so every position
    enters the MTP layer's cache) and column last guesses the token after the next. Further drafts apply the
    same module again one position on, its own output standing in for the main model's hidden state there (as
    vLLM drafts past a model's MTP depth). The cache entries those write are guesses; the next step writes
    over them before anything reads them.
    """
    mtp = model.mtp[0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    cos, sin = model.rotary(positions)
    out, _ = mtp(hidden, model.embed_tokens(next_ids), cos, sin, cache)
    hidden, position = out[rows, last][:, None], positions[rows, last][:, None]  # (B, 1, D), (B, 1)
    drafts = [model.lm_head(mtp.head_input(hidden)).argmax(dim=-1)]  # (B, 1) each
    for _ in range(count - 1):
        position = position + 1
        cos, sin = model.rotary(position)
        hidden, _ = mtp(hidden, model.embed_tokens(drafts[-1]), cos, sin, cache.follow(position))
        drafts.append(model.lm_head(mtp.head_input(hidden)).argmax(dim=-1))
    return torch.cat(drafts, dim=1)


def greedy_speculation(
    model: Transformer,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: PagedLatentCache,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy speculative step in one call: verify each row's [pending, K drafts] (B, K+1) and draft again.

    Returns logits (B, K+1, V), the argmaxes (B, K+1), how many drafts each row accepted (B,) — those up to the
    first that differs from the argmax before it — and the next K drafts (B, K). The first accepted + 1
    argmaxes are the new tokens: the accepted drafts and the token after them (a replacement or a bonus).
    """
    out = model(input_ids, cache=cache, positions=positions)
    best = out.logits.argmax(dim=-1)
    accepted = accepted_prefix(best[:, :-1] == input_ids[:, 1:])
    next_drafts = mtp_drafts(model, out.hidden_states, best, positions, accepted, cache, count)
    return out.logits, best, accepted, next_drafts


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
