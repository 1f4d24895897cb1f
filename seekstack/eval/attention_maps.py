"""Attention weights of every layer and head, through MLA's expanded path (DeepSeek-V2 §2.1).

The model's attention runs fused (SDPA) and never materialises its weights. Here hooks from outside the model
catch each attention module's input, and the weights are recomputed from the module's own projections:
p = softmax((q^C k^C + q^R k^R) * scale + causal mask), with k^C = W^UK c^KV, q and k^R rotated as in the
forward pass. `attention_output` applies them to the values and o_proj, so the weights can be checked against
what the module really returned.

Shapes: L layers, H heads, T tokens, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekstack.model.attention import MultiHeadLatentAttention
from seekstack.model.rope import apply_rotary
from seekstack.model.transformer import Transformer


@dataclass
class LayerAttention:
    """One layer's attention on one sequence: the weights, the values they mix, and the module's own output."""

    weights: torch.Tensor  # (H, T, T), each row a distribution over the tokens up to and including its own
    values: torch.Tensor  # (H, T, V) per-head values v^C = W^UV c^KV
    module_output: torch.Tensor  # (T, hidden) what the attention module returned in the forward pass


@torch.no_grad()
def attention_maps(model: Transformer, input_ids: torch.Tensor) -> list[LayerAttention]:
    """Per main layer, the attention of the one sequence `input_ids` (T,) or (1, T), from one forward pass.
    ValueError for `attention_variant=3d`, whose output these weights do not give."""
    if model.config.attention_variant != "mla":
        raise ValueError(
            f"attention_variant={model.config.attention_variant!r} is a training ablation whose attention adds a "
            "channel gate and a temporal convolution to MLA (model/attention_3d.py): MLA's weights alone would not "
            "describe what its attention computes; explain draws plain MLA models"
        )
    caught: dict[int, tuple[tuple, torch.Tensor]] = {}
    hooks = []
    for index, layer in enumerate(model.layers):

        def catch(module, args, output, index=index):  # type: ignore[no-untyped-def]
            caught[index] = (args, output)

        hooks.append(layer.self_attn.register_forward_hook(catch))
    try:
        model(input_ids.view(1, -1))
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for index, layer in enumerate(model.layers):
        (x, cos, sin, *_), output = caught[index]
        weights, values = expanded_attention(layer.self_attn, x, cos, sin)
        maps.append(LayerAttention(weights[0], values[0], output[0]))
    return maps


def expanded_attention(
    attention: MultiHeadLatentAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, hidden), the normalised block input -> weights (B, H, T, T) and values (B, H, T, V)."""
    B, T, _ = x.shape
    H, N, R = attention.num_heads, attention.nope_dim, attention.rope_dim
    q = attention.project_query(x).view(B, T, H, N + R)
    q_nope, q_rope = q.split([N, R], dim=-1)
    kv_latent, k_rope = attention.kv_a_proj_with_mqa(x).split([attention.kv_rank, R], dim=-1)
    kv_latent = attention.kv_a_layernorm(kv_latent)
    rotated = apply_rotary(torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2), cos, sin, attention.interleaved)
    q_rope, k_rope = rotated[:, :, :H], rotated[:, :, H]  # (B, T, H, R), (B, T, R)
    k_nope, values = attention.kv_b_proj(kv_latent).view(B, T, H, N + attention.v_dim).split([N, attention.v_dim], -1)
    scores = torch.einsum("bthn,bshn->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    scores = (scores * attention.softmax_scale).masked_fill(~causal, float("-inf"))
    return scores.float().softmax(dim=-1), values.transpose(1, 2)


def attention_output(attention: MultiHeadLatentAttention, layer: LayerAttention) -> torch.Tensor:
    """o_proj(sum_s p_ts v_s) per head, concatenated: (T, hidden), what the module returns for these weights."""
    mixed = torch.einsum("hts,hsv->thv", layer.weights.to(layer.values.dtype), layer.values)
    return attention.o_proj(mixed.flatten(1))
