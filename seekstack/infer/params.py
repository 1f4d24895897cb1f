"""What a request asks for (`SamplingParams`) and how an engine runs (`EngineOptions`): typed configs with
their defaults, written once here for the engine, the command line and the server. No torch at import."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Interval, MaxLen, MinLen

from seekstack.schema import (
    ConfigError,
    NonNegative,
    Positive,
    PositiveFloat,
    check,
    check_set_fields,
    recheck,
    require,
    shown_value,
)

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperature
DEFAULT_MAX_NEW_TOKENS = 128
# fields vLLM's SamplingParams defaults to None, read as our defaults when given so (no stop, no bias, no logprobs)
VLLM_NONE_DEFAULTS = {"stop": tuple, "stop_token_ids": tuple, "logit_bias": dict, "logprobs": bool, "bad_words": tuple}
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: -100 bans a token, +100 as good as forces it
MAX_BAD_WORDS = 300  # vLLM sets none; each word is matched in Python at every step the request shares with others
DTYPES = ("auto", "float32", "bfloat16", "float16")
BYTE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """A size such as "4GiB", "512MiB", "2GB" or "1000000" in bytes; ValueError naming the text otherwise (a non-number,
    inf, nan, less than one byte)."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number) :].upper()
    try:
        size = float(number) * {"": 1, **{name.upper(): value for name, value in BYTE_UNITS.items()}}[unit]
    except (ValueError, KeyError):
        units = ", ".join(BYTE_UNITS)
        raise ValueError(f"size {text!r}: expected a number with an optional unit ({units})") from None
    if not math.isfinite(size):
        raise ValueError(f"size {text!r} is not a finite number of bytes")
    if size < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(size)


VLLM_FORM_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "logit_bias", "logprobs", "top_logprobs", "seed", "bad_words",
)  # fmt: skip
RANDOM_SEED = -1  # vLLM's seed=-1 (and llama-cli's --seed -1): no seed, each run samples anew
MAX_SEED = 2**64  # torch's seeds and SeededUniforms' are taken modulo 2**64: seed s and s + 2**64 draw alike


class _NotGiven:
    """SamplingParams' max_tokens= left out: vLLM's max_tokens=None says something (up to the context)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


def min_tokens_limit(length_name: str, length: int) -> str:
    """What a min_tokens above the reply's length must be, naming the length as the caller gave it."""
    return f"at most {length_name} ({length}), as vLLM's: no reply reaches more"


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request seeded `seed`: seed + index, wrapped within torch's seed range (seed s
    and s + 2**64 draw alike), a -1 so derived as 2**64 - 1 (its same draws, not vLLM's random seed); None for a
    request without a seed (None, or vLLM's -1)."""
    if seed is None or seed == RANDOM_SEED:
        return None
    derived = seed + index - (MAX_SEED if seed + index >= MAX_SEED else 0)
    return MAX_SEED - 1 if derived == RANDOM_SEED else derived


STRUCTURED_OUTPUT_HERE = (
    "hold a request to JSON, or to a JSON Schema, with engine.add_request(ids, params, "
    "constraint=JsonFormat(engine.tokenizer, schema).constraint()) (seekstack.infer.json_mode), as serve's "
    "response_format does"
)
# vLLM SamplingParams fields not taken here, and why: refused naming the field, not a bare unexpected keyword
VLLM_FIELDS_NOT_TAKEN = {
    "logits_processors": "per-request Python logits processors do not run in the engine's batched (and compiled) "
    "step; ban or favour tokens with logit_bias, allowed_token_ids or bad_words",
    **dict.fromkeys(
        ("structured_outputs", "guided_decoding", "guided_json", "guided_regex", "guided_choice", "guided_grammar"),
        STRUCTURED_OUTPUT_HERE,
    ),
    "best_of": "generate returns every sample it draws, none ranked away (the server's best_of ranks them): draw "
    "n=best_of with logprobs=True and keep the n of highest .cumulative_logprob (best_of equal to n is taken)",
}

# vLLM SamplingParams fields taken at vLLM's default alone, which asks for what the engine does anyway: name -> (that
# default as said, whether a value is it, why another is refused)
VLLM_FIELDS_AT_DEFAULT: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "spaces_between_special_tokens": (
        "True", lambda value: value is True,
        "a text is the tokenizer's decode of its tokens, special or not, with no other joining of special tokens",
    ),
    "output_kind": (
        "RequestOutputKind.CUMULATIVE (0) or None",
        lambda kind: kind is None or getattr(kind, "name", None) == "CUMULATIVE" or (type(kind) is int and kind == 0),
        "generate and chat return each whole reply, and stream and step() hand out each request's new tokens, "
        "whatever a request asks",
    ),
    "extra_args": (
        "None or {}", lambda value: value is None or value == {},
        "they feed vLLM's custom sampling plugins and logits processors, none of which run here",
    ),
}  # fmt: skip


def refuse_vllm_fields_not_taken(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without vLLM's SamplingParams fields not taken here given None (vLLM's default for each: not given),
    best_of given n (its meaning of None), or those of VLLM_FIELDS_AT_DEFAULT given that default; ConfigError naming
    the first such field given another value, saying why (best_of below n: that it must be at least n, as vLLM's
    says)."""
    n = values.get("n", 1)
    for name, value in values.items():
        if name in VLLM_FIELDS_AT_DEFAULT:
            default, is_default, why = VLLM_FIELDS_AT_DEFAULT[name]
            if not is_default(value):
                raise ConfigError(f"has value {shown_value(value)}: must be vLLM's default, {default}: {why}", name)
        if name == "best_of" and type(value) is int and value == n:
            continue
        if name == "best_of" and type(value) is int and type(n) is int and value < n:
            raise ConfigError(
                f"has value {value}, below n ({n}): must be at least n, as vLLM's (the n returned are chosen among "
                "best_of samples); leave best_of out or give it n",
                field=name,
            )
        if name in VLLM_FIELDS_NOT_TAKEN and value is not None:
            why = VLLM_FIELDS_NOT_TAKEN[name]
            raise ConfigError(
                f"has value {shown_value(value)}: must be None (left out), vLLM's field not taken here: {why}", name
            )
    return {
        name: value
        for name, value in values.items()
        if name not in VLLM_FIELDS_NOT_TAKEN and name not in VLLM_FIELDS_AT_DEFAULT
    }


def read_vllm_forms(values: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams values with vLLM's forms of them read as ours: max_tokens (its name for max_new_tokens; None: the
    room the prompt leaves in the context), None for no stop, stop ids, bias or logprobs (VLLM_NONE_DEFAULTS), a lone
    stop string, logprobs=k (logprobs=True with top_logprobs=k), seed=-1 (no seed, as vLLM's); ConfigError naming the
    field when one is out of range or contradicts another given. vLLM's fields not taken here are refused before, by
    from_dict and the constructor (refuse_vllm_fields_not_taken); __post_init__ reads the fields alone."""
    values = dict(values)
    if type(values.get("seed")) is int and values["seed"] == RANDOM_SEED:
        values["seed"] = None
    max_tokens = values.pop("max_tokens", NOT_GIVEN)
    if max_tokens is not NOT_GIVEN:
        max_new_tokens = values.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        whole = isinstance(max_tokens, numbers.Integral) and not isinstance(max_tokens, bool)  # numpy's int too
        require(max_tokens is None or (whole and max_tokens >= 1), "max_tokens", f"an int of at "
                f"least 1 (vLLM's name for max_new_tokens) or None (to the context's end), not "
                f"{max_tokens!r}")  # fmt: skip
        require(max_new_tokens in (max_tokens, DEFAULT_MAX_NEW_TOKENS), "max_tokens", f"left out with "
                f"max_new_tokens={max_new_tokens}: it is vLLM's name for it; give one")  # fmt: skip
        min_tokens = values.get("min_tokens", 0)
        require(max_tokens is None or type(min_tokens) is not int or min_tokens <= max_tokens, "min_tokens",
                min_tokens_limit("max_tokens", max_tokens))  # fmt: skip
        values["max_new_tokens"] = max_tokens
    for name, default in VLLM_NONE_DEFAULTS.items():
        if name in values and values[name] is None:
            values[name] = default()
    if isinstance(values.get("stop"), str):  # one stop string given alone, as vLLM's SamplingParams and OpenAI's API
        values["stop"] = (values["stop"],)
    logprobs = values.get("logprobs")
    if type(logprobs) is int:  # vLLM's logprobs=k: the sampled token's and the k likeliest (0: its alone)
        require(0 <= logprobs <= MAX_TOP_LOGPROBS, "logprobs", f"True, False or, as vLLM's, how many top "
                f"log-probabilities each token lists, 0 to {MAX_TOP_LOGPROBS}")  # fmt: skip
        require(values.get("top_logprobs", 0) == 0, "top_logprobs", f"left out with vLLM's logprobs={logprobs}, "
                "which sets it (or give logprobs=True)")  # fmt: skip
        values["logprobs"], values["top_logprobs"] = True, logprobs
    return values


@dataclass
class SamplingParams:
    """How to sample one request. `validate()` returns a checked copy or raises a ConfigError naming the field."""

    # vLLM's max_tokens, which sets it too; None (vLLM's max_tokens=None): the room the prompt leaves in the context
    max_new_tokens: Positive | None = DEFAULT_MAX_NEW_TOKENS
    temperature: Annotated[float, Interval(ge=0, le=100)] = 1.0  # 0 (or below 1e-5) -> greedy
    top_k: Annotated[int, Ge(-1)] = 0  # 0 or -1 (vLLM's off, its former default) -> off; validate() gives 0
    top_p: Annotated[float, Interval(gt=0, le=1)] = 1.0
    min_p: Annotated[float, Interval(ge=0, le=1)] = 0.0
    repetition_penalty: PositiveFloat = 1.0  # vLLM/HF semantics: divide positive logits, multiply negative ones
    presence_penalty: Annotated[float, Interval(ge=-2, le=2)] = 0.0  # OpenAI semantics
    frequency_penalty: Annotated[float, Interval(ge=-2, le=2)] = 0.0
    # token id -> added to its logit before anything else (OpenAI semantics); the engine checks ids against its vocab
    logit_bias: dict[Annotated[int, Ge(0)], Annotated[float, Interval(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]] = (
        field(default_factory=dict)
    )
    # as vLLM's: only these token ids may be sampled (None: any); the engine checks them against its vocab
    allowed_token_ids: tuple[Annotated[int, Ge(0)], ...] | None = None
    # as vLLM's: these words are never sampled (a word's last token banned after its others: sampling.BadWords)
    bad_words: Annotated[tuple[Annotated[str, MinLen(1)], ...], MaxLen(MAX_BAD_WORDS)] = ()
    # as vLLM's: the prompt's last k tokens alone (left truncation); -1: its last max_model_len; None: all of it
    truncate_prompt_tokens: Annotated[int, Ge(-1)] | None = None
    # per-request generator: same seed -> same output, whatever else is in the batch; torch takes [-2**63, 2**64);
    # -1, as vLLM's (llama-cli's --seed -1): None, a new seed each run
    seed: Annotated[int, Interval(ge=-(2**63), lt=MAX_SEED)] | None = None
    stop_token_ids: tuple[Annotated[int, Ge(0)], ...] = ()  # the tokenizer's EOS always stops unless ignore_eos
    stop: tuple[Annotated[str, MinLen(1)], ...] = ()  # matched on detokenized text (may span tokens); not in the output
    include_stop_str_in_output: bool = False  # True: the text ends with the stop string found, as vLLM's
    # not None: stop strings match only after the reasoning, <think> ... </think>, that this text (the reply's start
    # given in the prompt, a chat prefix's; "" for none) and the reply open with (serve --reasoning-parser)
    stop_after_reasoning: str | None = None
    logprobs: bool = False  # an int k, as vLLM's: True with top_logprobs=k
    top_logprobs: Annotated[int, Interval(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    # as vLLM's: the log-probability of each prompt token after the ones before it (the first: None), with the k
    # likeliest there; None: not computed. Such a prompt is computed whole (no prefix-cache hit)
    prompt_logprobs: Annotated[int, Interval(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    ignore_eos: bool = False
    # as vLLM's: EOS and stop_token_ids cannot be sampled, and stop strings do not match, before this many tokens
    min_tokens: NonNegative = 0
    skip_special_tokens: bool = True  # leave special tokens (<｜User｜>, ...) out of the text, as vLLM's default does
    # False: outputs carry token ids only, text "" and logprobs' token texts "" (as vLLM's), for callers that decode
    detokenize: bool = True
    n: Positive = 1  # samples of each prompt `Engine.generate` returns (Completion.outputs, as vLLM's); i: seed + i

    def __post_init__(self) -> None:
        """ConfigError naming a field whose value is out of its type or range, at once, as vLLM's SamplingParams
        raises (temperature=-1 was refused only at generate); validate() adds the rules across fields."""
        given = {name: getattr(self, name) for name in VLLM_FORM_FIELDS}
        for name, value in read_vllm_forms(given).items():
            setattr(self, name, value)
        check_set_fields(self)

    @property
    def max_tokens(self) -> int | None:
        """vLLM's name for max_new_tokens, no field of its own (fields(), from_dict and dataclasses.replace see
        max_new_tokens alone): reading it gives max_new_tokens, setting it sets max_new_tokens, checked as the
        constructor's max_tokens= is (its value alone: as vLLM's, min_tokens is checked against it at use, by
        validate(), so the two can be set in either order)."""
        return self.max_new_tokens

    @max_tokens.setter
    def max_tokens(self, value: int | None) -> None:
        self.max_new_tokens = read_vllm_forms({"max_tokens": value})["max_new_tokens"]

    def clone(self) -> SamplingParams:
        """A deep copy, as vLLM's SamplingParams.clone(): changing it (its max_tokens, its stop list or logit_bias in
        place) leaves this one as it was."""
        return copy.deepcopy(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Parameters from a mapping (e.g. a JSON request); ConfigError naming an unknown key or a bad value. vLLM's
        forms are read as the constructor reads them (`read_vllm_forms`: max_tokens, logprobs=k, a lone stop string,
        None for no stop, bias or logprobs)."""
        return check(cls, read_vllm_forms(refuse_vllm_fields_not_taken(values)))

    def validate(self) -> SamplingParams:
        """This request's parameters, checked: types and ranges of every field."""
        params = recheck(self)
        if params.top_k == -1:
            params = dataclasses.replace(params, top_k=0)
        require(params.allowed_token_ids != (), "allowed_token_ids", "at least one id, or None for any, as vLLM's: "
                "with none allowed no token can be sampled")  # fmt: skip
        require(all(word.strip() for word in params.bad_words), "bad_words", "words holding more than spaces, as "
                "each is encoded without its leading ones")  # fmt: skip
        require(params.truncate_prompt_tokens != 0, "truncate_prompt_tokens", "at least 1 (the prompt's last k "
                "tokens), -1 for its last max_model_len, or None for all of it: an empty prompt has nothing to "
                "continue")  # fmt: skip
        require(params.detokenize or not params.stop, "stop", "empty with detokenize=False (stop strings match text)")
        require(params.max_new_tokens is None or params.min_tokens <= params.max_new_tokens, "min_tokens",
                min_tokens_limit("max_new_tokens/max_tokens", params.max_new_tokens))  # fmt: skip
        require(params.logprobs or not params.top_logprobs, "top_logprobs", "0 without logprobs=True (as OpenAI's "
                "top_logprobs needs logprobs): no log-probabilities are returned without it")  # fmt: skip
        return params

    def samples(self) -> list[SamplingParams]:
        """The parameters of each of the n samples, one apiece: sample i seeded `sample_seed(seed, i)`, as the server
        seeds a request's choices; unseeded ones each take their own seed."""
        return [dataclasses.replace(self, n=1, seed=sample_seed(self.seed, i)) for i in range(self.n)]

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 decode greedily, as in vLLM: dividing by less would overflow the logits."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether any repetition, presence or frequency penalty is set."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _taking_max_tokens(init: Callable[..., None]) -> Callable[..., None]:
    """SamplingParams' __init__ that takes vLLM's max_tokens= too, read as from_dict reads it (`read_vllm_forms`):
    max_new_tokens set to it, an unequal max_new_tokens beside it refused, but for dataclasses.replace's call."""
    every_field = {field.name for field in dataclasses.fields(SamplingParams)}

    @functools.wraps(init)
    def __init__(self: SamplingParams, *args: Any, max_tokens: int | None = NOT_GIVEN, **kwargs: Any) -> None:
        if max_tokens is not NOT_GIVEN and not args and kwargs.keys() >= every_field:
            kwargs.pop("max_new_tokens")  # dataclasses.replace(params, max_tokens=k) passes every field, the old length
        kwargs = refuse_vllm_fields_not_taken(kwargs)  # not Python's bare "unexpected keyword argument"
        given = kwargs if max_tokens is NOT_GIVEN else read_vllm_forms({**kwargs, "max_tokens": max_tokens})
        init(self, *args, **given)  # __post_init__ reads vLLM's other forms

    fields_only = inspect.signature(init)
    taken = inspect.Parameter("max_tokens", inspect.Parameter.KEYWORD_ONLY, default=NOT_GIVEN, annotation="int | None")
    __init__.__signature__ = fields_only.replace(parameters=[*fields_only.parameters.values(), taken])  # type: ignore[attr-defined]
    return __init__


SamplingParams.__init__ = _taking_max_tokens(SamplingParams.__init__)  # type: ignore[method-assign]


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest(lora_name, lora_int_id, lora_path), which `Engine.generate` and `chat` take as lora_request
    (vLLM's own too): the adapter in `lora_path` served as `lora_name`, loaded on first use; `lora_int_id`, vLLM's
    cache key, is not read here (the name is)."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str | Path = ""


MAX_DRAFT_TOKENS = 16  # speculative drafts a step at most (bench/speculative.py measured 1 to 6)
DRAFT_TOKENS_LIMIT = (
    f"at most {MAX_DRAFT_TOKENS} (each draft is another MTP forward a step, the engine times every draft count at "
    "start-up, and past a few drafts few are accepted)"
)


@dataclass
class EngineOptions:
    """How an engine runs a checkpoint: what `generate`, `chat` and `serve` set from their options."""

    max_batch_size: Positive = 16  # requests decoded together
    max_model_len: Positive | None = None  # prompt + completion tokens per request; None: the model's context
    speculative: bool = False  # MTP speculative decoding (the model needs an MTP module)
    draft_tokens: Positive = 3  # with speculative decoding: tokens the MTP module drafts per step
    adaptive_drafts: bool = True  # draft_tokens is the most: each step drafts 0..most by acceptance and batch
    draft_vocab: NonNegative = 1024  # drafts score only this many most frequent tokens (FR-Spec); 0: all
    compile: bool | None = None  # decode steps through torch.compile: always, never, None: once it pays (Engine)
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto: bf16 where the devices run this model faster in it
    device: str = "cpu"  # where the model runs: cpu, cuda, cuda:N, or auto: cuda:0 where torch reaches a GPU, else cpu
    kv_cache_memory: str | None = None  # latent-cache budget, e.g. "4GiB"; None: half the free device memory
    prefix_caching: bool = True  # share the cache blocks of prompt prefixes between requests
    device_map: str | None = None  # parts on devices (seekstack.infer.placement): "*=cuda:0,layers.*.mlp.experts=cpu"
    offload_dir: str | None = None  # where copies of disk-placed weights go; None: the checkpoint's offload/

    def validate(self) -> EngineOptions:
        options = recheck(self)
        require(options.draft_tokens <= MAX_DRAFT_TOKENS, "draft_tokens", DRAFT_TOKENS_LIMIT)
        require(options.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}")
        placed = options.device_map is not None
        require(not (placed and options.compile), "compile", "off with a device map (--device-map, device_map=): a "
                "placed model runs eagerly")  # fmt: skip
        require(options.offload_dir is None or placed, "offload_dir", "left out without a device map (--device-map, "
                "device_map=): it holds the copies of parts placed on disk")  # fmt: skip
        require(not placed or options.device == "cpu", "device", "left out with a device map (--device-map, "
                "device_map=), which says where each part runs")  # fmt: skip
        if options.device != "cpu":
            options.resolved_device()  # a name that is no device, or one torch cannot reach, is refused now
        if placed:
            from seekstack.infer.placement import named_devices

            try:
                named_devices(options.device_map)  # its devices (and an auto: map's budgets); its parts need the model
            except ValueError as error:
                raise ConfigError(str(error), field="device_map") from None
        if options.kv_cache_memory is not None:
            try:
                parse_bytes(options.kv_cache_memory)
            except ValueError as error:
                require(False, "kv_cache_memory", f"a size such as 4GiB ({error})")
        return options

    def resolved_dtype(self, model_dir: str | Path | None = None) -> tuple[str, str]:
        """The dtype the engine runs in and why: `auto` decided for the devices of the device map and the size of the
        checkpoint in `model_dir` (None: taken as large) by seekstack.infer.precision, any other value as given."""
        from seekstack.infer.precision import auto_dtype, checkpoint_parameters

        if self.dtype != "auto":
            return self.dtype, "asked for"
        parameters = checkpoint_parameters(model_dir) if model_dir is not None else None
        dtype, reason = auto_dtype(self.devices(), parameters)
        return dtype, f"auto: {reason}"

    def devices(self) -> list[str]:
        """The devices the model computes on: the device map's (`map_devices`), else `device`."""
        from seekstack.infer.precision import map_devices

        return map_devices(self.device_map) if self.device_map is not None else [self.resolved_device()]

    def resolved_device(self) -> str:
        """The device the model runs on, named as a device map names it (cpu, cuda:N; auto: cuda:0 where torch
        reaches a GPU, else cpu); ConfigError naming `device` when it is no such name or torch cannot reach it."""
        from seekstack.infer.placement import resolve_device

        try:
            return resolve_device(self.device)
        except ValueError as error:
            raise ConfigError(f"has value {self.device!r}: {error}", field="device") from None

    def engine_kwargs(self, model_dir: str | Path | None = None) -> dict[str, Any]:
        """The keyword arguments of `Engine.from_pretrained` for the checkpoint in `model_dir` (its size decides
        an `auto` dtype; None: taken as large)."""
        import torch

        options = self.validate()
        return dict(
            dtype=getattr(torch, options.resolved_dtype(model_dir)[0]), max_batch_size=options.max_batch_size,
            max_model_len=options.max_model_len, speculative=options.speculative,
            draft_tokens=options.draft_tokens, adaptive_drafts=options.adaptive_drafts,
            draft_vocab=options.draft_vocab, compile=options.compile,
            prefix_caching=options.prefix_caching,
            kv_cache_memory=parse_bytes(options.kv_cache_memory) if options.kv_cache_memory else None,
            device_map=options.device_map, offload_dir=options.offload_dir, device=options.resolved_device(),
        )  # fmt: skip
