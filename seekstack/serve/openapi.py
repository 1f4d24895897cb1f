"""The server's OpenAPI description, true to what the routes take and give: the generation endpoints' request
bodies (parsed by the routes themselves, for the body limit and strict JSON, so declared here from the same
pydantic models), JSON and event-stream answers, and each error status in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from seekstack.serve.schemas import ErrorResponse, SamplingFields

SCHEMAS = "#/components/schemas/"
ERRORS = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, a prompt beyond the context",
    401: "Missing, invalid or revoked API key",
    403: "The key may not do this (admin scope, allowed models), or open mode refused the Host",
    404: "Unknown model (or adapter)",
    409: "Conflicts with the server's state: a name already in use",
    413: "Request body over the server's limit",
    415: "Open mode: the body is not sent as application/json",
    429: "Over the key's requests or tokens per minute; Retry-After says when to retry",
    500: "Server error; the message carries an error id for the server log",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for these error statuses, each with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": ERRORS[status]} for status in statuses}


def json_request(model: type[BaseModel], inline: bool = False) -> dict[str, Any]:
    """`openapi_extra=` declaring a required JSON body of `model`: a reference to it in the components (`describe`
    adds it there), or with `inline` its schema itself (for a model with no nested ones, not given to `describe`)."""
    schema = model.model_json_schema() if inline else {"$ref": SCHEMAS + model.__name__}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def generation_responses(
    answer: type[BaseModel], chunk: type[BaseModel], *statuses: int
) -> dict[int | str, dict[str, Any]]:
    """200 as one JSON `answer`, or with `"stream": true` server-sent events (`data: {chunk}` ... `data: [DONE]`)."""
    event = {  # each server-sent event: `data: <a chunk as JSON>`, the last one `data: [DONE]`
        "type": "object",
        "properties": {"data": {"type": "string", "description": f"a {chunk.__name__} as JSON, or [DONE]"}},
        "required": ["data"],
    }
    events = {"schema": event}
    return {
        200: {"model": answer, "description": "The completion", "content": {"text/event-stream": events}},
        **error_responses(*statuses),
    }


def describe(
    app: FastAPI, request_models: list[type[BaseModel]], model_names: Callable[[], list[str]]
) -> Callable[[list[str]], dict[str, Any]]:
    """Make `app.openapi()` include `request_models` in the components, a generation's `model` field limited to the
    models served (asked each time: adapters may come and go); return the document with that field limited to the
    models given instead (those one key may use)."""

    def document(models: list[str]) -> dict[str, Any]:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation") for model in request_models], ref_template=SCHEMAS + "{model}"
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in definitions["$defs"].items():
            components.setdefault(name, definition)
        for model in request_models:
            if issubclass(model, SamplingFields):  # a generation's `model` names a served one (or null: the base)
                field = components[model.__name__]["properties"]["model"]
                [named] = [branch for branch in field["anyOf"] if branch.get("type") == "string"]
                named["enum"] = models
        for operations in schema["paths"].values():  # bad parameters are 400s in OpenAI's shape, not FastAPI's 422
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for fastapi_only in ("HTTPValidationError", "ValidationError"):
            components.pop(fastapi_only, None)
        return schema

    app.openapi = lambda: document(model_names())  # type: ignore[method-assign]
    return document
