"""FR-Spec's draft vocabulary (Zhao et al. 2025, "Accelerating Large-Vocabulary Language Models via Frequency-Ranked
Speculative Sampling"): the MTP drafts score only the N most frequent tokens, so a draft's output head costs N/V of the
full one; the main model still verifies over the whole vocabulary.

Token frequency comes from the checkpoint's training run: `run/train_config.json` names its token shards (`data_dir`),
whose train split is counted (its first RANKING_SAMPLE_TOKENS tokens). A checkpoint without them (a copied or
downloaded one) falls back to the tokenizer's id order: a byte-level BPE numbers its merges in the order it learnt
them, most frequent pair first, so low ids are roughly the frequent tokens (on the demo corpus the first 1024 ids
cover 75% of held-out tokens, the 1024 most frequent 82%).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from seekstack.checkpoint import CheckpointError, read_json_object
from seekstack.model.transformer import Transformer
from seekstack.tokens.shards import index_path, token_counts
from seekstack.train.config import TRAIN_SPLIT


class DraftVocabulary(NamedTuple):
    """The tokens a draft may be: `ids` (N,) and their rows of the output head, transposed (D, N): a one-row product
    streams it twice as fast as F.linear does the rows (seekstack.infer.packed). Only the drafts read it
    (seekstack.infer.speculative); verification scores the whole vocabulary, so the output does not change."""

    ids: torch.Tensor
    head_t: torch.Tensor


RANKING_SAMPLE_TOKENS = 20_000_000  # counted from the start of the train split: enough to rank a vocabulary


def token_ranking(model_dir: str | Path, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Every token id (V,), most frequent first, and where the order comes from: the training run's token shards
    (`model_dir` is run/checkpoints/step_N) or, without them, the tokenizer's ids in order (BPE merge rank)."""
    run_config = Path(model_dir).resolve().parent.parent / "train_config.json"
    if run_config.is_file():
        data_dir = read_json_object(run_config).get("data_dir", "")
        if not isinstance(data_dir, str):
            raise CheckpointError(f"{run_config}: 'data_dir' is {data_dir!r}, not a folder name")
        data_dir = run_config.parent / data_dir
        if index_path(data_dir, TRAIN_SPLIT).is_file():
            counts = token_counts(data_dir, TRAIN_SPLIT, vocab_size, RANKING_SAMPLE_TOKENS)
            return torch.from_numpy(np.argsort(-counts, kind="stable")), f"token counts of {data_dir}"
    return torch.arange(vocab_size), "tokenizer id order (BPE merge rank): no training shards beside the checkpoint"


def refuse_a_wrong_draft_vocab(size: object) -> None:
    """ValueError naming draft_vocab unless it is a whole number >= 0 (a negative one, a slice from the end, would take
    all ids but the last ones)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(
            f"draft_vocab={size!r} must be a whole number >= 0: the most frequent tokens drafts score (0: all of them)"
        )


def draft_vocabulary(model: Transformer, size: int, ranking: torch.Tensor | Sequence[int]) -> DraftVocabulary | None:
    """The `size` first ids of `ranking` (a tensor or list of token ids) with their rows of `model`'s output head (a
    copy, see `refresh_draft_vocabulary`); None (drafts score the whole vocabulary) for size 0 or a size that covers
    it; ValueError for a negative size (a slice from the end would take all ids but the last ones) and for a ranking
    that is not token ids of the model's vocabulary, holds fewer than `size` or repeats one among its first `size`,
    naming draft_ranking (torch's IndexError named neither)."""
    refuse_a_wrong_draft_vocab(size)
    if size == 0 or size >= model.config.vocab_size:
        return None
    rule = "draft_ranking must be token ids, most frequent first (a 1-D tensor or list of ints)"
    try:
        ranked = torch.as_tensor(ranking)
    except (TypeError, ValueError, RuntimeError) as error:  # strings, ragged lists, None
        raise ValueError(f"{rule}; got {ranking!r:.80}: {error}") from None
    if ranked.dim() == 1 and len(ranked) < size:  # before the dtype: torch reads [] as float32
        raise ValueError(f"draft_ranking holds {len(ranked)} token ids; draft_vocab={size} needs at least that many")
    if ranked.dim() != 1 or ranked.is_floating_point() or ranked.is_complex() or ranked.dtype == torch.bool:
        raise ValueError(f"{rule}; got {ranked.dtype} of shape {tuple(ranked.shape)}")
    outside = ranked[(ranked < 0) | (ranked >= model.config.vocab_size)]
    if len(outside):
        raise ValueError(
            f"draft_ranking holds token id {outside[0].item()}, outside the vocabulary [0, {model.config.vocab_size})"
        )
    chosen, repeats = ranked[:size].unique(return_counts=True)
    if len(chosen) < size:  # a repeated id leaves fewer tokens to draft than draft_vocab says
        raise ValueError(
            f"draft_ranking holds token id {chosen[repeats > 1][0].item()} more than once among its first {size}: "
            "it names each token once, most frequent first"
        )
    weight = model.lm_head.weight.detach()
    ids = ranked[:size].to(weight.device)
    return DraftVocabulary(ids, weight[ids].t().contiguous())


@torch.no_grad()
def refresh_draft_vocabulary(model: Transformer, vocabulary: DraftVocabulary | None) -> None:
    """Copy the current values of `vocabulary`'s rows of the output head into it, in place (a compiled step keeps
    reading the same tensor)."""
    if vocabulary is not None:
        vocabulary.head_t.copy_(model.lm_head.weight[vocabulary.ids].t())
