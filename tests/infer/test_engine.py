"""The engine: cache and batching equivalence, sampling, stop conditions, speculative decoding, compiled decode
steps, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import seekstack
from seekstack.adapters.config import AdapterConfig
from seekstack.infer import Engine, EngineOptions, SamplingParams
from seekstack.infer.json_mode import JsonFormat
from seekstack.infer.outputs import Completion, Logprob, TokenLogprob
from seekstack.infer.params import MAX_BAD_WORDS
from seekstack.infer.sampling import BadWords
from seekstack.schema import ConfigError
from seekstack.tokenizer import ASSISTANT, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from tests.adapters.support import write_random_adapter
from tests.infer.support import VOCAB, fail_sampling_after, micro_model, model_dir

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 512, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def test_greedy_tokens_and_logprobs_match_the_full_forward(model, tokenizer):
    engine = Engine(model, tokenizer, prefill_chunk=7)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    [completion] = engine.generate(prompts([17]), params)
    sequence = completion.prompt_token_ids + completion.token_ids
    logits = model(torch.tensor([sequence])).logits[0, 16:-1]  # predictions of each generated token
    assert completion.token_ids == logits.argmax(-1).tolist()
    full_logprobs = logits.log_softmax(-1)
    for step, entry in enumerate(completion.logprobs):
        assert entry.logprob == pytest.approx(full_logprobs[step, entry.token_id].item(), abs=1e-4)
        assert [token for token, _, _ in entry.top] == full_logprobs[step].topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely token
    assert completion.finish_reason == "length" and len(completion.token_ids) == 10
    chosen = full_logprobs.gather(-1, torch.tensor(completion.token_ids)[:, None])
    assert completion.cumulative_logprob == pytest.approx(chosen.sum().item(), abs=1e-3)  # vLLM's, summed
    assert engine.generate(prompts([17]), GREEDY)[0].cumulative_logprob is None  # no logprobs asked for


@torch.inference_mode()
@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_each_sampled_tokens_logprob_carries_its_rank_as_vllms(model, tokenizer, speculative):
    """A generated token's TokenLogprob had rank None (prompt_logprobs' alone had one), where vLLM's sample logprobs
    give each token's Logprob.rank: 1 + the tokens likelier than it, under the model's raw distribution."""
    engine = Engine(model, tokenizer, speculative=speculative, adaptive_drafts=False)
    params = SamplingParams(max_new_tokens=16, seed=3, ignore_eos=True, logprobs=True, top_logprobs=2)
    [completion] = engine.generate(prompts([9]), params)
    sequence = completion.prompt_token_ids + completion.token_ids
    logprobs = model(torch.tensor([sequence])).logits[0, 8:-1].log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(completion.token_ids)[:, None])
    ranks = [entry.rank for entry in completion.logprobs]
    surely_likelier, maybe_likelier = ((logprobs > chosen + bound).sum(-1) + 1 for bound in (1e-4, -1e-4))
    bounds = zip(surely_likelier.tolist(), ranks, maybe_likelier.tolist(), strict=True)
    assert all(low <= rank <= high for low, rank, high in bounds), ranks  # the batch's float rounding apart
    assert (maybe_likelier - surely_likelier).sum() < 20 and max(ranks) > 2  # sampled, not only the likeliest


@torch.inference_mode()
def test_a_tokens_logprobs_read_as_vllms_dict_of_logprob_by_token_id(model, tokenizer):
    """vLLM scripts read `output.logprobs[i][token_id].logprob` (a dict per token: the sampled token's Logprob first,
    then the top k not it, ranked 1..k); a TokenLogprob raised TypeError: 'TokenLogprob' object is not subscriptable."""
    top = [(4, "x", -0.5), (9, "y", -1.0)]
    sampled_past_the_top = TokenLogprob(7, "a", -2.5, top, rank=3)
    assert list(sampled_past_the_top.items()) == [
        (7, Logprob(-2.5, 3, "a")),
        (4, Logprob(-0.5, 1, "x")),
        (9, Logprob(-1.0, 2, "y")),
    ]
    sampled_second = TokenLogprob(9, "y", -1.0, top, rank=2)
    assert list(sampled_second.items()) == [(9, Logprob(-1.0, 2, "y")), (4, Logprob(-0.5, 1, "x"))]
    engine = Engine(model, tokenizer)
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    for entry in engine.generate(prompts([9]), greedy)[0].logprobs:  # the likeliest token first, rank 1
        [(second, text, logprob)] = entry.top[1:]
        assert list(entry.items()) == [
            (entry.token_id, Logprob(entry.logprob, 1, entry.token)),
            (second, Logprob(logprob, 2, text)),
        ]
    params = SamplingParams(max_new_tokens=6, seed=1, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    [completion] = engine.generate(prompts([9]), params)
    assert any(len(entry) == 3 and entry[entry.token_id].rank > 2 for entry in completion.logprobs)
    first_scored = completion.prompt_logprobs[1]
    assert first_scored[completion.prompt_token_ids[1]].logprob == first_scored.logprob and 1 <= len(first_scored) <= 2


@torch.inference_mode()
def test_prompt_logprobs_are_those_of_the_full_forward_chunked_and_cached(model, tokenizer):
    """vLLM's SamplingParams(prompt_logprobs=k) raised TypeError; each prompt token's log-probability after the ones
    before it (the first None) comes with its k likeliest, across prefill chunks, beside a twin prompt that asks for
    none, and again once the prompt sits in the prefix cache (whose hit would skip its positions)."""
    engine = Engine(model, tokenizer, prefill_chunk=5)
    [prompt] = prompts([17])
    asking = dataclasses.replace(GREEDY, max_new_tokens=3, prompt_logprobs=2)
    full = model(torch.tensor([prompt])).logits[0].log_softmax(-1)  # position j - 1 predicts token j
    first, plain = engine.generate([prompt, prompt], [asking, GREEDY])
    again = engine.generate([prompt], asking)[0]
    assert plain.prompt_logprobs is None and again.cached_tokens == 0
    for completion in (first, again):
        assert completion.prompt_logprobs[0] is None and len(completion.prompt_logprobs) == len(prompt)
        for j, entry in enumerate(completion.prompt_logprobs[1:], start=1):
            assert entry.token_id == prompt[j]
            assert entry.logprob == pytest.approx(full[j - 1, prompt[j]].item(), abs=1e-4)
            assert [token for token, _, _ in entry.top] == full[j - 1].topk(2).indices.tolist()
    assert first.token_ids == plain.token_ids[:3]


def test_a_sequence_decoded_alone_equals_it_decoded_among_others(model, tokenizer):
    target, *others = prompts([9, 30, 3, 17])
    alone = Engine(model, tokenizer).generate([target], GREEDY)[0]
    engine = Engine(model, tokenizer, max_batch_size=3, prefill_chunk=8)  # the fourth waits for a free seat
    params = [GREEDY, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True), GREEDY, GREEDY]
    together = engine.generate([others[0], others[1], target, others[2]], params)
    assert together[2].token_ids == alone.token_ids
    assert together[2].text == alone.text
    for prompt, completion in zip(others, [together[0], together[1], together[3]], strict=True):
        assert (
            completion.token_ids
            == Engine(model, tokenizer).generate([prompt], GREEDY)[0].token_ids[: len(completion.token_ids)]
        )


@pytest.mark.parametrize("prompt_logprobs", [None, 3], ids=["last-position", "every-position"])
def test_prompts_prefilled_together_padded_to_one_width_score_as_each_alone(model, tokenizer, prompt_logprobs):
    """One prefill chunk holds prompts of 1 to 30 tokens, padded to the longest: the padding is masked from every
    real query and the first token is read at each row's last real position, so tokens and logprobs (the first
    token's, and the prompt's) are each prompt's alone."""
    batch = prompts([3, 30, 17, 1])
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=5,
                            prompt_logprobs=prompt_logprobs)  # fmt: skip
    together = Engine(model, tokenizer, prefill_chunk=256).generate(batch, params)
    for prompt, completion in zip(batch, together, strict=True):
        alone = Engine(model, tokenizer).generate([prompt], params)[0]
        assert completion.token_ids == alone.token_ids
        for mine, its in zip(completion.logprobs, alone.logprobs, strict=True):
            assert mine.logprob == pytest.approx(its.logprob, abs=1e-5)
            assert [token for token, _, _ in mine.top] == [token for token, _, _ in its.top]
        if prompt_logprobs is not None:
            for mine, its in zip(completion.prompt_logprobs[1:], alone.prompt_logprobs[1:], strict=True):
                assert (mine.token_id, mine.logprob) == (its.token_id, pytest.approx(its.logprob, abs=1e-5))


def test_request_joining_mid_decode_does_not_change_running_ones(model, tokenizer):
    first, second = prompts([6, 40])
    expected = Engine(model, tokenizer).generate([first], GREEDY)[0].token_ids
    engine = Engine(model, tokenizer, prefill_chunk=16)
    request = engine.add_request(first, GREEDY)
    tokens = []
    for step in range(40):
        if step == 3:
            engine.add_request(second, GREEDY)  # its 40-token prompt is prefilled over 3 steps while `first` decodes
        tokens += [t for out in engine.step() if out.request_id == request for t in out.token_ids]
    assert tokens == expected


def test_seeded_sampling_is_reproducible_whatever_the_batch(model, tokenizer):
    target, other = prompts([8, 15])
    params = SamplingParams(max_new_tokens=15, temperature=1.3, top_k=50, top_p=0.95, seed=123, ignore_eos=True)
    alone = Engine(model, tokenizer).generate([target], params)[0].token_ids
    unseeded = SamplingParams(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    together = Engine(model, tokenizer).generate([other, target, other], [unseeded, params, unseeded])
    assert together[1].token_ids == alone
    other_seed = SamplingParams(**{**params.__dict__, "seed": 124})
    assert Engine(model, tokenizer).generate([target], other_seed)[0].token_ids != alone


def test_unseeded_sampled_requests_repeat_after_the_same_torch_manual_seed(model, tokenizer):
    """Their seeds came from the operating system: no global seed reproduced a run, as vLLM's does. They now come from
    torch's generator; two requests of one prompt still differ, and greedy requests take none of its numbers."""
    engine, [prompt] = Engine(model, tokenizer), prompts([6])
    unseeded = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append([completion.token_ids for completion in engine.generate([prompt, prompt], unseeded)])
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1] and runs[2] != runs[0]
    state = torch.get_rng_state()
    engine.generate([prompt], GREEDY)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_minus_one_is_no_seed_as_vllms_and_llama_clis(model, tokenizer):
    """seed=-1 was a fixed seed, the same text each run, where vLLM's SamplingParams reads it as None (and llama-cli's
    --seed -1 as a random seed): it now samples as an unseeded request, anew after another torch seed. A sample whose
    seed + i is -1 keeps it, as vLLM's n samples do, as 2**64 - 1 (the same draws)."""
    assert SamplingParams(seed=-1).seed is None and SamplingParams.from_dict({"seed": -1}).seed is None
    assert [sample.seed for sample in SamplingParams(seed=-3, n=4).samples()] == [-3, -2, 2**64 - 1, 0]
    engine, [prompt] = Engine(model, tokenizer), prompts([6])
    runs = {}
    for seed, torch_seed in ((-1, 3), (None, 3), (-1, 4), (2**64 - 1, 3), (2**64 - 1, 4)):
        torch.manual_seed(torch_seed)
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed, ignore_eos=True)
        runs[seed, torch_seed] = engine.generate([prompt], params)[0].token_ids
    assert runs[-1, 3] == runs[None, 3] and runs[-1, 4] != runs[-1, 3]
    assert runs[2**64 - 1, 3] == runs[2**64 - 1, 4] != runs[-1, 3]


def test_n_samples_of_each_prompt_come_back_as_its_outputs_as_vllm_returns_them(model, tokenizer):
    """SamplingParams took no n (TypeError: unexpected keyword argument 'n'): a vLLM user's n samples of a prompt took
    a prompt repeated n times and a seed per copy. Sample i is seeded seed + i, as the server seeds its choices."""
    engine, prompt_list = Engine(model, tokenizer), prompts([5, 9])
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, n=3, ignore_eos=True, logprobs=True)
    completions = engine.generate(prompt_list, params)
    for completion, prompt in zip(completions, prompt_list, strict=True):
        alone = [engine.generate([prompt], dataclasses.replace(params, n=1, seed=7 + i))[0] for i in range(3)]
        assert [output.token_ids for output in completion.outputs] == [sample.token_ids for sample in alone]
        assert [output.index for output in completion.outputs] == [0, 1, 2]
        assert completion.prompt_token_ids == prompt and all(output.logprobs for output in completion.outputs)
        assert [other.prompt_token_ids for other in completion.others] == [prompt, prompt]
    assert engine.generate(prompt_list[0], dataclasses.replace(params, n=1))[0].outputs[0].index == 0
    with pytest.raises(
        ConfigError,
        match=r"^field 'n' has value 3: must be 1, as add_request and stream run one sample; generate runs n$",
    ):
        engine.add_request(prompt_list[0], params)


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_allowed_token_ids_are_the_only_ones_sampled_greedy_or_sampled(model, tokenizer, speculative):
    """vLLM's allowed_token_ids was missing (TypeError: unexpected keyword argument); a logit_bias of -100 on every
    other id would still let them through where the allowed ones' logits are far lower."""
    engine, allowed = Engine(model, tokenizer, speculative=speculative), (7, 100, 300)
    for temperature in (0, 1.0):
        params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=3, allowed_token_ids=allowed)
        [completion] = engine.generate(prompts([6]), params)
        assert completion.token_ids and set(completion.token_ids) <= set(allowed), completion.token_ids
    with pytest.raises(ValueError, match=r"^allowed_token_ids holds token id 512, outside the vocabulary"):
        engine.generate(prompts([6]), SamplingParams(allowed_token_ids=(5, VOCAB)))
    with pytest.raises(ConfigError, match=r"^field 'allowed_token_ids' must be at least one id, or None for any"):
        engine.generate(prompts([6]), SamplingParams(allowed_token_ids=()))


def test_bad_words_are_never_sampled_as_vllms_and_speculative_drafts_of_them_are_rejected(model, tokenizer):
    """vLLM's bad_words was missing (TypeError: unexpected keyword argument): a word's last token is banned after its
    others (a one-token word always), and greedy decoding then takes the next likeliest token there. Speculative
    drafts are overwritten with those tokens but for the banned one at its place: that draft alone is rejected."""
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    plain = Engine(model, tokenizer).generate([[5, 9, 14]], greedy)[0].token_ids
    assert plain[1:6] == [430, 144, 19, 229, 97] and tokenizer.encode("\x1bt") == [229, 97]  # "\x1b" "t"
    assert tokenizer.encode("context") == [430] and tokenizer.encode(" context") != [430]
    for word, kept, sequence in (("\x1bt", 5, [229, 97]), ("  context", 1, [430])):  # leading spaces dropped
        params = dataclasses.replace(greedy, bad_words=[word])
        [banned] = Engine(model, tokenizer).generate([[5, 9, 14]], params)
        assert banned.token_ids[:kept] == plain[:kept] and banned.token_ids[kept] != plain[kept]
        assert not any(banned.token_ids[i : i + len(sequence)] == sequence for i in range(12))
        # 2 drafts a step: the second step drafts 229 then 97, which its second column bans after the first
        engine = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=False)
        engine.add_request([5, 9, 14], params)
        tokens: list[int] = []
        while engine.has_unfinished():
            tokens += [token for output in engine.step() for token in output.token_ids]
            for running in engine.running:  # the tokens after the pending one, the banned one drafted at its place
                generated = len(running.ids) - len(running.prompt_ids)
                drafted = [*banned.token_ids[:kept], plain[kept], *banned.token_ids[kept + 1 :], 0, 0]
                running.drafts = drafted[generated : generated + 2]
        assert tokens == banned.token_ids and engine.stats().spec_accepted > 0
    with pytest.raises(ConfigError, match=r"^field 'bad_words' must be words holding more than spaces"):
        SamplingParams(bad_words=[" "]).validate()
    assert SamplingParams(bad_words=None).bad_words == ()  # vLLM's default
    assert BadWords.encoded(["context"], tokenizer.encode).words == [[430], [357]]  # " context" is a token of its own
    assert BadWords.encoded(["\x1bt"], tokenizer.encode).words == [[229, 97]]  # " \x1bt": 234 229 97
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError) as refused:
        engine.add_request(
            [5, 9, 14], SamplingParams(bad_words=["context"]), constraint=JsonFormat(tokenizer).constraint()
        )
    assert str(refused.value) == "bad_words with a constraint (JSON mode): give one rule on what the request samples"
    assert engine.stats().waiting == 0


def test_sampling_params_take_at_most_max_bad_words_as_the_server_does():
    """The server takes at most MAX_BAD_WORDS = 300 bad_words (each is matched in Python at every step the request
    shares with others), but the library's SamplingParams took any number: 100,000 words slowed every step of every
    request in the engine. The same bound now holds on the constructor, from_dict and validate()."""
    words = [f"w{i}" for i in range(MAX_BAD_WORDS + 1)]
    assert len(SamplingParams(bad_words=words[:-1]).bad_words) == MAX_BAD_WORDS == 300
    too_many = r"^field 'bad_words' has value .*: tuple should have at most 300 items after validation, not 301$"
    for build in (SamplingParams, SamplingParams.from_dict):
        with pytest.raises(ConfigError, match=too_many):
            build(bad_words=words) if build is SamplingParams else build({"bad_words": words})
    grown = SamplingParams()
    grown.bad_words = tuple(words)
    with pytest.raises(ConfigError, match=too_many):
        grown.validate()


def test_fewer_max_loras_than_adapters_given_are_refused_naming_both_before_anything_is_read(
    model, tokenizer, tmp_path
):
    """Engine.from_pretrained(adapters={a, b, c}, max_loras=2) read the weights and then refused adapter c as a load at
    run time: "all max_loras=2 adapter slots are taken (loaded: a, b); unload one first" (only `serve` checked it
    first). Refused now before the folder (here empty) or any adapter is read, from_pretrained and Engine alike."""
    adapters = {name: tmp_path / name for name in "abc"}
    refusal = (
        "field 'max_loras' has value 2: must be at least the 3 adapters given (a, b, c), each loaded from the start: "
        "give max_loras=3 or more, or fewer adapters"
    )
    for build in (lambda: Engine.from_pretrained(tmp_path, adapters=adapters, max_loras=2),
                  lambda: Engine(model, tokenizer, adapters=adapters, max_loras=2)):  # fmt: skip
        with pytest.raises(ConfigError) as refused:
            build()
        assert (refused.value.field, str(refused.value)) == ("max_loras", refusal)
    named = {f"adapter_{i}": tmp_path / "a" for i in range(1000)}  # 12,888 characters of names: cut
    listed = ", ".join(named)[:80] + "... (12,888 characters)"
    with pytest.raises(ConfigError, match=re.escape(f"the 1000 adapters given ({listed}), each loaded from the start")):
        Engine.from_pretrained(tmp_path / "not-read", adapters=named, max_loras=2)
    # adapters as a list or a folder alone were "'list' object has no attribute 'items'", and max_lora_rank='8' a bare
    # TypeError, once every weight had loaded
    many = [f"runs/adapter_{i}" for i in range(1000)]  # shown by its start
    for given, error, told in (
        ({"adapters": [tmp_path / "a"]}, TypeError, "must map names to adapter folders, as vLLM's --lora-modules"),
        ({"adapters": many}, TypeError, f"adapters={repr(many)[:80]}... (1,000 items) must map names to adapter"),
        ({"adapters": str(tmp_path / "a")}, TypeError, "must map names to adapter folders"),
        ({"adapters": {"a": None}}, TypeError, "must map names to adapter folders"),
        ({"max_lora_rank": "8"}, ValueError, "max_lora_rank='8' must be a whole number >= 1"),
        ({"max_loras": True}, ValueError, "max_loras=True must be a whole number >= 1"),
    ):
        with pytest.raises(error, match=re.escape(told)):
            Engine.from_pretrained(tmp_path / "not-read", **given)
        with pytest.raises(error, match=re.escape(told)):
            Engine(model, tokenizer, **given)


def test_allowed_token_ids_that_min_tokens_all_ban_are_refused_at_add_request_naming_both_fields(model, tokenizer):
    """min_tokens bans EOS (with ignore_eos too, as vLLM's) and stop_token_ids until that many tokens are out:
    SamplingParams(allowed_token_ids=[eos], min_tokens=3) ended the request with finish_reason "error" and "the logits
    hold an infinity or NaN ... a float16 model's overflow", blaming neither field (only the server refused it)."""
    engine, eos = Engine(model, tokenizer), tokenizer.eos_id
    for allowed, extra in (([eos], {"min_tokens": 3}), ([eos], {"min_tokens": 3, "ignore_eos": True}),
                           ([eos, 229], {"min_tokens": 1, "stop_token_ids": [229]})):  # fmt: skip
        with pytest.raises(ConfigError) as refused:
            engine.add_request([5, 9, 14], SamplingParams(allowed_token_ids=allowed, **extra))
        assert refused.value.field == "allowed_token_ids"
        assert str(refused.value) == (
            f"field 'allowed_token_ids' {allowed} are each an end-of-sequence or stop_token_ids id, which min_tokens="
            f"{extra['min_tokens']} bans until that many tokens are out: no token could be sampled; allow another id "
            "or send min_tokens 0"
        )
    assert engine.stats().waiting == 0
    three = dataclasses.replace(GREEDY, max_new_tokens=3, ignore_eos=False)
    [kept] = engine.generate([[5, 9, 14]], dataclasses.replace(three, allowed_token_ids=[eos, 229], min_tokens=3))
    assert kept.token_ids == [229, 229, 229]
    [ended] = engine.generate([[5, 9, 14]], dataclasses.replace(three, allowed_token_ids=[eos]))  # no min_tokens
    assert (ended.finish_reason, ended.token_ids) == ("stop", [eos])


def test_allowed_token_ids_apply_beside_a_json_constraint_refused_only_where_it_allows_none_first(model, tokenizer):
    """Both masks apply, as vLLM's: ids the grammar may begin with are sampled under it ("{" "}" make "{}", which ends
    the request), ids it forbids as the first token are refused at add_request naming allowed_token_ids, and ids it
    forbids only later ("{" then "a") end the request there with finish_reason "error", a ConfigError naming
    allowed_token_ids, the constraint and the token (it was the logits' generic "no distribution" ValueError)."""
    engine, greedy = Engine(model, tokenizer), SamplingParams(max_new_tokens=6, temperature=0)

    def run(allowed: list[int]) -> tuple[list[int], list[tuple[str | None, str | None]]]:
        engine.add_request(
            [5, 9, 14],
            dataclasses.replace(greedy, allowed_token_ids=allowed),
            constraint=JsonFormat(tokenizer).constraint(),
        )
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        return [token for output in outputs for token in output.token_ids], [
            (output.finish_reason, output.error) for output in outputs if output.finished
        ]

    [open_brace], [close_brace], [letter] = (tokenizer.encode(text) for text in "{}a")
    assert run([open_brace, close_brace]) == ([open_brace, close_brace], [("stop", None)])
    tokens, [(reason, error)] = run([open_brace, letter])
    assert (tokens, reason) == ([open_brace], "error")
    assert error == (
        f"ConfigError: token 2 of the reply: field 'allowed_token_ids' [{open_brace}, {letter}] are each forbidden "
        "here by the constraint (JSON mode: response_format's grammar, forced tool calls), after the tokens before it: "
        "no token could be sampled; allow an id it permits there"
    )
    with pytest.raises(ConfigError) as refused:
        run([letter])
    assert (refused.value.field, str(refused.value)) == ("allowed_token_ids", (
        f"field 'allowed_token_ids' [{letter}] are each a token the constraint (JSON mode: response_format's grammar, "
        "forced tool calls) forbids as the reply's first: no token could be sampled; allow one the grammar may begin "
        "with"
    ))  # fmt: skip
    assert engine.stats().waiting == 0


def test_allowed_token_ids_that_bad_words_all_ban_are_refused_naming_both_fields(model, tokenizer):
    """allowed_token_ids=[430] with bad_words=["context"] (430 alone) ended the request with "the logits hold an
    infinity or NaN ... a float16 model's overflow ... or a repetition_penalty", blaming neither field. Ids that are
    all one-token words are refused at add_request, a ConfigError of field allowed_token_ids as its siblings' (it was
    a bare ValueError); ids banned only after some tokens fail the request then with a ConfigError naming both fields
    and the token (it was the logits' generic "no distribution" ValueError)."""
    engine = Engine(model, tokenizer)
    with pytest.raises(ConfigError) as refused:  # " context" is 357: the word after a space
        engine.add_request([5, 9, 14], SamplingParams(allowed_token_ids=[430, 357], bad_words=["context"]))
    assert (refused.value.field, str(refused.value)) == ("allowed_token_ids", (
        "field 'allowed_token_ids' [430, 357] are each a one-token word of bad_words (as encoded alone or after a "
        "space), never sampled: no token could be; allow another id or drop the word"
    ))  # fmt: skip
    assert engine.stats().waiting == 0
    three = dataclasses.replace(GREEDY, max_new_tokens=3)
    [kept] = engine.generate(
        [[5, 9, 14]], dataclasses.replace(three, allowed_token_ids=[430, 229], bad_words=["context"])
    )
    assert kept.token_ids == [229, 229, 229]
    [failed] = engine.generate(
        [[5, 9, 14]], dataclasses.replace(three, allowed_token_ids=[229], bad_words=["\x1b\x1b"])
    )
    assert (failed.finish_reason, failed.token_ids) == ("error", [229])  # 229 then banned after 229
    assert failed.error == (
        "ConfigError: token 2 of the reply: field 'allowed_token_ids' [229] are each forbidden here by bad_words, "
        "after the tokens before it: no token could be sampled; allow an id it permits there"
    )


@pytest.mark.parametrize("max_new_tokens", [2, 3])
def test_a_speculative_step_ends_or_refuses_a_request_where_plain_decoding_does_before_a_column_it_allows_none(
    model, tokenizer, max_new_tokens
):
    """allowed_token_ids=[229] under bad_words=["\x1b\x1b\x1b"] allows 229 twice, then none. Drafts [229, 229] after
    the first 229 reach that third column: with max_new_tokens=2 the step was refused (finish_reason "error" after
    one token) where plain decoding ends with [229, 229] by length, and with 3 the error named token 2 and dropped
    the second 229. The tokens before the column are kept, and the request ends or is refused as plain decoding.
    The draft kept before the column counts as accepted (it was counted as rejected: accept rate 0 of 2), and the
    step that refuses the request checks none."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0, allowed_token_ids=[229], bad_words=["\x1b\x1b\x1b"]
    )
    [plain] = Engine(model, tokenizer).generate([[5, 9, 14]], params)
    engine = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=False)
    engine.add_request([5, 9, 14], params)
    outputs = []
    while engine.has_unfinished():
        for running in engine.running:
            running.drafts = [229, 229]
        outputs += engine.step()
    assert plain.token_ids == [229, 229] and (plain.finish_reason == "length") == (max_new_tokens == 2)
    tokens = [token for output in outputs for token in output.token_ids]
    assert (tokens, outputs[-1].finish_reason, outputs[-1].error) == (plain.token_ids, plain.finish_reason, plain.error)
    stats = engine.stats()
    assert (stats.spec_drafted, stats.spec_accepted) == (2 * (max_new_tokens - 1), 1)
    assert (engine.draft_count.passed, engine.draft_count.checked) == ([1, 0], [1, 0])


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_vllm(model, tokenizer):
    """vLLM's truncate_prompt_tokens was missing (TypeError: unexpected keyword argument): a prompt longer than the
    context was refused instead of continued from its last k tokens."""
    engine = Engine(model, tokenizer, max_model_len=40)
    [prompt] = prompts([60])
    [kept] = engine.generate(prompt, dataclasses.replace(GREEDY, truncate_prompt_tokens=20))
    assert kept.prompt_token_ids == prompt[-20:]
    assert kept.token_ids == engine.generate(prompt[-20:], GREEDY)[0].token_ids
    [whole] = engine.generate(prompt[-30:], dataclasses.replace(GREEDY, truncate_prompt_tokens=-1, max_new_tokens=4))
    assert whole.prompt_token_ids == prompt[-30:]  # -1: up to max_model_len, a shorter prompt whole
    with pytest.raises(ConfigError, match=r"^field 'truncate_prompt_tokens' must be at least 1"):
        engine.generate(prompt, dataclasses.replace(GREEDY, truncate_prompt_tokens=0))


@pytest.mark.parametrize(
    ("truncate", "kept", "part"), [(-1, 40, "all of"), (50, 50, "more than"), (70, 60, "more than")]
)
@pytest.mark.parametrize("max_new_tokens", [4, None])
def test_a_truncation_leaving_no_room_for_a_reply_says_which_to_give(
    model, tokenizer, truncate, kept, part, max_new_tokens
):
    """truncate_prompt_tokens=-1 keeps max_model_len tokens of a longer prompt, leaving none for the reply (vLLM refuses
    such a prompt too); it was refused "prompt has 40 tokens, all of max_model_len: no room for a new token" (or "...
    shorten the prompt" with max_new_tokens None), naming neither the truncation nor the value that fits."""
    engine = Engine(model, tokenizer, max_model_len=40)
    [prompt] = prompts([60])
    params = dataclasses.replace(GREEDY, truncate_prompt_tokens=truncate, max_new_tokens=max_new_tokens)
    with pytest.raises(ValueError) as refused:
        engine.generate(prompt, params)
    assert str(refused.value) == (
        f"prompt has 60 tokens; truncate_prompt_tokens={truncate} keeps its last {kept}, {part} max_model_len=40: no "
        "room for a new token; give truncate_prompt_tokens=39 (max_model_len - 1) or fewer, to leave room for the reply"
    )
    [reply] = engine.generate(prompt, dataclasses.replace(params, truncate_prompt_tokens=39))
    assert reply.prompt_token_ids == prompt[-39:] and len(reply.token_ids) == 1


def test_chat_replies_to_one_conversation_or_each_of_a_list_ending_at_the_turns_end_as_vllm(model, tokenizer):
    """Engine had no chat (vLLM's LLM.chat; AttributeError): a conversation took encode_chat and stop ids by hand."""
    engine = Engine(model, tokenizer)
    first = [{"role": "user", "content": "def f"}]
    second = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    [alone] = engine.chat(first, params)
    both = engine.chat([first, second], params)
    assert alone.prompt_token_ids == both[0].prompt_token_ids == tokenizer.encode_chat(first)
    assert both[0].token_ids == alone.token_ids and both[1].prompt_token_ids == tokenizer.encode_chat(second)
    turn_end = max(tokenizer.special_ids - {tokenizer.eos_id})  # a special token: the template's, never the reply's
    forced = dataclasses.replace(params, logit_bias={turn_end: 100.0})
    [ended] = engine.chat(second, forced)
    assert ended.token_ids == [turn_end] and ended.finish_reason == "stop"
    assert len(engine.generate(tokenizer.encode_chat(second), forced)[0].token_ids) == 8  # generate goes on


def test_chat_with_ignore_eos_goes_past_the_turns_end_as_vllms_and_generate_ignore_eos(model, tokenizer):
    """chat(messages, SamplingParams(ignore_eos=True)) stopped at the EOS all the same (finish_reason "stop" after one
    token, EOS forced): chat added each special token as a stop id whatever ignore_eos said, where vLLM's chat, and
    `seekstack generate --chat --ignore-eos`, go on past the turn's end, as generate does."""
    engine, conversation = Engine(model, tokenizer), [{"role": "user", "content": "你好"}]
    for turn_end in (tokenizer.eos_id, max(tokenizer.special_ids - {tokenizer.eos_id})):
        forced = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True, logit_bias={turn_end: 100.0})
        [reply] = engine.chat(conversation, forced)
        assert (reply.token_ids, reply.finish_reason) == ([turn_end] * 4, "length")
        [ended] = engine.chat(conversation, dataclasses.replace(forced, ignore_eos=False))
        assert (ended.token_ids, ended.finish_reason) == ([turn_end], "stop")


def test_chat_offers_tools_in_the_prompt_and_parses_the_replys_calls_as_the_server(tokenizer, monkeypatch):
    """Engine.chat took no tools (vLLM's LLM.chat does: TypeError), and a reply ended at <｜tool▁calls▁begin｜>, a
    special token: no call could be made. The tools are listed in the prompt, the calls written on and parsed out."""
    engine = Engine(micro_model(max_position_embeddings=1024), tokenizer, max_model_len=1024)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    begin = tokenizer.backend.token_to_id(TOOL_CALLS_BEGIN)
    opening = SamplingParams(max_new_tokens=3, temperature=0, logit_bias={begin: 100.0})
    [opened] = engine.chat(conversation, opening, tools=tools)
    assert opened.prompt_token_ids == tokenizer.encode_chat(conversation, tools=tools)
    assert opened.token_ids == [begin] * 3 and opened.finish_reason == "length"
    call = f'{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "Paris"}}\n```{TOOL_CALL_END}'
    written = f"Let me look.{TOOL_CALLS_BEGIN}{call}{TOOL_CALLS_END}"
    generated = []

    def writing_the_call(prompts, params, use_tqdm=False, lora_request=None):
        generated.extend(params)
        return [Completion("0", prompts[0], [], written, "stop", None, {})]

    monkeypatch.setattr(engine, "generate", writing_the_call)
    [reply] = engine.chat(conversation, SamplingParams(max_new_tokens=64), tools=tools)
    assert not generated[0].skip_special_tokens  # the markers reach the parser
    assert reply.text == "Let me look." and reply.finish_reason == "tool_calls"
    assert [(c["type"], c["function"]) for c in reply.tool_calls] == [
        ("function", {"name": "get_weather", "arguments": '{"city": "Paris"}'})
    ]
    assert re.fullmatch(r"call_\w{24}", reply.tool_calls[0]["id"])
    with pytest.raises(ValueError, match=r"^field tools.0.function.name string should match pattern"):
        engine.chat(conversation, opening, tools=[{"type": "function", "function": {"name": "get weather"}}])


def test_chat_given_a_text_or_one_tool_for_tools_says_they_are_a_list(model, tokenizer):
    """chat(messages, tools="x") reported "field tools.0 ... got 'x'" (the text read as a list of its characters), and
    one tool without its list "field tools.0 ... got 'type'" (its keys read as tools)."""
    engine, conversation = Engine(model, tokenizer), [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "get_weather"}}
    for tools, shown in (("x", "'x'"), (tool, repr(str(tool)))):
        with pytest.raises(ValueError) as refused:
            engine.chat(conversation, GREEDY, tools=tools)
        assert str(refused.value).startswith(f"field tools input should be a valid list, got {shown}: tools are ")
    [reply] = engine.chat(conversation, GREEDY, tools=(tool,))  # a tuple of tools is a list
    assert reply.prompt_token_ids == tokenizer.encode_chat(conversation, tools=[tool])


def test_include_stop_str_in_output_keeps_the_text_of_the_stop_token_as_vllm(model, tokenizer):
    """vLLM detokenizes the token that stopped a request when include_stop_str_in_output is set (its detokenizer skips
    it only without); the text left a stop_token_ids token out either way."""
    engine = Engine(model, tokenizer)
    [prompt] = prompts([7])
    ids = engine.generate(prompt, GREEDY)[0].token_ids
    at = next(
        i for i, t in enumerate(ids) if i > 0 and t not in ids[:i] and "\ufffd" not in tokenizer.decode(ids[: i + 1])
    )
    for include in (False, True):
        params = dataclasses.replace(GREEDY, stop_token_ids=(ids[at],), include_stop_str_in_output=include)
        [stopped] = engine.generate(prompt, params)
        assert stopped.token_ids == ids[: at + 1] and stopped.finish_reason == "stop"
        assert stopped.text == tokenizer.decode(ids[: at + include]), include


def test_use_tqdm_shows_a_bar_of_the_finished_requests_as_vllm(model, tokenizer, capsys):
    """vLLM scripts pass use_tqdm (use_tqdm=False most of all): generate and chat refused it (TypeError)."""
    engine = Engine(model, tokenizer)
    quiet = engine.generate(prompts([4, 5]), GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""
    shown = engine.generate(prompts([4, 5]), GREEDY, use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err
    assert [completion.token_ids for completion in shown] == [completion.token_ids for completion in quiet]
    engine.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_vllms_logprobs_count_lists_that_many_top_log_probabilities(model, tokenizer):
    """vLLM's logprobs=k (its int form) was refused ("field 'logprobs' has value 5: input should be a valid boolean");
    it reads as logprobs=True, top_logprobs=k, and a count out of range or beside top_logprobs is refused naming it."""
    counted = dataclasses.replace(GREEDY, logprobs=3)
    assert (counted.logprobs, counted.top_logprobs) == (True, 3)
    [completion] = Engine(model, tokenizer).generate(prompts([5]), counted)
    assert all(len(entry.top) == 3 for entry in completion.logprobs)
    with pytest.raises(ConfigError, match=r"^field 'logprobs' must be True, False or, as vLLM's, how many top"):
        SamplingParams(logprobs=21)
    with pytest.raises(ConfigError, match=r"^field 'top_logprobs' must be left out with vLLM's logprobs=3"):
        SamplingParams(logprobs=3, top_logprobs=2)


PENALTIES = [
    {},
    {"frequency_penalty": -0.5, "repetition_penalty": 1.2},
    {"logit_bias": dict.fromkeys(range(0, VOCAB, 2), -100)},
]
PENALTY_NAMES = ["plain", "penalized", "biased"]  # the last bans every even token
DRAFT_CASES = [(1, 1), (3, 3), (3, 2), (3, 0)]  # drafts, correct ones


def test_speculative_decoding_without_an_mtp_module_is_refused_saying_why(tokenizer):
    with pytest.raises(ValueError, match="needs an MTP module.*without MTP weights, as transformers' save_pretrained"):
        Engine(micro_model(num_nextn_predict_layers=0), tokenizer, speculative=True)


@pytest.mark.parametrize("draft_tokens", [1, 3])
@pytest.mark.parametrize("penalties", PENALTIES, ids=PENALTY_NAMES)
def test_speculative_greedy_is_token_for_token_plain_greedy(model, tokenizer, penalties, draft_tokens):
    batch = prompts([5, 21, 12])
    params = SamplingParams(max_new_tokens=25, temperature=0, ignore_eos=True, **penalties)
    plain = Engine(model, tokenizer, prefill_chunk=8).generate(batch, params)
    fixed = {"speculative": True, "draft_tokens": draft_tokens, "adaptive_drafts": False}  # counts set, not timed
    engine = Engine(model, tokenizer, prefill_chunk=8, **fixed)
    speculative = engine.generate(batch, params)
    assert [c.token_ids for c in speculative] == [c.token_ids for c in plain]
    stats = engine.stats()
    assert stats.spec_drafted > 0 and 0 <= stats.spec_accepted <= stats.spec_drafted
    assert stats.spec_drafted % draft_tokens == 0
    # Prompts fed in one piece give the MTP layer the same cache, hence the same drafts and acceptances.
    whole = Engine(model, tokenizer, prefill_chunk=256, **fixed)
    whole.generate(batch, params)
    assert (whole.stats().spec_drafted, whole.stats().spec_accepted) == (stats.spec_drafted, stats.spec_accepted)


def test_the_engines_forwards_count_no_expert_load_that_the_models_own_forward_counts(model, tokenizer, monkeypatch):
    """Prefill, decode steps, verification and MTP drafts never read the MoE layers' tokens per expert (training,
    evaluation and rollouts do, through the model's own forward): the engine's forwards do not count them."""
    import seekstack.model.moe as moe_module

    counted, count = [], moe_module._expert_load
    monkeypatch.setattr(moe_module, "_expert_load", lambda *args: counted.append(1) or count(*args))
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    for options in ({}, {"speculative": True, "draft_tokens": 2, "adaptive_drafts": False}):
        engine = Engine(model, tokenizer, prefill_chunk=8, **options)
        assert all(len(c.token_ids) == 6 for c in engine.generate(prompts([5, 12]), params))
    assert counted == []
    with torch.no_grad():
        out = model(torch.tensor(prompts([5])))
    assert out.expert_load.shape == (len(counted), model.config.n_routed_experts) and len(counted) > 0


def assert_accepts_correct_drafts_and_gives_plain_greedy(engine: Engine, params: SamplingParams, correct: int) -> None:
    """The random MTP module's drafts are all rejected; here each step's drafts are overwritten with the tokens plain
    greedy decoding produces next, the first `correct` of them right and the rest wrong. Each step then accepts
    `correct` drafts and emits the token after them: a bonus or a replacement."""
    batch, draft_tokens = prompts([5, 21, 12]), engine.draft_tokens
    plain = [c.token_ids for c in Engine(engine.model, engine.tokenizer).generate(batch, params)]
    request_ids = [engine.add_request(prompt, params) for prompt in batch]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
        for request in engine.running:  # the drafts guess the tokens after the pending one
            generated = len(request.ids) - len(request.prompt_ids)
            upcoming = plain[request_ids.index(request.request_id)] + [0] * draft_tokens
            right = upcoming[generated : generated + draft_tokens]
            request.drafts = right[:correct] + [(token + 1) % 512 for token in right[correct:]]
    assert [tokens[request_id] for request_id in request_ids] == plain
    stats = engine.stats()
    decode_steps = math.ceil(24 / (correct + 1))  # after the token of the prefill step
    assert stats.spec_drafted == 3 * decode_steps * draft_tokens
    assert stats.spec_accepted == 3 * (24 - decode_steps)  # each step: the accepted drafts and one more token


@pytest.mark.parametrize(
    "penalties, draft_tokens, correct",
    [(penalties, *case) for penalties in PENALTIES for case in DRAFT_CASES],
    ids=lambda value: PENALTY_NAMES[PENALTIES.index(value)] if value in PENALTIES else None,
)
def test_accepted_drafts_and_the_token_after_them_are_plain_greedy(model, tokenizer, penalties, draft_tokens, correct):
    """Eager steps (compiled ones, the fused greedy step, in test_compiled_decoding_gives_the_eager_tokens)."""
    params = SamplingParams(max_new_tokens=25, temperature=0, ignore_eos=True, **penalties)
    engine = Engine(
        model, tokenizer, prefill_chunk=8, speculative=True, draft_tokens=draft_tokens, adaptive_drafts=False,
        draft_vocab=VOCAB // 2,
    )  # fmt: skip
    assert_accepts_correct_drafts_and_gives_plain_greedy(engine, params, correct)


@pytest.mark.parametrize("prompt_len", [1, 9, 14])
def test_speculative_decoding_on_a_cache_the_context_fills_replies_as_long_as_plain_decoding(
    model, tokenizer, prompt_len
):
    """On a cache of 5 blocks of 4 tokens plain decoding's context is 16 tokens; with speculative decoding (3 drafts)
    it was 11, the slots drafts take past the last token held back: max_tokens=None replies came 5 tokens shorter
    (a 12-token prompt refused). Near the cache's end a step drafts fewer; drafts all right, the reply is plain's."""
    cache, prompt = {"num_blocks": 5, "block_size": 4}, list(range(10, 10 + prompt_len))
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)  # vLLM's: to the context's end
    [reply] = Engine(model, tokenizer, **cache).generate(prompt, params)
    engine = Engine(model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=False, **cache)
    engine.add_request(prompt, params)
    tokens = []
    while engine.has_unfinished():
        for request in engine.running:  # the drafts guess the tokens plain decoding gives next
            generated = len(request.ids) - prompt_len
            request.drafts = (reply.token_ids[generated:] + [0] * 3)[:3]
        tokens += [token for output in engine.step() for token in output.token_ids]
    assert engine.context_len == 16 and tokens == reply.token_ids and len(tokens) == 16 - prompt_len
    assert engine.stats().spec_accepted == engine.stats().spec_drafted > 0  # none drafted past the cache's end


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_sampling_is_seeded_and_keeps_lengths_and_logprobs(model, tokenizer, draft_tokens):
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=40, seed=5, ignore_eos=True, logprobs=True)
    batch = prompts([7, 12])
    first, second = (
        Engine(model, tokenizer, speculative=True, draft_tokens=draft_tokens).generate(batch, params) for _ in range(2)
    )
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [(len(c.token_ids), len(c.logprobs)) for c in first] == [(20, 20), (20, 20)]
    assert all(entry.token_id == token for c in first for entry, token in zip(c.logprobs, c.token_ids, strict=True))


def run_joining(engine: Engine, batch: list[list[int]], params: list[SamplingParams], join_at: int) -> list[list[int]]:
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


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
def test_compiled_decoding_gives_the_eager_tokens(model, tokenizer):
    """Compiled speculative decode steps (the batch and the cache mask change shape as requests join) give the eager
    tokens; drafts score a draft vocabulary (FR-Spec) of half the tokens. Its two graphs (a lone row, then 2 or more)
    serve every compiled speculative check, so they are compiled once whichever xdist worker runs it; plain compiled
    steps are checked as requests join in the test below, on its model's graphs."""
    batch = prompts([6, 19, 11])
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (24, 9, 14)]
    options = {"prefill_chunk": 8, "speculative": True, "draft_tokens": 3, "adaptive_drafts": False,
               "draft_vocab": VOCAB // 2}  # fmt: skip
    eager = Engine(model, tokenizer, **options)
    compiled = Engine(model, tokenizer, **options, compile=True)
    expected = run_joining(eager, batch, params, join_at=4)
    assert run_joining(compiled, batch, params, join_at=4) == expected
    assert [len(tokens) for tokens in expected] == [24, 9, 14]
    # the fused greedy step counts the same drafts and acceptances
    assert (compiled.stats().spec_drafted, compiled.stats().spec_accepted) == (
        eager.stats().spec_drafted,
        eager.stats().spec_accepted,
    )
    assert compiled.cache.usage == 0  # every finished request gave its blocks back
    # the fused greedy step accepts the drafts plain greedy agrees with, on the same two graphs (penalized rows leave
    # it: eager, in test_accepted_drafts_and_the_token_after_them_are_plain_greedy)
    greedy = SamplingParams(max_new_tokens=25, temperature=0, ignore_eos=True)
    overwritten, graphs = Engine(model, tokenizer, **options, compile=True), torch._dynamo.utils.counters["stats"]
    compiled_before = graphs["unique_graphs"]
    assert_accepts_correct_drafts_and_gives_plain_greedy(overwritten, greedy, correct=2)
    assert graphs["unique_graphs"] == compiled_before  # no third graph


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
def test_one_compiled_decode_graph_serves_every_batch_of_two_rows_or_more(tokenizer, monkeypatch):
    """A GRPO rollout's batch shrinks as rows finish, and its rows may or may not be of one length: the compiled
    decode step compiles one graph for every batch of 2 or more rows (a cache mask that comes and goes, or 16 rows
    equal to 16 key slots at the first trace, would each add one; a single row gets its own, dynamo's 0/1
    specialisation) and gives the eager tokens. It is traced once: the model's float settings are constants, not
    symbols that inductor would refuse and have the whole step traced and compiled again. Requests joining a lone
    one (the batch and the cache mask change shape, prompts prefilled in chunks) add that 1-row graph alone and
    decode the eager tokens. With compile=None, a request that started eagerly goes on through that graph once the
    engine switches (`COMPILE_AFTER_SECONDS`), and its tokens stay the eager ones."""
    import seekstack.infer.engine as engine_module

    unique_graphs, traced = torch._dynamo.utils.counters["stats"], torch._dynamo.utils.counters["aot_autograd"]
    before, traced_before = unique_graphs["unique_graphs"], traced["total"]
    own_shapes = micro_model(moe_intermediate_size=40)  # no graph another test compiled serves it (no reset)
    eager = Engine(own_shapes, tokenizer, max_batch_size=16)
    compiled = Engine(own_shapes, tokenizer, max_batch_size=16, compile=True)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    mixed_16, same_length_9, mixed_2 = prompts([3 + row % 13 for row in range(16)]), prompts([7] * 9), prompts([4, 9])
    for batch in (mixed_16, same_length_9, mixed_2):
        expected = [completion.token_ids for completion in eager.generate(batch, params)]
        assert [completion.token_ids for completion in compiled.generate(batch, params)] == expected
    assert unique_graphs["unique_graphs"] - before == 1 and traced["total"] - traced_before == 1
    assert compiled.compile_s > 0 and eager.compile_s == 0  # the engine counts the step that compiled
    joining = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (24, 9, 14)]
    batch = prompts([6, 19, 11])
    expected = run_joining(Engine(own_shapes, tokenizer, max_batch_size=16, prefill_chunk=8), batch, joining, 4)
    compiled = Engine(own_shapes, tokenizer, max_batch_size=16, prefill_chunk=8, compile=True)
    assert run_joining(compiled, batch, joining, join_at=4) == expected
    assert [len(tokens) for tokens in expected] == [24, 9, 14]
    assert unique_graphs["unique_graphs"] - before == 2  # the 1-row graph, the first request's steps alone
    assert compiled.cache.usage == 0  # every finished request gave its blocks back
    monkeypatch.setattr(engine_module, "COMPILE_AFTER_SECONDS", 0.0)  # the first eager decode step switches
    switching = Engine(own_shapes, tokenizer, max_batch_size=16, compile=None)
    [prompt] = prompts([6])
    [expected_tokens] = [completion.token_ids for completion in eager.generate([prompt], params)]
    switching.add_request(prompt, params)
    tokens: list[int] = []
    compiled_before_step: list[bool] = []
    while switching.has_unfinished():
        compiled_before_step.append(switching.decode_compiled)
        tokens += [token for output in switching.step() for token in output.token_ids]
    # prefill, one eager decode step that uses up the eager time, then the same request's last two steps compiled
    assert compiled_before_step == [False, False, True, True] and tokens == expected_tokens
    assert unique_graphs["unique_graphs"] - before == 2  # they ran on the 1-row graph compiled above


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
def test_compiled_steps_that_skip_the_guard_check_follow_the_kernel_switch_and_adapter_loads(
    tmp_path, tokenizer, monkeypatch
):
    """A compiled engine skips dynamo's guard check on a decode step shaped as a fully guarded one before it; its
    tokens stay the eager engine's, and a step after `cpu_kernels.set_enabled` or a LoRA load runs guarded (a graph
    of its own), as do steps off the main thread, but for serve's engine thread, the only one in a server's process
    that calls compiled code. Skipped on every step, the adapter's rows ran through the graph traced for base rows,
    and a step after the switch through the kernels' graph. The skipped guards are dynamo's whatever compiles the
    graph: its eager backend spares the test inductor's compile."""
    import asyncio

    import seekstack.infer.engine as engine_module
    from seekstack.model import cpu_kernels
    from seekstack.serve.bridge import AsyncEngine
    from seekstack.serve.metrics import ServerMetrics

    traced = lambda function: torch.compile(function, dynamic=True, backend="eager")  # noqa: E731
    monkeypatch.setattr(engine_module, "_compiled", traced)
    skips, set_stance = [], torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **kw: skips.append(kw) or set_stance(*a, **kw))
    seekstack.save_pretrained(micro_model(num_hidden_layers=1), tmp_path / "base")
    one_target = AdapterConfig(rank=2, attention=("o_proj",), feed_forward=(), experts=(), vocabulary=())
    adapter = write_random_adapter(tmp_path / "base", tmp_path / "adapter", seed=1, config=one_target)  # moves tokens
    eager, compiled = (
        Engine(micro_model(num_hidden_layers=1), tokenizer, max_batch_size=1, compile=flag) for flag in (False, True)
    )
    one, greedy = prompts([6]), SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)

    def same_tokens(**adapter_rows) -> int:
        """Asserts both engines' tokens agree; the compiled steps that skipped the guard check meanwhile."""
        expected = [completion.token_ids for completion in eager.generate(one, greedy, **adapter_rows)]
        skipped_before = len(skips)
        assert [completion.token_ids for completion in compiled.generate(one, greedy, **adapter_rows)] == expected
        return len(skips) - skipped_before

    assert same_tokens() == 3  # 4 decode steps, the first guarded
    on_a_thread: list[int] = []  # a GRPO rollout thread's steps, serve's: torch's stance would reach other threads
    thread = threading.Thread(target=lambda: on_a_thread.append(same_tokens()))
    thread.start(), thread.join()
    assert on_a_thread == [0]
    bridge, skipped_before = AsyncEngine(compiled, ServerMetrics("micro", 64)), len(skips)

    async def served() -> list[int]:
        return [token async for _, output in await bridge.submit(one, [greedy]) for token in output.token_ids]

    bridge.start()
    try:
        served_tokens = asyncio.run(served())
    finally:
        bridge.stop()
    [expected] = [completion.token_ids for completion in eager.generate(one, greedy)]
    assert served_tokens == expected and len(skips) - skipped_before == 4  # all 4 (shape guarded above); was 0
    assert compiled.guard_skip_thread is threading.main_thread()  # stepped from here again once the server stops
    monkeypatch.setitem(cpu_kernels._switch, "on", False)  # cpu_kernels.set_enabled(False), undone after the test
    assert same_tokens() == 3
    for engine in (eager, compiled):
        engine.load_adapter("random", adapter)
    assert same_tokens(adapters="random") == 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
def test_another_engines_compiled_steps_wait_while_one_thread_skips_the_guard_check(tokenizer, monkeypatch):
    """torch's skip_guard_eval_unsafe stance is process-wide: a compiled call another thread made during an engine's
    skipped step skipped its own guards too (a graph whose guards no longer hold, or a raise where it needs a compile),
    and two engines skipping on two threads (a served one beside one on the main thread) left the stance skipping for
    the whole process (/tmp/h32/LLG/two_engines.py). A second engine stepped on a thread meanwhile waits for the
    skipped step to end, and its tokens stay its own."""
    from torch._dynamo import eval_frame

    compile_, calls = torch.compile, []  # at each compiled call: its thread, whether the process skipped guards then
    another_call = threading.Event()

    def traced(function, **_):
        graph = compile_(function, dynamic=True, backend="eager")  # dynamo's guards, without inductor's compile

        def call(*args, **kwargs):
            calls.append((threading.current_thread(), eval_frame._stance.skip_guard_eval_unsafe))
            if threading.current_thread() is not threading.main_thread():
                another_call.set()
            return graph(*args, **kwargs)

        return call

    monkeypatch.setattr(torch, "compile", traced)
    model = micro_model(num_hidden_layers=1)  # one model: its graph traced once serves both engines
    skipping, other = (Engine(model, tokenizer, max_batch_size=1, compile=True) for _ in "ab")
    one, greedy = prompts([6]), SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    [expected] = [completion.token_ids for completion in skipping.generate(one, greedy)]  # its shape guarded
    assert [completion.token_ids for completion in other.generate(one, greedy)] == [expected]
    on_a_thread: list[list[int]] = []
    thread = threading.Thread(target=lambda: on_a_thread.extend(c.token_ids for c in other.generate(one, greedy)))
    set_stance = torch.compiler.set_stance

    @contextlib.contextmanager
    def skip_stepping_the_other_engine(*args, **kwargs):
        with set_stance(*args, **kwargs):
            if thread.ident is None:  # the first skipped step
                thread.start()
                another_call.wait(timeout=0.5)  # at once without the wait for the skip to end
            yield

    monkeypatch.setattr(torch.compiler, "set_stance", skip_stepping_the_other_engine)
    del calls[:]
    assert [completion.token_ids for completion in skipping.generate(one, greedy)] == [expected]
    thread.join()
    assert on_a_thread == [expected] and not eval_frame._stance.skip_guard_eval_unsafe
    assert [skipped for caller, skipped in calls if caller is thread] == [False, False]  # was [True, ...]
    assert [skipped for caller, skipped in calls if caller is not thread] == [True, True]  # both steps skipped


def test_default_compile_waits_until_eager_decoding_has_taken_as_long_as_a_compile(model, tokenizer, monkeypatch):
    """EngineOptions' default (compile=None) decodes eagerly first, so a short run never waits for a compile; once
    its eager decode steps add up to COMPILE_AFTER_SECONDS, it switches to compiled steps (run mid-request in
    test_one_compiled_decode_graph_serves_every_batch_of_two_rows_or_more, on that test's graphs)."""
    import seekstack.infer.engine as engine_module

    assert EngineOptions().engine_kwargs()["compile"] is None and not Engine(model, tokenizer).decode_compiled
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    monkeypatch.setattr(engine_module, "COMPILE_AFTER_SECONDS", 1e9)
    patient = Engine(model, tokenizer, compile=None)
    patient.generate(prompts([5]), params)
    assert not patient.decode_compiled
    monkeypatch.setattr(engine_module, "COMPILE_AFTER_SECONDS", 0.0)
    eager_decoding = Engine(model, tokenizer, compile=None)
    assert not eager_decoding.decode_compiled  # nothing decoded yet
    [completion] = eager_decoding.generate(prompts([5]), params)  # its one decode step used up the eager time
    assert eager_decoding.decode_compiled and len(completion.token_ids) == 2


def test_blocks_are_freed_when_requests_finish_or_are_aborted(model, tokenizer):
    engine = Engine(model, tokenizer, block_size=4)
    done = engine.add_request(prompts([10])[0], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    aborted = engine.add_request(prompts([10])[0], SamplingParams(max_new_tokens=50, temperature=0))
    engine.step()
    assert engine.stats().cache_usage > 0
    engine.step()
    engine.abort(aborted)
    assert aborted not in engine.cache.tables
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert engine.stats().cache_usage == 0 and engine.cache.tables == {}
    finals = {out.request_id: out.finish_reason for out in outputs if out.finished}
    assert finals == {aborted: "abort", done: "length"}


def test_a_generate_call_that_fails_mid_way_leaves_no_request_holding_blocks(model, tokenizer):
    engine = Engine(model, tokenizer)

    def failing_decode():
        raise RuntimeError("decode failed")

    engine._decode = failing_decode  # the first step prefills, the second fails
    with pytest.raises(RuntimeError, match="decode failed"):
        engine.generate(prompts([6, 9]), GREEDY)
    assert engine.cache.tables == {} and engine.cache.usage == 0
    assert [out.finish_reason for out in engine.step()] == ["abort", "abort"] and not engine.has_unfinished()


def test_a_request_failed_alone_after_some_tokens_keeps_one_logprob_per_kept_token(model, tokenizer):
    engine = Engine(model, tokenizer)
    fail_sampling_after(engine, 2)  # the request ends alone, finish_reason "error"
    (failed,) = engine.generate(prompts([6]), dataclasses.replace(GREEDY, logprobs=True))
    assert failed.finish_reason == "error" and len(failed.token_ids) == 2
    assert [entry.token_id for entry in failed.logprobs] == failed.token_ids


def test_every_completion_generate_returns_is_finished_as_vllms_request_output_says(model, tokenizer):
    """vLLM's RequestOutput.finished (a script checking `llm.generate(...)[0].finished`) raised AttributeError: a
    request that ran to its length and one that failed alone are both ended."""
    engine = Engine(model, tokenizer)
    fail_sampling_after(engine, 2)  # the first request's two tokens, then the failure
    (failed,) = engine.generate(prompts([6]), GREEDY)
    (done,) = Engine(model, tokenizer).generate(prompts([6]), GREEDY)
    assert (failed.finish_reason, done.finish_reason) == ("error", "length")
    assert failed.finished is True and done.finished is True


def test_each_sample_in_outputs_is_vllms_completion_output_whose_finished_is_a_method(model, tokenizer):
    """vLLM's CompletionOutput.finished() is a method where RequestOutput.finished is a bool: outputs held the
    completion itself, so `out.outputs[0].finished()` called a bool (TypeError)."""
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=5, n=2, ignore_eos=True, logprobs=True)
    [completion] = Engine(model, tokenizer).generate(prompts([6]), params)
    samples = (completion, *completion.others)
    assert [output.finished() for output in completion.outputs] == [True, True]
    assert [
        (output.index, output.text, output.token_ids, output.cumulative_logprob, output.finish_reason)
        for output in completion.outputs
    ] == [(s.index, s.text, s.token_ids, s.cumulative_logprob, s.finish_reason) for s in samples]
    assert [output.logprobs for output in completion.outputs] == [s.logprobs for s in samples]


def test_a_request_whose_logits_overflow_fails_alone_saying_why_instead_of_writing_the_last_id(model, tokenizer):
    """A repetition_penalty of 1e-40 sends the prompt's positive logits to +inf, as a float16 model's overflow sends
    its own: softmax then holds NaN, and every draw gave the vocabulary's last id (511 here, each step)."""
    target, other = prompts([8, 15])
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
    overflowing = dataclasses.replace(sampled, repetition_penalty=1e-40)
    failed, done = Engine(model, tokenizer).generate([target, other], [overflowing, sampled])
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert failed.timings["decode_tokens_per_s"] == 0.0  # was -1 token over the microseconds its end took: -4e5
    assert "ValueError: the logits hold an infinity or NaN" in failed.error and "repetition_penalty" in failed.error
    assert done.token_ids == Engine(model, tokenizer).generate([other], sampled)[0].token_ids


def test_greedy_rows_take_their_argmax_without_building_sampling_settings_until_one_moves_their_logits(
    model, tokenizer, monkeypatch
):
    """A batch whose rows' tokens are their logits' argmax as the model gave them takes it without a SamplingBatch
    (built each step, ~3% of a compiled `tiny` batch-1 step, 5% at 8 rows); rows short of min_tokens, penalized,
    biased or held to allowed_token_ids build one, and a bias of 0 gives the argmax's tokens through it."""
    engine, built = Engine(model, tokenizer), []
    sampling_batch = engine._sampling_batch
    monkeypatch.setattr(engine, "_sampling_batch", lambda batch: built.append(len(batch)) or sampling_batch(batch))
    rows = prompts([5, 7])
    argmax = [completion.token_ids for completion in engine.generate(rows, GREEDY)]
    assert built == []  # was one a step: 12 (the prefill's, 11 decode steps')
    moved = ({"min_tokens": 2}, {"repetition_penalty": 1.5}, {"allowed_token_ids": list(range(VOCAB))})
    for setting in ({"logit_bias": {7: 0.0}}, *moved):
        built.clear()
        tokens = [completion.token_ids for completion in engine.generate(rows, dataclasses.replace(GREEDY, **setting))]
        assert built == [2] * (2 if "min_tokens" in setting else 12)
        assert tokens == argmax or "repetition_penalty" in setting


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_a_greedy_request_whose_logits_turn_nan_fails_saying_why_instead_of_writing_token_0(
    model, tokenizer, speculative
):
    """torch's argmax takes a NaN for the largest logit, and a row of NaN gives id 0: a greedy request wrote token 0
    at every step, finish_reason "length", where a sampled one ended with "error" (plain and speculative steps)."""
    engine = Engine(model, tokenizer, speculative=speculative, adaptive_drafts=False)
    clean = engine.generate(prompts([9]), GREEDY)[0].token_ids
    calls = 0

    def nan_from_the_third_call(module, inputs, output):
        nonlocal calls
        calls += 1
        return output.fill_(float("nan")) if calls >= 3 else output

    hook = model.lm_head.register_forward_hook(nan_from_the_third_call)
    try:
        [failed] = engine.generate(prompts([9]), GREEDY)
    finally:
        hook.remove()
    assert failed.finish_reason == "error" and "the logits hold an infinity or NaN" in failed.error
    assert 0 < len(failed.token_ids) < len(clean) and failed.token_ids == clean[: len(failed.token_ids)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on the traced step
def test_a_compiled_greedy_step_takes_the_graphs_argmax_and_a_nan_row_still_fails_saying_why(tokenizer, monkeypatch):
    """A compiled plain step computes each row's argmax inside its graph (`decode_step`), so a greedy batch takes its
    tokens without the host's max over the logits (`greedy_tokens`, 129 us of a `small` 1-row step); the tokens stay
    the eager engine's, and a row whose logits turn NaN still ends with the error eager decoding gives it."""
    import seekstack.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "_compiled", lambda f: torch.compile(f, dynamic=True, backend="eager"))
    host_argmaxes = []
    greedy_tokens = engine_module.greedy_tokens
    monkeypatch.setattr(engine_module, "greedy_tokens", lambda logits: host_argmaxes.append(1) or greedy_tokens(logits))
    eager, compiled = (
        Engine(micro_model(num_hidden_layers=1), tokenizer, max_batch_size=1, compile=flag) for flag in (False, True)
    )
    expected = eager.generate(prompts([9]), GREEDY)[0].token_ids
    host_argmaxes.clear()
    assert compiled.generate(prompts([9]), GREEDY)[0].token_ids == expected
    assert host_argmaxes == [1]  # the prefill's token alone: its step runs eagerly
    compiled.add_request(prompts([9])[0], GREEDY)
    outputs = compiled.step() + compiled.step() + compiled.step()  # the prefill's token and two compiled steps'
    with torch.no_grad():
        compiled.model.lm_head.weight.fill_(math.nan)
    while compiled.has_unfinished():
        outputs += compiled.step()
    assert [token for output in outputs for token in output.token_ids] == expected[:3]
    assert outputs[-1].finish_reason == "error" and "the logits hold an infinity or NaN" in outputs[-1].error


def test_an_adapter_whose_hidden_values_square_past_float32_ends_its_row_with_an_error_and_the_others_go_on(
    tokenizer, tmp_path
):
    """lora_alpha 1e10 sends the adapter's hidden values past ~1e19, whose squares overflow float32: RMSNorm's mean
    square was inf and rsqrt(inf) = 0 gave an all-zero row, every logit 0, so greedy wrote token 0 and sampling drew
    uniformly, finish_reason "length". The norm's NaN ends that row with "error"; the base rows keep their tokens."""
    seekstack.save_pretrained(micro_model(num_hidden_layers=1), tmp_path / "base")
    config = AdapterConfig(rank=4, alpha=1e10)
    adapter = write_random_adapter(tmp_path / "base", tmp_path / "adapter", seed=1, config=config)
    engine = Engine(micro_model(num_hidden_layers=1), tokenizer)
    engine.load_adapter("overflowing", adapter)
    rows = prompts([6, 9])
    for params in (GREEDY, SamplingParams(max_new_tokens=12, seed=0, ignore_eos=True)):
        alone = [completion.token_ids for completion in engine.generate(rows, params)]
        failed, *plain = engine.generate([rows[0], *rows], params, adapters=["overflowing", None, None])
        assert (failed.finish_reason, failed.token_ids) == ("error", []) and "LoRA adapter's" in failed.error
        assert [completion.token_ids for completion in plain] == alone


def test_a_prompt_refused_leaves_none_of_the_earlier_prompts_queued(model, tokenizer):
    engine = Engine(model, tokenizer)
    too_long = prompts([engine.max_model_len + 1])[0]
    with pytest.raises(ValueError, match=r"^prompt 2 of 2: prompt has \d+ tokens, more than max_model_len"):
        engine.generate([prompts([6])[0], too_long], GREEDY)  # which one, of a batch of many
    assert not engine.waiting and engine.cache.tables == {}
    assert [out.finish_reason for out in engine.step()] == ["abort"] and not engine.has_unfinished()
    [completion] = engine.generate(prompts([5]), GREEDY)  # the next call steps for its own prompt only
    assert completion.finish_reason == "length"


@pytest.mark.parametrize("params", [{"max_new_tokens": 4}, [{"max_new_tokens": 4}]], ids=["dict", "list"])
def test_sampling_parameters_that_are_no_sampling_params_are_refused_naming_how_to_make_them(model, tokenizer, params):
    engine = Engine(model, tokenizer)
    refusal = r"params must be SamplingParams, got (dict|NoneType): .*SamplingParams.from_dict"
    with pytest.raises(TypeError, match=refusal):
        engine.generate(["def f"], params)
    assert not engine.has_unfinished()


def checkpoint(model, tokenizer, folder, **generation_config):
    """`model` saved in `folder` with `tokenizer`'s tokenizer.json and a generation_config.json of these values."""
    seekstack.save_pretrained(model, folder)
    shutil.copy(tokenizer.source, folder / "tokenizer.json")
    (folder / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    return folder


def test_no_params_sample_as_the_checkpoints_generation_config_says_as_vllms_defaults(model, tokenizer, tmp_path):
    """generate(prompts), chat(messages) and stream(prompt) without params raised TypeError ("params must be
    SamplingParams, got NoneType"), where vLLM's LLM.generate and LLM.chat take sampling_params=None as its
    get_default_sampling_params: the generation_config.json's values over SamplingParams' defaults (by that name:
    the engine called it default_sampling_params, an AttributeError for a vLLM script)."""
    engine = Engine.from_pretrained(checkpoint(model, tokenizer, tmp_path, eos_token_id=1, do_sample=False, top_p=0.9))
    messages = [{"role": "user", "content": "def f"}]
    [plain], [chatted] = engine.generate("def f"), engine.chat(messages)
    streamed = [token for output in engine.stream("def f") for token in output.token_ids]
    defaults = engine.get_default_sampling_params()
    assert defaults == SamplingParams(temperature=0.0, top_p=0.9)
    [given], [given_chat] = engine.generate("def f", defaults), engine.chat(messages, defaults)
    assert plain.token_ids == streamed == given.token_ids and chatted.token_ids == given_chat.token_ids
    assert Engine(model, tokenizer).get_default_sampling_params() == SamplingParams()


def test_generate_chat_and_stream_take_vllms_sampling_params_keyword(model, tokenizer):
    """vLLM scripts write llm.generate(prompts, sampling_params=params) and llm.chat(messages, sampling_params=...);
    here the keyword was a TypeError (unexpected keyword argument 'sampling_params'): the argument was named params."""
    engine = Engine(model, tokenizer)
    short = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    messages = [{"role": "user", "content": "def f"}]
    [generated], [positional] = engine.generate("def f", sampling_params=short), engine.generate("def f", short)
    streamed = [token for output in engine.stream("def f", sampling_params=short) for token in output.token_ids]
    assert generated.token_ids == streamed == positional.token_ids and len(generated.token_ids) == 2
    [chatted], [chatted_positional] = engine.chat(messages, sampling_params=short), engine.chat(messages, short)
    assert chatted.token_ids == chatted_positional.token_ids and chatted.prompt == chatted_positional.prompt


def test_no_params_generate_as_many_tokens_as_the_generation_config_says_as_vllms_max_tokens(
    model, tokenizer, tmp_path
):
    """generation_config.json's max_new_tokens was not read: generate(prompt) wrote SamplingParams' 128 tokens where
    vLLM's get_default_sampling_params takes it as max_tokens and transformers' generate stops there."""
    engine = Engine.from_pretrained(checkpoint(model, tokenizer, tmp_path, do_sample=False, max_new_tokens=3))
    assert engine.get_default_sampling_params() == SamplingParams(temperature=0.0, max_new_tokens=3)
    [plain] = engine.generate("def f", SamplingParams(temperature=0, ignore_eos=True))
    [defaulted] = engine.generate("def f")
    assert (defaulted.token_ids, defaulted.finish_reason) == (plain.token_ids[:3], "length")


def test_vllms_max_tokens_none_generates_until_the_context_is_full(model, tokenizer):
    """vLLM's SamplingParams(max_tokens=None) (and a sampling dict's "max_tokens": None) generates up to the room the
    prompt leaves in the context; here None was read as max_tokens left out: 128 tokens, silently."""
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode_prompt("def main():")
    room = engine.max_model_len - len(prompt)
    [full] = engine.generate(prompt, SamplingParams(max_new_tokens=room, temperature=0, ignore_eos=True))
    unlimited = [SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
                 SamplingParams.from_dict({"max_tokens": None, "temperature": 0, "ignore_eos": True})]  # fmt: skip
    for out in engine.generate([prompt, prompt], unlimited):
        assert (out.token_ids, out.finish_reason) == (full.token_ids, "length")
    assert len(full.token_ids) == room > SamplingParams().max_new_tokens
    with pytest.raises(ValueError, match="prompt is 256 tokens; the context of 256 leaves no room for a new token"):
        engine.generate([prompt[0]] * 256, SamplingParams(max_tokens=None))


def test_generation_config_eos_token_ids_end_generation_beside_the_tokenizers_as_transformers_and_vllm(
    model, tokenizer, tmp_path
):
    """A generation_config.json's eos_token_id (one id, or a list such as [1, 128009]) was not read: generation went
    on past its ids, where transformers' generate and vLLM stop at each of them as at the tokenizer's EOS."""
    [free] = Engine(model, tokenizer).generate("def f", GREEDY)
    end = free.token_ids[3]
    cut = free.token_ids[: free.token_ids.index(end) + 1]
    for eos in ([1, end], end):
        engine = Engine.from_pretrained(checkpoint(model, tokenizer, tmp_path / str(eos), eos_token_id=eos))
        [stopped] = engine.generate("def f", dataclasses.replace(GREEDY, ignore_eos=False))
        assert (stopped.token_ids, stopped.finish_reason) == (cut, "stop")
        assert engine.eos_ids == {tokenizer.eos_id, end}
        assert stopped.text == tokenizer.decode(cut[:-1])
        [ignoring] = engine.generate("def f", GREEDY)
        assert ignoring.token_ids == free.token_ids
    with pytest.raises(ConfigError, match=r"generation_config.json: field 'eos_token_id' has value \[1, '2'\]"):
        Engine.from_pretrained(checkpoint(model, tokenizer, tmp_path / "bad", eos_token_id=[1, "2"]))


def test_a_str_or_a_list_of_token_ids_is_one_prompt_as_in_vllm(model, tokenizer):
    """A generator of prompts (generate(p.strip() for p in lines)) raised a bare "object of type 'generator' has no
    len()": it is read as the list of its prompts."""
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode("def f")
    [alone] = engine.generate("def f", GREEDY)
    [listed] = engine.generate(["def f"], GREEDY)
    generated = engine.generate((prompt.strip() for prompt in [" def f", "def f "]), GREEDY)
    assert [c.token_ids for c in generated] == [alone.token_ids] * 2
    [as_ids] = engine.generate(ids, GREEDY)
    assert alone.prompt_token_ids == as_ids.prompt_token_ids == ids
    assert alone.token_ids == listed.token_ids == as_ids.token_ids


def test_a_prompt_of_float_ids_is_refused_naming_the_value_and_numpy_ids_come_back_as_ints(model, tokenizer):
    """int() read a prompt's 5.7 as token 5 and ran it (its completion's prompt_token_ids keeping 5.7); a flat list of
    floats was taken for a list of prompts ("'float' object is not iterable"); [True, 2] ran as [1, 2]."""
    engine = Engine(model, tokenizer)
    for prompt in ([[5.7, 6]], [5.0, 6]):
        with pytest.raises(TypeError, match=r"^prompt holds 5\.[07], which is no token id: give integers$"):
            engine.generate(prompt, GREEDY)
    for prompt in ([True, 2], torch.tensor([True, False])):
        with pytest.raises(TypeError, match=r"^prompt holds True, which is no token id: give integers$"):
            engine.generate(prompt, GREEDY)
    with pytest.raises(TypeError, match=r"^prompt holds True"):
        engine.add_request([2, True], GREEDY)
    with pytest.raises(TypeError, match=r"prompt holds tensor\(5\.5000\)"):
        engine.add_request(torch.tensor([5.5, 6.0]), GREEDY)
    [completion] = engine.generate(np.array([5, 6]), GREEDY)
    assert completion.prompt_token_ids == [5, 6] and type(completion.prompt_token_ids[0]) is int
    assert not engine.has_unfinished()


def test_bytes_or_none_as_a_prompt_is_refused_not_read_as_token_ids(model, tokenizer):
    """generate(b"def f") (a file read in binary mode) ran the bytes as token ids [100, 101, 102, 32, 102], silently,
    and so did add_request and stream; generate(None) (a prompt variable left unset) was a bare "object of type
    'NoneType' has no len()", add_request(None) "'NoneType' object is not iterable"."""
    engine = Engine(model, tokenizer)
    for prompt in (b"def f", [b"def f"], {"prompt_token_ids": b"def f"}):
        with pytest.raises(TypeError, match=r"^prompt b'def f' is no prompt: give a text \(decode bytes to text first"):
            engine.generate(prompt, GREEDY)
    with pytest.raises(TypeError, match=r"^prompt b'def f' is no prompt"):
        next(engine.stream(b"def f", GREEDY))
    with pytest.raises(
        TypeError, match=r"^prompt None is no prompt: give a text, token ids or vLLM's \{'prompt': text\}$"
    ):
        engine.generate(None, GREEDY)
    with pytest.raises(TypeError, match=r"^prompt_ids is a bytes; give token ids \(tokenizer.encode_prompt\(text\)\)"):
        engine.add_request(b"def f", GREEDY)
    for prompt, kind in ((None, "NoneType"), (5, "int")):
        with pytest.raises(TypeError, match=rf"^prompt_ids is a {kind}; give token ids \(tokenizer.encode_prompt"):
            engine.add_request(prompt, GREEDY)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_an_engine_runs_a_training_model_in_eval_mode_and_leaves_it_training(tokenizer, monkeypatch, speculative):
    model = micro_model(aux_loss_alpha=0.001).train()
    model.layers[0].eval()  # a module of the caller's in another mode keeps it too
    ids = torch.randint(0, VOCAB, (1, 8))
    expected_balance = model(ids, labels=ids).balance_loss
    assert expected_balance is not None

    def balance_loss_in_a_step(*args, **kwargs):
        raise AssertionError("an engine step computed a training-mode balance loss")

    with monkeypatch.context() as patched:
        patched.setattr("seekstack.model.moe.sequence_balance_loss", balance_loss_in_a_step)
        Engine(model, tokenizer, speculative=speculative).generate("def f", GREEDY)
    assert model.training and not model.layers[0].training and model.layers[1].training
    assert torch.equal(model(ids, labels=ids).balance_loss, expected_balance)


def test_an_engine_on_a_model_in_eval_mode_sets_no_modules_mode_in_its_steps(tmp_path, monkeypatch):
    """Each step set every module's mode twice (a quarter of a decode step at `tiny`), though from_pretrained's model
    is the engine's own and needs eval mode once."""
    engine = Engine.from_pretrained(model_dir(tmp_path / "model"))
    assert not engine.model.training

    def modes_set(*args, **kwargs):
        raise AssertionError("a step went through the model's modules")

    monkeypatch.setattr(torch.nn.Module, "modules", modes_set)
    [completion] = engine.generate("def f", GREEDY)
    assert len(completion.token_ids) == GREEDY.max_new_tokens


def test_an_engine_that_does_not_draft_leaves_the_mtp_module_unread_and_decodes_the_same(tmp_path):
    """DeepSeek-V3's MTP layer is ~11 GB of fp8 experts that only speculative decoding runs: an engine without it
    builds no MTP module (nor its cache layer) and reads none of its weights, without a word about unused keys."""
    directory = model_dir(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = Engine.from_pretrained(directory)
    drafting = Engine.from_pretrained(directory, speculative=True, adaptive_drafts=False)
    assert (len(plain.model.mtp), len(drafting.model.mtp)) == (0, 1)
    assert plain.model.config.num_nextn_predict_layers == 0
    mtp_parameters = sum(p.numel() for p in drafting.model.mtp.parameters())
    assert mtp_parameters > 0
    assert (
        sum(p.numel() for p in plain.model.parameters())
        == sum(p.numel() for p in drafting.model.parameters()) - mtp_parameters
    )
    batch = prompts([5, 21, 12])
    assert [c.token_ids for c in plain.generate(batch, GREEDY)] == [
        c.token_ids for c in drafting.generate(batch, GREEDY)
    ]


def test_a_tensor_of_token_ids_is_one_prompt_or_one_per_row_as_transformers_input_ids(model, tokenizer):
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode("def f")
    [as_ids] = engine.generate(ids, GREEDY)
    [one] = engine.generate(torch.tensor(ids), GREEDY)
    rows = engine.generate(torch.tensor([ids, ids]), GREEDY)
    assert [c.prompt_token_ids for c in (one, *rows)] == [ids] * 3
    assert [c.token_ids for c in (one, *rows)] == [as_ids.token_ids] * 3


def test_a_completion_carries_its_prompts_text_as_vllms_request_output_prompt(model, tokenizer):
    """vLLM's quickstart prints output.prompt beside output.outputs[0].text; a Completion had no prompt
    (AttributeError). It is the text given (a TextPrompt's too), None for token ids, and a chat's rendered prompt."""
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode_prompt("def f")
    completions = engine.generate(["def f", ids, {"prompt": "def g"}, {"prompt_token_ids": ids}], GREEDY)
    assert [c.prompt for c in completions] == ["def f", None, "def g", None]
    [sampled] = engine.generate("def f", SamplingParams(max_new_tokens=2, n=2, seed=0))
    assert [c.prompt for c in (sampled, *sampled.others)] == ["def f", "def f"]
    messages = [{"role": "user", "content": "hi"}]
    [reply] = engine.chat(messages, GREEDY)
    assert (
        reply.prompt
        == tokenizer.decode(tokenizer.encode_chat(messages))
        == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
    )


def test_a_completion_names_the_stop_that_ended_it_as_vllms_stop_reason(model, tokenizer):
    """vLLM's CompletionOutput.stop_reason is the stop token id or stop string that ended it (None for EOS or a length
    limit): a caller with several stops learns which one matched. A Completion had none (AttributeError)."""
    engine = Engine(model, tokenizer)
    [written] = engine.generate("def f", GREEDY)
    token = next(t for t in written.token_ids[2:] if t != tokenizer.eos_id)
    text = written.text[len(written.text) // 2 :][:2]
    [by_id] = engine.generate("def f", dataclasses.replace(GREEDY, stop_token_ids=(token, 511)))
    [by_text] = engine.generate("def f", dataclasses.replace(GREEDY, stop=("never written here", text)))
    [by_eos] = engine.generate(
        "def f", SamplingParams(max_new_tokens=5, temperature=0, logit_bias={tokenizer.eos_id: 100})
    )
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", token)
    assert (by_text.finish_reason, by_text.stop_reason) == ("stop", text)
    assert [(c.finish_reason, c.stop_reason) for c in (by_eos, written)] == [("stop", None), ("length", None)]


def test_a_generation_config_eos_id_other_than_the_tokenizers_is_named_as_the_stop_reason_as_vllms(model, tokenizer):
    """vLLM adds generation_config.json's eos_token_id ids, but the tokenizer's EOS, to a request's stop_token_ids
    (SamplingParams.update_from_generation_config), so a release whose file lists another end token (Llama 3's
    <|eot_id|>) gives that id as stop_reason; the engine gave None, as for the tokenizer's EOS."""
    stopping = dataclasses.replace(GREEDY, ignore_eos=False)
    [written] = Engine(model, tokenizer).generate("def f", stopping)
    token = written.token_ids[0]  # the reply's first token, ending it at once as an end token
    assert token != tokenizer.eos_id
    model.generation_config = {"eos_token_id": [tokenizer.eos_id, token]}
    try:
        engine = Engine(model, tokenizer)
        [ended] = engine.generate("def f", stopping)
        [by_eos] = engine.generate(
            "def f", SamplingParams(max_new_tokens=5, temperature=0, logit_bias={tokenizer.eos_id: 100})
        )
    finally:
        model.generation_config = None
    assert (ended.finish_reason, ended.stop_reason, ended.token_ids) == ("stop", token, [token])
    assert (by_eos.finish_reason, by_eos.stop_reason) == ("stop", None)


def test_vllms_prompt_dicts_are_read_as_their_text_or_ids_and_other_keys_are_refused(model, tokenizer):
    """vLLM's generate takes TextPrompt {"prompt": text} and TokensPrompt {"prompt_token_ids": ids}; here a dict was
    read as the sequence of its keys: generate({"prompt": "def f"}) continued the text "prompt", and
    generate({"prompt_token_ids": ids}) the text "prompt_token_ids", without a word; {"prompt_token_ids": "12"} ran the
    text "12"."""
    engine = Engine(model, tokenizer)
    ids = tokenizer.encode_prompt("def f")
    [text, given_ids] = engine.generate(["def f", [5, 6, 7]], GREEDY)
    [one] = engine.generate({"prompt": "def f"}, GREEDY)
    several = engine.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt": "def f"}], GREEDY)
    streamed = [
        token for output in engine.stream({"prompt_token_ids": [5, 6, 7]}, GREEDY) for token in output.token_ids
    ]
    assert [c.prompt_token_ids for c in (one, *several)] == [ids, [5, 6, 7], ids]
    assert [c.token_ids for c in (one, *several)] == [text.token_ids, given_ids.token_ids, text.token_ids]
    assert streamed == given_ids.token_ids
    with pytest.raises(ValueError, match=r"^a prompt mapping's 'multi_modal_data' would go unread: give \{'prompt'"):
        engine.generate({"prompt": "def f", "multi_modal_data": {}}, GREEDY)
    with pytest.raises(ValueError, match=r"^a prompt mapping holds no prompt: give"):
        engine.generate([{}], GREEDY)
    with pytest.raises(TypeError, match=r"^prompt_token_ids='12' is a text: give token ids, or the text as \{'prompt'"):
        engine.generate({"prompt_token_ids": "12"}, GREEDY)
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    "prompts",
    [torch.tensor(5), torch.zeros(1, 2, 3, dtype=torch.long), torch.tensor([5.0, 6.0])],
    ids=["0d", "3d", "float"],
)
def test_a_tensor_of_prompts_that_is_not_1d_or_2d_integer_ids_is_refused_naming_its_shape_and_dtype(
    model, tokenizer, prompts
):
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match=rf"integer token ids, 1-D .* 2-D .*; got {prompts.dtype} of shape"):
        engine.generate(prompts, GREEDY)
    assert not engine.has_unfinished()


def test_generate_takes_a_tuple_of_params_and_names_a_list_of_the_wrong_length(model, tokenizer):
    engine = Engine(model, tokenizer)
    short = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    first, second = engine.generate(prompts([4, 5]), (short, GREEDY))  # any sequence, as vLLM's LLM.generate
    assert (len(first.token_ids), len(second.token_ids)) == (2, 12)
    one_params = r"^2 prompts but 1 sampling_params: give one per prompt or one SamplingParams for all$"
    with pytest.raises(ValueError, match=one_params):
        engine.generate(prompts([4, 5]), [short])  # no adapters were given: the message names none
    with pytest.raises(ValueError, match=r"^2 prompts but 3 adapters: give one per prompt"):
        engine.generate(prompts([4, 5]), short, adapters=[None] * 3)
    assert not engine.has_unfinished()


def test_stream_takes_a_text_prompt_as_generate_does_and_add_request_refuses_one(model, tokenizer):
    engine = Engine(model, tokenizer)
    [expected] = engine.generate("123", GREEDY)  # "123" read as token ids [1, 2, 3] before
    assert [token for output in engine.stream("123", GREEDY) for token in output.token_ids] == expected.token_ids
    with pytest.raises(TypeError, match=r"prompt_ids is a str; give token ids \(tokenizer.encode_prompt\(text\)\)"):
        engine.add_request("def f", GREEDY)
    assert not engine.has_unfinished()


def test_outputs_tell_when_their_request_left_the_waiting_queue(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=1)
    first, second, never = (engine.add_request(prompt, GREEDY) for prompt in prompts([4, 4, 4]))
    before = time.perf_counter()
    outputs = engine.step()  # admits `first` only: the batch holds one
    engine.abort(never)  # leaves without ever being scheduled
    first_done = None
    while engine.has_unfinished():
        outputs += engine.step()
        if first_done is None and any(o.request_id == first and o.finished for o in outputs):
            first_done = time.perf_counter()
    scheduled = {rid: {o.scheduled_at for o in outputs if o.request_id == rid} for rid in (first, second, never)}
    assert scheduled[never] == {None}
    (first_at,), (second_at,) = scheduled[first], scheduled[second]  # one value per request, on every output
    assert before <= first_at < first_done < second_at  # `second` waited for `first` to free the batch slot


def test_abort_tells_a_queued_a_started_and_an_unknown_or_finished_request_apart(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=1)
    long = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    started, queued = (engine.add_request(prompt, long) for prompt in prompts([4, 4]))
    engine.step()  # admits `started` only: the batch holds one
    assert engine.abort(queued) is False
    assert engine.abort(started) is True
    assert engine.abort(started) is None  # gone already
    assert engine.abort("no-such-id") is None


def test_requests_added_and_aborted_from_another_thread_while_a_thread_steps(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4)
    outputs, done = [], threading.Event()

    def stepper() -> None:
        while not done.is_set() or engine.has_unfinished():
            outputs.extend(engine.step())

    thread = threading.Thread(target=stepper)
    thread.start()
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)  # still running when aborted
    batch = prompts([5, 9, 14, 3, 7, 11])
    ids = [engine.add_request(prompt, long if i == 2 else GREEDY) for i, prompt in enumerate(batch)]
    engine.abort(ids[2])
    done.set()
    thread.join(timeout=60)
    finished = {out.request_id: out.finish_reason for out in outputs if out.finished}
    assert finished == {**{i: "length" for i in ids if i != ids[2]}, ids[2]: "abort"}
    alone = Engine(model, tokenizer).generate([batch[5]], GREEDY)[0].token_ids
    assert [t for out in outputs if out.request_id == ids[5] for t in out.token_ids] == alone
    assert engine.cache.usage == 0


def test_stop_string_spanning_two_tokens_cuts_the_text_before_it(model, tokenizer):
    prompt = tokenizer.encode("def main(argv):\n    return ")
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    request = engine.add_request(prompt, params)
    pieces = []
    while engine.has_unfinished():
        pieces += [out.text for out in engine.step() if out.request_id == request]
    full = "".join(pieces)
    boundary = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[boundary][-1] + pieces[boundary + 1][0]  # the last character of one step and the first of the next
    cut = full.find(stop)
    stopped = Engine(model, tokenizer).generate([prompt], SamplingParams(**{**params.__dict__, "stop": (stop,)}))[0]
    assert stopped.text == full[:cut]
    assert stopped.finish_reason == "stop"
    alone = Engine(model, tokenizer).generate([prompt], SamplingParams(**{**params.__dict__, "stop": stop}))[0]
    assert alone.text == full[:cut]  # a stop string given alone, as vLLM's SamplingParams takes it
    kept = SamplingParams(**{**params.__dict__, "stop": (stop,), "include_stop_str_in_output": True})
    assert Engine(model, tokenizer).generate([prompt], kept)[0].text == full[: cut + len(stop)]  # vLLM's option


def test_a_stop_token_id_ends_generation_right_after_that_token(model, tokenizer):
    prompt = prompts([8])[0]
    free = Engine(model, tokenizer).generate([prompt], GREEDY)[0].token_ids
    stop_at = free[4]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop_at,))
    stopped = Engine(model, tokenizer).generate([prompt], params)[0]
    assert stopped.token_ids == free[: free.index(stop_at) + 1]
    assert stopped.finish_reason == "stop"


def test_without_detokenizing_the_tokens_are_the_same_and_the_text_is_empty(model, tokenizer):
    """The log-probabilities' tokens were decoded all the same (vLLM leaves them undecoded): their text is "" too."""
    prompt = prompts([8])[0]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True, logprobs=True, top_logprobs=2)
    [text] = Engine(model, tokenizer).generate([prompt], params)
    [ids] = Engine(model, tokenizer).generate([prompt], dataclasses.replace(params, detokenize=False))
    assert ids.token_ids == text.token_ids and text.text and ids.text == ""
    assert [entry.logprob for entry in ids.logprobs] == [entry.logprob for entry in text.logprobs]
    assert {entry.token for entry in ids.logprobs} == {""} and all(entry.token for entry in text.logprobs)
    assert {name for entry in ids.logprobs for _, name, _ in entry.top} == {""}


def test_without_detokenizing_vllms_logprob_dict_has_decoded_token_none(model, tokenizer):
    """vLLM's Logprob.decoded_token is None where the request asked for no text; here it was "" (the fields and
    dataclasses.asdict, generate --json's record, keep "" as before)."""
    prompt = prompts([8])[0]
    params = SamplingParams(max_new_tokens=4, temperature=0, logprobs=True, top_logprobs=2, prompt_logprobs=1)
    [text] = Engine(model, tokenizer).generate([prompt], params)
    [ids] = Engine(model, tokenizer).generate([prompt], dataclasses.replace(params, detokenize=False))
    undecoded = [*ids.logprobs, *ids.prompt_logprobs[1:]]
    assert {logprob.decoded_token for entry in undecoded for logprob in entry.values()} == {None}
    first, decoded_first = ids.logprobs[0], text.logprobs[0]
    assert first[first.token_id].logprob == decoded_first[decoded_first.token_id].logprob
    assert decoded_first[decoded_first.token_id].decoded_token == tokenizer.decode([decoded_first.token_id])
    assert dataclasses.asdict(first) == dataclasses.asdict(decoded_first) | {"token": "", "top": [
        (token_id, "", logprob) for token_id, _, logprob in decoded_first.top]}  # fmt: skip


def test_presence_penalty_keeps_greedy_output_free_of_repeats(model, tokenizer):
    prompt = prompts([8])[0]
    plain = Engine(model, tokenizer).generate([prompt], SamplingParams(max_new_tokens=60, temperature=0))[0]
    params = SamplingParams(max_new_tokens=60, temperature=0, presence_penalty=2.0, ignore_eos=True)
    penalized = Engine(model, tokenizer).generate([prompt], params)[0]
    assert len(set(penalized.token_ids)) == 60  # a random model's logits are far smaller than the penalty
    assert penalized.token_ids != plain.token_ids


def test_logit_bias_bans_or_forces_tokens_of_greedy_decoding(model, tokenizer):
    prompt = prompts([8])[0]
    plain = Engine(model, tokenizer).generate([prompt], GREEDY)[0].token_ids
    ban = dict.fromkeys(plain, -100)
    banned = Engine(model, tokenizer).generate([prompt], dataclasses.replace(GREEDY, logit_bias=ban))[0].token_ids
    assert len(banned) == len(plain) and not set(banned) & set(plain)
    forced = dataclasses.replace(GREEDY, logit_bias={7: 100})
    assert Engine(model, tokenizer).generate([prompt], forced)[0].token_ids == [7] * GREEDY.max_new_tokens


def test_generated_special_tokens_are_left_out_of_the_text_by_default_as_vllm_and_the_server_leave_them(
    model, tokenizer
):
    """The library kept them (text '<｜Assistant｜><｜Assistant｜>...'), where vLLM and our server drop them."""
    assistant = tokenizer.backend.token_to_id(ASSISTANT)
    forced = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True, logit_bias={assistant: 100})
    [dropped] = Engine(model, tokenizer).generate([[5, 6]], forced)
    [kept] = Engine(model, tokenizer).generate([[5, 6]], dataclasses.replace(forced, skip_special_tokens=False))
    assert dropped.token_ids == kept.token_ids == [assistant] * 3
    assert (dropped.text, kept.text) == ("", ASSISTANT * 3)


def test_min_tokens_holds_off_eos_stop_ids_and_stop_strings_as_vllms(model, tokenizer):
    """vLLM's min_tokens: before that many tokens EOS and stop_token_ids are not sampled and no stop string matches."""
    eos_first = SamplingParams(max_new_tokens=8, temperature=0, logit_bias={tokenizer.eos_id: 100})
    engine = Engine(model, tokenizer)
    [early, held] = engine.generate([[5, 6]] * 2, [eos_first, dataclasses.replace(eos_first, min_tokens=3)])
    assert early.token_ids == [tokenizer.eos_id] and held.finish_reason == "stop"
    assert len(held.token_ids) == 4 and tokenizer.eos_id not in held.token_ids[:3]  # then EOS, the 4th
    plain = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    [first] = engine.generate([[5, 6]], plain)
    stop = (tokenizer.decode(first.token_ids[:1]).strip()[:1],)  # met in the first token's text
    held_off = [dataclasses.replace(plain, stop=stop, min_tokens=count) for count in (0, 4)]
    [stopped, later] = engine.generate([[5, 6]] * 2, held_off)
    assert len(stopped.token_ids) == 1 and len(later.token_ids) >= 4
    with pytest.raises(ValueError, match=r"field 'min_tokens' must be at most max_new_tokens/max_tokens \(8\)"):
        engine.add_request([1], dataclasses.replace(eos_first, min_tokens=9))


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_min_tokens_holds_off_eos_with_ignore_eos_too_as_vllms(model, tokenizer, speculative):
    """With ignore_eos, EOS was sampled within min_tokens (it stops nothing, so it was not banned), where vLLM bans
    its all_stop_token_ids, EOS among them, before min_tokens whatever ignore_eos says."""
    engine = Engine(model, tokenizer, speculative=speculative, adaptive_drafts=False)
    eos_first = SamplingParams(max_new_tokens=5, temperature=0, logit_bias={tokenizer.eos_id: 100}, ignore_eos=True)
    [held] = engine.generate([[5, 6]], dataclasses.replace(eos_first, min_tokens=3))
    assert [token == tokenizer.eos_id for token in held.token_ids] == [False, False, False, True, True]
    assert held.finish_reason == "length"


@pytest.mark.parametrize("min_tokens", [2, 4])
def test_speculative_greedy_with_min_tokens_stops_where_plain_greedy_does(model, tokenizer, min_tokens):
    """min_tokens banned the stop ids at every column of a speculative step that began short of it, so an accepted
    draft at or past min_tokens that plain decoding takes as its stop was replaced: min_tokens=2 with the third greedy
    token for a stop id gave 12 tokens where plain greedy gives 3. Each column is now banned while it lies before
    min_tokens. The drafts are overwritten with plain greedy's next tokens, which the random MTP module never
    guesses."""
    prompt = prompts([6])[0]
    plain_params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    greedy = Engine(model, tokenizer).generate([prompt], plain_params)[0].token_ids
    params = dataclasses.replace(plain_params, stop_token_ids=(greedy[min_tokens],), min_tokens=min_tokens)
    assert greedy[min_tokens] not in greedy[:min_tokens]  # else the plain run stops elsewhere
    [plain] = Engine(model, tokenizer).generate([prompt], params)
    assert plain.token_ids == greedy[: min_tokens + 1] and plain.finish_reason == "stop"
    engine = Engine(model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=False)
    request_id, tokens = engine.add_request(prompt, params), []
    while engine.has_unfinished():
        tokens += [token for output in engine.step() if output.request_id == request_id for token in output.token_ids]
        for request in engine.running:
            generated = len(request.ids) - len(request.prompt_ids)
            request.drafts = (greedy + [0] * 3)[generated : generated + 3]
    assert tokens == plain.token_ids and engine.stats().spec_accepted > 0


def test_chat_given_a_text_for_messages_says_how_a_conversation_is_written(model, tokenizer):
    """Engine.chat("hi"), or chat([..., "hi"]), read the text's characters as messages: "chat message 0 must be a
    dict with 'role' and 'content' ..., got 'h'", naming a message the caller never wrote."""
    with pytest.raises(TypeError) as refusal:
        Engine(model, tokenizer).chat("hi", GREEDY)
    assert str(refusal.value) == (
        "messages is a str; give a conversation, [{'role': 'user', 'content': 'hi'}], or a list of them (generate "
        "continues a text as it is)"
    )
    with pytest.raises(TypeError) as refusal:  # a list of texts, read as conversations of one-character messages
        Engine(model, tokenizer).chat([[{"role": "user", "content": "a"}], "hi"], GREEDY)
    assert str(refusal.value) == (
        "messages[1] is a str; give each conversation as a list of messages, [{'role': 'user', 'content': 'hi'}] "
        "(generate continues a text as it is)"
    )


def test_chat_given_one_message_or_none_for_messages_says_how_a_conversation_is_written(model, tokenizer):
    """Engine.chat({"role": "user", "content": "hi"}), one message without its list, was a bare KeyError 0, and
    chat(None) a bare "object of type 'NoneType' has no len()"."""
    engine = Engine(model, tokenizer)
    with pytest.raises(TypeError) as refusal:
        engine.chat({"role": "user", "content": "hi"}, GREEDY)
    assert str(refusal.value) == (
        "messages is one message, {'role': 'user', 'content': 'hi'}; give a conversation, [{'role': 'user', "
        "'content': 'hi'}], or a list of them"
    )
    with pytest.raises(TypeError) as refusal:
        engine.chat(None, GREEDY)
    assert str(refusal.value) == (
        "messages is None; give a conversation, [{'role': 'user', 'content': ...}], or a list of them"
    )


@pytest.mark.parametrize(
    ("prompt", "fields", "message"),
    [
        ([], {}, "empty prompt"),
        ([1] * 300, dict(max_new_tokens=1), "prompt has 300 tokens, more than max_model_len=256"),
        ([1] * 256, dict(max_new_tokens=1), "prompt is 256 tokens; the context of 256 leaves no room for a new token"),
        ([1, 9999], {}, "prompt holds token id 9999, outside the vocabulary"),
        (
            [1],
            dict(logit_bias={512: -100}),
            r"logit_bias holds token id 512, outside the vocabulary \[0, 512\)",
        ),
        ([1], dict(temperature=-1), "field 'temperature' has value -1"),
        ([1], dict(top_p=0), "field 'top_p' has value 0"),
        ([1], dict(top_logprobs=21), "field 'top_logprobs' has value 21"),
        ([1], dict(top_logprobs=3), "field 'top_logprobs' must be 0 without logprobs=True"),
        ([1], dict(max_new_tokens="5"), "field 'max_new_tokens' has value '5'"),
        ([1], dict(stop=("",)), "field 'stop.0' has value ''"),
        ([1], dict(seed=2**64), "field 'seed' has value 18446744073709551616"),
        ([1], dict(stop=("x",), detokenize=False), "field 'stop' must be empty with detokenize=False"),
        ([1], dict(temperature=float("nan")), "field 'temperature' has value nan: input should be a finite"),
        ([1], dict(top_p=float("inf")), "field 'top_p' has value inf: input should be a finite number"),
        ([1], dict(stop=("ok", "\ud800")), r"field 'stop' has value \('ok', '\\ud800'\): not valid Unicode"),
    ],
)
def test_bad_requests_are_refused_with_a_message_naming_the_fault(model, tokenizer, prompt, fields, message):
    """A field out of range is refused as SamplingParams are built; the rest by add_request."""
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**fields))
    assert not engine.has_unfinished()


def test_a_reply_past_the_context_ends_with_it_as_vllms(model, tokenizer):
    """vLLM's LLM.generate stops a reply where the context ends (finish_reason length); here a prompt of 200 tokens
    with max_new_tokens=100 in a context of 256 was refused ("prompt (200 tokens) + max_new_tokens (100) = 300 exceeds
    max_model_len=256"), so a vLLM script (or a batch of prompts of many lengths) failed on its longest prompt."""
    engine = Engine(model, tokenizer)
    [long, short] = engine.generate([[1] * 200, [1] * 10], dataclasses.replace(GREEDY, max_new_tokens=100))
    assert (len(long.token_ids), long.finish_reason) == (56, "length")  # 200 + 56: the context of 256
    assert len(short.token_ids) == 100
    plain = engine.generate([[1] * 200], dataclasses.replace(GREEDY, max_new_tokens=56))[0]
    assert long.token_ids == plain.token_ids


def test_engine_defaults_are_the_engine_options_defaults(model, tokenizer):
    engine = Engine(model, tokenizer, speculative=True)
    options = EngineOptions()
    assert (engine.draft_tokens, engine.max_batch_size) == (options.draft_tokens, options.max_batch_size)
    assert engine.max_model_len == model.config.max_position_embeddings and options.max_model_len is None


def test_a_context_longer_than_the_models_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="max_model_len=257 is longer than the model's context, max_position_embed"):
        Engine(model, tokenizer, max_model_len=model.config.max_position_embeddings + 1)


def test_max_new_tokens_is_capped_to_what_fits_the_context_with_a_notice(model, tokenizer):
    engine = Engine(model, tokenizer, max_model_len=64)
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
    capped, notice = engine.fit_max_new_tokens(50, params)
    assert capped.max_new_tokens == 14 and capped.temperature == 0 and params.max_new_tokens == 100
    assert notice == "prompt is 50 tokens; max_new_tokens capped from 100 to 14 to fit the context of 64"
    [completion] = engine.generate(prompts([50]), capped)  # the capped request is accepted and runs to the end
    assert len(completion.token_ids) == 14 and completion.finish_reason == "length"
    assert engine.fit_max_new_tokens(50, SamplingParams(max_new_tokens=14)) == (SamplingParams(max_new_tokens=14), None)
    for prompt_len in (64, 70):
        with pytest.raises(ValueError, match=f"prompt is {prompt_len} tokens; the context of 64 leaves no room"):
            engine.fit_max_new_tokens(prompt_len, params)
    _, notice = engine.fit_max_new_tokens(1, params)  # was "prompt is 1 tokens"
    assert notice == "prompt is 1 token; max_new_tokens capped from 100 to 63 to fit the context of 64"
    with pytest.raises(ValueError, match="^prompt is 1 token; the context of 1 leaves no room"):
        Engine(model, tokenizer, max_model_len=1).fit_max_new_tokens(1, params)


def test_max_new_tokens_is_capped_to_what_the_cache_budget_holds_with_a_notice(model, tokenizer):
    engine = Engine(model, tokenizer, num_blocks=5, block_size=16)  # 4 usable blocks: 64 tokens, the model's 256
    params = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
    capped, notice = engine.fit_max_new_tokens(50, params)
    assert capped.max_new_tokens == 14
    assert notice == (
        "prompt is 50 tokens; max_new_tokens capped from 100 to 14 to fit the 64 tokens the cache holds "
        "(--kv-cache-memory, kv_cache_memory=, for more)"
    )
    [completion] = engine.generate(prompts([50]), capped)  # accepted, where 100 new tokens were refused
    assert len(completion.token_ids) == 14 and completion.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt is 64 tokens; the 64 tokens the cache holds .* leaves no room"):
        engine.fit_max_new_tokens(64, params)


def test_from_pretrained_names_a_missing_folder_and_a_missing_tokenizer_in_python_terms(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nowhere'}: no such folder")):
        Engine.from_pretrained(tmp_path / "nowhere")
    checkpoint = model_dir(tmp_path / "micro")
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json: pass tokenizer= the path") as error:
        Engine.from_pretrained(checkpoint)
    assert "--" not in str(error.value)  # no command-line flag in the Python API's words


@pytest.mark.parametrize(
    ("params", "speculative"),
    [(GREEDY, False), (GREEDY, True), (dataclasses.replace(GREEDY, temperature=1.0, seed=0), False)],
)
@torch.inference_mode()
def test_a_vocabulary_padded_past_the_tokenizer_never_samples_the_padded_ids(tokenizer, params, speculative):
    """Ids past the tokenizer's decode to no token (and a distillation teacher of the tokenizer's size has no row
    for them), however large their logits."""
    from seekstack import Transformer
    from tests.conftest import micro_config

    torch.manual_seed(0)
    padded = Transformer(micro_config(vocab_size=VOCAB + 64)).eval()
    padded.lm_head.weight[VOCAB:] = 100 * padded.lm_head.weight[:64]  # the padded ids' logits dwarf the others
    engine = Engine(padded, tokenizer, speculative=speculative)
    outputs = engine.generate(prompts([5, 9]), params)
    assert all(0 <= token < VOCAB for output in outputs for token in output.token_ids)
    assert all(len(output.token_ids) == params.max_new_tokens for output in outputs)


@torch.inference_mode()
def test_a_vocabulary_padded_past_the_tokenizer_gives_its_ids_no_log_probability(tokenizer):
    """Prompt logprobs and a token's logprobs were taken over the model's whole padded vocabulary: the padded ids,
    which are never sampled, showed among the top alternatives and took probability from the tokenizer's ids. They
    are now as a model of the tokenizer's vocabulary with the same weights gives them (vLLM drops the padded ids)."""
    from seekstack import Transformer
    from tests.conftest import micro_config

    torch.manual_seed(0)
    padded = Transformer(micro_config(vocab_size=VOCAB + 64)).eval()
    padded.lm_head.weight[VOCAB:] = 100 * padded.lm_head.weight[:64]  # the padded ids' logits dwarf the others
    trimmed = Transformer(micro_config(vocab_size=VOCAB)).eval()
    trimmed.load_state_dict({
        name: tensor[:VOCAB] if tensor.shape[:1] == (VOCAB + 64,) else tensor
        for name, tensor in padded.state_dict().items()
    })  # fmt: skip
    params = dataclasses.replace(GREEDY, max_new_tokens=4, logprobs=3, prompt_logprobs=3)
    [got] = Engine(padded, tokenizer).generate(prompts([9]), params)
    [expected] = Engine(trimmed, tokenizer).generate(prompts([9]), params)
    assert got.token_ids == expected.token_ids
    for entries, wanted in ((got.prompt_logprobs[1:], expected.prompt_logprobs[1:]), (got.logprobs, expected.logprobs)):
        assert [(e.token_id, e.rank, [i for i, _, _ in e.top]) for e in entries] == [
            (e.token_id, e.rank, [i for i, _, _ in e.top]) for e in wanted
        ]
        assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in wanted], abs=1e-4)


def test_generate_and_stream_from_several_threads_each_get_their_own_requests_whole(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=8)
    batch = prompts([5, 9, 14, 3])
    expected = [Engine(model, tokenizer).generate([prompt], GREEDY)[0].token_ids for prompt in batch]
    results: dict[int, list[int]] = {}

    def generating(i: int) -> None:
        results[i] = engine.generate([batch[i]], GREEDY)[0].token_ids

    def streaming(i: int) -> None:
        results[i] = [token for output in engine.stream(batch[i], GREEDY) for token in output.token_ids]

    threads = [threading.Thread(target=generating if i % 2 else streaming, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:  # a step in one thread produced the others' outputs too, which they never saw: a hang
        thread.join(timeout=max(deadline - time.monotonic(), 0))
    assert not any(thread.is_alive() for thread in threads)
    assert [results[i] for i in range(4)] == expected
    assert engine.cache.usage == 0 and not engine.has_unfinished()
