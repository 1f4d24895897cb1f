"""How much a compressed model lost: bits per byte on held-out text, mean KL divergence from the original model's
next-token distribution, and how often both pick the same top-1 token.

KL(P_orig || P_quant) = sum_v p_v (log p_v - log q_v), averaged over every predicted position.
bits per byte = nats per token x tokens / (ln 2 x UTF-8 bytes), with the split's token and byte counts.
Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.tokens.shards import TokenWindows, load_index

VAL_SPLIT = "val"


@dataclass
class Quality:
    bits_per_byte: float
    mean_kl: float  # nats, against the reference model (0 for the reference itself)
    top1_agreement: float  # share of positions whose argmax matches the reference's


def held_out_batches(
    data_dir: str, seq_len: int = 256, batch_size: int = 8, batches: int = 8, split: str = VAL_SPLIT
) -> list[torch.Tensor]:
    """The first `batches` batches of `split` (default: validation) of token shards `data_dir`, in order."""
    windows = TokenWindows(data_dir, split, seq_len)
    out = []
    for batch in windows.sequential(batch_size):
        if len(out) == batches:
            break
        out.append(batch)
    return out


def bytes_per_token(data_dir: str) -> float:
    index = load_index(data_dir, VAL_SPLIT)
    return index["text_bytes"] / index["total_tokens"]


@torch.no_grad()
def measure(model: nn.Module, reference: nn.Module, batches: Iterable[torch.Tensor], bytes_per_tok: float) -> Quality:
    """`model` against `reference` on `batches` (B, T) of token ids."""
    nats = kl = agree = 0.0
    positions = 0
    for batch in batches:
        ref_logp = reference(batch).logits[:, :-1].float().log_softmax(dim=-1)  # (B, T-1, V)
        logp = model(batch).logits[:, :-1].float().log_softmax(dim=-1)
        targets = batch[:, 1:]
        nats += -logp.gather(-1, targets[..., None]).sum().item()
        kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        positions += targets.numel()
    return Quality(nats / positions / (math.log(2) * bytes_per_tok), kl / positions, agree / positions)
