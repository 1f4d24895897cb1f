"""A safetensors index (model.safetensors.index.json) is read as transformers reads it, and one it would misread is
refused naming the index, the key and what is wrong."""

from __future__ import annotations

import json

import pytest

from seekstack.checkpoint import CheckpointError, CheckpointReader
from seekstack.checkpoint.folder import missing_shards
from seekstack.train.runs import missing_files


def step_folder_with_index(tmp_path, weight_map):
    """A run's step folder holding a training state, a config and an index of `weight_map`; (folder, index)."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.pt").write_bytes(b"")
    (checkpoint / "config.json").write_text("{}")
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return checkpoint, index


def assert_refused_and_passed_over(checkpoint, expected):
    """The reader refuses step folder `checkpoint` with message `expected`, and a run's listing passes it over."""
    with pytest.raises(CheckpointError) as reading:
        CheckpointReader(checkpoint, None)
    assert str(reading.value) == expected
    assert missing_files(checkpoint) == ["valid model.safetensors.index.json"]


@pytest.mark.parametrize("file", ["", ".", "./"])
def test_an_index_naming_the_folder_itself_as_a_shard_is_told_it_names_no_file(tmp_path, file):
    """A weight_map file of "" or "." (the folder itself, os.path.join's answer) was told "names shard '', which is
    missing ...; the download is incomplete: fetch that shard", and a run's step folder holding it was passed over as
    lacking a file of no name ("step_3 (no )")."""
    checkpoint, index = step_folder_with_index(tmp_path, {"model.norm.weight": file})
    expected = (
        f"{index}: weight_map gives key 'model.norm.weight' the file {file!r}, not a file name; "
        "re-save or re-download the checkpoint"
    )
    assert_refused_and_passed_over(checkpoint, expected)


def test_an_index_naming_a_folder_as_a_shard_is_told_it_names_a_folder(tmp_path):
    """A weight_map file that is a folder of the checkpoint was told "names shard 'shards', which is missing from
    DIR; the download is incomplete: fetch that shard", and a run's step folder holding it lacked "shards"."""
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "shards"}
    checkpoint, index = step_folder_with_index(tmp_path, weight_map)
    (checkpoint / "shards").mkdir()
    expected = (
        f"{index}: weight_map gives key 'lm_head.weight' the file 'shards', which is a folder in {checkpoint}, not a "
        "safetensors file; re-save or re-download the checkpoint"
    )
    assert_refused_and_passed_over(checkpoint, expected)


def test_the_shards_an_index_names_are_looked_at_once_for_the_reader_and_a_runs_listing(tmp_path):
    """read_weight_map walked the index's files for folders, and then the reader and runs.missing_files each walked
    them again for missing shards; missing_shards is the one walk: the files missing, sorted, and a folder refused."""
    (tmp_path / "model-00001-of-00003.safetensors").write_bytes(b"")
    (tmp_path / "shards").mkdir()
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {
        "model.norm.weight": "model-00003-of-00003.safetensors",
        "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
        "lm_head.weight": "model-00002-of-00003.safetensors",
        "model.layers.0.mlp.gate.weight": "model-00003-of-00003.safetensors",
    }
    assert missing_shards(index, weight_map) == ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    with pytest.raises(CheckpointError) as refused:
        missing_shards(index, {**weight_map, "model.layers.1.mlp.gate.weight": "shards"})
    assert str(refused.value) == (
        f"{index}: weight_map gives key 'model.layers.1.mlp.gate.weight' the file 'shards', which is a folder in "
        f"{tmp_path}, not a safetensors file; re-save or re-download the checkpoint"
    )
