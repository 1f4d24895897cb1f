"""DeepSeek-V3's fp8 blocks: quantize_fp8 and dequantize_fp8."""

from __future__ import annotations

import torch

from seekstack.checkpoint import dequantize_fp8, quantize_fp8


def test_a_block_longer_than_the_weight_is_one_partial_block_without_padding_the_weight_to_it():
    """quantize_fp8 padded a weight to whole blocks and dequantize_fp8 expanded the scales to them, so a block longer
    than a weight's sides took the block's memory: `seekstack quantize` with fp8_block [100000, 100000] failed
    allocating 40 GB for a (64, 96) down_proj. One partial block covers such a side, with the same scale."""
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    huge = (2**20, 2**20)  # padded, a 4 TiB float32 matrix
    q, scale = quantize_fp8(weight, huge)
    q_whole, scale_whole = quantize_fp8(weight, (48, 80))
    assert scale.shape == (1, 1) and torch.equal(scale, scale_whole)
    assert scale.item() == (weight.abs().max() / 448).item()
    assert torch.equal(q.float(), q_whole.float())
    assert torch.equal(dequantize_fp8(q, scale, huge), dequantize_fp8(q_whole, scale_whole, (48, 80)))
    rows_only = (2**20, 32)  # one block of rows, three of columns (the last partial)
    q, scale = quantize_fp8(weight, rows_only)
    assert scale.shape == (1, 3) and scale[0, 2].item() == (weight[:, 64:].abs().max() / 448).item()
    assert torch.equal(dequantize_fp8(q, scale, rows_only), dequantize_fp8(*quantize_fp8(weight, (48, 32)), (48, 32)))
