"""`seekstack quantize` and `seekstack prune` end to end: a checkpoint in, a smaller checkpoint out that loads and
runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import seekstack
from seekstack.checkpoint import read_config, stored_float_dtype
from seekstack.cli import app
from seekstack.compress.heads import head_importance, prune_heads
from seekstack.compress.linear import Int4Weight, QuantizedLinear
from seekstack.compress.prune import gate_mass, prune_experts
from seekstack.compress.quality import held_out_batches
from seekstack.tokenizer import train_tokenizer
from tests.compress.test_quantized_model import INPUT_IDS, logits, model_for_tests
from tests.conftest import micro_config
from tests.support import fp8_block_warnings


def test_quantize_command_writes_a_smaller_checkpoint_that_loads_quantized(tmp_path):
    model = model_for_tests()
    seekstack.save_pretrained(model, tmp_path / "float")
    (tmp_path / "float" / "tokenizer.json").write_text("{}")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "int4"), "--scheme", "int4", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["bytes_after"] < report["bytes_before"]
    assert report["assignment"]["layers.0.self_attn.o_proj"] == "int4 g32"
    assert (tmp_path / "int4" / "tokenizer.json").exists()
    loaded = seekstack.load_pretrained(tmp_path / "int4")
    assert isinstance(loaded.layers[0].self_attn.o_proj, QuantizedLinear)
    assert isinstance(loaded.layers[0].self_attn.o_proj.qweight, Int4Weight)
    reference = logits(model, INPUT_IDS)
    assert ((logits(loaded, INPUT_IDS) - reference).norm() / reference.norm()).item() < 0.25


def test_quantize_command_names_a_wrong_scheme_and_a_missing_data_folder(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    wrong = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--scheme", "int3"]
    )
    assert wrong.exit_code == 2 and "Invalid value for '--scheme'" in wrong.output and "int3" in wrong.output
    for mode in ("--progressive", "--adaptive"):  # a missing companion option: a usage error (was exit 1), as click's
        no_data = CliRunner().invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), mode])
        assert no_data.exit_code == 2 and f"Error: {mode} needs --data: token shards" in no_data.output, no_data.output
        as_json = CliRunner().invoke(
            app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), mode, "--json"]
        )
        assert as_json.exit_code == 2 and json.loads(as_json.output)["error"]["message"].startswith(f"{mode} needs")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "options, expected, output",
    [
        (["--scheme", "int8", "--keep", "*"], "Invalid value for '--keep': '*' keeps in float every layer that int8",
         "a float copy of the checkpoint\n"),
        # fp8 rounds the 4 kv_b_proj it keeps through fp8 (the refusal said "a float copy" of this too)
        (["--scheme", "fp8", "--keep", "*.*", "--keep", "lm_head"], "'--keep': '*.*', 'lm_head' keep in float",
         "a float copy of the checkpoint but for its 4 kv_b_proj layers' weights, rounded through fp8\n"),
        (["--config", "config.json"], "field 'layers': '*' keeps in float every layer that int8 would quantize",
         "a float copy of the checkpoint\n"),
        # its suffix in capitals: read as JSON (it was refused: "expected a .yaml, .yml, .toml or .json file")
        (["--config", "config.JSON"], "field 'layers': '*' keeps in float every layer that int8 would quantize",
         "a float copy of the checkpoint\n"),
    ],
)  # fmt: skip
def test_a_quantize_that_quantizes_nothing_is_refused_naming_the_patterns_that_keep_every_layer(
    tmp_path, options, expected, output
):
    """`--keep '*'` exited 0 having written a float copy of the checkpoint ("37 kept"), where prune refuses a run
    that removes nothing."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    for name in ("config.json", "config.JSON"):
        (tmp_path / name).write_text(json.dumps({"layers": {"*": "none"}}))
    options = [str(tmp_path / option) if option.startswith("config.") else option for option in options]
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), *options])
    assert result.exit_code == (1 if "--config" in options else 2), result.output
    assert expected in result.output
    assert f"nothing is left to quantize, and the output would be {output}" in result.output
    assert not (tmp_path / "q").exists()


def test_keeping_every_layer_of_a_quantized_checkpoint_in_float_dequantizes_it(tmp_path):
    """`--keep '*'` on a checkpoint stored int8 is the command's one way to write it in float (its dequantized weights):
    c0b5934's refusal of a quantization that quantizes nothing took it for a float copy and refused it too."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    quantized = CliRunner().invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q8")])
    assert quantized.exit_code == 0, quantized.output
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "q8"), "--out", str(tmp_path / "deq"), "--keep", "*"])
    assert result.exit_code == 0, result.output
    assert "layers stored int8 were written in float from the dequantized weights" in result.output
    stored = [safe_open(file, "pt").keys() for file in sorted((tmp_path / "q8").glob("*.safetensors"))]
    assert any("scale" in key for keys in stored for key in keys)  # the input holds its layers quantized
    written = [safe_open(file, "pt").keys() for file in sorted((tmp_path / "deq").glob("*.safetensors"))]
    assert written and not any("scale" in key for keys in written for key in keys)
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())


def test_prune_command_removes_heads_and_experts_and_healing_lowers_the_loss(tmp_path):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    model = seekstack.Transformer(seekstack.preset("tiny", **{**MICRO_MODEL, "n_routed_experts": 8})).eval()
    seekstack.save_pretrained(model, tmp_path / "float")
    result = CliRunner().invoke(
        app, ["prune", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "healed"),
              "--heads", "0.5", "--calibration-batches", "1", "--heal-steps", "2", "--heal-lr", "1e-2",
              "--heal-batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "layers.0.self_attn: removed heads" in result.output and "layers.1.mlp: removed experts" in result.output
    context = model.config.max_position_embeddings
    calibration = held_out_batches(str(tmp_path / "shards"), context, batches=1, split="train")
    prune_experts(model, gate_mass(model, calibration), 0.25)  # what the command did before healing
    prune_heads(model, head_importance(model, calibration), 0.5)
    healed = seekstack.load_pretrained(tmp_path / "healed").eval()
    assert healed.config.num_attention_heads == 1 and healed.config.n_routed_experts == 6
    batch = calibration[0]
    with torch.no_grad():
        assert healed(batch, labels=batch).lm_loss < model(batch, labels=batch).lm_loss - 0.05


def test_prune_stopped_while_healing_says_the_run_is_gone_and_writes_nothing(tmp_path, monkeypatch):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("seekstack.train.trainer._Run.train_step", interrupted)  # Ctrl-C in the healing's first step
    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    result = CliRunner().invoke(
        app, ["prune", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "healed"),
              "--heads", "0.5", "--calibration-batches", "1", "--heal-steps", "2"],
    )  # fmt: skip
    assert result.exit_code == 130 and "`seekstack prune` has no --resume; run it again" in result.output
    assert "saved" not in result.output and "continue with --resume" not in result.output  # not the trainer's hint
    assert not (tmp_path / "healed").exists()


HEALING_STOPPED_BY_SIGTERM = """
import os, signal, sys, time
from seekstack.cli import app
from seekstack.compress import heal

def terminated_as_healing_begins(*args, **kwargs):  # the pruned copy is written; the trainer has not begun
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

heal.heal = terminated_as_healing_begins
app(sys.argv[1:])
"""


def test_prune_ended_by_sigterm_before_healing_removes_its_temporary_folder(tmp_path):
    """SIGTERM after the pruned model was written for healing left that copy in /tmp for good."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    (tmp_path / "tmp").mkdir()
    ended = subprocess.run(
        [sys.executable, "-c", HEALING_STOPPED_BY_SIGTERM, "prune", str(tmp_path / "float"), "--data",
         str(tmp_path / "shards"), "--out", str(tmp_path / "healed"), "--heads", "0.5", "--calibration-batches", "1",
         "--heal-steps", "2"],
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ended.returncode == -signal.SIGTERM, ended.stderr
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "healed").exists()


def test_prune_says_what_a_fraction_rounds_to_and_refuses_one_that_removes_nothing(tmp_path):
    """A fraction that removes nothing was refused only after the model loaded and the calibration text ran through
    it (minutes for a real model): what it removes follows from the config alone, and it is refused before that, as
    one that leaves too few is (here before --data, which names no shards, is read)."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    config = read_config(tmp_path / "float")  # the config alone: no model to load
    heads, experts = config.num_attention_heads, config.n_routed_experts
    args = ["prune", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--calibration-batches", "1"]
    nothing = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "none"), "--heads", "0.01", "--experts", "0"])
    assert nothing.exit_code == 1
    assert f"nothing to remove: --heads 0.01 removed 0 of {heads} per layer" in nothing.output
    assert not (tmp_path / "none").exists()
    unread = ["prune", str(tmp_path / "float"), "--data", str(tmp_path / "no_shards"), "--out", str(tmp_path / "none")]
    nothing = CliRunner().invoke(app, [*unread, "--heads", "0", "--experts", "0.01"])
    assert nothing.exit_code == 1 and not (tmp_path / "none").exists()
    assert f"nothing to remove: --experts 0.01 removed 0 of {experts} per layer (0.0%)" in nothing.output
    rounded = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "some"), "--heads", "0.4", "--experts", "0"])
    assert rounded.exit_code == 0, rounded.output
    removed = round(heads * 0.4)
    assert f"note: --heads 0.4 removed {removed} of {heads} per layer ({removed / heads:.1%})" in rounded.output


@pytest.mark.parametrize(
    "options, message",
    [
        (["--heads", "1.0", "--experts", "0.25"], "pruning 1 of the attention heads leaves none of 2 per layer: prune "
         "0.5 of them or less"),
        (["--experts", "1.0"], "pruning 1 of the routed experts leaves 0 of 2 in each of the 2 routing groups, too "
         "few for the model's routing (none left)"),
    ],
)  # fmt: skip
def test_prune_refuses_a_fraction_that_leaves_too_few_before_calibrating(tmp_path, monkeypatch, options, message):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    def calibration(*_args):
        raise AssertionError("calibrated before refusing the fraction")

    monkeypatch.setattr("seekstack.compress.prune.gate_mass", calibration)
    monkeypatch.setattr("seekstack.compress.heads.head_importance", calibration)
    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    args = ["prune", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "out")]
    refused = CliRunner().invoke(app, [*args, *options])
    assert refused.exit_code == 1 and not (tmp_path / "out").exists()
    assert f"error: {message}" in refused.output


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "--scheme", "int4"],
        ["quantize", "--progressive", "--data", "shards"],
        ["prune", "--data", "shards", "--experts", "0", "--heads", "0.5"],
    ],
)
def test_an_out_folder_holding_other_files_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch, command):
    """quantize and prune refused such an --out only when writing, after the whole quantization (hours, on a large
    model), calibration or healing, as eval and explain check their output folder first. --data names real shards, so
    the run would get past them to the model's load but for the check."""
    from tests.train.test_loss_curve import write_train_shard

    write_train_shard(tmp_path / "shards")  # its train split read as the val split too
    (tmp_path / "shards" / "val_index.json").write_bytes((tmp_path / "shards" / "train_index.json").read_bytes())
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("seekstack.checkpoint.load_pretrained", loaded)
    verb, *options = command
    options = [str(tmp_path / option) if option == "shards" else option for option in options]
    result = CliRunner().invoke(app, [verb, str(tmp_path / "float"), "--out", str(tmp_path / "out"), *options])
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'out'}: holds notes.txt besides the files this command writes" in result.output
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_prune_refuses_a_quantized_checkpoint_and_says_to_prune_the_float_one_first(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    runner = CliRunner()
    assert runner.invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "int8")]).exit_code == 0
    result = runner.invoke(
        app, ["prune", str(tmp_path / "int8"), "--data", str(tmp_path / "no_shards"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert f"{tmp_path / 'int8'} is quantized" in result.output and "prune the float checkpoint" in result.output


def test_prune_takes_a_checkpoint_whose_quantization_config_holds_fused_rotations_alone(tmp_path):
    """compressed-tensors writes a model rotated but not quantized (SpinQuant's or QuIP's rotations fused into its
    float weights) with a quantization_config of a transform_config alone; prune refused it as quantized."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.transform import TransformConfig

    from tests.test_quantized_checkpoint_damage import quip_transform_config
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    model = seekstack.Transformer(seekstack.preset("tiny", **{**MICRO_MODEL, "n_routed_experts": 8})).eval()
    seekstack.save_pretrained(model, tmp_path / "rotated")
    transforms = TransformConfig.model_validate(quip_transform_config("weight_input"))
    ModelCompressor(transform_config=transforms).update_config(str(tmp_path / "rotated"))
    result = CliRunner().invoke(
        app, ["prune", str(tmp_path / "rotated"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "out"),
              "--calibration-batches", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seekstack.load_pretrained(tmp_path / "out").config.n_routed_experts == 6


@pytest.mark.parametrize("mode", ["--progressive", "--adaptive"])
def test_progressive_and_adaptive_refuse_a_quantized_checkpoint_and_say_to_start_from_the_float_one(tmp_path, mode):
    """Their stages would be measured against the quantized model, every layer rounded a second time."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    runner = CliRunner()
    assert runner.invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "int4"),
                               "--scheme", "int4"]).exit_code == 0  # fmt: skip
    result = runner.invoke(
        app, ["quantize", str(tmp_path / "int4"), "--out", str(tmp_path / "out"), mode, "--data",
              str(tmp_path / "no_shards")],
    )  # fmt: skip
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    message = " ".join(result.output.split())
    assert f"{tmp_path / 'int4'} is quantized" in message
    assert f"run {mode} on the float checkpoint it was made from" in message


def test_calibration_and_healing_windows_stop_at_a_context_shorter_than_256_tokens(tmp_path, monkeypatch):
    """A window of 257 tokens would score positions past a 48-token model's max_position_embeddings (and the trainer
    refuses a healing seq_len past it)."""
    from seekstack.compress import quality
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    read, windows = quality.held_out_batches, []
    monkeypatch.setattr(quality, "held_out_batches", lambda *a, **k: windows.extend(read(*a, **k)) or windows)
    write_train_shard(tmp_path / "shards")
    short = seekstack.preset("tiny", **{**MICRO_MODEL, "n_routed_experts": 8, "max_position_embeddings": 48})
    seekstack.save_pretrained(seekstack.Transformer(short), tmp_path / "float")
    result = CliRunner().invoke(
        app, ["prune", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "pruned"),
              "--calibration-batches", "1", "--heal-steps", "1", "--heal-batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert windows and {tuple(batch.shape) for batch in windows} == {(8, 49)}


@pytest.mark.parametrize(
    "command",
    [
        ["prune", "--heads", "0.5", "--calibration-batches", "1", "--heal-steps", "1"],  # --experts 0.25: none of 2
        ["quantize", "--adaptive", "--budget-bits", "6"],
        ["quantize", "--progressive"],
    ],
)
def test_calibration_refuses_shards_of_another_tokenizer_before_calibrating_naming_both(tmp_path, monkeypatch, command):
    """prune, quantize --adaptive and --progressive read the shards' ids with the checkpoint's embeddings."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    def calibrated(*args, **kwargs):
        raise AssertionError("calibrated on shards of another tokenizer")

    monkeypatch.setattr("seekstack.compress.quality.held_out_batches", calibrated)
    write_train_shard(tmp_path / "shards")
    index = json.loads((tmp_path / "shards" / "train_index.json").read_text())
    index["tokenizer"]["path"] = str(tmp_path / "other" / "tokenizer.json")
    for split in ("train", "val"):
        (tmp_path / "shards" / f"{split}_index.json").write_text(json.dumps(index))
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    train_tokenizer(["def area(width, height):\n    return width * height\n"], 300, tmp_path / "float")
    result = CliRunner().invoke(
        app, [command[0], str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "out"),
              *command[1:]],
    )  # fmt: skip
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert (
        f"{tmp_path / 'shards'} was tokenized with {tmp_path / 'other' / 'tokenizer.json'}, not with "
        f"{tmp_path / 'float' / 'tokenizer.json'}, the tokenizer of checkpoint {tmp_path / 'float'}"
    ) in " ".join(result.output.split())


@pytest.mark.parametrize("heal_steps", ["0", "1"])
def test_prune_writes_a_bfloat16_checkpoint_in_bfloat16(tmp_path, heal_steps):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    model = seekstack.Transformer(seekstack.preset("tiny", **{**MICRO_MODEL, "n_routed_experts": 8}))
    seekstack.save_pretrained(model.to(torch.bfloat16), tmp_path / "bf16")
    result = CliRunner().invoke(
        app, ["prune", str(tmp_path / "bf16"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "pruned"),
              "--experts", "0.25", "--calibration-batches", "1", "--heal-steps", heal_steps, "--heal-batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert float(re.search(r"on disk, ([\d.]+)% of", result.output)[1]) < 100  # it shrank (float32: 150%)
    assert stored_float_dtype(tmp_path / "pruned") == torch.bfloat16
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["dtype"] == "bfloat16"


def test_prune_of_a_model_without_moe_layers_says_there_are_no_experts_to_remove(tmp_path):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    dense = {**MICRO_MODEL, "first_k_dense_replace": 2, "num_nextn_predict_layers": 0}
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **dense)), tmp_path / "dense")
    args = ["prune", str(tmp_path / "dense"), "--data", str(tmp_path / "shards"), "--calibration-batches", "1"]
    experts = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "experts"), "--experts", "0.25"])
    assert experts.exit_code == 1 and not (tmp_path / "experts").exists()
    assert "nothing to remove: the model has no MoE layers; nothing for --experts to remove" in experts.output
    heads = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "heads"), "--heads", "0.5"])
    assert heads.exit_code == 0, heads.output
    assert "note: the model has no MoE layers; nothing for --experts to remove" in heads.output
    assert "--experts 0.25 removed" not in heads.output
    assert seekstack.load_pretrained(tmp_path / "heads").config.num_attention_heads == 1


def test_prune_notes_a_deepseek_v2_head_count_transformers_refuses_and_the_counts_it_loads(tmp_path):
    from transformers import AutoConfig

    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    v2 = {**MICRO_MODEL, "model_type": "deepseek_v2", "num_attention_heads": 4, "scoring_func": "softmax"}
    v2 |= {"topk_method": "greedy", "n_group": 1, "norm_topk_prob": False, "num_nextn_predict_layers": 0}
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **v2)), tmp_path / "v2")
    args = ["prune", str(tmp_path / "v2"), "--data", str(tmp_path / "shards"), "--calibration-batches", "1"]
    three = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "three"), "--heads", "0.25", "--experts", "0"])
    assert three.exit_code == 0, three.output
    assert (
        "note: transformers 5.23 will not load this deepseek_v2 checkpoint: its DeepseekV2Config requires hidden_size "
        "(64) to be a multiple of num_attention_heads (3), which MLA does not need (seekstack loads it); for "
        "transformers keep a head count dividing 64: 2 (--heads 0.5), 1 (--heads 0.75)"
    ) in three.output
    with pytest.raises(Exception, match=r"hidden size \(64\) is not a multiple of the number of attention heads"):
        AutoConfig.from_pretrained(tmp_path / "three")
    assert seekstack.load_pretrained(tmp_path / "three").config.num_attention_heads == 3
    two = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "two"), "--heads", "0.5", "--experts", "0"])
    assert two.exit_code == 0 and "will not load" not in two.output
    assert AutoConfig.from_pretrained(tmp_path / "two").num_attention_heads == 2


def test_a_quantized_head_is_written_with_its_mtp_copies_and_loads(tmp_path):
    model = model_for_tests()
    assert len(model.mtp) > 0  # the MTP module's copy of the head was what failed
    seekstack.save_pretrained(model, tmp_path / "float")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--keep", "layers.0.*"]
    )
    assert result.exit_code == 0, result.output
    loaded = seekstack.load_pretrained(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantizedLinear)
    reference = logits(model, INPUT_IDS)
    assert ((logits(loaded, INPUT_IDS) - reference).norm() / reference.norm()).item() < 0.05


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scheme", "foo"], "Invalid value for '--scheme': has value 'foo': input should be 'int8', 'int4' or 'fp8'"),
        (
            ["--scheme", "int4", "--group-size", "17"],
            "Invalid value for '--group-size': has value 17: input should be 32, 64, 128 or 256",
        ),
        (["--keep", "nomatch"], "Invalid value for '--keep': pattern 'nomatch' matches no layer of the model"),
    ],
)
def test_quantize_errors_name_the_option_at_fault(tmp_path, options, message):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), *options])
    assert result.exit_code == 2 and message in result.output  # a usage error, as the parser's own


def test_quantize_errors_of_the_config_file_name_its_field(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    (tmp_path / "quant.yaml").write_text("scheme: foo\n")
    args = ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--config", str(tmp_path / "quant.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "quant.yaml: field 'scheme' has value 'foo'" in result.output


@pytest.mark.parametrize(
    "config, message",
    [
        ("scheme: int8\ngroup_size: 64\n", "group_size 64 applies to int4 (the scheme is int8)"),
        ("scheme: int4\nfp8_block: [64, 64]\n", "fp8_block (64, 64) applies to fp8 (the scheme is int4)"),
        (
            "scheme: fp8\nfp8_block: [1, 1]\n",
            "field 'fp8_block' must be a block of more than 1 weight for float32 weights",
        ),
        ("layers:\n  nomatch: int4\n", "field 'layers': pattern 'nomatch' matches no layer of the model"),
    ],
)
def test_a_config_file_field_the_scheme_or_the_checkpoint_refuses_is_refused_naming_the_file(tmp_path, config, message):
    """Fields weighed against the scheme, and those weighed against the checkpoint once it is read (fp8_block against
    its float dtype, a pattern against its layers), alike."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    (tmp_path / "quant.yaml").write_text(config)
    args = ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--config", str(tmp_path / "quant.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and not (tmp_path / "q").exists()
    assert f"error: {tmp_path / 'quant.yaml'}: {message}" in " ".join(result.output.split())


def test_progressive_names_the_config_file_whose_pattern_matches_no_layer_as_a_quantization_does(tmp_path):
    """--progressive said "error: field 'keep': pattern 'nothing.*' matches no layer", naming no file."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    (tmp_path / "shards" / "val_index.json").write_bytes((tmp_path / "shards" / "train_index.json").read_bytes())
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    (tmp_path / "quant.yaml").write_text("keep: ['nothing.*']\n")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--config",
              str(tmp_path / "quant.yaml"), "--progressive", "--data", str(tmp_path / "shards")],
    )  # fmt: skip
    assert result.exit_code == 1 and not (tmp_path / "q").exists()
    assert f"error: {tmp_path / 'quant.yaml'}: field 'keep': pattern 'nothing.*' matches no layer" in result.output


@pytest.mark.parametrize(
    ("interrupted_in", "command"),
    [
        ("seekstack.compress.quality.measure", ["quantize", "--progressive"]),
        ("seekstack.compress.heads.head_importance", ["prune", "--heads", "0.5", "--calibration-batches", "1"]),
    ],
)
def test_quantize_and_prune_interrupted_before_writing_say_so_and_that_nothing_was_written(
    tmp_path, monkeypatch, interrupted_in, command
):
    """Ctrl-C during --progressive's measuring or prune's calibration (minutes on a real model) ended the command
    with exit 130 and no word, where train and prune's healing say what became of their output."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(interrupted_in, interrupted)
    write_train_shard(tmp_path / "shards")
    (tmp_path / "shards" / "val_index.json").write_bytes((tmp_path / "shards" / "train_index.json").read_bytes())
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    result = CliRunner().invoke(
        app, [command[0], str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--data", str(tmp_path / "shards"),
              *command[1:]],
    )  # fmt: skip
    assert result.exit_code == 130 and not (tmp_path / "q").exists()
    assert result.stderr.endswith(f"error: interrupted (Ctrl-C): nothing was written to {tmp_path / 'q'}\n")


@pytest.mark.parametrize("config", ["scheme: fp8\n", "scheme: fp8\nlayers:\n  layers.*.mlp.experts: fp8\n"])
def test_progressive_refuses_an_fp8_config_file_naming_it_before_measuring(tmp_path, config):
    """Its stages are int8 and int4: the fp8 scheme was ignored, and fp8 layers failed at the int8 stage."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    (tmp_path / "quant.yaml").write_text(config)
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--config",
              str(tmp_path / "quant.yaml"), "--progressive", "--data", str(tmp_path / "no_shards")],
    )  # fmt: skip
    assert result.exit_code == 1 and not (tmp_path / "q").exists()
    message = " ".join(result.output.split())
    assert f"{tmp_path / 'quant.yaml'}: fp8 applies to a quantization without --progressive" in message


def test_quantize_refuses_a_keep_pattern_that_names_no_layer_and_takes_checkpoint_names(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    base = ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q")]
    result = CliRunner().invoke(app, [*base, "--keep", "nosuchlayer"])
    assert result.exit_code == 2 and "pattern 'nosuchlayer' matches no layer of the model" in result.output
    assert "layers.0.self_attn" in result.output and not (tmp_path / "q").exists()
    result = CliRunner().invoke(app, [*base, "--keep", "model.layers.*.mlp.experts", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["assignment"]["layers.1.mlp.experts"] == "kept"


def test_an_empty_keep_keeps_no_layer_but_the_always_kept_and_quantizes_the_head(tmp_path):
    """A repeatable option cannot be emptied on the command line: `--keep ''` says "replace the default with none"."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--keep", "",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assignment = json.loads(result.output)["assignment"]
    assert assignment["lm_head"] == "int8"
    assert {name for name, how in assignment.items() if how == "kept"} == {
        "layers.0.self_attn.kv_b_proj", "layers.1.self_attn.kv_b_proj", "layers.2.self_attn.kv_b_proj",
        "mtp.0.block.self_attn.kv_b_proj",
    }  # fmt: skip
    assert isinstance(seekstack.load_pretrained(tmp_path / "q").lm_head, QuantizedLinear)


def test_an_empty_keep_with_fp8_still_keeps_the_head_in_float_as_deepseeks_fp8_release(tmp_path):
    """vLLM builds a DeepSeek fp8 head unquantized and transformers reads it as a plain layer: an fp8 head with a
    weight_scale_inv would be misread by both, so fp8 keeps lm_head (and the MTP eh_proj) whatever --keep says."""
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--scheme",
                                      "fp8", "--keep", "", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assignment = json.loads(result.output)["assignment"]
    assert {name for name, how in assignment.items() if how == "kept"} == {"lm_head", "mtp.0.eh_proj"}
    assert assignment["layers.0.self_attn.o_proj"] == "fp8"
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as stored:
        head = [(key, stored.get_slice(key).get_dtype()) for key in stored.keys() if key.startswith("lm_head.")]
    assert head == [("lm_head.weight", "F32")]
    assert type(seekstack.load_pretrained(tmp_path / "q").lm_head) is torch.nn.Linear


@pytest.mark.parametrize(
    ("block", "warned"),
    [([128, 128], []), ([64, 64], ["weight_block_size [64, 64] does not divide model.layers.0.mlp.down_proj.weight"])],
)
def test_quantize_to_fp8_warns_of_blocks_transformers_reads_otherwise_and_notes_no_weight_within_a_block(
    tmp_path, block, warned
):
    """A weight smaller than one block (every layer of the test model at 128x128) was noted as one transformers 5.23
    reads in other blocks, though its one scale makes its block the weight, as transformers takes it; a block that
    splits a weight unevenly is warned about, as save_pretrained warns."""
    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path / "float")
    (tmp_path / "quant.yaml").write_text(f"scheme: fp8\nfp8_block: {block}\n")
    args = ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--config", str(tmp_path / "quant.yaml")]
    result, messages = fp8_block_warnings(lambda: CliRunner().invoke(app, args))
    assert result.exit_code == 0, result.output
    assert "note: " not in result.output
    assert [message.split(" of shape")[0].removeprefix(f"{tmp_path / 'q'}: ") for message in messages] == warned


def test_quantize_refuses_bad_tolerances_and_budgets_and_adaptive_with_fixed_schemes(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    base = ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--data", str(tmp_path)]
    for extra, message in (
        (["--progressive", "--max-bpb-increase", "-1"], "'--max-bpb-increase': -1.0: must be a number >= 0"),
        (["--progressive", "--max-kl", "nan"], "'--max-kl': nan: must be a number >= 0"),
        (["--adaptive", "--budget-bits", "nan"], "'--budget-bits': nan: must be a number > 0"),
        (["--adaptive", "--keep", "lm_head"], "--adaptive chooses every layer's scheme itself"),
        (["--adaptive", "--scheme", "int4"], "--adaptive chooses every layer's scheme itself: --scheme, --group-size"),
        (["--adaptive", "--group-size", "128"], "--adaptive chooses every layer's scheme itself"),
        (["--adaptive", "--budget-bits", "4"], "'--budget-bits': 4.0: below the smallest option (int4 g128: 4.125"),
        (["--budget-bits", "3"], "--budget-bits applies to --adaptive only"),  # each was ignored: plain int8 written
        (["--adaptive", "--max-kl", "0.1"], "--max-kl applies to --progressive only"),
        (["--progressive", "--scheme", "fp8"], "--scheme applies to a quantization without --progressive"),
        ([], "--data applies to --progressive or --adaptive only"),
        (["--progressive", "--adaptive"], "choose --progressive or --adaptive, not both"),
    ):  # usage errors, as click's (were exit 1)
        result = CliRunner().invoke(app, [*base, *extra, "--json"])
        assert result.exit_code == 2 and message in json.loads(result.output)["error"]["message"], result.output
    result = CliRunner().invoke(app, [*base[:4], "--scheme", "int8", "--group-size", "64"])
    assert result.exit_code == 2 and "--group-size 64 applies to int4 (the scheme is int8)" in result.output
    assert not (tmp_path / "q").exists()


def test_prune_names_a_fraction_or_learning_rate_out_of_range_by_its_value(tmp_path):
    """typer's own range named no value, and refused --experts nan as "Input should be less than or equal to 1"."""
    base = ["prune", str(tmp_path / "float"), "--out", str(tmp_path / "p"), "--data", str(tmp_path)]
    for option, value, problem in [("--experts", "nan", "nan: must be a number >= 0 and <= 1"),
                                   ("--heads", "1.5", "1.5: must be a number >= 0 and <= 1"),
                                   ("--heal-lr", "nan", "nan: must be a number >= 0"),
                                   ("--heal-lr", "-1", "-1.0: must be a number >= 0")]:  # fmt: skip
        result = CliRunner().invoke(app, [*base, option, value])
        assert result.exit_code == 2 and f"Invalid value for '{option}': {problem}" in result.stderr, result.output


def quantize_adaptive_without_measuring(tmp_path, monkeypatch, budget_bits: str, why: str):
    """`quantize --adaptive --budget-bits BUDGET` on a micro model, failing the test if any layer is measured."""
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    def measuring(*_args, **_kwargs):
        raise AssertionError(f"measured {why}")

    monkeypatch.setattr("seekstack.compress.adaptive.sensitivities", measuring)
    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    return CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--adaptive", "--budget-bits",
              budget_bits, "--data", str(tmp_path / "shards")],
    )  # fmt: skip


def test_adaptive_refuses_a_budget_its_layer_shapes_cannot_meet_before_measuring(tmp_path, monkeypatch):
    result = quantize_adaptive_without_measuring(tmp_path, monkeypatch, "4.2", "before refusing the budget")
    assert result.exit_code == 1 and not (tmp_path / "q").exists()
    message = " ".join(result.output.split())
    assert "error: a budget of 4.2 bits per weight is below the smallest assignment (4.601 bits per weight" in message


def test_adaptive_measures_no_layer_when_the_budget_allows_each_its_widest_option(tmp_path, monkeypatch):
    result = quantize_adaptive_without_measuring(tmp_path, monkeypatch, "100", "though int8 fits everywhere")
    assert result.exit_code == 0, result.output
    assert "a budget of 100.0 bits per weight allows each layer its widest option (int8 where" in result.output
    layers = [line.split() for line in result.output.splitlines() if line.startswith("layers.")]
    assert layers and all(line[1:] == ["int8"] for line in layers), result.output


def test_adaptive_text_output_prints_kl_options_with_digits_enough_to_tell_them_apart(tmp_path, monkeypatch):
    import seekstack.cli.compress as compress

    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    kl = {"int4-g128": 1.0841e-3, "int4-g64": 1.0812e-3, "int4-g32": 1.0796e-3, "int8": 1.0773e-3}

    def measured(model, out, data, budget_bits):  # the calibration's result, without its minute of CPU
        seekstack.save_pretrained(model_for_tests(), out)
        return {"layers": [{"name": "layers.0.mlp.down_proj", "choice": "int8", "kl": kl, "bits": 8.0}],
                "average_bits": 4.5, "assignment": {}}  # fmt: skip

    monkeypatch.setattr(compress, "_adaptive", measured)
    command = ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--adaptive", "--data", str(tmp_path)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "int4-g128 0.001084  int4-g64 0.001081  int4-g32 0.00108  int8 0.001077" in result.output


def test_adaptive_runs_the_reference_model_once_per_batch_and_says_each_layer_it_has_measured(tmp_path, monkeypatch):
    """The reference's log-probabilities do not change between the ~100 trials of a model: computed once (each
    trial ran it again, a third of its time), and no second copy of the model loaded to compute them."""
    from seekstack.compress import adaptive, quality
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    forward, measure, forwards, measured = seekstack.Transformer.forward, quality.measure, [], []
    monkeypatch.setattr(seekstack.Transformer, "forward", lambda *a, **k: forwards.append(1) or forward(*a, **k))
    monkeypatch.setattr(
        quality, "measure", lambda m, r, batches, *a: measured.append(len(batches)) or measure(m, r, batches, *a)
    )
    names = ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]
    monkeypatch.setattr(adaptive, "measured_layers", lambda model: names)
    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--adaptive", "--data",
              str(tmp_path / "shards"), "--budget-bits", "6"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    batches = measured[0]
    assert len(set(measured)) == 1 and len(forwards) == batches * (len(measured) + 1)  # each trial's + the reference
    progress = [line for line in result.stderr.splitlines() if line.startswith("measured ")]
    assert [line.split(":")[0] for line in progress] == [f"measured 1/2 {names[0]}", f"measured 2/2 {names[1]}"]
    assert "int4-g32 " in progress[0] and "int8 " in progress[0]


def test_quantize_text_output_gives_the_reasons_layers_were_kept_or_took_a_smaller_group_with_their_counts(tmp_path):
    seekstack.save_pretrained(model_for_tests(), tmp_path / "float")
    result = CliRunner().invoke(
        app,
        ["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--scheme", "int4", "--group-size", "64"],
    )
    assert result.exit_code == 0, result.output
    assert "layers: 7 int4 g32, 25 int4 g64, 5 kept\n" in result.output, result.output
    assert "  7 int4 g32 instead: 32 input features are not a multiple of the group size 64\n" in result.output
    assert "  4 kept: kv_b_proj, which MLA's absorbed attention multiplies as a float matrix\n" in result.output
    assert "  1 kept: by default or by --keep\n" in result.output  # lm_head


def test_progressive_names_the_stage_it_chose_and_writes_that_stage(tmp_path):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")  # its train split read as the val split too
    (tmp_path / "shards" / "val_index.json").write_bytes((tmp_path / "shards" / "train_index.json").read_bytes())
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "q"),
              "--progressive", "--max-bpb-increase", "0.001", "--max-kl", "1e-6"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    verdicts = re.findall(r"^stage (\w+) .* of tensors  (pass|fail)$", result.output, re.MULTILINE)  # headers aside
    passed = [name for name, verdict in verdicts if verdict == "pass"]
    assert passed and len(passed) < 4  # the KL gate stops it before int4
    # the KL each stage is gated on, as printed, says why it passed (a KL of 4e-7 was printed 0.00000, as float32's)
    kls = dict(re.findall(r"^stage (\w+) .*  KL (\S+)  top-1", result.output, re.MULTILINE))
    assert [name for name, kl in kls.items() if float(kl) == 0] == ["float32"]
    assert all((float(kls[name]) <= 1e-6) == (name in passed) for name, _ in verdicts)
    assert f"chosen: {passed[-1]}, the smallest stage that passed" in result.output
    assert stored_float_dtype(tmp_path / "q") == (torch.float32 if passed[-1] == "float32" else torch.bfloat16)


def test_progressive_takes_a_group_size_for_its_int4_stage(tmp_path):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    (tmp_path / "shards" / "val_index.json").write_bytes((tmp_path / "shards" / "train_index.json").read_bytes())
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    int4_bytes = {}
    for group in ("32", "64"):
        result = CliRunner().invoke(
            app, ["quantize", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out",
                  str(tmp_path / f"g{group}"), "--progressive", "--max-bpb-increase", "10", "--max-kl", "100",
                  "--group-size", group, "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        stages = json.loads(result.output[result.output.index("{") :])["stages"]
        int4_bytes[group] = next(stage["bytes"] for stage in stages if stage["name"] == "int4")
    assert int4_bytes["32"] != int4_bytes["64"]  # the int4 stage is quantized at the group asked for


def test_progressive_on_a_bfloat16_checkpoint_starts_at_bfloat16_and_never_writes_it_larger(tmp_path):
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    write_train_shard(tmp_path / "shards")
    (tmp_path / "shards" / "val_index.json").write_bytes((tmp_path / "shards" / "train_index.json").read_bytes())
    model = seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)).to(torch.bfloat16)
    seekstack.save_pretrained(model, tmp_path / "bf16")
    result = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "bf16"), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "q"),
              "--progressive", "--max-kl", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    verdicts = re.findall(r"^stage (\w+) .* of tensors  (pass|fail)$", result.output, re.MULTILINE)  # headers aside
    assert verdicts == [("bfloat16", "pass"), ("int8", "fail")]
    assert "chosen: bfloat16, the smallest stage that passed" in result.output
    assert stored_float_dtype(tmp_path / "q") == torch.bfloat16
    assert "100.0% of" in result.output
