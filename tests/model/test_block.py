"""The training step under bf16 autocast stays close to the float32 one: the loss and every gradient."""

from __future__ import annotations

import torch

import seekstack
from seekstack.model import cpu_kernels


def test_a_bfloat16_autocast_training_step_matches_float32_within_bfloat16s_precision():
    """bf16 autocast keeps float32 weights and the float32 residual stream, and each fused kernel (RMSNorm, SwiGLU,
    causal attention backward, the head's cross-entropy) its float32 math: the loss and every parameter's gradient of
    `tiny` stay within bf16's precision of the float32 step's, in direction and in size."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    config = seekstack.preset("tiny", num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    model = seekstack.Transformer(config).train()  # a dense layer, then a MoE one
    ids = torch.randint(config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(ids, labels=ids, keep_logits=False).loss
        loss.backward()
        steps[dtype] = loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    (loss32, grads32), (loss16, grads16) = steps[torch.float32], steps[torch.bfloat16]
    assert abs(loss16 - loss32) <= 0.01 * loss32
    assert grads16.keys() == grads32.keys() and len(grads32) > 20
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0)
        assert cosine >= 0.98, name  # a token routed to another expert moves the experts' gradients most
        assert 0.95 <= grads16[name].norm() / grad.norm() <= 1.05, name  # the size too: a cosine misses a scale


def test_the_heads_weight_gradient_under_bfloat16_autocast_sums_bfloat16_products_in_float32():
    """The fused head + loss adds each chunk's dL/dW = G^T h (bf16 operands) into the float32 dL/dW with products
    summed in float32 (`add_weight_grad`): a bf16 `mm` rounded each chunk's share to bf16 and `add_` widened it into a
    fresh float32 copy (`small`: 17 -> 7 ms a chunk, six chunks a step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from seekstack.model.head_loss import linear_cross_entropy

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    assert cpu_kernels.available()
    generator = torch.Generator().manual_seed(0)
    grad_out = torch.randn(70, 50, generator=generator).bfloat16()
    rows = torch.randn(70, 40, generator=generator).bfloat16()
    grad_weight = torch.randn(50, 40, generator=generator)
    expected = grad_weight.double() + grad_out.double().t() @ rows.double()
    torch.ops.seekstack.add_weight_grad(grad_weight, grad_out, rows)
    assert (grad_weight.double() - expected).abs().max() <= 1e-5 * expected.abs().max()  # bf16's share: ~4e-3
    hidden = torch.randn(70, 40, generator=generator, requires_grad=True)
    weight = torch.randn(50, 40, generator=generator, requires_grad=True)
    with Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(hidden, weight, torch.randint(50, (70,), generator=generator))
    loss.backward()
    assert "seekstack.add_weight_grad.default" in ops.names and weight.grad.dtype == torch.float32
