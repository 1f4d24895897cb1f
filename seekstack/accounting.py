"""Parameters, FLOPs and KV-cache bytes of a DeepSeek model, computed from its `ModelConfig` alone.

Nothing here allocates a tensor, so the figures hold for the 671B configuration on any machine.
Symbols: L layers, D hidden, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim,
C = kv_lora_rank, Q = q_lora_rank, E routed experts, K experts per token, I expert width, S context.

Activated parameters follow the convention that reproduces the published figures: every parameter a
token multiplies by or scales with, counting the output head but not the input embedding (a row
lookup), and only K of the E routed experts. That gives DeepSeek-V3 36.6B ("37B", with the
embedding it would be 37.6B), DeepSeek-V2 20.9B ("21B") and DeepSeek-V2-Lite 2.45B ("2.4B").
Counts are of `nn.Parameter`s, as `Transformer` holds them; the routers' selection bias is a buffer.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from seekstack.config import ModelConfig


@dataclass(frozen=True)
class Parameters:
    """A parameter count split by how one token uses each part."""

    matmul: int = 0  # matrices every token multiplies by: attention, dense FFN, shared experts, router, head
    routed: int = 0  # routed-expert matrices, all E of them
    routed_activated: int = 0  # the K of E routed experts one token runs through
    elementwise: int = 0  # RMSNorm weights and biases
    embedding: int = 0  # the input embedding table: a token reads one row, no matmul

    def __add__(self, other: Parameters) -> Parameters:
        return Parameters(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))

    @property
    def total(self) -> int:
        """Every parameter, as stored once."""
        return self.matmul + self.routed + self.elementwise + self.embedding

    @property
    def activated_matmul(self) -> int:
        """Matrix parameters one token multiplies by: 2 FLOPs each in the forward pass."""
        return self.matmul + self.routed_activated

    @property
    def activated(self) -> int:
        """Parameters one token uses, the output head included and the input embedding excluded."""
        return self.activated_matmul + self.elementwise


def attention_parameters(config: ModelConfig) -> Parameters:
    """One MLA layer (DeepSeek-V2 §2.1): query path, KV down- and up-projection, output projection."""
    D, H, C, R = config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    bias = config.attention_bias
    qk_out = H * config.qk_head_dim
    if config.q_lora_rank is None:
        query = Parameters(matmul=D * qk_out)
    else:
        Q = config.q_lora_rank
        query = Parameters(matmul=D * Q + Q * qk_out, elementwise=Q + (Q if bias else 0))  # q_a_layernorm, bias
    kv_down = Parameters(matmul=D * (C + R), elementwise=C + ((C + R) if bias else 0))  # kv_a_layernorm, bias
    kv_up = Parameters(matmul=C * H * (config.qk_nope_head_dim + config.v_head_dim))
    output = Parameters(matmul=H * config.v_head_dim * D, elementwise=D if bias else 0)
    return query + kv_down + kv_up + output


def ffn_parameters(config: ModelConfig, layer_idx: int) -> Parameters:
    """The feed-forward half of block `layer_idx`: a dense SwiGLU, or DeepSeekMoE (router, shared, routed)."""
    D = config.hidden_size
    if not config.is_moe_layer(layer_idx):
        return Parameters(matmul=3 * D * config.intermediate_size)
    E, K = config.n_routed_experts or 0, config.num_experts_per_tok or 0
    expert = 3 * D * config.moe_intermediate_size  # gate, up and down of one SwiGLU expert
    router_and_shared = E * D + (config.n_shared_experts or 0) * expert
    return Parameters(matmul=router_and_shared, routed=E * expert, routed_activated=K * expert)


def block_parameters(config: ModelConfig, layer_idx: int) -> Parameters:
    """Decoder block `layer_idx` (MTP blocks continue the numbering): two RMSNorms, MLA and the FFN."""
    norms = Parameters(elementwise=2 * config.hidden_size)
    return norms + attention_parameters(config) + ffn_parameters(config, layer_idx)


def main_parameters(config: ModelConfig) -> Parameters:
    """The model without MTP: embedding, L blocks, final norm, output head (shared when tied)."""
    D, vocab = config.hidden_size, config.vocab_size
    blocks = sum((block_parameters(config, i) for i in range(config.num_hidden_layers)), Parameters())
    head = Parameters(matmul=vocab * D)  # tied: the embedding table is the head, stored once
    embedding = Parameters(embedding=0 if config.tie_word_embeddings else vocab * D)
    return embedding + blocks + Parameters(elementwise=D) + head


def mtp_parameters(config: ModelConfig) -> Parameters:
    """The MTP modules' own weights (V3 §2.2): enorm, hnorm, eh_proj, a block and the head's norm each.

    The embedding and output head are the main model's; checkpoints store copies (`mtp_checkpoint_parameters`).
    """
    D, first = config.hidden_size, config.num_hidden_layers
    own = Parameters(matmul=2 * D * D, elementwise=3 * D)  # eh_proj; enorm, hnorm, shared_head.norm
    modules = (own + block_parameters(config, i) for i in range(first, first + config.num_nextn_predict_layers))
    return sum(modules, Parameters())


def mtp_checkpoint_parameters(config: ModelConfig) -> int:
    """MTP parameters as a DeepSeek-V3 checkpoint stores them, each module with its own copy of
    `embed_tokens` and `shared_head.head`: the V3 report's "14B" beside the 671B main model."""
    copies = config.num_nextn_predict_layers * 2 * config.vocab_size * config.hidden_size
    return mtp_parameters(config).total + copies


def attention_flops_per_layer(config: ModelConfig, context_length: int) -> int:
    """Score and value FLOPs of one query over S = `context_length` keys in one layer: 2 H (N + R + V) S.

    Counted on the expanded heads: q.k costs 2 (N + R) per key and head, p.v costs 2 V.
    """
    return 2 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * context_length


def block_forward_flops(config: ModelConfig, layer_idx: int, context_length: int) -> int:
    """Forward FLOPs of one token through decoder block `layer_idx`: its matrices, and its attention over
    S = `context_length` keys."""
    return 2 * block_parameters(config, layer_idx).activated_matmul + attention_flops_per_layer(config, context_length)


def forward_flops_per_token(config: ModelConfig, context_length: int) -> int:
    """Forward FLOPs of one token of the main model attending to S = `context_length` keys.

    F = 2 P_act + 2 L H (N + R + V) S, with P_act the activated matrix parameters (output head
    included; the embedding lookup and elementwise work are not matmuls). Every key counts, as in
    PaLM (Chowdhery et al. 2022, App. B); a causal kernel that skips masked blocks does about half.
    """
    attention = config.num_hidden_layers * attention_flops_per_layer(config, context_length)
    return 2 * main_parameters(config).activated_matmul + attention


def training_flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs of one token of a `seq_len` sequence, for MFU: 3x the forward (backward = 2x forward).

    The forward includes each MTP depth: eh_proj, its block, and another pass through the output head.
    """
    depths = config.num_nextn_predict_layers
    mtp_matmul = mtp_parameters(config).activated_matmul + depths * config.vocab_size * config.hidden_size
    mtp_forward = 2 * mtp_matmul + depths * attention_flops_per_layer(config, seq_len)
    return 3 * (forward_flops_per_token(config, seq_len) + mtp_forward)


@dataclass(frozen=True)
class KVCacheBytes:
    """Cache bytes one token occupies across the L main layers."""

    latent: int  # MLA caches c^KV and the shared rope key k^R: (C + R) per layer
    mha: int  # a plain multi-head cache of the expanded keys and values: H (N + R + V) per layer

    @property
    def ratio(self) -> float:
        """How many times smaller the latent cache is."""
        return self.mha / self.latent


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> KVCacheBytes:
    """Latent versus expanded-MHA cache bytes per token (DeepSeek-V2 §2.1.4, Table 1), elements of `dtype`."""
    layers_bytes = config.num_hidden_layers * dtype.itemsize
    latent = (config.kv_lora_rank + config.qk_rope_head_dim) * layers_bytes
    mha = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * layers_bytes
    return KVCacheBytes(latent, mha)
