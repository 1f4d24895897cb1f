"""JSON mode (`response_format` json_object and json_schema): the grammar's token masks, and replies through the
official `openai` client that parse when they finish, also streamed; "length" when max_tokens cuts a value.

The model has random weights: left alone it writes no JSON at all, so every reply that parses is the constraint's
doing. In process: the `openai` client over the app's ASGI interface, its engine thread running."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Literal

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from seekstack.checkpoint import load_pretrained
from seekstack.infer.engine import Engine
from seekstack.infer.json_mode import InvalidSchema, JsonFormat
from seekstack.infer.params import SamplingParams
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from tests.serve.server import make_model_dir, serving, with_openai

PROMPTS = ["Give me a JSON object.", "Describe a cat as JSON", "{}"]
JSON_OBJECT = {"type": "json_object"}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "label": {"enum": ["a", "b"]}, "ok": {"type": "boolean"}},
    "required": ["x", "label", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("json")))


def chat(prompt: str, **fields) -> dict:
    return dict(model="model", messages=[{"role": "user", "content": prompt}], max_tokens=200, **fields)


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_the_mask_allows_only_json_and_eos_only_once_the_object_is_whole(engine):
    tokenizer = engine.tokenizer
    vocab = engine.config.vocab_size
    constraint = JsonFormat(tokenizer).constraint()
    allowed = constraint.allowed(vocab)
    assert allowed.shape == (vocab,)
    assert {tokenizer.decode([t]).strip() for t in allowed.nonzero().flatten().tolist()} <= {"{", ""}
    assert not allowed[tokenizer.eos_id]
    for token in tokenizer.encode('{"a": [1, "x"]'):
        assert constraint.allowed(vocab)[token], tokenizer.decode([token])
        constraint.accept(token)
    assert not constraint.allowed(vocab)[tokenizer.eos_id] and not constraint.complete
    assert not constraint.allowed(vocab)[tokenizer.encode("]")[0]]  # the array is closed: only , or } may come
    constraint.accept(tokenizer.encode("}")[0])
    assert constraint.complete and constraint.allowed(vocab).nonzero().flatten().tolist() == [tokenizer.eos_id]


def test_json_is_laid_out_as_json_dumps_lays_it_out_so_whitespace_cannot_fill_max_tokens(engine):
    tokenizer, vocab = engine.tokenizer, engine.config.vocab_size
    constraint = JsonFormat(tokenizer, {"type": "object", "properties": {"a": {"type": "integer"}}}).constraint()
    blank = [t for t in range(vocab) if tokenizer.decode([t]) and not tokenizer.decode([t]).strip()]
    for text in ["{", '"a"', ": 1"]:  # ": " is the one place a space goes
        assert not constraint.allowed(vocab)[blank].any(), f"whitespace allowed before {text!r}"
        for token in tokenizer.encode(text):
            constraint.accept(token)
    assert not constraint.allowed(vocab)[blank].any() and not constraint.complete  # only , or } after the 1
    assert JsonFormat(tokenizer, True).constraint().allowed(vocab).any()  # `true`: any value
    with pytest.raises(InvalidSchema, match="allows no value"):
        JsonFormat(tokenizer, False)


def test_a_json_request_constrains_itself_only_in_a_shared_batch(engine):
    prompt, params = engine.tokenizer.encode("hello"), SamplingParams(max_new_tokens=12, seed=5, ignore_eos=True)
    [alone] = engine.generate([prompt], params)
    engine.add_request(prompt, params, "json", constraint=JsonFormat(engine.tokenizer).constraint())
    [beside] = engine.generate([prompt], params)  # decoded in the same steps as "json"
    engine.abort("json")
    assert beside.token_ids == alone.token_ids and not beside.text.startswith("{")


def test_json_object_replies_parse_for_several_prompts_and_seeds(engine, tmp_path):
    async def scenario(api):
        constrained = [await api.chat.completions.create(**chat(p, n=4, seed=10 * s, response_format=JSON_OBJECT))
                       for s, p in enumerate(PROMPTS)]  # fmt: skip
        free = [await api.chat.completions.create(**chat(p, n=4, seed=10 * s)) for s, p in enumerate(PROMPTS)]
        return constrained, free

    constrained, free = with_openai(engine, tmp_path, scenario)
    choices = [choice for reply in constrained for choice in reply.choices]
    finished = [choice for choice in choices if choice.finish_reason == "stop"]
    assert {choice.finish_reason for choice in choices} <= {"stop", "length"}
    assert len(finished) >= 2, [choice.message.content for choice in choices]  # of 12: about half, seeds as here
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    assert not any(parses(choice.message.content) for reply in free for choice in reply.choices)


def test_a_streamed_json_reply_equals_the_whole_one_and_max_tokens_cuts_it_with_length(engine, tmp_path):
    async def scenario(api):
        for seed in range(20):  # the first seed whose reply finishes within max_tokens
            whole = await api.chat.completions.create(**chat(PROMPTS[0], seed=seed, response_format=JSON_OBJECT))
            if whole.choices[0].finish_reason == "stop":
                break
        stream = await api.chat.completions.create(**chat(PROMPTS[0], seed=seed, response_format=JSON_OBJECT,
                                                          stream=True))  # fmt: skip
        chunks = [chunk async for chunk in stream]
        half = whole.usage.completion_tokens // 2
        cut = await api.chat.completions.create(
            **{**chat(PROMPTS[0], seed=seed, response_format=JSON_OBJECT), "max_tokens": half}
        )
        return whole, chunks, cut

    whole, chunks, cut = with_openai(engine, tmp_path, scenario)
    text = whole.choices[0].message.content
    assert isinstance(json.loads(text), dict)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert cut.choices[0].finish_reason == "length"  # as OpenAI's API says of a JSON reply cut short
    assert text.startswith(cut.choices[0].message.content) and not parses(cut.choices[0].message.content)


class Point(BaseModel):
    x: int
    label: Literal["a", "b"]
    ok: bool


def test_a_json_schema_reply_has_the_fields_and_types_it_names(engine, tmp_path):
    """The schema as sent by hand, and as the `openai` client's `parse` sends a pydantic model (strict) and reads
    the reply back into it."""
    response_format = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}

    async def scenario(api):
        by_hand = await api.chat.completions.create(**chat("a point", n=4, seed=3, response_format=response_format))
        parsed = await api.chat.completions.parse(**chat("a point", n=4, seed=7, response_format=Point))
        return by_hand, parsed

    by_hand, parsed = with_openai(engine, tmp_path, scenario)
    for choice in by_hand.choices:
        assert choice.finish_reason == "stop", choice.message.content
        point = json.loads(choice.message.content)
        assert set(point) == {"x", "label", "ok"}
        assert isinstance(point["x"], int) and point["label"] in ("a", "b") and isinstance(point["ok"], bool)
    assert all(isinstance(choice.message.parsed, Point) for choice in parsed.choices)


def test_a_completion_with_response_format_answers_json_of_its_schema_as_vllm(engine, tmp_path):
    """vLLM takes response_format on /v1/completions too; it was ignored there, answering free text."""
    response_format = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}

    async def scenario(api):
        return await api.completions.create(model="model", prompt="A point:", max_tokens=200, n=4, seed=3,
                                            extra_body={"response_format": response_format})  # fmt: skip

    for choice in with_openai(engine, tmp_path, scenario).choices:
        assert choice.finish_reason == "stop", choice.text
        assert set(json.loads(choice.text)) == {"x", "label", "ok"}


def test_a_schema_that_cannot_be_enforced_gets_400_naming_it(engine, tmp_path):
    def spec(schema) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}

    async def scenario(api):
        errors = []
        bad = (
            spec({"type": 5}),
            spec({"type": "string", "pattern": "(("}),
            spec({"$ref": "#"}),
            {"type": "json_schema"},
        )
        for response_format in bad:
            with pytest.raises(openai.BadRequestError) as caught:
                await api.chat.completions.create(**chat("x", response_format=response_format))
            errors.append(caught.value.body)
        return errors

    wrong_type, bad_pattern, endless, missing = with_openai(engine, tmp_path, scenario)
    assert (
        wrong_type["param"] == "response_format.json_schema.schema" and "type must be a string" in wrong_type["message"]
    )
    assert bad_pattern["code"] == "invalid_schema" and "unclosed group" in bad_pattern["message"]
    assert endless["code"] == "invalid_schema" and "allows no value" in endless["message"]  # a value of itself
    assert missing["param"] == "response_format" and "json_schema" in missing["message"]
    with pytest.raises(InvalidSchema, match="schema must be an object"):
        JsonFormat(engine.tokenizer, [])  # type: ignore[arg-type]


def test_a_schema_bound_beyond_64_bit_integers_is_refused_naming_its_keyword(engine):
    with pytest.raises(InvalidSchema, match=r"schema\.items\.minimum is -10{30}, beyond the 64"):
        JsonFormat(engine.tokenizer, {"type": "array", "items": {"type": "integer", "minimum": -(10**30)}})
    # was: "not a JSON Schema: Value is not JSON serializable: -1000...", naming neither the keyword nor the fault


def schemas() -> st.SearchStrategy:
    """JSON Schemas, well and badly formed: types, properties, enums, bounds, patterns, combinators, dangling refs."""
    leaf = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "nope", 5])}),
        st.fixed_dictionaries({"enum": st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3)}),
        st.fixed_dictionaries(
            {
                "type": st.just("string"),
                "maxLength": st.integers(-1, 3),
                "pattern": st.sampled_from(["^a+$", "((", "[0-9]{2}"]),
            }
        ),
        st.fixed_dictionaries(
            {"type": st.just("integer"), "minimum": st.integers(-5, 5), "maximum": st.integers(-5, 5)}
        ),
        st.fixed_dictionaries({"$ref": st.sampled_from(["#/nope", "#", "http://x"])}),
        st.booleans(),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.fixed_dictionaries(
                {
                    "type": st.just("object"),
                    "properties": st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    "additionalProperties": st.booleans(),
                }
            ),
            st.fixed_dictionaries({"type": st.just("array"), "items": inner, "maxItems": st.integers(0, 3)}),
            st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)}),
        ),
        max_leaves=6,
    ).filter(lambda schema: isinstance(schema, dict))


def test_generated_schemas_get_conforming_json_or_a_400_in_openai_shape(engine, tmp_path):
    """Hypothesis-generated JSON Schemas (schemathesis's fuzzing of the API seldom sends a response_format): never
    a 5xx; a reply that finishes parses as JSON; an error names response_format."""
    app = create_app(engine, open_database(tmp_path / "db"))
    statuses = Counter()

    async def main():
        async with serving(app) as client:

            @given(schema=schemas())
            @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def answers(schema):
                spec = {"type": "json_schema", "json_schema": {"name": "generated", "schema": schema}}
                body = {**chat("x", seed=0, response_format=spec), "max_tokens": 8}
                posted = asyncio.run_coroutine_threadsafe(client.post("/v1/chat/completions", json=body), loop)
                response = posted.result()  # hypothesis drives from a worker thread; the app runs on the loop
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    choice = response.json()["choices"][0]
                    assert choice["finish_reason"] == "length" or parses(choice["message"]["content"]), (schema, choice)
                else:
                    assert response.status_code == 400, response.text
                    assert response.json()["error"]["param"].startswith("response_format"), response.text

            loop = asyncio.get_running_loop()
            await asyncio.to_thread(answers)

    asyncio.run(main())
    print(f"\ngenerated schemas: {dict(statuses)}")
    assert statuses[200] and statuses[400], statuses  # both enforced and refused schemas came


def constrained_run(engine: Engine, prompts: list[str], params: SamplingParams, guess=None) -> list[list[int]]:
    """Each prompt's tokens under a JSON constraint of POINT, decoded together; after each step a speculative
    engine's drafts are `guess(row, tokens generated)`."""
    schema = JsonFormat(engine.tokenizer, POINT)
    ids = [engine.add_request(engine.tokenizer.encode(prompt), params, constraint=schema.constraint())
           for prompt in prompts]  # fmt: skip
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.token_ids
        for request in engine.running if guess else []:
            request.drafts = guess(ids.index(request.request_id), len(request.ids) - len(request.prompt_ids))
    return [tokens[request_id] for request_id in ids]


def test_speculative_json_mode_gives_the_plain_engines_json(engine):
    """vLLM runs structured outputs with speculative decoding; here --speculative refused JSON modes. Each draft is
    judged under the mask after the drafts before it: greedy replies equal the plain engine's token for token. The
    random MTP module's drafts are all rejected, so the drafts are overwritten with plain greedy's next tokens, the
    first right, the second wrong (often one the grammar forbids)."""
    with_mtp = load_pretrained(engine.model_dir)  # the engine's own has none: it does not draft
    speculative = Engine(with_mtp, engine.tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=False,
                         num_blocks=64)  # fmt: skip
    greedy = SamplingParams(max_new_tokens=60, temperature=0)
    plain = constrained_run(engine, PROMPTS, greedy)

    def guess(row: int, generated: int) -> list[int]:
        upcoming = plain[row][generated:] + [0, 0, 0]
        return [upcoming[0], (upcoming[1] + 1) % engine.tokenizer.vocab_size, upcoming[2]]

    assert constrained_run(speculative, PROMPTS, greedy, guess) == plain
    assert speculative.stats().spec_accepted > 0
    finished = [tokens for tokens in plain if len(tokens) < 60]  # one cut at 60 tokens (an x of digits) may not parse
    assert finished and all(parses(engine.tokenizer.decode(tokens)) for tokens in finished)
    sampled = SamplingParams(max_new_tokens=60, temperature=1.0, seed=3)  # the MTP module's own drafts
    replies = [engine.tokenizer.decode(tokens) for tokens in constrained_run(speculative, PROMPTS, sampled)]
    assert all(set(json.loads(reply)) == {"x", "label", "ok"} for reply in replies)


def test_draft_masks_follow_the_drafts_and_leave_the_state_as_it_was(engine):
    tokenizer, vocab = engine.tokenizer, engine.config.vocab_size
    constraint = JsonFormat(tokenizer, POINT).constraint()
    reply = tokenizer.encode('{"x": 1, "label": "a", "ok": true}')
    for token in reply[:-3]:
        constraint.accept(token)
    before = constraint.allowed(vocab)
    masks = constraint.allowed_after([*reply[-3:], tokenizer.eos_id, 5], vocab)
    assert masks.shape == (6, vocab) and torch.equal(masks[0], before)
    assert [bool(masks[t, token]) for t, token in enumerate(reply[-3:])] == [True, True, True]
    assert masks[3].nonzero().flatten().tolist() == [tokenizer.eos_id] and torch.equal(masks[4], masks[3])
    forbidden = tokenizer.encode("}")[0]
    assert torch.equal(constraint.allowed_after([forbidden, reply[-2]], vocab)[1], before)  # rejected at once
    assert torch.equal(constraint.allowed_after([vocab + 3], vocab)[1], before)  # past the vocabulary
    assert constraint.allowed(vocab).equal(before) and not constraint.complete


def test_with_a_reasoning_parser_the_json_is_the_answer_after_the_reasoning(r1_engine, tmp_path):
    """DeepSeek-R1's prompt opens the reply's <think>: JSON mode forced JSON from the first token, inside the
    reasoning, so `--reasoning-parser deepseek_r1` answered content '' with the JSON as reasoning_content (and the
    client's `parse` gave None). As vLLM, the JSON is held back until the reasoning's </think>: the reasoning is the
    model's own (here, greedy, the reply without response_format up to its first byte that is no UTF-8, which the
    grammar does not allow: random weights never close it)."""

    async def scenario(api):
        free = await api.chat.completions.create(**{**chat("a point", temperature=0), "max_tokens": 30})
        json_mode = chat("a point", temperature=0, response_format=JSON_OBJECT)
        constrained = await api.chat.completions.create(**{**json_mode, "max_tokens": 30})
        return free.choices[0], constrained.choices[0]

    free, constrained = with_openai(r1_engine, tmp_path, scenario, reasoning_parser="deepseek_r1")
    own = free.message.model_extra["reasoning_content"].split("\N{REPLACEMENT CHARACTER}")[0]
    assert len(own) > 4 and constrained.message.model_extra["reasoning_content"].startswith(own)
    assert (constrained.finish_reason, constrained.message.content) == ("length", "")
    tokenizer, vocab = r1_engine.tokenizer, r1_engine.config.vocab_size
    only_x = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    replies = [("<think>\n", 'Say x.\n</think>\n\n{"x": 1}'), ("", '{"x": 1}'), ("", '<think>x</think>{"x": 1}')]
    for start, reply in replies:  # with a prompt that opens the reasoning, or one that does not
        constraint = JsonFormat(tokenizer, only_x, start).constraint()
        assert not constraint.allowed(vocab)[tokenizer.eos_id]
        for token in tokenizer.encode(reply):
            assert constraint.allowed(vocab)[token], (start, reply, tokenizer.decode([token]))
            constraint.accept(token)
        assert constraint.complete
    constraint = JsonFormat(tokenizer, None, "<think>\n").constraint()
    for token in tokenizer.encode("Say x.</think> "):
        constraint.accept(token)
    assert not constraint.allowed(vocab)[tokenizer.encode("x")[0]]  # after the reasoning, JSON only


def test_the_openapi_schema_describes_response_format(engine, tmp_path):
    schemas = create_app(engine, open_database(tmp_path / "db")).openapi()["components"]["schemas"]
    field = schemas["ChatCompletionRequest"]["properties"]["response_format"]
    assert {"$ref": "#/components/schemas/ResponseFormat"} in field["anyOf"]
    response_format = schemas["ResponseFormat"]
    assert response_format["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]
    spec = schemas["JsonSchemaSpec"]
    assert set(spec["required"]) == {"name", "schema"} and spec["properties"]["schema"]["type"] == "object"
