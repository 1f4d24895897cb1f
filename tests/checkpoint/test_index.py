"""A safetensors index (model.safetensors.index.json) is read as transformers reads it, and one it would misread is
refused naming the index, the key and what is wrong."""

from __future__ import annotations

import json

import pytest

from seekstack.checkpoint import CheckpointError, CheckpointReader
from seekstack.train.runs import missing_files


@pytest.mark.parametrize("file", ["", ".", "./"])
def test_an_index_naming_the_folder_itself_as_a_shard_is_told_it_names_no_file(tmp_path, file):
    """A weight_map file of "" or "." (the folder itself, os.path.join's answer) was told "names shard '', which is
    missing ...; the download is incomplete: fetch that shard", and a run's step folder holding it was passed over as
    lacking a file of no name ("step_3 (no )")."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.pt").write_bytes(b"")
    (checkpoint / "config.json").write_text("{}")
    index = checkpoint / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": file}}))
    expected = (
        f"{index}: weight_map gives key 'model.norm.weight' the file {file!r}, not a file name; "
        "re-save or re-download the checkpoint"
    )
    with pytest.raises(CheckpointError) as reading:
        CheckpointReader(checkpoint, None)
    assert str(reading.value) == expected
    assert missing_files(checkpoint) == ["valid model.safetensors.index.json"]  # passed over, as the reader refuses it


def test_an_index_naming_a_folder_as_a_shard_is_told_it_names_a_folder(tmp_path):
    """A weight_map file that is a folder of the checkpoint was told "names shard 'shards', which is missing from
    DIR; the download is incomplete: fetch that shard", and a run's step folder holding it lacked "shards"."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    (checkpoint / "shards").mkdir(parents=True)
    (checkpoint / "train_state.pt").write_bytes(b"")
    (checkpoint / "config.json").write_text("{}")
    index = checkpoint / "model.safetensors.index.json"
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "shards"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    expected = (
        f"{index}: weight_map gives key 'lm_head.weight' the file 'shards', which is a folder in {checkpoint}, not a "
        "safetensors file; re-save or re-download the checkpoint"
    )
    with pytest.raises(CheckpointError) as reading:
        CheckpointReader(checkpoint, None)
    assert str(reading.value) == expected
    assert missing_files(checkpoint) == ["valid model.safetensors.index.json"]  # passed over, as the reader refuses it
