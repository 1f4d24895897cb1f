"""Every response's `X-Request-Id`, as OpenAI answers each call with one (the openai client reads it as a response's
`_request_id` and an error's `request_id`): the one the client sent, as vLLM reads it, else a completion body's
`request_id` (vLLM's), else a new random one. A completion's `id` is `cmpl-` or `chatcmpl-` and this id, so a call,
its response and its log lines share it; a client's id is held to the body's rule (`schemas.RequestId`)."""

from __future__ import annotations

import uuid

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seekstack.serve.errors import invalid_body
from seekstack.serve.schemas import RequestId

HEADER = "X-Request-Id"
SENT_ID = TypeAdapter(dict[str, RequestId])  # {HEADER: the id sent}: a refusal names the header


LEFT_HEADERS = "response_headers"  # headers a route leaves in the request's state for its response, whatever it is


class RequestIds:
    """ASGI middleware: the request's id, kept in its state (`request_id_of`), goes out on its response's headers, and
    so do the headers a route left in the state under `LEFT_HEADERS` (a counted request's `x-ratelimit-*`, on its
    answer, a 400 or 404 after the count, a 429, as OpenAI's go out), beside those the response sets itself (a 429's,
    of the limit it is over, stand). It wraps CORS's middleware, whose preflight answers carry an id too; `SentIds`,
    inside CORS's, refuses a sent id unlike one, so that a page can read the refusal."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["request_id"] = sent_id(scope) or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = scope["state"]["request_id"]  # a body's request_id may have replaced it
                for name, value in scope["state"].get(LEFT_HEADERS, {}).items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_id)


class SentIds:
    """ASGI middleware inside `RequestIds`: a request whose `X-Request-Id` is unlike an id (`schemas.RequestId`) is
    refused, 400 naming the header, under an id of its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = sent_id(scope) if scope["type"] == "http" else ""
        try:  # an empty header is none
            SENT_ID.validate_python({HEADER: sent} if sent else {})
        except ValidationError as error:
            scope["state"]["request_id"] = uuid.uuid4().hex
            await invalid_body(error).response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def sent_id(scope: Scope) -> str:
    """The `X-Request-Id` the request sent ("" for none), its bytes read as UTF-8 (a header is latin-1 to starlette)."""
    return Headers(scope=scope).get(HEADER, "").encode("latin-1").decode("utf-8", "replace")


def request_id_of(request: Request) -> str:
    """The id `RequestIds` gave `request`."""
    return request.scope["state"]["request_id"]


def take_body_request_id(request: Request, request_id: str | None) -> None:
    """Name `request` by the `request_id` its body gives (vLLM's field), where the client sent no `X-Request-Id` (or an
    empty one, which `RequestIds` takes for none): vLLM names a completion by the header first, then by the body's
    id."""
    if request_id is not None and not request.headers.get(HEADER):
        request.scope["state"]["request_id"] = request_id
