"""seekstack as an lm-evaluation-harness model: `lm_eval --model seekstack --model_args pretrained=DIR`.

Log-likelihoods run the model's forward directly (right-padded batches, float32 log-softmax); generation runs on
the inference engine (all requests batched, stop strings matched on the streamed text, each sampled request seeded
from torch's generator, which lm_eval seeds). Tokenization and the
request-to-window bookkeeping are lm_eval's own (`TemplateLM._encode_pair`, its rolling windows), so per-request
log-likelihoods are those of lm_eval's HF backend on the same checkpoint loaded through transformers.

Shapes: B requests in a batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm_eval lists its own backends only into an empty registry: before ours)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from seekstack.accounting import main_parameters
from seekstack.adapters.files import merged_model, model_folders
from seekstack.checkpoint import load_pretrained, read_config
from seekstack.infer.engine import Engine, check_tokenizer_fits
from seekstack.infer.generation_config import sampling_defaults
from seekstack.infer.outputs import Completion
from seekstack.infer.params import SamplingParams
from seekstack.schema import ConfigError, refuse_a_non_bool
from seekstack.tokenizer import Tokenizer

# A scoring request as TemplateLM hands it over: (request strings or None, context ids, continuation ids).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]
# SamplingParams fields generate_until sets itself: from lm_eval's `until` and `max_gen_toks`, the seed per request,
# and the plain text lm_eval takes back
HARNESS_SETS = ("max_new_tokens", "stop", "seed", "logprobs", "top_logprobs", "detokenize")
GENERATION_KWARGS = tuple(field.name for field in fields(SamplingParams) if field.name not in HARNESS_SETS)
LM_EVAL_GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample")  # left after lm_eval's normalize_gen_kwargs
# What transformers' generate samples with where neither the request nor generation_config.json says (its global
# defaults), so the HF backend's sampled requests draw from the 50 likeliest tokens
TRANSFORMERS_SAMPLING_DEFAULTS = {"top_k": 50}
AUTO_MAX_BATCH_SIZE = 64  # where batch_size="auto" starts looking, as lm_eval's HF backend's max_batch_size does


def resolve_device(device: str | None) -> torch.device:
    """`device`, by default CUDA when there is one, else the CPU; a CUDA device on a machine without CUDA (lm_eval's
    own command line defaults to cuda:0) falls back to the CPU with a warning, as lm_eval's HF backend does. ValueError
    for a name that is no torch device, and for a device of another kind (mps, xpu, ...) this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:  # how torch refuses a name that is no device
        raise ValueError(f"device {device!r} is not a torch device name (cuda, cuda:1, cpu): {error}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {device!r}: CUDA is not available here, running on the CPU", stacklevel=2)
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if chosen.type not in ("cpu", "cuda", accelerator and accelerator.type):
        present = ", ".join(["cpu", *([accelerator.type] if accelerator else [])])
        raise ValueError(f"device {device!r}: this machine has no {chosen.type} device; it has {present}")
    return chosen


def requests_per_batch(batch_size: int | str) -> int | None:
    """lm_eval's `batch_size` as a number of requests, or None for "auto" ("auto:N" too, lm_eval's HF backend's
    re-detection): the largest batch the device holds, found as the requests come; ConfigError (field batch_size)
    for anything else."""
    if isinstance(batch_size, int) or batch_size.isdigit():
        if int(batch_size) < 1:
            raise ConfigError(f": {batch_size}: give at least 1 request per batch, or auto", "batch_size")
        return int(batch_size)
    head, _, times = batch_size.partition(":")
    if head == "auto" and (not times or times.isdigit()):
        return None
    raise ConfigError(f": {batch_size!r}: give a number of requests per batch, or auto", "batch_size")


def check_max_length(max_length: int | None, weights: Path) -> None:
    """ValueError for a model arg `max_length` (None or 0: the model's context) that is negative or longer than the
    context of the checkpoint in `weights`, as vLLM refuses a max_model_len past the model's."""
    if max_length is not None and max_length < 0:
        raise ValueError(
            f"max_length={max_length}: the tokens the model reads at once cannot be negative; give a positive number, "
            "or leave it out (or 0) for the model's context"
        )
    context = read_config(weights).max_position_embeddings
    if max_length and max_length > context:
        raise ValueError(
            f"max_length={max_length} is longer than the model's context, max_position_embeddings={context} in "
            f"{weights / 'config.json'}: positions past it were never trained; give at most {context}, or leave it "
            "out for the model's context"
        )


def request_seeds(requests: list) -> list[int]:
    """A sampling seed per generate_until request: a hash of one draw from torch's generator (which lm_eval seeds)
    and the request's task, document, index and context, plus its repeat (lm_eval repeats a request k times for
    k samples); so a request samples the same text on every seeded run, whatever other requests run beside it."""
    base = int(torch.randint(2**62, ()))
    repeats: collections.Counter = collections.Counter()
    seeds = []
    for request in requests:
        key = (request.task_name, request.doc_id, request.idx, request.args[0])
        digest = hashlib.blake2b(repr((base, key, repeats[key])).encode(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little"))
        repeats[key] += 1
    return seeds


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """A tokenizer's special tokens under transformers' names: what lm_eval reads from a backend's `tokenizer` into
    its results JSON (tokenizer_pad_token, tokenizer_eos_token, tokenizer_bos_token), as the HF backend's holds them."""

    pad_token: str
    pad_token_id: int
    eos_token: str
    eos_token_id: int
    bos_token: str
    bos_token_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> SpecialTokens:
        """`tokenizer`'s pad token, EOS and BOS, each as its text and its id."""
        pad_token = tokenizer.backend.id_to_token(tokenizer.pad_id)
        return cls(pad_token, tokenizer.pad_id, tokenizer.eos_token, tokenizer.eos_id,
                   tokenizer.bos_token, tokenizer.bos_id)  # fmt: skip


@register_model("seekstack")
class SeekstackLM(TemplateLM):
    """A seekstack checkpoint directory (config.json, safetensors, tokenizer.json) as an lm_eval `LM`."""

    def __init__(
        self,
        pretrained: str | Path,
        tokenizer: str | Path | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        device: str | None = None,
        peft: str | Path | None = None,
        think_end_token: str | int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        trust_remote_code: bool = False,
        **unknown: object,
    ):
        """`pretrained`: a checkpoint folder, or a run's out_dir for its newest checkpoint (a `lora train` run or
        adapter checkpoint: the base its adapter records, with the adapter as `peft`), as `seekstack eval` reads them.
        `peft`: a LoRA adapter folder (peft's format) merged into the model, as the HF backend's `peft` arg.
        `think_end_token`: the text (or token id) that ends a reasoning model's thinking; a generation is scored on
        what follows its last one, as the HF backend's arg. `add_bos_token`: the HF backend's, whether a context or text
        is framed by the tokenizer's post-processor (a DeepSeek release's puts BOS first; None: as the tokenizer
        frames it, True the same, False never). `prefix_token_id`: the HF backend's, the token an empty context and the
        first rolling window condition on (default BOS). `trust_remote_code`: taken, as HF model args carry it, and
        without effect: seekstack runs no code from a checkpoint. Any other model arg is refused, naming those taken."""
        if unknown:
            taken = [name for name in inspect.signature(SeekstackLM).parameters if name != "unknown"]
            raise ValueError(
                f"model args {', '.join(map(repr, sorted(unknown)))}: not taken by the seekstack backend; it takes "
                f"{', '.join(taken)}"
            )
        # lm_eval's --model_args hands on a value it cannot read as a number or true/false as text
        counts = dict(
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            max_batch_size=max_batch_size,
            prefix_token_id=prefix_token_id,
        )
        least = dict(max_gen_toks=1, max_batch_size=1)  # max_length's and prefix_token_id's bounds: checked below
        for name, value in counts.items():
            if value is not None and type(value) is not int:
                raise ValueError(f"model arg {name}={value!r}: give a whole number")
            if value is not None and value < least.get(name, value):  # before the weights load
                raise ValueError(f"model arg {name}={value}: give at least {least[name]}, or leave it out")
        if add_bos_token is not None:  # "no" would frame every context with BOS
            refuse_a_non_bool("model arg add_bos_token", add_bos_token)
        super().__init__()
        self.batch_size_per_step = requests_per_batch(batch_size)  # None: auto
        self._device = resolve_device(device)
        weights, adapter, own_tokenizer = model_folders(pretrained)
        check_max_length(max_length, weights)
        if adapter is not None and peft is not None:
            raise ValueError(
                f"pretrained={pretrained} is a LoRA adapter on the base {weights}; give that base as pretrained to "
                f"merge peft={peft} into it"
            )
        measured = adapter or weights
        if Path(pretrained) != measured or adapter is not None:
            print(f"pretrained={pretrained}: using {measured}" + (f" on its base {weights}" if adapter else ""),
                  file=sys.stderr)  # fmt: skip
        peft = peft or adapter
        self.tokenizer_ = Tokenizer.from_file(tokenizer or own_tokenizer)
        self.tokenizer = SpecialTokens.of(self.tokenizer_)  # lm_eval records them with the results, and max_length
        check_tokenizer_fits(self.tokenizer_, read_config(weights).vocab_size, weights)  # before the weights load
        if prefix_token_id is not None and not 0 <= prefix_token_id < self.tokenizer_.vocab_size:
            raise ValueError(
                f"prefix_token_id={prefix_token_id} is no token id of the tokenizer (0 to "
                f"{self.tokenizer_.vocab_size - 1}); give one, or leave it out for BOS"
            )
        self.model = load_pretrained(weights, dtype=dtype, device=self._device)
        self.generation_defaults = sampling_defaults(weights)  # generation_config.json's, read as transformers reads it
        self.model = (self.model if peft is None else merged_model(self.model, peft)).eval()
        self.max_length = max_length or self.model.config.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self.max_batch_size = max_batch_size or self.batch_size_per_step or AUTO_MAX_BATCH_SIZE
        self.pretrained = str(measured)
        digits = isinstance(think_end_token, str) and think_end_token.isdigit()
        self.think_end_token = int(think_end_token) if digits else think_end_token  # a token id, as HF reads it
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id

    @functools.cached_property
    def engine(self) -> Engine:
        """The engine generate_until runs on, made for the first generation request: log-likelihoods need none, so a
        model the engine cannot serve (attention_variant=3d) is still scored, and no KV cache is held for them."""
        return Engine(self.model, self.tokenizer_, max_batch_size=self.max_batch_size)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) conditions on: the model arg `prefix_token_id`, else
        BOS, as the HF backend uses."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer_.bos_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's path with "/" as "__" (lm_eval's HF backend's form): part of the name of a request cache."""
        return self.tokenizer_.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja form of the chat template `apply_chat_template` renders (lm_eval records it with the results):
        DeepSeek's, or a DeepSeek-V2 chat release's own (`Tokenizer.jinja_chat_template`); None when no chat template
        is asked for. The checkpoint has this one template: a name is refused."""
        if isinstance(chat_template, str):
            raise ValueError(
                f"--apply_chat_template {chat_template!r}: the seekstack backend has one chat template, DeepSeek's; "
                "give --apply_chat_template without a name"
            )
        return self.tokenizer_.jinja_chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """`chat_history` in the DeepSeek chat template as seekstack's chat and server render it. Without
        `add_generation_prompt` the last message, an assistant's (lm_eval's gen_prefix), is left open for the model
        to continue, as transformers' continue_final_message leaves it."""
        return self.tokenizer_.render_chat(
            chat_history, add_generation_prompt, continue_final_message=not add_generation_prompt
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        """Token ids of `string` as the HF backend encodes them: framed by the tokenizer's post-processor unless
        `add_special_tokens` (when None: the model arg `add_bos_token`) is False or, `add_special_tokens` None, the
        string already starts with the tokenizer's BOS (a rendered chat: DeepSeek's, or the `<s>` a Llama-style
        tokenizer_config.json names): a DeepSeek release's puts BOS first (`Tokenizer.encode_prompt`), seekstack's
        own tokenizers add nothing."""
        if add_special_tokens is None:
            add_special_tokens = False if string.startswith(self.tokenizer_.bos_token) else self.add_bos_token
        if add_special_tokens is False:
            return self.tokenizer_.encode(string)
        return self.tokenizer_.encode_prompt(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm_eval's split (the context's trailing whitespace moved into the continuation), with a context of
        whitespace alone, which that leaves without a token, conditioned on BOS as lm_eval conditions an empty one."""
        context_ids, continuation_ids = super()._encode_pair(context, continuation)
        return context_ids or [self.prefix_token_id], continuation_ids

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[TokenRequest], **kwargs: object) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether every continuation token is the argmax, per request.

        The input is (context + continuation)[-(max_length+1):][:-1], as lm_eval's HF backend cuts it. Requests of
        the same input (a multiple choice's one-token answers, " A" ... " D", after one context) are scored from one
        forward, as the HF backend's logits cache groups them; batches group inputs of similar length (longest first)
        and are right-padded, which a causal model never sees.
        """
        self._check_continuation_lengths(requests)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        readers: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)  # input -> the requests it scores
        for i, (_, context, continuation) in enumerate(requests):
            readers[tuple((context + continuation)[-(self.max_length + 1) :][:-1])].append(i)
        inputs = sorted(readers, key=len, reverse=True)
        longest_continuation = max((len(continuation) for _, _, continuation in requests), default=0)
        batch_size = self.batch_size_per_step or (
            self._largest_batch(len(inputs[0]), longest_continuation) if inputs else 1
        )
        for start in range(0, len(inputs), batch_size):
            rows = inputs[start : start + batch_size]
            input_ids = torch.full((len(rows), len(rows[0])), self.tokenizer_.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, : len(row)] = torch.tensor(row)
            scored_lengths = [max(len(requests[i][2]) for i in readers[row]) for row in rows]  # longest continuations
            S = max(scored_lengths)  # the head runs on each row's last S positions alone, the ones read
            ends = torch.tensor([len(row) for row in rows])
            logits_at = (ends[:, None] - S + torch.arange(S)).clamp(min=0)  # (B, S); a row shorter than S: 0, unread
            logits = self.model(input_ids.to(self._device), logits_at=logits_at.to(self._device)).logits  # (B, S, V)
            for r, (row, scored_length) in enumerate(zip(rows, scored_lengths, strict=True)):
                logprobs = F.log_softmax(logits[r, S - scored_length :].float(), dim=-1)  # (scored_length, V)
                for i in readers[row]:
                    continuation = requests[i][2]
                    scored = logprobs[scored_length - len(continuation) :]  # (len(continuation), V)
                    target = torch.tensor(continuation, device=scored.device)
                    total = scored.gather(1, target[:, None]).double().sum().item()  # float64: thousands of terms
                    results[i] = (total, bool((scored.argmax(dim=-1) == target).all()))
        return results  # type: ignore[return-value]

    def _largest_batch(self, width: int, scored: int) -> int:
        """batch_size="auto": the most rows of `width` tokens (the longest request's), up to max_batch_size, whose
        forward (the head on each row's last `scored` positions, the longest continuation's) and a row's float32
        log-softmax the device runs without running out of memory (accelerate's search, as lm_eval's HF backend finds
        its batch size)."""
        from accelerate.utils import find_executable_batch_size

        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def forward(batch_size: int) -> int:
            input_ids = torch.full((batch_size, width), self.tokenizer_.pad_id, dtype=torch.long, device=self._device)
            logits_at = torch.arange(width - scored, width, device=self._device).expand(batch_size, -1)
            F.log_softmax(self.model(input_ids, logits_at=logits_at).logits[0].float(), dim=-1)
            return batch_size

        batch_size = forward()
        print(f"batch_size=auto: {batch_size} requests of up to {width} tokens per forward", file=sys.stderr)
        return batch_size

    def _check_continuation_lengths(self, requests: list[TokenRequest]) -> None:
        """ValueError naming the first request whose continuation has no token, which would score log p = 0 (a
        certainty, is-greedy), or is longer than max_length: its input window could not hold the tokens it scores.
        (lm_eval's HF backend fails on an assert at both.)"""
        for number, (strings, _, continuation) in enumerate(requests, 1):  # counted from 1, as the engine's prompts
            request = f"loglikelihood request {number} of {len(requests)}"
            if not continuation:
                text = f" (context ending {strings[0][-20:]!r}, continuation {strings[1][:40]!r})" if strings else ""
                raise ValueError(
                    f"{request}{text}: the continuation adds no token to the context (it is empty, "
                    "or its text merges into the context's last token: lm_eval scores the tokens past the context's "
                    "own), so it would score log p = 0, a certainty; end the context where a token ends, e.g. a "
                    "target_delimiter of ' '"
                )
            if len(continuation) > self.max_length:
                text = f" (continuation {strings[1][:40]!r})" if strings else ""
                raise ValueError(
                    f"{request}{text}: the continuation is {len(continuation):,} tokens, more "
                    f"than max_length={self.max_length:,} the model scores at once; shorten it or raise max_length"
                )

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, scored in disjoint windows of max_length tokens (lm_eval's own
        windows: the first conditions on BOS, each later one on the tokens before it)."""
        windows: list[TokenRequest] = []
        counts = []
        for (text,) in (request.args for request in requests):
            pieces = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            own = [(None, *make_disjoint_window(piece)) for piece in pieces]
            windows += own
            counts.append(len(own))
        scores = self._loglikelihood_tokens(windows)
        totals, start = [], 0
        for count in counts:
            totals.append(sum(score for score, _ in scores[start : start + count]))
            start += count
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continue each context on the engine, all requests in one batch, until a stop string, EOS or
        max_gen_toks. Generation kwargs as lm_eval normalizes them: greedy unless `do_sample` (or a temperature
        above 0; `do_sample` at temperature 0, or with none given, is refused, as transformers' generate refuses it);
        the engine's sampling settings apply (temperature, top_p, top_k, min_p, repetition_penalty, ...;
        skip_special_tokens by default, as the HF backend decodes); any other kwarg is refused. Sampled requests are
        seeded by `request_seeds`."""
        params = [
            self._sampling_params(request.args[1], seed, f"generate_until request {number} of {len(requests)}")
            for number, (request, seed) in enumerate(zip(requests, request_seeds(requests), strict=True), 1)
        ]
        prompts = [  # left-truncated, as HF does; an empty context from BOS, as lm_eval's loglikelihood conditions one
            (self.tok_encode(request.args[0]) or [self.prefix_token_id])[-(self.max_length - sampling.max_new_tokens) :]
            for request, sampling in zip(requests, params, strict=True)
        ]
        # stop strings are matched on the text with its special tokens, as HF's stopping criteria read it
        completions = self.engine.generate(prompts, [dataclasses.replace(p, skip_special_tokens=False) for p in params])
        return [self._reply_text(completion, p) for completion, p in zip(completions, params, strict=True)]

    def _reply_text(self, completion: Completion, sampling: SamplingParams) -> str:
        """The text lm_eval takes back, as its HF backend makes it: the generated tokens after the last
        `think_end_token` (a token id: cut among the tokens, the text's leading whitespace dropped), decoded without
        EOS and, with `skip_special_tokens` (the default, HF's decode's there), without the special tokens; after the
        last `think_end_token` (a text), cut at the first stop string."""
        think_end, ids = self.think_end_token, completion.token_ids
        if isinstance(think_end, int) and think_end in ids:
            ids = ids[len(ids) - ids[::-1].index(think_end) :]
        skipped = self.tokenizer_.special_ids if sampling.skip_special_tokens else {self.eot_token_id}
        text = self.tok_decode([token_id for token_id in ids if token_id not in skipped])
        if isinstance(think_end, int):
            return postprocess_generated_text(text.lstrip(), list(sampling.stop), think_end_token=None)
        return postprocess_generated_text(text, list(sampling.stop), think_end_token=think_end)

    def _sampling_params(self, gen_kwargs: dict, seed: int, request: str) -> SamplingParams:
        """The engine's parameters for a generate_until request; ValueError naming it (`request`, "generate_until
        request 2 of 5", counted from 1 as the engine counts prompts) and a kwarg it cannot apply."""
        try:
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        except (TypeError, ValueError) as error:  # lm_eval's float(temperature), int(max_gen_toks): naming neither
            raise ValueError(
                f"{request}: generation kwargs {gen_kwargs}: {error}; temperature must be a number, and max_gen_toks "
                "(or max_new_tokens, max_tokens, max_completion_tokens) a whole number"
            ) from None
        if not isinstance(kwargs["do_sample"], bool):  # lm_eval passes a string on: 'false' would sample
            raise ValueError(
                f"{request}: generation kwarg 'do_sample' has value {kwargs['do_sample']!r}: give true or false"
            )
        unknown = sorted(set(kwargs) - set(LM_EVAL_GENERATION_KWARGS) - set(GENERATION_KWARGS))
        if unknown:
            raise ValueError(
                f"{request}: generation kwargs {', '.join(map(repr, unknown))} not supported by "
                f"the seekstack backend; it takes {', '.join(LM_EVAL_GENERATION_KWARGS + GENERATION_KWARGS)}"
            )
        until = kwargs.pop("until")
        max_new_tokens = kwargs.pop("max_gen_toks")
        if not 0 < max_new_tokens < self.max_length:  # at max_length (the HF backend's refusal too) no prompt fits
            raise ValueError(
                f"{request}: max_gen_toks={max_new_tokens} must be at least 1 and less than "
                f"max_length={self.max_length}, which holds the prompt and the generated tokens; change max_gen_toks "
                "(the task's generation_kwargs or the model arg) or raise max_length"
            )
        if not kwargs.pop("do_sample"):
            kwargs["temperature"] = 0.0
        elif kwargs.get("temperature", 0) == 0:  # the HF backend gives generate 0 where none is given; it refuses it
            given = "temperature=0" if "temperature" in kwargs else "no temperature (lm_eval's default: 0)"
            raise ValueError(
                f"{request}: do_sample=True with {given}: sampling needs a temperature above 0 "
                "(the HF backend's generate refuses it too); give temperature > 0, or do_sample=False for greedy "
                "decoding"
            )
        else:  # as the HF backend samples: transformers' defaults, then generation_config.json's, then the request's
            kwargs = {**TRANSFORMERS_SAMPLING_DEFAULTS, **self.generation_defaults, **kwargs}
        stop = tuple(text for text in until if text)
        kwargs = {"skip_special_tokens": True, **kwargs, "max_new_tokens": max_new_tokens, "stop": stop, "seed": seed}
        try:
            return SamplingParams.from_dict(kwargs)
        except ConfigError as error:
            problem = error.naming(f"generation kwarg {error.field!r}")
            raise ValueError(f"{request}: {problem}") from None

    def get_model_info(self) -> dict:
        """What lm_eval records of the model in its results' config: its folder and type, and, as the HF backend
        records them, its parameters (the main model's, as transformers' model holds them: no MTP module) and dtype."""
        return {
            "model_path": self.pretrained,
            "model_type": self.model.config.model_type,
            "model_num_parameters": main_parameters(self.model.config).total,
            "model_dtype": self.model.dtype,
        }


if __name__ == "__main__":  # lm_eval's own command line with `seekstack` registered: python -m seekstack.eval.harness
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
