"""An interactive chat over the engine: history in the DeepSeek chat template, streamed replies, commands.

Ctrl-C during a reply stops it: the engine request is aborted (its cache blocks freed) and the reply joins the
history as far as it was shown, so that what the model sees next is what the user saw; a reply stopped before
any text leaves neither turn behind. Ctrl-C or end of input at the prompt ends the chat. A chat whose input is piped
in (a script: no prompt) stops at Ctrl-C wherever it lands, as any command run on a script's data does.

A reply ends at any special token (the end of sentence, a `<｜User｜>` opening the next turn the model writes for the
user, as Ollama's DeepSeek templates stop): the history never holds one, which the chat template refuses in a message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from seekstack.chat_template import read_chat_template
from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams
from seekstack.tokenizer import CALL_MARKERS, CHAT_TEMPLATE_FILE, CONFIG_FILE, Tokenizer
from seekstack.train.config import CONFIG_FILE as RUN_CONFIG_FILE
from seekstack.train.runs import TRAIN_STATE_FILE

HELP = (
    "commands: /reset (/clear) clears the history, /system TEXT sets the system prompt, /help (/?) shows this, "
    '/quit (/exit, /bye) leaves; """ opens and closes a message of several lines; Ctrl-C stops a reply'
)
BLOCK = '"""'  # a message of several lines runs from a line opening with it to one ending with it, as in Ollama
# Each command's other names, as llama-cli's chat (/clear, /exit) and Ollama's (/bye, /clear, /?) take them
QUIT_COMMANDS = ("/quit", "/exit", "/bye")
RESET_COMMANDS = ("/reset", "/clear")
HELP_COMMANDS = ("/help", "/?")


class ReplyFailed(RuntimeError):
    """The engine ended a reply with an error (its sampling raised): the message says why."""


class ChatSession:
    """A conversation: the system prompt and the turns so far; `reply` streams the assistant's next turn.

    `notify` receives notices about a turn (its reply capped to fit the context)."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        system: str | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        self.engine, self.params = engine, ending_at_special_tokens(params, engine.tokenizer)
        self.set_system(system)
        self.notify = notify
        self.turns: list[dict] = []

    def set_system(self, system: str | None) -> None:
        """Make `system` the system prompt (None or "" for none); a ValueError, the prompt left as it was, when it
        holds a special token, which would forge a turn in every prompt of the chat."""
        self.engine.tokenizer.refuse_forged_turn(system or "", "the system prompt")
        self.system = system or None

    def messages(self, turns: list[dict] | None = None) -> list[dict]:
        """The system prompt (if any) and the turns so far (or `turns`), as the chat template takes them."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to `user_text`; both turns join the history (the oldest go when the context is full).

        A reply stopped early (Ctrl-C, or the consumer closing this iterator) keeps the text taken so far; a reply
        that fails (ReplyFailed where the engine ended it with an error) leaves no unanswered user turn."""
        self.turns.append({"role": "user", "content": user_text})
        shown: list[str] = []
        try:
            prompt = self._fitting_prompt()
            params, notice = self.engine.fit_max_new_tokens(len(prompt), self.params)
            if notice and self.notify:
                self.notify(notice)
            stream = self.engine.stream(prompt, params)
            try:
                for output in stream:
                    if output.error is not None:
                        raise ReplyFailed(f"the reply failed ({output.error}); the message was not kept")
                    yield output.text
                    shown.append(output.text)
            finally:
                stream.close()  # aborts the request if it has not finished: its cache blocks are freed
        except (KeyboardInterrupt, GeneratorExit):
            if shown:
                self.turns.append({"role": "assistant", "content": "".join(shown)})
            else:
                self.turns.pop()
            raise
        except BaseException:
            self.turns.pop()  # an unanswered turn would leave two user turns in a row
            raise
        self.turns.append({"role": "assistant", "content": "".join(shown)})

    def _fitting_prompt(self) -> list[int]:
        """The prompt of the history with the oldest turns dropped until the reply has room for max_new_tokens (for
        at most half the context: a longer reply, or one to the context's end, max_new_tokens None, leaves the history
        the other half), so that an old turn goes before a reply is cut short, and told to `notify`; the history stays
        whole when even the new message alone does not fit (its error asks for a shorter one)."""
        context_len = self.engine.context_len
        reply_room = min(self.params.max_new_tokens or context_len, context_len // 2)
        turns = self.turns
        prompt = self.engine.tokenizer.encode_chat(self.messages(turns))
        while len(prompt) + reply_room > context_len and len(turns) > 1:
            turns = turns[2:]  # the oldest user + assistant pair
            prompt = self.engine.tokenizer.encode_chat(self.messages(turns))
        if len(prompt) >= context_len:
            system = (" with the system prompt", " or change /system") if self.system else ("", "")
            raise ValueError(
                f"the message needs {len(prompt)} tokens{system[0]}; the context holds {context_len}: write "
                f"less{system[1]}"
            )
        dropped = (len(self.turns) - len(turns)) // 2
        if dropped and self.notify:
            self.notify(f"the oldest {dropped} exchange(s) left the history, to fit the context of {context_len} "
                        f"tokens with {reply_room} for the reply")  # fmt: skip
        self.turns = turns
        return prompt


def ending_at_special_tokens(params: SamplingParams, tokenizer: Tokenizer, calls: bool = False) -> SamplingParams:
    """`params` that also stop at each of the tokenizer's special tokens, those a chat message may not hold, unless
    they ignore_eos (the reply then goes past its turn, as vLLM's chat and `generate --ignore-eos` go); with `calls`
    (tools offered) but at those a reply's tool calls are written in (`CALL_MARKERS`), which then stay in the text for
    the tool-call parser (skip_special_tokens off, as the server keeps them)."""
    markers = {tokenizer.backend.token_to_id(marker) for marker in CALL_MARKERS} if calls else set()
    ending = () if params.ignore_eos else sorted(tokenizer.special_ids - markers)
    stops = (*params.stop_token_ids, *ending)
    return dataclasses.replace(
        params, stop_token_ids=stops, skip_special_tokens=params.skip_special_tokens and not calls
    )


def run_chat(
    session: ChatSession,
    read_line: Callable[[str], str],
    write: Callable[[str], None],
    complain: Callable[[str], None],
    acknowledge: Callable[[str], None],
    prompt: str = "",
) -> None:
    """Read user lines with `read_line(prompt)` (as `input`) until /quit (/exit, /bye), end of input (EOFError) or
    Ctrl-C at the prompt; answer each (or each block of lines between BLOCK quotes, which Ctrl-C while it is typed
    drops) with `write`, or run the command it names. Ctrl-C during a reply stops it and returns to the prompt; with
    no prompt (input piped in) Ctrl-C anywhere stops any reply and raises KeyboardInterrupt. What cannot be done (a
    message too long, an unusable /system, an unknown command or one given words it takes none of) is said with
    `complain`, and what a command did (/help: the commands) with `acknowledge` (both stderr: `write` gets the replies
    alone, as a script's output)."""
    while True:
        try:
            line = read_line(prompt).strip()
        except (EOFError, KeyboardInterrupt) as ended:
            if not prompt and isinstance(ended, KeyboardInterrupt):
                raise
            if prompt:
                write("\n")  # end the prompt's line
            return
        if line.startswith(BLOCK):  # a message, whatever it starts with ("/" included)
            try:
                block = _read_block(line[len(BLOCK) :], read_line, prompt and "... ")
            except KeyboardInterrupt:  # drops the block, not the chat, as Ollama's Ctrl-C in one
                if not prompt:
                    raise
                write("\n")  # end the line the block's prompt was on
                continue
            if block:
                _answer(session, block, write, complain, interactive=bool(prompt))
        elif line in QUIT_COMMANDS:
            return
        elif line in RESET_COMMANDS:
            session.turns = []
            acknowledge("history cleared")
        elif line in HELP_COMMANDS:
            acknowledge(HELP)
        elif line == "/system" or line.startswith("/system "):
            _change_system(session, line[len("/system") :].strip(), complain, acknowledge)
        elif line.startswith("/"):
            command = line.split()[0]
            if command in (*QUIT_COMMANDS, *RESET_COMMANDS, *HELP_COMMANDS):
                complain(f"{command} takes nothing after it ({line!r}); {HELP}")
            else:
                complain(f"unknown command {command!r}; {HELP}")
        elif line:
            _answer(session, line, write, complain, interactive=bool(prompt))


def _read_block(first: str, read_line: Callable[[str], str], prompt: str) -> str:
    """The message of a block opened by BLOCK with `first` after it: the lines, newlines and indents kept, up to the
    one ending with BLOCK (the closing quotes left out), each further line read with `read_line(prompt)`; end of
    input closes the block."""
    lines = [first]
    while not lines[-1].rstrip().endswith(BLOCK):
        try:
            lines.append(read_line(prompt).rstrip("\r\n"))
        except EOFError:
            break
    lines[-1] = lines[-1].rstrip().removesuffix(BLOCK)
    return "\n".join(lines).strip()


def _change_system(
    session: ChatSession, system: str, complain: Callable[[str], None], acknowledge: Callable[[str], None]
) -> None:
    """Set the system prompt (none when `system` is empty) and clear the history; an unusable one changes nothing."""
    try:
        session.set_system(system)
    except ValueError as error:
        complain(f"{error}; the system prompt and history are unchanged")
        return
    session.turns = []
    acknowledge(f"system prompt {'set' if session.system else 'removed'}; history cleared")


def _answer(
    session: ChatSession, line: str, write: Callable[[str], None], complain: Callable[[str], None], interactive: bool
) -> None:
    """Stream the reply to `line`, then make sure the next prompt starts on a fresh line. Ctrl-C stops the reply, and
    where the chat is not `interactive` (its input piped in) is raised again, to stop the chat too."""
    replies = session.reply(line)
    last = ""
    try:
        for text in replies:
            write(text)
            last = text or last
    except KeyboardInterrupt:
        replies.close()  # the request is aborted; the turn stays as far as it was shown
        write("\n")
        if not interactive:
            raise
        return
    except (ValueError, ReplyFailed) as error:
        if last and not last.endswith("\n"):
            write("\n")
        complain(str(error))
        return
    if not last.endswith("\n"):
        write("\n")


def _trained_on_chat(adapter: Path) -> bool:
    """Whether adapter folder `adapter` is a `lora train` run, or one of its checkpoints (RUN/checkpoints/step_N),
    whose DATA is chat conversations (`data_dir` in the run's train_config.json, relative to it), read through the
    chat template; TRL's prompt-completion of text trains with no template, as text does."""
    from seekstack.adapters.data import first_record
    from seekstack.posttrain.conversations import is_conversation_record

    for run in (adapter, adapter.parent.parent):
        try:
            config = json.loads((run / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = config.get("data_dir") if isinstance(config, dict) else None
        return isinstance(data, str) and is_conversation_record(first_record(run / data))
    return False


def _trained_on_conversations(checkpoint: Path) -> bool:
    """Whether the run that wrote training checkpoint `checkpoint` (RUN/checkpoints/step_N) trained on chats: its
    train_config.json names a `data` file or a `task` (sft, rl, distill of conversations; `PostTrainConfig`'s
    `conversations`), where pretraining, and distillation or a run from `init_from` on token shards, name neither."""
    try:
        config = json.loads((checkpoint.parent.parent / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("data") or config.get("task"))


def base_model_reason(
    model_dir: str | Path, tokenizer_dir: str | Path, adapter: str | Path | None = None
) -> str | None:
    """Why the checkpoint (with `adapter`, a LoRA adapter folder merged in) looks like a base model with no chat
    training, or None when nothing says so; an adapter trained on chat conversations makes it a chat model.

    The signs: the tokenizer has no chat template (how Hugging Face marks a model meant for chat), neither a
    `chat_template` in the tokenizer_config.json beside it nor a chat_template.jinja (transformers 5's save), or one
    it cannot read (the reason names it); the folder is a checkpoint of a seekstack run that trained on no
    conversations (it holds train_state.pt, and its run names no data or task: pretraining, distillation on token
    shards); its name ends in "base", as DeepSeek names its base releases (DeepSeek-V3-Base). A heuristic for a
    notice: a base model that ships a chat template under another name passes for a chat model."""
    if adapter is not None and _trained_on_chat(Path(adapter)):
        return None
    model_dir, config_path = Path(model_dir), Path(tokenizer_dir) / CONFIG_FILE
    try:
        template = read_chat_template(config_path, Path(tokenizer_dir) / CHAT_TEMPLATE_FILE)
    except (OSError, ValueError) as error:  # one it cannot read (the file, its chat_template field), named
        return str(error)
    if template is None or not template.text:
        return f"{config_path} has no chat_template and no {CHAT_TEMPLATE_FILE} is beside it"
    if (model_dir / TRAIN_STATE_FILE).is_file() and not _trained_on_conversations(model_dir):
        return (
            f"{model_dir} is a checkpoint of a run that trained on no conversations (its {TRAIN_STATE_FILE}; no data "
            f"or task in its run's {RUN_CONFIG_FILE})"
        )
    if model_dir.resolve().name.lower().endswith("base"):
        return f"its folder is named {model_dir.resolve().name!r}"
    return None
