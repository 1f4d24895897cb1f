"""Tool calls in chat replies, in DeepSeek-V3's format, as vLLM's `--tool-call-parser deepseek_v3` reads them:

  content <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS
  \\n```<｜tool▁call▁end｜>\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

`ToolCallParser` splits a reply, pushed piece by piece (a stream's deltas, or a whole reply at once), into its content
and its calls, released as OpenAI streams them: a call's first delta carries its id, type and name, the next ones
pieces of its arguments. The markers never reach the content; text after the calls (the EOS) is dropped.
`forced_calls_format` is the grammar a `tool_choice` of "required" or a named function decodes under, as vLLM's
guided decoding holds it: the reply is calls of the offered functions, each's arguments JSON of its parameters' schema.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from seekstack.infer.json_mode import LAYOUT, GrammarFormat, InvalidSchema, JsonFormat, after_reasoning
from seekstack.serve.errors import APIError
from seekstack.serve.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)
from seekstack.tokenizer import (
    CALL_MARKERS,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    Tokenizer,
)

if TYPE_CHECKING:
    from seekstack.infer.engine import Engine
    from seekstack.infer.outputs import Completion

ARGUMENTS_START, ARGUMENTS_END = "\n```json\n", "\n```" + TOOL_CALL_END  # a call: TYPE<｜tool▁sep｜>NAME, then these


def new_call_id() -> str:
    """An id for a call the model made, in OpenAI's form (call_ and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the start of `marker` (held back: the marker may follow)."""
    return next((size for size in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:size])), 0)


class ToolCallParser:
    """One choice's reply, pushed piece by piece, released as content and tool-call deltas; without `parallel` (a
    request's parallel_tool_calls false) its first call only, the later ones dropped, as vLLM drops them. The
    `hidden` tokens are left out of the content, the reasoning and the calls: the special tokens a reply's text keeps
    for this parser alone."""

    def __init__(self, parallel: bool = True, hidden: Collection[str] = ()) -> None:
        self.parallel, self.hidden = parallel, hidden
        self.part = "content"  # "content", "calls" (between calls), "head" (type and name), "arguments", "done"
        self.held = ""  # text received and not yet released
        self.calls: list[ToolCall] = []  # the calls begun, their arguments so far
        self.complete_calls = 0  # of `calls`, those whose arguments ended

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """The content and the call deltas (one per call it touches) that `text`, the reply's next piece, releases;
        `final`: the reply ended (held text that was no marker is released as content)."""
        self.held += text
        content, deltas = "", {}
        while True:
            if self.part == "content":
                begin = self.held.find(TOOL_CALLS_BEGIN)
                shown = len(self.held) - (0 if final else _partial_suffix(self.held, TOOL_CALLS_BEGIN))
                content += self.held[: shown if begin < 0 else begin]
                if begin < 0:
                    self.held = self.held[shown:]
                    break
                self.held, self.part = self.held[begin + len(TOOL_CALLS_BEGIN) :], "calls"
            elif self.part == "calls":
                begin, end = self.held.find(TOOL_CALL_BEGIN), self.held.find(TOOL_CALLS_END)
                if (end >= 0 and (begin < 0 or end < begin)) or (begin >= 0 and self.calls and not self.parallel):
                    self.part = "done"  # the calls ended, or the one call taken has
                elif begin >= 0:
                    self.held, self.part = self.held[begin + len(TOOL_CALL_BEGIN) :], "head"
                else:
                    break
            elif self.part == "head":  # found with str.find: each piece re-reads the head, so no backtracking
                sep = self.held.find(TOOL_SEP)
                start = self.held.find(ARGUMENTS_START, sep + len(TOOL_SEP)) if sep >= 0 else -1
                if start < 0:
                    break
                name = self.without_hidden(self.held[sep + len(TOOL_SEP) : start]).strip()
                call = ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=""))
                self.calls.append(call)
                index = len(self.calls) - 1
                deltas[index] = ToolCallDelta(index=index, id=call.id, type="function",
                                              function=FunctionCallDelta(name=call.function.name))  # fmt: skip
                self.held, self.part = self.held[start + len(ARGUMENTS_START) :], "arguments"
            elif self.part == "arguments":
                end = self.held.find(ARGUMENTS_END)
                size = end if end >= 0 else len(self.held) - _partial_suffix(self.held, ARGUMENTS_END)
                piece = self.without_hidden(self.held[:size])
                self.held = self.held[size + len(ARGUMENTS_END) :] if end >= 0 else self.held[size:]
                index = len(self.calls) - 1
                self.calls[index].function.arguments += piece
                if piece:
                    delta = deltas.setdefault(index, ToolCallDelta(index=index, function=FunctionCallDelta()))
                    delta.function.arguments += piece
                if end < 0:
                    break
                self.complete_calls, self.part = len(self.calls), "calls"
            else:  # "done": what follows the calls is not the reply's
                self.held = ""
                break
        return self.without_hidden(content), list(deltas.values())

    def without_hidden(self, text: str) -> str:
        """`text` without the `hidden` tokens, each whole in it (a piece is a token's text, or text held with it)."""
        for token in self.hidden:
            text = text.replace(token, "")
        return text

    @classmethod
    def for_request(cls, request: ChatCompletionRequest, tokenizer: Tokenizer) -> ToolCallParser:
        """The parser of a reply to `request`, which offers tools: its parallel_tool_calls, and where it skips special
        tokens (the default) all of them left out of the content, the reasoning and the calls, as of a reply to a
        request without tools (the text keeps them for the parser; a stray <｜Assistant｜> left in made the
        conversation's next request a 400)."""
        return cls(request.parallel_tool_calls, tokenizer.special_tokens if request.skip_special_tokens else ())

    def delta(self, delta: ChatDelta, finish_reason: str | None) -> tuple[ChatDelta, str | None]:
        """A stream chunk's `delta` with the calls in its content parsed out (`push`), and its `finish_reason`:
        "tool_calls" where a reply that made calls ended on its own."""
        content, calls = self.push(delta.content or "", final=finish_reason is not None)
        reasoning = self.without_hidden(delta.reasoning_content or "")
        parsed = delta.model_copy(update={"content": content or None, "tool_calls": calls or None,
                                          "reasoning_content": reasoning or None})  # fmt: skip
        return parsed, "tool_calls" if finish_reason == "stop" and self.complete_calls else finish_reason


def message_with_calls(
    message: AssistantMessage, finish_reason: str | None, parser: ToolCallParser | None = None
) -> tuple[AssistantMessage, str | None]:
    """A whole reply's `message` with the calls in its content parsed out by a fresh `parser` (`ToolCallParser()` when
    none): its content null when the reply is calls alone, and its `finish_reason` "tool_calls" where it made calls and
    ended on its own. A call cut by max_tokens ("length") is kept with the arguments written before the cut, as
    OpenAI returns it and as its deltas were streamed; one cut by a stop string is left out, as vLLM's parser leaves
    it. A reply that began calls and wrote no text has its content null all the same (as OpenAI's, and vLLM's)."""
    parser = parser or ToolCallParser()
    content, _ = parser.push(message.content or "", final=True)
    reasoning = message.reasoning_content and parser.without_hidden(message.reasoning_content)
    message = message.model_copy(update={"reasoning_content": reasoning})
    calls = parser.calls if finish_reason == "length" else parser.calls[: parser.complete_calls]
    if not calls:
        began_calls = parser.part != "content"
        return message.model_copy(update={"content": (content or None) if began_calls else content}), finish_reason
    called = message.model_copy(update={"content": content or None, "tool_calls": calls})
    return called, "tool_calls" if finish_reason == "stop" else finish_reason


def completion_with_calls(completion: Completion, tokenizer: Tokenizer, skip_special_tokens: bool) -> Completion:
    """A chat reply to a conversation offered tools (`Engine.chat(tools=...)`), generated with its special tokens kept,
    with its calls parsed out as the server parses them (`message_with_calls`): its text the content (where
    `skip_special_tokens`, every special token left out, as a reply's without tools), its `tool_calls` OpenAI's (id,
    type, function name and arguments), its finish_reason "tool_calls" where it made calls and ended on its own; each
    of its samples (`Completion.others`) alike."""
    parser = ToolCallParser(hidden=tokenizer.special_tokens if skip_special_tokens else ())
    message, finish_reason = message_with_calls(AssistantMessage(content=completion.text), completion.finish_reason,
                                                parser)  # fmt: skip
    calls = [call.model_dump() for call in message.tool_calls or []]
    others = [completion_with_calls(other, tokenizer, skip_special_tokens) for other in completion.others]
    return dataclasses.replace(completion, text=message.content or "", finish_reason=finish_reason, tool_calls=calls,
                               others=others)  # fmt: skip


class ToolTurnError(ValueError):
    """Tool calls and results that do not follow as OpenAI requires (`check_tool_turn_order`); `at` names the message
    field at fault, as the caller names fields."""

    def __init__(self, at: str, problem: str) -> None:
        super().__init__(f"{at} {problem}")
        self.at = at


def check_tool_turn_order(messages: list[dict], name: Callable[[int, str], str], open_end: bool = False) -> None:
    """ToolTurnError unless each tool result answers, once, a call of the assistant message its run of results follows
    (the one its tool_call_id names; one without, the next call), and each call is answered before another message,
    or the chat's end, comes: as OpenAI refuses both. With `open_end` the calls the chat ends with need no results (a
    training conversation teaching the call, as OpenAI's fine-tuning data ends with one). `messages` are dicts (role,
    tool_calls with their ids, tool_call_id); `name(position, field)` names a message's field in the error
    ("messages.N.field" for the server, "chat message N field" for a training file). One check for the server's
    requests and SFT's conversations."""
    asking, calls, unanswered = 0, [], []  # who made the calls the results answer, the calls, those not yet answered
    for position, message in enumerate(messages):
        if message["role"] != "tool":
            _check_calls_answered(name(asking, "tool_calls"), unanswered)
            asking, calls = position, message.get("tool_calls") or []
            unanswered = list(calls)
            continue
        answered = message.get("tool_call_id")
        answers = [call for call in unanswered if answered is None or call.get("id") in (answered, None)]
        if not answers:
            ids = ", ".join(repr(call.get("id")) for call in calls) or "none given"
            follows = f"{name(asking, 'tool_calls')} (ids: {ids}), each answered once" if calls else "no tool call"
            problem = f"{answered!r} answers no call: the tool message follows {follows}"
            raise ToolTurnError(name(position, "tool_call_id"), f"{problem}; a tool result follows the assistant "
                                "message making its call")  # fmt: skip
        unanswered.remove(answers[0])
    _check_calls_answered(name(asking, "tool_calls"), [] if open_end else unanswered)


def _check_calls_answered(at: str, unanswered: list[dict]) -> None:
    """ToolTurnError at `at` (a message's tool_calls) when some of its calls (`unanswered`) have no result."""
    if unanswered:
        calls = ", ".join(repr(call.get("id")) if call.get("id") is not None else
                          f"{call['function']['name']!r} (no id)" for call in unanswered)  # fmt: skip
        raise ToolTurnError(at, f"are not all answered: no tool message answers the calls {calls}; an assistant "
                            "message with tool_calls must be followed by a tool message answering each tool_call_id, "
                            "as OpenAI requires")  # fmt: skip


def refuse_unanswered_results(messages: list[ChatMessage]) -> None:
    """400 naming `messages.N.tool_call_id` for a tool result that answers none of the calls of the assistant message
    it follows, or that follows no calls, and `messages.N.tool_calls` for calls whose results do not all follow them
    (`check_tool_turn_order`)."""
    try:
        check_tool_turn_order(
            [message.model_dump() for message in messages], lambda at, field: f"messages.{at}.{field}"
        )
    except ToolTurnError as error:
        raise APIError(400, str(error), param=error.at, code="invalid_value") from None


def forced_calls_format(
    request: ChatCompletionRequest, engine: Engine, reasoning_start: str | None = None
) -> GrammarFormat | None:
    """The grammar a request's `tool_choice` holds the reply to: one call of the named function (as vLLM's), or with
    "required" calls of any offered (one, with parallel_tool_calls false); None when the model may answer in text.
    With a reasoning parser (`reasoning_start`: the reply's start the prompt gives) the calls follow the reasoning, as
    JSON mode's JSON does. 400 naming the tool whose parameters' schema cannot be enforced, or tool_choice beside a
    response_format (one reply, one grammar)."""
    choice = request.tool_choice
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if not forced or not engine.tokenizer.has_tool_tokens:  # without them the tools are refused (prompt_ids)
        return None
    if request.response_format is not None and request.response_format.type != "text":
        raise APIError(400, "tool_choice forces a tool call, which response_format would hold to its JSON too: send "
                       "one of them", param="tool_choice", code="unsupported_parameter")  # fmt: skip
    tokenizer = engine.tokenizer
    tools = [tool for tool in request.tools if choice == "required" or tool.function.name == choice.function.name]
    try:
        parallel = choice == "required" and request.parallel_tool_calls
        start = "start: calls" if reasoning_start is None else after_reasoning("calls", reasoning_start)
        return GrammarFormat(tokenizer, start + "\n" + _calls_grammar(tokenizer, tools, parallel))
    except InvalidSchema as error:
        for position, tool in enumerate(request.tools):
            try:
                JsonFormat(tokenizer, _arguments_schema(tool.function.parameters))
            except InvalidSchema as refused:
                raise APIError(400, str(refused), param=f"tools.{position}.function.parameters",
                               code="invalid_schema") from None  # fmt: skip
        raise APIError(400, str(error), param="tools", code="invalid_schema") from None


def _arguments_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function's parameters' schema as its arguments are held to it: any object when it has none, laid out as
    JSON mode lays out JSON (`LAYOUT`, unless the schema's own x-guidance says otherwise)."""
    schema = parameters or {"type": "object"}
    return {**schema, "x-guidance": {**LAYOUT, **schema.get("x-guidance", {})}}


def _calls_grammar(tokenizer: Tokenizer, tools: list, parallel: bool) -> str:
    """The rules of a Lark grammar (llguidance's) whose rule `calls` is calls of `tools` in DeepSeek-V3's format: one,
    or with `parallel` one or more a newline apart. The markers are named by their token ids, as the model writes
    them."""
    token = {marker: f"<[{tokenizer.backend.token_to_id(marker)}]>" for marker in CALL_MARKERS}
    functions = " | ".join(f"function_{position}" for position in range(len(tools)))
    more = '("\\n" call)*' if parallel else ""  # Lark: a newline, then another call, any number of times
    rules = [
        f"calls: {token[TOOL_CALLS_BEGIN]} call {more} {token[TOOL_CALLS_END]}",
        f'call: {token[TOOL_CALL_BEGIN]} "function" {token[TOOL_SEP]} ({functions}) "\\n```" {token[TOOL_CALL_END]}',
    ]
    for position, tool in enumerate(tools):
        name = tool.function.name  # OpenAI's names: letters, digits, _ and -, nothing to escape
        rules.append(f'function_{position}: "{name}\\n```json\\n" arguments_{position}')
        rules.append(f"arguments_{position}: %json {json.dumps(_arguments_schema(tool.function.parameters))}")
    return "\n".join(rules)
