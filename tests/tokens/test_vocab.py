"""Specification of the model vocabulary a training run accepts: exactly the tokenizer's, for a fresh model."""

from __future__ import annotations

import pytest

from seekstack.train.trainer import build_model, train
from tests.train.test_trainer import MICRO_MODEL, TOKENIZER, VOCAB, run_config, write_split


def test_training_refuses_a_model_vocabulary_larger_than_the_tokenizers(tmp_path):
    write_split(tmp_path / "tokens", "train", 4_000, seed=1)  # a tokenizer of VOCAB = 96 ids
    larger_model = {**MICRO_MODEL, "vocab_size": 128}
    larger = run_config(tmp_path / "tokens", tmp_path / "run", model_overrides=larger_model, eval_every=0)  # no val
    message = r"model vocab_size=128 is larger than the tokenizer's 96 tokens .*ids 96\.\.127 decode to no token"
    with pytest.raises(ValueError, match=message + r".*set model.vocab_size=96"):
        train(larger)
    assert not (tmp_path / "run" / "checkpoints").exists()
    smaller = run_config(tmp_path / "tokens", tmp_path / "run", model_overrides={**MICRO_MODEL, "vocab_size": 64})
    with pytest.raises(ValueError, match="model vocab_size=64 is smaller than the tokenizer's 96 ids"):
        build_model(smaller, TOKENIZER)
    exact = run_config(tmp_path / "tokens", tmp_path / "run")
    assert build_model(exact, TOKENIZER).config.vocab_size == VOCAB
