"""The reasoning parser of `seekstack serve --reasoning-parser deepseek_r1`: a chat reply in the R1 format
`<think> reasoning </think> answer` (what `seekstack sft task=...` and `seekstack rl` train) split into the
`reasoning_content` and the `content` of the message, as DeepSeek's API (deepseek-reasoner) and vLLM's
`--reasoning-parser deepseek_r1` answer.

A reply that does not open with `<think>` is all content, unchanged; a reply continuing a chat `prefix` opens with
the prefix's text, and a reply to a generation prompt that opens it (DeepSeek-R1's `<think>\\n`) with that opening:
read but not returned. A reply cut (by max_tokens) before its
`</think>` is all reasoning, with empty content. The text goes in as it is generated, in pieces of any size: a tag
split across pieces is found all the same, and text that may still be the start of one is held back until the next
piece tells.
"""

from __future__ import annotations

from seekstack.serve.schemas import AssistantMessage, ChatCompletionRequest
from seekstack.tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer

REASONING_PARSERS = ("deepseek_r1",)  # vLLM's name for the R1 format


def given_start(request: ChatCompletionRequest, tokenizer: Tokenizer) -> str:
    """The start of the reply given in the prompt: the content of a last message marked `prefix` (DeepSeek's chat
    prefix completion), which the reply continues, else the reply's opening the generation prompt writes
    (`Tokenizer.reply_opening`: DeepSeek-R1's "<think>\\n"; none after tool results, where the chat template writes
    no generation prompt); "" for none."""
    last = request.messages[-1]
    if last.prefix:
        return last.text()
    return "" if last.role == "tool" else tokenizer.reply_opening


def check_reasoning_parser(name: str | None) -> None:
    """ValueError naming --reasoning-parser when `name` is none of `REASONING_PARSERS`."""
    if name is not None and name not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser {name!r}: the parsers are {', '.join(REASONING_PARSERS)}")


class ReasoningSplit:
    """One choice's reply, pushed piece by piece, released as (reasoning, content) text. The whitespace around the
    reasoning, and before the answer, is dropped (`r1_completion` writes a space on each side of it)."""

    def __init__(self, given_start: str = "") -> None:
        self.part = "opening"  # "opening" (not yet known whether it opens <think>), "reasoning" or "content"
        self.held = ""  # text received and not yet released
        self.after_tag = False  # the part began at a tag: its leading whitespace is dropped
        self.raw_reasoning = ""  # the reply's text up to its </think> (or all of it, cut inside the reasoning)
        self.push(given_start)  # the reply's start given in the prompt (`given_start`): read, never released
        self.given_reasoning = len(self.raw_reasoning)  # of raw_reasoning, what that start holds

    @property
    def generated_reasoning(self) -> str:
        """The generated text up to the reasoning's </think> (all of it, cut inside the reasoning)."""
        return self.raw_reasoning[self.given_reasoning :]

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and content text that `text` (the reply's next piece) releases; `final`: the reply ended."""
        if self.part != "content":
            self.raw_reasoning += text
        self.held += text
        reasoning = content = ""
        if self.part == "opening":
            opening = self.held.lstrip()
            if opening.startswith(THINK_OPEN):
                self.part, self.held, self.after_tag = "reasoning", opening[len(THINK_OPEN) :], True
            elif THINK_OPEN.startswith(opening) and not final:
                return "", ""
            else:
                self.part, self.raw_reasoning = "content", ""
        if self.part == "reasoning":
            reasoning, closed = self._reasoning(final)
            if not closed:
                return reasoning, ""
            self.part, self.after_tag = "content", True
            self.raw_reasoning = self.raw_reasoning[: len(self.raw_reasoning) - len(self.held)]
        if self.after_tag:
            self.held = self.held.lstrip()
            self.after_tag = not self.held
        content, self.held = self.held, ""
        return reasoning, content

    def _reasoning(self, final: bool) -> tuple[str, bool]:
        """The reasoning text released, and whether its </think> came (what follows it is left in `held`)."""
        if self.after_tag:
            self.held = self.held.lstrip()
            self.after_tag = not self.held
        end = self.held.find(THINK_CLOSE)
        if end >= 0:
            reasoning, self.held = self.held[:end].rstrip(), self.held[end + len(THINK_CLOSE) :]
            return reasoning, True
        if final:
            reasoning, self.held = self.held.rstrip(), ""
            return reasoning, False
        # what may be the start of </think> waits, and the whitespace before it: it may come before </think>
        tag_start = next(
            (size for size in range(len(THINK_CLOSE) - 1, 0, -1) if self.held.endswith(THINK_CLOSE[:size])), 0
        )
        keep = len(self.held[: len(self.held) - tag_start].rstrip())
        reasoning, self.held = self.held[:keep], self.held[keep:]
        return reasoning, False

    def message(self, reply: str) -> AssistantMessage:
        """The message of a whole `reply`: its reasoning_content null when it does not open with <think>."""
        reasoning, content = self.push(reply, final=True)
        return AssistantMessage(content=content, reasoning_content=reasoning if self.generated_reasoning else None)

    def reasoning_tokens(self, tokenizer: Tokenizer, completion_tokens: int) -> int:
        """The reply's tokens up to its </think> (all of them when it was cut inside the reasoning): the tokenizer's
        count of that text, never more than the `completion_tokens` generated."""
        if not self.generated_reasoning:
            return 0
        if self.part != "content":
            return completion_tokens
        return min(len(tokenizer.encode(self.generated_reasoning)), completion_tokens)
