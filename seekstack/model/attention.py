"""Multi-head Latent Attention (DeepSeek-V2 §2.1): a prefill path and an absorbed decode path.

Shapes: B batch, T new tokens, S cached tokens, H heads, N = qk_nope_head_dim, R = qk_rope_head_dim,
V = v_head_dim, C = kv_lora_rank (the compressed KV latent c^KV).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.config import ModelConfig
from seekstack.model import cpu_kernels
from seekstack.model.head_loss import refuse_create_graph
from seekstack.model.norm import RMSNorm
from seekstack.model.rope import apply_rotary

# eps of the latent norms (q_a_layernorm, kv_a_layernorm): fixed, not rms_norm_eps. DeepSeek's reference code and
# transformers' DeepseekV2/V3 build both with their RMSNorm's default, so a config's rms_norm_eps never reaches them.
LATENT_NORM_EPS = 1e-6


class LatentCache(Protocol):
    """What the absorbed decode path needs from a cache: per layer, only c^KV and the rope key k^R."""

    def length(self, layer_idx: int = 0) -> int:
        """Tokens already cached for `layer_idx` (where the next positions start)."""
        ...

    def update(
        self, layer_idx: int, kv_latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store (B, T, C) and (B, T, R); return every cached token's [c^KV; k^R] (B, S, C+R) and a (B, T, S)
        bool mask (None when every query sees every key)."""
        ...


class MultiHeadLatentAttention(nn.Module):
    """MLA. Parameter names follow the DeepSeek checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.interleaved = config.rope_interleave
        self.softmax_scale = config.softmax_scale
        hidden, qk_out = config.hidden_size, self.num_heads * config.qk_head_dim
        bias = config.attention_bias
        # Query: q = W^UQ RMSNorm(W^DQ h)  (eq. 12-13), or a plain projection when q_lora_rank is null.
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, qk_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, qk_out, bias=False)
        # KV: [c^KV; k^R] = W^DKV h (eq. 9, 14); [k^C; v^C] = W^UK c^KV, W^UV c^KV (eq. 10-11).
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        layer_idx: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden). Without a cache: causal attention over x itself, or where `mask`
        (B, 1, T, T) bool allows (`attention_mask_of`)."""
        B, T, _ = x.shape
        q = self.project_query(x).view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv_latent = self.kv_a_layernorm(kv_latent)  # (B, T, C)
        # The shared rope key rotates with the query heads as one more head: one rotation instead of two.
        rotated = apply_rotary(torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2), cos, sin, self.interleaved)
        q_rope, k_rope = rotated[:, :, : self.num_heads], rotated[:, :, self.num_heads]  # (B, T, H, R), (B, T, R)
        if cache is None:
            out = self.attend_expanded(q_nope, q_rope, kv_latent, k_rope, mask)
        else:
            cached, mask = cache.update(layer_idx, kv_latent, k_rope)
            out = self.attend_absorbed(q_nope, q_rope, cached, mask)
        return self.o_proj(out.flatten(2))

    def attend_expanded(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        kv_latent: torch.Tensor,
        k_rope: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training/prefill: up-project the latent to per-head keys and values, then SDPA, causal or by `mask`."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(kv_latent).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)  # (B, T, H, N+R)
        key = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.rope_dim)), dim=-1)
        # Zero-pad to one width: torch's fused CPU kernels need it; padded q/k add 0 to scores, padded v gives 0s.
        width = max(query.shape[-1], self.v_dim)
        query, key, value = (t.transpose(1, 2) for t in (_pad_last(query, width), _pad_last(key, width), value))
        # The flash kernel's forward, as torch picks it, unless the user turned it off (sdpa_kernel(SDPBackend.MATH))
        flash = torch.backends.cuda.flash_sdp_enabled()  # (the switch is torch's for every device, despite its name)
        # and the fused causal attention in training (_CausalAttention): in bfloat16 1.5-1.9x torch's fused forward +
        # backward (AMX products), in float32 1.5-1.9x (tiny's 8 x 256 and 2 x 1024, small's 4 x 512; one EPYC thread);
        # bfloat16 without AMX by float32 math, 1.46x its bfloat16 path (small's 4 x 512, avx512_bf16 EPYC thread).
        # Inference in bfloat16 takes the causal forward kernel: each query block's keys up to the diagonal, v at its
        # own width, out as (B, T, H, V); 1.2-1.3x torch's flash forward at 4 x 6 heads x 512 (AMX products; without
        # AMX the training kernel's forward, float32 math: cpu_kernels.cpp). Inference in float32 takes
        # that training forward itself: tiny's whole prefill of 1 x 512 and 1 x 1024 1.2x SDPA's (one EPYC thread).
        fused = mask is None and flash and cpu_kernels.elementwise_takes(query, key, value)
        if fused and torch.is_grad_enabled():
            return _CausalAttention.apply(query, key, value, self.softmax_scale).transpose(1, 2)
        if fused and query.dtype == torch.float32:
            out, _ = torch.ops.seekstack.causal_attention_training(query, key, value, self.softmax_scale)
            return out
        if fused:
            return torch.ops.seekstack.causal_attention(query, key, value, self.softmax_scale)
        out = F.scaled_dot_product_attention(
            query, key, _pad_last(value, width), attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
        )
        out = out[..., : self.v_dim]
        return out.transpose(1, 2)  # (B, T, H, V)

    def attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        cached: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode: fold W^UK into the query and W^UV into the output so attention runs on the cached [c^KV; k^R].

        q_t^C . k_s^C = q_t^C . (W^UK c_s) = (W^UK^T q_t^C) . c_s   (DeepSeek-V2 §2.1.2, absorption)
        o_t = W^UV sum_s p_ts c_s
        """
        B, T, H, _ = q_nope.shape
        # Views of the weight, never copies: heads are the batch of each bmm and the B x T tokens its rows, so the
        # per-head matrices are read in place (a broadcast matmul would copy them for every sequence, every step).
        w_kv = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)  # (H, N, C), (H, V, C)
        q_latent = torch.bmm(q_nope.reshape(B * T, H, self.nope_dim).transpose(0, 1), w_uk)  # (H, B*T, C)
        q_latent = q_latent.view(H, B, T, self.kv_rank).transpose(0, 1)  # (B, H, T, C)
        query = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # (B, H, T, C+R)
        if T <= cpu_kernels.MAX_TOKENS and not torch.is_grad_enabled() and cpu_kernels.usable(query, cached):
            # A decode step's few rows: one C++ call, where SDPA's flash kernel, cold after the weights streamed
            # through the cache, cost ~13 us more a layer of `small` (one thread, the same scores and softmax).
            out_latent = cpu_kernels.latent_attention_rows(query, cached, mask, self.softmax_scale, self.kv_rank)
        else:
            # Every head reads the same [c^KV; k^R] (one KV head in latent space), so the heads fold into the query
            # rows, row h*T + t being head h's query t: one key for all heads, never expanded per head.
            query = query.view(B, 1, H * T, self.kv_rank + self.rope_dim)
            key = cached.unsqueeze(1)  # (B, 1, S, C+R)
            if mask is not None:  # (B, T, S) -> (B, 1, H*T, S): a view at T = 1 (a decode step), one copy per head else
                mask = mask.unsqueeze(1).expand(B, H, T, -1).reshape(B, 1, H * T, -1)
            # The key doubles as the value: its first C columns are c^KV, and equal widths keep the fused kernel.
            out_latent = F.scaled_dot_product_attention(query, key, key, attn_mask=mask, scale=self.softmax_scale)
            out_latent = out_latent.view(B, H, T, -1)[..., : self.kv_rank]
        out_latent = out_latent.transpose(0, 1).reshape(H, B * T, self.kv_rank)
        out = torch.bmm(out_latent, w_uv.transpose(1, 2))  # (H, B*T, C) @ (H, C, V)
        return out.view(H, B, T, self.v_dim).permute(1, 2, 0, 3)  # (B, T, H, V)


def attention_mask_of(padding_mask: torch.Tensor) -> torch.Tensor:
    """transformers' `attention_mask` (B, T), 1 for a token and 0 for padding, as the (B, 1, T, T) bool mask of
    causal attention to the tokens alone. A padding position sees itself too: a query that sees no key would make
    SDPA's softmax NaN, and a NaN value reaches every query through the zero weights of the masked keys."""
    T = padding_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=padding_mask.device).tril()
    seen = causal & padding_mask.bool()[:, None, :]  # (B, T, T): query t sees key s <= t that is a token
    return (seen | torch.eye(T, dtype=torch.bool, device=padding_mask.device)).unsqueeze(1)


def packed_segments(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) positions of rows that may pack several sequences, each restarting its positions (transformers' packed
    `position_ids`) -> (B, T) long, the sequence each token belongs to within its row, numbered 0, 1, ...: a sequence
    starts wherever a position is not one more than the one before."""
    starts = positions.diff(dim=1, prepend=positions[:, :1] - 1) != 1
    return starts.cumsum(dim=1)


def causal_within(segments: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) bool mask of causal attention kept inside each sequence of `packed_segments`: no token sees
    another sequence of its row (as TRL's bfd packing with flash-attention varlen; its "wrapped" packing lets it)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :])).unsqueeze(1)


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


class _CausalAttention(torch.autograd.Function):
    """Causal attention of q, k (B, H, T, W) and v (B, H, T, V <= W) on a CPU, keeping the rows' log-sum-exp for the
    backward (cpu_kernels.cpp). float32, and bfloat16 where torch's brgemm cannot pack it (`packs_bfloat16`: no AMX,
    or an odd width; each head widened to float32 in the kernel, its S and dP multiplied in bfloat16 by vdpbf16ps where
    the CPU has avx512_bf16): `causal_attention_training` and its backward, each query block over its keys up to the
    diagonal only. bfloat16 where it packs: torch's fused kernel forward (v
    zero-padded to W) and `causal_attention_backward`, 2.2x faster than torch's fused backward at `small`'s shapes."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.in_float32 = q.dtype == torch.float32 or not cpu_kernels.packs_bfloat16(q.shape[-1])
        if ctx.in_float32:
            out, lse = torch.ops.seekstack.causal_attention_training(q, k, v, scale)
            out = out.transpose(1, 2)  # a view of (B, T, H, V), o_proj's layout
        else:
            padded = _pad_last(v, q.shape[-1])
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, padded, is_causal=True, scale=scale
            )
            out = out[..., : v.shape[-1]]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        refuse_create_graph("the fused causal attention", "run the model under sdpa_kernel(SDPBackend.MATH)")
        q, k, v, out, lse = ctx.saved_tensors
        backward = (
            torch.ops.seekstack.causal_attention_training_backward
            if ctx.in_float32
            else torch.ops.seekstack.causal_attention_backward
        )
        return (*backward(grad, q, k, v, out, lse, ctx.scale), None)


class ContiguousLatentCache:
    """A dense latent cache for a fixed batch: per layer, (B, max_length, C+R) latents and rope keys side by side.

    The paged, continuously batched cache of the inference engine implements the same `update`.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        layers = config.num_hidden_layers + config.num_nextn_predict_layers
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.cached = torch.zeros(layers, batch_size, max_length, width, dtype=dtype, device=device)
        self.lengths = [0] * layers
        self.max_length = max_length

    def length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(
        self, layer_idx: int, kv_latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, new = self.lengths[layer_idx], kv_latent.shape[1]
        end = start + new
        if end > self.max_length:
            raise ValueError(f"latent cache full: {end} tokens exceed max_length={self.max_length}")
        self.cached[layer_idx, :, start:end] = torch.cat((kv_latent, k_rope), dim=-1)
        self.lengths[layer_idx] = end
        query_pos = torch.arange(start, end, device=kv_latent.device)[:, None]
        mask = torch.arange(end, device=kv_latent.device)[None, :] <= query_pos  # (T, S) causal
        # in the model's dtype when the cache keeps another (a float32 cache, the default, under a bfloat16 model)
        return self.cached[layer_idx, :, :end].to(kv_latent.dtype), mask.expand(kv_latent.shape[0], -1, -1)

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers: (C + R) x layers x dtype size."""
        layers, _, _, width = self.cached.shape
        return layers * width * self.cached.element_size()


class SharedPrefixCache:
    """The latents of P prefixes that many rows continue (GRPO: a prompt and its G completions), kept with their
    gradients, so each prefix is computed once however many rows read it.

    A layer's first update records the prefixes' (P, S) right-padded [c^KV; k^R] and attends causally; its later
    updates are rows (B, T), row b continuing prefix `prefix_of[b]`, which attend to that prefix's real tokens (an
    index, no per-row recompute) and causally to their own. Under causal attention a prefix's states never depend on
    what follows, so this equals the forward over the whole rows; backward sums each prefix's gradient over its rows.
    The rows' positions start at their prefix's length, so shorter prefixes than the padded S need `positions`.
    """

    def __init__(self, prefix_lengths: torch.Tensor, prefix_of: torch.Tensor):
        self.prefix_lengths = prefix_lengths  # (P,) real tokens of each prefix
        self.prefix_of = prefix_of  # (B,) the prefix each continuing row reads
        self.prefixes: dict[int, torch.Tensor] = {}  # layer -> (P, S, C+R)

    def length(self, layer_idx: int = 0) -> int:
        prefix = self.prefixes.get(layer_idx)
        return 0 if prefix is None else prefix.shape[1]

    def update(
        self, layer_idx: int, kv_latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = torch.cat((kv_latent, k_rope), dim=-1)  # (B, T, C+R)
        B, T, _ = latent.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=latent.device).tril()
        if layer_idx not in self.prefixes:
            self.prefixes[layer_idx] = latent
            return latent, causal.expand(B, -1, -1)
        prefix = self.prefixes[layer_idx]
        real = torch.arange(prefix.shape[1], device=latent.device) < self.prefix_lengths[:, None]  # (P, S)
        mask = torch.cat((real[self.prefix_of].unsqueeze(1).expand(-1, T, -1), causal.expand(B, -1, -1)), dim=-1)
        return torch.cat((prefix[self.prefix_of], latent), dim=1), mask  # (B, S+T, C+R), (B, T, S+T)
