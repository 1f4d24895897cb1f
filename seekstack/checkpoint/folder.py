"""A checkpoint folder's files, read without torch (the command line finds a run's checkpoints while it parses its
arguments): their names, the error for a folder that cannot be loaded, its JSON files and its safetensors index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DAMAGED = "re-save or re-download the checkpoint"  # what to do about a file that is truncated, damaged or missing


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file (and the key) and says what to do."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; CheckpointError naming the file when it is not valid JSON or not an object."""
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise CheckpointError(
            f"{path}: not valid JSON ({error}); the file is truncated or damaged: {DAMAGED}"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(raw).__name__}, not an object; {DAMAGED}")
    return raw


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The weight_map of safetensors index `index_path`: each key -> the file of the index's folder holding it.
    CheckpointError naming the index (and the key) when it is not JSON, has no weight_map object, gives a key no file
    name (not a string; "" or ".", the folder itself), or a file outside its folder (absolute, or through '..'),
    which transformers would read wherever it is. `missing_shards` says which of its files the folder lacks."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a safetensors index (no 'weight_map' object); {DAMAGED}")
    for key, file in weight_map.items():
        if not isinstance(file, str) or not Path(file).parts:
            raise CheckpointError(
                f"{index_path}: weight_map gives key {key!r} the file {file!r}, not a file name; {DAMAGED}"
            )
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(
                f"{index_path}: weight_map gives key {key!r} the file {file!r}, outside {index_path.parent}; "
                f"an index names the shards of its own folder: copy that shard into it, or {DAMAGED}"
            )
    return weight_map


def missing_shards(index_path: Path, weight_map: dict[str, str]) -> list[str]:
    """The files `weight_map` (`read_weight_map(index_path)`) names that are missing from the index's folder, sorted,
    each looked at once; CheckpointError naming the index and the key when one is a folder there, told apart from a
    shard missing from an incomplete download."""
    missing = sorted(file for file in set(weight_map.values()) if not (index_path.parent / file).is_file())
    folder = next((file for file in missing if (index_path.parent / file).is_dir()), None)
    if folder is not None:
        key = next(key for key, file in weight_map.items() if file == folder)
        raise CheckpointError(
            f"{index_path}: weight_map gives key {key!r} the file {folder!r}, which is a folder in "
            f"{index_path.parent}, not a safetensors file; {DAMAGED}"
        )
    return missing
