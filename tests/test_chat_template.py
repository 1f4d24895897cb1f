"""A checkpoint's own chat template (DeepSeek-V2-Chat's, or another release's without DeepSeek-V3's role tokens) gets
the messages as transformers' `apply_chat_template` passes them, and writes them token for token as it does."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.conversations import encode_conversation, read_conversations
from seekstack.tokenizer import EOS, REASONING_FIELDS, Tokenizer, train_tokenizer
from tests.interop.release import V2_CHAT_TEMPLATE, v2_chat_tokenizer
from tests.test_tokenizer import stdlib_texts

# a template that writes an assistant's reasoning apart, as reasoning models' templates (Qwen3's) read it
REASONING_TEMPLATE = V2_CHAT_TEMPLATE.replace(
    "{{ 'Assistant: ' + message['content'] + eos_token }}",
    "{{ 'Assistant: ' }}{% if message.reasoning_content %}{{ '[' + message.reasoning_content + '] ' }}{% endif %}"
    "{{ message['content'] + eos_token }}",
)


@pytest.fixture(scope="module")
def v2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2-chat")
    v2_chat_tokenizer(folder)
    return folder


def with_template(folder, template: str | int | list) -> None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "chat_template": template}, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("field", REASONING_FIELDS)
@pytest.mark.parametrize(("template", "answer"), [(V2_CHAT_TEMPLATE, " 5"), (REASONING_TEMPLATE, " [2 + 3 is 5] 5")])
def test_an_assistants_reasoning_apart_is_written_as_the_checkpoints_template_writes_it(
    v2_folder, tmp_path, field, template, answer
):
    """DeepSeek-V2-Chat's template reads no reasoning: transformers writes "Assistant: 5" of a last reply with its
    reasoning apart, where seekstack wrote "Assistant: <think>\\n2 + 3 is 5\\n</think>\\n\\n5" (DeepSeek-V3's R1
    format) and SFT trained it; a template that reads reasoning_content gets it under that name whichever was given."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((v2_folder / name).read_bytes())
    with_template(tmp_path, template)
    ours, theirs = Tokenizer.from_file(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5", field: "2 + 3 is 5"}]
    expected = theirs.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert ours.encode_chat(chat, add_generation_prompt=False) == expected
    assert ours.decode(expected).endswith(f"Assistant:{answer}{EOS}")
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n", encoding="utf-8")
    ids, labels = encode_conversation(ours, read_conversations(path, ours)[0])
    assert ids == expected
    assert ours.decode([token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]) == (
        f"{answer}{EOS}"
    )


def test_an_earlier_turns_think_block_is_written_as_the_checkpoints_template_writes_it(v2_folder):
    """DeepSeek-V2-Chat's template writes each reply's content whole: seekstack cut an earlier reply's think block
    (DeepSeek-R1's template's rule) where transformers writes it."""
    ours, theirs = Tokenizer.from_file(v2_folder), AutoTokenizer.from_pretrained(v2_folder)
    chat = [
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n5"},
        {"role": "user", "content": "And 2 + 4?"},
    ]
    expected = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode_chat(chat) == expected
    assert f"Assistant: <think>\nadd\n</think>\n\n5{EOS}" in ours.decode(expected)


@pytest.mark.parametrize("template", [5, [{"name": "default", "template": ["User: {{ messages }}"]}]])
def test_a_chat_template_that_is_no_text_is_refused_naming_the_field_not_taken_for_none(v2_folder, tmp_path, template):
    """A chat_template of 5 in tokenizer_config.json was read as none: the tokenizer's chats were refused as having
    "neither <｜User｜> nor a chat_template", the model was said to be a base model."""
    folder = shutil.copytree(v2_folder, tmp_path / "v2")
    with_template(folder, template)
    with pytest.raises(ValueError) as refused:
        Tokenizer.from_file(folder)
    assert str(refused.value).startswith(
        f"{folder / 'tokenizer_config.json'}: field 'chat_template' has template "
        f"{template if template == 5 else template[0]['template']}: give its Jinja text (a string), or a list"
    )


def test_a_chat_of_no_messages_is_refused_as_transformers_refuses_it(v2_folder, tmp_path):
    """transformers' apply_chat_template refuses an empty conversation; seekstack wrote BOS and a generation prompt
    ("<｜begin▁of▁sentence｜><｜Assistant｜>", "<｜begin▁of▁sentence｜>Assistant:") for the model to answer nothing."""
    train_tokenizer(stdlib_texts(20_000), 300, tmp_path)
    for folder in (v2_folder, tmp_path):
        tokenizer = Tokenizer.from_file(folder)
        with pytest.raises(ValueError, match="empty conversation"):
            AutoTokenizer.from_pretrained(folder).apply_chat_template([], add_generation_prompt=True)
        for write in (tokenizer.render_chat, tokenizer.encode_chat, tokenizer.chat_pieces):
            with pytest.raises(ValueError, match=r"^a chat has no messages: give at least one"):
                write([])
        with pytest.raises(ValueError, match=r"^a chat has no messages"):
            tokenizer.render_chat([], add_generation_prompt=False, continue_final_message=True)


def test_tools_and_tool_turns_are_refused_by_a_template_without_tool_tokens_in_chat_pieces_and_sft_naming_the_line(
    v2_folder, tmp_path
):
    """DeepSeek-V2-Chat's template writes no tools: render_chat refused them, but chat_pieces (SFT's rows) dropped the
    tools offered and an assistant's tool calls unsaid and wrote a tool result as nothing, and `seekstack sft` refused
    a line offering tools only once every line was read, naming no line."""
    tokenizer = Tokenizer.from_file(v2_folder)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "c0", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    chat = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]
    calling = [chat[0], {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "content": "5", "tool_call_id": "c0"}, chat[1]]  # fmt: skip
    refusal = r"has no DeepSeek-V3 tool-call tokens .* or leave the tools out"
    for messages, offered in ((chat, tools), (calling, None)):
        with pytest.raises(ValueError, match=refusal):
            tokenizer.chat_pieces(messages, offered)
    assert "".join(text for text, _ in tokenizer.chat_pieces(chat)) == tokenizer.render_chat(chat, False)
    for line in ({"messages": chat, "tools": tools}, {"messages": calling}):
        path = tmp_path / "chats.jsonl"
        path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=f"^{path}:2: tokenizer .*{refusal}"):
            read_conversations(path, tokenizer)


@pytest.mark.parametrize("kind", ["deepseek-v3", "deepseek-v2-chat"])
@pytest.mark.parametrize(
    "options",
    [{}, {"add_generation_prompt": True}, {"tokenize": False}, {"tokenize": False, "add_generation_prompt": True}],
)
def test_apply_chat_template_gives_what_transformers_gives_with_its_defaults(v2_folder, tmp_path, kind, options):
    """transformers' name for encode_chat and render_chat, with its defaults: no generation prompt unless asked."""
    from tests.posttrain.support import byte_tokenizer

    folder = v2_folder if kind == "deepseek-v2-chat" else tmp_path
    if kind == "deepseek-v3":
        byte_tokenizer(folder)
    ours, theirs = Tokenizer.from_file(folder), AutoTokenizer.from_pretrained(folder)
    chat = [
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "x2?"},
    ]
    expected = theirs.apply_chat_template(
        chat, **options, **({"return_dict": False} if options.get("tokenize", True) else {})
    )
    assert ours.apply_chat_template(chat, **options) == expected
    continued = ours.apply_chat_template([*chat, {"role": "assistant", "content": "1"}], continue_final_message=True)
    assert continued == theirs.apply_chat_template(
        [*chat, {"role": "assistant", "content": "1"}], continue_final_message=True, return_dict=False
    )
