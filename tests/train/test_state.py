"""Training state: the RNG states a checkpoint saves are restored where the run resumes; exporting a checkpoint."""

from __future__ import annotations

import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.cuda.random

from seekstack.checkpoint import CheckpointError, load_pretrained, write_pretrained_files
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError
from seekstack.tokenizer import Tokenizer, train_tokenizer
from seekstack.train.runs import (
    TRAIN_STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    missing_files,
    passed_over,
    refuse_new_run_into,
)
from seekstack.train.state import (
    export_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_train_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tests.conftest import micro_config


def seeded_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def test_a_run_saved_with_two_gpus_visible_resumes_where_one_is_restoring_its_state(monkeypatch):
    # rank 0 of a 2-GPU FSDP run saved both devices' states; the run resumes as one process on one GPU. A CPU
    # generator stands in for that GPU's, and torch.cuda answers as it would there.
    one_gpu = torch.Generator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", (one_gpu,))
    monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda restore, **kwargs: restore())
    saved = {**rng_state(), "cuda": [seeded_state(1), seeded_state(2)]}
    next_draw = np.random.rand()
    with pytest.warns(UserWarning, match="CUDA RNG states of 2 devices and 1 are visible here: restoring the first 1"):
        set_rng_state(saved)
    assert torch.equal(one_gpu.get_state(), seeded_state(1))
    assert np.random.rand() == next_draw  # and the host's generators as saved


def test_a_checkpoint_holds_its_tokenizer_as_tokenizer_json_whatever_the_file_was_called(tmp_path):
    """`data tokenize --tokenizer dir/my.json` recorded my.json; checkpoints held my.json, and generate, serve and
    transformers found no tokenizer.json in them."""
    train_tokenizer(["def f(x):\n    return x\n"], vocab_size=300, out_path=tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").rename(tmp_path / "tok" / "my.json")
    extra_files = [tmp_path / "tok" / "my.json", tmp_path / "tok" / "tokenizer_config.json"]
    path = save_checkpoint(tmp_path / "run", Transformer(micro_config()), {"step": 1}, keep=1, extra_files=extra_files)
    assert sorted(entry.name for entry in path.iterdir() if "tokenizer" in entry.name or entry.suffix == ".json") == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert Tokenizer.from_file(path).fingerprint == Tokenizer.from_file(tmp_path / "tok" / "my.json").fingerprint


def test_export_gives_an_older_checkpoints_tokenizer_config_the_models_context(tmp_path):
    train_tokenizer(["def f(x):\n    return x\n"], vocab_size=300, out_path=tmp_path / "tok")  # its config says 4096
    model = Transformer(micro_config())
    old = save_checkpoint(tmp_path / "run", model, {"step": 1}, keep=1, extra_files=[tmp_path / "tok/tokenizer.json"])
    shutil.copyfile(tmp_path / "tok/tokenizer_config.json", old / "tokenizer_config.json")  # copied as it was
    exported = export_checkpoint(old, tmp_path / "exported")
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == model.config.max_position_embeddings == 256
    assert config["eos_token"] == json.loads((old / "tokenizer_config.json").read_text())["eos_token"]


def test_export_of_a_checkpoint_saved_without_a_generation_config_writes_the_one_transformers_writes(tmp_path):
    """A checkpoint saved before seekstack wrote generation_config.json exported none, and transformers'
    GenerationConfig.from_pretrained refused the export ('does not appear to have a file named ...')."""
    from transformers import GenerationConfig

    old = save_checkpoint(tmp_path / "run", Transformer(micro_config(eos_token_id=7)), {"step": 1}, keep=1)
    (old / "generation_config.json").unlink()
    exported = export_checkpoint(old, tmp_path / "exported")
    assert GenerationConfig.from_pretrained(exported).eos_token_id == 7


def test_a_retention_killed_while_deleting_a_checkpoint_leaves_no_step_folder_with_part_of_its_files(
    tmp_path, monkeypatch
):
    """keep_checkpoints deleted an old step_N in place: killed partway it left step_1 with config.json and
    train_state.pt but no model.safetensors, listed as a complete checkpoint (the one --resume, export and eval pick
    once the newer one is moved away), failing with 'no model.safetensors'; now the folder leaves the checkpoint names
    in one rename before its files go, and what a killed deletion left is deleted by the next prune."""
    model = Transformer(micro_config())
    for step in (1, 2):
        save_checkpoint(tmp_path, model, {"step": step}, keep=2)

    def killed_after_one_file(path, *args, **kwargs):
        os.unlink(next(entry for entry in os.scandir(path) if entry.name != TRAIN_STATE_FILE))
        raise KeyboardInterrupt  # the process is killed partway through the deletion

    with monkeypatch.context() as patched:
        patched.setattr(shutil, "rmtree", killed_after_one_file)
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoints(tmp_path, keep=1, saved=tmp_path / "checkpoints" / "step_2")
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2"]
    (tmp_path / "checkpoints" / "step_2").rename(tmp_path / "moved_away")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_checkpoint(tmp_path)  # no step_1 with part of its files to pick
    prune_checkpoints(tmp_path, keep=1, saved=tmp_path / "checkpoints" / "step_2")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_pruning_deletes_the_history_a_resumed_run_left_and_refuses_a_step_it_went_on_from_after_the_save(tmp_path):
    """prune_checkpoints deleted the checkpoints in range(left_after + 1, saved), which is empty, silently, where
    left_after (the step a resumed run went on from) is after the step saved: a caller's mistake, as a resumed run saves
    after that step, passed for "nothing left". It is refused; the steps between the two are deleted, and those after
    the one saved."""
    model = Transformer(micro_config())
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(tmp_path, model, {"step": step}, keep=5)
    with pytest.raises(ValueError, match="left_after=10 is after the step saved"):
        prune_checkpoints(tmp_path, keep=5, saved=tmp_path / "checkpoints" / "step_8", left_after=10)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2", "step_4", "step_6", "step_8", "step_10"]
    prune_checkpoints(tmp_path, keep=5, saved=tmp_path / "checkpoints" / "step_8", left_after=4)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2", "step_4", "step_8"]


def test_a_save_after_a_resume_from_an_earlier_checkpoint_keeps_it_and_deletes_the_later_ones(tmp_path):
    """A run resumed from step_2 of a run that had saved step_4 and step_6 saved its step_4, and keep_checkpoints=1
    deleted that one, the newest the run had, keeping the step_6 of the history it left, which the next --resume
    then continued from."""
    model = Transformer(micro_config())
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, model, {"step": step}, keep=3)
    resumed = {"step": 4, "resumed": True, "data": {}, "rng": {}, "config": {}}  # resumed from step_2
    saved = save_checkpoint(tmp_path, model, resumed, keep=1)
    assert list_checkpoints(tmp_path) == [saved]
    assert read_train_state(saved)["resumed"]
    for step in (6, 8):
        save_checkpoint(tmp_path, model, {"step": step}, keep=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_6", "step_8"]


def test_export_refuses_a_checkpoint_whose_weights_are_missing(tmp_path):
    """A checkpoint without model.safetensors (deleted, or a copy cut short) exported as a folder holding config.json
    alone, with no error: a model no loader reads."""
    checkpoint = save_checkpoint(tmp_path / "run", Transformer(micro_config()), {"step": 1}, keep=1)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"step_1: no model\.safetensors or .*the weights are missing"):
        export_checkpoint(checkpoint, tmp_path / "exported")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint: step_1 \(no model\.safetensors\)"):
        export_checkpoint(tmp_path / "run", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("deleted", ["model.safetensors", "config.json", "a shard"])
def test_a_step_folder_missing_its_model_files_is_passed_over_naming_what_it_lacks(tmp_path, deleted):
    """A step_N whose weights or config.json were deleted (or a copy cut short), train_state.pt still there, was
    listed as a complete checkpoint: --resume, init_from=RUN and `generate --model RUN` picked it and failed to load
    it (torchtitan lists only the step folders its completion marker is in). It is passed over, and named."""
    sharded = deleted == "a shard"
    write_model = functools.partial(write_pretrained_files, max_shard_bytes=100_000 if sharded else 2**30)
    for step in (2, 4):
        save_checkpoint(tmp_path, Transformer(micro_config()), {"step": step}, keep=2, write_model=write_model)
    newest = tmp_path / "checkpoints" / "step_4"
    if sharded:
        deleted = max(json.loads((newest / "model.safetensors.index.json").read_text())["weight_map"].values())
    (newest / deleted).unlink()
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"
    assert passed_over(latest_checkpoint(tmp_path)) == f"; passed over step_4 (no {deleted}), incomplete"


def test_a_step_folder_with_model_safetensors_beside_a_stale_index_is_a_checkpoint(tmp_path):
    """A step folder holding model.safetensors beside an index whose shards are gone (a save of one file into a
    folder an earlier sharded save left its index in) was passed over as incomplete, naming the shards, though the
    reader reads its model.safetensors past the stale index, as transformers does."""
    models = {step: Transformer(micro_config()) for step in (2, 4)}
    for step, model in models.items():
        save_checkpoint(tmp_path, model, {"step": step}, keep=2)
    newest = tmp_path / "checkpoints" / "step_4"
    stale = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (newest / "model.safetensors.index.json").write_text(json.dumps(stale))
    assert missing_files(newest) == []
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_2", "step_4"]
    assert latest_checkpoint(tmp_path) == newest
    with pytest.warns(UserWarning, match="delete the stale index"):
        loaded = load_pretrained(newest)
    assert torch.equal(loaded.embed_tokens.weight, models[4].embed_tokens.weight)
    (newest / "model.safetensors").unlink()  # the index's shards are asked for where there is no model.safetensors
    assert missing_files(newest) == ["model-00001-of-00002.safetensors"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_2"


def test_a_new_run_into_a_folder_whose_checkpoints_are_all_incomplete_is_refused_naming_what_they_lack(tmp_path):
    """Listed as no checkpoint, a run whose only step_N lost its weights let a new run into its out_dir, which trims
    the run's metrics and overwrites its steps."""
    checkpoint = save_checkpoint(tmp_path, Transformer(micro_config()), {"step": 4}, keep=1)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"holds a run \(step_4 \(no model\.safetensors\), incomplete\); continue"):
        refuse_new_run_into(tmp_path)
    shutil.rmtree(checkpoint)
    refuse_new_run_into(tmp_path)  # no run there


class _OpensAFileWhenLoaded:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_train_state_is_read_as_weights_only_refusing_one_whose_pickle_would_run_code(tmp_path):
    """train_state.pt was read with weights_only=False: a checkpoint from elsewhere ran its code on --resume."""
    model = Transformer(micro_config())
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    state = {"step": 3, "rng": rng_state(), "optimizer": optimizer.state_dict(), "data": {"rows": 12}, "config": {}}
    checkpoint = save_checkpoint(tmp_path / "run", model, state, keep=1)
    saved = read_train_state(checkpoint)  # what seekstack writes reads back whole: numpy's RNG state too
    assert np.array_equal(saved["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])

    opened = tmp_path / "opened"
    torch.save({**state, "step": _OpensAFileWhenLoaded(opened)}, checkpoint / "train_state.pt")
    with pytest.raises(CheckpointError) as refused:
        read_train_state(checkpoint)
    assert not opened.exists()
    assert str(refused.value) == (
        f"{checkpoint / 'train_state.pt'}: holds a Python object of io.open, which no training checkpoint holds and "
        "which loading would run: refused (torch.load weights_only=True); it was not written by seekstack, or altered "
        "since"
    )


def test_a_train_state_without_what_a_resume_reads_is_named_with_the_keys_it_lacks(tmp_path):
    """A train_state.pt without its RNG states (altered, or another tool's) stopped a resume with a bare
    KeyError: 'rng' and a traceback naming no file."""
    state = {"step": 4, "data": {"rows": 16}, "config": {}, "optimizer": {}}
    checkpoint = save_checkpoint(tmp_path / "run", Transformer(micro_config()), state, keep=1)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(checkpoint)
    assert str(refused.value) == (
        f"{checkpoint / 'train_state.pt'}: no rng in it (it holds keys step, data, config, optimizer): not a train "
        f"state seekstack saved, or altered since; move {checkpoint} out of {checkpoint.parent}, and --resume "
        "continues from the checkpoint before it (if the run kept one)"
    )
    torch.save([4], checkpoint / "train_state.pt")
    with pytest.raises(CheckpointError, match=r"no step, data, rng, config in it \(it holds a list, not a dict of"):
        read_train_state(checkpoint)


def test_a_missing_or_incomplete_checkpoint_is_named_for_what_it_lacks_not_called_a_model_checkpoint(tmp_path):
    """resume=path of a folder that did not exist (a pruned step_N) or held no config.json was called 'a model
    checkpoint (load it with load_pretrained)': the message says what is wrong and which checkpoints the run holds."""
    checkpoint = save_checkpoint(tmp_path / "run", Transformer(micro_config()), {"step": 4}, keep=1)
    (checkpoint.parent / "step_6").mkdir()
    holds = f"; the run {tmp_path / 'run'} holds step_4 (--resume, resume=True, continues from the newest, step_4)"
    expected = {
        checkpoint.parent / "step_2": "no such folder" + holds,
        checkpoint.parent / "step_6": "holds no train_state.pt: a save cut short, or a model copied there" + holds,
        tmp_path / "absent": "no such folder",
        tmp_path: "holds no train_state.pt (nor a model's config.json): not a training checkpoint",
        checkpoint / "config.json": "a file, not a checkpoint folder",
    }
    for path, message in expected.items():
        with pytest.raises(FileNotFoundError) as refused:
            read_train_state(path)
        assert str(refused.value) == f"{path}: {message}"
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model, ignore=shutil.ignore_patterns(TRAIN_STATE_FILE))
    with pytest.raises(FileNotFoundError, match="it is a model checkpoint, not a training one .*init_from="):
        read_train_state(model)
