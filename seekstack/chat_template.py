"""A checkpoint's own chat template: the Jinja `chat_template` its tokenizer_config.json ships (or transformers 5's
chat_template.jinja beside it), rendered as transformers' `apply_chat_template` renders it. seekstack writes the
DeepSeek-V3 format itself (`Tokenizer.render_chat`); a release whose tokenizer has no DeepSeek-V3 role tokens
(DeepSeek-V2-Chat, DeepSeek-V2-Lite-Chat, DeepSeek-Coder-V2-Instruct: "User: ...\\n\\nAssistant:") is written in
its own template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Template, TemplateError

CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where a continued message's content ends


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Jinja chat template and the file it came from (named in errors)."""

    text: str
    source: str

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool,
        continue_final_message: bool,
        special_tokens: dict[str, str],
    ) -> str:
        """The chat string for `messages` (templated: string contents), as transformers renders it: an assistant's
        reasoning given apart under each of the names templates read it by (`reasoning_content`, `thinking`; the
        first of reasoning_content, thinking, reasoning that is given), with `continue_final_message` the template's
        text after the last message's content cut off (found by a tag appended to it, as transformers finds it).
        ValueError naming the template's file when it raises or, continuing, leaves out the last message's content."""
        from transformers.utils.chat_template_utils import _alias_reasoning_fields

        messages = _alias_reasoning_fields(messages)
        if continue_final_message:
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + CONTINUE_TAG}]
        try:
            rendered = compiled_template(self.text).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                **special_tokens,
            )
        except TemplateError as error:
            raise ValueError(f"{self.source}: the chat template failed on these messages: {error}") from None
        if not continue_final_message:
            return rendered
        if CONTINUE_TAG.strip() not in rendered:
            raise ValueError(
                f"{self.source}: the chat template leaves out the last message's content, so it cannot be continued "
                "(prefix)"
            )
        tag = rendered.rindex(CONTINUE_TAG.strip())
        # a template that trims the content's trailing whitespace trims the tag's too: trim what comes before it
        return rendered[:tag] if rendered[tag:].startswith(CONTINUE_TAG) else rendered[:tag].rstrip()

    def reply_opening(self, special_tokens: dict[str, str], role_token: str) -> str:
        """The text this template writes after the assistant's `role_token` in its generation prompt, which the reply
        then continues: DeepSeek-R1's `<think>\\n` (it opens the model's reasoning); "" for a template that writes
        nothing there, writes no `role_token` or fails on a one-message chat."""
        chat = [{"role": "user", "content": "hi"}]
        try:
            without = self.render(chat, False, False, special_tokens)
            prompted = self.render(chat, True, False, special_tokens)
        except ValueError:
            return ""
        if not prompted.startswith(without + role_token):
            return ""
        return prompted[len(without) + len(role_token) :]


def read_chat_template(config_path: Path, template_path: Path) -> ChatTemplate | None:
    """The chat template a tokenizer ships: the file `template_path` (transformers 5's chat_template.jinja), which
    transformers reads before the tokenizer_config.json's, else the `chat_template` of its tokenizer_config.json
    `config_path` (a string, or the one named "default" of a list of named templates); None without either.
    ValueError naming `config_path` when it is read and is not a JSON object, or its template is no string."""
    if template_path.is_file():
        return ChatTemplate(template_path.read_text(encoding="utf-8"), str(template_path))
    template = read_tokenizer_config(config_path).get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(
            f"{config_path}: field 'chat_template' has template {template!r}: give its Jinja text (a string), or a "
            'list of named templates, one of them {"name": "default", "template": "..."}'
        )
    return ChatTemplate(template, str(config_path))


def read_tokenizer_config(config_path: Path) -> dict:
    """The JSON object in tokenizer file `config_path` (tokenizer_config.json, special_tokens_map.json); {} when it is
    missing, ValueError naming it when it is not a JSON object."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error}); copy the tokenizer's files again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def compiled_template(text: str) -> Template:
    """`text` compiled by transformers, in the environment its `apply_chat_template` renders in (sandboxed, trimmed
    blocks, loop controls, `raise_exception`, `strftime_now`, its `tojson` that writes '<' and non-ASCII as they are,
    the `{% generation %}` tag), and cached there. Imported here, when a checkpoint's own template is rendered or read
    (the variables serve finds in it)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(text)
