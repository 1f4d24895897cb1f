"""A byte-level tokenizer, token shards encoded with it and a random micro MoE teacher saved with it: small enough
for distillation runs of a few steps in a test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

import seekstack
from seekstack.tokenizer import TOKENIZER_FILE, Tokenizer
from tests.conftest import micro_config
from tests.posttrain.support import byte_tokenizer

VOCAB = 300  # the byte tokenizer's
# A dense DeepSeek-V3 student: every layer dense (first_k_dense_replace = layers), no MTP module.
DENSE_STUDENT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=2,
    num_nextn_predict_layers=0, max_position_embeddings=128,
)  # fmt: skip


def write_split(data_dir: Path, split: str, tokens: int, seed: int, tokenizer: Tokenizer) -> None:
    """A token shard in the `data tokenize` format recording `tokenizer`: a noisy repeating pattern."""
    rng = np.random.default_rng(seed)
    ids = (np.arange(tokens) * 7 % VOCAB + rng.integers(0, 3, tokens)) % VOCAB
    data_dir.mkdir(parents=True, exist_ok=True)
    ids.astype("<u2").tofile(data_dir / f"{split}_00000.bin")
    recorded = {
        "vocab_size": VOCAB,
        "sha256": tokenizer.fingerprint,
        "bos_id": 0,
        "eos_id": 1,
        "path": tokenizer.source,
    }
    index = {
        "version": 1, "split": split, "source": "synthetic", "dtype": "uint16",
        "shards": [{"file": f"{split}_00000.bin", "tokens": tokens}], "documents": 1, "total_tokens": tokens,
        "text_bytes": tokens * 4, "bos": False, "tokenizer": recorded,
    }  # fmt: skip
    (data_dir / f"{split}_index.json").write_text(json.dumps(index))


def write_data(root: Path) -> Path:
    """`root/tokenizer` and `root/shards` (train and val splits encoded with it); returns the shards' folder."""
    tokenizer = byte_tokenizer(root / "tokenizer")
    write_split(root / "shards", "train", 6_000, seed=1, tokenizer=tokenizer)
    write_split(root / "shards", "val", 1_000, seed=2, tokenizer=tokenizer)
    return root / "shards"


def write_teacher(folder: Path, tokenizer_dir: Path, vocab_size: int = VOCAB, context: int = 128) -> Path:
    """A random micro MoE (one dense layer, two MoE layers, an MTP module) of `context` positions saved with the
    tokenizer."""
    torch.manual_seed(0)
    config = micro_config(vocab_size=vocab_size, max_position_embeddings=context)
    seekstack.save_pretrained(seekstack.Transformer(config), folder)
    shutil.copyfile(tokenizer_dir / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    return folder
