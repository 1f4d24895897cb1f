"""Token shards: what tokenize_corpus writes, and the windows TokenWindows serves from it."""

from __future__ import annotations

import errno
import json
import shutil
import sysconfig
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer

from seekstack.atomic import WriteRefused
from seekstack.tokenizer import DOCUMENT_PIECE_CHARS, Tokenizer, train_tokenizer
from seekstack.tokens import shards as shards_module
from seekstack.tokens.difficulty import difficulty_buckets, tokenize_buckets
from seekstack.tokens.shards import TokenWindows, load_index, token_dtype, tokenize_corpus
from tests.test_atomic import file_size_limit

SEQ_LEN = 64


def write_corpus(path: Path, texts: list[str]) -> Path:
    """A corpus-stage JSONL file: one {"id", "text", "source"} object per line."""
    with path.open("w", encoding="utf-8") as out:
        for number, text in enumerate(texts):
            out.write(json.dumps({"id": f"doc-{number}", "text": text, "source": "stdlib"}) + "\n")
    return path


def stdlib_documents(count: int) -> list[str]:
    """The first `count` standard-library modules, cut to 4 KB so the corpus stays small."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:count]
    return [path.read_text(encoding="utf-8", errors="replace")[:4000] for path in paths]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(stdlib_documents(60), vocab_size=1000, out_path=tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return [*stdlib_documents(12), "", "naïve café 👩‍👩‍👧"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer, documents) -> Path:
    root = tmp_path_factory.mktemp("shards")
    tokenize_corpus(write_corpus(root / "train.jsonl", documents), tokenizer, root / "out", "train", shard_tokens=1000)
    return root / "out"


def expected_stream(tokenizer: Tokenizer, documents: list[str], add_bos: bool = False) -> np.ndarray:
    return np.concatenate([[*tokenizer.encode(text, add_bos=add_bos), tokenizer.eos_id] for text in documents])


def read_stream(out_dir: Path, split: str) -> np.ndarray:
    index = load_index(out_dir, split)
    return np.concatenate([np.fromfile(out_dir / s["file"], dtype=index["dtype"]) for s in index["shards"]])


def test_token_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert token_dtype(1000) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shards_hold_every_document_followed_by_eos(shards, tokenizer, documents):
    stream = read_stream(shards, "train")
    assert stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, expected_stream(tokenizer, documents))
    assert int((stream == tokenizer.eos_id).sum()) == len(documents)
    assert stream[-1] == tokenizer.eos_id


def test_special_token_strings_in_documents_are_tokenized_as_plain_text(tmp_path, tokenizer):
    quoting = 'The stop token is "<｜end▁of▁sentence｜>", a turn starts with <｜User｜>.'
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", [quoting]), tokenizer, tmp_path, "train")
    stream = read_stream(tmp_path, "train").tolist()
    assert stream.count(tokenizer.eos_id) == 1 and stream[-1] == tokenizer.eos_id  # the document's own end only
    assert tokenizer.decode(stream[:-1]) == quoting and len(stream) > 20
    assert tokenizer.encode("<｜User｜>") == [tokenizer.backend.token_to_id("<｜User｜>")]  # chat keeps the token


def test_index_records_counts_bytes_and_tokenizer(shards, tokenizer, documents):
    index = json.loads((shards / "train_index.json").read_text(encoding="utf-8"))
    total = len(expected_stream(tokenizer, documents))
    assert index["dtype"] == "uint16"
    assert index["documents"] == len(documents)
    assert index["total_tokens"] == total == sum(shard["tokens"] for shard in index["shards"])
    assert [shard["file"] for shard in index["shards"]] == [f"train_{i:05d}.bin" for i in range(len(index["shards"]))]
    assert [shard["tokens"] for shard in index["shards"][:-1]] == [1000] * (len(index["shards"]) - 1)
    assert index["text_bytes"] == sum(len(text.encode("utf-8")) for text in documents)
    assert index["tokenizer"]["vocab_size"] == 1000
    assert index["tokenizer"]["sha256"] == tokenizer.fingerprint
    assert sorted(path.name for path in shards.iterdir()) == sorted(
        [*(shard["file"] for shard in index["shards"]), "train_index.json"]
    )


def test_index_records_the_corpus_path_whole_so_any_working_folder_finds_the_corpus(tmp_path, tokenizer, monkeypatch):
    from seekstack.tokens.provenance import corpus_folder

    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "train.jsonl", ["def f(x):\n    return x\n"])
    monkeypatch.chdir(tmp_path)
    index = tokenize_corpus(Path("corpus/train.jsonl"), tokenizer, "tokens", "train")
    assert index["source"] == str(tmp_path.resolve() / "corpus" / "train.jsonl")
    monkeypatch.chdir(tmp_path / "corpus")  # `report` or `train` run from another folder
    assert corpus_folder(tmp_path / "tokens") == tmp_path.resolve() / "corpus"


def test_the_corpus_of_shards_is_found_past_an_index_that_is_no_utf8(tmp_path, tokenizer):
    """An index beside the others that is not UTF-8 (saved again as UTF-16, damaged) made corpus_folder, which
    the retokenize command and the tokenizer-mismatch error are written with, raise the bare UnicodeDecodeError in
    place of the error it was writing; it is passed over, as an index that is no JSON is."""
    from seekstack.tokens.provenance import corpus_folder

    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "train.jsonl", ["def f(x):\n    return x\n"])
    tokenize_corpus(tmp_path / "corpus" / "train.jsonl", tokenizer, tmp_path / "tokens", "train")
    (tmp_path / "tokens" / "a_index.json").write_text(json.dumps({"source": "elsewhere"}), encoding="utf-16")
    assert corpus_folder(tmp_path / "tokens") == tmp_path.resolve() / "corpus"


def test_the_retokenize_command_for_shards_or_a_checkpoint_given_as_dot_names_a_folder_beside_them(
    tmp_path, tokenizer, monkeypatch
):
    from seekstack.tokens.provenance import require_checkpoint_tokenizer

    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "train.jsonl", ["def f(x):\n    return x\n"])
    index = tokenize_corpus(tmp_path / "corpus" / "train.jsonl", tokenizer, tmp_path / "tokens", "train")
    checkpoint = tmp_path / "step_6"
    train_tokenizer(stdlib_documents(3), vocab_size=300, out_path=checkpoint)  # another tokenizer
    monkeypatch.chdir(tmp_path / "tokens")  # `seekstack train data_dir=. init_from=../step_6`
    with pytest.raises(ValueError, match=f"--out {tmp_path.resolve() / 'tokens_step_6'}`"):
        require_checkpoint_tokenizer("../step_6", ".", index["tokenizer"])
    monkeypatch.chdir(checkpoint)  # `init_from=.`
    with pytest.raises(ValueError, match=r"--out \.\./tokens_step_6`"):
        require_checkpoint_tokenizer(".", "../tokens", index["tokenizer"])


def test_a_long_document_reaches_the_shards_a_piece_of_ids_at_a_time(tmp_path, tokenizer, monkeypatch):
    """A document's ids were held whole as Python ints (~36 bytes a token), then copied with its EOS: tokenizing a
    corpus with a 50 MB document peaked 785 MB above the process's start (405 MB now, the text and one group of pieces'
    encodings)."""
    long_document = ("\n".join(stdlib_documents(60)) * 3)[: 2 * DOCUMENT_PIECE_CHARS + 1000]
    added: list[int] = []
    add = shards_module._ShardWriter.add

    def recorded_add(writer, ids: list[int]) -> None:
        added.append(len(ids))
        add(writer, ids)

    monkeypatch.setattr(shards_module._ShardWriter, "add", recorded_add)
    corpus = write_corpus(tmp_path / "train.jsonl", [long_document, "short"])
    tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train")
    stream = read_stream(tmp_path / "out", "train")
    whole = tokenizer.encode(long_document)
    np.testing.assert_array_equal(stream, [*whole, tokenizer.eos_id, *tokenizer.encode("short"), tokenizer.eos_id])
    assert len(added) == 4 and max(added) < len(whole)  # three pieces of the long document, then the short one


def test_bos_is_written_before_each_document_when_asked(tmp_path, tokenizer, documents):
    corpus = write_corpus(tmp_path / "val.jsonl", documents[:3])
    index = tokenize_corpus(corpus, tokenizer, tmp_path / "out", "val", add_bos=True)
    stream = read_stream(tmp_path / "out", "val")
    np.testing.assert_array_equal(stream, expected_stream(tokenizer, documents[:3], add_bos=True))
    assert index["bos"] is True and int((stream == tokenizer.bos_id).sum()) == 3


def test_a_tokenizer_that_frames_a_text_with_bos_leads_each_document_with_it(tmp_path, tokenizer, documents):
    """A DeepSeek release's tokenizer puts BOS before a text, as its prompts are encoded and transformers'
    `tokenizer(text)` encodes a document: its shards lead each document with BOS (they held none, so a model
    trained on them met BOS-led prompts it had never seen). seekstack's own tokenizers frame with nothing."""
    from tokenizers import processors

    release = Tokenizer(BackendTokenizer.from_str(tokenizer.backend.to_str()))
    release.backend.post_processor = processors.TemplateProcessing(
        single="<｜begin▁of▁sentence｜> $A", special_tokens=[("<｜begin▁of▁sentence｜>", tokenizer.bos_id)]
    )
    assert release.frames_with_bos and not tokenizer.frames_with_bos
    corpus = write_corpus(tmp_path / "train.jsonl", documents[:3])
    index = tokenize_corpus(corpus, release, tmp_path / "out", "train")
    np.testing.assert_array_equal(
        read_stream(tmp_path / "out", "train"), expected_stream(tokenizer, documents[:3], True)
    )
    assert index["bos"] is True


def test_vocab_past_65536_is_stored_as_uint32(tmp_path, tokenizer):
    backend = BackendTokenizer.from_file(tokenizer.source)
    backend.add_tokens([f"<extra_{number}>" for number in range(65_000)])
    big = Tokenizer(backend)
    assert big.vocab_size == 66_000
    corpus = write_corpus(tmp_path / "train.jsonl", ["plain text <extra_64999> end"])
    index = tokenize_corpus(corpus, big, tmp_path / "out", "train")
    stream = read_stream(tmp_path / "out", "train")
    assert index["dtype"] == "uint32" and stream.dtype == np.uint32
    assert (tmp_path / "out" / "train_00000.bin").stat().st_size == 4 * index["total_tokens"]
    assert 65_999 in stream.tolist()
    np.testing.assert_array_equal(stream, [*big.encode("plain text <extra_64999> end"), big.eos_id])


def test_retokenizing_replaces_old_shards(tmp_path, tokenizer, documents):
    corpus = write_corpus(tmp_path / "train.jsonl", documents)
    tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train", shard_tokens=500)
    index = tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train", shard_tokens=100_000)
    assert [path.name for path in (tmp_path / "out").glob("train_*.bin")] == ["train_00000.bin"]
    assert index["shards"] == [{"file": "train_00000.bin", "tokens": index["total_tokens"]}]


def test_shards_past_a_file_size_limit_are_a_write_refused_naming_them(tmp_path, tokenizer, documents):
    """numpy's tofile reported the short write as "376378 requested and 102400 written", with no errno, so `data
    tokenize` under `ulimit -f` (or on a full disk) failed naming no file and no reason."""
    corpus = write_corpus(tmp_path / "train.jsonl", documents)
    with pytest.raises(WriteRefused) as refused, file_size_limit(4096):
        tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train", shard_tokens=100_000)
    assert str(refused.value).startswith(f"{tmp_path / 'out' / 'train_00000.bin'}: not written (File too large: ")
    assert refused.value.errno == errno.EFBIG and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{broken", r"train.jsonl:2: not valid JSON"),
        ('{"id": "x"}', r"train.jsonl:2: no field 'text'"),
        ('{"id": "x", "text": null}', r"train.jsonl:2: field 'text' is null"),  # was skipped, counted nowhere
    ],
)
def test_bad_corpus_lines_are_named_by_file_and_line(tmp_path, tokenizer, line, message):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "ok", "source": "s"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train", shard_tokens=2)
    assert not (tmp_path / "out").exists()  # nor the folder it created


def test_a_bad_line_is_named_and_earlier_shards_survive_and_half_characters_become_u_fffd(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "train.jsonl", ["first", "second"])
    before = tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train")
    corpus.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="train.jsonl:2: field 'text' is int"):
        tokenize_corpus(corpus, tokenizer, tmp_path / "out", "train", shard_tokens=1)
    assert load_index(tmp_path / "out", "train") == before
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["train_00000.bin", "train_index.json"]
    corpus.write_text('{"text": "lone \\udcff surrogate"}\n', encoding="utf-8")  # JSON escaping half a character
    tokenize_corpus(corpus, tokenizer, tmp_path / "cut", "train")
    assert tokenizer.decode(read_stream(tmp_path / "cut", "train").tolist()[:-1]) == "lone \ufffd surrogate"


def test_missing_corpus_is_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        tokenize_corpus(tmp_path / "nowhere.jsonl", tokenizer, tmp_path / "out", "train")


@pytest.mark.parametrize("tokenize", [tokenize_corpus, tokenize_buckets])
@pytest.mark.parametrize("split", ["", "web/train", "../web"])
def test_a_split_name_that_names_no_file_in_the_folder_is_refused_before_encoding(tmp_path, tokenizer, split, tokenize):
    """README has a second corpus tokenized from Python under a split name of the user's; "" wrote `_00000.bin` and
    `_index.json` (a split no mixture names), and a name with a '/' ("web/train", as the corpus's path reads) failed
    once encoded, on a staged file: "No such file or directory: '.../out/.web/train_00000.bin.1a2b3c4d.tmp'".
    tokenize_buckets, which names its splits `{split}_easy` ... before tokenize_corpus checks them, let "" through
    as `_easy` and refused "web/train" only after scoring the whole corpus: it is refused first there too."""
    corpus = write_corpus(tmp_path / "web.jsonl", stdlib_documents(3))
    with pytest.raises(ValueError) as refused:
        tokenize(corpus, tokenizer, tmp_path / "out", split)
    assert str(refused.value) == (
        f"split name {split!r}: a split is named by its files in {tmp_path / 'out'}, {split or 'NAME'}_00000.bin and "
        "its index, as a mixture names it: give a name without '/' (web, code_python)"
    )
    assert not (tmp_path / "out").exists()


def test_windows_are_deterministic_for_a_seed_and_differ_across_seeds(shards):
    first, again, other = (TokenWindows(shards, "train", SEQ_LEN, seed=seed) for seed in (1, 1, 2))
    batches = [first.batch(4) for _ in range(3)]
    assert all(torch.equal(batch, again.batch(4)) for batch in batches)
    assert not torch.equal(torch.cat(batches), torch.cat([other.batch(4) for _ in range(3)]))
    assert batches[0].shape == (4, SEQ_LEN + 1) and batches[0].dtype == torch.long


def test_windows_are_slices_of_the_stream_and_an_epoch_visits_each_once(shards, tokenizer, documents):
    stream = torch.from_numpy(expected_stream(tokenizer, documents).astype(np.int64))
    windows = TokenWindows(shards, "train", SEQ_LEN, seed=0)
    assert windows.num_windows == (len(stream) - 1) // SEQ_LEN
    epoch = windows.batch(windows.num_windows)
    starts = []
    for row in epoch:
        matches = [
            n for n in range(windows.num_windows) if torch.equal(row, stream[n * SEQ_LEN : (n + 1) * SEQ_LEN + 1])
        ]
        starts.append(matches[0])
    assert sorted(starts) == list(range(windows.num_windows))
    assert starts != sorted(starts)


def test_resume_from_state_dict_gives_the_same_next_batches(shards):
    windows = TokenWindows(shards, "train", SEQ_LEN, seed=7)
    for _ in range(5):
        windows.batch(40)
    state = windows.state_dict()
    following = [windows.batch(40) for _ in range(5)]
    assert windows.position > windows.num_windows, "the resumed stretch should cross into the next epoch"
    resumed = TokenWindows(shards, "train", SEQ_LEN, seed=0)
    resumed.load_state_dict(state)
    assert state == {"seed": 7, "position": 200, "windows": windows.num_windows}
    assert all(torch.equal(batch, resumed.batch(40)) for batch in following)


def test_a_position_saved_before_the_split_was_tokenized_again_resumes_with_a_warning_naming_both_counts(
    tmp_path, tokenizer, documents
):
    corpus = write_corpus(tmp_path / "train.jsonl", documents)
    tokenize_corpus(corpus, tokenizer, tmp_path / "tokens", "train")
    windows = TokenWindows(tmp_path / "tokens", "train", SEQ_LEN)
    windows.batch(3)
    state = windows.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenWindows(tmp_path / "tokens", "train", SEQ_LEN).load_state_dict(state)  # the same split: no warning
    tokenize_corpus(write_corpus(corpus, documents[:6]), tokenizer, tmp_path / "tokens", "train")  # a smaller corpus
    shorter = TokenWindows(tmp_path / "tokens", "train", SEQ_LEN)
    counts = f"{windows.num_windows:,} windows of {SEQ_LEN + 1} tokens, and the split holds {shorter.num_windows:,}"
    with pytest.warns(UserWarning, match=f"train_index.json: the saved data position counts {counts} now"):
        shorter.load_state_dict(state)
    assert shorter.position == 3


def test_each_epoch_visits_every_window_in_an_order_of_its_own(shards):
    windows = TokenWindows(shards, "train", SEQ_LEN, seed=5)
    first, second = ([tuple(row.tolist()) for row in windows.batch(windows.num_windows)] for _ in range(2))
    assert sorted(first) == sorted(second) and len(set(first)) == windows.num_windows
    assert first != second


def test_loading_a_state_into_windows_already_serving_continues_from_that_state(shards):
    """A state loaded mid-epoch replaces the seed whose order the windows had drawn, not only the position."""
    expected = TokenWindows(shards, "train", SEQ_LEN, seed=7)
    expected.batch(10)
    windows = TokenWindows(shards, "train", SEQ_LEN, seed=0)
    windows.batch(3)
    windows.load_state_dict(expected.state_dict())
    assert torch.equal(windows.batch(10), expected.batch(10))


def test_a_split_of_exactly_seq_len_plus_one_tokens_is_one_window_across_shards(shards, tokenizer, documents):
    stream = torch.from_numpy(expected_stream(tokenizer, documents).astype(np.int64))
    windows = TokenWindows(shards, "train", len(stream) - 1)
    assert windows.num_windows == 1 and len(windows.shards) > 1
    assert torch.equal(windows.batch(1)[0], stream)


def test_order_does_not_depend_on_batch_size(shards):
    small, large = TokenWindows(shards, "train", SEQ_LEN, seed=3), TokenWindows(shards, "train", SEQ_LEN, seed=3)
    assert torch.equal(torch.cat([small.batch(3), small.batch(5)]), large.batch(8))


def test_sequential_windows_cover_the_stream_in_order_once(shards, tokenizer, documents):
    """Whole windows in batches of 5, and the tokens after the last whole window as one shorter window of their own
    (its targets went unscored)."""
    stream = torch.from_numpy(expected_stream(tokenizer, documents).astype(np.int64))
    windows = TokenWindows(shards, "train", SEQ_LEN)
    *batches, tail = list(windows.sequential(batch_size=5))
    assert (len(stream) - 1) % SEQ_LEN > 0 and tail.shape == (1, (len(stream) - 1) % SEQ_LEN + 1)
    assert [len(batch) for batch in batches[:-1]] == [5] * (len(batches) - 1)
    rows = torch.cat(batches)
    assert len(rows) == windows.num_windows
    targets = torch.cat([row[1:] for row in [*rows, *tail]])
    assert torch.equal(targets, stream[1:])
    assert torch.equal(rows[:, 0], stream[0 : windows.num_windows * SEQ_LEN : SEQ_LEN])
    assert torch.equal(tail[0, 0], stream[windows.num_windows * SEQ_LEN])


def test_a_stream_of_whole_windows_has_no_tail_window(shards, tokenizer, documents):
    stream = torch.from_numpy(expected_stream(tokenizer, documents).astype(np.int64))
    (batch,) = TokenWindows(shards, "train", len(stream) - 1).sequential(batch_size=5)
    assert torch.equal(batch, stream[None])


def test_missing_or_corrupt_index_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="val_index.json"):
        TokenWindows(tmp_path, "val", SEQ_LEN)
    (tmp_path / "val_index.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="val_index.json is corrupt"):
        TokenWindows(tmp_path, "val", SEQ_LEN)


def test_an_index_saved_again_in_another_encoding_is_named(tmp_path, tokenizer, documents):
    """An index re-saved as UTF-16 (Windows PowerShell 5's Out-File, Notepad's "Unicode") raised the bare
    "'utf-8' codec can't decode byte 0xff in position 0", naming no file."""
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train")
    index = tmp_path / "train_index.json"
    index.write_text(index.read_text(encoding="utf-8"), encoding="utf-16")
    with pytest.raises(ValueError, match=r"train_index.json is corrupt \(UnicodeDecodeError.*tokenize the split again"):
        TokenWindows(tmp_path, "train", SEQ_LEN)


@pytest.mark.parametrize("dtype", ["int16", "float32", "int8"])
def test_an_index_of_a_dtype_no_shards_are_written_in_is_refused_naming_the_field(
    tmp_path, tokenizer, documents, dtype
):
    """A hand-edited index's dtype was taken: int16 read the uint16 shards' ids above 32767 as negative numbers, float32
    and int8 were blamed on the shards' sizes ("re-tokenize"), not on the field."""
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train")
    index = tmp_path / "train_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text(encoding="utf-8")), "dtype": dtype}), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        load_index(tmp_path, "train")
    assert str(refused.value) == (
        f"{index} is corrupt: field 'dtype' is {dtype!r}, not one token shards are written in (uint16, uint32); "
        "tokenize the split again"
    )


ANOTHER_VERSION = "this seekstack reads version 1 of the shard index; tokenize the split again with this seekstack"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, f"INDEX: field 'version' is 2, {ANOTHER_VERSION}"),
        ({"version": "1"}, f"INDEX: field 'version' is '1', {ANOTHER_VERSION}"),
        ({"version": None}, f"INDEX: field 'version' is absent, {ANOTHER_VERSION}"),
        (
            {"total_tokens": "FLOAT"},
            "INDEX is corrupt: field 'total_tokens' is TOTAL.0, not a whole number of tokens; tokenize the split again",
        ),
    ],
)
def test_an_index_of_another_version_or_a_count_that_is_no_whole_number_is_refused_naming_the_field(
    tmp_path, tokenizer, documents, change, message
):
    """INDEX_VERSION was written and never read: a version-2 index, or one whose total_tokens read 7218.0 (a float,
    equal to the shards' sum), loaded silently, and the float reached the windows' count (num_windows 520.0)."""
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train")
    index = tmp_path / "train_index.json"
    fields = json.loads(index.read_text(encoding="utf-8"))
    total = fields["total_tokens"]
    fields |= {key: float(total) if value == "FLOAT" else value for key, value in change.items()}
    fields = {key: value for key, value in fields.items() if value is not None}
    index.write_text(json.dumps(fields), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        TokenWindows(tmp_path, "train", SEQ_LEN)
    assert str(refused.value) == message.replace("INDEX", str(index)).replace("TOTAL", str(total))


def test_a_shards_token_count_written_as_text_is_refused_naming_the_field(tmp_path, tokenizer, documents):
    """A shard's "tokens": "12113" (a count as text) was summed first: 'is corrupt (TypeError("unsupported operand
    type(s) for +: 'int' and 'str'"))', naming no field."""
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train")
    index = tmp_path / "train_index.json"
    fields = json.loads(index.read_text(encoding="utf-8"))
    count = fields["shards"][0]["tokens"]
    fields["shards"][0]["tokens"] = str(count)
    index.write_text(json.dumps(fields), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        TokenWindows(tmp_path, "train", SEQ_LEN)
    assert str(refused.value) == (
        f"{index} is corrupt: field 'shards[0].tokens' is '{count}', not a whole number of tokens; tokenize the split "
        "again"
    )


def test_an_index_listing_no_shards_is_refused_saying_to_tokenize_the_split_again(tmp_path, tokenizer, documents):
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train")
    index = tmp_path / "train_index.json"
    fields = json.loads(index.read_text(encoding="utf-8"))
    index.write_text(json.dumps(fields | {"shards": []}), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        load_index(tmp_path, "train")
    assert str(refused.value) == (
        f"{index} is corrupt: shard token counts sum to 0, total_tokens says {fields['total_tokens']}; tokenize the "
        "split again"
    )


@pytest.mark.parametrize("file", [5, None, "../elsewhere/train_00000.bin", "/etc/hostname"])
def test_an_index_naming_a_shard_by_no_file_name_beside_it_is_refused_naming_the_field(
    tmp_path, tokenizer, documents, file
):
    """A shard's file 5 or null (or none) was a bare TypeError ("unsupported operand type(s) for /") or KeyError, and
    '../elsewhere/train_00000.bin' or an absolute path was read as tokens wherever it was, as the checkpoint index's
    weight_map refuses it (read_weight_map): tokenize_corpus writes each shard beside its index."""
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path / "tokens", "train")
    shutil.copytree(tmp_path / "tokens", tmp_path / "elsewhere")
    index = tmp_path / "tokens" / "train_index.json"
    fields = json.loads(index.read_text(encoding="utf-8"))
    fields["shards"][0]["file"] = file
    index.write_text(json.dumps(fields), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        load_index(tmp_path / "tokens", "train")
    assert str(refused.value) == (
        f"{index} is corrupt: field 'shards[0].file' is {file!r}, not the name of a shard file beside it; tokenize "
        "the split again"
    )


def test_missing_or_truncated_shard_is_named(tmp_path, tokenizer, documents):
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train", shard_tokens=1000)
    shard = tmp_path / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_00001.bin has 1998 bytes"):
        TokenWindows(tmp_path, "train", SEQ_LEN)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="train_00001.bin listed in .*train_index.json is missing"):
        TokenWindows(tmp_path, "train", SEQ_LEN)


def test_a_shard_holding_an_id_past_its_tokenizers_is_refused_naming_the_shard_and_the_token(
    tmp_path, tokenizer, documents
):
    """A damaged shard's id past the vocabulary is refused as its window is read, naming the shard and the token,
    which the model's embedding names neither of."""
    tokenize_corpus(write_corpus(tmp_path / "train.jsonl", documents), tokenizer, tmp_path, "train", shard_tokens=1000)
    shard = tmp_path / "train_00001.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[7] = tokenizer.vocab_size  # one past the tokenizer's last id
    ids.tofile(shard)
    windows = TokenWindows(tmp_path, "train", SEQ_LEN)
    damaged = r"train_00001.bin: token 7 is id 1000, past the 1,000 ids of the tokenizer train_index.json records"
    with pytest.raises(ValueError, match=damaged):
        list(windows.sequential(4))
    with pytest.raises(ValueError, match=damaged):
        windows.batch(windows.num_windows)  # an epoch's windows, in training order


def test_tokenizer_mismatch_is_detected(shards, tmp_path):
    other = train_tokenizer(stdlib_documents(5), vocab_size=600, out_path=tmp_path)
    with pytest.raises(ValueError, match="train_index.json was tokenized with another tokenizer"):
        TokenWindows(shards, "train", SEQ_LEN, tokenizer=other)


def test_split_shorter_than_one_window_is_rejected(tmp_path, tokenizer):
    tokenize_corpus(write_corpus(tmp_path / "val.jsonl", ["tiny"]), tokenizer, tmp_path, "val")
    with pytest.raises(ValueError, match="val_index.json holds .* tokens, too few for one window of 65"):
        TokenWindows(tmp_path, "val", SEQ_LEN)


def test_small_corpus_fills_every_difficulty_bucket():
    from seekstack.tokens.difficulty import bucket_parts

    # One document holds most bytes: by bytes alone the easy part would be empty.
    assert bucket_parts([0.1, 0.2, 0.3], [100, 1, 1], 3) == [0, 1, 2]
    assert sorted(set(bucket_parts([0.1, 0.2, 0.3, 0.4, 0.5], [1, 1, 1, 100, 100], 3))) == [0, 1, 2]


def run_tokenize(corpus: Path, tokenizer_dir: Path, out: Path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    args = ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    return CliRunner().invoke(app, [*args, "--buckets"])


def test_tokenize_refuses_a_corpus_without_val_jsonl_before_encoding_its_training_split(
    tmp_path, tokenizer, monkeypatch
):
    """It encoded the whole training split first, then failed 'no corpus file at .../val.jsonl'."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus / "train.jsonl", stdlib_documents(3))

    def encoded(*args, **kwargs):
        raise AssertionError("the training split was encoded")

    monkeypatch.setattr("seekstack.tokens.shards.tokenize_corpus", encoded)
    result = run_tokenize(corpus, Path(tokenizer.source), tmp_path / "tokens")
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and message == (
        f"error: {corpus / 'val.jsonl'}: no such file; `seekstack data build TEXT --out {corpus}` writes it beside "
        "train.jsonl (empty with --val-fraction 0): build the corpus with it, or add an empty val.jsonl to hold no "
        "document out"
    )
    assert not (tmp_path / "tokens").exists()


@pytest.mark.parametrize("documents", ["2 documents", "1 document"])  # "has 1 documents" before
def test_tokenize_buckets_on_too_small_a_corpus_fails_before_writing_anything(tmp_path, tokenizer, documents):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus / "train.jsonl", stdlib_documents(int(documents.split()[0])))
    write_corpus(corpus / "val.jsonl", stdlib_documents(1))
    result = run_tokenize(corpus, Path(tokenizer.source), tmp_path / "tokens")
    assert result.exit_code == 1 and f"has {documents}, too few for 3 difficulty buckets" in result.output
    assert not (tmp_path / "tokens").exists() or not any((tmp_path / "tokens").iterdir())


def test_tokenize_buckets_on_a_three_document_corpus_writes_three_non_empty_buckets(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = stdlib_documents(3)
    write_corpus(corpus / "train.jsonl", [texts[0] * 20, texts[1], texts[2]])
    write_corpus(corpus / "val.jsonl", texts[:1])
    result = run_tokenize(corpus, Path(tokenizer.source), tmp_path / "tokens")
    assert result.exit_code == 0, result.output
    assert [load_index(tmp_path / "tokens", f"train_{b}")["documents"] for b in ("easy", "medium", "hard")] == [1, 1, 1]


def test_tokenize_buckets_cuts_documents_of_equal_difficulty_into_three_equal_buckets(tmp_path, tokenizer):
    from seekstack.tokens.difficulty import compression_ratio

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"Order {1000 + i} shipped to customer {20000 + 3 * i} on day {10 + i}." for i in range(30)]
    assert max(Counter(compression_ratio(text) for text in texts).values()) == 28  # all but two tie
    write_corpus(corpus / "train.jsonl", texts)
    write_corpus(corpus / "val.jsonl", texts[:1])
    result = run_tokenize(corpus, Path(tokenizer.source), tmp_path / "tokens")
    assert result.exit_code == 0, result.output
    buckets = [load_index(tmp_path / "tokens", f"train_{b}") for b in ("easy", "medium", "hard")]
    assert [bucket["documents"] for bucket in buckets] == [10, 10, 10]  # was 30, 0, 0: ties all went to easy
    assert [bucket["text_bytes"] for bucket in buckets] == [10 * len(texts[0].encode())] * 3


def test_retokenizing_replaces_every_split_together_or_leaves_the_folder_as_it_was(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from seekstack.cli import app

    texts = stdlib_documents(4)
    first, second, broken = (tmp_path / name for name in ("first", "second", "broken"))
    for corpus, train in ((first, [texts[0] * 20, texts[1], texts[2]]), (second, texts[1:3]), (broken, texts[:2])):
        corpus.mkdir()
        write_corpus(corpus / "train.jsonl", train)
        write_corpus(corpus / "val.jsonl", texts[3:])
    (broken / "val.jsonl").write_text('{"text": 5}\n')
    out = tmp_path / "tokens"
    assert run_tokenize(first, Path(tokenizer.source), out).exit_code == 0  # with the difficulty buckets

    def tokenize(corpus: Path):  # without them
        args = ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", tokenizer.source, "--out", str(out)]
        return CliRunner().invoke(app, args)

    failed = tokenize(broken)  # its train split is written before val fails: none of it reaches the folder
    assert failed.exit_code == 1 and "val.jsonl:1" in failed.output
    assert {load_index(out, split)["source"] for split in ("train", "val", "train_easy")} == {
        str(first / "train.jsonl"),
        str(first / "val.jsonl"),
    }
    assert tokenize(second).exit_code == 0
    assert sorted(path.name for path in out.glob("*_index.json")) == ["train_index.json", "val_index.json"]
    assert load_index(out, "train")["source"] == str(second / "train.jsonl")  # no bucket of `first` is left
    (out / "notes.txt").write_text("mine")
    refused = tokenize(second)
    assert refused.exit_code == 1 and "holds notes.txt besides the files this command writes" in refused.output
    assert (out / "notes.txt").read_text() == "mine"


def test_tokenizer_train_says_when_the_corpus_cannot_fill_the_vocabulary(tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus / "train.jsonl", ["abc abd abe " * 20])
    args = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "4096", "--out", str(tmp_path / "tok")]
    result = CliRunner().invoke(app, args)
    vocab = Tokenizer.from_file(tmp_path / "tok").vocab_size
    assert result.exit_code == 0 and vocab < 300
    assert f"the corpus yields only {vocab} of the 4096 tokens asked for" in result.output
    assert f"model.vocab_size={vocab}" in result.output
    ranks = {rank: CliRunner().invoke(app, args, env={"WORLD_SIZE": "2", "RANK": rank}) for rank in ("0", "1")}
    assert ranks["0"].stderr.startswith(f"warning: the corpus yields only {vocab} of the 4096 tokens asked for")
    assert ranks["1"].stderr == ""  # under torchrun rank 0 alone warns, as every command's warnings (cli.common.warn)
    (corpus / "train.jsonl").write_text('{"text": "fine"}\n{"txt": "a typo"}\n')
    typo = CliRunner().invoke(app, args)
    assert typo.exit_code == 1 and "train.jsonl:2: no field 'text'" in typo.output  # was a KeyError traceback


def test_a_data_folder_that_does_not_exist_is_named_as_missing_with_its_resolved_path(tmp_path, monkeypatch):
    """A mistyped data folder (or a moved run's relative data_dir) was told to tokenize split 'train' first."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"no folder of token shards at {tmp_path / 'nothere'}: "):
        load_index("nothere", "train")


def test_data_tokenize_takes_a_runs_out_dir_for_its_newest_checkpoints_tokenizer(tmp_path, tokenizer):
    """--tokenizer RUN (a run's out_dir, as generate, sample and lora take one) was told "RUN/tokenizer.json: no such
    file; train a tokenizer into RUN", and RUN/train_config.json "a whole tokenizer.json that tokenizers cannot
    read"."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    for name in ("train_state.pt", "config.json", "model.safetensors"):  # what a complete checkpoint holds
        (checkpoint / name).write_bytes(b"")
    shutil.copy(tokenizer.source, checkpoint / "tokenizer.json")
    (tmp_path / "run" / "train_config.json").write_text("{}")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus / "train.jsonl", stdlib_documents(2))
    write_corpus(corpus / "val.jsonl", stdlib_documents(1))
    for given in ("run", "run/train_config.json"):
        args = ["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tmp_path / given)]
        tokenized = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "tokens")])
        assert tokenized.exit_code == 0, tokenized.output
        assert f"using the run's newest checkpoint, {checkpoint}" in tokenized.stderr
        assert load_index(tmp_path / "tokens", "train")["tokenizer"]["sha256"] == tokenizer.fingerprint


def test_a_data_folder_without_shards_names_the_command_that_writes_them(tmp_path):
    """A folder holding no shards (`seekstack train data_dir=empty`) was told "tokenize split 'train' first", which
    names no command; a folder holding some is told which, as before."""
    with pytest.raises(FileNotFoundError) as refused:
        load_index(tmp_path, "train")
    assert str(refused.value) == (
        f"no shard index at {tmp_path / 'train_index.json'}: tokenize split 'train' first; `seekstack data tokenize "
        f"--corpus CORPUS --tokenizer TOKENIZER --out {tmp_path}` writes train and val"
    )
    (tmp_path / "val_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"'train' first \({tmp_path} holds val\)$"):
        load_index(tmp_path, "train")


def test_tokenize_corpus_and_difficulty_buckets_name_what_to_give_for_a_folder_or_a_missing_file(tmp_path, tokenizer):
    """README's tokenize_corpus("web/train.jsonl", ...) given the folder `data build` wrote, or a path that holds
    nothing, said "no corpus file at web: run the corpus stage first", a stage no command is named after."""
    corpus = tmp_path / "web"
    corpus.mkdir()
    for read in (lambda path: tokenize_corpus(path, tokenizer, tmp_path / "tokens", "web"), difficulty_buckets):
        with pytest.raises(IsADirectoryError) as refused:
            read(corpus)
        assert str(refused.value) == (
            f"{corpus}: is a folder; give the JSON Lines file of one of its splits, {corpus / 'train.jsonl'} or "
            f"{corpus / 'val.jsonl'}"
        )
        with pytest.raises(FileNotFoundError) as refused:
            read(corpus / "train.jsonl")
        assert str(refused.value) == (
            f"{corpus / 'train.jsonl'}: no such file; `seekstack data build TEXT --out {corpus}` writes a corpus's "
            "train.jsonl and val.jsonl"
        )
    assert not (tmp_path / "tokens").exists()
