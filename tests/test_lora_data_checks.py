"""What a run from a checkpoint (`lora train`, `train init_from=`) accepts as data: token shards of the checkpoint's
own tokenizer, the DATA and BASE the run started with on resume; and the errors that say what to do otherwise."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest
from typer.testing import CliRunner

from seekstack.adapters.training import lora_train_config
from seekstack.cli import app
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import index_path, tokenize_corpus
from seekstack.train.config import TrainConfig
from seekstack.train.trainer import train
from tests.adapters.support import write_base

RUN = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", "lora.rank=2"]
runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "base", with_tokenizer=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A `data build` folder: train.jsonl and val.jsonl."""
    folder = tmp_path_factory.mktemp("corpus")
    for split, count in (("train", 30), ("val", 3)):
        lines = (
            json.dumps({"text": f"def area_{n}(width, height):\n    return width * height\n" * 3}) for n in range(count)
        )
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def other_shards(base, corpus, tmp_path_factory):
    """The corpus tokenized by another tokenizer of the base's vocabulary size: the base's with two ids swapped."""
    tokenizer_file = tmp_path_factory.mktemp("other") / "tokenizer.json"
    spec = json.loads((base / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = "a", "b"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(spec))
    other = Tokenizer.from_file(tokenizer_file)
    assert other.vocab_size == Tokenizer.from_file(base).vocab_size
    shards = tmp_path_factory.mktemp("tokens") / "tokens"
    for split in ("train", "val"):
        tokenize_corpus(corpus / f"{split}.jsonl", other, shards, split)
    return shards


def test_lora_train_refuses_shards_of_another_tokenizer_and_gives_the_command_that_makes_them_right(
    base, corpus, other_shards, tmp_path
):
    with pytest.raises(ValueError) as refused:
        lora_train_config(base, other_shards, tmp_path / "adapter", RUN)
    message = str(refused.value)
    assert (
        message.startswith(f"{other_shards} was tokenized with ") and f"the tokenizer of checkpoint {base}" in message
    )
    assert not (tmp_path / "adapter").exists()  # refused before the run's folder is written
    command = re.search(r"`(seekstack [^`]*)`", message)[1]
    retokenized = other_shards.with_name("tokens_base")
    assert command == f"seekstack data tokenize --corpus {corpus} --tokenizer {base} --out {retokenized}"
    result = runner.invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    train_config, _ = lora_train_config(base, retokenized, tmp_path / "adapter", RUN)
    assert train_config.data_dir == str(retokenized)


def test_training_from_a_checkpoint_refuses_shards_of_another_tokenizer(base, other_shards, tmp_path):
    config = TrainConfig(
        init_from=str(base), data_dir=str(other_shards), out_dir=str(tmp_path / "run"), seq_len=32, batch_size=2,
        max_steps=1, eval_every=0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"{other_shards} was tokenized with .*the tokenizer of checkpoint {base}"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shards_whose_index_records_no_tokenizer_hash_are_not_checked(base, other_shards, tmp_path):
    old = shutil.copytree(other_shards, tmp_path / "old_tokens")
    for split in ("train", "val"):
        index = json.loads(index_path(old, split).read_text())
        del index["tokenizer"]["sha256"]
        index_path(old, split).write_text(json.dumps(index))
    train_config, _ = lora_train_config(base, old, tmp_path / "adapter", RUN)
    assert train_config.data_dir == str(old)
