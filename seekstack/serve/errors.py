"""API errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

import logging
import re
import uuid

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from seekstack.serve.schemas import ErrorDetail, ErrorResponse

MAX_SHOWN_INPUT = 80
UNION_MEMBER = re.compile(r"str|int|float|bool|constrained-\w+|.*\[.*\]")  # how pydantic names a union's branches
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


LENGTH_ERRORS = ("too_long", "too_short")  # pydantic's types for a sequence outside its length bounds


def invalid_body(error: ValidationError) -> APIError:
    """A 400 naming every field that failed validation, with the value sent."""
    problems, params = [], []
    found = error.errors()
    # A field whose length is out of bounds (17 prompts) failed every branch of its union too: its bound says it.
    bounded = {problem["loc"][0] for problem in found if problem["type"] in LENGTH_ERRORS and problem["loc"]}
    found = [p for p in found if not p["loc"] or p["loc"][0] not in bounded or p["type"] in LENGTH_ERRORS]
    for problem in found:
        if problem["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {problem['ctx']['error']}", code="invalid_json")
        param = ".".join(str(part) for part in _field_path(problem["loc"])) or "body"
        shown = repr(problem["input"])
        shown = shown if len(shown) <= MAX_SHOWN_INPUT else shown[:MAX_SHOWN_INPUT] + "..."
        detail = problem["msg"] if problem["type"] == "missing" else f"{problem['msg']}, got {shown}"
        if f"{param}: {detail}" not in problems:  # union branches failing alike say it once
            problems.append(f"{param}: {detail}")
            params.append(param)
    return APIError(400, "invalid request: " + "; ".join(problems), param=params[0], code="invalid_value")


def internal_error(error: BaseException, what: str) -> APIError:
    """A 500 that tells the client an error id to quote, not the exception: its text goes to the server log only."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s while %s", error_id, what, exc_info=error)
    return APIError(500, f"internal server error while {what} (error id {error_id}); the server log has the details",
                    "server_error")  # fmt: skip


def _field_path(location: tuple) -> list:
    """The fields of a validation error's location, without the union branches pydantic names ('str', 'list[int]')."""
    return [part for part in location if isinstance(part, int) or not UNION_MEMBER.fullmatch(part)]
