"""Specification of the per-token byte counts bits per byte sums over the targets a model scores."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as BackendTokenizer

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from seekstack.tokens.shards import index_path, tokenize_corpus
from seekstack.tokens.token_bytes import scored_text_bytes, split_byte_lengths, token_byte_lengths

TEXT = "naïve café 👩‍👩‍👧 猫坐在垫子上 plain ascii"


def test_token_bytes_sum_to_the_utf8_bytes_of_the_text_and_special_tokens_count_none(tmp_path):
    tokenizer = train_tokenizer([TEXT * 5], vocab_size=280, out_path=tmp_path)
    byte_lengths = token_byte_lengths(tokenizer)
    assert byte_lengths.shape == (tokenizer.vocab_size,)
    assert [byte_lengths[tokenizer.backend.token_to_id(token)].item() for token in SPECIAL_TOKENS] == [0] * 5
    ids = tokenizer.encode(TEXT)
    assert int(byte_lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    first_byte_of_e_acute = tokenizer.backend.token_to_id("Ã")  # byte-level BPE's stand-in for 0xC3
    assert byte_lengths[first_byte_of_e_acute] == 1  # part of a character counts its own bytes
    assert token_byte_lengths(tokenizer) is byte_lengths  # built once per tokenizer


def test_an_added_token_counts_the_utf8_bytes_of_its_text_even_where_it_reads_as_byte_level_characters(tmp_path):
    # "é" and "°" are also byte-level BPE's stand-ins for single bytes: read as a piece, "café" would count 4, not 5
    backend = train_tokenizer([TEXT * 5], vocab_size=280, out_path=tmp_path).backend
    backend.add_tokens([AddedToken("café", special=False), AddedToken("°C", special=False)])
    backend.add_special_tokens(["<tool>"])
    tokenizer = Tokenizer(backend)
    byte_lengths = token_byte_lengths(tokenizer)
    counted = {token: byte_lengths[backend.token_to_id(token)].item() for token in ("café", "°C", "<tool>")}
    assert counted == {"café": 5, "°C": 3, "<tool>": 0}
    text = "a café at 25°C"
    assert int(byte_lengths[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


def test_scored_text_bytes_counts_the_targets_after_the_first_label_that_are_not_ignored(tmp_path):
    tokenizer = train_tokenizer([TEXT * 5], vocab_size=280, out_path=tmp_path)
    byte_lengths = token_byte_lengths(tokenizer)
    prompt, answer = tokenizer.encode("naïve "), tokenizer.encode("café")
    eos = tokenizer.backend.token_to_id(EOS)
    labels = torch.tensor([[*[IGNORE_INDEX] * len(prompt), *answer, eos], [*prompt, *answer, eos]])
    first_row = len("café".encode())
    second_row = len(tokenizer.decode([*prompt[1:], *answer]).encode())  # nothing predicts the first token
    assert scored_text_bytes(byte_lengths, labels) == first_row + second_row


def test_a_splits_byte_lengths_come_from_the_tokenizer_its_index_records_or_are_its_mean_with_a_note(tmp_path):
    tokenizer = train_tokenizer([TEXT * 5], vocab_size=280, out_path=tmp_path / "tokenizer")
    corpus = tmp_path / "val.jsonl"
    corpus.write_text(json.dumps({"id": "0", "text": TEXT * 3}) + "\n")
    index = tokenize_corpus(corpus, tokenizer, tmp_path / "tokens", "val")
    recorded, note = split_byte_lengths(tmp_path / "tokens", "val")
    assert note is None and torch.equal(recorded, token_byte_lengths(tokenizer))
    (tmp_path / "tokenizer").rename(tmp_path / "moved")
    given, note = split_byte_lengths(tmp_path / "tokens", "val", tmp_path / "moved")
    assert note is None and torch.equal(given, token_byte_lengths(tokenizer))
    other = train_tokenizer(["other text"], vocab_size=280, out_path=tmp_path / "other")
    assert other.fingerprint != tokenizer.fingerprint
    estimated, note = split_byte_lengths(tmp_path / "tokens", "val", tmp_path / "other")
    mean = index["text_bytes"] / index["total_tokens"]
    assert torch.equal(estimated, torch.full((280,), mean, dtype=torch.float64))
    assert note and str(index_path(tmp_path / "tokens", "val")) in note and f"mean {mean:.3f} bytes per token" in note


def test_an_empty_splits_byte_lengths_are_refused_naming_its_index(tmp_path):
    tokenizer = train_tokenizer([TEXT * 5], vocab_size=280, out_path=tmp_path / "tokenizer")
    (tmp_path / "val.jsonl").write_text("")  # `data build --val-fraction 0`
    tokenize_corpus(tmp_path / "val.jsonl", tokenizer, tmp_path / "tokens", "val")
    (tmp_path / "tokenizer").rename(tmp_path / "moved")  # no tokenizer at hand: the mean would divide by 0 tokens
    with pytest.raises(
        ValueError, match=f"{index_path(tmp_path / 'tokens', 'val')} holds no tokens: its corpus had no val"
    ):
        split_byte_lengths(tmp_path / "tokens", "val")


def sentencepiece_style_tokenizer() -> Tokenizer:
    """A tokenizer.json laid out as Llama 2's and Mistral's: BPE over "▁"-joined words with byte fallback (a character
    outside the vocabulary is its UTF-8 bytes, pieces <0x00>..<0xFF>), and a decoder that drops the text's first
    space."""
    pieces = [f"<0x{byte:02X}>" for byte in range(256)] + sorted(set("▁" + TEXT.replace(" ", "▁")) - {"👩", "‍", "👧"})
    vocab = {piece: number for number, piece in enumerate([*SPECIAL_TOKENS, *pieces, "▁c", "▁ca", "▁caf", "▁café"])}
    merges = [("▁", "c"), ("▁c", "a"), ("▁ca", "f"), ("▁caf", "é")]
    backend = BackendTokenizer(models.BPE(vocab, merges, byte_fallback=True))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(backend)


def test_a_sentencepiece_style_tokenizers_pieces_count_their_leading_space_and_a_fallback_byte_one():
    tokenizer = sentencepiece_style_tokenizer()
    byte_lengths = token_byte_lengths(tokenizer)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT and tokenizer.backend.token_to_id("<0xF0>") in ids  # 👩 as its 4 bytes
    counted = {piece: byte_lengths[tokenizer.backend.token_to_id(piece)].item() for piece in ("▁café", "<0xF0>", "ï")}
    assert counted == {"▁café": 6, "<0xF0>": 1, "ï": 2}  # ï is no byte-level stand-in for 0xEF here
    assert int(byte_lengths[ids].sum()) == len(TEXT.encode("utf-8")) + 1  # and the space the normalizer led it with
