"""Tool calling through the official `openai` client, as vLLM's `--enable-auto-tool-choice --tool-call-parser
deepseek_v3` serves it: a tool_choice that forces a call decodes under the calls' grammar (the model has random
weights: every call that parses is the grammar's doing), the reply's `message.tool_calls` and its streamed deltas,
tool results replayed into the prompt in DeepSeek-V3's format, and bad tools refused naming the field.

In process: the `openai` client over the app's ASGI interface, its engine thread running."""

from __future__ import annotations

import json
import re
import threading

import pytest

from seekstack.infer.engine import Engine
from seekstack.serve.app import create_app
from seekstack.serve.database import open_database
from seekstack.serve.schemas import AssistantMessage, ChatCompletionRequest, ChatDelta
from seekstack.serve.tool_calls import (
    ToolCallParser,
    forced_calls_format,
    message_with_calls,
    refuse_unanswered_results,
)
from seekstack.tokenizer import (
    ASSISTANT,
    BOS,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    first_token_in,
    tool_call_text,
    tools_prompt,
)
from tests.serve.server import error_of, make_model_dir, run, with_openai

MOVE = {
    "type": "function",
    "function": {
        "name": "move",
        "description": "Move the robot",
        "parameters": {
            "type": "object",
            "properties": {"steps": {"type": "integer", "minimum": 0, "maximum": 99}, "way": {"enum": ["n", "s"]}},
            "required": ["steps", "way"],
            "additionalProperties": False,
        },
    },
}
STOP = {"type": "function", "function": {"name": "stop", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Move two steps north."}]
GREEDY = {"model": "model", "messages": ASK, "temperature": 0, "max_tokens": 60}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    # room for the tools' prompt: ~650 tokens of the test's 320-token vocabulary
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("tools"), max_position_embeddings=2048))


def valid_move(arguments: str) -> bool:
    """Whether `arguments` is JSON that MOVE's parameters allow."""
    value = json.loads(arguments)
    return set(value) == {"steps", "way"} and value["steps"] in range(100) and value["way"] in ("n", "s")


def test_a_named_tool_choice_returns_a_call_whose_arguments_follow_the_schema_also_streamed(engine, tmp_path):
    named = {"type": "function", "function": {"name": "move"}}

    async def scenario(api):
        whole = await api.chat.completions.create(**GREEDY, tools=[STOP, MOVE], tool_choice=named)
        stream = await api.chat.completions.create(**GREEDY, tools=[STOP, MOVE], tool_choice=named, stream=True)
        return whole, [chunk async for chunk in stream]

    whole, chunks = with_openai(engine, tmp_path, scenario)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and len(call.id) == 29 and call.type == "function"
    assert call.function.name == "move" and valid_move(call.function.arguments)
    deltas = [delta for chunk in chunks for delta in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function" and deltas[0].function.name == "move"
    assert all(delta.index == 0 and delta.id is None and delta.function.name is None for delta in deltas[1:])
    assert "".join(delta.function.arguments or "" for delta in deltas) == call.function.arguments
    assert not any(chunk.choices[0].delta.content for chunk in chunks)  # no marker leaks into content
    # each chunk carries something (was: an empty delta for each token the parser held back, 27 of 54 chunks)
    assert all(chunk.choices[0].delta.tool_calls or chunk.choices[0].finish_reason for chunk in chunks[1:])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_call_cut_by_max_tokens_leaves_the_content_null_also_streamed(engine, tmp_path):
    """A named tool_choice's call cut by max_tokens is left out; the reply wrote no text, so its content is null, as
    OpenAI's (was: content "", a text reply of nothing)."""
    named = {"type": "function", "function": {"name": "move"}}

    async def scenario(api):
        body = {**GREEDY, "max_tokens": 8, "tools": [STOP, MOVE], "tool_choice": named}
        whole = await api.chat.completions.create(**body)
        return whole, [chunk async for chunk in await api.chat.completions.create(**body, stream=True)]

    whole, chunks = with_openai(engine, tmp_path, scenario)
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.tool_calls is None
    assert whole.choices[0].message.content is None
    assert not any(chunk.choices[0].delta.content or chunk.choices[0].delta.tool_calls for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_forced_call_cut_by_max_tokens_inside_its_arguments_comes_back_as_streamed(engine, tmp_path):
    """As OpenAI's and vLLM's named tool_choice: the call with the arguments written before the cut, "length" (was:
    left out of the whole reply, though its id, name and arguments had been streamed)."""
    named = {"type": "function", "function": {"name": "move"}}

    async def scenario(api):
        whole = await api.chat.completions.create(**GREEDY, tools=[STOP, MOVE], tool_choice=named)
        cut = {**GREEDY, "max_tokens": whole.usage.completion_tokens - 6, "tools": [STOP, MOVE], "tool_choice": named}
        stream = await api.chat.completions.create(**cut, stream=True)
        return whole, await api.chat.completions.create(**cut), [chunk async for chunk in stream]

    whole, cut, chunks = with_openai(engine, tmp_path, scenario)
    [call] = cut.choices[0].message.tool_calls
    written = whole.choices[0].message.tool_calls[0].function.arguments
    assert call.function.name == "move" and call.function.arguments and written.startswith(call.function.arguments)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content is None
    deltas = [delta for chunk in chunks for delta in chunk.choices[0].delta.tool_calls or []]
    assert "".join(delta.function.arguments or "" for delta in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "length"


def test_required_calls_one_of_the_offered_functions_once_without_parallel_calls(engine, tmp_path):
    async def scenario(api):
        return await api.chat.completions.create(**GREEDY, tools=[MOVE, STOP], tool_choice="required",
                                                 parallel_tool_calls=False)  # fmt: skip

    reply = with_openai(engine, tmp_path, scenario)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name in ("move", "stop")
    assert valid_move(call.function.arguments) if call.function.name == "move" else json.loads(call.function.arguments)


def test_a_conversation_replaying_tool_results_is_prompted_in_deepseek_v3s_format(engine, tmp_path):
    """A history with the assistant's call and the tool's result: the prompt lists the tools after the system prompt,
    writes the call and the result in DeepSeek-V3's tokens, and ends where the reply follows the result."""
    arguments = '{"steps": 2, "way": "n"}'
    history = [
        {"role": "system", "content": "You drive a robot."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "move", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "moved"},
    ]  # fmt: skip
    expected = (
        f"{BOS}You drive a robot.\n\n{tools_prompt([MOVE])}<｜User｜>Move two steps north.<｜Assistant｜>"
        f"{TOOL_CALLS_BEGIN}{tool_call_text('move', arguments)}<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
        f"<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>moved<｜tool▁output▁end｜>{TOOL_OUTPUTS_END}"
    )

    async def scenario(client):
        body = {**GREEDY, "messages": history, "max_tokens": 1}
        return [await client.post("/v1/chat/completions", json={**body, "tools": [MOVE], **choice})
                for choice in ({}, {"tool_choice": "none"})]  # fmt: skip

    offered, not_offered = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert offered.status_code == 200, offered.text
    assert offered.json()["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(expected))
    without_tools = expected.replace(f"\n\n{tools_prompt([MOVE])}", "")
    assert not_offered.json()["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(without_tools))


def test_agent_frameworks_message_shapes_are_read_as_their_plain_forms(engine, tmp_path):
    """openai-agents and pydantic-ai send a calling assistant message without content (OpenAI's: "required unless
    tool_calls"), was a 400 'messages.1.content: Field required'; tool results as text parts, and with a name."""
    call = {"id": "c1", "type": "function", "function": {"name": "move", "arguments": '{"steps": 2, "way": "n"}'}}
    plain = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "c1", "content": "moved"}]  # fmt: skip
    parts = [{"type": "text", "text": "moved"}]
    shaped = [*ASK, {"role": "assistant", "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "c1", "name": "move", "content": parts}]  # fmt: skip

    async def scenario(api):
        return [await api.chat.completions.create(**{**GREEDY, "max_tokens": 1, "messages": messages}, tools=[MOVE])
                for messages in (plain, shaped)]  # fmt: skip

    plain_reply, shaped_reply = with_openai(engine, tmp_path, scenario)
    assert shaped_reply.usage.prompt_tokens == plain_reply.usage.prompt_tokens


def test_a_reply_offered_tools_leaves_special_tokens_out_of_its_content_so_that_it_can_be_replayed(engine, tmp_path):
    """The text keeps the special tokens for the tool-call parser; the content kept them too, so that the random model's
    stray <｜Assistant｜> came back in it, and an agent replaying the reply got a 400 ("chat message 1 content contains
    the special token"). Left out as without tools, where skip_special_tokens (the default) asks it."""

    async def scenario(api):
        kept = await api.chat.completions.create(**GREEDY, tools=[MOVE], extra_body={"skip_special_tokens": False})
        reply = await api.chat.completions.create(**GREEDY, tools=[MOVE])
        history = [*ASK, reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Again."}]
        await api.chat.completions.create(**{**GREEDY, "messages": history}, tools=[MOVE])  # no 400
        stream = await api.chat.completions.create(**GREEDY, tools=[MOVE], stream=True)
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        return kept.choices[0].message.content, reply.choices[0].message.content, streamed

    kept, content, streamed = with_openai(engine, tmp_path, scenario)
    special_tokens = engine.tokenizer.special_tokens
    assert first_token_in(kept, special_tokens) and not first_token_in(content, special_tokens)
    assert streamed == content
    assert content == re.sub("|".join(map(re.escape, engine.tokenizer.special_tokens)), "", kept)


NAMED_ABSENT = {"type": "function", "function": {"name": "fly"}}
UNNAMED_CALL = {"function": {"name": "", "arguments": ""}}  # the fuzzer's: a 500 (template_message's ValueError)
HUGE = {"type": "function", "function": {"name": "huge", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -(10**30)}}}}}  # fmt: skip


def replayed_call(arguments: str) -> list[dict]:
    """ASK, the assistant's call of move with `arguments`, and the tool's result."""
    call = {"id": "c1", "type": "function", "function": {"name": "move", "arguments": arguments}}
    return [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "moved"}]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0.function.name", "required"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name", "pattern"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools.0.function.parameters", 'must be a JSON Schema of "type": "object"'),
        ({"tools": [MOVE, STOP, MOVE]}, "tools", "two tools are named 'move'"),
        ({"tools": [MOVE, HUGE], "tool_choice": "required"}, "tools.1.function.parameters", "beyond the 64-bit"),
        ({"tools": [MOVE], "tool_choice": NAMED_ABSENT}, "tool_choice", "'fly', which is not among the tools"),
        ({"tool_choice": "required"}, "tool_choice", '"required" needs tools'),
        ({"tool_choice": "auto"}, "tool_choice", '"auto" needs tools'),  # was: served, as if no tools were named
        ({"messages": [{"role": "user"}]}, "messages.0.content", "a user message needs content"),
        ({"tools": [MOVE], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
         "response_format"),
        ({"messages": [*ASK, {"role": "user", "content": "x", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "move", "arguments": "{}"}}]}]},
         "messages.1.tool_calls", "only an assistant message calls tools"),
        # OpenAI's deprecated pair, each refusal naming what to send instead (was: "... send those: send the request
        # without functions")
        ({"functions": [{"name": "f"}]}, "functions", "functions is OpenAI's deprecated form of tools: send each "
         'function in tools instead, as {"type": "function", "function": {"name": ..., "parameters": ...}}'),
        ({"function_call": "auto"}, "function_call", "function_call is OpenAI's deprecated form of tool_choice: send "
         'tool_choice instead ("auto", "required", "none" or {"type": "function", "function": {"name": ...}})'),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [UNNAMED_CALL]}]},
         "messages.0.tool_calls.0.function.name", "should match pattern"),
        # as OpenAI: "Invalid 'messages[1].tool_calls[0].function.name': string does not match pattern" (was: written
        # into the prompt, where its newline ended the name early)
        ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "move\n```json\n", "arguments": "{}"}}]}]},
         "messages.1.tool_calls.0.function.name", "should match pattern '^[a-zA-Z0-9_-]+$'"),
        # as OpenAI and vLLM: a 400, where the call was written into the prompt as it was and the model answered
        ({"messages": replayed_call("{oops"), "tools": [MOVE]}, "messages.1.tool_calls.0.function.arguments",
         "must be JSON text"),
        ({"messages": replayed_call("[" * 100_000)}, "messages.1.tool_calls.0.function.arguments", "recursion"),
        # as OpenAI: a tool result names the call it answers, one of the calls of the assistant message it follows
        ({"messages": [*replayed_call("{}")[:2], {"role": "tool", "content": "moved"}]}, "messages.2.tool_call_id",
         "needs the tool_call_id"),
        ({"messages": [*replayed_call("{}")[:2], {"role": "tool", "tool_call_id": "c2", "content": "moved"}]},
         "messages.2.tool_call_id", "'c2' answers no call: the tool message follows messages.1.tool_calls "
         "(ids: 'c1')"),
        ({"messages": [*ASK, replayed_call("{}")[2]]}, "messages.1.tool_call_id", "follows no tool call"),
        # as OpenAI: each call is answered before the next message (was: written into the prompt, answered 200)
        ({"messages": [*replayed_call("{}")[:2], *ASK]}, "messages.1.tool_calls", "answers the calls 'c1'"),
        ({"messages": replayed_call("{}")[:2]}, "messages.1.tool_calls", "must be followed by a tool message"),
        ({"messages": [*replayed_call("{}"), replayed_call("{}")[2]]}, "messages.3.tool_call_id", "each answered once"),
        # refused before tokenizing, as a long message is (the tools' prompt was tokenized whole first)
        ({"tools": [{"type": "function", "function": {"name": "f", "description": "go " * 400_000}}]}, "tools",
         "1,200,"),
    ],
)  # fmt: skip
def test_bad_tools_are_refused_naming_the_field(engine, tmp_path, fields, param, fragment):
    async def scenario(client):
        return await client.post("/v1/chat/completions", json={**GREEDY, **fields})

    error = error_of(run(create_app(engine, open_database(tmp_path / "db")), scenario), 400)
    assert error["param"] == param and fragment in error["message"], error


MOVE_ARGUMENTS = '{"steps": 2, "way": "n"}'
CALLS = f"{tool_call_text('move', MOVE_ARGUMENTS)}\n{tool_call_text('stop', '{}')}"
REPLY = f"Moving.{TOOL_CALLS_BEGIN}{CALLS}<｜tool▁calls▁end｜>"


def test_a_tool_whose_parameters_are_an_empty_schema_is_called_with_an_object_as_openai_and_vllm_take_it(
    engine, tmp_path
):
    """`"parameters": {}` (OpenAI's and vLLM's: any arguments) was refused 'must be a JSON Schema of "type":
    "object" ..., got "type": null'."""
    now = {"type": "function", "function": {"name": "now", "parameters": {}}}

    async def scenario(api):
        named = {"type": "function", "function": {"name": "now"}}
        return await api.chat.completions.create(**{**GREEDY, "max_tokens": 30}, tools=[now], tool_choice=named)

    [call] = with_openai(engine, tmp_path, scenario).choices[0].message.tool_calls
    assert call.function.name == "now" and call.function.arguments.startswith("{")


def test_results_may_answer_their_calls_in_any_order():
    calls = [{"id": name, "function": {"name": "move", "arguments": "{}"}} for name in ("c1", "c2")]
    results = [{"role": "tool", "tool_call_id": name, "content": "moved"} for name in ("c2", "c1")]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}, *results]
    refuse_unanswered_results(ChatCompletionRequest.model_validate({**GREEDY, "messages": messages}).messages)


def test_a_replayed_call_without_arguments_is_read_as_an_empty_object_as_vllm_reads_it():
    request = ChatCompletionRequest.model_validate({**GREEDY, "messages": replayed_call("")})
    assert request.messages[1].template()["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("piece", [1, 2, 5, len(REPLY)])
def test_streamed_pieces_of_any_size_give_the_whole_replys_content_and_calls(piece):
    """A marker split across pieces is held until the next tells; the content never holds one."""
    parser, content, calls = ToolCallParser(), "", {}
    for start in range(0, len(REPLY), piece):
        text, deltas = parser.push(REPLY[start : start + piece], final=start + piece >= len(REPLY))
        content += text
        for delta in deltas:
            calls.setdefault(delta.index, [delta.function.name, ""])[1] += delta.function.arguments
    message, reason = message_with_calls(AssistantMessage(content=REPLY), "stop")
    assert content == message.content == "Moving." and reason == "tool_calls"
    assert [[c.function.name, c.function.arguments] for c in message.tool_calls] == list(calls.values())
    assert list(calls.values()) == [["move", MOVE_ARGUMENTS], ["stop", "{}"]]


def test_a_call_head_that_never_ends_streamed_token_by_token_is_read_in_linear_time():
    """A reply opening a call, then 4,000 pieces holding 800 <｜tool▁sep｜> and no json block: the head's pattern
    backtracked over every separator at every piece (8.5 s for 1,452 pieces, minutes for these, the event loop held);
    a thread bounds the test, so that a regression fails rather than hangs."""
    pieces = [TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN] + ["ab", "c", "xy", " z", TOOL_SEP] * 800
    parser, released = ToolCallParser(), []
    reader = threading.Thread(target=lambda: released.extend(parser.push(piece) for piece in pieces), daemon=True)
    reader.start()
    reader.join(timeout=60)  # ~50 ms; the pattern took minutes
    assert not reader.is_alive() and released == [("", [])] * len(pieces) and parser.calls == []


def test_without_parallel_tool_calls_a_reply_of_two_calls_gives_its_first_whole_and_streamed():
    """As vLLM, which drops the calls after the first: "auto" decodes free, so a model may write two."""
    message, reason = message_with_calls(AssistantMessage(content=REPLY), "stop", ToolCallParser(parallel=False))
    assert [(call.function.name, call.function.arguments) for call in message.tool_calls] == [("move", MOVE_ARGUMENTS)]
    assert (message.content, reason) == ("Moving.", "tool_calls")
    parser = ToolCallParser(parallel=False)
    deltas = [delta for token in REPLY for delta in parser.push(token)[1]]
    assert {delta.index for delta in deltas} == {0} and "".join(d.function.arguments for d in deltas) == MOVE_ARGUMENTS


def test_a_reply_cut_by_max_tokens_inside_a_call_keeps_the_call_as_far_as_it_was_written():
    """As OpenAI returns it, and as its deltas were streamed (was: the call left out, a whole reply of no call)."""
    cut = REPLY[: REPLY.index('"way"')]
    message, reason = message_with_calls(AssistantMessage(content=cut), "length")
    assert [(call.function.name, call.function.arguments) for call in message.tool_calls] == [("move", '{"steps": 2, ')]
    assert (message.content, reason) == ("Moving.", "length")
    plain, reason = message_with_calls(AssistantMessage(content="no calls <｜tool"), "stop")
    assert (plain.content, plain.tool_calls, reason) == ("no calls <｜tool", None, "stop")


def test_a_stop_string_cutting_a_later_call_gives_the_calls_before_it_and_tool_calls_whole_and_streamed():
    """As vLLM's deepseek_v3 parser reports it: the calls that ended are the reply's ("tool_calls"), the cut one is
    left out; a cut first call leaves no call to make, so "stop" (where vLLM says "tool_calls" with none)."""
    later = REPLY[: REPLY.index("{}")]
    message, reason = message_with_calls(AssistantMessage(content=later), "stop")
    assert [call.function.name for call in message.tool_calls] == ["move"] and reason == "tool_calls"
    parser = ToolCallParser()
    streamed = [parser.delta(ChatDelta(content=token), None) for token in later] + [parser.delta(ChatDelta(), "stop")]
    names = [call.function.name for delta, _ in streamed for call in delta.tool_calls or [] if call.function.name]
    assert names == ["move", "stop"] and streamed[-1][1] == "tool_calls"  # the cut call's head was sent: it stands
    first, reason = message_with_calls(AssistantMessage(content=REPLY[: REPLY.index('"way"')]), "stop")
    assert (first.content, first.tool_calls, reason) == ("Moving.", None, "stop")


NULL_FIELDS = {"type": "function", "function": {**STOP["function"], "description": None, "strict": None}}


@pytest.mark.parametrize("tools", [[MOVE], [MOVE, NULL_FIELDS]])
def test_tokenize_counts_the_tools_a_chat_lists_as_the_call_is_billed(engine, tmp_path, tools):
    """vLLM's /tokenize takes the chat's tools; without them its count was the prompt's less the tools' listing. A
    function's fields sent as null are listed as left out (tokenizer.listed_tool)."""
    body = {"model": "model", "messages": ASK, "tools": tools}

    async def scenario(client):
        counted = await client.post("/tokenize", json=body)
        billed = await client.post("/v1/chat/completions", json={**GREEDY, **body, "max_tokens": 1})
        return counted, billed

    counted, billed = run(create_app(engine, open_database(tmp_path / "db")), scenario)
    assert counted.json()["count"] == billed.json()["usage"]["prompt_tokens"]
    assert counted.json()["tokens"] == engine.tokenizer.encode_chat(ASK, tools=[MOVE, STOP][: len(tools)])


def test_a_call_leaves_special_tokens_out_of_its_arguments_so_that_it_can_be_replayed_whole_and_streamed():
    """As its content does: '{"way": "n<｜Assistant｜>"}' came back as written, and an agent replaying the call got a
    400 ("chat message 1 tool_calls[0] contains the special token '<｜Assistant｜>'")."""
    written = '{"way": "n' + ASSISTANT + '"}'
    pieces = [TOOL_CALLS_BEGIN, *tool_call_text("move", written).partition(ASSISTANT), "<｜tool▁calls▁end｜>"]
    reply = AssistantMessage(content="".join(pieces))
    message, _ = message_with_calls(reply, "stop", ToolCallParser(hidden=[ASSISTANT]))
    assert message.tool_calls[0].function.arguments == '{"way": "n"}'
    parser = ToolCallParser(hidden=[ASSISTANT])
    deltas = [delta for piece in pieces for delta in parser.push(piece)[1]]
    assert "".join(delta.function.arguments for delta in deltas) == '{"way": "n"}'


def test_with_a_reasoning_parser_a_reply_offered_tools_leaves_special_tokens_out_of_its_reasoning_too():
    """As out of its content, and as out of a reply without tools: the reasoning kept them (served by DeepSeek-R1's
    template, a reply forced onto <｜Assistant｜> by logit_bias gave reasoning_content '<｜Assistant｜><｜Assistant｜>',
    where without tools it gives ''), whole and streamed."""
    reply = AssistantMessage(content="", reasoning_content=f"North{ASSISTANT}, two.")
    message, _ = message_with_calls(reply, "stop", ToolCallParser(hidden=[ASSISTANT]))
    assert message.reasoning_content == "North, two."
    parser = ToolCallParser(hidden=[ASSISTANT])
    streamed = [parser.delta(ChatDelta(reasoning_content=piece), None)[0] for piece in ("North", ASSISTANT, ", two.")]
    assert [delta.model_dump().get("reasoning_content") for delta in streamed] == ["North", None, ", two."]
    assert streamed[1].model_dump() == {}  # nothing left: the stream skips the chunk


def test_with_a_reasoning_parser_a_forced_call_follows_the_reasoning(r1_engine):
    """DeepSeek-R1's prompt opens the reply's <think>: the calls' grammar forced a call from the first token, inside
    the reasoning. As JSON mode's JSON (and vLLM's guided decoding), the calls now follow the reasoning's </think>."""
    tokenizer, vocab = r1_engine.tokenizer, r1_engine.config.vocab_size
    request = ChatCompletionRequest.model_validate(
        {**GREEDY, "tools": [MOVE], "tool_choice": {"type": "function", "function": {"name": "move"}}}
    )
    reply = f"North, two.\n</think>\n\n{TOOL_CALLS_BEGIN}{tool_call_text('move', MOVE_ARGUMENTS)}<｜tool▁calls▁end｜>"
    constraint = forced_calls_format(request, r1_engine, "<think>\n").constraint()
    for token in tokenizer.encode(reply):
        assert constraint.allowed(vocab)[token], tokenizer.decode([token])
        constraint.accept(token)
    assert constraint.complete
    without_parser = forced_calls_format(request, r1_engine).constraint().allowed(vocab)
    assert without_parser.nonzero().flatten().tolist() == [tokenizer.backend.token_to_id(TOOL_CALLS_BEGIN)]


def test_a_chat_whose_tools_push_its_prompt_past_the_context_is_refused_naming_the_tools(tmp_path):
    """A chat whose messages fit the context but whose tools' listing pushed its prompt past it was refused naming
    `messages` ("Shorten the prompt"), where the check before tokenizing names `tools` for the same fault. It now
    names `tools` and how many of the prompt's tokens list them; a chat whose messages alone are too long still names
    `messages`."""
    engine = Engine.from_pretrained(make_model_dir(tmp_path / "model", max_position_embeddings=2048), num_blocks=5)
    long_ask = [{"role": "user", "content": "north " * 80}]
    tokenizer = engine.tokenizer

    async def scenario(client):
        return [
            await client.post("/v1/chat/completions", json={**GREEDY, "messages": messages, "tools": [MOVE]})
            for messages in (ASK, long_ask)
        ]

    with_tools, too_long = (
        error_of(answer, 400) for answer in run(create_app(engine, open_database(tmp_path / "db")), scenario)
    )
    prompt = len(tokenizer.encode_chat(ASK, tools=[MOVE]))
    listing = prompt - len(tokenizer.encode_chat(ASK))
    assert listing > 0 and prompt - listing < engine.context_len < prompt
    assert (with_tools["param"], with_tools["code"], with_tools["message"]) == (
        "tools",
        "context_length_exceeded",
        f"this model's maximum context length is 2048 tokens, of which the server's cache holds {engine.context_len} "
        f"for one request; the request needs {prompt} in the prompt ({listing} of them listing the tools) + 60 for "
        "the completion. Shorten the prompt.",
    )
    assert (too_long["param"], too_long["code"]) == ("messages", "context_length_exceeded")
