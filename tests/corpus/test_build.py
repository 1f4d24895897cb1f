"""`build_corpus` and `data build` beyond the basics: kinds in the report, workers, loud failure, the small split."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.corpus import build
from seekstack.corpus.build import CorpusBuildError, Report, WorkerPool, analyse, build_corpus, report_table
from seekstack.corpus.kinds import SAMPLE_CHARS
from seekstack.corpus.pii import scrub_pii
from seekstack.corpus.rules import CJKRules, CleaningConfig, CodeRules, ProseRules, normalise
from seekstack.corpus.sources import DataSourceError, Document, expanded_inputs, open_source
from seekstack.corpus.split import split_score, validation_cutoff
from tests.corpus.test_cleaning import prose
from tests.corpus.test_kinds import CHINESE_ARTICLE, ENGLISH_ARTICLE, STDLIB, junk


def mixed_documents() -> list[Document]:
    """Clean and junk documents of the three kinds."""
    clean = [
        Document("english", ENGLISH_ARTICLE, "web"),
        Document("chinese", CHINESE_ARTICLE, "web"),
        Document("textwrap.py", (STDLIB / "textwrap.py").read_text(encoding="utf-8"), "code"),
    ]
    junky = [
        Document("spam", junk("prose", "top_2gram"), "web"),
        Document("menu", junk("cjk", "terminal_line_fraction"), "web"),
        Document("minified.js", junk("code", "mean_line_chars"), "code"),
    ]
    return clean + junky + [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(20)]


def read_rows(out: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in open(out / f"{split}.jsonl")] for split in ("train", "val")}


def test_report_counts_detected_kinds_and_rows_carry_them(tmp_path: Path) -> None:
    report = build_corpus([mixed_documents()], tmp_path / "out", CleaningConfig(val_fraction=0.1), show_progress=False)
    assert report.kinds["cjk/zh"] == {"in": 2, "kept": 1}
    assert report.kinds["code/python"] == {"in": 1, "kept": 1}
    assert report.kinds["code/javascript"] == {"in": 1, "kept": 0}
    assert report.kinds["prose/en"] == {"in": 1, "kept": 1}
    assert report.kinds["prose/und"] == {"in": 21, "kept": 20}  # the vocabulary prose has no English stop words
    assert report.removed["top_2gram"] == report.removed["terminal_line_fraction"] == 1
    assert report.examples["mean_line_chars"][0] == {
        "id": "minified.js",
        "kind": "code/javascript",
        "snippet": " ".join(junk("code", "mean_line_chars")[:120].split()),
    }
    rows = read_rows(tmp_path / "out")
    kinds = {row["id"]: row["kind"] for split in rows.values() for row in split}
    assert kinds["chinese"] == "cjk/zh" and kinds["english"] == "prose/en" and kinds["textwrap.py"] == "code/python"
    assert Report.load(tmp_path / "out" / "report.json") == report


def test_two_workers_write_the_same_corpus_as_one(tmp_path: Path) -> None:
    documents = mixed_documents() * 3  # exact duplicates across batches, too
    config = CleaningConfig(val_fraction=0.2)
    one = build_corpus([documents], tmp_path / "one", config, show_progress=False, workers=1)
    two = build_corpus([iter(documents)], tmp_path / "two", config, show_progress=False, workers=2)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (one.removed, one.kinds, one.documents_kept) == (two.removed, two.kinds, two.documents_kept)
    assert one.removed["exact_duplicate"] == 2 * one.documents_kept


def test_build_that_keeps_almost_nothing_fails_naming_the_rules_and_writes_nothing(tmp_path: Path) -> None:
    documents = [Document(f"p{i}", ENGLISH_ARTICLE.replace("library", f"library{i}"), "web") for i in range(30)]
    documents += [Document("short", "too short", "web")]
    out = tmp_path / "out"
    with pytest.raises(CorpusBuildError) as error:
        build_corpus([documents], out, CleaningConfig(profile="code"), show_progress=False)
    message = str(error.value)
    assert "kept 0 of 31 documents" in message
    assert "mean_line_chars 30 (e.g. p0, prose/en); min_chars 1 (e.g. short, prose/und)" in message
    assert "--profile" in message and not any(out.glob("*.jsonl"))
    config = CleaningConfig(profile="auto", min_kept_fraction=0.0)  # near copies: one or two kept of 31
    report = build_corpus([documents], out, config, show_progress=False)
    assert report.removed["min_chars"] == 1 and report.removed["mean_line_chars"] == 0  # prose rules now
    assert report.documents_kept + report.removed["near_duplicate"] == 30 and report.documents_kept <= 2


def test_a_build_of_html_pages_fails_saying_to_extract_their_text_not_to_loosen_the_rules(tmp_path: Path) -> None:
    """Rows of raw pages fail `html_page`; loosening it would train on their markup, so the refusal says to extract."""
    page = "<!DOCTYPE html>\n<html><body>\n{}\n</body></html>"
    documents = [
        Document(f"page{i}", page.format(ENGLISH_ARTICLE.replace("library", f"lib{i}")), "web") for i in range(3)
    ]
    with pytest.raises(CorpusBuildError) as error:
        build_corpus([documents], tmp_path / "out", show_progress=False)
    assert "removed most by html_page 3 (e.g. page0, prose/en)" in str(error.value)
    assert "(html_page: extract the pages' text first, with trafilatura as datatrove does)" in str(error.value)


def test_a_text_longer_than_every_kinds_max_chars_is_removed_before_it_is_normalised_or_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 18 MB one-line log was scrubbed whole (16 s, at ~1 MB/s) before max_chars dropped it, and a 50 MB one-line
    file normalised whole (49 s, 1.1 GB: ftfy mends mojibake at ~0.4 MB/s); only the start its kind is detected from
    is normalised now, and the address in its snippet is still replaced. A text under the limit but for its CRLF line
    endings' CRs, which normalising drops, is kept."""
    scrubbed_lengths: list[int] = []
    normalised_lengths: list[int] = []

    def measured_scrub(text: str) -> tuple[str, dict[str, int]]:
        scrubbed_lengths.append(len(text))
        return scrub_pii(text)

    def measured_normalise(text: str) -> str:
        normalised_lengths.append(len(text))
        return normalise(text)

    monkeypatch.setattr(build, "scrub_pii", measured_scrub)
    monkeypatch.setattr(build, "normalise", measured_normalise)
    config = CleaningConfig(
        code=CodeRules(max_chars=5_000), prose=ProseRules(max_chars=5_000), cjk=CJKRules(max_chars=5_000)
    )
    windows_lines = prose(2, words=670).replace("\n", "\r\n")
    documents = [
        Document("log.txt", "mail ann@example.com now " + prose(0) * 400, "logs"),
        Document("a.txt", prose(1), "a"),
        Document("windows.txt", windows_lines, "b"),
    ]
    assert len(windows_lines.replace("\r", "")) <= 5_000 < len(windows_lines)
    report = build_corpus([documents], tmp_path / "out", config, show_progress=False)
    assert report.removed["max_chars"] == 1 and report.documents_kept == 2
    assert report.examples["max_chars"][0]["snippet"].startswith("mail <EMAIL> now")
    assert max(scrubbed_lengths) <= 5_000 < len(documents[0].text)
    assert normalised_lengths == [SAMPLE_CHARS, len(documents[1].text), len(documents[2].text)]


def test_a_build_into_a_new_folder_makes_it_only_when_the_corpus_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 during `data build` left an empty --out folder (created first, the files staged in it): a new one is
    staged beside it, hidden, and takes its name once written; an existing one keeps its other files."""
    seen: list[bool] = []

    def watched_analyse(doc: Document, config: CleaningConfig) -> build.Analysed:
        seen.append((tmp_path / "new" / "out").exists())
        return analyse(doc, config)

    monkeypatch.setattr(build, "analyse", watched_analyse)
    documents = [Document(f"doc{i}", prose(i), "web") for i in range(3)]
    build_corpus([documents], tmp_path / "new" / "out", show_progress=False)
    assert seen == [False] * 3 and sorted(path.name for path in (tmp_path / "new").iterdir()) == ["out"]
    assert sorted(path.name for path in (tmp_path / "new" / "out").iterdir()) == [
        "report.json",
        "train.jsonl",
        "val.jsonl",
    ]
    (tmp_path / "new" / "out" / "notes.txt").write_text("mine")
    build_corpus([documents[:2]], tmp_path / "new" / "out", show_progress=False)
    assert (tmp_path / "new" / "out" / "notes.txt").read_text() == "mine"
    assert len(read_rows(tmp_path / "new" / "out")["train"]) + len(read_rows(tmp_path / "new" / "out")["val"]) == 2


def test_empty_input_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusBuildError, match="no documents"):
        build_corpus([[]], tmp_path / "out", show_progress=False)


def test_one_input_holding_no_documents_is_named(tmp_path: Path) -> None:
    """An empty .jsonl, a header-only CSV or an empty folder, given alone, was refused as 'the inputs hold no
    documents', naming no file; a folder's error asked to check --field, which it has none of (refused with one)."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "header.csv").write_text("text,id\n")
    (tmp_path / "folder").mkdir()
    for name, check in (("empty.jsonl", "the path and --field"), ("header.csv", "the path and --field"),
                        ("folder", "the path")):  # fmt: skip
        with pytest.raises(CorpusBuildError) as refused:
            build_corpus([open_source(tmp_path / name)], tmp_path / "out", show_progress=False)
        assert str(refused.value) == f"{tmp_path / name}: holds no documents; check {check}"


def test_inputs_holding_only_empty_documents_are_said_to_be_empty(tmp_path: Path) -> None:
    """An empty text file was refused as 'removed most by min_chars 1 ... Try --profile web|code|zh, or loosen those
    rules' thresholds', advice no profile or threshold can follow for a document of no text (or whitespace alone)."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " \n\t "}) + "\n")
    for names, said in ((["empty.txt"], "1 document: it is empty (e.g. empty.txt); check the path;"),
                        (["empty.txt", "empty.jsonl"], "2 documents: all are empty (e.g. empty.txt); check the paths "
                         "and --field;")):  # fmt: skip
        with pytest.raises(CorpusBuildError) as refused:
            build_corpus([open_source(tmp_path / name) for name in names], tmp_path / "out", show_progress=False)
        assert str(refused.value) == f"kept 0 of {said} nothing was written"


def test_cli_exits_non_zero_when_the_build_keeps_nothing(tmp_path: Path) -> None:
    (tmp_path / "web.jsonl").write_text(json.dumps({"text": ENGLISH_ARTICLE}) + "\n", encoding="utf-8")
    args = ["data", "build", str(tmp_path / "web.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"]
    failed = CliRunner().invoke(app, [*args, "--profile", "code", "--workers", "1"])
    assert failed.exit_code == 1 and "removed most by mean_line_chars 1" in failed.output
    kept = CliRunner().invoke(app, [*args, "--workers", "1"])
    assert kept.exit_code == 0 and "prose/en" in kept.output


def test_cli_warns_when_a_build_of_one_document_leaves_validation_empty(tmp_path: Path, torchrun_environment) -> None:
    """A corpus of one kept document holds none out (holding it out would leave train.jsonl none), which `train`
    refused only when it came to evaluate; data build now says so where it writes val.jsonl: on stderr, as the other
    commands warn, and under torchrun from rank 0 alone."""
    rows = [json.dumps({"text": prose(i) + "\nThe end."}) for i in range(2)]
    (tmp_path / "one.jsonl").write_text(rows[0] + "\n", encoding="utf-8")
    (tmp_path / "two.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    def build(rows_file: str, out: str, *options: str) -> Result:
        args = ["data", "build", str(tmp_path / rows_file), "--out", str(tmp_path / out)]
        built = CliRunner().invoke(app, [*args, "--workers", "1", "--no-progress", *options])
        assert built.exit_code == 0, built.output
        return built

    one = build("one.jsonl", "one")
    assert one.stderr == (
        f"warning: {tmp_path}/one/val.jsonl holds no documents: the build kept 1 and val_fraction=0.01 held none out "
        "(one is, of 2 or more); `seekstack train` evaluates on val and refuses an empty one: add documents, or train "
        "with eval_every=0\n"
    )
    assert "warning" not in one.stdout and one.stdout.endswith(
        f"wrote {tmp_path}/one/train.jsonl, {tmp_path}/one/val.jsonl and {tmp_path}/one/report.json\n"
    )
    assert read_rows(tmp_path / "one")["val"] == []
    assert "warning" not in build("two.jsonl", "two").output and len(read_rows(tmp_path / "two")["val"]) == 1
    assert "warning" not in build("one.jsonl", "none", "--val-fraction", "0").output
    torchrun_environment(1)  # another torchrun rank: rank 0 alone warns
    assert build("one.jsonl", "rank1").stderr == ""


@pytest.mark.parametrize(
    ("documents", "fraction", "expected"),
    [(20, 0.1, 2), (10, 0.01, 1), (7, 0.5, 4), (1, 0.5, 0), (25, 0.1, 3), (15, 0.3, 5), (5, 0.5, 3)],
)
def test_small_corpus_split_takes_exactly_the_fraction(documents: int, fraction: float, expected: int) -> None:
    """A half rounds up, as `data select --top-fraction` rounds it: 0.1 of 25 is 3 (Python's round gave 2, half to
    even) and 0.3 of 15 is 5 (4: the float product is 4.499999999999999)."""
    scores = [split_score(f"doc {i}") for i in range(documents)]
    assert sum(score < validation_cutoff(scores, fraction) for score in scores) == expected


def test_large_corpus_split_is_by_hash_alone() -> None:
    assert validation_cutoff(None, 0.05) == 0.05
    assert validation_cutoff([0.5, 0.7], 0.0) == 0.0


def test_build_of_twenty_documents_holds_out_two_for_a_tenth(tmp_path: Path) -> None:
    documents = [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(20)]
    report = build_corpus([documents], tmp_path / "out", CleaningConfig(val_fraction=0.1), show_progress=False)
    assert (report.train_documents, report.val_documents) == (18, 2)
    assert len(read_rows(tmp_path / "out")["val"]) == 2


def test_a_folder_input_reports_the_files_it_did_not_read_by_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "pages"
    folder.mkdir()
    for i in range(3):
        (folder / f"page{i}.html").write_text(f"<p>{prose(i)}</p>")
    (folder / "logo").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # a file without a suffix is read when text
    unread = r"\(\.html 3, \(no suffix, not text\) 1\)"
    with pytest.raises(CorpusBuildError, match=rf"no documents.*files of other suffixes {unread}.*without one when"):
        build_corpus([open_source(folder)], tmp_path / "none", show_progress=False)
    for i in range(4):
        (folder / f"notes{i}.txt").write_text(prose(10 + i))
    report = build_corpus([open_source(folder)], tmp_path / "out", show_progress=False)
    assert report.documents_in == 4 and report.skipped_files == {".html": 3, "(no suffix, not text)": 1}
    assert Report.load(tmp_path / "out" / "report.json") == report
    console = Console(record=True, width=120)
    console.print(report_table(report))
    assert "not read: other suffixes │   4 files │ .html 3, (no suffix, not text) 1" in console.export_text()


def test_a_folder_of_jsonl_and_parquet_shards_says_each_file_is_read_as_rows_as_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    for dump in ("CC-MAIN-2024-10", "CC-MAIN-2024-18"):  # FineWeb's layout
        (folder / dump).mkdir(parents=True)
        pq.write_table(pa.table({"text": [prose(1), prose(2)]}), folder / dump / "000_00000.parquet")
    (folder / "extra.jsonl").write_text(json.dumps({"text": prose(3)}) + "\n")
    rows = r"\(\.parquet 2, \.jsonl 1\) were not read; .*; \.jsonl \.parquet files are read as rows when each is"
    with pytest.raises(CorpusBuildError, match=rows + r" an input \(e\.g\. FOLDER/\*\.jsonl\)"):
        build_corpus([open_source(folder)], tmp_path / "none", show_progress=False)
    inputs = [folder / "extra.jsonl", *sorted(folder.glob("*/*.parquet"))]
    report = build_corpus([open_source(path) for path in inputs], tmp_path / "out", show_progress=False)
    assert report.documents_in == 5


def test_documents_are_written_in_nfc_with_unix_line_endings_and_no_nul(tmp_path: Path) -> None:
    windows = prose(1).replace("\n", "\r\n") + "\r\nThe cafe\u0301 closes.\x00"
    build_corpus([[Document("windows", windows, "web")]], tmp_path / "out", show_progress=False)
    [row] = [row for split in read_rows(tmp_path / "out").values() for row in split]
    assert row["text"] == prose(1) + "\nThe caf\u00e9 closes."


def test_rows_whose_text_is_null_are_counted_by_file_in_the_report(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": None if i % 4 == 0 else prose(i)}) + "\n" for i in range(8)))
    pq.write_table(pa.table({"text": [prose(20), None]}), tmp_path / "more.parquet")
    sources = [open_source(rows), open_source(tmp_path / "more.parquet")]
    report = build_corpus(sources, tmp_path / "out", show_progress=False)
    assert report.documents_in == 7 and report.null_texts == {"rows.jsonl": 2, "more.parquet": 1}  # 10 rows in all
    assert Report.load(tmp_path / "out" / "report.json") == report
    console = Console(record=True, width=120)
    console.print(report_table(report))
    assert "not read: null text │    3 rows │ rows.jsonl 2, more.parquet 1" in console.export_text()
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n' * 3)
    with pytest.raises(CorpusBuildError, match=r"no documents.*3 rows with a null text were not read \(nulls.jsonl 3"):
        build_corpus([open_source(tmp_path / "nulls.jsonl")], tmp_path / "none", show_progress=False)
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')  # was "1 rows with a null text were not read"
    with pytest.raises(CorpusBuildError, match=r"no documents.*\. 1 row with a null text was not read \(null.jsonl 1"):
        build_corpus([open_source(tmp_path / "null.jsonl")], tmp_path / "none", show_progress=False)


def test_file_names_that_are_not_utf8_are_decoded_as_latin_1_in_ids_sources_and_the_report(tmp_path: Path) -> None:
    """A Latin-1 name out of an old archive is held by Python as surrogate escapes, which no UTF-8 file can store: the
    build failed writing it ('utf-8' codec can't encode character '\\udce9'), naming no file."""
    folder = tmp_path / "notes"
    folder.mkdir()
    try:
        (folder / "caf\udce9.txt").write_text(prose(1))
    except (OSError, UnicodeEncodeError):
        pytest.skip("the file system refuses names that are not UTF-8")
    (folder / "menu\udce9.html").write_text("<p>not read</p>")
    rows = tmp_path / "r\udce9sum\udce9s.jsonl"
    rows.write_text(json.dumps({"text": prose(2)}) + "\n" + json.dumps({"text": None}) + "\n")
    report = build_corpus([open_source(folder), open_source(rows)], tmp_path / "out", show_progress=False)
    written = {(row["id"], row["source"]) for split in read_rows(tmp_path / "out").values() for row in split}
    assert written == {("caf\u00e9.txt", "notes"), ("r\u00e9sum\u00e9s.jsonl:1", "r\u00e9sum\u00e9s.jsonl")}
    assert report.null_texts == {"r\u00e9sum\u00e9s.jsonl": 1} and report.skipped_files == {".html": 1}
    assert Report.load(tmp_path / "out" / "report.json") == report
    console = Console(record=True, width=120)
    console.print(report_table(report))  # was "1 files" and "1 rows"
    table = console.export_text()
    assert "suffixes │    1 file │ .html 1" in table and "│     1 row │ r\u00e9sum\u00e9s.jsonl 1" in table


def test_a_dangling_link_in_an_input_folder_is_named_with_its_target_and_nothing_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text(prose(1))
    (folder / "b.txt").symlink_to(tmp_path / "moved.txt")
    with pytest.raises(DataSourceError, match=f"b.txt: a symbolic link to {tmp_path / 'moved.txt'}, which does not"):
        build_corpus([open_source(folder)], tmp_path / "out", show_progress=False)
    assert list((tmp_path / "out").rglob("*")) == []


@pytest.mark.parametrize("out", ["taken.txt", "taken.txt/corpus"])
def test_an_output_folder_that_is_or_lies_under_a_file_is_refused_before_the_cleaning(tmp_path: Path, out) -> None:
    (tmp_path / "taken.txt").write_text("a user's file")

    def never_read() -> Iterator[Document]:
        pytest.fail("the cleaning started")
        yield

    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'taken.txt'}: is a file, not a folder"):
        build_corpus([never_read()], tmp_path / out, show_progress=False)
    assert (tmp_path / "taken.txt").read_text() == "a user's file"


@pytest.mark.parametrize("workers", [(os.cpu_count() or 1) + 1, 10**20])
def test_cli_refuses_more_workers_than_cpus_naming_the_value(tmp_path: Path, workers: int) -> None:
    """--workers 100000 (a typo) started as many processes, and 10**20 failed with OverflowError's traceback ('Python
    int too large to convert to C int'); above the CPUs it is refused as --threads is, before anything is read."""
    args = ["data", "build", str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path / "out"), "--workers", str(workers)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and not (tmp_path / "out").exists()
    said = " ".join(refused.stderr.split())
    assert f"Invalid value for '--workers': has value {workers}: must be from 1 to this machine's" in said


def test_cli_refuses_a_negative_worker_count_and_documents_a_zero_val_fraction(tmp_path: Path) -> None:
    args = ["data", "build", "--out", str(tmp_path / "out"), "--no-progress"]
    refused = CliRunner().invoke(app, [*args, "--workers", "-3"])
    assert refused.exit_code == 2 and "--workers" in refused.output and not (tmp_path / "out").exists()
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3)))
    built = CliRunner().invoke(app, [*args, str(tmp_path / "web.jsonl"), "--val-fraction", "0", "--workers", "1"])
    assert built.exit_code == 0, built.output
    assert read_rows(tmp_path / "out")["val"] == []
    assert "0: none" in CliRunner().invoke(app, ["data", "build", "--help"], env={"COLUMNS": "200"}).output


def test_a_val_fraction_of_1_is_refused_naming_the_option_or_the_field(tmp_path: Path) -> None:
    """`--val-fraction 1` built a corpus of 3 documents as 2 in val and 1 in train, without a word, and would hold
    every document of a corpus over EXACT_SPLIT_MAX_DOCUMENTS out (its cutoff score 1); refused as sft's is."""
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": prose(i)}) + "\n" for i in range(3)))
    (tmp_path / "cleaning.yaml").write_text("val_fraction: 1\n")
    args = ["data", "build", str(tmp_path / "web.jsonl"), "--out", str(tmp_path / "out"), "--workers", "1"]
    by_option = CliRunner().invoke(app, [*args, "--val-fraction", "1"])
    assert by_option.exit_code == 2
    assert "Invalid value for '--val-fraction': must be below 1 (1 leaves nothing to train on)" in by_option.output
    by_file = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "cleaning.yaml")])
    assert (by_file.exit_code, by_file.output) == (
        1,
        f"error: {tmp_path / 'cleaning.yaml'}: field 'val_fraction' must be below 1 (1 leaves nothing to train on)\n",
    )
    assert not (tmp_path / "out").exists()
    shown = CliRunner().invoke(app, ["data", "build", "--help"], env={"COLUMNS": "200"}).output
    assert "validation (0: none; below 1);" in " ".join(shown.split())


def test_cli_refuses_field_or_id_field_when_no_input_holds_rows(tmp_path: Path) -> None:
    """--field or --id-field given with folders and text files alone (a folder of JSONL shards, which a folder's
    reading passes over) was passed over unsaid: the text files were built, named by their paths."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text(prose(1))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": prose(2), "uid": "r1"}) + "\n")
    args = ["data", "build", str(folder), "--out", str(tmp_path / "out"), "--workers", "1"]
    for options, named in [
        (["--field", "content"], "--field content names"),
        (["--id-field", "uid"], "--id-field uid names"),
    ]:
        refused = CliRunner().invoke(app, [*args, *options])
        assert refused.exit_code == 1 and not (tmp_path / "out").exists()
        assert " ".join(refused.output.split()) == (
            f"error: {named} a field or column of rows, and no input holds rows: folders, text files and stdlib are "
            "read whole, a document a file, named by its path. Give the .jsonl, .json, .parquet, .csv, .tsv or "
            ".arrow files themselves (a folder's as FOLDER/*.jsonl) or a saved dataset, or leave the option out"
        )
    both = CliRunner().invoke(app, [*args, "--field", "content", "--id-field", "uid"])
    assert "error: --field content and --id-field uid name a field" in " ".join(both.output.split())
    built = CliRunner().invoke(app, [*args, str(tmp_path / "rows.jsonl"), "--id-field", "uid"])  # with rows: as before
    assert built.exit_code == 0, built.output
    assert sorted(row["id"] for split in read_rows(tmp_path / "out").values() for row in split) == ["a.txt", "r1"]


def test_cli_reads_the_rows_a_json_object_holds_under_rows_field(tmp_path: Path) -> None:
    rows = {"version": "1.1", "data": [{"id": f"q{i}", "text": prose(i)} for i in range(3)]}
    (tmp_path / "squad.json").write_text(json.dumps(rows, indent=2))
    args = ["data", "build", str(tmp_path / "squad.json"), "--out", str(tmp_path / "out"), "--no-progress"]
    built = CliRunner().invoke(app, [*args, "--rows-field", "data", "--id-field", "id", "--workers", "1"])
    assert built.exit_code == 0, built.output
    assert sorted(row["id"] for split in read_rows(tmp_path / "out").values() for row in split) == ["q0", "q1", "q2"]


def test_cli_reads_the_files_a_glob_pattern_left_unexpanded_matches(tmp_path: Path) -> None:
    """A quoted pattern (`'shards/*.jsonl'`, as datasets' data_files and datatrove's glob_pattern take one, and as a
    Makefile or a program passes it, no shell expanding it) was refused as 'no such file or folder'."""
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        rows = "".join(json.dumps({"text": prose(10 * shard + i)}) + "\n" for i in range(2))
        (tmp_path / "shards" / f"part{shard}.jsonl").write_text(rows)
    args = ["data", "build", "--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"]
    built = CliRunner().invoke(app, [*args, str(tmp_path / "shards" / "*.jsonl")])
    assert built.exit_code == 0, built.output
    ids = sorted(row["id"] for split in read_rows(tmp_path / "out").values() for row in split)
    assert ids == ["part0.jsonl:1", "part0.jsonl:2", "part1.jsonl:1", "part1.jsonl:2"]
    missing = CliRunner().invoke(app, [*args, str(tmp_path / "shards" / "*.parquet")])
    assert missing.exit_code == 1 and "*.parquet: no file or folder matches this pattern" in missing.output


@pytest.mark.parametrize(
    "url",
    ["hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet", "s3://bucket/docs.jsonl", "https://x.org/a.txt"],
)
def test_a_url_given_as_an_input_is_refused_saying_nothing_is_downloaded(tmp_path: Path, url: str) -> None:
    """datatrove's readers and datasets' data_files take `hf://` and `s3://` paths: they were refused as 'no file or
    folder matches this pattern', or as 's3:/bucket/docs.jsonl: no such file or folder', the URL's '//' collapsed; a
    usage error (exit 2), as every command's path given as a URL."""
    refused = CliRunner().invoke(app, ["data", "build", url, "--out", str(tmp_path / "out")])
    assert refused.exit_code == 2 and not (tmp_path / "out").exists()
    told = f"Invalid value for 'INPUTS...': {url}: a URL, and seekstack takes local files and folders (nothing is"
    assert told in " ".join(refused.output.split())
    with pytest.raises(DataSourceError) as library:  # as the library reads its inputs
        expanded_inputs([url])
    assert str(library.value).startswith(f"{url}: a URL, and seekstack takes local files")


@pytest.mark.parametrize(
    ("inputs", "told"),
    [
        (["docs/", "docs"], "docs/ and docs name the same input ({root}/docs): its documents would be read twice"),
        (["docs/a.txt", "./docs/a.txt"], "docs/a.txt and ./docs/a.txt name the same input ({root}/docs/a.txt)"),
        (["docs/a.txt", "docs"], "docs/a.txt is inside the folder docs, also given: its documents would be read"),
        (["docs", "docs/sub"], "docs/sub is inside the folder docs, also given"),
        (["stdlib", "stdlib"], "stdlib and stdlib name the same input (stdlib)"),
    ],
)
def test_an_input_given_twice_or_inside_a_folder_also_given_is_refused_before_any_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inputs: list[str], told: str
) -> None:
    """`data build raw/ raw` read each file twice, and removed every second copy as an exact duplicate, unsaid."""
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text(prose(0))
    (tmp_path / "docs" / "sub" / "b.txt").write_text(prose(1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError) as refused:
        expanded_inputs(inputs)
    assert told.format(root=tmp_path.resolve()) in str(refused.value)
    cli = CliRunner().invoke(app, ["data", "build", *inputs, "--out", str(tmp_path / "out")])
    assert cli.exit_code != 0 and not (tmp_path / "out").exists()
    assert expanded_inputs(["docs/a.txt", "docs/sub"]) == ["docs/a.txt", "docs/sub"]  # apart: each read once


def test_thousands_of_inputs_are_checked_for_one_read_twice_in_time_growing_with_their_number(tmp_path: Path) -> None:
    """Each input was compared with every one before it: a glob of 3,000 files took 85 s of CPU before any was read."""
    inputs = [str(tmp_path / f"{number}.txt") for number in range(2000)]
    for name in inputs:
        Path(name).touch()
    started = time.process_time()
    assert expanded_inputs(inputs) == inputs
    assert time.process_time() - started < 2


def test_a_glob_pattern_matching_a_folder_and_its_files_reads_each_file_once(tmp_path: Path) -> None:
    """`'docs/**'` matches docs/, its subfolders and their files, and each was read as an input: a file two folders
    down was read three times (14 documents in from 4 files), its copies removed as exact duplicates of itself."""
    (tmp_path / "docs" / "a" / "b").mkdir(parents=True)
    for number, name in enumerate(["top.txt", "a/one.txt", "a/b/two.txt", "a/b/three.txt"]):
        (tmp_path / "docs" / name).write_text(prose(number))
    args = ["data", "build", str(tmp_path / "docs" / "**"), "--out", str(tmp_path / "out"), "--no-progress"]
    built = CliRunner().invoke(app, [*args, "--workers", "1", "--val-fraction", "0"])
    assert built.exit_code == 0, built.output
    ids = sorted(row["id"] for split in read_rows(tmp_path / "out").values() for row in split)
    assert ids == ["a/b/three.txt", "a/b/two.txt", "a/one.txt", "top.txt"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["documents_in"] == 4


def test_documents_that_differ_only_in_pii_are_exact_duplicates_and_one_is_written(tmp_path: Path) -> None:
    documents = [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(20)]
    documents += [
        Document("alice", prose(99) + "\nWrite to alice@example.com from 93.184.216.34.", "web"),
        Document("bob", prose(99) + "\nWrite to bob@example.org from 151.101.1.69.", "web"),
    ]
    report = build_corpus([documents], tmp_path / "out", CleaningConfig(val_fraction=0.5), show_progress=False)
    assert report.removed["exact_duplicate"] == 1
    assert report.examples["exact_duplicate"][0]["id"] == "bob"
    written = [row["id"] for split in read_rows(tmp_path / "out").values() for row in split]
    assert "alice" in written and "bob" not in written


def test_the_rules_judge_a_document_by_its_scrubbed_text(tmp_path: Path) -> None:
    """A max_chars that the scrubbed text meets and the original, with its long address, passes: kept."""
    scrubbed = prose(99) + "\nWrite to <EMAIL>."
    text = scrubbed.replace("<EMAIL>", "someone.with.a.long.name@example-company.com")
    config = CleaningConfig(prose=ProseRules(max_chars=len(scrubbed)))
    report = build_corpus([[Document("long", text, "web")]], tmp_path / "out", config, show_progress=False)
    assert report.documents_kept == 1 and read_rows(tmp_path / "out")["train"][0]["text"] == scrubbed


def test_report_examples_of_duplicates_name_the_kept_document_they_duplicate(tmp_path: Path) -> None:
    """The report named a removed duplicate but not its original, which a user needs to check the pair by hand."""
    documents = [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(10)]
    documents += [
        Document("copy of 3", prose(3) + "\nThe end.", "web"),
        Document("edited 5", prose(5).replace("\n", " \n", 1) + "\nThe end!", "web"),
        Document("copy of edited 5", prose(5).replace("\n", " \n", 1) + "\nThe end!", "web"),
    ]
    report = build_corpus([documents], tmp_path / "out", show_progress=False)
    assert [(example["id"], example["of"]) for example in report.examples["exact_duplicate"]] == [
        ("copy of 3", "prose3"),
        ("copy of edited 5", "prose5"),  # the kept document, not the near duplicate it copies
    ]
    assert report.examples["near_duplicate"][0]["of"] == "prose5"
    assert Report.load(tmp_path / "out" / "report.json") == report
    console = Console(record=True, width=120)
    console.print(report_table(report))
    assert "copy of 3 (prose/und) of prose3" in console.export_text()


def test_same_named_files_of_two_inputs_get_distinct_ids_and_others_keep_theirs(tmp_path: Path) -> None:
    """`data build a/ b/` with a notes.txt in each wrote two rows with id notes.txt, and a duplicate's `of` named
    either; a later namesake is now `notes.txt#2`, the ids of a build without namesakes are as they were."""
    for folder, seeds in (("a", {"notes.txt": 0, "guide.txt": 1}), ("b", {"notes.txt": 2, "zcopy.txt": 2})):
        (tmp_path / folder).mkdir()
        for name, seed in seeds.items():
            (tmp_path / folder / name).write_text(prose(seed) + "\nThe end.", encoding="utf-8")
    for rows_file in ("a", "b"):
        (tmp_path / f"{rows_file}.jsonl").mkdir()
        (tmp_path / f"{rows_file}.jsonl" / "data.jsonl").write_text(
            json.dumps({"text": prose(10 + ord(rows_file)) + "\nThe end."}) + "\n", encoding="utf-8"
        )
    inputs = ["a", "b", "a.jsonl/data.jsonl", "b.jsonl/data.jsonl"]
    config = CleaningConfig(val_fraction=0)
    report = build_corpus([open_source(tmp_path / i) for i in inputs], tmp_path / "out", config, show_progress=False)
    rows = read_rows(tmp_path / "out")["train"]
    assert [(row["id"], row["source"]) for row in rows] == [
        ("guide.txt", "a"),
        ("notes.txt", "a"),
        ("notes.txt#2", "b"),
        ("data.jsonl:1", "data.jsonl"),
        ("data.jsonl:1#2", "data.jsonl"),
    ]
    duplicates = report.examples["exact_duplicate"]
    assert [(example["id"], example["of"]) for example in duplicates] == [("zcopy.txt", "notes.txt#2")]
    alone = build_corpus([open_source(tmp_path / "a")], tmp_path / "alone", config, show_progress=False)
    assert alone.documents_kept == 2
    assert [row["id"] for row in read_rows(tmp_path / "alone")["train"]] == ["guide.txt", "notes.txt"]


def test_report_snippets_of_removed_documents_hold_no_pii(tmp_path: Path) -> None:
    secrets = "Mail carol@example.com, api_key = 'Zx81mQ0pLk77aa11bb22'"
    documents = [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(20)]
    documents += [
        Document("stub", secrets, "web"),  # fails min_chars
        Document("copy", f"{secrets}\n{prose(0)}\nThe end.", "web"),
        Document("copy again", f"{secrets}\n{prose(0)}\nThe end.", "web"),  # an exact duplicate
    ]
    build_corpus([documents], tmp_path / "out", CleaningConfig(), show_progress=False)
    report = Report.load(tmp_path / "out" / "report.json")
    snippets = [report.examples[reason][0]["snippet"] for reason in ("min_chars", "exact_duplicate")]
    for snippet in snippets:
        assert snippet.startswith("Mail <EMAIL>, api_key = '<SECRET>'")
    assert "carol@" not in (tmp_path / "out" / "report.json").read_text() and "Zx81" not in snippets[0]


def test_worker_processes_leave_ctrl_c_to_the_main_process() -> None:
    with WorkerPool(2) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main process still takes it


def is_running(pid: int) -> bool:
    """Whether process `pid` runs still: it exists and is no zombie (an orphan's exit that no init reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_exit_when_the_main_process_is_killed_outright(tmp_path: Path) -> None:
    """SIGKILL (the out-of-memory killer) or SIGTERM ends the main process without its cleanup: its workers waited,
    orphaned, for batches that never came, each holding its memory, for good."""
    main = "import os, pathlib, signal, sys; from seekstack.corpus.build import WorkerPool; pool = WorkerPool(2); "
    main += "pathlib.Path(sys.argv[1]).write_text(str(pool.submit(os.getpid).result())); "
    main += "os.kill(os.getpid(), signal.SIGKILL)"
    pid_file = tmp_path / "worker.pid"  # not a pipe: an orphaned worker would hold it open
    ran = subprocess.run([sys.executable, "-c", main, str(pid_file)], stdout=subprocess.DEVNULL, timeout=60)
    assert ran.returncode == -signal.SIGKILL
    worker = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 10
        while is_running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_running(worker)
    finally:
        if is_running(worker):
            os.kill(worker, signal.SIGKILL)


class KilledOnArrival(str):
    """A text that kills the worker process which receives it (SIGKILL, as the out-of-memory killer sends)."""

    def __reduce__(self) -> tuple:
        return signal.raise_signal, (signal.SIGKILL,)


class TwoArgumentError(Exception):
    """An exception pickle cannot rebuild: its args hold one message, its __init__ wants two."""

    def __init__(self, what: str, where: str):
        super().__init__(f"{what} in {where}")


class RaisesUnpicklable(str):
    """A text whose normalising raises an exception the main process cannot unpickle (a native library's may)."""

    def replace(self, *args: object) -> str:
        raise TwoArgumentError("refused", "replace")


@contextlib.contextmanager
def fails_after(seconds: int, what: str) -> Iterator[None]:
    """Fail the test when the block takes longer than `seconds` (a hang), rather than wait for good."""

    def hang(signum: int, frame: object) -> None:
        pytest.fail(f"{what} still ran after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_killed_worker_ends_the_build_with_an_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    documents = [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(100)]
    documents.append(Document("doomed", KilledOnArrival("The end."), "web"))
    monkeypatch.setattr("seekstack.corpus.sources.open_source", lambda spec, field, id_field, rows_field: documents)
    out = tmp_path / "out"
    with fails_after(30, "data build with a killed worker"):
        result = CliRunner().invoke(app, ["data", "build", "corpus", "--out", str(out), "--workers", "2"])
    assert result.exit_code == 1
    assert "a worker process died (pid " in result.output and " killed by SIGKILL)" in result.output
    assert "to 'doomed'; nothing was written" in result.output  # from the first batch not yet had (prose0 or 64)
    assert not out.exists()  # not even a hidden temporary, nor the folder the build created
    assert multiprocessing.active_children() == []  # every worker ended and joined


def test_an_interrupted_build_ends_when_a_worker_dies_as_it_winds_down(monkeypatch) -> None:
    """Ctrl-C cancelled the batches not yet sent; a worker dying meanwhile (one still starting, seconds into a build)
    then made Python 3.11's pool fail them too, a cancelled one with InvalidStateError, which ended its manager thread:
    the batches held were never answered and the exit hung (`data build` under `timeout -s INT 7`, 3 runs of 3)."""
    thread_errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    pool = WorkerPool(1)
    batches = [[Document("doomed", KilledOnArrival("The end."), "web")]] + [[]] * 5
    in_flight = [
        build.InFlight(pool.submit(build._analyse_batch, batch, CleaningConfig()), "", "") for batch in batches
    ]
    while not in_flight[1].analysed.running():  # the first two sent to the worker's queue, the others waiting
        time.sleep(0.01)
    with fails_after(20, "winding down a pool whose worker died"):
        build._end_workers(pool, in_flight)
    assert [error.exc_value for error in thread_errors] == []  # the pool's manager thread ended as it should
    assert all(isinstance(batch.analysed.exception(timeout=0), BrokenProcessPool) for batch in in_flight)
    assert multiprocessing.active_children() == []


class HangsOnArrival(str):
    """A text whose worker hangs as it receives it (a native library's deadlock), for a minute."""

    def __reduce__(self) -> tuple:
        return time.sleep, (60,)


def test_an_interrupted_build_ends_its_workers_at_once_not_after_the_batches_in_flight() -> None:
    """Ctrl-C in a --workers build waited for the batches in flight, up to 30 s, before 'nothing was written' (a
    batch of 64 long documents takes that long; a hung worker's the whole 30 s): it writes nothing, so it ends now."""
    pool = WorkerPool(1)
    batch = [Document("stuck", HangsOnArrival("The end."), "web")]
    in_flight = [build.InFlight(pool.submit(build._analyse_batch, batch, CleaningConfig()), "", "")]
    while not in_flight[0].analysed.running():
        time.sleep(0.01)
    try:
        started = time.monotonic()
        with fails_after(20, "ending the workers of an interrupted build"):
            build._end_workers(pool, in_flight)
        assert time.monotonic() - started < 5 and multiprocessing.active_children() == []
        assert isinstance(in_flight[0].analysed.exception(timeout=0), BrokenProcessPool)
    finally:
        pool.kill()


def test_a_worker_answer_that_cannot_be_read_back_is_named_not_called_a_death(tmp_path: Path, monkeypatch) -> None:
    documents = [Document(f"prose{i}", prose(i) + "\nThe end.", "web") for i in range(10)]
    documents.append(Document("picky", RaisesUnpicklable("The end."), "web"))
    monkeypatch.setattr("seekstack.corpus.sources.open_source", lambda spec, field, id_field, rows_field: documents)
    with fails_after(30, "data build with an unpicklable worker error"):
        result = CliRunner().invoke(app, ["data", "build", "corpus", "--out", str(tmp_path / "out"), "--workers", "2"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "a worker's answer could not be read back" in output
    assert "TypeError" in output and "died" not in output and "out-of-memory" not in output


def test_a_build_whose_output_would_replace_an_input_file_is_refused_before_reading(tmp_path: Path) -> None:
    """`data build corpus/train.jsonl --out corpus` replaced the input with the cleaned corpus (71,091 bytes of six
    documents became a train.jsonl of four, the removed and held-out ones gone); a folder as --out of its own input
    still works, since a folder's .jsonl and .json files are not read."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = "".join(json.dumps({"text": prose(i)}) + "\n" for i in range(6))
    (corpus / "train.jsonl").write_text(rows)
    refused = CliRunner().invoke(app, ["data", "build", str(corpus / "train.jsonl"), "--out", str(corpus)])
    assert refused.exit_code == 1 and "train.jsonl: is an input of this build" in " ".join(refused.output.split())
    assert (corpus / "train.jsonl").read_text() == rows and sorted(os.listdir(corpus)) == ["train.jsonl"]
    for i in range(6):
        (tmp_path / "texts" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "texts" / f"{i}.txt").write_text(prose(10 + i))
    report = build_corpus([open_source(tmp_path / "texts")], tmp_path / "texts", show_progress=False)
    again = build_corpus([open_source(tmp_path / "texts")], tmp_path / "texts", show_progress=False)
    assert report.documents_in == again.documents_in == 6
