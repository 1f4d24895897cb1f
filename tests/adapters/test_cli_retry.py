"""`lora train` on the command line: a run that failed before its first checkpoint is retried into the same folder,
BASE and DATA are told from key=value overrides, and errors name every adapter key with its `lora.` prefix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from seekstack.adapters.data import prepare_data
from seekstack.cli import app
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import load_index
from seekstack.train.runs import list_checkpoints
from tests.adapters.support import QUICK_RUN
from tests.train.test_trainer import another_run_holding

runner = CliRunner()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text("A few words of prose to adapt to. " * 200)
    return path


def lora_train(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, ["lora", "train", *map(str, args)])
    return result.exit_code, result.output


def test_a_run_that_failed_before_its_first_checkpoint_is_retried_into_the_same_folder(base, text, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    code, output = lora_train(base, text, *QUICK_RUN, "seq_len=1024", "--out", out)  # beyond the base's 128 positions
    assert code == 1 and "seq_len" in output and "longer than the model's context" in output
    assert sorted(path.name for path in out.iterdir()) == ["notes.md"]  # was: data/ and lora_config.json left
    code, output = lora_train(base, text, *QUICK_RUN, "--out", out)
    assert code == 0, output
    assert [path.name for path in list_checkpoints(out)] == ["step_1"]
    assert (out / "notes.md").read_text() == "mine"
    code, output = lora_train(base, text, *QUICK_RUN, "--out", out)  # now it holds a run
    assert code == 1 and "holds a run (checkpoint step_1); continue it with --resume" in output


@pytest.mark.parametrize(
    ("refused", "named"),
    [
        ("seq_len=1024", "longer than the model's context"),  # before the text was read
        ("lora.layers=[9]", "field 'lora.layers' must be main layer numbers below"),  # by peft's targets on the base
        ("lora.embedding_tokens=100000", "field 'lora.embedding_tokens' must be at most "),  # before the text was read
    ],
)
def test_a_refused_run_leaves_its_out_folder_as_it_was(base, text, refused, named, tmp_path):
    """A run refused after it had tokenized the text (or saved lora_config.json) left them in --out."""
    new, used = tmp_path / "runs" / "new", tmp_path / "used"
    used.mkdir()
    (used / "notes.md").write_text("mine")
    for out in (new, used):
        code, output = lora_train(base, text, *QUICK_RUN, refused, "--out", out)
        assert code == 1 and named in output, output
    assert not (tmp_path / "runs").exists()
    assert [(path.name, path.read_text()) for path in used.iterdir()] == [("notes.md", "mine")]


def test_a_run_into_an_out_another_run_is_training_into_is_refused_and_takes_none_of_its_files(base, text, tmp_path):
    """A second `lora train` into the --out of one still training overwrote its lora_config.json, and, refused by
    then, deleted as its own what the first had written since it began: the first's checkpoints and adapter."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "lora_config.json").write_text("the running run's")
    with another_run_holding(out):  # the run training there
        code, output = lora_train(base, text, *QUICK_RUN, "--out", out)
        (out / "checkpoints").mkdir()  # what that run writes meanwhile
    assert code == 1 and f"out_dir {out.absolute()}: another run is training into it now" in output, output
    assert sorted(path.name for path in out.iterdir()) == ["checkpoints", "lora_config.json"]
    assert (out / "lora_config.json").read_text() == "the running run's"


def test_a_retry_on_other_text_keeps_no_validation_split_of_the_earlier_text(base, tmp_path):
    many, one = tmp_path / "many", tmp_path / "one.txt"
    many.mkdir()
    for number in range(12):  # one in 10 held out, by hash
        (many / f"doc{number}.txt").write_text(f"The licence number {number} grants the rights below. " * 20)
    one.write_text("A single document: its tail is held out. " * 50)
    tokens = prepare_data(many, base, tmp_path / "adapter")
    assert "licence" in held_out_text(tokens, base)
    assert prepare_data(one, base, tmp_path / "adapter") == tokens
    held_out = held_out_text(tokens, base)
    assert "its tail is held out" in held_out and "licence" not in held_out


def held_out_text(tokens: Path, base: Path) -> str:
    """The text of the val split's shards, decoded with the base's tokenizer."""
    index = load_index(tokens, "val")
    ids = np.concatenate([np.fromfile(tokens / shard["file"], dtype=index["dtype"]) for shard in index["shards"]])
    return Tokenizer.from_file(base).decode(ids.tolist())


def test_key_value_positionals_are_overrides_not_base_or_data(base, text, tmp_path):
    out = tmp_path / "adapter"
    assert lora_train(base, text, *QUICK_RUN, "--out", out)[0] == 0
    code, output = lora_train("--resume", base, "max_steps=2", "--out", out)  # BASE, then an override
    assert code == 0 and "trained to step 2" in output, output
    code, output = lora_train("--resume", base, f"init_from={base}", "max_steps=3", "--out", out)
    assert code == 0 and "trained to step 3" in output, output
    code, output = lora_train("--resume", "max_steps=4", "--out", out)  # overrides only
    assert code == 0 and "trained to step 4" in output, output
    code, output = lora_train(base, "max_steps=2", "--out", tmp_path / "new")
    assert code == 1 and "a new LoRA run needs BASE (a checkpoint folder) and DATA" in output
    code, output = lora_train(base, text, "extra", "max_steps=2", "--out", tmp_path / "new")
    assert code == 1 and "extra: neither BASE nor DATA" in output and "BASE DATA key=value" in output
    assert not (tmp_path / "new").exists()


def test_under_torchrun_rank_0_alone_prints_a_resumed_runs_config_warnings(base, text, tmp_path, torchrun_environment):
    """Every rank resolves the config and heard its warnings: under torchrun each printed 'warning: resuming with
    ...' once a rank, where `seekstack train` prints them on rank 0 alone. Each resume here goes on one more step (a
    refused one tells no warning: 032805c); rank 1 of 2, given no MASTER_ADDR, stops after them where the ranks join."""
    out = tmp_path / "adapter"
    assert lora_train(base, text, *QUICK_RUN, "--out", out)[0] == 0
    for rank, world_size, exit_code in ((0, 1, 0), (1, 2, 1)):
        torchrun_environment(rank, world_size)
        code, output = lora_train("--resume", f"max_steps={rank + 2}", "--out", out)
        assert code == exit_code, output
        warned = f"warning: resuming with max_steps={rank + 2} (the run last ran with {rank + 1})" in output
        assert warned == (rank == 0), output


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["lora.eva_rho=2"], "field 'lora.eva_rho' must be 1 unless lora.init=eva (lora.init='lora')"),
        (["lora.dropout=0.1"], "field 'lora.dropout' must be 0 when lora.feed_forward or lora.experts are adapted"),
        (  # a dropout of 1 zeroes every update: nothing would train
            ["lora.dropout=1.0", "lora.feed_forward=[]", "lora.experts=[]"],
            "field 'lora.dropout' has value 1.0: input should be less than 1",
        ),
        (
            ["lora.attention=[]", "lora.feed_forward=[]", "lora.experts=[]"],
            "among lora.attention, lora.feed_forward, lora.experts and lora.vocabulary",
        ),
        (["lora.head_tokens=2", "lora.vocabulary=[lm_head]"], "0 when lm_head is in lora.vocabulary"),
        (["lora.init=eva"], "not 'eva' when lora.experts or lora.vocabulary are adapted"),
        (["lora.init=pissa"], "not pissa or olora when lora.experts or embed_tokens (lora.vocabulary) are adapted"),
        (
            ["lora.init=pissa", "lora.dora=true", "lora.feed_forward=[]", "lora.experts=[]"],
            "field 'lora.dora' must be false with lora.init='pissa'",
        ),
    ],
)
def test_adapter_errors_name_the_other_keys_with_their_prefix(base, text, overrides, named, tmp_path):
    code, output = lora_train(base, text, *QUICK_RUN, *overrides, "--out", tmp_path / "adapter")
    assert code == 1 and named in output, output
    assert not (tmp_path / "adapter").exists()


def test_under_torchrun_only_rank_0_holds_the_out_folder_as_the_trainer_does(tmp_path, torchrun_environment):
    """Every rank of a torchrun `lora train` enters undone_if_refused: rank 1 found the folder held by rank 0 and was
    refused as 'another run'."""
    from seekstack.adapters.training import undone_if_refused

    out = tmp_path / "adapter"
    torchrun_environment(1)
    with another_run_holding(out), undone_if_refused(out):  # rank 0, holding it
        (out / "lora_config.json").write_text("rank 1's view")
    torchrun_environment(0)
    with pytest.raises(OSError, match="another run is training into it now"), another_run_holding(out):
        with undone_if_refused(out):
            pass
