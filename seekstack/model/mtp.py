"""Multi-Token Prediction modules (DeepSeek-V3 §2.2).

Depth k combines the previous depth's hidden state at position i with the embedding of token i+k and
runs one transformer block; the shared output head then predicts token i+k+1.
Shapes: B batch, T positions available at this depth, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from seekstack.config import ModelConfig
from seekstack.model.attention import LatentCache
from seekstack.model.block import DecoderBlock
from seekstack.model.moe import MoEStats
from seekstack.model.norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth. Parameter names are those of `model.layers.{num_hidden_layers + k}` in DeepSeek-V3."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderBlock(config, layer_idx)
        # `shared_head.head` is the main model's output head; only the final norm is this module's own.
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(config.hidden_size, config.rms_norm_eps)})

    def forward(
        self,
        previous_hidden: torch.Tensor,
        next_embeddings: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        counted: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        output_expert_load: bool = True,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]  (V3 eq. 21), h^k = TRM_k(h').

        The paper writes [h; emb]; every released checkpoint concatenates the embedding first.
        `output_expert_load=False`: a MoE block counts no expert load (drafting, which never reads it).
        """
        merged = self.eh_proj(torch.cat((self.enorm(next_embeddings), self.hnorm(previous_hidden)), dim=-1))
        return self.block(merged, cos, sin, cache, counted, mask, segments, output_expert_load)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The normalised state the shared output head reads (V3 eq. 22)."""
        return self.shared_head["norm"](hidden)
