"""Document difficulty for the curriculum: a zlib compression ratio, and easy/medium/hard buckets of a split.

The measure is compressed bytes / UTF-8 bytes (zlib, level 6), per document. A document that compresses well
repeats itself (tables, boilerplate, regular code) and is easy to predict; one that compresses badly keeps
bringing new content. Why this one: compressed size is an upper bound on the text's information content
under a simple adaptive model (LZ77 + Huffman), so it tracks what a language model finds hard, yet it needs
no trained model and no tokenizer, and costs one zlib pass when the split is tokenized.
A split's documents, sorted by score, are cut into buckets holding equal shares of its bytes, so that each
bucket is a split of its own (`train_easy`, `train_medium`, `train_hard`) that a mixture can draw from.
"""

from __future__ import annotations

import bisect
import math
import os
import zlib
from pathlib import Path

from seekstack.corpus.sources import read_jsonl
from seekstack.tokenizer import Tokenizer
from seekstack.tokens.shards import tokenize_corpus

BUCKETS = ("easy", "medium", "hard")
MEASURE = "zlib_compression_ratio"


def compression_ratio(text: str) -> float:
    """zlib-compressed bytes per UTF-8 byte of `text`: low for repetitive text, high for dense text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / max(len(raw), 1)


def bucket_bounds(scores: list[float], sizes: list[int], buckets: int) -> list[float]:
    """The `buckets - 1` score bounds that cut documents sorted by score into parts of about equal total size.

    Sorted by score, a document joins the part its middle byte falls in; bound k is the highest score of parts
    0..k, so a document with score s goes to bucket `bisect_left(bounds, s)`. With at least `buckets` documents
    no part is left empty: a part never skips one after the previous document's, and the last documents fill
    the parts still empty (a small corpus, or one document holding most of the bytes).
    """
    order = sorted(range(len(scores)), key=scores.__getitem__)
    total, before, previous = max(sum(sizes), 1), 0, 0
    bounds = [-math.inf] * (buckets - 1)
    for rank, document in enumerate(order):
        part = min(int(buckets * (before + sizes[document] / 2) / total), buckets - 1, previous + 1, rank)
        part = max(part, buckets - (len(order) - rank))  # the documents left must fill the parts left
        for k in range(part, buckets - 1):
            bounds[k] = max(bounds[k], scores[document])
        before, previous = before + sizes[document], part
    return bounds


def bucket_split_name(split_name: str, bucket: str) -> str:
    """The split a bucket is written as: `train_easy`, ..."""
    return f"{split_name}_{bucket}"


def difficulty_bounds(jsonl_path: str | os.PathLike, buckets: int = len(BUCKETS)) -> list[float]:
    """Score every document of `jsonl_path` and return the `bucket_bounds`; ValueError, naming the file, when it
    has fewer documents than buckets."""
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise FileNotFoundError(f"no corpus file at {jsonl_path}: run the corpus stage first")
    scores, sizes = [], []
    for _, text, _ in read_jsonl(jsonl_path, "text"):
        scores.append(compression_ratio(text))
        sizes.append(len(text.encode("utf-8")))
    if len(scores) < buckets:
        raise ValueError(
            f"{jsonl_path} has {len(scores)} documents, too few for {buckets} difficulty buckets; "
            "tokenize without --buckets, or build a larger corpus"
        )
    return bucket_bounds(scores, sizes, buckets)


def tokenize_buckets(
    jsonl_path: str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    split_name: str = "train",
    buckets: tuple[str, ...] = BUCKETS,
    bounds: list[float] | None = None,
) -> list[dict]:
    """Tokenize each difficulty bucket of `jsonl_path` as split `{split_name}_{bucket}`, with the `bounds` of
    `difficulty_bounds` (computed here when not given).

    Returns the buckets' indexes; each records the measure and its score range under `difficulty`.
    """
    jsonl_path = Path(jsonl_path)
    bounds = difficulty_bounds(jsonl_path, len(buckets)) if bounds is None else bounds
    indexes = []
    for number, bucket in enumerate(buckets):
        low = bounds[number - 1] if number > 0 else None  # None: unbounded
        high = bounds[number] if number < len(bounds) else None

        def in_bucket(text: str, number: int = number) -> bool:
            return bisect.bisect_left(bounds, compression_ratio(text)) == number

        difficulty = {"measure": MEASURE, "bucket": bucket, "score_above": low, "score_at_most": high}
        indexes.append(
            tokenize_corpus(
                jsonl_path,
                tokenizer,
                out_dir,
                bucket_split_name(split_name, bucket),
                select=in_bucket,
                extra_index={"difficulty": difficulty},
            )
        )
    return indexes
