"""The quality classifier on held-out documents: English prose as the reference set against a pool of code,
Chinese and word salad (words of the same prose in random order), from the corpora of `bench/data_corpora.py`.

Trains on 300 reference and 600 pool documents and reports, on the rest, the AUC (the chance that a held-out
reference document outscores a held-out pool document), accuracy at 0.5, the mean score of each part, and time.

    nice python bench/data_quality.py data/bench_corpora
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
from data_corpora import corpora_folder

from seekstack.corpus.quality import train_quality_model


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def main() -> None:
    corpora = corpora_folder(__doc__)
    code, prose, zh = (texts(corpora / f"{name}.jsonl") for name in ("code", "prose", "zh"))
    rng = random.Random(0)
    vocabulary = " ".join(prose[:50]).split()
    salad = [" ".join(rng.choices(vocabulary, k=400)) for _ in range(300)]
    rng.shuffle(prose)
    started = time.perf_counter()
    model = train_quality_model(prose[:300], code[:300] + zh[:100] + salad[:200])
    seconds = time.perf_counter() - started
    held_out = {"prose (reference)": prose[300:], "code": code[300:], "chinese": zh[100:], "word salad": salad[200:]}
    scores = {name: np.array([model.score(text) for text in part]) for name, part in held_out.items()}
    positive = scores["prose (reference)"]
    negative = np.concatenate([scores[name] for name in ("code", "chinese", "word salad")])
    auc = (positive[:, None] > negative[None, :]).mean()
    accuracy = ((positive >= 0.5).sum() + (negative < 0.5).sum()) / (len(positive) + len(negative))
    print(f"trained in {seconds:.1f} s; held out: {len(positive)} reference, {len(negative)} pool documents")
    print(f"AUC {auc:.4f}, accuracy at 0.5 {accuracy:.3f}")
    for name, values in scores.items():
        print(f"  mean score {name}: {values.mean():.3f} ({len(values)} documents)")


if __name__ == "__main__":
    main()
