"""OpenAI requests into engine terms (prompt ids, one `SamplingParams` per choice) and engine outputs back.

Defaults where a field is absent: temperature 1, top_p 1, no penalties (OpenAI's); max_tokens 16
for completions (OpenAI's) and, for chat, whatever room the context leaves after the prompt.
Values too small for float32 sampling are the engine's to handle: a temperature below 1e-5 is greedy
(vLLM's rule), and however small top_p is, the likeliest token stays.
"""

from __future__ import annotations

from seekstack.infer.outputs import TokenLogprob
from seekstack.infer.params import SamplingParams
from seekstack.serve.errors import APIError
from seekstack.serve.schemas import (
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    TokenLogprobEntry,
    TopLogprob,
)
from seekstack.tokenizer import Tokenizer


def prompt_ids(request: ChatCompletionRequest | CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The prompt's token ids: the chat template for chat, the text (or the ids as given) for completions."""
    if isinstance(request, ChatCompletionRequest):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        try:
            return tokenizer.encode_chat(messages)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
    if isinstance(request.prompt, str):
        return tokenizer.encode(request.prompt)
    out_of_range = [token for token in request.prompt if not 0 <= token < tokenizer.vocab_size]
    if out_of_range:
        raise APIError(
            400, f"prompt token id {out_of_range[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", "prompt"
        )
    return list(request.prompt)


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest, prompt_tokens: int, max_model_len: int
) -> list[SamplingParams]:
    """One validated `SamplingParams` per choice (choice i uses seed + i); 400 when the context cannot hold it."""
    is_chat = isinstance(request, ChatCompletionRequest)
    room = max_model_len - prompt_tokens
    requested = (request.max_completion_tokens or request.max_tokens) if is_chat else request.max_tokens
    if room < 1 or (requested is not None and requested > room):
        asked = f"{prompt_tokens} in the prompt" + (f" + {requested} for the completion" if requested else "")
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the request needs {asked}. "
            "Shorten the prompt or lower max_tokens.",
            param="messages" if is_chat else "prompt",
            code="context_length_exceeded",
        )
    if is_chat:
        logprobs, top_logprobs = request.logprobs, request.top_logprobs or 0
    else:
        logprobs, top_logprobs = request.logprobs is not None, request.logprobs or 0
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    choices = []
    for index in range(request.n):
        params = SamplingParams(
            max_new_tokens=requested or room,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_k=max(request.top_k or 0, 0),
            top_p=1.0 if request.top_p is None else request.top_p,
            min_p=request.min_p or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            seed=None if request.seed is None else request.seed + index,
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=request.ignore_eos,
            skip_special_tokens=request.skip_special_tokens,
        )
        try:
            choices.append(params.validate())
        except ValueError as error:
            raise APIError(400, str(error)) from None
    return choices


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    """Chat's `logprobs.content`: each token with its logprob, UTF-8 bytes and top alternatives."""
    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.token.encode("utf-8")),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8"))) for _, t, lp in entry.top],
            )
            for entry in entries
        ]
    )


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """The legacy completions shape; offsets count characters from the start of the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[_by_text(entry.top) for entry in entries],
        text_offset=offsets,
    )


def _by_text(top: list[tuple[int, str, float]]) -> dict[str, float]:
    """{text: logprob}, most likely first; tokens that print alike (partial UTF-8) keep the likeliest's logprob."""
    by_text: dict[str, float] = {}
    for _, text, logprob in top:
        by_text.setdefault(text, logprob)
    return by_text
