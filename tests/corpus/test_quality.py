"""The quality classifier: it separates a reference set from junk on held-out documents, is deterministic, saves
and loads, and selection keeps the threshold or the top fraction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.corpus.quality import QualityModel, ngram_ids, select_corpus, train_quality_model
from tests.corpus.test_cleaning import LAO_ARTICLE, THAI_ARTICLE
from tests.corpus.test_kinds import STDLIB

MODULES = sorted(path for path in STDLIB.glob("*.py") if path.stat().st_size > 3000)[:60]
CODE = [path.read_text(encoding="utf-8")[:6000] for path in MODULES]


def salad(seed: int) -> str:
    """Tokens of the same modules in random order: the same vocabulary, none of the structure."""
    rng = random.Random(seed)
    return " ".join(rng.choices(" ".join(CODE[:10]).split(), k=600))


@pytest.fixture(scope="module")
def model() -> QualityModel:
    return train_quality_model(CODE[:40], [salad(i) for i in range(40)], buckets=2**16)


def test_classifier_ranks_held_out_reference_above_held_out_junk(model: QualityModel) -> None:
    reference = [model.score(text) for text in CODE[40:]]
    junk = [model.score(salad(1000 + i)) for i in range(20)]
    assert min(reference) > max(junk)
    assert min(reference) > 0.5 > max(junk)


def test_training_is_deterministic_for_a_seed_and_the_model_round_trips(model: QualityModel, tmp_path: Path) -> None:
    again = train_quality_model(CODE[:40], [salad(i) for i in range(40)], buckets=2**16)
    assert np.array_equal(again.weights, model.weights) and again.bias == model.bias
    loaded = QualityModel.load(model.save(tmp_path / "quality.npz"))
    assert loaded.score(CODE[50]) == model.score(CODE[50])


def test_cjk_text_gets_character_ngrams() -> None:
    assert len(ngram_ids("质量分类器", 1000)) == 5 + 4


def test_text_written_without_spaces_gets_features_its_documents_share() -> None:
    """A Thai article's features were its 12 space-separated runs, whole sentences no other document holds: a model
    trained on Thai reference text and Lao pool text scored new Thai and Lao sentences alike (its bias alone)."""
    thai, lao = THAI_ARTICLE.split("\n"), LAO_ARTICLE.split("\n")
    model = train_quality_model(thai, lao, buckets=2**12, epochs=8)
    new_thai = "ชาวบ้านในกรุงเทพมหานครปลูกข้าวเหนียวริมแม่น้ำเจ้าพระยา"  # words of the reference, in a new sentence
    new_lao = "ຊາວບ້ານກິນເຂົ້າໜຽວຢູ່ແຄມແມ່ນ້ຳຂອງ"
    assert model.score(new_thai) > 0.6 and model.score(new_lao) < 0.4
    assert len(ngram_ids(THAI_ARTICLE, 2**12)) > 500  # 4-character "words" and their pairs, not 12 sentences


def test_training_needs_both_classes_and_says_how_many_of_each_it_got() -> None:
    with pytest.raises(ValueError, match="both reference .* got 3 reference and 0 pool documents"):
        train_quality_model(CODE[:3], [])
    with pytest.raises(ValueError, match="both reference .* got 0 reference and 0 pool documents"):
        train_quality_model([], [])


def test_the_two_classes_weigh_the_same_however_many_documents_each_has() -> None:
    """A text given 5 times as reference and 40 times as pool is as likely one as the other: about 0.5, not 5 / 45."""
    for positives, negatives in ((5, 40), (40, 5)):
        model = train_quality_model(["the same words"] * positives, ["the same words"] * negatives, buckets=2**10)
        assert model.score("the same words") == pytest.approx(0.5, abs=0.05)


def test_cli_quality_train_names_the_option_whose_inputs_hold_no_documents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "ref.txt").write_text(CODE[0])
    for reference, says in ((tmp_path / "empty", "--reference"), (tmp_path / "ref.txt", "--pool")):
        args = ["data", "quality-train", "--reference", str(reference), "--pool", str(tmp_path / "empty")]
        refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "q.npz")])
        message = " ".join(refused.output.split())
        assert refused.exit_code == 1 and f"{says} " in message and "no documents with text; check the paths" in message
    assert not (tmp_path / "q.npz").exists()


def test_cli_quality_train_on_a_corpus_folder_says_its_jsonl_files_were_not_read(tmp_path: Path) -> None:
    """`--reference data/corpus` (what `data build` writes) said only 'no documents; check the paths and --field'."""
    corpus = write_corpus(tmp_path / "corpus", CODE[:3])
    args = ["data", "quality-train", "--reference", str(corpus), "--pool", str(corpus)]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "q.npz")])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 1
    assert "files of other suffixes were not read (.jsonl 2)" in message and "e.g. FOLDER/train.jsonl" in message


def test_cli_quality_train_refuses_field_when_no_input_holds_rows(tmp_path: Path) -> None:
    """`--field content` with folders of text files alone was passed over: the files were trained on whole."""
    for side, texts in (("ref", CODE[:2]), ("pool", CODE[2:4])):
        (tmp_path / side).mkdir()
        for number, text in enumerate(texts):
            (tmp_path / side / f"{number}.txt").write_text(text)
    args = ["data", "quality-train", "--reference", str(tmp_path / "ref"), "--pool", str(tmp_path / "pool")]
    refused = CliRunner().invoke(app, [*args, "--field", "content", "--out", str(tmp_path / "q.npz")])
    assert refused.exit_code == 1 and not (tmp_path / "q.npz").exists()
    assert " ".join(refused.output.split()).startswith(
        "error: --field content names a field or column of rows, and no input holds rows: folders, text files"
    )
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": CODE[4]}) + "\n")
    with_rows = [*args, "--reference", str(tmp_path / "rows.jsonl"), "--field", "content"]
    assert CliRunner().invoke(app, [*with_rows, "--out", str(tmp_path / "q.npz")]).exit_code == 0


def write_corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir()
    with open(folder / "train.jsonl", "w", encoding="utf-8") as train:
        for number, text in enumerate(texts):
            train.write(json.dumps({"id": f"d{number}", "text": text, "source": "t", "kind": "code/python"}) + "\n")
    (folder / "val.jsonl").write_text(json.dumps({"id": "v", "text": CODE[59], "source": "t"}) + "\n")
    return folder


def test_select_keeps_the_top_fraction_and_scores_every_row(model: QualityModel, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", CODE[40:50] + [salad(2000 + i) for i in range(10)])
    summary = select_corpus(model, corpus, tmp_path / "top", top_fraction=0.5)
    rows = [json.loads(line) for line in open(tmp_path / "top" / "train.jsonl")]
    assert summary["selected"] == 10 and sorted(row["id"] for row in rows) == sorted(f"d{i}" for i in range(10))
    assert all(row["quality"] >= summary["threshold"] and row["kind"] == "code/python" for row in rows)
    assert "quality" in json.loads((tmp_path / "top" / "val.jsonl").read_text())
    by_threshold = select_corpus(model, corpus, tmp_path / "t", threshold=0.99999)
    assert by_threshold["selected"] < 10
    with pytest.raises(ValueError, match="exactly one"):
        select_corpus(model, corpus, tmp_path / "x", threshold=0.5, top_fraction=0.5)
    before = (corpus / "train.jsonl").read_bytes()
    with pytest.raises(ValueError, match="is the corpus folder; write the selection to another one"):
        select_corpus(model, corpus, corpus / ".." / "corpus", top_fraction=0.3)
    assert (corpus / "train.jsonl").read_bytes() == before


def test_top_fraction_keeps_exactly_its_share_when_scores_tie_at_the_cutoff(
    model: QualityModel, tmp_path: Path
) -> None:
    """Every document scoring the cutoff's score was kept: 5 of 8 for a top quarter when four tie there."""
    texts = [CODE[40], salad(1), CODE[41], CODE[41], salad(2), CODE[41], CODE[41], salad(3)]
    corpus = write_corpus(tmp_path / "corpus", texts)
    summary = select_corpus(model, corpus, tmp_path / "top", top_fraction=0.25)
    rows = [json.loads(line) for line in open(tmp_path / "top" / "train.jsonl")]
    tie = model.score(CODE[41])
    assert model.score(CODE[40]) > tie  # the best one, then the first of the four tied
    assert summary["selected"] == 2 and [row["id"] for row in rows] == ["d0", "d2"]
    assert summary["threshold"] == tie


def test_a_threshold_keeps_documents_scoring_it_and_a_top_fraction_rounds_to_the_nearest_count(
    model: QualityModel, tmp_path: Path
) -> None:
    """`--threshold X` keeps score >= X; `--top-fraction 0.35` of 8 documents keeps round(2.8) = 3, and a half
    count rounds up (0.5625 of 8 kept round(4.5) = 4, Python's round taking halves to even; 0.7 of 5 kept 3, the
    float product being 3.4999999999999996)."""
    texts = [CODE[40], salad(1), CODE[41], CODE[41], salad(2), CODE[41], CODE[41], salad(3)]
    corpus = write_corpus(tmp_path / "corpus", texts)
    assert select_corpus(model, corpus, tmp_path / "at", threshold=model.score(CODE[41]))["selected"] == 5
    kept = {
        share: select_corpus(model, corpus, tmp_path / str(share), top_fraction=share)["selected"]
        for share in (0.35, 0.3125, 0.5625)
    }
    assert kept == {0.35: 3, 0.3125: 3, 0.5625: 5}
    five = write_corpus(tmp_path / "five", texts[:5])
    assert select_corpus(model, five, tmp_path / "five_top", top_fraction=0.7)["selected"] == 4
    numpy_share = select_corpus(model, five, tmp_path / "numpy_top", top_fraction=np.float64(0.7))  # a float too
    assert numpy_share["selected"] == 4


def test_select_says_how_many_documents_tied_at_the_cutoff_it_kept(model: QualityModel, tmp_path: Path) -> None:
    """It said 'score >= X' while it left out three documents scoring X, and printed X rounded up, above the score
    of the last document it kept."""
    texts = [CODE[40], salad(1), CODE[41], CODE[41], salad(2), CODE[41], CODE[41], salad(3)]
    corpus = write_corpus(tmp_path / "corpus", texts)
    args = ["data", "select", "--corpus", str(corpus), "--model", str(model.save(tmp_path / "q.npz"))]
    tie = round(model.score(CODE[41]), 6)
    top = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "top"), "--top-fraction", "0.25"])
    said = f"selected 2 of 8 training documents (score > {tie}, and the first 1 of the 4 scoring {tie}, to keep"
    assert top.exit_code == 0 and said in top.output
    assert json.loads((tmp_path / "top" / "selection.json").read_text())["at_threshold"] == {
        "documents": 4,
        "selected": 1,
    }
    above = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "above"), "--threshold", "0.5"])
    assert above.exit_code == 0 and "selected 5 of 8 training documents (score >= 0.5);" in above.output


def test_select_refuses_a_corpus_without_val_jsonl_before_scoring_and_writes_no_folder(
    model: QualityModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = write_corpus(tmp_path / "corpus", CODE[40:45])
    (corpus / "val.jsonl").unlink()
    scored: list[str] = []
    monkeypatch.setattr(QualityModel, "score", lambda self, text: scored.append(text) or 0.5)
    with pytest.raises(FileNotFoundError) as refused:
        select_corpus(model, corpus, tmp_path / "out" / "sel", top_fraction=0.5)
    assert str(refused.value) == (
        f"{corpus / 'val.jsonl'}: no such file; `seekstack data build TEXT --out {corpus}` writes it beside "
        "train.jsonl (empty with --val-fraction 0): build the corpus with it, or add an empty val.jsonl to hold no "
        "document out"
    )
    assert scored == [] and not (tmp_path / "out").exists()


def test_select_names_the_command_that_writes_a_missing_train_jsonl(model: QualityModel, tmp_path: Path) -> None:
    """It said "no corpus file at CORPUS/train.jsonl: run `data build` first", unlike `data tokenize` and
    tokenize_corpus, which name the file first and the command that writes it."""
    corpus = write_corpus(tmp_path / "corpus", CODE[40:45])
    (corpus / "train.jsonl").unlink()
    with pytest.raises(FileNotFoundError) as refused:
        select_corpus(model, corpus, tmp_path / "sel", top_fraction=0.5)
    assert str(refused.value) == (
        f"{corpus / 'train.jsonl'}: no such file; `seekstack data build TEXT --out {corpus}` writes a corpus's "
        "train.jsonl and val.jsonl"
    )
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{broken", r"not valid JSON"),
        ('{"id": "x"}', r"no field 'text', only 'id'"),
        ('{"id": "x", "text": null}', r"field 'text' is null, not a string"),
    ],
)
def test_select_names_the_file_and_line_of_a_bad_corpus_row_before_writing(
    model: QualityModel, tmp_path: Path, split: str, line: str, says: str
) -> None:
    """A bad row stopped select with json's message naming no file (`Expecting value: line 1 column 2`) or a
    KeyError traceback, a bad val.jsonl row only once all of train was scored."""
    corpus = write_corpus(tmp_path / "corpus", CODE[40:43])
    with open(corpus / f"{split}.jsonl", "a", encoding="utf-8") as rows:
        rows.write(line + "\n")
    lines = 4 if split == "train" else 2
    with pytest.raises(ValueError, match=rf"corpus/{split}\.jsonl:{lines}: {says}"):
        select_corpus(model, corpus, tmp_path / "sel", top_fraction=0.5)
    assert not (tmp_path / "sel").exists()


def test_select_skips_blank_lines_as_the_other_corpus_readers_do(model: QualityModel, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", CODE[40:44])
    with open(corpus / "train.jsonl", "a", encoding="utf-8") as rows:
        rows.write("\n")
    summary = select_corpus(model, corpus, tmp_path / "sel", top_fraction=0.5)
    assert summary["documents"] == 4 and summary["selected"] == 2


@pytest.mark.parametrize("out", ["taken.txt", "taken.txt/sel"])
def test_select_refuses_an_out_folder_that_is_or_lies_under_a_file_before_scoring(
    model: QualityModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    """It scored every document, then failed with `[Errno 17] File exists: 'taken.txt'`."""
    corpus = write_corpus(tmp_path / "corpus", CODE[40:43])
    (tmp_path / "taken.txt").write_text("a user's file")
    monkeypatch.setattr(QualityModel, "score", lambda self, text: pytest.fail("scoring started"))
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'taken.txt'}: is a file, not a folder"):
        select_corpus(model, corpus, tmp_path / out, top_fraction=0.5)
    assert (tmp_path / "taken.txt").read_text() == "a user's file"


@pytest.mark.parametrize("content", [b"{not a model}", b"PK\x03\x04 cut short", None])
def test_a_model_file_that_is_no_quality_model_is_named(tmp_path: Path, content: bytes | None) -> None:
    """A JSONL file given as --model failed with numpy's 'This file contains pickled (object) data', naming none."""
    path = tmp_path / "q.npz"
    if content is None:
        np.savez(path, something_else=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: not a quality model written by `seekstack data quality-train`"):
        QualityModel.load(path)


@pytest.mark.parametrize(("name", "says"), [("missing.npz", "no such file"), ("corpus", "a folder, not a file")])
def test_a_model_path_that_is_no_file_is_named_with_what_to_give(tmp_path: Path, name: str, says: str) -> None:
    """A --model naming nothing, or a folder, failed with Python's bare '[Errno 2] No such file or directory: ...'."""
    (tmp_path / "corpus").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / name}: {says}; a quality model is the .npz that"):
        QualityModel.load(tmp_path / name)


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--top-fraction", "30", "Invalid value for '--top-fraction': has value 30.0: must be a share in (0, 1]"),
        ("--top-fraction", "0", "Invalid value for '--top-fraction': has value 0.0: must be a share in (0, 1]"),
        ("--threshold", "2", "Invalid value for '--threshold': has value 2.0: must be in [0, 1]"),
    ],
)
def test_select_refuses_a_top_fraction_or_threshold_out_of_range_naming_the_option(
    model: QualityModel, tmp_path: Path, option: str, value: str, says: str
) -> None:
    corpus = write_corpus(tmp_path / "corpus", CODE[40:45])
    model_path = model.save(tmp_path / "q.npz")
    args = ["data", "select", "--corpus", str(corpus), "--model", str(model_path), "--out", str(tmp_path / "sel")]
    refused = CliRunner().invoke(app, [*args, option, value])
    assert refused.exit_code == 2 and says in " ".join(refused.output.split())  # a usage error, as the parser's own
    assert not (tmp_path / "sel").exists()


def test_cli_select_refuses_an_empty_train_jsonl_or_the_file_for_its_folder_as_tokenize_does(
    model: QualityModel, tmp_path: Path
) -> None:
    """An empty train.jsonl was "selected 0 of 0 training documents (score >= 1.0)", an empty corpus written, where
    `data tokenize` and `tokenizer train` refuse it; --corpus given the train.jsonl itself was read as a folder,
    "corpus/train.jsonl/train.jsonl: no such file; `seekstack data build TEXT --out corpus/train.jsonl` ...". Both are
    refused as those commands refuse them, before the model is read or anything written."""
    corpus = write_corpus(tmp_path / "corpus", CODE[40:45])
    args = ["data", "select", "--model", str(model.save(tmp_path / "q.npz")), "--out", str(tmp_path / "sel")]
    given_the_file = CliRunner().invoke(app, [*args, "--corpus", str(corpus / "train.jsonl"), "--top-fraction", "0.5"])
    assert given_the_file.exit_code == 1
    assert " ".join(given_the_file.output.split()) == (
        f"error: {corpus / 'train.jsonl'}: is a file; --corpus is the folder `seekstack data build` wrote (train.jsonl,"
        f" val.jsonl): give its folder, {corpus}"
    )
    (corpus / "train.jsonl").write_text("")
    empty = CliRunner().invoke(app, [*args, "--corpus", str(corpus), "--top-fraction", "0.5"])
    assert empty.exit_code == 1
    assert " ".join(empty.output.split()) == (
        f"error: {corpus / 'train.jsonl'}: no documents to select from; build the corpus from your text first "
        f"(`seekstack data build TEXT --out {corpus}`)"
    )
    assert not (tmp_path / "sel").exists()


def test_cli_quality_train_warns_when_a_side_holds_fewer_than_a_hundred_documents(tmp_path: Path) -> None:
    """A classifier of one reference document was trained and written without a word, though it learns that
    document's words alone. Each side of fewer than FEW_DOCUMENTS is named on stderr; a hundred of each pass quietly."""
    for name, rows in (("one", ["def f(x):\n    return x + 1"]), ("hundred", [salad(n) for n in range(100)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    args = ["data", "quality-train", "--pool", str(tmp_path / "hundred.jsonl"), "--out", str(tmp_path / "q.npz")]
    few = CliRunner().invoke(app, [*args, "--reference", str(tmp_path / "one.jsonl")])
    assert few.exit_code == 0 and few.stderr == (
        "warning: --reference holds 1 document: a classifier trained on fewer than 100 documents a side learns those "
        "documents' words, not the kind of text they stand for; give it hundreds of each\n"
    )
    enough = CliRunner().invoke(app, [*args, "--reference", str(tmp_path / "hundred.jsonl")])
    assert enough.exit_code == 0 and enough.stderr == ""


def test_cli_trains_and_selects(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    (tmp_path / "pool").mkdir()
    for number, text in enumerate(CODE[:20]):
        (tmp_path / "ref" / f"{number}.py").write_text(text)
    for number in range(20):
        (tmp_path / "pool" / f"{number}.txt").write_text(salad(number))
    model_path = tmp_path / "q.npz"
    args = ["data", "quality-train", "--reference", str(tmp_path / "ref"), "--pool", str(tmp_path / "pool")]
    trained = CliRunner().invoke(app, [*args, "--out", str(model_path)])
    assert trained.exit_code == 0 and "20 reference and 20 pool documents" in trained.output
    corpus = write_corpus(tmp_path / "corpus", CODE[40:45] + [salad(3000 + i) for i in range(5)])
    args = ["data", "select", "--corpus", str(corpus), "--model", str(model_path), "--out", str(tmp_path / "sel")]
    selected = CliRunner().invoke(app, [*args, "--top-fraction", "0.5"])
    assert selected.exit_code == 0 and "selected 5 of 10 training documents" in selected.output


def test_cli_quality_train_reads_its_texts_as_data_build_writes_the_rows_select_scores(tmp_path: Path) -> None:
    """quality-train read its texts raw, while `data select` scores `data build`'s rows, normalised and PII scrubbed:
    a reference scraped with `&amp;`, CRLF, a decomposed accent and an address taught n-grams no scored row holds. Two
    references that `data build` writes the same now train the same model."""
    raw = "Fish &amp; Chips at the cafe\u0301, \u00a35 a plate.\r\nWrite to bob@example.com for a table.\r\n"
    built = "Fish & Chips at the caf\u00e9, \u00a35 a plate.\nWrite to <EMAIL> for a table.\n"
    for name, text in (("raw", raw), ("built", built), ("pool", "chips chips chips and more chips\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.txt").write_bytes(text.encode("utf-8"))
    models = []
    for reference in ("raw", "built"):
        out = tmp_path / f"{reference}.npz"
        args = ["--reference", str(tmp_path / reference), "--pool", str(tmp_path / "pool"), "--out", str(out)]
        assert CliRunner().invoke(app, ["data", "quality-train", *args]).exit_code == 0
        models.append(QualityModel.load(out))
    assert np.array_equal(models[0].weights, models[1].weights) and models[0].bias == models[1].bias
    assert models[0].score(built) == models[1].score(built) > 0.5


def test_cli_quality_train_skips_blank_texts_as_data_build_drops_them(tmp_path: Path) -> None:
    """Blank rows were trained on (and counted) as documents, teaching the empty-text id that no row `data select`
    scores holds; a file of blank rows alone trained a model. They are skipped: the model is the one without them."""
    rows = {"ref": ["a reference text of words", "", " \n\t"], "clean": ["a reference text of words"], "blank": [""]}
    for name, texts in {**rows, "pool": ["chips chips chips and more chips", "  "]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    runs = {}
    for reference in rows:
        out = tmp_path / f"{reference}.npz"
        args = ["--reference", str(tmp_path / f"{reference}.jsonl"), "--pool", str(tmp_path / "pool.jsonl")]
        runs[reference] = CliRunner().invoke(app, ["data", "quality-train", *args, "--out", str(out)])
    assert runs["ref"].exit_code == 0 and "trained on 1 reference and 1 pool documents" in runs["ref"].stdout
    trained, clean = QualityModel.load(tmp_path / "ref.npz"), QualityModel.load(tmp_path / "clean.npz")
    assert np.array_equal(trained.weights, clean.weights) and trained.bias == clean.bias
    assert runs["blank"].exit_code == 1 and not (tmp_path / "blank.npz").exists()
    assert "--reference " in runs["blank"].output and "no documents with text" in runs["blank"].output


def test_cli_quality_train_reads_every_document_under_a_max_documents_past_sys_maxsize(tmp_path: Path) -> None:
    """--max-documents 10**20 (any count past sys.maxsize) failed with islice's 'Stop argument for islice() must be
    None or an integer: 0 <= x <= sys.maxsize', naming no option; it reads every document, as any count above theirs."""
    (tmp_path / "ref.txt").write_text("a reference text\n")
    (tmp_path / "pool.txt").write_text("a pool text\n")
    args = ["--reference", str(tmp_path / "ref.txt"), "--pool", str(tmp_path / "pool.txt")]
    trained = CliRunner().invoke(
        app, ["data", "quality-train", *args, "--out", str(tmp_path / "q.npz"), "--max-documents", str(10**20)]
    )
    assert trained.exit_code == 0 and "trained on 1 reference and 1 pool documents" in trained.stdout, trained.output


@pytest.mark.parametrize("count", ["0", "-1"])
def test_cli_quality_train_refuses_max_documents_below_one_naming_the_option(tmp_path: Path, count: str) -> None:
    """0 was refused as '--reference DIR: no documents; check the paths', blaming paths that hold documents, and -1
    with islice's 'Stop argument for islice() must be None or an integer'."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "0.txt").write_text("a reference text\n")
    args = ["--reference", str(tmp_path / "ref"), "--pool", str(tmp_path / "ref"), "--out", str(tmp_path / "q.npz")]
    refused = CliRunner().invoke(app, ["data", "quality-train", *args, "--max-documents", count])
    assert refused.exit_code == 2 and "Invalid value for '--max-documents'" in " ".join(refused.output.split())
    assert not (tmp_path / "q.npz").exists()
