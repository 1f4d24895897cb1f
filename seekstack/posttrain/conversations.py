"""Chat conversations as training rows: the DeepSeek chat template, loss on the assistant's tokens only.

A conversation is a list of OpenAI-style messages (`{"role": ..., "content": ...}`). Its row is
`Tokenizer.encode_chat(messages)`; the labels equal the ids on every assistant token (its content and the EOS
that ends the turn) and are IGNORE_INDEX (-100) elsewhere: BOS, system prompt, user turns, role tokens, padding,
and the assistant turns of `"weight": 0` (OpenAI fine-tuning's: in the row as context, not trained on).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import cast

import torch

from seekstack.atomic import write_atomic
from seekstack.jsonl import jsonl_records
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.rewards import R1_SYSTEM_PROMPT, r1_completion
from seekstack.posttrain.tasks import Problem, Split, Task, sample_problems
from seekstack.tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer, drop_past_reasoning
from seekstack.tokenizer import template_message as chat_template_message
from seekstack.tokens.token_bytes import scored_text_bytes, token_byte_lengths

Conversation = list[dict]
HELD_OUT_FILE = "held_out.json"  # in an SFT run's out_dir: the conversation_keys of the conversations it holds out


def encode_conversation(tokenizer: Tokenizer, messages: Conversation) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: labels are the ids on the tokens of assistant turns not of weight 0,
    IGNORE_INDEX elsewhere. Every turn of the template opens with its role's special token, which the tokenizer never
    merges across, so a turn's tokens are those of the turn encoded alone: one encoding per turn (encoding every
    prefix of the conversation took 25 s for one of 200 turns)."""
    messages = drop_past_reasoning(messages)  # as encode_chat renders them, so that each turn encodes alone as in it
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    bos = len(tokenizer.encode_chat([], add_generation_prompt=False))
    # the assistant's role token: the generation prompt less the reply's opening it writes (R1's "<think>\n"), which
    # an assistant turn holds in its content
    opening = len(tokenizer.encode(tokenizer.reply_opening))
    role = len(tokenizer.encode_chat([], add_generation_prompt=True)) - bos - opening
    system = [m for m in messages if m["role"] == "system"]  # the chat template puts every system message first
    start = len(tokenizer.encode_chat(system, add_generation_prompt=False))
    for message in (m for m in messages if m["role"] != "system"):
        end = start + len(tokenizer.encode_chat([message], add_generation_prompt=False)) - bos
        if is_trained(message):
            labels[start + role : end] = ids[start + role : end]
        start = end
    if start != len(ids):
        raise ValueError(
            f"tokenizer {tokenizer.source} encodes a conversation's turns into {start} tokens one by one but "
            f"{len(ids)} together: it merges across its role tokens, so the assistant's tokens cannot be told apart"
        )
    return ids, labels


def labelled_text_bytes(tokenizer: Tokenizer, labels: list[int], length: int) -> int:
    """UTF-8 bytes of the text a row's labelled targets spell, the row cut to `length` (its first label is no target:
    nothing predicts it; special tokens such as the EOS count none), counted per token as pretraining's bits per byte
    counts them (tokens/token_bytes.py)."""
    return int(scored_text_bytes(token_byte_lengths(tokenizer), torch.tensor(labels[:length], dtype=torch.int64)))


def conversation_key(messages: Conversation) -> str:
    """A fingerprint of what the chat template encodes of a conversation (its system prompts, which it puts first,
    then its turns' roles and contents, an earlier turn's reasoning dropped): equal for every copy of it, whatever
    other keys a copy's messages carry."""
    messages = drop_past_reasoning(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [(m["role"], m["content"]) for m in messages if m["role"] != "system"]
    return hashlib.blake2b(json.dumps([system, turns]).encode(), digest_size=16).hexdigest()


def hold_out(conversations: list[Conversation], fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(kept, held_out): up to int(fraction x N) conversations held out, every copy of each (so none is also trained
    on), chosen by their content's hash: the same ones whatever the seed or the file's order. A conversation with
    more copies than are still wanted is passed over, so a big group of copies never takes more than the fraction."""
    keys = [conversation_key(c) for c in conversations]
    copies, wanted = Counter(keys), int(fraction * len(conversations))
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
    seekstack before the record, whose choice of held-out conversations may differ from this one's)."""
    path = Path(run_dir) / HELD_OUT_FILE
    if not path.is_file():
        return None
    return set(json.loads(path.read_text())["conversation_keys"])


def read_conversations(path: str | Path, tokenizer: Tokenizer | None = None) -> list[Conversation]:
    """The conversations of a JSONL file, one a line (`record_conversation`), their messages in the chat template's
    terms (`template_message`); with `tokenizer`, content holding one of its special tokens is refused too. Errors
    name the file and line."""
    conversations = []
    for number, record in jsonl_records(path):
        try:
            conversations.append(record_conversation(record, tokenizer))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def is_conversation_record(record: object) -> bool:
    """Whether a JSONL record is a conversation: OpenAI's `{"messages": [...]}`, or TRL's conversational
    prompt-completion `{"prompt": [...], "completion": [...]}`."""
    if not isinstance(record, dict):
        return False
    return isinstance(record.get("messages"), list) or all(
        isinstance(record.get(key), list) for key in ("prompt", "completion")
    )


def record_conversation(record: object, tokenizer: Tokenizer | None = None) -> Conversation:
    """The templated messages of one JSONL record (`is_conversation_record`). TRL's prompt-completion is its prompt's
    messages then its completion's, every message of the completion the assistant's and the prompt's assistant
    messages context of weight 0 (TRL's completion_only_loss trains the completion alone). ValueError for a record of
    another shape, naming it and what to write instead, or with no trained assistant message."""
    if not is_conversation_record(record):
        raise ValueError(_not_a_conversation(record))
    record = cast(dict, record)
    messages = record["messages"] if isinstance(record.get("messages"), list) else record["prompt"]
    templated = [template_message(position, message, tokenizer) for position, message in enumerate(messages)]
    if messages is record.get("prompt"):
        if not record["completion"]:
            raise ValueError('"completion" holds no message: the conversation trains nothing')
        templated = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in templated]
        for position, message in enumerate(record["completion"], start=len(templated)):
            templated.append(template_message(position, message, tokenizer))
            if templated[-1]["role"] != "assistant":
                raise ValueError(
                    f"chat message {position} (of the completion) has role {templated[-1]['role']!r}: a completion "
                    "is the assistant's reply, which is what is trained; move the message into the prompt"
                )
    if not any(m["role"] == "assistant" for m in templated):
        raise ValueError('expected {"messages": [...]} with an assistant message')
    if not any(is_trained(m) for m in templated):
        raise ValueError(
            "every assistant message has weight 0, so the conversation trains nothing; give one weight 1 or leave "
            "the conversation out"
        )
    return templated


def _not_a_conversation(record: object) -> str:
    """Why a JSONL record is no conversation, and what to write instead: TRL's other dataset formats by name."""
    if not isinstance(record, dict):
        return f'expected {{"messages": [...]}}, got {type(record).__name__} {str(record)[:60]!r}'
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return (
            'a "prompt" and "completion" of text (TRL\'s standard, not conversational, format) hold no chat turns, '
            'and conversations are trained through the chat template: write the line as {"messages": [{"role": '
            '"user", "content": PROMPT}, {"role": "assistant", "content": COMPLETION}]} (or TRL\'s conversational '
            '{"prompt": [messages], "completion": [messages]})'
        )
    if "text" in record:
        return (
            '"text" (TRL\'s language-modeling format) holds no assistant turn to train: write it as {"messages": '
            '[...]}, or train on the text itself with `seekstack lora train BASE FILE.jsonl`, which reads {"text"} '
            "lines"
        )
    return (
        'expected {"messages": [...]} (or TRL\'s {"prompt": [...], "completion": [...]}) with an assistant message, '
        f"got the keys {sorted(record)}"
    )


def template_message(position: int, message: object, tokenizer: Tokenizer | None = None) -> dict:
    """A file's chat message as the chat template takes it (`seekstack.tokenizer.template_message`; with `tokenizer`,
    `Tokenizer.template_message`, which refuses its special tokens too), its content whole characters and its
    weight, if an assistant message has one, `check_weight`'s (OpenAI fine-tuning gives weight a meaning on assistant
    messages only: on another role it is ignored, as the template ignores it). A null content is refused, an
    assistant's too: in OpenAI fine-tuning data only a tool call's may be null. An assistant's `reasoning_content`
    is written into its content (`with_reasoning`). Tool results and calls are refused. ValueError naming `position`."""
    if isinstance(message, dict) and (message.get("role") == "tool" or message.get("tool_calls") or
                                      message.get("function_call")):  # fmt: skip
        raise ValueError(
            f"chat message {position} is a tool {'result' if message.get('role') == 'tool' else 'call'}: tool "
            "messages, tool_calls and function_call are not supported in training data (rows are encoded and "
            "labelled turn by turn, which tool results do not follow); leave out conversations that use tools"
        )
    template = tokenizer.template_message if tokenizer else chat_template_message
    templated = template(position, message)
    if cast(dict, message)["content"] is None:
        raise ValueError(f"chat message {position} content must be a string or a list of text parts, got null")
    if templated["role"] == "assistant" and templated.get("reasoning_content") is not None:
        templated = template(position, with_reasoning(position, templated))  # its special tokens refused too
    check_whole_characters(position, templated["content"])
    if templated["role"] == "assistant" and "weight" in templated:
        check_weight(position, templated["weight"])
    return templated


def with_reasoning(position: int, message: dict) -> dict:
    """An assistant message whose reasoning is apart in `reasoning_content` (as DeepSeek's API, vLLM and `seekstack
    serve --reasoning-parser deepseek_r1` answer) with it written back into its content in the R1 format the parser
    splits, `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, so that it is trained as the model writes it. ValueError
    naming `position` when it is no text, or the content holds a think block of its own too."""
    reasoning = message["reasoning_content"]
    if not isinstance(reasoning, str):
        raise ValueError(
            f"chat message {position} field 'reasoning_content' must be text or null, got {type(reasoning).__name__}"
        )
    if THINK_OPEN in message["content"]:
        raise ValueError(
            f"chat message {position} has reasoning_content and a {THINK_OPEN} block in its content too: keep one"
        )
    content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{message['content']}"
    return {**{k: v for k, v in message.items() if k != "reasoning_content"}, "content": content}


def check_weight(position: int, weight: object) -> None:
    """ValueError naming the message unless an assistant message's `weight` is OpenAI fine-tuning's: 0 or 1."""
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(
            f"chat message {position} field 'weight' has value {weight!r}: it must be 0 (not trained on) or 1"
        )


def is_trained(message: dict) -> bool:
    """Whether a templated message's tokens are labelled: an assistant message not of weight 0."""
    return message["role"] == "assistant" and message.get("weight", 1) == 1


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
    """A fingerprint of what rows are built from, the conversations as given and the tokenizer, whatever the rules
    (the chat template, which turns are trained) that build rows of them."""
    source = json.dumps([tokenizer.fingerprint, conversations], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(source.encode(), digest_size=16).hexdigest()


def write_conversations(conversations: list[Conversation], path: str | Path) -> Path:
    """Write conversations as JSONL, one `{"messages": [...]}` a line (whole or not at all: an earlier file stays)."""
    return write_atomic(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))


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
