"""The memory-budgeted cache: sized by bytes, blocks grow with each sequence, and a request that runs out of blocks
is preempted and recomputed with the tokens an unconstrained run gives."""

from __future__ import annotations

import math
import re

import pytest
import torch

import seekstack.infer.cache as cache_module
import seekstack.infer.engine as engine_module
from seekstack.infer import Engine, EngineOptions, SamplingParams
from seekstack.infer.cache import blocks_in_budget

LONG_GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
SEEDED = [SamplingParams(max_new_tokens=24, temperature=1.1, top_k=40, seed=seed, ignore_eos=True) for seed in range(4)]


def prompts(lengths: list[int]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(5, 512, (n,), generator=generator).tolist() for n in lengths]


def test_the_cache_holds_as_many_blocks_as_the_memory_budget_pays_for(model, tokenizer):
    config = model.config
    token_bytes = (config.kv_lora_rank + config.qk_rope_head_dim) * (config.num_hidden_layers + 1) * 4
    assert blocks_in_budget(config, 100 * 4 * token_bytes + 5, 4, torch.float32) == 100
    engine = Engine(model, tokenizer, block_size=4, kv_cache_memory=100 * 4 * token_bytes)
    assert engine.cache.num_blocks == 100 and engine.cache.bytes_per_token() == token_bytes
    # By default half the free memory, but never more than max_batch_size requests of max_model_len tokens.
    default = Engine(model, tokenizer, block_size=4, max_batch_size=2, max_model_len=64)
    assert default.cache.num_blocks == 2 * 64 // 4 + 1
    kwargs = EngineOptions(kv_cache_memory="2MiB", prefix_caching=False).engine_kwargs()
    assert kwargs["kv_cache_memory"] == 2 * 2**20 and kwargs["prefix_caching"] is False


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("block_size", 0), ("block_size", -1), ("max_model_len", 0), ("max_model_len", -8), ("kv_cache_memory", 0),
     ("kv_cache_memory", -5), ("kv_cache_memory", float("nan"))],
)  # fmt: skip
def test_a_cache_size_below_one_is_refused_naming_it_not_read_as_the_default(model, tokenizer, keyword, value):
    """block_size=0 raised a bare ZeroDivisionError and -1 "cpu has ... bytes free; 50% of them hold -26328720 cache
    blocks of -384 bytes"; max_model_len=0 and kv_cache_memory=0 were read as None, the model's context and half the
    free memory, unsaid (max_model_len=-8 refused every prompt as longer). Each is refused as max_batch_size=0 is."""
    with pytest.raises(ValueError, match=rf"^{keyword}={value} must be >= 1$"):
        Engine(model, tokenizer, **{keyword: value})


@pytest.mark.parametrize("value", [2.5, "2", True])
def test_a_size_that_is_no_whole_number_is_refused_naming_it(model, tokenizer, value):
    """block_size=2.5 raised torch's bare "TypeError: zeros(): argument 'size' ... must be tuple of ints", and
    max_model_len=2.5 was taken (num_blocks=2.5 and draft_vocab=2.5 raised bare TypeErrors too); a count given as text
    ("2") raised a bare TypeError, and True was taken as 1. Each count is refused naming it, as one below its least is
    (vLLM refuses a bool for an int too)."""
    for keyword in ("max_batch_size", "max_model_len", "block_size", "prefill_chunk", "draft_tokens"):
        with pytest.raises(ValueError, match=rf"^{keyword}={value!r} must be a whole number >= 1$"):
            Engine(model, tokenizer, **{keyword: value})
    with pytest.raises(ValueError, match=rf"^num_blocks={value!r}: the cache needs a whole number of at least 2"):
        Engine(model, tokenizer, num_blocks=value)
    with pytest.raises(ValueError, match=rf"^draft_vocab={value!r} must be a whole number >= 0"):
        Engine(model, tokenizer, speculative=True, draft_vocab=value, adaptive_drafts=False)
    for budget in (True, math.inf):  # inf was a bare "cannot convert float NaN to integer"
        with pytest.raises(ValueError, match=rf"^kv_cache_memory={budget} must be a number of bytes >= 1 or a size "):
            Engine(model, tokenizer, kv_cache_memory=budget)
    assert Engine(model, tokenizer, block_size=4, kv_cache_memory=2e6).cache.block_size == 4  # bytes need not be int
    # where the budget bounds the cache, a float budget holds as many blocks as the int does (not num_blocks=10.0)
    assert Engine(model, tokenizer, block_size=4, kv_cache_memory=2.0**14).cache.num_blocks == 10


def test_kv_cache_memory_takes_a_size_as_the_command_line_does(model, tokenizer):
    """Engine(model, tokenizer, kv_cache_memory="2MiB"), the size --kv-cache-memory takes, raised a bare "TypeError:
    '<' not supported between instances of 'str' and 'int'": it is read as that many bytes, and a size that is none
    is refused naming kv_cache_memory."""
    sized = Engine(model, tokenizer, block_size=4, kv_cache_memory="2MiB")
    assert sized.cache.num_blocks == Engine(model, tokenizer, block_size=4, kv_cache_memory=2 * 2**20).cache.num_blocks
    with pytest.raises(ValueError, match=r"^kv_cache_memory: size '2 apples': expected a number with an optional unit"):
        Engine(model, tokenizer, kv_cache_memory="2 apples")


def pools_on_a_second_device(model, monkeypatch, free_blocks: float) -> int:
    """Put the main layers' pools on a second device (meta, standing in for the GPU of a device map) with room free
    for `free_blocks` blocks (of 4 float32 tokens) of them, the MTP layer's on a roomy CPU; the bytes free there."""
    gpu_layers = model.config.num_hidden_layers
    devices = [torch.device("meta")] * gpu_layers + [torch.device("cpu")]
    block_bytes = (model.config.kv_lora_rank + model.config.qk_rope_head_dim) * gpu_layers * 4 * 4
    free = {"meta": int(free_blocks * block_bytes), "cpu": 2**40}
    monkeypatch.setattr(engine_module, "layer_devices", lambda placed: devices)
    monkeypatch.setattr(cache_module, "free_memory", lambda device: free[torch.device(device).type])
    return free["meta"]


def test_the_default_cache_of_each_device_is_sized_by_the_memory_free_on_that_device(model, tokenizer, monkeypatch):
    pools_on_a_second_device(model, monkeypatch, free_blocks=20.5)
    engine = Engine(model, tokenizer, block_size=4)
    assert engine.cache.num_blocks == 10  # half the second device's free memory, not the host's
    assert [pool.device.type for pool in engine.cache.pools] == ["meta"] * model.config.num_hidden_layers + ["cpu"]


def test_a_device_whose_free_memory_holds_no_cache_is_refused_naming_it_and_the_numbers(model, tokenizer, monkeypatch):
    free = pools_on_a_second_device(model, monkeypatch, free_blocks=3)
    block_bytes = free // 3
    with pytest.raises(
        ValueError, match=f"meta has {free} bytes free; 50% of them hold 1 cache blocks of {block_bytes}"
    ):
        Engine(model, tokenizer, block_size=4)


def test_a_cache_past_the_free_memory_is_refused_naming_what_asked_for_it(model, tokenizer, monkeypatch):
    """num_blocks=10**12 raised torch's bare "DefaultCPUAllocator: can't allocate memory: you tried to allocate
    6144000000000000 bytes" (a size the machine has but not free: the kernel's kill), and so did a kv_cache_memory
    budget past the free memory where the batch needed its blocks; each is refused naming it before any allocation."""
    block_bytes = Engine(model, tokenizer, block_size=4, num_blocks=2).cache.bytes_per_token() * 4
    monkeypatch.setattr(cache_module, "free_memory", lambda device: 10 * block_bytes)
    assert Engine(model, tokenizer, block_size=4, num_blocks=10).cache.num_blocks == 10
    for keyword, value in (("num_blocks", 11), ("kv_cache_memory", 30 * block_bytes)):
        with pytest.raises(ValueError) as refused:
            Engine(model, tokenizer, block_size=4, max_batch_size=100, **{keyword: value})
        blocks = 11 if keyword == "num_blocks" else 30
        assert str(refused.value) == (
            f"{keyword}={value}: {blocks} cache blocks of 4 tokens take {blocks * block_bytes} bytes on cpu, which has "
            f"{10 * block_bytes} bytes free: give a smaller one, or leave num_blocks and kv_cache_memory out (half the "
            "free memory)"
        )


def test_blocks_grow_with_the_sequence_instead_of_being_reserved_for_max_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, block_size=4, num_blocks=40)
    request = engine.add_request(prompts([6])[0], LONG_GREEDY)
    sizes = []
    for _ in range(10):
        engine.step()
        sizes.append(len(engine.cache.tables[request]))
    # The prompt's 2 blocks at admission; then step k writes token 6 + k - 2 and holds ceil((6 + k - 1) / 4) blocks.
    assert sizes == [2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    assert engine.cache.usage == pytest.approx(4 / 39)


def test_a_request_waits_for_blocks_then_runs(model, tokenizer):
    engine = Engine(model, tokenizer, block_size=4, num_blocks=9)  # 8 blocks: each request fits alone
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    first, second = (engine.add_request(p, params) for p in prompts([6, 25]))
    engine.step()
    assert [r.request_id for r in engine.prefilling + engine.running] == [first]  # prompts of 2 + 7 blocks > 8
    assert [r.request_id for r in engine.waiting] == [second]
    while engine.has_unfinished():
        engine.step()
    assert engine.cache.usage == 0


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_requests_resume_with_the_tokens_of_an_unconstrained_run(model, tokenizer, sampling, prefix_caching):
    batch = prompts([9, 14, 5, 11])
    params = [LONG_GREEDY] * 4 if sampling == "greedy" else SEEDED
    unconstrained = Engine(model, tokenizer, block_size=4).generate(batch, params)
    # 16 usable blocks: the four admitted prompts fit, but not the four completions of 24 tokens beside them.
    tight = Engine(model, tokenizer, block_size=4, num_blocks=17, prefix_caching=prefix_caching)
    constrained = tight.generate(batch, params)
    assert tight.preemptions > 0
    assert [c.token_ids for c in constrained] == [c.token_ids for c in unconstrained]
    assert [c.text for c in constrained] == [c.text for c in unconstrained]
    assert tight.cache.usage == 0 and tight.cache.tables == {}


def test_preempted_speculative_requests_resume_with_plain_greedy_tokens(model, tokenizer):
    batch = prompts([9, 14, 5])
    expected = Engine(model, tokenizer, block_size=4).generate(batch, LONG_GREEDY)
    tight = Engine(model, tokenizer, block_size=4, num_blocks=19, speculative=True, draft_tokens=2)
    constrained = tight.generate(batch, LONG_GREEDY)
    assert tight.preemptions > 0
    assert [c.token_ids for c in constrained] == [c.token_ids for c in expected]


@pytest.mark.parametrize("max_new_tokens", [None, 10, 24, 200])
def test_a_reply_past_what_the_cache_holds_ends_there_as_one_past_the_context(model, tokenizer, max_new_tokens):
    """With a cache smaller than max_model_len, max_new_tokens=None got the room the cache leaves, but a larger
    max_new_tokens was refused ("30 tokens need 8 cache blocks; the cache has 4"), where one past max_model_len ends the
    reply with the context: both are capped to the room (fit_max_new_tokens), and a prompt the cache cannot hold with a
    new token is refused with fit_max_new_tokens' one message, whatever max_new_tokens."""
    engine = Engine(model, tokenizer, block_size=4, num_blocks=5, max_model_len=64)  # 4 blocks of 4: 16 tokens
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    [reply] = engine.generate(prompts([6]), params)
    assert (len(reply.token_ids), reply.finish_reason) == (10, "length")
    room = "the 16 tokens the cache holds (--kv-cache-memory, kv_cache_memory=, for more) leaves no room"
    with pytest.raises(ValueError, match=rf"^prompt is 16 tokens; {re.escape(room)} for a new token: shorten the"):
        engine.add_request(prompts([16])[0], params)
    assert not engine.has_unfinished()
