"""`data build`: stream documents through normalisation, PII scrubbing, kind detection, quality rules, dedup and the
split.

Writes `train.jsonl` and `val.jsonl` (fields `id`, `text`, `source`, `kind`: the detected `kind/lang`) and
`report.json` into the output folder. The three are written under hidden names and renamed together when complete,
and a new output folder is made whole from a hidden one beside it (`staged_files`), so a crash, a kill or an error
never leaves half a corpus, an empty output folder, nor a new split beside an old one.

Work per document (normalise, PII scrubbing, detect, rules, hashes, MinHash signature) runs in `workers` processes on
batches of `BATCH_DOCUMENTS`, at most `2 x workers` batches in flight; the main process keeps the dedup indexes
and writes the output in input order, so the result is the same for any number of workers; a worker that dies
(killed, out of memory) ends the build with WorkerDied, naming it and the documents in flight. Memory holds the
batches in flight, every document's id (`UniqueIds`: inputs may hold same-named files), the hashes and signatures of
kept documents, and the split scores of the first `EXACT_SPLIT_MAX_DOCUMENTS` kept ones.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from seekstack.atomic import refuse_a_file_in_the_way, staged_files
from seekstack.corpus.dedup import ExactDeduplicator, NearDeduplicator, content_hash, minhash_signature
from seekstack.corpus.doc_ids import UniqueIds
from seekstack.corpus.kinds import KINDS, SAMPLE_CHARS
from seekstack.corpus.pii import scrub_pii
from seekstack.corpus.rules import RULES, CleaningConfig, failed_rule, normalise, rule_kind
from seekstack.corpus.sources import FOLDER_FILES_READ, ROW_SUFFIXES, Document, Rows, TextFolder, counted
from seekstack.corpus.split import EXACT_SPLIT_MAX_DOCUMENTS, split_score, validation_cutoff
from seekstack.interrupts import sigint_handled_by

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REMOVAL_REASONS = tuple(rule.name for rule in RULES) + (EXACT_DUPLICATE, NEAR_DUPLICATE)
BUILD_FILES = ("train.jsonl", "val.jsonl", "report.json")  # what a build writes into its output folder
EXAMPLES_PER_REASON = 3
SNIPPET_CHARS = 120
BATCH_DOCUMENTS = 64


class CorpusBuildError(ValueError):
    """A build that kept nothing, or less than `min_kept_fraction` of its documents; nothing is written."""


@dataclass
class Report:
    """What `build_corpus` did: documents and bytes in and kept, removals per reason with examples, documents per
    detected kind, PII counts, and what the inputs held that was not read (files of other suffixes, null texts)."""

    documents_in: int = 0
    bytes_in: int = 0
    documents_kept: int = 0
    bytes_kept: int = 0  # UTF-8 bytes written, after PII scrubbing
    train_documents: int = 0
    val_documents: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REMOVAL_REASONS, 0))
    # reason -> [{"id", "kind", "snippet"}, and "of": the id of the kept document, for a duplicate]
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)  # "prose/en" -> {"in": n, "kept": n}
    pii_replacements: dict[str, int] = field(default_factory=dict)  # email / ip / secret -> count
    skipped_files: dict[str, int] = field(default_factory=dict)  # input folders' files not read, by suffix
    null_texts: dict[str, int] = field(default_factory=dict)  # rows whose text is null, not read, by file
    seconds: float = 0.0
    workers: int = 1
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def documents_removed(self) -> int:
        return sum(self.removed.values())

    def record_removal(self, reason: str, doc_id: str, kind: str, snippet: str, original: str | None = None) -> None:
        """Count a removed document under `reason`, keeping its id, kind and a snippet among the first examples, and
        for a duplicate the id of the kept document it duplicates (`of`)."""
        self.removed[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append({"id": doc_id, "kind": kind, "snippet": snippet} | ({"of": original} if original else {}))

    def top_removals(self, count: int = 3) -> list[tuple[str, int]]:
        """The reasons that removed the most documents, most first."""
        ranked = sorted(((n, reason) for reason, n in self.removed.items() if n), reverse=True)
        return [(reason, n) for n, reason in ranked[:count]]

    def to_json(self) -> str:
        """The report as the JSON text of `report.json`."""
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a `report.json`."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


class Analysed(NamedTuple):
    """One document after the per-document work: the text to write (scrubbed) when it passed the rules, else a
    snippet of it; what it failed; the hash and signature of the scrubbed text, for dedup and the split."""

    doc_id: str
    source: str
    bytes_in: int
    kind: str  # detected kind/lang
    failed: str | None
    text: str
    digest: str
    signature: np.ndarray | None
    pii: dict[str, int]


def analyse(doc: Document, config: CleaningConfig) -> Analysed:
    """Normalise and scrub PII first, so that every later stage (rules, hashes, MinHash signature, the split, the
    report's snippets) sees the text that is written; then detect the kind and apply its rules. A text longer than
    every kind's `max_chars`, its carriage returns aside (CRLF's CR is what normalising drops from most texts), fails
    that rule unread: normalised, mojibake mended at ~0.4 MB/s, and scrubbed at ~1 MB/s, a 50 MB one-line file took
    49 s and 1.1 GB to be dropped. Its kind is detected and its snippet scrubbed from its start alone."""
    bytes_in = len(doc.text.encode("utf-8", errors="surrogatepass"))
    if len(doc.text) - doc.text.count("\r") > max(config.rules_for(kind).max_chars for kind in KINDS):
        start = normalise(doc.text[:SAMPLE_CHARS])  # what the kind is detected from
        _, label = rule_kind(start, config.profile, doc.doc_id)
        snippet = _snippet(scrub_pii(start[: 4 * SNIPPET_CHARS])[0])  # an address cut at its end is past it
        return Analysed(doc.doc_id, doc.source, bytes_in, label, "max_chars", snippet, "", None, {})
    normalised = normalise(doc.text)
    text, replaced = scrub_pii(normalised)
    kind, label = rule_kind(text, config.profile, doc.doc_id)
    failed = failed_rule(text, config.rules_for(kind))
    if failed is not None:
        return Analysed(doc.doc_id, doc.source, bytes_in, label, failed, _snippet(text), "", None, {})
    signature = minhash_signature(text, config.minhash_permutations)
    return Analysed(doc.doc_id, doc.source, bytes_in, label, None, text, content_hash(text), signature, replaced)


def _snippet(text: str) -> str:
    """The start of a (scrubbed) text as the report shows a removed document: `SNIPPET_CHARS`, whitespace squeezed."""
    return " ".join(text[:SNIPPET_CHARS].split())


def _analyse_batch(batch: list[Document], config: CleaningConfig) -> list[Analysed]:
    return [analyse(doc, config) for doc in batch]


def analysed_documents(documents: Iterable[Document], config: CleaningConfig, workers: int) -> Iterator[Analysed]:
    """`analyse` over the documents, in their order, in `workers` processes (here when 1), with a bounded number of
    batches in flight so that memory does not grow with the corpus. Raises WorkerDied when a worker process dies."""
    stream = iter(documents)
    batches = iter(lambda: list(itertools.islice(stream, BATCH_DOCUMENTS)), [])
    if workers <= 1:
        for batch in batches:
            yield from _analyse_batch(batch, config)
        return
    pool = WorkerPool(workers)
    in_flight: collections.deque[InFlight] = collections.deque()
    try:
        for batch in batches:
            in_flight.append(InFlight(pool.submit(_analyse_batch, batch, config), batch[0].doc_id, batch[-1].doc_id))
            if len(in_flight) >= 2 * workers:
                yield from in_flight[0].analysed.result()
                in_flight.popleft()  # only once had: an interrupted wait leaves it among those in flight
        while in_flight:
            yield from in_flight[0].analysed.result()
            in_flight.popleft()
    except BrokenProcessPool as error:
        pool.shutdown()  # the pool ends its other workers once one died; how each ended is known once joined
        raise WorkerDied(_worker_death(pool, in_flight, error)) from error
    finally:
        _end_workers(pool, in_flight)


class InFlight(NamedTuple):
    """A batch sent to the workers: its analysed documents to come, and the ids of its first and last document."""

    analysed: Future[list[Analysed]]
    first_id: str
    last_id: str


class WorkerDied(ChildProcessError):
    """A worker process of `data build` died (killed, out of memory, a crash in a native library); nothing is
    written."""


class WorkerPool(ProcessPoolExecutor):
    """`workers` spawned processes that ignore Ctrl-C from their start (an ignored signal stays ignored through
    exec, and Python then installs no KeyboardInterrupt handler): the main process takes it, ends them and exits
    with 130, without a traceback from every worker. A worker that dies breaks the pool: every batch in flight
    fails with BrokenProcessPool at once (a multiprocessing Pool replaced the worker and waited for its batch for
    good, and its terminate could hang on the queue lock a killed idle worker held). A main process killed outright
    takes its workers with it (`_exit_with_the_main_process`)."""

    def __init__(self, workers: int):
        spawn = multiprocessing.get_context("spawn")
        super().__init__(workers, mp_context=spawn, initializer=_exit_with_the_main_process)
        self.processes = self._processes  # the pool's own, by pid; shutdown drops the pool's reference, not ours

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """As ProcessPoolExecutor's; a worker it starts (they start as work comes) inherits Ctrl-C ignored."""
        with sigint_handled_by(signal.SIG_IGN):
            return super().submit(fn, *args, **kwargs)

    def kill(self) -> None:
        """End every worker now (SIGKILL): the pool, broken, fails the batches they held."""
        for process in self.processes.values():
            process.kill()


def _exit_with_the_main_process() -> None:
    """In a worker, as it starts: a thread that ends it once the main process is gone without ending it (killed by
    SIGKILL or the out-of-memory killer, or by SIGTERM, which runs no cleanup), where it would wait, orphaned and
    holding its memory, for batches that never come."""
    main_process = multiprocessing.parent_process()

    def exit_when_gone() -> None:
        multiprocessing.connection.wait([main_process.sentinel])  # readable once the main process is gone
        os._exit(1)

    threading.Thread(target=exit_when_gone, name="exit-with-the-main-process", daemon=True).start()


def _end_workers(pool: WorkerPool, in_flight: Iterable[InFlight]) -> None:
    """End the workers and join them, killing them first when a batch is still in flight: the build was interrupted
    or failed, writes nothing, and ends now (Python's exit would wait for every batch, a hung worker's without end).
    None is cancelled: a worker that dies meanwhile (one still starting when the pool shuts down) breaks the pool, and
    Python 3.11's pool then fails every batch it holds, a cancelled one with InvalidStateError, which ends its manager
    thread and leaves the exit hanging on the queue it fed."""
    if not all(batch.analysed.done() for batch in in_flight):
        pool.kill()
    pool.shutdown()


def _worker_death(pool: WorkerPool, in_flight: collections.deque[InFlight], error: BrokenProcessPool) -> str:
    """The message of WorkerDied: which workers died and how (or, when none did, the error that broke the pool: a
    worker's result or exception the main process could not unpickle), which documents were being analysed, what to
    try."""
    ended_by_pool = -signal.SIGTERM  # how the pool ends the other workers once one died
    deaths = [
        f"pid {pid} {_exit_status(process.exitcode)}"
        for pid, process in pool.processes.items()
        if process.exitcode not in (None, 0, ended_by_pool)
    ]
    documents = f"the batches of documents {in_flight[0].first_id!r} to {in_flight[-1].last_id!r}"
    remote = [line for line in str(error.__cause__ or "").splitlines() if line.strip(" \"'")]  # a traceback quoted
    if not deaths and remote:
        return (
            f"data build: a worker's answer could not be read back while analysing {documents} ({remote[-1]}); "
            "nothing was written. --workers 1 analyses in the main process, where the error shows its traceback"
        )
    return (
        f"data build: a worker process died ({', '.join(deaths) or 'ended by SIGTERM'}) while analysing "
        f"(normalise, PII, kind, rules, MinHash) {documents}; nothing was written. SIGKILL is often the "
        "out-of-memory killer (try fewer --workers); --workers 1 analyses in the main process, where a crash in a "
        "native library shows its error"
    )


def _exit_status(exitcode: int) -> str:
    """A process's exit code in words: `killed by SIGKILL`, `exit code 3`."""
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def build_corpus(
    sources: Iterable[Iterable[Document]],
    out_dir: str | Path,
    config: CleaningConfig | None = None,
    show_progress: bool = True,
    workers: int = 1,
) -> Report:
    """Clean the documents of every source into `out_dir/{train,val}.jsonl` and `out_dir/report.json`.

    Raises CorpusBuildError, writing nothing, when fewer than `config.min_kept_fraction` of the documents are kept.
    """
    config = config or CleaningConfig()
    sources = list(sources)  # read twice: their documents, then what they did not read
    out_dir = Path(out_dir)
    refuse_a_file_in_the_way(out_dir, "train.jsonl, val.jsonl and report.json")
    _refuse_to_replace_an_input(sources, out_dir)
    report = Report(config=dataclasses.asdict(config), workers=workers)
    ids = UniqueIds()
    exact = ExactDeduplicator()
    near = NearDeduplicator(config.near_duplicate_threshold, config.minhash_permutations)
    pii_counts: Counter[str] = Counter()
    scores: list[float] | None = []  # split scores of the kept documents, while few enough to cut exactly
    started = time.perf_counter()
    blank = True  # every document empty or whitespace alone, which no profile or threshold keeps
    progress = Progress(
        SpinnerColumn(),
        TextColumn(
            "[bold]data build[/] {task.completed} docs in, {task.fields[kept]} kept, {task.fields[mib]:.1f} MiB"
        ),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # off the report on stdout: `data build > report.txt` still shows it
        disable=not show_progress,
        transient=True,
    )
    with staged_files(out_dir) as staged, progress, tempfile.TemporaryFile("w+", encoding="utf-8") as kept:
        task = progress.add_task("build", total=None, kept=0, mib=0.0)
        for doc in analysed_documents(itertools.chain.from_iterable(sources), config, workers):
            doc = doc._replace(doc_id=ids.claim(doc.doc_id))  # after the analysis, which reads the file's suffix
            report.documents_in += 1
            report.bytes_in += doc.bytes_in
            blank = blank and not doc.text.strip()  # a removed one's text is its snippet: empty when it is blank
            counts = report.kinds.setdefault(doc.kind, {"in": 0, "kept": 0})
            counts["in"] += 1
            progress.update(task, advance=1, kept=report.documents_kept, mib=report.bytes_in / 2**20)
            reason, original = doc.failed, None
            if reason is None and (original := exact.duplicate_of(doc.digest, doc.doc_id)) is not None:
                reason = EXACT_DUPLICATE
            if reason is None and (near_digest := near.duplicate_of(doc.digest, doc.signature)) is not None:
                reason, original = NEAR_DUPLICATE, exact.first[near_digest]
                exact.first[doc.digest] = original  # its exact copies, removed next, duplicate the kept one too
            if reason is not None:
                snippet = doc.text if doc.failed else _snippet(doc.text)
                report.record_removal(reason, doc.doc_id, doc.kind, snippet, original)
                continue
            pii_counts.update(doc.pii)
            score = split_score(doc.digest)
            row = {"id": doc.doc_id, "text": doc.text, "source": doc.source, "kind": doc.kind}
            kept.write(f"{score!r}\t{json.dumps(row, ensure_ascii=False)}\n")
            counts["kept"] += 1
            report.documents_kept += 1
            report.bytes_kept += len(doc.text.encode("utf-8"))
            if scores is not None and len(scores) < EXACT_SPLIT_MAX_DOCUMENTS:
                scores.append(score)
            else:
                scores = None
        skipped, null_texts = Counter[str](), Counter[str]()
        for source in sources:
            skipped.update(getattr(source, "skipped", {}))  # a folder's files of other suffixes (TextFolder)
            null_texts.update(getattr(source, "null_texts", {}))  # rows whose text is null (Rows)
        report.skipped_files = dict(skipped.most_common())
        report.null_texts = dict(null_texts.most_common())
        _check_enough_kept(report, config, sources, blank)
        cutoff = validation_cutoff(scores, config.val_fraction)
        kept.seek(0)
        with (
            open(staged.path("train.jsonl"), "w", encoding="utf-8") as train,
            open(staged.path("val.jsonl"), "w", encoding="utf-8") as val,
        ):
            for line in kept:
                score, row = line.split("\t", 1)
                is_val = float(score) < cutoff
                (val if is_val else train).write(row)
                report.val_documents += is_val
                report.train_documents += not is_val
        report.pii_replacements = dict(sorted(pii_counts.items()))
        report.seconds = round(time.perf_counter() - started, 3)
        staged.path("report.json").write_text(report.to_json(), encoding="utf-8")
    return report


def _refuse_to_replace_an_input(sources: list[Iterable[Document]], out_dir: Path) -> None:
    """ValueError, before anything is read, when a file the build writes is one of its input files (`data build
    corpus/train.jsonl --out corpus`), which the cleaned corpus would replace: the documents it removed, and the
    held-out ones from train.jsonl, would be gone."""
    inputs = [Path(source.path) for source in sources if isinstance(source, Rows)]  # a folder never reads .jsonl
    for name in BUILD_FILES:
        written = out_dir / name
        for path in inputs:
            if written.exists() and path.exists() and os.path.samefile(written, path):
                raise ValueError(
                    f"{path}: is an input of this build, and --out {out_dir} would replace it with the cleaned "
                    f"corpus's {name}; write the corpus to another folder (nothing was written)"
                )


def _check_enough_kept(report: Report, config: CleaningConfig, sources: list[Iterable[Document]], blank: bool) -> None:
    field = " and --field" if any(isinstance(source, Rows) for source in sources) else ""  # a folder has none
    if report.documents_in == 0:
        one = len(sources) == 1 and isinstance(sources[0], (Rows, TextFolder))  # an empty .jsonl, a header-only CSV
        inputs = (
            f"{sources[0].path}: holds no documents; check the path"
            if one
            else "the inputs hold no documents; check the paths"
        )
        raise CorpusBuildError(f"{inputs}{field}{_not_read(report)}")
    if report.documents_kept >= max(1, config.min_kept_fraction * report.documents_in):
        return
    if blank:
        example = report.examples[report.top_removals(1)[0][0]][0]["id"]
        empty = "it is" if report.documents_in == 1 else "all are"
        raise CorpusBuildError(
            f"kept 0 of {counted(report.documents_in, 'document')}: {empty} empty (e.g. {example}); check the "
            f"path{'s' if len(sources) > 1 else ''}{field}; nothing was written{_not_read(report)}"
        )
    causes = "; ".join(
        f"{reason} {count:,} (e.g. {report.examples[reason][0]['id']}, {report.examples[reason][0]['kind']})"
        for reason, count in report.top_removals()
    )
    kinds = ", ".join(f"{kind} {counts['in']:,}" for kind, counts in sorted(report.kinds.items()))
    pages = any(reason == "html_page" for reason, _ in report.top_removals())
    extract = " (html_page: extract the pages' text first, with trafilatura as datatrove does)" if pages else ""
    raise CorpusBuildError(
        f"kept {report.documents_kept:,} of {report.documents_in:,} documents, below min_kept_fraction="
        f"{config.min_kept_fraction}; removed most by {causes}. Detected kinds: {kinds} (profile "
        f"{config.profile}). Try --profile web|code|zh, or loosen those rules' thresholds with --config "
        f"(--write-config writes them){extract}; nothing was written{_not_read(report)}"
    )


def _counts(counts: dict[str, int]) -> str:
    """Counts by suffix or file: `.html 3, (no suffix) 1`."""
    return ", ".join(f"{name} {count:,}" for name, count in counts.items())


def _not_read(report: Report) -> str:
    """What the inputs held that was not read, as the end of an error message."""
    unread = ""
    if report.skipped_files:
        files = sum(report.skipped_files.values())
        unread += (
            f". The input folders' {counted(files, 'file')} of other suffixes ({_counts(report.skipped_files)}) "
            f"{'was' if files == 1 else 'were'} not read; a folder's files are read {FOLDER_FILES_READ}"
        )
        rows = [suffix for suffix in ROW_SUFFIXES if suffix in report.skipped_files]
        if rows:
            unread += f"; {' '.join(rows)} files are read as rows when each is an input (e.g. FOLDER/*{rows[0]})"
    if report.null_texts:
        nulls = sum(report.null_texts.values())
        unread += (
            f". {counted(nulls, 'row')} with a null text {'was' if nulls == 1 else 'were'} not read "
            f"({_counts(report.null_texts)})"
        )
    return unread


def _size(size_bytes: int) -> str:
    """A size in MiB, or in KiB below one MiB (a small corpus is not `0.0 MiB`, as if it held nothing)."""
    return f"{size_bytes / 2**20:.1f} MiB" if size_bytes >= 2**20 else f"{size_bytes / 2**10:.1f} KiB"


def report_table(report: Report) -> Table:
    """The report as a rich table: totals, documents per kind, removals per reason with an example id, PII
    replacements, throughput."""
    table = Table(title="data build", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("documents", justify="right")
    table.add_column("example", overflow="fold")
    table.add_row("in", f"{report.documents_in:,}", _size(report.bytes_in))
    for kind, counts in sorted(report.kinds.items(), key=lambda item: -item[1]["in"]):
        table.add_row(f"  kind: {kind}", f"{counts['in']:,}", f"{counts['kept']:,} kept")
    for reason, count in report.removed.items():
        if count:
            example = report.examples.get(reason, [{}])[0]
            of = f" of {example['of']}" if "of" in example else ""
            table.add_row(f"  removed: {reason}", f"{count:,}", f"{example.get('id', '')} ({example.get('kind')}){of}")
    if report.skipped_files:
        files = counted(sum(report.skipped_files.values()), "file")
        table.add_row("  not read: other suffixes", files, _counts(report.skipped_files))
    if report.null_texts:
        rows = counted(sum(report.null_texts.values()), "row")
        table.add_row("  not read: null text", rows, _counts(report.null_texts))
    table.add_row("kept", f"{report.documents_kept:,}", _size(report.bytes_kept))
    table.add_row("  train / val", f"{report.train_documents:,} / {report.val_documents:,}", "")
    for kind, count in report.pii_replacements.items():
        table.add_row(f"  PII replaced: {kind}", f"{count:,}", "")
    seconds = max(report.seconds, 1e-9)
    table.add_row(
        "time",
        f"{report.seconds:.1f} s",
        f"{report.documents_in / seconds:,.0f} docs/s, {report.bytes_in / 2**20 / seconds:.1f} MiB/s, "
        f"{report.workers} worker(s)",
    )
    return table
