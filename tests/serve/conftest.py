"""Fixtures shared by the server tests."""

from __future__ import annotations

import shutil

import pytest
import torch

from seekstack.checkpoint import save_pretrained
from seekstack.infer.engine import Engine
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import Tokenizer
from tests.conftest import micro_config
from tests.interop.release import r1_tokenizer


@pytest.fixture(scope="module")
def r1_engine(tmp_path_factory) -> Engine:
    """Random weights under DeepSeek-R1's tokenizer layout and chat template: a reply opens inside its reasoning."""
    folder = tmp_path_factory.mktemp("r1")
    r1_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_file(folder / "tokenizer")
    save_pretrained(Transformer(micro_config(vocab_size=tokenizer.vocab_size)), folder / "model")
    for path in (folder / "tokenizer").iterdir():
        shutil.copy(path, folder / "model" / path.name)
    return Engine.from_pretrained(folder / "model")
