"""Chat conversations as training rows: the DeepSeek chat template, loss on the assistant's tokens only.

A conversation is a list of OpenAI-style messages (`{"role": ..., "content": ...}`). Its row is
`Tokenizer.encode_chat(messages)`; the labels equal the ids on every assistant token (its content and the EOS
that ends the turn) and are IGNORE_INDEX (-100) elsewhere: BOS, system prompt, user turns, role tokens, padding.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from seekstack.jsonl import jsonl_records
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.posttrain.rewards import R1_SYSTEM_PROMPT, r1_completion
from seekstack.posttrain.tasks import Problem, Task, sample_problems
from seekstack.tokenizer import Tokenizer, check_chat_message

Conversation = list[dict]


def encode_conversation(tokenizer: Tokenizer, messages: Conversation) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: labels are the ids on assistant tokens, IGNORE_INDEX elsewhere."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    system = [m for m in messages if m["role"] == "system"]  # the chat template puts every system message first
    turns = [m for m in messages if m["role"] != "system"]
    for position, message in enumerate(turns):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.encode_chat([*system, *turns[:position]], add_generation_prompt=True))
        end = len(tokenizer.encode_chat([*system, *turns[: position + 1]], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    return ids, labels


def read_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a JSONL file, one `{"messages": [...]}` object a line."""
    conversations = []
    for number, record in jsonl_records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise ValueError(f'{path}:{number}: expected {{"messages": [...]}} with an assistant message')
        for position, message in enumerate(messages):
            try:
                check_chat_message(position, message)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f'{path}:{number}: expected {{"messages": [...]}} with an assistant message')
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def prompt_messages(problem: Problem) -> Conversation:
    """The system and user turns that ask a task's question in the R1 format."""
    return [{"role": "system", "content": R1_SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]


def task_conversations(task: Task, count: int, seed: int) -> list[Conversation]:
    """`count` training problems of `task` as conversations whose assistant turn is the worked trace + answer."""
    return [
        [*prompt_messages(p), {"role": "assistant", "content": r1_completion(p.trace, p.answer)}]
        for p in sample_problems(task, count, "train", seed)
    ]


def write_conversations(conversations: list[Conversation], path: str | Path) -> Path:
    """Write conversations as JSONL, one `{"messages": [...]}` a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path


class ShuffledRows:
    """Encoded rows drawn without replacement in a seeded order per epoch; its position is its state."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], seed: int):
        self.rows, self.seed = rows, seed
        # a fingerprint of the rows: a resume on other data is refused instead of training on it
        self.digest = hashlib.blake2b(json.dumps(rows).encode(), digest_size=16).hexdigest()
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
        return {"epoch": self.epoch, "cursor": self.cursor, "digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("digest", self.digest) != self.digest:  # older checkpoints carry none
            raise ValueError(
                f"the run's data ({len(self.rows)} conversations) is not what its checkpoint was trained on: resume "
                "with the same data (and tokenizer), or start a new run"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order()
