"""API errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

import codecs
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from seekstack.schema import SHOWN_VALUE_CHARS, shown_value
from seekstack.serve import schemas
from seekstack.serve.schemas import ErrorDetail, ErrorResponse

Model = TypeVar("Model", bound=BaseModel)

MAX_SHOWN_INPUT = 80
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads keeps an unpaired "\\ud800" escape as this code point
UNION_MEMBER = re.compile(r"str|int|float|bool|constrained-\w+|.*\[.*\]")  # how pydantic names a union's branches
# and a branch that is a model, by its class: NamedToolChoice beside tool_choice's strings, a content part's TextPart
UNION_MODELS = frozenset(name for name, value in vars(schemas).items() if isinstance(value, type) and
                         issubclass(value, BaseModel))  # fmt: skip
log = logging.getLogger("seekstack.serve")


class APIError(Exception):
    """An error a client caused or must know about; becomes an OpenAI error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


# pydantic's types for a sequence or a string outside its length bounds
LENGTH_ERRORS = ("too_long", "too_short", "string_too_long", "string_too_short")


def parse_body(schema: type[Model], raw: bytes) -> Model:
    """The request body `raw` as `schema`, or a 400 naming every field at fault. Fields a schema keeps unknown (extra
    "allow") are ignored, as vLLM ignores them, and named in a warning for the operator, as vLLM names them: those of
    an object in the body by their path (stream_options.include_usuage). A leading UTF-8 byte order mark (a file
    Windows' Notepad saved, sent by `curl -d @request.json`) is skipped, as RFC 8259 lets a parser and Python's json
    (vLLM's) do."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as error:
        raise invalid_body(error, raw) from None
    ignored = ignored_fields(body)
    if ignored:  # a name plain text would not do as its repr, cut, or a client's "x\nERROR: ..." writes lines into it
        names = [name if name.isprintable() and len(name) <= SHOWN_VALUE_CHARS else shown_value(name)
                 for name in sorted(ignored)]  # fmt: skip
        log.warning("The following fields were present in the request but ignored: %s", ", ".join(names))
    return body


def named_model(raw: bytes) -> object:
    """The `model` a request body `raw` names, as sent (read where the body failed validation): None for a body that is
    no JSON object (or nests deeper than Python's json reads) or names none."""
    try:
        body = json.loads(raw.removeprefix(codecs.BOM_UTF8))
    except (ValueError, RecursionError):  # not JSON, or not UTF-8
        return None
    return body.get("model") if isinstance(body, dict) else None


def ignored_fields(model: BaseModel, path: str = "") -> list[str]:
    """The unknown fields `model` and the models of its fields kept (extra "allow"), each by its path from `model`."""
    ignored = [path + name for name in model.model_extra or ()]
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            ignored += ignored_fields(value, f"{path}{field.alias or name}.")
    return ignored


def invalid_body(error: ValidationError, raw: bytes = b"") -> APIError:
    """A 400 naming every field that failed validation, with the value sent; for a body that is not JSON, what in
    `raw` (the body as sent) makes it so, where pydantic's message does not say it."""
    problems, params = [], []
    found = error.errors()
    # A value whose length is out of bounds (65 prompts, a prompt or stop string "") failed every other branch of its
    # field's union too, as a value of another type: its bound says it.
    bounded = [_union_branch(problem["loc"]) for problem in found if problem["type"] in LENGTH_ERRORS]
    found = [
        problem
        for problem in found
        if problem["type"] in LENGTH_ERRORS or not any(_in_other_branch(problem["loc"], *at) for at in bounded if at)
    ]
    for problem in _closest_branches(found):
        if problem["type"] == "json_invalid":
            return _invalid_text(raw) or APIError(
                400, f"the request body is not valid JSON: {problem['ctx']['error']}", code="invalid_json"
            )
        param = ".".join(str(part) for part in _field_path(problem["loc"])) or "body"
        shown = repr(problem["input"])
        shown = shown if len(shown) <= MAX_SHOWN_INPUT else shown[:MAX_SHOWN_INPUT] + "..."
        # a check of the server's says its own words, without pydantic's "Value error, " before them
        said = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
        detail = said if problem["type"] == "missing" else f"{said}, got {shown}"
        if f"{param}: {detail}" not in problems:  # union branches failing alike say it once
            problems.append(f"{param}: {detail}")
            params.append(param)
    return APIError(400, "invalid request: " + "; ".join(problems), param=params[0], code="invalid_value")


def invalid_value(error: ValueError) -> APIError:
    """The 400 of a value the engine judged (SamplingParams.validate, add_request, or a step of the request): a
    ConfigError names the field at fault as the param, a plain ValueError none."""
    return APIError(400, str(error), param=getattr(error, "field", None), code="invalid_value")


def internal_error(error: BaseException, what: str) -> APIError:
    """A 500 that tells the client an error id to quote, not the exception: its text goes to the server log only."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s while %s", error_id, what, exc_info=error)
    return APIError(500, f"internal server error while {what} (error id {error_id}); the server log has the details",
                    "server_error")  # fmt: skip


def _invalid_text(raw: bytes) -> APIError | None:
    """A 400 for a body that is not UTF-8, or whose JSON string escapes a lone UTF-16 surrogate ("\\ud800" without
    its low half: no Unicode character), naming the byte or the field; None for a body with neither."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return APIError(400, f"the request body is not UTF-8: byte 0x{raw[error.start]:02x} at offset {error.start}; "
                        "send JSON encoded as UTF-8", code="invalid_unicode")  # fmt: skip
    try:
        strings = _strings(json.loads(text), [])
        lone = next(((path, found) for path, string in strings if (found := LONE_SURROGATE.search(string))), None)
    except (ValueError, RecursionError):  # not JSON to Python either, or nested too deep: pydantic's message says
        return None
    if lone is None:
        return None
    path, found = lone
    param = ".".join(str(part).encode("utf-8", "backslashreplace").decode() for part in path) or "body"
    message = (
        f"invalid request: {param}: the string escapes a lone surrogate \\u{ord(found.group()):04x} (at character "
        f"{found.start()}), which is no Unicode character; escape a character beyond U+FFFF as its pair "
        "(\\ud83d\\ude00), or send it as UTF-8"
    )
    return APIError(400, message, param=param, code="invalid_unicode")


def _strings(value: Any, path: list) -> Iterator[tuple[list, str]]:
    """Each string of a JSON document, object keys included, with the path of the field holding it."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield [*path, key], key
            yield from _strings(item, [*path, key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, [*path, index])


def _union_branch(location: tuple) -> tuple[tuple, str] | None:
    """Where a validation error's location enters its first union: the union's field, and the branch pydantic names
    ('str', 'list[int]'); None outside a union."""
    for index, part in enumerate(location):
        if _is_branch(part):
            return location[:index], part
    return None


def _is_branch(part: str | int) -> bool:
    """Whether a part of a validation error's location is a union's branch, as pydantic names it."""
    return isinstance(part, str) and (UNION_MEMBER.fullmatch(part) is not None or part in UNION_MODELS)


def _closest_branches(found: list[dict]) -> list[dict]:
    """`found` less the errors of each union's branches that came further from matching than another: a branch whose
    errors lie less deep in the value, or as deep and more of them. A list of token ids with one text among them
    failed as a string, as a list of texts, as a list of lists and as a list of ids: the last two say where it went
    wrong ("prompt.1: Input should be a valid integer", "prompt.0: Input should be a valid string"), a list of lists
    with a text inside it the one branch alone ("prompt.1.1: ..."); so at each union a location passes, a text part
    missing its text in a message's content as a text part, not as a refusal part too."""
    branches: dict[tuple, dict[str, list[dict]]] = {}
    for problem in found:
        location = problem["loc"]
        for index, part in enumerate(location):
            if _is_branch(part):
                branches.setdefault(location[:index], {}).setdefault(part, []).append(problem)
    farther = set()
    for by_branch in branches.values():
        distance = {branch: (-max(len(p["loc"]) for p in problems), len(problems))
                    for branch, problems in by_branch.items()}  # fmt: skip
        closest = min(distance.values())
        farther.update(id(p) for branch, problems in by_branch.items() if distance[branch] > closest for p in problems)
    return [problem for problem in found if id(problem) not in farther]


def _in_other_branch(location: tuple, field: tuple, branch: str) -> bool:
    """Whether `location` lies in a branch other than `branch` of the union at `field`."""
    inside = location[: len(field)] == field and len(location) > len(field)
    return inside and location[len(field)] != branch


def _field_path(location: tuple) -> list:
    """The fields of a validation error's location, without the union branches pydantic names ('str', 'list[int]')."""
    return [part for part in location if not _is_branch(part)]
