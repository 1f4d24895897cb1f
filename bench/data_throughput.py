"""`data build` throughput: documents/s and MiB/s with 1 and N workers, and peak memory, on a generated corpus.

The corpus cycles through the three corpora of `bench/data_corpora.py` (code, English prose, Chinese) until it
reaches `--mib`, each pass editing 15% of every document's words so that later passes are new documents rather
than duplicates (the dedup index grows as it would on real data). Peak memory is the largest resident set of the
main process and of any worker (`ru_maxrss`).

    nice python bench/data_throughput.py --corpora data/bench_corpora --mib 1024 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from data_corpora import missing_corpora
from options import positive_int

from seekstack.corpus.build import build_corpus
from seekstack.corpus.rules import CleaningConfig
from seekstack.corpus.sources import Document, read_jsonl


def generated(corpora: Path, mib: float, seed: int = 0) -> Iterator[Document]:
    """Documents of the corpora, cycled with 15% of the words of each edited per pass, up to `mib` MiB."""
    rng = random.Random(seed)
    paths = sorted(corpora.glob("*.jsonl"))
    total, budget, cycle = 0, mib * 2**20, 0
    while total < budget:
        for path in paths:
            for doc in read_jsonl(path):
                text = doc.text
                if cycle:
                    words = text.split(" ")
                    for _ in range(len(words) * 15 // 100):
                        words[rng.randrange(len(words))] = f"w{rng.randrange(10**6)}"
                    text = " ".join(words)
                total += len(text.encode("utf-8"))
                yield Document(f"{cycle}:{doc.doc_id}", text, path.stem)
                if total >= budget:
                    return
        if total == 0:  # another pass would read nothing either: stop rather than loop for ever
            raise SystemExit(f"--corpora {corpora}: {', '.join(path.name for path in paths)} hold no text")
        cycle += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, default=Path("data/bench_corpora"))
    parser.add_argument("--mib", type=float, default=64)
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    missing = missing_corpora(args.corpora)
    if missing:
        parser.error(f"--corpora {missing}")
    if not 0 < args.mib < math.inf:  # inf: the generator never reached its budget, building until the disk filled
        parser.error(f"--mib {args.mib}: more than 0 MiB of documents to build, a finite number")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            started, cpu = time.perf_counter(), time.process_time()
            report = build_corpus([generated(args.corpora, args.mib)], out, CleaningConfig(), False, workers)
            seconds = time.perf_counter() - started
        peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = {
            "workers": workers,
            "documents": report.documents_in,
            "mib_in": round(report.bytes_in / 2**20, 1),
            "kept": report.documents_kept,
            "seconds": round(seconds, 1),
            "documents_per_s": round(report.documents_in / seconds, 1),
            "mib_per_s": round(report.bytes_in / 2**20 / seconds, 2),
            "main_cpu_s": round(time.process_time() - cpu, 1),
            "peak_rss_main_mib": round(peak_main),
            "peak_rss_worker_mib": round(peak_child),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
