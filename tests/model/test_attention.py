"""Multi-head Latent Attention: the absorbed decode path equals the prefill path; the cache holds only latents."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.utils.cpp_extension
from torch.nn.attention import SDPBackend, sdpa_kernel

from seekstack.model import attention, cpu_kernels
from seekstack.model.attention import ContiguousLatentCache
from seekstack.model.rope import apply_rotary, rotary_tables
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"q_lora_rank": None},
        {"rope_scaling": YARN},
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {"rope_interleave": False},
        {"v_head_dim": 40},
    ],
    ids=["v3", "no-q-lora", "yarn", "linear", "rotate-half", "v-wider-than-qk"],
)
def test_absorbed_decode_matches_prefill(overrides):
    model = Transformer(micro_config(**overrides)).eval()
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        cache = ContiguousLatentCache(model.config, batch_size=2, max_length=40)
        chunks = [model(ids[:, :24], cache=cache).logits]  # prefill of 24 tokens through the absorbed path
        for t in range(24, 40):
            chunks.append(model(ids[:, t : t + 1], cache=cache).logits)  # positions continue from the cache
    decoded = torch.cat(chunks, dim=1)
    assert (decoded - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_a_bfloat16_model_decodes_with_a_cache_of_either_dtype_as_its_prefill(cache_dtype):
    model = Transformer(micro_config()).eval().bfloat16()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = ContiguousLatentCache(model.config, batch_size=2, max_length=12, dtype=cache_dtype)
        chunks = [model(ids[:, :8], cache=cache).logits] + [
            model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 12)
        ]
    decoded = torch.cat(chunks, dim=1).float()
    assert ((decoded - full).norm() / full.norm()).item() < 0.02


def test_per_sequence_positions_match_shared_positions():
    model = Transformer(micro_config(rope_scaling=YARN)).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        shared = model(ids, positions=torch.arange(5, 17)).logits
        per_sequence = model(ids, positions=torch.arange(5, 17).expand(2, -1)).logits
    assert (shared - per_sequence).abs().max().item() < 1e-6


def test_latent_cache_stores_only_latent_and_rope_key():
    config = micro_config()
    cache = ContiguousLatentCache(config, batch_size=1, max_length=8)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    assert cache.bytes_per_token() == (config.kv_lora_rank + config.qk_rope_head_dim) * layers * 4


def test_latent_cache_refuses_to_overflow():
    model = Transformer(micro_config()).eval()
    cache = ContiguousLatentCache(model.config, batch_size=1, max_length=4)
    with torch.no_grad(), pytest.raises(ValueError, match="max_length=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_interleaved_rope_rotates_adjacent_pairs():
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])  # (B, T, H, R=4): pairs (1,0) and (0,1)
    angle = torch.tensor([[torch.pi / 2, torch.pi]])  # (T, R/2)
    out = apply_rotary(x, *rotary_tables(angle, interleaved=True), interleaved=True)
    assert torch.allclose(out, torch.tensor([[[[0.0, 1.0, 0.0, -1.0]]]]), atol=1e-6)
    half = apply_rotary(x, *rotary_tables(angle, interleaved=False), interleaved=False)  # pairs (x0, x2), (x1, x3)
    assert torch.allclose(half, torch.tensor([[[[0.0, 0.0, 1.0, -1.0]]]]), atol=1e-6)


def test_attention_is_causal():
    model = Transformer(micro_config()).eval()
    ids = torch.randint(0, 128, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 128
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :10] - b[:, :10]).abs().max().item() < 1e-6
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("kernel", [True, False], ids=["decode-kernel", "sdpa"])
@pytest.mark.parametrize("T", [1, 3], ids=["decode-step", "verify-width-3"])
def test_absorbed_attention_masks_each_head_as_the_cached_keys_it_drops(T, kernel, monkeypatch):
    """A decode step's few rows take latent_attention_rows, never SDPA, while the kernels are on; SDPA else."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    attention = Transformer(micro_config()).layers[0].self_attn
    H, C, R, S = attention.num_heads, attention.kv_rank, attention.rope_dim, 6
    q_nope, q_rope = torch.randn(2, T, H, attention.nope_dim), torch.randn(2, T, H, R)
    cached = torch.randn(2, S, C + R)
    seen = torch.tensor([0, 1, 3, 5])  # keys 2 and 4 masked for every query of either row
    mask = torch.zeros(2, T, S, dtype=torch.bool)
    mask[..., seen] = True
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    cpu_kernels.set_enabled(kernel)
    try:
        with torch.no_grad():
            masked = attention.attend_absorbed(q_nope, q_rope, cached, mask)
            dropped = attention.attend_absorbed(q_nope, q_rope, cached[:, seen], None)
    finally:
        cpu_kernels.set_enabled(True)
    assert (masked - dropped).abs().max().item() < 1e-6
    assert (masks == []) == kernel
    if T == 1 and not kernel:  # a decode step reads the plan's mask in place for every head, never a copy per head
        assert masks[0].data_ptr() == mask.data_ptr() and masks[0].stride(2) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_attention_kernel_gives_sdpas_output_over_the_cached_keys(dtype):
    """latent_attention_rows (cpu_kernels.cpp): H heads x T query rows over S cached keys that double as the values
    (their first V columns), with a mask (a query that sees its first key alone) or none, as torch's SDPA computes it:
    float32 to 1e-5, bfloat16 within its rounding. Widths of 37 and 30 leave a tail past every vector; 256 rows over
    5000 keys take two groups of rows (their scores past kScoresPerGroup)."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    for S, H, T in [(1, 1, 1), (7, 16, 3), (64, 6, 1), (130, 2, 5), (300, 6, 16), (5000, 16, 16)]:
        query, keys = torch.randn(2, H, T, 37, dtype=dtype), torch.randn(2, S, 37, dtype=dtype)
        mask = torch.rand(2, T, S) < 0.6
        mask[..., 0] = True  # every query sees a key (attention_mask_of)
        mask[1, -1, 1:] = False
        for seen in (mask, None):
            out = cpu_kernels.latent_attention_rows(query, keys, seen, 0.3, 30)
            heads_mask = None if seen is None else seen.unsqueeze(1)  # (B, 1, T, S): the same for every head
            key = keys.unsqueeze(1)
            expected = torch.nn.functional.scaled_dot_product_attention(
                query, key, key, attn_mask=heads_mask, scale=0.3
            )
            expected = expected[..., :30]
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance, msg=f"S={S} H={H} T={T}")


ZERO_QUERY_ROWS = """
import torch
from seekstack.model import cpu_kernels
assert cpu_kernels.available()
for dtype in (torch.float32, torch.bfloat16):
    for H, T in ((4, 0), (0, 2)):
        query, keys = torch.randn(2, H, T, 40, dtype=dtype), torch.randn(2, 5, 40, dtype=dtype)
        for mask in (None, torch.ones(2, T, 5, dtype=torch.bool)):
            out = cpu_kernels.latent_attention_rows(query, keys, mask, 0.1, 32)
            assert out.shape == (2, H, T, 32) and out.dtype == dtype, (out.shape, out.dtype)
"""


def test_the_decode_attention_kernel_takes_no_query_rows_without_killing_the_process():
    """latent_attention_rows at T = 0 tokens or H = 0 heads returns its empty (B, H, T, V): its group of rows divided
    by zero (SIGFPE) and took the whole process, a server with every request in flight. In a subprocess, so the crash
    shows as its signal."""
    run = subprocess.run([sys.executable, "-c", ZERO_QUERY_ROWS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"


def test_the_decode_attention_kernel_reads_a_partly_filled_caches_keys_in_place():
    """ContiguousLatentCache hands over (B, end, C+R) slices of its (B, max_length, C+R) rows, batch rows apart by
    max_length: the kernel read them through a copy every step and layer. It reads them along their strides (no
    aten::clone), as torch's SDPA computes; keys whose columns are strided are still copied and right."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    query, cache = torch.randn(3, 4, 2, 37), torch.randn(3, 50, 37)
    for keys in (cache[:, :20], cache.transpose(1, 2).contiguous().transpose(1, 2)[:, :20]):
        with torch.profiler.profile() as profile:
            out = cpu_kernels.latent_attention_rows(query, keys, None, 0.3, 30)
        copied = "aten::clone" in {event.key for event in profile.key_averages()}
        key = keys.unsqueeze(1)
        expected = torch.nn.functional.scaled_dot_product_attention(query, key, key, scale=0.3)[..., :30]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert copied == (keys.stride(2) != 1)


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "no-amx"])
@pytest.mark.parametrize("logit_std", [1, 4])
@pytest.mark.parametrize(("T", "W"), [(37, 23), (600, 24)], ids=["one-group-odd-width", "groups-of-heads"])
def test_fused_causal_attention_and_its_gradients_match_the_float64_formula(T, W, logit_std, amx, monkeypatch):
    """bfloat16 training attention, a value narrower than q and k, against softmax(scale q k^T, causal) v and its
    autograd in float64, logits of std 1 and 4. With AMX: torch's fused forward and causal_attention_backward
    (cpu_kernels.cpp); at 600 tokens the backward takes the 3 heads in groups of 2 and 1, an odd width brgemm's
    unpacked path. Without AMX: causal_attention_training and its backward, each bfloat16 head widened to float32 in
    the kernel, the results narrowed as written. Within 1.5x the error of torch's fused SDPA (the training attention
    without the kernels) on the same inputs: S and dP stay float32."""
    assert cpu_kernels.available()
    monkeypatch.setattr(cpu_kernels, "packs_bfloat16", lambda width: amx)
    in_float32 = []
    training = torch.ops.seekstack.causal_attention_training
    monkeypatch.setattr(
        torch.ops.seekstack, "causal_attention_training", lambda *args: in_float32.append(1) or training(*args)
    )
    torch.manual_seed(0)
    B, H, V, dtype = 2, 3, 16, torch.bfloat16
    scale = logit_std / W**0.5  # scale q.k has std logit_std for q, k of std 1
    q, k = (torch.randn(B, T, H, W, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, dtype=dtype).transpose(1, 2).requires_grad_()
    grad = torch.randn(B, H, T, V, dtype=dtype)
    out = attention._CausalAttention.apply(q, k, v, scale)
    out.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    expected = torch.softmax((q64 @ k64.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), dim=-1) @ v64
    expected.backward(grad.double())
    qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
    padded = torch.nn.functional.pad(vt, (0, W - V))
    torchs = torch.nn.functional.scaled_dot_product_attention(qt, kt, padded, is_causal=True, scale=scale)[..., :V]
    torchs.backward(grad)
    for got, want, peer in (
        (out, expected, torchs),
        (q.grad, q64.grad, qt.grad),
        (k.grad, k64.grad, kt.grad),
        (v.grad, v64.grad, vt.grad),
    ):
        assert got.dtype == dtype and got.shape == want.shape
        assert (got.double() - want).abs().max() <= 1.5 * (peer.double() - want).abs().max()
    assert len(in_float32) == (0 if amx else 1)


@pytest.mark.parametrize("W", [23, 24], ids=["odd-width", "even-width"])
def test_bfloat16_training_attention_takes_the_float32_math_kernels_exactly_where_they_cannot_pack_bfloat16(
    W, monkeypatch
):
    """Whether bfloat16 causal attention runs on the float32-math kernels is decided once, by cpu_kernels.cpp's
    packs_bfloat16 (torch's brgemm packs bfloat16: a CPU with AMX, an even width), which causal_attention asks in C++
    and the training attention through the op: torch's own AMX probe, which the training attention asked (yes at an odd
    width, where the inference forward went to float32), is not asked, here made to say the opposite."""
    assert cpu_kernels.available()
    packs = cpu_kernels.packs_bfloat16(W)
    assert packs == (torch.ops.seekstack.packs_bfloat16(W) and W % 2 == 0)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not packs)
    in_float32 = []
    training = torch.ops.seekstack.causal_attention_training
    monkeypatch.setattr(
        torch.ops.seekstack, "causal_attention_training", lambda *args: in_float32.append(1) or training(*args)
    )
    q, k, v = (torch.randn(1, 2, 40, W, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    attention._CausalAttention.apply(q, k, v, 0.25).sum().backward()
    assert len(in_float32) == (0 if packs else 1)
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("op", "dtype", "wrong", "takes", "within"),
    [
        ("causal_attention", torch.bfloat16, torch.float32, r"bfloat16 \(float32: causal_attention_training\)", True),
        ("causal_attention_training", torch.float32, torch.float16, "float32 or bfloat16, one dtype", False),
    ],
)
def test_the_causal_attention_kernels_refuse_a_key_of_another_shape_and_a_dtype_not_theirs_naming_both(
    op, dtype, wrong, takes, within
):
    """The forward kernels share one check of their inputs: a key of other tokens than the query's is refused naming
    the shapes, and a dtype not theirs naming what they take (and the kernel that takes float32)."""
    assert cpu_kernels.available()
    kernel = getattr(torch.ops.seekstack, op)
    q, v = torch.randn(1, 2, 8, 16, dtype=dtype), torch.randn(1, 2, 8, 16, dtype=dtype)
    shapes = r"q \[1, 2, 8, 16\], k \[1, 2, 9, 16\], v \[1, 2, 8, 16\]"
    with pytest.raises(RuntimeError, match=rf"{op}: q, k must be .*{' with V <= W' if within else ''}, not {shapes}"):
        kernel(q, torch.randn(1, 2, 9, 16, dtype=dtype), v, 0.25)
    with pytest.raises(RuntimeError, match=rf"{op}: q, k and v must be {takes}, not"):
        kernel(q.to(wrong), q.to(wrong), v.to(wrong), 0.25)


def test_the_fused_attention_backward_refuses_a_key_of_another_shape_naming_the_shapes():
    """causal_attention_backward checked q's dtype alone: a key of more tokens than the query's was read as if of
    T tokens, its gradient of the query's shape returned silently. It is refused naming the shapes."""
    assert cpu_kernels.available()
    q, v, grad = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, v, is_causal=True, scale=0.25)
    k = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"q \[1, 2, 8, 16\], k \[1, 2, 16, 16\], v \[1, 2, 8, 16\]"):
        torch.ops.seekstack.causal_attention_backward(grad, q, k, v, out, lse, 0.25)


@pytest.mark.parametrize(
    ("T", "W", "V"),
    [(65, 8, 8), (37, 23, 16), (200, 48, 32), (130, 24, 40)],
    ids=["a-block-of-one-row", "odd", "ragged", "v-wider"],
)
def test_float32_training_attention_and_its_gradients_match_the_float64_formula_as_torchs_sdpa(T, W, V):
    """causal_attention_training and its backward (cpu_kernels.cpp, float32 training attention in blocks of 64 query
    rows over the keys up to the diagonal): a last block of one row, T ragged against the blocks, an odd width, a
    value narrower than q and k (a view into a wider row) or wider. Out (B, T, H, V), the log-sum-exp, dq, dk and dv
    against softmax(scale q k^T, causal) v and its autograd in float64 (logits of std 4), within 1.5x the error of
    torch's fused float32 SDPA on the same inputs, plus float32's rounding of the largest value."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    B, H = 2, 3
    scale = 4 / W**0.5
    q, k = (torch.randn(B, T, H, W).transpose(1, 2).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, 8 + V)[..., 8:].transpose(1, 2).requires_grad_()
    grad = torch.randn(B, T, H, V).transpose(1, 2)
    out, lse = torch.ops.seekstack.causal_attention_training(q, k, v, scale)
    grads = torch.ops.seekstack.causal_attention_training_backward(grad, q, k, v, out.transpose(1, 2), lse, scale)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v64
    expected.backward(grad.double())
    qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
    width = max(W, V)
    padded = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (qt, kt, vt))
    torchs = torch.nn.functional.scaled_dot_product_attention(*padded, is_causal=True, scale=scale)[..., :V]
    torchs.backward(grad)
    assert out.shape == (B, T, H, V) and out.is_contiguous() and lse.shape == (B, H, T)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=1e-6, atol=1e-5)
    for got, want, peer in (
        (out.transpose(1, 2), expected, torchs),
        *zip(grads, (q64.grad, k64.grad, v64.grad), (qt.grad, kt.grad, vt.grad), strict=True),
    ):
        assert got.dtype == torch.float32 and got.shape == want.shape
        rounding = torch.finfo(torch.float32).eps * want.abs().max()
        assert (got.double() - want).abs().max() <= 1.5 * (peer.double() - want).abs().max() + 4 * rounding


@pytest.mark.parametrize(("T", "W", "V"), [(37, 23, 16), (130, 24, 40)], ids=["odd", "v-wider"])
def test_the_training_attention_on_bfloat16_rows_gives_its_float32_results_on_them(T, W, V):
    """causal_attention_training and its backward take bfloat16 q, k, v (strided as attention.py passes them), grad
    and out, widening each head in the kernel: out, the log-sum-exp and dq, dk, dv are the float32 kernels' on the
    widened tensors, rounded to bfloat16 (dK and dV summed in float32 over the query blocks). Bit for bit where the
    kernels multiply the widened rows (an odd width, a CPU without avx512_bf16); where S = K Q^T and dP = V dO^T are
    vdpbf16ps's products of the bfloat16 rows (the same exact products, summed in float32 in another order), the
    log-sum-exp within float32's rounding and out, dq, dk, dv within one bfloat16 rounding of their largest value."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    B, H, scale = 2, 3, 4 / W**0.5
    q, k = (torch.randn(B, T, H, W, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, T, H, 8 + V, dtype=torch.bfloat16)[..., 8:].transpose(1, 2)
    grad = torch.randn(B, T, H, V, dtype=torch.bfloat16).transpose(1, 2)
    out, lse = torch.ops.seekstack.causal_attention_training(q, k, v, scale)
    grads = torch.ops.seekstack.causal_attention_training_backward(grad, q, k, v, out.transpose(1, 2), lse, scale)
    widened = [t.float() for t in (q, k, v)]
    out32, lse32 = torch.ops.seekstack.causal_attention_training(*widened, scale)
    grads32 = torch.ops.seekstack.causal_attention_training_backward(
        grad.float(), *widened, out.transpose(1, 2).float(), lse32, scale
    )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    pair_products = W % 2 == 0 and bool(torch.cpu.get_capabilities().get("avx512_bf16"))
    for got, want in ((out, out32), *zip(grads, grads32, strict=True)):
        assert got.dtype == torch.bfloat16
        if pair_products:
            assert (got.float() - want).abs().max() <= 2**-8 * want.abs().max()
        else:
            assert torch.equal(got, want.bfloat16())
    if pair_products:
        torch.testing.assert_close(lse, lse32, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(lse, lse32)


def test_bfloat16_training_attention_without_packing_makes_no_float32_copy_of_its_tensors(monkeypatch):
    """Where brgemm cannot pack bfloat16 the training attention cast q, k, v to float32, kept those and a float32 out
    for the backward, and cast the gradient up and dq, dk, dv down: 13 ms of a `small` 4 x 512 layer's ~65, and twice
    the saved memory. The kernels now take the bfloat16 tensors themselves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    assert cpu_kernels.available()
    monkeypatch.setattr(cpu_kernels, "packs_bfloat16", lambda width: False)
    q, k, v = (torch.randn(1, 2, 40, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with Casts() as casts:
        out = attention._CausalAttention.apply(q, k, v, 0.25)
        out.backward(torch.ones_like(out))
    assert out.dtype == q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    assert casts.shapes == []


def test_the_float32_training_attention_of_no_tokens_gives_empty_outputs_and_gradients():
    """T = 0 (a batch of empty rows), as torch's SDPA takes it: empty out, log-sum-exp and gradients, where the
    backward's last query block began at row 0 and called brgemm on no rows (std::bad_alloc)."""
    assert cpu_kernels.available()
    q, k, v, grad = (torch.randn(2, 3, 0, 16) for _ in range(4))
    out, lse = torch.ops.seekstack.causal_attention_training(q, k, v, 0.25)
    grads = torch.ops.seekstack.causal_attention_training_backward(grad, q, k, v, out.transpose(1, 2), lse, 0.25)
    assert out.shape == (2, 0, 3, 16) and lse.shape == (2, 3, 0)
    assert [g.shape for g in grads] == [q.shape] * 3


@pytest.mark.parametrize(
    ("T", "W", "V"),
    [(1, 24, 16), (37, 24, 16), (200, 24, 16), (37, 23, 16), (70, 192, 128), (37, 24, 22)],
    ids=["1", "37", "200", "odd-width", "deepseek-v3-widths", "value-not-in-16s"],
)
def test_bfloat16_causal_attention_forward_matches_the_float64_formula_in_o_projs_layout(T, W, V):
    """causal_attention (cpu_kernels.cpp, the bfloat16 inference forward): query blocks of 64 rows over the keys up to
    the diagonal, T ragged against the blocks and the 64-key tiles, q and k strided as attention.py passes them, a
    value narrower than q and k (a view into a wider row), wider than one packed block (DeepSeek-V3's 192 / 128) or
    not in 16s. Out is (B, T, H, V), within 1.5x the error of torch's fused SDPA against softmax(scale q k^T, causal)
    v in float64 (logits of std 4). Where brgemm cannot pack bfloat16 (`packs_bfloat16`: an odd width, a CPU without
    AMX) it gives causal_attention_training's forward on the same bfloat16 tensors, bit for bit."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    B, H, dtype = 2, 3, torch.bfloat16
    scale = 4 / W**0.5
    q, k = (torch.randn(B, T, H, W, dtype=dtype).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, T, H, 8 + V, dtype=dtype)[..., 8:].transpose(1, 2)
    out = torch.ops.seekstack.causal_attention(q, k, v, scale)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ v.double()).transpose(1, 2)
    padded = torch.nn.functional.pad(v, (0, W - V))
    torchs = torch.nn.functional.scaled_dot_product_attention(q, k, padded, is_causal=True, scale=scale)[..., :V]
    assert out.dtype == dtype and out.shape == (B, T, H, V) and out.is_contiguous()
    assert (out.double() - expected).abs().max() <= 1.5 * (torchs.transpose(1, 2).double() - expected).abs().max()
    if not cpu_kernels.packs_bfloat16(W):
        training, _ = torch.ops.seekstack.causal_attention_training(q, k, v, scale)
        assert torch.equal(out, training)


def test_bfloat16_inference_attention_takes_the_causal_forward_only_without_a_mask_and_matches_torchs_sdpa(monkeypatch):
    """A bfloat16 forward without gradients or a mask runs causal_attention, one call a layer, a value narrower than
    q and k and wider than one packed block (q/k 96, v 80 here, DeepSeek-V3's 192 / 128); with an attention_mask (a
    batch's padding), in float32, with gradients or under sdpa_kernel(SDPBackend.MATH) it does not; its logits are as
    near the float32 model's as those of torch's SDPA."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    model = Transformer(micro_config(num_nextn_predict_layers=0, qk_nope_head_dim=88, v_head_dim=80)).eval()
    ids = torch.randint(128, (2, 70))
    calls = []
    forward = torch.ops.seekstack.causal_attention
    monkeypatch.setattr(torch.ops.seekstack, "causal_attention", lambda *args: calls.append(1) or forward(*args))
    with torch.no_grad():
        float32 = model(ids).logits
        assert calls == []
        model.to(torch.bfloat16)
        with_kernel = model(ids).logits.float()
        assert len(calls) == 3  # one a layer
        with_mask = model(ids, attention_mask=torch.ones(2, 70, dtype=torch.long)).logits.float()
        with sdpa_kernel(SDPBackend.MATH):
            as_math = model(ids).logits.float()
    model(ids)  # gradients: the fused backward's forward
    assert len(calls) == 3
    error, sdpas = ((got - float32).abs() for got in (with_kernel, with_mask))
    assert error.max() <= 1.5 * sdpas.max() and error.mean() <= 1.25 * sdpas.mean()
    torch.testing.assert_close(as_math, with_mask, rtol=0.05, atol=0.05 * with_mask.abs().max().item())


def test_float32_inference_takes_the_float32_training_forward_only_without_a_mask(monkeypatch):
    """A float32 forward without gradients or a mask runs causal_attention_training, one call a layer, its logits
    those of torch's SDPA (the masked path) to float32's rounding; with a mask, under sdpa_kernel(SDPBackend.MATH) or
    in bfloat16 (causal_attention's) it is not called from Python."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    model = Transformer(micro_config(num_nextn_predict_layers=0)).eval()
    ids = torch.randint(128, (1, 150))
    ones = torch.ones(1, 150, dtype=torch.long)
    calls = []
    training = torch.ops.seekstack.causal_attention_training
    monkeypatch.setattr(
        torch.ops.seekstack, "causal_attention_training", lambda *args: calls.append(1) or training(*args)
    )
    with torch.no_grad():
        got = model(ids).logits
        assert len(calls) == 3  # one a layer
        torch.testing.assert_close(got, model(ids, attention_mask=ones).logits, rtol=1e-5, atol=1e-5)
        with sdpa_kernel(SDPBackend.MATH):
            model(ids)
        model.to(torch.bfloat16)
        model(ids)
    assert len(calls) == 3


def test_the_causal_forward_refuses_a_value_wider_than_q_naming_the_shapes():
    """causal_attention writes V <= W columns (attention.py pads q and k to the value's width first): a wider v is
    refused naming the shapes, not cut by a negative pad into torch's narrow error."""
    assert cpu_kernels.available()
    q, k, v = (torch.randn(1, 2, 8, width, dtype=torch.bfloat16) for width in (16, 16, 24))
    with pytest.raises(RuntimeError, match=r"V <= W, not q \[1, 2, 8, 16\], k \[1, 2, 8, 16\], v \[1, 2, 8, 24\]"):
        torch.ops.seekstack.causal_attention(q, k, v, 0.25)


def test_the_fused_attention_backward_refuses_float32_naming_the_dtype_it_takes():
    """The kernel is bfloat16 only (float32 takes causal_attention_training_backward): a float32 call is refused, not
    computed."""
    assert cpu_kernels.available()
    q, k, v, grad = (torch.randn(1, 2, 8, 16) for _ in range(4))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True, scale=0.25)
    with pytest.raises(
        RuntimeError, match=r"must be bfloat16 \(float32: causal_attention_training_backward\), not Float"
    ):
        torch.ops.seekstack.causal_attention_backward(grad, q, k, v, out, lse, 0.25)


def test_a_second_order_gradient_through_the_fused_attention_is_refused_not_returned_without_its_graph():
    """create_graph=True gave dL/dq without a graph (once_differentiable, the incoming gradient a constant), so a
    gradient penalty silently lost attention's part; torch's flash SDPA refuses it too. The message names the way out:
    the math backend, whose gradient keeps its graph."""
    assert cpu_kernels.available()
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention._CausalAttention.apply(q, k, v, 0.25)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*sdpa_kernel\(SDPBackend.MATH\)"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
        assert torch.autograd.grad(out.sum(), q, create_graph=True)[0].requires_grad


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_training_attention_takes_the_fused_attention_when_causal_and_matches_torchs_sdpa(
    monkeypatch, dtype, tolerance
):
    """A training forward without a mask, float32 or bfloat16 (autocast), runs the fused causal attention; with an
    attention_mask, with the kernels switched off or under sdpa_kernel(SDPBackend.MATH) it runs torch's SDPA, and the
    gradients agree (within 0.01% of each gradient's largest value in float32, 2% in bfloat16); without gradients it
    runs inference's forward kernels instead (test_float32_inference_takes_the_float32_training_forward_only_...)."""
    assert cpu_kernels.available()
    torch.manual_seed(0)
    model = Transformer(micro_config(num_nextn_predict_layers=0)).train()
    ids = torch.randint(128, (2, 12))
    calls = []
    fused = attention._CausalAttention.apply
    monkeypatch.setattr(attention._CausalAttention, "apply", lambda *args: calls.append(1) or fused(*args))

    def gradients(**inputs) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids, labels=ids, **inputs).loss
        loss.backward()
        return [p.grad for p in model.parameters() if p.grad is not None]

    with_kernel = gradients()
    assert len(calls) == 3  # one a layer
    with_mask = gradients(attention_mask=torch.ones(2, 12, dtype=torch.long))
    cpu_kernels.set_enabled(False)
    try:
        without = gradients()
    finally:
        cpu_kernels.set_enabled(True)
    with sdpa_kernel(SDPBackend.MATH):  # the user's choice of torch's SDPA backend holds
        as_math = gradients()
    with torch.no_grad():
        model(ids)
    assert len(calls) == 3
    for a, b, c, d in zip(with_kernel, with_mask, without, as_math, strict=True):
        for got in (a, b, d):
            torch.testing.assert_close(got, c, rtol=tolerance, atol=tolerance * c.abs().max().item())


def test_without_a_compiler_the_warning_names_the_attention_backward_and_training_keeps_torchs_sdpa(monkeypatch):
    """In bfloat16, where training attention takes the fused backward when the kernels built."""

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(attention._CausalAttention, "apply", lambda *args: pytest.fail("the fused attention ran"))
    model = Transformer(micro_config(num_nextn_predict_layers=0)).train()
    ids = torch.randint(128, (2, 12))
    with pytest.warns(UserWarning, match="did not build, .* and causal attention run without it: Ninja"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
    assert model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
