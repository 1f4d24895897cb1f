"""A byte-level tokenizer and a micro model, small enough for post-training tests to run in seconds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from seekstack.checkpoint import save_pretrained
from seekstack.config import ConfigError
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import Tokenizer, train_tokenizer
from seekstack.train.config import resolve_train_config
from tests.conftest import micro_config

TEXTS = ["What is 12 + 34? <think> 2+4=6, 1+3=4 </think> 46", "Using the numbers 3 4 5 once each, make 17."] * 20


def byte_tokenizer(directory: Path) -> Tokenizer:
    """A tokenizer of the 256 bytes, the special tokens and a few merges."""
    return train_tokenizer(TEXTS, vocab_size=300, out_path=directory)


def micro_checkpoint(directory: Path, context: int = 512) -> Path:
    """A random micro model of `context` positions with the byte tokenizer, saved as a model directory. Its weights
    are the same whichever tests ran before in the process (the models SFT trains from it are then the same too)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Transformer(micro_config(vocab_size=300, max_position_embeddings=context))
    save_pretrained(model, directory)
    assert byte_tokenizer(directory).vocab_size == 300
    return directory


def loss_and_gradients(model, source, batch) -> tuple:
    """`source.loss`'s output for `model` on `batch` (MTP weight 0.3) and the gradient of each parameter that gets
    one: what a packed batch must equal its padded twin in."""
    model.zero_grad()
    out, _ = source.loss(model, batch, mtp_loss_weight=0.3)
    out.loss.backward()
    return out, [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]


def assert_refused_naming_ours(directory: Path, cls: type, assignment: str, ours: str) -> None:
    """Another tool's `name=value`, given to `cls` on the command line and in a config file, is refused as an unknown
    field with `ours` (which field it is here, or why it is not offered) in the refusal."""
    name = assignment.split("=")[0]
    with pytest.raises(ConfigError, match=f"unknown field '{name}'; .*{re.escape(ours)}"):
        resolve_train_config(None, [assignment], cls=cls)
    config = directory / "config.yaml"
    config.write_text(assignment.replace("=", ": "))
    with pytest.raises(ConfigError, match=f"config.yaml: unknown field .*{re.escape(ours)}"):
        resolve_train_config(config, [], cls=cls)
