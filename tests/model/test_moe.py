"""DeepSeekMoE: routing rules of V2 and V3, grouped dispatch equal to a per-token loop, balance signals."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension
from torch.utils._python_dispatch import TorchDispatchMode

from seekstack.model import cpu_kernels
from seekstack.model.moe import MoE, RoutedExperts, Router, Routing, sequence_balance_loss, swiglu
from seekstack.model.transformer import Transformer
from seekstack.train.balance import max_violation, update_expert_bias
from tests.conftest import micro_config


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The plain definition: for every token, sum over its K experts g_k FFN_k(x), plus the shared experts."""
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.gate(flat)
    rows = []
    for t in range(flat.shape[0]):
        out = moe.shared_experts(flat[t])
        for weight, expert in zip(routing.weights[t], routing.experts[t].tolist(), strict=True):
            gate, up = (moe.experts.gate_up_proj[expert] @ flat[t]).chunk(2)
            out = out + weight * (moe.experts.down_proj[expert] @ (F.silu(gate) * up))
        rows.append(out)
    return torch.stack(rows).view_as(x)


def make_moe(**overrides) -> MoE:
    model = Transformer(micro_config(**overrides))
    return model.layers[1].mlp


def test_a_float64_moe_runs_its_experts_one_by_one_as_the_float32_one_does_grouped():
    """torch's grouped matmul takes no float64: `load_pretrained(dtype=torch.float64)` loaded, then its forward
    failed ('Expected mat_a to be Float32, BFloat16 or Float16')."""
    moe = make_moe()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        single, _ = moe(x)
        double, _ = moe.double()(x.double())
    assert double.dtype == torch.float64 and (double - single.double()).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "overrides",
    [{}, {"scoring_func": "softmax", "topk_method": "greedy"}, {"topk_method": "group_limited_greedy"}],
    ids=["v3-noaux_tc", "v2-greedy", "v2-group-limited"],
)
def test_grouped_dispatch_matches_per_token_loop(overrides):
    moe = make_moe(**overrides)
    with torch.no_grad():
        if moe.gate.aux_free:
            moe.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 9, 64, requires_grad=True)
    out, stats = moe(x)
    expected = reference_moe(moe, x)
    assert (out - expected).abs().max().item() < 1e-5
    assert stats.expert_load.sum().item() == 2 * 9 * 2  # every token sent to K=2 experts
    # each expert's load is the tokens the router sent to it (bincount of its choices), not only the right total
    chosen = moe.gate(x.detach().reshape(-1, 64)).experts.flatten()
    assert stats.expert_load.tolist() == torch.bincount(chosen, minlength=moe.gate.num_experts).tolist()

    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(expected, x, grad)
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("expert_width", [32, 6], ids=["grouped-matmul", "per-expert-widths-off-16-bytes"])
def test_one_grouped_matmul_and_the_per_expert_fallback_give_the_per_token_loop(expert_width):
    moe = make_moe(moe_intermediate_size=expert_width)
    x = torch.randn(2, 7, 64, requires_grad=True)
    flat = x.reshape(-1, 64)
    routing = moe.gate(flat)
    routed = moe.experts(flat, routing)
    assert (routed + moe.shared_experts(flat) - reference_moe(moe, x).view_as(flat)).abs().max().item() < 1e-5
    (grad,) = torch.autograd.grad(routed.square().sum(), moe.experts.down_proj)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_routed_experts_multiply_in_the_autocast_dtype_within_its_tolerance_of_float32():
    """torch's grouped matmul is not on CPU autocast's list: a bf16 training step multiplied the routed experts in
    float32, at a fraction of the bf16 matmul's speed where the CPU has AMX."""
    moe = make_moe()
    x = torch.randn(4, 16, 64, requires_grad=True)
    flat = x.reshape(-1, 64)
    routing = moe.gate(flat)
    exact = moe.experts(flat, routing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = moe.experts(flat, routing)
    assert routed.dtype == torch.bfloat16
    assert (routed.float() - exact).abs().max().item() < 0.02 * exact.abs().max().item()
    (grad,) = torch.autograd.grad(routed.float().square().sum(), x, retain_graph=True)
    (exact_grad,) = torch.autograd.grad(exact.square().sum(), x)
    assert grad.dtype == torch.float32 and (grad - exact_grad).abs().max().item() < 0.03 * exact_grad.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 4, 16])  # 2, 6, 8, 32 (token, expert) pairs for 8 experts
@pytest.mark.parametrize("path", ["forward_pairs", "forward_dense"])
def test_each_compiled_inference_path_gives_the_grouped_dispatch_per_token(path, tokens, dtype):
    moe = make_moe().eval().to(dtype)
    flat = torch.randn(tokens, 64, dtype=dtype)
    with torch.no_grad():
        routing = moe.gate(flat)
        routed = getattr(moe.experts, path)(flat, routing)
        grouped = moe.experts(flat, routing)  # eager: the grouped dispatch
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * grouped.abs().max().item()
    assert routed.dtype == dtype and (routed.float() - grouped.float()).abs().max().item() < tolerance
    if dtype == torch.float32:
        expected = reference_moe(moe, flat.unsqueeze(0)).squeeze(0) - moe.shared_experts(flat)
        assert (routed - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "dtype, tokens, expected_path",
    [
        (torch.bfloat16, 31, "forward_kernel"),
        (torch.bfloat16, 32, "forward_dense"),
        (torch.float32, 1, "forward_kernel"),
        (torch.float32, 64, "forward_kernel"),
    ],
)
def test_compiled_inference_picks_its_path_by_dtype_and_shape_in_one_graph(dtype, tokens, expected_path):
    assert cpu_kernels.available()  # float32 on a CPU: the grouped-experts kernel, built before compiling
    moe = make_moe().eval().to(dtype)  # 8 experts, K=2: dense from 8 pairs per expert, 32 tokens, in bfloat16 only
    flat = torch.randn(tokens, 64, dtype=dtype)
    with torch.no_grad():
        routing = moe.gate(flat)
        grouped = moe.experts(flat, routing)  # eager
    taken = []
    for path in ("forward_pairs", "forward_dense", "forward_kernel"):
        run = getattr(moe.experts, path)
        setattr(moe.experts, path, lambda x, routing, run=run, path=path: taken.append(path) or run(x, routing))
    with torch.no_grad():
        compiled = torch.compile(moe.experts, backend="eager", fullgraph=True, dynamic=True)(flat, routing)
    assert taken == [expected_path]
    assert (compiled.float() - grouped.float()).abs().max().item() < 2e-2 * grouped.float().abs().max().item()


@pytest.mark.parametrize(
    "tokens, hidden, expert_width",
    [(1, 64, 32), (3, 64, 32), (16, 64, 32), (40, 64, 32), (5, 36, 6)],
    ids=["1-token", "3-tokens", "16-tokens", "40-tokens", "widths-off-8-floats"],
)
def test_grouped_experts_kernel_gives_the_per_token_loop(tokens, hidden, expert_width):
    assert cpu_kernels.available()
    moe = make_moe(hidden_size=hidden, moe_intermediate_size=expert_width).eval()
    flat = torch.randn(tokens, hidden)
    with torch.no_grad():
        routing = moe.gate(flat)
        routed = moe.experts.forward_kernel(flat, routing)
        expected = reference_moe(moe, flat.unsqueeze(0)).squeeze(0) - moe.shared_experts(flat)
    assert (routed - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize(("hidden", "expert_width"), [(36, 6), (100, 70)])  # widths off the 8- and 32-value vectors
def test_grouped_experts_kernel_takes_bfloat16_experts(tokens, hidden, expert_width):
    assert cpu_kernels.available()
    moe = make_moe(hidden_size=hidden, moe_intermediate_size=expert_width).eval().to(torch.bfloat16)
    flat = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    with torch.no_grad():
        routing = moe.gate(flat)
        routed = moe.experts.forward_kernel(flat, routing)
        expected = moe.experts.forward_pairs(flat, routing)
    assert routed.dtype == torch.bfloat16
    assert (routed.float() - expected.float()).abs().max().item() < 2e-2 * expected.float().abs().max().item()


def test_grouped_experts_kernel_with_every_token_on_the_same_experts_and_most_experts_idle():
    assert cpu_kernels.available()
    moe = make_moe().eval()
    flat = torch.randn(6, 64)
    with torch.no_grad():
        routing = moe.gate(flat)
        same = Routing(routing.weights, torch.tensor([[5, 2]] * 6), routing.scores)
        routed = moe.experts.forward_kernel(flat, same)
        expected = moe.experts.forward_pairs(flat, same)
    assert (routed - expected).abs().max().item() < 1e-5


def test_grouped_experts_kernel_refuses_an_expert_id_out_of_range_by_value():
    assert cpu_kernels.available()
    moe = make_moe().eval()
    flat = torch.randn(2, 64)
    routing = Routing(torch.ones(2, 2), torch.tensor([[0, 1], [3, 8]]), torch.zeros(2, 8))
    with torch.no_grad(), pytest.raises(RuntimeError, match="expert id 8 out of range"):
        moe.experts.forward_kernel(flat, routing)


NO_CHOICES = """
import torch
from seekstack.model import cpu_kernels
assert cpu_kernels.available()
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(3, 16, dtype=dtype)
    experts, weights = torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0)
    gate_up, down = torch.randn(4, 64, 16, dtype=dtype), torch.randn(4, 16, 32, dtype=dtype)
    out = cpu_kernels.grouped_experts(x, experts, weights, gate_up, down)
    assert out.dtype == dtype and out.shape == (3, 16) and not out.any(), out
    assert cpu_kernels.grouped_experts(x[:0], experts[:0], weights[:0], gate_up, down).shape == (0, 16)
"""


def test_grouped_experts_kernel_with_no_expert_chosen_gives_zeros_without_killing_the_process():
    """Tokens routed to no expert (K = 0 choices) sum no expert outputs: zeros, where the kernel read the first pair's
    output past its empty buffer (SIGSEGV). In a subprocess, so the crash shows as its signal."""
    run = subprocess.run([sys.executable, "-c", NO_CHOICES], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"


def test_eager_inference_of_few_tokens_runs_the_kernel_and_training_the_grouped_matmul():
    assert cpu_kernels.available()
    moe = make_moe()
    taken = []
    kernel = moe.experts.forward_kernel
    moe.experts.forward_kernel = lambda x, routing: taken.append(x.shape[0]) or kernel(x, routing)
    few, many = torch.randn(cpu_kernels.MAX_TOKENS, 64), torch.randn(cpu_kernels.MAX_TOKENS + 1, 64)
    with torch.no_grad():
        inferred = moe.experts(few, moe.gate(few))
        moe.experts(many, moe.gate(many))
    trained = moe.experts(few, moe.gate(few))
    assert taken == [cpu_kernels.MAX_TOKENS]
    assert trained.requires_grad and (trained - inferred).abs().max().item() < 1e-5


def test_bfloat16_inference_of_many_tokens_keeps_no_copy_of_the_experts_weights():
    """A second copy of every routed expert's weights (oneDNN-packed, kept for the model's life) doubled the experts'
    memory of a bf16 model served on a CPU and copied disk-placed experts into RAM: nothing outlives the forward."""
    moe = make_moe().eval().to(torch.bfloat16)
    flat = torch.randn(cpu_kernels.MAX_TOKENS + 40, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        routing = moe.gate(flat)
        gc.collect()
        before = sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())
        moe.experts(flat, routing)
        gc.collect()
        after = sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())
    assert after == before


def test_compiled_float32_training_forward_matches_eager_with_gradients():
    moe = make_moe().train()
    x = torch.randn(3, 8, 64)
    eager_out, _ = moe(x)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), moe.experts.gate_up_proj)
    compiled_out, _ = torch.compile(moe, backend="aot_eager")(x)  # train.compile=true traces this grouped dispatch
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), moe.experts.gate_up_proj)
    assert (compiled_out - eager_out).abs().max().item() < 1e-5
    assert (compiled_grad - eager_grad).abs().max().item() < 1e-5 and eager_grad.abs().sum() > 0


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_swiglu_and_its_gradients_match_the_formula_and_switch_off_to_it(dtype, tolerance, weighted):
    assert cpu_kernels.available()
    torch.manual_seed(0)
    gate_up = torch.randn(9, 2 * 40) * 3  # the halves of one projection, strided rows of 40: vector steps and a tail
    weights = torch.rand(9) if weighted else None
    upstream = torch.randn(9, 40)
    gate_up64 = gate_up.double().requires_grad_()
    weights64 = weights.double().requires_grad_() if weighted else None
    gate64, up64 = gate_up64.chunk(2, dim=-1)
    reference = F.silu(gate64) * up64 * (weights64[:, None] if weighted else 1)
    (reference * upstream.double()).sum().backward()
    expected = [reference, gate_up64.grad] + ([weights64.grad] if weighted else [])
    for fused in (True, False):
        cpu_kernels.set_enabled(fused)
        try:
            ours_gate_up = gate_up.to(dtype, copy=True).requires_grad_()
            ours_weights = weights.clone().requires_grad_() if weighted else None
            out = swiglu(*ours_gate_up.chunk(2, dim=-1), ours_weights)
            (out * upstream.to(dtype)).sum().backward()
            with torch.no_grad():
                inference = swiglu(*ours_gate_up.chunk(2, dim=-1), ours_weights)
        finally:
            cpu_kernels.set_enabled(True)
        nodes = [out.grad_fn] + [node for node, _ in out.grad_fn.next_functions]  # the kernel's, under a view
        assert any(type(node).__name__ == "_SwiGLUBackward" for node in nodes) == fused
        assert out.dtype == ours_gate_up.grad.dtype == dtype
        assert torch.equal(inference, out.detach())
        found = [out, ours_gate_up.grad] + ([ours_weights.grad] if weighted else [])
        for ours, theirs in zip(found, expected, strict=True):
            assert (ours.double() - theirs).abs().max().item() <= tolerance * theirs.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_of_inputs_transposed_along_a_row_matches_the_formula(dtype):
    assert cpu_kernels.available()
    gate, up = torch.randn(40, 9, dtype=dtype).T, torch.randn(40, 9, dtype=dtype).T  # (9, 40), a column apart
    weights = torch.rand(9)
    expected = F.silu(gate.double()) * up.double() * weights.double()[:, None]
    assert (swiglu(gate, up, weights).double() - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_of_no_rows_gives_empty_gradients(dtype):
    assert cpu_kernels.available()
    gate_up, weights = torch.randn(0, 80, dtype=dtype, requires_grad=True), torch.rand(0, requires_grad=True)
    out = swiglu(*gate_up.chunk(2, dim=-1), weights)  # a batch of no tokens: no (token, expert) pairs
    out.sum().backward()
    assert out.shape == (0, 40) and gate_up.grad.shape == (0, 80) and weights.grad.shape == (0,)


def test_correction_bias_changes_selection_but_not_weights():
    moe = make_moe(norm_topk_prob=False, routed_scaling_factor=1.0)
    x = torch.randn(16, 64)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[5] = 100.0  # expert 5 wins every token's selection
        routing = moe.gate(x)
    assert (routing.experts == 5).any(dim=1).all()
    expected = routing.scores.gather(1, routing.experts)
    assert torch.allclose(routing.weights, expected)  # weights are the unbiased sigmoid scores
    assert routing.weights.max().item() < 1.0


def test_router_scores_in_float32_under_bfloat16_autocast_and_choose_the_experts_float32_chooses():
    """Under autocast the router's F.linear multiplied in bf16, so the scores were bf16 (steps of 2^-8 from 0.5 up,
    coarser than the bias's updates) and tokens went to other experts than in float32."""
    moe = make_moe()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randn(8, 64, generator=generator) / 8)
        moe.gate.e_score_correction_bias.copy_(torch.randn(8, generator=generator) * 1e-3)
        plain = moe.gate(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = moe.gate(x)
    assert autocast.scores.dtype == torch.float32
    assert torch.equal(autocast.scores, plain.scores) and torch.equal(autocast.experts, plain.experts)


def test_weights_are_normalised_then_scaled():
    moe = make_moe(norm_topk_prob=True, routed_scaling_factor=2.5)
    routing = moe.gate(torch.randn(10, 64))
    assert torch.allclose(routing.weights.sum(dim=1), torch.full((10,), 2.5))


@pytest.mark.parametrize("method, chosen_group", [("noaux_tc", 1), ("group_limited_greedy", 0)])
def test_group_score_is_top2_sum_for_v3_and_max_for_v2(method, chosen_group):
    config = micro_config(n_routed_experts=8, n_group=2, topk_group=1, topk_method=method)
    router = Router(config)
    # group 0 has one strong expert (max 0.9, top-2 sum 0.9); group 1 two good ones (max 0.6, top-2 sum 1.2)
    choice = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.6, 0.6, 0.0, 0.0]])
    limited = router.limit_to_groups(choice)
    kept = torch.isfinite(limited).view(2, 4).all(dim=1)
    assert kept.tolist() == [chosen_group == 0, chosen_group == 1]


@pytest.mark.parametrize(
    "method, scoring, experts, groups, kept_groups, top_k",
    [
        ("noaux_tc", "sigmoid", 8, 2, 1, 2),  # V3: a group's top-2 summed, the bias in the choice
        ("noaux_tc", "sigmoid", 64, 8, 3, 8),
        ("noaux_tc", "softmax", 16, 4, 4, 6),  # every group kept
        ("noaux_tc", "sigmoid", 8, 1, 1, 3),  # one group
        ("group_limited_greedy", "softmax", 16, 4, 2, 3),  # V2: a group's best
        ("group_limited_greedy", "sigmoid", 16, 1, 1, 4),
        ("greedy", "softmax", 8, 1, 1, 2),
        ("greedy", "softmax", 16, 8, 4, 5),  # greedy ignores the groups it is given
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_few_rows_route_in_one_kernel_call_as_torchs_ops_do_in_every_routing_setting(
    method, scoring, experts, groups, kept_groups, top_k, dtype
):
    """Routing.experts, weights and scores of up to MAX_TOKENS rows from route_rows equal torch's ops' bitwise: ties
    (inputs on a grid), their order, NaN rows, the bias, norm_topk_prob on and off, the scaling, a bfloat16 router."""
    assert cpu_kernels.available()
    normalise = method != "greedy"  # norm_topk_prob and routed_scaling_factor on, or off
    config = micro_config(
        n_routed_experts=experts, num_experts_per_tok=top_k, n_group=groups, topk_group=kept_groups,
        topk_method=method, scoring_func=scoring, norm_topk_prob=normalise,
        routed_scaling_factor=2.5 if normalise else 1.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    router = Router(config).to(dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randint(-2, 3, router.weight.shape, generator=generator) / 4)
        if method == "noaux_tc":  # on a grid too, so that biased choices tie
            router.e_score_correction_bias.copy_(torch.randint(-2, 3, (experts,), generator=generator) / 64)
    x = torch.randn(40, cpu_kernels.MAX_TOKENS, config.hidden_size, generator=generator)
    x[::2] = x[::2].round()  # ties within and across groups
    x[3, 0] = float("nan")  # a NaN row: every score NaN, torch.topk takes NaN as the largest
    x[5, 1, 7] = float("nan")
    called = []

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(str(func))
            return func(*args, **(kwargs or {}))

    for rows in x.to(dtype):
        with torch.no_grad(), Calls():
            by_kernel = router(rows)
        cpu_kernels.set_enabled(False)
        try:
            with torch.no_grad():
                by_torch = router(rows)
        finally:
            cpu_kernels.set_enabled(True)
        assert torch.equal(by_kernel.experts, by_torch.experts)
        for got, expected in ((by_kernel.weights, by_torch.weights), (by_kernel.scores, by_torch.scores)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert "seekstack.route_rows.default" in called and "aten.topk.default" not in called


@pytest.mark.parametrize(
    "rows, grad, kernel", [(1, False, True), (16, False, True), (17, False, False), (1, True, False)]
)
def test_a_compiled_routers_few_rows_without_gradients_route_in_one_kernel_call_as_torchs_ops_do(rows, grad, kernel):
    """Compiled (a decode step's graph), 1-16 rows without gradients take route_rows, not inductor's three topk calls;
    more rows and gradients keep torch's ops; either way the experts and weights are eager torch's, bitwise."""
    assert cpu_kernels.available()
    config = micro_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc")
    router = Router(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) / 4)
        router.e_score_correction_bias.copy_(torch.randn(16, generator=generator) / 8)
    x = torch.randn(rows, config.hidden_size, generator=generator)
    ops = []

    def backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op in ("call_function", "call_method"))
        return graph.forward

    cpu_kernels.set_enabled(False)
    try:
        expected = router(x)
    finally:
        cpu_kernels.set_enabled(True)
    with torch.set_grad_enabled(grad):
        routing = torch.compile(router, backend=backend, fullgraph=True)(x)
    assert any("route_rows" in op for op in ops) == kernel
    assert any("topk" in op for op in ops) != kernel
    assert torch.equal(routing.experts, expected.experts) and torch.equal(routing.weights, expected.weights)


@pytest.mark.parametrize(
    "scores, bias, groups, kept_groups, top_k, message",
    [
        (
            torch.rand(2, 8, dtype=torch.bfloat16),
            None,
            2,
            1,
            2,
            r"scores must be \(N, E\) float32, not BFloat16 \[2, 8\]",
        ),
        (torch.rand(8), None, 2, 1, 2, r"scores must be \(N, E\) float32, not Float \[8\]"),
        (torch.rand(2, 8), None, 3, 1, 2, "n_group 3 does not divide the 8 experts"),
        (torch.rand(2, 8), None, 0, 1, 2, "n_group 0 does not divide the 8 experts"),
        (torch.rand(2, 8), None, 2, 3, 2, "topk_group 3 is not between 1 and n_group 2"),
        (torch.rand(2, 8), torch.zeros(8), 8, 1, 2, "a group's top-2 sum needs 2 experts a group, not 1"),
        (torch.rand(2, 8), None, 1, 1, 9, "top_k 9 is not between 1 and the 8 experts"),
        (torch.rand(2, 8), torch.zeros(4), 2, 1, 2, r"bias must be \(8,\) float32, not Float \[4\]"),
        (torch.rand(2, 8), torch.zeros(8, dtype=torch.float64), 2, 1, 2, r"bias must be \(8,\) float32, not Double"),
    ],
)
def test_the_routing_kernel_refuses_inputs_it_cannot_route_naming_the_one_at_fault(
    scores, bias, groups, kept_groups, top_k, message
):
    assert cpu_kernels.available()
    with pytest.raises(RuntimeError, match="route_rows: " + message):
        torch.ops.seekstack.route_rows(scores, bias, groups, kept_groups, bias is not None, top_k)


def test_routing_never_leaves_the_chosen_groups():
    moe = make_moe(n_group=4, topk_group=1, num_experts_per_tok=2)
    routing = moe.gate(torch.randn(64, 64))
    groups = routing.experts // 2  # 8 experts in 4 groups of 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_sequence_balance_loss_is_one_when_perfectly_balanced():
    # 2 tokens, 2 experts, K=1: each expert chosen once, scores uniform -> f_i = 1, P_i = 1/2, sum = 1
    routing = Routing(weights=torch.ones(2, 1), experts=torch.tensor([[0], [1]]), scores=torch.full((2, 2), 0.5))
    assert sequence_balance_loss(routing, batch=1, seq_len=2).item() == pytest.approx(1.0)
    skewed = Routing(weights=torch.ones(2, 1), experts=torch.tensor([[0], [0]]), scores=torch.tensor([[0.9, 0.1]] * 2))
    assert sequence_balance_loss(skewed, batch=1, seq_len=2).item() == pytest.approx(2 * 0.9)


def test_sequence_balance_loss_normalises_each_tokens_scores_and_averages_the_sequences():
    """V3 eq. 17-20 by hand with sigmoid scores that do not sum to 1 (s'_{i,t} = s_{i,t} / sum_j s_{j,t}), two
    sequences of 2 tokens, 2 experts, K = 1.
    Sequence a: both tokens on expert 0 -> f = (2, 0); s' = (2/3, 1/3), (1/4, 3/4) -> P_0 = 11/24; L = 11/12.
    Sequence b: experts 1 then 0 -> f = (1, 1); s' = (1/2, 1/2), (3/4, 1/4) -> P = (5/8, 3/8); L = 1.
    The batch's loss is their mean, 23/24 (unnormalised scores give 21/20; the batch as one sequence 25/24)."""
    scores = torch.tensor([[0.8, 0.4], [0.2, 0.6], [0.5, 0.5], [0.9, 0.3]])
    routing = Routing(weights=torch.ones(4, 1), experts=torch.tensor([[0], [0], [1], [0]]), scores=scores)
    assert sequence_balance_loss(routing, batch=2, seq_len=2).item() == pytest.approx(23 / 24, rel=1e-6)


def test_moe_balance_loss_is_alpha_times_the_sequence_wise_loss():
    moe = make_moe(aux_loss_alpha=0.25).train()
    x = torch.randn(2, 9, 64)
    _, stats = moe(x)
    unscaled = sequence_balance_loss(moe.gate(x.reshape(18, 64)), batch=2, seq_len=9)
    assert unscaled.item() > 0.5
    assert stats.balance_loss.item() == pytest.approx(0.25 * unscaled.item(), rel=1e-6)


def test_sequence_balance_loss_counts_in_float32_under_bfloat16_scores():
    """bf16 router scores (autocast) still count an expert chosen 409 times as 409, not bf16's 408, in float32."""
    scores = torch.tensor([[0.75, 0.25]], dtype=torch.bfloat16).expand(409, 2)
    routing = Routing(weights=torch.ones(409, 1), experts=torch.zeros(409, 1, dtype=torch.long), scores=scores)
    loss = sequence_balance_loss(routing, batch=1, seq_len=409)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(2 * 0.75, rel=1e-6)  # f_0 = 2, P_0 = 0.75


def test_balance_loss_reported_only_when_enabled_and_training():
    model = Transformer(micro_config(aux_loss_alpha=0.01)).train()
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, labels=ids)
    assert out.balance_loss is not None and out.balance_loss.item() > 0
    assert torch.allclose(out.loss, out.lm_loss + 0.3 * out.mtp_loss + out.balance_loss)
    assert Transformer(micro_config()).train()(ids, labels=ids).balance_loss is None


def test_padding_counts_in_neither_the_expert_load_nor_the_balance_loss():
    """Rows of 5 and 9 tokens padded to 9 give the load and balance loss of the two rows run alone (the padding is
    routed: uncounted, its pad tokens sent the balance bias and loss against the experts they pick)."""
    model = Transformer(micro_config(aux_loss_alpha=0.1)).train()
    rows = [torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(length)) for length in (5, 9)]
    padded = torch.full((2, 9), 2)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    together = model(padded, labels=padded, counted=padded != 2)
    alone = [model(row[None], labels=row[None]) for row in rows]
    torch.testing.assert_close(together.expert_load, alone[0].expert_load + alone[1].expert_load, rtol=0, atol=0)
    torch.testing.assert_close(together.balance_loss, (alone[0].balance_loss + alone[1].balance_loss) / 2)
    uncounted = model(padded, labels=padded)
    # without `counted`: 4 padded positions in each of the 2 MoE layers and the MTP block, 2 experts each
    assert uncounted.expert_load.sum() - together.expert_load.sum() == 2 * (4 + 4 + 4)


def test_bias_update_lowers_overloaded_experts():
    model = Transformer(micro_config())
    load = torch.zeros(len(model.moe_layer_ids), 8)
    load[:, 0] = 10.0  # expert 0 overloaded, the rest idle
    update_expert_bias(model, load, rate=0.01)
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias[0].item() == pytest.approx(-0.01)
    assert torch.allclose(bias[1:], torch.full((7,), 0.01))
    assert model.moe_layer_ids == [1, 2, 3]  # layers 1, 2 and the MTP block 3


def test_bias_update_moves_each_moe_layer_by_its_own_load_row():
    """Row j of the load is MoE layer j's (layers 1 and 2, then the MTP block): every layer is updated, each by its
    own row."""
    model = Transformer(micro_config())
    routers = [model.layers[1].mlp.gate, model.layers[2].mlp.gate, model.mtp[0].block.mlp.gate]
    load = torch.ones(len(routers), 8)
    for row in range(len(routers)):
        load[row, row] = 10.0  # layer j overloads expert j; the other experts are below the mean
    update_expert_bias(model, load, rate=0.01)
    for row, router in enumerate(routers):
        expected = torch.full((8,), 0.01)
        expected[row] = -0.01
        torch.testing.assert_close(router.e_score_correction_bias, expected)


def test_a_greedy_routing_model_has_no_bias_to_update_and_trains_without_one():
    """`seekstack train` (and `prune --heal-steps`, which takes no bias_update_rate) on a model of greedy routing,
    DeepSeek-V2's, ended at its first step with the default bias_update_rate=0.001: 'layer 1: topk_method 'greedy' has
    no correction bias to update'; the update leaves such a model as it is."""
    model = Transformer(micro_config(topk_method="greedy", scoring_func="softmax"))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    update_expert_bias(model, torch.ones(len(model.moe_layer_ids), 8).index_fill_(1, torch.tensor([0]), 5.0))
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


def test_max_violation():
    assert max_violation(torch.tensor([1.0, 1.0, 1.0, 1.0])).item() == 0.0
    assert max_violation(torch.tensor([4.0, 0.0, 0.0, 0.0])).item() == pytest.approx(3.0)


def test_correction_bias_stays_float32_when_the_model_is_cast():
    model = Transformer(micro_config())
    with torch.no_grad():
        model.layers[1].mlp.gate.e_score_correction_bias.fill_(0.1234567)
    model = model.to(torch.bfloat16)
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(0.1234567, abs=1e-7)
    assert model.layers[1].mlp.gate.weight.dtype == torch.bfloat16
    update_expert_bias(model, torch.ones(3, 8).index_fill_(1, torch.tensor([0]), 5.0), rate=0.001)
    assert bias[0].item() == pytest.approx(0.1224567, abs=1e-7)  # a 1e-3 step survives


def test_without_a_compiler_the_kernels_warn_once_and_the_experts_keep_their_grouped_matmul(monkeypatch):
    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="cpu_kernels.cpp did not build.*Ninja is required") as warned:
        assert not cpu_kernels.available()
        assert not cpu_kernels.available()  # tried once: no second build, no second warning
    assert len(warned) == 1
    moe = make_moe().eval()
    flat = torch.randn(3, 64)
    with torch.no_grad():
        routed = moe.experts(flat, moe.gate(flat))
    expected = reference_moe(moe, flat.unsqueeze(0)).squeeze(0) - moe.shared_experts(flat)
    assert (routed - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("part", [Router, RoutedExperts])
def test_an_moe_part_built_on_a_dense_config_is_refused_naming_the_field(part):
    """Router and RoutedExperts asserted that the config has routed experts: a bare AssertionError naming nothing,
    and no check at all under `python -O`, which strips asserts (an empty router, failing later in its top-K)."""
    dense = micro_config(n_routed_experts=0)
    with pytest.raises(
        ValueError, match=rf"^{part.__name__} needs routed experts, and the config has n_routed_experts=0"
    ):
        part(dense)
