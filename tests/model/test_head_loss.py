"""The output head fused with the cross-entropy computes what `F.cross_entropy(h @ W.T)` does, and fused with the
token log-probabilities what `log_softmax(h @ W.T)` gives, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seekstack.model import cpu_kernels, head_loss
from seekstack.model.head_loss import IGNORE_INDEX, linear_cross_entropy, linear_token_logprobs


@pytest.mark.parametrize("chunk_elements", [2**19, 300])  # one chunk; many chunks with a ragged last one
def test_fused_head_loss_matches_cross_entropy_of_the_logits(monkeypatch, chunk_elements):
    monkeypatch.setitem(head_loss.CHUNK_ELEMENTS, "cpu", chunk_elements)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(50, (37,))
    targets[[3, 10, 36]] = IGNORE_INDEX
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    (2.5 * expected).backward()  # an incoming gradient other than 1 must scale both gradients
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, logits = linear_cross_entropy(hidden, weight, targets, keep_logits=True)
    (2.5 * loss).backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grads[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected_grads[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, (hidden @ weight.t()).detach(), rtol=0, atol=1e-6)
    assert not logits.requires_grad


@pytest.mark.parametrize("frozen", [False, True], ids=["weight-trained", "weight-frozen"])
def test_chunks_span_at_least_the_hidden_width_where_the_weight_gradient_is_summed_over_them(monkeypatch, frozen):
    """Each chunk adds its part of dL/dW (V, D) into the whole of it: `small`'s 32-row chunks (2,048 x 384 x 16,384)
    spent most of the head + loss reading and writing dL/dW, 0.72 s where 384-row chunks take 0.46 s."""
    monkeypatch.setitem(head_loss.CHUNK_ELEMENTS, "cpu", 300)  # 300 // 50 = 6 logit rows: 16, the floor
    seen = []
    monkeypatch.setattr(head_loss, "_chunks", lambda rows, chunk: seen.append(chunk) or [slice(0, rows)])
    hidden = torch.randn(70, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=not frozen)
    linear_cross_entropy(hidden, weight, torch.randint(50, (70,)))
    linear_token_logprobs(hidden, weight, torch.randint(50, (70,)))[0].sum().backward()
    assert seen == ([16, 16, 16] if frozen else [24, 16, 24])  # cross-entropy; log-probs forward, backward


def test_fused_head_loss_computes_no_gradients_without_autograd():
    hidden, weight = torch.randn(8, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    targets = torch.randint(6, (8,))
    with torch.no_grad():
        loss, logits = linear_cross_entropy(hidden, weight, targets)
    assert logits is None and not loss.requires_grad
    assert loss.item() == pytest.approx(F.cross_entropy(hidden @ weight.t(), targets).item(), abs=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_cross_entropy_kernel_writes_no_gradient_of_the_logits_without_autograd(autocast):
    """Under no_grad (evaluation) the kernel still made dL/dlogits, written over each chunk's logits: a pass over all
    N x V of them (an exp per logit) that nothing read."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelWrites(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.written = []  # per call: whether the logits came back changed

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = args[0].clone() if func is torch.ops.seekstack.cross_entropy_rows.default else None
            out = func(*args, **(kwargs or {}))
            if before is not None:
                self.written.append(not torch.equal(before, args[0]))
            return out

    assert cpu_kernels.available()
    hidden, weight, targets = torch.randn(8, 4), torch.randn(6, 4), torch.randint(6, (8,))
    expected = F.cross_entropy(hidden @ weight.t(), targets)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), KernelWrites() as kernel:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = linear_cross_entropy(hidden.clone().requires_grad_(), weight, targets)
        assert kernel.written == [grad]
        torch.testing.assert_close(loss, expected, rtol=0, atol=0.05 if autocast else 1e-6)  # bf16 keeps 8 bits


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_fused_head_loss_computes_only_the_gradients_autograd_asks_for(frozen):
    """A frozen head (a LoRA run's) had its weight gradient computed anyway: 2 FLOPs per head parameter and token."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight = torch.randn(37, 16), torch.randn(50, 16)
    targets = torch.randint(50, (37,))
    reference = {"hidden": hidden.clone().requires_grad_(), "weight": weight.clone().requires_grad_()}
    F.cross_entropy(reference["hidden"] @ reference["weight"].t(), targets).backward()
    trained = "hidden" if frozen == "weight" else "weight"
    inputs = {"hidden": hidden.clone(), "weight": weight.clone()}
    inputs[trained].requires_grad_()
    with FlopCounterMode(display=False) as counter:
        linear_cross_entropy(inputs["hidden"], inputs["weight"], targets)[0].backward()
    torch.testing.assert_close(inputs[trained].grad, reference[trained].grad, rtol=0, atol=1e-6)
    assert counter.get_total_flops() == 2 * 2 * 37 * 50 * 16  # the logits, then one gradient (was: both)


def test_fused_head_loss_under_bfloat16_autocast_multiplies_in_bfloat16_and_sums_in_float32_as_autocast_does():
    """The logits, dL/dh and each chunk's dL/dW multiply in bf16, as an autocast nn.Linear head does, the log-softmax,
    the loss and the sum of dL/dW over the chunks in float32, as autocast runs F.cross_entropy: the same loss. It
    multiplied in float32, at a fraction of the speed of bf16 on a CPU with AMX."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 4, generator=generator, requires_grad=True)
    weight = torch.randn(6, 4, generator=generator, requires_grad=True)
    targets = torch.randint(6, (8,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight), targets)
        loss, _ = linear_cross_entropy(hidden, weight, targets)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for grad, expected_grad in zip(torch.autograd.grad(loss, (hidden, weight)), expected_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad.float(), rtol=0.02, atol=1e-3)  # bf16 keeps 8 bits


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
@pytest.mark.parametrize(("autocast", "tolerance"), [(False, 1e-5), (True, 0.02)])  # bf16 keeps 8 bits
def test_fused_cross_entropy_kernel_and_its_switched_off_path_match_the_float64_formula(
    monkeypatch, autocast, tolerance, amx
):
    """cpu_kernels' cross_entropy_rows turns each chunk's logits into the loss and dL/dlogits in one kernel, bf16
    logits read and written as they are, and under autocast every matmul takes bf16, dL/dW's too: each chunk's logits
    were widened to float32 and their gradient narrowed back, each a fresh (n, V) copy, and dL/dW multiplied in float32
    (together ~0.25 s of `small`'s ~2.4 s step). Switched off: torch's ops. dL/dW's bf16 products are summed in
    float32 by MKL's GEMM (add_weight_grad) only on a CPU with AMX: without, that GEMM ran at half
    the pace of torch's mm + add_ (an avx512_bf16 EPYC)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.matmul_dtypes, self.float32_logit_rows = set(), set(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.matmul_dtypes |= {arg.dtype for arg in args if isinstance(arg, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape[-1:] == (50,):
                self.float32_logit_rows += 1  # (n, V) in float32
            return out

    assert cpu_kernels.available()
    monkeypatch.setattr(head_loss, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setitem(head_loss.CHUNK_ELEMENTS, "cpu", 300)  # chunks of 40 rows (D): 70 rows, a ragged last one
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(70, 40, generator=generator), torch.randn(50, 40, generator=generator) / 4
    targets = torch.randint(50, (70,), generator=generator)  # 50 logits a row: vector steps and a tail
    targets[[0, 33, 69]] = IGNORE_INDEX
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=IGNORE_INDEX)
    expected.backward()
    for fused in (True, False):
        cpu_kernels.set_enabled(fused)
        try:
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with Ops() as ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, _ = linear_cross_entropy(h, w, targets)
            loss.backward()
        finally:
            cpu_kernels.set_enabled(True)
        assert ("seekstack.cross_entropy_rows.default" in ops.names) == fused
        float32_sums = fused and autocast and amx and hasattr(torch.ops.seekstack, "add_weight_grad")  # in MKL
        assert ("seekstack.add_weight_grad.default" in ops.names) == float32_sums  # else torch's mm + add_
        if autocast:
            assert ops.matmul_dtypes == {torch.bfloat16}
            assert (ops.float32_logit_rows == 0) == fused  # torch's ops widen each chunk's logits to float32
        assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32
        assert h.grad[[0, 33, 69]].abs().sum() == 0  # rows without a target add nothing
        for ours, theirs in ((loss, expected), (h.grad, h64.grad), (w.grad, w64.grad)):
            torch.testing.assert_close(ours, theirs.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_int32_targets_give_the_loss_of_int64_ones(fused):
    """Token ids as numpy int32 arrays or uint16 files give them: the kernel refused them ('targets (int64) ... must
    be contiguous'), where torch's ops (kernels off, a GPU) took them."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=generator), torch.randn(50, 8, generator=generator)
    targets = torch.tensor([3, 7, 5, IGNORE_INDEX])
    cpu_kernels.set_enabled(fused)
    try:
        loss, _ = linear_cross_entropy(hidden, weight, targets.int())
    finally:
        cpu_kernels.set_enabled(True)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX))


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_a_nan_in_a_row_without_a_target_leaves_the_loss_as_torchs_cross_entropy_leaves_it(fused):
    """A row's losses were multiplied by 0 where it had no target, and NaN * 0 is NaN: a padding row's NaN hidden
    state made the whole loss NaN, where F.cross_entropy skips the row. The other rows' gradients are torch's too."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=generator), torch.randn(50, 8, generator=generator)
    hidden[1] = float("nan")
    targets = torch.tensor([3, IGNORE_INDEX, 5, 7])
    reference = hidden.clone().requires_grad_()
    expected = F.cross_entropy(reference @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    expected.backward()
    hidden.requires_grad_()
    cpu_kernels.set_enabled(fused)
    try:
        loss, _ = linear_cross_entropy(hidden, weight, targets)
        loss.backward()
    finally:
        cpu_kernels.set_enabled(True)
    assert expected.isfinite()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden.grad[[0, 2, 3]], reference.grad[[0, 2, 3]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_a_negative_target_other_than_the_ignore_index_is_refused_as_torchs_cross_entropy_refuses_it(fused):
    """-1 (nanoGPT's and nanochat's ignore_index) was clamped to token 0 and trained on, where transformers' loss
    raises; -100 alone is not counted."""
    hidden, weight = torch.randn(4, 8), torch.randn(50, 8)
    cpu_kernels.set_enabled(fused)
    try:
        with pytest.raises(RuntimeError, match=r"target -1 of row 1 is outside the vocabulary of 50"):
            linear_cross_entropy(hidden, weight, torch.tensor([3, -1, 5, IGNORE_INDEX]))
    finally:
        cpu_kernels.set_enabled(True)


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch"])
def test_an_out_of_vocabulary_target_is_named_by_its_row_in_the_batch_not_in_its_chunk(fused, monkeypatch):
    """The kernel named the row within its chunk ("target 20000 of row 4" for row 900), torch's gather no row."""
    monkeypatch.setitem(head_loss.CHUNK_ELEMENTS, "cpu", 16 * 50)  # 16-row chunks
    targets = torch.zeros(40, dtype=torch.long)
    targets[20] = 50
    cpu_kernels.set_enabled(fused)
    try:
        with pytest.raises(RuntimeError, match=r"target 50 of row 20 is outside the vocabulary of 50"):
            linear_cross_entropy(torch.randn(40, 8), torch.randn(50, 8), targets)
    finally:
        cpu_kernels.set_enabled(True)


def _skip_without_mkls_gemm():
    assert cpu_kernels.available()
    if not hasattr(torch.ops.seekstack, "add_weight_grad"):  # registered where torch carries MKL (x86 builds)
        pytest.skip("this torch has no MKL bf16 x bf16 -> float32 GEMM: the head keeps torch's mm + add_")


@pytest.mark.parametrize(("rows", "out", "features"), [(1, 1, 1), (3, 5, 7), (129, 257, 33), (0, 4, 3)])
def test_the_heads_weight_gradient_kernel_sums_bfloat16_products_in_float32_as_float64_does(rows, out, features):
    """`add_weight_grad` adds dY^T X (bf16 operands, any strides) into the float32 dL/dW with float32 sums."""
    _skip_without_mkls_gemm()
    generator = torch.Generator().manual_seed(0)
    grad_out = torch.randn(out, rows, generator=generator).bfloat16().t()  # transposed: read as it lies
    rows_in = torch.randn(rows, 2 * features, generator=generator).bfloat16()[:, ::2]
    grad_weight = torch.randn(out, features, generator=generator)
    expected = grad_weight.double() + grad_out.double().t() @ rows_in.double()
    torch.ops.seekstack.add_weight_grad(grad_weight, grad_out, rows_in)
    assert (grad_weight.double() - expected).abs().max() <= 1e-6 * expected.abs().max()  # a bf16 share: ~4e-3


@pytest.mark.parametrize(
    ("shapes", "dtypes", "message"),
    [
        (((3, 4), (2, 3), (2, 4)), (torch.bfloat16, torch.bfloat16, torch.bfloat16), "dW must be contiguous float32"),
        (((3, 4), (2, 3), (2, 4)), (torch.float32, torch.float32, torch.bfloat16), "not Float and BFloat16"),
        (((3, 5), (2, 3), (2, 4)), (torch.float32, torch.bfloat16, torch.bfloat16), r"not dW \[3, 5\], dY \[2, 3\]"),
        (((3, 4), (2, 3), (1, 4)), (torch.float32, torch.bfloat16, torch.bfloat16), r"dY \[2, 3\], X \[1, 4\]"),
    ],
)
def test_the_heads_weight_gradient_kernel_refuses_what_it_cannot_read_naming_it(shapes, dtypes, message):
    """One message for every refusal named neither the tensor nor what it was."""
    _skip_without_mkls_gemm()
    tensors = [torch.ones(shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    with pytest.raises(RuntimeError, match=f"^add_weight_grad: .*{message}"):
        torch.ops.seekstack.add_weight_grad(*tensors)


def test_the_heads_weight_gradient_kernel_adds_nothing_to_an_empty_gradient_without_mkls_error(capfd):
    """A (0, D) or (V, 0) dL/dW met MKL's refusal of a zero leading dimension, printed ('Intel oneMKL ERROR')."""
    _skip_without_mkls_gemm()
    for out, features in ((0, 4), (3, 0)):
        grad_weight = torch.empty(out, features)
        torch.ops.seekstack.add_weight_grad(
            grad_weight, torch.ones(2, out).bfloat16(), torch.ones(2, features).bfloat16()
        )
    assert "MKL" not in "".join(capfd.readouterr())


def test_a_second_order_gradient_through_the_fused_head_is_refused_not_returned_without_its_graph():
    """create_graph=True gave dL/dh without a graph (the backward scales gradients made in the forward), so a gradient
    penalty through the model's loss silently lost the head's part, and with it every layer's below."""
    hidden, weight, tokens = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8), torch.randint(20, (6,))
    loss, _ = linear_cross_entropy(hidden, weight, tokens)
    with pytest.raises(RuntimeError, match=r"^linear_cross_entropy's backward .*create_graph=True"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    picked, _ = linear_token_logprobs(hidden, weight, tokens)
    with pytest.raises(RuntimeError, match=r"^linear_token_logprobs's backward .*create_graph=True"):
        torch.autograd.grad(picked.sum(), hidden, create_graph=True)


def test_a_bfloat16_heads_weight_is_widened_to_float32_once():
    """A bf16 model's loss outside autocast (`eval` of a bf16 checkpoint) copied the (V, D) head weight to float32
    twice, once for the sums and once for the matmuls, both float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widenings(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 != out.dtype:
                self.shapes.append(tuple(args[0].shape))
            return out

    hidden = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    with Widenings() as widenings:
        linear_cross_entropy(hidden, weight, torch.randint(6, (8,)))
    assert sorted(widenings.shapes) == [(6, 4), (8, 4)]


@pytest.mark.parametrize("chunk_elements", [2**19, 300])  # one chunk; many chunks with a ragged last one
def test_fused_token_logprobs_match_the_log_softmax_of_the_logits_and_its_gradients(monkeypatch, chunk_elements):
    monkeypatch.setitem(head_loss.CHUNK_ELEMENTS, "cpu", chunk_elements)
    hidden = (torch.randn(37, 16) * 2).requires_grad_(True)
    weight = torch.randn(50, 16, requires_grad=True)
    tokens, upstream = torch.randint(50, (37,)), torch.randn(37)  # each row's own gradient, as a policy loss gives
    log_probs = (hidden @ weight.t()).log_softmax(dim=-1)
    expected = log_probs.gather(1, tokens[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    expected_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logps, entropy = linear_token_logprobs(hidden, weight, tokens)
    (logps * upstream).sum().backward()
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(dim=-1).detach(), rtol=0, atol=1e-5)
    assert not entropy.requires_grad
    torch.testing.assert_close(hidden.grad, expected_grads[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(weight.grad, expected_grads[1], rtol=0, atol=1e-5)
