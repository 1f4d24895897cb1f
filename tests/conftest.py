"""Shared fixtures: tiny configurations that exercise every architectural switch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from seekstack.config import ModelConfig, preset


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`launch(rank, world_size=2, **variables)` sets what torchrun tells a rank of a run on one machine (RANK,
    LOCAL_RANK the same, WORLD_SIZE) and unsets MASTER_ADDR and MASTER_PORT, so that the rank stops where the ranks
    would join; `variables` override any of them (None unsets one: LOCAL_RANK=None is a rank started by hand)."""

    def launch(rank: int | str, world_size: int = 2, **variables: str | None) -> None:
        given = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
        for name, value in {"MASTER_ADDR": None, "MASTER_PORT": None, **given, **variables}.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return launch


def micro_config(**overrides) -> ModelConfig:
    """A DeepSeek-V3-shaped model small enough to run hundreds of times in a test."""
    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=4, topk_group=2, max_position_embeddings=256, num_nextn_predict_layers=1,
    )  # fmt: skip
    return preset("tiny", **{**base, **overrides})
