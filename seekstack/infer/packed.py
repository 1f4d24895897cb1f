"""Decode-time layout of the output head: the BLAS call its few rows are fastest in, on a CPU.

A decode step multiplies a few token rows x (M, D) by the head's weight W (V, D), the largest matrix the step reads.
On a CPU, float32 (MKL, 1 thread, AMD Zen 3, micro-benches of these calls on the `small` head):
- one row, x W^T with W row-major (F.linear) streams W at ~3 GB/s; x @ W_t, with W^T stored contiguous, at ~7-8 GB/s;
- 2-16 rows, (W x^T)^T, the weight as the product's first operand, beats F.linear 1.3-2x, needing no copy;
- more rows (prefill chunks) keep F.linear, the call not measured against the others there.
So the head keeps W^T beside W (`weight_t`, outside the state dict): V x D more bytes, 25 MB on `small`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.model.transformer import Transformer

WEIGHT_FIRST_MAX_ROWS = 16  # up to here (W x^T)^T; beyond it F.linear (measured at 4, 8 and 16 rows)


@torch.library.custom_op("seekstack::decode_head", mutates_args=())
def decode_head(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x (M, D) W^T -> (M, V) in the BLAS call fastest for M rows. An op of its own, so that a compiled decode step,
    whose batch size is unbacked (one graph for every batch), still picks the call by the rows it runs on."""
    rows = x.shape[0]
    if rows == 1:
        return x @ weight_t
    if rows <= WEIGHT_FIRST_MAX_ROWS:
        return (weight @ x.t()).t().contiguous()
    return F.linear(x, weight)


@decode_head.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class DecodeHead(nn.Linear):
    """The output head (an nn.Linear: same parameter, same state dict) with W^T kept contiguous for one-row products.

    `weight_t` is a copy: after changing the weight in place, call `repack` (Engine.reset_prefix_cache does)."""

    weight_t: torch.Tensor

    @classmethod
    def adapt(cls, head: nn.Linear) -> DecodeHead:
        """Turn `head` into a DecodeHead in place and pack its weight."""
        head.__class__ = cls
        assert isinstance(head, DecodeHead)
        head.repack()
        return head

    @torch.no_grad()
    def repack(self) -> None:
        """Copy the weight's current values into `weight_t` (in, out), in place once it exists: a compiled step keeps
        reading the same buffer."""
        packed = getattr(self, "weight_t", None)
        if packed is not None and packed.shape == self.weight.t().shape:
            packed.copy_(self.weight.t())
        else:
            self.register_buffer("weight_t", self.weight.detach().t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., V); F.linear where gradients flow (`weight_t` is a copy outside autograd)."""
        if torch.is_grad_enabled():
            return F.linear(x, self.weight)
        return decode_head(x.reshape(-1, x.shape[-1]), self.weight, self.weight_t).view(*x.shape[:-1], -1)


def pack_for_decode(model: Transformer) -> int:
    """Give a float32 CPU model's output head its decode layout (`DecodeHead`); the extra bytes it holds then. Other
    heads are left as they are (0): quantized, biased or adapter-wrapped ones keep their own forward, and the
    layout's gain is measured on CPU float32 only."""
    head = model.lm_head
    if not (type(head) is nn.Linear and head.bias is None):
        return 0
    if head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return 0
    DecodeHead.adapt(head)
    return head.weight_t.numel() * head.weight_t.element_size()


def repack(model: nn.Module) -> None:
    """Refresh every `DecodeHead` copy in `model` from its weight (after the weights changed in place)."""
    for module in model.modules():
        if isinstance(module, DecodeHead):
            module.repack()
