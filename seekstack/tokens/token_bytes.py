"""The UTF-8 bytes each token id spells, for bits per byte over the tokens a model scores (nanochat's `token_bytes`).

A byte-level BPE piece counts the bytes it stands for (a piece holding part of a UTF-8 character, its own part), an
added token the UTF-8 of its text, and a special token (BOS, EOS, role tokens) none; a piece of a tokenizer that is not
byte-level (SentencePiece's layout, Llama 2's: "▁the", byte-fallback pieces <0xE2>) the bytes it adds to a text, its
word's leading space included, and a byte-fallback piece its one byte, as the token shards'
`text_bytes` count none for the EOS that ends each document. Summed over the targets scored, this is the bytes of
the text they spell, which a split's mean bytes per token only estimates: that estimate stands in, as a table of
one value, where the tokenizer the shards were encoded with is not at hand.
"""

from __future__ import annotations

import os
import re
import weakref

import torch
from tokenizers import AddedToken, decoders

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.tokenizer import Tokenizer, byte_level_bytes, tokenizer_json_path
from seekstack.tokens.shards import index_path, load_index

FALLBACK_BYTE = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback piece, SentencePiece's spelling of one byte
_TABLES: weakref.WeakKeyDictionary[Tokenizer, torch.Tensor] = weakref.WeakKeyDictionary()


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """(V,) int64: the UTF-8 bytes each id of `tokenizer` spells; built once per tokenizer."""
    table = _TABLES.get(tokenizer)
    if table is None:
        added = tokenizer.backend.get_added_tokens_decoder()
        byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
        plain = None if byte_level else tokenizer.backend.encode("a", add_special_tokens=False).ids[-1:]
        lengths = [
            _token_bytes(tokenizer, token_id, added.get(token_id), plain) for token_id in range(tokenizer.vocab_size)
        ]
        table = _TABLES[tokenizer] = torch.tensor(lengths, dtype=torch.int64)
    return table


def _token_bytes(tokenizer: Tokenizer, token_id: int, added: AddedToken | None, plain: list[int] | None) -> int:
    """The UTF-8 bytes of one id: an added token's (`added`) text's, 0 for a special one; a vocabulary piece's bytes:
    its byte-level bytes (`plain` None: a byte-level tokenizer) or, where the tokenizer is not byte-level, 1 for a
    byte-fallback piece, else the bytes it adds to the text of the ids `plain`, decoded after them so that no rule
    for a text's start applies to it (SentencePiece decoders drop the first word's leading space)."""
    if added is not None:
        return 0 if added.content in tokenizer.special_tokens else len(added.content.encode("utf-8"))
    piece = tokenizer.backend.id_to_token(token_id)
    if piece is None or piece in tokenizer.special_tokens:
        return 0
    if plain is None:
        raw = byte_level_bytes(piece)
        return len(raw) if raw is not None else len(tokenizer.decode([token_id]).encode("utf-8"))
    if FALLBACK_BYTE.fullmatch(piece) and getattr(tokenizer.backend.model, "byte_fallback", False):
        return 1
    return len(tokenizer.decode([*plain, token_id]).encode("utf-8")) - len(tokenizer.decode(plain).encode("utf-8"))


def split_byte_lengths(
    data_dir: str | os.PathLike, split: str, tokenizer_file: str | os.PathLike | None = None
) -> tuple[torch.Tensor, str | None]:
    """(V,) bytes per id for the targets of `split` of token shards `data_dir`, and None: each id's own, from
    `tokenizer_file` or else the tokenizer.json the split's index records, whichever has the sha256 it records. Where
    neither has: every id the split's mean bytes per token, and a note saying so."""
    index = load_index(data_dir, split)
    if index["total_tokens"] == 0:  # no text to score, and no mean bytes per token to estimate with
        raise ValueError(
            f"{index_path(data_dir, split)} holds no tokens: its corpus had no {split} document (`data build "
            "--val-fraction 0` holds none out); tokenize a corpus with some"
        )
    recorded = index["tokenizer"]
    for path in (tokenizer_file, recorded.get("path")):
        if path and tokenizer_json_path(path).is_file():
            tokenizer = Tokenizer.from_file(path)
            if tokenizer.fingerprint == recorded.get("sha256"):
                return token_byte_lengths(tokenizer), None
    mean = index["text_bytes"] / index["total_tokens"]
    note = (
        f"no tokenizer.json at hand of the sha256 {index_path(data_dir, split)} records: bits per byte count each "
        f"scored token the split's mean {mean:.3f} bytes per token (an estimate)"
    )
    return torch.full((recorded["vocab_size"],), mean, dtype=torch.float64), note


def text_targets(byte_lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`labels` (..., T) with each target that spells no bytes (EOS, BOS, a role token: 0 in `byte_lengths`) set to
    IGNORE_INDEX, so that bits per byte sums the loss of the targets that spell text alone, over their bytes, as
    nanochat's evaluate_bpb does (a special token's loss, over 0 bytes, was charged to the text)."""
    return labels.masked_fill(byte_lengths[labels.clamp(min=0)] == 0, IGNORE_INDEX)


def scored_text_bytes(byte_lengths: torch.Tensor, labels: torch.Tensor) -> float:
    """UTF-8 bytes of the targets rows of `labels` (..., T) score: every label after the first (nothing predicts
    it) that is not IGNORE_INDEX, each counted by `byte_lengths` (`token_byte_lengths`, `split_byte_lengths`)."""
    targets = labels[..., 1:]
    return float(byte_lengths[targets[targets != IGNORE_INDEX]].sum())
