"""What the engine hands back: per-step outputs of a request, finished completions, load snapshots, and the
JSON record `seekstack generate --json` prints. Plain dataclasses, no torch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from seekstack.infer.engine import Engine


@dataclass(frozen=True)
class Logprob:
    """One token's entry of a `TokenLogprob` read as vLLM's dict: its log-probability, rank and text (vLLM's
    Logprob; its text None where the request asked for none, detokenize=False, as vLLM leaves it undecoded)."""

    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass
class TokenLogprob(Mapping[int, Logprob]):
    """The log-probability of a generated token under the model, and of the most likely alternatives; also vLLM's
    per-token dict, {token id: Logprob}, this token's first, then the alternatives not it, ranked 1, 2, ... as listed
    (`output.logprobs[i][token_id].logprob`)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token_id, token text, logprob), most likely first
    rank: int | None = None  # vLLM's Logprob.rank: 1 + the tokens likelier than this one
    decoded: ClassVar[bool] = True  # whether the texts were decoded (else "", and the dict's decoded_token None)

    def _by_id(self) -> dict[int, Logprob]:
        by_id = {self.token_id: Logprob(self.logprob, self.rank, self.token if self.decoded else None)}
        for rank, (token_id, text, logprob) in enumerate(self.top, start=1):
            by_id.setdefault(token_id, Logprob(logprob, rank, text if self.decoded else None))
        return by_id

    def __getitem__(self, token_id: int) -> Logprob:
        return self._by_id()[token_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_id())

    def __len__(self) -> int:
        return len(self._by_id())


@dataclass
class UndecodedTokenLogprob(TokenLogprob):
    """A `TokenLogprob` of a request that asked for token ids without text (detokenize=False): its texts are "" (its
    fields and `generate --json` as a decoded one's), and read as vLLM's dict its decoded_token is None, as vLLM's."""

    decoded: ClassVar[bool] = False


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]  # new tokens this step (several with speculative decoding)
    text: str  # new text: valid UTF-8 only, stop strings cut off
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int  # total so far
    scheduled_at: float | None  # time.perf_counter() when the request left the waiting queue; None if it never did
    error: str | None = None  # with finish_reason "error": why this request (alone) failed
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    cause: Exception | None = field(default=None, repr=False)  # the exception behind `error`, with its traceback
    # on a request's first output, with SamplingParams.prompt_logprobs: each prompt token's (the first: None)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # vLLM's: the stop token id or stop string that finished it (finish_reason "stop"); None for EOS and other ends
    stop_reason: int | str | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine's load, as `Engine.stats` returns it."""

    running: int
    waiting: int
    cache_usage: float  # fraction of cache blocks in use, 0..1
    prefill_tokens: int  # cumulative: prompt tokens fed to the model
    spec_drafted: int  # cumulative speculative-decoding counters
    spec_accepted: int
    preemptions: int = 0  # cumulative: running requests sent back to wait when the cache ran out of blocks
    running_adapters: tuple[str, ...] = ()  # the LoRA adapters running requests use, each once, by name
    waiting_adapters: tuple[str, ...] = ()  # those of waiting requests


@dataclass(frozen=True)
class CompletionOutput:
    """One sample of a prompt as vLLM's CompletionOutput: what `Completion.outputs` lists."""

    index: int  # which of its prompt's n samples it is
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # the sum of its tokens' log-probabilities; None without logprobs=True
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None  # the stop token id or stop string that ended it; None for EOS and other ends

    def finished(self) -> bool:
        """vLLM's CompletionOutput.finished(), a method (RequestOutput.finished is a bool): whether it has ended."""
        return self.finish_reason is not None


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    timings: dict[str, float]  # time_to_first_token_s, total_s, decode_tokens_per_s, compile_s
    error: str | None = None  # with finish_reason "error": why the request failed
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    index: int = 0  # which of its prompt's n samples it is (SamplingParams.n), as vLLM's CompletionOutput.index
    others: list[Completion] = field(default_factory=list)  # with n > 1, on the first sample: the samples after it
    # with SamplingParams.prompt_logprobs, as vLLM's RequestOutput.prompt_logprobs: per prompt token, the first None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # of `Engine.chat(tools=...)`: the calls the reply makes, OpenAI's dicts ([] for none; None without tools)
    tool_calls: list[dict] | None = None
    # the prompt's text, as vLLM's RequestOutput.prompt (a chat's: its rendered conversation); None for token ids
    prompt: str | None = None
    # vLLM's: the stop token id or stop string that ended it; None for EOS, a length limit and the other ends
    stop_reason: int | str | None = None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The prompt's n samples, this one first, as vLLM's RequestOutput.outputs (its `others` as Completions)."""
        names = [output_field.name for output_field in dataclasses.fields(CompletionOutput)]
        return [CompletionOutput(**{name: getattr(sample, name) for name in names}) for sample in (self, *self.others)]

    @property
    def finished(self) -> bool:
        """vLLM's RequestOutput.finished: whether the request has ended, which every completion `Engine.generate`
        returns has (its finish_reason says how: "length", "stop", "abort", "error")."""
        return self.finish_reason is not None

    @property
    def num_cached_tokens(self) -> int:
        """vLLM's RequestOutput.num_cached_tokens: the prompt tokens read from the prefix cache (`cached_tokens`)."""
        return self.cached_tokens

    @property
    def cumulative_logprob(self) -> float | None:
        """The log-probability of the whole completion, the sum of its tokens' (vLLM's `cumulative_logprob`); None
        without logprobs=True."""
        return math.fsum(entry.logprob for entry in self.logprobs) if self.logprobs is not None else None


def joined_completion(
    request_id: str,
    prompt_ids: list[int],
    parts: list[RequestOutput],
    started: float,
    first: float,
    end: float,
    compile_seconds: float = 0.0,
    index: int = 0,
    prompt: str | None = None,
) -> Completion:
    """One request's outputs joined into a `Completion`, timed from `started` (added), `first` (its first output)
    and `end` (its last), all time.perf_counter() seconds; `compile_seconds` of its decode steps went to compiling a
    graph (a first run with --compile), which the decode speed leaves out and `compile_s` reports; `index`: which of
    its prompt's samples it is; `prompt`: the prompt's text, where it was given as one."""
    tokens = [token for part in parts for token in part.token_ids]
    logprobs = [entry for part in parts for entry in part.logprobs] if parts[-1].logprobs is not None else None
    decode_seconds = end - first - compile_seconds
    timings = {
        "time_to_first_token_s": first - started,
        "total_s": end - started,
        # the tokens after the first; none when the request ended with no token (an error)
        "decode_tokens_per_s": max(len(tokens) - 1, 0) / decode_seconds if decode_seconds > 0 else 0.0,
        "compile_s": compile_seconds,
    }
    text, last = "".join(p.text for p in parts), parts[-1]
    return Completion(
        request_id, prompt_ids, tokens, text, last.finish_reason, logprobs, timings, last.error, last.cached_tokens,
        index, prompt_logprobs=parts[0].prompt_logprobs, prompt=prompt, stop_reason=last.stop_reason,
    )  # fmt: skip


def completion_record(engine: Engine, completion: Completion) -> dict:
    """A JSON-ready summary of a completion: text, tokens, finish reason, timings, speculative acceptance."""
    record = {
        "model": engine.model_name,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
        "prompt_tokens": len(completion.prompt_token_ids),
        "completion_tokens": len(completion.token_ids),
        "token_ids": completion.token_ids,
        "timings": completion.timings,
    }
    if completion.error is not None:
        record["error"] = {"message": completion.error}
    if completion.logprobs is not None:
        record["logprobs"] = [dataclasses.asdict(entry) for entry in completion.logprobs]
    if completion.prompt_logprobs is not None:  # vLLM's: per prompt token, the first null
        record["prompt_logprobs"] = [entry and dataclasses.asdict(entry) for entry in completion.prompt_logprobs]
    if engine.speculative:
        stats = engine.stats()
        rate = stats.spec_accepted / stats.spec_drafted if stats.spec_drafted else 0.0
        record["speculative"] = {"drafted": stats.spec_drafted, "accepted": stats.spec_accepted, "accept_rate": rate}
    return record
