"""Which tokenizer made a folder of token shards, checked against the tokenizer of the checkpoint a run starts from.

Ids mean tokens only under the tokenizer that made them: shards of another tokenizer with the same vocabulary size
load and train without an error, and the model learns the wrong text. Each shard index records its tokenizer's
sha256 (shards.py); a checkpoint holds its tokenizer.json. When they differ the text must be encoded again with the
checkpoint's tokenizer, with the `data tokenize` command `retokenize_command` spells out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from seekstack.tokenizer import Tokenizer, tokenizer_json_path

CORPUS_PLACEHOLDER = "CORPUS"  # when the index does not say which `data build` folder the shards were encoded from
TOKENIZER_PLACEHOLDER = "TOKENIZER"  # when the checkpoint holds no tokenizer.json


def retokenize_command(data_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> str:
    """The `seekstack data tokenize` command, in backticks, that encodes the text of the shards in `data_dir` again
    with `checkpoint`'s tokenizer (a tokenizer.json or a folder holding one) into a new folder beside `data_dir`;
    placeholders, explained after it, for a corpus or tokenizer it cannot name."""
    data_dir, checkpoint = Path(data_dir), Path(checkpoint)
    corpus = corpus_folder(data_dir)
    tokenizer = checkpoint if tokenizer_json_path(checkpoint).is_file() else None
    folder, tokenizer_folder = _named(data_dir), _named(tokenizer_json_path(checkpoint).parent)
    out = folder.with_name(f"{folder.name}_{tokenizer_folder.name}")
    command = (
        f"`seekstack data tokenize --corpus {corpus or CORPUS_PLACEHOLDER} --tokenizer "
        f"{tokenizer or TOKENIZER_PLACEHOLDER} --out {out}`"
    )
    notes = [f"{CORPUS_PLACEHOLDER}: the folder `seekstack data build` wrote"] if corpus is None else []
    if tokenizer is None:
        notes.append(f"{TOKENIZER_PLACEHOLDER}: the tokenizer {checkpoint} was trained with; it holds none")
    return f"{command} ({'; '.join(notes)})" if notes else command


def _named(folder: Path) -> Path:
    """`folder`, or its resolved path where it ends in no name of its own (`.`, `..`: a run started inside it)."""
    return folder.resolve() if folder.name in ("", "..") else folder


def corpus_folder(data_dir: str | os.PathLike) -> Path | None:
    """The `data build` folder (train.jsonl, val.jsonl) the shards in `data_dir` were encoded from, as their
    indexes record it (absolute; an older index's relative path is taken from the working folder); None when none
    records one that still exists."""
    for index in sorted(Path(data_dir).glob("*_index.json")):
        try:
            source = json.loads(index.read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError, AttributeError):  # ValueError: no JSON, or no UTF-8 (saved again as UTF-16)
            continue
        if isinstance(source, str) and (Path(source).parent / "train.jsonl").is_file():
            return Path(source).parent
    return None


def require_checkpoint_tokenizer(
    checkpoint: str | os.PathLike, data_dir: str | os.PathLike, tokenizer_info: dict
) -> None:
    """ValueError naming both folders when the shards in `data_dir` (their index's `tokenizer_info`) were encoded
    with another tokenizer than `checkpoint`'s tokenizer.json. Nothing to compare, so no error, when the checkpoint
    holds no tokenizer.json or the index records no sha256 (made before indexes did)."""
    recorded = tokenizer_info.get("sha256")
    file = tokenizer_json_path(checkpoint)
    if not recorded or not file.is_file() or Tokenizer.from_file(file).fingerprint == recorded:
        return
    made_with = tokenizer_info.get("path") or "another tokenizer"
    raise ValueError(
        f"{data_dir} was tokenized with {made_with}, not with {file}, the tokenizer of checkpoint {checkpoint}: "
        "the model would read its ids as other text. Tokenize the text with the checkpoint's tokenizer, "
        f"{retokenize_command(data_dir, checkpoint)}, and train on that folder"
    )
