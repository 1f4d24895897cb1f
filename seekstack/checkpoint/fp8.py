"""FP8 block quantization as DeepSeek-V3's release stores it: e4m3 weights with a float32 `weight_scale_inv` per
128x128 block, and which of a checkpoint's keys that release quantizes."""

from __future__ import annotations

import math

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
DEFAULT_FP8_BLOCK = (128, 128)


def fp8_format(block: tuple[int, int] | None) -> str:
    """How quantize names an fp8 layer's format: `fp8 RxC`, its scale block; `fp8` for a layer of no block (a
    compressed-tensors float-quantized one, scaled per row or tensor)."""
    return "fp8" if block is None else f"fp8 {block[0]}x{block[1]}"


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int], parts: int = 1) -> tuple[int, ...]:
    """The `weight_scale_inv` shape of an e4m3 weight of `shape` (..., rows, columns): a scale per block, edge blocks
    partial, for each of `parts` matrices stacked by rows (an expert's [W_gate; W_up])."""
    *leading, rows, cols = shape
    return (*leading, parts * math.ceil(rows // parts / block[0]), math.ceil(cols / block[1]))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = Q * s for each block (edge blocks partial); scale_inv is (ceil(out/b0), ceil(in/b1)) float32, else
    ValueError."""
    rows, cols = weight.shape
    expected = fp8_scale_shape((rows, cols), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}; a ({rows}, {cols}) e4m3 weight in {block} blocks takes "
            f"{expected}"
        )
    return weight.float() * per_element_scales(scale_inv.float(), (rows, cols), block)


def per_element_scales(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Block values `scale` (..., ceil(rows / block[0]), ceil(columns / block[1])) expanded to a weight of `shape`
    (..., rows, columns), each element its block's value (edge blocks partial), in `scale`'s dtype (cast it first).
    By index_select: nothing larger than the weight is made, where repeating each value a whole block and cutting
    makes (rows, columns) rounded up to whole blocks (a block past the weight: all of it), and advanced indexing
    (scale[..., rows, :][..., columns]) is twice as slow."""
    rows = torch.arange(shape[-2], device=scale.device) // block[0]
    columns = torch.arange(shape[-1], device=scale.device) // block[1]
    return scale.index_select(-2, rows).index_select(-1, columns)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantization: per block s = amax / 448, Q = W / s. Returns (Q, s) as DeepSeek stores them."""
    rows, cols = weight.shape
    block = _within(block, rows, cols)
    pad_rows, pad_cols = -rows % block[0], -cols % block[1]
    padded = torch.nn.functional.pad(weight.float(), (0, pad_cols, 0, pad_rows))
    blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (row blocks, col blocks)
    quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized, scale


def _within(block: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """`block` cut to a (rows, cols) weight's sides: a block longer than a side covers it with one partial block, the
    same scales, so padding to the whole block would only take memory (a (10^5, 10^5) block: 40 GB). An
    empty side keeps a block of 1: no blocks along it, no scales."""
    return min(block[0], max(rows, 1)), min(block[1], max(cols, 1))


def _is_fp8_quantizable(key: str, tensor: torch.Tensor) -> bool:
    """DeepSeek's FP8 release quantizes the block projections (kv_a_proj_with_mqa too), not embeddings, head or gate,
    nor MTP's eh_proj (vLLM reads it as a plain Linear)."""
    projection = key.endswith(("_proj.weight", "_proj_with_mqa.weight")) and not key.endswith(".eh_proj.weight")
    return tensor.dim() == 2 and key.startswith("model.layers.") and projection
