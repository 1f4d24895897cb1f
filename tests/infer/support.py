"""Shared by the inference tests: a tiny trained tokenizer and a micro model with random weights saved beside it."""

from __future__ import annotations

import errno
from pathlib import Path

import torch

import seekstack
from seekstack.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import micro_config
from tests.test_tokenizer import stdlib_texts

VOCAB = 512


def tiny_tokenizer(directory: Path) -> Tokenizer:
    """A byte-level BPE of VOCAB tokens trained on ~100 KB of the standard library's source."""
    return train_tokenizer(stdlib_texts(100_000), vocab_size=VOCAB, out_path=directory)


def micro_model(**overrides) -> seekstack.Transformer:
    """The micro config with the tokenizer's vocabulary and one MTP module, random weights (seed 0)."""
    torch.manual_seed(0)
    return seekstack.Transformer(micro_config(vocab_size=VOCAB, **overrides)).eval()


def model_dir(directory: Path, **overrides) -> Path:
    """A checkpoint directory as `seekstack generate --model` expects: config.json, safetensors, tokenizer.json; the
    model `micro_model(**overrides)`."""
    seekstack.save_pretrained(micro_model(**overrides), directory)
    tiny_tokenizer(directory)
    return directory


def fail_sampling_after(engine, batches: int) -> None:
    """Make `engine`'s sampling raise once it has sampled `batches` batches (greedy rows' raw argmax included): a
    request under way then ends alone, with finish_reason "error", after the tokens those batches gave it."""
    real_isolated, calls = engine._isolated, 0

    def isolated(batch, compute, failed_row):
        def sampling_that_fails(rows):
            nonlocal calls
            calls += 1
            if calls > batches:
                raise RuntimeError("injected sampling failure")
            return compute(rows)

        return real_isolated(batch, sampling_that_fails, failed_row)

    engine._isolated = isolated


def read_only_folder(monkeypatch, folder: Path) -> Path:
    """`folder`, in which no folder can be made (Path.mkdir refuses it as a read-only disk does)."""
    mkdir = Path.mkdir

    def refusing_mkdir(path, *args, **kwargs):
        if path.is_relative_to(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    return folder
