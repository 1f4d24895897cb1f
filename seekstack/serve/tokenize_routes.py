"""vLLM's /tokenize and /detokenize: the token ids of a prompt as the server bills it, and the text of token ids.

    POST /tokenize    {"model": M, "prompt": TEXT} or {"model": M, "messages": [...]}
                      -> {"count": N, "max_model_len": L, "tokens": [ids]}
    POST /detokenize  {"model": M, "tokens": [ids]}  -> {"prompt": TEXT}

A prompt is encoded as /v1/completions encodes it, messages as /v1/chat/completions renders them (a last assistant
message marked "prefix": true left open), so `count` is the prompt_tokens such a call is billed, to check against
`max_model_len` before sending it. `model` (default the base model) must be one the caller may use. Like
/v1/moderations they count against a key's requests per minute and are not metered; a server without API keys
answers them to loopback JSON requests only (serve/access.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from seekstack.serve.access import read_body
from seekstack.serve.database import in_write_thread
from seekstack.serve.errors import parse_body
from seekstack.serve.keys import ApiKey
from seekstack.serve.openapi import error_responses, json_request
from seekstack.serve.protocol import prompt_ids, refuse_outside_vocabulary
from seekstack.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    PromptText,
    StrictRequest,
    TokenId,
)

if TYPE_CHECKING:
    from seekstack.serve.app import Server


class TokenizeRequest(StrictRequest):
    """A completion's prompt text or a chat's messages, one of the two."""

    model: str | None = None
    prompt: PromptText | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a completion's text) or messages (a chat's), one of the two")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(StrictRequest):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


TOKENIZE_REQUESTS = [TokenizeRequest, DetokenizeRequest]  # for the OpenAPI document's components


def add_tokenize_routes(app: FastAPI, server: Server) -> None:
    """POST /tokenize and /detokenize, with `server`'s tokenizer."""

    async def admitted(request: Request, schema: type[TokenizeRequest | DetokenizeRequest]):
        """The request's body, once its key is authenticated, counted against its requests per minute (429 over
        them), and found to name a model it may use (404)."""
        key: ApiKey | None = await asyncio.to_thread(server.authenticate, request)
        await in_write_thread(server.admit, key)
        body = parse_body(schema, await read_body(request, server.max_body_bytes))
        server.adapter_for(body.model or server.model_name, key)
        return body

    @app.post(
        "/tokenize",
        openapi_extra=json_request(TokenizeRequest),
        response_model=TokenizeResponse,
        responses=error_responses(400, 401, 404, 413, 415, 429, 500),
    )
    async def tokenize(request: Request) -> JSONResponse:
        """The token ids a completion's prompt or a chat's messages are billed as (vLLM's route)."""
        body = await admitted(request, TokenizeRequest)
        model = body.model or server.model_name
        call = (
            CompletionRequest(model=model, prompt=body.prompt)
            if body.messages is None
            else ChatCompletionRequest(model=model, messages=body.messages)
        )
        [ids] = await asyncio.to_thread(prompt_ids, call, server.engine.tokenizer)
        answer = TokenizeResponse(count=len(ids), max_model_len=server.engine.max_model_len, tokens=ids)
        return JSONResponse(answer.model_dump())

    @app.post(
        "/detokenize",
        openapi_extra=json_request(DetokenizeRequest),
        response_model=DetokenizeResponse,
        responses=error_responses(400, 401, 404, 413, 415, 429, 500),
    )
    async def detokenize(request: Request) -> JSONResponse:
        """The text of token ids, special tokens kept as their strings (vLLM's route)."""
        body = await admitted(request, DetokenizeRequest)
        tokenizer = server.engine.tokenizer
        refuse_outside_vocabulary(body.tokens, tokenizer, "tokens")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
