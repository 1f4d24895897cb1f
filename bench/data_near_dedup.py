"""Near-duplicate detection: recall and precision on planted near duplicates at several edit rates.

The corpus: `originals` documents of 300 words drawn from a Zipf-distributed vocabulary of 20,000 made-up words
(so that unrelated documents share common words, as real ones do), each followed later by one copy in which a
fraction `rate` of the words was edited (a third each replaced, deleted, or preceded by an inserted word), and
`originals` unrelated documents. Recall: planted copies flagged / planted copies. Precision: planted copies flagged
/ all documents flagged (an unrelated document or an original flagged counts against it). Shingles: word 5-grams;
128 MinHash permutations; LSH at the threshold.

    nice python bench/data_near_dedup.py [--originals 500]
"""

from __future__ import annotations

import argparse
import random
import time

from options import positive_int

from seekstack.corpus.dedup import SHINGLE_WORDS, NearDeduplicator, word_shingles

EDIT_RATES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
THRESHOLDS = (0.7, 0.8, 0.9)


def vocabulary(size: int = 20_000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(size)]


def document(rng: random.Random, words: list[str], weights: list[float], length: int = 300) -> list[str]:
    return rng.choices(words, weights=weights, k=length)


def edit(rng: random.Random, text: list[str], rate: float, words: list[str]) -> list[str]:
    """`text` with `rate` of its words edited: replaced, deleted or preceded by an inserted word, a third each."""
    edited = []
    for word in text:
        if rng.random() >= rate:
            edited.append(word)
            continue
        action = rng.randrange(3)
        if action == 0:
            edited.append(rng.choice(words))
        elif action == 2:
            edited += [rng.choice(words), word]
    return edited


def measure(originals: int, rate: float, threshold: float, seed: int = 0) -> tuple[float, float, float]:
    """Recall, precision and the mean true Jaccard similarity of the planted pairs."""
    rng = random.Random(seed)
    words = vocabulary()
    weights = [1 / (rank + 1) for rank in range(len(words))]
    bases = [document(rng, words, weights) for _ in range(originals)]
    copies = [edit(rng, base, rate, words) for base in bases]
    unrelated = [document(rng, words, weights) for _ in range(originals)]
    stream = [(f"o{i}", b, False) for i, b in enumerate(bases)] + [(f"u{i}", u, False) for i, u in enumerate(unrelated)]
    stream += [(f"c{i}", c, True) for i, c in enumerate(copies)]
    dedup = NearDeduplicator(threshold=threshold)
    flagged = [planted for key, text, planted in stream if dedup.duplicate_of(key, " ".join(text)) is not None]
    recall = sum(flagged) / len(copies)
    precision = sum(flagged) / len(flagged) if flagged else 1.0
    jaccards = []
    for base, copy in zip(bases, copies, strict=True):
        a, b = word_shingles(" ".join(base)), word_shingles(" ".join(copy))
        jaccards.append(len(a & b) / len(a | b))
    return recall, precision, sum(jaccards) / len(jaccards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=positive_int, default=500)
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"{args.originals} originals + {args.originals} planted copies + {args.originals} unrelated documents;")
    print(f"word {SHINGLE_WORDS}-gram shingles, 128 permutations")
    header = " | ".join(f"t={t}: recall  precision" for t in THRESHOLDS)
    print(f"| edit rate | mean Jaccard | {header} |")
    for rate in EDIT_RATES:
        cells, jaccard = [], 0.0
        for threshold in THRESHOLDS:
            recall, precision, jaccard = measure(args.originals, rate, threshold)
            cells.append(f"{recall:6.3f}  {precision:9.3f}")
        print(f"| {rate:9.2f} | {jaccard:12.3f} | " + " | ".join(f"   {cell}" for cell in cells) + " |")
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
