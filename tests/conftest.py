"""Shared fixtures: tiny configurations that exercise every architectural switch."""

from __future__ import annotations

import pytest
import torch

from seekstack.config import ModelConfig, preset


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def micro_config(**overrides) -> ModelConfig:
    """A DeepSeek-V3-shaped model small enough to run hundreds of times in a test."""
    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=4, topk_group=2, max_position_embeddings=256, num_nextn_predict_layers=1,
    )  # fmt: skip
    return preset("tiny", **{**base, **overrides})
