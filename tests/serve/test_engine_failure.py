"""A failing engine step, in process: the requests in flight end with a 500 (an error event in a stream, then
`data: [DONE]`), the ledger records them as 500 at no cost, and the server goes on serving."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import traceback

import httpx

from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from seekstack.serve.keys import KeyStore
from seekstack.serve.ledger import Ledger
from tests.infer.support import fail_sampling_after
from tests.serve.server import make_model_dir, run

REQUEST = {"model": "model", "prompt": "x", "max_tokens": 20, "ignore_eos": True}


def engine_failing_at_steps(engine: Engine, failing: set[int]) -> Engine:
    """The real engine, whose step raises on the given step numbers (1-based) and runs normally otherwise."""
    real_step, count = engine.step, 0

    def step():
        nonlocal count
        count += 1
        if count in failing:
            raise RuntimeError(f"injected failure at step {count}")
        return real_step()

    engine.step = step
    return engine


async def post_all(app, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    """The requests one after the other, through the app's ASGI interface, with its engine thread running."""
    bridge = app.state.server.bridge
    bridge.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as http:
            return [await http.post("/v1/completions", json=body, headers=headers) for body in bodies]
    finally:
        bridge.stop()


def test_failing_step_ends_requests_with_500_and_the_server_keeps_serving(tmp_path):
    engine = Engine.from_pretrained(make_model_dir(tmp_path))
    database = open_database(tmp_path / "serve.db")
    # each request's third step fails: prefill, decode, failure (step 4 hands out the ended request's abort)
    key = KeyStore(database).create("limited", tpm=10_000)
    app = create_app(engine_failing_at_steps(engine, failing={3, 7}), database)
    bodies = [{**REQUEST, "stream": True}, REQUEST, REQUEST]
    streamed, whole, after = asyncio.run(post_all(app, bodies, {"Authorization": f"Bearer {key}"}))

    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "error id" in error["message"]
    assert "injected" not in error["message"]  # the exception's text goes to the server log, not to clients
    assert all(json.loads(event)["choices"] for event in events[:-2])  # tokens from steps 1-2 came before it
    assert whole.status_code == 500 and "error id" in whole.json()["error"]["message"]
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 20
    rows = Ledger(database).records()
    assert [row["status"] for row in rows] == [500, 500, 200]
    assert rows[0]["completion_tokens"] > 0  # the stream's tokens are recorded, but the user is not charged
    assert [row["cost"] for row in rows[:2]] == [0.0, 0.0] and rows[2]["cost"] > 0
    charged = [row["tokens"] for row in database.query("SELECT tokens FROM rate_charges ORDER BY id")]
    assert charged == [0, 0, rows[2]["prompt_tokens"] + 20]  # failed requests use none of the tokens per minute


def test_the_log_entry_of_a_500_carries_the_engine_traceback_of_a_request_failed_alone(tmp_path, caplog):
    engine = Engine.from_pretrained(make_model_dir(tmp_path))
    database = open_database(tmp_path / "serve.db")
    fail_sampling_after(engine, 1)  # the request ends alone, finish_reason "error"
    with caplog.at_level(logging.ERROR, logger="seekstack.serve"):
        (whole,) = asyncio.run(post_all(create_app(engine, database), [REQUEST]))

    assert whole.status_code == 500
    error_id = re.search(r"error id (\w+)", whole.json()["error"]["message"]).group(1)
    (entry,) = [record for record in caplog.records if error_id in record.getMessage()]
    logged = "".join(traceback.format_exception(entry.exc_info[1]))
    assert "sampling_that_fails" in logged  # the engine's frames (the injected sampling), not only the bridge's
    assert "injected sampling failure" in logged
    assert [(row["status"], row["cost"]) for row in Ledger(database).records()] == [(500, 0.0)]


def test_a_failure_after_the_step_ends_the_requests_in_flight_and_the_engine_thread_goes_on(tmp_path):
    """The engine thread guarded engine.step() alone: an error while handing out a step's outputs or reading the
    engine's stats for the metrics (here: stats, once) ended the thread, and every later request waited for it for
    ever (/health 503), where a failing step ends the requests in flight and the server goes on."""
    engine = Engine.from_pretrained(make_model_dir(tmp_path))
    real_stats, calls = engine.stats, 0

    def stats():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure reading the engine's stats")
        return real_stats()

    engine.stats = stats
    app = create_app(engine, open_database(tmp_path / "serve.db"))

    async def scenario(client):
        failed = await client.post("/v1/completions", json=REQUEST)
        health = await client.get("/health")  # the engine thread's: a request would wait on a dead one for ever
        after = await client.post("/v1/completions", json=REQUEST) if health.status_code == 200 else None
        return failed, health, after

    answers: list = []
    caller = threading.Thread(target=lambda: answers.extend(run(app, scenario)), daemon=True)
    caller.start()
    caller.join(timeout=60)  # ~3 s; a dead engine thread left the request in flight unanswered for ever
    assert not caller.is_alive(), "the request in flight was never answered: the engine thread died"
    failed, health, after = answers
    assert failed.status_code == 500 and "error id" in failed.json()["error"]["message"]
    assert health.json()["status"] == "ok"  # was: "engine stopped", the thread dead
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 20
    assert [row["status"] for row in app.state.server.ledger.records()] == [500, 200]


def test_allowed_token_ids_a_grammar_forbids_after_some_tokens_are_a_400_naming_them_not_a_500(tmp_path):
    """allowed_token_ids "{" and "a" beside JSON mode: "{" is sampled, then the grammar forbids both and no token is
    left. The engine ends that request with a ConfigError naming the field, the server answered it as its own failure,
    a 500 (an error event of type server_error in a stream). It is the request's fault: a 400 in OpenAI's shape, its
    tokens recorded at no cost, as a refusal's; a failure of the engine's own stays a 500 (the test above)."""
    engine = Engine.from_pretrained(make_model_dir(tmp_path))
    database = open_database(tmp_path / "serve.db")
    allowed = [engine.tokenizer.encode(text)[-1] for text in "{a"]
    body = {**REQUEST, "temperature": 0, "allowed_token_ids": allowed, "response_format": {"type": "json_object"}}
    whole, streamed = asyncio.run(post_all(create_app(engine, database), [body, {**body, "stream": True}]))

    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line]
    assert [json.loads(event)["choices"][0]["text"] for event in events[:-2]] == ["{"]
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    for error in whole.json()["error"], json.loads(events[-2])["error"]:
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "allowed_token_ids",
                                                                  "invalid_value")  # fmt: skip
        assert f"field 'allowed_token_ids' {allowed} are each forbidden here by the constraint" in error["message"]
    assert whole.status_code == 400
    rows = Ledger(database).records()
    assert [(row["status"], row["completion_tokens"], row["cost"]) for row in rows] == [(400, 1, 0.0), (400, 1, 0.0)]
