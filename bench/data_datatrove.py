"""Our quality rules against datatrove's well-kept ones, on the three corpora of `bench/data_corpora.py`.

datatrove: GopherRepetitionFilter, GopherQualityFilter and FineWebQualityFilter in that order, each with its
defaults and the corpus's language (`en` for the code and prose corpora, `zh` for the Chinese one: datatrove does
not detect it per document without a downloaded fastText model). Ours: the rules of each document's kind,
detected from the text alone (`--profile auto`, no file names). Both on the normalised text, without dedup.
Prints documents kept, the reasons that removed the most, and documents/s.

    pip install datatrove spacy     # spacy: datatrove's English and Chinese word tokenizers
    nice python bench/data_datatrove.py data/bench_corpora
"""

from __future__ import annotations

import time
from collections import Counter

from data_corpora import corpora_folder
from peers import peer_missing

from seekstack.corpus.rules import CleaningConfig, failed_rule, normalise, rule_kind
from seekstack.corpus.sources import read_jsonl


def datatrove_filters(language: str) -> list:
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    return [
        GopherRepetitionFilter(language=language),
        GopherQualityFilter(language=language),
        FineWebQualityFilter(language=language),
    ]


def datatrove_verdict(filters: list, doc_id: str, text: str) -> str | None:
    from datatrove.data import Document as DatatroveDocument

    document = DatatroveDocument(text=text, id=doc_id)
    for step in filters:
        result = step.filter(document)
        passed, reason = result if isinstance(result, tuple) else (result, step.name)
        if not passed:
            return reason
    return None


def ours_verdict(config: CleaningConfig, text: str) -> str | None:
    kind, _ = rule_kind(text, config.profile)
    return failed_rule(text, config.rules_for(kind))


def main() -> None:
    corpora = corpora_folder(__doc__)
    config = CleaningConfig()
    missing = peer_missing("datatrove", ("datatrove", "spacy"), "pip install datatrove spacy")
    if missing:
        print(missing)
    for path in sorted(corpora.glob("*.jsonl")):
        documents = [(doc.doc_id, normalise(doc.text)) for doc in read_jsonl(path, id_field="id")]
        if not documents:  # data_corpora.py writes an empty corpus where this machine has no source text for it
            print(f"{path.name:12} skipped: no documents (bench/data_corpora.py found no source text for it)")
            continue
        contenders = {"ours": lambda doc_id, text: ours_verdict(config, text)}
        if not missing:
            filters = datatrove_filters("zh" if path.stem == "zh" else "en")
            contenders["datatrove"] = lambda doc_id, text, filters=filters: datatrove_verdict(filters, doc_id, text)
        for name, verdict in contenders.items():
            started = time.perf_counter()
            reasons = Counter(verdict(doc_id, text) for doc_id, text in documents)
            seconds = time.perf_counter() - started
            kept = reasons.pop(None, 0)
            top = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(4))
            print(
                f"{path.name:12} {name:9} kept {kept:4d}/{len(documents)} ({kept / len(documents):.0%}) "
                f"{len(documents) / seconds:7.1f} docs/s; removed most by {top}"
            )


if __name__ == "__main__":
    main()
