"""Specifications of a run's configuration as a user meets it: nested overrides, resume from the saved config,
a schedule that continues when a resumed run is given more steps, paths relative to the config file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from seekstack.adapters.training import LoraTrainConfig
from seekstack.cli import app
from seekstack.config import preset
from seekstack.posttrain.config import GRPOConfig, SFTConfig
from seekstack.schema import ConfigError
from seekstack.train.config import CONFIG_FILE, TrainConfig, load_train_config, resolve_train_config
from seekstack.train.runs import TRAIN_STATE_FILE, list_checkpoints
from tests.posttrain.support import byte_tokenizer, micro_checkpoint
from tests.train.test_trainer import MICRO_MODEL, read_metrics, write_split


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards")
    write_split(path, "train", 20_000, seed=1)
    return path


def micro_overrides(data_dir: Path, out_dir: Path, **changes) -> list[str]:
    values = dict(
        data_dir=data_dir, out_dir=out_dir, seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, eval_every=0,
        save_every=3, keep_checkpoints=2, lr=3e-3, min_lr=3e-4,
    ) | changes  # fmt: skip
    return [*(f"model.{key}={value}" for key, value in MICRO_MODEL.items()), *(f"{k}={v}" for k, v in values.items())]


def test_nested_override_of_an_unknown_model_field_names_it_and_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="has no field 'hidden_sise'; did you mean 'hidden_size'\\? known fields are"):
        load_train_config(None, ["model.hidden_sise=64"])
    with pytest.raises(ConfigError, match="field 'hidden_size' has value 0: input should be greater than 0"):
        load_train_config(None, ["model.hidden_size=0"])


def test_a_dotted_override_of_a_field_that_is_no_mapping_gives_its_type_and_how_to_set_it() -> None:
    """`betas.1=0.99` was answered "field 'betas' is not a mapping", which said neither what betas is nor how to
    set one of its values."""
    with pytest.raises(
        ConfigError,
        match=r"override 'betas.1=0.99': field 'betas' \(tuple\[float, float\]\) is not a mapping of keys: give it "
        r"whole, betas=VALUE",
    ):
        load_train_config(None, ["betas.1=0.99"])


def test_an_unknown_key_in_a_file_or_an_override_is_answered_with_the_closest_known_one(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_step: 5\n")
    with pytest.raises(ConfigError, match=f"{config_file}: unknown field 'max_step'; did you mean 'max_steps'\\?"):
        load_train_config(config_file)
    with pytest.raises(ConfigError, match="unknown field 'warmup'; did you mean 'warmup_steps'\\? known fields are"):
        load_train_config(None, ["warmup=5"])
    with pytest.raises(ConfigError, match="unknown field 'zzz'; known fields are") as far_from_any:
        load_train_config(None, ["zzz=5"])
    assert "did you mean" not in str(far_from_any.value)


def test_a_mapping_override_without_a_space_after_the_colon_shows_the_text_and_the_spaced_form() -> None:
    from seekstack.distill.config import DistillConfig
    from seekstack.schema import load_config

    with pytest.raises(ConfigError, match=r"'\{5:1\}' .* reads 5:1 as the base-60 number 301 .* write '\{5: 1\}'"):
        load_config(DistillConfig, None, ["feature_layers={5:1}"])
    with pytest.raises(ConfigError, match=r"reads 6:2 as the base-60 number 362 .* write '\{5: 1, 6: 2\}'"):
        load_config(DistillConfig, None, ["feature_layers={5: 1, 6:2}"])
    assert load_config(DistillConfig, None, ["feature_layers={5: 1}"]).feature_layers == {5: 1}
    assert load_config(DistillConfig, None, ['model.rope_scaling={rope_type: "1:2"}']).model_overrides == {
        "rope_scaling": {"rope_type": "1:2"}
    }  # a colon inside a quoted value is the user's text, not a key


def test_model_overrides_written_in_a_file_are_checked_like_overrides(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("model_overrides:\n  hidden_sise: 64\n")
    with pytest.raises(ConfigError, match=r"run.yaml: field 'model_overrides': ModelConfig has no field 'hidden_sise'"):
        load_train_config(tmp_path / "run.yaml")


def test_a_model_override_typo_is_told_the_model_fields_a_user_sets_in_a_file_and_on_the_command_line(
    tmp_path: Path,
) -> None:
    """ModelConfig.extra holds a config.json's unknown keys: the command line's list offered it (`model.extra=3`
    then refused by the preset as no field), where the file's list left it out."""
    (tmp_path / "run.yaml").write_text("model_overrides:\n  hidden_sise: 64\n")
    told = []
    for file, overrides in ((tmp_path / "run.yaml", []), (None, ["model.hidden_sise=64"]), (None, ["model.extra=3"])):
        with pytest.raises(ConfigError) as refused:
            load_train_config(file, overrides)
        told.append(str(refused.value).partition("known fields are ")[2])
    assert told[0] == told[1] == told[2]
    assert "extra" not in told[0].split(", ") and "hidden_size" in told[0].split(", ")


def test_a_runs_folder_given_as_the_config_file_is_refused_saying_how_to_continue_the_run(tmp_path: Path) -> None:
    """`train runs/x`, as generate and plot take a run, was told "expected a .yaml, .yml, .toml or .json file"."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text("{}")
    with pytest.raises(ConfigError) as refused:
        load_train_config(tmp_path / "run")
    run = tmp_path / "run"
    assert str(refused.value) == (
        f"{run}: a folder, not a config file (.yaml, .yml, .toml or .json): a run's; continue it with "
        f"`out_dir={run} --resume`, or start from its settings with {run / 'train_config.json'}"
    )
    with pytest.raises(ConfigError, match=r"a folder, not a config file \(.yaml, .yml, .toml or .json\)$"):
        load_train_config(tmp_path)


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    tokenizer = tmp_path / "tok" / "tokenizer.json"  # an absolute path, which stays as it is
    tokenizer.parent.mkdir()
    tokenizer.write_text("{}")
    (tmp_path / "configs" / "run.yaml").write_text(f"data_dir: ../tokens\nout_dir: runs/a\ntokenizer: {tokenizer}\n")
    config = load_train_config(tmp_path / "configs" / "run.yaml", ["seed=3"])
    assert Path(config.data_dir) == tmp_path / "configs" / "../tokens"
    assert Path(config.out_dir) == tmp_path / "configs" / "runs" / "a"
    assert config.tokenizer == str(tokenizer)


def test_write_config_gives_a_file_that_reads_back_to_the_same_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the defaults' relative paths, seen from the folder the file is in
    path = tmp_path / "c.yaml"
    result = CliRunner().invoke(app, ["train", "lr=1e-3", "model.hidden_size=64", "--write-config", str(path)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(path.read_text())
    assert written["lr"] == 0.001 and written["model_overrides"] == {"hidden_size": 64}
    assert load_train_config(path.name) == load_train_config(None, ["lr=1e-3", "model.hidden_size=64"])


def test_write_config_under_torchrun_is_written_and_announced_by_rank_0_alone(
    tmp_path: Path, torchrun_environment
) -> None:
    path = tmp_path / "c.yaml"
    torchrun_environment(1)
    other_rank = CliRunner().invoke(app, ["train", "lr=1e-3", "--write-config", str(path)])
    assert other_rank.exit_code == 0 and other_rank.output == "" and not path.exists()
    torchrun_environment(0)
    rank_0 = CliRunner().invoke(app, ["train", "lr=1e-3", "--write-config", str(path)])
    assert rank_0.exit_code == 0 and rank_0.output == f"wrote the config to {path}\n"
    assert yaml.safe_load(path.read_text())["lr"] == 0.001


def test_write_config_refuses_a_seq_len_longer_than_the_model_s_context_as_the_run_does(tmp_path: Path) -> None:
    path, context = tmp_path / "c.yaml", preset("tiny").max_position_embeddings
    for overrides, longest in (
        ([f"seq_len={context + 1}"], context),
        (["seq_len=300", "model.max_position_embeddings=256"], 256),
    ):
        refused = CliRunner().invoke(app, ["train", *overrides, "--write-config", str(path)])
        assert refused.exit_code == 1 and not path.exists()
        said = refused.stderr.strip()
        seq_len = overrides[0].split("=")[1]
        assert said.endswith(f"field 'seq_len' has value {seq_len}: longer than the model's context "
                             f"(max_position_embeddings {longest})"), said  # fmt: skip
    written = CliRunner().invoke(app, ["train", f"seq_len={context}", "--write-config", str(path)])
    assert written.exit_code == 0 and yaml.safe_load(path.read_text())["seq_len"] == context


def test_a_seq_len_longer_than_the_trained_model_s_context_is_refused_with_the_config(tmp_path: Path) -> None:
    """It was refused once the run had read its data and built the model."""
    context = preset("tiny").max_position_embeddings
    with pytest.raises(ConfigError, match=rf"field 'seq_len' has value {context + 1}: longer than the model's context "
                       rf"\(max_position_embeddings {context}\)"):  # fmt: skip
        resolve_train_config(None, [f"seq_len={context + 1}", f"out_dir={tmp_path / 'run'}"])
    assert resolve_train_config(None, [f"seq_len={context}"]).seq_len == context


def test_a_saved_config_keeps_absolute_paths_so_a_moved_run_still_finds_its_data(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tokenizer = tmp_path / "shared" / "tokenizer.json"  # given absolute
    tokenizer.parent.mkdir()
    tokenizer.write_text("{}")
    paths = [f"tokenizer={tokenizer}", "data_dir=tokens", f"out_dir={tmp_path / 'runs' / 'a'}"]
    load_train_config(None, paths).save("runs/a")
    written = json.loads(Path("runs", "a", CONFIG_FILE).read_text())
    assert (written["tokenizer"], written["data_dir"], written["out_dir"]) == (str(tokenizer), "../../tokens", ".")
    shutil.move("runs/a", "moved")
    moved = load_train_config(tmp_path / "moved" / CONFIG_FILE)  # was: no such file moved/../../shared/tokenizer.json
    assert Path(moved.tokenizer) == tokenizer
    assert Path(moved.out_dir).resolve() == tmp_path / "moved"
    assert Path(moved.data_dir).resolve() == tmp_path.parent / "tokens"  # given relative: it moves with the run


@pytest.mark.parametrize("absolute", [False, True], ids=["relative --config", "absolute --config"])
def test_a_relative_path_in_a_config_file_is_saved_relative_to_the_run_however_the_file_is_named(
    tmp_path, monkeypatch, absolute
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "x.yaml").write_text("data_dir: ../data/tokens\nout_dir: ../runs/a\n")
    config_file = tmp_path / "configs" / "x.yaml" if absolute else Path("configs", "x.yaml")
    load_train_config(config_file).save(tmp_path / "runs" / "a")
    written = json.loads((tmp_path / "runs" / "a" / CONFIG_FILE).read_text())
    assert (written["data_dir"], written["out_dir"]) == ("../../data/tokens", ".")  # was '/.../configs/../data/tokens'


def test_sfts_val_data_in_a_config_file_is_a_path_read_from_the_files_folder_and_saved_relative_to_the_run(
    tmp_path, monkeypatch
) -> None:
    from seekstack.posttrain.config import SFTConfig
    from seekstack.schema import load_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft.yaml").write_text("data: train.jsonl\nval_data: held_out.jsonl\n")
    monkeypatch.chdir(tmp_path / "configs")
    config = load_config(SFTConfig, tmp_path / "configs" / "sft.yaml")
    assert Path(config.val_data).resolve() == tmp_path / "configs" / "held_out.jsonl"  # was of the cwd, as given
    config.save(tmp_path / "runs" / "sft")
    written = json.loads((tmp_path / "runs" / "sft" / CONFIG_FILE).read_text())
    assert written["val_data"] == "../../configs/held_out.jsonl"  # as `report` reads it: from the run's folder


def test_resume_reads_the_saved_config_warns_of_changes_and_keeps_the_decay_continuous(data_dir, tmp_path):
    out_dir = tmp_path / "run"
    runner = CliRunner()
    first = runner.invoke(app, ["train", *micro_overrides(data_dir, out_dir)])
    assert first.exit_code == 0, first.output
    assert "loss" in first.output and "(total" in first.output  # next-token loss, then the total
    first_rates = [row["lr"] for row in read_metrics(out_dir) if "lr" in row]
    (out_dir / "checkpoints" / "step_6" / TRAIN_STATE_FILE).unlink()  # a save cut short: resume half way, where
    # the decay is under way, saying the newest folder is passed over
    # Only out_dir and the new max_steps: data_dir, batch, lengths and the model come from train_config.json.
    resumed = runner.invoke(app, ["train", f"out_dir={out_dir}", "max_steps=12", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "warning: resuming with max_steps=12 (the run last ran with 6)" in resumed.output
    assert resumed.output.count("warning:") == 1
    resumed_line = f"resumed from step 3 ({out_dir / 'checkpoints' / 'step_3'}); passed over step_6 (no train_state.pt)"
    assert resumed_line in resumed.output
    saved = load_train_config(out_dir / CONFIG_FILE)
    assert (saved.max_steps, saved.batch_size, saved.seq_len) == (12, 4, 32)
    assert Path(saved.data_dir).resolve() == data_dir.resolve()
    assert json.loads((out_dir / CONFIG_FILE).read_text())["out_dir"] == "."  # paths relative to the file
    rates = [row["lr"] for row in read_metrics(out_dir) if "lr" in row]
    assert len(rates) == 12 and rates[:4] == first_rates[:4]  # the step the run resumes at keeps its rate
    after_warmup = rates[2:]
    assert all(b < a for a, b in zip(after_warmup, after_warmup[1:], strict=False)), rates  # one decay, no jump
    assert rates[-1] == pytest.approx(3e-4)  # min_lr at the new last step
    logged = read_metrics(out_dir)
    again = runner.invoke(app, ["train", f"out_dir={out_dir}", "--resume"])  # it said only "trained to step 12"
    assert again.exit_code == 0 and read_metrics(out_dir) == logged, again.output  # nothing trained
    assert "the run is at max_steps=12 already: give max_steps above it to train on" in again.output


def test_a_finished_run_resumed_trains_nothing_and_measures_and_warns_of_nothing(data_dir, tmp_path):
    """A run resumed at its max_steps (HF Trainer: nothing to train, it says so) measured the peak speed for an MFU
    no step would report and warned again that warmup_steps is not below max_steps, for a schedule it would not
    run: it now says where it is and what to give to train on, and nothing more."""
    out_dir, runner = tmp_path / "run", CliRunner()
    first = runner.invoke(app, ["train", *micro_overrides(data_dir, out_dir, max_steps=2, warmup_steps=2)])
    assert first.exit_code == 0, first.output
    assert "MFU against a peak of" in first.output
    assert "warning: warmup_steps=2 is not below max_steps=2" in first.output
    again = runner.invoke(app, ["train", f"out_dir={out_dir}", "--resume"])
    assert again.exit_code == 0, again.output
    checkpoint = out_dir / "checkpoints" / "step_2"
    assert again.output.splitlines()[-2:] == [
        f"resumed from step 2 ({checkpoint}); the run is at max_steps=2 already: give max_steps above it to train on",
        f"trained to step 2; checkpoint: {checkpoint}",
    ]
    assert "MFU" not in again.output and "warning" not in again.output, again.output


def test_resume_from_takes_a_step_or_a_checkpoint_folder_and_names_a_step_the_run_has_not(data_dir, tmp_path):
    """--resume took no checkpoint: going back to an earlier one (torchtitan's --checkpoint.load_step, nanochat's
    --resume-from-step) needed the library's train(config, resume=path)."""
    out_dir, runner = tmp_path / "run", CliRunner()
    assert runner.invoke(app, ["train", *micro_overrides(data_dir, out_dir)]).exit_code == 0
    missing = runner.invoke(app, ["train", f"out_dir={out_dir}", "--resume-from", "4"])
    assert missing.exit_code == 1
    assert f"{out_dir / 'checkpoints' / 'step_4'}: no such folder; the run {out_dir} holds step_3, step_6" in (
        missing.output
    )
    # step_3 as the listing above names it (was: "step_3: no such folder", a folder looked for where the command ran)
    for given in ("3", "step_3", str(out_dir / "checkpoints" / "step_3")):
        resumed = runner.invoke(app, ["train", f"out_dir={out_dir}", "--resume-from", given])
        assert resumed.exit_code == 0, resumed.output
        assert (
            f"resumed from step 3 ({out_dir / 'checkpoints' / 'step_3'}); its first save deletes the run's later "
            f"checkpoints step_6, of the history it leaves (move them out of {out_dir / 'checkpoints'} to keep them)\n"
            in resumed.output
        )  # the whole line: no note of another run's checkpoint on the run's own
        assert [row["step"] for row in read_metrics(out_dir)] == [1, 2, 3, 4, 5, 6]  # steps 4 to 6 trained again


def test_a_resume_with_no_checkpoint_to_go_on_from_is_refused_before_its_warnings(data_dir, tmp_path, monkeypatch):
    """'warning: resuming with max_steps=8 (the run last ran with 6)' was told before the refusal of that resume
    ('step_0: no such folder'), as if the run had gone on with it. A folder written as a relative path, `./latest` or
    `latest/`, got the usage error for a bare word (Path drops the "./" and the trailing "/": one part left)."""
    out_dir, runner = tmp_path / "run", CliRunner()
    assert runner.invoke(app, ["train", *micro_overrides(data_dir, out_dir)]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    refusals = {
        ("--resume-from", "0"): f"{out_dir / 'checkpoints' / 'step_0'}: no such folder; the run {out_dir} holds",
        ("--resume-from", str(tmp_path / "nowhere")): f"{tmp_path / 'nowhere'}: no such folder",
        ("--resume-from", "./latest"): "error: latest: no such folder",
        ("--resume-from", "latest/"): "error: latest: no such folder",
    }
    shutil.copytree(out_dir, tmp_path / "unsaved")
    shutil.rmtree(tmp_path / "unsaved" / "checkpoints")
    for args, refusal in [*refusals.items(), (("--resume",), "the run has saved no checkpoint yet")]:
        run = tmp_path / "unsaved" if args == ("--resume",) else out_dir
        result = runner.invoke(app, ["train", f"out_dir={run}", "max_steps=8", *args])
        assert result.exit_code == 1
        assert result.output.startswith("error: ") and refusal in result.output
        assert "warning" not in result.output, result.output
    resumed = runner.invoke(app, ["train", f"out_dir={out_dir}", "max_steps=8", "--resume-from", "3"])
    assert resumed.exit_code == 0, resumed.output  # a resume that goes ahead is told its warnings
    assert resumed.output.startswith("warning: resuming with max_steps=8 (the run last ran with 6)\n")


@pytest.mark.parametrize("given", ["latest", "-3"])
def test_resume_from_neither_a_step_nor_a_folder_is_a_usage_error_naming_what_it_takes(tmp_path, given):
    """`--resume-from latest` (HF's resume_from_checkpoint=True) or -3 was told "latest: no such folder", as if a
    folder had been meant, naming neither the option nor what it takes."""
    result = CliRunner().invoke(app, ["train", f"out_dir={tmp_path}", "--resume-from", given])
    assert result.exit_code == 2
    assert (
        f"--resume-from {given}: neither a step of the run (40, or step_40 as its listings name it) nor a checkpoint "
        "folder (no such folder); --resume continues from the run's newest checkpoint"
        in " ".join(result.output.split())
    )


def test_resume_from_another_runs_checkpoint_into_a_fresh_out_dir_continues_that_run_there(data_dir, tmp_path):
    """A fresh out_dir was refused for want of its train_config.json, where HF's resume_from_checkpoint=path and
    torchtitan's initial_load_path start an output folder from another run's checkpoint: it takes that run's config."""
    first, second, runner = tmp_path / "first", tmp_path / "second", CliRunner()
    assert runner.invoke(app, ["train", *micro_overrides(data_dir, first)]).exit_code == 0
    checkpoint = first / "checkpoints" / "step_3"
    resumed = runner.invoke(app, ["train", f"out_dir={second}", "--resume-from", str(checkpoint)])
    assert resumed.exit_code == 0, resumed.output
    assert "warning" not in resumed.output  # HF's resume_from_checkpoint into a new output_dir is no oddity
    assert (
        f"resumed from step 3 ({checkpoint}); a checkpoint of the run {first}, which is left as it was: this "
        f"run goes on in {second} (its checkpoints, metrics.jsonl and train_config.json), where --resume continues "
        "it\n" in resumed.output
    )
    assert [row["step"] for row in read_metrics(second)] == [4, 5, 6]
    assert [row["loss"] for row in read_metrics(second)] == [row["loss"] for row in read_metrics(first)][3:]
    assert [path.name for path in list_checkpoints(second)] == ["step_6"]
    assert [path.name for path in list_checkpoints(first)] == ["step_3", "step_6"]  # the first run is left as it was
    shutil.copytree(checkpoint, tmp_path / "copied")  # a checkpoint outside any run has no config to take
    bare = runner.invoke(app, ["train", f"out_dir={tmp_path / 'third'}", "--resume-from", str(tmp_path / "copied")])
    assert bare.exit_code == 1
    assert f"{tmp_path / 'copied'} is no checkpoint of a run holding one" in bare.output
    assert f"init_from={tmp_path / 'copied'}" in bare.output


def test_another_runs_checkpoint_into_an_out_dir_holding_a_run_is_refused_leaving_both_runs_as_they_were(
    data_dir, tmp_path
):
    """--resume-from OTHER/checkpoints/step_3 with an out_dir holding another run trimmed that run's metrics.jsonl
    and went on from the other run's weights, two runs spliced into one log (lora train refused it)."""
    from seekstack.train.trainer import train

    first, second, runner = tmp_path / "first", tmp_path / "second", CliRunner()
    assert runner.invoke(app, ["train", *micro_overrides(data_dir, first)]).exit_code == 0
    assert runner.invoke(app, ["train", *micro_overrides(data_dir, second, lr=1e-3)]).exit_code == 0
    logged, saved = read_metrics(second), (second / CONFIG_FILE).read_text()
    checkpoint = first / "checkpoints" / "step_3"
    refused = runner.invoke(app, ["train", f"out_dir={second}", "max_steps=8", "--resume-from", str(checkpoint)])
    assert refused.exit_code == 1
    assert refused.output == (
        f"error: {checkpoint} is a checkpoint of the run {first}, and {second} holds another run (its "
        f"{CONFIG_FILE}): going on from it there would trim that run's metrics.jsonl and log {first}'s steps after "
        f"it, two runs in one; continue {first} into a folder that holds no run yet, or {second} from one of its "
        f"own checkpoints ({second / 'checkpoints'}/step_N: --resume-from N, or --resume)\n"
    )
    with pytest.raises(ValueError, match=f"{second} holds another run"):  # the library's train alike
        train(load_train_config(second / CONFIG_FILE), resume=checkpoint)
    assert read_metrics(second) == logged and (second / CONFIG_FILE).read_text() == saved
    assert [path.name for path in list_checkpoints(second)] == ["step_3", "step_6"]
    own = runner.invoke(app, ["train", f"out_dir={second}", "--resume-from", str(second / "checkpoints" / "step_3")])
    assert own.exit_code == 0, own.output  # the run's own checkpoint, as a folder, goes on
    assert [row["step"] for row in read_metrics(second)] == [1, 2, 3, 4, 5, 6]


def test_keep_checkpoints_0_keeps_every_checkpoint_as_torchtitans_keep_latest_k_0(data_dir, tmp_path):
    """keep_checkpoints=0 was refused ('input should be greater than 0'), where torchtitan's keep_latest_k=0 and HF's
    save_total_limit=None keep every checkpoint: no setting kept them all."""
    out_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *micro_overrides(data_dir, out_dir, save_every=2, keep_checkpoints=0)])
    assert result.exit_code == 0, result.output
    assert [path.name for path in list_checkpoints(out_dir)] == ["step_2", "step_4", "step_6"]


def test_a_second_resume_warns_of_changes_from_the_config_the_run_last_ran_with(tmp_path) -> None:
    out = tmp_path / "run"
    (tmp_path / "tokens").mkdir()  # a resume needs the run's data
    load_train_config(None, [f"out_dir={out}", f"data_dir={tmp_path / 'tokens'}", "max_steps=6"]).save(out)
    warnings: list[str] = []
    for max_steps in (12, 18):  # each start and resume saves the config it runs with, as the trainer does
        overrides = [f"out_dir={out}", f"max_steps={max_steps}"]
        resolve_train_config(None, overrides, resume=True, warn=warnings.append).save(out)
    assert warnings == [
        "resuming with max_steps=12 (the run last ran with 6)",
        "resuming with max_steps=18 (the run last ran with 12)",
    ]


def test_a_resume_given_another_seed_is_refused_since_the_checkpoint_fixes_its_data_and_random_numbers(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "tokens").mkdir()  # a resume needs the run's data
    load_train_config(None, [f"out_dir={out}", f"data_dir={tmp_path / 'tokens'}", "seed=3"]).save(out)
    with pytest.raises(ConfigError, match="field 'seed' must be the run's 3 on resume: a resumed run draws its data"):
        resolve_train_config(None, [f"out_dir={out}", "seed=5"], resume=True)
    assert resolve_train_config(None, [f"out_dir={out}", "seed=3"], resume=True).seed == 3
    assert json.loads((out / CONFIG_FILE).read_text())["seed"] == 3  # the saved config still tells the run's seed


def test_a_resume_given_the_same_relative_paths_warns_of_no_change(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the saved paths are relative to run/, these to the working folder
    for folder in ("ck", "other_ck", "tok", "tokens"):
        (tmp_path / folder).mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    paths = ["init_from=ck", "tokenizer=tok", "data_dir=tokens", "out_dir=run"]
    load_train_config(None, paths).save("run")
    assert json.loads(Path("run", CONFIG_FILE).read_text())["init_from"] == "../ck"
    warnings: list[str] = []
    resolve_train_config(None, paths, resume=True, warn=warnings.append)
    resolve_train_config(None, ["init_from=./ck", *paths[1:]], resume=True, warn=warnings.append)
    assert warnings == []  # was: 'resuming with init_from="ck" (the run last ran with "run/../ck")', and for each path
    resolve_train_config(None, ["init_from=other_ck", *paths[1:]], resume=True, warn=warnings.append).save("run")
    assert warnings == [
        "init_from=other_ck is not used on resume: the run trains on from its own checkpoint (it started from "
        f"ck, which its {CONFIG_FILE} keeps saying)"
    ]
    assert json.loads(Path("run", CONFIG_FILE).read_text())["init_from"] == "../ck"  # was ../other_ck, never used


def test_a_resume_given_init_from_keeps_a_run_from_scratch_recorded_as_one(tmp_path) -> None:
    out, other = tmp_path / "run", tmp_path / "other_ck"
    for folder in ("tokens", "other_ck"):
        (tmp_path / folder).mkdir()
    load_train_config(None, [f"out_dir={out}", f"data_dir={tmp_path / 'tokens'}"]).save(out)
    warnings: list[str] = []  # a job script re-submitted with its init_from still resumes
    resumed = resolve_train_config(None, [f"out_dir={out}", f"init_from={other}"], resume=True, warn=warnings.append)
    assert resumed.init_from == ""
    assert warnings == [
        f"init_from={other} is not used on resume: the run trains on from its own checkpoint (it started from "
        f"scratch, which its {CONFIG_FILE} keeps saying)"
    ]


def test_a_run_copied_to_another_depth_names_its_saved_config_for_a_lost_path_and_resumes_given_it_again(
    tmp_path, monkeypatch
) -> None:
    """rl with beta > 0 reads its reference model from init_from on resume (pretraining, which reads nothing of it
    then, resumes: test_a_resumed_run_needs_its_init_from_only_where_it_reads_it_then)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ck").mkdir(parents=True)
    byte_tokenizer(tmp_path / "tok")  # given absolute: the copy still finds it
    settings = [f"tokenizer={tmp_path / 'tok'}", "beta=0.04"]
    resolve_train_config(None, ["init_from=runs/ck", *settings, "out_dir=runs/x/rl"], cls=GRPOConfig).save(
        "runs/x/rl"
    )  # init_from saved as ../../ck
    shutil.copytree("runs/x/rl", "o/rl")  # its ../../ck is now o/../../ck
    with pytest.raises(ConfigError) as refused:
        resolve_train_config(None, ["out_dir=o/rl"], resume=True, cls=GRPOConfig)
    assert str(refused.value).startswith(f"o/rl/{CONFIG_FILE}: field 'init_from' must be an existing checkpoint folder")
    assert "(a resumed run reads the reference model of its KL penalty (beta > 0) from it)" in str(refused.value)
    assert str(refused.value).endswith("give init_from=... on the command line to replace it")
    resumed = resolve_train_config(None, ["out_dir=o/rl", "init_from=runs/ck"], resume=True, cls=GRPOConfig)
    assert resumed.init_from == "runs/ck"


@pytest.mark.parametrize(
    ("cls", "settings", "read"),
    [
        (TrainConfig, [], ""),
        (SFTConfig, [], "its tokenizer (tokenizer is unset)"),
        (SFTConfig, ["tokenizer=tok"], ""),
        (GRPOConfig, ["tokenizer=tok"], ""),
        (GRPOConfig, ["beta=0.04"], "the reference model of its KL penalty (beta > 0) and its tokenizer (tokenizer is "
         "unset)"),
        (LoraTrainConfig, [], "the base model its adapter trains on"),
    ],
)  # fmt: skip
def test_a_resumed_run_needs_its_init_from_only_where_it_reads_it_then(tmp_path, monkeypatch, cls, settings, read):
    """A resume was refused whenever the init_from its run started from was gone, though pretraining (and sft or rl
    given a tokenizer, beta 0) trains on from its own checkpoint; a stage that reads it then says what it reads."""
    monkeypatch.chdir(tmp_path)
    byte_tokenizer(tmp_path / "tok")
    micro_checkpoint(tmp_path / "ck")
    Path("tokens").mkdir()
    given = ["init_from=ck", "data_dir=tokens", "out_dir=run", *settings]
    resolve_train_config(None, given, cls=cls).save("run")
    shutil.rmtree("ck")
    if read:
        with pytest.raises(ConfigError) as refused:
            resolve_train_config(None, ["out_dir=run"], resume=True, cls=cls)
        assert "field 'init_from' must be an existing checkpoint folder" in str(refused.value)
        assert f"(a resumed run reads {read} from it)" in str(refused.value)
    else:
        resumed = resolve_train_config(None, ["out_dir=run"], resume=True, cls=cls)
        assert Path(resumed.init_from).resolve() == tmp_path / "ck"  # what train_config.json keeps saying
        gone = "field 'init_from' must be an existing checkpoint folder, not 'ck'$"  # a new run from it: refused
        with pytest.raises(ConfigError, match=gone):
            resolve_train_config(None, ["init_from=ck", "data_dir=tokens", "out_dir=new", *settings], cls=cls)


def test_a_run_moved_to_another_depth_names_its_saved_config_for_its_lost_data_dir_and_resumes_given_it_again(
    tmp_path, monkeypatch
) -> None:
    """A moved run's relative data_dir was said missing at its resolved path, without naming the saved config that
    holds it or the override that replaces it (as init_from's error does)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokens").mkdir()
    load_train_config(None, ["data_dir=tokens", "out_dir=runs/a"]).save("runs/a")  # saved as ../../tokens
    shutil.move("runs/a", "a")  # its ../../tokens is now a/../../tokens
    with pytest.raises(ConfigError) as refused:
        resolve_train_config(None, ["out_dir=a"], resume=True)
    said = str(refused.value)
    assert said.startswith(f"a/{CONFIG_FILE}: field 'data_dir' must be an existing folder of token shards")
    assert f"nothing at {tmp_path.parent / 'tokens'}" in said
    assert said.endswith("give data_dir=... on the command line to replace it")
    assert "relative paths are relative to the run's folder" in said
    assert resolve_train_config(None, ["out_dir=a", "data_dir=tokens"], resume=True).data_dir == "tokens"


def test_a_resumed_runs_lost_absolute_path_is_not_blamed_on_the_run_being_moved(tmp_path) -> None:
    """A data_dir saved absolute and deleted since was refused on resume with "(its relative paths are relative to the
    run's folder, so a copied or moved run can lose what they name)", though the run was neither, nor the path
    relative; that note is for a path saved relative alone."""
    (tmp_path / "tokens").mkdir()
    load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={tmp_path / 'a'}"]).save(tmp_path / "a")
    (tmp_path / "tokens").rmdir()
    with pytest.raises(ConfigError) as refused:
        resolve_train_config(None, [f"out_dir={tmp_path / 'a'}"], resume=True)
    said = str(refused.value)
    assert said.startswith(f"{tmp_path / 'a' / CONFIG_FILE}: field 'data_dir' must be an existing folder of token")
    assert said.endswith(
        f"(nothing at {tmp_path / 'tokens'}); the run's saved config holds this value: give data_dir=... on the "
        "command line to replace it"
    )


def test_an_unknown_field_in_a_resumed_runs_saved_config_names_that_file(tmp_path) -> None:
    """A train_config.json with a field this version lacks (another version's, or edited in by hand) was refused
    with "unknown field 'old_knob'; ..." and no word of the file, which the user never gave."""
    (tmp_path / "tokens").mkdir()
    load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={tmp_path / 'a'}"]).save(tmp_path / "a")
    saved = tmp_path / "a" / CONFIG_FILE
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "max_step": 5}))
    with pytest.raises(ConfigError, match=f"^{saved}: unknown field 'max_step'; did you mean 'max_steps'\\?"):
        resolve_train_config(None, [f"out_dir={tmp_path / 'a'}"], resume=True)


def test_a_saved_value_that_a_resume_override_breaks_is_named_without_a_word_on_paths(tmp_path) -> None:
    """lr=1e-4 below the saved min_lr=3e-4: the saved config and min_lr are named; the note that a moved run loses
    its relative paths, said of every field, is said of path fields only."""
    (tmp_path / "tokens").mkdir()
    load_train_config(None, [f"data_dir={tmp_path / 'tokens'}", f"out_dir={tmp_path / 'a'}"]).save(tmp_path / "a")
    with pytest.raises(ConfigError) as refused:
        resolve_train_config(None, [f"out_dir={tmp_path / 'a'}", "lr=1e-4"], resume=True)
    assert str(refused.value) == (
        f"{tmp_path / 'a' / CONFIG_FILE}: field 'min_lr' must be at most lr=0.0001, not 0.0003; the run's saved "
        "config holds this value: give min_lr=... on the command line to replace it"
    )


def test_a_path_given_absolute_is_saved_absolute_whatever_this_process_resolved_before(tmp_path, monkeypatch) -> None:
    """Which paths were given relative is read from the values themselves, not from earlier runs of the process (a
    resume of run a, whose saved out_dir '.' names its folder, made run b save a's checkpoint relative)."""
    monkeypatch.chdir(tmp_path)
    Path("tokens").mkdir()
    load_train_config(None, ["data_dir=tokens", "out_dir=runs/a"]).save("runs/a")
    resolve_train_config(None, [f"out_dir={tmp_path / 'runs' / 'a'}"], resume=True)
    checkpoint = str(tmp_path / "runs" / "a" / "checkpoints" / "step_100")
    Path(checkpoint).mkdir(parents=True)
    load_train_config(None, [f"init_from={checkpoint}", "data_dir=tokens", "out_dir=elsewhere/b"]).save("elsewhere/b")
    assert json.loads(Path("elsewhere", "b", CONFIG_FILE).read_text())["init_from"] == checkpoint


def test_resume_without_a_saved_config_says_where_it_looked(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", f"out_dir={tmp_path / 'none'}", "--resume"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'none' / CONFIG_FILE}: no such file" in result.output


def test_resume_from_a_folder_that_is_no_training_checkpoint_into_a_fresh_out_dir_says_so_before_the_config(tmp_path):
    """`train out_dir=FRESH --resume-from ./nowhere` was told "FRESH/train_config.json: no such file; ... copy its
    run's train_config.json into FRESH", the config being looked for before the folder: a folder that does not
    exist, or holds a model rather than a training checkpoint, is told so first."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    refusals = {
        "nowhere": f"error: {tmp_path / 'nowhere'}: no such folder",
        "model": f"error: {tmp_path / 'model'}: holds no {TRAIN_STATE_FILE}: it is a model checkpoint, not a training "
        f"one (load it with load_pretrained, or start a new run from it with init_from={tmp_path / 'model'})",
    }
    for folder, refusal in refusals.items():
        given = str(tmp_path / folder)
        result = CliRunner().invoke(app, ["train", f"out_dir={tmp_path / 'fresh'}", "--resume-from", given])
        assert result.exit_code == 1
        assert " ".join(result.output.split()) == refusal, result.output  # the whole message, wrapped or not
    assert not (tmp_path / "fresh").exists()


def test_a_run_can_start_from_an_exported_checkpoint(data_dir, tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["train", *micro_overrides(data_dir, tmp_path / "a", max_steps=3)])
    assert first.exit_code == 0, first.output
    exported = tmp_path / "exported"
    result = runner.invoke(app, ["checkpoint", "export", str(tmp_path / "a"), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert (exported / "model.safetensors").is_file() and not (exported / "train_state.pt").exists()
    checkpoint = list_checkpoints(tmp_path / "a")[-1]
    (checkpoint / "eval").mkdir()  # what `seekstack eval` leaves in a checkpoint: not part of the model
    (checkpoint / "eval" / "results.json").write_text("{}")
    (checkpoint / "distill_state.pt").write_bytes(b"a post-training run's own state: not part of the model either")
    again = runner.invoke(app, ["checkpoint", "export", str(checkpoint), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in exported.iterdir())
    (checkpoint / "distill_state.pt").unlink()
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    with open(damaged / "model.safetensors", "r+b") as weights:
        weights.truncate(weights.seek(0, 2) // 2)
    refused = runner.invoke(app, ["checkpoint", "export", str(damaged), "--out", str(tmp_path / "none")])
    assert refused.exit_code == 1 and "model.safetensors: not a valid safetensors file" in refused.output
    assert not (tmp_path / "none").exists()
    step = tmp_path / "other_run_step"  # another run's checkpoint: its training state is not an export's to replace
    shutil.copytree(checkpoint, step)
    onto = runner.invoke(app, ["checkpoint", "export", str(checkpoint), "--out", str(step)])
    assert onto.exit_code == 1 and "holds eval/ and train_state.pt besides the files this command" in onto.output
    assert (step / "train_state.pt").is_file() and (step / "eval" / "results.json").is_file()
    overrides = micro_overrides(data_dir, tmp_path / "b", max_steps=1, lr=1e-12, min_lr=0, warmup_steps=0)
    second = runner.invoke(app, ["train", *overrides, f"init_from={exported}"])
    assert second.exit_code == 0, second.output
    before = [m["lm_loss"] for m in read_metrics(tmp_path / "a") if "lm_loss" in m]
    after = [m["lm_loss"] for m in read_metrics(tmp_path / "b") if "lm_loss" in m]
    fresh = micro_overrides(data_dir, tmp_path / "c", max_steps=1)
    assert runner.invoke(app, ["train", *fresh]).exit_code == 0
    untrained = [m["lm_loss"] for m in read_metrics(tmp_path / "c") if "lm_loss" in m]
    assert after[0] < untrained[0] - 0.05 and after[0] <= before[0]  # the trained weights, not a new model


def test_files_read_exponent_floats_and_a_saved_config_with_a_small_lr_reads_back(tmp_path) -> None:
    (tmp_path / "run.json").write_text('{"lr": 3e-5, "min_lr": 1e-6}')
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nmin_lr: 5E-05\n")
    for name, expected in (("run.json", (3e-5, 1e-6)), ("run.yaml", (1e-3, 5e-5))):
        config = load_train_config(tmp_path / name)
        assert (config.lr, config.min_lr) == expected
    config = load_train_config(None, ["lr=5e-5", "min_lr=5e-5", f"out_dir={tmp_path / 'run'}"])
    saved = load_train_config(config.save(tmp_path / "run"))  # what --resume reads
    assert (saved.lr, saved.min_lr) == (5e-5, 5e-5)
    (tmp_path / "comma.json").write_text('{"lr": 0.001,}')
    with pytest.raises(ConfigError, match="comma.json: cannot be parsed"):
        load_train_config(tmp_path / "comma.json")
    (tmp_path / "twice.yaml").write_text("lr: 1e-3\nmax_steps: 5\nlr: 2e-3\n")  # YAML would keep the last
    with pytest.raises(ConfigError, match="twice.yaml: cannot be parsed \\(key 'lr' is given twice"):
        load_train_config(tmp_path / "twice.yaml")
    (tmp_path / "twice.json").write_text('{"model_overrides": {"hidden_size": 64, "hidden_size": 32}}')  # json too
    with pytest.raises(ConfigError, match="twice.json: cannot be parsed \\(key 'hidden_size' is given twice\\)"):
        load_train_config(tmp_path / "twice.json")


def test_mixture_overrides_are_read_as_config_files_are_and_checked_before_the_run(tmp_path) -> None:
    (tmp_path / "run.yaml").write_text("mixture: {train: 1e-3, train_hard: [1e-3, 2e-3]}\n")
    from_file = load_train_config(tmp_path / "run.yaml").mixture
    assert from_file == {"train": 0.001, "train_hard": [0.001, 0.002]}
    assert load_train_config(None, ["mixture={train: 1e-3, train_hard: [1e-3, 2e-3]}"]).mixture == from_file
    assert load_train_config(None, ["mixture.train=1e-3", "mixture.train_hard=[1e-3, 2e-3]"]).mixture == from_file
    with pytest.raises(ConfigError, match="field 'mixture': '.*' cannot be read \\(key 'train' is given twice"):
        load_train_config(None, ["mixture={train: 1, train: 2}"])
    for empty in ("mixture={train: []}", "mixture.train=[]"):
        with pytest.raises(ConfigError, match="field 'mixture': mixture source 'train' has no weights"):
            load_train_config(None, [empty])
    with pytest.raises(ConfigError, match=r"mixture source 'train' has weights \['1e-3'\]; they must be finite"):
        load_train_config(None, ["mixture={train: '1e-3'}"])  # a quoted weight is text, kept whole in the message


def test_data_and_teacher_paths_in_a_file_are_relative_to_its_folder(tmp_path) -> None:
    from seekstack.distill.config import DistillConfig
    from seekstack.posttrain.config import SFTConfig
    from seekstack.schema import load_config

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "sft.yaml").write_text("data: chats.jsonl\n")
    (folder / "distill.yaml").write_text("teacher: ../teacher\n")
    assert load_config(SFTConfig, folder / "sft.yaml").data == str(folder / "chats.jsonl")
    assert Path(load_config(DistillConfig, folder / "distill.yaml").teacher) == folder / "../teacher"


def test_an_error_in_a_key_value_override_is_blamed_on_the_command_line_not_the_file(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\nmax_steps: 5\n")
    with pytest.raises(ConfigError, match=r"^key=value on the command line: field 'max_steps' has value 'five'"):
        resolve_train_config(config, ["max_steps=five"])
    config.write_text("model: tiny\nmax_steps: five\n")
    with pytest.raises(ConfigError, match=rf"^{config}: field 'max_steps' has value 'five'"):
        resolve_train_config(config, ["lr=1e-3"])
    config.write_text("model: tiny\n")  # a model field given as model.F=V sets model_overrides
    with pytest.raises(ConfigError, match=r"^key=value on the command line: field 'model_overrides'.*hidden_size"):
        resolve_train_config(config, ["model.hidden_size=0"])


def test_a_config_error_carries_the_path_of_its_field_and_where_its_value_was_given(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\nbetas: [0.9, 1.5]\n")
    with pytest.raises(ConfigError) as in_file:
        resolve_train_config(config, ["lr=1e-3"])
    assert (in_file.value.field, in_file.value.source) == ("betas.1", str(config))
    with pytest.raises(ConfigError) as on_command_line:
        resolve_train_config(config, ["betas=[0.9, 1.5]"])
    assert (on_command_line.value.field, on_command_line.value.source) == ("betas.1", "key=value on the command line")
    assert str(on_command_line.value) == (
        "key=value on the command line: field 'betas.1' has value 1.5: input should be less than 1"
    )


def test_a_pair_given_one_value_says_how_many_it_takes() -> None:
    with pytest.raises(ConfigError, match=r"field 'betas' has value \[0\.9\]: give 2 values"):
        resolve_train_config(None, ["betas=[0.9]"])


def test_train_reads_by_default_where_data_tokenize_writes() -> None:
    import inspect

    from seekstack.cli.data import data_tokenize

    written = inspect.signature(data_tokenize).parameters["out"].default
    assert Path(TrainConfig().data_dir) == written  # `train` right after `data tokenize` finds the shards


def fake_run(out: Path, steps: tuple[int, ...] = (2,), **model_overrides) -> list[Path]:
    """A run's folder as training leaves it, without training: its train_config.json and checkpoints step_N of the
    micro model with `model_overrides` (config.json, a train_state.pt)."""
    data_dir = out.parent / "tokens"
    data_dir.mkdir(exist_ok=True)
    model = {**MICRO_MODEL, **model_overrides}
    load_train_config(
        None, [f"out_dir={out}", f"data_dir={data_dir}", *(f"model.{k}={v}" for k, v in model.items())]
    ).save(out)
    checkpoints = [out / "checkpoints" / f"step_{step}" for step in steps]
    for checkpoint in checkpoints:
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text(json.dumps(preset("tiny", **model).to_dict()))
        (checkpoint / "train_state.pt").write_bytes(b"")
        (checkpoint / "model.safetensors").write_bytes(b"")
    return checkpoints


def test_model_settings_unlike_the_checkpoint_a_run_resumes_or_starts_from_are_refused_naming_the_field(tmp_path):
    run = tmp_path / "run"
    (checkpoint,) = fake_run(run)
    with pytest.raises(ConfigError) as resumed_as_small:
        resolve_train_config(None, [f"out_dir={run}", "model=small"], resume=True)
    assert resumed_as_small.value.field == "model"
    said = str(resumed_as_small.value)  # the run's model.F settings kept, on top of the small preset
    assert f"model=small given, but the checkpoint {checkpoint} holds another model (" in said
    assert "max_position_embeddings 1024 there, 2048 here" in said and "leave the model settings out" in said
    with pytest.raises(ConfigError, match=r"field 'model.hidden_size': .*hidden_size 64 there, 32 here.*resumed"):
        resolve_train_config(None, [f"out_dir={run}", "model.hidden_size=32"], resume=True)
    with pytest.raises(ConfigError) as one_of_two:  # the one at fault named, not the first given (which agrees)
        resolve_train_config(None, [f"out_dir={run}", "model.hidden_size=64", "model.num_hidden_layers=3"], resume=True)
    assert one_of_two.value.field == "model.num_hidden_layers"
    new_run = f"out_dir={tmp_path / 'new'}"
    with pytest.raises(ConfigError, match=r"field 'model.num_hidden_layers': .* 2 there, 3 here.*starts from it"):
        resolve_train_config(None, [new_run, f"init_from={checkpoint}", "model.num_hidden_layers=3"])
    # What agrees with the checkpoint, and defaults nobody set (a file --write-config wrote holds them all), pass.
    resolve_train_config(None, [f"out_dir={run}", "model.hidden_size=64", "max_steps=9"], resume=True)
    load_train_config(None, [new_run, f"init_from={checkpoint}"]).save(tmp_path / "written")
    assert Path(resolve_train_config(tmp_path / "written" / CONFIG_FILE).init_from).resolve() == checkpoint
    assert resolve_train_config(None, [new_run, "model=small"]).model == "small"  # a new run builds what it is told


def test_a_model_setting_of_the_file_unlike_the_checkpoint_is_blamed_on_the_file_beside_another_on_the_command_line(
    tmp_path,
):
    """run.yaml's model_overrides {hidden_size: 32} (the checkpoint's is 64) beside model.num_hidden_layers=2 on the
    command line (which agrees) was blamed on "key=value on the command line": both keys set model_overrides."""
    run = tmp_path / "run"
    fake_run(run)
    config = tmp_path / "run.yaml"
    config.write_text("model_overrides:\n  hidden_size: 32\n")
    with pytest.raises(ConfigError) as in_file:
        resolve_train_config(config, [f"out_dir={run}", "model.num_hidden_layers=2"], resume=True)
    assert (in_file.value.field, in_file.value.source) == ("model.hidden_size", str(config))
    for key in ("model.hidden_size", "model_overrides.hidden_size"):  # two spellings of one key
        with pytest.raises(ConfigError) as on_command_line:
            resolve_train_config(config, [f"out_dir={run}", f"{key}=16"], resume=True)
        assert on_command_line.value.source == "key=value on the command line", key


def test_a_dense_run_resumes_with_its_own_model_settings_though_its_checkpoints_store_them_for_transformers(tmp_path):
    run = tmp_path / "run"
    fake_run(run, n_routed_experts=0)  # stored with first_k_dense_replace = num_hidden_layers: no MoE in transformers
    settings = [f"out_dir={run}", "model=tiny", "model.n_routed_experts=0"]  # "model" compares every field
    assert resolve_train_config(None, settings, resume=True).model_config().n_routed_experts == 0


def test_init_from_a_runs_out_dir_starts_from_its_newest_checkpoint_and_says_which(tmp_path):
    run = tmp_path / "run"
    newest = fake_run(run, steps=(2, 4))[-1]
    told: list[str] = []
    config = resolve_train_config(None, [f"init_from={run}", f"out_dir={tmp_path / 'b'}"], warn=told.append)
    assert config.init_from == str(newest)
    assert told == [f"init_from={run}: using the run's newest checkpoint, {newest}"]
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"field 'init_from': .*empty: no checkpoint"):
        resolve_train_config(None, [f"init_from={tmp_path / 'empty'}"])


def test_a_resume_given_a_runs_out_dir_again_keeps_the_checkpoint_of_it_the_run_started_from(tmp_path):
    """A checkpoint field given as a run's out_dir (a distill teacher, a LoRA base) stood for that run's newest
    checkpoint on resume too: once that run had trained on, the resumed run swapped to its newer checkpoint."""
    base_run, run = tmp_path / "base", tmp_path / "run"
    (started,) = fake_run(base_run, steps=(2,))
    given = [f"out_dir={run}", f"init_from={base_run}"]
    resolve_train_config(None, [*given, f"data_dir={tmp_path / 'tokens'}"]).save(run)
    (newest,) = fake_run(base_run, steps=(4,))
    told: list[str] = []
    resumed = resolve_train_config(None, given, resume=True, warn=told.append, resume_reads_init_from=True)
    assert Path(resumed.init_from).resolve() == started.resolve()
    assert told == [f"init_from={base_run}: the resumed run keeps {resumed.init_from}, the checkpoint it started with "
                    f"(newest: {newest})"]  # fmt: skip
    assert resolve_train_config(None, [f"init_from={base_run}"]).init_from == str(newest)  # a new run takes the newest


def test_a_seed_numpy_cannot_take_an_out_dir_that_is_a_file_and_training_on_the_val_split_are_refused(tmp_path):
    for seed in ("-1", "99999999999999999999"):
        with pytest.raises(ConfigError, match=f"field 'seed' has value {seed}"):
            resolve_train_config(None, [f"seed={seed}"])
    assert resolve_train_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    (tmp_path / "afile").write_text("")
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigError, match=f"field 'out_dir' must be a folder, not '{out_dir}'.*afile is a file"):
            resolve_train_config(None, [f"out_dir={out_dir}"])
    with pytest.raises(ConfigError, match=r"field 'mixture' must be without the 'val' split, which evaluations"):
        resolve_train_config(None, ["mixture={val: 1, train: 1}"])
    assert resolve_train_config(None, ["mixture={val: 1}", "eval_every=0"]).mixture == {"val": 1}
