"""An interactive chat over the engine: history in the DeepSeek chat template, streamed replies, commands."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams

HELP = "commands: /reset clears the history, /system TEXT sets the system prompt, /quit leaves"


class ChatSession:
    """A conversation: the system prompt and the turns so far; `reply` streams the assistant's next turn."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params = engine, params
        self.system = system
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        """The system prompt (if any) and the turns so far, as the chat template takes them."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def reply(self, user_text: str) -> Iterable[str]:
        """Stream the answer to `user_text`; both turns join the history (the oldest go when the context is full)."""
        self.turns.append({"role": "user", "content": user_text})
        prompt = self._fitting_prompt()
        params = dataclasses.replace(self.params, max_new_tokens=self._room(prompt))
        answer = []
        try:
            for output in self.engine.stream(prompt, params):
                answer.append(output.text)
                yield output.text
        except BaseException:
            self.turns.pop()  # an unanswered turn would leave two user turns in a row
            raise
        self.turns.append({"role": "assistant", "content": "".join(answer)})

    def _fitting_prompt(self) -> list[int]:
        prompt = self.engine.tokenizer.encode_chat(self.messages())
        while len(prompt) >= self.engine.max_model_len and len(self.turns) > 1:
            self.turns = self.turns[2:]  # the oldest user + assistant pair
            prompt = self.engine.tokenizer.encode_chat(self.messages())
        if len(prompt) >= self.engine.max_model_len:
            self.turns.pop()
            raise ValueError(
                f"the message needs {len(prompt)} tokens with the system prompt; the context holds "
                f"{self.engine.max_model_len}: write less or change /system"
            )
        return prompt

    def _room(self, prompt: list[int]) -> int:
        return min(self.params.max_new_tokens, self.engine.max_model_len - len(prompt))


def run_chat(session: ChatSession, lines: Iterable[str], write: Callable[[str], None], prompt: str = "") -> None:
    """Read user lines until /quit or the end of input; answer each, or run the command it names."""
    write(prompt)
    for raw in lines:
        line = raw.strip()
        if line == "/quit":
            return
        if line == "/reset":
            session.turns = []
            write("(history cleared)\n")
        elif line.startswith("/system"):
            session.system = line[len("/system") :].strip() or None
            session.turns = []
            write(f"(system prompt {'set' if session.system else 'removed'}; history cleared)\n")
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]!r}; {HELP}\n")
        elif line:
            try:
                for text in session.reply(line):
                    write(text)
                write("\n")
            except ValueError as error:
                write(f"error: {error}\n")
        write(prompt)
