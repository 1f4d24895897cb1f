"""What `seekstack lora train` trains on, given as DATA.

- token shards (a folder with train_index.json, from `seekstack data tokenize`): as they are;
- text: a file, a folder of text files, a `.jsonl` of {"text": ...} or a `.parquet` (seekstack.corpus's sources):
  tokenized with the base's tokenizer into shards in ADAPTER/data, one document in `VAL_EVERY` (chosen by the hash
  of its text) held out as the validation split; when that holds out none or all of them (a few documents), the
  text's last 1/`VAL_EVERY` (whole documents from the end, then the tail of one, cut at the start of a word), kept
  in ADAPTER/data/val.jsonl as `data build` writes it, whose openings `report` and `sample` prompt with;
- chat: a `.jsonl` (or a `.json` of JSON Lines, as datasets' `to_json` writes, or of one JSON array, as `json.dump`
  writes and TRL reads) of {"messages": [...]} (or TRL's
  {"prompt": [...], "completion": [...]} or {"conversations": [{"from": ..., "value": ...}, ...]}): the conversations
  of chat SFT (seekstack.posttrain.sft's batch source), the loss on the assistant's tokens only, those `seekstack
  sft` holds out by default held out as the validation split; TRL's standard {"prompt": TEXT, "completion": TEXT}
  the same way, its prompt then its completion with no chat template (`TextCompletion`), the loss on the completion
  only.
`frequent_tokens` picks the tokens whose output-head (and embedding) rows a `head_tokens` (`embedding_tokens`)
adapter trains (config.py), `first_batches` the run's first batches an `init=eva` start reads.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import zlib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from seekstack.atomic import write_atomic
from seekstack.checkpoint import read_config
from seekstack.compression import source_kind
from seekstack.corpus.kinds import detect_kind
from seekstack.corpus.sources import FOLDER_FILES_READ, DataSourceError, MissingTextField, open_source
from seekstack.jsonl import jsonl_records
from seekstack.posttrain.config import DEFAULT_VAL_FRACTION, SFTConfig
from seekstack.posttrain.conversations import HELD_OUT_FILE, is_conversation_record, is_text_completion
from seekstack.posttrain.sft import SFTSource
from seekstack.tokenizer import Tokenizer, tokenizer_json_path
from seekstack.tokens.mixture import MixtureWindows
from seekstack.tokens.provenance import require_checkpoint_tokenizer
from seekstack.tokens.shards import index_path, load_index, token_counts, tokenize_corpus
from seekstack.train.config import TRAIN_SPLIT, TrainConfig
from seekstack.train.trainer import VAL_SPLIT, require_vocabulary

TOKENS_DIR = "data"  # inside the adapter folder: the tokenized text
CORPUS_FILE = "corpus.jsonl"  # inside TOKENS_DIR: the text's documents, as they were tokenized
VAL_FILE = "val.jsonl"  # inside TOKENS_DIR: the held-out ones, as `data build` writes them (report's prompts)
VAL_EVERY = 10


def is_token_shards(path: Path) -> bool:
    return index_path(path, TRAIN_SPLIT).is_file()


def first_record(path: Path) -> object:
    """The first record of `path` when it is a JSONL file (compressed maybe, `.jsonl.gz` ..., as `seekstack sft` reads
    one; a `.json` too, the suffix datasets' `Dataset.to_json` gives the JSON Lines it writes, or a JSON array's first
    item), else None."""
    if source_kind(path) not in (".jsonl", ".json") or not path.is_file():
        return None
    try:
        with closing(jsonl_records(path)) as records:  # read as `seekstack sft` reads it: a BOM, a compression
            return next(records, (0, None))[1]
    except ValueError:  # not JSON Lines, or not decompressed: read as text, whose reader names the fault
        return None


def is_chat(path: Path) -> bool:
    """Whether `path` is a JSONL file whose first record (`first_record`) is a conversation (`is_conversation_record`:
    `messages`, TRL's conversational `prompt` and `completion`, or its from/value `conversations`) or TRL's standard
    prompt-completion of text (`is_text_completion`): the files chat SFT's batch source reads."""
    first = first_record(path)
    return is_conversation_record(first) or is_text_completion(first)


def prepare_data(data: str | Path, base: str | Path, out: str | Path) -> Path:
    """The run's `data_dir`: token shards (of the base's tokenizer) and chat files as they are, text tokenized into
    `out`/data with the base's tokenizer (a missing file or folder is a DataSourceError naming it)."""
    data, out = Path(data), Path(out)
    if is_token_shards(data):  # checked before the run writes its folder
        made_with = load_index(data, TRAIN_SPLIT)["tokenizer"]
        require_checkpoint_tokenizer(base, data, made_with)
        require_vocabulary(read_config(base).vocab_size, made_with["vocab_size"], data, base)
        return data
    if is_chat(data):
        return data
    tokens = out / TOKENS_DIR
    texts, held_out = _split(_documents(data))
    tokens.mkdir(parents=True, exist_ok=True)
    corpus = write_atomic(tokens / CORPUS_FILE, _corpus_text(texts))
    tokenizer = Tokenizer.from_file(tokenizer_json_path(base))
    tokenize_corpus(corpus, tokenizer, tokens, TRAIN_SPLIT, select=lambda text: text not in held_out)
    if held_out:
        tokenize_corpus(corpus, tokenizer, tokens, VAL_SPLIT, select=held_out.__contains__)
        rows = (
            json.dumps({"id": f"{CORPUS_FILE}:{line}", "text": text, "kind": detect_kind(text).label}) + "\n"
            for line, text in enumerate(texts, 1)
            if text in held_out
        )
        write_atomic(tokens / VAL_FILE, "".join(rows))
    else:  # a text too short to hold a part out: a validation split there is an earlier attempt's, of other text
        index_path(tokens, VAL_SPLIT).unlink(missing_ok=True)
        (tokens / VAL_FILE).unlink(missing_ok=True)
    return tokens


def require_text_windows(text: str | Path, tokens: str | Path, config: TrainConfig) -> None:
    """ValueError naming the user's `text` when the tokens made of it (in `tokens`, as `prepare_data` wrote them) are
    too few for one of the run's windows (seq_len + 1 tokens), or, while evaluations are due, its held-out part is."""
    window = config.seq_len + 1
    parts = [(TRAIN_SPLIT, "training part", "give more text or a smaller seq_len")]
    if config.eval_every:
        parts.append((VAL_SPLIT, "held-out part", "give more text, a smaller seq_len, or eval_every=0"))
    for split, part, advice in parts:
        made = load_index(tokens, split)["total_tokens"] if index_path(tokens, split).is_file() else 0
        if made < window:
            raise ValueError(
                f"{text}: its {part} makes {made:,} tokens with the base's tokenizer, too few for one window of "
                f"{window:,} (seq_len + 1); {advice}"
            )


def resumed_data(data: str | Path, out: str | Path) -> Path:
    """The `data_dir` DATA means to the resumed run in `out`: token shards and chat files as they are; text, the
    run's tokens in `out`/data when they were tokenized from the same documents (nothing is tokenized again),
    else the text itself, which is not the data the run trains on."""
    data, tokens = Path(data), Path(out) / TOKENS_DIR
    if is_token_shards(data) or is_chat(data):
        return data
    corpus = tokens / CORPUS_FILE
    same_text = corpus.is_file() and corpus.read_text(encoding="utf-8") == _corpus_text(_split(_documents(data))[0])
    return tokens if same_text else data


def frequent_tokens(data_dir: str | Path, count: int) -> list[int]:
    """The ids of the `count` most frequent tokens of the train split of token shards in `data_dir`, most frequent
    first (ties: the smaller id first), for the rows `head_tokens` and `embedding_tokens` train."""
    vocab = _token_index(data_dir, count)["tokenizer"]["vocab_size"]
    return np.argsort(-token_counts(data_dir, TRAIN_SPLIT, vocab), kind="stable")[:count].tolist()


def _token_index(data_dir: str | Path, count: int) -> dict:
    """The train split's index of token shards in `data_dir` whose vocabulary has at least `count` tokens."""
    data_dir = Path(data_dir)
    if not is_token_shards(data_dir):
        raise ValueError(
            f"{data_dir}: lora.head_tokens and lora.embedding_tokens pick tokens of token shards or text, not of chat"
        )
    index = load_index(data_dir, TRAIN_SPLIT)
    vocab = index["tokenizer"]["vocab_size"]
    if count > vocab:
        raise ValueError(
            f"{count} token rows (lora.head_tokens or lora.embedding_tokens) are more than the {vocab} tokens of "
            f"{data_dir}'s vocabulary"
        )
    return index


def first_batches(config: TrainConfig, count: int) -> list[torch.Tensor]:
    """The first `count` micro-batches the run in `config` trains on (its own batch source: the same windows, from
    the same seed), for a start drawn from the training data (`init=eva`); token shards only."""
    if not is_token_shards(Path(config.data_dir)):
        raise ValueError(f"{config.data_dir}: lora.init=eva reads the layers' inputs on token shards or text, not chat")
    windows = MixtureWindows(config.data_dir, config.mixture_policy(), config.seq_len, config.seed)
    steps = (number // config.grad_accum_steps for number in range(count))
    return [windows.batch(config.batch_size, progress=step / config.max_steps) for step in steps]


@dataclass
class ChatDataConfig(SFTConfig):
    """The SFTConfig of a `lora train` run on a chat file: its conversations, of which it holds out those `seekstack
    sft` holds out by default (DEFAULT_VAL_FRACTION of them while eval_every > 0, by their content's hash), having no
    val_data or val_fraction of its own; TRL's standard prompt-completion lines too."""

    text_completions: ClassVar[bool] = True
    held_out_advice: ClassVar[str] = (
        f"a file of {round(1 / DEFAULT_VAL_FRACTION)} distinct conversations or more has some held out (a conversation "
        "goes with all its copies); or set eval_every=0"
    )


def chat_source(config: TrainConfig, resume: bool = False) -> SFTSource | None:
    """SFT's batch source over the conversations in `config.data_dir` when it is a chat file (packed with
    `packing`, as `seekstack sft` packs them), holding out `ChatDataConfig`'s for val_loss, which a new run records in
    its out_dir (HELD_OUT_FILE); else None. A resumed run whose out_dir has no such record was started by a seekstack
    that held none out: it goes on training on all of them, as its checkpoint did, saying so while evaluations are
    due."""
    if not is_chat(Path(config.data_dir)):
        return None
    loop = {field.name: getattr(config, field.name) for field in dataclasses.fields(TrainConfig)}
    held_none_out = resume and not (Path(config.out_dir) / HELD_OUT_FILE).is_file()
    if held_none_out and config.eval_every:
        print(
            f"note: {config.out_dir} has no {HELD_OUT_FILE}: its run was started by a seekstack that held none of the "
            f"conversations of {config.data_dir} out, so it goes on training on all of them and logs no val_loss; "
            "train a new adapter (another --out) to have some held out",
            file=sys.stderr,
        )
    return SFTSource(ChatDataConfig(**loop, data=config.data_dir), holds_out=not held_none_out, packing=config.packing)


def _documents(data: Path) -> list[str]:
    source = open_source(data)
    try:
        documents = [document.text for document in source if document.text.strip()]
    except MissingTextField as error:  # its advice names the --field and --rows-field options of `data build`
        raise DataSourceError(
            f'{error.problem}; `lora train` reads a .jsonl of {{"text": ...}} (text) or {{"messages": [...]}} or '
            '{"prompt": [...], "completion": [...]} (chat conversations, or TRL\'s prompt and completion as text; '
            f"told by the first record): {_rewrite(error.record)}"
        ) from None
    if not documents:
        skipped = sum(getattr(source, "skipped", {}).values())  # a folder's files of other suffixes (TextFolder)
        unread = (
            f"; its {skipped:,} files were not read: a folder's files are read {FOLDER_FILES_READ}" if skipped else ""
        )
        raise ValueError(f"{data}: no text to train on{unread}")
    return documents


def _rewrite(record: object) -> str:
    """How to write a record of none of the forms `lora train` reads: TRL's preference rows (DPO's chosen and rejected)
    as their chosen text, conversation or completion, which TRL's SFT on them would have to be given; else its text as
    'text'."""
    if not (isinstance(record, dict) and "chosen" in record and "rejected" in record):
        return "write each record's text as 'text'"
    if "prompt" in record:
        chosen = "{prompt, completion: .chosen}"
    else:
        chosen = "{text: .chosen}" if isinstance(record["chosen"], str) else "{messages: .chosen}"
    return (
        "chosen and rejected are TRL's preference format (DPO's), whose rejected answers SFT is not to learn; to "
        f"train on the chosen ones, write them so: jq -c '{chosen}'"
    )


def _corpus_text(documents: list[str]) -> str:
    """The JSONL corpus the text is tokenized from, kept in the adapter folder."""
    return "".join(json.dumps({"text": text}) + "\n" for text in documents)


def _split(documents: list[str]) -> tuple[list[str], set[str]]:
    """The texts to tokenize and those of them held out for validation: one document in `VAL_EVERY` by the hash of its
    text; when that holds out none or all of them, the text's tail (`_tail_split`)."""
    held_out = {text for text in documents if _held_out(text)}
    if held_out and not held_out.issuperset(documents):
        return documents, held_out
    return _tail_split(documents)


def _held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % VAL_EVERY == 0


def _tail_split(documents: list[str]) -> tuple[list[str], set[str]]:
    """The documents with the last 1/`VAL_EVERY` of their characters held out (few documents have one at most):
    whole documents from the end, then the tail of the one before them, cut at the start of a word."""
    texts = list(documents)
    tail_chars = sum(map(len, texts)) // VAL_EVERY
    held_out: list[str] = []
    while len(texts[-1]) <= tail_chars:  # never all of them: the tail is a tenth of the text
        tail_chars -= len(texts[-1])
        held_out.append(texts.pop())
    if tail_chars:
        last = texts.pop()
        cut = _word_start(last, len(last) - tail_chars)
        texts.append(last[:cut])
        held_out.append(last[cut:])
    return texts + held_out[::-1], set(held_out)


LONGEST_WORD = 64  # characters a cut moves back at most to a word's start: none in text written without spaces


def _word_start(text: str, position: int) -> int:
    """`position` moved back to the start of the word it falls in; kept where no whitespace comes before it within
    LONGEST_WORD characters (Chinese or Japanese, written without spaces: a cut back to the last newline could leave
    the training part a title)."""
    start = re.search(r"\S*\Z", text[:position]).start()
    return start if start and position - start <= LONGEST_WORD else position
