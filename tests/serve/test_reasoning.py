"""`seekstack serve --reasoning-parser deepseek_r1`: an R1 reply `<think> reasoning </think> answer` answers with
message.reasoning_content and message.content (streamed: delta.reasoning_content, then delta.content), as DeepSeek's
API and vLLM's parser; usage counts the reasoning tokens. Without the parser, and for /v1/completions, the text is
as generated. In process: the `openai` client over the app's ASGI interface, the engine's replies scripted token by
token (a random model writes no <think>)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx
import openai
import pytest

from seekstack.infer.engine import Engine
from seekstack.infer.outputs import RequestOutput
from seekstack.serve.app import create_app
from seekstack.serve.bridge import Closed
from seekstack.serve.database import open_database
from seekstack.serve.launch import ServeOptions, build_server
from seekstack.serve.protocol import prompt_ids
from seekstack.serve.reasoning import ReasoningSplit, given_start
from seekstack.serve.schemas import ChatCompletionRequest
from seekstack.tokenizer import TOOL_OUTPUTS_END, Tokenizer
from tests.interop.release import r1_tokenizer
from tests.serve.server import make_model_dir, serving

REPLY = "<think> 2 + 3 is 5 </think> 5"
CHAT = dict(model="model", messages=[{"role": "user", "content": "2 + 3?"}], max_tokens=50)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine.from_pretrained(make_model_dir(tmp_path_factory.mktemp("reasoning")))


@dataclass
class ScriptedGroup:
    """A request group whose one choice generates `pieces`, one token each, then finishes with `finish_reason`."""

    pieces: list[str]
    finish_reason: str
    request_ids = ["scripted"]

    async def __aiter__(self):
        for number, piece in enumerate(self.pieces, 1):
            last = number == len(self.pieces)
            yield 0, RequestOutput("scripted", [0], piece, None, last, self.finish_reason if last else None, 1, number,
                                   0.0)  # fmt: skip

    async def close(self) -> Closed:
        return Closed()

    def stop(self, index: int) -> None:
        pass


def token_pieces(engine: Engine, text: str) -> list[str]:
    """`text` as the model would generate it: one piece per token of its encoding."""
    return [engine.tokenizer.decode([token]) for token in engine.tokenizer.encode(text)]


def with_openai(
    engine: Engine,
    tmp_path,
    pieces: list[str],
    finish_reason: str,
    scenario,
    submitted: list | None = None,
    **app_options,
) -> object:
    """`scenario(api)` with an `openai.AsyncOpenAI` client of a fresh app on `engine` whose every request generates
    `pieces`; each request's engine parameters (one SamplingParams per choice) are added to `submitted`."""
    app = create_app(engine, open_database(tmp_path / "db"), **app_options)

    async def scripted(requests, choices, adapter, constraints) -> ScriptedGroup:
        if submitted is not None:
            submitted.append(choices)
        return ScriptedGroup(pieces, finish_reason)

    app.state.server.bridge.submit = scripted

    async def main():
        async with serving(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000")
            api = openai.AsyncOpenAI(base_url="http://localhost:8000/v1", api_key="open", http_client=http,
                                     max_retries=0, timeout=60)  # fmt: skip
            return await scenario(api)

    return asyncio.run(main())


async def whole_and_streamed(api: openai.AsyncOpenAI) -> tuple[dict, list[dict]]:
    """The reply in one piece, and the streamed chunks' choices and usage."""
    whole = (await api.chat.completions.create(**CHAT)).model_dump()
    stream = await api.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    return whole, [chunk.model_dump() async for chunk in stream]


@pytest.mark.parametrize(
    "pieces",
    [[REPLY], list(REPLY), ["<th", "ink> 2 + 3 is 5 </", "think", "> 5"], ["<think> 2 + 3 is 5 <", "/think> ", "5"]],
    ids=["whole", "by-character", "tags-split", "close-split-at-its-first-character"],
)
def test_reasoning_splits_at_think_close_however_the_reply_is_cut_into_pieces(pieces):
    split = ReasoningSplit()
    released = [split.push(piece, final=number == len(pieces)) for number, piece in enumerate(pieces, 1)]
    assert "".join(reasoning for reasoning, _ in released) == "2 + 3 is 5"
    assert "".join(content for _, content in released) == "5"
    assert split.raw_reasoning == "<think> 2 + 3 is 5 </think>"


def test_whole_and_streamed_chat_reply_carry_reasoning_content_apart_from_content(engine, tmp_path):
    pieces = token_pieces(engine, REPLY)
    whole, chunks = with_openai(engine, tmp_path, pieces, "stop", whole_and_streamed, reasoning_parser="deepseek_r1")
    message = whole["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("2 + 3 is 5", "5")
    reasoning_tokens = len(engine.tokenizer.encode("<think> 2 + 3 is 5 </think>"))
    assert 0 < reasoning_tokens < len(pieces)
    assert whole["usage"]["completion_tokens"] == len(pieces)
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    reasoning = [delta["reasoning_content"] for delta in deltas if delta.get("reasoning_content")]
    content = [delta["content"] for delta in deltas if delta.get("content")]
    assert ("".join(reasoning), "".join(content)) == ("2 + 3 is 5", "5")
    first_content = next(i for i, delta in enumerate(deltas) if delta.get("content"))
    assert not any(delta.get("reasoning_content") for delta in deltas[first_content:])  # reasoning, then content
    assert not any("think>" in text for text in reasoning + content)
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens


def test_a_reply_cut_inside_its_reasoning_has_reasoning_content_only(engine, tmp_path):
    pieces = token_pieces(engine, "<think> 2 + 3 is")
    whole, chunks = with_openai(engine, tmp_path, pieces, "length", whole_and_streamed, reasoning_parser="deepseek_r1")
    choice = whole["choices"][0]
    assert (choice["message"]["reasoning_content"], choice["message"]["content"], choice["finish_reason"]) == (
        "2 + 3 is", "", "length",
    )  # fmt: skip
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(pieces)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("reasoning_content") or "" for delta in deltas) == "2 + 3 is"
    assert not any(delta.get("content") for delta in deltas)


def test_a_reply_without_think_is_content_as_generated_under_the_parser(engine, tmp_path):
    pieces = token_pieces(engine, "  Hello, <think world")
    whole, chunks = with_openai(engine, tmp_path, pieces, "stop", whole_and_streamed, reasoning_parser="deepseek_r1")
    assert whole["choices"][0]["message"]["content"] == "  Hello, <think world"
    assert "reasoning_content" not in whole["choices"][0]["message"]
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("content") or "" for delta in deltas) == "  Hello, <think world"


def test_without_the_parser_the_reply_and_usage_are_as_generated(engine, tmp_path):
    async def raw(api: openai.AsyncOpenAI) -> tuple[dict, list[dict]]:
        response = await api.with_raw_response.chat.completions.create(**CHAT)
        return response.http_response.json(), (await whole_and_streamed(api))[1]

    whole, chunks = with_openai(engine, tmp_path, token_pieces(engine, REPLY), "stop", raw)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert "completion_tokens_details" not in whole["usage"]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("content") or "" for delta in deltas) == REPLY
    assert not any(delta.get("reasoning_content") for delta in deltas)


def test_text_completions_stay_raw_text_under_the_parser(engine, tmp_path):
    async def completion(api: openai.AsyncOpenAI):
        return await api.completions.create(model="model", prompt="2 + 3?", max_tokens=50)

    response = with_openai(engine, tmp_path, token_pieces(engine, REPLY), "stop", completion,
                           reasoning_parser="deepseek_r1")  # fmt: skip
    assert response.choices[0].text == REPLY


def test_reasoning_content_echoed_in_a_history_is_accepted_and_left_out_of_the_prompt(engine):
    def history(**assistant_fields) -> ChatCompletionRequest:
        messages = [
            {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "5", **assistant_fields},
            {"role": "user", "content": "and 2 + 4?"},
        ]
        return ChatCompletionRequest.model_validate_json(json.dumps({"model": "model", "messages": messages}))

    echoed = history(reasoning_content="2 + 3 is 5")
    assert prompt_ids(echoed, engine.tokenizer) == prompt_ids(history(), engine.tokenizer)


def test_a_history_replaying_a_whole_reply_gets_its_answer_only_in_the_prompt(engine):
    """A client without the reasoning parser (or the chat page before it read reasoning_content) sends back the reply
    as generated, <think> block and all: it was in the prompt, unlike what the parser's content gives; DeepSeek-R1's
    chat template drops it from earlier turns."""

    def history(replayed: str) -> ChatCompletionRequest:
        messages = [
            {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": replayed},
            {"role": "user", "content": "and 2 + 4?"},
        ]
        return ChatCompletionRequest.model_validate_json(json.dumps({"model": "model", "messages": messages}))

    assert ReasoningSplit().message(REPLY).content == "5"
    assert prompt_ids(history(REPLY), engine.tokenizer) == prompt_ids(history("5"), engine.tokenizer)


def test_with_the_parser_chat_stop_strings_match_the_answer_only(engine, tmp_path):
    """Stop strings matched the reasoning too, as vLLM's V1 engine does (vllm#52393, open): a stop the reasoning
    restated ended the reply with no answer. With --reasoning-parser they match after </think>; completions and a
    server without the parser match the whole text."""

    async def chat_and_completion(api: openai.AsyncOpenAI) -> None:
        await api.chat.completions.create(**CHAT, stop=["Question:"])
        await api.completions.create(model="model", prompt="2 + 3?", max_tokens=5, stop=["Question:"])

    for parser, expected in (("deepseek_r1", ["", None]), (None, [None, None])):
        submitted: list = []
        (tmp_path / str(parser)).mkdir()
        with_openai(
            engine, tmp_path / str(parser), ["5"], "stop", chat_and_completion, submitted, reasoning_parser=parser
        )
        assert [choices[0].stop_after_reasoning for choices in submitted] == expected
        assert all(choices[0].stop == ("Question:",) for choices in submitted)


def test_a_reply_continuing_a_prefix_inside_the_reasoning_is_split_at_its_think_close(engine, tmp_path):
    """A reply continuing a prefix message that opened <think> did not open with it: the parser read it all as
    content, </think> included, and its stop strings matched the reasoning."""
    prefix = {"role": "assistant", "content": "<think> 2 +", "prefix": True}
    submitted: list = []

    async def continued(api: openai.AsyncOpenAI) -> dict:
        chat = {**CHAT, "messages": [*CHAT["messages"], prefix], "stop": ["+"]}
        return (await api.chat.completions.create(**chat)).model_dump()

    pieces = token_pieces(engine, " 3 is 5 </think> 5")
    whole = with_openai(engine, tmp_path, pieces, "stop", continued, submitted, reasoning_parser="deepseek_r1")
    message = whole["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (" 3 is 5", "5")  # continues "<think> 2 +"
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(
        engine.tokenizer.encode(" 3 is 5 </think>")
    )
    assert submitted[0][0].stop_after_reasoning == "<think> 2 +"


def test_an_unknown_reasoning_parser_is_refused_naming_the_option(tmp_path):
    options = ServeOptions(port=0, database=str(tmp_path / "db"), reasoning_parser="qwen3")
    with pytest.raises(ValueError, match="--reasoning-parser 'qwen3': the parsers are deepseek_r1"):
        build_server(tmp_path / "no-model", options)


def test_a_reply_to_tool_results_opens_no_reasoning_as_r1s_template_writes_none_there(tmp_path):
    """DeepSeek-R1's template opens the reply with <think>\\n after a user message only: after tool results the prompt
    ends with <｜tool▁outputs▁end｜>. The parser read the reply there as inside the reasoning, so its answer came back
    as reasoning_content with empty content."""
    r1_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(tmp_path)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [*CHAT["messages"], {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]  # fmt: skip
    after_tools = ChatCompletionRequest.model_validate({**CHAT, "messages": messages})
    assert tokenizer.render_chat([m.template() for m in after_tools.messages]).endswith(TOOL_OUTPUTS_END)
    assert given_start(ChatCompletionRequest.model_validate(CHAT), tokenizer) == "<think>\n"
    assert given_start(after_tools, tokenizer) == ""
    assert ReasoningSplit(given_start(after_tools, tokenizer)).message("5").content == "5"
