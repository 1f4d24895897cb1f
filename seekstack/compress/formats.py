"""Weight quantization formats: the arithmetic and the on-disk layout, nothing about modules.

int8: symmetric per output channel, W ~ q * s with q in [-127, 127], s = amax(row) / 127.
int4: symmetric per group of `group` input columns, W ~ q * s with q in [-8, 7], s = amax(group) / 7.5.
Both are stored in compressed-tensors' `pack-quantized` layout (what vLLM's weight-only kernels and transformers read,
MoE experts included): each code as the unsigned q + 2^(bits-1), 32/bits codes per little-endian int32 word, the
first in the lowest bits; so int4 is two codes per byte, low nibble first, and int8 one code per byte.
fp8:  e4m3 with one float32 scale per 128x128 block (DeepSeek-V3's release; see seekstack.checkpoint).
Scales of int8/int4 are bfloat16: the CPU kernels (`torch._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
take them so, and storing them so makes the file and the kernel agree exactly.

Shapes: O output features (rows), I input features (columns), G groups per row = I / group; a leading
expert dimension E is allowed everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from seekstack.checkpoint.fp8 import per_element_scales

SCALE_DTYPE = torch.bfloat16
INT8_MAX = 127
INT4_HALF_RANGE = 7.5  # amax maps to 7.5: the step is amax / 7.5 and +amax rounds into the top code 7 or 8 -> 7
SCHEMES = ("int8", "int4", "fp8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., O, I) float -> q (..., O, I) int8 and s (..., O, 1) bf16, per output channel."""
    scale = (weight.float().abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=1e-12).to(SCALE_DTYPE)
    q = (weight.float() / scale.float()).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., O, I) float -> q (..., O, I) int8 in [-8, 7] and s (..., O, G) bf16, one scale per `group` columns."""
    *lead, rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"int4 group size {group} does not divide the {cols} input features")
    grouped = weight.float().reshape(*lead, rows, cols // group, group)
    scale = (grouped.abs().amax(dim=-1) / INT4_HALF_RANGE).clamp(min=1e-12).to(SCALE_DTYPE)  # (..., O, G)
    q = (grouped / scale.float()[..., None]).round().clamp(-8, 7).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """W = q * s, float32; s is (..., O, 1) per channel or (..., O, G) per group. With `zero_point` z, of s's shape
    (compressed-tensors' asymmetric weights), W = (q - z) * s."""
    group = q.shape[-1] // scale.shape[-1]
    codes = q.float() if zero_point is None else q.float() - zero_point.float().repeat_interleave(group, dim=-1)
    return codes * scale.float().repeat_interleave(group, dim=-1)


def fake_quantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: dict[str, Any],
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """compressed-tensors' quantize-dequantize of a float `weight` (O, I) by its stored scales, which its forward runs
    on each weight of quantization_status "frozen" (a checkpoint saved uncompressed): q = round(W / s + z), clamped to
    the range of `args` (int of `num_bits`, or float8 e4m3), then (q - z) x s (its `_quantize_dequantize`), in
    `weight`'s dtype (give it in the model's: transformers holds weight and scales in it, and rounds there).
    `scale` and `zero_point` are (O, G), one per row and group of columns, or, with `block` (rows, columns),
    (ceil(O / rows), ceil(I / columns)), one per block."""

    def per_element(tensor: torch.Tensor) -> torch.Tensor:
        if block is None:
            return tensor.repeat_interleave(weight.shape[-1] // tensor.shape[-1], dim=-1)
        return per_element_scales(tensor, tuple(weight.shape), block)

    # cast before expanding: the (O, I) scales made once, in the weight's dtype
    scale = per_element(scale.to(weight.dtype))
    zero_point = per_element(zero_point.to(weight.dtype)) if zero_point is not None else None
    scaled = weight / scale
    if zero_point is not None:
        scaled = scaled + zero_point
    q_min, q_max = _code_range(args)
    if args.get("type") == "float":
        rounded = scaled.clamp(q_min, q_max).to(torch.float8_e4m3fn).to(scaled.dtype)
    else:
        rounded = scaled.clamp(q_min, q_max).round()
    if zero_point is not None:
        rounded = rounded - zero_point
    return rounded * scale


def _code_range(args: dict[str, Any]) -> tuple[float, float]:
    """The least and greatest code of quantization `args`: float8 e4m3's +-448, or a signed int's of num_bits."""
    if args.get("type") == "float":
        return -torch.finfo(torch.float8_e4m3fn).max, torch.finfo(torch.float8_e4m3fn).max
    return -(2.0 ** (args["num_bits"] - 1)), 2.0 ** (args["num_bits"] - 1) - 1


def dynamic_scales(weight: torch.Tensor, args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales (O, G), or (1, 1) under strategy "tensor", and zero points (None where symmetric) compressed-tensors
    computes from a float `weight` (O, I) of dynamic quantization args (`dynamic: true`, no scales stored) before it
    fake-quantizes it: its min-max over each group of `group_size` columns or the whole matrix, widened to hold 0,
    s = amax / (range / 2) or, asymmetric, (max - min) / range with z = round(q_min - min / s) in the int range;
    rounded to `scale_dtype` where the args set one (`calculate_qparams`), in `weight`'s dtype."""
    q_min, q_max = _code_range(args)
    if args.get("strategy") == "group":
        grouped = weight.unflatten(-1, (weight.shape[-1] // args["group_size"], args["group_size"]))
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        low, high = (bound.reshape(1, 1) for bound in torch.aminmax(weight))
    low, high = low.clamp(max=0), high.clamp(min=0)
    bit_range = torch.tensor(q_max - q_min).to(weight.dtype)
    if args.get("symmetric", True):
        scale, zero_point = torch.max(low.abs(), high.abs()) / (bit_range / 2), None
    else:
        scale = (high - low) / bit_range
        zero_point = torch.clamp(q_min - low / scale, q_min, q_max)
    if args.get("scale_dtype") is not None:
        scale_dtype = getattr(torch, str(args["scale_dtype"]).removeprefix("torch."))
        scale = scale.clamp(torch.finfo(scale_dtype).min, torch.finfo(scale_dtype).max).to(scale_dtype).to(scale.dtype)
    else:
        scale_dtype = scale.dtype
    epsilon = 0.125 if scale_dtype == torch.float8_e4m3fn else torch.finfo(scale_dtype).eps
    scale = torch.where(scale == 0, torch.tensor(epsilon, dtype=scale.dtype), scale)
    if zero_point is not None:
        zero_point = zero_point.round().to(torch.int8)  # in the int range already
    return scale, zero_point


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q (..., O, I) int8 codes of `bits` (4 or 8) bits -> (..., O, I * bits / 32) int32 words, pack-quantized."""
    if q.shape[-1] % (32 // bits):
        raise ValueError(f"{q.shape[-1]} input features do not fill whole int32 words of {32 // bits} int{bits} codes")
    unsigned = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        unsigned = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    return unsigned.contiguous().view(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: (..., O, W) int32 -> (..., O, W * 32 / bits) int8 codes."""
    unsigned = words.contiguous().view(torch.uint8)
    if bits == 4:
        unsigned = torch.stack((unsigned & 0xF, unsigned >> 4), dim=-1).flatten(-2)
    return (unsigned.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def compressed_tensors_config(
    groups: dict[str, tuple[str, int | None, list[str]]], ignore: list[str], packed_int8: bool = True
) -> dict:
    """A compressed-tensors `quantization_config` (what vLLM and the `compressed-tensors` library read).

    `groups` maps a group name to (scheme, group size, targets); targets are module names as `re:` patterns.
    Weight-only, symmetric, in the `pack-quantized` format (vLLM runs weight-only int8 only in it, and transformers
    reads MoE experts only in it), or int8 in `int-quantized` (one code per int8) unless `packed_int8`.
    """
    config_groups: dict[str, Any] = {}
    formats = set()
    for name, (scheme, group, targets) in groups.items():
        weights: dict[str, Any] = {"num_bits": 8 if scheme == "int8" else 4, "type": "int", "symmetric": True}
        weights.update({"strategy": "channel"} if scheme == "int8" else {"strategy": "group", "group_size": group})
        layout = "int-quantized" if scheme == "int8" and not packed_int8 else "pack-quantized"
        formats.add(layout)
        config_groups[name] = {"targets": targets, "weights": weights, "input_activations": None, "format": layout}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
    }
