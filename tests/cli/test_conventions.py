"""What every `seekstack` command owes a shell: output that pipes, and exit codes that say what happened."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.cli.common import Command
from tests.infer.support import model_dir

runner = CliRunner()


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_generate_into_a_pipe_whose_reader_has_gone_ends_quietly(tmp_path, as_json):
    model = model_dir(tmp_path / "model")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as `seekstack generate ... | head` once head has its lines
    command = [sys.executable, "-m", "seekstack", "generate", "def f(", "--model", str(model), "--max-new-tokens", "4"]
    try:
        result = subprocess.run(
            command + ["--json"] * as_json, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 1  # click's exit for a broken pipe, with nothing said
    assert [line for line in result.stderr.splitlines() if not line.startswith("note: ")] == []


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_every_engine_command_refuses_more_threads_than_cpus_alike(tmp_path, command):
    too_many = (os.cpu_count() or 1) + 1
    prompt = ["def f("] if command == "generate" else []
    result = runner.invoke(app, [command, *prompt, "--model", str(tmp_path / "model"), "--threads", str(too_many)])
    assert result.exit_code == 2  # a usage error, as any option value refused
    message = f"Invalid value for '--threads': has value {too_many}: must be from 1 to this machine's {too_many - 1}"
    assert message in result.output


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [("generate", "--temperature", "-1"), ("chat", "--top-p", "2"), ("serve", "--draft-tokens", "0")],
)
def test_an_option_value_the_library_refuses_is_a_usage_error_as_one_the_parser_refuses(tmp_path, command, option,
                                                                                       value):  # fmt: skip
    prompt = ["def f("] if command == "generate" else []
    result = runner.invoke(app, [command, *prompt, "--model", str(tmp_path / "model"), option, value], input="")
    assert result.exit_code == 2  # click's exit for a usage error, as `--temperature hot` gets
    assert f"Error: Invalid value for '{option}': has value {value}" in result.stderr


@pytest.mark.parametrize(
    "mistake", [["--temperature", "hot"], ["--no-such-flag"], []], ids=["bad-value", "unknown-option", "no-model"]
)
def test_generate_json_exits_on_a_command_line_mistake_as_it_does_without_json(mistake):
    model = [] if not mistake else ["--model", "checkpoint"]
    plain = runner.invoke(app, ["generate", "x", *model, *mistake])
    as_json = runner.invoke(app, ["generate", "x", *model, *mistake, "--json"])
    assert plain.exit_code == as_json.exit_code == 2
    assert list(json.loads(as_json.stdout)) == ["error"]


def test_the_shell_completes_commands_and_their_options():
    def completed(words: str) -> list[str]:
        position = len(words.split()) - 1
        env = {"_SEEKSTACK_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(position)}
        result = runner.invoke(app, [], env=env, prog_name="seekstack")
        assert result.exit_code == 0, result.output
        return result.output.split()

    assert completed("seekstack gen") == ["generate"]
    assert completed("seekstack data bu") == ["build"]
    assert completed("seekstack generate --max-n") == ["--max-new-tokens"]
    help_text = runner.invoke(app, ["--help"]).output  # the script's shell is found from the process tree: not here
    assert "--install-completion" in help_text and "--show-completion" in help_text


@pytest.mark.parametrize(
    ("command", "option"), [(["generate", "x"], "--model"), (["quantize", "model"], "--out"), (["usage"], "--since")]
)
def test_every_command_with_json_reports_a_command_line_mistake_as_json(command, option):
    result = runner.invoke(app, [*command, "--json", option])  # the option's value left out
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": {"message": f"Option '{option}' requires an argument."}}


@pytest.mark.parametrize(
    ("command", "option", "key"),
    [
        (["train"], "--max-steps", "max_steps"),
        (["train"], "--max_steps=10", "max_steps"),  # HF Trainer's spelling
        (["train"], "--lr", "lr"),  # click offered "(Possible options: --help)", near in its spelling
        (["train"], "--model", "model"),
        (["sft"], "--vocab-size", "model.vocab_size"),
        (["rl"], "--num-generations", "num_generations"),
        (["distill"], "--kd-weight", "kd_weight"),
        (["lora", "train"], "--rank", "lora.rank"),
    ],
)
def test_a_config_key_given_as_an_option_is_refused_with_the_key_value_to_write(command, option, key):
    result = runner.invoke(app, [*command, option, "10"])
    assert result.exit_code == 2
    name = option.split("=")[0]
    assert f"No such option: {name}; settings are key=value arguments: {key}=VALUE" in result.output


def test_an_option_named_as_a_field_no_user_sets_is_refused_without_a_key_value_to_write():
    """ModelConfig.extra holds a config.json's unknown keys: --extra was told to write model.extra=VALUE, which the
    run then refused as no field of ModelConfig."""
    result = runner.invoke(app, ["train", "--extra", "10"])
    assert result.exit_code == 2
    assert "No such option: --extra" in result.output and "model.extra" not in result.output


def test_an_option_close_to_one_of_the_commands_own_is_still_offered_it():
    result = runner.invoke(app, ["lora", "train", "--out-dir", "runs/x"])  # out_dir is a key too, but --out sets it
    assert result.exit_code == 2
    assert "No such option: --out-dir (Possible options: --out)" in result.output


def commands(group=None, path=()):
    """Each command of `seekstack` (those of its groups too) by its name, "data build", with its click command."""
    for name, command in (group or typer.main.get_command(app)).commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_option_of_every_command_says_what_it_does():
    unexplained = [
        f"{name} {param.opts[0]}"
        for name, command in commands()
        for param in command.params
        if param.param_type_name == "option" and not (param.help or "").strip()
    ]
    assert unexplained == []


def test_every_usage_line_and_argument_error_names_the_arguments_in_capitals_as_click_and_readme_write_them():
    usage = {}
    for name, command in commands():
        with command.context_class(command, info_name=f"seekstack {name}") as context:
            usage[name] = command.get_usage(context)
    argument = r"(\[?[A-Z_]+\]?(\.\.\.)?)"  # MODEL, [PROMPT], RUNS..., [INPUTS]...
    unlike = [
        line
        for name, line in usage.items()
        if not re.fullmatch(rf"Usage: seekstack {name} \[OPTIONS\]( {argument})*", line)
    ]
    assert unlike == []
    assert usage["quantize"] == "Usage: seekstack quantize [OPTIONS] CHECKPOINT"  # README's name (was: MODEL)
    assert usage["prune"] == "Usage: seekstack prune [OPTIONS] CHECKPOINT"
    assert "Error: Missing argument 'CHECKPOINT'." in runner.invoke(app, ["quantize", "--out", "q"]).stderr
    assert usage["generate"] == "Usage: seekstack generate [OPTIONS] [PROMPT]"
    assert usage["explain"] == "Usage: seekstack explain [OPTIONS] CHECKPOINT [TEXT]"
    assert usage["data build"] == "Usage: seekstack data build [OPTIONS] [INPUTS]..."
    assert usage["lora merge"] == "Usage: seekstack lora merge [OPTIONS] BASE ADAPTER"
    assert usage["plot"] == "Usage: seekstack plot [OPTIONS] RUNS..."
    assert usage["pass-at-k"] == "Usage: seekstack pass-at-k [OPTIONS] CHECKPOINTS..."
    assert usage["traces"] == "Usage: seekstack traces [OPTIONS] CHECKPOINT"
    # an argument's errors name it as its usage line does, as click's do
    assert "Error: Missing argument 'MODEL'." in runner.invoke(app, ["info"]).stderr
    assert "Error: Missing argument 'RUNS...'." in runner.invoke(app, ["plot"]).stderr
    assert "Error: Missing argument 'CHECKPOINTS...'." in runner.invoke(app, ["pass-at-k"]).stderr


def test_seekstack_help_lists_each_command_by_its_first_sentence_past_an_abbreviation():
    command = Command("distill", help="Train a student (a preset, e.g. small) on shards. Then more.\n\nDetails.")
    assert command.get_short_help_str(100) == "Train a student (a preset, e.g. small) on shards."
    assert command.get_short_help_str(30) == "Train a student (a preset..."
    numbered = Command("train", help="Train on shards. 2 GPUs or more take --parallel.")
    assert numbered.get_short_help_str(100) == "Train on shards."  # as click ends it: before a word not lowercase
    listed = runner.invoke(app, ["--help"], prog_name="seekstack", terminal_width=120).stdout.splitlines()
    assert [line for line in listed if line.endswith((" e.g.", " i.e."))] == []
    assert [line for line in listed if "...." in line] == []  # was: "Train a student (a preset or config, e.g...."


def test_seekstack_help_lists_a_command_as_click_does_past_its_no_rewrap_form_feed_and_deprecation_markers():
    """click's own short help drops a first \\b (its no-rewrap marker) and labels a deprecated command; the help
    after \\f is left out of --help, so of its line too (the override printed the \\b and dropped the label)."""
    command = Command("old", help="\b\nTrain on shards.\f\n:param shards: a folder", deprecated=True)
    assert command.get_short_help_str(45) == "Train on shards. (DEPRECATED)"
    renamed = Command("old", help="Train on shards of a corpus folder\f:param shards: x", deprecated="use train")
    assert renamed.get_short_help_str(30) == "Train on shards of a corpus... (DEPRECATED: use train)"


@pytest.mark.parametrize(("command", "argument"), [(["eval"], "CHECKPOINT"), (["quantize"], "CHECKPOINT")])
def test_a_commands_help_names_its_argument_as_its_usage_line_does(command, argument):
    """eval's --help said "when MODEL is one", "else MODEL/eval/results" of its argument CHECKPOINT."""
    shown = runner.invoke(app, [*command, "--help"], terminal_width=200).output
    assert f"[OPTIONS] {argument}" in shown
    assert re.findall(r"\bMODELS?\b", shown) == []


@pytest.mark.parametrize(
    ("command", "shown"),
    [(["train"], "CONFIG"), (["sft"], "OVERRIDES..."), (["generate"], "PROMPT"), (["pass-at-k"], "CHECKPOINTS...")],
)
def test_a_commands_help_shows_a_text_argument_without_typers_type_label(command, shown):
    """train's --help showed "CONFIG <str>" and "OVERRIDES... <list[str]>", pass-at-k's "CHECKPOINTS... <list[Path]>",
    which tell a user nothing; a path's label stays ("--config <path>")."""
    listed = runner.invoke(app, [*command, "--help"], terminal_width=200).output
    assert re.search(rf"^  {re.escape(shown)}  +\w", listed, re.MULTILINE), listed
    arguments = listed.partition("Arguments:")[2].partition("Options:")[0]
    assert "<" not in arguments


@pytest.mark.parametrize(("command", "shown"), [(["sample"], "--prompt <str>"), (["generate"], "--stop <str>")])
def test_a_repeatable_options_help_labels_the_one_value_it_takes_each_time(command, shown):
    """sample's --help showed "--prompt <list[str]>", typer's annotation, where the option takes one text each time."""
    listed = runner.invoke(app, [*command, "--help"], terminal_width=200).output
    assert re.search(rf"^  {re.escape(shown)}  +\w", listed, re.MULTILINE), listed
    assert "list[" not in listed


@pytest.mark.parametrize(
    ("choice", "given"),
    [([], "neither given"), (["--threshold", "0.5", "--top-fraction", "0.3"], "not both")],
    ids=["neither", "both"],
)
def test_data_select_names_its_two_selection_options_when_not_given_one(tmp_path, choice, given):
    """Neither option given was told "one of them, not both", as if both were."""
    paths = ["--corpus", str(tmp_path / "corpus"), "--model", str(tmp_path / "q.npz"), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, ["data", "select", *paths, *choice])
    assert result.exit_code == 1
    assert f"error: choose --threshold SCORE or --top-fraction SHARE: one of them, {given}\n" in result.output


def test_data_build_help_states_the_defaults_of_the_options_it_leaves_to_the_cleaning_config():
    from seekstack.corpus.rules import CleaningConfig

    shown = " ".join(runner.invoke(app, ["data", "build", "--help"], terminal_width=200).output.split())
    defaults = CleaningConfig()
    assert f"zh (CJK); default {defaults.profile}, or the --config file's" in shown
    assert f"2 or more are kept; default {defaults.val_fraction}, or the --config file's" in shown


@pytest.mark.parametrize("option", ["--batch-size", "--batch"])
def test_forward_takes_the_batch_size_as_the_other_commands_spell_it_and_by_its_older_name(option):
    result = runner.invoke(app, ["forward", "tiny", "--seq-len", "4", option, "3"])
    assert result.exit_code == 0, result.output
    assert "logits shape: (3, 4, " in result.output and "(batch 3 x 4 tokens" in result.output


@pytest.mark.parametrize("option", ["--problems", "--prompts"])
def test_traces_counts_its_problems_as_pass_at_k_spells_them_and_by_its_older_name(tmp_path, monkeypatch, option):
    asked = []

    def verified_traces(engine, task, problems, *args):
        asked.append(problems)
        return SimpleNamespace(conversations=[], sampled=0)

    monkeypatch.setattr("seekstack.cli.posttrain._sampling_engine", lambda *args: None)
    monkeypatch.setattr("seekstack.posttrain.distill.verified_traces", verified_traces)
    runner.invoke(app, ["traces", str(tmp_path), "--out", str(tmp_path / "traces.jsonl"), option, "7"])
    assert asked == [7]


def test_train_takes_its_config_file_as_config_as_data_build_and_quantize_do(tmp_path):
    config, written = tmp_path / "mine.yaml", tmp_path / "resolved.yaml"
    config.write_text("max_steps: 7\n")
    result = runner.invoke(app, ["train", "--config", str(config), "lr=0.01", "--write-config", str(written)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(written.read_text())
    assert (resolved["max_steps"], resolved["lr"]) == (7, 0.01)


def test_a_config_file_whose_path_holds_an_equals_sign_is_read_as_the_config_not_as_an_override(tmp_path, monkeypatch):
    """A sweep's folders are named key=value (hydra's `lr=0.001/`): such a file was taken as the first override,
    "override 'sweep/lr=1e-3/run.yaml': unknown field 'sweep/lr'"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep" / "lr=1e-3").mkdir(parents=True)
    (tmp_path / "sweep" / "lr=1e-3" / "run.yaml").write_text("lr: 0.001\n")
    (tmp_path / "lr=0.01.yaml").write_text("lr: 0.01\n")  # a file of the working folder, named like an override
    given = {"sweep/lr=1e-3/run.yaml": 0.001, "lr=0.01.yaml": 0.01, "lr=0.5": 0.5}
    for argument, lr in given.items():
        result = runner.invoke(app, ["train", argument, "max_steps=4", "--write-config", "resolved.yaml"])
        assert result.exit_code == 0, result.output
        resolved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
        assert (resolved["lr"], resolved["max_steps"]) == (lr, 4)


@pytest.mark.parametrize("command", ["train", "sft", "rl", "distill"])
def test_a_training_stage_given_two_config_files_names_both(tmp_path, command):
    """A usage error (exit 2), as --resume and --resume-from both given are; it exited 1."""
    config = tmp_path / "mine.yaml"
    config.write_text("max_steps: 7\n")
    result = runner.invoke(app, [command, str(config), "--config", str(config)])
    assert result.exit_code == 2
    assert f"Error: two config files, {config} and --config {config}: give one" in result.output


@pytest.mark.parametrize("command", [["train"], ["data", "build"]])  # sft, rl and distill: WriteConfigOpt, alike
def test_write_config_to_a_suffix_it_cannot_write_is_a_usage_error_before_anything_is_resolved(tmp_path, command):
    """--write-config w.txt (or .toml) exited 1 once the whole config was resolved, where a value an option cannot
    take is a usage error (exit 2); W.YAML, read as YAML, was refused too."""
    result = runner.invoke(app, [*command, "--write-config", str(tmp_path / "w.toml")])
    assert result.exit_code == 2
    told = f"Invalid value for '--write-config': {tmp_path / 'w.toml'}: configs are written as .yaml, .yml or .json"
    assert told in " ".join(result.output.split())
    assert runner.invoke(app, [*command, "--write-config", str(tmp_path / "W.YAML")]).exit_code == 0
    assert yaml.safe_load((tmp_path / "W.YAML").read_text())


@pytest.mark.parametrize("command", ["train", "sft", "rl", "distill"])
def test_every_training_stage_takes_resume_from_a_step_or_a_checkpoint_folder(tmp_path, command):
    """sft, rl and distill had --resume alone (No such option: --resume-from), where train took a step or folder."""
    run, copied = tmp_path / "run", tmp_path / "copied_step_3"
    copied.mkdir()
    (copied / "train_state.pt").touch()  # a training checkpoint copied out of its run, which holds the config
    step = runner.invoke(app, [command, f"out_dir={run}", "--resume-from", "3"])
    assert step.exit_code == 1, step.output
    assert f"{run / 'train_config.json'}: no such file; a run to resume has its config there" in step.output
    folder = runner.invoke(app, [command, f"out_dir={run}", "--resume-from", str(copied)])
    assert folder.exit_code == 1, folder.output
    assert f"{copied} is no checkpoint of a run holding one" in folder.output


@pytest.mark.parametrize("command", ["train", "sft", "rl", "distill"])
def test_resume_and_resume_from_together_are_refused_naming_both(tmp_path, command):
    """--resume beside --resume-from 3 took step 3 silently, where the newest checkpoint may have been meant."""
    result = runner.invoke(app, [command, f"out_dir={tmp_path}", "--resume", "--resume-from", "3"])
    assert result.exit_code == 2, result.output
    assert (
        "Error: --resume and --resume-from 3 both given: --resume continues from the run's newest checkpoint, "
        "--resume-from from the one it names; give one"
    ) in " ".join(result.output.split())


def test_data_build_shows_its_progress_on_stderr_and_its_report_alone_on_stdout(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("textwrap.py", "shlex.py"):
        (folder / name).write_text((Path(sysconfig.get_paths()["stdlib"]) / name).read_text())
    arguments = ["data", "build", str(folder), "--out", str(tmp_path / "corpus"), "--workers", "1"]
    result = runner.invoke(app, arguments, env={"FORCE_COLOR": "1"})  # drawn as at a terminal (and CI forcing colour)
    assert result.exit_code == 0, result.output
    assert "docs in" in result.stderr and "docs in" not in result.stdout
    assert result.stdout.rstrip().endswith("report.json")


def test_chat_says_what_it_cannot_do_on_stderr_and_keeps_stdout_for_the_replies(tmp_path):
    model = model_dir(tmp_path / "model")
    too_long = "word " * 5000  # more than the model's context
    result = runner.invoke(app, ["chat", "--model", str(model), "--max-new-tokens", "2"], input=f"{too_long}\n/quit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # no reply: the message was refused
    assert "error: the message needs" in result.stderr and ": write less\n" in result.stderr  # no /system to change
