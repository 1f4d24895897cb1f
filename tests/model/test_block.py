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
