"""A long document is encoded in pieces, cut where the ids of the pieces are the ids of the whole document."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import trainers
from tokenizers.pre_tokenizers import ByteLevel

from seekstack import tokenizer as tokenizer_module
from seekstack.tokenizer import EOS, SPECIAL_TOKENS, TOOL_TOKENS, USER, Tokenizer, document_pieces, train_tokenizer

# DeepSeek-V3's pre-tokenizer, as its release's tokenizer.json writes it: digits in threes, CJK runs, then its pattern
DEEPSEEK_V3_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[一-龥぀-ゟ゠-ヿ]+"}, "behavior": "Isolated", "invert": False},
        {
            "type": "Split",
            "pattern": {
                "Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|"
                "[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
# Stretches a document is built of, each an edge of the cut: whitespace runs after a letter, CRLF, digits, CJK, emoji,
# combining marks, contractions, punctuation, a quoted special token, a line with no newline, base64, minified code,
# CJK and full-width punctuation, kana and the symbols in its range (which DeepSeek-V3 isolates in a run of CJK)
STRETCHES = (
    "word", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "12345", " 678", "中文", "日本語", "😀", "❤️", "e\u0301",
    "नमस्ते", "'s", "'ll", ".", "!?", EOS, USER, "\u3000", "x", " y", "\u00a0", "\x1c", "ab\r\n\r\n  cd",
    "aGVsbG8+d29y/bGQ=", "f(a){return a.b+1};", "。", "，", "「", "カタカナ", "・", "゠", "ー", "ひらがな゛",
)  # fmt: skip


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Tokenizer:
    texts = ["".join(random.Random(seed).choices(STRETCHES, k=400)) for seed in range(20)]
    return train_tokenizer(texts, vocab_size=400, out_path=tmp_path_factory.mktemp("tokenizer"), split_digits=3)


def with_pre_tokenizer(tokenizer: Tokenizer, pre_tokenizer: dict | None) -> Tokenizer:
    """`tokenizer`'s vocabulary and merges behind another pre-tokenizer."""
    layout = json.loads(tokenizer.backend.to_str())
    layout["pre_tokenizer"] = pre_tokenizer
    return Tokenizer(BackendTokenizer.from_str(json.dumps(layout)))


def document(seed: int, stretches: int = 300) -> str:
    return "".join(random.Random(seed).choices(STRETCHES, k=stretches))


@pytest.fixture(scope="module")
def deepseek_v3(ours) -> Tokenizer:
    """A BPE trained behind DeepSeek-V3's pre-tokenizer, so its merges are those of what that one keeps together."""
    backend = with_pre_tokenizer(ours, DEEPSEEK_V3_PRE_TOKENIZER).backend
    texts = [document(seed, stretches=400) for seed in range(20)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[*SPECIAL_TOKENS, *TOOL_TOKENS], initial_alphabet=ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


@pytest.mark.parametrize("pre_tokenizer", ["ours", "deepseek_v3"])
def test_a_document_encoded_in_pieces_has_the_ids_of_the_whole(request, pre_tokenizer):
    tokenizer = request.getfixturevalue(pre_tokenizer)
    assert tokenizer.cuts_keep_ids
    documents = [document(seed) for seed in range(30)]
    whole = tokenizer.encode_batch(documents, add_bos=True, piece_chars=10**9)
    assert tokenizer.encode_batch(documents, add_bos=True, piece_chars=3) == whole
    assert all(len(document_pieces(text, 3)) > 20 for text in documents)  # cut, and often


def test_a_long_document_reaches_the_tokenizer_in_pieces(ours):
    """A 20 MB document went to tokenizers whole: 3.7 GB at its peak while encoding."""
    text = "The model reads\r\nwords, 12345 digits and 中文 text. " * 40

    class Recording:
        def __init__(self, backend: BackendTokenizer):
            self.backend, self.lengths = backend, []

        def __getattr__(self, name: str):
            return getattr(self.backend, name)

        def encode_batch_fast(self, texts: list[str], add_special_tokens: bool):
            self.lengths += [len(text) for text in texts]
            return self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    whole = ours.encode(text)
    ours.cuts_keep_ids  # noqa: B018  (asked of the real backend, before the recording one stands in)
    recording = ours.__dict__["_corpus_backend"] = Recording(ours._corpus_backend)
    try:
        assert ours.encode_batch([text, "short"], piece_chars=100) == [whole, ours.encode("short")]
    finally:
        del ours.__dict__["_corpus_backend"]
    assert (
        sum(recording.lengths) == len(text) + len("short") and max(recording.lengths) <= 100 + 30
    )  # a letter before a space in 30
    assert len(recording.lengths) > 15


def test_a_document_is_cut_after_a_letter_that_no_letter_or_mark_follows():
    """A document with no letter before whitespace (unbroken base64, minified code, CJK prose) went whole to the
    tokenizer: 185 bytes a character while it encodes."""
    assert document_pieces("ab cd", 1) == ["ab", " cd"]  # the first such letter past the piece's length
    assert document_pieces("aGVsbG8+d29y/bGQ=", 4) == ["aGVsbG", "8+d29y", "/bGQ="]
    assert document_pieces("f(a){return a.b};", 3) == ["f(a){return", " a.b", "};"]
    assert document_pieces("中文。日本語，了", 1) == ["中文", "。日本語", "，了"]
    assert document_pieces("e\u0301x y", 1) == ["e\u0301x", " y"]  # not between a letter and its mark
    assert document_pieces("カナ・カナ ok", 1) == ["カナ", "・カナ", " ok"]


def test_a_document_is_cut_only_where_tokenizers_own_regex_engine_ends_a_run_of_letters(ours):
    """The regex module's Unicode is newer than Oniguruma's, tokenizers' regex engine: 1,518 code points (Unicode 17's
    Tangut supplement among them) are letters to it and symbols to Oniguruma, so a cut after one before "!" split a
    run of symbols the whole document keeps together. Each cut must be a boundary of the whole's pre-tokens."""
    text = "\U00018d1e!" * 40 + "ab, cd!" + "\U00018d1e!" * 40
    pieces = document_pieces(text, 1)
    cuts = set(itertools.accumulate(len(piece) for piece in pieces[:-1]))
    boundaries = {end for _, (_, end) in ours.backend.pre_tokenizer.pre_tokenize_str(text)}
    assert "".join(pieces) == text and len(pieces) > 1 and cuts <= boundaries


def test_a_lone_surrogate_after_a_letter_is_refused_naming_its_document(ours):
    """A cut is confirmed by tokenizers' own engine, which takes no lone surrogate: one after a letter raised
    UnicodeEncodeError, where the encoding names the document that holds it."""
    with pytest.raises(ValueError, match=r"document 2 of the 2 given .*'\\ud800'"):
        ours.encode_batch(["ok", "ab\ud800cd ef"], piece_chars=1)


def test_a_document_with_no_letter_that_a_non_letter_follows_stays_whole():
    for text in ["中文日本語" * 50, "1 2 3 4 5 " * 50, "x" * 500, ". " * 250]:
        assert document_pieces(text, 10) == [text]


def test_a_tokenizer_whose_pieces_could_encode_otherwise_is_never_cut(ours):
    """With no pre-tokenizer BPE merges across any cut; a Metaspace one writes "▁" at each piece's start."""
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    text = document(0)
    for pre_tokenizer in (None, metaspace):
        tokenizer = with_pre_tokenizer(ours, pre_tokenizer)
        assert not tokenizer.cuts_keep_ids
        assert tokenizer.encode_batch([text], piece_chars=3) == tokenizer.encode_batch([text], piece_chars=10**9)


def test_a_tokenizer_that_keeps_a_contraction_with_the_word_before_it_is_never_cut(ours):
    """GPT-4o's pattern (o200k, as transformers converts it) keeps "ok's" one pre-token, which a cut after the letter
    before "'s" would split: only CUT_PROBES' contraction finds it, as every other probe splits alike."""
    gpt_4o_pattern = (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
        r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    split = {"type": "Split", "pattern": {"Regex": gpt_4o_pattern}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    backend = with_pre_tokenizer(ours, {"type": "Sequence", "pretokenizers": [split, byte_level]}).backend
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["it's ok's. " * 50], trainer=trainer)  # "ok's" a token of its own
    tokenizer, text = Tokenizer(backend), "it's ok's. " * 20
    assert not tokenizer.cuts_keep_ids
    assert tokenizer.encode_batch([text], piece_chars=1) == tokenizer.encode_batch([text], piece_chars=10**9)


def test_a_tokenizer_trained_on_long_texts_reads_them_in_pieces_and_learns_the_same_merges(tmp_path, monkeypatch):
    """The BPE trainer pre-tokenized each text whole: 2.1 GB at its peak for a 20 MB text."""
    texts = [document(seed, stretches=2000) for seed in range(3)]
    whole = train_tokenizer(texts, vocab_size=400, out_path=tmp_path / "whole", split_digits=3)
    cut, read = tokenizer_module.document_pieces, []

    def recorded_pieces(text: str, piece_chars: int, capped_pre_tokenizer) -> list[str]:
        read.extend(cut(text, piece_chars, capped_pre_tokenizer))
        return read[len(read) - len(cut(text, piece_chars, capped_pre_tokenizer)) :]

    monkeypatch.setattr(tokenizer_module, "DOCUMENT_PIECE_CHARS", 50)
    monkeypatch.setattr(tokenizer_module, "document_pieces", recorded_pieces)
    pieced = train_tokenizer([texts[0], texts[1:]], vocab_size=400, out_path=tmp_path / "pieces", split_digits=3)
    assert pieced.backend.to_str() == whole.backend.to_str()
    assert "".join(read) == "".join(texts) and len(read) > 100 and max(map(len, read)) < 500


def test_a_capped_pre_tokenizer_is_told_apart_building_one_layout_not_one_per_split_digits(ours, monkeypatch):
    """Each Tokenizer built the layouts of all 257 capped patterns (split_digits None, 1 to 256) to compare its own
    with (34 ms on the demo's uncapped tokenizer); it builds the one its pattern names, and none for another."""
    built = []
    split = tokenizer_module.byte_level_split
    monkeypatch.setattr(tokenizer_module, "byte_level_split", lambda pattern: built.append(pattern) or split(pattern))
    longest_digits = json.loads(split(tokenizer_module.pre_tokenizer_pattern(256)).__getstate__())
    assert with_pre_tokenizer(ours, longest_digits).capped_pre_tokenizer is not None
    assert built == [tokenizer_module.pre_tokenizer_pattern(256)]
    assert with_pre_tokenizer(ours, DEEPSEEK_V3_PRE_TOKENIZER).capped_pre_tokenizer is None
    split_alone = {**longest_digits, "pretokenizers": longest_digits["pretokenizers"][:1]}  # no byte-level step
    assert with_pre_tokenizer(ours, split_alone).capped_pre_tokenizer is None
    assert with_pre_tokenizer(ours, longest_digits["pretokenizers"][1]).capped_pre_tokenizer is None
    assert len(built) == 2


class ReadLengths:
    """A pre-tokenizer that notes the length of each text it is given, then pre-tokenizes it."""

    def __init__(self, pre_tokenizer):
        self.pre_tokenizer, self.lengths = pre_tokenizer, []

    def pre_tokenize_str(self, text: str):
        self.lengths.append(len(text))
        return self.pre_tokenizer.pre_tokenize_str(text)


def test_a_cut_inside_a_run_of_letters_reads_the_piece_once_and_its_last_pre_tokens_again():
    """The cut's check pre-tokenized the whole piece before it a second time (2 x 4,000 characters here); only the
    pre-tokens that start within MATCH_SPAN of the cut can read otherwise, so those alone are read again. A cut where
    the piece alone pre-tokenizes otherwise is still refused: " " then "\t" before "b" in the whole, " \t" alone."""
    capped = tokenizer_module.byte_level_split(tokenizer_module.pre_tokenizer_pattern())
    span, piece_chars = tokenizer_module.MATCH_SPAN, 4000
    read = ReadLengths(capped)
    text = "x" * (piece_chars - 1) + " \tb" + "y" * 3000
    assert tokenizer_module._pre_token_cut(text, 0, piece_chars, read) == piece_chars
    window = piece_chars + 2 * span
    assert read.lengths[0] == window and sum(read.lengths[1:]) <= span
    assert tokenizer_module._pre_token_cut(text[1:], 0, piece_chars, capped) is None
    assert capped.pre_tokenize_str(text[1 : piece_chars + 1])[-1][1] == (piece_chars - 2, piece_chars)  # " \t"


def test_an_unbroken_run_of_letters_is_cut_where_a_capped_pattern_ends_its_pre_tokens(ours):
    """A run of letters and nothing else, no LETTER_END in it, went to tokenizers whole (400k CJK characters: 74 MB,
    50 MB of them 9 GB); our pattern cuts it every LONGEST_PRE_TOKEN characters from its start (after a space or a
    contraction), so a piece ends there. A tokenizer that keeps runs whole (DeepSeek-V3's) is never cut inside one."""
    texts = ["中" * 3000, " " + "ab" * 1500, "x's" + "s" * 3000 + "!" + "e\u0301" * 1500]
    assert ours.capped_pre_tokenizer is not None
    assert ours.encode_batch(texts, piece_chars=300) == ours.encode_batch(texts, piece_chars=10**9)
    assert all(len(document_pieces(text, 300, ours.capped_pre_tokenizer)) >= 5 for text in texts)
    uncapped = with_pre_tokenizer(ours, DEEPSEEK_V3_PRE_TOKENIZER)
    assert uncapped.capped_pre_tokenizer is None and uncapped.cuts_keep_ids
    assert uncapped.encode_batch(texts, piece_chars=300) == uncapped.encode_batch(texts, piece_chars=10**9)
