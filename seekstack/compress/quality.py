"""How much a compressed model lost: bits per byte on held-out text, mean KL divergence from the original model's
next-token distribution, and how often both pick the same top-1 token.

KL(P_orig || P_quant) = sum_v p_v (log p_v - log q_v), averaged over every predicted position.
bits per byte = nats summed over the targets / (ln 2 x the UTF-8 bytes they spell), counted per token
(tokens/token_bytes.py).
Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.tokens.shards import TokenWindows
from seekstack.tokens.token_bytes import scored_text_bytes, text_targets

VAL_SPLIT = "val"
WINDOW = 256  # tokens a measured window predicts, unless the model's context is shorter


@dataclass
class Quality:
    bits_per_byte: float
    mean_kl: float  # nats, against the reference model (0 for the reference itself)
    top1_agreement: float  # share of positions whose argmax matches the reference's


def held_out_batches(
    data_dir: str, context: int, batch_size: int = 8, batches: int = 8, split: str = VAL_SPLIT
) -> list[torch.Tensor]:
    """The first `batches` batches of `split` (default: validation) of token shards `data_dir`, in order: windows
    predicting WINDOW tokens, or `context` (the model's max_position_embeddings) where that is shorter, so that no
    position is scored past what the model was trained at."""
    windows = TokenWindows(data_dir, split, min(WINDOW, context))
    out = []
    for batch in windows.sequential(batch_size):
        if len(out) == batches:
            break
        out.append(batch)
    return out


@torch.no_grad()
def log_probs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """`model`'s float32 log-probabilities (B, T-1, V) of each next token of `batch` (B, T)."""
    return model(batch).logits[:, :-1].float().log_softmax(dim=-1)


@torch.no_grad()
def measure(
    model: nn.Module,
    reference: Iterable[torch.Tensor],
    batches: Iterable[torch.Tensor],
    byte_lengths: torch.Tensor,
) -> Quality:
    """`model` against the reference model's `log_probs` of each of `batches` (B, T) of token ids (`reference`: a
    list computed once where many models are measured), each target's bytes counted by `byte_lengths` (V,)
    (`split_byte_lengths`)."""
    nats = kl = agree = text_bytes = 0.0
    positions = 0
    for batch, ref_logp in zip(batches, reference, strict=True):
        logp = log_probs(model, batch)
        targets = batch[:, 1:]
        text = text_targets(byte_lengths, batch)[:, 1:] != IGNORE_INDEX  # EOS spells no bytes: its loss not counted
        nats += -logp.gather(-1, targets[..., None])[..., 0][text].sum().item()
        kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        positions += targets.numel()
        text_bytes += scored_text_bytes(byte_lengths, batch)
    return Quality(nats / (math.log(2) * text_bytes), kl / positions, agree / positions)
