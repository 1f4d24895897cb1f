"""OpenAI request fields no longer dropped in silence: `logit_bias` is honoured on both endpoints, fields that would
change the reply and cannot be honoured are refused naming them, and an assistant turn's null content is read as "".

In process, through the app's ASGI interface with its engine thread running."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams, sample_seed
from seekstack.schema import shown_value
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from seekstack.serve.errors import APIError, parse_body
from seekstack.serve.ledger import Ledger
from seekstack.serve.protocol import prompt_ids
from seekstack.serve.schemas import ChatCompletionRequest, CompletionRequest
from seekstack.tokenizer import CONFIG_FILE, REASONING_FIELDS, Tokenizer
from tests.serve.server import error_of, make_model_dir, run

GREEDY = {"model": "model", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
COMPLETION = {**GREEDY, "prompt": "The quick brown", "logprobs": 0}
CHAT = {**GREEDY, "messages": [{"role": "user", "content": "Hello"}], "logprobs": True}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("fields")))


def post_each(engine: Engine, database_path, requests: list[tuple[str, dict]]) -> list:
    """Each (route, body) posted in turn to an app serving `engine`; the responses."""

    async def scenario(client):
        return [await client.post(route, json=body) for route, body in requests]

    return run(create_app(engine, open_database(database_path)), scenario)


def tokens_of(response) -> list[str]:
    """The text of each generated token, from the logprobs of either endpoint's first choice."""
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    return logprobs["tokens"] if "tokens" in logprobs else [entry["token"] for entry in logprobs["content"]]


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_allowed_token_ids_and_bad_words_rule_what_is_sampled_as_vllms(engine, tmp_path, route, body):
    """vLLM's allowed_token_ids and bad_words were refused ("this server bans tokens, not words") though the engine
    applies both, as vLLM's server does."""
    [plain] = post_each(engine, tmp_path / "db", [(route, body)])
    word = next(token for token in tokens_of(plain) if token.isalnum() or token in "#")  # a one-token word
    fox = engine.tokenizer.encode(" fox")[-1]
    allowed, banned, outside, blank, beside_json, none_left, too_many = post_each(engine, tmp_path / "db", [
        (route, {**body, "allowed_token_ids": [fox]}),
        (route, {**body, "bad_words": [word]}),
        (route, {**body, "allowed_token_ids": [5, 320]}),
        (route, {**body, "bad_words": ["  "]}),
        (route, {**body, "bad_words": ["x"], "response_format": {"type": "json_object"}}),
        (route, {**body, "bad_words": ["ox"], "allowed_token_ids": engine.tokenizer.encode("ox")}),
        (route, {**body, "bad_words": [f"w{i}" for i in range(301)]}),  # matched at every step: as many as logit_bias
    ])  # fmt: skip
    assert tokens_of(allowed) == [engine.tokenizer.decode([fox])] * 8 != tokens_of(plain)
    assert word in tokens_of(plain) and word not in tokens_of(banned) and len(tokens_of(banned)) == 8
    refusals = [error_of(response, 400) for response in (outside, blank, beside_json, none_left, too_many)]
    assert [(error["param"], error["code"]) for error in refusals] == [
        ("allowed_token_ids.1", "invalid_value"), ("bad_words", "invalid_value"),
        ("bad_words", "unsupported_parameter"), ("allowed_token_ids", "invalid_value"), ("bad_words", "invalid_value"),
    ]  # fmt: skip
    assert refusals[0]["message"] == "allowed_token_ids.1: token id 320 is outside the vocabulary [0, 320)"
    assert refusals[2]["message"].startswith("bad_words cannot be applied beside response_format's JSON")
    assert refusals[3]["message"].startswith("field 'allowed_token_ids' [306] are each a one-token word of bad_words")
    assert "at most 300 items" in refusals[4]["message"]


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_allowed_token_ids_that_leave_no_token_to_sample_are_a_400_naming_the_fields(engine, tmp_path, route, body):
    """allowed_token_ids each an EOS or stop id under min_tokens (which bans those), or beside response_format's JSON
    (whose grammar permitted none of them), left no token to sample: the engine failed at the first token, a 500.
    Ids the grammar may begin with are taken beside it, both masks applied, as vLLM's (9aea3d6 refused every pair)."""
    fox, [eos] = engine.tokenizer.encode(" fox")[-1], sorted(engine.eos_ids)
    braces = [engine.tokenizer.encode(brace)[-1] for brace in "{}"]
    answered, only_ends, only_stops, beside_json, json_answered = post_each(engine, tmp_path / "db", [
        (route, {**body, "ignore_eos": False, "allowed_token_ids": [eos, fox], "min_tokens": 3}),
        (route, {**body, "allowed_token_ids": [eos], "min_tokens": 3}),  # banned with ignore_eos too, as vLLM's
        (route, {**body, "allowed_token_ids": [eos, 7], "stop_token_ids": [7], "min_tokens": 1}),
        (route, {**body, "allowed_token_ids": [fox], "response_format": {"type": "json_object"}}),
        (route, {**body, "allowed_token_ids": braces, "response_format": {"type": "json_object"}}),
    ])  # fmt: skip
    assert tokens_of(answered)[:3] == [engine.tokenizer.decode([fox])] * 3
    assert tokens_of(json_answered) == ["{", "}"] and json_answered.json()["choices"][0]["finish_reason"] == "stop"
    refusals = [error_of(response, 400) for response in (only_ends, only_stops, beside_json)]
    assert [(error["param"], error["code"]) for error in refusals] == [
        ("allowed_token_ids", "invalid_value"), ("allowed_token_ids", "invalid_value"),
        ("allowed_token_ids", "invalid_value"),
    ]  # fmt: skip
    assert refusals[0]["message"] == (  # the engine's refusal (Engine.add_request), as the library's
        f"field 'allowed_token_ids' [{eos}] are each an end-of-sequence or stop_token_ids id, which min_tokens=3 bans "
        "until that many tokens are out: no token could be sampled; allow another id or send min_tokens 0"
    )
    assert refusals[1]["message"].startswith(f"field 'allowed_token_ids' [{eos}, 7] are each an end-of-sequence or")
    assert refusals[2]["message"] == (
        f"field 'allowed_token_ids' [{fox}] are each a token the constraint (JSON mode: response_format's grammar, "
        "forced tool calls) forbids as the reply's first: no token could be sampled; allow one the grammar may begin "
        "with"
    )


def test_an_engine_refusal_of_many_allowed_token_ids_echoes_their_start_and_count_not_each_id(engine, tmp_path):
    """The engine's refusals of allowed_token_ids listed every id: 300 stop ids under min_tokens came back as a
    1,654-character message, and ids a JSON grammar forbids as the first token could be most of the vocabulary (129k
    ids of DeepSeek-V3's, near a megabyte). They echo them as the config checks echo a value (schema.shown_value)."""
    ids = list(range(10, 310))
    body = {**COMPLETION, "allowed_token_ids": ids, "stop_token_ids": ids, "min_tokens": 1}
    [refused] = post_each(engine, tmp_path / "db", [("/v1/completions", body)])
    error = error_of(refused, 400)
    assert (error["param"], error["message"]) == ("allowed_token_ids", (
        "field 'allowed_token_ids' [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29,... "
        "(300 items) are each an end-of-sequence or stop_token_ids id, which min_tokens=1 bans until that many tokens "
        "are out: no token could be sampled; allow another id or send min_tokens 0"
    ))  # fmt: skip


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_logit_bias_bans_and_forces_tokens_of_greedy_replies(engine, tmp_path, route, body):
    [plain] = post_each(engine, tmp_path / "db", [(route, body)])
    seen = set(tokens_of(plain))
    ban = {str(i): -100 for i in range(engine.tokenizer.vocab_size) if engine.tokenizer.decode([i]) in seen}
    forced_id = engine.tokenizer.encode(" fox")[-1]
    banned, forced = post_each(
        engine,
        tmp_path / "db",
        [(route, {**body, "logit_bias": ban}), (route, {**body, "logit_bias": {str(forced_id): 100}})],
    )
    assert len(tokens_of(banned)) == 8 and not seen & set(tokens_of(banned))
    assert tokens_of(forced) == [engine.tokenizer.decode([forced_id])] * 8


@pytest.mark.parametrize(
    "logit_bias, param, fragment",
    [
        ({"320": 5}, "logit_bias.320", "logit_bias.320: token id 320 is outside the vocabulary [0, 320)"),
        ({"5": 101}, "logit_bias.5", "less than or equal to 100"),
        ({"5": -100.5}, "logit_bias.5", "greater than or equal to -100"),
        ({"-1": 1}, "logit_bias.-1", "greater than or equal to 0"),
        ({"fox": 1}, "logit_bias.fox", "valid integer"),
        ({str(i): 1 for i in range(301)}, "logit_bias", "at most 300 items"),
    ],
)
def test_bad_logit_bias_is_a_400_naming_logit_bias(engine, tmp_path, logit_bias, param, fragment):
    requests = [("/v1/completions", {**COMPLETION, "logit_bias": logit_bias}),
                ("/v1/chat/completions", {**CHAT, "logit_bias": logit_bias})]  # fmt: skip
    for response in post_each(engine, tmp_path / "db", requests):
        error = error_of(response, 400)
        assert error["param"] == param and fragment in error["message"], error


@pytest.mark.parametrize(
    ("route", "fields", "entry"),
    [
        ("/v1/completions", {"prompt": [[5, 6], [7, 320]]}, "prompt.1.1"),
        ("/v1/completions", {"prompt": [5, 320]}, "prompt.1"),
        ("/v1/completions", {"logit_bias": {"5": 1, "320": 2}}, "logit_bias.320"),
        ("/v1/chat/completions", {"stop_token_ids": [5, 320]}, "stop_token_ids.1"),
    ],
)
def test_a_token_id_outside_the_vocabulary_is_named_by_its_entry(engine, tmp_path, route, fields, entry):
    """'prompt token id 320 is outside the vocabulary' with param prompt named no prompt of a batch and no position,
    where pydantic names an entry's other faults (prompt.1.1: a negative id)."""
    body = {**(COMPLETION if route == "/v1/completions" else CHAT), **fields}
    [refused] = post_each(engine, tmp_path / "db", [(route, body)])
    error = error_of(refused, 400)
    assert (error["param"], error["message"]) == (entry, f"{entry}: token id 320 is outside the vocabulary [0, 320)")


REFUSED = {
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": {"name": "f"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "web_search_options": {},
    "reasoning_effort": "high",
    "verbosity": "low",
}


def test_openai_fields_that_would_change_the_reply_are_refused_by_name(engine, tmp_path):
    requests = [("/v1/chat/completions", {**CHAT, field: value}) for field, value in REFUSED.items()]
    for field, response in zip(REFUSED, post_each(engine, tmp_path / "db", requests), strict=True):
        error = error_of(response, 400)
        assert (error["param"], error["code"]) == (field, "unsupported_parameter"), error


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_min_tokens_holds_off_eos_and_stop_strings_as_vllms(engine, tmp_path, route, body):
    """It was refused ("this server sets no minimum length"), and the library had no such field."""
    eos_first = {**body, "ignore_eos": False, "logit_bias": {str(engine.tokenizer.eos_id): 100}}
    early, held, too_many = post_each(engine, tmp_path / "db", [
        (route, eos_first), (route, {**eos_first, "min_tokens": 3}), (route, {**eos_first, "min_tokens": 9}),
    ])  # fmt: skip
    assert early.json()["usage"]["completion_tokens"] == 1 and held.json()["usage"]["completion_tokens"] == 4
    assert held.json()["choices"][0]["finish_reason"] == "stop"
    error = error_of(too_many, 400)
    # it said "at most max_new_tokens (8)", SamplingParams' name, which no HTTP caller writes
    assert error["message"].startswith("field 'min_tokens' must be at most max_tokens (8), as vLLM's")
    assert (error["param"], error["code"]) == ("min_tokens", "invalid_value")  # was: None, None


def test_min_tokens_above_max_completion_tokens_is_refused_naming_max_completion_tokens(engine, tmp_path):
    """A chat's length given as max_completion_tokens (OpenAI's name now) is named so, not as max_tokens."""
    body = {**CHAT, "max_completion_tokens": 5, "min_tokens": 9}  # over max_tokens 8 too
    [refused] = post_each(engine, tmp_path / "db", [("/v1/chat/completions", body)])
    error = error_of(refused, 400)
    assert error["message"].startswith("field 'min_tokens' must be at most max_completion_tokens (5), as vLLM's")
    assert error["param"] == "min_tokens"


def test_min_tokens_above_the_length_a_chat_left_to_the_server_is_refused_naming_max_tokens(engine, tmp_path):
    """A chat that gave no length: min_tokens above the length the server chose is refused naming max_tokens, where
    a request's length field is looked up once for both refusals (it read "at most None")."""
    body = {key: value for key, value in CHAT.items() if key != "max_tokens"} | {"min_tokens": 10**6}
    [refused] = post_each(engine, tmp_path / "db", [("/v1/chat/completions", body)])
    error = error_of(refused, 400)
    assert error["message"].startswith("field 'min_tokens' must be at most max_tokens ("), error["message"]


@pytest.mark.parametrize("min_tokens", [1, 2])
def test_min_tokens_of_an_echo_of_max_tokens_0_is_refused_naming_the_0_given(engine, tmp_path, min_tokens):
    """An echo of max_tokens 0 (the prompt alone, scored) is run as max_tokens 1 with that token hidden: min_tokens 2
    was refused as 'at most max_tokens (1)', a length the caller never gave, and min_tokens 1 accepted, asking for a
    token the answer leaves out (vLLM's echo without generation does both, saying max_tokens=1)."""
    body = {**COMPLETION, "echo": True, "max_tokens": 0, "min_tokens": min_tokens}
    refused, scored = post_each(engine, tmp_path / "db", [
        ("/v1/completions", body), ("/v1/completions", {**body, "min_tokens": 0}),
    ])  # fmt: skip
    error = error_of(refused, 400)
    assert error["message"] == "field 'min_tokens' must be at most max_tokens (0), as vLLM's: no reply reaches more"
    assert (error["param"], error["code"]) == ("min_tokens", "invalid_value")
    assert scored.json()["choices"][0]["text"] == COMPLETION["prompt"]


def test_a_length_over_the_contexts_room_is_refused_naming_the_length_not_the_prompt(engine, tmp_path):
    """A prompt of 6 tokens with max_tokens 1000 was refused with param prompt and 'Shorten the prompt or lower
    max_tokens.', though no prompt could make room for 1000 tokens in a context of 256, and a chat's
    max_completion_tokens was named max_tokens. The length is named as the request gave it, with the most it may be."""
    length = engine.max_model_len
    prompt = [5] * 6
    chat_prompt = len(engine.tokenizer.encode_chat(CHAT["messages"]))
    over, beside, chat, too_long = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**COMPLETION, "prompt": prompt, "max_tokens": 1000}),
        ("/v1/completions", {**COMPLETION, "prompt": prompt, "max_tokens": length - 5}),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 1000}),
        ("/v1/completions", {**COMPLETION, "prompt": [5] * (length + 1), "max_tokens": 1}),
    ])  # fmt: skip
    needs = f"this model's maximum context length is {length} tokens; the request needs"
    expected = [
        (f"{needs} 6 in the prompt + 1000 for the completion. Lower max_tokens to at most {length - 6}.", "max_tokens"),
        (f"{needs} 6 in the prompt + {length - 5} for the completion. Lower max_tokens to at most {length - 6} or "
         "shorten the prompt.", "max_tokens"),
        (f"{needs} {chat_prompt} in the prompt + 1000 for the completion. Lower max_completion_tokens to at most "
         f"{length - chat_prompt}.", "max_completion_tokens"),
        (f"{needs} {length + 1} in the prompt + 1 for the completion. Shorten the prompt.", "prompt"),
    ]  # fmt: skip
    for refused, (message, param) in zip((over, beside, chat, too_long), expected, strict=True):
        error = error_of(refused, 400)
        assert (error["message"], error["param"], error["code"]) == (message, param, "context_length_exceeded")


def test_a_completion_takes_lm_evals_stop_strings_whole_as_vllm_does(engine, tmp_path):
    """lm-eval's local-completions sends a task's `until` with the EOS text as `stop`: humaneval's 6 were refused
    ('stop: List should have at most 4 items'), so the task failed on every request, where vLLM serves it."""
    [free] = post_each(engine, tmp_path / "db", [("/v1/completions", COMPLETION)])
    text = free.json()["choices"][0]["text"]
    stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", text[3:5]]  # humaneval's until, then the EOS's place
    [stopped] = post_each(engine, tmp_path / "db", [("/v1/completions", {**COMPLETION, "stop": stops})])
    assert stopped.status_code == 200, stopped.text
    choice = stopped.json()["choices"][0]
    cut = min(index for stop in stops if (index := text.find(stop)) >= 0)
    assert (choice["finish_reason"], choice["text"]) == ("stop", text[:cut])


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_a_choice_names_the_stop_string_that_ended_it_as_vllms_stop_reason(engine, tmp_path, route, body):
    """vLLM's choices (whole and streamed) carry stop_reason, the stop string or stop token id that ended them (None
    for EOS or a length limit); the engine knew it (Completion.stop_reason) but the server's answers left it out."""
    [free] = post_each(engine, tmp_path / "db", [(route, body)])
    choice = free.json()["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    stop = next(char for char in text if char != "\ufffd")  # a whole character (a token's part shows as U+FFFD)
    whole, streamed = post_each(engine, tmp_path / "db", [
        (route, {**body, "stop": ["never here", stop]}), (route, {**body, "stop": [stop], "stream": True, "n": 2}),
    ])  # fmt: skip
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
    assert [(c["finish_reason"], c["stop_reason"]) for c in whole.json()["choices"]] == [("stop", stop)]
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    ends = sorted((c["index"], c["finish_reason"], c["stop_reason"]) for k in chunks for c in k["choices"]
                  if c["finish_reason"])  # fmt: skip
    assert ends == [(0, "stop", stop), (1, "stop", stop)]
    assert all(c["stop_reason"] is None for k in chunks for c in k["choices"] if not c["finish_reason"])


def test_an_echoed_prompt_of_max_tokens_0_is_scored_alone_as_openai_and_vllm_take_it(engine, tmp_path):
    """echo with max_tokens 0 (OpenAI's legacy way to score a text, which vLLM takes: its echo without generation) was
    refused ('max_tokens: Input should be greater than or equal to 1'). The answer is max_tokens 1's without the token
    sampled after the prompt (its text and logprob), whole and streamed; max_tokens 0 without echo is still refused."""
    echoed = {**COMPLETION, "echo": True}
    one, alone, streamed, no_echo = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**echoed, "max_tokens": 1}),
        ("/v1/completions", {**echoed, "max_tokens": 0}),
        ("/v1/completions", {**echoed, "max_tokens": 0, "stream": True}),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}),
    ])  # fmt: skip
    assert alone.status_code == 200, alone.text
    with_token, scored = one.json()["choices"][0], alone.json()["choices"][0]
    prompt_tokens = one.json()["usage"]["prompt_tokens"]
    assert scored["text"] == COMPLETION["prompt"] and scored["finish_reason"] == "length"
    assert {name: values[:prompt_tokens] for name, values in with_token["logprobs"].items()} == scored["logprobs"]
    assert len(scored["logprobs"]["tokens"]) == prompt_tokens  # the prompt's tokens alone
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(event["choices"][0]["text"] for event in events) == scored["text"]
    tokens = [token for event in events for token in (event["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == scored["logprobs"]["tokens"] and events[-1]["choices"][0]["finish_reason"] == "length"
    error = error_of(no_echo, 400)
    assert error["param"] == "max_tokens" and "echo: true for the prompt alone" in error["message"]


def test_an_echoed_prompt_of_max_tokens_0_may_fill_the_context(engine, tmp_path):
    """lm-eval's loglikelihood_rolling scores windows of the whole context (echo, max_tokens 0): a prompt of
    max_model_len tokens was refused ('needs 256 in the prompt'), where README refuses only a prompt beyond the context
    and vLLM scores it. It is scored as its first max_model_len - 1 tokens are; one token more, or a token asked for
    after it, is still refused."""
    length = engine.max_model_len
    prompt = [40 + i % 200 for i in range(length)]
    scored = {**COMPLETION, "echo": True, "max_tokens": 0, "logprobs": 1}
    whole, shorter, beyond, one_more = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**scored, "prompt": prompt}),
        ("/v1/completions", {**scored, "prompt": prompt[:-1]}),
        ("/v1/completions", {**scored, "prompt": [*prompt, 40]}),
        ("/v1/completions", {**scored, "prompt": prompt, "max_tokens": 1}),
    ])  # fmt: skip
    assert whole.status_code == 200, whole.text
    logprobs, shorter_logprobs = (r.json()["choices"][0]["logprobs"]["token_logprobs"] for r in (whole, shorter))
    assert len(logprobs) == length and whole.json()["usage"]["completion_tokens"] == 0
    assert logprobs[1:-1] == pytest.approx(shorter_logprobs[1:], abs=1e-5) and logprobs[-1] < 0
    assert [error_of(r, 400)["code"] for r in (beyond, one_more)] == ["context_length_exceeded"] * 2


def test_an_echoed_prompt_of_max_tokens_0_reports_and_bills_no_completion_tokens(engine, tmp_path):
    """The token the engine samples after a scored prompt is not shown: usage said completion_tokens 1, and the ledger
    billed it, for an answer holding the prompt alone."""
    scored = {**COMPLETION, "echo": True, "max_tokens": 0}
    whole, streamed = post_each(engine, tmp_path / "db", [
        ("/v1/completions", scored),
        ("/v1/completions", {**scored, "stream": True, "stream_options": {"include_usage": True}}),
    ])  # fmt: skip
    prompt_tokens = len(engine.tokenizer.encode(COMPLETION["prompt"]))
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    for usage in (whole.json()["usage"], events[-1]["usage"]):
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
            prompt_tokens, 0, prompt_tokens,
        )  # fmt: skip
    rows = Ledger(open_database(tmp_path / "db")).records()
    assert [(row["prompt_tokens"], row["completion_tokens"]) for row in rows] == [(prompt_tokens, 0)] * 2


def test_a_chat_without_max_tokens_stops_at_the_checkpoints_generation_config_max_new_tokens(tmp_path):
    """vLLM takes generation_config.json's max_new_tokens as its default max_tokens (and `seekstack generate` and
    `chat` read it, abe92f6): a chat leaving max_tokens unset filled the context's room instead."""
    model_dir = make_model_dir(tmp_path / "shipped")
    (model_dir / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))
    unset = {name: value for name, value in CHAT.items() if name != "max_tokens"}
    left, given = post_each(Engine.from_pretrained(model_dir), tmp_path / "db", [
        ("/v1/chat/completions", unset),
        ("/v1/chat/completions", {**unset, "max_tokens": 5}),
    ])  # fmt: skip
    assert [(answer.json()["usage"]["completion_tokens"], answer.json()["choices"][0]["finish_reason"])
            for answer in (left, given)] == [(3, "length"), (5, "length")]  # fmt: skip


@pytest.mark.parametrize("field", REASONING_FIELDS)  # each name the tokenizer reads: ChatMessage must declare it
def test_a_replayed_reasoning_must_be_text_as_content_is(engine, tmp_path, field):
    """A replayed assistant turn's reasoning given apart (DeepSeek's, vLLM's, transformers' field) was accepted of any
    type ({"reasoning": 5}) and dropped unseen; text is still left out of the prompt."""

    def chat(**reasoning) -> dict:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", **reasoning}]
        return {**CHAT, "messages": [*turns, {"role": "user", "content": "Hello"}]}

    plain, reasoned, numbered = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", chat()),
        ("/v1/chat/completions", chat(**{field: "2 + 3 is 5"})),
        ("/v1/chat/completions", chat(**{field: 5})),
    ])  # fmt: skip
    assert reasoned.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    error = error_of(numbered, 400)
    assert (error["param"], error["message"]) == (
        f"messages.1.{field}", f"invalid request: messages.1.{field}: Input should be a valid string, got 5",
    )  # fmt: skip


VLLM_REFUSED = {
    "use_beam_search": True,
    "include_stop_str_in_output": True,
    "guided_json": {"type": "object"},
    "guided_regex": "[a-z]+",
    "guided_choice": ["yes", "no"],
    "guided_grammar": 'root ::= "x"',
    "structured_outputs": {"choice": ["yes", "no"]},
    "truncate_prompt_tokens": 8,
    "logits_processors": ["my_module.MyProcessor"],
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "cache_salt": "tenant-1",
    "priority": -5,
}
VLLM_CHAT_REFUSED = {
    "chat_template": "{{ messages }}",
    "add_generation_prompt": False,
    "continue_final_message": True,
    "echo": True,
}
VLLM_ASKING_NOTHING = {"min_tokens": 0, "use_beam_search": False, "include_stop_str_in_output": False, "bad_words": [],
                       "return_tokens_as_token_ids": False, "return_token_ids": False, "priority": 0}  # fmt: skip


def test_vllm_fields_that_would_change_the_reply_are_refused_by_name_not_ignored(engine, tmp_path):
    """They were ignored as unknown fields: guided_json answered free text, return_tokens_as_token_ids logprobs'
    tokens as text."""
    fields = [*VLLM_REFUSED, *VLLM_REFUSED, *VLLM_CHAT_REFUSED]
    requests = [("/v1/completions", {**COMPLETION, field: value}) for field, value in VLLM_REFUSED.items()]
    requests += [("/v1/chat/completions", {**CHAT, field: value})
                 for field, value in {**VLLM_REFUSED, **VLLM_CHAT_REFUSED}.items()]  # fmt: skip
    for field, response in zip(fields, post_each(engine, tmp_path / "db", requests), strict=True):
        error = error_of(response, 400)
        assert (error["param"], error["code"]) == (field, "unsupported_parameter"), error
        assert error["message"].endswith(f"send the request without {field}")
    chat_nothing = {"add_generation_prompt": True, "continue_final_message": False}
    answered = post_each(
        engine,
        tmp_path / "db",
        [
            ("/v1/completions", {**COMPLETION, **VLLM_ASKING_NOTHING}),
            ("/v1/chat/completions", {**CHAT, **VLLM_ASKING_NOTHING, **chat_nothing, "echo": False}),
        ],
    )
    assert [response.status_code for response in answered] == [200, 200]  # values that ask for nothing more


def test_chat_template_kwargs_the_template_does_not_read_are_dropped_and_those_it_reads_refused(engine, tmp_path):
    """chat_template_kwargs were refused whatever their keys, where vLLM drops a key the chat template does not read
    (resolve_chat_template_kwargs), so a client sending {"enable_thinking": false} to every model got 400 here and the
    same prompt there. Such keys are dropped now; a key the template reads (or one of apply_chat_template's options)
    is refused naming it, on the chat route and /tokenize alike."""
    dropped = {"enable_thinking": False, "thinking": True}
    plain, unread, counted, generation, bos, counted_bos = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": dropped}),
        ("/tokenize", {"messages": CHAT["messages"], "chat_template_kwargs": dropped}),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": False, "bos_token": "x"}}),
        ("/tokenize", {"messages": CHAT["messages"], "chat_template_kwargs": {"bos_token": "x"}}),
    ])  # fmt: skip
    assert unread.status_code == 200, unread.text
    assert unread.json()["choices"] == plain.json()["choices"] and unread.json()["usage"] == plain.json()["usage"]
    assert counted.json()["tokens"] == engine.tokenizer.encode_chat(CHAT["messages"])
    for refused, key in ((generation, "add_generation_prompt"), (bos, "bos_token"), (counted_bos, "bos_token")):
        error = error_of(refused, 400)
        assert (error["param"], error["code"]) == (f"chat_template_kwargs.{key}", "unsupported_parameter")
        assert error["message"].startswith(f"chat_template_kwargs.{key}: the chat template reads {key}")


def test_chat_template_kwargs_read_by_the_checkpoints_own_template_are_refused(tmp_path):
    """A checkpoint's own template (DeepSeek-V3.1's reads `thinking`), which vLLM renders with the key, while this
    server writes the DeepSeek-V3 format: refused, not dropped."""
    folder = make_model_dir(tmp_path).parent / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if thinking %}<think>{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_file(folder)
    body = {"model": "model", "messages": [{"role": "user", "content": "Hello"}]}
    with pytest.raises(APIError) as refused:
        prompt_ids(
            ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": {"thinking": True}}), tokenizer
        )
    assert (refused.value.status, refused.value.param) == (400, "chat_template_kwargs.thinking")
    kept = ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": {"enable_thinking": True}})
    assert prompt_ids(kept, tokenizer) == [tokenizer.encode_chat(body["messages"])]


def test_chat_template_kwargs_beside_a_shipped_template_that_does_not_compile_are_read_by_the_format_written(tmp_path):
    """A checkpoint with the DeepSeek-V3 role tokens writes its chats itself, so a damaged template shipped beside its
    tokenizer is never rendered; reading its variables for chat_template_kwargs raised TemplateSyntaxError (a 500)."""
    folder = make_model_dir(tmp_path).parent / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% if %}"}))
    tokenizer = Tokenizer.from_file(folder)
    body = {"model": "model", "messages": [{"role": "user", "content": "Hello"}]}
    kept = ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert prompt_ids(kept, tokenizer) == [tokenizer.encode_chat(body["messages"])]
    with pytest.raises(APIError) as refused:
        read = ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": {"messages": []}})
        prompt_ids(read, tokenizer)
    assert (refused.value.status, refused.value.param) == (400, "chat_template_kwargs.messages")


@torch.inference_mode()
def test_prompt_logprobs_are_vllms_each_prompt_token_with_its_rank_and_the_likeliest(engine, tmp_path):
    """vLLM's prompt_logprobs were refused ("this server gives no logprobs of the prompt"). Each choice carries them
    in vLLM's shape: per prompt token (the first null) {token id: {logprob, rank, decoded_token}}, the prompt's token
    first, then the k likeliest; a stream is refused (as vLLM refuses one)."""
    prompt = engine.tokenizer.encode("The quick brown fox jumps")
    body = {**GREEDY, "prompt": prompt, "n": 2, "prompt_logprobs": 2}
    asked, plain, streamed = post_each(engine, tmp_path / "db", [
        ("/v1/completions", body), ("/v1/completions", {**GREEDY, "prompt": prompt}),
        ("/v1/completions", {**body, "stream": True}),
    ])  # fmt: skip
    full = engine.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # position j - 1 predicts token j
    expected = [None]
    for j, token in enumerate(prompt[1:], start=1):
        likeliest = full[j - 1].topk(2).indices.tolist()
        own = {"logprob": full[j - 1, token].item(), "rank": int((full[j - 1] > full[j - 1, token]).sum()) + 1}
        expected.append({str(token): {**own, "decoded_token": engine.tokenizer.decode([token])}})
        for rank, top in enumerate(likeliest, start=1):
            entry = {"logprob": full[j - 1, top].item(), "rank": rank, "decoded_token": engine.tokenizer.decode([top])}
            expected[j].setdefault(str(top), entry)
    for choice in asked.json()["choices"]:
        assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(prompt)
        for served, wanted in zip(choice["prompt_logprobs"][1:], expected[1:], strict=True):
            assert list(served) == list(wanted)  # the prompt's token first
            assert {k: (v["rank"], v["decoded_token"]) for k, v in served.items()} == {
                k: (v["rank"], v["decoded_token"]) for k, v in wanted.items()
            }
            assert [v["logprob"] for v in served.values()] == pytest.approx([v["logprob"] for v in wanted.values()],
                                                                             abs=1e-4)  # fmt: skip
    assert plain.json()["choices"][0]["prompt_logprobs"] is None
    assert error_of(streamed, 400)["param"] == "prompt_logprobs"


def test_chat_gives_the_prompt_logprobs_of_its_messages_as_vllms_response_does(engine, tmp_path):
    """Chat refused prompt_logprobs (pointing to /v1/completions with the messages' ids); vLLM's chat response carries
    them, for the prompt the messages make, beside its choices; a stream is refused, as for completions."""
    tokenized, chat, streamed = post_each(engine, tmp_path / "db", [
        ("/tokenize", {"messages": CHAT["messages"], "add_generation_prompt": True}),
        ("/v1/chat/completions", {**CHAT, "prompt_logprobs": 2}),
        ("/v1/chat/completions", {**CHAT, "prompt_logprobs": 2, "stream": True}),
    ])  # fmt: skip
    [completion] = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**GREEDY, "prompt": tokenized.json()["tokens"], "prompt_logprobs": 2}),
    ])  # fmt: skip
    expected = completion.json()["choices"][0]["prompt_logprobs"]
    served = chat.json()["prompt_logprobs"]
    assert served[0] is None and len(served) == len(expected) == tokenized.json()["count"]
    for entry, wanted in zip(served[1:], expected[1:], strict=True):
        assert {k: (v["rank"], v["decoded_token"]) for k, v in entry.items()} == {
            k: (v["rank"], v["decoded_token"]) for k, v in wanted.items()
        }
    assert error_of(streamed, 400)["param"] == "prompt_logprobs"


def test_echo_with_logprobs_puts_the_prompts_tokens_first_as_openais_legacy_completions(engine, tmp_path):
    """echo with logprobs was refused; OpenAI's legacy completions and vLLM answer it with the prompt's tokens first,
    the first one's logprob null (lm-eval's local-completions scores a continuation so), then the choice's own;
    streamed, the same tokens in its chunks, as vLLM streams them."""
    prompt = engine.tokenizer.encode("The quick brown fox jumps")
    body = {**GREEDY, "prompt": prompt, "max_tokens": 3, "logprobs": 2}
    echoed, plain, streamed = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**body, "echo": True}), ("/v1/completions", body),
        ("/v1/completions", {**body, "echo": True, "stream": True}),
    ])  # fmt: skip
    choice, own = echoed.json()["choices"][0], plain.json()["choices"][0]["logprobs"]
    logprobs, texts = choice["logprobs"], [engine.tokenizer.decode([token]) for token in prompt]
    assert logprobs["tokens"] == texts + own["tokens"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    entries = zip(choice["prompt_logprobs"][1:], prompt[1:], strict=True)
    scored = [entry[str(token)]["logprob"] for entry, token in entries]
    assert logprobs["token_logprobs"][1:] == pytest.approx(scored + own["token_logprobs"], abs=1e-5)
    assert all(len(top) in (2, 3) for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"][len(prompt)] == len("".join(texts)) and choice["text"].startswith("".join(texts))
    chunks = [json.loads(line[6:])["choices"] for line in streamed.text.splitlines() if line.startswith("data: {")]
    pieces = [choice for choices in chunks for choice in choices]  # as vLLM streams it (the stream was refused)
    assert "".join(piece["text"] for piece in pieces) == choice["text"]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [value for piece in pieces for value in piece["logprobs"][field]] == logprobs[field], field


def test_reasoning_effort_is_refused_without_telling_a_reasoning_model_it_does_not_reason(engine, tmp_path):
    """A model from `seekstack sft task=` or `rl` reasons in <think> before it answers; the effort is what is unset."""
    [refused] = post_each(engine, tmp_path / "db", [("/v1/chat/completions", {**CHAT, "reasoning_effort": "low"})])
    message = error_of(refused, 400)["message"]
    assert "does not reason" not in message and "no reasoning effort to set" in message


def test_stream_options_without_a_stream_is_refused_naming_it(engine, tmp_path):
    options = {"stream_options": {"include_usage": True}}
    requests = [("/v1/completions", {**COMPLETION, **options}), ("/v1/chat/completions", {**CHAT, **options}),
                ("/v1/completions", {**COMPLETION, **options, "stream": False})]  # fmt: skip
    for response in post_each(engine, tmp_path / "db", requests):
        error = error_of(response, 400)
        assert (error["param"], error["code"]) == ("stream_options", "invalid_value"), error
        assert "stream: true" in error["message"]


def test_fields_that_ask_for_nothing_the_server_does_not_do_are_accepted(engine, tmp_path):
    harmless = {"tool_choice": "none", "function_call": "none", "modalities": ["text"], "store": False,
                "metadata": {"run": "1"}, "service_tier": "auto", "user": "u1", "some_vllm_extra": 1}  # fmt: skip
    [plain, *answers] = post_each(
        engine, tmp_path / "db", [("/v1/chat/completions", CHAT)] + [("/v1/chat/completions", {**CHAT, **harmless})]
    )
    assert [answer.status_code for answer in answers] == [200]
    assert answers[0].json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_tools_offered_with_tool_choice_none_are_accepted_and_a_reply_is_text(engine, tmp_path):
    """Agent frameworks send their tools on every call; with tool_choice "none" (no call may come) the request was
    refused naming tools (400), where OpenAI and vLLM answer it in text. The tools stay out of the prompt."""
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    plain, offered = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "tools": [tool], "tool_choice": "none", "parallel_tool_calls": False}),
    ])  # fmt: skip
    assert offered.status_code == 200, offered.text
    assert offered.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert offered.json()["usage"] == plain.json()["usage"]


def test_an_assistant_turns_null_content_is_read_as_empty_and_a_users_is_refused(engine, tmp_path):
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": None}]
    empty = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": ""}]
    null_reply, empty_reply, null_user = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": [*history, {"role": "user", "content": "Hi"}]}),
        ("/v1/chat/completions", {**CHAT, "messages": [*empty, {"role": "user", "content": "Hi"}]}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}),
    ])  # fmt: skip
    assert null_reply.status_code == 200, null_reply.text
    assert null_reply.json()["choices"] == empty_reply.json()["choices"]
    assert null_reply.json()["usage"] == empty_reply.json()["usage"]
    error = error_of(null_user, 400)
    assert error["param"] == "messages.0.content" and "a user message needs content" in error["message"]


def test_a_prefix_message_is_continued_as_deepseeks_chat_prefix_completion(engine, tmp_path):
    """The reply continues the last message, an assistant's marked `prefix`, instead of answering it anew."""
    question = {"role": "user", "content": "Write code"}
    start = {"role": "assistant", "content": "```python\n", "prefix": True}
    continued, not_last, json_mode = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": [question, start]}),
        ("/v1/chat/completions", {**CHAT, "messages": [start, question]}),
        ("/v1/chat/completions", {**CHAT, "messages": [question, start], "response_format": {"type": "json_object"}}),
    ])  # fmt: skip
    prompt = engine.tokenizer.encode_chat([question, {**start, "prefix": None}], continue_final_message=True)
    assert engine.tokenizer.decode(prompt).endswith("<｜Assistant｜>```python\n")
    greedy_params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, skip_special_tokens=True)
    [greedy] = engine.generate([prompt], greedy_params)
    assert continued.status_code == 200, continued.text
    assert continued.json()["usage"]["prompt_tokens"] == len(prompt)
    assert continued.json()["choices"][0]["message"]["content"] == greedy.text
    error = error_of(not_last, 400)
    assert error["param"] == "messages.0.prefix" and "only the last message, an assistant's" in error["message"]
    assert error_of(json_mode, 400)["param"] == "response_format"


def test_text_parts_are_read_as_their_texts_joined_by_newlines(engine, tmp_path):
    """As vLLM's server joins them, and as `seekstack sft` reads them: a conversation is served as it was trained."""
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    joined, split = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hello\nthere"}]}),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": parts}]}),
    ])  # fmt: skip
    assert split.status_code == 200, split.text
    assert split.json()["choices"] == joined.json()["choices"] and split.json()["usage"] == joined.json()["usage"]


def test_an_empty_array_of_parts_is_refused_as_openai_refuses_it(engine, tmp_path):
    """`content: []` was served as an empty message, where OpenAI refuses it ("empty array. Expected an array with
    minimum length 1"): a client's empty list is a mistake, not a text."""
    refusals = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": []}]}),
        ("/v1/chat/completions", {**CHAT, "messages": [HELLO, {"role": "assistant", "content": []}, WHY]}),
        ("/tokenize", {"messages": [{"role": "user", "content": []}]}),
    ])  # fmt: skip
    errors = [error_of(refused, 400) for refused in refusals]
    assert [error["param"] for error in errors] == ["messages.0.content", "messages.1.content", "messages.0.content"]
    assert all("List should have at least 1 item after validation, not 0" in error["message"] for error in errors)


def test_an_empty_array_of_tool_calls_is_refused_as_openai_refuses_it(engine, tmp_path):
    """An assistant turn's `tool_calls: []` (openai-python's beta parse returned one, replayed by its callers) was
    served as a turn without calls, where OpenAI refuses it ("Invalid 'messages[1].tool_calls': empty array")."""
    assistant = {"role": "assistant", "content": "Hi", "tool_calls": []}
    refusals = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": [HELLO, assistant, WHY]}),
        ("/tokenize", {"messages": [HELLO, assistant, WHY]}),
    ])  # fmt: skip
    for refused in refusals:
        error = error_of(refused, 400)
        assert error["param"] == "messages.1.tool_calls"
        assert "List should have at least 1 item after validation, not 0" in error["message"]


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file"])
def test_a_part_the_model_cannot_read_is_refused_by_its_type(engine, tmp_path, kind):
    """OpenAI's image, audio and file parts got pydantic's failures of every branch of the content union ('Input should
    be a valid string, got [...]; messages.0.content.1.TextPart.type: Input should be 'text' ...; RefusalPart.refusal:
    Field required'), which never said that the model reads no such part."""
    parts = [{"type": "text", "text": "What is this?"}, {"type": kind, kind: {}}]
    message = {"role": "user", "content": parts}
    chat, counted = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": [message]}), ("/tokenize", {"messages": [message]})
    ])  # fmt: skip
    for refused in (chat, counted):
        error = error_of(refused, 400)
        assert error["param"] == "messages.0.content"
        assert f"part 1 is of type {kind!r}, which this model does not read" in error["message"]
        assert "TextPart" not in error["message"] and "RefusalPart" not in error["message"]


REFUSED_PARTS = [{"type": "refusal", "refusal": "I can't."}, {"type": "text", "text": "Ask me another."}]
HELLO, WHY = {"role": "user", "content": "Hello"}, {"role": "user", "content": "Why?"}


@pytest.mark.parametrize(
    "said, replayed, refused",
    [
        pytest.param(
            "I can't.\nAsk me another.",
            {"role": "assistant", "content": REFUSED_PARTS},
            [
                (
                    [{"role": "user", "content": REFUSED_PARTS}],
                    "messages.0.content",
                    "a user message has no refusal parts",
                )
            ],
            id="refusal-part",
        ),
        pytest.param(
            "I can't.",
            {"role": "assistant", "content": None, "refusal": "I can't."},
            [
                (
                    [HELLO, {"role": "assistant", "content": "Sure.", "refusal": "I can't."}, WHY],
                    "messages.1.refusal",
                    "holds content or a refusal",
                ),
                ([{**HELLO, "refusal": "No."}], "messages.0.refusal", "a user message has no refusal"),
            ],
            id="refusal-field",
        ),
    ],
)
def test_an_assistants_refusal_is_read_as_its_text_as_openai_takes_it_and_vllm_reads_it(
    engine, tmp_path, said, replayed, refused
):
    """A replayed assistant turn that refused, as OpenAI takes it: a refusal part among its content parts (
    {"type": "refusal", "refusal": ...}, a 400 here before cd35fd9) or OpenAI's reply that refuses, {"content": null,
    "refusal": ...} (its refusal dropped before 97d66c6, an empty reply in the prompt). Either reaches the prompt as
    the text it says. A refusal in a user's message, or beside an assistant's content, is refused naming the field."""
    turns = [HELLO, {"role": "assistant", "content": said}, WHY]
    as_text, as_refusal, *errors = post_each(engine, tmp_path / "db", [
        ("/v1/chat/completions", {**CHAT, "messages": turns}),
        ("/v1/chat/completions", {**CHAT, "messages": [HELLO, replayed, WHY]}),
        *(("/v1/chat/completions", {**CHAT, "messages": messages}) for messages, _, _ in refused),
    ])  # fmt: skip
    assert as_refusal.status_code == 200, as_refusal.text
    assert as_refusal.json()["usage"]["prompt_tokens"] == as_text.json()["usage"]["prompt_tokens"]
    assert as_refusal.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
    for response, (_, param, words) in zip(errors, refused, strict=True):
        error = error_of(response, 400)
        assert error["param"] == param and words in error["message"]


@pytest.mark.parametrize(
    "route, body, echoed",
    [("/v1/completions", COMPLETION, 0), ("/v1/chat/completions", CHAT, 0),
     ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}, 1)],
)  # fmt: skip
def test_continuous_usage_stats_put_its_choices_usage_so_far_on_every_chunk_as_vllm(
    engine, tmp_path, route, body, echoed
):
    """vLLM's stream_options extension was read and ignored: no chunk but the last had a usage. An echo with
    logprobs, sent with its choice's first token (which brings the prompt's logprobs), had none: its usage is that
    token's."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    [response] = post_each(engine, tmp_path / "db", [(route, {**body, "n": 2, "max_tokens": 4, "stream": True,
                                                               "stream_options": options})])  # fmt: skip
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    *chunks, last = [json.loads(event) for event in events[:-1]]
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert {(chunk["usage"]["prompt_tokens"], chunk["usage"]["total_tokens"] - chunk["usage"]["completion_tokens"])
            for chunk in chunks} == {(prompt_tokens, prompt_tokens)}  # fmt: skip
    if route == "/v1/chat/completions":  # the role chunks, one a choice, before any token
        roles, chunks = chunks[:2], chunks[2:]
        assert [(role["choices"][0]["index"], role["usage"]["completion_tokens"]) for role in roles] == [(0, 0), (1, 0)]
    for index in (0, 1):  # each token's chunk: its choice's completion tokens so far
        counts = [chunk["usage"]["completion_tokens"] for chunk in chunks if chunk["choices"][0]["index"] == index]
        assert counts == [1] * echoed + [1, 2, 3, 4]


@pytest.mark.parametrize(
    "route, body, opening",
    [
        ("/v1/chat/completions", CHAT, lambda choice: choice["delta"] == {"role": "assistant", "content": ""}),
        ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": None},
         lambda choice: choice["text"] == COMPLETION["prompt"]),
    ],
)  # fmt: skip
def test_a_stream_of_n_choices_sends_one_choice_a_chunk_as_openai_and_vllm(engine, tmp_path, route, body, opening):
    """The chunk opening the stream (chat's roles, a completion's echoed prompts) held every choice at once, where
    OpenAI and vLLM send each choice in a chunk of its own: a client reading choices[0] of each chunk missed the
    role or the echoed prompt of every choice but the first."""
    [streamed] = post_each(engine, tmp_path / "db", [(route, {**body, "n": 3, "stream": True})])
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert [len(chunk["choices"]) for chunk in chunks] == [1] * len(chunks)
    assert [chunk["choices"][0]["index"] for chunk in chunks[:3]] == [0, 1, 2]
    assert all(opening(chunk["choices"][0]) for chunk in chunks[:3])


@pytest.mark.parametrize(
    "route, body, schema",
    [("/v1/completions", COMPLETION, CompletionRequest), ("/v1/chat/completions", CHAT, ChatCompletionRequest)],
)
def test_stop_token_ids_end_a_choice_at_the_first_of_them_as_vllm(engine, tmp_path, route, body, schema):
    """vLLM's stop_token_ids was read and ignored: the reply ran on to max_tokens past them."""
    [prompt] = prompt_ids(schema.model_validate(body), engine.tokenizer)
    [greedy] = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    ids = greedy.token_ids
    stop_at = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])  # the first time a new token comes
    never = next(token for token in range(engine.tokenizer.vocab_size) if token not in ids)
    [stopped] = post_each(engine, tmp_path / "db", [(route, {**body, "stop_token_ids": [never, ids[stop_at]]})])
    choice = stopped.json()["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    assert (choice["finish_reason"], text) == ("stop", engine.tokenizer.decode(ids[:stop_at]))  # its text left out
    assert stopped.json()["usage"]["completion_tokens"] == stop_at + 1
    [outside] = post_each(engine, tmp_path / "db", [(route, {**body, "stop_token_ids": [320]})])
    assert error_of(outside, 400)["message"] == "stop_token_ids.0: token id 320 is outside the vocabulary [0, 320)"


def test_every_response_has_an_x_request_id_the_clients_or_its_own_that_names_a_completion(engine, tmp_path):
    """A client's X-Request-Id names its response (vLLM's ids) and comes back as a header. Without one, none came
    back, where OpenAI answers every call with its x-request-id (the openai client's `_request_id`, an error's
    `request_id`): each response now has one of its own, a completion's being its id's."""

    async def scenario(client):
        traced = {"X-Request-Id": "trace-42"}
        completions = [
            await client.post(route, json={**body, "stream": stream}, headers=headers)
            for headers in (traced, {})
            for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))
            for stream in (False, True)
        ]
        others = [await client.get("/v1/models"), await client.post("/v1/completions", json={**COMPLETION, "n": 0})]
        with database.transaction() as statements:  # a broken database: the 500 of an unexpected error
            statements.execute("DROP TABLE keys")
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # answered, then raised to the server
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000") as failing:
            return completions, [*others, await failing.get("/v1/models")]

    database = open_database(tmp_path / "db")
    app = create_app(engine, database)
    completions, (models, refused, failed) = run(app, scenario)
    ids = [
        json.loads(response.text.split("\n")[0].removeprefix("data: "))["id"] if response.text.startswith("data:")
        else response.json()["id"]
        for response in completions
    ]  # fmt: skip
    assert ids[:4] == ["cmpl-trace-42", "cmpl-trace-42", "chatcmpl-trace-42", "chatcmpl-trace-42"]
    headers = [response.headers.get("x-request-id") for response in completions]
    assert headers[:4] == ["trace-42"] * 4
    assert headers[4:] == [response_id.partition("-")[2] for response_id in ids[4:]]  # was: None
    assert len(set(ids[4:])) == 4 and all(re.fullmatch("[0-9a-f]{32}", header) for header in headers[4:])
    error_of(refused, 400), error_of(failed, 500)
    others = [answer.headers.get("x-request-id", "") for answer in (models, refused, failed)]
    assert all(re.fullmatch("[0-9a-f]{32}", header) for header in others), others
    assert len({*headers[4:], *others}) == 7


def test_a_bodys_request_id_names_the_completion_where_no_x_request_id_header_does_as_vllms(engine, tmp_path):
    """vLLM names a completion by the X-Request-Id header, else by the body's request_id (chatcmpl-{request_id});
    the field was dropped as unknown, so a vLLM client's request_id named nothing. It now names the response and
    comes back as X-Request-Id; the header still wins, and an id no header can carry is refused naming it."""

    async def scenario(client):
        answers = [
            await client.post(route, json={**body, "stream": stream, "request_id": "job-7"}, headers=headers)
            for headers in ({}, {"X-Request-Id": "trace-42"})
            for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))
            for stream in (False, True)
        ]
        return answers, await client.post("/v1/completions", json={**COMPLETION, "request_id": "job 7\n"})

    answers, refused = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    ids = [
        json.loads(answer.text.split("\n")[0].removeprefix("data: "))["id"] if answer.text.startswith("data:")
        else answer.json()["id"]
        for answer in answers
    ]  # fmt: skip
    assert ids == ["cmpl-job-7"] * 2 + ["chatcmpl-job-7"] * 2 + ["cmpl-trace-42"] * 2 + ["chatcmpl-trace-42"] * 2
    assert [answer.headers["x-request-id"] for answer in answers] == ["job-7"] * 4 + ["trace-42"] * 4
    assert error_of(refused, 400)["param"] == "request_id"


def test_an_x_request_id_header_is_held_to_the_bodys_request_id_rule(engine, tmp_path):
    """A body's request_id is 1 to 256 visible ASCII characters, but the header was taken unchecked: 10,000 characters
    became the completion's id and every log line's, and a UTF-8 one came back garbled ('cafÃ©'). Such a header is
    refused (400, param X-Request-Id), the refusal carrying an id of its own; one within the rule still names it."""
    headers = ["x" * 10_000, "café".encode(), "job 7", "x" * 256]

    async def scenario(client):
        refusals = [await client.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": h}) for h in headers]
        return refusals, await client.get("/v1/models", headers={"X-Request-Id": "x" * 257})

    (*refused, longest), models = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    errors = [error_of(answer, 400) for answer in (*refused, models)]
    assert [(error["param"], error["code"]) for error in errors] == [("X-Request-Id", "invalid_value")] * 4
    assert errors[0]["message"].startswith("invalid request: X-Request-Id: String should have at most 256 characters")
    assert errors[1]["message"].endswith(", got 'café'")
    assert all(re.fullmatch("[0-9a-f]{32}", answer.headers["x-request-id"]) for answer in (*refused, models))
    assert (longest.json()["id"], longest.headers["x-request-id"]) == ("cmpl-" + "x" * 256, "x" * 256)


def test_an_empty_x_request_id_header_leaves_the_bodys_request_id_to_name_the_completion(engine, tmp_path):
    """An empty X-Request-Id is no id (RequestIds gives a random one for it), but it kept the body's request_id from
    naming the completion, which came back with a random id."""

    async def scenario(client):
        return await client.post(
            "/v1/completions", json={**COMPLETION, "request_id": "job-7"}, headers={"X-Request-Id": ""}
        )

    answer = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert (answer.json()["id"], answer.headers["x-request-id"]) == ("cmpl-job-7", "job-7")


@pytest.mark.parametrize("field", ["prompt_logprobs", "logprobs"])
def test_vllms_minus_one_for_the_whole_vocabularys_logprobs_is_refused_saying_what_it_asks(field):
    """-1 was refused as any negative count ("greater than or equal to 0, got -1"), which told a vLLM user nothing."""
    body = json.dumps({"model": "model", "prompt": "x", field: -1}).encode()
    with pytest.raises(APIError) as refused:
        parse_body(CompletionRequest, body)
    assert refused.value.param == field
    assert "-1 asks for the logprobs of the whole vocabulary" in refused.value.message


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_a_request_naming_no_model_is_served_by_the_base_model_as_vllms(engine, tmp_path, route, body):
    """vLLM's requests take `model` as optional (left out or null: the model served); it was refused with 400
    'model: Field required', so a vLLM user's curl without it failed here."""
    unnamed = {field: value for field, value in body.items() if field != "model"}
    named, left_out, null, empty = post_each(engine, tmp_path / "db", [
        (route, body), (route, unnamed), (route, {**unnamed, "model": None}), (route, {**unnamed, "model": ""})
    ])  # fmt: skip
    assert [answer.status_code for answer in (named, left_out, null)] == [200, 200, 200]  # was: 200, 400, 400
    assert left_out.json()["model"] == null.json()["model"] == "model"  # the base model's name, as vLLM answers
    assert tokens_of(left_out) == tokens_of(null) == tokens_of(named)  # greedy: the base model's reply
    assert error_of(empty, 400)["param"] == "model"  # a name, if one is given (the OpenAPI document lists them)


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", CHAT),
        ("/tokenize", {"prompt": "The quick brown"}),
        ("/detokenize", {"tokens": [1, 2]}),
    ],
)
def test_fields_the_server_ignores_are_named_in_its_log_as_vllm_logs_them(engine, tmp_path, caplog, route, body):
    """An unknown field (a misspelt `max_token`, OpenAI's `metadata`) was dropped without a word anywhere: the reply
    ignored it and the operator could not tell. vLLM logs a warning naming such fields (on /tokenize and /detokenize
    too, which named none here after the completions did); the server now does too."""
    with caplog.at_level("WARNING", logger="seekstack.serve"):
        answered, plain = post_each(engine, tmp_path / "db", [(route, {**body, "max_token": 2, "metadata": {}}),
                                                              (route, body)])  # fmt: skip
    assert (answered.status_code, plain.status_code) == (200, 200)  # accepted, as OpenAI-compatible servers do
    ignored = [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]
    assert ignored == ["The following fields were present in the request but ignored: max_token, metadata"]


def test_an_ignored_field_named_with_a_line_break_writes_no_line_of_its_own_into_the_log(engine, tmp_path, caplog):
    """A client's unknown field, x + a line break + "ERROR:    forged", was named as it came: the log showed a line
    the server never wrote. Such a name, and one too long to read, is named by its repr, cut as errors cut a value."""
    long = "y" * 500
    with caplog.at_level("WARNING", logger="seekstack.serve"):
        [answered] = post_each(engine, tmp_path / "db", [("/detokenize", {"tokens": [1], "x\nERROR:    forged": 1,
                                                                          long: 1, "max_token": 1})])  # fmt: skip
    assert answered.status_code == 200
    ignored = [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]
    assert ignored == [
        "The following fields were present in the request but ignored: max_token, 'x\\nERROR:    forged', "
        f"{shown_value(long)}"
    ]


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_fields_the_server_ignores_in_an_object_of_the_request_are_named_by_their_path(
    engine, tmp_path, caplog, route, body
):
    """An unknown field of stream_options or response_format (a misspelt include_usuage, which leaves the stream
    without usage) was dropped without a word, where vLLM's StreamOptions and ResponseFormat log it as they log the
    request's own. The warning now names them too, by their path."""
    schema = {"name": "x", "schema": {}, "strict_mode": True}
    asked = {**body, "stream": True, "stream_options": {"include_usuage": True},
             "response_format": {"type": "text", "json_schema": schema}}  # fmt: skip
    with caplog.at_level("WARNING", logger="seekstack.serve"):
        [answered] = post_each(engine, tmp_path / "db", [(route, asked)])
    assert answered.status_code == 200 and '"usage"' not in answered.text  # ignored, as before
    ignored = [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]
    assert ignored == [
        "The following fields were present in the request but ignored: response_format.json_schema.strict_mode, "
        "stream_options.include_usuage"
    ]


def test_chat_template_kwargs_for_a_tokenizer_built_in_memory_read_no_file_of_the_current_directory(
    tmp_path, monkeypatch
):
    """A tokenizer built in Python (source "<in memory>") had its shipped template looked for in the current
    directory: a folder named tokenizer_config.json there raised IsADirectoryError (a 500), and the files were read
    again on every request with chat_template_kwargs. Only a tokenizer read from a file has a shipped template."""
    folder = make_model_dir(tmp_path).parent / "tokenizer"
    in_memory = Tokenizer(Tokenizer.from_file(folder).backend)
    (tmp_path / "work" / CONFIG_FILE).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    body = {"model": "model", "messages": [{"role": "user", "content": "Hello"}]}
    request = ChatCompletionRequest.model_validate({**body, "chat_template_kwargs": {"thinking": True}})
    assert prompt_ids(request, in_memory) == [in_memory.encode_chat(body["messages"])]  # dropped: no template reads it


WHOLE_NUMBERS = [
    ("/v1/completions", {**COMPLETION, "prompt": [5, 6, 7], "max_tokens": 3, "n": 2, "best_of": 2, "seed": 7,
                         "top_k": 2, "min_tokens": 1, "logprobs": 1, "prompt_logprobs": 1, "stop_token_ids": [3]}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 3, "n": 2, "top_logprobs": 1, "prompt_logprobs": 1}),
    ("/v1/chat/completions", {**{k: v for k, v in CHAT.items() if k != "max_tokens"}, "max_completion_tokens": 3}),
    ("/detokenize", {"tokens": [5, 6, 7]}),
]  # fmt: skip


def test_a_whole_number_written_as_a_float_is_the_integer_an_integer_field_takes_and_a_string_is_refused(
    engine, tmp_path
):
    """max_tokens 5.0 (what Python's json writes for a float count) was refused "Input should be a valid integer", a
    value /openapi.json's "type": "integer" allows (JSON Schema's integer is any number without a fraction) and vLLM
    serves. Every integer field now reads it as the integer, the answer the same; "2" and 2.5 are still refused
    naming the field, as OpenAI's API refuses a string there."""

    def floats(value):
        return [floats(item) for item in value] if isinstance(value, list) else float(value)

    integers = {"prompt", "max_tokens", "max_completion_tokens", "n", "best_of", "seed", "top_k", "min_tokens",
                "logprobs", "top_logprobs", "prompt_logprobs", "stop_token_ids", "tokens"}  # fmt: skip
    requests, refusals = [], []
    for route, body in WHOLE_NUMBERS:
        fields = sorted(integers & body.keys() - ({"logprobs"} if "chat" in route else set()))
        requests += [(route, body), (route, {**body, **{field: floats(body[field]) for field in fields}})]
        for field in fields:
            wrong = [["2"], [2.5]] if isinstance(body[field], list) else ["2", 2.5]
            wrong = wrong[1:] if field == "prompt" else wrong  # ["2"]: a prompt text
            refusals += [(route, field, {**body, field: value}) for value in wrong]
    answers = post_each(engine, tmp_path / "db", [*requests, *[(route, body) for route, _, body in refusals]])
    for plain, floated in zip(answers[: len(requests) : 2], answers[1 : len(requests) : 2], strict=True):
        assert floated.status_code == 200, floated.text
        drop = {"id", "created"}
        assert {k: v for k, v in floated.json().items() if k not in drop} == {
            k: v for k, v in plain.json().items() if k not in drop
        }
    for (route, field, body), refused in zip(refusals, answers[len(requests) :], strict=True):
        assert error_of(refused, 400)["param"].split(".")[0] == field, (route, body)


def test_every_400_naming_a_field_at_fault_says_invalid_value_as_the_others_do(engine, tmp_path):
    """A value the server's own checks refuse (after the schema's) came with code null, where the schema's refusals
    and the other checks (a token id outside the vocabulary, top_logprobs without logprobs) say "invalid_value": a
    client telling a bad parameter by its code missed these."""
    prefix_chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "prefix": True}]
    refusals = [
        ("/v1/completions", {**GREEDY, "prompt": ["a"] * 20, "n": 16}, "n"),
        ("/v1/completions", {**GREEDY, "prompt": "a", "n": 2, "best_of": 1}, "best_of"),
        ("/v1/chat/completions", {**GREEDY, "messages": [{**prefix_chat[0], "prefix": True}]}, "messages.0.prefix"),
        ("/v1/chat/completions", {**GREEDY, "messages": [prefix_chat[0], {"role": "tool", "content": "r",
                                                                           "tool_call_id": "c1"}]},
         "messages.1.tool_call_id"),
        ("/tokenize", {"messages": prefix_chat, "add_generation_prompt": False}, "add_generation_prompt"),
    ]  # fmt: skip

    async def scenario(client):
        answers = [await client.post(route, json=body) for route, body, _ in refusals]
        answers.append(await client.get("/v1/admin/usage", params={"since": "yesterday"}))
        answers.append(await client.get("/v1/admin/usage", params={"since": "2026-11-02", "until": "2026-11-01"}))
        return answers

    answers = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    errors = [error_of(answer, 400) for answer in answers]
    assert [(error["param"], error["code"]) for error in errors] == [
        (param, "invalid_value") for param in [*(param for _, _, param in refusals), "since", "until"]
    ]


@pytest.mark.parametrize("route, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_a_streams_chunks_have_a_usage_field_only_with_include_usage_as_openais(engine, tmp_path, route, body):
    """Every chunk carried "usage": null though the request asked for no usage; OpenAI's chunks have the field "only
    when you set stream_options: {include_usage: true}", then null on each chunk but the last, which has it."""
    streamed = {**body, "n": 2, "max_tokens": 3, "stream": True}
    plain, asked = post_each(engine, tmp_path / "db", [
        (route, streamed), (route, {**streamed, "stream_options": {"include_usage": True}}),
    ])  # fmt: skip
    for response, usage_shown in ((plain, False), (asked, True)):
        lines = response.text.splitlines()
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert len(chunks) >= 6 and [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        assert ["usage" in chunk for chunk in chunks] == [usage_shown] * len(chunks)
    *chunks, last = [json.loads(line[6:]) for line in asked.text.splitlines() if line.startswith("data: {")]
    assert [chunk["usage"] for chunk in chunks] == [None] * len(chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6


def test_a_completion_streams_choices_have_no_prompt_logprobs_field_as_vllms_and_openais(engine, tmp_path):
    """Every choice of a completion stream's chunks carried "prompt_logprobs": null, a field neither vLLM's stream
    choices nor OpenAI's have (prompt_logprobs cannot be streamed); a whole answer keeps vLLM's null."""
    streamed = {**COMPLETION, "n": 2, "max_tokens": 3, "stream": True}
    plain, echoed, whole = post_each(engine, tmp_path / "db", [
        ("/v1/completions", streamed), ("/v1/completions", {**streamed, "echo": True, "logprobs": 1}),
        ("/v1/completions", COMPLETION),
    ])  # fmt: skip
    for response in (plain, echoed):
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        keys = [sorted(choice) for chunk in chunks for choice in chunk["choices"]]
        assert len(keys) >= 6 and keys == [["finish_reason", "index", "logprobs", "stop_reason", "text"]] * len(keys)
    assert whole.json()["choices"][0]["prompt_logprobs"] is None


def test_a_prompt_past_the_engines_cache_is_refused_as_a_prompt_past_the_context(tmp_path):
    """A prompt within max_model_len that an engine built with a smaller cache (as create_app may be given one) cannot
    hold came as the engine's refusal, code invalid_value and param null, where a prompt past max_model_len says
    context_length_exceeded, param prompt (messages for a chat), as OpenAI's: every length refusal now says so."""
    engine = Engine.from_pretrained(make_model_dir(tmp_path / "model"), num_blocks=3)  # 2 usable blocks of 16
    chat = {**CHAT, "messages": [{"role": "user", "content": "quick " * 40}]}
    refused = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**GREEDY, "prompt": [5] * 40}), ("/v1/completions", {**GREEDY, "prompt": [5] * 300}),
        ("/v1/chat/completions", chat),
    ])  # fmt: skip
    errors = [error_of(answer, 400) for answer in refused]
    assert [(error["code"], error["param"]) for error in errors] == [
        ("context_length_exceeded", "prompt"), ("context_length_exceeded", "prompt"),
        ("context_length_exceeded", "messages"),
    ]  # fmt: skip
    assert errors[0]["message"] == (
        f"this model's maximum context length is {engine.max_model_len} tokens, of which the server's cache holds "
        f"{engine.context_len} for one request; the request needs 40 in the prompt + 8 for the completion. Shorten the "
        "prompt."
    )


def test_a_max_tokens_past_the_room_the_engines_cache_leaves_is_refused_as_past_the_context(tmp_path):
    """A max_tokens that fits max_model_len but not the room an engine of a smaller cache leaves the prompt was capped
    to that room without a word, where one past max_model_len is refused (vLLM's 400: its cache always holds
    max_model_len). It is now refused alike, naming the cache, code context_length_exceeded and param the length as
    the request gave it; the room itself is granted in full, and a chat without a length fills it."""
    engine = Engine.from_pretrained(make_model_dir(tmp_path / "model"), num_blocks=3)  # 2 usable blocks of 16
    assert engine.context_len == 32 < engine.max_model_len
    chat = {**CHAT, "messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 40}
    over, over_chat, room, unasked = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**GREEDY, "prompt": [5] * 20, "max_tokens": 13}),
        ("/v1/chat/completions", chat),
        ("/v1/completions", {**GREEDY, "prompt": [5] * 20, "max_tokens": 12}),
        ("/v1/chat/completions", {key: value for key, value in chat.items() if not key.startswith("max_")}),
    ])  # fmt: skip
    error = error_of(over, 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert error["message"] == (
        f"this model's maximum context length is {engine.max_model_len} tokens, of which the server's cache holds 32 "
        "for one request; the request needs 20 in the prompt + 13 for the completion. Lower max_tokens to at most 12 "
        "or shorten the prompt."
    )
    chat_error = error_of(over_chat, 400)
    assert (chat_error["code"], chat_error["param"]) == ("context_length_exceeded", "max_completion_tokens")
    assert room.json()["usage"]["completion_tokens"] == 12
    usage = unasked.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 32


def test_the_lowest_seed_written_as_a_float_is_the_integer_and_the_highest_bound_still_refused(engine, tmp_path):
    """A seed of -9.223372036854776e18 (-2**63 as a float, what json.dumps writes for float(-2**63)) was refused as no
    valid integer, though -2**63 as an integer is taken: whole_numbers read a float as its integer only below 2**63
    in size. It now takes [-2**63, 2**63), the seed's own range; 2**63 as a float is refused naming seed, as before."""
    sampled = {**GREEDY, "temperature": 1.0, "prompt": "The quick brown"}
    as_int, as_float, over = post_each(engine, tmp_path / "db", [
        ("/v1/completions", {**sampled, "seed": -(2**63)}),
        ("/v1/completions", {**sampled, "seed": float(-(2**63))}),
        ("/v1/completions", {**sampled, "seed": float(2**63)}),
    ])  # fmt: skip
    assert as_float.status_code == 200, as_float.text
    assert as_float.json()["choices"] == as_int.json()["choices"]
    assert error_of(over, 400)["param"] == "seed"


def test_n_choices_whose_seed_plus_index_is_minus_one_sample_the_same_on_every_request(engine, tmp_path):
    """The server seeded choice i of a request seeded s with s + i itself: of seed -2 and n=2 the second choice got
    seed -1, which SamplingParams reads as vLLM's no seed, so it sampled anew on each request (the engine's n samples
    already kept it as 2**64 - 1, the same draws). Both now take params.sample_seed, and vLLM's -1 of the request
    itself still seeds none of its choices."""
    body = {**GREEDY, "temperature": 1.0, "prompt": "The quick brown", "n": 2, "seed": -2, "max_tokens": 12}
    first, second = post_each(engine, tmp_path / "db", [("/v1/completions", body)] * 2)
    texts = [[choice["text"] for choice in response.json()["choices"]] for response in (first, second)]
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
    assert [sample_seed(-2, i) for i in range(3)] == [-2, 2**64 - 1, 0]
    assert [sample_seed(seed, 1) for seed in (None, -1, 2**64 - 1)] == [None, None, 0]
