"""A pre-norm transformer block: MLA, then a dense FFN or DeepSeekMoE, each with a residual."""

from __future__ import annotations

import torch
from torch import nn

from seekstack.config import ModelConfig
from seekstack.model.attention import LatentCache, MultiHeadLatentAttention
from seekstack.model.attention_3d import SpatioTemporalAttention
from seekstack.model.moe import FeedForward, MoE, MoEStats
from seekstack.model.norm import RMSNorm


class DecoderBlock(nn.Module):
    """h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)). `layer_idx` also indexes the latent cache."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        attention = SpatioTemporalAttention if config.attention_variant == "3d" else MultiHeadLatentAttention
        self.self_attn = attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        counted: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        output_expert_load: bool = True,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """`counted` (B, T): the tokens a MoE's routing statistics count (`MoE.forward`); `mask` (B, 1, T, T): the
        keys each query attends to (default: causal); `segments` (B, T): the sequences packed in each row, whose
        balance losses a MoE averages (default: one per row); `output_expert_load`: whether a MoE counts its load."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer_idx, mask)
        if isinstance(self.mlp, MoE):
            ffn_out, stats = self.mlp(self.post_attention_layernorm(x), counted, segments, output_expert_load)
            return x + ffn_out, stats
        return x + self.mlp(self.post_attention_layernorm(x)), None
