"""bench/quantize.py and bench/prune.py: a --model that is no checkpoint, or a --data without shards of its
tokenizer, is refused in one line naming the option, before any work (it was a CheckpointError or
FileNotFoundError traceback); so is an --adaptive-bits below what the model's layer shapes allow (it was a ValueError
traceback after measuring every layer). Their checkpoints are written to a temporary folder that is removed."""

import argparse
import copy
import sys
import tempfile
from dataclasses import replace

import pytest
import torch

import seekstack
from seekstack.compress.adaptive import unmeasured_choices
from seekstack.compress.heads import head_importance
from seekstack.compress.prune import gate_mass
from seekstack.compress.quantize import QuantConfig, quantize_model
from tests.bench.support import BENCH, run_in_process

sys.path.insert(0, str(BENCH))  # its siblings (options.py, peers.py, quantize.py), as when run
from bench import prune, quantize  # noqa: E402


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


def test_the_uniform_int4_row_beside_an_adaptive_budget_keeps_layers_int4_does_not_take_in_float(
    tmp_path, monkeypatch, capsys
):
    """The micro model's kv_a_proj_with_mqa (1,536 weights in each of 2 layers) takes no int4 group: `--scheme int4`
    keeps it in float32, so uniform int4 g32 is (3,072 x 32 + 60,416 x 4.5) / 63,488 = 5.831 bits per weight."""
    model, data = micro_model_and_shards(tmp_path)[1::2]

    def sensitivities(model, kl_of):  # the measuring is not what this checks: the wider option, the lower KL
        return [replace(c, kl={option: -bits for option, bits in c.bits.items()}) for c in unmeasured_choices(model)]

    monkeypatch.setattr(quantize, "sensitivities", sensitivities)
    models = quantize.adaptive_models(seekstack.load_pretrained(model), data, [8.0])
    assert list(models) == ["adaptive 8.0 bits"]
    assert "(uniform int4 g32, layers it does not take kept in float: 5.831); " in capsys.readouterr().out


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


def test_the_prune_table_of_a_model_without_moe_layers_lists_no_routed_experts(tmp_path, monkeypatch, capsys):
    """Every block dense (first_k_dense_replace), the table's routed experts column said 4, the config's count."""
    from tests.train.test_loss_curve import MICRO_MODEL

    options = micro_model_and_shards(tmp_path)
    dense = seekstack.preset("tiny", **{**MICRO_MODEL, "first_k_dense_replace": 2, "num_nextn_predict_layers": 0})
    seekstack.save_pretrained(seekstack.Transformer(dense), tmp_path / "model")
    batches = ["--batches", "1", "--calibration-batches", "1", "--heal-steps", "0", "--reps", "1", "--experts", "0"]
    run = run_in_process("prune.py", *options, *batches, "--heads", "0.5", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 0, run.stderr[-500:]
    rows = [line.split(" | ")[:3] for line in run.stdout.splitlines() if line.startswith(("| unpruned", "| heads"))]
    assert rows == [["| unpruned", "2", "none (no MoE layer)"], ["| heads -50%", "1", "none (no MoE layer)"]]


def test_quantized_checkpoints_are_loaded_as_saved_and_their_folder_removed(tmp_path, monkeypatch):
    """bench/quantize.py left every run's checkpoints in a bench_quantize_* folder of /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    seekstack.save_pretrained(micro_model(), tmp_path / "model")
    bfloat16, int8 = seekstack.load_pretrained(tmp_path / "model").to(torch.bfloat16), micro_model()
    quantize_model(int8, QuantConfig(scheme="int8"))
    loaded, disk = quantize.saved_and_loaded({"bfloat16": bfloat16, "int8": copy.deepcopy(int8)})
    assert list((tmp_path / "tmp").iterdir()) == []
    for name, model in {"bfloat16": bfloat16, "int8": int8}.items():
        saved, read = model.state_dict(), loaded[name].state_dict()
        assert all(read[key].dtype == saved[key].dtype and torch.equal(read[key], saved[key]) for key in saved)
        assert disk[name] > 0
    assert disk["bfloat16"] > disk["int8"]


def test_pruned_checkpoints_folder_is_removed(tmp_path, monkeypatch):
    """bench/prune.py left every run's pruned checkpoints (52 MB at the demo) in a bench_prune_* folder of /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model = micro_model()
    seekstack.save_pretrained(model, tmp_path / "model")
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    args = argparse.Namespace(model=str(tmp_path / "model"), heads=0.5, experts=0.0, heal_steps=0)
    models, disk = prune.pruned_models(model, gate_mass(model, [tokens]), head_importance(model, [tokens]), args)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert {name: m.config.num_attention_heads for name, m in models.items()} == {"unpruned": 2, "heads -50%": 1}
    assert disk["unpruned"] > disk["heads -50%"] > 0


def micro_model() -> seekstack.Transformer:
    """The micro model of `micro_model_and_shards` (2 heads, 2 groups of 2 routed experts), seeded."""
    from tests.train.test_loss_curve import MICRO_MODEL

    torch.manual_seed(0)
    return seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)).eval()


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
