"""The output head's decode layout and the block linears' weight-first products (seekstack.infer.packed): the same
products, the same state dict and tokens, and a copy that follows the weights."""

from __future__ import annotations

import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seekstack.checkpoint import load_pretrained
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.packed import (
    WEIGHT_FIRST_MAX_ROWS,
    DecodeFeedForward,
    DecodeHead,
    DecodeLatentAttention,
    DecodeLinear,
    WeightVersions,
    copied_linears,
    decode_layout_bytes,
    pack_for_decode,
)
from seekstack.model import cpu_kernels
from seekstack.model.attention import MultiHeadLatentAttention
from seekstack.model.moe import FeedForward
from tests.infer.support import VOCAB, micro_model, model_dir

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("packed"))


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(5, VOCAB, (3 + 4 * row,), generator=generator).tolist() for row in range(count)]


@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 48), (5, 48), (2, WEIGHT_FIRST_MAX_ROWS // 2, 48), (40, 48)])
def test_decode_head_gives_the_linear_products_for_every_row_count(shape):
    linear = nn.Linear(48, 300, bias=False)
    expected = F.linear(x := torch.randn(shape), linear.weight).detach()
    with torch.no_grad():
        out = DecodeHead.adapt(linear)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 16, 17, 40])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("outputs", [700, 3, 258])
def test_rows_linear_kernel_gives_the_linear_products(rows, threads, outputs):
    """Each thread's block of output rows is read as 4 streams of equal parts, its last (rows mod 4) alone: 700 rows
    (two blocks of 350 on 2 threads: 2 left over), 258 (129 per thread: 1 left over), 3 (fewer rows than streams).
    The token rows go 4 (AVX-512) or 2 a pass: 1, 2, 3 rows left over."""
    assert cpu_kernels.available()
    x, weight = torch.randn(rows, 37), torch.randn(outputs, 37)  # rows of 37 floats: a tail past the 8-float vectors
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernels.rows_linear(x, weight)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("outputs", "inputs"), [(700, 37), (33, 17), (31, 5), (3, 1)])
def test_rows_linear_over_weight_panels_gives_the_linear_products_within_float32_rounding(
    rows, threads, outputs, inputs
):
    """Panels of 32 columns, the last of outputs % 32 (700: 28, 33: 1; 31 and 3: one partial panel); token rows 8
    (AVX-512) or 2 a pass, 1-7 left over; 1-2 and past 16 rows the weight's own product. Checked against float64."""
    assert cpu_kernels.available()
    x, weight = torch.randn(rows, inputs), torch.randn(outputs, inputs)
    panels = cpu_kernels.weight_panels(weight)
    assert panels.shape == (outputs * inputs,)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = cpu_kernels.rows_linear(x, weight, panels)
    finally:
        torch.set_num_threads(before)
    exact = x.double() @ weight.double().t()
    bound = (x.double().abs() @ weight.double().abs().t()) * inputs * 2**-24  # `inputs` rounded products summed
    assert out.shape == (rows, outputs) and bool(((out.double() - exact).abs() <= bound).all())


def test_rows_linear_refuses_panels_of_another_weight_naming_both():
    weight = torch.randn(64, 48)
    with pytest.raises(RuntimeError, match=r"panels \(Float, 3000 values\) are not those of the weight \[64, 48\]"):
        cpu_kernels.rows_linear(torch.randn(4, 48), weight, torch.randn(3000))


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("columns", [37, 101])
def test_rows_linear_kernel_takes_bfloat16_weights_and_rows(rows, columns):
    """bfloat16 in, bfloat16 out: exact products (vdpbf16ps, or weights widened as they are read), the sums in
    float32, rounded once at the end (258 outputs: 4 streams and 2 rows left over; 37 and 101 columns: tails past the
    8- and 32-value vectors)."""
    assert cpu_kernels.available()
    x, weight = torch.randn(rows, columns, dtype=torch.bfloat16), torch.randn(258, columns, dtype=torch.bfloat16)
    out = cpu_kernels.rows_linear(x, weight)
    exact = F.linear(x.float(), weight.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, exact.to(torch.bfloat16), rtol=1e-2, atol=1e-2)  # one rounding of the float sum
    with pytest.raises(RuntimeError, match="weights must be in x's dtype"):
        cpu_kernels.rows_linear(x, weight.float())


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("panels", [False, True])
def test_rows_linear_kernel_refuses_a_weight_of_another_width_by_its_shape(rows, panels):
    """Past 16 rows too, where torch's linear takes the rows (it named no weight, only 'mat1 and mat2 shapes')."""
    assert cpu_kernels.available()
    weight = torch.randn(30, 40)
    op = "rows_linear_panels" if panels else "rows_linear"
    with pytest.raises(RuntimeError, match=rf"{op}: weight \[30, 40\] does not take rows of 48"):
        cpu_kernels.rows_linear(torch.randn(rows, 48), weight, cpu_kernels.weight_panels(weight) if panels else None)


def test_rows_linear_panels_refuses_a_bfloat16_weight_naming_it():
    assert cpu_kernels.available()
    weight = torch.randn(30, 48, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"panels are float32 copies, the weight \[30, 48\] is BFloat16"):
        cpu_kernels.rows_linear(torch.randn(3, 48, dtype=torch.bfloat16), weight, torch.randn(30 * 48))


def test_weight_panels_are_laid_out_in_the_kernels_own_panel_width():
    """cpu_kernels.cpp reports its layout (`panel_layout`), which `weight_panels` and `reads_panels` follow: panel p
    holds W[p w : (p + 1) w, :]^T, and the rows read them from min_rows to MAX_TOKENS."""
    assert cpu_kernels.available()
    width, min_rows = cpu_kernels.panel_layout()
    weight = torch.arange(70 * 5, dtype=torch.float32).view(70, 5)
    panels = cpu_kernels.weight_panels(weight)
    torch.testing.assert_close(panels[: width * 5].view(5, width), weight[:width].t())
    torch.testing.assert_close(panels[2 * width * 5 :].view(5, 70 - 2 * width), weight[2 * width :].t())
    reading = [rows for rows in range(1, 20) if cpu_kernels.reads_panels(rows)]
    assert reading == list(range(min_rows, cpu_kernels.MAX_TOKENS + 1))


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
@pytest.mark.parametrize("shape", [(2, 3, 48), (3, 7, 48)], ids=["6-rows-kernel", "21-rows-blas"])
def test_decode_linear_compiled_over_several_rows_gives_the_linear_products(shape):
    assert cpu_kernels.available()
    linear = nn.Linear(48, 30, bias=False)
    x = torch.randn(shape)
    expected = F.linear(x, linear.weight).detach()
    linear.__class__ = DecodeLinear
    with torch.no_grad():
        out = torch.compile(linear, dynamic=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_compiled_head_runs_the_kernel_in_the_graph_not_a_python_op(rows):
    """decode_head is a Python op: a compiled step that calls it leaves its graph for Python at every step."""
    assert cpu_kernels.available()
    ops = []

    def recording(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    pack_for_decode(model := micro_model())
    head = model.lm_head
    x = torch.randn(1, rows, head.in_features)
    with torch.no_grad():
        out = torch.compile(head, backend=recording, dynamic=True)(x)
        torch.testing.assert_close(out, F.linear(x, head.weight), rtol=1e-5, atol=1e-5)
    assert "seekstack.rows_linear_panels" in ops and not any("decode_head" in op for op in ops)


def test_decode_linear_runs_the_kernel_for_up_to_16_rows_without_gradients_only(monkeypatch):
    assert cpu_kernels.available()
    calls = []
    kernel = cpu_kernels.rows_linear
    monkeypatch.setattr(cpu_kernels, "rows_linear", lambda x, *weights: calls.append(x.shape[0]) or kernel(x, *weights))
    linear = nn.Linear(48, 30, bias=False)
    linear.__class__ = DecodeLinear
    few, many = torch.randn(4, 48), torch.randn(cpu_kernels.MAX_TOKENS + 1, 48)
    with torch.no_grad():
        for x in (few, many, few[:1]):
            torch.testing.assert_close(linear(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)
    trained = linear(few)
    assert calls == [4, 1] and trained.requires_grad


@pytest.mark.parametrize("rows", [1, 2, 3, 16])
@pytest.mark.parametrize("kind", ["linear", "head"])
def test_a_packed_linear_reads_its_weight_panels_at_3_to_16_rows_and_its_weight_below(kind, rows):
    """The panels are the copy of the weight that eager 3-16 row products read (and only they): zeroed, those rows
    come out zero, while 1-2 rows still give the weight's products."""
    assert cpu_kernels.available()
    if kind == "head":
        pack_for_decode(model := micro_model())
        linear = model.lm_head
    else:
        linear = nn.Linear(48, 40, bias=False)
        linear.__class__ = DecodeLinear
        linear.lay_out()
    x = torch.randn(rows, linear.in_features)
    with torch.no_grad():
        linear.weight_panels.zero_()
        out = linear(x)
    expected = torch.zeros(rows, linear.out_features) if cpu_kernels.reads_panels(rows) else F.linear(x, linear.weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("plain", "packed", "method", "op", "unpacked", "left"),
    [
        (FeedForward, DecodeFeedForward, "forward", "feed_forward_rows", "up_proj", 2),
        (MultiHeadLatentAttention, DecodeLatentAttention, "project_query", "latent_query_rows", "q_b_proj", 1),
    ],
    ids=["feed-forward", "latent-query"],
)
def test_packed_modules_run_up_to_16_rows_in_one_kernel_call_bitwise_as_their_linears(
    monkeypatch, plain, packed, method, op, unpacked, left, dtype
):
    assert cpu_kernels.available()
    model = micro_model().to(dtype)
    pack_for_decode(model)
    modules = [m for m in model.modules() if isinstance(m, plain)]
    assert len(modules) > 1 and all(type(m) is packed for m in modules)  # the MTP block's too
    calls = []
    kernel = cpu_kernels.rows_linear
    monkeypatch.setattr(cpu_kernels, "rows_linear", lambda x, *weights: calls.append(x.shape[0]) or kernel(x, *weights))
    fused, one_call = [], getattr(torch.ops.seekstack, op)
    monkeypatch.setattr(torch.ops.seekstack, op, lambda *args: fused.append(1) or one_call(*args))
    module, most, D = modules[-1], cpu_kernels.MAX_TOKENS, model.config.hidden_size

    def calls_made(x: torch.Tensor) -> tuple[int, int]:
        """The module's method on x, checked bitwise against its modules' calls one by one, and the rows_linear calls
        it made from Python (a fused call makes none) and the fused calls."""
        with torch.no_grad():
            expected = getattr(plain, method)(module, x)
            python_before, fused_before = len(calls), len(fused)
            got = getattr(module, method)(x)
        assert torch.equal(got, expected)
        return len(calls) - python_before, len(fused) - fused_before

    for shape in [(1, 1, D), (2, 3, D), (1, most, D)]:
        assert calls_made(torch.randn(shape, dtype=dtype)) == (0, 1)  # one fused call, bitwise the modules'
    assert calls_made(torch.randn(1, most + 1, D, dtype=dtype)) == (0, 0)  # F.linear past 16 rows, as DecodeLinear
    try:
        cpu_kernels.set_enabled(False)  # the kernels off: every module's own path
        assert calls_made(torch.randn(1, 1, D, dtype=dtype)) == (0, 0)
    finally:
        cpu_kernels.set_enabled(True)
    linear = getattr(module, unpacked)
    setattr(module, unpacked, nn.Linear(linear.in_features, linear.out_features, bias=False).to(dtype))  # unpacked
    assert calls_made(torch.randn(1, 1, D, dtype=dtype)) == (left, 0)  # the other linears, one call each


def test_gradients_reach_the_weight_not_the_copy():
    linear = nn.Linear(48, 300, bias=False)
    x = torch.randn(1, 48)
    expected = torch.autograd.grad(F.linear(x, linear.weight).square().sum(), linear.weight)[0]
    head = DecodeHead.adapt(linear)
    torch.testing.assert_close(torch.autograd.grad(head(x).square().sum(), head.weight)[0], expected)


def test_from_pretrained_packs_the_head_as_the_other_linears_with_no_w_t_copy_and_keeps_the_state_dict(checkpoint):
    """Where the kernels are built, the head's one row runs `rows_linear` over W itself (as compiled steps run it),
    and it holds the panels alone: no W^T copy (25 MB on `small`)."""
    assert cpu_kernels.available()
    engine = Engine.from_pretrained(checkpoint)
    plain = load_pretrained(checkpoint, mtp=False)  # an engine that does not draft has no MTP module
    head = engine.model.lm_head
    assert type(head) is DecodeLinear and type(plain.lm_head) is nn.Linear
    assert "weight_t" not in head._buffers and torch.equal(head.panels, cpu_kernels.weight_panels(plain.lm_head.weight))
    assert type(engine.model.layers[0].self_attn.o_proj) is DecodeLinear
    ours, theirs = engine.model.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)  # the panels are not saved
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_without_the_kernels_the_head_keeps_w_t_for_its_one_row_products(monkeypatch):
    """No kernels built (no C++ compiler): MKL's x @ W^T over a contiguous copy is the fastest one-row call there."""
    monkeypatch.setitem(cpu_kernels._built, "ok", False)
    model, plain = micro_model(), micro_model()
    pack_for_decode(model)
    head = model.lm_head
    assert type(head) is DecodeHead and torch.equal(head.weight_t, head.weight.t())
    assert not any(isinstance(m, DecodeLinear) and m.panels is not None for m in model.modules())
    assert decode_layout_bytes(model) == head.weight.numel() * 4
    hidden = torch.randn(1, 1, head.in_features)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), plain.lm_head(hidden), rtol=1e-5, atol=1e-5)


def test_the_decode_layouts_bytes_are_a_panel_copy_of_each_packed_float32_weight_the_heads_among_them():
    assert cpu_kernels.available()
    model = micro_model()
    pack_for_decode(model)
    packed = [m for m in model.modules() if isinstance(m, DecodeLinear | DecodeHead)]
    assert len(packed) > 1 and model.lm_head in packed
    assert decode_layout_bytes(model) == sum(m.weight.numel() * 4 for m in packed)


def test_the_panels_followed_apart_from_the_head_are_the_block_linears_alone():
    """The head's copies, its panels among them, follow the head's own weight versions (engine `_head_versions`)."""
    assert cpu_kernels.available()
    model = micro_model()
    pack_for_decode(model)
    linears = copied_linears(model)
    assert model.lm_head not in linears and model.lm_head.weight_panels is not None
    assert linears and all(type(m) is DecodeLinear and m.panels is not None for m in linears)


@pytest.mark.parametrize("rows", [1, 3])
def test_packed_engine_decodes_the_unpacked_tokens_with_logits_within_rounding(checkpoint, tokenizer, rows):
    packed = Engine.from_pretrained(checkpoint)
    unpacked = Engine(load_pretrained(checkpoint), tokenizer)
    assert type(packed.model.lm_head) is DecodeLinear and type(unpacked.model.lm_head) is nn.Linear
    batch = prompts(rows)
    expected = [completion.token_ids for completion in unpacked.generate(batch, GREEDY)]
    assert [completion.token_ids for completion in packed.generate(batch, GREEDY)] == expected
    with torch.inference_mode():
        ids = torch.tensor([row[:3] for row in batch])
        hidden = unpacked.model(ids).hidden_states[:, -1:]  # (rows, 1, D): what a decode step feeds the head
        torch.testing.assert_close(packed.model.lm_head(hidden), unpacked.model.lm_head(hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
def test_a_compiled_engine_reads_the_weights_changed_in_place_after_reset_prefix_cache(tmp_path, tokenizer):
    """A one-row step reads the copy; flipping the head's sign in place must change the greedy tokens to the ones the
    plain model gives with the flipped head, not keep those of the old copy. The model has one block, dense: the head
    is what is read, and each block more is seconds more of inductor's C++ compile."""
    checkpoint = model_dir(tmp_path, num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)
    compiled = Engine.from_pretrained(checkpoint, compile=True)
    reference = Engine(load_pretrained(checkpoint), tokenizer)
    batch = prompts(1)
    before = [completion.token_ids for completion in compiled.generate(batch, GREEDY)]
    with torch.no_grad():
        for engine in (compiled, reference):
            engine.model.lm_head.weight.neg_()
    compiled.reset_prefix_cache()
    expected = [completion.token_ids for completion in reference.generate(batch, GREEDY)]
    assert expected != before
    assert [completion.token_ids for completion in compiled.generate(batch, GREEDY)] == expected


@pytest.mark.parametrize("change", ["in place", "assign", "parameter"])
def test_the_head_copy_follows_weights_changed_after_the_engine_was_built_without_reset_prefix_cache(
    checkpoint, tokenizer, change
):
    """The head negated in place, a state dict of the negated head loaded with assign=True, or a Parameter of it set
    in the head's place (not seen before: the old head's tokens): the next step reads the new head, as the plain model
    does, without a call to reset_prefix_cache."""
    packed = Engine.from_pretrained(checkpoint)
    reference = Engine(load_pretrained(checkpoint, mtp=False), tokenizer)
    batch = prompts(1)
    before = [completion.token_ids for completion in packed.generate(batch, GREEDY)]
    with torch.no_grad():
        reference.model.lm_head.weight.neg_()
    if change == "in place":
        with torch.no_grad():
            packed.model.lm_head.weight.neg_()
    elif change == "assign":
        packed.model.load_state_dict({k: v.clone() for k, v in reference.model.state_dict().items()}, assign=True)
    else:
        packed.model.lm_head.weight = nn.Parameter(-packed.model.lm_head.weight.detach())
    expected = [completion.token_ids for completion in reference.generate(batch, GREEDY)]
    assert expected != before
    assert [completion.token_ids for completion in packed.generate(batch, GREEDY)] == expected


@pytest.mark.parametrize("change", ["in place", "assign"])
def test_the_linears_panels_follow_weights_changed_after_the_engine_was_built(checkpoint, tokenizer, change):
    """Steps of 3 rows or more read the block linears' panels, copies of their float32 weights: every o_proj negated
    in place, or a state dict of them alone negated loaded with assign=True (the head untouched, so its own check does
    not refresh the panels), and the next 3-row step reads the new weights, as the plain model does."""
    packed = Engine.from_pretrained(checkpoint)
    reference = Engine(load_pretrained(checkpoint, mtp=False), tokenizer)
    assert packed.model.layers[0].self_attn.o_proj.panels is not None
    batch = prompts(3)
    before = [completion.token_ids for completion in packed.generate(batch, GREEDY)]
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.o_proj.weight.neg_()
    if change == "in place":
        with torch.no_grad():
            for layer in packed.model.layers:
                layer.self_attn.o_proj.weight.neg_()
    else:
        negated = {k: v.clone() for k, v in reference.model.state_dict().items() if k.endswith("o_proj.weight")}
        assert packed.model.load_state_dict(negated, assign=True, strict=False).unexpected_keys == []
    expected = [completion.token_ids for completion in reference.generate(batch, GREEDY)]
    assert expected != before
    assert [completion.token_ids for completion in packed.generate(batch, GREEDY)] == expected


def test_an_engine_gone_keeps_no_weights_alive_past_a_load_state_dict_with_assign(checkpoint, tokenizer):
    """The weights an engine watched (its head's, its adapters' whole model) are freed once the engine is gone and a
    load_state_dict(assign=True) replaces them; the model still pickles whole, and engines built on it add no load
    hooks to it (each added two, never removed: a notebook's engines slowed every later load)."""
    model = load_pretrained(checkpoint, mtp=False)
    hooks = lambda: sum(len(module._load_state_dict_post_hooks) for module in model.modules())  # noqa: E731
    before = hooks()
    for _ in range(3):
        engine = Engine(model, tokenizer)
    assert hooks() == before
    engine.generate(prompts(1), GREEDY)
    torch.save(model, io.BytesIO())
    old = weakref.ref(model.layers[0].self_attn.o_proj.weight)
    del engine
    gc.collect()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert old() is None


def test_a_bfloat16_model_runs_every_linear_and_its_head_through_the_kernel_with_the_same_logits():
    assert cpu_kernels.available()
    model = micro_model().to(torch.bfloat16)
    plain = micro_model().to(torch.bfloat16)
    pack_for_decode(model)
    assert decode_layout_bytes(model) == 0  # no W^T copy: the kernel reads W itself
    packed = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    assert model.lm_head in packed and not any(isinstance(m, DecodeHead) for m in model.modules())
    tokens = torch.randint(5, VOCAB, (1, 6))
    with torch.no_grad():
        expected, got = plain(tokens).logits.float(), model(tokens).logits.float()
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()  # bfloat16 roundings apart


def test_the_engine_rewrites_the_copies_of_the_weights_that_changed_alone(checkpoint, tokenizer):
    """One linear changed in place (an RL sync of one matrix): the next 3-row step rewrites its panels alone, in place
    (a buffer's version counter counts the writes into it), and decodes as the plain model changed alike;
    reset_prefix_cache then rewrites nothing (each copy compared with its weight); after a write through `.data`, which
    no version counter sees, it rewrites that weight's copy alone."""
    packed = Engine.from_pretrained(checkpoint)
    reference = Engine(load_pretrained(checkpoint, mtp=False), tokenizer)
    copies = [m for m in packed.model.modules() if isinstance(m, DecodeLinear) and m.panels is not None]
    buffers = [m.panels for m in copies]
    writes = lambda: [m.panels._version for m in copies]  # noqa: E731
    data_neg = lambda m: m.weight.data.neg_()  # noqa: E731
    batch = prompts(3)
    packed.generate(batch, GREEDY)
    for name, change in [("layers.0.self_attn.o_proj", lambda m: m.weight.neg_()), ("lm_head", data_neg)]:
        before, changed = writes(), packed.model.get_submodule(name)
        with torch.no_grad():
            change(changed)
            change(reference.model.get_submodule(name))
        if name == "lm_head":
            packed.reset_prefix_cache()
        expected = [completion.token_ids for completion in reference.generate(batch, GREEDY)]
        assert [completion.token_ids for completion in packed.generate(batch, GREEDY)] == expected
        assert [m for m, old, new in zip(copies, before, writes(), strict=True) if new != old] == [changed]
        unchanged = writes()
        packed.reset_prefix_cache()
        assert writes() == unchanged
    assert all(m.panels is buffer for m, buffer in zip(copies, buffers, strict=True))


def test_a_packed_model_converted_to_another_dtype_is_laid_out_as_one_packed_in_it():
    """model.to(torch.bfloat16) after packing: the bfloat16 weights take no panels (converted with them, float32
    panels reached rows_linear in bfloat16, refused); back in float32, they are laid out again; either way the logits
    of 6 rows (read through the panels in float32) are bitwise those of the model packed in that dtype. A conversion
    to the dtype it has keeps the same buffers."""
    assert cpu_kernels.available()
    model = micro_model()
    pack_for_decode(model)
    tokens = torch.randint(5, VOCAB, (1, 6))
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        fresh = micro_model().to(torch.bfloat16).to(dtype)
        pack_for_decode(fresh)
        linears = [m for m in model.modules() if isinstance(m, DecodeLinear)]
        assert linears and all((m.panels is None) == (dtype == torch.bfloat16) for m in linears)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, fresh(tokens).logits)
    panels = model.lm_head.panels
    model.float()
    assert model.lm_head.panels is panels


def test_an_engine_whose_model_was_converted_after_it_was_built_refuses_naming_both_dtypes(checkpoint):
    engine = Engine.from_pretrained(checkpoint)
    engine.model.to(torch.bfloat16)
    with pytest.raises(
        RuntimeError, match=r"weights are torch.bfloat16 but this engine's KV cache holds torch.float32"
    ):
        engine.generate(prompts(3), GREEDY)


def test_a_step_after_a_weight_change_reads_the_version_counters_once(checkpoint, monkeypatch):
    """A step asked the head's and the panels' versions whether they changed, then read them again to tell whose: a
    change cost 2 more reads of every weight's counter. Now a step reads each once, changed or not, and the marks
    taken after the copies are rewritten (one each) are all a change adds."""
    engine = Engine.from_pretrained(checkpoint)
    three_tokens = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    engine.generate(prompts(3), three_tokens)
    reads = []
    versions_now = WeightVersions._versions_now
    monkeypatch.setattr(WeightVersions, "_versions_now", lambda self: reads.append(self) or versions_now(self))

    def reads_in_generate(seed: int) -> int:
        generator = torch.Generator().manual_seed(seed)  # no prefix shared with the others: the same steps
        batch = [torch.randint(5, VOCAB, (3 + 4 * row,), generator=generator).tolist() for row in range(3)]
        reads.clear()
        engine.generate(batch, three_tokens)
        return len(reads)

    unchanged = reads_in_generate(1)
    with torch.no_grad():
        engine.model.get_submodule("layers.0.self_attn.o_proj").weight.neg_()
    assert reads_in_generate(2) == unchanged + 2
    assert reads_in_generate(3) == unchanged
