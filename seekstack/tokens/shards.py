"""Token shards: a JSONL corpus encoded once into flat memmap files, and the windows training reads from them.

On disk, per split (`train`, `val`, ...) in one directory:
  {split}_00000.bin, {split}_00001.bin, ...  raw little-endian token ids (uint16, or uint32 past 65536 ids),
                                             documents concatenated, each followed by EOS (and led by BOS
                                             where the tokenizer frames a text with it: a DeepSeek release's)
  {split}_index.json                         dtype, shards and their token counts, documents, total tokens,
                                             UTF-8 bytes of text (for bits per byte), tokenizer vocab size and hash
A window is seq_len + 1 consecutive tokens: inputs are window[:-1], targets window[1:].
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from seekstack.atomic import StagedFiles, staged_files, write_atomic
from seekstack.corpus.sources import read_corpus_rows, require_corpus_file
from seekstack.tokenizer import Tokenizer

INDEX_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard
ENCODE_BATCH_DOCUMENTS = 256  # documents handed to the tokenizer's threads at once
INDEX_SUFFIX = "_index.json"
SHARD_FILES = (f"*{INDEX_SUFFIX}", "*_[0-9][0-9][0-9][0-9][0-9].bin")  # what a folder of token shards holds
SHARD_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))  # what `token_dtype` picks from


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return SHARD_DTYPES[0] if vocab_size <= 2**16 else SHARD_DTYPES[1]


def index_path(out_dir: str | os.PathLike, split_name: str) -> Path:
    """Where the index of `split_name`'s shards lives."""
    return Path(out_dir) / f"{split_name}{INDEX_SUFFIX}"


class _ShardWriter:
    """Fills a fixed-size buffer with tokens and writes it out as numbered shard files, staged until published."""

    def __init__(self, staged: StagedFiles, split_name: str, dtype: np.dtype, shard_tokens: int):
        self.staged, self.split_name = staged, split_name
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.shards: list[dict] = []

    def add(self, ids: list[int]) -> None:
        tokens = np.asarray(ids, dtype=self.buffer.dtype)
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        name = f"{self.split_name}_{len(self.shards):05d}.bin"
        little_endian = self.buffer.dtype.newbyteorder("<")
        with open(self.staged.path(name), "wb") as shard:  # not ndarray.tofile: its short write carries no errno
            shard.write(self.buffer[: self.filled].astype(little_endian, copy=False).data)
        self.shards.append({"file": name, "tokens": int(self.filled)})
        self.filled = 0


def require_split_name(split_name: str, out_dir: Path) -> None:
    """ValueError unless `split_name` can name a split's files in `out_dir` (`{split_name}_00000.bin` and its index),
    as a mixture names it: not empty, no '/'. Asked before a corpus is read, by each function that writes a split."""
    if not split_name or "/" in split_name:
        raise ValueError(
            f"split name {split_name!r}: a split is named by its files in {out_dir}, {split_name or 'NAME'}_00000.bin "
            "and its index, as a mixture names it: give a name without '/' (web, code_python)"
        )


def tokenize_corpus(
    jsonl_path: str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    split_name: str,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    add_bos: bool | None = None,
    select: Callable[[str], bool] | None = None,
    extra_index: dict | None = None,
) -> dict:
    """Encode every document of `jsonl_path` (those `select` accepts, if given) into `{split_name}_*.bin` shards
    in `out_dir`; return the index, with `extra_index` merged in. Each document is led by BOS when `add_bos`, or
    (None) when the tokenizer frames a text with it (`Tokenizer.frames_with_bos`: a DeepSeek release's), as
    transformers' `tokenizer(text)` encodes each document and as prompts are encoded (`encode_prompt`).

    Streams: memory holds one shard buffer, one batch of documents and the ids of a piece of one
    (`Tokenizer.encoded_pieces`), whatever the corpus and document size.
    """
    jsonl_path, out_dir = Path(jsonl_path), Path(out_dir)
    require_split_name(split_name, out_dir)
    require_corpus_file(jsonl_path)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    dtype = token_dtype(tokenizer.vocab_size)
    add_bos = tokenizer.frames_with_bos if add_bos is None else add_bos
    documents = text_bytes = 0
    # The new shards stay hidden until all are written; an error deletes them and leaves the old split as it was.
    with staged_files(out_dir) as staged:
        writer = _ShardWriter(staged, split_name, dtype, shard_tokens)

        def encode(batch: list[str]) -> None:
            for _, ids in tokenizer.encoded_pieces(batch, add_bos=add_bos, add_eos=True):
                writer.add(ids)

        batch: list[str] = []
        for row in read_corpus_rows(jsonl_path):  # names file:line of a bad or null row; half characters: U+FFFD
            if select is not None and not select(row.text):
                continue
            text_bytes += len(row.text.encode("utf-8"))
            documents += 1
            batch.append(row.text)
            if len(batch) == ENCODE_BATCH_DOCUMENTS:
                encode(batch)
                batch = []
        encode(batch)
        writer.flush()
        # Old index first, so that a crash while the shards are renamed leaves no index rather than one that lies.
        index_path(out_dir, split_name).unlink(missing_ok=True)

    index = {
        "version": INDEX_VERSION,
        "split": split_name,
        "source": str(jsonl_path.resolve()),  # absolute, as the tokenizer's path: found from any working folder
        "dtype": dtype.name,
        "shards": writer.shards,
        "documents": documents,
        "total_tokens": sum(shard["tokens"] for shard in writer.shards),
        "text_bytes": text_bytes,
        "bos": add_bos,
        "tokenizer": {
            "vocab_size": tokenizer.vocab_size,
            "sha256": tokenizer.fingerprint,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            # where the trainer finds tokenizer.json to put into its checkpoints
            "path": str(Path(tokenizer.source).resolve()) if Path(tokenizer.source).is_file() else None,
        },
        **(extra_index or {}),
    }
    write_atomic(index_path(out_dir, split_name), json.dumps(index, indent=2))
    _remove_stale_shards(out_dir, split_name, {shard["file"] for shard in writer.shards})
    return index


def _remove_stale_shards(out_dir: Path, split_name: str, current: set[str]) -> None:
    pattern = re.compile(rf"{re.escape(split_name)}_\d{{5}}\.bin")
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in current:
            path.unlink()


def load_index(out_dir: str | os.PathLike, split_name: str) -> dict:
    """The index of `split_name`'s shards, checked against the shard files it lists."""
    path = index_path(out_dir, split_name)
    if not Path(out_dir).is_dir():  # a mistyped data_dir / --data, or a run's relative one after the run was moved
        raise FileNotFoundError(
            f"no folder of token shards at {Path(out_dir).resolve()}: `seekstack data tokenize --out` writes one"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at {path}: {_how_to_write(out_dir, split_name)}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        dtype = np.dtype(index["dtype"])
        shards, total_tokens = index["shards"], index["total_tokens"]
        tokens = [shard["tokens"] for shard in shards]
    except (ValueError, KeyError, TypeError) as error:  # ValueError: no JSON, or no UTF-8 (saved again as UTF-16)
        raise ValueError(f"{path} is corrupt ({error!r}); tokenize the split again") from error
    version = index.get("version")
    if type(version) is not int or version != INDEX_VERSION:  # another seekstack's index, or a hand-edited one
        raise ValueError(
            f"{path}: field 'version' is {'absent' if version is None else repr(version)}, this seekstack reads "
            f"version {INDEX_VERSION} of the shard index; tokenize the split again with this seekstack"
        )
    counts = [("total_tokens", total_tokens), *((f"shards[{n}].tokens", count) for n, count in enumerate(tokens))]
    for field, value in counts:  # before the sum, which a count written as text ("12113") fails naming no field
        if type(value) is not int or value < 0:  # 7218.0 passed the sums and reached the windows' arithmetic
            raise ValueError(
                f"{path} is corrupt: field {field!r} is {value!r}, not a whole number of tokens; "
                "tokenize the split again"
            )
    counted = sum(tokens)
    if dtype not in SHARD_DTYPES:  # a hand-edited index: its shards' bytes would be read as other numbers
        raise ValueError(
            f"{path} is corrupt: field 'dtype' is {index['dtype']!r}, not one token shards are written in "
            f"({', '.join(allowed.name for allowed in SHARD_DTYPES)}); tokenize the split again"
        )
    if counted != total_tokens:
        raise ValueError(
            f"{path} is corrupt: shard token counts sum to {counted}, total_tokens says {total_tokens}; tokenize the "
            "split again"
        )
    for number, shard in enumerate(shards):
        file = shard.get("file")
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".."):  # a shard beside its index
            raise ValueError(
                f"{path} is corrupt: field 'shards[{number}].file' is {file!r}, not the name of a shard file beside "
                "it; tokenize the split again"
            )
        shard_path = path.parent / file
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} listed in {path} is missing")
        expected = shard["tokens"] * dtype.itemsize
        if shard_path.stat().st_size != expected:
            raise ValueError(
                f"shard {shard_path} has {shard_path.stat().st_size} bytes, {path} says {expected}; re-tokenize"
            )
    return index


def shard_listing(out_dir: str | os.PathLike) -> dict[str, str]:
    """What a folder of token shards holds, by path as `out_dir` spells it, for ranks to compare: each index's sha256
    (its first 12 hex digits) and the size of each shard it lists, or "missing"; "unreadable" for an index that cannot
    be read; {} for no folder. Reads the index files alone."""
    listing = {}
    for path in sorted(Path(out_dir).glob(f"*{INDEX_SUFFIX}")):
        try:
            text = path.read_bytes()
            shards = [Path(out_dir) / shard["file"] for shard in json.loads(text)["shards"]]
        except (OSError, ValueError, KeyError, TypeError):  # load_index names what is wrong, where it is read
            listing[str(path)] = "unreadable"
            continue
        listing[str(path)] = f"sha256 {hashlib.sha256(text).hexdigest()[:12]}"
        for shard in shards:
            listing[str(shard)] = f"{shard.stat().st_size:,} bytes" if shard.is_file() else "missing"
    return listing


def _how_to_write(out_dir: str | os.PathLike, split_name: str) -> str:
    """What writes the shards of `split_name` into `out_dir`, for an error about a folder without them, naming the
    splits it holds, or for a folder of none, the command that writes train and val: a difficulty bucket of the
    training split (a curriculum's source) is written by `data tokenize --buckets` alone."""
    from seekstack.tokens.difficulty import BUCKETS, bucket_split_name  # here: that module imports this one

    held = _splits_held(out_dir)
    if split_name in {bucket_split_name("train", bucket) for bucket in BUCKETS}:
        bucket = f"split {split_name!r} is a difficulty bucket of train"
        return f"{bucket}, which `seekstack data tokenize --buckets` writes{held}"
    if split_name in ("train", "val") and not held:
        command = f"seekstack data tokenize --corpus CORPUS --tokenizer TOKENIZER --out {out_dir}"
        return f"tokenize split {split_name!r} first; `{command}` writes train and val"
    return f"tokenize split {split_name!r} first{held}"


def _splits_held(out_dir: str | os.PathLike) -> str:
    """The splits a folder holds shards of, for an error about one it lacks (a misspelt `mixture` source)."""
    splits = sorted(path.name.removesuffix(INDEX_SUFFIX) for path in Path(out_dir).glob(f"*{INDEX_SUFFIX}"))
    return f" ({out_dir} holds {', '.join(splits)})" if splits else ""


def token_counts(out_dir: str | os.PathLike, split_name: str, vocab: int, limit: int | None = None) -> np.ndarray:
    """How often each id below `vocab` occurs in `split_name`'s shards (in their first `limit` tokens): (vocab,)."""
    index = load_index(out_dir, split_name)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    counts, left = np.zeros(vocab, dtype=np.int64), limit
    for shard in index["shards"]:
        ids = np.memmap(index_path(out_dir, split_name).parent / shard["file"], dtype=dtype, mode="r")[:left]
        counts += np.bincount(ids, minlength=vocab)[:vocab]
        if left is not None:
            left -= len(ids)
            if left <= 0:
                break
    return counts


class TokenWindows:
    """Windows of seq_len + 1 tokens from a split's shards, in an order fixed by `seed` and resumable.

    Training order: the stream is cut into windows at stride seq_len (neighbours share one token), and each
    epoch visits all of them in a permutation drawn from (seed, epoch). `position` counts windows served,
    so the order does not depend on the batch size and `state_dict()` resumes it exactly.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split_name: str,
        seq_len: int,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ):
        self.index = load_index(out_dir, split_name)
        self.index_file = index_path(out_dir, split_name)
        if tokenizer is not None and tokenizer.fingerprint != self.index["tokenizer"]["sha256"]:
            raise ValueError(
                f"{self.index_file} was tokenized with another tokenizer than {tokenizer.source}; re-tokenize"
            )
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.seed, self.position = seq_len, seed, 0
        self.vocab_size = self.index["tokenizer"]["vocab_size"]
        total_tokens = self.index["total_tokens"]
        self.num_windows = (total_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{self.index_file} holds {total_tokens} tokens, too few for one window of {seq_len + 1}")
        dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.shards = [
            np.memmap(self.index_file.parent / shard["file"], dtype=dtype, mode="r") for shard in self.index["shards"]
        ]
        self.shard_starts = np.cumsum([0] + [len(shard) for shard in self.shards])
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def window(self, window_number: int) -> np.ndarray:
        """Tokens [n * seq_len, n * seq_len + seq_len + 1) of the concatenated shards, as int64."""
        return self._tokens(window_number * self.seq_len, window_number * self.seq_len + self.seq_len + 1)

    def _tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the concatenated shards, as int64; a ValueError naming the shard and the token where
        one is no id of the tokenizer the index records (a damaged shard), which the model would refuse naming
        neither, or embed (an id past the tokenizer's, within the model's vocabulary)."""
        pieces, first = [], start
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while start < end:
            offset = start - self.shard_starts[shard]
            piece = self.shards[shard][offset : offset + end - start]
            pieces.append(piece)
            start += len(piece)
            shard += 1
        tokens = np.concatenate(pieces).astype(np.int64)
        if tokens.max() >= self.vocab_size:  # one max over the window's array: a memmap piece's costs twice as much
            bad = first + int(np.argmax(tokens >= self.vocab_size))
            shard = int(np.searchsorted(self.shard_starts, bad, side="right")) - 1
            raise ValueError(
                f"{self.index_file.parent / self.index['shards'][shard]['file']}: token "
                f"{bad - self.shard_starts[shard]:,} is id {tokens[bad - first]}, past the {self.vocab_size:,} ids of "
                f"the tokenizer {self.index_file.name} records: the shard is damaged; tokenize the split again"
            )
        return tokens

    def _window_at(self, position: int) -> int:
        epoch, rank = divmod(position, self.num_windows)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch_order = (epoch, order)
        return int(self._epoch_order[1][rank])

    def batch(self, batch_size: int) -> torch.Tensor:
        """The next `batch_size` training windows, shape (batch_size, seq_len + 1), dtype long."""
        rows = [self.window(self._window_at(self.position + row)) for row in range(batch_size)]
        self.position += batch_size
        return torch.from_numpy(np.stack(rows))

    def sequential(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All windows in stream order, for validation: every token but the first is a target once. The last batch of
        whole windows may have fewer rows; the tokens after the last whole window (targets of none) follow as one
        shorter window, a batch of one row, so that the whole split is scored."""
        for first in range(0, self.num_windows, batch_size):
            numbers = range(first, min(first + batch_size, self.num_windows))
            yield torch.from_numpy(np.stack([self.window(number) for number in numbers]))
        tail = self._tokens(self.num_windows * self.seq_len, int(self.shard_starts[-1]))
        if len(tail) > 1:  # one token alone is the last whole window's last target
            yield torch.from_numpy(tail)[None]

    def state_dict(self) -> dict:
        """The seed and position from which `batch` continues, and the number of windows the position counts."""
        return {"seed": self.seed, "position": self.position, "windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`, so the next batches are the ones that would have followed it. A state saved
        over another number of windows (the split was tokenized again since) goes on with a warning: the epoch it was
        in had its order drawn over those windows, and no position in the new order continues it."""
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._epoch_order = None
        saved_windows = state.get("windows", self.num_windows)  # a state saved before states counted them: trusted
        if saved_windows != self.num_windows:
            warnings.warn(
                f"{self.index_file}: the saved data position counts {saved_windows:,} windows of {self.seq_len + 1} "
                f"tokens, and the split holds {self.num_windows:,} now (tokenized again since): the order goes on "
                "over the windows it holds, so the epoch in progress may serve some of them again and skip others; "
                "give the run the data it was trained on to continue it exactly",
                stacklevel=2,
            )
