"""Automatic prefix caching: blocks keyed by their chained prefix hash, shared with reference counts, evicted least
recently used first, and outputs equal to those computed without the cache."""

from __future__ import annotations

import pytest
import torch

from seekstack.infer import Engine, SamplingParams
from seekstack.infer.cache import PagedLatentCache
from tests.conftest import micro_config


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(5, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_shared_prefix_shares_its_full_blocks_with_counted_users():
    cache = PagedLatentCache(micro_config(), num_blocks=12, block_size=4)
    prefix = tokens(9, 0)
    first, second = prefix + [1, 2], prefix + [3]
    assert cache.admit("a", first, len(first)) == 0  # nothing cached yet
    cache.commit("a", first, len(first))  # 11 tokens computed: blocks 0-3 and 4-7 are full
    assert cache.admit("b", second, len(second)) == 8  # tokens 0-7: two whole blocks
    assert cache.tables["b"][:2] == cache.tables["a"][:2] and cache.tables["b"][2] != cache.tables["a"][2]
    shared = cache.tables["a"][:2]
    assert [cache.users[block] for block in shared] == [2, 2]
    cache.free("a")
    assert [cache.users[block] for block in shared] == [1, 1] and not set(shared) & set(cache.evictable)
    cache.free("b")
    assert set(shared) <= set(cache.evictable) and cache.usage == 0  # cached, unused: free for the taking


def test_the_last_token_is_always_computed_and_a_salt_separates_adapters():
    cache = PagedLatentCache(micro_config(), num_blocks=12, block_size=4)
    prompt = tokens(8, 1)
    cache.admit("a", prompt, 8)
    cache.commit("a", prompt, 8)
    assert cache.admit("b", prompt, 8) == 4  # the second block holds the last token: it is recomputed
    assert cache.admit("c", prompt, 8, salt="1") == 0  # another adapter's values differ
    assert cache.admit("d", [prompt[0] + 1] + prompt[1:], 8) == 0  # the chained key covers every earlier token


def test_with_mtp_a_block_is_shared_only_by_prompts_that_also_agree_on_the_token_after_it():
    """Speculative decoding caches one token more per block key: the MTP layer's slot at a block's last position holds
    the embedding of the token after the block."""
    cache = PagedLatentCache(micro_config(), num_blocks=12, block_size=4, key_extra_tokens=1)
    prompt = tokens(10, 5)
    cache.admit("a", prompt, 10)
    cache.commit("a", prompt, 10)
    assert cache.admit("same", prompt, 10) == 8
    assert cache.admit("next differs", prompt[:4] + [prompt[4] + 1] + prompt[5:], 10) == 0
    assert cache.admit("one later differs", prompt[:5] + [prompt[5] + 1] + prompt[6:], 10) == 4


def test_cached_blocks_nobody_uses_are_evicted_least_recently_freed_first():
    cache = PagedLatentCache(micro_config(), num_blocks=7, block_size=4)  # 6 usable blocks
    old, new = tokens(9, 2), tokens(9, 3)
    for name, prompt in (("old", old), ("new", new)):
        cache.admit(name, prompt, 9)
        cache.commit(name, prompt, 9)
        cache.free(name)
    assert len(cache.evictable) == 4 and len(cache.free_blocks) == 2  # two full blocks each stay cached
    cache.allocate("x", 16)  # 4 blocks: the 2 never used, then the 2 of the least recently freed prompt
    cache.free("x")
    assert cache.admit("old again", old, 9) == 0 and cache.admit("new again", new, 9) == 8


def test_nothing_is_shared_when_prefix_caching_is_off():
    cache = PagedLatentCache(micro_config(), num_blocks=12, block_size=4, prefix_caching=False)
    prompt = tokens(12, 4)
    cache.admit("a", prompt, 12)
    cache.commit("a", prompt, 12)
    assert cache.cached == {} and cache.admit("b", prompt, 12) == 0


@pytest.mark.parametrize("speculative", [False, True])
def test_outputs_with_the_prefix_cache_equal_those_without_and_report_cached_tokens(model, tokenizer, speculative):
    system = tokens(21, 5)
    batch = [system + tokens(n, 6 + n) for n in (3, 7, 1)]
    params = [
        SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),
    ]
    options = dict(block_size=4, prefill_chunk=64, speculative=speculative, draft_tokens=2)
    plain = Engine(model, tokenizer, prefix_caching=False, **options)
    cached = Engine(model, tokenizer, **options)
    expected = [plain.generate([prompt], p)[0] for prompt, p in zip(batch, params, strict=True)]
    outputs, cached_tokens = [], []
    for prompt, p in zip(batch, params, strict=True):  # one after the other: each finds the system prompt cached
        request = cached.add_request(prompt, p)
        parts = []
        while cached.has_unfinished():
            parts += [out for out in cached.step() if out.request_id == request]
        outputs.append([token for part in parts for token in part.token_ids])
        cached_tokens.append({part.cached_tokens for part in parts})
    assert outputs == [c.token_ids for c in expected]
    # 20 of the 21 system tokens are whole blocks (with speculation a block's key also holds the token after it).
    assert cached_tokens == [{0}, {20}, {20}]
    assert cached.stats().prefill_tokens == plain.stats().prefill_tokens - 40
    # again, `generate`'s completions say so: now each prompt's own whole blocks are cached too (its last token never)
    assert [c.cached_tokens for c in cached.generate(batch, params)] == [20, 24, 20]


def test_a_completion_reports_its_cached_tokens_under_vllms_name_too(model, tokenizer):
    """vLLM's RequestOutput.num_cached_tokens (a script checking its prefix-cache hits) raised AttributeError."""
    engine = Engine(model, tokenizer, block_size=4)
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    prompt = tokens(10, 3)
    first, again = (engine.generate([prompt], params)[0] for _ in range(2))
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 8) == (first.cached_tokens, again.cached_tokens)


def test_twin_prompts_in_one_prefill_are_computed_once_and_sample_as_if_alone(model, tokenizer):
    """n samples of one prompt (GRPO's G) share one forward; the others get its logits and its cache slots. The chunk
    budget (16) splits the 30-token prompt: its twins follow it through both chunks without costing budget."""
    prompt, other = tokens(30, 8), tokens(12, 9)
    batch = [prompt, prompt, other, prompt]
    params = [SamplingParams(max_new_tokens=6, temperature=0.9, seed=seed, ignore_eos=True) for seed in range(4)]
    alone = Engine(model, tokenizer, block_size=4, prefix_caching=False)
    expected = [alone.generate([p], q)[0].token_ids for p, q in zip(batch, params, strict=True)]
    engine = Engine(model, tokenizer, block_size=4, prefill_chunk=16)
    assert [out.token_ids for out in engine.generate(batch, params)] == expected
    assert engine.stats().prefill_tokens == 30 + 12
