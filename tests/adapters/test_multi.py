"""Many adapters in one batch: each row computes what its adapter alone computes (prefill and absorbed decode)."""

from __future__ import annotations

import copy
import dataclasses
import re
import threading

import pytest
import torch

import seekstack
from seekstack.adapters import peft_targets, registry
from seekstack.adapters.config import AdapterConfig
from seekstack.adapters.files import is_adapter_parameter, load_adapter, merged_model, save_adapter
from seekstack.adapters.multi import (
    MultiLoRAAttention,
    MultiLoRAExperts,
    MultiLoRAFeedForward,
    MultiLoRALinear,
    MultiTokenRows,
)
from seekstack.adapters.registry import (
    ADAPTED,
    AdapterInUse,
    AdapterWeights,
    UnknownAdapter,
    attach_adapters,
    read_factors,
    refuse_adapters_past_capacity,
)
from seekstack.checkpoint import CheckpointError
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.packed import DecodeFeedForward, DecodeLatentAttention, pack_for_decode
from seekstack.model import cpu_kernels
from seekstack.model.moe import Routing
from seekstack.schema import ConfigError
from tests.adapters.support import TINY, write_base, write_random_adapter

ATOL = 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A base with a tokenizer, a full adapter of rank 4 and an attention-only adapter of rank 8 (other targets and
    another rank: the stacks are padded and hold zeros where an adapter has no factors)."""
    root = tmp_path_factory.mktemp("multi")
    base = write_base(root / "base", with_tokenizer=True)
    full = write_random_adapter(base, root / "full", seed=1)
    attention_only = AdapterConfig(rank=8, feed_forward=(), experts=())
    attention = write_random_adapter(base, root / "attention", seed=2, config=attention_only)
    return base, {"full": full, "attention": attention}


def test_prefill_rows_of_different_adapters_match_each_adapter_alone(served):
    base, adapters = served
    ids = torch.randint(2, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.select([0, loaded.slot("full"), loaded.slot("attention")], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
        alone = [
            seekstack.load_pretrained(base)(ids[:1]).logits,
            load_adapter(seekstack.load_pretrained(base), adapters["full"])(ids[1:2]).logits,
            load_adapter(seekstack.load_pretrained(base), adapters["attention"])(ids[2:3]).logits,
        ]
    for row, expected in enumerate(alone):
        assert (mixed[row : row + 1] - expected).abs().max() < ATOL
    assert (alone[1] - seekstack.load_pretrained(base)(ids[1:2]).logits).abs().max() > 100 * ATOL


def test_decoding_a_mixed_batch_equals_separate_runs_with_each_adapter_merged(served):
    base, adapters = served
    params = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=True, ignore_eos=True)
    prompts = [[5, 17, 42, 8], [5, 17, 42, 8], [5, 17, 42, 8], [9, 33, 3]]
    choice = [None, "full", "attention", "full"]
    engine = Engine.from_pretrained(base, adapters=adapters, max_batch_size=4)
    mixed = engine.generate(prompts, params, adapters=choice)
    for prompt, adapter, completion in zip(prompts, choice, mixed, strict=True):
        merged = Engine.from_pretrained(base, adapter=adapters[adapter] if adapter else None)
        [alone] = merged.generate([prompt], params)
        assert completion.token_ids == alone.token_ids
        mixed_lp = torch.tensor([entry.logprob for entry in completion.logprobs])
        alone_lp = torch.tensor([entry.logprob for entry in alone.logprobs])
        assert (mixed_lp - alone_lp).abs().max() < 1e-4
    assert len({tuple(c.token_ids) for c in mixed[:3]}) == 3  # the same prompt continues differently per adapter


def test_an_unknown_adapter_name_is_refused_naming_the_loaded_ones(served):
    base, adapters = served
    engine = Engine.from_pretrained(base, adapters=adapters)
    with pytest.raises(ValueError, match="no adapter 'legal'; loaded: full, attention"):
        engine.add_request([5, 6], SamplingParams(max_new_tokens=2), adapter="legal")


def test_an_adapter_name_of_thousands_of_characters_is_cut_in_the_error_that_refuses_it(served):
    """An unknown or invalid adapter name of thousands of characters (/v1/unload_lora_adapter's 404, a load's 400) is
    shown cut, as the model-name 404 cuts one, and so is a loaded one where a refusal lists those loaded."""
    base, adapters = served
    model = seekstack.load_pretrained(base)
    loaded = attach_adapters(model, adapters)
    shown = f"'{'x' * 79}... (3,000 characters)"
    with pytest.raises(UnknownAdapter, match=rf"^no adapter {re.escape(shown)}; loaded: full, attention$"):
        loaded.remove("x" * 3000)
    with pytest.raises(ValueError, match=rf"^adapter name {re.escape(shown)}: use letters"):
        loaded.add("x" * 2999 + " ", read_factors(model.config, adapters["full"]))
    long = attach_adapters(seekstack.load_pretrained(base), {"x" * 3000: adapters["full"]}, max_loras=1)
    listed = re.escape(f"{'x' * 80}... (3,000 characters)")  # a long name loaded is listed by its start
    with pytest.raises(UnknownAdapter, match=rf"^no adapter 'other'; loaded: {listed}$"):
        long.slot("other")
    with pytest.raises(ValueError, match=rf"'other' cannot load \(loaded: {listed}\); unload one first"):
        long.add("other", read_factors(model.config, adapters["full"]))
    with pytest.raises(AdapterInUse, match=rf"^adapter {re.escape(shown)} serves 1 unfinished request"):
        long.remove("x" * 3000, requests_in_flight=1)


def test_unloading_every_adapter_leaves_the_plain_base_model(served):
    base, adapters = served
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.remove("full")
    loaded.remove("attention")
    assert not any(isinstance(m, (MultiLoRALinear, MultiLoRAExperts, MultiLoRAAttention)) for m in model.modules())
    plain = seekstack.load_pretrained(base).eval()
    assert set(model.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_the_loaded_adapters_folders_are_their_weights_folders_through_loads_replacements_and_unloads(served):
    """LoadedAdapters kept `folders` beside `weights`, whose every entry holds its folder: two records of one fact,
    each replaced by hand at each load, replacement and unload. The folders are read from the weights."""
    base, adapters = served
    loaded = attach_adapters(seekstack.load_pretrained(base).eval(), {"full": adapters["full"]})
    assert "folders" not in {field.name for field in dataclasses.fields(loaded)}
    loaded.add("full", read_factors(loaded.model.config, adapters["attention"]), replace=True)
    loaded.add("again", read_factors(loaded.model.config, adapters["full"]))
    assert loaded.folders == {"full": adapters["attention"], "again": adapters["full"]}
    loaded.remove("full")
    assert loaded.folders == {"again": adapters["full"]} and loaded.names == ["again"]


def test_unloading_every_adapter_gives_each_layer_back_its_class_an_engines_packed_decode_classes_too(served):
    """An engine's FFNs and attention are infer.packed's Decode classes (their one-call decode paths): an unload turns
    the adapted ones back into those, not into the plain FeedForward and MLA."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    pack_for_decode(model)
    before = [type(module) for module in model.modules()]
    assert DecodeFeedForward in before and DecodeLatentAttention in before
    loaded = attach_adapters(model, adapters)
    assert isinstance(model.layers[0].mlp, MultiLoRAFeedForward)
    assert isinstance(model.layers[0].self_attn, MultiLoRAAttention)
    loaded.remove("full")
    loaded.remove("attention")
    assert [type(module) for module in model.modules()] == before


def test_an_adapter_of_kv_b_proj_keeps_the_packed_query_of_an_engines_attention(served, tmp_path, monkeypatch):
    """MultiLoRAAttention took over the attention's class, so an engine's one-call low-rank query
    (DecodeLatentAttention: q_a_proj, its norm and q_b_proj in one kernel call) was lost in every layer whose kv_b_proj
    an adapter adapts, though that update leaves the query as it is; it stays, and the logits are the unpacked
    model's."""
    assert cpu_kernels.available()
    base, _ = served
    only_kv_b = AdapterConfig(rank=4, attention=("kv_b_proj",), feed_forward=(), experts=())
    adapter = write_random_adapter(base, tmp_path / "kv_b", seed=3, config=only_kv_b)
    fused, one_call = [], torch.ops.seekstack.latent_query_rows
    monkeypatch.setattr(torch.ops.seekstack, "latent_query_rows", lambda *args: fused.append(1) or one_call(*args))
    ids = torch.randint(2, 96, (2, 4), generator=torch.Generator().manual_seed(5))
    logits = []
    for packed in (True, False):
        model = seekstack.load_pretrained(base).eval()
        if packed:
            pack_for_decode(model)
        loaded = attach_adapters(model, {"kv_b": adapter})
        loaded.select([0, loaded.slot("kv_b")], torch.device("cpu"))
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert len(fused) == len(model.layers)  # the packed model's, each layer's query in one call
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=ATOL)
    assert (logits[0][1] - seekstack.load_pretrained(base)(ids[1:]).logits[0]).abs().max() > 100 * ATOL  # adapted


def test_an_unload_keeps_the_layers_adapted_with_zeros_while_another_adapter_is_loaded(served):
    """Unloading "full" leaves its layers adapted (zeros in every slot, the compiled step's graph kept) while
    "attention" serves: each row still gets what its adapter alone gives."""
    base, adapters = served
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.remove("full")
    assert isinstance(model.layers[1].mlp.experts, MultiLoRAExperts) and isinstance(model.lm_head, MultiLoRALinear)
    loaded.select([0, loaded.slot("attention")], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
        expected = [merged_logits(base, None, ids[:1]), merged_logits(base, adapters["attention"], ids[1:])]
    assert all((mixed[row : row + 1] - logits).abs().max() < ATOL for row, logits in enumerate(expected))


def test_a_batch_of_base_rows_runs_the_base_experts_kernel_with_adapters_loaded(served, monkeypatch):
    """With adapters loaded, the routed experts of a batch of base rows only took the grouped matmuls that adapter rows
    need instead of the eager kernel: ~20% slower decoding of the base (8 rows, 12 adapters loaded)."""
    from seekstack.model.moe import RoutedExperts

    base, adapters, ids, model, loaded = kernel_decode_step(served, rows=2, seed=2)
    moe_layers = sum(isinstance(module, RoutedExperts) for module in model.layers.modules())  # MTP not run
    kernel_calls = []
    forward_kernel = RoutedExperts.forward_kernel
    monkeypatch.setattr(RoutedExperts, "forward_kernel", lambda *a: kernel_calls.append(1) or forward_kernel(*a))
    with torch.no_grad():
        loaded.select([0, 0], torch.device("cpu"))
        base_rows = model(ids).logits
        assert len(kernel_calls) == moe_layers > 0
        expected = seekstack.load_pretrained(base).eval()(ids).logits
        loaded.select([0, loaded.slot("full")], torch.device("cpu"))
        kernel_calls.clear()
        model(ids)
    assert torch.equal(base_rows, expected)
    assert not kernel_calls  # a row of the full adapter: the kernel runs on the merged weights, not on the base's


def test_eager_decode_of_adapter_rows_runs_the_experts_kernel_on_each_expert_merged_with_each_slot(served, monkeypatch):
    """An eager decode step with adapter rows took the grouped dispatch (sort, one small matmul per expert, per-pair
    factor gathers), ~5x the experts kernel's time on the demo model: it now runs the kernel once per MoE layer, on
    the experts merged with each loaded slot's update (E * 3 rows: the base, "full" and "attention"), and each row
    still gets what its adapter merged into the model gives; unloading "attention" (slot 2) rebuilds them for E * 2."""
    from seekstack.model import cpu_kernels
    from seekstack.model.moe import RoutedExperts

    base, adapters, ids, model, loaded = kernel_decode_step(served, rows=3, seed=7)
    moe_layers = sum(isinstance(module, RoutedExperts) for module in model.layers.modules())
    experts_seen = []
    grouped_experts = cpu_kernels.grouped_experts
    monkeypatch.setattr(
        cpu_kernels, "grouped_experts", lambda *a: experts_seen.append(a[3].shape[0]) or grouped_experts(*a)
    )
    choice = [None, "full", "attention"]
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
    # The dense FFNs and shared experts "full" adapts run the kernel too, one "expert" per slot (MultiLoRAFeedForward)
    feed_forwards = sum(isinstance(module, MultiLoRAFeedForward) for module in model.modules())
    expected = [model.config.n_routed_experts * 3] * moe_layers + [3] * feed_forwards
    assert sorted(experts_seen) == sorted(expected) and moe_layers > 0 and feed_forwards > 0
    assert_rows_match_their_adapters(mixed, choice, served, ids)
    # Unloading the highest slot rebuilds the copies for the slots now in use (the base and "full")
    assert loaded.slot("attention") == 2
    loaded.remove("attention")
    layers = [module for module in model.modules() if isinstance(module, MultiLoRAExperts)]
    expert_count = model.config.n_routed_experts
    assert layers and all(layer.merged_down_proj.shape[0] == expert_count * 2 for layer in layers)
    choice = [None, "full", "full"]
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    experts_seen.clear()
    with torch.no_grad():
        mixed = model(ids).logits
    assert sorted(experts_seen) == sorted([expert_count * 2] * moe_layers + [2] * feed_forwards)
    assert_rows_match_their_adapters(mixed, choice, served, ids)


def test_experts_that_no_loaded_adapter_adapts_run_the_base_experts_kernel_for_adapter_rows(served, monkeypatch):
    """Unloading "full" leaves the MoE layers wrapped with zeros while "attention" (no expert factors) stays: its rows
    took the grouped dispatch, ~5x the kernel's time, to add those zeros. They now run the kernel on the base's
    experts, each row still what its adapter alone gives."""
    from seekstack.model.moe import RoutedExperts

    base, adapters, ids, model, loaded = kernel_decode_step(served, rows=2, seed=5)
    loaded.remove("full")
    layers = [module for module in model.layers.modules() if isinstance(module, MultiLoRAExperts)]
    seen = []
    forward_kernel = RoutedExperts.forward_kernel
    monkeypatch.setattr(
        RoutedExperts, "forward_kernel", lambda self, *a: seen.append(self.down_proj) or forward_kernel(self, *a)
    )
    choice = [None, "attention"]
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    assert layers and not any(layer.matmuls_replaced() for layer in layers)
    with torch.no_grad():
        mixed = model(ids).logits
    assert [id(weight) for weight in seen] == [id(layer.down_proj) for layer in layers]
    assert_rows_match_their_adapters(mixed, choice, served, ids)


def test_merged_experts_of_a_bfloat16_model_are_rounded_once_from_the_float32_sum(served):
    """In a bfloat16 model the merged copies were B A rounded to bfloat16 and then W + B A rounded again: RMS error
    ~1.4x that of rounding the exact sum once. They are now summed in float32 and rounded once."""
    from seekstack.model import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the grouped-experts kernel is not built here")
    base, adapters = served
    model = seekstack.load_pretrained(base).to(torch.bfloat16).eval()
    loaded = attach_adapters(model, adapters)
    slots = loaded.rows.slots_in_use
    layers = [module for module in model.modules() if isinstance(module, MultiLoRAExperts)]
    assert layers
    for layer in layers:
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer, name).detach().double()  # (E, out, in)
            down = getattr(layer, f"{name}_lora_down").double()  # (E*S, in, r)
            up = getattr(layer, f"{name}_lora_up").double()  # (E*S, r, out)
            update = torch.bmm(down, up).transpose(1, 2).view(weight.shape[0], -1, *weight.shape[1:])[:, :slots]
            exact = (weight.unsqueeze(1) + update).flatten(0, 1)  # (E*S', out, in)
            merged = getattr(layer, f"merged_{name}")
            assert merged.dtype == torch.bfloat16 and merged.shape == exact.shape
            error, rounding = (held.double() - exact for held in (merged, exact.to(torch.bfloat16)))
            assert error.pow(2).mean().sqrt() <= 1.02 * rounding.pow(2).mean().sqrt()


def test_experts_too_large_to_copy_per_slot_keep_the_grouped_dispatch(served, monkeypatch):
    """The merged copies hold the slots in use times a layer's routed experts: past MERGED_EXPERTS_BYTES (a model
    larger than the demo's) none are made, and adapter rows take the grouped dispatch, each row still its adapter's."""
    from seekstack.adapters import multi
    from seekstack.adapters.multi import MultiLoRAExperts

    base, adapters = served
    monkeypatch.setattr(multi, "MERGED_EXPERTS_BYTES", 0)
    ids = torch.randint(2, 96, (2, 1), generator=torch.Generator().manual_seed(3))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    layers = [module for module in model.modules() if isinstance(module, MultiLoRAExperts)]
    assert layers and all(layer.merged_down_proj is None for layer in layers)
    loaded.select([loaded.slot("full"), 0], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
    for row, name in enumerate(["full", None]):
        expected = merged_logits(base, adapters[name] if name else None, ids[row : row + 1])
        assert (mixed[row : row + 1] - expected).abs().max() < ATOL


def test_gathered_experts_of_compiled_decode_match_the_grouped_dispatch_per_row(served):
    """The expert path compiled decode takes (each pair gathers its weights) applies each row's adapter as the
    grouped dispatch of eager steps does, the base rows untouched."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    moe = next(module for module in model.modules() if isinstance(getattr(module, "experts", None), MultiLoRAExperts))
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    routing = moe.gate(x)
    slots = [0, loaded.slot("full"), loaded.slot("attention")]
    with torch.no_grad():
        loaded.select(slots, torch.device("cpu"))
        dispatched = moe.experts(x, routing)
        loaded.select(slots, torch.device("cpu"))
        gathered = moe.experts.forward_gathered(x, routing)
        loaded.select([0, 0, 0], torch.device("cpu"))
        plain = moe.experts(x, routing)
    assert (gathered - dispatched).abs().max() < ATOL
    full_rows = slice(2, 4)  # 3 rows of 2 tokens each: the second row uses "full", which adapts the experts
    assert (gathered[full_rows] - plain[full_rows]).abs().max() > 100 * ATOL
    assert (gathered[:2] - plain[:2]).abs().max() < ATOL


@pytest.fixture(scope="module")
def engines(with_head_rows, served):
    """An eager and a compiled engine serving the full, the attention-only and the head rows adapters, which the
    tests of compiled decoding share: compiling the decode step is most of their time, and one graph serves them all
    (the stacks' capacity is fixed). A test that loads or unloads adapters gives them back as they were."""
    base, adapters = with_head_rows
    served_adapters = {**adapters, "attention": served[1]["attention"]}
    eager, compiled = (
        Engine.from_pretrained(base, adapters=served_adapters, max_batch_size=4, compile=flag) for flag in (False, True)
    )
    return base, served_adapters, eager, compiled


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
def test_compiled_decoding_with_adapters_gives_the_eager_tokens_across_loads_without_compiling_again(engines):
    """Compiled decode steps apply each row's adapter (base rows among them), and an adapter loaded after compiling
    (in a fourth slot, other adapters unloaded, the head rows' too) is applied too, without a new graph: the stacks'
    capacity is fixed (vLLM's max_loras x max_lora_rank) and the head rows stay held, so loads and unloads change
    no shape the step was traced with."""
    base, adapters, *both = engines
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [[5, 17, 42, 8], [5, 17, 42, 8], [9, 33, 3], [9, 33, 3]]
    graphs = torch._dynamo.utils.counters["stats"]
    try:
        for choice in ([None, "full", "attention", "full"], ["late", None, "late", "full"]):
            if "late" in choice:
                compiled_graphs = graphs["unique_graphs"]
                for engine in both:
                    engine.load_adapter("late", adapters["attention"])
                    engine.unload_adapter("attention")  # the largest rank stays loaded in "late"
                    engine.unload_adapter("rows")  # the only adapter with head rows
            eager, compiled = (engine.generate(prompts, params, adapters=choice) for engine in both)
            assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
        assert both[1].lora.slots == {"full": 2, "late": 4}
        assert graphs["unique_graphs"] == compiled_graphs and both[1].decode_compiled
    finally:
        for engine in both:
            if "late" in engine.lora.slots:
                engine.unload_adapter("late")
            for name in ("attention", "rows"):
                if name not in engine.lora.slots:
                    engine.load_adapter(name, adapters[name])


def test_each_expert_pair_applies_only_its_own_adapter_with_mixed_ranks_and_base_rows(served, tmp_path):
    """Both expert paths (eager steps' dispatch, compiled decode's gathered one) give each row what its adapter
    merged into the experts gives, with ranks 4 and 8 stacked side by side and base rows among them."""
    base, adapters = served
    experts_only = AdapterConfig(rank=8, attention=(), feed_forward=())
    chosen = {
        "full": adapters["full"],
        "experts": write_random_adapter(base, tmp_path / "ex", seed=4, config=experts_only),
    }
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, chosen)
    layer = next(i for i, b in enumerate(model.layers) if isinstance(getattr(b.mlp, "experts", None), MultiLoRAExperts))
    x = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(5))  # 4 rows of 2 tokens
    choice = [None, "full", "experts", None]
    with torch.no_grad():
        routing = model.layers[layer].mlp.gate(x)
        outputs = []
        for path in (model.layers[layer].mlp.experts, model.layers[layer].mlp.experts.forward_gathered):
            loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
            outputs.append(path(x, routing))
        for row, name in enumerate(choice):
            merged = (
                seekstack.load_pretrained(base)
                if name is None
                else merged_model(seekstack.load_pretrained(base), chosen[name])
            )
            tokens = slice(2 * row, 2 * row + 2)
            own = Routing(routing.weights[tokens], routing.experts[tokens], routing.scores[tokens])
            expected = merged.layers[layer].mlp.experts(x[tokens], own)
            for out in outputs:
                assert (out[tokens] - expected).abs().max() < ATOL
        plain = seekstack.load_pretrained(base).layers[layer].mlp.experts(x, routing)
    assert all((outputs[0][2 * r : 2 * r + 2] - plain[2 * r : 2 * r + 2]).abs().max() > 100 * ATOL for r in (1, 2))


def test_per_row_linears_of_compiled_steps_match_the_masked_ones_with_mixed_ranks_and_base_rows(served):
    """The dense layers' path of compiled steps (each row gathers its own slot's factors) gives what the eager steps'
    masked path gives, ranks 4 and 8 padded side by side, a base row untouched."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    layer = model.layers[0].self_attn.q_a_proj  # both adapters adapt it: "full" with rank 4, "attention" with 8
    assert isinstance(layer, MultiLoRALinear) and layer.rank == loaded.max_lora_rank == 16  # both padded to capacity
    x = torch.randn(4, 3, layer.base.in_features, generator=torch.Generator().manual_seed(6))
    loaded.select([0, loaded.slot("full"), loaded.slot("attention"), loaded.slot("full")], torch.device("cpu"))
    with torch.no_grad():
        plain = layer.base(x)
        masked, per_row = layer(x), layer.forward_per_row(x, plain.clone())
    assert (per_row - masked).abs().max() < ATOL
    assert torch.equal(per_row[0], plain[0])
    assert all((per_row[row] - plain[row]).abs().max() > 100 * ATOL for row in (1, 2, 3))


def test_eager_steps_multiply_the_loaded_extent_not_the_fixed_capacity(served):
    """The stacks hold max_loras + 1 = 9 slots of max_lora_rank 16 for compiled steps (144 columns), but eager prefill
    and decode multiply only the slots up to the highest in use (3: the base, "full" of rank 4, "attention" of 8) at
    each layer's largest loaded rank, as the stacks sized to what was loaded did: 24 columns where both adapters
    adapt (q_a_proj; kv_b_proj's widening of the absorbed decode), 12 where "full" alone does (the dense FFN); a
    decode step's linears their 3 merged copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[tuple[int, ...]] = set()
            self.read: set[int] = set()  # the tensors' data pointers

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen |= {tuple(a.shape) for a in args if isinstance(a, torch.Tensor)}
            self.read |= {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    base, adapters = served
    engine = Engine.from_pretrained(base, adapters=adapters, max_batch_size=3)
    config = engine.model.config
    assert engine.model.layers[0].self_attn.q_a_proj.down.shape == (config.hidden_size, 9 * 16)  # the capacity
    capacity = {t.data_ptr() for m in engine.model.modules() if isinstance(m, MultiLoRALinear) for t in (m.down, m.up)}
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    with Shapes() as shapes:
        engine.generate([[5, 17, 42, 8, 9, 33]] * 3, params, adapters=[None, "full", "attention"])  # 18 tokens
    assert not capacity & shapes.read  # not by shape: 9 * 16 is the 3 merged copies' 3 * 48 inputs of down_proj too
    hidden, heads, nope = config.hidden_size, config.num_attention_heads, config.qk_nope_head_dim
    assert {(hidden, 3 * 8), (hidden, 3 * 4), (heads, nope, 3 * 8)} <= shapes.seen  # A^T of q_a_proj, gate_proj; B^K
    assert (3 * hidden, config.q_lora_rank) in shapes.seen  # q_a_proj's merged copies, in a decode step


@pytest.mark.parametrize("merged", [True, False], ids=["merged copies", "too large to copy per slot"])
def test_eager_decode_linears_run_one_matmul_on_their_weight_merged_with_each_slot(served, monkeypatch, merged):
    """An eager decode step's adapted linear multiplies each row by its own slot's W + B_s A_s, one matmul over the
    merged copies (the base's weight and the masked update took 4 ops); past MERGED_LINEAR_BYTES it keeps them.
    Either way each row gets its adapter merged alone, a base row the base."""
    from seekstack.adapters import multi

    base, adapters = served
    if not merged:
        monkeypatch.setattr(multi, "MERGED_LINEAR_BYTES", 0)
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    layer = model.layers[0].self_attn.q_a_proj  # both adapters adapt it: "full" with rank 4, "attention" with 8
    assert (layer.loaded_merged is not None) == merged
    base_calls = []
    forward = layer.base.forward
    monkeypatch.setattr(layer.base, "forward", lambda x: base_calls.append(1) or forward(x))
    x = torch.randn(4, 1, layer.base.in_features, generator=torch.Generator().manual_seed(8))
    choice = [None, "full", "attention", "full"]
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    with torch.no_grad():
        out = layer(x)
    assert len(base_calls) == (0 if merged else 1)
    for row, name in enumerate(choice):
        alone = (
            seekstack.load_pretrained(base)
            if name is None
            else merged_model(seekstack.load_pretrained(base), adapters[name])
        )
        expected = alone.layers[0].self_attn.q_a_proj(x[row])
        assert (out[row] - expected).abs().max() < ATOL
    assert all((out[row] - layer.base(x[row])).abs().max() > 100 * ATOL for row in (1, 2, 3))


@pytest.mark.parametrize("merged", [True, False], ids=["merged copies", "too large to copy per slot"])
def test_eager_absorbed_decode_runs_on_kv_b_projs_weight_merged_with_each_slot(served, monkeypatch, merged):
    """MLA's absorbed decode of adapter rows runs its one attention call on kv_b_proj's merged copies, each row's
    query meeting its slot's W^UK_s and keeping its W^UV_s c (the masked extra columns took two more per-head
    matmuls and their masks); past MERGED_LINEAR_BYTES it keeps those. Either way each row gets its adapter merged
    alone, a base row the base."""
    from seekstack.adapters import multi

    base, adapters = served
    if not merged:
        monkeypatch.setattr(multi, "MERGED_LINEAR_BYTES", 0)
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    attention = model.layers[0].self_attn
    assert isinstance(attention, MultiLoRAAttention) and (attention.merged_absorbed is not None) == merged
    per_head_calls = []
    per_head = multi._per_head
    monkeypatch.setattr(multi, "_per_head", lambda *a: per_head_calls.append(1) or per_head(*a))
    generator = torch.Generator().manual_seed(9)
    H, N, R, C = attention.num_heads, attention.nope_dim, attention.rope_dim, attention.kv_rank
    q_nope, q_rope = torch.randn(4, 1, H, N, generator=generator), torch.randn(4, 1, H, R, generator=generator)
    cached = torch.randn(4, 5, C + R, generator=generator)
    choice = [None, "full", "attention", "full"]
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    with torch.no_grad():
        out = attention.attend_absorbed(q_nope, q_rope, cached, None)
        assert len(per_head_calls) == (0 if merged else 2)
        for row, name in enumerate(choice):
            plain = seekstack.load_pretrained(base)
            alone = plain if name is None else merged_model(plain, adapters[name])
            expected = alone.layers[0].self_attn.attend_absorbed(
                q_nope[row : row + 1], q_rope[row : row + 1], cached[row : row + 1], None
            )
            assert (out[row : row + 1] - expected).abs().max() < ATOL
        plain = seekstack.load_pretrained(base).layers[0].self_attn.attend_absorbed(q_nope, q_rope, cached, None)
    assert all((out[row] - plain[row]).abs().max() > 100 * ATOL for row in (1, 2, 3))


def test_merged_decode_linears_of_a_base_with_attention_biases_add_the_bias(tmp_path):
    """With attention_bias, q_a_proj, kv_a_proj_with_mqa and o_proj have biases: a decode step's merged copies give
    each row W_s x + b, as its adapter merged alone does, and a base row the base's logits."""
    torch.manual_seed(0)
    biased = seekstack.Transformer(seekstack.preset("tiny", **TINY, attention_bias=True))
    with torch.no_grad():
        for name, param in biased.named_parameters():
            if name.endswith("bias") and ".self_attn." in name:
                param.normal_()
    base = tmp_path / "base"
    seekstack.save_pretrained(biased, base)
    adapter = write_random_adapter(base, tmp_path / "adapter", seed=1)
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, {"adapter": adapter})
    assert model.layers[0].self_attn.o_proj.loaded_merged is not None
    ids = torch.randint(2, 96, (2, 1), generator=torch.Generator().manual_seed(3))
    loaded.select([0, loaded.slot("adapter")], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
    assert (mixed[:1] - merged_logits(base, None, ids[:1])).abs().max() < ATOL
    assert (mixed[1:] - merged_logits(base, adapter, ids[1:])).abs().max() < ATOL


def test_a_model_serving_adapters_deep_copies_into_one_that_computes_the_same_rows(served):
    """copy.deepcopy(engine.model) with adapters attached raised torch's "Only Tensors created explicitly by the user
    (graph leaves) support the deepcopy protocol": MLA's absorbed layouts of kv_b_proj were computed from its weight
    with autograd on, so they held a graph."""
    base, adapters = served
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(5))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.select([0, loaded.slot("full")], torch.device("cpu"))
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, model(ids).logits)
    assert copied.layers[0].self_attn.absorbed_weight is not model.layers[0].self_attn.absorbed_weight
    # an engine on the copy was refused while `loaded` lived, "unload the other engine's adapters first", which left the
    # copy adapted: its rows are its own, which no one selects, so it takes the copy back plain, the model kept adapted
    assert attach_adapters(copied, {}).names == []
    assert not any(isinstance(module, ADAPTED) for module in copied.modules())
    assert any(isinstance(module, ADAPTED) for module in model.modules())


def test_adapters_on_a_model_another_engines_adapters_hold_are_refused_until_those_are_unloaded(served):
    """Engine(engine.model, tokenizer) on a model whose layers another engine adapted read that engine's rows: asked
    for the base it gave the other's adapter's tokens, and with adapters of its own it failed in its first step
    ("grouped_experts: expert id 2 out of range"). It is refused, naming what to do; an attach that fails part way
    leaves the model plain, not refused so."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, {"full": adapters["full"]})
    for asked in ({}, adapters):
        with pytest.raises(ValueError, match=r"^this model already serves LoRA adapters another engine attached \("):
            attach_adapters(model, asked)
    loaded.remove("full")
    assert attach_adapters(model, adapters).names == ["full", "attention"]
    fresh = seekstack.load_pretrained(base).eval()
    with pytest.raises(ValueError, match="max_lora_rank' is 4, less than the rank 8 of adapter 'attention'"):
        attach_adapters(fresh, adapters, max_lora_rank=4)  # "full", loaded first, is unloaded again
    assert not any(isinstance(module, ADAPTED) for module in fresh.modules())
    assert attach_adapters(fresh, adapters).names == ["full", "attention"]


def test_adapters_on_a_model_whose_adapting_engine_is_gone_take_it_back_plain(served):
    """Engine(model, tokenizer) on a model whose adapter-serving engine the caller had let go of (garbage) was refused,
    naming that engine's unload_adapter, which the caller no longer has: its layers are made plain again instead."""
    base, adapters = served
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    model = seekstack.load_pretrained(base).eval()
    with torch.no_grad():
        plain = model(ids).logits
    attach_adapters(model, adapters).select([1, 2], torch.device("cpu"))  # an engine's, let go of at once
    assert attach_adapters(model, {}).names == []
    assert not any(isinstance(module, ADAPTED) for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_a_model_moved_after_its_adapters_are_attached_moves_the_copies_eager_steps_compute_on(served):
    """The loaded extent's compact copies (eager steps' stacks, MLA's absorbed layout of them) are buffers that are
    not saved: model.to(float64) after attach_adapters moves them with the rest, as it moved the stacks before they
    were kept, so mixed rows give the float32 logits in float64 (a plain attribute stayed float32: a dtype error)."""
    base, adapters = served
    ids = torch.randint(2, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    slots = [0, loaded.slot("full"), loaded.slot("attention")]
    loaded.select(slots, torch.device("cpu"))
    with torch.no_grad():
        in_float32 = model(ids).logits
        model.to(torch.float64)
        loaded.select(slots, torch.device("cpu"))
        in_float64 = model(ids).logits
    assert in_float64.dtype == torch.float64
    assert (in_float64 - in_float32.double()).abs().max() < ATOL
    attention = model.layers[0].self_attn
    assert isinstance(attention, MultiLoRAAttention) and attention.loaded_key_up.dtype == torch.float64
    assert not any(".loaded_" in key for key in model.state_dict())


ROW_TOKENS = [5, 17, 2, 40, 300, 9]  # head rows a `lora.head_tokens` adapter trains in full


@pytest.fixture(scope="module")
def with_head_rows(served, tmp_path_factory):
    """The base, an adapter with head rows beside a first-FFN LoRA (bench/lora_domain.py's `head_tokens311_ffn0_r8`
    recipe, smaller) and the plain full LoRA adapter."""
    base, adapters = served
    recipe = AdapterConfig(
        attention=(), feed_forward=("gate_proj", "up_proj"), experts=(), layers=(0,), head_tokens=len(ROW_TOKENS)
    )
    folder = tmp_path_factory.mktemp("rows") / "rows"
    rows = write_random_adapter(base, folder, seed=7, config=recipe, head_token_ids=ROW_TOKENS)
    return base, {"rows": rows, "full": adapters["full"]}


def kernel_decode_step(served, rows: int, seed: int):
    """(base, adapters, ids, model, loaded): the served base with its adapters attached and a decode step's ids of
    `rows` rows; the test is skipped where the grouped-experts kernel is not built."""
    from seekstack.model import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the grouped-experts kernel is not built here")
    base, adapters = served
    ids = torch.randint(2, 96, (rows, 1), generator=torch.Generator().manual_seed(seed))
    model = seekstack.load_pretrained(base).eval()
    return base, adapters, ids, model, attach_adapters(model, adapters)


def assert_rows_match_their_adapters(mixed: torch.Tensor, choice: list[str | None], served, ids: torch.Tensor) -> None:
    """Each row of `mixed` (logits of `ids`) within ATOL of its adapter (`choice`, None: the base) merged alone."""
    base, adapters = served
    for row, name in enumerate(choice):
        expected = merged_logits(base, adapters[name] if name else None, ids[row : row + 1])
        assert (mixed[row : row + 1] - expected).abs().max() < ATOL


def merged_logits(base, adapter, ids: torch.Tensor) -> torch.Tensor:
    model = (
        seekstack.load_pretrained(base) if adapter is None else merged_model(seekstack.load_pretrained(base), adapter)
    )
    with torch.no_grad():
        return model.eval()(ids).logits


def test_prefill_rows_of_base_head_rows_and_plain_lora_each_equal_their_adapter_merged(with_head_rows):
    base, adapters = with_head_rows
    ids = torch.randint(2, 500, (4, 9), generator=torch.Generator().manual_seed(8))
    choice = [None, "rows", "full", "rows"]
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
    for row, name in enumerate(choice):
        expected = merged_logits(base, adapters.get(name), ids[row : row + 1])
        assert (mixed[row : row + 1] - expected).abs().max() < ATOL
    plain = merged_logits(base, None, ids[1:2])
    assert (mixed[1, :, ROW_TOKENS] - plain[0, :, ROW_TOKENS]).abs().min() > 100 * ATOL  # the rows' own logits move


def test_decoding_with_head_rows_gives_the_merged_tokens_eager_compiled_and_speculative(engines):
    """Decode (and prefill) steps of a mixed batch give each row its merged adapter's tokens and logprobs, with
    compiled steps and with MTP drafts, whose head is the adapted one."""
    base, adapters, eager, compiled = engines
    params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
    prompts = [[5, 17, 42, 8], [5, 17, 42, 8], [5, 17, 42, 8], [9, 33, 3]]
    choice = [None, "rows", "full", "rows"]
    merged = {name: Engine.from_pretrained(base, adapter=adapters.get(name)) for name in set(choice)}
    alone = [merged[name].generate([prompt], params)[0] for prompt, name in zip(prompts, choice, strict=True)]
    speculative = Engine.from_pretrained(
        base, adapters=adapters, max_batch_size=4, speculative=True, draft_tokens=2, adaptive_drafts=False
    )
    for kind, engine in (("eager", eager), ("compiled", compiled), ("speculative", speculative)):
        mixed = engine.generate(prompts, params, adapters=choice)
        assert engine.decode_compiled == (kind == "compiled") and (engine.spec_drafted > 0) == (kind == "speculative")
        for completion, expected in zip(mixed, alone, strict=True):
            assert completion.token_ids == expected.token_ids, kind
            logprobs = [[entry.logprob for entry in c.logprobs] for c in (completion, expected)]
            assert (torch.tensor(logprobs[0]) - torch.tensor(logprobs[1])).abs().max() < ATOL, kind
    assert mixed[1].token_ids != mixed[0].token_ids  # the head rows change the greedy continuation


@pytest.mark.parametrize("change", ["in place", "assign"])
def test_rows_follow_base_weights_changed_in_place_after_the_adapters_are_attached(with_head_rows, change):
    """The merged copies, MLA layouts and head-row differences that decode steps compute on hold the base's weights:
    changed in place after attach_adapters (an optimizer step; GRPO's sampler takes each step's weights by
    load_state_dict), or replaced by load_state_dict(assign=True), the next step's rows each give their adapter
    merged onto the new weights."""
    base, adapters = with_head_rows
    ids = torch.randint(2, 500, (4, 1), generator=torch.Generator().manual_seed(3))
    choice = [None, "rows", "full", "rows"]

    def halved() -> seekstack.Transformer:
        model = seekstack.load_pretrained(base).eval()
        for weight in model.parameters():
            weight.mul_(0.5)
        return model

    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.select([loaded.slot(name) if name else 0 for name in choice], torch.device("cpu"))
    with torch.no_grad():
        before = model(ids).logits
        if change == "in place":
            for weight in model.parameters():
                weight.mul_(0.5)
        else:
            halves = {name: weight * 0.5 for name, weight in model.named_parameters()}
            model.load_state_dict(halves, strict=False, assign=True)
        loaded.select([loaded.slot(name) if name else 0 for name in choice], torch.device("cpu"))
        mixed = model(ids).logits
        for row, name in enumerate(choice):
            alone = halved() if name is None else merged_model(halved(), adapters[name])
            assert (mixed[row : row + 1] - alone(ids[row : row + 1]).logits).abs().max() < ATOL
    assert (mixed - before).abs().max() > 100 * ATOL


def test_a_plain_models_state_dict_loads_into_one_with_adapters_attached_each_row_following_it(
    with_head_rows, tmp_path
):
    """Adapters attached, the model's state dict has the base's keys, as vLLM's LoRA layers load the base's names: a
    plain model's loads into it (an RL weight sync), and each row then gives its adapter merged onto those weights."""
    base, adapters = with_head_rows
    ids = torch.randint(2, 500, (3, 1), generator=torch.Generator().manual_seed(3))
    choice = [None, "rows", "full"]
    model = seekstack.load_pretrained(base).eval()
    keys = list(model.state_dict())
    loaded = attach_adapters(model, adapters)
    assert list(model.state_dict()) == keys
    other = seekstack.load_pretrained(write_base(tmp_path / "other", seed=5, with_tokenizer=True)).eval()
    model.load_state_dict(other.state_dict())
    loaded.select([loaded.slot(name) if name else 0 for name in choice], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
        for row, name in enumerate(choice):
            alone = other if name is None else merged_model(copy.deepcopy(other), adapters[name])
            assert (mixed[row : row + 1] - alone(ids[row : row + 1]).logits).abs().max() < ATOL


def test_layers_laid_again_in_a_step_after_an_in_place_change_hold_ordinary_tensors_as_after_a_load(served):
    """An engine step runs under torch.inference_mode; the layers it lays again there after the base's weights changed
    in place hold ordinary tensors, as a load lays them: inference tensors would fail a compiled step's guards and
    compile it again at every weight change."""
    model = seekstack.load_pretrained(served[0]).eval()
    loaded = attach_adapters(model, served[1])
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    with torch.inference_mode():
        loaded.select([loaded.slot("full")], torch.device("cpu"))
    assert not loaded._base_versions.changed()  # laid again
    assert not [name for name, buffer in model.named_buffers() if buffer.is_inference()]


def test_a_base_loaded_under_inference_mode_takes_adapters_each_row_its_own(served):
    """A base loaded under torch.inference_mode, whose weights are inference tensors (they keep no version counter,
    which the layers' merged copies otherwise follow), is served with adapters as any other base."""
    ids = torch.randint(2, 96, (2, 1), generator=torch.Generator().manual_seed(4))
    choice = ["full", None]
    with torch.inference_mode():
        model = seekstack.load_pretrained(served[0]).eval()
    loaded = attach_adapters(model, served[1])
    loaded.select([loaded.slot(name) if name else 0 for name in choice], torch.device("cpu"))
    with torch.inference_mode():
        mixed = model(ids).logits
    assert_rows_match_their_adapters(mixed, choice, served, ids)


def test_unloading_the_head_rows_keeps_them_held_as_zeros_while_another_adapter_is_loaded(with_head_rows):
    """Head rows no loaded adapter replaces any more stay held, as zeros and as many per slot as before, so that an
    unload changes no shape of a compiled step (which would compile it again): the rows give the base's logits."""
    base, adapters = with_head_rows
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(10))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, adapters)
    loaded.remove("rows")
    assert isinstance(model.lm_head, MultiTokenRows) and model.lm_head.token_ids.shape == (9, len(ROW_TOKENS))
    assert not model.lm_head.token_deltas.any()
    loaded.select([0, loaded.slot("full")], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
    for row, name in enumerate([None, "full"]):
        assert (mixed[row : row + 1] - merged_logits(base, adapters.get(name), ids[row : row + 1])).abs().max() < ATOL


def write_embedding_rows_adapter(base, folder, token_ids: list[int]):
    """An adapter replacing the embedding rows of `token_ids` (peft's trainable tokens on embed_tokens, which
    `seekstack lora train` does not make but peft does), beside a LoRA o_proj; random rows."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2, target_modules=["layers.0.self_attn.o_proj"], trainable_token_indices={"embed_tokens": token_ids}
    )
    model = get_peft_model(seekstack.load_pretrained(base), config)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder.mkdir(parents=True)
    save_adapter(model, folder)
    return folder


def test_embedding_rows_apply_per_row_beside_head_rows_and_unload_to_the_plain_base(with_head_rows, tmp_path):
    base, adapters = with_head_rows
    chosen = {**adapters, "embedding": write_embedding_rows_adapter(base, tmp_path / "embedding", ROW_TOKENS)}
    ids = torch.tensor([ROW_TOKENS + [8, 5]] * 3)
    choice = [None, "embedding", "rows"]
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, chosen)
    assert isinstance(model.embed_tokens, MultiTokenRows) and isinstance(model.lm_head, MultiTokenRows)
    loaded.select([loaded.slot(name) for name in choice], torch.device("cpu"))
    with torch.no_grad():
        mixed = model(ids).logits
    for row, name in enumerate(choice):
        assert (mixed[row : row + 1] - merged_logits(base, chosen.get(name), ids[row : row + 1])).abs().max() < ATOL
    assert (mixed[1] - mixed[0]).abs().max() > 100 * ATOL
    for name in chosen:
        loaded.remove(name)
    assert not any(isinstance(m, (MultiTokenRows, MultiLoRALinear, MultiLoRAExperts)) for m in model.modules())
    assert set(model.state_dict()) == set(seekstack.load_pretrained(base).state_dict())


def same_weights(read: AdapterWeights, expected: AdapterWeights) -> bool:
    """Whether `read` holds `expected`'s factors, on a real device (a meta tensor equals nothing)."""
    pairs = [(read.factors[target], factors) for target, factors in expected.factors.items()]
    tensors = [(ours, theirs) for pair in pairs for ours, theirs in zip(*pair, strict=True)]
    return read.factors.keys() == expected.factors.keys() and all(
        not ours.is_meta and torch.equal(ours, theirs) for ours, theirs in tensors
    )


@pytest.mark.parametrize("wrapping", ["targets' probe", "weightless model"])
def test_adapters_read_at_the_same_time_each_get_the_factors_of_a_read_alone(served, monkeypatch, wrapping):
    """A read that starts while another is inside peft's wrapping (of the view that finds the targets or of the
    weightless model; a server's two overlapping loads) gets its own factors, not tensors on the meta device."""
    from peft.tuners.lora import LoraModel

    base, adapters = served
    config = seekstack.load_pretrained(base).config
    alone = {name: read_factors(config, folder) for name, folder in adapters.items()}
    first_inside, second_read = threading.Event(), threading.Event()
    create_and_replace = LoraModel._create_and_replace

    def pausing_the_first_read(self, *args, **kwargs):  # noqa: ANN001, ANN202
        in_wrapping = isinstance(self.model, seekstack.Transformer) == (wrapping == "weightless model")
        if threading.current_thread().name == "first" and in_wrapping and not first_inside.is_set():
            first_inside.set()
            second_read.wait(timeout=60)
        return create_and_replace(self, *args, **kwargs)

    class TurnsTellingTheFirstRead:
        """peft_targets' turns over the warning filters, which the paused first read holds: the second read waiting
        for its turn lets the first go on (else the first would wait out its timeout for a read that waits on it)."""

        def __init__(self) -> None:
            self.turns = threading.RLock()

        def __enter__(self) -> None:
            if threading.current_thread().name != "first" and first_inside.is_set():
                second_read.set()
            self.turns.acquire()

        def __exit__(self, *exception: object) -> None:
            self.turns.release()

    monkeypatch.setattr(LoraModel, "_create_and_replace", pausing_the_first_read)
    monkeypatch.setattr(peft_targets, "_WARNING_FILTERS", TurnsTellingTheFirstRead())
    read = {}
    first = threading.Thread(target=lambda: read.update(full=read_factors(config, adapters["full"])), name="first")
    first.start()
    assert first_inside.wait(timeout=60)
    try:
        read["attention"] = read_factors(config, adapters["attention"])
    finally:
        second_read.set()
        first.join()
    assert same_weights(read["attention"], alone["attention"]) and same_weights(read["full"], alone["full"])


def test_a_load_that_fails_to_restack_leaves_the_loaded_adapters_serving_as_before(served):
    base, adapters = served
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, {"full": adapters["full"]})
    loaded.select([0, loaded.slot("full")], torch.device("cpu"))
    with torch.no_grad():
        before = model(ids).logits
    unreadable = read_factors(model.config, adapters["attention"])
    unreadable.factors = {target: (a.to("meta"), b.to("meta")) for target, (a, b) in unreadable.factors.items()}
    with pytest.raises(NotImplementedError, match="meta tensor"):
        loaded.add("broken", unreadable)
    assert loaded.names == ["full"] and loaded.slots == {"full": 1} and list(loaded.weights) == ["full"]
    loaded.select([0, loaded.slot("full")], torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    loaded.add("attention", read_factors(model.config, adapters["attention"]))
    assert loaded.slot("attention") == 2


def test_a_request_on_an_adapter_whose_update_overflows_ends_with_an_error_naming_it_and_the_others_go_on(
    served, tmp_path
):
    """An adapter whose lora_alpha (1e38) sends its logits to NaN: its request ends with finish_reason "error" naming
    the adapter as a cause (a NaN row's argmax is token 0, as if sampled); a base row of the same batch is as alone."""
    base, _ = served
    overflowing = write_random_adapter(base, tmp_path / "overflowing", seed=1, config=AdapterConfig(alpha=1e38))
    engine = Engine.from_pretrained(base, adapters={"overflowing": overflowing})
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    failed, plain = engine.generate(["hello", "hello"], greedy, adapters=["overflowing", None])
    assert failed.finish_reason == "error" and failed.token_ids == [] and "the request's LoRA adapter's" in failed.error
    assert plain.token_ids == engine.generate("hello", greedy)[0].token_ids and plain.finish_reason == "length"


def test_a_blank_adapter_folder_is_refused_not_read_as_the_working_directory(served, monkeypatch):
    """Path("") is the working directory: an adapter folder left blank (a variable left unset) loaded whatever adapter
    the process ran in, or failed naming no folder; it is refused, naming it, before anything is read."""
    base, adapters = served
    monkeypatch.chdir(adapters["full"])
    for blank in ("", " "):
        with pytest.raises(CheckpointError, match=re.escape(f"adapter folder {blank!r}: a blank path (a variable")):
            attach_adapters(seekstack.load_pretrained(base), {"full": blank})


def test_an_adapter_past_the_capacity_is_refused_naming_its_rank_or_the_slots(served):
    """As vLLM's max_loras and max_lora_rank: the stacks are sized once, and a load that does not fit them is refused
    (the adapters loaded keep serving), where it used to grow them."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    loaded = attach_adapters(model, {"full": adapters["full"]}, max_loras=1, max_lora_rank=4)
    attention = read_factors(model.config, adapters["attention"])
    assert attention.rank == 8
    with pytest.raises(ValueError, match=r"lora_rank' is 4, less than the rank 8 of adapter 'attention' \(.*n\)"):
        loaded.add("attention", attention)
    with pytest.raises(ValueError, match=r"'max_loras': all 1 adapter slots are taken, .* 'again' .* \(loaded: full\)"):
        loaded.add("again", read_factors(model.config, adapters["full"]))
    assert loaded.slots == {"full": 1} and loaded.rows.slot_count == 2
    assert model.layers[0].self_attn.q_a_proj.down.shape == (model.config.hidden_size, 2 * 4)  # (in, S*r)
    started = attach_adapters(seekstack.load_pretrained(base).eval(), adapters)  # defaults, raised to fit the start
    assert (started.max_loras, started.max_lora_rank) == (8, 16)
    assert attach_adapters(seekstack.load_pretrained(base).eval(), adapters, max_lora_rank=8).max_lora_rank == 8


def test_the_capacity_check_counts_every_copy_an_adapted_layer_holds(served, monkeypatch):
    """The check counted the stacks alone, (S + 1) x r x (in + out) per layer, where a linear also holds their copy of
    the loaded extent, which eager steps read, and an adapted kv_b_proj MultiLoRAAttention's layouts of both (the base
    weight and A once per head, for keys and values, and B), and the merged copies of small layers eager decode steps
    run on (within MERGED_LINEAR_BYTES a layer; kv_b_proj's twice): a capacity it let through could end in torch's
    bare allocator error. At full capacity (one slot, at rank 8), what attaching holds and the largest layer's stacks
    once more (made before they are laid out) is taken, and a byte less refused."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    attach_adapters(model, {"attention": adapters["attention"]}, max_loras=1, max_lora_rank=8)
    held = sum(buffer.nbytes for buffer in model.buffers())
    held -= sum(buffer.nbytes for buffer in seekstack.load_pretrained(base).buffers())
    stacks = max(m.down.nbytes + m.up.nbytes for m in model.modules() if isinstance(m, MultiLoRALinear))
    needed = held + stacks
    monkeypatch.setattr(registry, "free_memory", lambda device: needed - 1)
    with pytest.raises(
        ConfigError, match=f"^field 'max_lora_rank' is 8: .* take {needed} bytes, more than the {needed - 1} "
    ):
        attach_adapters(seekstack.load_pretrained(base).eval(), {"attention": adapters["attention"]}, 1, 8)
    monkeypatch.setattr(registry, "free_memory", lambda device: needed)
    assert attach_adapters(seekstack.load_pretrained(base).eval(), {"attention": adapters["attention"]}, 1, 8)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the FFNs' and experts' merged copies need the CPU kernels")
def test_the_capacity_check_counts_the_merged_copies_of_ffns_and_experts_as_held(served):
    """The merged copies W + B_s A_s eager decode steps run on (a linear's, a dense FFN's or shared expert's, a MoE
    layer's routed experts', up to 64 MiB a layer) were left out of the capacity check; it counts, per device, the
    bytes attaching then holds in them, and on a GPU, where the experts kernel does not run, a linear's alone."""
    base, adapters = served
    model = seekstack.load_pretrained(base).eval()
    factors = read_factors(model.config, adapters["full"]).factors
    attach_adapters(model, {"full": adapters["full"]}, max_loras=1, max_lora_rank=8)
    merged = {name: buffer.nbytes for name, buffer in model.named_buffers() if "merged" in name.rsplit(".", 1)[-1]}
    assert any(".experts." in name for name in merged) and any(".shared_experts." in name for name in merged)
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert registry.merged_copy_bytes(model.config, factors, 2, lambda name: cpu, 4) == {cpu: sum(merged.values())}
    linears = sum(nbytes for name, nbytes in merged.items() if not name.endswith(("merged_gate_up", "merged_down"))
                  and ".experts." not in name)  # fmt: skip
    assert registry.merged_copy_bytes(model.config, factors, 2, lambda name: gpu, 4) == {gpu: linears}
    assert registry.merged_copy_bytes(model.config, factors, 2, lambda name: cpu, 4, adapted=factors) == {}


def test_a_device_maps_capacity_is_checked_on_the_devices_its_layers_go_to_before_the_weights(served, monkeypatch):
    """With a device map, the check before the weights looked at the CPU's free memory (the engine's device) even for
    layers the map puts on a GPU, whose stacks are made beside their weights; the map's devices are checked (no GPU
    needed: nothing is allocated)."""
    base, adapters = served
    config = seekstack.load_pretrained(base).config
    monkeypatch.setattr(registry, "free_memory", lambda device: 1000 if device.type == "cuda" else 10**15)
    cpu = torch.device("cpu")
    assert (
        refuse_adapters_past_capacity(config, adapters, None, None, cpu, "*=cpu,layers.1=disk").keys()
        == adapters.keys()
    )
    with pytest.raises(ConfigError, match=r"^field 'max_lora_rank' is 16: .* than the 1000 bytes free on cuda:1: st"):
        refuse_adapters_past_capacity(config, adapters, None, None, cpu, "*=cpu,layers.1.self_attn=cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="places layers on a GPU")
def test_a_load_on_a_placed_model_checks_the_free_memory_of_its_layers_gpu(served, monkeypatch):
    base, adapters = served
    engine = Engine.from_pretrained(base, device_map="*=cpu,layers.*=cuda:0")
    monkeypatch.setattr(registry, "free_memory", lambda device: 1000 if device.type == "cuda" else 10**15)
    with pytest.raises(ConfigError, match=r"^field 'max_lora_rank' is 16: .* than the 1000 bytes free on cuda:0: st"):
        engine.load_adapter("full", adapters["full"])


def test_an_engine_takes_vllms_max_loras_and_max_lora_rank_and_refuses_a_load_past_them(served):
    base, adapters = served
    engine = Engine.from_pretrained(base, adapters={"full": adapters["full"]}, max_loras=2, max_lora_rank=4)
    assert (engine.lora.max_loras, engine.lora.max_lora_rank, engine.lora.rows.slot_count) == (2, 4, 3)
    with pytest.raises(ValueError, match="'max_lora_rank' is 4, less than the rank 8 of adapter 'attention'"):
        engine.load_adapter("attention", adapters["attention"])
    engine.load_adapter("again", adapters["full"])
    assert engine.lora.slots == {"full": 1, "again": 2}


def test_from_pretrained_refuses_an_adapter_past_max_lora_rank_before_reading_the_weights(served, monkeypatch):
    """Engine.from_pretrained(adapters=..., max_lora_rank=4) with an adapter of rank 8 read every weight, then
    refused; the adapters are read on a weightless model first, as serve's CLI reads them."""
    base, adapters = served
    monkeypatch.setattr("seekstack.infer.engine.load_pretrained", lambda *args, **kw: pytest.fail("weights read"))
    with pytest.raises(ConfigError, match=r"^field 'max_lora_rank' is 4, less than the rank 8 of adapter 'attention'"):
        Engine.from_pretrained(base, adapters=adapters, max_lora_rank=4)


def test_from_pretrained_checks_adapters_checked_for_another_capacity_before_the_weights(served, monkeypatch):
    """Engine.from_pretrained given adapters refuse_adapters_past_capacity had checked (serve's) checked none of them,
    whatever capacity it was asked for: max_loras=10**12 read every weight first. It checks them unless they were
    checked for the same config, capacity and devices, and then reads and checks none again."""
    base, adapters = served
    config, cpu = seekstack.load_pretrained(base).config, torch.device("cpu")
    checked = refuse_adapters_past_capacity(config, {"full": adapters["full"]}, None, None, cpu)
    monkeypatch.setattr("seekstack.infer.engine.load_pretrained", lambda *args, **kw: pytest.fail("weights read"))
    with pytest.raises(ConfigError, match=r"^field 'max_loras' is 1000000000000: the adapted layers' stacks at that"):
        Engine.from_pretrained(base, adapters=checked, max_loras=10**12)
    monkeypatch.setattr(registry, "refuse_stacks_past_free_memory", lambda *args: pytest.fail("checked again"))
    assert refuse_adapters_past_capacity(config, checked, None, None, cpu) is checked


@pytest.mark.parametrize("field", ["max_lora_rank", "max_loras"])
def test_a_capacity_past_the_free_memory_is_refused_naming_it_before_the_weights_or_at_the_load(
    served, field, monkeypatch
):
    """max_lora_rank=10**12 (or max_loras) read every weight, then ended in torch's bare "DefaultCPUAllocator: can't
    allocate memory" (or a MemoryError) as the stacks were made: refused before the weights, and on a load adapting
    layers no loaded adapter adapts, naming the field, the stacks' bytes and the memory free."""
    base, adapters = served
    stacks = rf"^field '{field}' is 1000000000000: the adapted layers' stacks at that capacity \(.* x .* bytes\) take "
    with monkeypatch.context() as patched, pytest.raises(ConfigError, match=stacks + r"\d+ bytes, more than the \d+"):
        patched.setattr("seekstack.infer.engine.load_pretrained", lambda *args, **kw: pytest.fail("weights read"))
        Engine.from_pretrained(base, adapters={"full": adapters["full"]}, **{field: 10**12})
    loaded = attach_adapters(seekstack.load_pretrained(base).eval(), {}, **{field: 10**12})
    with pytest.raises(ConfigError, match=stacks):
        loaded.add("full", read_factors(loaded.model.config, adapters["full"]))
    assert loaded.slots == {}
