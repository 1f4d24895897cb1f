"""Rows of different lengths as one right-padded batch. The model attends causally, so padding after a row's
last token changes none of its positions; padded positions get label IGNORE_INDEX and mask 0."""

from __future__ import annotations

import torch

from seekstack.model.head_loss import IGNORE_INDEX


def pad_rows(rows: list[list[int]], pad_value: int, length: int | None = None) -> torch.Tensor:
    """(B, T) long tensor of `rows` right-padded with `pad_value` to the longest row (or to `length`)."""
    width = length if length is not None else max(len(row) for row in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row[:width], dtype=torch.long)
    return out


def pad_labelled(
    rows: list[tuple[list[int], list[int]]], pad_id: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (B, T), T = the longest row cut at `max_len`; labels IGNORE_INDEX on padding."""
    width = min(max(len(ids) for ids, _ in rows), max_len)
    input_ids = pad_rows([ids[:width] for ids, _ in rows], pad_id, width)
    labels = pad_rows([labels[:width] for _, labels in rows], IGNORE_INDEX, width)
    return input_ids, labels


def real_tokens(input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) bool: the tokens of a `pad_labelled` batch that are not padding, each row's up to its last token that
    is not the pad id or is labelled; the padding is what follows. Where the pad id is EOS (DeepSeek-V2 releases have
    no pad token) an EOS inside a row is real though unlabelled (a turn of weight 0's), as TRL's padding starts after
    a row's end, not at its first EOS; a row's last EOS is real when labelled, as every trained assistant turn's is
    (unlabelled, it cannot be told from the padding after it)."""
    kept = ((input_ids != pad_id) | (labels != IGNORE_INDEX)).int()
    return kept.flip(1).cummax(dim=1).values.flip(1).bool()  # (B, T): a kept token at or after each position


def within_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: the first `lengths[i]` positions of each row (its tokens, not the padding after them)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
