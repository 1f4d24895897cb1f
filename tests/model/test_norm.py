"""RMSNorm: its hand-written backward against autograd through the formula, in float64."""

from __future__ import annotations

import torch

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
