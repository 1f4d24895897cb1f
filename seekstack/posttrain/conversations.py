"""Chat conversations as training rows: the DeepSeek chat template, loss on the assistant's tokens only.

A conversation is a list of OpenAI-style messages (`{"role": ..., "content": ...}`), and the tools it offers. Its row
is `Tokenizer.encode_chat(messages, tools=...)`; the labels equal the ids on every assistant token (its content, its
tool calls and the EOS that ends the turn) and are IGNORE_INDEX (-100) elsewhere: BOS, system prompt, the tools'
prompt, user turns, tool results, role tokens, padding, and the assistant turns of `"weight": 0` (OpenAI
fine-tuning's: in the row as context, not trained on).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch

from seekstack.atomic import write_atomic
from seekstack.jsonl import jsonl_records
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.config import held_out_count, held_out_fraction
from seekstack.posttrain.rewards import R1_SYSTEM_PROMPT, r1_completion
from seekstack.posttrain.tasks import Problem, Split, Task, sample_problems
from seekstack.tokenizer import Tokenizer, drop_past_reasoning, is_trained, with_reasoning
from seekstack.tokenizer import template_message as chat_template_message
from seekstack.tokens.token_bytes import scored_text_bytes, token_byte_lengths


class Conversation(list):
    """A conversation's chat messages (a list of them, as the chat template takes them) and the `tools` its line
    offers (OpenAI's function definitions as the server reads them, TRL's `tools` column; [] for none)."""

    def __init__(self, messages: Iterable[dict] = (), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools or []


class TextCompletion(Conversation):
    """TRL's standard prompt-completion (`{"prompt": TEXT, "completion": TEXT}`), which `lora train` reads: a user and
    an assistant message holding its texts (its key, its hold-out), encoded with no chat template, as TRL's
    SFTTrainer tokenizes it where tokens don't merge across the boundary (`encode_conversation` encodes the two
    apart; TRL encodes the prompt and prompt + completion, and trains from their common prefix)."""


def offered_tools(conversation: list[dict]) -> list[dict]:
    """The tools a conversation offers: a `Conversation`'s, none for a plain list of messages."""
    return conversation.tools if isinstance(conversation, Conversation) else []


HELD_OUT_FILE = "held_out.json"  # in an SFT run's out_dir: the conversation_keys of the conversations it holds out


def encode_conversation(tokenizer: Tokenizer, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: the ids `Tokenizer.encode_chat` gives of its messages and `offered_tools`,
    the labels the ids on the tokens of assistant turns not of weight 0 (their content, tool calls and EOS:
    `Tokenizer.chat_pieces`) and IGNORE_INDEX elsewhere (system and user turns, the tools' prompt, tool results, role
    tokens). One encoding per piece (encoding every prefix of the conversation took 25 s for one of 200 turns). A
    `TextCompletion` is its prompt framed as transformers' `tokenizer(prompt)` frames it (BOS first where the
    tokenizer puts one), then its completion and the EOS TRL adds (unless the completion ends with it), the completion
    and EOS alone labelled (TRL's completion_only_loss); prompt and completion are encoded apart, as generation reads
    the prompt."""
    if isinstance(conversation, TextCompletion):
        prompt = tokenizer.encode_prompt(conversation[0]["content"])
        completion = tokenizer.encode(conversation[1]["content"])
        completion += [] if completion[-1:] == [tokenizer.eos_id] else [tokenizer.eos_id]
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    tools = offered_tools(conversation)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in tokenizer.chat_pieces(conversation, tools):
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if ids != tokenizer.encode_chat(conversation, add_generation_prompt=False, tools=tools):
        raise ValueError(
            f"tokenizer {tokenizer.source} encodes a conversation's turns one by one otherwise than together: it "
            "merges across its role tokens, so the assistant's tokens cannot be told apart"
        )
    return ids, labels


def labelled_text_bytes(tokenizer: Tokenizer, labels: list[int], length: int) -> int:
    """UTF-8 bytes of the text a row's labelled targets spell, the row cut to `length` (its first label is no target:
    nothing predicts it; special tokens such as the EOS count none), counted per token as pretraining's bits per byte
    counts them (tokens/token_bytes.py)."""
    return int(scored_text_bytes(token_byte_lengths(tokenizer), torch.tensor(labels[:length], dtype=torch.int64)))


def conversation_key(conversation: list[dict]) -> str:
    """A fingerprint of what the chat template encodes of a conversation (its system prompts, which it puts first,
    then its turns' roles, contents and tool calls, an assistant's reasoning in its content as DeepSeek-V3's template
    writes it, an earlier turn's dropped, and the tools it offers): equal for every copy of it, whatever other keys a
    copy's messages carry, and whatever template it was read for (a checkpoint's own gets the reasoning apart)."""
    folded = [with_reasoning(p, m) if m["role"] == "assistant" else m for p, m in enumerate(conversation)]
    messages = drop_past_reasoning(folded)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [(m["role"], m["content"], *_called(m)) for m in messages if m["role"] != "system"]
    tools = offered_tools(conversation)
    keyed = [system, turns, tools] if tools else [system, turns]  # the keys of conversations without tools as before
    return hashlib.blake2b(json.dumps(keyed).encode(), digest_size=16).hexdigest()


def _called(message: dict) -> list[list[str]]:
    """The (name, arguments) of a templated message's tool calls, in a list of its own when it makes any."""
    calls = [[c["function"]["name"], c["function"]["arguments"]] for c in message.get("tool_calls") or []]
    return [calls] if calls else []


def hold_out(conversations: list[Conversation], fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(kept, held_out): up to `held_out_count(fraction, N)` conversations held out, every copy of each (so none is
    also trained on), chosen by their content's hash: the same ones whatever the seed or the file's order. A
    conversation with more copies than are still wanted is passed over, so a big group of copies never takes more
    than the fraction."""
    keys = [conversation_key(c) for c in conversations]
    copies, wanted = Counter(keys), held_out_count(fraction, len(conversations))
    held: set[str] = set()
    for key in sorted(copies):
        if copies[key] <= wanted:
            held.add(key)
            wanted -= copies[key]
    kept = [c for c, key in zip(conversations, keys, strict=True) if key not in held]
    return kept, [c for c, key in zip(conversations, keys, strict=True) if key in held]


def write_held_out(out_dir: str | Path, held_out: list[Conversation]) -> Path:
    """Record in `out_dir` which conversations a run holds out (their `conversation_key`s), so that `seekstack report`
    reads the run's own choice rather than redoing it by rules a later seekstack may change."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    keys = sorted({conversation_key(c) for c in held_out})
    return write_atomic(Path(out_dir) / HELD_OUT_FILE, json.dumps({"conversation_keys": keys}))


def read_held_out(run_dir: str | Path) -> set[str] | None:
    """The conversation_keys `write_held_out` recorded for a run; None when it recorded none (a run started by a
    seekstack before the record, whose choice of held-out conversations may differ from this one's). A ValueError
    naming the file when it is damaged."""
    path = Path(run_dir) / HELD_OUT_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        recorded = None
    keys = recorded.get("conversation_keys") if isinstance(recorded, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ValueError(
            f'{path}: damaged, not the {{"conversation_keys": [...]}} an SFT run records of the conversations it '
            "holds out: delete it (resuming the run records them again)"
        )
    return set(keys)


def read_conversations(
    path: str | Path, tokenizer: Tokenizer | None = None, text_completions: bool = False
) -> list[Conversation]:
    """The conversations of a JSONL file, one a line (`record_conversation`), their messages in the chat template's
    terms (`template_message`); with `tokenizer`, content holding one of its special tokens is refused too; with
    `text_completions`, TRL's standard prompt-completion lines are read too (`TextCompletion`), their prompt and
    completion checked for special tokens as content is (`text_completion`). Errors name the file and line."""
    conversations = []
    for number, record in jsonl_records(path):
        try:
            completion = text_completions and is_text_completion(record)
            read = text_completion(record, tokenizer) if completion else record_conversation(record, tokenizer)
            conversations.append(read)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def held_out_conversations(
    run_dir: str | Path, data: str | Path, train_config: dict[str, Any]
) -> list[Conversation] | None:
    """The conversations an `sft`, `distill` or `lora train` run on the conversations file `data` held out for
    val_loss, never trained on: its `val_data` file's ([] when that file is gone), else those of `data` its out_dir
    records it kept back ([] when it holds none out, or is from before held-out conversations); None when it held some
    back but recorded not which (started by an earlier seekstack). The run's paths are relative to it."""
    run_dir = Path(run_dir)
    if train_config.get("val_data"):
        val_data = run_dir / train_config["val_data"]
        return read_conversations(val_data) if val_data.is_file() else []
    recorded = read_held_out(run_dir)
    if recorded is not None:
        return [c for c in read_conversations(data, text_completions=True) if conversation_key(c) in recorded]
    if "val_fraction" not in train_config:
        return []
    fraction = held_out_fraction("", train_config["val_fraction"], train_config.get("eval_every", 0))
    return None if fraction else []


def is_conversation_record(record: object) -> bool:
    """Whether a JSONL record is a conversation: OpenAI's `{"messages": [...]}`, TRL's conversational
    prompt-completion `{"prompt": [...], "completion": [...]}`, or TRL's from/value conversations (`is_from_value`)."""
    if not isinstance(record, dict):
        return False
    return (
        isinstance(record.get("messages"), list)
        or all(isinstance(record.get(key), list) for key in ("prompt", "completion"))
        or is_from_value(record)
    )


def is_text_completion(record: object) -> bool:
    """Whether a JSONL record is TRL's standard prompt-completion: a `prompt` and a `completion` of text."""
    return isinstance(record, dict) and all(isinstance(record.get(key), str) for key in ("prompt", "completion"))


def text_completion(record: dict, tokenizer: Tokenizer | None = None) -> TextCompletion:
    """The `TextCompletion` of TRL's standard prompt-completion line (`refuse_preference_label`); with `tokenizer`,
    a ValueError naming the field when the prompt, or the completion but for one EOS ending it (TRL's own, which
    `encode_conversation` does not add again), holds one of its special tokens, which it would encode as that token
    (a forged turn, an EOS trained mid-completion), as a conversation's content is refused for them."""
    refuse_preference_label(record)
    if tokenizer:
        tokenizer.refuse_forged_turn(record["prompt"], "field prompt")
        completion = record["completion"].removesuffix(tokenizer.eos_token)
        tokenizer.refuse_forged_turn(completion, "field completion, but for one EOS ending it (TRL's own),")
    return TextCompletion(
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    )


def refuse_preference_label(record: dict) -> None:
    """ValueError for a prompt-completion line with a `label` of true or false: TRL's unpaired preference format
    (KTO's), whose completions of label false are not to be learned, where SFT (TRL's SFTTrainer too, which drops the
    column) would train every completion alike. A label of another kind (a category, "math") is left unread, as TRL's
    SFTTrainer drops it."""
    if isinstance(record.get("label"), bool):
        raise ValueError(
            f'"label": {json.dumps(record["label"])} beside "prompt" and "completion" is TRL\'s unpaired preference '
            "format (KTO's), whose completions of label false are not to be learned, and SFT trains every completion: "
            "keep the lines of label true without the field (jq -c 'select(.label) | del(.label)')"
        )


def is_from_value(record: dict) -> bool:
    """Whether a record is a conversation in the from/value format TRL's SFTTrainer reads (`{"conversations":
    [{"from": "user", "value": ...}, ...]}`), told as TRL's is_conversational_from_value tells it: by its first
    message."""
    conversations = record.get("conversations")
    first = conversations[0] if isinstance(conversations, list) and conversations else None
    return isinstance(first, dict) and "from" in first and "value" in first


def chatml(message: object) -> object:
    """A from/value message as OpenAI's (ChatML): `from` read as its `role` and `value` as its `content`, as TRL's
    maybe_convert_to_chatml renames them (the roles as they are)."""
    if not isinstance(message, dict):
        return message
    renamed = {"from": "role", "value": "content"}
    return {renamed.get(key, key): value for key, value in message.items()}


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's from/value roles, which TRL keeps as they are


def refuse_sharegpt_roles(messages: list) -> None:
    """ValueError naming the first from/value message whose `from` is ShareGPT's human or gpt: TRL keeps such roles
    as they are, which DeepSeek-V3's chat template writes no turn for (TRL would train on neither), so the file is
    to say user and assistant."""
    for position, message in enumerate(messages):
        role = message.get("from") if isinstance(message, dict) else None
        if role in SHAREGPT_ROLES:
            raise ValueError(
                f"chat message {position} is from {role!r}, ShareGPT's name of {SHAREGPT_ROLES[role]!r}: TRL reads "
                "from/value roles as they are, and the chat template has no turn for human or gpt; write "
                '"from": "user" and "from": "assistant" (e.g. jq -c \'.conversations[].from |= '
                '({"human": "user", "gpt": "assistant"}[.] // .)\')'
            )


def record_conversation(record: object, tokenizer: Tokenizer | None = None) -> Conversation:
    """The templated messages of one JSONL record (`is_conversation_record`) and the tools it offers (its `tools`, a
    list or its JSON text: `column_tools`, `offered`). TRL's prompt-completion is its prompt's messages then its
    completion's, every message of the completion the assistant's (or a tool result) and the prompt's assistant
    messages context of weight 0 (TRL's completion_only_loss trains the completion alone). ValueError for a record of
    another shape, naming it and what to write instead, holding both forms (TRL would train its prompt and completion,
    not its messages), with no trained assistant message, or with tool turns that do not follow (`check_tool_turns`)
    or, with `tokenizer`, that it has no tokens to write (`Tokenizer.check_tool_use`)."""
    if not is_conversation_record(record):
        raise ValueError(_not_a_conversation(record))
    record = cast(dict, record)
    if record.get("functions") is not None:  # else dropped unread, the model trained without the functions offered
        raise ValueError(
            "field functions is OpenAI's deprecated form of tools (its legacy function-calling data): give them as "
            '"tools": [{"type": "function", "function": FUNCTION}, ...], and each call as tool_calls'
        )
    if record.get("messages") is not None and any(record.get(key) is not None for key in ("prompt", "completion")):
        raise ValueError(  # TRL's SFTTrainer trains a line's prompt and completion where it has them, not its messages
            'the line holds "messages" and TRL\'s "prompt"/"completion" too, which TRL\'s SFTTrainer reads in place '
            "of its messages: keep one of the two forms"
        )
    if is_from_value(record):
        refuse_sharegpt_roles(record["conversations"])
        record = {**record, "messages": [chatml(message) for message in record["conversations"]]}
    messages = record["messages"] if isinstance(record.get("messages"), list) else record["prompt"]
    templated = [template_message(position, message, tokenizer) for position, message in enumerate(messages)]
    if messages is record.get("prompt"):
        refuse_preference_label(record)
        if not record["completion"]:
            raise ValueError('"completion" holds no message: the conversation trains nothing')
        templated = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in templated]
        for position, message in enumerate(record["completion"], start=len(templated)):
            templated.append(template_message(position, message, tokenizer))
            if templated[-1]["role"] not in ("assistant", "tool"):
                raise ValueError(
                    f"chat message {position} (of the completion) has role {templated[-1]['role']!r}: a completion "
                    "is the assistant's reply (and the results of its tool calls), which is what is trained; move the "
                    "message into the prompt"
                )
    if not any(m["role"] == "assistant" for m in templated):
        raise ValueError('expected {"messages": [...]} with an assistant message')
    if not any(is_trained(m) for m in templated):
        raise ValueError(
            "every assistant message has weight 0, so the conversation trains nothing; give one weight 1 or leave "
            "the conversation out"
        )
    tools = offered(column_tools(record.get("tools")), tokenizer)
    if tokenizer:  # here, where the error names the line: the tokenizer may have no tokens to write them with
        tokenizer.check_tool_use(templated, tools)
    check_tool_turns(templated, tools)
    return Conversation(templated, tools)


def column_tools(tools: object) -> object:
    """A record's `tools` as given, or parsed where it is JSON text: a datasets column holds every row's tools in one
    type, so a dataset of rows offering different tools stores them as text, which TRL's SFTTrainer parses
    (json.loads) before listing them. ValueError naming the field when the text is no JSON."""
    if not isinstance(tools, str):
        return tools
    try:
        return json.loads(tools)
    except ValueError as error:
        raise ValueError(
            f"field tools is text but no JSON ({error}): {tools[:80]!r}; give the tools as a list of OpenAI's "
            "function definitions or as its JSON text"
        ) from None


def offered(tools: object, tokenizer: Tokenizer | None = None) -> list[dict]:
    """A record's `tools` (null or absent: none) as the server reads a request's (`seekstack.serve.schemas.Tools`, whose
    dump the chat template lists: keys in its order, null and unknown keys left out), so a model is trained on the
    tools' prompt it is served. ValueError naming the field and value at fault (two tools of one name among them, as
    the server refuses), and, with `tokenizer`, tools holding one of its special tokens."""
    if tools is None:
        return []
    from pydantic import TypeAdapter, ValidationError

    from seekstack.serve.schemas import Tools

    try:
        read = TypeAdapter(Tools).validate_python(tools)
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in ("tools", *problem["loc"]))
        if problem["type"] == "value_error":  # a check of the server's, whose message names the value and the mend
            raise ValueError(f"field {field}: {problem['ctx']['error']}") from None
        raise ValueError(
            f"field {field} {problem['msg'][0].lower()}{problem['msg'][1:]}, got {str(problem['input'])[:80]!r}: "
            'tools are OpenAI\'s [{"type": "function", "function": {"name": ..., "description": ..., "parameters": '
            '{"type": "object", ...}}}, ...]'
        ) from None
    dumped = [tool.model_dump(exclude_none=True) for tool in read]
    if tokenizer:
        tokenizer.refuse_forged_turn(json.dumps(dumped, ensure_ascii=False), "field tools")
    return dumped


def check_tool_turns(messages: list[dict], tools: list[dict]) -> None:
    """ValueError naming the message and what to mend unless every tool call's arguments are a JSON object (what a
    tool-call parser reads back) and name a function among `tools` (where any are offered), and the calls and their
    results follow as the server takes them (`check_tool_turn_order`: each result answers a call of the assistant turn
    before its run of results, and each call is answered before the next turn; the calls a conversation ends with may
    go unanswered, which trains the call alone)."""
    from seekstack.serve.tool_calls import check_tool_turn_order

    names = [tool["function"]["name"] for tool in tools]
    for position, message in enumerate(messages):
        for index, call in enumerate(message.get("tool_calls") or []):
            check_call(position, index, call["function"], names)
    check_tool_turn_order(messages, lambda position, field: f"chat message {position} {field}", open_end=True)


def check_call(position: int, index: int, function: dict, names: list[str]) -> None:
    """ValueError naming the call unless its name is a function's as OpenAI takes one (FUNCTION_NAME, which the tools
    offered are held to), its arguments are a JSON object's text and, where tools are offered (`names`), it calls one
    of them."""
    from seekstack.serve.schemas import FUNCTION_NAME

    where = f"chat message {position} tool_calls[{index}]"
    if not re.fullmatch(FUNCTION_NAME, function["name"]):
        raise ValueError(
            f"{where} function.name {function['name'][:80]!r} is no function name OpenAI takes ({FUNCTION_NAME}: "
            "letters, digits, _ and -, at most 64, as the tools offered are held to; a newline would end the name in "
            "the call's format): mend the name"
        )
    try:
        arguments = json.loads(function["arguments"])
    except ValueError as error:
        raise ValueError(
            f"{where} function.arguments is not JSON ({error}): {function['arguments'][:80]!r}; a call's arguments "
            "are a JSON object, which the tool-call parser reads back"
        ) from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where} function.arguments is {function['arguments'][:80]!r}, not a JSON object")
    if names and function["name"] not in names:
        offered_names = ", ".join(repr(name) for name in names)
        raise ValueError(
            f"{where} calls {function['name']!r}, which is not among the line's tools ({offered_names}): add it to "
            "tools or mend the name"
        )


def _not_a_conversation(record: object) -> str:
    """Why a JSONL record is no conversation, and what to write instead: TRL's other dataset formats by name."""
    if not isinstance(record, dict):
        return f'expected {{"messages": [...]}}, got {type(record).__name__} {str(record)[:60]!r}'
    if is_text_completion(record):
        return (
            'a "prompt" and "completion" of text (TRL\'s standard, not conversational, format) hold no chat turns, '
            'and conversations are trained through the chat template: write the line as {"messages": [{"role": '
            '"user", "content": PROMPT}, {"role": "assistant", "content": COMPLETION}]} (or TRL\'s conversational '
            '{"prompt": [messages], "completion": [messages]})'
        )
    if record.get("messages") is not None:
        return _not_messages("messages", record["messages"], 'OpenAI\'s chat messages [{"role": ..., "content": ...}]')
    if record.get("conversations") is not None:
        return _not_messages(
            "conversations", record["conversations"], 'TRL\'s from/value messages [{"from": "user", "value": ...}]'
        )
    forms = {key: record.get(key) for key in ("prompt", "completion") if record.get(key) is not None}
    if len(forms) == 2:
        kinds = ", ".join(f"{key} is {type(value).__name__}" for key, value in forms.items())
        return (
            f'TRL\'s "prompt" and "completion" are both lists of chat messages (its conversational form) or both text '
            f"(its standard form), but here {kinds}: give both as messages"
        )
    if "text" in record:
        return (
            '"text" (TRL\'s language-modeling format) holds no assistant turn to train: write it as {"messages": '
            '[...]}, or train on the text itself with `seekstack lora train BASE FILE.jsonl`, which reads {"text"} '
            "lines"
        )
    if "role" in record:  # a line holding one message; a file of one conversation's bare messages jsonl refuses
        return (
            f"a chat message ({record['role']!r}), not a conversation: write each conversation as one object, "
            '{"messages": [its messages]}, a line each'
        )
    return (
        'expected {"messages": [...]} (or TRL\'s {"prompt": [...], "completion": [...]}) with an assistant message, '
        f"got the keys {sorted(record)}"
    )


def _not_messages(field: str, given: object, form: str) -> str:
    """Why a record's `field`, given, holds no conversation: it is no list of `form`, an empty one, or its first
    message is not one."""
    if not isinstance(given, list):
        return f"field {field} must be a list of {form}, got {type(given).__name__} {str(given)[:60]!r}"
    if not given:
        return f"field {field} holds no message: a conversation is a list of {form}, with an assistant message"
    return f"field {field} must be a list of {form}; its first message is {str(given[0])[:60]!r}"


def template_message(position: int, message: object, tokenizer: Tokenizer | None = None) -> dict:
    """A file's chat message as the chat template takes it (`seekstack.tokenizer.template_message`; with `tokenizer`,
    `Tokenizer.template_message`, which refuses its special tokens too), its content whole characters and its
    weight, if an assistant message has one (null: none), `check_weight`'s (OpenAI fine-tuning gives weight a meaning
    on assistant messages only: on another role it is ignored, as the template ignores it). A null (or left-out)
    content is refused, but that of an assistant message that calls tools (as OpenAI fine-tuning data writes one) or
    gives a `refusal` (OpenAI's reply that refuses, trained as its text). An assistant's reasoning (`reasoning_content`,
    `reasoning` or `thinking`) is in its content, as DeepSeek-V3's template writes it (`with_reasoning`), and checked
    so but kept apart for a checkpoint's own template (`Tokenizer.template_message`). An assistant's
    `tool_calls` and `tool` results are read as the chat template reads them (`check_tool_turns` checks how they
    follow). ValueError naming `position`."""
    template = tokenizer.template_message if tokenizer else chat_template_message
    templated = template(position, message)
    if templated["role"] == "assistant":  # refused alike whichever template writes it: conversation_key folds it
        with_reasoning(position, templated)
    given = cast(dict, message)
    if given.get("content") is None and not (templated.get("tool_calls") or given.get("refusal")):
        if "content" not in given:
            raise ValueError(
                f"chat message {position} has no 'content' key: an assistant message leaves it out only when it "
                "calls tools (tool_calls) or refuses (refusal); give its text as a string or a list of text parts"
            )
        raise ValueError(f"chat message {position} content must be a string or a list of text parts, got null")
    check_whole_characters(position, templated["content"])
    # a null weight is none given (1): a datasets export writes one on each message that gave none
    if templated["role"] == "assistant" and templated.get("weight") is not None:
        check_weight(position, templated["weight"])
    return templated


def check_weight(position: int, weight: object) -> None:
    """ValueError naming the message unless an assistant message's `weight` is OpenAI fine-tuning's: 0 or 1."""
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(
            f"chat message {position} field 'weight' has value {weight!r}: it must be 0 (not trained on) or 1"
        )


def check_whole_characters(position: int, content: str) -> None:
    """ValueError naming the message when its content holds half of a surrogate pair (a JSON escape such as
    `\\ud83d` without its other half), which no UTF-8 text can hold and the tokenizer refuses."""
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"chat message {position} content holds {content[error.start]!r} at character {error.start}: half of a "
            "surrogate pair, a JSON escape without its other half, which is no text; mend that escape"
        ) from None


def prompt_messages(problem: Problem) -> Conversation:
    """The system and user turns that ask a task's question in the R1 format."""
    return [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]


def task_conversations(task: Task, count: int, seed: int, split: Split = "train") -> list[Conversation]:
    """`count` problems of `task` as conversations whose assistant turn is the worked trace + answer: training
    problems (repeats allowed), or up to `count` distinct held-out ones (fewer when the split has fewer)."""
    heldout = split == "heldout"
    return [
        [*prompt_messages(p), {"role": "assistant", "content": r1_completion(p.trace, p.answer)}]
        for p in sample_problems(task, count, split, seed, distinct=heldout, up_to=heldout)
    ]


def source_digest(tokenizer: Tokenizer, conversations: list[Conversation]) -> str:
    """A fingerprint of what rows are built from, the conversations as given (and the tools they offer) and the
    tokenizer, whatever the rules (the chat template, which turns are trained) that build rows of them."""
    given = [_record(c) if offered_tools(c) else c for c in conversations]  # those without tools as before
    source = json.dumps([tokenizer.fingerprint, given], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(source.encode(), digest_size=16).hexdigest()


def write_conversations(conversations: list[Conversation], path: str | Path) -> Path:
    """Write conversations as JSONL, one `{"messages": [...]}` a line, with its `"tools"` where it offers any (whole
    or not at all: an earlier file stays)."""
    return write_atomic(path, "".join(json.dumps(_record(c), ensure_ascii=False) + "\n" for c in conversations))


def _record(conversation: list[dict]) -> dict:
    """A conversation as its JSONL record: `{"messages": [...]}`, and its `"tools"` where it offers any."""
    tools = offered_tools(conversation)
    return {"messages": list(conversation), **({"tools": tools} if tools else {})}


class ShuffledRows:
    """Encoded rows drawn without replacement in a seeded order per epoch; its position is its state."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], seed: int, source: str = "", data: str = ""):
        self.rows, self.seed = rows, seed
        self.data = data  # where the conversations come from (a file, task=NAME), for the errors that name them
        # fingerprints of the rows and of what they were built from (`source_digest`): a resume on other data is
        # refused instead of training on it, and one whose rows an earlier seekstack built of the same data goes on
        self.digest = hashlib.blake2b(json.dumps(rows).encode(), digest_size=16).hexdigest()
        self.source = source
        self.epoch, self.cursor = 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[tuple[list[int], list[int]]]:
        taken = []
        for _ in range(count):
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order()
            taken.append(self.rows[self.order[self.cursor]])
            self.cursor += 1
        return taken

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "digest": self.digest,
            "source": self.source,
            "rows": len(self.rows),
        }

    def load_state_dict(self, state: dict) -> None:
        same_rows = state.get("digest", self.digest) == self.digest  # older checkpoints carry no digest
        same_source = bool(self.source) and (state.get("source"), state.get("rows")) == (self.source, len(self.rows))
        if not same_rows and not same_source:
            counted = state.get("rows", len(self.rows))  # older checkpoints carry no count
            trained = f", its checkpoint's {counted}" if counted != len(self.rows) else ""
            raise ValueError(
                f"the run's data ({self.data + ': ' if self.data else ''}{len(self.rows)} conversations{trained}) is "
                "not what its checkpoint was trained on: resume "
                "with the same data (and tokenizer), or start a new run (init_from= the checkpoint keeps its "
                "weights); a checkpoint of an earlier seekstack, which recorded no fingerprint of its data, meets "
                "this with its own data too where it built rows by other rules (before 2026-12-03, and before the "
                "chat format of 2026-12-04, which drops an earlier turn's reasoning)"
            )
        if not same_rows:
            print(
                f"note: the run's data ({len(self.rows)} conversations) is its checkpoint's, but its rows were built "
                "by other rules (an earlier seekstack's): training goes on with this version's rows, from the same "
                "place in them",
                file=sys.stderr,
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order()
