"""Rotary position embedding for the decoupled RoPE dimensions, with YaRN or linear context extension.

Shapes: T positions, R = qk_rope_head_dim (rotated in R/2 pairs).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from seekstack.config import ModelConfig, yarn_mscale
from seekstack.model.precision import Float32Buffers


def yarn_inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies (R/2,) and the factor applied to cos/sin.

    Plain RoPE: theta_i = base^(-2i/R). Linear (position interpolation, Chen et al. 2023): every theta_i / factor.
    YaRN (Peng et al. 2023, eq. 18-20): dimensions that rotate fewer than `beta_slow` times over the original context
    are interpolated by 1/factor, those rotating more than `beta_fast` times are kept, with a linear ramp between.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor, 1.0
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    scaling = config.rope_scaling or {}
    factor = config.rope_factor
    original_context = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times in the context
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(Float32Buffers):
    """Computes the (cos, sin) tables for given positions; `apply_rotary` rotates a tensor with them. The inverse
    frequencies stay float32 in a bf16 model: rounded to bf16, the angle at position 16k of DeepSeek-V3's slowest
    pairs is off by radians."""

    float32_buffers = ("inv_freq",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = yarn_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = config.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) -> cos, sin (..., T, R) in float32, laid out for `apply_rotary` (once per forward)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return rotary_tables(angles, self.interleaved, self.attention_factor)


def rotary_tables(angles: torch.Tensor, interleaved: bool, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair angles (..., R/2) -> cos and signed sin (..., R) at the places of the pair members.

    A pair (a, b) turns into (a cos - b sin, b cos + a sin): the first member's sin carries the minus sign.
    Interleaved (DeepSeek's layout): pairs are (x0, x1), (x2, x3), ...; otherwise (x_i, x_{i+R/2}).
    """
    cos, sin = angles.cos() * scale, angles.sin() * scale
    if interleaved:
        return torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the pairs of x (..., T, heads, R) by the tables of `rotary_tables` (..., T, R): x cos + partner(x) sin.

    partner(x) swaps the members of each pair, so (a, b) -> (a cos - b sin, b cos + a sin). Plain real arithmetic,
    which torch.compile fuses into one kernel (it does not generate code for complex numbers). The tables get no
    gradient.
    """
    if torch.is_grad_enabled():
        return _Rotation.apply(x, cos, sin, interleaved)
    return _rotate(x, cos, sin, interleaved)  # inference: no autograd.Function overhead


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """`apply_rotary` without autograd, computed in float32, returned in x's dtype.

    The signed sin differs in sign between the members of a pair, so partner(x) sin = -partner(x sin): the partner
    term is subtracted in place, pair half from pair half, with no swapped copy of x (bit for bit the same sums; a
    flip of x cost a third of the rotation).
    """
    half = x.shape[-1] // 2
    x32 = x.float()
    out, turned = x32 * cos.unsqueeze(-2), x32 * sin.unsqueeze(-2)
    first, second = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(None, half), slice(half, None))
    out[..., first].sub_(turned[..., second])
    out[..., second].sub_(turned[..., first])
    return out.to(x.dtype)


class _Rotation(torch.autograd.Function):
    """`_rotate` with its backward: a rotation's transpose is the rotation by minus the angles, (cos, -sin).

    Autograd through the in-place halves would record a copy per slice (the training step's rotation ran ~2x slower).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _rotate(x, cos, sin, interleaved)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin, ctx.interleaved), None, None, None
