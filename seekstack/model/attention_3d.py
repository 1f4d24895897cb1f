"""The "three-dimensional attention" ablation: MLA (the spatial term, over tokens) plus a channel-wise gate and
a temporal 1-D convolution over the sequence, as the project's seed document proposes. Off by default
(`attention_variant="3d"` turns it on); not part of the Hugging Face-exact model, so `save_pretrained` refuses
to export it and the engine refuses to serve it. `bench/attention_3d.py` measures it against plain MLA.

  out_t = MLA(x)_t * g_t + conv_t(x)
  g_t    = 2 sigmoid(W_up silu(W_down mean_{s<=t} x_s))       channel gate: squeeze-and-excitation (Hu et al.
                                                            2018) with a causal squeeze (a running mean, so no
                                                            token sees the future)
  conv_t = sum_{j<K} w_j * x_{t-j}                            depthwise causal convolution over time, per channel

W_up and w start at zero, so a fresh 3D block computes exactly what plain MLA computes (g = 1, conv = 0) and the
ablation compares the two from the same function. Shapes: B batch, T tokens, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.config import ModelConfig
from seekstack.model.attention import LatentCache, MultiHeadLatentAttention

CHANNEL_REDUCTION = 8  # W_down: D -> D / 8, as squeeze-and-excitation's default ratio (Hu et al. 2018 §6.1: 16)
TEMPORAL_KERNEL = 4  # tokens the convolution reaches back, as Mamba's and Hyena's short causal convolutions


class SpatioTemporalAttention(MultiHeadLatentAttention):
    """MLA with a channel gate and a temporal convolution added; MLA's parameters keep their checkpoint names."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.channel_down = nn.Linear(hidden, max(1, hidden // CHANNEL_REDUCTION), bias=False)
        self.channel_up = nn.Linear(max(1, hidden // CHANNEL_REDUCTION), hidden, bias=False)
        self.temporal_conv = nn.Conv1d(hidden, hidden, TEMPORAL_KERNEL, groups=hidden, bias=False)
        self.start_as_plain_mla()

    @torch.no_grad()
    def start_as_plain_mla(self) -> None:
        """Zero W_up and the convolution: the gate is 1 and the temporal term 0, so the block computes plain MLA."""
        nn.init.zeros_(self.channel_up.weight)
        nn.init.zeros_(self.temporal_conv.weight)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        layer_idx: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D), causal over x itself; the latent cache's decode path has no conv state, and the
        running mean and convolution would read padding, so neither a cache nor a padding mask is taken."""
        if cache is not None:
            raise NotImplementedError(
                "attention_variant='3d' is a training ablation: it has no cached decode path; "
                "generate with a plain MLA model"
            )
        if mask is not None:
            raise NotImplementedError(
                "attention_variant='3d' takes no attention_mask: its running mean and convolution read the padding; "
                "pad on the right, where a causal model needs no mask"
            )
        spatial = super().forward(x, cos, sin)
        positions = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        running_mean = x.cumsum(dim=1) / positions  # (B, T, D)
        gate = 2 * torch.sigmoid(self.channel_up(F.silu(self.channel_down(running_mean))))
        # Left-pad by K-1 so output t sees x_{t-K+1..t} only.
        temporal = self.temporal_conv(F.pad(x.transpose(1, 2), (TEMPORAL_KERNEL - 1, 0))).transpose(1, 2)
        return spatial * gate + temporal
