"""bench/quantize.py and bench/prune.py: a --model that is no checkpoint, or a --data without shards of its
tokenizer, is refused in one line naming the option, before any work (it was a CheckpointError or
FileNotFoundError traceback); so is an --adaptive-bits below what the model's layer shapes allow (it was a ValueError
traceback after measuring every layer)."""

import pytest
import torch

import seekstack
from tests.bench.support import run_in_process


@pytest.mark.parametrize("script", ["quantize.py", "prune.py"])
def test_a_model_that_is_no_checkpoint_is_refused_in_one_line_naming_the_option(script, tmp_path, monkeypatch, capsys):
    options = ["--model", str(tmp_path / "nope"), "--data", str(tmp_path), "--reps", "1"]
    run = run_in_process(script, *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"{script}: error: --model {tmp_path / 'nope'}: {tmp_path / 'nope'}: no such folder; a checkpoint is a "
        "folder holding config.json and safetensors weights"
    )


@pytest.mark.parametrize("script", ["quantize.py", "prune.py"])
def test_a_data_folder_without_shards_is_refused_in_one_line_naming_the_option(script, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny")), tmp_path / "model")
    options = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "tokens"), "--reps", "1"]
    run = run_in_process(script, *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        f"{script}: error: --data {tmp_path / 'tokens'}: no folder of token shards at {tmp_path / 'tokens'}: "
        "`seekstack data tokenize --out` writes one"
    )


def test_an_adaptive_budget_the_layer_shapes_cannot_meet_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    options = [*micro_model_and_shards(tmp_path), "--adaptive-bits", "4.2"]
    run = run_in_process("quantize.py", *options, "--reps", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (
        "quantize.py: error: --adaptive-bits 4.2: a budget of 4.2 bits per weight is below the smallest assignment "
        "(4.601 bits per weight: each layer at the smallest option its shapes allow)"
    )


@pytest.mark.parametrize(
    ("option", "fraction", "said"),
    [
        ("--heads", "1", "--heads: pruning 1 of the attention heads leaves none of 2 per layer: prune 0.5 of them"),
        ("--experts", "0.5", "--experts: pruning 0.5 of the routed experts leaves 1 of 2 in each of the 2 routing"),
    ],
)
def test_a_prune_fraction_that_leaves_too_few_is_refused_before_calibrating(
    option, fraction, said, tmp_path, monkeypatch, capsys
):
    """bench/prune.py took them and ended in the ValueError's traceback from pruning, after calibrating and after
    healing the unpruned control (`seekstack prune` refuses them before reading the model)."""
    options = [*micro_model_and_shards(tmp_path), option, fraction]
    run = run_in_process("prune.py", *options, "--reps", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1].startswith(f"prune.py: error: {said}")


@pytest.mark.parametrize(
    ("fractions", "said"),
    [
        (["--heads", "0", "--experts", "0"], "nothing to remove: --experts and --heads are both 0"),
        (["--heads", "0.1", "--experts", "0"], "nothing to remove: --heads 0.1 removed 0 of 2 per layer (0.0%)"),
    ],
)
def test_prune_fractions_that_remove_nothing_are_refused_before_calibrating(
    fractions, said, tmp_path, monkeypatch, capsys
):
    """bench/prune.py calibrated, then measured, healed and timed rows that pruned nothing, the unpruned model again
    under other names ("heads -0%"); `seekstack prune` refuses such fractions."""
    options = [*micro_model_and_shards(tmp_path), *fractions]
    run = run_in_process("prune.py", *options, "--reps", "1", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert run.stderr.splitlines()[-1].startswith(f"prune.py: error: {said}")


def micro_model_and_shards(tmp_path) -> list[str]:
    """--model and --data of a micro checkpoint (2 heads, 2 groups of 2 routed experts) and train and val shards of
    the same tokens."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    shards = tmp_path / "shards"
    write_train_shard(shards)
    (shards / "val_00000.bin").write_bytes((shards / "train_00000.bin").read_bytes())
    (shards / "val_index.json").write_text((shards / "train_index.json").read_text().replace("train", "val"))
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "model")
    return ["--model", str(tmp_path / "model"), "--data", str(shards)]
