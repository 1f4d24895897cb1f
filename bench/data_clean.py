"""The cleaning report on the three corpora of `bench/data_corpora.py`: documents per detected kind, kept and
removed per rule with example snippets, under `--profile auto` and, for comparison, under the code rules alone
(the stdlib-tuned defaults every document was held to before profiles).

    python bench/data_corpora.py data/bench_corpora
    nice python bench/data_clean.py data/bench_corpora
"""

from __future__ import annotations

import tempfile

from data_corpora import corpora_folder

from seekstack.corpus.build import CorpusBuildError, build_corpus
from seekstack.corpus.rules import CleaningConfig
from seekstack.corpus.sources import read_jsonl


def main() -> None:
    corpora = corpora_folder(__doc__)
    for path in sorted(corpora.glob("*.jsonl")):
        for profile in ("auto", "code"):
            config = CleaningConfig(profile=profile, min_kept_fraction=0.0)
            with tempfile.TemporaryDirectory() as out:
                try:
                    report = build_corpus(
                        [read_jsonl(path, id_field="id")], out, config, show_progress=False, workers=2
                    )
                except CorpusBuildError as error:
                    print(f"{path.name} --profile {profile}: {error}")
                    continue
            share = report.documents_kept / max(1, report.documents_in)
            print(f"\n## {path.name}, --profile {profile}: {report.documents_in} in, {report.documents_kept} kept "
                  f"({share:.1%}), {report.bytes_in / 2**20:.1f} MiB in, {report.seconds:.1f} s")  # fmt: skip
            kinds = ", ".join(f"{kind} {c['kept']}/{c['in']}" for kind, c in sorted(report.kinds.items()))
            print(f"kinds (kept/in): {kinds}")
            for reason, count in report.top_removals(len(report.removed)):
                print(f"  removed {count:4d} {reason}")
                if profile == "auto":
                    for example in report.examples[reason][:2]:
                        print(f"       {example['id']} [{example['kind']}]: {example['snippet'][:90]!r}")


if __name__ == "__main__":
    main()
