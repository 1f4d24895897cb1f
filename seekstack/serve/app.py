"""The OpenAI-compatible HTTP API over the engine: routes, authentication, rate limits, billing, streaming.

Every generation request, whatever its outcome after authentication, leaves one row in the usage
ledger, written before the response's last byte (for streams: before `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from seekstack.infer.engine import Engine
from seekstack.serve.bridge import AsyncEngine, EngineFailure, RequestGroup
from seekstack.serve.database import Database
from seekstack.serve.errors import APIError, invalid_body
from seekstack.serve.keys import ApiKey, KeyStore
from seekstack.serve.ledger import Ledger, UsageRecord, parse_day
from seekstack.serve.metrics import ServerMetrics
from seekstack.serve.protocol import chat_logprobs, completion_logprobs, prompt_ids, sampling_params
from seekstack.serve.ratelimit import Charge, RateLimited, RateLimiter
from seekstack.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("seekstack.serve")
CLIENT_CLOSED = 499  # nginx's status for a client that left before the response ended


class EventStream(StreamingResponse):
    """Server-sent events that notice a client leaving at once, not at the next write, then run `on_close`
    however the stream ended (also when the client left before the first event: the generator never ran)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(events)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
            await self.on_close()


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


@dataclass
class Bill:
    """One request's usage as it becomes known, written to the ledger exactly once."""

    ledger: Ledger
    key: ApiKey | None
    model: str
    endpoint: str
    started: float
    prompt_tokens: int = 0  # set once the engine has taken the request: refused requests cost nothing
    completion_tokens: int = 0
    recorded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, status: int) -> None:
        with self._lock:  # the event loop and a worker thread may both try
            if self.recorded:
                return
            self.recorded = True
        self.ledger.record(
            UsageRecord(
                key_name=self.key.name if self.key else None,
                model=self.model,
                endpoint=self.endpoint,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                latency_s=time.perf_counter() - self.started,
                status=status,
            )
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, total_tokens=self.total_tokens
        )

    async def record_async(self, status: int) -> None:
        await asyncio.to_thread(self.record, status)


class Server:
    """State behind the routes: the engine bridge, keys, ledger, limits and metrics."""

    def __init__(self, engine: Engine, database: Database, model_name: str | None = None):
        self.engine = engine
        self.model_name = model_name or engine.model_name
        self.keys = KeyStore(database)
        self.ledger = Ledger(database)
        self.limiter = RateLimiter()
        self.metrics = ServerMetrics(self.model_name)
        self.bridge = AsyncEngine(engine, self.metrics)
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if not self.keys.any_keys():
            log.warning("no API keys in %s: serving without authentication", self.keys.database.location)
        self.bridge.start()
        yield
        self.bridge.stop()

    def authenticate(self, request: Request, admin: bool = False) -> ApiKey | None:
        """The caller's key (None while no key exists: the server is open); 401 without a valid one."""
        if not self.keys.any_keys():
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer sk-ss-...'", code="no_api_key")
        key = self.keys.verify(token.strip())
        if key is None:
            raise APIError(401, "the API key is not valid or was revoked", code="invalid_api_key")
        if admin and not key.admin:
            raise APIError(403, f"key {key.name!r} is not an admin key", "permission_error", code="admin_required")
        return key

    def models(self) -> ModelList:
        """The base model, then each LoRA adapter loaded on it."""
        common = dict(created=self.created, max_model_len=self.engine.max_model_len)
        adapters = [
            ModelCard(id=name, root=str(root), parent=self.model_name, **common)
            for name, root in self.engine.lora.folders.items()
        ]
        return ModelList(data=[ModelCard(id=self.model_name, **common), *adapters])

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 in OpenAI's shape for an unknown one."""
        if model == self.model_name:
            return None
        if model in self.engine.lora.folders:
            return model
        known = ", ".join(repr(card.id) for card in self.models().data)
        raise APIError(
            404, f"the model {model!r} does not exist; this server has {known}", "model", code="model_not_found"
        )

    async def generate(self, request: Request, schema: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        """A chat or text completion: validate, admit, submit, then answer in one piece or as a stream."""
        bill = Bill(self.ledger, None, self.model_name, request.url.path, time.perf_counter())
        bill.key = await asyncio.to_thread(self.authenticate, request)  # database reads: off the event loop
        try:
            try:
                body = schema.model_validate_json(await request.body())
            except ValidationError as error:
                raise invalid_body(error) from None
            bill.model = body.model  # the ledger records which model served (or was asked for)
            adapter = self.adapter_for(body.model)
            prompt = prompt_ids(body, self.engine.tokenizer)
            choices = sampling_params(body, len(prompt), self.engine.max_model_len)
            charge = self.admit(bill.key, len(prompt) + sum(params.max_new_tokens for params in choices))
            try:
                group = await self.bridge.submit(prompt, choices, adapter)
            except ValueError as error:
                if charge:
                    self.limiter.settle(charge, 0)
                raise APIError(400, str(error)) from None
        except ClientDisconnect:  # gone before its body arrived
            await bill.record_async(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:
            await bill.record_async(error.status if isinstance(error, APIError) else 500)
            raise
        bill.prompt_tokens = len(prompt)

        async def finish(status: int) -> None:
            """Free the request's engine slots, settle its rate-limit charge, bill it (no-ops when done before)."""
            group.close()
            if charge:
                self.limiter.settle(charge, bill.total_tokens)
            await bill.record_async(status)

        if body.stream:
            return EventStream(self.stream(body, group, bill), on_close=lambda: finish(CLIENT_CLOSED))
        status = CLIENT_CLOSED
        try:
            response = await _unless_client_leaves(request, self.complete(body, group, bill))
            status = 200
            return response
        except ClientLeft:
            return Response(status_code=CLIENT_CLOSED)
        except Exception as error:
            status = 500
            raise _server_error(error) from None
        finally:
            await finish(status)  # before the response leaves

    def admit(self, key: ApiKey | None, tokens: int) -> Charge | None:
        """Charge the key's rate limits with `tokens` (None for a key without limits); 429 when over them."""
        if key is None or (key.rpm is None and key.tpm is None):
            return None
        try:
            return self.limiter.admit(key.name, key.rpm, key.tpm, tokens)
        except RateLimited as error:
            raise APIError(
                429, str(error), "rate_limit_error", code="rate_limit_exceeded",
                headers={"Retry-After": str(error.retry_after_s)},
            ) from None  # fmt: skip

    async def complete(self, body, group: RequestGroup, bill: Bill) -> JSONResponse:
        """Gather every choice and answer in one JSON body; `bill` counts the tokens as they come."""
        is_chat = isinstance(body, ChatCompletionRequest)
        n = len(group.request_ids)
        texts, logprobs = [""] * n, [[] for _ in range(n)]
        finish_reasons, completion_tokens = [None] * n, [0] * n
        async for index, output in group:
            texts[index] += output.text
            logprobs[index] += output.logprobs or []
            finish_reasons[index] = output.finish_reason
            completion_tokens[index] = output.completion_tokens
            bill.completion_tokens = sum(completion_tokens)
        common = dict(id=_response_id(is_chat), created=int(time.time()), model=bill.model, usage=bill.usage())
        if is_chat:
            response = ChatCompletionResponse(
                choices=[
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content=texts[i]),
                        logprobs=chat_logprobs(logprobs[i]) if body.logprobs else None,
                        finish_reason=finish_reasons[i],
                    )
                    for i in range(n)
                ],
                **common,
            )
        else:
            response = CompletionResponse(
                choices=[
                    CompletionChoice(
                        index=i,
                        text=texts[i],
                        logprobs=completion_logprobs(logprobs[i], 0) if body.logprobs is not None else None,
                        finish_reason=finish_reasons[i],
                    )
                    for i in range(n)
                ],
                **common,
            )
        return JSONResponse(response.model_dump())

    async def stream(self, body, group: RequestGroup, bill: Bill) -> AsyncIterator[str]:
        """SSE chunks as the engine produces tokens; usage chunk if asked; billed before `data: [DONE]`."""
        is_chat = isinstance(body, ChatCompletionRequest)
        n = len(group.request_ids)
        response_id, created = _response_id(is_chat), int(time.time())
        completion_tokens, text_offsets = [0] * n, [0] * n
        try:
            if is_chat:
                yield sse(self._chat_chunk(response_id, created, bill.model, [_role_choice(i) for i in range(n)]))
            async for index, output in group:
                completion_tokens[index] = output.completion_tokens
                bill.completion_tokens = sum(completion_tokens)
                text = output.text
                if not (text or output.logprobs or output.finished):
                    continue
                if is_chat:
                    choice = ChatChunkChoice(
                        index=index,
                        delta=ChatDelta(content=text),
                        logprobs=chat_logprobs(output.logprobs) if body.logprobs and output.logprobs else None,
                        finish_reason=output.finish_reason,
                    )
                    yield sse(self._chat_chunk(response_id, created, bill.model, [choice]))
                else:
                    logprobs = None
                    if body.logprobs is not None and output.logprobs:
                        logprobs = completion_logprobs(output.logprobs, text_offsets[index])
                        text_offsets[index] += sum(len(entry.token) for entry in output.logprobs)
                    choice = CompletionChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=output.finish_reason
                    )
                    yield sse(CompletionResponse(id=response_id, created=created, model=bill.model, choices=[choice]))
            if body.stream_options and body.stream_options.include_usage:
                kind = ChatCompletionChunk if is_chat else CompletionResponse
                yield sse(kind(id=response_id, created=created, model=bill.model, choices=[], usage=bill.usage()))
            await bill.record_async(200)
        except Exception as error:  # the status line has gone: the client learns it from an error event
            await bill.record_async(500)
            yield sse(_server_error(error).body())
        yield "data: [DONE]\n\n"

    def _chat_chunk(
        self, response_id: str, created: int, model: str, choices: list[ChatChunkChoice]
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices)

    def usage_report(self, request: Request) -> dict:
        """Admin: tokens and cost per key and day, optionally for one key and from a day on."""
        self.authenticate(request, admin=True)
        key_name = request.query_params.get("key")
        since = request.query_params.get("since")
        try:
            days = self.ledger.daily(key_name, parse_day(since) if since else None)
        except ValueError as error:
            raise APIError(400, str(error), param="since") from None
        return {
            "object": "list",
            "data": [day.to_dict() for day in days],
            "total_cost": sum(day.cost for day in days),
        }


class ClientLeft(Exception):
    """The client hung up before its answer was ready."""


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, JSONResponse]) -> JSONResponse:
    """Await `work`, or cancel it and raise `ClientLeft` as soon as the client disconnects."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only a hang-up comes
            pass

    answer, hang_up = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({answer, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        left = not answer.done()
        if left:
            answer.cancel()
    if left:
        raise ClientLeft
    return answer.result()


def _role_choice(index: int) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))


def _server_error(error: Exception) -> APIError:
    """A 500 for an error while generating: the engine's failure as it was reported, anything else logged."""
    if isinstance(error, EngineFailure):
        return APIError(500, str(error), "server_error")
    log.error("unexpected error while generating", exc_info=error)
    return APIError(500, _internal(error), "server_error")


def _internal(error: Exception) -> str:
    return f"internal error: {type(error).__name__}: {error}"


def _response_id(is_chat: bool) -> str:
    return f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"


def create_app(engine: Engine, database: Database, model_name: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine`, with keys, ledger and prices in `database`."""
    server = Server(engine, database, model_name)
    app = FastAPI(title="seekstack", lifespan=server.lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    chat_page = files("seekstack.serve").joinpath("chat.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        no_route = error.status_code in (404, 405)
        message = f"no route {request.method} {request.url.path}" if no_route else str(error.detail)
        return APIError(error.status_code, message, headers=error.headers).response()  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, _internal(error), "server_error").response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat() -> HTMLResponse:
        return HTMLResponse(chat_page)

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = server.bridge.alive
        body = {"status": "ok" if healthy else "engine stopped", "auth": server.keys.any_keys()}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authenticate(request)
        return JSONResponse(server.models().model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, CompletionRequest)

    @app.get("/v1/admin/usage")
    async def admin_usage(request: Request) -> JSONResponse:
        return JSONResponse(server.usage_report(request))

    return app
