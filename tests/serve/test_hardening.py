"""The defects found probing the server from outside, each fixed: sampling ranges, one request's failure isolated,
body limit and tokenizing off the event loop, bounded stop strings, error fields, 400 for a request no minute
can hold, open mode's Host and content-type checks, a private keys database, no exception text in 500s.

In process, through the app's ASGI interface with its engine thread running (fast); the crash test is in
test_api.py, where a server process can be killed."""

from __future__ import annotations

import asyncio
import codecs
import gzip
import json
import random
import re
import sqlite3
import stat
import time

import pytest

from seekstack.infer.detokenize import TextStream
from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams
from seekstack.schema import SHOWN_VALUE_CHARS, shown_value
from seekstack.serve.app import ABSENT_ROUTES, UNKNOWN_MODEL, create_app
from seekstack.serve.database import open_database
from seekstack.serve.keys import Budget, KeyStore, Plan
from seekstack.serve.ledger import Ledger, UsageRecord
from tests.serve.server import error_of, make_model_dir, run

NO_EOS = {"ignore_eos": True}
COMPLETION = {"model": "model", "prompt": "hello", "max_tokens": 4, **NO_EOS}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("hardening"))


@pytest.fixture
def engine(model_dir) -> Engine:
    return Engine.from_pretrained(model_dir)


def test_sampling_fields_out_of_range_get_400_naming_the_field(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))
    extremes = {
        "top_k": 9223372036854775808, "temperature": 2.5, "top_p": 0, "n": 17, "presence_penalty": -3,
        "repetition_penalty": 11, "min_p": 1.5, "max_tokens": 2**40, "logprobs": 6, "stop": ["a"] * 17,
    }  # fmt: skip

    async def scenario(client):
        answers = {field: await client.post("/v1/completions", json={**COMPLETION, field: value})
                   for field, value in extremes.items()}  # fmt: skip
        answers["nan"] = await client.post(
            "/v1/completions", content=b'{"model": "model", "prompt": "x", "temperature": NaN}',
            headers={"content-type": "application/json"},
        )  # fmt: skip
        answers["long stop"] = await client.post("/v1/completions", json={**COMPLETION, "stop": "x" * 257})
        return answers

    answers = run(app, scenario)
    for field in extremes:
        assert error_of(answers[field], 400)["param"] == field, field
    assert error_of(answers["nan"], 400)["param"] == "temperature"
    assert error_of(answers["long stop"], 400)["param"] == "stop"


class BrokenRule:
    """A token constraint whose state is broken: a JSON-mode rule's `allowed` raises ValueError then."""

    complete = False

    def allowed(self, vocab_size: int):
        raise ValueError("broken rule")

    def accept(self, token_id: int) -> None:
        pass


def test_a_request_whose_sampling_raises_fails_alone_and_the_stream_beside_it_completes(engine, tmp_path):
    """A request whose sampling raises (a broken rule injected below the API) ends its own request only."""
    database = open_database(tmp_path / "db")
    app = create_app(engine, database)
    poison = SamplingParams(max_new_tokens=30, temperature=0.9, ignore_eos=True)

    async def scenario(client):
        body = {**COMPLETION, "max_tokens": 200, "temperature": 0.9, "stream": True}
        stream = asyncio.create_task(client.post("/v1/completions", json=body))
        while not engine.stats().running:
            await asyncio.sleep(0.001)
        group = await app.state.server.bridge.submit([[5, 6, 7]], [poison], constraints=[BrokenRule()])
        with pytest.raises(Exception, match="alone") as failure:
            async for _ in group:
                pass
        running_after_the_failure = engine.stats().running
        return await stream, failure.value, running_after_the_failure

    streamed, failure, running_after_the_failure = run(app, scenario)
    assert "broken rule" in str(failure) and running_after_the_failure == 1  # the stream was still going
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "error" not in events[-1] and events[-1]["choices"][0]["finish_reason"] == "length"
    [row] = Ledger(database).records()
    assert (row["status"], row["completion_tokens"]) == (200, 200)


def test_bodies_over_the_limit_get_413_whether_their_length_is_declared_or_not(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"), max_body_bytes=1000)
    big = json.dumps({**COMPLETION, "prompt": "x" * 2000}).encode()

    async def chunked():
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    async def scenario(client):
        headers = {"content-type": "application/json"}
        declared = await client.post("/v1/completions", content=big, headers=headers)
        undeclared = await client.post("/v1/completions", content=chunked(), headers=headers)
        small = await client.post("/v1/completions", json=COMPLETION)
        return declared, undeclared, small

    declared, undeclared, small = run(app, scenario)
    for response in (declared, undeclared):
        assert error_of(response, 413)["code"] == "request_too_large"
        assert "1,000 bytes" in response.json()["error"]["message"]
    assert small.status_code == 200


def test_tokenizing_a_prompt_does_not_hold_up_other_requests(engine, tmp_path):
    """While a prompt takes a second to tokenize, /health answers at once."""
    app = create_app(engine, open_database(tmp_path / "db"))
    real_encode = engine.tokenizer.encode

    def slow_encode(text, *args, **kwargs):
        time.sleep(1.0)
        return real_encode(text, *args, **kwargs)

    engine.tokenizer.encode = slow_encode

    async def scenario(client):
        slow = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        health = await client.get("/health")
        return time.perf_counter() - started, health, await slow

    waited, health, slow = run(app, scenario)
    assert health.status_code == 200 and slow.status_code == 200
    assert waited < 0.5, f"/health waited {waited:.2f} s behind the tokenizer"


@pytest.mark.parametrize("route", ["/health", "/v1/models", "/v1/models/model", "/v1/admin/usage"])
def test_a_route_whose_database_read_waits_does_not_stop_the_event_loop(engine, tmp_path, route):
    """While a route's database read waits half a second (as it waits behind this server's writer that waits for
    another connection holding the database), the event loop goes on serving every other request."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("ops", admin=True)
    app = create_app(engine, database)
    real_query = database.query

    def held_query(sql, parameters=()):
        time.sleep(0.5)
        return real_query(sql, parameters)

    async def scenario(client):
        ticks = 0

        async def ticker():  # what every other request on the event loop needs: turns
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beside = asyncio.create_task(ticker())
        database.query = held_query
        response = await client.get(route, headers={"Authorization": f"Bearer {key}"})
        beside.cancel()
        return response, ticks

    response, ticks = run(app, scenario)
    assert response.status_code == 200, response.text
    assert ticks >= 20, f"the event loop turned {ticks} times while {route} read the database"  # was: 0-1


def naive_release(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """What may be shown of `text` (the whole text so far): up to the first stop string, else all but a tail that
    could begin one."""
    found = [text.find(stop) for stop in stops if stop in text]
    if found:
        return text[: min(found)], True
    held = max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)
    return text[: len(text) - held], False


def test_stop_strings_are_matched_on_the_unreleased_tail_exactly_as_on_the_whole_text(engine):
    rng = random.Random(0)
    tokenizer = engine.tokenizer
    for _ in range(200):
        stops = tuple("".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4)))
        ids = tokenizer.encode("".join(rng.choice(["a", "b", " ", "ab", "ba", "c"]) for _ in range(30)))
        stream, shown, stopped = TextStream(tokenizer, stops), "", False
        for token in ids:
            piece, stopped = stream.push(token)
            shown += piece
            expected, expected_stop = naive_release(stream.text, stops)
            assert (shown, stopped) == (expected, expected_stop), (stops, stream.text)
            if stopped:
                break


def refused_request(engine, tmp_path, path, fields):
    """The 400 error a completion (or, at the chat path, a chat) of COMPLETION's fields updated by `fields` gets."""
    body = {**COMPLETION, **fields}
    if path == "/v1/chat/completions":
        del body["prompt"]

    async def scenario(client):
        return await client.post(path, json=body)

    return error_of(run(create_app(engine, open_database(tmp_path / "db")), scenario), 400)


NO_BOS = '"" is no token to start from (this model\'s tokenizer puts no BOS before a prompt): give at least one '
EMPTY = "String should have at least 1 character, got ''"


@pytest.mark.parametrize(
    ("path", "fields", "param", "message"),
    [
        ("/v1/completions", {"prompt": ""}, "prompt", f"prompt: {NO_BOS}character"),
        ("/v1/completions", {"prompt": ["hi", ""]}, "prompt.1", f"prompt.1: {NO_BOS}character"),
        ("/v1/completions", {"stop": ""}, "stop", f"invalid request: stop: {EMPTY}"),
        ("/v1/completions", {"stop": ["a", ""]}, "stop.1", f"invalid request: stop.1: {EMPTY}"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ""}, "stop",
         f"invalid request: stop: {EMPTY}"),
    ],
)  # fmt: skip
def test_an_empty_prompt_or_stop_string_is_refused_by_its_one_rule(engine, tmp_path, path, fields, param, message):
    """Was: every branch of the field's union failing, "prompt: String should have at least 1 character, got '';
    prompt: Input should be a valid array, got ''". A prompt "" is now refused only where the tokenizer puts no BOS
    before it (this engine's), saying so."""
    error = refused_request(engine, tmp_path, path, fields)
    assert (error["message"], error["param"]) == (message, param)


@pytest.mark.parametrize(
    ("path", "fields", "message"),
    [
        ("/v1/completions", {"prompt": [[5, 6], [7, "x"]]}, "prompt.1.1: Input should be a valid integer, got 'x'"),
        ("/v1/completions", {"prompt": [5, "x"]},
         "prompt.1: Input should be a valid integer, got 'x'; prompt.0: Input should be a valid string, got 5"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", 5]},
         "stop.1: Input should be a valid string, got 5"),
    ],
)  # fmt: skip
def test_a_union_value_is_refused_by_the_branches_that_came_closest_to_matching(
    engine, tmp_path, path, fields, message
):
    """Was: every branch's failure, the string's and the list of lists' beside the one that names the entry at fault:
    "prompt: Input should be a valid string, got [[5, 6], [7, 'x']]; prompt.0: Input should be a valid integer, got
    [5, 6]; ... prompt.1.1: Input should be a valid integer, got 'x'" (six messages for one wrong id)."""
    error = refused_request(engine, tmp_path, path, fields)
    assert error["message"] == f"invalid request: {message}"
    assert error["param"] == message.partition(":")[0]


TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}},
         "tool_choice.function.name: Field required"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text: Field required"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "refusal"}]}]},
         "messages.1.content.0.refusal: Field required"),
    ],
)  # fmt: skip
def test_a_model_branch_of_a_union_is_no_field_of_the_param(engine, tmp_path, fields, message):
    """Was: pydantic's class names in the param and the message, each model branch's failure beside the one the value
    chose by its type: 'tool_choice: Input should be 'none', 'auto' or 'required', got {...};
    tool_choice.NamedToolChoice.function.name: Field required', 'messages.0.content.0.TextPart.text: Field required;
    messages.0.content.0.RefusalPart.type: Input should be 'refusal', got 'text'; ...RefusalPart.refusal: ...'."""
    chat = {"messages": [{"role": "user", "content": "hi"}], **fields}
    error = refused_request(engine, tmp_path, "/v1/chat/completions", chat)
    assert (error["message"], error["param"]) == (f"invalid request: {message}", message.partition(":")[0])


def test_a_check_of_the_servers_says_its_words_without_pydantics_value_error_before_them(engine, tmp_path):
    """Every server check's 400 read 'tool_choice: Value error, "auto" needs tools ...', pydantic's wrapper words."""
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}

    async def scenario(client):
        return await client.post("/v1/chat/completions", json=chat), await client.post("/tokenize", json={})

    no_tools, neither = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert error_of(no_tools, 400)["message"] == (
        'invalid request: tool_choice: "auto" needs tools to call: send them in tools, or leave tool_choice out, got '
        "'auto'"
    )
    assert error_of(neither, 400)["message"] == (
        "invalid request: body: give either prompt (a completion's text) or messages (a chat's), one of the two, got {}"
    )


def test_error_fields_name_the_parameter_not_the_type(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))

    async def scenario(client):
        unknown = await client.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"})
        out_of_vocabulary = await client.post("/v1/completions", json={**COMPLETION, "prompt": [10**6]})
        too_many = await client.post("/v1/completions", json={**COMPLETION, "prompt": ["a"] * 65})
        return unknown, out_of_vocabulary, too_many

    unknown, out_of_vocabulary, too_many = run(app, scenario)
    message = error_of(too_many, 400)["message"]  # its bound, once: not every union branch of `prompt` failing
    assert message.startswith("invalid request: prompt: List should have at most 64 items") and ";" not in message
    assert error_of(unknown, 404) == {**unknown.json()["error"], "type": "invalid_request_error", "param": "model"}
    assert error_of(out_of_vocabulary, 400)["type"] == "invalid_request_error"
    assert out_of_vocabulary.json()["error"]["param"] == "prompt.0"


def test_a_lone_surrogate_escape_gets_400_naming_the_field_and_a_pair_is_read(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))
    headers = {"Content-Type": "application/json"}

    def chat(content: str) -> bytes:
        return b'{"model":"model","max_tokens":1,"messages":[{"role":"user","content":"' + content.encode() + b'"}]}'

    async def scenario(client):
        latin1 = chat("café").replace("é".encode(), "é".encode("latin-1"))
        bodies = [chat(r"\ud800"), chat(r"ok \udc00"), chat(r"\ud83d\ude00"), latin1]
        return [await client.post("/v1/chat/completions", content=body, headers=headers) for body in bodies]

    high, low, pair, latin1 = run(app, scenario)
    error = error_of(high, 400)
    assert (error["param"], error["code"]) == ("messages.0.content", "invalid_unicode")
    assert "lone surrogate \\ud800" in error["message"] and "messages.0.content" in error["message"]
    assert "lone surrogate \\udc00 (at character 3)" in error_of(low, 400)["message"]
    assert pair.status_code == 200, pair.text  # a surrogate pair is one character (U+1F600)
    assert error_of(latin1, 400)["message"].startswith("the request body is not UTF-8: byte 0xe9 at offset")


def test_a_body_opening_with_a_utf8_byte_order_mark_is_read_as_its_json(engine, tmp_path):
    """A body saved by Windows' Notepad (UTF-8 with a BOM) and sent by `curl -d @request.json` was refused as 'the
    request body is not valid JSON: expected value at line 1 column 1', naming no BOM, where vLLM (Python's json) reads
    it; a BOM anywhere else is still no JSON."""
    app = create_app(engine, open_database(tmp_path / "db"))
    body = json.dumps({"model": "model", "prompt": "The", "max_tokens": 1}).encode()

    async def scenario(client):
        headers = {"Content-Type": "application/json"}
        return [
            await client.post(route, content=content, headers=headers)
            for route, content in (("/v1/completions", codecs.BOM_UTF8 + body), ("/tokenize", codecs.BOM_UTF8 + body),
                                   ("/v1/completions", b" " + codecs.BOM_UTF8 + body))
        ]  # fmt: skip

    completion, tokenized, misplaced = run(app, scenario)
    assert completion.status_code == 200 and completion.json()["usage"]["prompt_tokens"] == 1, completion.text
    assert tokenized.json()["tokens"] == engine.tokenizer.encode("The")
    assert error_of(misplaced, 400)["code"] == "invalid_json"


def test_a_request_larger_than_the_tokens_per_minute_gets_400_not_429(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("small", tpm=20)
    app = create_app(engine, database)

    async def scenario(client):
        headers = {"Authorization": f"Bearer {key}"}
        never = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 30}, headers=headers)
        choices = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 8, "n": 3}, headers=headers)
        fits = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10}, headers=headers)
        later = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10}, headers=headers)
        return never, choices, fits, later

    never, choices, fits, later = run(app, scenario)
    assert error_of(never, 400)["param"] == "max_tokens" and "Retry-After" not in never.headers
    message = error_of(choices, 400)["message"]  # 3 x 8 + the prompt's 3: was told as "(prompt + max_tokens)"
    assert "may use 27 tokens (its prompt tokens, and max_tokens for each choice it asks for" in message
    assert fits.status_code == 200
    assert error_of(later, 429)["type"] == "rate_limit_error" and "Retry-After" in later.headers


def test_a_rate_limit_charge_that_cannot_be_settled_loses_neither_the_answer_nor_its_usage_row(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("limited", tpm=1000)
    app = create_app(engine, database)

    def database_held(charge, tokens):  # another connection held the database past every retry
        raise sqlite3.OperationalError("database is locked")

    app.state.server.limiter.settle = database_held
    headers = {"Authorization": f"Bearer {key}"}
    answer = run(app, lambda client: client.post("/v1/completions", json=COMPLETION, headers=headers))
    assert answer.status_code == 200, answer.text  # was: 500 once its tokens were generated, and no row
    rows = Ledger(database).records("limited")
    assert [(row["status"], row["completion_tokens"]) for row in rows] == [(200, 4)]


def test_a_requests_usage_row_is_written_before_its_rate_limit_charge_is_settled(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("limited", tpm=1000)
    app = create_app(engine, database)
    rows_when_settling = []

    def settle_while_the_database_is_held(charge, tokens):  # retried up to 120 s: the row and answer waited for it
        rows_when_settling.append([row["status"] for row in Ledger(database).records("limited")])

    app.state.server.limiter.settle = settle_while_the_database_is_held
    headers = {"Authorization": f"Bearer {key}"}
    answer = run(app, lambda client: client.post("/v1/completions", json=COMPLETION, headers=headers))
    assert answer.status_code == 200 and rows_when_settling == [[200]]  # was: [[]], settled first


def test_a_client_that_hangs_up_is_billed_every_token_generated_for_it_also_those_it_never_read(engine, tmp_path):
    """A stream whose client stops reading (its send blocks) and then hangs up: the tokens the engine generated for
    it meanwhile waited unread in its queue; the ledger and the rate-limit charge count them as the metrics do."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("leaver", tpm=100_000)
    app = create_app(engine, database)
    body = {**COMPLETION, "max_tokens": 200, "n": 2, "stream": True}
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}  # fmt: skip
    metrics = app.state.server.metrics

    def generated() -> float:
        return metrics.registry.get_sample_value("seekstack:generation_tokens_total", {"model_name": "model"})

    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        while generated() < 20:  # the engine goes on while the client reads nothing
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message.get("body"):  # the first event: the client reads no more
            await asyncio.Event().wait()

    app.state.server.bridge.start()
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        app.state.server.bridge.stop()
    [row] = Ledger(database).records("leaver")
    assert row["status"] == 499 and row["completion_tokens"] == generated() >= 20  # was: the 2 tokens read
    [charge] = database.query("SELECT tokens FROM rate_charges")
    assert charge["tokens"] == row["prompt_tokens"] + row["completion_tokens"]


def test_a_stream_left_once_its_usage_chunk_came_is_recorded_as_answered(engine, tmp_path):
    database = open_database(tmp_path / "db")
    app = create_app(engine, database)
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    headers = [(b"content-type", b"application/json"), (b"host", b"localhost:8000")]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}  # fmt: skip
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    usage_came = asyncio.Event()

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await usage_came.wait()
        return {"type": "http.disconnect"}  # the client has its whole answer, and its usage: it closes

    async def send(message: dict) -> None:
        if b'"usage":{' in message.get("body", b""):
            usage_came.set()
            await asyncio.Event().wait()  # [DONE] never goes out

    app.state.server.bridge.start()
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        app.state.server.bridge.stop()
    [row] = Ledger(database).records()
    assert row["status"] == 200 and row["completion_tokens"] == 4  # was: 499, a client that left unanswered


def test_a_stream_whose_usage_row_cannot_be_opened_fails_and_stops_generating(engine, tmp_path):
    """The database refuses the stream's row (a full disk): the request fails (500) and the engine stops generating
    for it, rather than running to max_tokens for no one; its rate-limit charge goes back."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("streamer", tpm=100_000)
    app = create_app(engine, database)

    def full_disk(usage):
        raise sqlite3.OperationalError("database or disk is full")

    app.state.server.ledger.open = full_disk
    body = {**COMPLETION, "max_tokens": 200, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}

    async def scenario(client):
        with pytest.raises(sqlite3.OperationalError):  # answered 500 by the app's handler, then raised to the test
            await client.post("/v1/completions", json=body, headers=headers)
        await asyncio.sleep(0.5)  # the engine thread applies the abort before its next step
        return engine.has_unfinished()

    assert not run(app, scenario)  # was: the request ran on to its 200 tokens
    assert [(row["status"], row["cost"]) for row in Ledger(database).records("streamer")] == [(500, 0)]
    assert database.query("SELECT tokens FROM rate_charges") == [{"tokens": 0}]


def pro_payer(tmp_path):
    """A database whose key `payer` (returned) is on plan `pro`: 1 and 3 per 1k prompt and completion tokens."""
    database = open_database(tmp_path / "db")
    store = KeyStore(database)
    store.set_plan("pro", prompt_per_1k=1.0, completion_per_1k=3.0)
    return database, store, store.create("payer", plan="pro")


def test_a_request_is_billed_at_the_prices_of_its_plan_when_it_came_whatever_they_become(engine, tmp_path):
    database, store, key = pro_payer(tmp_path)
    app = create_app(engine, database)
    add_request = engine.add_request

    def repriced_first(*args, **kwargs):  # the price change lands once the request is admitted
        store.set_plan("pro", prompt_per_1k=100.0, completion_per_1k=100.0)
        return add_request(*args, **kwargs)

    engine.add_request = repriced_first
    body = {**COMPLETION, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
    answer = run(
        app, lambda client: client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    )
    usage = json.loads(answer.text.split("data: ")[-2])["usage"]
    [row] = Ledger(database).records("payer")
    assert usage["completion_tokens"] == 40 and row["completion_tokens"] == 40
    assert row["cost"] == pytest.approx((usage["prompt_tokens"] * 1.0 + 40 * 3.0) / 1000)  # was: at 100 per 1k


class QueriesSeen:
    """`database`, noting the statement of each query made through it."""

    def __init__(self, database):
        self.database, self.statements = database, []

    def query(self, statement: str, parameters=()):
        self.statements.append(statement)
        return self.database.query(statement, parameters)

    def __getattr__(self, name: str):
        return getattr(self.database, name)


def test_a_keyed_request_reads_its_plan_with_its_key_and_no_plan_apart(engine, tmp_path):
    database, _, key = pro_payer(tmp_path)
    app = create_app(engine, database)
    ledger = app.state.server.ledger
    ledger.database = QueriesSeen(database)
    headers = {"Authorization": f"Bearer {key}"}
    answer = run(app, lambda client: client.post("/v1/completions", json=COMPLETION, headers=headers))
    assert answer.status_code == 200 and ledger.database.statements == []  # was: the plan read again after verify
    [row] = Ledger(database).records("payer")
    assert row["cost"] == pytest.approx((row["prompt_tokens"] * 1.0 + 4 * 3.0) / 1000)


def test_open_mode_answers_only_loopback_hosts_and_json_bodies(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))

    async def scenario(client):
        rebound = await client.post("/v1/completions", json=COMPLETION, headers={"host": "evil.example:8000"})
        as_form = await client.post("/v1/completions", content=json.dumps(COMPLETION),
                                    headers={"content-type": "text/plain"})  # fmt: skip
        models = await client.get("/v1/models", headers={"host": "attacker.example"})
        local = [
            await client.post("/v1/completions", json=COMPLETION, headers={"host": host})
            for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost")
        ]
        return rebound, as_form, models, local

    rebound, as_form, models, local = run(app, scenario)
    assert error_of(rebound, 403)["code"] == "host_not_allowed"
    assert error_of(models, 403)["code"] == "host_not_allowed"
    assert error_of(as_form, 415)["code"] == "unsupported_media_type"
    assert [response.status_code for response in local] == [200] * 4


def test_open_mode_refuses_web_pages_but_loopback_ones_cors_origins_included(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"), cors_origins=("https://app.example",))

    async def scenario(client):
        def from_page(origin: str):
            return client.post("/v1/completions", json=COMPLETION, headers={"Origin": origin})

        pages = [await from_page(origin) for origin in ("https://app.example", "https://evil.example", "null")]
        loopback_pages = ("http://127.0.0.1:8000", "http://[::1]:8000", "http://LOCALHOST")
        loopback = [await from_page(origin) for origin in loopback_pages]
        return pages, loopback

    pages, loopback = run(app, scenario)
    for page in pages:  # was: 200 for --cors-origin's page, which CORS then let read the answer
        assert error_of(page, 403)["code"] == "origin_not_allowed"
    assert "'https://app.example'" in error_of(pages[0], 403)["message"]
    assert [response.status_code for response in loopback] == [200] * 3  # the chat page at /


def test_with_keys_any_host_and_content_type_may_come(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("remote")
    app = create_app(engine, database)

    async def scenario(client):
        headers = {"Authorization": f"Bearer {key}", "host": "api.example.com", "content-type": "text/plain"}
        return await client.post("/v1/completions", content=json.dumps(COMPLETION), headers=headers)

    assert run(app, scenario).status_code == 200


def test_refused_requests_and_moderations_count_against_the_requests_per_minute(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("flooder", rpm=3)
    app = create_app(engine, database)

    async def scenario(client):
        headers = {"Authorization": f"Bearer {key}"}
        malformed = await client.post("/v1/completions", json={**COMPLETION, "temperature": 7}, headers=headers)
        unknown = await client.post("/v1/completions", json={**COMPLETION, "model": "other"}, headers=headers)
        moderation = await client.post("/v1/moderations", json={"input": "hi"}, headers=headers)
        after = [
            await client.post("/v1/completions", json=COMPLETION, headers=headers),
            await client.post("/v1/moderations", json={"input": "hi"}, headers=headers),
        ]
        return malformed, unknown, moderation, after

    malformed, unknown, moderation, after = run(app, scenario)
    assert (malformed.status_code, unknown.status_code, moderation.status_code) == (400, 404, 200)
    for refused in after:  # was: 200 for both, the three before uncounted (a key could send them without end)
        assert error_of(refused, 429)["code"] == "rate_limit_exceeded" and "Retry-After" in refused.headers


def test_requests_naming_a_model_not_served_are_recorded_under_one_model_the_names_logged(engine, tmp_path, caplog):
    """A refused request's ledger row kept the model it named as sent, cut to 256 characters: a client's control
    characters went into `seekstack usage`'s table, and each name sent made a row of it a key and day. They are
    recorded under UNKNOWN_MODEL, one row a key and day, each name sent in the log, cut to its start; the 404 names
    the start of an overlong one."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("filler", rpm=100)
    app = create_app(engine, database)
    asked = ["m" * 500_000, "gpt\x1b[2J\nERROR: forged", "gpt-4", 7]

    async def scenario(client):
        headers = {"Authorization": f"Bearer {key}"}
        return [await client.post("/v1/completions", json={**COMPLETION, "model": model}, headers=headers)
                for model in asked]  # fmt: skip

    answers = run(app, scenario)
    assert [answer.status_code for answer in answers] == [404, 404, 404, 400]  # 7: no model name
    assert error_of(answers[0], 404)["message"].startswith(f"the model '{'m' * 79}... (500,000 characters) does not")
    assert [row["model"] for row in Ledger(database).records("filler")] == [UNKNOWN_MODEL] * 4
    [day] = Ledger(database).daily("filler")
    assert (day.model, day.requests) == (UNKNOWN_MODEL, 4)
    logged = [record.getMessage() for record in caplog.records if "which is not served" in record.getMessage()]
    assert logged == [
        f"A request named the model {shown_value(model)}, which is not served; its usage is recorded under the model "
        "'(unknown)'"
        for model in asked
    ]


def test_a_base_served_under_the_ledgers_name_for_models_not_served_is_refused(engine, tmp_path):
    """--served-model-name '(unknown)' would mix the base's usage with that of requests for models not served."""
    with pytest.raises(ValueError, match=r"^the served model name '\(unknown\)' is what the ledger records requests"):
        create_app(engine, open_database(tmp_path / "db"), UNKNOWN_MODEL)


def test_a_key_sent_without_bearer_is_told_so_not_called_missing(engine, tmp_path):
    """An Authorization header holding the key alone (or "Token KEY", "Bearer" without a key) was answered "missing
    API key", though a key was sent: the caller looked for a key their code had set."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("alice")
    headers = [{"Authorization": key}, {"Authorization": f"Token {key}"}, {"Authorization": "Bearer "}, {}]

    async def scenario(client):
        return [await client.get("/v1/models", headers=header) for header in headers]

    errors = [error_of(response, 401) for response in run(create_app(engine, database), scenario)]
    send = ": send the header 'Authorization: Bearer sk-ss-...'"
    assert [error["message"] for error in errors] == [
        *["the Authorization header holds no Bearer API key" + send] * 3, "missing API key" + send,
    ]  # fmt: skip
    assert {error["code"] for error in errors} == {"no_api_key"}


def test_the_openapi_document_needs_a_key_and_names_only_the_models_it_may_use(engine, tmp_path):
    database = open_database(tmp_path / "db")
    narrow, broad = KeyStore(database).create("narrow", models=("legal",)), KeyStore(database).create("broad")
    app = create_app(engine, database)

    async def scenario(client):
        keyed = [{"Authorization": f"Bearer {key}"} for key in (narrow, broad)]
        documents = [await client.get("/openapi.json", headers=headers) for headers in keyed]
        return await client.get("/openapi.json"), documents

    anonymous, documents = run(app, scenario)
    assert error_of(anonymous, 401)["code"] == "no_api_key"  # was: 200, naming every model and adapter to anyone
    # the model field's first branch, a string (or null: the base model)
    listed = [document.json()["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["anyOf"][0]["enum"]
              for document in documents]  # fmt: skip
    assert listed == [[], ["model"]]


def test_the_chat_page_may_not_be_framed_by_another_site(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))

    async def scenario(client):
        return [await client.get("/"), await client.head("/")]

    for page in run(app, scenario):  # was: neither header, the page open to a frame laid over it (clickjacking)
        assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"].split("; ")


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path):
    open_database(tmp_path / "keys.db").close()
    assert stat.S_IMODE((tmp_path / "keys.db").stat().st_mode) == 0o600


def test_an_existing_database_others_may_read_is_warned_of(tmp_path, capsys):
    open_database(tmp_path / "private.db").close()
    open_database(tmp_path / "private.db").close()
    assert capsys.readouterr().err == ""
    (tmp_path / "private.db").rename(tmp_path / "shared.db")
    (tmp_path / "shared.db").chmod(0o644)  # copied with cp, made by the sqlite3 shell
    open_database(tmp_path / "shared.db").close()
    warning = capsys.readouterr().err  # was: nothing, the key hashes and every bill open to all
    assert f"{tmp_path / 'shared.db'} is readable or writable by users other than its owner (mode 0644)" in warning
    assert f"chmod 600 {tmp_path / 'shared.db'}" in warning


def test_a_key_uses_only_its_models_and_only_admin_keys_read_usage(engine, tmp_path):
    database = open_database(tmp_path / "db")
    store = KeyStore(database)
    narrow, boss = store.create("narrow", models=("legal-adapter",)), store.create("boss", admin=True)
    app = create_app(engine, database)

    async def scenario(client):
        as_narrow, as_boss = {"Authorization": f"Bearer {narrow}"}, {"Authorization": f"Bearer {boss}"}
        return (
            await client.post("/v1/completions", json=COMPLETION, headers=as_narrow),
            await client.post("/v1/completions", json={**COMPLETION, "model": "typo"}, headers=as_narrow),
            await client.get("/v1/models", headers=as_narrow),
            await client.get(f"/v1/models/{engine.model_name}", headers=as_narrow),
            await client.get("/v1/admin/usage", headers=as_narrow),
            await client.get("/v1/admin/usage", headers=as_boss),
        )

    generation, unknown, models, base_card, user_usage, admin_usage = run(app, scenario)
    assert models.json()["data"] == []  # it may not use the base model
    # was: 403 model_not_allowed for the base model, and 404 naming it ("this server has 'model'") for a typo
    not_allowed, not_there = error_of(generation, 404), error_of(unknown, 404)
    assert not_there == {**not_allowed, "message": not_allowed["message"].replace("'model'", "'typo'", 1)}
    assert (not_allowed["code"], not_allowed["param"]) == ("model_not_found", "model")
    assert (
        not_allowed["message"] == "the model 'model' does not exist or you do not have access to it; you may use none"
    )
    assert error_of(base_card, 404) == not_allowed  # nor see it
    assert error_of(user_usage, 403)["code"] == "admin_required"
    assert admin_usage.status_code == 200 and admin_usage.json()["data"][0]["key_name"] == "narrow"


def test_the_admin_usage_report_counts_cached_prompt_tokens(engine, tmp_path):
    database = open_database(tmp_path / "db")
    boss = KeyStore(database).create("boss", admin=True)
    Ledger(database).record(UsageRecord("boss", "model", "/v1/completions", 1000, 10, 0.1, 200, cached_tokens=800))

    async def scenario(client):
        return await client.get("/v1/admin/usage", headers={"Authorization": f"Bearer {boss}"})

    (day,) = run(create_app(engine, database), scenario).json()["data"]
    assert (day["prompt_tokens"], day["cached_tokens"]) == (1000, 800)  # was: no cached_tokens


def test_the_admin_usage_reports_costs_as_the_decimals_the_prices_make(engine, tmp_path):
    """Costs were binary floats of tokens times prices, and sums of those: a request of 11 prompt and 5 completion
    tokens at 0.01 and 0.03 per 1k cost 0.00026000000000000003 in its ledger row, and /v1/admin/usage (and `seekstack
    usage --json`) showed such sums as they came. Each cost, and each sum, is now the decimal it stands for."""
    database = open_database(tmp_path / "db")
    KeyStore(database).set_plan("pro", 0.01, 0.03)
    boss, ledger = KeyStore(database).create("boss", admin=True, plan="pro"), Ledger(database)
    for model, prompt, completion in (("a", 7, 3), ("a", 11, 5), ("a", 13, 29), ("b", 11, 5), ("b", 3, 1)):
        ledger.record(UsageRecord("boss", model, "/v1/completions", prompt, completion, 0.1, 200))

    async def scenario(client):
        return await client.get("/v1/admin/usage", headers={"Authorization": f"Bearer {boss}"})

    report = run(create_app(engine, database), scenario).json()
    assert [row["cost"] for row in ledger.records("boss")] == [0.00016, 0.00026, 0.001, 0.00026, 0.00006]
    assert [(day["model"], day["cost"]) for day in report["data"]] == [("a", 0.00142), ("b", 0.00032)]
    assert (report["total_cost"], ledger.spent("boss")) == (0.00174, 0.00174)
    tiny = Plan("tiny", 1e-9, 1.5e-7)  # prices far below any real one are billed as given, not rounded away
    assert (tiny.cost_pico(40, 0), tiny.cost_pico(0, 1)) == (40, 150)  # 4e-11 and 1.5e-10


def usage_reports(engine, tmp_path, *queries):
    """The admin's /v1/admin/usage answers to each query (params) of a database where alice and ops used 0.1 each."""
    database = open_database(tmp_path / "db")
    boss = KeyStore(database).create("boss", admin=True)
    for name in ("alice", "ops"):
        Ledger(database).record(UsageRecord(name, "model", "/v1/completions", 10, 10, 0.1, 200))

    async def scenario(client):
        as_boss = {"Authorization": f"Bearer {boss}"}
        return [await client.get("/v1/admin/usage", params=params, headers=as_boss) for params in queries]

    return run(create_app(engine, database), scenario)


def test_the_admin_usage_report_refuses_a_parameter_given_twice_naming_it(engine, tmp_path):
    """`/v1/admin/usage?key=alice&key=ops` answered ops' usage alone (FastAPI reads the last of a repeated parameter),
    as if alice had none: a parameter given twice is now refused, naming it."""
    answers = usage_reports(
        engine, tmp_path, [("key", "alice"), ("key", "ops")], [("since", "2026-11-01"), ("since", "2026-11-02")]
    )
    errors = [error_of(answer, 400) for answer in answers]
    assert [(error["param"], error["code"], error["message"]) for error in errors] == [
        ("key", "invalid_value", "key given 2 times ('alice', 'ops'): give it once"),
        ("since", "invalid_value", "since given 2 times ('2026-11-01', '2026-11-02'): give it once"),
    ]


def test_the_admin_usage_report_refuses_a_parameter_it_does_not_take_naming_it(engine, tmp_path):
    """FastAPI drops a query parameter no argument names: `?start_date=` (LiteLLM's name for since) or `?keys=alice`
    answered 200 with every key's usage on every day, as if the filter had been applied."""
    queries = ({"start_date": "2026-11-01"}, {"keys": "alice"}, {"key": "alice", "since": "2026-01-01"})
    start_date, keys, alice = usage_reports(engine, tmp_path, *queries)
    errors = [error_of(answer, 400) for answer in (start_date, keys)]
    assert [(error["param"], error["code"], error["message"]) for error in errors] == [
        (param, "unknown_parameter", f"/v1/admin/usage takes no parameter {param!r}: it takes key, since, until, "
         "model (since and until: YYYY-MM-DD)")
        for param in ("start_date", "keys")
    ]  # fmt: skip
    assert [day["key_name"] for day in alice.json()["data"]] == ["alice"]


def test_the_admin_usage_report_cuts_a_huge_value_it_refuses_in_its_error(engine, tmp_path):
    """A day, a key name or a parameter name of 30,000 characters is named by its start and its size, as other
    refusals cut the values they echo, not sent back whole (an unknown parameter's `param` too)."""
    huge = "9" * 30_000  # two of them within httpx's longest query, 65,536 characters
    queries = ({"since": huge}, {"key": huge}, {huge: "1"}, [("until", huge), ("until", huge)])
    answers = usage_reports(engine, tmp_path, *queries)
    statuses = (400, 404, 400, 400)
    errors = [error_of(answer, status) for answer, status in zip(answers, statuses, strict=True)]
    assert all(len(str(error)) < 600 and "(30,000 characters)" in error["message"] for error in errors), errors
    assert errors[2]["param"] == "9" * SHOWN_VALUE_CHARS + "... (30,000 characters)"


def test_answers_and_429s_carry_openais_rate_limit_headers(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("paced", rpm=2, tpm=100)
    prompt_tokens = len(engine.tokenizer.encode(COMPLETION["prompt"]))

    async def scenario(client):
        as_key = {"Authorization": f"Bearer {key}"}
        answered = await client.post("/v1/completions", json=COMPLETION, headers=as_key)
        async with client.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}, headers=as_key) as s:
            streamed = s.headers
            await s.aread()
        return answered, streamed, await client.post("/v1/completions", json=COMPLETION, headers=as_key)

    answered, streamed, refused = run(create_app(engine, database), scenario)
    reserved = prompt_tokens + COMPLETION["max_tokens"]
    assert answered.status_code == 200
    # was: none on an answer, only Retry-After on a 429
    for headers, requests_left, tokens_left in (
        (answered.headers, 1, 100 - reserved),
        (streamed, 0, 100 - 2 * reserved),
    ):
        counts = {
            name: value for name, value in headers.items() if name.startswith(("x-ratelimit-l", "x-ratelimit-rem"))
        }
        assert counts == {
            "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": str(requests_left),
            "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": str(tokens_left),
        }  # fmt: skip
        for unit in ("requests", "tokens"):  # until the first request leaves the window: a minute at most
            assert 0 < seconds_of(headers[f"x-ratelimit-reset-{unit}"]) <= 60
    assert error_of(refused, 429)["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert seconds_of(refused.headers["x-ratelimit-reset-requests"]) == int(refused.headers["retry-after"])


def test_moderations_count_against_the_requests_per_minute_and_say_so_as_openais(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("checker", rpm=1)
    app = create_app(engine, database)

    async def scenario(client):
        check = {"input": "hello"}
        return [
            await client.post("/v1/moderations", json=check, headers={"Authorization": f"Bearer {key}"}) for _ in "ab"
        ]

    answered, refused = run(app, scenario)
    assert answered.status_code == 200 and answered.headers["x-ratelimit-remaining-requests"] == "0"  # was: none
    assert error_of(refused, 429)["code"] == "rate_limit_exceeded"
    declared = app.openapi()["paths"]["/v1/moderations"]["post"]["responses"]
    assert "429" in declared  # was: undeclared, though a key's requests per minute refuse moderations too


def test_every_answer_to_a_counted_request_carries_both_limits_headers(engine, tmp_path):
    """OpenAI answers a key's calls with x-ratelimit-* of its requests and its tokens per minute alike; a 400 after the
    request was counted, /tokenize, a moderation and a 429 over the requests had none, or one limit's alone."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("paced", rpm=4, tpm=100)
    as_key = {"Authorization": f"Bearer {key}"}
    prompt_tokens = len(engine.tokenizer.encode(COMPLETION["prompt"]))

    async def scenario(client):
        return [
            await client.post("/v1/completions", json=COMPLETION, headers=as_key),  # charged its tokens
            await client.post("/v1/completions", json={**COMPLETION, "max_tokens": "many"}, headers=as_key),
            await client.post("/tokenize", json={"prompt": "hello"}, headers=as_key),
            await client.post("/v1/moderations", json={"input": "hello"}, headers=as_key),
            await client.post("/v1/completions", json=COMPLETION, headers=as_key),  # the fifth in a minute
        ]

    answered, malformed, tokenized, moderated, refused = run(create_app(engine, database), scenario)
    assert [response.status_code for response in (answered, malformed, tokenized, moderated, refused)] == [
        200, 400, 200, 200, 429,
    ]  # fmt: skip
    tokens_left = str(100 - prompt_tokens - COMPLETION["max_tokens"])
    for response, requests_left in ((malformed, "2"), (tokenized, "1"), (moderated, "0"), (refused, "0")):
        headers = response.headers
        assert (headers.get("x-ratelimit-limit-requests"), headers.get("x-ratelimit-remaining-requests")) == (
            "4", requests_left,
        )  # fmt: skip
        assert (headers.get("x-ratelimit-limit-tokens"), headers.get("x-ratelimit-remaining-tokens")) == (
            "100", tokens_left,
        )  # fmt: skip
        for unit in ("requests", "tokens"):
            assert 0 < seconds_of(headers[f"x-ratelimit-reset-{unit}"]) <= 60


def test_a_tokens_limit_nothing_is_charged_against_resets_in_no_time(engine, tmp_path):
    """OpenAI's reset-tokens is when the limit is whole again: with no tokens charged in the window it is now, where
    a 400 before any charge said 1m0s, so a client pacing by it waited a minute for nothing."""
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("tokens-only", tpm=100)

    async def scenario(client):
        malformed = {**COMPLETION, "max_tokens": "many"}
        return await client.post("/v1/completions", json=malformed, headers={"Authorization": f"Bearer {key}"})

    headers = run(create_app(engine, database), scenario).headers
    limits = {name: value for name, value in headers.items() if name.startswith("x-ratelimit-")}
    assert limits == {
        "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "0s",
    }  # fmt: skip


def seconds_of(duration: str) -> int:
    """The seconds of a Go duration of whole seconds, as OpenAI's x-ratelimit-reset-* give them: `45s`, `1m0s`."""
    minutes, _, seconds = duration.removesuffix("s").rpartition("m")
    return 60 * int(minutes or 0) + int(seconds)


def test_an_expired_key_gets_401_saying_when_it_expired(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("trial", expires_at=time.time() + 3600)
    with database.transaction() as connection:  # its hour has passed
        connection.execute("UPDATE keys SET expires_at = ? WHERE name = 'trial'", (time.time() - 1,))

    async def scenario(client):
        return await client.post("/v1/completions", json=COMPLETION, headers={"Authorization": f"Bearer {key}"})

    expired = error_of(run(create_app(engine, database), scenario), 401)
    assert expired["code"] == "expired_api_key" and re.fullmatch(
        r"the API key expired at [\d-]+ [\d:]+ UTC", expired["message"]
    )


def test_a_key_that_has_spent_its_budget_is_refused_before_its_request_is_read(engine, tmp_path):
    """LiteLLM's max_budget: a key at its budget gets 429 insufficient_quota (OpenAI's answer for an account out of
    credit), recorded at no cost; a budget over a period counts only that period's spend."""
    database = open_database(tmp_path / "db")
    keys, ledger = KeyStore(database), Ledger(database)
    keys.set_plan("pricey", prompt_per_1k=500.0, completion_per_1k=500.0)  # a token costs 0.5
    capped = keys.create("capped", plan="pricey", budget=Budget(6.0))  # two requests of 2 + 4 tokens
    monthly = keys.create("monthly", budget=Budget(1.0, period_s=30 * 86400))
    ledger.record(UsageRecord("monthly", "model", "/v1/completions", 10**6, 0, 0.1, 200))  # 2.0, now
    with database.transaction() as connection:  # ... recorded 31 days ago, out of the period
        connection.execute("UPDATE usage SET created_at = ? WHERE key_name = 'monthly'", (time.time() - 31 * 86400,))

    async def scenario(client):
        def post(key):
            request = {**COMPLETION, "prompt": [5, 6]}
            return client.post("/v1/completions", json=request, headers={"Authorization": f"Bearer {key}"})

        return [await post(capped) for _ in range(3)], await post(monthly)

    (first, second, refused), fresh_period = run(create_app(engine, database), scenario)
    assert first.status_code == second.status_code == fresh_period.status_code == 200
    spent = sum(row["cost"] for row in ledger.records("capped"))
    assert spent == 6.0  # was: served, and billed, without end
    error = error_of(refused, 429)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"].startswith("key 'capped' has spent 6.000000, its whole budget of 6: no request is")
    assert ledger.records("capped")[-1]["cost"] == 0 and ledger.records("capped")[-1]["status"] == 429
    assert refused.headers["x-should-retry"] == "false"  # was: the openai client sent it 3 times, 3 rows, 3 of the rpm


def test_cors_admits_the_configured_origins_only(engine, tmp_path):
    """A page of a configured origin is admitted, another's refused; either preflight's answer carries an X-Request-Id,
    as every answer does (they had none: CORS answered them outside RequestIds)."""
    app = create_app(engine, open_database(tmp_path / "db"), cors_origins=("https://app.example",))

    async def scenario(client):
        def preflight(origin: str):
            # the headers OpenAI's JS client sends on every call from a browser
            headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
                       "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,"
                                                         "x-stainless-retry-count,openai-organization"}  # fmt: skip
            return client.options("/v1/chat/completions", headers=headers)

        limited = await client.post("/v1/completions", json=COMPLETION, headers={"Origin": "https://app.example"})
        return await preflight("https://app.example"), await preflight("https://evil.example"), limited

    allowed, refused, answer = run(app, scenario)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-stainless-os" in allowed.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    for preflight in (allowed, refused):
        assert re.fullmatch("[0-9a-f]{32}", preflight.headers["x-request-id"])
    assert "retry-after" in answer.headers["access-control-expose-headers"].lower()  # a page can read a 429's wait
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()  # and its call's request id
    exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].lower().split(",")}
    assert exposed >= {"x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens"}  # was: not to a page's script
    assert "x-should-retry" in exposed  # a budget's 429 says not to retry it, to OpenAI's JS client in a page too


def test_a_pages_x_request_id_refused_is_told_to_the_page_as_cors_lets_it_read(engine, tmp_path):
    """RequestIds refused an X-Request-Id unlike an id before CORS saw the answer: the 400 came without
    Access-Control-Allow-Origin, so the page's script read a network error, not what was wrong."""
    app = create_app(engine, open_database(tmp_path / "db"), cors_origins=("https://app.example",))

    async def scenario(client):
        return await client.get("/v1/models", headers={"Origin": "https://app.example", "X-Request-Id": "job 7"})

    refused = run(app, scenario)
    assert error_of(refused, 400)["param"] == "X-Request-Id"
    assert refused.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in refused.headers["access-control-expose-headers"].lower()  # the refusal's own id, read
    assert re.fullmatch("[0-9a-f]{32}", refused.headers["x-request-id"])


def test_health_and_the_chat_page_answer_head_and_a_compressed_body_is_refused_naming_its_encoding(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))

    async def scenario(client):
        compressed = gzip.compress(json.dumps(COMPLETION).encode())
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return (
            await client.head("/health"),
            await client.head("/"),
            await client.post("/v1/completions", content=compressed, headers=headers),
        )

    health, page, gzipped = run(app, scenario)
    assert health.status_code == 200 and page.status_code == 200
    assert error_of(gzipped, 415)["code"] == "unsupported_content_encoding"
    assert "'gzip'" in error_of(gzipped, 415)["message"]


def test_echo_best_of_and_the_refused_fields_of_openai(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def scenario(client):
        answers = {
            "echo": await client.post("/v1/completions", json={**COMPLETION, "echo": True}),
            "echo ids": await client.post("/v1/completions", json={**COMPLETION, "prompt": [70, 71], "echo": True}),
            "echo stream": await client.post("/v1/completions", json={**COMPLETION, "echo": True, "stream": True}),
            "best_of": await client.post(
                "/v1/completions", json={**COMPLETION, "n": 2, "best_of": 4, "temperature": 1.5, "logprobs": 0}
            ),
            "best_of < n": await client.post("/v1/completions", json={**COMPLETION, "n": 3, "best_of": 2}),
            "best_of stream": await client.post("/v1/completions", json={**COMPLETION, "best_of": 2, "stream": True}),
            "suffix": await client.post("/v1/completions", json={**COMPLETION, "suffix": "end"}),
            "tools": await client.post("/v1/chat/completions", json={**chat, "tools": [{"type": "function"}]}),
            "text": await client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}}),
            "top_logprobs": await client.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}),
        }
        return answers

    answers = run(app, scenario)
    assert answers["echo"].json()["choices"][0]["text"].startswith("hello")
    assert answers["echo ids"].json()["choices"][0]["text"].startswith(engine.tokenizer.decode([70, 71]))
    first_event = json.loads(answers["echo stream"].text.splitlines()[0][6:])
    assert first_event["choices"][0]["text"] == "hello"
    best = answers["best_of"].json()
    assert [choice["index"] for choice in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == 4 * 4  # every candidate is generated (and billed)
    totals = [sum(choice["logprobs"]["token_logprobs"]) for choice in best["choices"]]
    assert totals == sorted(totals, reverse=True)  # the likeliest first
    for name, param in (("best_of < n", "best_of"), ("best_of stream", "best_of"), ("suffix", "suffix"),
                        ("tools", "tools.0.function"), ("top_logprobs", "top_logprobs")):  # fmt: skip
        assert error_of(answers[name], 400)["param"] == param, name
    assert answers["text"].status_code == 200


def test_a_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))

    def never(*args, **kwargs):
        raise AssertionError("the tokenizer was asked")

    engine.tokenizer.encode = never

    async def scenario(client):
        return await client.post("/v1/completions", json={**COMPLETION, "prompt": "word " * 400_000})

    error = error_of(run(app, scenario), 400)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")


def test_a_list_of_prompts_gets_n_choices_each_in_order(engine, tmp_path):
    app = create_app(engine, open_database(tmp_path / "db"))
    texts = {**COMPLETION, "prompt": ["hello", "world"], "n": 2, "echo": True}
    ids = {**COMPLETION, "prompt": [[70, 71], [72]], "stream": True, "stream_options": {"include_usage": True}}

    async def scenario(client):
        return (
            await client.post("/v1/completions", json=texts),
            await client.post("/v1/completions", json=ids),
            await client.post("/v1/completions", json={**COMPLETION, "prompt": ["x"] * 16, "n": 5}),
        )

    whole, streamed, too_many = run(app, scenario)
    choices = whole.json()["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2, 3]
    assert [choice["text"][:5] for choice in choices] == ["hello", "hello", "world", "world"]
    encode = engine.tokenizer.encode
    usage = whole.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(encode("hello")) + len(encode("world")), 16)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert {choice["index"] for event in events for choice in event["choices"]} == {0, 1}
    assert events[-1]["usage"]["prompt_tokens"] == 3 and events[-1]["usage"]["completion_tokens"] == 8
    assert error_of(too_many, 400)["param"] == "n"


def test_a_batch_of_32_prompts_as_lm_evals_local_completions_sends_is_scored(engine, tmp_path):
    """lm-eval's local-completions sends its batch_size of prompts in one request (vLLM takes any number): 32 were
    refused, 'prompt: List should have at most 16 items'."""
    prompts = [f"hello {number}" for number in range(32)]
    batch = {**COMPLETION, "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 1}

    async def scenario(client):
        return await client.post("/v1/completions", json=batch, timeout=120)

    answered = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert answered.status_code == 200, answered.text
    choices = answered.json()["choices"]
    assert [choice["index"] for choice in choices] == list(range(32))
    assert [choice["text"][: len(prompt)] for choice, prompt in zip(choices, prompts, strict=True)] == prompts


def test_prompt_tokens_read_from_the_prefix_cache_are_reported_and_billed_at_the_cached_price(engine, tmp_path):
    database = open_database(tmp_path / "db")
    store = KeyStore(database)
    store.set_plan("cache-aware", prompt_per_1k=1.0, completion_per_1k=2.0, cached_prompt_per_1k=0.1)
    key = store.create("cached", plan="cache-aware")
    app = create_app(engine, database)
    body = {**COMPLETION, "prompt": list(range(40, 104))}  # 64 tokens: four full cache blocks

    async def scenario(client):
        headers = {"Authorization": f"Bearer {key}"}
        return [(await client.post("/v1/completions", json=body, headers=headers)).json()["usage"] for _ in range(2)]

    first, second = run(app, scenario)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 48 <= cached < 64  # whole blocks, short of the last token, which is computed again for its logits
    rows = Ledger(database).records()
    assert [row["cached_tokens"] for row in rows] == [0, cached]
    expected = ((64 - cached) * 1.0 + cached * 0.1 + 4 * 2.0) / 1000
    assert rows[1]["cost"] == pytest.approx(expected) and rows[0]["cost"] == pytest.approx((64 + 8) / 1000)


def events_of(streamed) -> list[dict]:
    """The JSON events of a streamed answer, [DONE] left out."""
    return [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]


def test_cached_prompt_tokens_of_several_prompts_are_summed_over_the_prompts(engine, tmp_path):
    """Each prompt's n choices share it (billed once): per prompt the most any choice read from the cache."""
    database = open_database(tmp_path / "db")
    app = create_app(engine, database)
    first, second = list(range(40, 104)), list(range(140, 204))  # 64 tokens each: four full cache blocks
    body = {**COMPLETION, "prompt": [first, second], "n": 2}

    async def scenario(client):
        await client.post("/v1/completions", json=body)  # fills the cache with both prompts
        alone = (await client.post("/v1/completions", json={**COMPLETION, "prompt": first})).json()["usage"]
        whole = (await client.post("/v1/completions", json=body)).json()["usage"]
        streamed = await client.post(
            "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        return alone, whole, events_of(streamed)[-1]["usage"]

    alone, whole, streamed = run(app, scenario)
    cached_once = alone["prompt_tokens_details"]["cached_tokens"]
    assert 48 <= cached_once < 64
    for usage in (whole, streamed):
        assert (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]) == (128, 2 * cached_once)
    assert [row["cached_tokens"] for row in Ledger(database).records()[-2:]] == [2 * cached_once] * 2


def test_chat_logprob_bytes_are_each_tokens_own_bytes_even_part_of_a_character(engine, tmp_path):
    """OpenAI's `bytes`: a token holding part of a UTF-8 character has its own bytes, not U+FFFD's."""
    app = create_app(engine, open_database(tmp_path / "db"))
    emoji = "\U0001f600"
    pieces = engine.tokenizer.encode(emoji)  # one token per byte: the tokenizer learned no merge for it
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **NO_EOS,
            "logprobs": True, "top_logprobs": 5}  # fmt: skip

    async def scenario(client):
        forced = [{**chat, "logit_bias": {str(piece): 100}} for piece in pieces]
        return [(await client.post("/v1/chat/completions", json=body)).json() for body in forced]

    entries = [answer["choices"][0]["logprobs"]["content"][0] for answer in run(app, scenario)]
    assert len(pieces) == 4 and [entry["token"] for entry in entries] == ["\ufffd"] * 4
    assert bytes(sum((entry["bytes"] for entry in entries), [])) == emoji.encode("utf-8")
    alternatives = [top for entry in entries for top in entry["top_logprobs"]]
    parts = [top["bytes"] for top in alternatives if top["token"] == "\ufffd"]  # bytes of a character, one a token
    assert parts and all(len(part) == 1 and part[0] >= 0x80 for part in parts)
    assert all(bytes(top["bytes"]).decode() == top["token"] for top in alternatives if top["token"] != "\ufffd")


def test_a_logprob_of_an_id_past_the_tokenizers_has_no_bytes(engine):
    """A model's vocabulary padded past its tokenizer's ids (as DeepSeek-V3's): such an id can be ranked in
    top_logprobs; its bytes are none (the lookup of a missing id made the answer a 500)."""
    from seekstack.serve.protocol import token_bytes

    [letter] = engine.tokenizer.encode("b")
    assert token_bytes(engine.tokenizer, engine.tokenizer.vocab_size + 3) == []
    assert token_bytes(engine.tokenizer, letter) == list(b"b")


def test_the_logprob_bytes_of_an_added_token_are_its_texts_utf8(engine):
    """An added 'café' is all byte-level stand-ins: read as a vocabulary piece it spelled b'caf\\xe9', not UTF-8."""
    from tokenizers import Tokenizer as BackendTokenizer

    from seekstack.serve.protocol import token_bytes
    from seekstack.tokenizer import Tokenizer

    backend = BackendTokenizer.from_str(engine.tokenizer.backend.to_str())
    backend.add_tokens(["café", "đem", "日本"])
    added = Tokenizer(backend)
    for text in ("café", "đem", "日本"):
        assert token_bytes(added, backend.token_to_id(text)) == list(text.encode("utf-8"))


def test_a_chat_call_without_max_tokens_gets_what_its_keys_minute_has_left(engine, tmp_path):
    database = open_database(tmp_path / "db")
    key = KeyStore(database).create("minute", tpm=40)
    app = create_app(engine, database)
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], **NO_EOS}

    async def scenario(client):
        headers = {"Authorization": f"Bearer {key}"}
        first = await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10}, headers=headers)
        rest = await client.post("/v1/chat/completions", json=chat, headers=headers)
        none_left = await client.post("/v1/chat/completions", json=chat, headers=headers)
        return first.json()["usage"], rest, none_left

    first, rest, none_left = run(app, scenario)
    assert rest.status_code == 200, rest.text
    assert rest.json()["choices"][0]["finish_reason"] == "length"
    assert first["total_tokens"] + rest.json()["usage"]["total_tokens"] == 40  # all the minute's tokens, no more
    assert error_of(none_left, 429)["type"] == "rate_limit_error" and "Retry-After" in none_left.headers


def test_completion_top_logprobs_hold_the_sampled_token_also_outside_the_top(engine, tmp_path):
    """OpenAI: "the API will always return the logprob of the sampled token", so up to logprobs + 1 entries."""
    app = create_app(engine, open_database(tmp_path / "db"))
    forced = engine.tokenizer.encode(" fox")[-1]  # forced by logit_bias; logprobs are the model's own, unbiased
    body = {**COMPLETION, "logit_bias": {str(forced): 100}}

    async def scenario(client):
        return [(await client.post("/v1/completions", json={**body, "logprobs": k})).json() for k in (0, 2)]

    for k, answer in zip((0, 2), run(app, scenario), strict=True):
        logprobs = answer["choices"][0]["logprobs"]
        token = engine.tokenizer.decode([forced])
        assert logprobs["tokens"] == [token] * 4
        for top, logprob in zip(logprobs["top_logprobs"], logprobs["token_logprobs"], strict=True):
            assert list(top)[-1] == token and top[token] == logprob  # not among the k likeliest, listed after them
            assert len(top) == k + 1 or "\ufffd" in top  # partial UTF-8 alternatives print alike: one entry


def token_texts(choice: dict) -> list[str]:
    """The text of each token in a choice's logprobs, from either endpoint."""
    logprobs = choice["logprobs"]
    return logprobs["tokens"] if "tokens" in logprobs else [entry["token"] for entry in logprobs["content"]]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_logprobs_hold_only_the_tokens_whose_text_a_stop_string_left(engine, tmp_path, route):
    """A stop string's tokens, and one holding the text's end and the stop string's start, are cut with it."""
    app = create_app(engine, open_database(tmp_path / "db"))
    tokenizer = engine.tokenizer
    unprintable = [i for i in range(tokenizer.vocab_size) if not tokenizer.decode([i]).isascii() or i < 5]
    body = {"model": "model", "max_tokens": 12, "temperature": 0, **NO_EOS,
            "logit_bias": {str(i): -100 for i in unprintable}}  # fmt: skip
    if route == "/v1/completions":
        body |= {"prompt": "hello", "logprobs": 0}
    else:
        body |= {"messages": [{"role": "user", "content": "hello"}], "logprobs": True}

    def text_of(choice: dict) -> str:
        return choice["text"] if "text" in choice else choice["message"]["content"]

    async def scenario(client):
        free = (await client.post(route, json=body)).json()["choices"][0]
        tokens = token_texts(free)
        starts = [len("".join(tokens[:i])) for i in range(len(tokens))]
        straddled = next(i for i, token in enumerate(tokens) if len(token) > 1 and i > 0)
        stop = text_of(free)[starts[straddled] + 1 :]  # begins inside a token
        whole = await client.post(route, json={**body, "stop": stop})
        streamed = await client.post(route, json={**body, "stop": stop, "stream": True})
        return tokens, whole.json()["choices"][0], events_of(streamed)

    tokens, whole, events = run(app, scenario)
    text = text_of(whole)
    kept = [token for i, token in enumerate(tokens) if len("".join(tokens[: i + 1])) <= len(text)]
    assert whole["finish_reason"] == "stop" and len("".join(kept)) < len(text)  # the token the stop string began in
    assert token_texts(whole) == kept
    streamed = [token for event in events for choice in event["choices"] if choice.get("logprobs")
                for token in token_texts(choice)]  # fmt: skip
    assert streamed == kept


def test_requests_waiting_to_write_to_a_held_database_leave_health_and_new_requests_their_threads(engine, tmp_path):
    """More requests waiting to write their ledger rows than asyncio has threads (32 at most): /health, a database
    read, still answers at once, and the rows are all written once the database is free."""
    database = open_database(tmp_path / "db")
    app = create_app(engine, database)
    other = sqlite3.connect(tmp_path / "db", isolation_level=None, check_same_thread=False)  # a backup, say

    async def scenario(client):
        other.execute("BEGIN IMMEDIATE")
        waiting = [asyncio.ensure_future(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 1}))
                   for _ in range(40)]  # fmt: skip
        await asyncio.sleep(1.0)  # generated, each waiting to write its row
        try:
            health = await asyncio.wait_for(client.get("/health"), timeout=3)
        except TimeoutError:  # was: behind the writes in every thread, each waiting up to 2 minutes
            health = None
        finally:
            other.execute("COMMIT")
        return health, await asyncio.gather(*waiting)

    health, answers = run(app, scenario)
    assert health is not None and health.status_code == 200
    assert [answer.status_code for answer in answers] == [200] * 40
    assert len(Ledger(database).records()) == 40


def test_openais_routes_this_server_lacks_get_404_saying_why(engine, tmp_path):
    """An openai client's embeddings.create or responses.create got 404 "no route POST /v1/embeddings", which said
    nothing of why, where vLLM says its model does not support the Embeddings API. The 404 now says why."""
    app = create_app(engine, open_database(tmp_path / "db"))

    async def scenario(client):
        return [await client.post(path, json={"model": "model", "input": "hi"}) for path in ABSENT_ROUTES]

    embeddings, responses = run(app, scenario)
    assert error_of(embeddings, 404)["message"] == (
        "no route POST /v1/embeddings: the model is a decoder trained for next-token prediction, and its pooled "
        "hidden states are no embedding model"
    )
    assert error_of(responses, 404)["message"] == (
        "no route POST /v1/responses: this server answers OpenAI's Chat Completions API (/v1/chat/completions), not "
        "its Responses API"
    )


def test_a_method_a_route_does_not_take_gets_405_saying_so_and_which_it_takes(engine, tmp_path):
    """GET /v1/completions was answered 405 "no route GET /v1/completions", as if the path were unknown."""
    app = create_app(engine, open_database(tmp_path / "db"))

    async def scenario(client):
        return await client.get("/v1/completions"), await client.post("/v1/models", json={})

    get, post = run(app, scenario)
    assert error_of(get, 405)["message"] == "method GET is not allowed on /v1/completions; it takes POST"
    assert error_of(post, 405)["message"] == "method POST is not allowed on /v1/models; it takes GET"
    assert (get.headers["allow"], post.headers["allow"]) == ("POST", "GET")
