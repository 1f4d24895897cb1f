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
    of the limit it is over, stand)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(HEADER, "").encode("latin-1").decode("utf-8", "replace")  # read as latin-1
        scope.setdefault("state", {})["request_id"] = sent or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = scope["state"]["request_id"]  # a body's request_id may have replaced it
                for name, value in scope["state"].get(LEFT_HEADERS, {}).items():
                    headers.setdefault(name, value)
            await send(message)

        try:  # an empty header is none
            SENT_ID.validate_python({HEADER: sent} if sent else {})
        except ValidationError as error:  # refused with an id of its own
            scope["state"]["request_id"] = uuid.uuid4().hex
            await invalid_body(error).response()(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


def request_id_of(request: Request) -> str:
    """The id `RequestIds` gave `request`."""
    return request.scope["state"]["request_id"]


def take_body_request_id(request: Request, request_id: str | None) -> None:
    """Name `request` by the `request_id` its body gives (vLLM's field), where the client sent no `X-Request-Id` (or an
    empty one, which `RequestIds` takes for none): vLLM names a completion by the header first, then by the body's
    id."""
    if request_id is not None and not request.headers.get(HEADER):
        request.scope["state"]["request_id"] = request_id
