"""Specification of the model vocabulary a training run accepts: exactly the tokenizer's, for a fresh model."""

from __future__ import annotations

import re

import pytest

from seekstack.train.trainer import build_model, train
from tests.train.test_trainer import MICRO_MODEL, TOKENIZER, VOCAB, run_config, write_split


def test_training_refuses_a_model_vocabulary_larger_than_the_tokenizers(tmp_path):
    write_split(tmp_path / "tokens", "train", 4_000, seed=1)  # a tokenizer of VOCAB = 96 ids
    larger_model = {**MICRO_MODEL, "vocab_size": 128}
    larger = run_config(tmp_path / "tokens", tmp_path / "run", model_overrides=larger_model, eval_every=0)  # no val
    # the data folder named tokens was told "the tokenizer's 96 tokens of tokens": the folder now leads the message
    message = (
        f"{tmp_path / 'tokens'}: its tokenizer has 96 tokens, fewer than model vocab_size=128: ids 96..127 decode to "
        "no token; set model.vocab_size=96"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train(larger)
    assert not (tmp_path / "run" / "checkpoints").exists()
    smaller = run_config(tmp_path / "tokens", tmp_path / "run", model_overrides={**MICRO_MODEL, "vocab_size": 64})
    smaller_message = f"{tmp_path / 'tokens'}: its tokenizer has 96 ids, more than model vocab_size=64 embeds; "
    smaller_message += "set model.vocab_size=96"
    with pytest.raises(ValueError, match=f"^{re.escape(smaller_message)}$"):
        build_model(smaller, TOKENIZER)
    exact = run_config(tmp_path / "tokens", tmp_path / "run")
    assert build_model(exact, TOKENIZER).config.vocab_size == VOCAB
