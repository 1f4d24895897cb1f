"""The engine with compiled decode steps gives the eager engine's tokens: plain and speculative greedy decoding,
sequences of different lengths joining mid-decode (the batch and the cache mask change shape)."""

from __future__ import annotations

import pytest
import torch

from seekstack.infer import Engine, SamplingParams
from tests.infer_support import micro_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def prompts(lengths: list[int]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(5, 512, (n,), generator=generator).tolist() for n in lengths]


def run(engine: Engine, batch: list[list[int]], params: list[SamplingParams], join_at: int) -> list[list[int]]:
    """The first prompt alone for `join_at` steps, then the others join it."""
    ids = [engine.add_request(batch[0], params[0])]
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or step <= join_at:
        if step == join_at:
            ids += [engine.add_request(prompt, p) for prompt, p in zip(batch[1:], params[1:], strict=True)]
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
        step += 1
    return [tokens[request_id] for request_id in ids]


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_compiled_decoding_gives_the_eager_tokens(tokenizer, speculative):
    model = micro_model()
    batch = prompts([6, 19, 11])
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (24, 9, 14)]
    eager = Engine(model, tokenizer, prefill_chunk=8, speculative=speculative)
    compiled = Engine(model, tokenizer, prefill_chunk=8, speculative=speculative, compile=True)
    expected = run(eager, batch, params, join_at=4)
    assert run(compiled, batch, params, join_at=4) == expected
    assert [len(tokens) for tokens in expected] == [24, 9, 14]
    if speculative:  # the fused greedy step counts the same drafts and acceptances
        assert (compiled.stats().spec_drafted, compiled.stats().spec_accepted) == (
            eager.stats().spec_drafted,
            eager.stats().spec_accepted,
        )
    assert compiled.cache.usage == 0  # every finished request gave its blocks back
