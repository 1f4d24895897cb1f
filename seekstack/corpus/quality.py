"""Learned quality selection: a linear classifier over hashed word n-grams, trained to tell a reference set the user
names (positives) from the raw pool (negatives), as DCLM and FineWeb-Edu do; its probability is the document's
quality score, and selection keeps the documents above a threshold or the top fraction.

The model is fastText's bag of n-grams with a single output, i.e. logistic regression: a document's word 1- and
2-grams (`kinds.words`, so CJK characters count as words; in Thai, Lao, Tibetan, Myanmar and Khmer a word is 4
characters) are hashed (CRC-32) into `buckets` weights, and
score = sigmoid(mean of the weights of its n-grams + bias). Trained with Adagrad on the logistic loss, the two
classes weighted equally, in an order fixed by the seed.
"""

from __future__ import annotations

import json
import math
import random
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seekstack.atomic import refuse_a_file_in_the_way, staged_files, write_atomic
from seekstack.corpus.kinds import UNSPACED_WORD_CHARS, words, written_without_spaces
from seekstack.corpus.sources import read_corpus_rows, require_corpus_file
from seekstack.corpus.split import share_count
from seekstack.schema import ConfigError

DEFAULT_BUCKETS = 2**20
MAX_WORDS = 4000  # words of a document read for its features: enough to judge it, bounded cost
FEW_DOCUMENTS = 100  # a side with fewer trains a classifier of those documents' words, not of their kind


def ngram_ids(text: str, buckets: int, ngrams: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """The hashed ids of the text's lower-cased word n-grams (with repeats), or the empty-text id. In Thai, Lao,
    Tibetan, Myanmar or Khmer text, whose space-separated "words" are phrases (each a feature seen once), a word is
    `UNSPACED_WORD_CHARS` characters, and its n-grams are the substrings of n times that many, as the rules count."""
    lowered = text.lower()
    if written_without_spaces(lowered):
        characters = "".join(words(lowered))[: MAX_WORDS * UNSPACED_WORD_CHARS]
        grams = [
            characters[i : i + n * UNSPACED_WORD_CHARS]
            for n in ngrams
            for i in range(len(characters) - n * UNSPACED_WORD_CHARS + 1)
        ]
    else:
        tokens = words(lowered)[:MAX_WORDS]
        grams = [" ".join(tokens[i : i + n]) for n in ngrams for i in range(len(tokens) - n + 1)]
    ids = [zlib.crc32(gram.encode("utf-8")) % buckets for gram in grams]
    return np.asarray(ids or [0], dtype=np.int64)


@dataclass
class QualityModel:
    """Weights per hashed n-gram and a bias; `score` is the probability that a text is like the reference set."""

    weights: np.ndarray  # (buckets,) float32
    bias: float
    ngrams: tuple[int, ...] = (1, 2)

    def score(self, text: str) -> float:
        """P(reference | text) under the model."""
        logit = float(self.weights[ngram_ids(text, len(self.weights), self.ngrams)].mean()) + self.bias
        return 1 / (1 + math.exp(-logit))

    def save(self, path: str | Path) -> Path:
        """Write the model as one `.npz` file (weights, bias, n-gram sizes)."""
        path = Path(path)

        def write(target: Path) -> None:
            with open(target, "wb") as out:
                np.savez(out, weights=self.weights, bias=self.bias, ngrams=np.asarray(self.ngrams))

        return write_atomic(path, write)

    @classmethod
    def load(cls, path: str | Path) -> QualityModel:
        """Read a model written by `save`; a FileNotFoundError naming `path` when it is no file, a ValueError when the
        file holds no model."""
        path = Path(path)
        if not path.is_file():
            missing = "a folder, not a file" if path.is_dir() else "no such file"
            raise FileNotFoundError(
                f"{path}: {missing}; a quality model is the .npz that `seekstack data quality-train` writes"
            )
        try:
            with np.load(path) as saved:
                return cls(saved["weights"], float(saved["bias"]), tuple(int(n) for n in saved["ngrams"]))
        except (ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"{path}: not a quality model written by `seekstack data quality-train` ({type(error).__name__}: "
                f"{error})"
            ) from None


def train_quality_model(
    positives: Iterable[str],
    negatives: Iterable[str],
    buckets: int = DEFAULT_BUCKETS,
    epochs: int = 4,
    learning_rate: float = 0.5,
    seed: int = 0,
) -> QualityModel:
    """Logistic regression over hashed n-grams, reference texts (`positives`) against pool texts (`negatives`).

    Memory: the n-gram ids of every training document, so train on a sample of the pool (thousands of documents).
    """
    examples = [(ngram_ids(text, buckets), 1.0) for text in positives]
    examples += [(ngram_ids(text, buckets), 0.0) for text in negatives]
    labels = np.array([label for _, label in examples])
    reference_count = int(labels.sum())
    if reference_count in (0, len(labels)):
        raise ValueError(
            "quality training needs both reference (positive) and pool (negative) documents; got "
            f"{reference_count} reference and {len(labels) - reference_count} pool documents"
        )
    class_weight = {1.0: len(labels) / (2 * labels.sum()), 0.0: len(labels) / (2 * (len(labels) - labels.sum()))}
    weights = np.zeros(buckets, dtype=np.float64)
    squared = np.full(buckets, 1e-8)  # Adagrad accumulators
    bias, bias_squared = 0.0, 1e-8
    rng = random.Random(seed)
    order = list(range(len(examples)))
    for _ in range(epochs):
        rng.shuffle(order)
        for number in order:
            ids, label = examples[number]
            logit = weights[ids].mean() + bias
            error = (1 / (1 + math.exp(-logit)) - label) * class_weight[label]  # d loss / d logit
            touched, counts = np.unique(ids, return_counts=True)
            gradient = counts / len(ids) * error  # d logit / d weight of an id = its count / n-grams
            squared[touched] += gradient**2
            weights[touched] -= learning_rate * gradient / np.sqrt(squared[touched])
            bias_squared += error**2
            bias -= learning_rate * error / math.sqrt(bias_squared)
    return QualityModel(weights.astype(np.float32), bias)


def select_corpus(
    model: QualityModel,
    corpus_dir: str | Path,
    out_dir: str | Path,
    threshold: float | None = None,
    top_fraction: float | None = None,
) -> dict:
    """Score the training documents of a `data build` corpus; write those above `threshold` (or the
    `top_fraction` best) to `out_dir/train.jsonl`, every validation document to `out_dir/val.jsonl` (the
    held-out set stays as it was), each row with its `quality`, and `selection.json`. Returns the summary: documents,
    selected, the threshold (for a top fraction, the lowest score kept) and how many scored it and were kept."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("select by exactly one of threshold and top_fraction")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ConfigError(
            f"has value {top_fraction}: must be a share in (0, 1] (0.3 keeps the best 30%)", "top_fraction"
        )
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"has value {threshold}: must be in [0, 1] (scores are probabilities)", "threshold")
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    if out_dir.resolve() == corpus_dir.resolve():
        raise ValueError(f"{out_dir}: is the corpus folder; write the selection to another one (nothing was written)")
    refuse_a_file_in_the_way(out_dir, "train.jsonl, val.jsonl and selection.json")
    train, held_out = corpus_dir / "train.jsonl", corpus_dir / "val.jsonl"
    require_corpus_file(train)
    require_corpus_file(held_out)  # known before every training document is scored
    held_out_scores = [model.score(row.text) for row in read_corpus_rows(held_out)]  # a bad row named before the rest
    scores = [model.score(row.text) for row in read_corpus_rows(train)]
    if top_fraction is None:
        kept = {number for number, score in enumerate(scores) if score >= threshold}
    else:
        kept = _best(scores, max(1, share_count(top_fraction, len(scores))) if scores else 0)  # 0.7 of 5 keeps 4
        threshold = min((scores[number] for number in kept), default=1.0)
    selected = 0
    with staged_files(out_dir) as staged:
        with open(staged.path("train.jsonl"), "w", encoding="utf-8") as out:
            for number, (row, score) in enumerate(zip(read_corpus_rows(train), scores, strict=True)):
                if number in kept:
                    out.write(json.dumps({**row.record, "quality": round(score, 6)}, ensure_ascii=False) + "\n")
                    selected += 1
        with open(staged.path("val.jsonl"), "w", encoding="utf-8") as out:
            for row, score in zip(read_corpus_rows(held_out), held_out_scores, strict=True):
                out.write(json.dumps({**row.record, "quality": round(score, 6)}, ensure_ascii=False) + "\n")
        summary = {
            "documents": len(scores),
            "selected": selected,
            "threshold": threshold,
            # a top fraction cut among documents of equal score keeps the first of them: how many scored it, and kept
            "at_threshold": {
                "documents": sum(score == threshold for score in scores),
                "selected": sum(scores[number] == threshold for number in kept),
            },
            "score_quantiles": [round(float(q), 4) for q in np.quantile(scores, [0.1, 0.5, 0.9])] if scores else [],
        }
        staged.path("selection.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _best(scores: list[float], count: int) -> set[int]:
    """The numbers of the `count` highest `scores`; among equal scores at the cutoff, the earliest in the file, so
    that a top fraction keeps exactly the share asked for, the same on every run."""
    return set(sorted(range(len(scores)), key=lambda number: (-scores[number], number))[:count])
