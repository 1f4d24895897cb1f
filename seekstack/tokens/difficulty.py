"""Document difficulty for the curriculum: a zlib compression ratio, and easy/medium/hard buckets of a split.

The measure is compressed bytes / UTF-8 bytes (zlib, level 6), per document. A document that compresses well
repeats itself (tables, boilerplate, regular code) and is easy to predict; one that compresses badly keeps
bringing new content. Why this one: compressed size is an upper bound on the text's information content
under a simple adaptive model (LZ77 + Huffman), so it tracks what a language model finds hard, yet it needs
no trained model and no tokenizer, and costs one zlib pass when the split is tokenized.
The ratio is per byte but not free of length: zlib starts each document with an empty window and pays for its
codes once, so short documents score harder than long ones of the same kind (README: the curriculum runs from
long to short documents as much as from repetitive to dense ones).
A split's documents, sorted by score (equal scores in document order), are cut into buckets holding equal
shares of its bytes, so that each bucket is a split of its own (`train_easy`, `train_medium`, `train_hard`) that
a mixture can draw from.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seekstack.corpus.sources import read_corpus_rows, require_corpus_file
from seekstack.schema import counted
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import require_split_name, tokenize_corpus

BUCKETS = ("easy", "medium", "hard")
MEASURE = "zlib_compression_ratio"


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes per UTF-8 byte of `text`: low for repetitive text, high for dense text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / max(len(raw), 1)


def bucket_parts(scores: list[float], sizes: list[int], buckets: int) -> list[int]:
    """The part (0 = easiest) of each document when documents sorted by score are cut into `buckets` parts of about
    equal total size; equal scores keep document order, so tied documents may go to different parts.

    Sorted by score, a document joins the part its middle byte falls in. With at least `buckets` documents no
    part is left empty: a part never skips one after the previous document's, and the last documents fill the
    parts still empty (a small corpus, one document holding most of the bytes, or documents of equal score).
    """
    order = sorted(range(len(scores)), key=scores.__getitem__)  # a stable sort: ties in document order
    total, before, previous = max(sum(sizes), 1), 0, 0
    parts = [0] * len(scores)
    for rank, document in enumerate(order):
        part = min(int(buckets * (before + sizes[document] / 2) / total), buckets - 1, previous + 1, rank)
        part = max(part, buckets - (len(order) - rank))  # the documents left must fill the parts left
        parts[document] = part
        before, previous = before + sizes[document], part
    return parts


@dataclass(frozen=True)
class DifficultyBuckets:
    """The difficulty score and bucket number (0 = easiest) of each document of a split, in file order."""

    scores: list[float]
    parts: list[int]

    def score_range(self, part: int) -> tuple[float, float]:
        """The lowest and the highest score among the documents of `part`."""
        in_part = [score for score, its_part in zip(self.scores, self.parts, strict=True) if its_part == part]
        return min(in_part), max(in_part)

    def select(self, part: int) -> Callable[[str], bool]:
        """A `select` for `tokenize_corpus` that keeps the documents of `part`; it is asked once per document,
        in file order, so it keeps them by position, not by text."""
        parts_in_order = iter(self.parts)
        return lambda _text: next(parts_in_order) == part


def bucket_split_name(split_name: str, bucket: str) -> str:
    """The split a bucket is written as: `train_easy`, ..."""
    return f"{split_name}_{bucket}"


def difficulty_buckets(jsonl_path: str | os.PathLike, buckets: int = len(BUCKETS)) -> DifficultyBuckets:
    """Score every document of `jsonl_path` and cut them into `bucket_parts`; ValueError, naming the file, when it
    has fewer documents than buckets."""
    jsonl_path = Path(jsonl_path)
    require_corpus_file(jsonl_path)
    scores, sizes = [], []
    for row in read_corpus_rows(jsonl_path):
        scores.append(compression_ratio(row.text))
        sizes.append(len(row.text.encode("utf-8")))
    if len(scores) < buckets:
        raise ValueError(
            f"{jsonl_path} has {counted(len(scores), 'document')}, too few for {buckets} difficulty buckets; "
            "tokenize without --buckets, or build a larger corpus"
        )
    return DifficultyBuckets(scores, bucket_parts(scores, sizes, buckets))


def tokenize_buckets(
    jsonl_path: str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    split_name: str = "train",
    buckets: tuple[str, ...] = BUCKETS,
    difficulty: DifficultyBuckets | None = None,
) -> list[dict]:
    """Tokenize each difficulty bucket of `jsonl_path` as split `{split_name}_{bucket}`, with the parts of
    `difficulty_buckets` (computed here when not given).

    Returns the buckets' indexes; each records the measure and its documents' score range under `difficulty`.
    """
    jsonl_path = Path(jsonl_path)
    require_split_name(split_name, Path(out_dir))  # before the corpus is scored: `{split_name}_easy` may hide ""
    difficulty = difficulty_buckets(jsonl_path, len(buckets)) if difficulty is None else difficulty
    indexes = []
    for part, bucket in enumerate(buckets):
        lowest, highest = difficulty.score_range(part)
        indexes.append(
            tokenize_corpus(
                jsonl_path,
                tokenizer,
                out_dir,
                bucket_split_name(split_name, bucket),
                select=difficulty.select(part),
                extra_index={
                    "difficulty": {
                        "measure": MEASURE,
                        "bucket": bucket,
                        "lowest_score": lowest,
                        "highest_score": highest,
                    }
                },
            )
        )
    return indexes
