"""Quantization arithmetic and bit layouts: int8 per channel, int4 per group, both packed into int32 words as
compressed-tensors' pack-quantized format has them; fp8 blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from seekstack.checkpoint import dequantize_fp8, quantize_fp8
from seekstack.compress.formats import (
    dequantize_int,
    fake_quantize,
    pack_codes,
    quantize_int4,
    quantize_int8,
    unpack_codes,
)
from seekstack.compress.linear import Fp8Weight, Int4Weight, Int8Weight


def test_int4_packing_puts_element_2j_in_the_low_nibble_offset_by_8():
    q = torch.tensor([[-8, 7, 0, -1, 3, -3, 1, 2]], dtype=torch.int8)
    packed = pack_codes(q, 4)
    # (-8+8) | (7+8)<<4 = 0xF0; (0+8) | (-1+8)<<4 = 0x78; (3+8) | (-3+8)<<4 = 0x5B; (1+8) | (2+8)<<4 = 0xA9
    assert packed.view(torch.uint8).tolist() == [[0xF0, 0x78, 0x5B, 0xA9]]
    assert torch.equal(unpack_codes(packed, 4), q)


def test_int8_packing_stores_each_code_plus_128_in_one_byte_of_the_word():
    q = torch.tensor([[-127, 127, 0, -1]], dtype=torch.int8)
    packed = pack_codes(q, 8)
    assert packed.dtype == torch.int32 and packed.view(torch.uint8).tolist() == [[1, 255, 128, 127]]
    assert torch.equal(unpack_codes(packed, 8), q)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors_int32_words(bits):
    """compressed-tensors packs 32/bits values per int32, value i at bits `bits` x i: on a little-endian machine, our
    bytes; its unpacking reads our words back."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    half = 1 << (bits - 1)
    q = torch.randint(-half + (bits == 8), half, (6, 64), dtype=torch.int8)
    assert torch.equal(pack_codes(q, bits), pack_to_int32(q, bits))
    assert torch.equal(unpack_from_int32(pack_codes(q, bits), bits, q.shape), q)


def test_packing_refuses_a_row_that_does_not_fill_whole_words():
    with pytest.raises(ValueError, match="6 input features do not fill whole int32 words of 4 int8 codes"):
        pack_codes(torch.zeros(2, 6, dtype=torch.int8), 8)


def test_int8_error_is_at_most_half_a_step_of_each_row():
    weight = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different sizes
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (48, 1)
    error = (dequantize_int(q, scale) - weight).abs()
    assert (error <= scale.float() * 0.5 * (1 + 1e-3)).all()
    assert q.abs().amax(dim=1).min() >= 126  # each row uses its whole range


def test_int4_scales_are_per_group_of_input_columns():
    weight = torch.randn(32, 128)
    weight[:, 64:96] *= 100  # one loud group
    q, scale = quantize_int4(weight, group=32)
    assert scale.shape == (32, 4)
    assert (scale[:, 2].float() > 20 * scale[:, [0, 1, 3]].float().amax(dim=1)).all()
    error = (dequantize_int(q, scale) - weight).abs()
    # half a step, plus what clipping +amax to code 7 costs when the bf16 scale rounded down (<= 0.4% of 7.5 steps)
    assert (error <= scale.float().repeat_interleave(32, dim=1) * 0.55).all()
    assert q.min() >= -8 and q.max() <= 7


def test_int4_step_is_a_groups_amax_over_7_5_so_minus_amax_takes_code_minus_8():
    """The 16 codes span [-amax, amax] (the module docstring's s = amax / 7.5): -amax rounds to -8, +amax to 7 (an
    amax of 3.75, whose step 0.5 bfloat16 holds exactly)."""
    weight = torch.tensor([[-3.75, 1.0, 0.5, 0.25, 3.75, 0.0, 0.0, 0.0]])
    q, scale = quantize_int4(weight, group=8)
    assert scale.float().item() == 0.5
    assert (q[0, 0].item(), q[0, 4].item()) == (-8, 7)


def test_int4_codes_read_back_exactly_from_the_kernel_tiling():
    weight = torch.randn(3, 32, 64)  # a stack of experts
    q, scale = quantize_int4(weight, 32)
    stored = Int4Weight(q, scale)
    assert torch.equal(stored.codes(), q)
    assert torch.equal(stored.scale(), scale)


def test_each_format_dequantizes_what_its_matmul_multiplies():
    x = torch.randn(5, 128)
    weight = torch.randn(64, 128) * 0.05
    for stored in (
        Int8Weight.from_float(weight),
        Int4Weight.from_float(weight, 32),
        Fp8Weight.from_float(weight, (128, 128)),
    ):
        expected = x.bfloat16().float() @ stored.dequantize().t()
        out = stored.matmul(stored.lower(x)).float()
        assert torch.allclose(out, expected, rtol=2e-2, atol=2e-2), stored.scheme  # bf16 activations
        assert (stored.dequantize() - weight).abs().max() < weight.abs().max() / 6  # int4's coarsest step is 1/7.5


def test_stacked_fp8_gate_and_up_keep_their_own_edge_blocks():
    gate_up = torch.randn(2, 2 * 136, 160)  # 136 rows each: a full and a partial block per matrix
    stored = Fp8Weight.from_float(gate_up, (128, 128), parts=2)
    assert stored.weight_scale_inv.shape == (2, 4, 2)  # per expert: 2 row blocks for gate + 2 for up
    for e in range(2):
        for rows in (slice(0, 136), slice(136, 272)):
            expected = dequantize_fp8(*quantize_fp8(gate_up[e, rows]), (128, 128))
            assert torch.equal(stored.dequantize()[e, rows], expected)


def test_quantized_weights_keep_their_dtypes_when_the_model_is_cast():
    module = torch.nn.ModuleDict(
        {"w": Int8Weight.from_float(torch.randn(16, 32)), "f": Fp8Weight.from_float(torch.randn(16, 32), (128, 128))}
    )
    module.to(torch.float32)
    assert module["w"].weight.dtype == torch.int8 and module["w"].weight_scale.dtype == torch.bfloat16
    assert module["f"].weight.dtype == torch.float8_e4m3fn


def test_expert_kernel_operands_are_views_that_follow_the_buffers_when_moved_or_copied():
    stacked = torch.randn(3, 32, 64) * 0.05
    x = torch.randn(4, 64)
    for stored in (Int8Weight.from_float(stacked), Int4Weight.from_float(stacked, 32)):
        buffers = [stored.get_buffer(name) for name in stored.operand_names]
        for e in range(3):
            assert all(
                view.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()  # no second copy
                for view, whole in zip(stored.expert_operands[e], buffers, strict=True)
            )
            expected = x.bfloat16().float() @ stored.dequantize()[e].t()
            assert torch.allclose(stored.matmul(stored.lower(x), e).float(), expected, rtol=2e-2, atol=2e-2)
        copied = copy.deepcopy(stored)
        assert copied.expert_operands[2][0].data_ptr() == copied.get_buffer(stored.operand_names[0])[2].data_ptr()
        stored.to("meta")
        assert all(t.is_meta for operands in [stored.operands, *stored.expert_operands] for t in operands)


def tensors_made(run) -> list[torch.Tensor]:
    """Each tensor the torch operations of `run()` make, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made: list[torch.Tensor] = []

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(tensor for tensor in torch.utils._pytree.tree_leaves(out) if isinstance(tensor, torch.Tensor))
            return out

    with Made():
        run()
    return made


@pytest.mark.parametrize("block", [(4, 8), (2**20, 2**20)])
def test_fake_quantize_by_blocks_expands_the_scales_to_the_weight_and_no_further(block):
    """Each element takes its block's scale, the edge blocks partial, as compressed-tensors' fake_quantize gives; the
    scales were repeated a whole block each and cut, making (O, I) rounded up to whole blocks first: 6 x 16 here for
    a (6, 10) weight, and 6 x 2**20 for a block past the weight (4 TB for a block of 2**40)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as theirs

    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(-(-6 // block[0]), -(-10 // block[1]), generator=torch.Generator().manual_seed(1)) / 50 + 0.01
    args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "block", "block_structure": list(block)}
    outs = []
    made = tensors_made(lambda: outs.append(fake_quantize(weight, scale, None, args, block)))
    ours = outs[0]
    assert max(tensor.numel() for tensor in made) == weight.numel()
    if block == (4, 8):  # compressed-tensors pads to whole blocks itself
        assert torch.equal(
            ours, theirs(weight, scale, torch.zeros_like(scale, dtype=torch.int8), QuantizationArgs(**args))
        )
    else:  # one block holds the whole weight: one scale
        assert torch.equal(ours, (weight / scale).round().clamp(-128, 127) * scale)


@pytest.mark.parametrize("block", [(4, 8), (2**20, 2**20)])
def test_dequantize_fp8_expands_the_scales_to_the_weight_and_no_further(block):
    """dequantize_fp8 expands its block scales as fake_quantize does (per_element_scales): each element its block's
    scale, edge blocks partial, nothing made larger than the weight (repeating each scale a whole block and cutting
    made 6 x 16 for this (6, 10) weight in 4 x 8 blocks)."""
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-6 // block[0]), -(-10 // block[1]), generator=torch.Generator().manual_seed(1)) + 0.5
    outs = []
    made = tensors_made(lambda: outs.append(dequantize_fp8(weight, scale, block)))
    assert max(tensor.numel() for tensor in made) == weight.numel()
    row, column = torch.meshgrid(torch.arange(6), torch.arange(10), indexing="ij")
    assert torch.equal(outs[0], weight.float() * scale[row // block[0], column // block[1]])


def test_fake_quantize_expands_the_scales_and_zero_points_in_the_weights_dtype():
    """A bfloat16 weight's float32 block scales and int8 zero points are cast before they are expanded to the weight:
    each (O, I) tensor fake_quantize makes is bfloat16, none a float32 or int8 one cast afterwards (twice the
    memory and a second pass over the weight for the float32 scales)."""
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)).bfloat16()
    scale = torch.rand(2, 2, generator=torch.Generator().manual_seed(1)) / 50 + 0.01
    zero_point = torch.tensor([[1, -2], [0, 3]], dtype=torch.int8)
    args = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "block", "block_structure": [4, 8]}
    made = tensors_made(lambda: fake_quantize(weight, scale, zero_point, args, (4, 8)))
    assert {tensor.dtype for tensor in made if tensor.numel() == weight.numel()} == {torch.bfloat16}
