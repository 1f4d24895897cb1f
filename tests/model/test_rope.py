"""Rotary embeddings and YaRN: the frequencies, temperatures and rotations are those of the papers.

Each expectation is computed here, in float64, from the published formulas: RoPE (Su et al. 2021), YaRN
(Peng et al. 2023, §3.2-3.4) and DeepSeek-V2/V3's use of it (the softmax scale carries mscale(s, mscale_all_dim)^2,
the cos/sin tables mscale(s, mscale) / mscale(s, mscale_all_dim)), and compared with transformers, the reference
whose checkpoints we load. Shapes: T positions, H heads, R = qk_rope_head_dim.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from seekstack.config import ModelConfig, preset, yarn_mscale
from seekstack.model.rope import RotaryEmbedding, apply_rotary, rotary_tables, yarn_inverse_frequencies
from seekstack.model.transformer import Transformer

V3_MSCALE = 1.3688879454113936  # 0.1 ln 40 + 1: DeepSeek-V3's factor 40 with mscale_all_dim 1.0
# Scores of unit-variance q, k (R = 16, |score| < 20) at positions up to 3000, where float32 angles p * theta
# are off by up to ~2e-4 rad; a wrong rotation moves them by O(1).
ANGLE_ATOL = 2e-3
YARN_V3 = dict(preset("deepseek-v3").rope_scaling)  # factor 40, original context 4096, beta 32/1, mscale 1/1
YARN_CASES = {  # rope_scaling, with the max_position_embeddings it implies (factor x original context)
    "deepseek-v3": (YARN_V3, 163840),
    "deepseek-v2-lite": (dict(preset("deepseek-v2-lite").rope_scaling), 163840),
    "unequal-mscale-betas": (
        dict(
            rope_type="yarn",
            factor=8.0,
            original_max_position_embeddings=512,
            beta_fast=16,
            beta_slow=2,
            mscale=1.0,
            mscale_all_dim=0.8,
        ),
        4096,
    ),
    "untruncated": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024, truncate=False), 4096),
    "no-mscale": (dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=256), 4096),
}


def rope_config(rope_scaling: dict | None, max_position_embeddings: int = 4096, **overrides) -> ModelConfig:
    """The tiny preset (R = 16) with the given position encoding."""
    return preset("tiny", rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings, **overrides)


def yarn_reference(
    dim: int, base: float, factor: float, original_context: int, beta_fast: float, beta_slow: float, truncate: bool
) -> torch.Tensor:
    """YaRN's per-pair inverse frequencies (R/2,) in float64 ("NTK-by-parts", Peng et al. 2023 eq. 18-20).

    Pair i turns r_i = L / lambda_i = L theta_i / 2 pi times over the original context L. Solving for i gives the
    pair that turns r times, d(r) = R ln(L / (2 pi r)) / (2 ln base). Pairs below d(beta_fast) keep theta_i
    (extrapolation), pairs above d(beta_slow) get theta_i / s (interpolation), linearly blended in between.
    """
    pairs = torch.arange(dim // 2, dtype=torch.float64)
    theta = base ** (-2 * pairs / dim)

    def pair_turning(rotations: float) -> float:
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    interpolated = ((pairs - low) / max(high - low, 1e-3)).clamp(0, 1)  # the linear ramp: 0 keeps, 1 divides by s
    return theta / factor * interpolated + theta * (1 - interpolated)


# ---------------------------------------------------------------------------------- frequencies
def test_plain_rope_frequencies_are_base_to_the_minus_2i_over_r():
    config = rope_config(None, rope_theta=50000.0)
    inv_freq, attention_factor = yarn_inverse_frequencies(config)
    expected = torch.tensor([50000.0 ** (-2 * i / 16) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert inv_freq[0] == 1.0 and attention_factor == 1.0


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_frequencies_follow_the_ramp_formula(case):
    scaling, max_positions = YARN_CASES[case]
    config = rope_config(scaling, max_positions)
    inv_freq, _ = yarn_inverse_frequencies(config)
    expected = yarn_reference(
        16, 10000.0, scaling["factor"], scaling["original_max_position_embeddings"], scaling.get("beta_fast", 32),
        scaling.get("beta_slow", 1), scaling.get("truncate", True),
    )  # fmt: skip
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_deepseek_v3_yarn_keeps_fast_pairs_and_divides_slow_pairs_by_40():
    config = preset("deepseek-v3")  # R = 64, base 10^4, L = 4096, s = 40, beta 32/1
    inv_freq, _ = yarn_inverse_frequencies(config)
    theta = 10000.0 ** (-2 * torch.arange(32, dtype=torch.float64) / 64)
    rotations = 4096 * theta / (2 * math.pi)  # turns of each pair over the original context
    ratio = (inv_freq.double() / theta).tolist()
    for pair, turns in enumerate(rotations.tolist()):
        if turns > 32:  # beta_fast: high frequencies are not interpolated
            assert ratio[pair] == pytest.approx(1.0, rel=1e-6), pair
        elif turns < 1:  # beta_slow: wavelengths longer than the context are interpolated by 1/s
            assert ratio[pair] == pytest.approx(1 / 40, rel=1e-6), pair
        else:
            assert 1 / 40 < ratio[pair] < 1, pair
    # d(32) = 10.47 and d(1) = 22.50, so the ramp runs from pair 10 (kept) to pair 23 (divided by 40)
    assert [i for i, r in enumerate(ratio) if r == pytest.approx(1.0, rel=1e-6)] == list(range(11))
    assert [i for i, r in enumerate(ratio) if r == pytest.approx(1 / 40, rel=1e-6)] == list(range(23, 32))
    assert ratio[16] == pytest.approx(1 / 40 * 6 / 13 + 7 / 13, rel=1e-6)  # ramp (16 - 10) / (23 - 10)


# ---------------------------------------------------------------------------------- temperatures
def test_mscale_is_one_tenth_log_factor_plus_one_and_one_without_extension():
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5) == 1.0 and yarn_mscale(1.0, 0.707) == 1.0
    assert yarn_mscale(40.0) == pytest.approx(V3_MSCALE, rel=1e-12)
    assert yarn_mscale(40.0, 0.707) == pytest.approx(0.0707 * math.log(40) + 1, rel=1e-12)  # DeepSeek-V2(-Lite)


@pytest.mark.parametrize(
    "scaling, expected",
    [
        (None, 1.0),
        (YARN_V3, 1.0),  # mscale == mscale_all_dim: the cos/sin are not scaled, the softmax scale is
        (YARN_CASES["unequal-mscale-betas"][0], (0.1 * math.log(8) + 1) / (0.08 * math.log(8) + 1)),
        (YARN_CASES["no-mscale"][0], 0.1 * math.log(16) + 1),  # the paper's sqrt(1/t) on the tables
        ({**YARN_CASES["no-mscale"][0], "attention_factor": 0.5}, 0.5),  # given explicitly
    ],
    ids=["plain", "v3", "unequal-mscale", "no-mscale", "explicit"],
)
def test_cos_sin_tables_carry_the_attention_factor(scaling, expected):
    rotary = RotaryEmbedding(rope_config(scaling))
    assert rotary.attention_factor == pytest.approx(expected, rel=1e-12)
    positions = torch.arange(0, 200, 7)
    cos, sin = rotary(positions)  # (T, R), each pair's value at both of its places (x0, x1), (x2, x3), ...
    angles = (positions.double()[:, None] * rotary.inv_freq.double()).repeat_interleave(2, dim=-1)  # (T, R)
    signs = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(8)  # the first member's sin is negated
    torch.testing.assert_close(cos.double(), expected * angles.cos(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sin.double(), expected * signs * angles.sin(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "scaling, expected",
    [
        (None, 48**-0.5),  # (qk_nope 32 + qk_rope 16)^-1/2
        (YARN_CASES["no-mscale"][0], 48**-0.5),  # without mscale_all_dim the temperature is in the cos/sin only
        (YARN_V3, 48**-0.5 * V3_MSCALE**2),
        (YARN_CASES["deepseek-v2-lite"][0], 48**-0.5 * (0.0707 * math.log(40) + 1) ** 2),
        (YARN_CASES["unequal-mscale-betas"][0], 48**-0.5 * (0.08 * math.log(8) + 1) ** 2),
    ],
    ids=["plain", "no-mscale", "v3", "v2-lite", "unequal-mscale"],
)
def test_softmax_scale_is_inverse_sqrt_head_dim_times_mscale_all_dim_squared(scaling, expected):
    assert rope_config(scaling).softmax_scale == pytest.approx(expected, rel=1e-12)


def test_deepseek_v3_preset_softmax_scale():
    assert preset("deepseek-v3").softmax_scale == pytest.approx(192**-0.5 * V3_MSCALE**2, rel=1e-12)
    assert preset("deepseek-v3").softmax_scale == pytest.approx(0.135234, abs=1e-6)


# ---------------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_matches_transformers(case):
    scaling, max_positions = YARN_CASES[case]
    config = rope_config(scaling, max_positions)
    reference = DeepseekV3Config(**config.to_dict())
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](reference)
    inv_freq, attention_factor = yarn_inverse_frequencies(config)
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(expected_factor, rel=1e-12)
    assert config.softmax_scale == pytest.approx(DeepseekV3Attention(reference, layer_idx=0).scaling, rel=1e-12)


def test_yarn_ramp_ending_past_the_last_dimension_is_clamped_there_as_transformers_clamps_it():
    """A small base puts the dimension that turns beta_slow times past R - 1 (d(1) = 17.7 for base 10, L = 1024,
    R = 16): the ramp then ends at R - 1, in YaRN's code and in transformers, not at R or beyond."""
    scaling = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)
    config = rope_config(scaling, 4096, rope_theta=10.0)
    inv_freq, _ = yarn_inverse_frequencies(config)
    expected = yarn_reference(16, 10.0, 4.0, 1024, beta_fast=32, beta_slow=1, truncate=True)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    expected_inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](DeepseekV3Config(**config.to_dict()))
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------- rotations
def complex_rotation(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x (T, H, R) with pairs (x_2i, x_2i+1) read as complex numbers, each turned by e^(i angle) (T, R/2), float64.

    The form of DeepSeek's reference `apply_rotary_emb` (view_as_complex times polar(1, freqs)).
    """
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # (T, H, R/2)
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def interleave_halves(x: torch.Tensor) -> torch.Tensor:
    """The rotate-half layout's pair (x_i, x_i+R/2) moved to the interleaved places (x_2i, x_2i+1)."""
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    cos, sin = RotaryEmbedding(config)(positions)
    return apply_rotary(x, cos, sin, config.rope_interleave)


def test_interleaved_rotation_is_complex_multiplication_of_adjacent_pairs():
    config = rope_config(YARN_CASES["unequal-mscale-betas"][0])
    x = torch.randn(12, 3, 16)  # (T, H, R)
    positions = torch.arange(100, 112)
    rotary = RotaryEmbedding(config)
    expected = complex_rotation(x, positions.double()[:, None] * rotary.inv_freq.double()) * rotary.attention_factor
    torch.testing.assert_close(rotate(x, positions, config).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "rotate-half"])
def test_rotation_and_its_gradient_are_bit_for_bit_those_of_x_cos_plus_swapped_x_sin(interleaved, dtype):
    # The rotation subtracts x sin's halves in place and has its own backward (the rotation by -angles): both are
    # the float32 sums of the plain formula with a swapped copy of x, differentiated by autograd.
    x, grad = torch.randn(2, 5, 3, 16).to(dtype), torch.randn(2, 5, 3, 16).to(dtype)  # (B, T, H, R)
    cos, sin = rotary_tables(torch.randn(5, 8) * 100, interleaved, scale=1.3)  # (T, R)

    def swapped_copy(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        partner = x32.unflatten(-1, (8, 2)).flip(-1).flatten(-2) if interleaved else x32.roll(8, dims=-1)
        return (x32 * cos.unsqueeze(-2) + partner * sin.unsqueeze(-2)).to(dtype)

    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    rotated, expected = apply_rotary(ours, cos, sin, interleaved), swapped_copy(reference)
    rotated.backward(grad)
    expected.backward(grad)
    assert rotated.dtype == ours.grad.dtype == dtype
    assert torch.equal(rotated, expected) and torch.equal(ours.grad, reference.grad)
    with torch.no_grad():  # inference skips the autograd.Function
        assert torch.equal(apply_rotary(x, cos, sin, interleaved), expected)


@pytest.mark.parametrize("scaling", [None, YARN_V3], ids=["plain", "yarn"])
def test_interleaved_and_rotate_half_layouts_give_the_same_scores(scaling):
    interleaved, rotate_half = rope_config(scaling), rope_config(scaling, rope_interleave=False)
    q, k = torch.randn(10, 4, 16), torch.randn(10, 1, 16)  # (T, H, R), one shared rope key
    positions = torch.arange(500, 510)

    def scores(config: ModelConfig, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # (H, T, T)
        return torch.einsum("thr,shr->hts", rotate(q, positions, config), rotate(k, positions, config))

    half_layout = scores(rotate_half, q, k)
    torch.testing.assert_close(scores(interleaved, interleave_halves(q), interleave_halves(k)), half_layout)
    # Both equal Re(sum_j q_j conj(k_j) e^(i (m - n) theta_j)) with the pairs (x_j, x_j+R/2) as complex numbers.
    q_c, k_c = (torch.complex(x[..., :8].double(), x[..., 8:].double()) for x in (q, k))  # (T, H, R/2)
    inv_freq = RotaryEmbedding(rotate_half).inv_freq.double()
    offsets = positions.double()[:, None] - positions.double()[None, :]  # (T, T): m - n
    turn = torch.polar(torch.ones(10, 10, 8, dtype=torch.float64), offsets[..., None] * inv_freq)  # (T, T, R/2)
    expected = torch.einsum("thj,shj,tsj->hts", q_c, k_c.conj(), turn).real
    torch.testing.assert_close(half_layout.double(), expected, rtol=0, atol=ANGLE_ATOL)


def test_scores_depend_only_on_the_distance_between_positions():
    config = rope_config(YARN_V3)
    q, k = torch.randn(8, 2, 16), torch.randn(8, 1, 16)
    near, far = torch.arange(0, 8), torch.arange(3000, 3008)

    def scores(positions: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thr,shr->hts", rotate(q, positions, config), rotate(k, positions, config))

    torch.testing.assert_close(scores(far), scores(near), rtol=0, atol=ANGLE_ATOL)
    assert not torch.allclose(scores(near), torch.einsum("thr,shr->hts", q, k), atol=1e-2)  # and they do turn


def test_a_bfloat16_model_turns_long_positions_by_the_angles_of_a_float32_one():
    # Rounded to bf16, the inverse frequencies put the angles at position 16000 off by radians (DeepSeek-V3: cos by
    # up to 1.96): the tables stay float32 and the rotation is computed in float32, then rounded to the activations'.
    config = rope_config(YARN_V3, 163840)
    positions = torch.tensor([16000, 100000])
    expected = Transformer(config).rotary(positions)
    cast = Transformer(config).to(torch.bfloat16)
    with torch.device("meta"):
        loaded = Transformer(config)
    loaded = loaded.to(dtype=torch.bfloat16).to_empty(device="cpu")  # as load_pretrained builds a bf16 model
    loaded.reset_rope()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = cast.rotary(positions)
    for tables in (cast.rotary(positions), loaded.rotary(positions), under_autocast):
        assert all(table.dtype == torch.float32 for table in tables)
        torch.testing.assert_close(tables, expected, rtol=0, atol=0)
    q = torch.randn(2, 3, 16).bfloat16()  # (T, H, R)
    rotated = apply_rotary(q, *cast.rotary(positions), config.rope_interleave)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, apply_rotary(q.float(), *expected, config.rope_interleave).bfloat16())


def test_a_yarn_factor_of_null_is_the_context_ratio_as_transformers_infers_it():
    """`factor: null` beside original_max_position_embeddings: transformers computes with max_position_embeddings
    over it (4096 / 512 = 8), so the frequencies and temperature are those of an explicit factor 8."""
    null = rope_config(dict(rope_type="yarn", factor=None, original_max_position_embeddings=512, mscale=1.0), 4096)
    explicit = rope_config(dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512, mscale=1.0), 4096)
    reference = DeepseekV3Config(**null.to_dict())
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](reference)
    inv_freq, attention_factor = yarn_inverse_frequencies(null)
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(expected_factor, rel=1e-12)
    assert null.rope_factor == 8.0
    torch.testing.assert_close(inv_freq, yarn_inverse_frequencies(explicit)[0], rtol=0, atol=0)
    assert null.to_dict()["rope_scaling"]["factor"] is None  # written back as given
