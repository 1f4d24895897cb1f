"""Specifications of the curriculum data: difficulty scores and buckets, the mixture schedule and its sampler."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest

from seekstack.tokenizer import train_tokenizer
from seekstack.tokens.difficulty import bucket_parts, compression_ratio, tokenize_buckets
from seekstack.tokens.mixture import MixtureSchedule, MixtureWindows, pick
from seekstack.tokens.shards import TokenWindows, load_index, tokenize_corpus

CURRICULUM = {"easy": [0.7, 0.2, 0.1], "medium": [0.2, 0.5, 0.3], "hard": [0.1, 0.3, 0.6]}
SOURCE_IDS = {"easy": 100, "medium": 200, "hard": 300}  # every token of a source's split is its id + 0..9
SEQ_LEN = 16


def write_constant_split(data_dir: Path, split: str, first_id: int, tokens: int = 4000) -> None:
    """A shard whose tokens all lie in [first_id, first_id + 10), so each window tells which split it came from."""
    ids = first_id + np.arange(tokens) % 10
    ids.astype("<u2").tofile(data_dir / f"{split}_00000.bin")
    index = {
        "version": 1, "split": split, "source": "synthetic", "dtype": "uint16",
        "shards": [{"file": f"{split}_00000.bin", "tokens": tokens}], "documents": 1, "total_tokens": tokens,
        "text_bytes": tokens, "bos": False, "tokenizer": {"vocab_size": 512, "sha256": "synthetic"},
    }  # fmt: skip
    (data_dir / f"{split}_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixture")
    for split, first_id in SOURCE_IDS.items():
        write_constant_split(path, split, first_id)
    return path


def sources_of(batch) -> list[str]:
    by_id = {first_id: name for name, first_id in SOURCE_IDS.items()}
    return [by_id[int(row[0]) // 100 * 100] for row in batch]


# ---------------------------------------------------------------------------------- difficulty
def test_compression_ratio_ranks_repetitive_text_easier_than_dense_text():
    rng = random.Random(0)
    repetitive = "x = 1\n" * 500
    prose = " ".join(rng.choice(["the", "model", "reads", "a", "token", "and", "then", "writes"]) for _ in range(500))
    dense = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(3000))
    assert compression_ratio(repetitive) < compression_ratio(prose) < compression_ratio(dense)
    assert compression_ratio(repetitive) < 0.05 and compression_ratio(dense) > 0.7


def test_compression_ratio_scores_the_opening_of_a_document_harder_than_the_whole_of_it():
    """The ratio is per byte, but zlib's empty window and once-paid codes weigh on a short text: the same module's
    first 1,000 characters score more than twice its whole 58 KB, as README says of the buckets (long to short)."""
    rng = random.Random(0)
    words = ["model", "token", "reads", "writes", "cache", "layer", "expert", "router", "batch", "shard", "split"]
    module = "".join(
        f"def {rng.choice(words)}_{rng.choice(words)}(self, {rng.choice(words)}):\n"
        f"    return self.{rng.choice(words)} + {rng.randrange(100)}\n"
        for _ in range(1000)
    )
    opening, whole = compression_ratio(module[:1000]), compression_ratio(module)
    assert opening > 2 * whole and compression_ratio(module[:5000]) > whole


def test_bucket_parts_give_each_bucket_an_equal_share_of_bytes():
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2]
    assert bucket_parts(scores, [1] * 6, 3) == [2, 0, 1, 1, 2, 0]  # two documents per bucket
    assert bucket_parts(scores, [10, 1, 1, 1, 1, 1], 2) == [1, 0, 0, 0, 0, 0]  # the 10-byte document: the top half


def test_documents_of_equal_score_are_cut_in_document_order_into_equal_parts():
    assert bucket_parts([0.5] * 6, [1] * 6, 3) == [0, 0, 1, 1, 2, 2]
    assert bucket_parts([0.9, 0.5, 0.5, 0.5, 0.5, 0.1], [1] * 6, 3) == [2, 0, 1, 1, 2, 0]


def test_tokenize_buckets_partitions_the_split_from_easy_to_hard(tmp_path):
    rng = random.Random(1)
    texts = [("def f():\n    return 1\n" * rng.randint(5, 40)) for _ in range(6)]
    texts += [
        "".join(rng.choice(string.ascii_lowercase + " \n") for _ in range(rng.randint(200, 900))) for _ in range(6)
    ]
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    tokenizer = train_tokenizer(texts, vocab_size=300, out_path=tmp_path / "tokenizer")
    whole = tokenize_corpus(corpus, tokenizer, tmp_path / "tokens", "train")
    easy, medium, hard = tokenize_buckets(corpus, tokenizer, tmp_path / "tokens", "train")
    assert easy["documents"] + medium["documents"] + hard["documents"] == whole["documents"] == 12
    assert easy["total_tokens"] + medium["total_tokens"] + hard["total_tokens"] == whole["total_tokens"]
    assert easy["text_bytes"] + medium["text_bytes"] + hard["text_bytes"] == whole["text_bytes"]
    scores = [
        (part["difficulty"]["lowest_score"], part["difficulty"]["highest_score"]) for part in (easy, medium, hard)
    ]
    assert scores[0][1] <= scores[1][0] <= scores[1][1] <= scores[2][0]  # each bucket's scores from easy to hard
    assert load_index(tmp_path / "tokens", "train_hard")["tokenizer"]["path"] == str(Path(tokenizer.source).resolve())


# ---------------------------------------------------------------------------------- schedule
def test_schedule_changes_the_mix_at_each_third_of_training():
    schedule = MixtureSchedule(CURRICULUM)
    assert schedule.weights_at(0.0) == pytest.approx({"easy": 0.7, "medium": 0.2, "hard": 0.1})
    assert schedule.weights_at(0.33) == pytest.approx({"easy": 0.7, "medium": 0.2, "hard": 0.1})
    assert schedule.weights_at(0.34) == pytest.approx({"easy": 0.2, "medium": 0.5, "hard": 0.3})
    assert schedule.weights_at(0.67) == pytest.approx({"easy": 0.1, "medium": 0.3, "hard": 0.6})
    assert schedule.weights_at(1.0) == pytest.approx({"easy": 0.1, "medium": 0.3, "hard": 0.6})
    constant = MixtureSchedule({"code": 3, "prose": [1.0]})  # one number = every phase; weights are normalised
    assert constant.weights_at(0.9) == {"code": 0.75, "prose": 0.25}


def test_numpy_weights_are_taken_as_the_numbers_they_hold():
    """MixtureSchedule({"a": np.int64(1), "b": 1}) was refused: "has weights [1]; they must be numbers >= 0"."""
    schedule = MixtureSchedule({"a": np.int64(3), "b": [np.float32(1.0)], "c": 0})
    assert schedule.weights == {"a": [3], "b": [1.0], "c": [0]}
    assert schedule.weights_at(0.5) == {"a": 0.75, "b": 0.25, "c": 0.0}
    with pytest.raises(ValueError, match=r"'a' has weights \[True\]"):  # numpy's bool is no weight either
        MixtureSchedule({"a": np.bool_(True)})


def test_weights_near_floats_limit_keep_their_ratios_though_their_sum_overflows():
    """1e308 + 1e308 is inf: each weight divided by it was 0.0, so `pick` drew the last source every time."""
    huge = MixtureSchedule({"a": 1e308, "b": 1e308, "c": [0.0]})
    assert huge.weights_at(0.5) == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert [pick(huge.weights_at(0.5), uniform) for uniform in (0.1, 0.7)] == ["a", "b"]
    assert MixtureSchedule({"a": 1.5e308, "b": 0.5e308}).weights_at(0.0) == pytest.approx({"a": 0.75, "b": 0.25})


def test_a_uniform_draw_on_a_share_boundary_picks_the_next_source_never_one_of_weight_zero():
    """Each source owns [its start, its end) of [0, 1): a draw at a boundary belongs to the source that starts there."""
    weights = {"off_first": 0.0, "easy": 0.25, "off_between": 0.0, "hard": 0.75}
    assert [pick(weights, uniform) for uniform in (0.0, 0.2, 0.25, 0.9)] == ["easy", "easy", "hard", "hard"]


def test_schedule_errors_name_the_source():
    with pytest.raises(ValueError, match="'hard' has 2 weights; give 1 or 3"):
        MixtureSchedule({"easy": [1, 1, 1], "hard": [1, 1]})
    with pytest.raises(ValueError, match=r"'easy' has weights \[-1\]"):
        MixtureSchedule({"easy": -1})
    with pytest.raises(ValueError, match=r"'easy' has weights \[True, 1\]"):  # YAML's `true` is no weight
        MixtureSchedule({"easy": [True, 1], "hard": [1, 1]})
    with pytest.raises(ValueError, match="phase 2 of 2 has no source with a positive weight"):
        MixtureSchedule({"easy": [1, 0], "hard": [1, 0]})


# ---------------------------------------------------------------------------------- sampler
def test_mixture_draws_each_source_with_its_scheduled_probability(data_dir):
    mixture = MixtureWindows(data_dir, MixtureSchedule(CURRICULUM), SEQ_LEN, seed=3)
    early = sources_of(mixture.batch(2000, progress=0.0))
    late = sources_of(mixture.batch(2000, progress=0.9))
    assert early.count("easy") / 2000 == pytest.approx(0.7, abs=0.03)
    assert early.count("hard") / 2000 == pytest.approx(0.1, abs=0.03)
    assert late.count("hard") / 2000 == pytest.approx(0.6, abs=0.03)


def test_mixture_is_fixed_by_the_seed_and_not_by_the_batch_size(data_dir):
    def rows(seed: int, batch_sizes: list[int]) -> np.ndarray:
        mixture = MixtureWindows(data_dir, MixtureSchedule(CURRICULUM), SEQ_LEN, seed=seed)
        return np.concatenate([mixture.batch(size, progress=0.5).numpy() for size in batch_sizes])

    assert np.array_equal(rows(0, [8, 8, 8]), rows(0, [24]))
    assert np.array_equal(rows(0, [5, 19]), rows(0, [24]))
    assert not np.array_equal(rows(1, [24]), rows(0, [24]))


def test_mixture_resumes_exactly_from_its_state(data_dir):
    whole = MixtureWindows(data_dir, MixtureSchedule(CURRICULUM), SEQ_LEN, seed=7)
    whole.batch(30, progress=0.1)
    state = json.loads(json.dumps(whole.state_dict()))  # it must survive serialisation
    expected = whole.batch(30, progress=0.5)
    resumed = MixtureWindows(data_dir, MixtureSchedule(CURRICULUM), SEQ_LEN, seed=0)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.batch(30, progress=0.5).numpy(), expected.numpy())


def test_a_source_a_resumed_mixture_adds_starts_at_its_first_window_and_the_others_continue(data_dir):
    """A run resumed with a new `mixture` (a last phase on other data): the source it trained on goes on where it
    was, the added one starts as a source that served no row."""
    before = MixtureWindows(data_dir, MixtureSchedule({"easy": 1}), SEQ_LEN, seed=7)
    before.batch(30, progress=0.1)
    state = json.loads(json.dumps(before.state_dict()))
    easy_next = before.batch(60, progress=0.5).numpy()
    hard_first = MixtureWindows(data_dir, MixtureSchedule({"hard": 1}), SEQ_LEN, seed=7).batch(60, 0.0).numpy()
    resumed = MixtureWindows(data_dir, MixtureSchedule({"easy": 1, "hard": 1}), SEQ_LEN, seed=7)
    resumed.load_state_dict(state)
    rows = resumed.batch(60, progress=0.5).numpy()
    drawn = np.array(sources_of(rows))
    easy, hard = rows[drawn == "easy"], rows[drawn == "hard"]
    assert len(easy) > 10 and len(hard) > 10
    assert np.array_equal(easy, easy_next[: len(easy)])
    assert np.array_equal(hard, hard_first[: len(hard)])


def test_a_source_a_resumed_mixture_leaves_out_goes_on_where_it_was_when_a_later_resume_brings_it_back(data_dir):
    """Stages {easy, hard}, then {easy}, then {easy, hard} again: the third stage's hard windows follow the first's,
    as MosaicML streaming keeps each stream's place; none is served twice in the epoch."""
    first = MixtureWindows(data_dir, MixtureSchedule({"easy": 1, "hard": 1}), SEQ_LEN, seed=7)
    first.batch(60, progress=0.0)
    hard = TokenWindows(data_dir, "hard", SEQ_LEN, seed=7)
    hard.load_state_dict(first.sources["hard"].state_dict())
    hard_next = hard.batch(60).numpy()
    second = MixtureWindows(data_dir, MixtureSchedule({"easy": 1}), SEQ_LEN, seed=7)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    second.batch(30, progress=0.5)
    third = MixtureWindows(data_dir, MixtureSchedule({"easy": 1, "hard": 1}), SEQ_LEN, seed=7)
    third.load_state_dict(json.loads(json.dumps(second.state_dict())))
    rows = third.batch(60, progress=0.9).numpy()
    hard_rows = rows[np.array(sources_of(rows)) == "hard"]
    assert len(hard_rows) > 10
    assert np.array_equal(hard_rows, hard_next[: len(hard_rows)])
    assert third.sources["hard"].position == first.sources["hard"].position + len(hard_rows)


def test_mixture_refuses_sources_tokenized_differently(data_dir, tmp_path):
    write_constant_split(tmp_path, "easy", 100)
    index = json.loads((tmp_path / "easy_index.json").read_text())
    index["tokenizer"]["sha256"] = "another"
    (tmp_path / "easy_index.json").write_text(json.dumps(index))
    write_constant_split(tmp_path, "hard", 300)
    with pytest.raises(ValueError, match="different tokenizers"):
        MixtureWindows(tmp_path, MixtureSchedule({"easy": 1, "hard": 1}), SEQ_LEN)


def test_a_misspelt_mixture_source_is_named_with_the_splits_the_data_folder_holds(data_dir):
    with pytest.raises(
        FileNotFoundError, match=r"hrad_index\.json: tokenize split 'hrad' first \(.* holds easy, hard, medium\)"
    ):
        MixtureWindows(data_dir, MixtureSchedule({"easy": 1, "hrad": 1}), SEQ_LEN)


def test_a_curriculum_of_buckets_not_tokenized_says_that_data_tokenize_buckets_writes_them(tmp_path):
    """README's curriculum run on shards tokenized without --buckets was told "tokenize split 'train_easy' first",
    which no command does by that name: `data tokenize` writes train and val, and the buckets only with --buckets."""
    write_constant_split(tmp_path, "train", 300)
    write_constant_split(tmp_path, "val", 100)
    with pytest.raises(FileNotFoundError) as error:
        MixtureWindows(tmp_path, MixtureSchedule({"train_easy": [0.7, 0.3], "train_hard": [0.3, 0.7]}), SEQ_LEN)
    assert str(error.value) == (
        f"no shard index at {tmp_path / 'train_easy_index.json'}: split 'train_easy' is a difficulty bucket of train, "
        f"which `seekstack data tokenize --buckets` writes ({tmp_path} holds train, val)"
    )


@pytest.mark.parametrize("weight", [float("inf"), 1e400, float("nan")])
def test_an_infinite_or_nan_weight_is_refused_as_no_finite_number(weight):
    """`mixture={train: 1e400}` (YAML's inf) was refused as "has weights [inf]; they must be numbers >= 0", which inf
    is."""
    with pytest.raises(ValueError, match=r"has weights \[(inf|nan)\]; they must be finite numbers >= 0"):
        MixtureSchedule({"train": weight})
