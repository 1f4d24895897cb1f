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

import json
from pathlib import Path

import numpy as np
import torch

from seekstack.infer.speculative import DraftVocabulary
from seekstack.model.transformer import Transformer
from seekstack.tokens.shards import index_path, token_counts

RANKING_SAMPLE_TOKENS = 20_000_000  # counted from the start of the train split: enough to rank a vocabulary


def token_ranking(model_dir: str | Path, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Every token id (V,), most frequent first, and where the order comes from: the training run's token shards
    (`model_dir` is run/checkpoints/step_N) or, without them, the tokenizer's ids in order (BPE merge rank)."""
    run_config = Path(model_dir).resolve().parent.parent / "train_config.json"
    if run_config.is_file():
        data_dir = run_config.parent / json.loads(run_config.read_text(encoding="utf-8")).get("data_dir", "")
        if index_path(data_dir, "train").is_file():
            counts = token_counts(data_dir, "train", vocab_size, RANKING_SAMPLE_TOKENS)
            return torch.from_numpy(np.argsort(-counts, kind="stable")), f"token counts of {data_dir}"
    return torch.arange(vocab_size), "tokenizer id order (BPE merge rank): no training shards beside the checkpoint"


def draft_vocabulary(model: Transformer, size: int, ranking: torch.Tensor) -> DraftVocabulary | None:
    """The `size` first ids of `ranking` with their rows of `model`'s output head (a copy, see
    `refresh_draft_vocabulary`); None (drafts score the whole vocabulary) for size 0 or a size that covers it."""
    if size == 0 or size >= model.config.vocab_size:
        return None
    weight = model.lm_head.weight.detach()
    ids = ranking[:size].to(weight.device)
    return DraftVocabulary(ids, weight[ids].t().contiguous())


@torch.no_grad()
def refresh_draft_vocabulary(model: Transformer, vocabulary: DraftVocabulary | None) -> None:
    """Copy the current values of `vocabulary`'s rows of the output head into it, in place (a compiled step keeps
    reading the same tensor)."""
    if vocabulary is not None:
        vocabulary.head_t.copy_(model.lm_head.weight[vocabulary.ids].t())
