"""Root-mean-square layer normalisation (Zhang & Sennrich 2019), computed in float32.

The normalisation has a hand-written backward, fewer passes over x than autograd through pow / mean / rsqrt
(tiny's training step is ~4% faster). With n = x r, r = 1 / sqrt(mean(x^2) + eps), g = dL/dn:
dL/dx = r (g - n mean(g n)). On a CPU, float32 or bfloat16, `rms_norm` in seekstack/model/cpu_kernels.cpp does the
forward (weight included) and the backward in one pass each over a row, bfloat16 rows with a float32 weight too (under
autocast, MLA's latent norms after a bf16 linear). The output is in x's dtype on every path (bf16 there, as the next
linear takes it), with the kernel or without (switched off, a compiled region, a GPU, rows strided along a row). A row
whose squares overflow float32 (values past ~1e19: an adapter's huge lora_alpha) comes out NaN on every path, not as
rsqrt(inf) = 0's all-zero row, which read as a plain one: the NaN reaches its logits, and the engine ends that request.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from seekstack.model import cpu_kernels


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def takes_kernel(self, x: torch.Tensor) -> bool:
        """Whether x's rows take the C++ `rms_norm`: a weight of x's dtype, or a float32 one scaling bf16 rows
        (autocast), where `elementwise_takes` says the kernels take them."""
        weight = self.weight
        return cpu_kernels.elementwise_takes(x, weight) or (
            weight.dtype == torch.float32 and cpu_kernels.elementwise_takes(x) and cpu_kernels.elementwise_takes(weight)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_kernel(x):
            if torch.is_grad_enabled():
                return _FusedRMSNorm.apply(x, self.weight, self.eps)
            return torch.ops.seekstack.rms_norm(x, self.weight, self.eps)[0]
        if torch.is_grad_enabled():
            return (self.weight * _Normalize.apply(x, self.eps)).to(x.dtype)
        return (self.weight * _normalize(x, self.eps)[0].to(x.dtype)).to(x.dtype)  # inference: no autograd.Function


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / sqrt(mean(x^2) + eps) and 1 / sqrt(mean(x^2) + eps), both float32."""
    x32 = x.float()
    mean_square = x32.pow(2).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(mean_square + eps).masked_fill_(mean_square.isinf(), torch.nan)  # overflowed: NaN
    return x32 * rstd, rstd


class _Normalize(torch.autograd.Function):
    """x (..., D) -> x / sqrt(mean(x^2) + eps) in float32, returned in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        normed, rstd = _normalize(x, eps)
        ctx.save_for_backward(normed, rstd)
        return normed.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        normed, rstd = ctx.saved_tensors
        g = grad.float()
        grad_x = (g - normed * (g * normed).mean(dim=-1, keepdim=True)) * rstd
        return grad_x.to(grad.dtype), None


class _FusedRMSNorm(torch.autograd.Function):
    """x (..., D), weight (D,) -> x r weight through the C++ kernels, r = 1 / sqrt(mean(x^2) + eps) saved per row; the
    output is a tensor of its own, not a view (FSDP2 warns of a module's output that is one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        y, rstd = torch.ops.seekstack.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors  # a frozen weight (LoRA freezes every norm) gets no dw pass
        grad_x, grad_weight = torch.ops.seekstack.rms_norm_backward(grad, x, weight, rstd, ctx.needs_input_grad[1])
        return grad_x, grad_weight, None
