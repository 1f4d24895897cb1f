"""`data build`: stream documents through normalisation, quality rules, dedup, PII scrubbing and the split.

Writes `train.jsonl` and `val.jsonl` (fields `id`, `text`, `source`) and `report.json` into the output folder.
The three are written under hidden names and renamed together when complete (`staged_files`), so a crash or an
error never leaves half a corpus, nor a new split beside an old one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from seekstack.atomic import staged_files
from seekstack.corpus.dedup import ExactDeduplicator, NearDeduplicator, content_hash
from seekstack.corpus.pii import scrub_pii
from seekstack.corpus.rules import RULES, CleaningConfig, failed_rule, normalise
from seekstack.corpus.sources import Document
from seekstack.corpus.split import is_validation

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REMOVAL_REASONS = tuple(rule.name for rule in RULES) + (EXACT_DUPLICATE, NEAR_DUPLICATE)
EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 120


@dataclass
class Report:
    """What `build_corpus` did: documents and bytes in and kept, removals per reason with examples, PII counts."""

    documents_in: int = 0
    bytes_in: int = 0
    documents_kept: int = 0
    bytes_kept: int = 0  # UTF-8 bytes written, after PII scrubbing
    train_documents: int = 0
    val_documents: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REMOVAL_REASONS, 0))
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # reason -> [{"id", "snippet"}]
    pii_replacements: dict[str, int] = field(default_factory=dict)  # email / ip / secret -> count
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def documents_removed(self) -> int:
        return sum(self.removed.values())

    def record_removal(self, reason: str, doc: Document) -> None:
        """Count a removed document under `reason`, keeping its id and a snippet among the first examples."""
        self.removed[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"id": doc.doc_id, "snippet": " ".join(doc.text[:SNIPPET_CHARS].split())})

    def to_json(self) -> str:
        """The report as the JSON text of `report.json`."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a `report.json`."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def build_corpus(
    sources: Iterable[Iterable[Document]],
    out_dir: str | Path,
    config: CleaningConfig | None = None,
    show_progress: bool = True,
) -> Report:
    """Clean the documents of every source into `out_dir/{train,val}.jsonl` and `out_dir/report.json`."""
    config = config or CleaningConfig()
    out_dir = Path(out_dir)
    report = Report(config=dataclasses.asdict(config))
    exact = ExactDeduplicator()
    near = NearDeduplicator(config.near_duplicate_threshold, config.minhash_permutations)
    pii_counts: Counter[str] = Counter()
    started = time.perf_counter()
    progress = Progress(
        SpinnerColumn(),
        TextColumn(
            "[bold]data build[/] {task.completed} docs in, {task.fields[kept]} kept, {task.fields[mib]:.1f} MiB"
        ),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=True,
    )
    with (
        staged_files(out_dir) as staged,
        progress,
        open(staged.path("train.jsonl"), "w", encoding="utf-8") as train,
        open(staged.path("val.jsonl"), "w", encoding="utf-8") as val,
    ):
        task = progress.add_task("build", total=None, kept=0, mib=0.0)
        for doc in itertools.chain.from_iterable(sources):
            report.documents_in += 1
            report.bytes_in += len(doc.text.encode("utf-8"))
            progress.update(task, advance=1, kept=report.documents_kept, mib=report.bytes_in / 2**20)
            text = normalise(doc.text)
            digest = content_hash(text)
            reason = failed_rule(text, config)
            if reason is None and exact.is_duplicate(digest):
                reason = EXACT_DUPLICATE
            if reason is None and near.is_duplicate(digest, text):
                reason = NEAR_DUPLICATE
            if reason is not None:
                report.record_removal(reason, doc)
                continue
            text, replaced = scrub_pii(text)
            pii_counts.update(replaced)
            is_val = is_validation(digest, config.val_fraction)
            (val if is_val else train).write(json.dumps({"id": doc.doc_id, "text": text, "source": doc.source}) + "\n")
            report.documents_kept += 1
            report.bytes_kept += len(text.encode("utf-8"))
            report.val_documents += is_val
            report.train_documents += not is_val
        report.pii_replacements = dict(sorted(pii_counts.items()))
        report.seconds = round(time.perf_counter() - started, 3)
        staged.path("report.json").write_text(report.to_json(), encoding="utf-8")
    return report


def report_table(report: Report) -> Table:
    """The report as a rich table: totals, removals per reason with an example id, PII replacements."""
    table = Table(title="data build", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("documents", justify="right")
    table.add_column("example", overflow="fold")
    table.add_row("in", f"{report.documents_in:,}", f"{report.bytes_in / 2**20:.1f} MiB")
    for reason, count in report.removed.items():
        if count:
            example = report.examples.get(reason, [{}])[0].get("id", "")
            table.add_row(f"  removed: {reason}", f"{count:,}", example)
    table.add_row("kept", f"{report.documents_kept:,}", f"{report.bytes_kept / 2**20:.1f} MiB")
    table.add_row("  train / val", f"{report.train_documents:,} / {report.val_documents:,}", "")
    for kind, count in report.pii_replacements.items():
        table.add_row(f"  PII replaced: {kind}", f"{count:,}", "")
    table.add_row("time", f"{report.seconds:.1f} s", "")
    return table
