"""RMSNorm: its hand-written backward and the fused CPU kernel against autograd through the formula, in float64."""

from __future__ import annotations

import pytest
import torch

import seekstack
from seekstack.model import cpu_kernels
from seekstack.model.norm import RMSNorm


def test_rms_norm_gradients_match_autograd_of_its_formula():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = (torch.randn(3, 5, 48) * 3).requires_grad_()
    upstream = torch.randn(3, 5, 48)
    (norm(x) * upstream).sum().backward()

    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    reference = x64 * torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w64
    (reference * upstream.double()).sum().backward()

    torch.testing.assert_close(norm(x).double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_rms_norm_keeps_bfloat16_inputs_and_gradients_in_bfloat16():
    norm = RMSNorm(16).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    out = norm(x)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_fused_rms_norm_and_its_gradients_match_the_formula_and_switch_off_to_it(dtype, tolerance):
    assert cpu_kernels.available()
    torch.manual_seed(0)
    weight = torch.randn(40)
    x = torch.randn(2, 7, 40) * 3  # 40 values a row: vector steps and a tail
    upstream = torch.randn(2, 7, 40)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    reference = x64 * torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w64
    (reference * upstream.double()).sum().backward()
    for fused in (True, False):
        cpu_kernels.set_enabled(fused)
        try:
            norm = RMSNorm(40).to(dtype)
            with torch.no_grad():
                norm.weight.copy_(weight)
            xd = x.to(dtype, copy=True).requires_grad_()
            out = norm(xd)
            (out * upstream.to(dtype)).sum().backward()
            with torch.no_grad():
                inference = norm(xd)
        finally:
            cpu_kernels.set_enabled(True)
        assert (type(out.grad_fn).__name__ == "_FusedRMSNormBackward") == fused
        assert out.dtype == xd.grad.dtype == norm.weight.grad.dtype == dtype
        assert torch.equal(inference, out.detach())
        for ours, theirs in ((out, reference), (xd.grad, x64.grad), (norm.weight.grad, w64.grad)):
            scale = theirs.abs().max().item()
            assert (ours.double() - theirs).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_a_float32_norm_under_bfloat16_autocast_gives_bfloat16_rows_with_or_without_the_kernel(fused):
    """MLA's latent norms get bf16 rows from an autocast linear and keep a float32 weight: they took torch's eager
    passes (widen, square, mean, rsqrt, scale, narrow, times the weight into float32, ~6 ms a `small` layer forward +
    backward against the kernel's ~1) and handed the next linear float32 rows to narrow back. Without the kernel
    (switched off, compiled, a GPU, rows strided along a row) the rows came back float32 where the kernel's are bf16."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    norm = RMSNorm(40)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))
    x = (torch.randn(2, 7, 40) * 3).bfloat16().requires_grad_()  # 40 values a row: vector steps and a tail
    upstream = torch.randn(2, 7, 40)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    reference = x64 * torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * w64
    (reference * upstream.double()).sum().backward()
    cpu_kernels.set_enabled(fused)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
            with torch.no_grad():
                inference = norm(x)
        (out * upstream.bfloat16()).sum().backward()
    finally:
        cpu_kernels.set_enabled(True)
    assert (type(out.grad_fn).__name__ == "_FusedRMSNormBackward") == fused
    assert out.dtype == inference.dtype == x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    assert torch.equal(inference, out.detach())
    for ours, theirs in ((out, reference), (x.grad, x64.grad), (norm.weight.grad, w64.grad)):
        assert (ours.double() - theirs).abs().max().item() <= 0.05 * theirs.abs().max().item()  # bf16 keeps 8 bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_of_an_input_transposed_along_a_row_matches_the_formula(dtype):
    assert cpu_kernels.available()
    x = torch.randn(40, 7, dtype=dtype).T  # (7, 40), a row's values a column apart
    expected = x.double() * torch.rsqrt(x.double().pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = RMSNorm(40).to(dtype)(x)
        assert (out.double() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


def test_the_fused_ops_take_cpu_tensors_of_one_float32_or_bfloat16_dtype_each_contiguous_along_a_row():
    assert cpu_kernels.available()
    rows, weight = torch.randn(3, 40), torch.randn(40)
    assert cpu_kernels.elementwise_takes(rows, weight) and cpu_kernels.elementwise_takes(rows.bfloat16())
    refused = {
        "float64": (rows.double(), weight.double()),
        "two dtypes": (rows, weight.bfloat16()),
        "a second tensor transposed": (rows, torch.randn(40, 3).T),
        "a meta tensor first": (rows.to("meta"), weight),
        "a meta tensor second": (rows, weight.to("meta")),
    }
    assert [case for case, tensors in refused.items() if cpu_kernels.elementwise_takes(*tensors)] == []
    cpu_kernels.set_enabled(False)
    try:
        assert not cpu_kernels.elementwise_takes(rows, weight)
    finally:
        cpu_kernels.set_enabled(True)


def test_a_transformers_hidden_states_from_the_fused_norm_are_a_tensor_of_their_own_not_a_view():
    """The kernel's rows (n, D) came back as a view shaped like x, so the model's output hidden_states (the final
    norm's) was a view, which FSDP2 warns of ("returned a view tensor") on every step."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    config = seekstack.preset("tiny", num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)
    model = seekstack.Transformer(config)
    ids = torch.randint(config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            hidden = model(ids).hidden_states
        assert hidden.shape == (2, 8, config.hidden_size) and hidden._base is None, grad
        assert (type(hidden.grad_fn).__name__ == "_FusedRMSNormBackward") == grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_norm_weight_gets_the_same_input_gradient_and_no_weight_gradient_pass(dtype, monkeypatch):
    """LoRA freezes every norm: the fused backward summed dL/dw over every row anyway, to be thrown away."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    norm = RMSNorm(40).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40))
    x = torch.randn(2, 7, 40, dtype=dtype) * 3  # 40 values a row: vector steps and a tail
    upstream = torch.randn(2, 7, 40, dtype=dtype)
    kernel, weight_grad_asked = torch.ops.seekstack.rms_norm_backward, []

    def backward(*args):
        weight_grad_asked.append(args[-1])
        return kernel(*args)

    monkeypatch.setattr(torch.ops.seekstack, "rms_norm_backward", backward)
    grads = []
    for trainable in (True, False):
        norm.weight.requires_grad_(trainable)
        xd = x.clone().requires_grad_()
        (norm(xd) * upstream).sum().backward()
        grads.append(xd.grad)
    assert weight_grad_asked == [True, False]
    assert torch.equal(grads[0], grads[1]) and norm.weight.grad is not None  # the trainable pass's, not the frozen's
    y, rstd = torch.ops.seekstack.rms_norm(x, norm.weight, 1e-6)
    grad_x, grad_weight = kernel(upstream, x, norm.weight, rstd, False)
    assert grad_weight is None and torch.equal(grad_x, grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_a_row_whose_squares_overflow_float32_normalizes_to_nan_not_to_zeros(fused, dtype):
    """Values past ~1e19 square to inf, and rsqrt(inf) = 0 made the row all zeros, which reads as a plain row (an
    adapter's huge lora_alpha: every logit 0, greedy token 0, no error); it is NaN on both paths, so the engine ends
    that request with an error, and the other rows come out as they do alone."""
    torch.manual_seed(0)
    norm = RMSNorm(40).to(dtype)
    rows = torch.randn(3, 40).to(dtype)  # 40 values a row: vector steps and a tail
    rows[1] *= 1e20
    cpu_kernels.set_enabled(fused)
    try:
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                out, alone = norm(rows).detach(), norm(rows[[0, 2]]).detach()
            assert out[1].isnan().all() and torch.equal(out[[0, 2]], alone)
    finally:
        cpu_kernels.set_enabled(True)
