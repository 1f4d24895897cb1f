"""Paged latent cache: what the model computes through it equals the full forward; blocks come and go."""

from __future__ import annotations

import pytest
import torch

from seekstack.infer.cache import CacheFullError, PagedLatentCache
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(micro_config()).eval()


def forward_planned(model, cache, seq_ids, rows, starts) -> torch.Tensor:
    """Run the model on each row's new tokens (padded to one width) through `cache`; logits (B, T, V)."""
    counts = [len(row) for row in rows]
    width = max(counts)
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    positions = cache.plan(seq_ids, starts, counts, width)
    return model(input_ids, cache=cache, positions=positions).logits


@torch.inference_mode()
def test_chunked_prefill_then_decode_matches_full_forward(model):
    tokens = torch.randint(0, 128, (1, 23)).tolist()[0]
    cache = PagedLatentCache(model.config, num_blocks=8, block_size=4)
    cache.allocate("a", len(tokens))
    chunks = [tokens[:9], tokens[9:16], *[[t] for t in tokens[16:]]]  # two prefill chunks, then one token a step
    logits, start = [], 0
    for chunk in chunks:
        logits.append(forward_planned(model, cache, ["a"], [chunk], [start])[0])
        start += len(chunk)
    full = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(torch.cat(logits), full, atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_rows_of_different_lengths_each_match_their_own_full_forward(model):
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 13, 2)]
    cache = PagedLatentCache(model.config, num_blocks=20, block_size=4)
    for name, prompt in zip("abc", prompts, strict=True):
        cache.allocate(name, len(prompt) + 3)
    # The first prompt enters in one go while the others are split: rows of 5, 8 and 2 new tokens, padded.
    first = forward_planned(model, cache, ["a", "b", "c"], [prompts[0], prompts[1][:8], prompts[2]], [0, 0, 0])
    second = forward_planned(model, cache, ["b"], [prompts[1][8:]], [8])
    extra = [7, 9, 11]
    decoded = forward_planned(model, cache, ["a", "b", "c"], [[t] for t in extra], [5, 13, 2])
    for row, prompt in enumerate(prompts):
        full = model(torch.tensor([prompt + [extra[row]]])).logits[0]
        ours = first[row, : min(len(prompt), 8)]
        if row == 1:
            ours = torch.cat((ours, second[0]))
        torch.testing.assert_close(torch.cat((ours, decoded[row])), full, atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_a_compiled_step_takes_the_pools_width_as_a_constant_and_their_slots_as_a_size():
    """The pools' width is the model's (C + R): a compiled step's graph holds it as a constant, so each call hands
    dynamo's and inductor's wrappers one size fewer a layer; their slots stay a size, so engines whose caches differ
    in blocks share the graph."""
    graphs = []

    def record(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    model = Transformer(micro_config(num_hidden_layers=2)).eval()  # a dense layer and a MoE one
    cache = PagedLatentCache(model.config, num_blocks=8, block_size=4)
    cache.allocate("a", 6)
    forward_planned(torch.compile(model, dynamic=True, backend=record), cache, ["a"], [[3, 4, 5]], [0])
    [graph] = graphs
    inputs = [node for node in graph.graph.nodes if node.op == "placeholder"]
    pools = [node.meta["example_value"] for node in inputs if "pools" in node.name]
    assert len(pools) == model.config.num_hidden_layers  # the MTP layer's pool is not read by a plain step
    width = model.config.kv_lora_rank + model.config.qk_rope_head_dim
    assert all(type(pool.shape[1]) is int and pool.shape[1] == width for pool in pools), [p.shape for p in pools]
    assert all(isinstance(pool.shape[0], torch.SymInt) for pool in pools)


def test_cache_stores_only_latent_and_rope_key_per_token():
    config = micro_config()
    cache = PagedLatentCache(config, num_blocks=4, block_size=8, dtype=torch.bfloat16)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    assert cache.bytes_per_token() == (config.kv_lora_rank + config.qk_rope_head_dim) * layers * 2


def test_freed_blocks_return_to_the_pool_and_are_reused():
    cache = PagedLatentCache(micro_config(), num_blocks=5, block_size=4)  # 4 usable blocks
    cache.allocate("a", 9)  # 3 blocks
    assert cache.usage == pytest.approx(0.75)
    assert not cache.can_allocate(8)
    with pytest.raises(CacheFullError, match="needs 2 more cache blocks of 4 tokens; 1 of 4 are free"):
        cache.allocate("b", 8)
    blocks = list(cache.tables["a"])
    cache.free("a")
    assert cache.usage == 0
    cache.allocate("b", 12)
    assert sorted(cache.tables["b"]) == sorted(blocks)
    assert 0 not in cache.tables["b"]  # block 0 takes padding and is never handed out


def test_length_is_refused_when_rows_start_at_different_positions(model):
    cache = PagedLatentCache(model.config, num_blocks=8, block_size=4)
    cache.allocate("a", 8)
    cache.allocate("b", 8)
    cache.plan(["a", "b"], [0, 0], [3, 2], 3)
    assert cache.length() == 0
    cache.plan(["a", "b"], [3, 2], [1, 1], 1)
    with pytest.raises(ValueError, match="different positions"):
        cache.length()
