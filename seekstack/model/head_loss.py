"""The output head fused with what is made of its logits, a chunk of rows at a time: the cross-entropy
(pre-training, SFT) and each row's token log-probability and entropy (GRPO).

loss = 1/n sum over rows with a target of -log softmax(h W^T)[target], n = rows with a target.
Made whole, the (N, V) logits, their log-softmax and its backward are several passes over an array far larger
than the cache. Here each chunk's logits are turned at once into the loss and into the gradient of the
logits, (softmax - onehot) / n, which goes straight into dL/dh = G W and dL/dW = G^T h while still in cache.
The gradients are therefore computed in the forward (when autograd will want them) and only scaled by the
incoming gradient in the backward. Arithmetic is float32 whatever the model dtype, but under autocast the logits
and dL/dh multiply in the autocast dtype, as an autocast nn.Linear head would (each chunk's rows its own: nothing
summed across chunks in it), and so does each chunk's share of dL/dW, which is summed over the chunks in float32 (on a
CPU with AMX in bf16 `add_weight_grad` sums the products in float32 straight into dL/dW, no bf16 share rounded and
widened).
On a CPU `cross_entropy_rows` (cpu_kernels.cpp) turns a chunk's logits, bf16 under autocast, into the loss and, where
autograd wants it, their gradient in one kernel, written over them; elsewhere, or switched off
(`cpu_kernels.set_enabled`), torch's ops do it in float32 copies.

`linear_token_logprobs` gives log p_y = log softmax(h W^T)_y per row, whose gradient is g (onehot(y) - p), and
the entropy H = -sum_v p_v log p_v (logged only, no gradient). The upstream gradient g is a row's own (the policy
loss), so the forward keeps the softmax p (written once, chunk by chunk) and the backward turns each chunk into
dL/dh and dL/dW, again in cache.

Shapes: N rows (batch x positions), D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from seekstack.model import cpu_kernels

IGNORE_INDEX = -100
CHUNK_ELEMENTS = {"cpu": 2**19, "cuda": 2**25}  # logits per chunk: ~2 MiB fits a CPU's L2; GPUs want large kernels


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of `hidden @ weight.T` (N, D) x (V, D) against targets (N,); IGNORE_INDEX rows do not
    count. Returns the loss and, with `keep_logits`, the logits (N, V) (without gradient)."""
    grads = torch.is_grad_enabled()  # of the hidden states and of the weight, each only when it takes one (LoRA: not W)
    return _LinearCrossEntropy.apply(hidden, weight, targets, grads and hidden.requires_grad,
                                     grads and weight.requires_grad, keep_logits)  # fmt: skip


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX's bfloat16 tiles (torch's reading of it), where MKL's bf16 GEMM outruns torch's mm."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16"))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, grad_hidden: bool, grad_weight: bool, keep_logits: bool):  # type: ignore[override]
        rows, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device.type
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        with torch.autocast(device, enabled=False):
            h, w = hidden.float(), weight.float()
            h_matmul, w_matmul = h.to(matmul_dtype), w.to(matmul_dtype)  # in float32 h and w, not copies
            counted = targets != IGNORE_INDEX
            count = counted.sum().clamp(min=1)
            outside = counted & ((targets < 0) | (targets >= vocab))  # as torch's refuses them (-1 too), by batch row
            if outside.any():
                row = int(outside.nonzero()[0])
                raise RuntimeError(
                    f"cross-entropy: target {int(targets[row])} of row {row} is outside the vocabulary of {vocab}"
                )
            safe_targets = targets.long().masked_fill(~counted, 0)
            loss = h.new_zeros(())
            logits_out = h.new_empty(rows, vocab) if keep_logits else None
            grad_h = torch.empty_like(h) if grad_hidden else None
            grad_w = torch.zeros_like(w) if grad_weight else None
            scale = counted / count
            fused = cpu_kernels.elementwise_takes(h_matmul)  # torch's ops where the kernel does not take the logits
            # bf16 products summed in float32 straight into dL/dW: MKL's GEMM, registered where torch carries it, and
            # taken on a CPU with AMX (7.6 ms a `small` chunk against mm + add_'s 17): on an avx512_bf16 EPYC
            # without AMX MKL's bf16 GEMM runs at float32's pace (54 ms against oneDNN's mm + add_'s 28)
            float32_sums = (
                fused
                and matmul_dtype == torch.bfloat16
                and hasattr(torch.ops.seekstack, "add_weight_grad")
                and cpu_has_amx_bf16()
            )
            for part in _chunks(rows, _chunk_rows(hidden, vocab, grad_weight)):
                logits = h_matmul[part] @ w_matmul.t()  # (n, V)
                if logits_out is not None:
                    logits_out[part] = logits
                if fused:  # dL/dlogits written over the logits, in their dtype, where a gradient is wanted
                    losses = torch.ops.seekstack.cross_entropy_rows(
                        logits, safe_targets[part], scale[part], grad_hidden or grad_weight
                    )
                    loss += losses.where(counted[part], 0).sum()  # a row without a target adds 0, even a NaN
                    grad_logits = logits
                else:
                    log_probs = logits.float().log_softmax(dim=-1)
                    picked = log_probs.gather(1, safe_targets[part, None]).squeeze(1)
                    loss -= picked.where(counted[part], 0).sum()
                    if grad_hidden or grad_weight:
                        grad_logits = log_probs.exp_()  # softmax, in place
                        grad_logits.scatter_add_(
                            1, safe_targets[part, None], grad_logits.new_full((len(picked), 1), -1.0)
                        )
                        grad_logits = grad_logits.mul_(scale[part, None]).to(matmul_dtype)
                if grad_h is not None:
                    grad_h[part] = grad_logits @ w_matmul
                if grad_w is not None and matmul_dtype == torch.float32:
                    torch.addmm(grad_w, grad_logits.t(), h[part], out=grad_w)  # in place via out=: FLOP counters see it
                elif grad_w is not None and float32_sums:
                    torch.ops.seekstack.add_weight_grad(grad_w, grad_logits, h_matmul[part])
                elif grad_w is not None:  # each chunk's G^T h in the autocast dtype, as an autocast head's dL/dW
                    grad_w += grad_logits.t() @ h_matmul[part]
            loss = loss / count
        if grad_hidden or grad_weight:
            ctx.save_for_backward(
                None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype)
            )
        if logits_out is not None:
            ctx.mark_non_differentiable(logits_out)
        return loss, logits_out

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):  # type: ignore[override]
        refuse_create_graph("linear_cross_entropy", _FROM_LOGITS)
        grad_h, grad_w = ctx.saved_tensors
        scaled = [None if grad is None else grad * grad_loss for grad in (grad_h, grad_w)]
        return *scaled, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T)[token] (N,) for hidden (N, D), weight (V, D), tokens (N,), and each row's
    entropy (N,) (without gradient), in float32."""
    return _LinearTokenLogprobs.apply(hidden, weight, tokens)


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens):  # type: ignore[override]
        rows, vocab = hidden.shape[0], weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.float(), weight.float()
            picked, entropy, probs = h.new_empty(rows), h.new_empty(rows), h.new_empty(rows, vocab)
            for part in _chunks(rows, _chunk_rows(hidden, vocab, grad_weight=False)):
                log_probs = (h[part] @ w.t()).log_softmax(dim=-1)
                picked[part] = log_probs.gather(1, tokens[part, None]).squeeze(1)
                torch.exp(log_probs, out=probs[part])
                entropy[part] = -torch.linalg.vecdot(probs[part], log_probs)
        ctx.save_for_backward(h, w, tokens, probs)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, _grad_entropy):  # type: ignore[override]
        refuse_create_graph("linear_token_logprobs", _FROM_LOGITS)
        h, w, tokens, probs = ctx.saved_tensors
        needs_h, needs_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = torch.zeros_like(w) if needs_w else None
        for part in _chunks(len(h), _chunk_rows(h, w.shape[0], needs_w)):
            g = grad_picked[part, None].float()
            grad_logits = probs[part] * -g  # g (onehot(y) - p)
            grad_logits.scatter_add_(1, tokens[part, None], g)
            if grad_h is not None:
                grad_h[part] = grad_logits @ w
            if grad_w is not None:
                torch.addmm(grad_w, grad_logits.t(), h[part], out=grad_w)
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h.to(hidden_dtype),
            None if grad_w is None else grad_w.to(weight_dtype),
            None,
        )


def refuse_create_graph(op: str, instead: str) -> None:
    """Raised in a hand-written backward run under create_graph=True (grad mode on in it; off in an ordinary or
    compiled backward): it would return gradients without their graph, a second-order loss silently short of `op`'s
    part. `instead` says what gives a second-order gradient."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}'s backward has no derivative of its own (create_graph=True); for a second-order gradient {instead}"
        )


_FROM_LOGITS = "compute the loss from the logits (hidden @ weight.T) with torch's ops"


def _chunk_rows(hidden: torch.Tensor, vocab: int, grad_weight: bool) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits for the device, at least 16 rows; and at least D rows where dL/dW (V, D)
    is summed chunk by chunk, as each chunk reads and writes all of it: with fewer rows than D that traffic outweighs
    the chunk's own logits (`small`, 2,048 x 384 x 16,384: 32-row chunks spent a third of the head + loss in it). Such a
    chunk's logits are no larger than dL/dW itself."""
    rows = max(16, CHUNK_ELEMENTS.get(hidden.device.type, CHUNK_ELEMENTS["cuda"]) // vocab)
    return max(rows, hidden.shape[1]) if grad_weight else rows


def _chunks(rows: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, rows, chunk)]
