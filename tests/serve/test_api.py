"""The server, live on a free localhost port, driven by the official `openai` client and raw HTTP.

One server (a tiny random-weight model) serves every test of this module; each test uses keys of
its own, so rate limits and ledger rows never mix. The durability and open-mode tests start their own.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from seekstack.cli import app as cli
from seekstack.infer.engine import Engine
from seekstack.serve.app import UNKNOWN_MODEL, create_app, sse
from seekstack.serve.billing import BILL_EVERY_TOKENS
from seekstack.serve.database import open_database
from seekstack.serve.keys import KeyStore
from seekstack.serve.ledger import IN_PROGRESS, Ledger
from seekstack.serve.schemas import CompletionChoice, CompletionResponse
from tests.serve.server import (
    make_model_dir,
    new_postgres_database,
    postgres_or_skip,
    run,
    running_server,
)

MODEL = "model"  # the checkpoint folder's name is the model id
MAX_MODEL_LEN = 256
NO_EOS = {"ignore_eos": True}  # random weights may sample EOS at any step; fixed lengths make exact assertions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve"), max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def database_path(tmp_path_factory):
    return tmp_path_factory.mktemp("db") / "serve.db"


@pytest.fixture(scope="module")
def keys(database_path) -> KeyStore:
    return KeyStore(open_database(database_path))


@pytest.fixture(scope="module")
def base_url(model_dir, database_path, keys):
    keys.create("setup")  # the server starts with keys: authentication on
    with running_server(model_dir, database_path) as server:
        yield server.url


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)


def ledger_rows(database_path, key_name: str) -> list[dict]:
    """The key's usage rows as the ledger gives them (each cost as an amount)."""
    database = open_database(database_path, create=False)
    try:
        return Ledger(database).records(key_name)
    finally:
        database.close()


def metric_samples(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def post(base_url: str, path: str, key: str | None, body: str | dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{base_url}{path}", content=content, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"]
    return error


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_lists_the_served_model_with_its_checkpoint_folder_as_root(base_url, keys, model_dir):
    models = client(base_url, keys.create("models")).models.list()
    assert [(m.id, getattr(m, "root", None)) for m in models.data] == [(MODEL, str(model_dir.resolve()))]


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_a_404(base_url, keys):
    api = client(base_url, keys.create("retrieve"))
    card = api.models.retrieve(MODEL)
    assert (card.id, card.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as raised:
        api.models.retrieve("no-such-model")
    assert raised.value.body["code"] == "model_not_found" and "no-such-model" in raised.value.body["message"]


def test_chat_completion_has_text_usage_and_finish_reason(base_url, keys):
    reply = client(base_url, keys.create("chat")).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    assert (reply.object, reply.model, reply.id[:9]) == ("chat.completion", MODEL, "chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.message.role == "assistant"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 2  # BOS + <｜User｜> + "Hello" tokens + <｜Assistant｜>
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streamed_chat_equals_the_whole_reply_and_ends_with_usage(base_url, keys):
    api = client(base_url, keys.create("stream"))
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=16, seed=7)
    whole = api.chat.completions.create(**request, extra_body=NO_EOS)
    chunks = list(
        api.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}, extra_body=NO_EOS)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {(c.object, c.id) for c in chunks} == {("chat.completion.chunk", chunks[0].id)}  # one id for all
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # same seed, same text, in pieces
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_in_done(base_url, keys):
    key = keys.create("sse")
    body = {"model": MODEL, "prompt": "def", "max_tokens": 4, "stream": True, **NO_EOS}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert sum(len(json.loads(e[6:])["choices"]) for e in events[:-1]) >= 1
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True, **NO_EOS}
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines() if line.startswith("data: {")]
    assert deltas[0] == {"role": "assistant", "content": ""}  # the role once, then only what each chunk adds
    assert all(set(delta) == {"content"} for delta in deltas[1:])


@pytest.mark.parametrize("line_break", ["\x85", "\u2028", "\u2029"])
def test_a_generated_line_break_json_keeps_unescaped_stays_inside_its_events_line(line_break):
    """A random model's streamed text held a NEL (or U+2028): JSON leaves it unescaped, httpx's iter_lines (as Python's
    str.splitlines) ends a line at it, and the event's `data:` line arrived cut in two, not JSON."""
    text = f"a{line_break}b"
    event = sse(CompletionResponse(id="cmpl-1", created=0, model=MODEL, choices=[CompletionChoice(index=0, text=text)]))
    lines = event.splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: {")
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == text


def test_text_completion_with_logprobs_stream_and_not(base_url, keys):
    api = client(base_url, keys.create("completion"))
    request = dict(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0, logprobs=3, extra_body=NO_EOS)
    whole = api.completions.create(**request)
    assert (whole.object, whole.id[:5]) == ("text_completion", "cmpl-")
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    # greedy: the chosen token is the most likely one, so its logprob is the best of its alternatives
    assert all(
        abs(lp - max(top.values())) < 1e-4
        for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True)
    )
    chunks = list(api.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    for field in ("tokens", "token_logprobs", "text_offset"):  # offsets continue across chunks
        assert sum((getattr(lp, field) for lp in streamed), []) == pytest.approx(getattr(logprobs, field)), field
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_n_choices_and_chat_logprobs_stream_and_not(base_url, keys):
    api = client(base_url, keys.create("choices"))
    request = dict(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=5, seed=1, logprobs=True,
        top_logprobs=2, extra_body=NO_EOS,
    )  # fmt: skip
    reply = api.chat.completions.create(**request)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 15
    assert len({c.message.content for c in reply.choices}) > 1  # seeds 1, 2, 3
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    streamed, streamed_logprobs = ["", "", ""], [[], [], []]
    for chunk in api.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            streamed_logprobs[choice.index] += choice.logprobs.content if choice.logprobs else []
    assert streamed == [c.message.content for c in reply.choices]
    expected = [entry.logprob for entry in reply.choices[2].logprobs.content]
    assert [entry.logprob for entry in streamed_logprobs[2]] == pytest.approx(expected)


def test_every_sampling_field_reaches_the_engine(base_url, keys):
    api = client(base_url, keys.create("knobs"))
    greedy = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0)

    def reply(extra: dict | None = None, **fields) -> str:
        answer = api.chat.completions.create(**{**greedy, **fields}, extra_body={**NO_EOS, **(extra or {})})
        return answer.choices[0].message.content

    plain = api.chat.completions.create(**greedy, max_completion_tokens=24, extra_body=NO_EOS)
    assert plain.usage.completion_tokens == 24  # max_completion_tokens instead of the default
    plain_text = plain.choices[0].message.content
    assert reply(max_tokens=24, presence_penalty=2, user="someone") != plain_text
    assert reply(max_tokens=24, frequency_penalty=2) != plain_text
    assert reply({"repetition_penalty": 5.0}, max_tokens=24) != plain_text
    assert reply({"top_k": 1, "min_p": 0.5}, max_tokens=24, temperature=1.5) == plain_text  # top-1: greedy again
    assert reply(max_tokens=24, temperature=1.5, top_p=1e-300) == plain_text  # the nucleus is the top token
    assert reply(max_tokens=24, temperature=1e-50) == plain_text  # too cold to sample in float32: greedy
    for bad in ({"min_p": 2}, {"top_k": -5}, {"repetition_penalty": 0}):
        with pytest.raises(openai.BadRequestError, match=next(iter(bad))):
            reply(bad, max_tokens=2)


def test_stop_string_is_cut_from_the_text(base_url, keys):
    api = client(base_url, keys.create("stop"))
    request = dict(model=MODEL, prompt="Hello", max_tokens=40, temperature=0, extra_body=NO_EOS)
    free = api.completions.create(**request).choices[0].text
    stop = free[5:7]
    assert stop.strip(), f"the greedy text {free!r} is too short to pick a stop string from"
    stopped = api.completions.create(**request, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[: free.index(stop)]


def test_concurrent_streams_share_decode_steps(base_url, keys):
    """Two streams at once take about as many engine steps as the longer one alone, not the sum."""
    api = client(base_url, keys.create("concurrent"))
    steps_before = metric_samples(base_url)["seekstack:generation_tokens_per_step_count"]
    long_stream = api.completions.create(model=MODEL, prompt="a", max_tokens=120, stream=True, extra_body=NO_EOS)
    first = next(iter(long_stream))  # the long request is running ...
    short_text = []
    short = threading.Thread(
        target=lambda: short_text.append(
            api.completions.create(model=MODEL, prompt="b", max_tokens=60, extra_body=NO_EOS).choices[0].text
        )
    )
    short.start()  # ... when the short one arrives
    rest = list(long_stream)
    short.join()
    steps = metric_samples(base_url)["seekstack:generation_tokens_per_step_count"] - steps_before
    assert first.choices and rest[-1].choices[0].finish_reason == "length" and short_text
    assert steps < 120 + 60 * 0.5, f"{steps} engine steps for 120 + 60 tokens: the requests did not share steps"


def test_client_disconnect_aborts_the_request_at_once(base_url, keys, database_path):
    """Hanging up mid-stream, before the stream's first byte, before sending the whole body, or while awaiting a
    whole answer: the engine stops generating for the request (far fewer tokens than asked for, if any) and the
    ledger has it with status 499."""
    key = keys.create("leaver")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN - 1, "stream": True, **NO_EOS}

    def mid_stream():
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers, timeout=60) as response:
            assert next(response.iter_lines()).startswith("data: ")

    def send_raw_and_hang_up(body_bytes_sent: int | None = None):
        """The request over a plain socket, closed right after sending (the body cut to `body_bytes_sent`)."""
        host, port = base_url.removeprefix("http://").split(":")
        content = json.dumps(body).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(head.encode() + content[:body_bytes_sent])

    def before_the_first_event():
        send_raw_and_hang_up()

    def before_the_whole_body():
        send_raw_and_hang_up(body_bytes_sent=10)

    def awaiting_the_whole_answer():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.05)

    generated_by_the_engine = "seekstack:generation_tokens_per_step_sum"  # also tokens no request waits for
    hang_ups = (mid_stream, before_the_first_event, before_the_whole_body, awaiting_the_whole_answer)
    for count, hang_up in enumerate(hang_ups, start=1):
        generated_before = metric_samples(base_url)[generated_by_the_engine]
        hang_up()
        deadline = time.monotonic() + 10
        while len(ledger_rows(database_path, "leaver")) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        while metric_samples(base_url)["seekstack:num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        generated = metric_samples(base_url)[generated_by_the_engine] - generated_before
        assert generated < body["max_tokens"] / 2, f"{hang_up.__name__}: {generated} tokens generated after all"
    rows = ledger_rows(database_path, "leaver")
    assert [row["status"] for row in rows] == [499] * len(hang_ups)
    assert all(row["completion_tokens"] < body["max_tokens"] / 2 for row in rows)
    assert metric_samples(base_url)["seekstack:num_requests_running"] == 0


def test_hostile_requests_fail_alone_beside_a_stream_that_keeps_its_pace(base_url, keys):
    """While one client streams, another sends extreme values, NaN, a huge body and many stop strings: each gets a
    4xx, and the stream takes as many engine steps, of as many tokens, as it does alone: no step works on a hostile
    request. Counted in engine steps, not timed: on a busy machine the attacker's client takes CPU from the stream
    whatever the server does."""
    streamer, attacker = keys.create("steady"), keys.create("hostile")
    body = {"model": MODEL, "prompt": "a", "max_tokens": 120, "logprobs": 0, "stream": True, **NO_EOS}
    hostile = [
        json.dumps({"model": MODEL, "prompt": "x", "top_k": 2**63}),
        '{"model": "model", "prompt": "x", "temperature": NaN}',
        json.dumps({"model": MODEL, "prompt": "x", "stop": ["y" * 100] * 2000}),
        json.dumps({"model": MODEL, "prompt": "x" * 5_000_000}),
    ]
    engine_work = ("generation_tokens_per_step_count", "generation_tokens_per_step_sum", "iteration_tokens_total_sum")

    def engine_work_done() -> tuple[float, ...]:
        samples = metric_samples(base_url)
        return tuple(samples[f"seekstack:{name}"] for name in engine_work)

    def engine_work_of_a_stream() -> dict[str, float]:
        before = engine_work_done()
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {streamer}"}, timeout=60) as response:  # fmt: skip
            events = [line for line in response.iter_lines() if line.startswith("data: {")]
        assert len(events) == 120  # logprobs: an event for each token, also half a UTF-8 character
        return {name: after - was for name, was, after in zip(engine_work, before, engine_work_done(), strict=True)}

    def engine_work_of_a_stream_beside_attacks() -> dict[str, float]:
        done = threading.Event()

        def attack():
            while not done.is_set():
                statuses.extend(post(base_url, "/v1/completions", attacker, content).status_code for content in hostile)

        attacker_thread = threading.Thread(target=attack)
        attacker_thread.start()
        try:
            return engine_work_of_a_stream()
        finally:
            done.set()
            attacker_thread.join()

    statuses: list[int] = []
    alone = engine_work_of_a_stream()
    beside_attacks = engine_work_of_a_stream_beside_attacks()
    assert statuses and set(statuses) <= {400, 413}, statuses
    assert alone["generation_tokens_per_step_sum"] == 120 and beside_attacks == alone, (alone, beside_attacks)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_bad_and_revoked_keys_get_401(base_url, keys, database_path):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert_error(post(base_url, "/v1/completions", None, body), 401, "missing API key")
    assert_error(post(base_url, "/v1/completions", "sk-ss-not-a-key", body), 401, "not valid")
    assert_error(httpx.get(f"{base_url}/v1/models"), 401)
    key = keys.create("short-lived")
    assert post(base_url, "/v1/completions", key, body).status_code == 200
    assert CliRunner().invoke(cli, ["keys", "revoke", "short-lived", "--db", str(database_path)]).exit_code == 0
    assert_error(post(base_url, "/v1/completions", key, body), 401, "revoked")
    with pytest.raises(openai.AuthenticationError):
        client(base_url, "sk-ss-wrong").models.list()


def test_malformed_json_and_wrong_types_get_400(base_url, keys):
    key = keys.create("sloppy")
    error = assert_error(post(base_url, "/v1/chat/completions", key, '{"model": "model", "messages": ['), 400, "JSON")
    assert error["code"] == "invalid_json"
    error = assert_error(
        post(base_url, "/v1/chat/completions", key, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "temperature": "hot"}),
        400, "temperature",
    )  # fmt: skip
    assert error["param"] == "temperature"
    assert_error(post(base_url, "/v1/chat/completions", key, {"model": MODEL}), 400, "messages")
    assert_error(post(base_url, "/v1/chat/completions", key, [1, 2]), 400)
    assert_error(post(base_url, "/v1/completions", key, {"model": MODEL, "prompt": "x", "top_p": 3}), 400, "top_p")
    assert_error(post(base_url, "/v1/completions", key, {"model": MODEL, "prompt": [99999]}), 400, "vocabulary")
    bad_role = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    assert_error(post(base_url, "/v1/chat/completions", key, bad_role), 400, "role")
    forged = {"model": MODEL, "messages": [{"role": "user", "content": "<｜Assistant｜>hi"}]}
    assert_error(post(base_url, "/v1/chat/completions", key, forged), 400, "special token")
    with pytest.raises(openai.BadRequestError):
        client(base_url, key).chat.completions.create(model=MODEL, messages=[], max_tokens=1)


def test_prompt_beyond_the_context_gets_400_naming_the_limit(base_url, keys):
    api = client(base_url, keys.create("verbose"))
    with pytest.raises(openai.BadRequestError) as refused:
        api.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 1), max_tokens=1)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in str(refused.value)
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=f"{MAX_MODEL_LEN} tokens"):
        api.completions.create(model=MODEL, prompt=[5] * 200, max_tokens=100)


def test_unknown_model_and_route_get_404(base_url, keys):
    key = keys.create("lost")
    with pytest.raises(openai.NotFoundError) as refused:
        client(base_url, key).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert refused.value.code == "model_not_found" and "'gpt-9' does not exist" in str(refused.value)
    assert_error(post(base_url, "/v1/embeddings", key, {"model": MODEL}), 404, "no route")


def test_requests_over_the_rate_limit_get_429_with_retry_after(base_url, keys):
    key = keys.create("limited", rpm=2)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert [post(base_url, "/v1/completions", key, body).status_code for _ in range(2)] == [200, 200]
    refused = post(base_url, "/v1/completions", key, body)
    assert_error(refused, 429, "2 requests per minute")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    token_key = keys.create("token-limited", tpm=50)
    body = {**body, "max_tokens": 30, **NO_EOS}  # the first request really uses about 31 of the 50 tokens
    assert post(base_url, "/v1/completions", token_key, body).status_code == 200
    assert_error(post(base_url, "/v1/completions", token_key, body), 429, "50 tokens per minute")
    with pytest.raises(openai.RateLimitError):
        client(base_url, key).completions.create(model=MODEL, prompt="hi", max_tokens=1)


def test_a_chat_call_without_max_tokens_runs_as_far_as_its_keys_tokens_per_minute_allow(base_url, keys, database_path):
    key = keys.create("small-quota", tpm=40)  # less than the context: a chat call may not fill the context's room
    answer = client(base_url, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body=NO_EOS
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == 40  # all the minute's tokens, no more
    assert_error(post(base_url, "/v1/chat/completions", key, {"model": MODEL, "messages": [{"role": "user",
                 "content": "hi"}]}), 429, "40 tokens per minute")  # fmt: skip


def test_unexpected_inputs_do_not_take_the_server_down(base_url, keys):
    key = keys.create("fuzzer")
    bodies = [
        "",
        "null",
        '"text"',
        "{}",
        '{"model": null}',
        '{"model": "model", "prompt": ""}',
        '{"model": "model", "prompt": "x", "n": 10000}',
        '{"model": "model", "prompt": "x", "max_tokens": -1}',
        '{"model": "model", "prompt": "x", "stop": [1]}',
        '{"model": "model", "prompt": "\\ud800"}',
        '{"model": "model", "prompt": "x", "logprobs": 99}',
        '{"model": "model", "prompt": "x", "seed": 1e400}',
        '{"model": "model", "prompt": "x", "seed": 9223372036854775808}',
    ]
    for body in bodies:
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert post(base_url, path, key, body).status_code == 400, (path, body)
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------- metering
def test_every_request_is_in_the_ledger_and_the_admin_report(base_url, keys, database_path):
    key, admin = keys.create("metered"), keys.create("ops", admin=True)
    api = client(base_url, key)
    reply = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "1"}], max_tokens=3, extra_body=NO_EOS
    )
    list(api.completions.create(model=MODEL, prompt="2", max_tokens=4, stream=True, extra_body=NO_EOS))
    assert_error(post(base_url, "/v1/completions", key, {"model": "nope", "prompt": "x"}), 404)
    assert_error(post(base_url, "/v1/completions", key, {"model": MODEL, "prompt": [5] * 300}), 400, "context")
    rows = ledger_rows(database_path, "metered")
    assert [(r["endpoint"], r["status"], r["prompt_tokens"] > 0, r["completion_tokens"]) for r in rows] == [
        ("/v1/chat/completions", 200, True, 3), ("/v1/completions", 200, True, 4),
        ("/v1/completions", 404, False, 0), ("/v1/completions", 400, False, 0),  # refused: recorded, not billed
    ]  # fmt: skip
    assert [r["cost"] for r in rows[2:]] == [0, 0]
    assert rows[0]["prompt_tokens"] == reply.usage.prompt_tokens and rows[0]["latency_s"] > 0
    assert rows[0]["cost"] == pytest.approx((reply.usage.prompt_tokens + 3) * 0.002 / 1000)

    assert_error(httpx.get(f"{base_url}/v1/admin/usage", headers={"Authorization": f"Bearer {key}"}), 403, "admin")
    report = httpx.get(
        f"{base_url}/v1/admin/usage", params={"key": "metered"}, headers={"Authorization": f"Bearer {admin}"}
    )
    unknown_model, day = report.json()["data"]  # a row per model: the 404 for 'nope' is the models not served', free
    assert [(d["key_name"], d["model"], d["requests"]) for d in (day, unknown_model)] == [
        ("metered", MODEL, 3), ("metered", UNKNOWN_MODEL, 1),
    ]  # fmt: skip
    assert unknown_model["cost"] == 0
    for model, rows_read in ((MODEL, [day]), ("another", [])):  # ?model= reads one model's (the base, an adapter)
        one_model = httpx.get(f"{base_url}/v1/admin/usage", params={"key": "metered", "model": model},
                              headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
        assert one_model.json()["data"] == rows_read
    assert day["completion_tokens"] == 7 and day["cost"] == pytest.approx(sum(r["cost"] for r in rows))
    printed = CliRunner().invoke(cli, ["usage", "--key", "metered", "--json", "--db", str(database_path)])
    assert printed.exit_code == 0 and json.loads(printed.stdout) == report.json()["data"]
    bad_day = httpx.get(
        f"{base_url}/v1/admin/usage", params={"since": "May 1"}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert_error(bad_day, 400, "'May 1' is not in the form YYYY-MM-DD")
    unknown = httpx.get(
        f"{base_url}/v1/admin/usage", params={"key": "nosuch"}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert_error(unknown, 404, "no key named 'nosuch'")  # as `seekstack usage --key nosuch` says


def test_metrics_use_vllm_names_with_the_seekstack_prefix(base_url, keys):
    key = keys.create("observer")
    api = client(base_url, key)
    body = {"model": MODEL, "prompt": "wait", "max_tokens": 200, "stream": True, **NO_EOS}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as r:  # fmt: skip
        events = r.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(events).startswith("data: ")  # the request is running
        during = metric_samples(base_url)
    assert during["seekstack:num_requests_running"] == 1 and during["seekstack:kv_cache_usage_perc"] > 0
    before = metric_samples(base_url)
    api.completions.create(model=MODEL, prompt="count", max_tokens=6, extra_body=NO_EOS)
    after = metric_samples(base_url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[f"seekstack:{name}"] == 0  # all done
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):  # fmt: skip
        assert after[f"seekstack:{name}_count"] > before.get(f"seekstack:{name}_count", 0), name
    assert after["seekstack:generation_tokens_total"] - before["seekstack:generation_tokens_total"] == 6
    assert after["seekstack:prompt_tokens_total"] > before["seekstack:prompt_tokens_total"]
    step_tokens, generated_tokens, prompt_tokens = (
        after[f"seekstack:{name}"] - before[f"seekstack:{name}"]
        for name in ("iteration_tokens_total_sum", "generation_tokens_per_step_sum", "prompt_tokens_total")
    )
    assert step_tokens == generated_tokens + prompt_tokens  # each step's prompt tokens, and the generated ones
    assert "seekstack:spec_decode_num_accepted_tokens_total" in after
    two = api.completions.create(model=MODEL, prompt="count", max_tokens=3, n=2, extra_body=NO_EOS)
    then = metric_samples(base_url)  # per request, as vLLM counts: its prompt once, one latency, not one per choice
    assert then["seekstack:prompt_tokens_total"] - after["seekstack:prompt_tokens_total"] == two.usage.prompt_tokens
    for name in ("e2e_request_latency_seconds_count", "time_to_first_token_seconds_count"):
        assert then[f"seekstack:{name}"] - after[f"seekstack:{name}"] == 1, name


# ---------------------------------------------------------------------------------------------- process-level
def test_metrics_measure_each_requests_n_and_max_tokens_as_vllms_request_params(base_url, keys):
    """vLLM's request_params_n and request_params_max_tokens (buckets 1, 2, 5, 10, ... up to the context) were missing
    from /metrics, so an operator could not see how many choices and how long a completion requests ask for."""
    api = client(base_url, keys.create("params"))

    def buckets(name: str) -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
        wanted = f"seekstack:{name}_bucket"
        return {sample.labels["le"]: sample.value for family in families for sample in family.samples
                if sample.name == wanted}  # fmt: skip

    before_n, before_max_tokens = buckets("request_params_n"), buckets("request_params_max_tokens")
    api.completions.create(model=MODEL, prompt="count", max_tokens=3, n=2, extra_body=NO_EOS)
    api.completions.create(model=MODEL, prompt="count", extra_body=NO_EOS)  # max_tokens unset: 16, as OpenAI's
    after_n, after_max_tokens = buckets("request_params_n"), buckets("request_params_max_tokens")
    n = {le: after_n[le] - before_n.get(le, 0) for le in after_n}
    max_tokens = {le: after_max_tokens[le] - before_max_tokens.get(le, 0) for le in after_max_tokens}
    assert n == {"1.0": 1, "2.0": 2, "5.0": 2, "10.0": 2, "20.0": 2, "+Inf": 2}
    up_to_the_context = ("50.0", "100.0", "200.0", "+Inf")  # MAX_MODEL_LEN is 256
    assert max_tokens == {"1.0": 0, "2.0": 0, "5.0": 1, "10.0": 1, "20.0": 2, **dict.fromkeys(up_to_the_context, 2)}


def test_kill_9_loses_no_finished_request_and_at_most_a_bounded_part_of_a_stream(model_dir, tmp_path):
    """Requests answered before kill -9 (whole and streamed) are in the ledger; the stream cut off by it has the row
    opened when it started (status 0: never finished), holding all but fewer than BILL_EVERY_TOKENS of the tokens
    the client had received, plus those sent while the last update was being written (on a loaded machine, up to
    another BILL_EVERY_TOKENS: the billing module's bound)."""
    database_path = tmp_path / "durable.db"
    key = KeyStore(open_database(database_path)).create("durable")
    body = {"model": MODEL, "prompt": "go", "max_tokens": 200, "logprobs": 0, "stream": True, **NO_EOS}
    with running_server(model_dir, database_path) as server:
        api = client(server.url, key)
        reply = api.completions.create(model=MODEL, prompt="save me", max_tokens=5, extra_body=NO_EOS)
        chunks = list(
            api.completions.create(
                model=MODEL, prompt="me too", max_tokens=4, stream=True, stream_options={"include_usage": True},
                extra_body=NO_EOS,
            )
        )  # fmt: skip
        received = 0
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=60) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
                if received >= 100:
                    server.process.send_signal(signal.SIGKILL)  # no shutdown hook, no flush
                    break
        server.process.wait()
    finished, streamed, crashed = ledger_rows(database_path, "durable")
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in (finished, streamed)] == [
        (200, reply.usage.prompt_tokens, 5), (200, chunks[-1].usage.prompt_tokens, 4),
    ]  # fmt: skip
    assert crashed["status"] == IN_PROGRESS and crashed["prompt_tokens"] > 0 and crashed["cost"] > 0
    assert received - 2 * BILL_EVERY_TOKENS < crashed["completion_tokens"] < 200


def test_sigterm_lets_a_stream_in_flight_finish_and_bill_then_the_server_exits(model_dir, tmp_path):
    database_path = tmp_path / "graceful.db"
    key = KeyStore(open_database(database_path)).create("graceful")
    body = {"model": MODEL, "prompt": "go", "max_tokens": 150, "logprobs": 0, "stream": True, **NO_EOS}
    with running_server(model_dir, database_path) as server:
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=60) as response:  # fmt: skip
            for line in response.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 10:
                    server.process.send_signal(signal.SIGTERM)
        exit_status = server.process.wait(timeout=30)
    odd = [event for event in events if '"token_logprobs"' not in event]  # what is not a token's chunk
    assert events[-1] == "data: [DONE]" and len(events) == 150 + 1, odd
    assert exit_status == -signal.SIGTERM  # uvicorn shuts down, then re-raises the signal it caught
    [row] = ledger_rows(database_path, "graceful")
    assert (row["status"], row["completion_tokens"]) == (200, 150)


def test_rate_limits_and_revocation_hold_across_two_server_processes(base_url, model_dir, database_path, keys):
    limited, revoked = keys.create("shared-limit", rpm=3), keys.create("shared-revoked")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    with running_server(model_dir, database_path) as other:  # a second process on the module server's database
        first, second = base_url, other.url
        servers = (first, second, first, second)
        assert [post(url, "/v1/completions", limited, body).status_code for url in servers] == [200, 200, 200, 429]
        assert post(second, "/v1/completions", revoked, body).status_code == 200
        keys.revoke("shared-revoked")
        for url in (first, second):
            assert_error(post(url, "/v1/completions", revoked, body), 401, "revoked")


def test_keys_and_ledger_on_postgresql(model_dir):
    with postgres_or_skip() as postgres:
        url = new_postgres_database(postgres)
        key = KeyStore(open_database(url)).create("pg-user")
        with running_server(model_dir, url) as server:
            assert_error(post(server.url, "/v1/completions", "sk-ss-wrong", {"model": MODEL, "prompt": "x"}), 401)
            reply = client(server.url, key).completions.create(
                model=MODEL, prompt="pg", max_tokens=3, extra_body=NO_EOS
            )
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
        [row] = open_database(url).query("SELECT * FROM usage WHERE key_name = 'pg-user'")
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (200, reply.usage.prompt_tokens, 3)


@pytest.fixture(scope="module")
def open_speculative_server(model_dir, tmp_path_factory):
    """A server on a database without keys (open, on localhost), decoding with two MTP drafts every step, one
    request at a time."""
    database_path = tmp_path_factory.mktemp("open") / "open.db"
    options = ("--speculative", "--draft-tokens", "2", "--no-adaptive-drafts", "--max-batch-size", "1")
    with running_server(model_dir, database_path, *options) as server:
        yield server, database_path


def test_speculative_decoding_reaches_the_acceptance_counters(open_speculative_server):
    server, _ = open_speculative_server
    before = metric_samples(server.url)
    reply = client(server.url, "open").completions.create(model=MODEL, prompt="a", max_tokens=20, extra_body=NO_EOS)
    after = metric_samples(server.url)
    assert reply.usage.completion_tokens == 20
    grown = {name: value - before.get(name, 0) for name, value in after.items()}  # the other test shares the server
    drafted, accepted = (grown[f"seekstack:spec_decode_num_{kind}_tokens_total"] for kind in ("draft", "accepted"))
    assert 0 < drafted < 2 * 20 and drafted % 2 == 0 and 0 <= accepted <= drafted  # two drafts a step
    assert grown["seekstack:generation_tokens_total"] == 20


def test_without_keys_the_server_runs_open_on_localhost_and_says_so(model_dir, open_speculative_server):
    server, database_path = open_speculative_server
    assert httpx.get(f"{server.url}/health").json()["auth"] is False
    assert client(server.url, "anything").models.list().data[0].id == MODEL
    assert "OPEN: no API keys configured" in server.log_path.read_text()
    refused = CliRunner().invoke(
        cli, ["serve", "--model", str(model_dir), "--db", str(database_path), "--host", "0.0.0.0"]
    )
    assert refused.exit_code == 1 and "refusing to serve without authentication on 0.0.0.0" in refused.stderr
    serve = ["serve", "--model", str(model_dir), "--db", str(database_path), "--port"]
    taken_port = server.url.rsplit(":", 1)[1]  # the running server's
    for port, message in ((99999, "--port 99999: must be between 0 and 65535"), (taken_port, "cannot listen on")):
        taken = CliRunner().invoke(cli, [*serve, str(port)])  # before the weights load, and no "serving" line
        assert taken.exit_code == 1 and message in taken.stderr and "serving" not in taken.output, taken.output


def test_a_request_whose_client_leaves_while_it_is_queued_is_not_billed_for_its_prompt(open_speculative_server):
    """One request runs at a time: a second one, queued behind it, whose client hangs up before it is scheduled
    never had its prompt computed, and the ledger bills it none; the running one, which left too, keeps its prompt's."""
    server, database_path = open_speculative_server
    host, port = server.url.removeprefix("http://").split(":")
    queued = json.dumps({"model": MODEL, "prompt": "a b c d e", "max_tokens": 8, "n": 2}).encode()
    running = {"model": MODEL, "prompt": "a", "max_tokens": MAX_MODEL_LEN - 2, "stream": True, **NO_EOS}

    def waiting() -> float:
        return metric_samples(server.url)["seekstack:num_requests_waiting"]

    def rows() -> list[dict]:
        connection = sqlite3.connect(database_path)
        connection.row_factory = sqlite3.Row
        query = "SELECT * FROM usage WHERE status = 499 AND key_name IS NULL ORDER BY id"
        return [dict(row) for row in connection.execute(query)]

    before = len(rows())
    with httpx.stream("POST", f"{server.url}/v1/completions", json=running, timeout=60) as stream:
        events = stream.iter_lines()  # kept: a dropped iterator closes the response
        assert next(events).startswith("data: ")  # it runs, in the only slot
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(queued)}\r\n\r\n".encode()
                + queued
            )
            deadline = time.monotonic() + 10
            while waiting() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert waiting() == 2  # both choices queued behind the stream when their client hangs up
        deadline = time.monotonic() + 10
        while len(rows()) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric_samples(server.url)["seekstack:num_requests_running"] == 1  # the stream still held the slot
    deadline = time.monotonic() + 10
    while len(rows()) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    left_running, left_queued = rows()[before:]  # the stream's row was opened first
    assert (left_queued["prompt_tokens"], left_queued["completion_tokens"]) == (0, 0)
    assert left_running["prompt_tokens"] > 0 and left_running["completion_tokens"] > 0


@pytest.mark.parametrize("log_requests", [True, False])
def test_a_generation_request_is_logged_when_received_and_finished_if_asked(model_dir, tmp_path, caplog, log_requests):
    """vLLM's --enable-log-requests: a line as a request is received and as it finishes; the server logged none."""
    app = create_app(Engine.from_pretrained(model_dir), open_database(tmp_path / "db"), log_requests=log_requests)

    async def scenario(client):
        body = {"model": "model", "prompt": "hello", "max_tokens": 3, "ignore_eos": True}
        return await client.post("/v1/completions", json=body, headers={"X-Request-Id": "r1"})

    with caplog.at_level(logging.INFO, logger="seekstack.serve"):
        answer = run(app, scenario).json()
    lines = [record.getMessage() for record in caplog.records if "request cmpl-r1" in record.getMessage()]
    prompt_tokens = answer["usage"]["prompt_tokens"]
    assert [re.sub(r"[\d.]+ s$", "T s", line) for line in lines] == (
        [
            f"Received request cmpl-r1: model 'model', {prompt_tokens} prompt tokens, 1 choices of at most 3 tokens",
            f"Finished request cmpl-r1: status 200, {prompt_tokens} prompt + 3 completion tokens in T s",
        ]
        if log_requests
        else []  # off by default, as vLLM's
    )
