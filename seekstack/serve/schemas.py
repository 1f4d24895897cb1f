"""Request and response bodies in OpenAI's shapes (plus vLLM's sampling extras), as pydantic models.

Requests are validated strictly from JSON: a string where a number belongs is a 400, not a guess (a whole number
written 5.0 is the integer 5, as JSON Schema's "integer" reads it, in the fields `whole_numbers` names), and
every number has a range (OpenAI's where it documents one), so no value reaches the engine that it
cannot sample with. A null is read as the field's default, as OpenAI documents its fields ("or null") and vLLM
reads them. Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working; OpenAI's
fields that would change the reply and that this server cannot honour are declared, to be refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticUseDefault, core_schema

from seekstack.infer.params import LOGIT_BIAS_LIMIT, MAX_BAD_WORDS, MAX_TOP_LOGPROBS, SamplingParams
from seekstack.tokenizer import template_message

MAX_CHOICES = 16
MAX_ENGINE_REQUESTS = 64  # generations one API request may start (prompts x choices)
# prompts in one completions request: as many as the generations it may start (vLLM sets no limit): lm-eval's
# local-completions sends its batch_size of prompts in each request, so 16 refused every batch_size of 32 or 64
MAX_PROMPTS = MAX_ENGINE_REQUESTS
# OpenAI's limit is 4, vLLM sets none: lm-eval's local-completions sends a task's `until` whole with the EOS text (6
# for humaneval, 5 for aime), so 4 refused whole tasks that vLLM serves
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_INT32 = 2**31 - 1  # the bound of counts (max_tokens, top_k) that have no natural one
MAX_LOGIT_BIASES = 300  # OpenAI's limit on logit_bias entries
MAX_REQUEST_ID_CHARS = 256  # a request's id names the response and its log lines: an id, not a text
MAX_STOP_TOKEN_IDS = 300  # vLLM sets none; as many as logit_bias may name
# a request's id, a body's request_id or a client's X-Request-Id: visible ASCII, as a header's value can carry it
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS, pattern=r"^[!-~]+$")]

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
PromptText = str  # "" too: where the tokenizer frames it with BOS it has a token to start from (prompt_ids)
PromptIds = Annotated[list[int], Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]  # the vocabulary's bound is the tokenizer's (protocol.prompt_ids checks it)
LogitBiases = Annotated[
    dict[TokenId, Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]],
    Field(max_length=MAX_LOGIT_BIASES, json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}),
]  # token id (a JSON key: "123") -> added to its logit


class NullIsDefault:
    """A field's annotation: JSON null is read as the field's default, and its schema allows null."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(_default_for_null, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [handler(schema), {"type": "null"}]}


def _default_for_null(value: Any) -> Any:
    if value is None:
        raise PydanticUseDefault()
    return value


OrDefault = NullIsDefault()  # `n: Annotated[int, Field(ge=1), OrDefault] = 1` reads "n": null as 1


class StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class LoggedRequest(StrictRequest):
    """A request (or part of one) whose unknown fields are ignored but kept, for parse_body to name them in the log
    (an include_usuage, a misspelt sampling field), as vLLM's server warns of them."""

    model_config = ConfigDict(extra="allow")


def whole_numbers(value: Any) -> Any:
    """A JSON number without a fractional part (5.0) as the integer it is, as JSON Schema's "integer" (the type
    /openapi.json gives) and vLLM's pydantic read it, in lists too (token ids); any other value as it is, for the
    strict int to refuse (5.5, "5", true; 1e300, past every field's bound, shown as given). The before-validator of
    a request's integer fields, each named."""
    if isinstance(value, float) and value.is_integer() and -(2**63) <= value < 2**63:
        return int(value)
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    return value


class StreamOptions(LoggedRequest):
    include_usage: Annotated[bool, OrDefault] = False
    # vLLM's extension: with include_usage, each chunk carries its choice's usage so far
    continuous_usage_stats: Annotated[bool, OrDefault] = False


class JsonSchemaSpec(LoggedRequest):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # the JSON Schema the reply must follow
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(LoggedRequest):
    """Free text, or JSON constrained as it is generated, so that a reply that finishes parses: "json_object" (JSON
    mode: one JSON object) or "json_schema" with `json_schema` (JSON that the schema allows)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None  # required with type "json_schema", read only then

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs the field json_schema: {"name": ..., "schema": {...}}')
        return self


class SamplingFields(LoggedRequest):
    """Fields shared by both endpoints; None means the default."""

    model: str | None = Field(None, min_length=1)  # left out (or null): the base model, as vLLM reads it
    # vLLM's: the response's id (cmpl-/chatcmpl- and it) and X-Request-Id, where the client sent no X-Request-Id
    request_id: RequestId | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), OrDefault] = 1
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch takes [-2**63, 2**64): room for seed + index
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBiases | None = None
    response_format: ResponseFormat | None = None  # OpenAI's for chat; vLLM takes it for completions too
    stream: Annotated[bool, OrDefault] = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # vLLM extras from here on; -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: Annotated[bool, OrDefault] = False
    # vLLM's: EOS and stop_token_ids are not sampled, nor stop strings matched, before this many tokens
    min_tokens: Annotated[int, Field(ge=0, le=MAX_INT32), OrDefault] = 0
    # drop <｜User｜> and the like from the text, as vLLM does; the library's default, the one place it is set
    skip_special_tokens: Annotated[bool, OrDefault] = SamplingParams.skip_special_tokens
    # generating one of these ends the choice (finish_reason "stop"), its text left out as EOS's, even with ignore_eos
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # vLLM's: no other id is sampled (EOS included unless listed); None: any
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    # vLLM's: a word's last token is never sampled right after its other tokens (infer.sampling.BadWords)
    bad_words: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_BAD_WORDS)] | None = None
    _shared_integers = field_validator(
        "n", "seed", "top_k", "min_tokens", "stop_token_ids", "allowed_token_ids", mode="before"
    )(whole_numbers)
    # vLLM's fields that would change the reply and that this server cannot honour: declared to be refused when set
    # (protocol.refuse_unsupported), each with the value that asks for nothing this server does not do anyway
    use_beam_search: bool | None = None  # false accepted
    include_stop_str_in_output: bool | None = None  # false accepted
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    truncate_prompt_tokens: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: bool | None = None  # false accepted
    return_token_ids: bool | None = None  # false accepted
    cache_salt: Any = None
    priority: Any = None  # 0 accepted


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


class RefusalPart(StrictRequest):
    """An assistant's refusal among its content parts, as OpenAI takes it in a replayed turn; read as its text, as
    vLLM reads it."""

    type: Literal["refusal"]
    refusal: str


ContentParts = Annotated[list[TextPart | RefusalPart], Field(min_length=1)]  # OpenAI refuses an empty array


def unread_part(given: Any, read: tuple[str, ...]) -> tuple[int, str] | None:
    """The first content part of `given` (a JSON list of parts) whose type is none of `read` (OpenAI's image_url,
    input_audio, file): its index and type, to refuse it as such, not as every branch of a union failing."""
    for index, part in enumerate(given if isinstance(given, list) else []):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in read:
            return index, kind
    return None


# OpenAI's rule for a replayed call's function name (no length limit there, as for a function defined: FUNCTION_NAME);
# a name outside it could break the prompt's call format (a newline ends the name there)
CALLED_NAME = r"^[a-zA-Z0-9_-]+$"


class CalledFunction(StrictRequest):
    name: str = Field(pattern=CALLED_NAME)
    arguments: str  # a JSON object's text, as the model wrote it

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, arguments: str) -> str:
        """JSON text, as OpenAI and vLLM take a replayed call's arguments; none ("") as {}, as vLLM reads them."""
        try:
            json.loads(arguments or "{}")
        except (ValueError, RecursionError) as error:
            raise ValueError(f"must be JSON text, the call's arguments as the reply gave them ({error}): replay them "
                             "as they came back, or repair them") from None  # fmt: skip
        return arguments or "{}"


class ToolCallRequest(StrictRequest):
    """An assistant's tool call in a replayed history, as OpenAI returned it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class FunctionDefinition(StrictRequest):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of an object; none or {} (as OpenAI, vLLM): any object
    strict: bool | None = None  # the arguments are held to the schema only when the tool choice forces a call

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        if parameters and parameters.get("type") != "object":
            raise ValueError(f'must be a JSON Schema of "type": "object" (the arguments are a JSON object), got '
                             f'"type": {json.dumps(parameters.get("type"))}')  # fmt: skip
        return parameters


class Tool(StrictRequest):
    type: Literal["function"]
    function: FunctionDefinition


def _distinct_names(tools: list[Tool]) -> list[Tool]:
    names = [tool.function.name for tool in tools]
    twice = next((name for position, name in enumerate(names) if name in names[:position]), None)
    if twice is not None:
        raise ValueError(f"two tools are named {twice!r}: a call names its function, so each name must be unique")
    return tools


# The tools a request (or an SFT line, seekstack.posttrain.conversations.offered) offers: each named once
Tools = Annotated[list[Tool], AfterValidator(_distinct_names)]


def _no_whole_vocabulary(count: Any) -> Any:
    """Refuse vLLM's -1 (every token of the vocabulary with its logprob) in words, not as a count below 0."""
    if count == -1:
        raise ValueError(
            "-1 asks for the logprobs of the whole vocabulary (vLLM's meaning, which its default --max-logprobs 20 "
            "refuses too); this server gives the k likeliest tokens: give a count from 0 up"
        )
    return count


LogprobsCount = BeforeValidator(_no_whole_vocabulary)  # of a logprobs count, vLLM's -1 refused by name


class NamedFunction(StrictRequest):
    name: str


class NamedToolChoice(StrictRequest):
    """A tool_choice that forces a call of one function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice  # a chat's tool_choice, which /tokenize takes too


class ChatMessage(StrictRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {  # as `_null_only_from_the_assistant` and `_refusal_in_place_of_the_assistants_content` read it
                    "if": {"properties": {"role": {"const": "assistant"}}},
                    "then": {
                        "if": {"required": ["refusal"], "properties": {"refusal": {"type": "string"}}},
                        "then": {
                            "properties": {"content": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}}
                        },
                    },
                    "else": {
                        "required": ["content"],
                        "properties": {"content": {"not": {"type": "null"}}, "refusal": {"type": "null"}},
                    },
                },
                {  # as `_results_name_their_call` reads it
                    "if": {"properties": {"role": {"const": "tool"}}},
                    "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
                },
            ]
        }
    )
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null or left out only in an assistant turn (a replayed history; OpenAI's calls need none), read as ""
    content: str | ContentParts | None = Field(None, validate_default=True)
    # an assistant turn's calls, replayed (OpenAI refuses an empty array: a client leaves it out for no calls)
    tool_calls: Annotated[list[ToolCallRequest], Field(min_length=1)] | None = None
    refusal: str | None = None  # a replayed assistant turn that refused (OpenAI's reply: its content null), its text
    # a replayed reply's reasoning given apart (tokenizer.REASONING_FIELDS: DeepSeek's, vLLM's, transformers' names):
    # text or null, left out of the prompt as DeepSeek's API drops it
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None
    # a tool result's call, required of one (as OpenAI requires it); the chat template does not write it, as DeepSeek's
    tool_call_id: str | None = Field(None, validate_default=True)
    function_call: Any = None  # OpenAI's deprecated form of a call: refused
    # DeepSeek's chat prefix completion: the last message, an assistant's, starts the reply; the model continues it
    prefix: Annotated[bool, OrDefault] = False

    @field_validator("function_call")
    @classmethod
    def _no_legacy_call(cls, call: Any) -> None:
        if call is not None:
            raise ValueError("function_call is OpenAI's deprecated form of a tool call: replay it as tool_calls")

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_the_assistant(cls, calls: list | None, info: ValidationInfo) -> list | None:
        if calls is not None and info.data.get("role") != "assistant":
            raise ValueError(f"a {info.data.get('role')} message has no tool_calls: only an assistant message calls "
                             "tools")  # fmt: skip
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _results_name_their_call(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        if call_id is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs the tool_call_id of the call it answers (the id of one of the "
                             "tool_calls of the assistant message before it), as OpenAI requires")  # fmt: skip
        return call_id

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, given: Any) -> Any:
        unread = unread_part(given, ("text", "refusal"))
        if unread is not None:
            raise ValueError(f"part {unread[0]} is of type {unread[1]!r}, which this model does not read: it reads "
                             "text (text parts, and an assistant's refusal parts); send the text alone")  # fmt: skip
        return given

    @field_validator("content")
    @classmethod
    def _null_only_from_the_assistant(cls, content: str | list[Any] | None, info: ValidationInfo) -> Any:
        role = info.data.get("role", "assistant")
        if content is None and role != "assistant":
            raise ValueError(f"a {role} message needs content (text or text parts); only an assistant message's may "
                             "be null or left out")  # fmt: skip
        if role != "assistant" and any(isinstance(part, RefusalPart) for part in content):
            raise ValueError(f"a {role} message has no refusal parts: only an assistant message's content may hold "
                             "one, as OpenAI takes them")  # fmt: skip
        return content

    @field_validator("refusal")
    @classmethod
    def _refusal_in_place_of_the_assistants_content(cls, refusal: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role", "assistant")
        if refusal is not None and role != "assistant":
            raise ValueError(f"a {role} message has no refusal: only an assistant's reply refuses, as OpenAI takes it")
        if refusal is not None and info.data.get("content"):
            raise ValueError("an assistant message holds content or a refusal, as OpenAI's reply does (its content "
                             "null beside a refusal): keep the one the assistant said")  # fmt: skip
        return refusal

    def template(self) -> dict:
        """The message as the chat template reads it (`Tokenizer.render_chat`): role, content (or refusal; its parts as
        given, an assistant's refusal parts read by the template as their text) and tool calls."""
        message = self.model_dump(include={"role", "content"} | ({"refusal"} if self.refusal is not None else set()))
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message

    def text(self) -> str:
        """The content as the chat template reads it: text parts joined by newlines, null as empty."""
        return template_message(0, self.template())["content"]  # validated: no position to name


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: Annotated[bool, OrDefault] = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Tools | None = None  # the functions the model may call, listed in its prompt (but with "none")
    tool_choice: ToolChoice | None = None  # None: "auto" with tools
    parallel_tool_calls: Annotated[bool, OrDefault] = True  # false: one call (forced: the grammar's; "auto": the first)
    # OpenAI's fields that would change the reply and that this server cannot honour: declared to be refused when
    # set (protocol.refuse_unsupported), each with the value that asks for nothing this server does not do anyway
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None  # "none" accepted
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None  # ["text"] accepted
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    chat_template: str | None = None  # vLLM's, as above
    chat_template_kwargs: dict[str, Any] | None = None  # {} accepted
    add_generation_prompt: bool | None = None  # true accepted
    continue_final_message: bool | None = None  # false accepted
    echo: bool | None = None  # false accepted
    # vLLM's: each prompt token's logprob after those before it (the first null), in the response's prompt_logprobs
    prompt_logprobs: Annotated[int | None, LogprobsCount] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_special_tokens: bool | None = None  # false accepted: the chat template holds the special tokens
    _chat_integers = field_validator(
        "max_tokens", "max_completion_tokens", "top_logprobs", "prompt_logprobs", mode="before"
    )(whole_numbers)

    @field_validator("tool_choice")
    @classmethod
    def _a_choice_among_the_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            offered = ", ".join(repr(name) for name in names) or "none"
            raise ValueError(f"names the function {choice.function.name!r}, which is not among the tools (offered: "
                             f"{offered})")  # fmt: skip
        if choice in ("auto", "required") and not names:  # as OpenAI and vLLM refuse it
            raise ValueError(f'"{choice}" needs tools to call: send them in tools, or leave tool_choice out')
        return choice

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model may call, for the chat template to list (`tokenizer.listed_tool`, which leaves out a
        function's null fields); None with tool_choice "none" (the reply is text, and the tools are left out of the
        prompt, as vLLM's --exclude-tools-when-tool-choice-none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump() for tool in self.tools]


class CompletionRequest(SamplingFields):
    prompt: (
        PromptText
        | PromptIds
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )  # one prompt (text or token ids), or a list of them: each gets n choices
    # OpenAI's default for completions, null too; 0: with echo, the prompt alone (protocol.echo_only)
    max_tokens: Annotated[int, Field(ge=0, le=MAX_INT32), OrDefault] = 16
    logprobs: Annotated[int | None, LogprobsCount] = Field(None, ge=0, le=5)
    echo: Annotated[bool, OrDefault] = False  # the prompt's text before each choice's
    # vLLM's: each prompt token's logprob after those before it (the first null), with its k likeliest alternatives
    prompt_logprobs: Annotated[int | None, LogprobsCount] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's: false leaves out the special tokens the tokenizer frames a prompt text with (a DeepSeek release's BOS)
    add_special_tokens: Annotated[bool, OrDefault] = True
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)  # candidates per prompt; the n likeliest are returned
    suffix: str | None = None  # declared to be refused: the model does no fill-in-the-middle
    _completion_integers = field_validator(
        "prompt", "max_tokens", "logprobs", "prompt_logprobs", "best_of", mode="before"
    )(whole_numbers)

    @field_validator("suffix")
    @classmethod
    def _empty_suffix_is_none(cls, suffix: str | None) -> str | None:
        return suffix or None  # "" asks for no text after the completion, as OpenAI reads it


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens read from the prefix cache


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int  # of the completion tokens, those of the reasoning (`--reasoning-parser`)


def _left_out_when_none(serialized: dict[str, Any], key: str) -> dict[str, Any]:
    """A model's JSON without `key` while its value is None: a field that only some of the server's settings fill is
    left out, not sent as null."""
    if serialized.get(key) is None:
        serialized.pop(key, None)
    return serialized


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails | None = None  # only with a reasoning parser

    @model_serializer(mode="wrap")
    def _details_when_known(self, serialize):  # no return type: the schema stays the fields'
        return _left_out_when_none(serialize(self), "completion_tokens_details")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seekstack"
    max_model_len: int
    root: str | None = None  # the base model's checkpoint folder, or a LoRA adapter's (as vLLM lists them)
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object's text, as OpenAI gives it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None  # in a call's first delta
    arguments: str = ""  # the next piece of the arguments' text


class ToolCallDelta(BaseModel):
    """What a chunk adds to the call at `index`: its first delta carries its id, type and name, as OpenAI streams it."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize) -> dict:
        serialized = {name: value for name, value in serialize(self).items() if value is not None}
        serialized["function"] = {name: value for name, value in serialized["function"].items() if value is not None}
        return serialized


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the reply is tool calls alone, as OpenAI's
    reasoning_content: str | None = None  # with a reasoning parser: the reply's reasoning, left out otherwise
    tool_calls: list[ToolCall] | None = None  # the calls the reply makes, left out when it makes none

    @model_serializer(mode="wrap")
    def _reasoning_when_parsed(self, serialize):  # no return type: the schema stays the fields'
        return _left_out_when_none(_left_out_when_none(serialize(self), "reasoning_content"), "tool_calls")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it (else None)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's, of the prompt the messages make


class ChatDelta(BaseModel):
    """What a chat chunk adds; fields it does not carry are left out, as OpenAI streams them."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # with a reasoning parser: the reasoning, before the content
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize) -> dict:
        return {name: value for name, value in serialize(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it (else None)


class FieldsWhenSet(BaseModel):
    """A model whose fields named in `when_set` are left out unless given (null included): a stream's chunks have
    `usage` only with stream_options.include_usage, as OpenAI's ("only present when you set stream_options"), and a
    completion chunk's choice has no vLLM `prompt_logprobs` (never streamed), as neither OpenAI's nor vLLM's."""

    when_set: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _fields_when_set(self, serialize):  # no return type: the schema stays the fields'
        serialized = serialize(self)
        for name in self.when_set - self.model_fields_set:
            serialized.pop(name, None)
        return serialized


class UsageWhenSet(FieldsWhenSet):
    when_set = frozenset({"usage"})


class ChatCompletionChunk(UsageWhenSet):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class PromptLogprob(BaseModel):
    """vLLM's Logprob: a token's log-probability at a prompt position, its rank (1: the likeliest) and its text."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(FieldsWhenSet):
    when_set = frozenset({"prompt_logprobs"})  # a whole answer gives it; a stream's chunks do not

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it (else None)
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's, keyed by token id


class CompletionResponse(UsageWhenSet):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Health(BaseModel):
    status: Literal["ok", "engine stopped"]
    auth: bool  # whether API keys are required


class ServerVersion(BaseModel):
    version: str  # seekstack's, as vLLM's /version gives its own


class UsageDay(BaseModel):
    key_name: str | None
    day: str  # YYYY-MM-DD (UTC)
    model: str  # the base's name or a LoRA adapter's, as the requests named it
    requests: int
    failed: int  # of the requests, those the server failed (5xx): their tokens are counted, at no cost
    prompt_tokens: int
    cached_tokens: int  # of the prompt tokens, those read from the prefix cache (OpenAI's input_cached_tokens)
    completion_tokens: int
    cost: float


class UsageReport(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageDay]
    total_cost: float


class ModerationRequest(StrictRequest):
    # a text, texts (a result each), or OpenAI's multimodal input: parts of one input (text parts: this server's policy
    # reads no images)
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]  # "" in a list as alone: refused
        | Annotated[list[TextPart], Field(min_length=1)]
    )
    model: str | None = None  # not read: the server's policy answers, whatever is named, and its answer names it

    @field_validator("input", mode="before")
    @classmethod
    def _text_parts_only(cls, given: Any) -> Any:
        unread = unread_part(given, ("text",))
        if unread is not None:
            raise ValueError(f"input[{unread[0]}] is a part of type {unread[1]!r}, which is not read: this server's "
                             "moderation policy judges text only; send the text parts alone")  # fmt: skip
        return given

    def texts(self) -> list[str]:
        """The texts judged, a result each: the input, each text of a list, or a multimodal input's parts as one text,
        joined by newlines (as a chat message's parts are)."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], TextPart):
            return ["\n".join(part.text for part in self.input)]
        return self.input


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]  # what each category read of the input: its text


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]
