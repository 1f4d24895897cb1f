"""Quality selection ablation: the same model trained on the classifier's top-scored documents vs a random selection
of equal tokens, scored by bits per byte on held-out clean prose.

Corpora from `bench/data_corpora.py`. English prose is split three ways: the reference set the classifier learns
from, a held-out validation set (the "clean" text the two models are judged on), and the rest, which joins the raw
pool with the code and Chinese corpora and word salad (prose words in random order). The classifier
(`corpus/quality.py`, reference vs a pool sample) scores every pool document; "top" takes documents best first and
"random" in an order fixed by the seed, each up to `--tokens` tokens. Both are tokenized with one tokenizer trained
on the pool and trained alike: the micro model and batch of `bench/data_mixing.py`, the rest `bench/short_runs.py`.

    python bench/data_corpora.py /tmp/corpora
    python bench/data_selection.py /tmp/corpora             # 2 x 120 steps of the micro model, ~15 min, 2 cores
    python bench/data_selection.py /tmp/corpora --steps 40  # quick check
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data_corpora import missing_corpora
from data_mixing import MICRO
from options import positive_int
from short_runs import short_run

from seekstack.corpus.quality import train_quality_model
from seekstack.tokenizer import Tokenizer, train_tokenizer
from seekstack.tokens.shards import tokenize_corpus

REFERENCE_DOCUMENTS, VAL_DOCUMENTS, SALAD_DOCUMENTS, CLASSIFIER_POOL_SAMPLE = 200, 100, 300, 600


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    return path


def take_tokens(texts: list[str], tokenizer: Tokenizer, budget: int) -> list[str]:
    """Documents of `texts` in order, each with an end-of-document token, skipping any that would take the total
    past `budget`: every selection holds at most `budget` tokens and, from a large pool, very nearly that many."""
    taken, tokens = [], 0
    for text in texts:
        size = len(tokenizer.encode(text)) + 1
        if tokens + size <= budget:
            taken.append(text)
            tokens += size
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpora", type=Path, nargs="?", default=Path("/tmp/corpora"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_data_selection"))
    parser.add_argument("--tokens", type=positive_int, default=500_000, help="tokens each selection holds")
    parser.add_argument("--steps", type=positive_int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = missing_corpora(args.corpora)
    if missing:
        parser.error(missing)

    rng = random.Random(args.seed)
    prose, code, chinese = (read_texts(args.corpora / f"{name}.jsonl") for name in ("prose", "code", "zh"))
    rng.shuffle(prose)
    reference, val, pool_prose = (
        prose[:REFERENCE_DOCUMENTS],
        prose[REFERENCE_DOCUMENTS : REFERENCE_DOCUMENTS + VAL_DOCUMENTS],
        prose[REFERENCE_DOCUMENTS + VAL_DOCUMENTS :],
    )
    vocabulary = " ".join(pool_prose[:50]).split()
    salad = [" ".join(rng.choices(vocabulary, k=400)) for _ in range(SALAD_DOCUMENTS)]
    pool = {"prose": pool_prose, "code": code, "chinese": chinese, "word salad": salad}
    pool_texts = [text for texts in pool.values() for text in texts]
    kind_of = {text: kind for kind, texts in pool.items() for text in texts}

    classifier = train_quality_model(reference, rng.sample(pool_texts, CLASSIFIER_POOL_SAMPLE), seed=args.seed)
    scores = {text: classifier.score(text) for text in pool_texts}
    tokenizer = train_tokenizer(pool_texts, vocab_size=2048, out_path=args.out / "tokenizer")
    shuffled = rng.sample(pool_texts, len(pool_texts))
    selections = {
        "top": take_tokens(sorted(pool_texts, key=scores.__getitem__, reverse=True), tokenizer, args.tokens),
        "random": take_tokens(shuffled, tokenizer, args.tokens),
    }
    val_file = write_jsonl(args.out / "val.jsonl", val)

    rows = []
    for name, texts in selections.items():
        data_dir = args.out / name / "tokens"
        index = tokenize_corpus(write_jsonl(args.out / name / "train.jsonl", texts), tokenizer, data_dir, "train")
        tokenize_corpus(val_file, tokenizer, data_dir, "val")
        kinds = {kind: sum(kind_of[text] == kind for text in texts) for kind in pool}
        model = {**MICRO["model_overrides"], "vocab_size": tokenizer.vocab_size}
        summary = short_run(
            data_dir, args.out / name / "run", args.steps, seed=args.seed, **{**MICRO, "model_overrides": model}
        )
        rows.append((name, index["total_tokens"], kinds, summary))
        print(f"{name}: {index['total_tokens']:,} tokens {kinds}: {summary['val_bpb']:.4f} bits/byte", flush=True)

    print(
        f"\npool {len(pool_texts)} documents ({', '.join(f'{len(t)} {k}' for k, t in pool.items())}); "
        f"classifier on {REFERENCE_DOCUMENTS} reference prose vs {CLASSIFIER_POOL_SAMPLE} pool documents; "
        f"validation: {VAL_DOCUMENTS} held-out prose documents"
    )
    tokens = args.steps * MICRO["batch_size"] * MICRO["seq_len"]
    print(f"micro model, {args.steps} steps x {MICRO['batch_size']} x {MICRO['seq_len']} = {tokens:,} tokens a run")
    print(f"{'selection':10s} {'tokens':>10s} {'prose':>6s} {'code':>5s} {'zh':>4s} {'salad':>6s} {'val bpb':>8s}")
    for name, tokens, kinds, summary in rows:
        counts = " ".join(f"{kinds[k]:>{w}d}" for k, w in zip(pool, (6, 5, 4, 6), strict=True))
        print(f"{name:10s} {tokens:>10,d} {counts} {summary['val_bpb']:8.4f}")
    top, random_pick = (summary["val_bpb"] for *_, summary in rows)
    print(f"top - random = {top - random_pick:+.4f} bits/byte ({'top' if top < random_pick else 'random'} better)")


if __name__ == "__main__":
    main()
