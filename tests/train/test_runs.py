"""A run's checkpoints as the command line finds them (seekstack.train.runs): a step folder's files are read as the
checkpoint reader reads them."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import typer
from typer.testing import CliRunner

from seekstack.checkpoint import CheckpointError, CheckpointReader
from seekstack.checkpoint.save import write_pretrained_files
from seekstack.cli import app
from seekstack.cli.common import run_given, run_to_checkpoint
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError
from seekstack.train.config import TrainConfig, _checkpoints_of_runs, load_train_config, resolve_train_config
from seekstack.train.runs import missing_files, run_checkpoint, run_folder, step_dir, step_folders
from seekstack.train.state import save_checkpoint
from tests.conftest import micro_config
from tests.train.test_trainer import write_split


@pytest.mark.parametrize(
    ("weight_map", "refusal"),
    [
        ({"model.embed_tokens.weight": 5}, "weight_map gives key 'model.embed_tokens.weight' the file 5, not a file"),
        (["model-00001-of-00002.safetensors"], "not a safetensors index (no 'weight_map' object)"),
    ],
)
def test_a_run_whose_step_folder_holds_no_valid_index_is_refused_as_the_reader_refuses_it(
    tmp_path, weight_map, refusal
):
    """runs.py read a step folder's index with its own json code: a weight_map giving a key a number ended
    `seekstack generate RUN` in a TypeError traceback, and one that is no object passed the folder as complete."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_3"
    checkpoint.mkdir(parents=True)
    for name in ("train_state.pt", "config.json"):
        (checkpoint / name).write_bytes(b"")
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as loading:
        CheckpointReader(checkpoint, None)
    message = str(loading.value)
    assert message.startswith(f"{index}: {refusal}") and message.endswith("re-save or re-download the checkpoint")
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "run"), "hi"], terminal_width=10_000)
    assert result.exit_code == 2
    assert (
        f"{tmp_path / 'run'}: no complete checkpoint: step_3 (no valid model.safetensors.index.json) under "
        f"{tmp_path / 'run' / 'checkpoints'}"
    ) in " ".join(result.output.split())


def test_init_from_a_folder_that_is_no_checkpoint_is_refused_naming_the_setting_and_the_file(tmp_path):
    """The refusal named the file the folder lacks (or the step folder's damaged index) but not init_from=, the
    setting that gave the folder."""
    write_split(tmp_path / "tokens", "train", 20_000, seed=1)
    folder = tmp_path / "notes"
    folder.mkdir()
    settings = [f"data_dir={tmp_path / 'tokens'}", f"out_dir={tmp_path / 'run'}", "max_steps=1", "eval_every=0"]
    result = CliRunner().invoke(app, ["train", f"init_from={folder}", *settings])
    assert result.exit_code == 1
    assert f"error: init_from={folder}: {folder}/config.json: no such file; a checkpoint keeps" in result.output
    checkpoint = tmp_path / "started" / "checkpoints" / "step_3"  # a run's out_dir stands for its newest checkpoint
    checkpoint.mkdir(parents=True)
    for name in ("train_state.pt", "config.json"):
        (checkpoint / name).write_bytes(b"")
    (checkpoint / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ConfigError) as refused:
        resolve_train_config(None, [f"init_from={tmp_path / 'started'}", *settings])
    assert str(refused.value).startswith(
        f"field 'init_from': {tmp_path / 'started'}: no complete checkpoint: step_3 (no valid "
        f"model.safetensors.index.json) under {checkpoint.parent}"
    )


def test_a_damaged_index_in_an_older_step_folder_keeps_the_run_from_none_of_its_newer_checkpoints(tmp_path):
    """missing_files raised the reader's CheckpointError for a step folder whose index is damaged, and every listing
    reads each step folder: with step_2's index truncated and step_4 complete, run_checkpoint refused the run, and a
    save of step_6 wrote it, then raised while pruning, which stopped training at its save step. The folder is now
    incomplete, lacking a valid index, and passed over as a step folder cut short is."""
    run, model = tmp_path / "run", Transformer(micro_config())
    sharded = functools.partial(write_pretrained_files, max_shard_bytes=4096)
    damaged = save_checkpoint(run, model, {"step": 2}, keep=2, write_model=sharded)
    index = damaged / "model.safetensors.index.json"
    index.write_text(index.read_text()[:40])
    assert missing_files(damaged) == ["valid model.safetensors.index.json"]
    save_checkpoint(run, model, {"step": 4}, keep=2)
    assert run_checkpoint(run) == run / "checkpoints" / "step_4"
    assert save_checkpoint(run, model, {"step": 6}, keep=1) == run / "checkpoints" / "step_6"
    assert [folder.name for folder in step_folders(run)] == ["step_2", "step_6"]  # step_4 pruned; step_2 never listed
    assert run_checkpoint(run) == run / "checkpoints" / "step_6"


def test_report_takes_a_runs_metrics_jsonl_for_its_run_as_plot_does(tmp_path):
    """`seekstack report RUN/metrics.jsonl` was told "no metrics.jsonl in RUN/metrics.jsonl: is it the out_dir of a
    `seekstack train` run?", where plot and rl-plot take a run's metrics file for its folder (train.runs.run_folder)."""
    write_split(tmp_path / "tokens", "train", 20_000, seed=1)
    run = tmp_path / "run"
    load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={run}"]).save(run)
    lines = [{"step": step, "loss": 4.0 - step, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.01} for step in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(app, ["report", str(run / "metrics.jsonl"), "--no-samples"])
    assert (result.exit_code, result.output) == (0, f"wrote {run / 'report.md'}\n")
    page = (run / "report.md").read_text()
    assert page.startswith(f"# Run report: `{run}`\n")
    assert f"`curves.png`: steps 1-2 of `{run / 'metrics.jsonl'}`, as `seekstack plot {run}` draws it." in page


def test_a_runs_checkpoints_folder_stands_for_its_newest_checkpoint_as_its_out_dir_does(tmp_path):
    """`seekstack checkpoint export RUN/checkpoints` (or generate --model, init_from=) was told "RUN/checkpoints: no
    checkpoint", and generate "RUN/checkpoints/config.json: no such file; ... copy it from where the checkpoint came
    from": the folder of the run's step_N folders, which torchtitan's checkpoint folder is, stood for nothing."""
    model = Transformer(micro_config())
    for step in (2, 4):
        save_checkpoint(tmp_path / "run", model, {"step": step}, keep=2)
    newest = tmp_path / "run" / "checkpoints" / "step_4"
    assert run_checkpoint(tmp_path / "run" / "checkpoints") == newest == run_checkpoint(tmp_path / "run")
    assert run_checkpoint(newest) is None  # a checkpoint folder is itself
    result = CliRunner().invoke(
        app, ["checkpoint", "export", str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0
    assert result.output.startswith(f"{tmp_path / 'run' / 'checkpoints'}: using the run's newest checkpoint, {newest}")


def test_a_runs_train_config_json_stands_for_its_run_and_what_is_named_after_the_run_is_the_runs(tmp_path, monkeypatch):
    """`seekstack checkpoint export RUN/train_config.json` (generate --model, init_from=, ...) was told "no checkpoint"
    and `report`/`plot RUN/train_config.json` "no metrics.jsonl in RUN/train_config.json", where RUN/metrics.jsonl
    names the run. One run_folder, where the value is read, makes the file the run for everything downstream: the
    run recorded for serve's model name and eval's default out, init_from's resolution and a teacher's check."""
    write_split(tmp_path / "tokens", "train", 20_000, seed=1)
    run = tmp_path / "run"
    load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={run}"]).save(run)
    given = run / "train_config.json"
    assert run_folder(given) == run == run_folder(run)
    assert run_folder(tmp_path / "train_config.json") == tmp_path / "train_config.json"  # no such file: itself
    result = CliRunner().invoke(app, ["checkpoint", "export", str(given), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert f"{run}: the run has saved no checkpoint yet" in " ".join(result.output.split())

    save_checkpoint(run, Transformer(micro_config()), {"step": 2}, keep=1)
    newest = run / "checkpoints" / "step_2"
    lines = [{"step": step, "loss": 4.0 - step, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.01} for step in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(app, ["checkpoint", "export", str(given), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{given}: using the run's newest checkpoint, {newest}\n")
    assert (tmp_path / "x" / "model.safetensors").is_file() and not (tmp_path / "x" / "train_state.pt").exists()
    result = CliRunner().invoke(app, ["report", str(given), "--no-samples"])
    assert (result.exit_code, result.output) == (0, f"wrote {run / 'report.md'}\n")
    result = CliRunner().invoke(app, ["plot", str(given)])
    assert (result.exit_code, result.output) == (0, f"wrote {run / 'curves.png'}\n")

    ctx = typer.Context(typer.main.get_command(app))  # what serve names the model after and eval writes under
    assert run_to_checkpoint(ctx, str(given)) == str(newest)
    assert run_given(ctx, newest) == run
    written = []
    monkeypatch.setattr("seekstack.eval.evaluate.evaluate", lambda *args: {"wall_s": 0.0})
    monkeypatch.setattr("seekstack.eval.evaluate.write_results", lambda report, out: written.append(out) or 1 / 0)
    CliRunner().invoke(app, ["eval", str(given)])
    assert written == [run / "eval" / "results"]
    other = tmp_path / "other"
    config = load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={other}", f"init_from={given}"])
    assert config.init_from == str(newest)
    save_checkpoint(run, Transformer(micro_config()), {"step": 4}, keep=2)  # the run trains on: a resume keeps step_2
    told = []
    kept = _checkpoints_of_runs(TrainConfig, {"init_from": str(given)}, told.append, {"init_from": str(newest)})
    assert kept == {"init_from": str(newest)}
    assert told == [
        f"init_from={given}: the resumed run keeps {newest}, the checkpoint it started with (newest: "
        f"{run / 'checkpoints' / 'step_4'})"
    ]


def test_two_step_folders_of_one_step_are_refused_naming_both_as_no_guess_is_made(tmp_path):
    """A run holding step_3 and step_03 (a copy renamed by hand) had every listing take the one the file system listed
    last as its step 3: `seekstack info RUN` described either model, a --resume went on from either. The run's
    checkpoints/ folder given for it is told the same (run_folder raised the refusal bare, a traceback, before any
    command's error handling), and a command that reads no checkpoint (plot) takes it for the run."""
    write_split(tmp_path / "tokens", "train", 20_000, seed=1)
    run = tmp_path / "run"
    load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={run}"]).save(run)
    save_checkpoint(run, Transformer(micro_config()), {"step": 3}, keep=1)
    shutil.copytree(run / "checkpoints" / "step_3", run / "checkpoints" / "step_03")
    refusal = (
        f"{run / 'checkpoints'}: step_03 and step_3 are both step 3: remove or rename one (a run saves step_3), so "
        "that the step names one checkpoint"
    )
    with pytest.raises(CheckpointError) as refused:
        step_folders(run)
    assert str(refused.value) == refusal
    result = CliRunner().invoke(app, ["train", f"out_dir={run}", "--resume"])
    assert (result.exit_code, " ".join(result.output.split())) == (1, f"error: {refusal}")
    for given in (run, run / "checkpoints"):
        result = CliRunner().invoke(app, ["checkpoint", "export", str(given), "--out", str(tmp_path / "x")])
        assert result.exit_code == 2
        assert refusal in " ".join(result.output.split())
        with pytest.raises(ConfigError) as refused:
            load_train_config(
                None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={tmp_path / 'b'}", f"init_from={given}"]
            )
        assert str(refused.value) == f"field 'init_from': {refusal}"
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0, "lr": 1e-3}) + "\n")
    result = CliRunner().invoke(app, ["plot", str(run / "checkpoints")])
    assert (result.exit_code, result.output) == (0, f"wrote {run / 'curves.png'}\n")
    shutil.rmtree(run / "checkpoints" / "step_03")
    assert step_folders(run) == [run / "checkpoints" / "step_3"]


def test_a_runs_checkpoints_folder_given_names_what_is_named_after_the_run_by_the_run(tmp_path, monkeypatch):
    """`seekstack serve --model RUN/checkpoints` served the model as 'checkpoints' and `seekstack eval RUN/checkpoints`
    wrote RUN/checkpoints/eval/results, where report reads RUN/eval/results; `plot`/`report RUN/checkpoints` said "no
    metrics.jsonl in RUN/checkpoints", though every command taking a model took the folder for the run."""
    run = tmp_path / "run"
    save_checkpoint(run, Transformer(micro_config()), {"step": 2}, keep=1)
    lines = [{"step": step, "loss": 4.0 - step, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.01} for step in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    given = run / "checkpoints"
    assert run_folder(given) == run
    assert run_folder(given / "step_2") == given / "step_2"
    ctx = typer.Context(typer.main.get_command(app))
    assert run_to_checkpoint(ctx, str(given)) == str(given / "step_2")
    assert run_given(ctx, given / "step_2") == run
    written = []
    monkeypatch.setattr("seekstack.eval.evaluate.evaluate", lambda *args: {"wall_s": 0.0})
    monkeypatch.setattr("seekstack.eval.evaluate.write_results", lambda report, out: written.append(out) or 1 / 0)
    CliRunner().invoke(app, ["eval", str(given)])
    assert written == [run / "eval" / "results"]
    result = CliRunner().invoke(app, ["plot", str(given)])
    assert (result.exit_code, result.output) == (0, f"wrote {run / 'curves.png'}\n")


def test_a_step_folder_whose_number_is_padded_is_the_step_a_resume_names_and_a_save_replaces(tmp_path):
    """A run's listings named a step_04 (renamed by hand) as its step 4, but `--resume-from 4` and `--resume-from
    step_04` were refused ("RUN/checkpoints/step_4: no such folder; the run RUN holds step_2, step_04"), and a run
    resumed from step 2 saved its step 4 as step_4 beside step_04: two folders of one step."""
    run, model = tmp_path / "run", Transformer(micro_config())
    for step in (2, 4):
        save_checkpoint(run, model, {"step": step}, keep=2)
    (run / "checkpoints" / "step_4").rename(run / "checkpoints" / "step_04")
    assert step_dir(run, 4) == run / "checkpoints" / "step_04"
    assert step_dir(run, 6) == run / "checkpoints" / "step_6"
    assert save_checkpoint(run, model, {"step": 4}, keep=2, left_after=2) == run / "checkpoints" / "step_04"
    assert [folder.name for folder in step_folders(run)] == ["step_2", "step_04"]
