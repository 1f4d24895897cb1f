"""The `seekstack` command line: figures it prints come from the library, errors are one clear line."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seekstack.accounting import (
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    main_parameters,
    mtp_checkpoint_parameters,
)
from seekstack.checkpoint import load_pretrained, save_pretrained
from seekstack.cli import app
from seekstack.cli.common import model_config
from seekstack.config import preset
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError
from seekstack.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer
from tests.infer.support import model_dir

runner = CliRunner()


def interrupted(*args, **kwargs):
    """A stand-in for a slow call that the user stops with Ctrl-C."""
    raise KeyboardInterrupt


def run(*args: str):
    """Invoke the CLI with plain output wide enough that rich wraps no table cell."""
    return runner.invoke(app, list(args), env={"COLUMNS": "120", "FORCE_COLOR": None})


def lm_loss(output: str) -> float:
    return float(re.search(r"lm loss: ([\d.]+)", output).group(1))


def expert_load_rows(output: str) -> dict[str, list[int]]:
    """Rows of the expert-load table: layer label -> tokens per expert."""
    rows = re.findall(r"│\s*(\d+(?: \(MTP\))?)\s*│\s*[\d.]+\s*│\s*([\d ]+?)\s*│", output)
    return {layer: [int(n) for n in counts.split()] for layer, counts in rows}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return save_pretrained(Transformer(preset("tiny")), tmp_path / "tiny")


def test_version_prints_the_package_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"seekstack {version('seekstack')}"


def test_info_prints_deepseek_v3_parameters_flops_and_cache_bytes():
    result = run("info", "deepseek-v3")
    assert result.exit_code == 0, result.output
    config = preset("deepseek-v3")
    cache = kv_cache_bytes_per_token(config, torch.bfloat16)
    assert "671.03B (671,026,404,352)" in result.output
    assert f"{main_parameters(config).activated:,}" in result.output
    assert f"{mtp_checkpoint_parameters(config):,}" in result.output
    assert "forward FLOPs/token, context 4096" in result.output
    assert f"{forward_flops_per_token(config, 4096) / 1e9:.2f} GFLOP" in result.output
    assert f"{cache.latent:,} B" in result.output and f"{cache.mha:,} B" in result.output
    assert "71.1x" in result.output
    assert "61 (3 dense, 58 MoE)" in result.output


def test_info_context_option_sets_the_flops_context():
    result = run("info", "tiny", "--context", "128")
    assert result.exit_code == 0, result.output
    assert "context 128" in result.output
    assert f"{forward_flops_per_token(preset('tiny'), 128) / 1e6:.2f} MFLOP" in result.output


def test_info_reads_the_config_json_of_a_checkpoint_directory(tmp_path):
    config = preset("small")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    result = run("info", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"{main_parameters(config).total:,}" in result.output


def test_a_run_folder_stands_for_its_newest_complete_checkpoint(tmp_path):
    """info, forward, generate, serve, quantize, prune, pass-at-k, traces and lora take a run's out_dir as
    eval, explain, sample and report do: its newest checkpoint, named on stderr."""
    for step, layers in ((3, 2), (10, 4), (12, 6), (14, 6)):
        checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text(json.dumps(preset("small").replace(num_hidden_layers=layers).to_dict()))
        if step != 12:  # step_12 is still being written: no train state yet
            (checkpoint / "train_state.pt").write_bytes(b"")
        if step != 14:  # step_14's weights were deleted
            (checkpoint / "model.safetensors").write_bytes(b"")
    result = run("info", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert (
        f"using the run's newest checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step_10'}; passed over step_12 (no "
        "train_state.pt), step_14 (no model.safetensors), incomplete"
    ) in result.stderr
    assert "4 (1 dense, 3 MoE)" in result.stdout

    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    result = run("info", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert f"{tmp_path / 'empty'}: no checkpoint" in result.output

    (tmp_path / "cut" / "checkpoints" / "step_5").mkdir(parents=True)  # a save cut short: no train state
    result = run("info", str(tmp_path / "cut"))
    assert result.exit_code == 2
    assert "no complete checkpoint: step_5 (no train_state.pt, config.json, model.safetensors) under" in result.output


def test_under_torchrun_rank_0_alone_names_the_checkpoint_a_run_folder_stands_for(tmp_path, torchrun_environment):
    """lora train's BASE, a run under torchrun, had every rank print the newest checkpoint and the incomplete step
    folders passed over, where the trainer's own notes come from rank 0 alone."""
    for step, files in ((3, ("train_state.pt", "model.safetensors")), (6, ("train_state.pt",))):
        (tmp_path / "run" / "checkpoints" / f"step_{step}").mkdir(parents=True)
        for name in files:
            (tmp_path / "run" / "checkpoints" / f"step_{step}" / name).write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "step_3" / "config.json").write_text(json.dumps(preset("small").to_dict()))
    note = (
        f"{tmp_path / 'run'}: using the run's newest checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step_3'}; "
        "passed over step_6 (no config.json, model.safetensors), incomplete"
    )
    command = ["lora", "train", str(tmp_path / "run"), str(tmp_path / "no_data"), "--out", str(tmp_path / "lora")]
    said = {}
    for rank in (0, 1):
        torchrun_environment(rank)  # each rank stops where the ranks would join
        said[rank] = runner.invoke(app, command).stderr
    assert note in said[0].splitlines()
    assert "using the run's newest checkpoint" not in said[1]
    assert said[1].startswith("error (rank 1): WORLD_SIZE=2 is set but MASTER_ADDR")


@pytest.mark.parametrize(
    "command", [["eval", "{run}"], ["explain", "{run}", "x"], ["sample", "{run}"], ["info", "{run}"]]
)
def test_a_run_that_has_saved_no_checkpoint_yet_is_named_so(tmp_path, command):
    """A run's out_dir before its first save holds train_config.json and metrics.jsonl: it is named as a run without
    a checkpoint yet (it was read as a model folder missing its config.json, or, once a save landed during the
    command, as the folder of a model it never recorded)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_config.json").write_text("{}")
    result = run(*(part.format(run=run_dir) for part in command))
    assert result.exit_code == 2
    assert f"{run_dir}: the run has saved no checkpoint yet" in " ".join(result.output.split())
    assert "config.json: no such file" not in result.output


@pytest.mark.parametrize(
    ("command", "named"),
    [(["data", "tokenize", "--corpus", "{url}", "--tokenizer", "t"], "'--corpus'"),
     (["tokenizer", "train", "--corpus", "{url}"], "'--corpus'"), (["info", "{url}"], "'MODEL'"),
     (["data", "build", "{url}"], "'INPUTS...'"), (["train", "{url}"], "'CONFIG'")],
)  # fmt: skip
def test_a_url_given_for_a_path_is_refused_as_given_saying_nothing_is_downloaded(command, named):
    """`data tokenize --corpus hf://datasets/a/b` was told "hf:/datasets/a/b/train.jsonl: no such file; build the
    corpus from your text first (`seekstack data build TEXT --out hf:/datasets/a/b`)", the URL's "//" collapsed by
    Path, where `data build hf://...` says that nothing is downloaded; data build's refusal exited 1, not 2 as every
    other refused argument, and `train hf://...` read its config at "hf:/..." ("no such file")."""
    url = "hf://datasets/HuggingFaceFW/fineweb-edu"
    result = runner.invoke(app, [part.format(url=url) for part in command])
    assert result.exit_code == 2
    assert f"Invalid value for {named}: {url}: a URL, and seekstack takes local files and folders (nothing is " in (
        " ".join(result.stderr.split())
    )


@pytest.mark.parametrize("command", [["explain", "{model}", "def f("], ["eval", "{model}"]])
def test_a_checkpoint_that_is_not_there_is_named_before_its_tokenizer_or_the_corpus(tmp_path, command):
    """explain named the folder's tokenizer.json ("nope/tokenizer.json: no such file; train a tokenizer into nope"),
    and eval the default --corpus it had not reached yet ("runs/demo/corpus/val.jsonl: no such file"), where the
    folder itself is missing, as generate and sample say it is; and eval, given a file, named the output folder it
    would have made in it ("afile: is a file, not a folder (on the way to afile/eval)")."""
    (tmp_path / "afile").write_text("")
    for name, problem in (("nope", "no such folder"), ("afile", "not a folder")):
        model = tmp_path / name
        result = runner.invoke(app, [part.format(model=model) for part in command])
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: {model}: {problem}; a checkpoint is a folder holding config.json")


@pytest.mark.parametrize(
    ("command", "starts"),
    [
        (["sample", "{run}"], "seekstack.eval.samples.demo_samples"),
        (["checkpoint", "export", "{run}", "--out", "exported"], "seekstack.train.state.export_checkpoint"),
        (["explain", "{run}", "--corpus", "corpus"], "seekstack.checkpoint.read_config"),  # read first
        (["eval", "{run}"], "seekstack.eval.evaluate.evaluate"),
    ],
)
def test_commands_reading_a_run_name_the_checkpoint_they_picked(tmp_path, monkeypatch, command, starts):
    """sample, checkpoint export, explain and eval say which checkpoint of a run they read, as generate and info do."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_4"
    checkpoint.mkdir(parents=True)
    for name in ("train_state.pt", "config.json", "model.safetensors"):  # what a complete checkpoint holds
        (checkpoint / name).write_bytes(b"")
    given = []
    monkeypatch.setattr(starts, lambda path, *args, **kwargs: given.append(Path(path)) or 1 / 0)
    result = runner.invoke(app, [part.format(run=tmp_path / "run") for part in command])
    assert f"using the run's newest checkpoint, {checkpoint}" in result.stderr
    assert given == [checkpoint]


def test_sample_names_a_sampling_value_out_of_range_by_its_option(tmp_path):
    """nan was refused by typer's own range as "Input should be greater than or equal to 0", naming no value, and
    --top-k -1, vLLM's off, which generate takes, was refused so too."""
    checkpoint = model_dir(tmp_path / "model")
    assert run("sample", str(checkpoint), "--top-k", "-1", "--max-new-tokens", "2").exit_code == 0
    for option, value, problem in [("--temperature", "200", "200.0: input should be less than or equal to 100"),
                                   ("--temperature", "nan", "nan: input should be a finite number"),
                                   ("--temperature", "-1", "-1.0: input should be greater than or equal to 0"),
                                   ("--top-k", "-5", "-5: input should be greater than or equal to -1"),
                                   ("--seed", str(2**64), f"{2**64}: input should be less than {2**64}")]:  # fmt: skip
        result = run("sample", str(checkpoint), option, value, "--max-new-tokens", "2")
        assert result.exit_code == 2  # a usage error, as the parser's own refusals
        assert f"Invalid value for '{option}': has value {problem}" in result.stderr


def test_prune_stopped_while_healing_says_it_was_interrupted_as_every_command_does(tmp_path, monkeypatch):
    """Ctrl-C while prune healed said "error: the healing run was in a temporary folder, ...", its own words, where
    every other command's Ctrl-C opens "error: interrupted (Ctrl-C)"."""
    import seekstack
    from tests.train.test_loss_curve import MICRO_MODEL, write_train_shard

    monkeypatch.setattr("seekstack.compress.heal.heal", interrupted)
    write_train_shard(tmp_path / "shards")
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **MICRO_MODEL)), tmp_path / "float")
    out = tmp_path / "healed"
    result = run("prune", str(tmp_path / "float"), "--data", str(tmp_path / "shards"), "--out", str(out), "--heads",
                 "0.5", "--calibration-batches", "1", "--heal-steps", "2")  # fmt: skip
    assert result.exit_code == 130
    assert "error: interrupted (Ctrl-C): the healing run was in a temporary folder, removed" in result.stderr
    assert "`seekstack prune` has no --resume" in result.stderr and not out.exists()


def test_report_interrupted_while_sampling_says_its_page_was_not_written(tmp_path, monkeypatch):
    """Ctrl-C while report generated its samples ended it with exit 130 and no word, where sample says so."""

    from seekstack.train.runs import TRAIN_STATE_FILE

    monkeypatch.setattr("seekstack.eval.report._samples", interrupted)
    run_dir = tmp_path / "run"
    torch.save({}, model_dir(run_dir / "checkpoints" / "step_1") / TRAIN_STATE_FILE)  # a complete checkpoint
    (run_dir / "train_config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
    result = run("report", str(run_dir), "--out", str(tmp_path / "page"))
    assert result.exit_code == 130
    assert result.stderr.endswith(
        f"error: interrupted (Ctrl-C): {tmp_path / 'page' / 'report.md'} was not written (its samples, made last, "
        "take the longest: --no-samples leaves them out)\n"
    )
    assert not (tmp_path / "page" / "report.md").exists()


def test_checkpoint_export_interrupted_says_nothing_was_written(tmp_path, monkeypatch):
    """Ctrl-C while checkpoint export copied a model ended it with exit 130 and no word."""

    monkeypatch.setattr("seekstack.train.state.export_checkpoint", interrupted)
    result = run("checkpoint", "export", str(model_dir(tmp_path / "model")), "--out", str(tmp_path / "export"))
    assert result.exit_code == 130
    assert result.stderr == f"error: interrupted (Ctrl-C): nothing was written to {tmp_path / 'export'}\n"


def test_explain_interrupted_says_what_it_left_in_out(tmp_path, monkeypatch):
    """Ctrl-C while explain loaded the model or read the corpus's routing, or while it wrote its files, ended it with
    exit 130 and no word."""

    model, out = model_dir(tmp_path / "model"), tmp_path / "explained"
    monkeypatch.setattr("seekstack.infer.engine.check_tokenizer_fits", interrupted)
    result = run("explain", str(model), "x", "--out", str(out))
    assert (result.exit_code, result.stderr) == (130, f"error: interrupted (Ctrl-C): nothing was written to {out}\n")
    monkeypatch.undo()
    monkeypatch.setattr("seekstack.eval.explain.explain_text", interrupted)
    result = run("explain", str(model), "x", "--out", str(out))
    assert result.exit_code == 130
    assert result.stderr == (
        f"error: interrupted (Ctrl-C): {out} may mix this explain's files with an earlier one's: run it again\n"
    )


def test_eval_interrupted_says_its_results_were_not_written(tmp_path, monkeypatch):
    """Ctrl-C in the minutes eval runs lm-evaluation-harness ended it with exit 130 and no word."""

    monkeypatch.setattr("seekstack.eval.evaluate.evaluate", interrupted)
    out = tmp_path / "scores" / "results"
    result = run("eval", str(model_dir(tmp_path / "model")), "--tasks", "code_cloze", "--out", str(out))
    assert result.exit_code == 130
    assert result.stderr == f"error: interrupted (Ctrl-C) before the evaluation ended: {out}.json was not written\n"


def test_sample_interrupted_says_so_and_exits_130(tmp_path, monkeypatch):
    """Ctrl-C while sample generated ended it with exit 130 and no word, where generate and the data commands say so."""

    monkeypatch.setattr("seekstack.eval.samples.demo_samples", interrupted)
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    result = run("sample", str(checkpoint), "--prompt", "def f")
    assert result.exit_code == 130
    assert result.stderr == (
        "error: interrupted (Ctrl-C) before any sample was printed: the prompts' continuations are generated together\n"
    )


def test_sample_on_a_terminal_lacking_a_character_of_the_text_writes_it_as_generate_does(tmp_path, monkeypatch):
    """sample's Chinese prompt and continuations on a Latin-1 stdout (a Windows cp1252 file) ended in a traceback,
    "UnicodeEncodeError: 'latin-1' codec can't encode characters", where generate writes '?' and a note."""
    monkeypatch.setattr("seekstack.eval.samples.demo_samples", lambda *args, **kwargs: [("你好", "，世界", "。")])
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    result = CliRunner(charset="latin-1").invoke(app, ["sample", str(checkpoint), "--prompt", "你好"])
    assert result.exit_code == 0, result.exception
    assert result.stdout == "----- prompt '??'\n[greedy]\n?????\n[sampled, T=0.8, top-k 50]\n???\n\n"
    assert result.stderr.startswith("note: standard output's encoding, latin-1, cannot write every character")


@pytest.mark.parametrize(
    ("command", "interrupted_in"),
    [
        (["data", "build", "{corpus}/train.jsonl"], "seekstack.corpus.build.build_corpus"),
        (["data", "tokenize", "--corpus", "{corpus}", "--tokenizer", "tok"], "seekstack.tokenizer.Tokenizer.from_file"),
        (["data", "quality-train", "--reference", "r", "--pool", "p"], "seekstack.corpus.sources.open_sources"),
        (["data", "select", "--corpus", "{corpus}", "--model", "q.npz", "--top-fraction", "0.5"],
         "seekstack.corpus.quality.QualityModel.load"),
        (["tokenizer", "train", "--corpus", "{corpus}"], "seekstack.tokenizer.train_tokenizer"),
    ],
)  # fmt: skip
def test_data_and_tokenizer_commands_interrupted_say_so_and_that_nothing_was_written(
    tmp_path, monkeypatch, command, interrupted_in
):
    """Ctrl-C while `data build`, `tokenize`, `quality-train`, `select` or `tokenizer train` worked (minutes on a real
    corpus) ended them with exit 130 and no word, where quantize and prune say what became of their output."""

    monkeypatch.setattr(interrupted_in, interrupted)
    (tmp_path / "corpus").mkdir()
    for split in ("train", "val"):
        (tmp_path / "corpus" / f"{split}.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    out = tmp_path / "out"
    result = run(*(part.format(corpus=tmp_path / "corpus") for part in command), "--out", str(out))
    assert result.exit_code == 130 and not out.exists()
    assert result.stderr == f"error: interrupted (Ctrl-C): nothing was written to {out}\n"


@pytest.mark.parametrize(
    ("command", "value", "problem"),
    [
        (["forward", "tiny", "--seq-len"], "0", "0: input should be greater than or equal to 1"),
        (["forward", "tiny", "--seq-len"], "1.5", "1.5: input should be a valid integer, unable to parse string as an"),
        (["data", "quality-train", "--reference", "r", "--pool", "p", "--max-documents"], "-3", "-3: input should be"),
        (["keys", "create", "ann", "--rpm"], "0", "0: input should be greater than or equal to 1"),
    ],
)
def test_a_value_outside_an_options_type_or_range_is_refused_naming_the_value(command, value, problem):
    """typer's own check said "Invalid value for '--seq-len': Input should be greater than or equal to 1", naming no
    value, where click says "0 is not in the range x>=1" and argparse "invalid int value: '1.5'"."""
    result = run(*command, value)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{command[-1]}': has value {problem}" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("command", "value"),
    [(["forward", "tiny", "--seq-len"], "x" + "9" * 3000), (["data", "build", "--workers"], "9" * 3000)],
)
def test_a_refused_options_long_value_is_echoed_cut_to_its_start_and_length(command, value):
    """typer's check (--seq-len) and a callback's (--workers) echoed a 3,000-digit value whole."""
    result = run(*command, value)
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert f"Invalid value for '{command[-1]}': has value {value[:80]}... ({len(value):,} characters): " in message
    assert len(result.stderr) < 600


@pytest.mark.parametrize("command", [["pass-at-k", "{model}"], ["traces", "{model}", "--out", "{model}/t.jsonl"]])
def test_pass_at_k_and_traces_name_a_temperature_out_of_range_by_its_value_as_sample(tmp_path, command):
    """typer's own range let nan through to "Input should be greater than or equal to 0", naming no value."""
    command = [part.format(model=tmp_path / "model") for part in command]
    for value, problem in [("nan", "nan: input should be a finite number"),
                           ("-1", "-1.0: input should be greater than or equal to 0")]:  # fmt: skip
        result = run(*command, "--temperature", value)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '--temperature': has value {problem}" in result.stderr


def test_traces_refuses_an_out_under_a_file_before_sampling(tmp_path, monkeypatch):
    """--out notes.txt/traces.jsonl, notes.txt a file, was refused only when the traces were written, after the
    minutes of sampling them."""

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before --out was checked")

    monkeypatch.setattr("seekstack.posttrain.distill.trace_problems", sampled)
    (tmp_path / "notes.txt").write_text("")
    result = run("traces", str(model_dir(tmp_path / "model")), "--out", str(tmp_path / "notes.txt" / "traces.jsonl"))
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'notes.txt'}: is a file, not a folder; choose another output folder" in result.stderr


def test_sample_refuses_an_empty_prompt_by_its_option_and_its_place_among_those_given(tmp_path):
    """Was "error: prompt 0 of 2: empty prompt: give at least one token" for one prompt given: the engine's count of
    the greedy and the sampled copies."""
    checkpoint = model_dir(tmp_path / "model")
    result = run("sample", str(checkpoint), "--prompt", "def f", "--prompt", "", "--max-new-tokens", "2")
    assert result.exit_code == 2
    assert "Invalid value for '--prompt': prompt 2 of 2 is empty: give the text to continue" in result.stderr


def test_eval_of_a_run_writes_its_results_in_the_run_where_report_reads_them(tmp_path, monkeypatch):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_4"
    checkpoint.mkdir(parents=True)
    for name in ("train_state.pt", "config.json", "model.safetensors"):  # what a complete checkpoint holds
        (checkpoint / name).write_bytes(b"")
    written = []
    monkeypatch.setattr("seekstack.eval.evaluate.evaluate", lambda *args: {"wall_s": 0.0})
    monkeypatch.setattr("seekstack.eval.evaluate.write_results", lambda report, out: written.append(out) or 1 / 0)
    runner.invoke(app, ["eval", str(tmp_path / "run")])
    assert written == [tmp_path / "run" / "eval" / "results"]


def test_unknown_preset_fails_with_a_message_naming_the_presets():
    result = run("info", "deepseek-v9")
    assert result.exit_code == 1
    assert "'deepseek-v9' is neither a preset (tiny, small, deepseek-v2-lite, deepseek-v3)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["info"], ["forward"], ["plan", "--memory", "cpu=1GiB"]])
def test_a_hub_repository_named_for_a_model_is_told_to_be_downloaded_first(command):
    """info, forward and plan said only "is neither a preset (...) nor an existing checkpoint directory" of a Hub
    repository's name, where generate and the other commands loading a checkpoint say how to download it."""
    result = run(*command[:1], "deepseek-ai/DeepSeek-V3", *command[1:])
    assert result.exit_code == 1
    assert (
        "error: 'deepseek-ai/DeepSeek-V3' is neither a preset (tiny, small, deepseek-v2-lite, deepseek-v3) nor a "
        "checkpoint: deepseek-ai/DeepSeek-V3: no such folder; a checkpoint is a folder holding config.json and "
        "safetensors weights; if it names a Hugging Face Hub repository, download it first (`hf download "
        "deepseek-ai/DeepSeek-V3` prints the folder it downloads to)"
    ) in result.stderr


@pytest.mark.parametrize("command", [["info"], ["forward"], ["plan", "--memory", "cpu=1GiB"]])
def test_under_torchrun_rank_0_alone_says_a_model_is_neither_a_preset_nor_a_checkpoint(command, torchrun_environment):
    """A name every rank reads alike was said by each rank ("error (rank 1): 'nope' is neither a preset ..."), where
    the other configuration errors come from rank 0 alone (and the first rank of each other machine)."""
    said = {}
    for rank in (0, 1):
        torchrun_environment(rank)
        said[rank] = runner.invoke(app, [*command[:1], "nope", *command[1:]])
    assert said[0].exit_code == said[1].exit_code == 1
    assert said[0].stderr.startswith("error: 'nope' is neither a preset (tiny, small, deepseek-v2-lite, deepseek-v3)")
    assert said[1].stderr == ""


def test_a_rank_started_by_hand_says_a_configuration_error_naming_itself(tmp_path, torchrun_environment):
    """A rank started without LOCAL_RANK (by hand, its output its own) took a configuration error for one rank 0
    says, and exited 1 without a word, though it may be the only rank to meet it (its own config file)."""
    (tmp_path / "run.yaml").write_text("lr: abc\n")
    torchrun_environment(1, LOCAL_RANK=None, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    result = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert (result.exit_code, result.stderr) == (
        1,
        f"error (rank 1): {tmp_path / 'run.yaml'}: field 'lr' has value 'abc': input should be a valid number\n",
    )


def test_a_model_neither_a_preset_nor_a_checkpoint_is_a_config_error_its_caller_reports(capsys):
    """model_config raises as any setting every rank reads alike does (`user_errors` says it, as JSON where asked),
    printing nothing itself and not ending the process."""
    with pytest.raises(ConfigError, match=r"^'nope' is neither a preset \(tiny, .*nope: no such folder"):
        model_config("nope")
    assert capsys.readouterr().err == ""


def test_directory_without_config_json_fails_naming_the_file(tmp_path):
    result = run("forward", str(tmp_path))
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'config.json'}: no such file" in result.output


def test_invalid_config_json_fails_naming_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run("info", str(tmp_path))
    assert result.exit_code == 1
    assert "model_type='llama' is not supported" in result.output


def test_forward_refuses_a_model_larger_than_memory():
    result = run("forward", "deepseek-v3")
    assert result.exit_code == 1
    assert "deepseek-v3 needs 2.48 TiB" in result.output


def test_forward_reports_logits_shape_losses_and_expert_load():
    result = run("forward", "tiny", "--seq-len", "16", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "logits shape: (2, 16, 4096)" in result.output
    assert lm_loss(result.output) == pytest.approx(math.log(4096), abs=0.5)  # random weights: near uniform
    assert re.search(r"mtp loss: \d+\.\d{4}", result.output)
    loads = expert_load_rows(result.output)
    # Each of the 2 x 16 tokens goes to 2 of 8 experts; the MTP depth sees 2 x 15 positions.
    assert {layer: sum(counts) for layer, counts in loads.items()} == {"1": 64, "2": 64, "3": 64, "4 (MTP)": 60}
    assert all(len(counts) == 8 for counts in loads.values())
    assert re.search(r"forward took [\d.]+ ms", result.output)


def test_forward_is_reproducible_for_a_seed():
    first, again, other = (run("forward", "tiny", "--seq-len", "8", "--seed", seed) for seed in ("1", "1", "2"))
    assert lm_loss(first.output) == lm_loss(again.output)
    assert lm_loss(first.output) != lm_loss(other.output)


def test_forward_loads_a_checkpoint_directory(tiny_checkpoint):
    result = run("forward", str(tiny_checkpoint), "--seq-len", "8", "--batch", "1", "--seed", "3")
    assert result.exit_code == 0, result.output
    torch.manual_seed(3)
    model = load_pretrained(tiny_checkpoint).eval()
    input_ids = torch.randint(model.config.vocab_size, (1, 8))
    with torch.inference_mode():
        expected = model(input_ids, labels=input_ids).lm_loss.item()
    assert f"lm loss: {expected:.4f}" in result.output


def test_data_build_cleans_a_folder_and_reports(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    prose = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()  # real, varied text
    (folder / "a.txt").write_text(prose + " Contact me at alice@example.com for details.")
    (folder / "b.txt").write_text(prose + " Contact me at alice@example.com for details.")  # exact duplicate
    (folder / "c.txt").write_text("short")
    out = tmp_path / "corpus"
    result = CliRunner().invoke(app, ["data", "build", str(folder), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["documents_in"] == 3 and report["documents_kept"] == 1
    assert report["removed"]["exact_duplicate"] == 1 and report["removed"]["min_chars"] == 1
    kept = [json.loads(line) for name in ("train.jsonl", "val.jsonl") for line in (out / name).read_text().splitlines()]
    assert "alice@example.com" not in kept[0]["text"] and "<EMAIL>" in kept[0]["text"]


def test_data_build_names_a_missing_input(tmp_path):
    result = CliRunner().invoke(app, ["data", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "nope" in result.output and "Traceback" not in result.output


def test_data_build_names_the_option_or_the_config_files_field_at_fault(tmp_path):
    args = ["data", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    by_option = CliRunner().invoke(app, [*args, "--val-fraction", "1.5"])
    assert by_option.exit_code == 2
    assert "Invalid value for '--val-fraction': has value 1.5: input should be" in by_option.output
    (tmp_path / "cleaning.yaml").write_text("val_fraction: 1.5\n")
    by_file = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "cleaning.yaml")])
    assert by_file.exit_code == 1 and "cleaning.yaml: field 'val_fraction' has value 1.5" in by_file.output


def test_tokenizer_train_then_tokenize_writes_shards_of_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [(Path(sysconfig.get_paths()["stdlib"]) / name).read_text() for name in ("textwrap.py", "shlex.py")]
    (corpus / "train.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs))
    )
    (corpus / "val.jsonl").write_text(json.dumps({"id": "v", "text": "def f(x):\n    return x\n"}) + "\n")
    tok = tmp_path / "tok"
    result = runner.invoke(
        app, ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(tok)]
    )
    assert result.exit_code == 0, result.output
    assert "400 tokens" in result.output
    args = ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "tokens")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "tokens" / "train_index.json").read_text())
    assert index["documents"] == 2 and index["dtype"] == "uint16" and index["total_tokens"] > 1000
    assert "train: 2 documents, " in result.output and "val: 1 document, " in result.output  # was "1 documents"


def test_tokenize_names_a_damaged_val_row_before_encoding_the_training_split(tmp_path, monkeypatch):
    """val.jsonl was encoded after train.jsonl: a damaged row of it (a line cut short) was named only once the
    training split, hours of a large corpus, had been encoded, and that work thrown away."""
    from seekstack.tokens import shards
    from tests.posttrain.support import byte_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"text": "a training document"}) + "\n")
    (corpus / "val.jsonl").write_text(json.dumps({"text": "fine"}) + '\n{"text": "cut sh')
    byte_tokenizer(tmp_path / "tok")
    encoded, tokenize_corpus = [], shards.tokenize_corpus
    monkeypatch.setattr(
        shards, "tokenize_corpus", lambda path, *a: encoded.append(path.name) or tokenize_corpus(path, *a)
    )
    args = ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok")]
    refused = run(*args, "--out", str(tmp_path / "tokens"))
    assert refused.exit_code == 1 and f"{corpus / 'val.jsonl'}:2: not valid JSON" in refused.stderr
    assert encoded == ["val.jsonl"] and not (tmp_path / "tokens").exists()


@pytest.mark.parametrize("out", ["tok", "tok/tokenizer.json"])
def test_tokenizer_train_names_the_file_it_wrote(tmp_path, out):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"id": "0", "text": "def f(x):\n    return x\n"}) + "\n")
    args = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {tmp_path / 'tok' / 'tokenizer.json'}: ")


@pytest.mark.parametrize("out", ["notes.txt", "notes.txt/tok"])
def test_tokenizer_train_refuses_an_out_that_is_or_lies_under_a_file_before_training(tmp_path, out):
    """--out notes.txt/tok failed once BPE had trained, in a bare "error: [Errno 20] Not a directory: ..."."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"id": "0", "text": "def f(x):\n    return x\n"}) + "\n")
    (tmp_path / "notes.txt").write_text("")
    args = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'notes.txt'}: is a file, not a folder" in result.stderr
    assert "choose another output folder for tokenizer.json and tokenizer_config.json (nothing was written)" in (
        result.stderr
    )


def test_tokenizer_train_refuses_a_folder_holding_other_files_and_replaces_an_earlier_tokenizer(tmp_path):
    test_tokenizer_train_then_tokenize_writes_shards_of_the_corpus(tmp_path)
    checkpoint = tmp_path / "checkpoint"  # a model folder: its config beside the tokenizer it was trained with
    shutil.copytree(tmp_path / "tok", checkpoint)
    (checkpoint / "config.json").write_text("{}")
    before = {entry.name: entry.read_bytes() for entry in checkpoint.iterdir()}
    args = ["tokenizer", "train", "--corpus", str(tmp_path / "corpus"), "--vocab-size", "300"]
    refused = runner.invoke(app, [*args, "--out", str(checkpoint)])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"{checkpoint}: holds config.json besides a tokenizer's tokenizer.json and tokenizer_config.json" in (
        refused.output
    )
    assert "nothing was written" in refused.output and "replaces the whole folder" not in refused.output
    assert {entry.name: entry.read_bytes() for entry in checkpoint.iterdir()} == before
    replaced = runner.invoke(app, [*args, "--out", str(tmp_path / "tok")])
    assert replaced.exit_code == 0, replaced.output
    assert Tokenizer.from_file(tmp_path / "tok").vocab_size == 300


def test_tokenizer_train_replaces_an_earlier_tokenizer_transformers_saved_its_chat_template_jinja_too(tmp_path):
    """transformers 5's save_pretrained writes the chat template to chat_template.jinja, which it reads before the
    config's: a tokenizer folder saved so was refused as holding other files; now its template is replaced too."""
    test_tokenizer_train_then_tokenize_writes_shards_of_the_corpus(tmp_path)
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ 'an earlier template' }}", encoding="utf-8")
    args = ["tokenizer", "train", "--corpus", str(tmp_path / "corpus"), "--vocab-size", "300"]
    replaced = runner.invoke(app, [*args, "--out", str(tmp_path / "tok")])
    assert replaced.exit_code == 0, replaced.output
    assert Tokenizer.from_file(tmp_path / "tok").vocab_size == 300
    assert (tmp_path / "tok" / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE


@pytest.mark.parametrize("command", ["tokenizer train", "data tokenize"])
def test_a_corpus_file_given_for_the_corpus_folder_is_named_with_the_folder_to_give(tmp_path, command):
    """--corpus corpus/train.jsonl was told '.../train.jsonl/train.jsonl: no such file; build the corpus from your
    text first (`seekstack data build TEXT --out .../train.jsonl`)': a folder inside the file it named."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text('{"text": "def f(x):\n    return x\n"}\n', encoding="utf-8")
    args = [*command.split(), "--corpus", str(corpus / "train.jsonl"), "--out", str(tmp_path / "out")]
    if command == "data tokenize":
        args += ["--tokenizer", str(tmp_path / "tok")]
        train_tokenizer(["def f(x):\n    return x\n"], vocab_size=300, out_path=tmp_path / "tok")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"{corpus / 'train.jsonl'}: is a file; --corpus is the folder `seekstack data build` wrote" in (
        refused.output
    )
    assert f"give its folder, {corpus}" in refused.output and not (tmp_path / "out").exists()


def test_tokenizer_train_refuses_an_empty_corpus_as_tokenize_does(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "val"):
        (corpus / f"{split}.jsonl").write_text("")
    args = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    result = run(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{corpus / 'train.jsonl'}: no documents to train a tokenizer on; build the corpus" in result.output
    assert not (tmp_path / "tok").exists()
    (corpus / "train.jsonl").write_text('{"text": ""}\n{"text": " \\n"}\n')  # wrote a 272-token tokenizer, warning
    result = run(*args)
    assert result.exit_code == 1
    assert f"{corpus / 'train.jsonl'}: no documents to train a tokenizer on (2, all blank)" in result.output
    assert not (tmp_path / "tok").exists()


def test_tokenizer_train_and_tokenize_name_a_corpus_row_whose_text_is_null(tmp_path):
    """A row {"text": null} of a corpus split (a dataset export given as the corpus) was dropped unsaid: tokenize
    printed one document fewer, tokenizer train learned from the rest; `data build` counts such rows in its report."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text('{"text": "def f(x):\\n    return x\\n"}\n{"text": null}\n')
    (corpus / "val.jsonl").write_text('{"text": "x = 1\\n"}\n')
    tokenizer = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    refused = run(*tokenizer)
    assert refused.exit_code == 1 and f"{corpus / 'train.jsonl'}:2: field 'text' is null" in refused.stderr
    assert not (tmp_path / "tok").exists()
    (corpus / "train.jsonl").write_text('{"text": "def f(x):\\n    return x\\n"}\n')
    assert run(*tokenizer).exit_code == 0
    (corpus / "val.jsonl").write_text('{"text": "x = 1\\n"}\n{"text": null}\n')
    tokenize = ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok")]
    refused = run(*tokenize, "--out", str(tmp_path / "tokens"))
    assert refused.exit_code == 1 and f"{corpus / 'val.jsonl'}:2: field 'text' is null" in refused.stderr
    assert not (tmp_path / "tokens").exists()


def test_tokenizer_train_names_vocab_size_and_its_largest_value(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"id": "0", "text": "def f(x):\n    return x\n"}) + "\n")
    args = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", str(2**64), "--out", str(tmp_path / "tok")]
    result = run(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '--vocab-size': has value {2**64:,}, too large: at most 1,048,576" in result.output
    assert not (tmp_path / "tok").exists()


def test_tokenize_names_a_missing_corpus(tmp_path):
    args = ["data", "tokenize", "--corpus", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "t")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_train_runs_on_tokenized_shards_and_writes_a_checkpoint(tmp_path):
    test_tokenizer_train_then_tokenize_writes_shards_of_the_corpus(tmp_path)
    out = tmp_path / "run"
    args = ["train", f"data_dir={tmp_path / 'tokens'}", f"out_dir={out}", "max_steps=2", "seq_len=8", "batch_size=2"]
    args += ["model.vocab_size=400", "eval_every=2", "eval_batches=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "step_2" / "config.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2


def test_train_names_an_unknown_setting(tmp_path):
    result = runner.invoke(app, ["train", "batchsize=3"])
    assert result.exit_code == 1 and "batchsize" in result.output and "Traceback" not in result.output


def test_the_command_line_starts_without_importing_the_stages() -> None:
    """`seekstack --help` stays fast: torch, FastAPI, uvicorn and matplotlib load inside the commands that use them."""
    code = "import sys, seekstack.cli; print(sorted({'torch', 'fastapi', 'uvicorn', 'matplotlib'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_run_folder_is_resolved_without_importing_torch(tmp_path) -> None:
    """The run's out_dir is resolved while the arguments parse, before a command's own handlers (generate --json's
    Ctrl-C answer) are in place: loading torch there left a window of seconds in which Ctrl-C printed nothing."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_3"
    checkpoint.mkdir(parents=True)
    for name in ("train_state.pt", "config.json", "model.safetensors"):  # what a complete checkpoint holds
        (checkpoint / name).write_bytes(b"")
    code = (
        "import sys, click, typer; from seekstack.cli.common import run_to_checkpoint; "
        f"context = typer.Context(click.Command('x')); "
        f"print(run_to_checkpoint(context, {str(tmp_path / 'run')!r}), 'torch' in sys.modules)"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.split() == [str(checkpoint), "False"]


def test_python_m_seekstack_runs_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "seekstack", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout


@pytest.mark.parametrize("module", ["typer.core", "seekstack.cli.serve"])
def test_ctrl_c_while_the_commands_load_exits_130_without_a_traceback(module: str) -> None:
    """Ctrl-C in the first second or two of any command (`seekstack serve`, its imports running) printed
    KeyboardInterrupt's traceback through the imports, where one later ends the command quietly with 130. The
    interrupt comes here as `module` is imported (typer's, before the stages; a stage's)."""
    code = (
        "import os, signal, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == {module!r}: os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from seekstack.cli import app\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (130, "")


def test_help_shows_whole_option_names_and_the_train_config_keys() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=80)
    assert "--served-model-name" in result.output and "<bool>" not in result.output
    keys = CliRunner().invoke(app, ["train", "--help"]).output
    assert "mtp_loss_weight = 0.3" in keys and "model.FIELD=VALUE" in keys and 'parallel = "ddp"' in keys


def test_lora_train_help_names_every_chat_file_form_it_reads() -> None:
    """DATA's help lists the .json forms (JSON Lines, one JSON array) `lora train` reads as conversations, and every
    compression it reads them through (seekstack.adapters.data.first_record, seekstack.compression)."""
    from seekstack.compression import COMPRESSIONS

    help_text = " ".join(CliRunner().invoke(app, ["lora", "train", "--help"], terminal_width=400).output.split())
    assert ".json of JSON Lines" in help_text and "one JSON array" in help_text
    assert all(suffix in help_text for suffix in COMPRESSIONS)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["info", ""], "MODEL"),
        (["generate", "def f(", "--model", ""], "--model"),
        (["generate", "def f(", "--model="], "--model"),
        (["plot", "runs/a", ""], "RUNS..."),
        (["data", "build", "notes.txt", "--out", ""], "--out"),
        (["data", "build", "", "--out", "corpus"], "INPUTS..."),
        (["train", "--resume-from", ""], "--resume-from"),
        (["generate", "def f(", "--model", "tiny", "--device-map", "auto", "--offload-dir", ""], "--offload-dir"),
        (["eval", "tiny", "--out", ""], "--out"),
        (["keys", "create", "--name", "ci", "--db", ""], "--db"),
    ],
    ids=[
        "preset-or-checkpoint",
        "option",
        "option=",
        "one-of-several",
        "output",
        "inputs",
        "step",
        "str",
        "results",
        "database",
    ],
)
def test_an_empty_path_is_refused_naming_its_argument_not_read_as_the_current_folder(tmp_path, monkeypatch, arguments,
                                                                                      named):  # fmt: skip
    """typer reads "" as Path("."): `--model "$MODEL"` with the variable unset was the current folder's config.json
    ("config.json: no such file"), and `data build --out ""` wrote the corpus there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("Some notes.\n")
    result = run(*arguments)
    assert result.exit_code == 2
    assert f"Invalid value for '{named}': an empty path (a shell variable left unset?)" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "arguments",
    [["sft", "init_from=micro", "data="], ["train", "init_from="], ["rl", "tokenizer="], ["distill", "teacher_cache="]],
)
def test_an_empty_path_setting_is_refused_naming_its_key_not_taken_as_its_default(tmp_path, arguments):
    """`sft data=$UNSET` trained on the built-in task's traces, "" being data's default, and `train init_from=$UNSET`
    a fresh model, without a word: an empty path typed as a key=value setting is refused as an empty option is."""
    written = tmp_path / "resolved.yaml"
    result = run(*arguments, f"out_dir={tmp_path / 'run'}", "--write-config", str(written))
    key = arguments[-1].removesuffix("=")
    assert result.exit_code == 1 and not written.exists()
    said = f"error: {key}=: an empty path (a shell variable left unset?); give a path, or leave {key} out for its"
    assert result.stderr == f"{said} default\n"


def test_help_is_shown_though_an_empty_path_is_on_the_line() -> None:
    """`generate --model "$M" --help` with M unset shows the help, as any other bad value's --help does."""
    for arguments in (["info", "", "--help"], ["generate", "def f(", "--model", "", "--help"]):
        result = run(*arguments)
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output and "Show this message and exit." in result.output


@pytest.mark.parametrize("command", ["plot", "rl-plot"])
def test_a_figure_out_under_a_file_names_the_file_in_the_way(tmp_path, command):
    """`seekstack plot RUN --out notes.txt/curves.png` failed with a bare "[Errno 17] File exists: 'notes.txt'"."""
    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    records = [{"step": step, "reward": 0.5, "accuracy": 0.1 * step} for step in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "notes.txt").write_text("notes\n")
    result = run(command, str(run_dir), "--out", str(tmp_path / "notes.txt" / "curves.png"))
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {tmp_path / 'notes.txt'}: is a file, not a folder; choose another output folder for curves.png"
    )
