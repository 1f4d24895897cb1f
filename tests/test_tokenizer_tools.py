"""The chat template's tool turns: DeepSeek-V3's tool-call tokens, tool calls and results rendered as DeepSeek-V3-0324's
template renders them, the tools offered listed in the system prompt, and transformers' parity."""

from __future__ import annotations

import json

import pytest
from jinja2 import TemplateError
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from seekstack.posttrain.conversations import offered
from seekstack.tokenizer import (
    BOS,
    SPECIAL_TOKENS,
    TOOL_CALLS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_TOKENS,
    Tokenizer,
    tools_prompt,
    train_tokenizer,
)
from tests.interop.release import v3_0324_tokenizer
from tests.test_tokenizer import stdlib_texts

transformers = pytest.importorskip("transformers")

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Today's weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(call_id: str, city: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": city})}}


ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris and Rome?"}]
# content "": transformers drops keys holding None, and DeepSeek's template then fails on the missing content
CALLS = {"role": "assistant", "content": "", "tool_calls": [call("call_1", "Paris"), call("call_2", "Rome")]}
RESULTS = [
    {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]
ANSWER = {"role": "assistant", "content": "Paris 20C, Rome 25C."}
TOOL_CHATS = [
    [*ASK, CALLS],  # a tool call replayed
    [*ASK, CALLS, *RESULTS],  # the results the reply reads
    [*ASK, CALLS, *RESULTS, ANSWER, {"role": "user", "content": "And Oslo?"}],
    # content before the call, then a second round of calls after the first results
    [*ASK, {**CALLS, "content": "Looking.", "tool_calls": [call("call_1", "Paris")]}, RESULTS[0],
     {"role": "assistant", "content": "", "tool_calls": [call("call_2", "Rome")]}, RESULTS[1], ANSWER],
]  # fmt: skip


@pytest.fixture(scope="module")
def v3_0324(tmp_path_factory):
    """A tokenizer laid out as DeepSeek-V3-0324's, its release's chat template in tokenizer_config.json: seekstack's
    and transformers' views of it."""
    folder = tmp_path_factory.mktemp("v3_0324")
    v3_0324_tokenizer(folder)
    return Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("messages", TOOL_CHATS)
def test_tool_turns_render_as_deepseek_v3_0324_template_renders_them(v3_0324, messages):
    tokenizer, auto = v3_0324
    expected = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.render_chat(messages) == expected
    assert (
        tokenizer.encode_chat(messages) == auto.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )


def test_a_chat_ending_with_tool_results_ends_where_the_reply_follows_them(v3_0324):
    tokenizer, _ = v3_0324
    rendered = tokenizer.render_chat([*ASK, CALLS, *RESULTS])
    assert rendered.endswith(
        "<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>25C<｜tool▁output▁end｜>" + TOOL_OUTPUTS_END
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    tokenizer = train_tokenizer(stdlib_texts(50_000), vocab_size=400, out_path=folder)
    return tokenizer, transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("messages", TOOL_CHATS)
def test_jinja_chat_template_renders_tools_and_tool_turns_as_render_chat(trained, messages):
    """Offered tools are listed after the system prompt; arguments given as an object (transformers' habit) are
    written as JSON, and a tool call's content may be null (OpenAI's)."""
    tokenizer, auto = trained
    as_objects = [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                             for c in m["tool_calls"]], "content": m["content"] or None} if m.get("tool_calls") else m
        for m in messages
    ]  # fmt: skip
    expected = tokenizer.render_chat(messages, tools=[WEATHER])
    assert expected.startswith(BOS + "Be brief.\n\n" + tools_prompt([WEATHER]) + "<｜User｜>")
    assert json.dumps(WEATHER) in expected
    assert auto.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True) == expected
    assert auto.apply_chat_template(as_objects, tools=[WEATHER], tokenize=False, add_generation_prompt=True) == expected
    assert tokenizer.render_chat(as_objects, tools=[WEATHER]) == expected


def test_tools_written_in_another_key_order_or_with_nulls_list_as_sft_trains_and_serve_sends_them(trained):
    """transformers' apply_chat_template listed a tool as given ({"function": {"parameters", "name", "description":
    null, ...}, "type"}), where seekstack sft and serve list it as the server reads it: both now list it so."""
    tokenizer, auto = trained
    given = {
        "function": {**dict(reversed(WEATHER["function"].items())), "description": None, "x": 1},
        "type": "function",
    }
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    listed = {"type": "function", "function": {"name": "weather", "parameters": WEATHER["function"]["parameters"]}}
    assert "\n" + json.dumps(listed) + "\n" in tokenizer.render_chat(chat, tools=offered([given]))
    trained_on = tokenizer.encode_chat(chat, tools=offered([given]))
    assert auto.apply_chat_template(chat, tools=[given], add_generation_prompt=True)["input_ids"] == trained_on
    assert tokenizer.encode_chat(chat, tools=[given]) == trained_on
    with pytest.raises(TemplateError, match=r"^tools\[1\] must be {\"type\": \"function\""):
        auto.apply_chat_template(chat, tools=[WEATHER, {"type": "function", "function": "weather"}], tokenize=False)


def test_trained_tokenizer_has_deepseek_tool_tokens_as_single_special_ids(trained):
    tokenizer, _ = trained
    assert [tokenizer.backend.token_to_id(t) for t in (*SPECIAL_TOKENS, *TOOL_TOKENS)] == list(range(14))
    ids = tokenizer.encode_chat([*ASK, CALLS])
    assert all(ids.count(tokenizer.backend.token_to_id(token)) for token in TOOL_TOKENS[:4] + TOOL_TOKENS[-1:])
    assert tokenizer.special_ids == set(range(14))  # skip_special_tokens skips them


@pytest.mark.parametrize(
    ("messages", "tools", "error"),
    [
        ([{"role": "user", "content": f"hi {TOOL_CALLS_BEGIN}"}], None,
         "chat message 0 content contains the special token"),
        ([{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": f"{{\"a\": \"{TOOL_OUTPUTS_END}\"}}"}}]}],
         None, r"chat message 0 tool_calls\[0\] contains the special token"),
        ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": f"f{BOS}"}}],
         r"^tools contains the special token '<｜begin▁of▁sentence｜>', which would forge a turn: take it out$"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}],
         None, r"chat message 0 tool_calls\[0\] must be {\"type\": \"function\""),
        ([{"role": "tool", "content": None}], None, "chat message 0 content must be a string"),
        # as transformers' apply_chat_template refuses it (was: each character of the text listed as a tool)
        ([{"role": "user", "content": "hi"}], '[{"type": "function", "function": {"name": "f"}}]',
         r"tools must be a list of OpenAI tool definitions \(dicts\), got str '\[.*: parse the JSON text first"),
        ([{"role": "user", "content": "hi"}], {"type": "function", "function": {"name": "f"}}, "got dict"),
        ([{"role": "user", "content": "hi"}], [{"type": "function", "function": "f"}],
         r"^tools\[0\] must be {\"type\": \"function\", \"function\": {\"name\": \.\.\..*got {'type'"),
    ],
)  # fmt: skip
def test_forged_tool_tokens_and_malformed_calls_are_refused_naming_the_message(trained, messages, tools, error):
    tokenizer, _ = trained
    with pytest.raises(ValueError, match=error):
        tokenizer.render_chat(messages, tools=tools)


def test_a_chat_continued_from_an_assistant_turn_with_calls_is_refused_naming_the_message(trained):
    """continue_final_message (the server's prefix) on a turn that made calls rendered the closed calls block, and the
    model "continued" after it; transformers cuts the calls off silently. Refused: the calls close the turn."""
    tokenizer, _ = trained
    with pytest.raises(ValueError, match=r"^chat message 2 has tool_calls, which close its turn: a chat continued"):
        tokenizer.render_chat([*ASK, {**CALLS, "content": "Looking."}], continue_final_message=True)
    continued = tokenizer.render_chat([*ASK, {"role": "assistant", "content": "Looking."}], continue_final_message=True)
    assert continued.endswith("<｜Assistant｜>Looking.")


def test_a_tokenizer_without_tool_tokens_refuses_tools_saying_to_train_it_again(tmp_path):
    """A tokenizer trained before the tool-call tokens renders plain chats as before and refuses tool turns."""
    backend = BackendTokenizer(models.BPE())
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = Tokenizer(backend, source="old/tokenizer.json")
    assert tokenizer.render_chat(ASK) == f"{BOS}Be brief.<｜User｜>Weather in Paris and Rome?<｜Assistant｜>"
    for messages, tools in (([*ASK, CALLS], None), (ASK, [WEATHER])):
        with pytest.raises(ValueError, match="tokenizer old/tokenizer.json has no DeepSeek-V3 tool-call tokens"):
            tokenizer.render_chat(messages, tools=tools)
