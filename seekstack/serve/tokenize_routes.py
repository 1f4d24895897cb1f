"""vLLM's /tokenize and /detokenize: the token ids of a prompt as the server bills it, and the text of token ids.

    POST /tokenize    {"model": M, "prompt": TEXT} or {"model": M, "messages": [...], "tools": [...], "tool_choice": C}
                      -> {"count": N, "max_model_len": L, "tokens": [ids], "token_strs": null}
    POST /detokenize  {"model": M, "tokens": [ids]}  -> {"prompt": TEXT}

A prompt is encoded as /v1/completions encodes it, messages as /v1/chat/completions renders them (a last assistant
message marked "prefix": true left open, the tools left out with tool_choice "none"; tools, a tool_choice but "none"
and add_generation_prompt false beside a prompt text refused, where vLLM ignores them), so `count` is the prompt_tokens
such a call is billed, to check against `max_model_len` before sending it. vLLM's options change that:
`add_special_tokens: false` leaves out the special tokens the tokenizer frames a prompt with (a DeepSeek release's BOS;
messages keep their template's own), `add_generation_prompt: false` the assistant's opening after messages, and
`return_token_strs: true` adds each id's token string (`token_strs`); vLLM's continue_final_message and chat_template
are refused, as the chat routes refuse them ("prefix": true continues a last message), and its chat_template_kwargs read
as there (a key the template does not read dropped, one it reads refused). `model` (default the base model) must be one
the caller may use. A prompt is counted as the caller's content policy leaves it for the call (redacted; 400 where it is
blocked). Like /v1/moderations they count against a key's requests per minute and are not metered; a server without API
keys answers them to loopback JSON requests only (serve/access.py).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from seekstack.serve.access import read_body
from seekstack.serve.errors import APIError, invalid_body, parse_body
from seekstack.serve.keys import ApiKey
from seekstack.serve.openapi import error_responses, json_request
from seekstack.serve.protocol import (
    REFUSED_VLLM_CHAT_FIELDS,
    chat_ids,
    prompt_ids,
    refuse_fields,
    refuse_outside_vocabulary,
    refuse_template_kwargs,
)
from seekstack.serve.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    LoggedRequest,
    OrDefault,
    PromptText,
    TokenId,
    Tool,
    ToolChoice,
    whole_numbers,
)

if TYPE_CHECKING:
    from seekstack.serve.app import Server
    from seekstack.serve.moderation import Category
    from seekstack.serve.safety import ContentSafety
    from seekstack.tokenizer import Tokenizer


class TokenizeRequest(LoggedRequest):
    """A completion's prompt text or a chat's messages, one of the two."""

    model: str | None = None
    prompt: PromptText | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None  # listed in the messages' prompt, as a chat call lists them
    tool_choice: ToolChoice | None = None  # "none": the tools left out
    add_special_tokens: Annotated[bool, OrDefault] = True  # a prompt's framing (messages: the template's own)
    add_generation_prompt: Annotated[bool, OrDefault] = True  # the assistant's opening after messages
    return_token_strs: Annotated[bool, OrDefault] = False
    # vLLM's, which change its count; refused as the chat routes refuse them (TEMPLATE_FIELDS, refuse_template_kwargs),
    # false and {} accepted
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a completion's text) or messages (a chat's), one of the two")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(LoggedRequest):
    model: str | None = None
    tokens: list[TokenId]
    _integers = field_validator("tokens", mode="before")(whole_numbers)


class DetokenizeResponse(BaseModel):
    prompt: str


TOKENIZE_REQUESTS = [TokenizeRequest, DetokenizeRequest]  # for the OpenAPI document's components
# vLLM's options of the chat template that this server refuses on the chat routes: counted here, they would be ignored
# (chat_template_kwargs are read as there: refuse_template_kwargs)
TEMPLATE_FIELDS = {name: REFUSED_VLLM_CHAT_FIELDS[name] for name in ("chat_template", "continue_final_message")}
# the fields that shape a chat's prompt: beside a prompt text they would be ignored (as vLLM ignores them there, with a
# log line), its count missing the tools a client meant to count
MESSAGES_FIELDS = {
    name: f"{name} shapes a chat's prompt, not a prompt text's"
    for name in ("tools", "tool_choice", "add_generation_prompt")
}


def tokenized(
    body: TokenizeRequest, model: str, tokenizer: Tokenizer, safety: ContentSafety, categories: list[Category]
) -> list[int]:
    """The token ids /tokenize answers: those the completion or chat call of `body` is billed, as the caller's content
    policy (`categories`) leaves them (redacted; 400 where it blocks them), but for vLLM's options leaving out the
    prompt's special tokens or the generation prompt."""
    refuse_fields(body, TEMPLATE_FIELDS)
    refuse_template_kwargs(body.chat_template_kwargs, tokenizer)
    if body.prompt is not None:
        refuse_fields(body, MESSAGES_FIELDS, advice=": give messages, or send the prompt without {param}")
        call = CompletionRequest(model=model, prompt=body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        try:  # checked as the chat route checks it (a tool_choice naming a function not among the tools)
            call = ChatCompletionRequest(
                model=model, messages=body.messages, tools=body.tools, tool_choice=body.tool_choice
            )
        except ValidationError as error:
            raise invalid_body(error) from None
    if categories:
        safety.moderate_prompt(call, categories, None)
    if isinstance(call, CompletionRequest) or body.add_generation_prompt:
        [ids] = prompt_ids(call, tokenizer)
        return ids
    if call.messages[-1].prefix:
        raise APIError(400, "a last message marked prefix is continued: there is no generation prompt to leave out",
                       param="add_generation_prompt", code="invalid_value")  # fmt: skip
    return chat_ids(call.messages, tokenizer, add_generation_prompt=False, tools=call.offered_tools())


def add_tokenize_routes(app: FastAPI, server: Server) -> None:
    """POST /tokenize and /detokenize, with `server`'s tokenizer."""

    async def admitted(request: Request, schema: type[TokenizeRequest | DetokenizeRequest]):
        """The request's key and body, once the key is authenticated, counted against its requests per minute (429
        over them), and found to name a model it may use (404)."""
        key: ApiKey | None = await asyncio.to_thread(server.authenticate, request)
        await server.count(request, key)
        raw = await read_body(request, server.max_body_bytes)
        body = await asyncio.to_thread(parse_body, schema, raw)  # 800,000 ids: 0.4 s of JSON
        server.adapter_for(body.model or server.model_name, key)
        return key, body

    @app.post(
        "/tokenize",
        openapi_extra=json_request(TokenizeRequest),
        response_model=TokenizeResponse,
        responses=error_responses(400, 401, 404, 413, 415, 429, 500),
    )
    async def tokenize(request: Request) -> JSONResponse:
        """The token ids a completion's prompt or a chat's messages are billed as (vLLM's route)."""
        key, body = await admitted(request, TokenizeRequest)
        tokenizer, model = server.engine.tokenizer, body.model or server.model_name
        categories = server.safety.categories_for(key)
        ids = await asyncio.to_thread(tokenized, body, model, tokenizer, server.safety, categories)
        answer = TokenizeResponse(
            count=len(ids),
            max_model_len=server.engine.max_model_len,
            tokens=ids,
            token_strs=[tokenizer.backend.id_to_token(token) for token in ids] if body.return_token_strs else None,
        )
        return JSONResponse(answer.model_dump())

    @app.post(
        "/detokenize",
        openapi_extra=json_request(DetokenizeRequest),
        response_model=DetokenizeResponse,
        responses=error_responses(400, 401, 404, 413, 415, 429, 500),
    )
    async def detokenize(request: Request) -> JSONResponse:
        """The text of token ids, special tokens kept as their strings (vLLM's route)."""
        _, body = await admitted(request, DetokenizeRequest)
        tokenizer = server.engine.tokenizer
        refuse_outside_vocabulary(body.tokens, tokenizer, "tokens")
        text = await asyncio.to_thread(tokenizer.decode, body.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
