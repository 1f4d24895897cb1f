"""bench/train_step.py's batch: a --data without token shards is refused before any timing, not replaced by random
ids; without --data the demo's shards are used, or random ids when the demo has not run."""

import sys

import pytest

from tests.bench.support import BENCH, run_in_process

sys.path.insert(0, str(BENCH))  # its siblings (machine.py), as when run
from bench.train_step import training_batch  # noqa: E402


def test_a_data_folder_without_shards_is_refused_naming_the_option_and_folder(tmp_path):
    with pytest.raises(SystemExit, match=f"--data {tmp_path / 'nope'}: no folder of token shards"):
        training_batch(tmp_path / "nope", vocab_size=100, batch=2, seq_len=8)


def test_a_data_folder_above_the_shards_is_refused_naming_the_folder_that_holds_them(tmp_path):
    from tests.train.test_trainer import write_split

    shards = tmp_path / "tokens"
    write_split(shards, "train", 2_000, seed=1)  # --data runs/demo, where make demo writes runs/demo/tokens
    with pytest.raises(SystemExit) as refused:
        training_batch(tmp_path, vocab_size=100, batch=2, seq_len=8)
    assert (
        str(refused.value) == f"--data {tmp_path}: no token shards there, but {shards} holds some: give --data {shards}"
    )


def test_shards_of_a_tokenizer_larger_than_the_presets_vocabulary_are_refused_naming_both(tmp_path):
    from tests.train.test_trainer import write_split

    write_split(tmp_path, "train", 2_000, seed=1, tokenizer={"vocab_size": 200, "sha256": "synthetic"})
    with pytest.raises(
        SystemExit, match=f"--data {tmp_path}: its tokenizer has 200 ids, more than the preset's vocab_size 100 embeds"
    ):
        training_batch(tmp_path, vocab_size=100, batch=2, seq_len=8)
    assert training_batch(tmp_path, vocab_size=200, batch=2, seq_len=8).shape == (2, 8)


def test_a_split_shorter_than_one_window_is_refused_naming_the_option_and_folder(tmp_path):
    from tests.train.test_trainer import write_split

    write_split(tmp_path, "train", 5, seed=1)  # TokenWindows' ValueError, told as the option's error
    with pytest.raises(
        SystemExit, match=f"--data {tmp_path}: .*train_index.json holds 5 tokens, too few for one window"
    ):
        training_batch(tmp_path, vocab_size=100, batch=2, seq_len=8)


def test_without_data_and_without_the_demo_shards_the_batch_is_random_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    batch = training_batch(None, vocab_size=100, batch=2, seq_len=8)
    assert batch.shape == (2, 8)
    assert int(batch.max()) < 100


def test_the_script_refuses_a_wrong_data_folder_before_measuring_anything(tmp_path, monkeypatch, capsys):
    run = run_in_process(
        "train_step.py", "--data", str(tmp_path), "--reps", "1", monkeypatch=monkeypatch, capsys=capsys
    )
    assert run.returncode == 1
    assert f"--data {tmp_path}: no shard index at {tmp_path / 'train_index.json'}" in run.stderr
    assert "measured matmul peak" not in run.stdout


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_a_thread_count_below_one_is_refused_naming_the_option(threads, monkeypatch, capsys):
    """Refused before any work: torch.set_num_threads raises on -1 once the batch is read, and 0 would run on
    torch's count, as if --threads were not given."""
    run = run_in_process("train_step.py", "--threads", threads, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2
    assert f"argument --threads: {threads}: at least 1" in run.stderr


def test_a_sequence_of_one_token_is_refused_naming_the_option(monkeypatch, capsys):
    """A row of one token holds no target (our loss over none 0.0, transformers' nan): refused before any model
    loads."""
    run = run_in_process("train_step.py", "--seq-len", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2
    assert "argument --seq-len: 1: at least 2 (a row of one token holds no target to predict)" in run.stderr


@pytest.mark.parametrize(("preset", "context"), [("tiny", 1024), ("small", 2048)])
def test_a_sequence_past_the_presets_context_is_refused_naming_the_option_and_the_limit(
    preset, context, monkeypatch, capsys
):
    """--preset tiny --seq-len 2048 timed steps at positions the preset has none for (max_position_embeddings 1024),
    a run seekstack train refuses: refused before any model loads."""
    options = ("--preset", preset, "--seq-len", str(context + 1))
    run = run_in_process("train_step.py", *options, monkeypatch=monkeypatch, capsys=capsys, limit_s=30)
    assert run.returncode == 2
    assert f"argument --seq-len: {context + 1}: at most {context} (preset {preset}'s context)" in run.stderr
