"""OpenAI requests into engine terms (prompt ids, one `SamplingParams` per choice) and engine outputs back.

Defaults where a field is absent: the checkpoint's generation_config.json values of temperature, top_p, top_k, min_p
and repetition_penalty (as vLLM's `--generation-config auto`), else temperature 1, top_p 1, no penalties (OpenAI's);
max_tokens 16 for completions (OpenAI's) and, for chat, whatever room the context leaves after the prompt.
Values too small for float32 sampling are the engine's to handle: a temperature below 1e-5 is greedy
(vLLM's rule), and however small top_p is, the likeliest token stays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seekstack.chat_template import compiled_template, read_chat_template
from seekstack.infer.json_mode import InvalidSchema, JsonFormat
from seekstack.infer.outputs import TokenLogprob
from seekstack.infer.params import SamplingParams, min_tokens_limit, sample_seed
from seekstack.infer.sampling import outside_vocabulary
from seekstack.schema import require
from seekstack.serve.errors import APIError, invalid_value
from seekstack.serve.schemas import (
    MAX_ENGINE_REQUESTS,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    CompletionLogprobs,
    CompletionRequest,
    PromptLogprob,
    TokenLogprobEntry,
    TopLogprob,
)
from seekstack.serve.tool_calls import refuse_unanswered_results
from seekstack.tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, Tokenizer, byte_level_bytes, tools_prompt

if TYPE_CHECKING:
    from seekstack.infer.engine import Engine

# OpenAI's deprecated chat fields, declared only to be refused when set: the refusal, naming the field that replaces it
REPLACED_CHAT_FIELDS = {
    "functions": "functions is OpenAI's deprecated form of tools: send each function in tools instead, as "
    '{"type": "function", "function": {"name": ..., "parameters": ...}}',
    "function_call": 'function_call is OpenAI\'s deprecated form of tool_choice: send tool_choice instead ("auto", '
    '"required", "none" or {"type": "function", "function": {"name": ...}})',
}
# Chat fields declared only to be refused when set (schemas.ChatCompletionRequest): why this server cannot honour each
REFUSED_CHAT_FIELDS = {
    "audio": "this model reads and writes text only",
    "modalities": "this model writes text only",
    "web_search_options": "this server does not search the web",
    "reasoning_effort": "this server has no reasoning effort to set: a model trained to reason (R1's <think> block) "
    "reasons as it was trained, in the reply (its reasoning_content with --reasoning-parser deepseek_r1)",
    "verbosity": "this model has no verbosity setting",
}
NO_GRAMMAR = "this server constrains output by response_format only (json_object, json_schema)"
NO_TEMPLATE_CHOICE = "this server renders the checkpoint's own chat template as it is"
CONTINUE_WITH_PREFIX = (
    "a reply starts a new assistant turn; to continue the last message, an assistant's, mark it prefix: true "
    "(DeepSeek's chat prefix completion)"
)
# vLLM's fields declared only to be refused when set (schemas.SamplingFields, ChatCompletionRequest), a vLLM client's
# request otherwise answered as if they were honoured: why this server cannot honour each
REFUSED_VLLM_FIELDS = {
    "use_beam_search": "this server does not run beam search",
    "include_stop_str_in_output": "this server leaves stop strings out of the reply",
    "guided_json": NO_GRAMMAR,
    "guided_regex": NO_GRAMMAR,
    "guided_choice": NO_GRAMMAR,
    "guided_grammar": NO_GRAMMAR,
    "structured_outputs": NO_GRAMMAR,
    "truncate_prompt_tokens": "this server does not truncate prompts: send a shorter one",
    "logits_processors": "this server runs no custom logits processors (logit_bias shifts given tokens' logits)",
    "return_tokens_as_token_ids": "this server names logprobs' tokens by their text, not as token_id:N (/tokenize "
    "gives a text's token ids)",
    "return_token_ids": "this server returns the text, not its token ids (/tokenize gives a text's token ids)",
    "cache_salt": "this server's prefix cache is shared by all requests to a model (a prompt's cached blocks serve "
    "whoever sends that prompt next), with no salt to keep requests apart",
    "priority": "this server schedules requests in the order they arrive, with no priorities (vLLM's "
    "--scheduling-policy priority)",
}
REFUSED_VLLM_CHAT_FIELDS = {
    "chat_template": NO_TEMPLATE_CHOICE,
    "add_generation_prompt": CONTINUE_WITH_PREFIX,
    "continue_final_message": CONTINUE_WITH_PREFIX,
    "echo": "chat replies do not echo the last message",
    "add_special_tokens": "the chat template places the special tokens the model was trained with; none are added",
}
ASKING_NOTHING = {  # what is done anyway
    "function_call": "none", "modalities": ["text"], "use_beam_search": False,
    "include_stop_str_in_output": False, "add_generation_prompt": True,
    "continue_final_message": False, "echo": False, "return_tokens_as_token_ids": False, "return_token_ids": False,
    "add_special_tokens": False, "priority": 0, "tool_choice": "none",
}  # fmt: skip


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """A completions request's prompts: each a text or a list of token ids."""
    prompt = request.prompt
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)


def prompt_ids(request: ChatCompletionRequest | CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """Each prompt's token ids: the chat template for chat (with the tools offered; its last message left open for
    the model to continue when it is a `prefix`, DeepSeek's chat prefix completion), each text (framed with the
    tokenizer's special tokens unless `add_special_tokens` is false) or the ids as given for completions; 400 for
    tools a tokenizer without the tool-call tokens cannot offer, for token ids (of a prompt, `logit_bias`,
    `stop_token_ids` or `allowed_token_ids`) outside the vocabulary, for a prefix that is not the last message, an
    assistant's, and for a tool result answering no call or calls no result answers (`refuse_unanswered_results`)."""
    refuse_outside_vocabulary(request.logit_bias or (), tokenizer, "logit_bias")
    refuse_outside_vocabulary(request.stop_token_ids or (), tokenizer, "stop_token_ids")
    refuse_outside_vocabulary(request.allowed_token_ids or (), tokenizer, "allowed_token_ids")
    if isinstance(request, ChatCompletionRequest):
        last = len(request.messages) - 1
        for position, message in enumerate(request.messages):
            if message.prefix and (position != last or message.role != "assistant"):
                raise APIError(400, f"messages.{position}.prefix: only the last message, an assistant's, can be a "
                               "prefix for the model to continue", param=f"messages.{position}.prefix",
                               code="invalid_value")  # fmt: skip
        refuse_unanswered_results(request.messages)
        refuse_template_kwargs(request.chat_template_kwargs, tokenizer)
        tools = request.offered_tools()
        if tools and not (tokenizer.has_role_tokens and tokenizer.has_tool_tokens):
            raise APIError(400, "this model's tokenizer has no DeepSeek-V3 tool-call tokens, so the model cannot be "
                           'offered tools: send the request without tools (or with tool_choice "none")',
                           param="tools", code="unsupported_parameter")  # fmt: skip
        continued = request.messages[last].prefix
        return [chat_ids(request.messages, tokenizer, continue_final_message=continued, tools=tools)]
    prompts = []
    # a list of prompts of token ids, each named by its position
    id_lists = not isinstance(request.prompt, str) and isinstance(request.prompt[0], list)
    for number, prompt in enumerate(completion_prompts(request)):
        if isinstance(prompt, str):
            ids = tokenizer.encode_prompt(prompt) if request.add_special_tokens else tokenizer.encode(prompt)
            if not ids:  # "": a tokenizer framing it with BOS gives that token to start from, as vLLM's
                why = "this model's tokenizer puts no BOS before a prompt"
                if not request.add_special_tokens:
                    why = "add_special_tokens is false, so no BOS is put before it"
                name = "prompt" if isinstance(request.prompt, str) else f"prompt.{number}"
                raise APIError(400, f'{name}: "" is no token to start from ({why}): give at least one character',
                               param=name, code="invalid_value")  # fmt: skip
            prompts.append(ids)
            continue
        refuse_outside_vocabulary(prompt, tokenizer, f"prompt.{number}" if id_lists else "prompt")
        prompts.append(list(prompt))
    return prompts


def chat_ids(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
) -> list[int]:
    """`tokenizer.encode_chat` of the messages as the template reads them; 400 (param messages, invalid_value) for a
    chat the tokenizer cannot write (a special token in a message's text, a last message it cannot continue, ...)."""
    try:
        return tokenizer.encode_chat(
            [message.template() for message in messages], add_generation_prompt, continue_final_message, tools
        )
    except ValueError as error:
        raise APIError(400, str(error), param="messages", code="invalid_value") from None


# apply_chat_template's own options that a chat_template_kwargs key would set (the request's fields of their names are
# REFUSED_VLLM_CHAT_FIELDS; the tools are the request's)
TEMPLATE_OPTIONS = ("add_generation_prompt", "continue_final_message", "chat_template", "tools", "documents")


def template_kwarg_read(template_kwargs: Mapping[str, Any] | None, tokenizer: Tokenizer) -> str | None:
    """The first key of vLLM's `chat_template_kwargs` that `tokenizer`'s chat template reads (its own, or the one
    shipped beside it), or that is one of apply_chat_template's own options (TEMPLATE_OPTIONS); None when every key
    may be dropped, as vLLM (`resolve_chat_template_kwargs`) drops those the template does not read. The server
    (`refuse_template_kwargs`) and Engine.chat refuse such a key, each in its own words."""
    if not template_kwargs:
        return None
    read = template_variables(tokenizer.jinja_chat_template) | shipped_template_variables(tokenizer.source)
    return next((key for key in template_kwargs if key in read or key in TEMPLATE_OPTIONS), None)


def refuse_template_kwargs(template_kwargs: Mapping[str, Any] | None, tokenizer: Tokenizer) -> None:
    """vLLM's `chat_template_kwargs` as vLLM reads them (`template_kwarg_read`): a key the chat template does not read
    is dropped (the same prompt: a client's {"enable_thinking": false} sent to every model), while a key it reads, or
    one of apply_chat_template's own options, gets 400 naming `chat_template_kwargs.KEY`: this server renders the
    chat format with none of its variables set from a request."""
    key = template_kwarg_read(template_kwargs, tokenizer)
    if key is not None:
        param = f"chat_template_kwargs.{key}"
        raise unsupported(param, f"{param}: the chat template reads {key}, which this server does not set from a "
                          f"request ({NO_TEMPLATE_CHOICE}): send the request without it (keys the template does not "
                          "read are dropped, as vLLM drops them)")  # fmt: skip


@cache
def shipped_template_variables(source: str) -> frozenset[str]:
    """The names read by the chat template shipped beside tokenizer file `source` (its tokenizer_config.json's, or
    chat_template.jinja: the checkpoint's own, which vLLM renders; DeepSeek-V3.1's reads `thinking`), read once per
    source; none for a tokenizer not read from a file ("<in memory>": one built in Python), or beside a damaged
    tokenizer_config.json, which a tokenizer with the role tokens loads without."""
    tokenizer_file = Path(source)
    if not tokenizer_file.is_file():
        return frozenset()
    try:
        shipped = read_chat_template(tokenizer_file.parent / CONFIG_FILE, tokenizer_file.parent / CHAT_TEMPLATE_FILE)
    except ValueError:
        return frozenset()
    return frozenset() if shipped is None else template_variables(shipped.text)


@cache
def template_variables(template: str) -> frozenset[str]:
    """The names a Jinja chat template reads from its context, as vLLM finds them (jinja2's undeclared variables,
    less the environment's globals such as raise_exception), in the environment transformers renders it in; none for
    a template that does not compile (a release's that this server does not render: the chat, if it does, is refused
    where it is written)."""
    from jinja2 import TemplateError, meta

    try:
        environment = compiled_template(template).environment
    except TemplateError:
        return frozenset()
    return frozenset(meta.find_undeclared_variables(environment.parse(template)) - set(environment.globals))


def refuse_outside_vocabulary(token_ids: Iterable[int], tokenizer: Tokenizer, param: str) -> None:
    """400 for the first of `token_ids` (a list, or a mapping keyed by them: logit_bias) outside the tokenizer's
    vocabulary, naming its entry in `param` as pydantic names an entry's other faults: `prompt.3`, `logit_bias.320`;
    the engine's bound (`outside_vocabulary`), checked before a request reaches it."""
    if (outside := outside_vocabulary(token_ids, tokenizer.vocab_size)) is not None:
        place, token = outside
        entry = f"{param}.{place}"
        raise APIError(400, f"{entry}: token id {token} is outside the vocabulary [0, {tokenizer.vocab_size})",
                       param=entry, code="invalid_value")  # fmt: skip


def unsupported(param: str, message: str) -> APIError:
    """OpenAI's 400 for a field this server reads but cannot honour."""
    return APIError(400, message, param=param, code="unsupported_parameter")


def refuse_unsampleable(request: Any, constrained: bool) -> None:
    """400 for bad_words beside a grammar (`constrained`: response_format's JSON, forced tool calls), which rules each
    token itself: the engine takes one such rule. allowed_token_ids apply beside it, as vLLM's; the engine refuses
    ids it can tell leave no token (all banned by min_tokens, by bad_words, or by the grammar at the first token)."""
    if constrained and request.bad_words:
        raise unsupported(
            "bad_words",
            "bad_words cannot be applied beside response_format's JSON or forced tool calls, which already rule what "
            "each token may be: send the request without bad_words",
        )


def refuse_fields(request: Any, refused: Mapping[str, str], advice: str = ": send the request without {param}") -> None:
    """`unsupported`'s 400 for the first field of `refused` (its name -> why it cannot be honoured, followed by `advice`
    naming the field as {param}) that `request` sets to anything but what is done anyway (ASKING_NOTHING)."""
    for param, reason in refused.items():
        if getattr(request, param) not in (None, [], ASKING_NOTHING.get(param)):
            raise unsupported(param, reason + advice.format(param=param))


def refuse_unsupported(request: ChatCompletionRequest | CompletionRequest) -> None:
    """400 in OpenAI's shape for what this server reads but cannot do: audio, web search and the other
    `REFUSED_CHAT_FIELDS`, vLLM's `REFUSED_VLLM_FIELDS` (guided decoding, beam search, min_tokens, ...), suffix, echo
    with logprobs, best_of below n or with a stream; and for stream_options without a stream (as OpenAI and vLLM
    refuse it)."""

    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                       code="invalid_value")  # fmt: skip
    is_chat = isinstance(request, ChatCompletionRequest)
    if is_chat:
        refuse_fields(request, REPLACED_CHAT_FIELDS, advice="")  # each refusal says what to send instead
    refuse_fields(
        request, {**REFUSED_VLLM_FIELDS, **(REFUSED_CHAT_FIELDS | REFUSED_VLLM_CHAT_FIELDS if is_chat else {})}
    )
    if request.prompt_logprobs is not None and request.stream:  # as vLLM refuses them
        raise unsupported("prompt_logprobs", "prompt_logprobs cannot be streamed: send the request without stream")
    if is_chat:
        if request.top_logprobs is not None and not request.logprobs:  # OpenAI's answer too
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return
    engine_requests = len(completion_prompts(request)) * candidates(request)
    if engine_requests > MAX_ENGINE_REQUESTS:
        raise APIError(400, f"{engine_requests} generations (prompts x max(n, best_of)) in one request; at most "
                       f"{MAX_ENGINE_REQUESTS} are served", param="n", code="invalid_value")  # fmt: skip
    if request.max_tokens == 0 and not request.echo:
        raise APIError(400, "max_tokens 0 generates nothing: give at least 1, or echo: true for the prompt alone (its "
                       "logprobs scored with logprobs)", param="max_tokens", code="invalid_value")  # fmt: skip
    if request.suffix is not None:
        raise unsupported("suffix", "this model does not fill in the middle: send the request without suffix")
    if request.best_of is not None and request.best_of < request.n:
        raise APIError(400, f"best_of ({request.best_of}) must be at least n ({request.n})", param="best_of",
                       code="invalid_value")  # fmt: skip
    if request.best_of is not None and request.best_of > request.n and request.stream:
        raise unsupported("best_of", "best_of > n cannot be streamed: the best are known only at the end")


def json_format(
    request: ChatCompletionRequest | CompletionRequest, engine: Engine, reasoning_start: str | None = None
) -> JsonFormat | None:
    """The JSON a request's `response_format` asks for (chat's, or a completion's as vLLM reads it), compiled for the
    engine's tokenizer (None for free text), after the reasoning where a reasoning parser reads the reply
    (`reasoning_start`: `JsonFormat`'s); 400 naming response_format for a schema that cannot be enforced or a
    reply continued from a `prefix` message (the continuation alone would be held to the JSON)."""
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if isinstance(request, ChatCompletionRequest) and request.messages[-1].prefix:
        raise APIError(400, "response_format JSON modes cannot continue a prefix message: the continuation alone "
                       "would be held to the JSON", param="response_format", code="unsupported_parameter")  # fmt: skip
    try:
        spec = response_format.json_schema if response_format.type == "json_schema" else None
        return JsonFormat(engine.tokenizer, spec.schema_ if spec else None, reasoning_start)
    except InvalidSchema as error:
        raise APIError(400, str(error), param="response_format.json_schema.schema", code="invalid_schema") from None


def candidates(request: ChatCompletionRequest | CompletionRequest) -> int:
    """Engine requests per prompt: best_of when it asks for more than n, else n."""
    best_of = request.best_of if isinstance(request, CompletionRequest) else None
    return max(request.n, best_of or 0)


def longest_token_chars(tokenizer: Tokenizer) -> int | None:
    """The most characters one token stands for (a byte-level token's bytes bound its characters); None when a
    normalizer may change the text's length before it is split."""
    if tokenizer.backend.normalizer is not None:
        return None
    return max(len(token) for token in tokenizer.backend.get_vocab())


def refuse_overlong_text(
    request: ChatCompletionRequest | CompletionRequest, max_model_len: int, max_token_chars: int | None
) -> None:
    """400 before tokenizing when the prompt's text (a chat's messages and the tools' prompt it lists) has more
    characters than `max_model_len` tokens of at most `max_token_chars` characters can hold, so a huge prompt costs
    no tokenizer time."""
    is_chat = isinstance(request, ChatCompletionRequest)
    if max_token_chars is None:
        return
    if is_chat:
        tools = request.offered_tools()
        texts = [m.text() for m in request.messages] + ([tools_prompt(tools)] if tools else [])
    else:
        texts = completion_prompts(request)
    lengths = [sum(len(text) for text in texts)] if is_chat else [len(t) for t in texts if isinstance(t, str)]
    characters, most = max(lengths, default=0), max_model_len * max_token_chars
    if characters > most:
        param = "prompt"
        if is_chat:  # the tools' prompt named when the messages alone would fit
            param = "tools" if tools and sum(len(text) for text in texts[:-1]) <= most else "messages"
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt's {characters:,} characters "
            f"are at least {characters // max_token_chars:,} tokens. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def echo_only(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """A completion of max_tokens 0 with echo: the prompt alone, to score it (OpenAI's legacy completions, vLLM's
    echo without generation). The engine samples one token after the prompt, as vLLM's does; it is not shown."""
    return isinstance(request, CompletionRequest) and request.echo and request.max_tokens == 0


def requested_max_tokens(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The completion tokens a request asks for at most; None for a chat request that leaves it to the server."""
    if isinstance(request, ChatCompletionRequest):
        return request.max_completion_tokens or request.max_tokens
    return request.max_tokens


def requested_length_name(request: ChatCompletionRequest | CompletionRequest) -> str | None:
    """The field a request asks for its completion tokens in (max_completion_tokens, else max_tokens: a completion's
    default 16), None for a chat request that leaves the length to the server."""
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens:
        return "max_completion_tokens"
    return None if requested_max_tokens(request) is None else "max_tokens"


def tools_tokens(request: ChatCompletionRequest | CompletionRequest, tokenizer: Tokenizer, prompt_tokens: int) -> int:
    """Of a chat's `prompt_tokens`, those that list the tools it offers (the chat's prompt without them, tokenized
    again, is that many shorter); 0 for a request that offers none."""
    if not isinstance(request, ChatCompletionRequest) or not request.offered_tools():
        return 0
    messages = request.messages
    return prompt_tokens - len(chat_ids(messages, tokenizer, continue_final_message=messages[-1].prefix))


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    max_model_len: int,
    unasked_limit: int | None = None,
    model_defaults: Mapping[str, Any] | None = None,
    context_len: int | None = None,
    tools_tokens: int = 0,
) -> list[SamplingParams]:
    """One validated `SamplingParams` per engine request: per choice, or per best_of candidate (request i uses
    seed + i); 400 when the context cannot hold it. A chat request without max_tokens may fill the context's room,
    or at most `model_defaults`' max_new_tokens (generation_config.json's, as vLLM's default max_tokens) and
    `unasked_limit` tokens when those are given (what its key's tokens per minute leave it). Sampling fields the
    request leaves unset take `model_defaults` (`Engine.sampling_defaults`), else OpenAI's defaults. A prompt that
    fits max_model_len but not `context_len` (`Engine.context_len`: what its cache holds of one request) is refused
    alike, code context_length_exceeded, and so is a length past the room that cache leaves it. A chat's prompt past
    the context names `tools` where the messages alone would fit, of `tools_tokens` fewer (`tools_tokens`), as
    refuse_overlong_text names them before tokenizing; else `messages`."""
    is_chat = isinstance(request, ChatCompletionRequest)
    room = max_model_len - prompt_tokens
    # an echo's score needs the prompt alone: it may fill the context (the token sampled after it is never fed back)
    least_room = 0 if echo_only(request) else 1
    context = f"this model's maximum context length is {max_model_len} tokens"
    if room >= least_room and context_len is not None and context_len < max_model_len:  # what the cache leaves
        context += f", of which the server's cache holds {context_len} for one request"
        room = context_len - prompt_tokens
    requested = requested_max_tokens(request)
    # the length named as the request gave it, not as SamplingParams' max_new_tokens, which no HTTP caller writes
    length_name = requested_length_name(request)
    if room < least_room or (requested is not None and requested > room):
        fix, param, listing = "Shorten the prompt.", "messages" if is_chat else "prompt", ""
        if room >= least_room:  # the prompt fits: the length asked is at fault (alone, where it is over the context)
            shorter = "" if requested >= prompt_tokens + room else " or shorten the prompt"
            fix, param = f"Lower {length_name} to at most {room}{shorter}.", length_name
        elif prompt_tokens - tools_tokens < min(max_model_len, context_len or max_model_len):  # the messages fit
            param, listing = "tools", f" ({tools_tokens} of them listing the tools)"
        asked = f"{prompt_tokens} in the prompt{listing}" + (f" + {requested} for the completion" if requested else "")
        raise APIError(
            400,
            f"{context}; the request needs {asked}. {fix}",
            param=param,
            code="context_length_exceeded",
        )
    if is_chat:
        logprobs, top_logprobs = request.logprobs, request.top_logprobs or 0
    else:
        logprobs, top_logprobs = request.logprobs is not None, request.logprobs or 0
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    ranked = candidates(request) > request.n  # best_of: each candidate's logprobs rank it
    model_defaults = model_defaults or {}

    def unless_set(name: str, default: float) -> float:
        value = getattr(request, name)
        return model_defaults.get(name, default) if value is None else value

    if echo_only(request):
        max_new_tokens = 1  # the one token the engine samples after the prompt, not shown
    else:
        unasked = min(room, model_defaults.get("max_new_tokens", room))
        max_new_tokens = requested or (unasked if unasked_limit is None else min(unasked, max(unasked_limit, 1)))
    length = 0 if echo_only(request) else max_new_tokens  # as the request gave it: an echo's 0
    choices = []
    for index in range(candidates(request)):
        try:  # a value out of range is refused as the SamplingParams are built
            require(request.min_tokens <= length, "min_tokens", min_tokens_limit(length_name or "max_tokens", length))
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=unless_set("temperature", 1.0),
                top_k=max(unless_set("top_k", 0), 0),
                top_p=unless_set("top_p", 1.0),
                min_p=unless_set("min_p", 0.0),
                repetition_penalty=unless_set("repetition_penalty", 1.0),
                presence_penalty=request.presence_penalty or 0.0,
                frequency_penalty=request.frequency_penalty or 0.0,
                logit_bias=request.logit_bias or {},
                seed=sample_seed(request.seed, index),
                stop=stop,
                stop_token_ids=tuple(request.stop_token_ids or ()),
                allowed_token_ids=None if request.allowed_token_ids is None else tuple(request.allowed_token_ids),
                bad_words=tuple(request.bad_words or ()),
                logprobs=logprobs or ranked,
                top_logprobs=top_logprobs,
                prompt_logprobs=asked_prompt_logprobs(request),
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
                # the tool-call tokens stay in the text for the tool-call parser, as vLLM's tool parsers keep them
                skip_special_tokens=request.skip_special_tokens and not (is_chat and request.offered_tools()),
            )
            choices.append(params.validate())
        except ValueError as error:  # a ConfigError names the field at fault (min_tokens above max_tokens)
            raise invalid_value(error) from None
    return choices


def asked_prompt_logprobs(request: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many likeliest tokens each prompt token's logprob comes with: prompt_logprobs, else, with a completion's
    echo, logprobs (the echoed prompt's tokens come first in the choice's logprobs), as vLLM reads them."""
    if request.prompt_logprobs is not None or isinstance(request, ChatCompletionRequest) or not request.echo:
        return request.prompt_logprobs
    return request.logprobs


def chat_logprobs(entries: list[TokenLogprob], tokenizer: Tokenizer) -> ChatLogprobs:
    """Chat's `logprobs.content`: each token with its logprob, its own bytes and its top alternatives."""
    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                token=entry.token,
                logprob=entry.logprob,
                bytes=token_bytes(tokenizer, entry.token_id),
                top_logprobs=[
                    TopLogprob(token=text, logprob=logprob, bytes=token_bytes(tokenizer, token_id))
                    for token_id, text, logprob in entry.top
                ],
            )
            for entry in entries
        ]
    )


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The bytes a token stands for, as the byte-level decoder joins them (so part of a UTF-8 character keeps its own
    bytes, not U+FFFD's), or an added token's text in UTF-8; none for an id past the tokenizer's (a model's
    vocabulary padded beyond it, as DeepSeek-V3's)."""
    piece = tokenizer.decoder_piece(token_id)
    if piece is None:
        return []
    raw = byte_level_bytes(piece)
    return list(raw if raw is not None else piece.encode("utf-8"))


def completion_logprobs(
    entries: list[TokenLogprob], text_offset: int, unscored_first: str | None = None
) -> CompletionLogprobs:
    """The legacy completions shape; offsets count characters from the start of the choice's text. `unscored_first`:
    the text of an echoed prompt's first token, which has no logprob (null, as OpenAI and vLLM give it)."""
    first = [] if unscored_first is None else [unscored_first]
    tokens = first + [entry.token for entry in entries]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None] * len(first) + [entry.logprob for entry in entries],
        top_logprobs=[None] * len(first) + [_by_text(entry) for entry in entries],
        text_offset=offsets,
    )


def vllm_prompt_logprobs(entries: list[TokenLogprob | None]) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` of a completion choice: per prompt token (the first None) {token id: logprob, rank,
    decoded_token}, the prompt's token first, then the likeliest that are not it (up to k + 1 entries, as vLLM)."""
    return [None if entry is None else _by_id(entry) for entry in entries]


def _by_id(entry: TokenLogprob) -> dict[str, PromptLogprob]:
    """`entry` read as vLLM's dict (TokenLogprob's Mapping), its ids as JSON's keys."""
    return {str(token_id): PromptLogprob(**dataclasses.asdict(logprob)) for token_id, logprob in entry.items()}


def _by_text(entry: TokenLogprob) -> dict[str, float]:
    """{text: logprob} of the top alternatives, most likely first, then the sampled token when it is not among them
    (as OpenAI and vLLM: up to logprobs + 1 entries); tokens that print alike (partial UTF-8) keep the likeliest's."""
    by_text: dict[str, float] = {}
    alternatives = [(text, logprob) for _, text, logprob in entry.top]
    for text, logprob in [*alternatives, (entry.token, entry.logprob)]:
        by_text.setdefault(text, logprob)
    return by_text
