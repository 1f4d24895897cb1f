"""A stopping server cutting off requests still running (past --shutdown-timeout, or at a second Ctrl-C): the ledger
records each as the server's failure (503, at no cost), and the log has one line for each instead of its
cancellation's traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sqlite3
import threading
import time

import httpx
import pytest
import uvicorn

from seekstack.infer.engine import Engine
from seekstack.serve import app as app_module
from seekstack.serve import database as database_module
from seekstack.serve.app import SERVER_STOPPED, create_app
from seekstack.serve.database import Database, open_database
from seekstack.serve.keys import KeyStore
from seekstack.serve.launch import CUT_OFF, QuietCutOffs, cut_off_in_one_line
from tests.serve.server import make_model_dir, running_server
from tests.support import free_port

STEP_S = 0.005  # each engine step is slowed down so that a request is still running when it is cut off


def slowed(engine: Engine) -> Engine:
    """The real engine, each of whose steps takes STEP_S longer."""
    real_step = engine.step

    def step():
        time.sleep(STEP_S)
        return real_step()

    engine.step = step
    return engine


async def cut_off(app, body: dict, key: str, reached: asyncio.Event | RowOpening | None = None) -> list[dict]:
    """POST `body` to /v1/completions through the app's ASGI interface, from a client that stays connected, and cancel
    it as uvicorn's forced exit does once the engine is generating for it (or once `reached` is set); the messages
    the app sent."""
    engine = app.state.server.engine
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}  # fmt: skip
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never leaves
        return {}

    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    request = asyncio.ensure_future(app(scope, receive, send))
    while not (reached.is_set() if reached else any(r.output_ids for r in engine.running)) and not request.done():
        await asyncio.sleep(0.01)
    request.cancel()
    try:
        await request
    except asyncio.CancelledError:  # a stream begun: the cancellation goes on, and uvicorn closes the connection
        assert body.get("stream"), "a request not streaming yet is answered (503) as it is cut off"
    return sent


def assert_answered_503(sent: list[dict]) -> None:
    """The messages of a non-streaming request cut off: 503 with an OpenAI error, not uvicorn's plain-text 500."""
    start, body = sent
    assert start["status"] == SERVER_STOPPED and (b"content-type", b"application/json") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert (error["type"], error["code"]) == ("server_error", "server_stopped")


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_the_server_cuts_off_is_recorded_as_its_failure_at_no_cost(tmp_path, stream):
    database = open_database(tmp_path / "serve.db")
    key = KeyStore(database).create("cut")
    app = create_app(slowed(Engine.from_pretrained(make_model_dir(tmp_path))), database)
    body = {"model": "model", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": stream}
    app.state.server.bridge.start()
    try:
        sent = asyncio.run(cut_off(app, body, key))
    finally:
        app.state.server.bridge.stop()
    if not stream:
        assert_answered_503(sent)  # was: uvicorn's plain-text 500 while the ledger said 503
    query = "SELECT status, completion_tokens, cost_pico FROM usage WHERE key_name = 'cut'"
    [(status, completion_tokens, cost)] = sqlite3.connect(tmp_path / "serve.db").execute(query).fetchall()
    assert (status, cost) == (SERVER_STOPPED, 0)
    assert 0 < completion_tokens < 200  # recorded with the tokens it had


class RowOpening:
    """What `cut_off` waits for: a stream's usage row being written, which goes on only once `cut_off` has seen it
    begun and cancels the request (no awaiting between the two), so the server stops while the write is under way."""

    def __init__(self):
        self.begun, self.cancelling = threading.Event(), threading.Event()

    def is_set(self) -> bool:
        if self.begun.is_set():
            self.cancelling.set()
        return self.begun.is_set()


def test_a_stream_cut_off_while_its_usage_row_is_written_is_recorded_as_its_failure_and_stops_generating(tmp_path):
    """The server stopping while a stream's row was being opened left the row in progress, billed for its prompt
    (status 0, cost 2e-06, seen once in a loaded run), and the engine generating on for no one."""
    database = open_database(tmp_path / "serve.db")
    key = KeyStore(database).create("cut", tpm=100_000)
    engine = Engine.from_pretrained(make_model_dir(tmp_path))
    app = create_app(engine, database)
    ledger, opening = app.state.server.ledger, RowOpening()
    open_row = ledger.open

    def open_as_the_server_stops(usage):
        opening.begun.set()
        assert opening.cancelling.wait(timeout=60)
        return open_row(usage)

    ledger.open = open_as_the_server_stops
    body = {"model": "model", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    app.state.server.bridge.start()
    try:
        assert_answered_503(asyncio.run(cut_off(app, body, key, opening)))
    finally:
        app.state.server.bridge.stop()
    connection = sqlite3.connect(tmp_path / "serve.db")
    assert connection.execute("SELECT status, cost_pico FROM usage").fetchall() == [(503, 0)]
    assert connection.execute("SELECT tokens FROM rate_charges").fetchall() == [(0,)]
    assert not engine.has_unfinished()  # its request was aborted, not run on to its 200 tokens


def test_a_request_cut_off_while_it_waits_to_enter_the_engine_gives_back_its_rate_limit_charge(tmp_path):
    database = open_database(tmp_path / "serve.db")
    key = KeyStore(database).create("cut", tpm=100_000)
    app = create_app(Engine.from_pretrained(make_model_dir(tmp_path)), database)
    waiting = asyncio.Event()

    async def submit_behind_a_long_step(*args, **kwargs):
        waiting.set()
        await asyncio.sleep(3600)

    app.state.server.bridge.submit = submit_behind_a_long_step

    assert_answered_503(asyncio.run(cut_off(app, {"model": "model", "prompt": "x", "max_tokens": 200}, key, waiting)))
    connection = sqlite3.connect(tmp_path / "serve.db")
    assert connection.execute("SELECT status, cost_pico FROM usage WHERE key_name = 'cut'").fetchall() == [(503, 0)]
    assert connection.execute("SELECT tokens FROM rate_charges WHERE key_name = 'cut'").fetchall() == [(0,)]


class HeldForCharges:
    """The rate limiter's view of `database` once `held` is set: every write meets it held by another connection."""

    def __init__(self, database: Database):
        self.database, self.held, self.tries = database, False, 0

    def transaction(self):
        if self.held:
            self.tries += 1
            raise sqlite3.OperationalError("database is locked")
        return self.database.transaction()

    def __getattr__(self, name: str):
        return getattr(self.database, name)


def test_a_request_cut_off_settles_its_charge_in_one_try_not_waiting_for_a_held_database(tmp_path, monkeypatch):
    monkeypatch.setattr(database_module, "BUSY_RETRY_S", 1.0)  # was: retried for all of it (120 s by default)
    database = open_database(tmp_path / "serve.db")
    key = KeyStore(database).create("cut", tpm=100_000)
    app = create_app(Engine.from_pretrained(make_model_dir(tmp_path)), database)
    charges = app.state.server.limiter.database = HeldForCharges(database)
    waiting = asyncio.Event()

    async def submit_while_the_database_is_held(*args, **kwargs):
        charges.held = True
        waiting.set()
        await asyncio.sleep(3600)

    app.state.server.bridge.submit = submit_while_the_database_is_held

    assert_answered_503(asyncio.run(cut_off(app, {"model": "model", "prompt": "x", "max_tokens": 200}, key, waiting)))
    assert charges.tries == 1
    connection = sqlite3.connect(tmp_path / "serve.db")
    assert connection.execute("SELECT status, cost_pico FROM usage WHERE key_name = 'cut'").fetchall() == [(503, 0)]
    [(tokens,)] = connection.execute("SELECT tokens FROM rate_charges WHERE key_name = 'cut'").fetchall()
    assert tokens > 200  # the admitted charge, stale for one window


def test_a_stopping_server_logs_one_line_for_each_request_it_cuts_off_and_none_for_the_lifespan():
    server = QuietCutOffs(uvicorn.Config(app=None, log_config=None))
    logger, records = logging.getLogger("uvicorn.error"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)

    def cancellation_logged() -> None:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError as error:
            logger.error("Exception in ASGI application\n", exc_info=error)
        logger.error("Traceback (most recent call last):\n  ...\nasyncio.exceptions.CancelledError\n")  # lifespan's

    try:
        cancellation_logged()  # not stopping: a cancellation is something else, with its traceback
        assert [record.exc_info is not None for record in records] == [True, False]
        records.clear()
        server.handle_exit(signal.SIGTERM, None)  # requests past --shutdown-timeout are cut off
        cancellation_logged()
        # a warning, as the line of a request cut off before its response began: not the same words at ERROR
        assert [(record.getMessage(), record.exc_info, record.levelname) for record in records] == [
            (CUT_OFF, None, "WARNING")
        ]
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(cut_off_in_one_line)


def test_sigterm_cuts_off_a_stream_whose_client_stops_reading_after_the_shutdown_timeout_billing_it(tmp_path):
    """A client that never reads fills the socket's buffers and holds the stream's writes: SIGTERM waited for it for
    good (uvicorn had no graceful-shutdown timeout; its row stayed 'in progress'). The log says the server is stopping
    and waiting for it (it logged nothing of either: uvicorn's lines were at WARNING)."""
    model_dir = make_model_dir(tmp_path, max_position_embeddings=1024)
    database_path = tmp_path / "serve.db"
    key = KeyStore(open_database(database_path)).create("stalled", tpm=100_000)
    # 16 choices x 1000 tokens, each chunk with 20 alternatives: ~20 MB, far more than the socket buffers hold
    body = json.dumps({"model": "model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000,
                       "n": 16, "logprobs": True, "top_logprobs": 20, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    with running_server(model_dir, database_path, "--shutdown-timeout", "1") as server:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                           b"\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                           % (key.encode(), len(body), body))  # fmt: skip
            received = b""
            while b'"top_logprobs":[{' not in received:  # until its first token: then it reads no more
                chunk = client.recv(4096)
                assert chunk, f"the server closed the stream: {received!r}"
                received += chunk
            assert received.startswith(b"HTTP/1.1 200 OK")
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == -signal.SIGTERM
    connection = sqlite3.connect(database_path)
    [(status, completion_tokens, cost)] = connection.execute("SELECT status, completion_tokens, cost_pico FROM usage")
    assert (status, cost) == (SERVER_STOPPED, 0) and completion_tokens > 0
    assert connection.execute("SELECT tokens FROM rate_charges").fetchall() == [(0,)]  # its charge given back
    log = server.log_path.read_text()
    assert CUT_OFF in log and "Traceback" not in log
    # what the server does meanwhile, as vLLM's log says it: was nothing between the last stats line and the cut-off
    stopping = ("Shutting down", "Waiting for connections to close", CUT_OFF, "Finished server process")
    assert [log.index(line) for line in stopping] == sorted(log.index(line) for line in stopping)
    assert '"POST /v1/chat/completions HTTP/1.1" 200' not in log  # no access line per request


def test_a_second_ctrl_c_ends_a_server_whose_engine_is_in_a_long_step_at_once(tmp_path, caplog, monkeypatch):
    """A step that takes minutes (torch.compile's first decode step: 58 s on the tiny model, loaded machine): Ctrl-C
    waited past --shutdown-timeout for it, the event loop held in the engine thread's join, and a second Ctrl-C went
    unheard until the step ended. The log now says what the server waits for, and a second Ctrl-C ends it at once."""
    engine = Engine.from_pretrained(make_model_dir(tmp_path))
    in_step, step_may_end = threading.Event(), threading.Event()
    real_step = engine.step

    def compiling_step():
        in_step.set()
        step_may_end.wait(timeout=20)
        return real_step()

    engine.step = compiling_step
    monkeypatch.setattr(app_module, "STOP_WAIT_NOTE_S", 0.0)  # said at once, not after a second
    app = create_app(engine, open_database(tmp_path / "db"), log_stats=False)
    port = free_port()
    config = uvicorn.Config(app, port=port, log_config=None, timeout_graceful_shutdown=0.2)
    server = QuietCutOffs(config)
    second_ctrl_c_at = []

    def request() -> None:
        body = {"model": "model", "prompt": "x", "max_tokens": 4, "stream": True}
        with contextlib.suppress(httpx.RemoteProtocolError):  # cut off
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)

    def user() -> None:
        while not server.started:
            time.sleep(0.01)
        threading.Thread(target=request, daemon=True).start()
        assert in_step.wait(timeout=30)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.6)  # past the shutdown timeout: the request is cut off, the engine still in its step
        second_ctrl_c_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=user, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="seekstack.serve"), pytest.raises(KeyboardInterrupt):
            server.run()  # uvicorn raises the Ctrl-C it held once it has stopped
        ended_at = time.monotonic()
    finally:
        step_may_end.set()
    assert ended_at - second_ctrl_c_at[0] < 2  # was: when the step ended, 20 s here
    assert "waiting for the requests cut off and the engine's step in progress to end" in caplog.text
    assert "stopping now (a second Ctrl-C)" in caplog.text


def test_an_error_stopping_the_engine_fails_the_shutdown_not_lost_in_a_task(tmp_path):
    """The shutdown waits for the calls and the engine in a task of its own (so that a second Ctrl-C is heard): an
    error there was left in that task, never retrieved, and the shutdown ended as if the engine had stopped."""
    server = create_app(Engine.from_pretrained(make_model_dir(tmp_path)), open_database(tmp_path / "db")).state.server
    stop_engine = server.bridge.stop_async

    async def engine_stop_failing() -> None:
        await stop_engine()
        raise RuntimeError("the engine thread's last aborts failed")

    server.bridge.stop_async = engine_stop_failing

    async def serve_and_stop() -> None:
        async with server.lifespan(None):
            pass

    with pytest.raises(RuntimeError, match="the engine thread's last aborts failed"):
        asyncio.run(serve_and_stop())
