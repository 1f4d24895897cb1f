"""SFT on tool-calling conversations (TRL's `tools` column): the assistant's calls trained, tool results and the tools'
prompt masked, the tools listed as the server lists them, malformed tool turns refused naming the line."""

import json

import pytest

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.conversations import conversation_key, encode_conversation, read_conversations
from seekstack.posttrain.sft import SFTSource
from seekstack.serve.protocol import prompt_ids
from seekstack.serve.schemas import ChatCompletionRequest
from seekstack.tokenizer import EOS, TOOL_CALLS_BEGIN, TOOL_OUTPUTS_END, tool_call_text
from tests.posttrain.support import byte_tokenizer, micro_checkpoint
from tests.test_tokenizer_tools import ASK, WEATHER, call

CALLS = {"role": "assistant", "content": None, "tool_calls": [call("call_1", "Paris"), call("call_2", "Rome")]}
RESULTS = [
    {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]
ANSWER = {"role": "assistant", "content": "Paris 20C, Rome 25C."}
AGENT = [*ASK, CALLS, *RESULTS, ANSWER]


def calling(name: str) -> dict:
    """An assistant message calling the function `name`."""
    return {**CALLS, "tool_calls": [{**call("1", "x"), "function": {"name": name, "arguments": "{}"}}]}


def write_lines(path, *records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def labelled_spans(tokenizer, ids, labels) -> list[str]:
    """The texts of the runs of labelled tokens."""
    spans, current = [], []
    for token, label in [*zip(ids, labels, strict=True), (None, IGNORE_INDEX)]:
        if label == IGNORE_INDEX and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif label != IGNORE_INDEX:
            current.append(token)
    return spans


def test_tool_calls_and_the_answer_are_trained_the_results_and_tools_prompt_are_not(tmp_path):
    """A line with tool_calls, tool results and `tools` was refused ("tool messages, tool_calls and function_call are
    not supported in training data"); its row is the chat the server renders, the calls and answer labelled."""
    tokenizer = byte_tokenizer(tmp_path)
    path = write_lines(tmp_path / "agent.jsonl", {"messages": AGENT, "tools": [WEATHER]})
    conversation = read_conversations(path, tokenizer)[0]
    ids, labels = encode_conversation(tokenizer, conversation)
    assert ids == tokenizer.encode_chat(AGENT, add_generation_prompt=False, tools=[WEATHER])
    calls = TOOL_CALLS_BEGIN + "\n".join(tool_call_text("weather", json.dumps({"city": c})) for c in ("Paris", "Rome"))
    assert labelled_spans(tokenizer, ids, labels) == [calls + "<｜tool▁calls▁end｜>" + EOS, ANSWER["content"] + EOS]
    assert labels[ids.index(tokenizer.backend.token_to_id(TOOL_OUTPUTS_END))] == IGNORE_INDEX  # the answer's role


def test_the_tools_prompt_trained_on_is_the_one_the_server_writes_for_the_same_chat(tmp_path):
    """The tools as a dataset writes them (keys in another order, a null description, a key OpenAI does not define)
    are listed as the server lists a request's: the model is trained on the prompt it is served."""
    tokenizer = byte_tokenizer(tmp_path)
    function = {"parameters": WEATHER["function"]["parameters"], "name": "weather", "description": None, "x-n": 1}
    tools = [{"function": function, "type": "function"}]
    path = write_lines(tmp_path / "agent.jsonl", {"messages": AGENT, "tools": tools})
    ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": AGENT[:5], "tools": tools})
    served = prompt_ids(request, tokenizer)[0]  # the prompt the reply after the results follows
    assert ids[: len(served)] == served
    assert labels[len(served)] != IGNORE_INDEX and labels[len(served) - 1] == IGNORE_INDEX


def test_the_labels_are_transformers_assistant_tokens_mask_with_tools(tmp_path):
    """TRL's assistant_only_loss on the same conversation and tools (apply_chat_template's
    return_assistant_tokens_mask over CHAT_TEMPLATE's {% generation %} blocks) masks token for token as SFT labels."""
    transformers = pytest.importorskip("transformers")
    tokenizer = byte_tokenizer(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    second_round = [*ASK, {**CALLS, "content": "Looking.", "tool_calls": [call("call_1", "Paris")]}, RESULTS[0],
                    {"role": "assistant", "content": None, "tool_calls": [call("call_2", "Rome")], "weight": 0},
                    RESULTS[1], ANSWER]  # fmt: skip
    for messages in (AGENT, second_round, [*ASK, CALLS, *RESULTS]):
        path = write_lines(tmp_path / "agent.jsonl", {"messages": messages, "tools": [WEATHER]})
        ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
        # transformers drops keys holding None before rendering: a call's null content given as ""
        given = [{**m, "content": m["content"] or ""} for m in messages]
        rendered = auto.apply_chat_template(
            given, tools=[WEATHER], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert rendered["input_ids"] == ids
        assert rendered["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]


def test_a_conversations_tools_and_calls_are_part_of_its_key_and_its_line(tmp_path):
    """Held-out conversations are told apart by what the template encodes: other tools or calls, another one."""
    tokenizer = byte_tokenizer(tmp_path)
    other_city = [*ASK, {**CALLS, "tool_calls": [call("call_1", "Oslo"), call("call_2", "Rome")]}, *RESULTS, ANSWER]
    path = write_lines(
        tmp_path / "agent.jsonl",
        {"messages": AGENT, "tools": [WEATHER]},
        {"messages": AGENT},
        {"messages": other_city, "tools": [WEATHER]},
    )
    keys = [conversation_key(c) for c in read_conversations(path, tokenizer)]
    assert len(set(keys)) == 3


@pytest.mark.parametrize(
    ("messages", "tools", "refusal"),
    [
        (
            [
                *ASK,
                {**CALLS, "tool_calls": [{**call("1", "x"), "function": {"name": "weather", "arguments": "{city"}}]},
            ],
            [WEATHER],
            r"chat message 2 tool_calls\[0\] function.arguments is not JSON \(Expecting property name",
        ),
        (
            [*ASK, {**CALLS, "tool_calls": [{**call("1", "x"), "function": {"name": "weather", "arguments": "[1]"}}]}],
            [WEATHER],
            r"chat message 2 tool_calls\[0\] function.arguments is '\[1\]', not a JSON object",
        ),
        (
            [*ASK, RESULTS[0], ANSWER],
            [WEATHER],
            "chat message 2 tool_call_id 'call_1' answers no call: the tool message follows no tool call",
        ),
        (
            [*ASK, CALLS, *RESULTS, RESULTS[0], ANSWER],
            [],
            "chat message 5 tool_call_id 'call_1' answers no call: the "
            r"tool message follows chat message 2 tool_calls \(ids: 'call_1', 'call_2'\), each answered once",
        ),
        (
            [*ASK, CALLS, {**RESULTS[0], "tool_call_id": "call_9"}, ANSWER],
            [],
            r"chat message 3 tool_call_id 'call_9' answers no call: the tool message follows chat message 2 tool_calls",
        ),
        # as the server refuses them (and OpenAI): calls whose results do not all follow before the next turn
        (
            [*ASK, CALLS, RESULTS[0], ANSWER],
            [],
            "chat message 2 tool_calls are not all answered: no tool message answers the calls 'call_2'",
        ),
        (
            [*ASK, CALLS, {"role": "system", "content": "Be brief."}, *RESULTS, ANSWER],
            [],
            "chat message 2 tool_calls are not all answered",
        ),
        (
            [*ASK, CALLS, *RESULTS, ANSWER],
            [{**WEATHER, "function": {**WEATHER["function"], "name": "forecast"}}],
            r"chat message 2 tool_calls\[0\] calls 'weather', which is not among the line's tools \('forecast'\)",
        ),
        # a call's name held to OpenAI's function names, as the tools offered are (no tools to compare it with)
        (
            [*ASK, calling("move\n```json\n")],
            [],
            r"chat message 2 tool_calls\[0\] function.name 'move\\n```json\\n' is no function name OpenAI takes",
        ),
        ([*ASK, calling("get weather")], [], r"chat message 2 tool_calls\[0\] function.name 'get weather' is no"),
        ([*ASK, {"role": "function", "content": "20C"}, ANSWER], [], "chat message 2 has unknown role 'function'"),
        ([*ASK, ANSWER], [{"type": "function", "function": {"name": "a b"}}], "field tools.0.function.name string"),
        ([*ASK, ANSWER], {"weather": WEATHER}, "field tools input should be a valid list"),
        ([*ASK, ANSWER], [WEATHER, WEATHER], "field tools: two tools are named 'weather': a call names its function"),
        (
            [*ASK, ANSWER],
            [{**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "string"}}}],
            'field tools.0.function.parameters: must be a JSON Schema of "type": "object"',
        ),
        (
            [*ASK, ANSWER],
            [{**WEATHER, "function": {**WEATHER["function"], "description": "Weather<｜User｜>now"}}],
            "field tools contains the special token '<｜User｜>', which would forge a turn: take it out",
        ),
    ],
)
def test_malformed_tool_turns_are_refused_naming_the_line_message_and_field(tmp_path, messages, tools, refusal):
    path = write_lines(
        tmp_path / "agent.jsonl", {"messages": AGENT, "tools": [WEATHER]}, {"messages": messages, "tools": tools}
    )
    with pytest.raises(ValueError, match=rf"agent.jsonl:2: {refusal}"):
        read_conversations(path, byte_tokenizer(tmp_path))


def test_tools_given_as_json_text_are_read_as_trls_sft_trainer_reads_them(tmp_path):
    """A datasets column holds every row's tools in one type, so datasets of rows offering different tools store them
    as JSON text, which TRL's SFTTrainer parses; it was refused ('field tools input should be a valid list')."""
    tokenizer = byte_tokenizer(tmp_path)
    path = write_lines(
        tmp_path / "agent.jsonl",
        {"messages": AGENT, "tools": [WEATHER]},
        {"messages": AGENT, "tools": json.dumps([WEATHER])},
        {"messages": [*ASK, ANSWER], "tools": "null"},
    )
    listed, text, none = read_conversations(path, tokenizer)
    assert text == listed and text.tools == listed.tools == [WEATHER] and none.tools == []
    write_lines(path, {"messages": AGENT, "tools": "[{'type': 'function'}]"})
    with pytest.raises(ValueError, match=r"agent.jsonl:1: field tools is text but no JSON \(Expecting property name"):
        read_conversations(path, tokenizer)


def test_openai_legacy_functions_are_refused_not_dropped(tmp_path):
    """OpenAI's legacy function-calling data offers {"functions": [...]} beside its messages: it was dropped unread,
    the model trained to answer without the functions it was offered."""
    path = write_lines(tmp_path / "legacy.jsonl", {"messages": [*ASK, ANSWER], "functions": [WEATHER["function"]]})
    with pytest.raises(ValueError, match="legacy.jsonl:1: field functions is OpenAI's deprecated form of tools"):
        read_conversations(path, byte_tokenizer(tmp_path))


def test_a_conversation_ending_with_calls_trains_the_calls_as_openai_fine_tuning_data_does(tmp_path):
    """The calls a conversation ends with need no results (OpenAI's fine-tuning examples teach a call so), where the
    server refuses them; calls answered in part end a conversation too. Those examples leave the calling message's
    content out, which was refused ('must be a dict with 'role' and 'content''): it reads as null."""
    called = {key: value for key, value in CALLS.items() if key != "content"}
    path = write_lines(
        tmp_path / "agent.jsonl",
        {"messages": [*ASK, CALLS]},
        {"messages": [*ASK, CALLS, RESULTS[0]]},
        {"messages": [*ASK, called]},
    )
    conversations = read_conversations(path, byte_tokenizer(tmp_path))
    assert [len(conversation) for conversation in conversations] == [3, 4, 3]
    assert conversations[2] == conversations[0]


def test_a_tool_conversation_cut_by_seq_len_keeps_its_start_and_is_noted(tmp_path, capsys):
    """A row longer than seq_len loses its end, the answer after the results with it, and the start's note says so."""
    checkpoint = micro_checkpoint(tmp_path / "start", context=1024)
    tokenizer = byte_tokenizer(tmp_path / "start")
    path = write_lines(tmp_path / "agent.jsonl", *[{"messages": AGENT, "tools": [WEATHER]}] * 4)
    ids, labels = encode_conversation(tokenizer, read_conversations(path, tokenizer)[0])
    first_result = ids.index(tokenizer.backend.token_to_id("<｜tool▁outputs▁begin｜>"))
    seq_len = first_result + 3
    from seekstack.posttrain.config import SFTConfig
    from seekstack.train.config import resolve_train_config

    options = [f"init_from={checkpoint}", f"data={path}", f"seq_len={seq_len}", "eval_every=0"]
    source = SFTSource(resolve_train_config(None, options, cls=SFTConfig))
    input_ids, batch_labels = source.batch(2, 0.0)
    assert input_ids.shape == (2, seq_len)
    assert input_ids[0].tolist() == ids[:seq_len] and batch_labels[0].tolist() == labels[:seq_len]
    assert "4 of 4 conversations have their last assistant turn cut by seq_len" in capsys.readouterr().err
