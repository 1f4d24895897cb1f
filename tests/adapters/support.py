"""A tiny random base checkpoint and adapters with random (non-zero) LoRA weights, shared by the adapter tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import seekstack
from seekstack.adapters.config import VOCABULARY, AdapterConfig
from seekstack.adapters.files import apply_lora, is_adapter_parameter, save_adapter
from tests.infer.support import VOCAB as TOKENIZER_VOCAB
from tests.infer.support import tiny_tokenizer

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
    max_position_embeddings=128,
)  # fmt: skip


QUICK_RUN = ["seq_len=32", "batch_size=2", "max_steps=1", "eval_every=0", "lora.rank=2"]  # a one-step LoRA run


def write_base(folder: Path, seed: int = 0, with_tokenizer: bool = False) -> Path:
    """A random tiny DeepSeek-V3 (one dense layer, one MoE layer, an MTP module) saved as a checkpoint; with
    `with_tokenizer`, a model directory the inference engine loads (its vocabulary that of the tiny tokenizer)."""
    torch.manual_seed(seed)
    vocab = {"vocab_size": TOKENIZER_VOCAB} if with_tokenizer else {}
    seekstack.save_pretrained(seekstack.Transformer(seekstack.preset("tiny", **{**TINY, **vocab})), folder)
    if with_tokenizer:
        tiny_tokenizer(folder)
    return folder


def write_random_adapter(
    base: Path, folder: Path, seed: int, config: AdapterConfig | None = None, head_token_ids: Sequence[int] = ()
) -> Path:
    """An adapter on `base` whose A and B (and trained head rows) are random, so that it changes the logits (a fresh
    one has B = 0); by default of rank 4 on every kind of target."""
    config = config or AdapterConfig(rank=4, vocabulary=VOCABULARY)
    model = apply_lora(seekstack.load_pretrained(base), config, base, head_token_ids)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(model, folder)
    return folder


def prompt_ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
