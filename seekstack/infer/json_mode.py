"""JSON mode: each request's next-token mask that keeps its output valid JSON (any object, or what a JSON Schema
allows), the `TokenConstraint` the engine applies to that request's logits.

The grammar work is llguidance's (microsoft/llguidance, the structured-output library of vLLM, SGLang and
llama.cpp): once per tokenizer it builds a trie of every token's bytes (byte-level BPE: the bytes each token
decodes to, special tokens apart); at each step a byte-level Earley parser of the JSON grammar walks that trie
and keeps the tokens whose bytes extend the text to a prefix of valid JSON, in native code (tens of microseconds
for a 129k vocabulary). EOS is allowed only once the value is complete, and the request stops there
(`complete`): nothing may follow a whole JSON value. With speculative decoding each draft is judged under the mask
after the drafts before it (`allowed_after`), as vLLM's structured outputs do.
"""

from __future__ import annotations

import itertools
import json
import threading
import weakref
from typing import Any

import llguidance
import numpy as np
import torch

from seekstack.tokenizer import THINK_CLOSE, THINK_OPEN, Tokenizer

MAX_MESSAGE_CHARS = 300
# JSON written as `json.dumps` writes it: ", " and ": " between items, no other whitespace. llguidance's default
# allows any run of whitespace between tokens, and a small model then pads an object with newlines until max_tokens
# instead of closing it (OpenAI warns of the same in its JSON mode). A schema's "x-guidance" options still override.
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
BLANK = r"[ \t\r\n]"  # between an R1 reply's </think> and its answer, as a regex
_build_lock = threading.Lock()
_grammar_tokenizers: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


class InvalidSchema(ValueError):
    """A JSON Schema that cannot be turned into a grammar; the message says why."""


class JsonConstraint:
    """One request's place in the JSON grammar: the tokens it may sample next, advanced by each token it samples."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's ids: the grammar knows no others
        self.words = np.zeros((vocab_size + 31) // 32, dtype=np.uint32)  # the mask, one bit per token, little-endian

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that keep the output a prefix of valid JSON (ids the tokenizer does not
        have, a model's padding rows, never); ValueError when the grammar state is broken."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error():  # e.g. a dead end of the schema: the mask would allow EOS alone
            raise ValueError(f"JSON mode failed: {self.matcher.get_error().splitlines()[0]}")
        bits = torch.from_numpy(np.unpackbits(self.words.view(np.uint8), bitorder="little")).view(torch.bool)
        if vocab_size > bits.numel():
            return torch.cat([bits, bits.new_zeros(vocab_size - bits.numel())])
        return bits[:vocab_size]

    def allowed_after(self, drafts: list[int], vocab_size: int) -> torch.Tensor:
        """(K+1, vocab_size) bool: `allowed` at [pending, K drafts], column t after the drafts before it; the state
        is left as it was. From the first draft the grammar forbids (or one after a complete value, where the request
        stops) that draft's column repeats: the draft is rejected there, so no later column is sampled from."""
        known = list(itertools.takewhile(lambda token: token < self.vocab_size, drafts))  # others break the matcher
        columns = [self.allowed(vocab_size)]
        for token in known[: self.matcher.validate_tokens(known)]:
            if self.complete:  # a rollback cannot undo consuming EOS
                break
            self.matcher.consume_token(token)
            columns.append(self.allowed(vocab_size))
        self.matcher.rollback(len(columns) - 1)
        return torch.stack(columns + columns[-1:] * (len(drafts) + 1 - len(columns)))

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token (one the mask did not allow leaves the state broken: `allowed` says so)."""
        self.matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """Whether the output is a whole JSON value that nothing may extend."""
        return self.matcher.is_stopped() and not self.matcher.is_error()


class GrammarFormat:
    """Output held to a Lark grammar of llguidance's (`%json {schema}` in it for JSON of a schema), compiled for one
    tokenizer; `constraint()` gives each generation its own state."""

    def __init__(self, tokenizer: Tokenizer, lark: str):
        """InvalidSchema saying why when the grammar cannot be enforced (a schema in it llguidance refuses)."""
        self.vocab_size = tokenizer.vocab_size
        grammar_tokenizer = grammar_tokenizer_of(tokenizer)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as error:
            raise InvalidSchema(f"not a JSON Schema: {' '.join(str(error).split())[:MAX_MESSAGE_CHARS]}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer)
        if problem:
            raise InvalidSchema(f"JSON Schema not supported: {' '.join(problem.split())[:MAX_MESSAGE_CHARS]}")
        self.matcher = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)

    def constraint(self) -> JsonConstraint:
        """A fresh grammar state, at the start of the output."""
        return JsonConstraint(self.matcher.deep_copy(), self.vocab_size)


class JsonFormat(GrammarFormat):
    """A response format compiled for one tokenizer; `constraint()` gives each generation its own state."""

    def __init__(
        self, tokenizer: Tokenizer, schema: dict[str, Any] | bool | None = None, reasoning_start: str | None = None
    ):
        """Any JSON object when `schema` is None (OpenAI's json_object), else what the JSON Schema allows;
        InvalidSchema naming the fault otherwise. `reasoning_start`, for a server that parses reasoning: the reply's
        start the prompt gives (DeepSeek-R1's "<think>\\n"): the JSON is the answer after the reasoning
        (`after_reasoning`), as vLLM applies structured outputs once the reasoning ends."""
        self.vocab_size = tokenizer.vocab_size
        grammar_tokenizer = grammar_tokenizer_of(tokenizer)
        if schema is False:
            raise InvalidSchema("JSON Schema not supported: it allows no value that can be written (it is false)")
        if schema is True:  # JSON Schema's `true`: any value
            schema = {}
        if schema is not None and not isinstance(schema, dict):
            kind = type(schema).__name__
            raise InvalidSchema(f"not a JSON Schema: schema must be an object or a boolean, not {kind}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"} if schema is None else schema, defaults=LAYOUT
            )
        except ValueError as error:
            beyond = _integer_beyond_64_bits(schema)
            if beyond is not None:
                where, value = beyond
                raise InvalidSchema(f"JSON Schema not supported: {where} is {value}, beyond the 64-bit integers the "
                                    "grammar engine takes (-2**63 to 2**64-1): leave the keyword out or keep its "
                                    "value within them") from None  # fmt: skip
            raise InvalidSchema(f"not a JSON Schema: {error}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer)
        if problem:
            raise InvalidSchema(f"JSON Schema not supported: {' '.join(problem.split())[:MAX_MESSAGE_CHARS]}")
        self.matcher = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)
        first_step = self.matcher.deep_copy()
        first_step.compute_bitmask()
        if first_step.is_error():  # e.g. {"$ref": "#"}: a value of itself, without end
            reason = first_step.get_error().splitlines()[0]
            raise InvalidSchema(f"JSON Schema not supported: it allows no value that can be written ({reason})")
        if reasoning_start is not None:
            answer = json.loads(grammar)["grammars"][0]["json_schema"]  # the schema, LAYOUT in its x-guidance
            grammar = llguidance.LLMatcher.grammar_from_lark(
                after_reasoning(f"%json {json.dumps(answer)}", reasoning_start)
            )
            self.matcher = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)


def _integer_beyond_64_bits(value: Any, where: str = "schema") -> tuple[str, int] | None:
    """The first integer in `value` (a schema or part of it) that llguidance cannot take, as (its keyword's path,
    the integer): its schemas are read into 64-bit integers (i64 or u64), and a bound beyond them ("minimum":
    -10**30) is refused as "not JSON serializable"."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return where, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _integer_beyond_64_bits(item, f"{where}.{key}")
        if found is not None:
            return found
    return None


def after_reasoning(answer: str, reasoning_start: str) -> str:
    """The start of a Lark grammar (llguidance's) of an R1 reply whose answer is `answer` (a rule's body: `%json
    {schema}` for JSON of a schema, or a rule the rest of the grammar defines): the reasoning, free text up to the
    first </think>, then up to 4 blanks and the answer. A reply whose `reasoning_start` (the prompt's part) opens no
    <think> may also be the answer alone, as the reasoning parser reads it (`serve.reasoning`)."""
    close = THINK_CLOSE.replace("/", r"\/")
    rules = [f"reasoning[lazy]: /(?s:.*){close}/", f"blank: /{BLANK}{{0,4}}/", f"answer: {answer}"]
    if reasoning_start.lstrip().startswith(THINK_OPEN):
        return "\n".join(["start: reasoning blank answer", *rules])
    return "\n".join([f"start: answer | /{BLANK}{{0,4}}{THINK_OPEN}/ reasoning blank answer", *rules])


def grammar_tokenizer_of(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer`: the token-bytes trie, built once per tokenizer (~0.5-1.5 s for 129k tokens,
    holding the GIL: `seekstack serve` builds it as it starts, so that no first JSON request stalls every stream)."""
    with _build_lock:
        if tokenizer not in _grammar_tokenizers:
            _grammar_tokenizers[tokenizer] = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id
            )
        return _grammar_tokenizers[tokenizer]
