"""The inference engine: continuous batching over a paged latent cache, chunked prefill, per-request sampling,
streaming detokenization, and the steps of MTP speculative decoding (drafting and verification are in
`speculative.py`; what the engine hands back is in `outputs.py`).

A request goes waiting -> prefilling (its prompt enters the cache in chunks) -> running (one token, or the
accepted part of a draft plus one, per step) -> finished. Between steps the last token of a running request is
*pending*: sampled but not yet in the cache, so the cache holds len(ids) - 1 tokens, in the main layers and,
with speculative decoding, in the MTP layer too (MTP position i reads h_i and the embedding of token i+1).
Shapes: B sequences in a forward, T tokens per sequence (padded), K drafted tokens, V vocabulary, D hidden.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import math
import numbers
import operator
import os
import sys
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seekstack.checkpoint import load_pretrained, read_config
from seekstack.checkpoint.load import placement_asked, refuse_a_revision
from seekstack.config import ModelConfig
from seekstack.infer.cache import (
    PagedLatentCache,
    blocks_in_budget,
    blocks_in_free_memory,
    refuse_a_non_count,
    refuse_pools_past_free_memory,
    refuse_too_few_blocks,
)
from seekstack.infer.detokenize import TextStream
from seekstack.infer.draft_vocab import (
    DraftVocabulary,
    draft_vocabulary,
    refresh_draft_vocabulary,
    refuse_a_wrong_draft_vocab,
    token_ranking,
)
from seekstack.infer.generation_config import (
    GENERATION_CONFIG_FILE,
    eos_ids_of,
    read_generation_config,
    sampling_defaults_of,
)
from seekstack.infer.outputs import (
    Completion,
    EngineStats,
    RequestOutput,
    TokenLogprob,
    UndecodedTokenLogprob,
    joined_completion,
)
from seekstack.infer.packed import WeightVersions, copied_linears, pack_for_decode, refresh_copies
from seekstack.infer.params import (
    DRAFT_TOKENS_LIMIT,
    MAX_DRAFT_TOKENS,
    EngineOptions,
    LoRARequest,
    SamplingParams,
    parse_bytes,
)
from seekstack.infer.placement import (
    OffloadRefused,
    device_map_for,
    layer_devices,
    offload_while_loading,
    place,
    runtime_device,
)
from seekstack.infer.sampling import (
    NO_DISTRIBUTION,
    BadWords,
    PenaltyState,
    SamplingBatch,
    SeededUniforms,
    TokenConstraint,
    greedy_tokens,
    has_distribution,
    outside_vocabulary,
    takes_raw_argmax,
    token_logprobs,
    without_padded_ids,
)
from seekstack.infer.speculative import (
    DraftChecks,
    DraftCount,
    accept_drafts,
    greedy_speculation,
    measured_step_costs,
    mtp_drafts,
    step_clock,
)
from seekstack.infer.threads import StepThreads
from seekstack.model import cpu_kernels
from seekstack.model.transformer import ModelOutput, Transformer
from seekstack.schema import ConfigError, counted, for_command, known_fields, refuse_a_non_bool, shown_value
from seekstack.tokenizer import TOKENIZER_FILE, Tokenizer

if TYPE_CHECKING:
    from seekstack.adapters.registry import AdapterWeights


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: SeededUniforms
    stream: TextStream
    stop_ids: frozenset[int]
    penalties: PenaltyState | None
    ids: list[int]  # prompt + sampled tokens
    num_cached: int = 0  # tokens in the cache (main layers; the MTP layer keeps pace)
    drafts: list[int] = field(default_factory=list)  # the MTP module's guesses for the K tokens after the pending one
    draft_checks: DraftChecks = field(default_factory=DraftChecks)  # how its drafts fared, per depth (DraftCount)
    scheduled_at: float | None = None  # time.perf_counter() when admitted out of `waiting`
    output_ids: list[int] = field(default_factory=list)  # tokens handed out
    adapter_slot: int = 0  # the LoRA adapter its rows use (seekstack.adapters.multi); 0 = the base model
    cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    admitted: int = 0  # admission order (the latest admitted is preempted first)
    error: Exception | None = None  # what its sampling raised (`Engine._isolated`): it ends alone at its next output
    constraint: TokenConstraint | None = None  # what it may sample next (JSON mode); it stops once `complete`
    raw_argmax: bool = False  # its token is its logits' argmax (`takes_raw_argmax`) once min_tokens' bans are over
    # with params.prompt_logprobs: those of its prompt tokens so far (the first token has none), filled as prefill runs
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])

    @property
    def resumed(self) -> bool:
        """Whether it holds a sampled token: back from preemption, it recomputes all its tokens but the pending one."""
        return len(self.ids) > len(self.prompt_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to put in the cache before decoding (re)starts."""
        return len(self.ids) - 1 if self.resumed else len(self.ids)


class _StepLock:
    """The engine's reentrant lock, which `step` holds throughout. A thread that calls the engine (add_request, abort)
    gets it before the next step: with a plain lock, a loop that steps back to back takes it again first, step
    after step, and an abort can wait until the request has finished."""

    HANDOVER_S = 0.01  # the most a step waits for callers to take the lock first

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._callers = 0
        self._count_lock = threading.Lock()

    def __enter__(self) -> None:
        with self._count_lock:
            self._callers += 1
        self._lock.acquire()
        with self._count_lock:
            self._callers -= 1

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def for_step(self) -> Iterator[None]:
        deadline = time.perf_counter() + self.HANDOVER_S
        while self._callers and time.perf_counter() < deadline:
            time.sleep(0)
        with self._lock:
            yield


PROMPT_KEYS = ("prompt", "prompt_token_ids")  # what an Engine reads of vLLM's TextPrompt and TokensPrompt
COMPILE_AFTER_SECONDS = 10.0  # with compile=None: about what compiling the decode step takes on a CPU, cache warm


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, model_dir: Path) -> None:
    """ValueError when `tokenizer` has ids past the model's vocabulary; a warning when it is not the tokenizer.json
    saved with the model (another tokenizer's ids mean other text: the model answers in garbage)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
            f"({vocab_size}, {model_dir}): it is not this model's tokenizer"
        )
    own = model_dir / TOKENIZER_FILE
    if own.is_file() and Path(tokenizer.source).resolve() != own.resolve():
        if Tokenizer.from_file(own).fingerprint != tokenizer.fingerprint:
            warnings.warn(
                f"tokenizer {tokenizer.source} is not the one saved with the model ({own}); its ids mean other text",
                stacklevel=3,
            )


def checkpoint_files(model_dir: Path, tokenizer: str | Path | Tokenizer | None = None) -> tuple[ModelConfig, Tokenizer]:
    """The config of the checkpoint in `model_dir` and its tokenizer (tokenizer.json beside it, or the one at
    `tokenizer`, or `tokenizer` loaded already), each file a load reads besides the weights checked: a missing folder,
    config.json or tokenizer, a wrong generation_config.json, a tokenizer with ids past the vocabulary. What
    Engine.from_pretrained reads first; serve calls it before it opens its database, then passes the tokenizer on."""
    config = read_config(model_dir)  # CheckpointError naming the folder when it does not exist or lacks config.json
    settings, source = read_generation_config(model_dir), str(model_dir / GENERATION_CONFIG_FILE)  # read once
    sampling_defaults_of(settings, source)  # a wrong generation_config.json is refused before the weights load
    eos_ids_of(settings, source)
    if tokenizer is None and not (model_dir / TOKENIZER_FILE).is_file():
        missing = f"{model_dir} has no {TOKENIZER_FILE}:"
        raise for_command(
            FileNotFoundError(f"{missing} pass tokenizer= the path of a tokenizer.json or its folder"),
            f"{missing} give the tokenizer's path with --tokenizer PATH",
        )
    loaded = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer or model_dir)
    check_tokenizer_fits(loaded, config.vocab_size, model_dir)
    return config, loaded


# when the engine's decode steps run through torch.compile (`Engine`'s compile), as vLLM's enforce_eager is told it
DECODES_EAGERLY = (
    "the engine decodes eagerly unless given compile=True (or compile=None: once eager decoding has taken as long as a "
    "compile)"
)
# vLLM's LLM(...) keywords that from_pretrained does not take (but at VLLM_ENGINE_VALUES_TAKEN), and what does their
# work here
VLLM_ENGINE_KEYWORDS = {
    "enforce_eager": DECODES_EAGERLY,
    "gpu_memory_utilization": "give the latent cache's budget in bytes, kv_cache_memory= (default: half the free "
    "memory of each device)",
    "tensor_parallel_size": "the engine runs in one process; spread a model over devices with device_map=",
    "pipeline_parallel_size": "the engine runs in one process; spread a model over devices with device_map=",
    "seed": "seed a request with SamplingParams(seed=), or all of them with torch.manual_seed(s) before generate",
    "enable_lora": "LoRA adapters are always on: pass generate's lora_request=LoRARequest(name, id, DIR) as vLLM's, or "
    "load them with adapters={name: DIR} or load_adapter(name, DIR)",
}
# vLLM's LLM(...) keywords taken, to no effect, at the values that ask for what the engine does; others refused as
# above. enforce_eager=False (vLLM's default) only allows CUDA graphs, which the engine never captures: compile=True is
# what decodes through a compiled graph here.
VLLM_ENGINE_VALUES_TAKEN = {
    "tensor_parallel_size": (1,),
    "pipeline_parallel_size": (1,),
    "enforce_eager": (True, False),
    "enable_lora": (True,),
}


ENGINE_SWITCHES = ("prefix_caching", "speculative", "adaptive_drafts", "eager_lone_row")
ENGINE_COUNTS = ("max_batch_size", "max_model_len", "block_size", "kv_cache_memory", "prefill_chunk", "draft_tokens")
# the keywords whose default is None (max_model_len the model's context, num_blocks and kv_cache_memory what half the
# free memory holds, compile once eager decoding has taken as long as a compile); None is no count for the others
ENGINE_NONE_DEFAULTS = ("max_model_len", "kv_cache_memory", "num_blocks", "compile")


def kv_cache_bytes(value: int | str | None) -> int | None:
    """kv_cache_memory in bytes: a size such as "4GiB" read (ValueError naming the keyword), anything else as given."""
    if not isinstance(value, str):
        return value
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise ValueError(f"kv_cache_memory: {error}") from None


def refuse_wrong_engine_values(values: Mapping[str, Any]) -> None:
    """ValueError naming the first of `values` (Engine keywords) whose value the engine refuses: a switch not True or
    False, compile not True, False or None, a count that is no whole number >= 1 (`refuse_a_non_count`), num_blocks
    and draft_vocab as the cache and the drafts refuse them, more draft_tokens than MAX_DRAFT_TOKENS. Engine checks its
    own; from_pretrained those given, before any weights load."""
    for name, value in values.items():
        if value is None and name in ENGINE_NONE_DEFAULTS:
            continue
        if name in ENGINE_SWITCHES:
            refuse_a_non_bool(name, value)
        elif name == "compile" and not isinstance(value, bool):
            raise ValueError(
                f"compile={shown_value(value)} must be True (decode compiled from the first step), False (never) or "
                "None (once eager decoding has taken as long as a compile)"
            )
        elif name in ENGINE_COUNTS:
            refuse_a_non_count(name, kv_cache_bytes(value) if name == "kv_cache_memory" else value)
        elif name == "num_blocks":
            refuse_too_few_blocks(value)
        elif name == "draft_vocab":
            refuse_a_wrong_draft_vocab(value)
    if values.get("draft_tokens", 0) > MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_tokens={values['draft_tokens']}: {DRAFT_TOKENS_LIMIT}")


# vLLM's LLM(...) keywords that are vLLM's names of the engine's own, read as them, and the engine's check of a value,
# which names the keyword given
VLLM_ENGINE_NAMES = {
    "max_num_seqs": ("max_batch_size", refuse_a_non_count),
    "enable_prefix_caching": ("prefix_caching", refuse_a_non_bool),
}


def read_vllm_engine_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Engine keywords with vLLM's LLM ones read: its names of the engine's (VLLM_ENGINE_NAMES) as them (None: the
    engine's default, as vLLM's None is its own), and those asking for what the engine does (VLLM_ENGINE_VALUES_TAKEN)
    dropped; TypeError naming any other vLLM keyword or value and what does its work here, ValueError for one beside
    the engine's keyword asking otherwise."""
    kwargs = dict(kwargs)
    for name in [name for name in kwargs if name in VLLM_ENGINE_KEYWORDS]:  # not a bare "unexpected keyword argument"
        value, taken = kwargs.pop(name), VLLM_ENGINE_VALUES_TAKEN.get(name)
        if taken is None:
            raise TypeError(f"{name}= is vLLM's LLM keyword, not taken here: {VLLM_ENGINE_KEYWORDS[name]}")
        if not any(type(value) is type(one) and value == one for one in taken):
            raise TypeError(
                f"{name}={value!r} is vLLM's LLM keyword, taken here only as "
                f"{' or '.join(f'{name}={one!r}' for one in taken)}: {VLLM_ENGINE_KEYWORDS[name]}"
            )
        if name == "enforce_eager" and value and kwargs.get("compile", False) is not False:
            raise ValueError(
                f"enforce_eager=True beside compile={kwargs['compile']!r}: {DECODES_EAGERLY}; leave one out"
            )
    for vllm_name, (name, refuse_a_wrong_value) in VLLM_ENGINE_NAMES.items():
        if vllm_name in kwargs:
            value = kwargs.pop(vllm_name)
            if value is None:  # vLLM's default, as the engine's own is where its keyword is left out
                continue
            refuse_a_wrong_value(vllm_name, value)
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"{vllm_name}={value!r} beside {name}={kwargs[name]!r}: it is vLLM's name for {name}")
            kwargs[name] = value
    return kwargs


class Engine:
    """Serves many concurrent requests on one `Transformer`; `add_request`, `abort`, `step`, `stats` are thread-safe,
    and so are `generate` and `stream`: calls from several threads share the steps, each getting its own requests'
    outputs."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = EngineOptions.max_batch_size,
        max_model_len: int | None = EngineOptions.max_model_len,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: int | str | None = EngineOptions.kv_cache_memory,
        prefix_caching: bool = EngineOptions.prefix_caching,
        speculative: bool = EngineOptions.speculative,
        draft_tokens: int = EngineOptions.draft_tokens,
        adaptive_drafts: bool = EngineOptions.adaptive_drafts,
        draft_vocab: int = EngineOptions.draft_vocab,
        draft_ranking: torch.Tensor | Sequence[int] | None = None,
        prefill_chunk: int = 256,
        device: torch.device | str | None = None,
        compile: bool | None = False,
        eager_lone_row: bool = False,
        adapters: Mapping[str, str | Path | AdapterWeights] | None = None,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
    ):
        """`adapters` name LoRA adapter folders (peft format), or the adapters read from them
        (seekstack.adapters.registry.read_factors), that requests may pick by name (`add_request`); rows
        of different adapters share every step, each with its own adapter (seekstack.adapters.multi). `max_loras`
        and `max_lora_rank` (vLLM's) fix how many adapters, of what largest rank, it serves at once, these and those
        loaded later (`load_adapter`), so loads never compile a decode step again; None: 8 and 16, or more where
        `adapters` need it (seekstack.adapters.registry).
        The cache takes `num_blocks`, or as many as `kv_cache_memory` bytes hold (an int, or a size such as "4GiB" as
        --kv-cache-memory takes; by default, as many as half the memory free on each device holds of its layers'
        pools), never more than max_batch_size requests of max_model_len tokens use.
        `compile`: decode steps through torch.compile from the first step (True), never (False), or, with None, once
        eager decode steps have taken as long as compiling them would (`COMPILE_AFTER_SECONDS`), where the engine
        can (no device map): a short run never waits for a compile. `eager_lone_row`: a compiled engine's plain decode
        step of a single row runs eagerly instead of compiling a graph of its own (dynamo keeps one for size 1,
        `_compiled`): for callers whose batches see one row only at their end, such as RL rollouts.
        `draft_vocab`: the drafts score only this many tokens, the first of `draft_ranking` (token ids, most frequent
        first; by default the tokenizer's id order; seekstack.infer.draft_vocab); 0: the whole vocabulary.
        `device`: where the model runs (`runtime_device`: auto, cpu, cuda, cuda:N or an int N); None: where it is."""
        placed = getattr(model, "placement", None) is not None  # spread over devices by seekstack.infer.placement
        device = runtime_device(device) if device is not None else None
        if placed and (compile or (device is not None and device.type != "cpu")):
            raise ValueError("a model placed by a device map runs eagerly, its engine on the CPU: drop compile/device")
        home = torch.device("cpu") if placed else model.embed_tokens.weight.device  # placed parts return results here
        self.device = device if device is not None else home
        self.model = model if placed else model.to(self.device)  # run in eval mode by `step`, its own mode kept
        self.config = model.config
        self.tokenizer = tokenizer
        self.model_name = "seekstack"
        self.model_dir: Path | None = None  # the checkpoint folder `from_pretrained` loaded; None: a model built here
        # the model's generation settings (model.generation_config: the checkpoint's generation_config.json, which
        # load_pretrained reads), as transformers' generate and vLLM read them, whoever built the engine
        settings, source = getattr(model, "generation_config", None) or {}, "model.generation_config"
        # SamplingParams field -> its generation settings' value, for what a request leaves unset
        self.sampling_defaults: dict[str, Any] = sampling_defaults_of(settings, source)
        # the ids that end a request (unless ignore_eos): the tokenizer's EOS and the settings' eos_token_id
        self.eos_ids = frozenset({tokenizer.eos_id}) | eos_ids_of(settings, source)
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens, more than the model's "
                f"vocab_size={self.config.vocab_size}: they do not belong together"
            )
        if self.config.attention_variant != "mla":
            raise ValueError(
                f"attention_variant={self.config.attention_variant!r} is a training ablation without a cached decode "
                "path; the engine serves plain MLA models"
            )
        kv_cache_memory = kv_cache_bytes(kv_cache_memory)
        refuse_wrong_engine_values(
            {"prefix_caching": prefix_caching, "speculative": speculative, "adaptive_drafts": adaptive_drafts,
             "eager_lone_row": eager_lone_row, "compile": compile, "max_batch_size": max_batch_size,
             "max_model_len": max_model_len, "block_size": block_size, "kv_cache_memory": kv_cache_memory,
             "prefill_chunk": prefill_chunk, "draft_tokens": draft_tokens, "num_blocks": num_blocks,
             "draft_vocab": draft_vocab}
        )  # fmt: skip
        if speculative and len(model.mtp) == 0:
            raise ValueError(
                "speculative decoding needs an MTP module; this model has none (num_nextn_predict_layers=0, or a "
                "checkpoint without MTP weights, as transformers' save_pretrained writes)"
            )
        self.speculative = speculative
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.max_model_len = self.config.max_position_embeddings if max_model_len is None else max_model_len
        if self.max_model_len > self.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} is longer than the model's context, max_position_embeddings="
                f"{self.config.max_position_embeddings}: positions past it were never trained"
            )
        self.draft_tokens = draft_tokens if speculative else 0
        # With `adaptive_drafts`, draft_tokens is the most a step verifies: fewer (or none) when acceptance or the batch
        # says so (DraftCount); the cache is planned for the most.
        # FR-Spec's draft vocabulary; not on a placed model (its head may live on another device than the MTP block).
        ranking = draft_ranking if draft_ranking is not None else torch.arange(self.config.vocab_size)
        drafting = speculative and not placed
        self.draft_vocabulary = draft_vocabulary(self.model, draft_vocab, ranking) if drafting else None
        self._head_versions = WeightVersions(self.model.lm_head)  # the head's copies follow it (`_follow_weights`)
        # the block linears' panels, read by steps of 3 rows or more, follow their weights there
        self._panel_versions = WeightVersions(*copied_linears(self.model))
        costs = None
        if drafting and adaptive_drafts:
            with evaluating(self.model):
                costs = measured_step_costs(
                    self.model, self.draft_vocabulary, self.draft_tokens, max_batch_size, block_size
                )
        self.draft_count = DraftCount(self.config, self.draft_tokens, adaptive_drafts, self.device, costs)
        # Verification writes K slots past the pending token; the MTP module's drafts after k accepted reach K - 1
        # further (`mtp_drafts`). Those are the cache plan's lookahead and, with the K, the slots a request
        # holds beyond its last token, up to the cache's end (`_slots_held`), near which it drafts fewer.
        self.lookahead = max(self.draft_tokens - 1, 0)
        self.draft_slots = self.draft_tokens + self.lookahead
        pool_devices = layer_devices(self.model)
        dtype = model.embed_tokens.weight.dtype
        if num_blocks is None:
            whole_batch = max_batch_size * math.ceil((self.max_model_len + self.draft_slots) / block_size) + 1
            fits = (
                blocks_in_budget(self.config, kv_cache_memory, block_size, dtype)
                if kv_cache_memory is not None
                else blocks_in_free_memory(self.config, pool_devices, block_size, dtype)
            )
            num_blocks = min(fits, whole_batch)
            if kv_cache_memory is not None:  # a budget past the free memory (the cache checks a num_blocks given)
                asked = f"kv_cache_memory={kv_cache_memory}"
                refuse_pools_past_free_memory(self.config, num_blocks, pool_devices, block_size, dtype, asked)
        from seekstack.adapters.registry import attach_adapters

        refuse_adapters_not_served(adapters, max_loras, max_lora_rank)
        self.lora = attach_adapters(self.model, adapters or {}, max_loras, max_lora_rank)
        # the adapters lora_request loaded, least recently asked for first: unloaded for another's load when every
        # slot is taken, as vLLM's LRU cache of adapters evicts them (those load_adapter loaded stay)
        self._requested_adapters: dict[str, None] = {}
        # adapter name -> the generate calls that resolved a lora_request to it and have not ended: none is unloaded
        # for another's lora_request (another thread's) before the call's requests use it
        self._held_adapters: Counter[str] = Counter()
        self.cache = PagedLatentCache(
            self.config, num_blocks, block_size, dtype, self.device,
            prefix_caching=prefix_caching, key_extra_tokens=1 if speculative else 0,
            layer_devices=pool_devices,
        )  # fmt: skip
        self.preemptions = 0
        self._admissions = itertools.count()
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []
        self.running: list[_Request] = []
        self.aborted: list[RequestOutput] = []
        # request id -> where `step` puts its outputs, for the requests `generate` and `stream` wait on: whichever
        # thread steps, each caller reads its own requests' outputs
        self._inboxes: dict[str, deque[RequestOutput]] = {}
        self.prefill_tokens = self.spec_drafted = self.spec_accepted = 0
        self.lock = _StepLock()
        self.step_threads = StepThreads(self.config, self.device)  # small decode steps on one CPU thread
        self._ids = itertools.count()
        self._decode_model, self._decode_drafts, self._greedy_speculation = decode_step, mtp_drafts, greedy_speculation
        self._model_changes = 0  # adapter loads and unloads, head repacks: part of `_graph_state`
        # The `_graph_state` the compiled decode steps' last fully guarded calls ran under, and what picked their
        # graphs (input shapes, a speculative step's draft count): `_unguarded` skips the guard check for those alone.
        self._guarded_state: tuple[int, int, bool] | None = None
        self._guarded_calls: set[tuple] = set()
        # The one thread whose compiled decode steps may skip the guard check (`_unguarded`): torch's stance is
        # process-wide, so a skip is sound only while no other thread calls compiled code. The main thread by default
        # (`generate`, `chat`, the benches); `serve`'s engine thread, the only one that calls compiled code in its
        # process, names itself (serve/bridge.py); None: no thread skips.
        self.guard_skip_thread: threading.Thread | None = threading.main_thread()
        self.eager_lone_row = eager_lone_row
        # Eager decode seconds still to run before compiling (None: never compile, or compiled already).
        self._eager_seconds_left = COMPILE_AFTER_SECONDS if compile is None and not placed else None
        self.compile_s = 0.0  # seconds of the decode steps that compiled a new graph (`_decode_timer`)
        self.notify: Callable[[str], None] = _note_on_stderr  # what the engine has to tell its user (a compile)
        if compile is True:
            self._compile_decode()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        tokenizer: str | Path | Tokenizer | None = None,
        dtype: torch.dtype | str | None = None,
        adapter: str | Path | None = None,
        device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None = None,
        offload_dir: str | Path | None = None,
        max_memory: Mapping[str | int, str | int] | None = None,
        torch_dtype: torch.dtype | str | None = None,
        offload_folder: str | Path | None = None,
        trust_remote_code: bool = False,
        low_cpu_mem_usage: bool = True,
        revision: str | None = None,
        **kwargs,
    ) -> Engine:
        """An engine on the checkpoint in `model_dir`, with its tokenizer.json (or the one at `tokenizer`, or
        `tokenizer` itself, loaded: checkpoint_files' own).

        `device_map` spreads the model over devices (seekstack.infer.placement): `pattern=device` entries (or
        accelerate's dict of them), or `auto:cuda:0=80GiB,cpu=20GiB` for a plan within those budgets (or, as
        accelerate's, device_map="auto" with `max_memory` {0: "80GiB", "cpu": "20GiB"}); `disk` weights not mapped
        from the checkpoint are copied under `offload_dir` (default `model_dir`/offload). `dtype` is load_pretrained's
        (float32 where not given); `torch_dtype` and `offload_folder`, transformers' from_pretrained names, are read
        as dtype and offload_dir (given both, dtype and torch_dtype must load the same dtype). `trust_remote_code` and
        `low_cpu_mem_usage`, which transformers and vLLM callers pass, are taken without effect (True or False, else
        refused): seekstack runs no code from a checkpoint, and always reads the weights one tensor at a time into a
        model built without them (what low_cpu_mem_usage=True asks). `revision`, a Hub revision, is refused: the
        folder is read as it is on disk.
        vLLM's LLM keywords are read, or refused naming what does their work, by `read_vllm_engine_keywords`.

        `adapter`, a LoRA adapter folder, is merged into the weights for every request (generate, chat); `adapters`
        (see `Engine`) are kept apart and picked per request (serve). A missing folder, config or tokenizer, and an
        adapter that does not fit, are reported before any weights load."""
        model_dir = Path(model_dir)
        kwargs = read_vllm_engine_keywords(kwargs)
        # after self, model, tokenizer
        engine_parameters = list(inspect.signature(cls.__init__).parameters.values())[3:]
        engine_keywords = [parameter.name for parameter in engine_parameters]
        unknown = [name for name in kwargs if name not in engine_keywords]
        if unknown:  # not Engine.__init__'s bare TypeError once every weight has loaded
            own = list(inspect.signature(cls.from_pretrained).parameters)[1:-1]  # tokenizer ... revision
            raise TypeError(
                f"Engine.from_pretrained got an unexpected keyword argument {unknown[0]!r}: "
                f"{known_fields(unknown[0], [*own, *engine_keywords])}"
            )
        # before any weights load
        refuse_adapters_not_served(kwargs.get("adapters"), kwargs.get("max_loras"), kwargs.get("max_lora_rank"))
        refuse_a_revision(revision, model_dir)
        for name, value in (("trust_remote_code", trust_remote_code), ("low_cpu_mem_usage", low_cpu_mem_usage)):
            refuse_a_non_bool(name, value)
        refuse_wrong_engine_values(kwargs)  # as Engine does, before load_pretrained reads mtp=speculative
        if offload_folder is not None and offload_dir is not None and offload_folder != offload_dir:
            raise ValueError(
                f"offload_folder={offload_folder!r} beside offload_dir={offload_dir!r}: it is transformers' name for "
                "offload_dir"
            )
        folder_keyword = "offload_folder" if offload_folder is not None and offload_dir is None else "offload_dir"
        offload_dir = offload_dir or offload_folder
        config, loaded_tokenizer = checkpoint_files(model_dir, tokenizer)
        if adapter is not None:  # a mistyped folder or another base's adapter, before the weights are read
            from seekstack.adapters.files import weightless_adapter
            from seekstack.adapters.registry import adapter_folder

            adapter = adapter_folder(adapter)
            weightless_adapter(config, adapter)
        asked = "cpu" if kwargs.get("device") is None else kwargs["device"]  # device=0 is cuda:0, as torch reads it
        # before the weights are read and the disk parts written, as load_pretrained checks them
        device_map = placement_asked(device_map, max_memory, offload_dir, asked, folder_keyword=folder_keyword)
        kwargs["device"] = device = runtime_device(asked)
        adapters = kwargs.get("adapters")
        if adapters:  # before the weights: a mistyped folder, another base's adapter, past capacity
            from seekstack.adapters.registry import refuse_adapters_past_capacity

            kwargs["adapters"] = refuse_adapters_past_capacity(
                config, adapters, kwargs.get("max_loras"), kwargs.get("max_lora_rank"), device, device_map
            )
        offload_dir = offload_dir or model_dir / "offload"
        # Disk parts are written to disk as the weights are read; with an adapter, once it is merged into them.
        offload = offload_while_loading(device_map, offload_dir) if device_map is not None and adapter is None else None
        drafts = kwargs.get("speculative", EngineOptions.speculative)  # else no MTP module: its weights stay unread
        try:  # a folder the disk parts cannot be written in is refused naming the keyword the caller gave it with
            model = load_pretrained(
                model_dir, dtype=dtype, device=device, offload=offload, mtp=drafts, torch_dtype=torch_dtype
            )
            if adapter is not None:
                from seekstack.adapters.files import merged_model

                model = merged_model(model, adapter)
            if device_map is not None:
                model = place(model, device_map_for(model, device_map), offload_dir=offload_dir)
            else:  # the engine owns these weights: its decode steps may read a copy laid out for them
                pack_for_decode(model)
        except OffloadRefused as refusal:
            raise refusal.named(folder_keyword) from refusal.__cause__
        if kwargs.get("speculative") and "draft_ranking" not in kwargs:
            kwargs["draft_ranking"], _ = token_ranking(model_dir, model.config.vocab_size)
        engine = cls(model.eval(), loaded_tokenizer, **kwargs)  # its own model: in eval mode once, not each step
        engine.model_dir = model_dir.resolve()
        # its weights are the base's with the adapter merged in: the name says both, as serve's banner does
        engine.model_name = engine.model_dir.name + (f"+{adapter.name}" if adapter is not None else "")
        return engine

    @property
    def decode_compiled(self) -> bool:
        """Whether decode steps run through torch.compile now (`compile`)."""
        return self._decode_model is not decode_step

    @property
    def longest_cached_request(self) -> int:
        """The most tokens (prompt + completion) a request may have for the cache to hold it: every block but the
        reserved one, as without speculative decoding (near that end, steps draft fewer: `_draft_room`)."""
        return (self.cache.num_blocks - 1) * self.cache.block_size

    def _slots_held(self, tokens: int) -> int:
        """The cache slots a request of `tokens` tokens holds: those and its drafts' (`draft_slots`), within the
        longest request the cache holds."""
        return min(tokens + self.draft_slots, self.longest_cached_request)

    def _draft_room(self, ends: Iterable[int]) -> int:
        """The slots past the latest of `ends` (rows' next positions) within the longest request the cache holds: a
        step verifies drafts and reaches follow-up drafts only that far (a draft's slot is past the cache's end)."""
        return self.longest_cached_request - max(ends)

    @property
    def context_len(self) -> int:
        """The most tokens (prompt + completion) one request may have: max_model_len, or fewer where the cache's
        budget holds fewer (`longest_cached_request`)."""
        return min(self.max_model_len, self.longest_cached_request)

    def fit_max_new_tokens(self, prompt_len: int, params: SamplingParams) -> tuple[SamplingParams, str | None]:
        """`params` with max_new_tokens capped so that the prompt and the completion fit the context (`context_len`),
        and a notice saying so when it had to be capped (max_new_tokens None, vLLM's max_tokens=None, is set to that
        room unsaid); ValueError when the prompt alone leaves no room. A prompt may fill the context where the request
        scores it (prompt_logprobs, one token: a server's echo of max_tokens 0): the token sampled last is never fed
        back, so it takes no place in the cache."""
        scored = params.prompt_logprobs is not None and params.max_new_tokens == 1
        room = self.context_len - prompt_len + scored
        if self.context_len == self.max_model_len:
            context = f"the context of {self.max_model_len}"
        else:
            context = f"the {self.context_len} tokens the cache holds (--kv-cache-memory, kv_cache_memory=, for more)"
        prompt = f"prompt is {counted(prompt_len, 'token')}"
        if room < 1:
            raise ValueError(f"{prompt}; {context} leaves no room for a new token: shorten the prompt")
        if params.max_new_tokens is None:
            return dataclasses.replace(params, max_new_tokens=room), None
        if params.max_new_tokens <= room:
            return params, None
        notice = f"{prompt}; max_new_tokens capped from {params.max_new_tokens} to {room} to fit {context}"
        return dataclasses.replace(params, max_new_tokens=room), notice

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        adapter: str | None = None,
        constraint: TokenConstraint | None = None,
    ) -> str:
        """Queue a request, on the base model or on the loaded LoRA adapter named `adapter`, sampling only what
        `constraint` allows (JSON mode); raises ValueError for an empty prompt, unknown token ids, one that cannot
        fit, or an adapter not loaded, TypeError for a text prompt or `params` that are not SamplingParams."""
        if isinstance(request_id, SamplingParams) and not isinstance(params, SamplingParams):
            raise TypeError(
                f"add_request takes (prompt_ids, params, request_id); these read as vLLM's LLMEngine.add_request("
                f"request_id, prompt, params): call add_request(prompt_ids, params, request_id={prompt_ids!r})"
            )
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"params must be SamplingParams, got {type(params).__name__}: SamplingParams(max_new_tokens=64, ...), "
                "or SamplingParams.from_dict(values) for a mapping"
            )
        if request_id is not None and not isinstance(request_id, str):  # outputs carry it, and vLLM's ids are str
            raise TypeError(
                f"request_id must be a str, as vLLM's, got {type(request_id).__name__} {request_id!r}: give "
                f"{str(request_id)!r}"
            )
        if not holds_token_ids(prompt_ids):
            raise TypeError(
                f"prompt_ids is a {type(prompt_ids).__name__}; give token ids (tokenizer.encode_prompt(text)), or the "
                "text to generate or stream"
            )
        params = params.validate()
        if params.n > 1:
            raise ConfigError(
                f"has value {params.n}: must be 1, as add_request and stream run one sample; generate runs n", field="n"
            )
        prompt_ids = [token_id(token) for token in prompt_ids]
        if params.truncate_prompt_tokens is not None:  # vLLM's: the last k tokens, -1 meaning max_model_len
            kept = self.max_model_len if params.truncate_prompt_tokens == -1 else params.truncate_prompt_tokens
            cut = min(kept, len(prompt_ids))
            if cut >= self.max_model_len:  # vLLM refuses it too: a prompt of max_model_len leaves no room
                raise ValueError(
                    f"prompt has {len(prompt_ids)} tokens; truncate_prompt_tokens={params.truncate_prompt_tokens} "
                    f"keeps its last {cut}, {'all of' if cut == self.max_model_len else 'more than'} "
                    f"max_model_len={self.max_model_len}: no room for a new token; give truncate_prompt_tokens="
                    f"{self.max_model_len - 1} (max_model_len - 1) or fewer, to leave room for the reply"
                )
            prompt_ids = prompt_ids[-kept:]
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.config.vocab_size
        token_count = self._token_count or vocab  # a padded vocabulary's rows past the tokenizer's ids are no token
        for name, ids in (
            ("prompt", prompt_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
            ("allowed_token_ids", params.allowed_token_ids or ()),
        ):
            if (outside := outside_vocabulary(ids, token_count)) is not None:
                place, token = outside
                at = "" if isinstance(ids, Mapping) else f" at position {place}"
                padded = (f": the tokenizer's ids; the model's rows {token_count} to {vocab - 1} pad its vocabulary "
                          "and decode to no token") if token_count < vocab else ""  # fmt: skip
                raise ValueError(
                    f"{name} holds token id {token}, outside the vocabulary [0, {token_count}){at}{padded}"
                )
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, more than max_model_len={self.max_model_len}")
        # vLLM's: the reply ends with the context (max_tokens=None: up to it), here or where the cache can hold no more
        params, _ = self.fit_max_new_tokens(len(prompt_ids), params)
        # a greedy request draws no numbers: no seed of torch's generator (`SeededUniforms`) is spent on it
        generator = SeededUniforms(0 if params.greedy else params.seed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        penalties = PenaltyState.from_prompt(prompt_ids, vocab, self.device) if params.penalized else None
        allowed = params.allowed_token_ids
        if allowed is not None and params.min_tokens and set(allowed) <= set(params.stop_token_ids) | self.eos_ids:
            raise ConfigError(  # min_tokens bans EOS (with ignore_eos too) and stop_token_ids, as vLLM's
                f"{shown_value(list(allowed))} are each an end-of-sequence or stop_token_ids id, which min_tokens="
                f"{params.min_tokens} bans until that many tokens are out: no token could be sampled; allow another "
                "id or send min_tokens 0",
                field="allowed_token_ids",
            )
        if params.bad_words:
            if constraint is not None:
                raise ValueError("bad_words with a constraint (JSON mode): give one rule on what the request samples")
            constraint = BadWords.encoded(params.bad_words, self.tokenizer.encode)
        if constraint is not None and allowed is not None and not constraint.allowed(vocab)[list(allowed)].any():
            # both masks apply, as vLLM's; ids the rule forbids only after some tokens end the request then, with
            # SamplingBatch.constrain's ConfigError
            raise ConfigError(
                f"{shown_value(list(allowed))} are each a one-token word of bad_words (as encoded alone or after a "
                "space), never sampled: no token could be; allow another id or drop the word"
                if isinstance(constraint, BadWords)
                else f"{shown_value(list(allowed))} are each a token the constraint (JSON mode: response_format's "
                "grammar, forced tool calls) forbids as the reply's first: no token could be sampled; allow one the "
                "grammar may begin with",
                field="allowed_token_ids",
            )
        with self.lock:
            request_id = request_id or f"req-{next(self._ids)}"
            if any(r.request_id == request_id for r in self._unfinished()):
                raise ValueError(f"request id {request_id!r} is already in use")
            adapter_slot = self.lora.slot(adapter)  # under the lock, which an unload takes too
            stream = TextStream(
                self.tokenizer, params.stop, params.skip_special_tokens, params.detokenize, params.stop_after_reasoning,
                params.include_stop_str_in_output, params.min_tokens,
            )  # fmt: skip
            request = _Request(
                request_id,
                prompt_ids,
                params,
                generator,
                stream,
                frozenset(stop_ids),
                penalties,
                list(prompt_ids),
                adapter_slot=adapter_slot,
                constraint=constraint,
                raw_argmax=takes_raw_argmax(params, constraint),
            )
            self.waiting.append(request)
        return request_id

    def abort(self, request_id: str | Iterable[str]) -> bool | None | list[bool | None]:
        """Drop a request and free its cache blocks at once; its last output says finish_reason "abort". Returns
        whether it had started (left the waiting queue): one that had not cost no compute. None when no unfinished
        request has this id (it finished already, or was never added): nothing to drop, as vLLM's abort of one.
        Several ids (a list, as vLLM's abort_request takes them): each is dropped, and the list of what each returns.
        TypeError for an id that is no str (add_request takes none)."""
        if not isinstance(request_id, str):
            if not isinstance(request_id, Iterable):  # abort(7): a counter kept as the id, which add_request refuses
                raise TypeError(
                    f"request_id must be a str or a list of them, as vLLM's abort_request takes, got "
                    f"{type(request_id).__name__} {request_id!r}"
                )
            return [self.abort(one) for one in request_id]
        with self.lock:
            for queue in (self.waiting, self.prefilling, self.running):
                for request in queue:
                    if request.request_id == request_id:
                        queue.remove(request)
                        self.cache.free(request_id)
                        self.aborted.append(self._output(request, [], "", [], "abort"))
                        return request.scheduled_at is not None
        return None

    abort_request = abort  # vLLM's LLMEngine name for it

    def load_adapter(self, name: str, folder: str | Path, replace: bool = False) -> None:
        """Serve the LoRA adapter in `folder` as `name` from the next step on (seekstack.adapters.registry); raises
        CheckpointError for a folder that holds no adapter of this model, ValueError for a name in use (`replace`:
        a loaded `name` takes the new weights unless unfinished requests still use it)."""
        from seekstack.adapters.registry import adapter_folder, read_factors

        folder = adapter_folder(folder)
        factors = read_factors(self.config, folder)  # outside the lock: the steps go on meanwhile
        with self.lock:
            self.lora.add(name, factors, replace, self._requests_on_adapter(name))
            self._model_changes += 1
            self._requested_adapters.pop(name, None)  # the caller's now: never unloaded for a lora_request's

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`; ValueError when it is not loaded or unfinished requests still use it."""
        with self.lock:
            self.lora.remove(name, self._requests_on_adapter(name))
            self._model_changes += 1
            self._requested_adapters.pop(name, None)  # loaded again, by load_adapter, it is the caller's

    def _requests_on_adapter(self, name: str) -> int:
        """How many unfinished requests adapter `name` serves (0 when it is not loaded); under the lock."""
        slot = self.lora.slots.get(name)
        return sum(r.adapter_slot == slot for r in self._unfinished()) if slot else 0

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running, or has an abort not yet reported by `step`."""
        with self.lock:
            return bool(self.aborted) or any(True for _ in self._unfinished())

    has_unfinished_requests = has_unfinished  # vLLM's LLMEngine name for it

    def get_tokenizer(self) -> Tokenizer:
        """The engine's tokenizer (`engine.tokenizer`), as vLLM's LLM.get_tokenizer() gives its own: a seekstack
        Tokenizer (encode, decode, apply_chat_template)."""
        return self.tokenizer

    def reset_prefix_cache(self) -> None:
        """Drop the cached prompt prefixes: call it after changing the model's weights in place (RL weight sync),
        or later requests would share prefix values computed by the old weights."""
        with self.lock:
            self.cache.reset_prefix_cache()
            # every copy compared with its weight: a write through `.data`, or to an inference tensor, counts nowhere
            self._follow_weights([self.model.lm_head, *copied_linears(self.model)])

    def _follow_weights(self, linears: list[torch.nn.Module]) -> None:
        """Copy the weights of `linears` again into the copies laid out from them that no longer hold them (the decode
        layout's: seekstack.infer.packed), and the head into the drafts' rows of it where it is among them."""
        refresh_copies(linears)
        if self.model.lm_head in linears:
            refresh_draft_vocabulary(self.model, self.draft_vocabulary)
        self._head_versions.mark()
        self._panel_versions.mark()
        self._model_changes += 1

    def stats(self) -> EngineStats:
        """Requests running (prefilling included) and waiting, cache use, prompt-token and speculative counters."""
        with self.lock:
            return EngineStats(
                running=len(self.running) + len(self.prefilling),
                waiting=len(self.waiting),
                cache_usage=self.cache.usage,
                prefill_tokens=self.prefill_tokens,
                spec_drafted=self.spec_drafted,
                spec_accepted=self.spec_accepted,
                preemptions=self.preemptions,
                running_adapters=self._adapters_of(itertools.chain(self.prefilling, self.running)),
                waiting_adapters=self._adapters_of(self.waiting),
            )

    def _adapters_of(self, requests: Iterable[_Request]) -> tuple[str, ...]:
        """The names of the LoRA adapters `requests` use, each once, in the order they were loaded; under the lock."""
        slots = {request.adapter_slot for request in requests}
        return tuple(name for name, slot in self.lora.slots.items() if slot in slots)

    def _unfinished(self):
        return itertools.chain(self.waiting, self.prefilling, self.running)

    # ------------------------------------------------------------------ scheduling
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One step: grow (or preempt) running requests, admit waiting ones, decode all running ones together, prefill
        one chunk of prompts. The model runs in eval mode and is left in the mode it had (`evaluating`)."""
        with self.lock.for_step(), evaluating(self.model):
            outputs, self.aborted = self.aborted, []
            self._grow()
            self._admit()
            if self.running:
                with self.step_threads.running(len(self.running) * (self.draft_tokens + 1)), self._decode_timer():
                    outputs += self._decode()
            if self.prefilling:
                waiting_tokens = sum(r.prefill_len - r.num_cached for r in self.prefilling)
                with self.step_threads.running(min(waiting_tokens, self.prefill_chunk)):
                    outputs += self._prefill()
            for output in outputs:
                inbox = self._inboxes.get(output.request_id)
                if inbox is not None:
                    inbox.append(output)
            return outputs

    def _add_awaited(
        self, prompt_ids: list[int], params: SamplingParams, inbox: deque[RequestOutput], adapter: str | None = None
    ) -> str:
        """Queue a request whose outputs `step` puts in `inbox`, from its first step on, whichever thread steps
        (`generate`, `stream`); its id. `_forget` it once done."""
        with self.lock:  # no step between the request's queueing and its inbox
            request_id = self.add_request(prompt_ids, params, adapter=adapter)
            self._inboxes[request_id] = inbox
            return request_id

    def _forget(self, request_id: str) -> None:
        """Abort an awaited request (`_add_awaited`) unless it has finished, and drop its inbox."""
        self.abort(request_id)
        with self.lock:
            self._inboxes.pop(request_id, None)

    def _compile_decode(self) -> None:
        """Run decode steps (and their MTP drafts) compiled from now on: one graph each, no device sync inside, the
        MoE on its gathered path. Prefill stays eager: long chunks of varied widths, bound by the matmuls."""
        # A compiled function gets a graph per draft count (and the drafting functions per batch shape class), and
        # engines in one process share those graphs' cache: several engines (a benchmark comparing draft counts)
        # pass dynamo's default of 8, after which it would run the function eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        cpu_kernels.available()  # built here, outside the graph that calls it
        # Dynamo keeps its guards on the model: LoRA loads swap module classes and buffers under a compiled engine.
        self._decode_model = _compiled(decode_step)
        self._decode_drafts = _compiled(mtp_drafts)
        self._greedy_speculation = _compiled(greedy_speculation)
        self._eager_seconds_left = None
        self.draft_count.forget_step_times()  # eager steps' seconds say little of compiled ones

    @contextlib.contextmanager
    def _decode_timer(self) -> Iterator[None]:
        """Count an eager decode step's seconds towards compiling (`compile=None`); say on stderr how long a step
        that compiled a new graph took (inductor keeps the generated code on disk: a later run compiles faster)."""
        graphs, sequences = _graphs_compiled(), len(self.running)
        drafts = min((len(r.drafts) for r in self.running), default=0)  # a graph of its own per draft count
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        if self._eager_seconds_left is not None:
            self._eager_seconds_left -= seconds
            if self._eager_seconds_left <= 0:
                self._compile_decode()
        elif _graphs_compiled() > graphs:
            self.compile_s += seconds
            verifying = f", verifying {drafts} draft(s)," if self.speculative else ""
            self.notify(f"compiled the decode step for {sequences} sequence(s){verifying} in {seconds:.1f} s")

    def _admit(self) -> None:
        """Move waiting requests to prefilling, first come first served, while the batch has room and the cache
        has blocks for their prompts (shared with the prefix cache where it holds them); blocks for the
        completion come as it grows (`_grow`)."""
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            tokens = request.ids[: request.prefill_len]
            salt = self.lora.cache_salt(request.adapter_slot)
            if request.params.prompt_logprobs is not None:  # every prompt position computed: no prefix-cache hit
                salt += f"/uncached:{next(self._admissions)}"
            if not self.cache.can_admit(tokens, self._slots_held(len(tokens)), salt):
                return
            request.num_cached = self.cache.admit(request.request_id, tokens, self._slots_held(len(tokens)), salt)
            if request.scheduled_at is None:
                request.scheduled_at = time.perf_counter()
                request.cached_tokens = request.num_cached
            request.admitted = next(self._admissions)
            self.prefilling.append(self.waiting.popleft())

    def _grow(self) -> None:
        """Give each running request the blocks its next decode step writes; while too few are free, preempt the
        latest admitted request: its blocks go back to the pool (cached ones stay cached), and it waits at the
        head of the queue to recompute its tokens, keeping its sampled ones and its sampler state."""
        while True:
            needed = {r.request_id: self._slots_held(len(r.ids)) for r in self.running}
            shortfall = sum(
                self.cache.blocks_for(tokens) - len(self.cache.tables[request_id])
                for request_id, tokens in needed.items()
            )
            if shortfall <= self.cache.num_free:
                break
            victim = max(itertools.chain(self.prefilling, self.running), key=lambda r: r.admitted)
            (self.running if victim in self.running else self.prefilling).remove(victim)
            self.cache.free(victim.request_id)
            victim.num_cached, victim.drafts = 0, []
            self.waiting.appendleft(victim)
            self.preemptions += 1
        for request_id, tokens in needed.items():
            self.cache.allocate(request_id, tokens)

    def _prefill(self) -> list[RequestOutput]:
        """Feed up to `prefill_chunk` prompt tokens, over as many prefilling requests as they reach.

        Twins (the same tokens so far, adapter and cached length: n samples of one prompt, GRPO's G completions) are
        computed once: the first one's forward gives the others their logits and a copy of its new cache slots, and
        they cost the chunk nothing. Not with speculative decoding, whose prefill drafts from each row's own sampled
        token."""
        batch, counts, computed_by, budget = [], [], [], self.prefill_chunk
        first_of: dict[tuple, int] = {}  # a twin key -> the row computing it
        for request in self.prefilling:
            alone = self.speculative or request.params.prompt_logprobs is not None  # its own logits at each position
            twin = () if alone else tuple(request.ids[: request.prefill_len])
            key = (request.adapter_slot, request.num_cached, twin or request.request_id)
            if key in first_of:
                counts.append(counts[first_of[key]])
            elif budget > 0:
                counts.append(min(request.prefill_len - request.num_cached, budget))
                budget -= counts[-1]
                first_of[key] = len(batch)
            else:
                continue
            computed_by.append(first_of[key])
            batch.append(request)
        starts = [request.num_cached for request in batch]
        rows = [r.ids[start : start + count] for r, start, count in zip(batch, starts, counts, strict=True)]
        computed = sorted(set(computed_by))
        self.prefill_tokens += sum(counts[row] for row in computed)
        computed_rows = [[values[row] for row in computed] for values in (batch, rows, starts, counts)]
        computed_batch, _, computed_starts, computed_counts = computed_rows
        every_position = any(r.params.prompt_logprobs is not None for r in computed_batch)
        logits, hidden, _ = self._forward(*computed_rows, prefill=True, every_position=every_position)
        if every_position:  # a row asked for prompt_logprobs: the logits of every position, the last one's sampled
            self._record_prompt_logprobs(computed_batch, logits, computed_starts, computed_counts)
            last = torch.tensor(computed_counts, device=self.device) - 1
            logits = logits[torch.arange(len(computed), device=self.device), last][:, None]
        if len(computed) < len(batch):
            self.cache.copy_tokens(
                [(batch[first].request_id, request.request_id, starts[first], counts[first])
                 for row, (request, first) in enumerate(zip(batch, computed_by, strict=True)) if first != row]
            )  # fmt: skip
            logits = logits[torch.tensor([computed.index(first) for first in computed_by], device=self.device)]
        done, finished, tokens, logprobs = [], [], [], []
        for row, (request, count) in enumerate(zip(batch, counts, strict=True)):
            request.num_cached += count
            if request.num_cached == request.prefill_len:
                done.append(row)
        fresh = [row for row in done if not batch[row].resumed]  # a resumed request already holds its next token
        if fresh:
            finished = [batch[row] for row in fresh]
            tokens, logprobs = self._sample(finished, logits[torch.tensor(fresh, device=self.device), 0])
            for request, token in zip(finished, tokens, strict=True):
                request.ids.append(token)
        if self.speculative:  # every chunk enters the MTP layer's cache too; finished prompts get their first drafts
            rows = [r.draft_checks for r in itertools.chain(self.running, self.prefilling)]
            count = self.draft_count.choose(rows)
            # follow-up drafts reach count - 1 slots past each row's last position (start + count - 1); a chunk that
            # finishes no prompt drafts nothing (no row would keep its drafts) and only fills the MTP layer's cache
            count = min(count, self._draft_room(s + c for s, c in zip(starts, counts, strict=True)) + 1) if done else 0
            drafts = self._draft(hidden, _shifted_rows(batch, starts, counts), counts, count, prefill=True)
            for row in done:
                batch[row].drafts = drafts[row]
        for request in batch:
            self.cache.commit(request.request_id, request.ids, request.num_cached)
        for row in done:
            self.prefilling.remove(batch[row])
            self.running.append(batch[row])
        return self._emit_each(finished, tokens, logprobs)

    def _decode(self) -> list[RequestOutput]:
        """One token per running request, or with speculative decoding the verified draft plus one."""
        batch = list(self.running)
        starts = [len(r.ids) - 1 for r in batch]
        if not self.speculative:
            return self._decode_plain(batch, starts)
        clock = step_clock(self.device)
        started, graphs = clock(), _graphs_compiled()
        drafted = min(len(r.drafts) for r in batch)  # chosen when the drafts were made; prefill drafts the most
        next_count = self.draft_count.choose([r.draft_checks for r in batch])
        # verification writes `drafted` slots past the pending token, the next drafts next_count - 1 further
        room = self._draft_room(len(r.ids) for r in batch)
        drafted = min(drafted, room)
        next_count = min(next_count, room - drafted + 1)
        if drafted or next_count:
            outputs = self._decode_speculative(batch, starts, drafted, next_count)
        else:  # no drafts to verify or make: a step as an engine without MTP runs it (the MTP cache not filled)
            outputs = self._decode_plain(batch, starts)
        if _graphs_compiled() == graphs:  # a step that compiled a graph tells nothing of the steps after it
            self.draft_count.observe_step(len(batch), drafted, next_count, clock() - started)
        return outputs

    def _decode_plain(self, batch: list[_Request], starts: list[int]) -> list[RequestOutput]:
        """One token per request of `batch`, whose pending tokens stand at `starts`."""
        logits, _, greedy = self._forward(batch, [[r.ids[-1]] for r in batch], starts, [1] * len(batch))
        tokens, logprobs = self._sample(batch, logits[:, 0], greedy)
        for request, token in zip(batch, tokens, strict=True):
            request.ids.append(token)
        return self._emit_each(batch, tokens, logprobs)

    def _decode_speculative(
        self, batch: list[_Request], starts: list[int], drafted: int, next_count: int
    ) -> list[RequestOutput]:
        """Verify each request's `drafted` drafts with one forward over [pending, drafts]; keep the accepted ones plus
        one; draft `next_count` for the next step (`DraftCount.choose`; with none, the MTP block does not run)."""
        fill_cache = next_count > 0
        checks = [r.draft_checks for r in batch]
        width = drafted + 1
        rows = [[r.ids[-1], *r.drafts[:drafted]] for r in batch]
        # Keys past the verified tokens are gathered only for drafts beyond the first (`mtp_drafts`' follow-ups).
        lookahead = max(next_count - 1, 0)
        input_ids, positions = self._inputs(batch, rows, starts, [width] * len(batch), lookahead)
        next_drafts = None
        if self._raw_argmax(batch):  # p is one-hot on the logits' argmax: accept exactly when it agrees
            vocabulary = self._draft_vocabulary()
            arguments = (self.model, input_ids, positions, self.cache, next_count, fill_cache, vocabulary)
            call = ("speculative", input_ids.shape, next_count, fill_cache, vocabulary is None)
            logits, largest, chosen, accepted, next_drafts = self._unguarded(call, self._greedy_speculation, *arguments)
            accepted_list = accepted.tolist()
            kept_list = [count + 1 for count in accepted_list]
            _fail_rows_without_distribution(batch, has_distribution(largest).tolist(), kept_list)
        else:
            out, _, _ = self._decode_step(input_ids, positions)
            logits, hidden = out.logits, out.hidden_states
            accepted, chosen, kept = self._isolated(
                batch,
                lambda rows: accept_drafts(self._sampling_batch(batch[rows]), logits[rows], input_ids[rows, 1:]),
                failed_row=(torch.zeros(1, dtype=torch.long), torch.zeros(1, width, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long)),  # it keeps no token: its error ends it
            )  # fmt: skip
            accepted_list, kept_list = accepted.tolist(), kept.tolist()
        chosen_list = chosen.tolist()
        self.spec_drafted += drafted * len(batch)
        self.spec_accepted += sum(accepted_list)
        self.draft_count.observe(drafted, accepted_list, checks, kept_list)
        new_tokens = [chosen_list[b][:count] for b, count in enumerate(kept_list)]
        logprobs: list[list] = [[] for _ in batch]
        if any(r.params.logprobs for r in batch):
            columns = [self._logprobs(batch, logits[:, t], chosen[:, t]) for t in range(width)]
            logprobs = [[column[b] for column in columns][: len(tokens)] for b, tokens in enumerate(new_tokens)]
        for request, tokens in zip(batch, new_tokens, strict=True):
            request.ids.extend(tokens)
        if next_drafts is None:
            counts = [len(tokens) for tokens in new_tokens]
            next_list = self._draft(hidden, _shifted_rows(batch, starts, counts), counts, next_count, fill_cache)
        else:
            next_list = next_drafts.tolist()
        for request, drafts in zip(batch, next_list, strict=True):
            request.drafts = drafts
        return [self._emit(r, tokens, lp) for r, tokens, lp in zip(batch, new_tokens, logprobs, strict=True)]

    # ------------------------------------------------------------------ model calls
    def _forward(
        self,
        batch: list[_Request],
        rows: list[list[int]],
        starts: list[int],
        counts: list[int],
        prefill: bool = False,
        every_position: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Main model over each row's new tokens at their positions: logits (B, T, V) or, for `prefill`, (B, 1, V)
        at each row's last real token (all T with `every_position`, for prompt_logprobs); hidden states (B, T, D);
        and a compiled decode step's greedy picks (`decode_step`), None where the step ran eagerly.
        A plain decode step drafts nothing after it, so it gathers no keys past its rows (no lookahead)."""
        input_ids, positions = self._inputs(batch, rows, starts, counts, None if prefill else 0)
        if prefill:
            logits_at = None if every_position else torch.tensor(counts, device=self.device) - 1
            out = self.model(
                input_ids, cache=self.cache, positions=positions, logits_at=logits_at, output_expert_load=False
            )
        elif self.decode_compiled and not (self.eager_lone_row and len(batch) == 1):
            out, best, drawable = self._decode_step(input_ids, positions)
            return out.logits, out.hidden_states, (best, drawable)
        else:
            out = self.model(input_ids, cache=self.cache, positions=positions, output_expert_load=False)
        return out.logits, out.hidden_states, None

    def _decode_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[ModelOutput, torch.Tensor, torch.Tensor]:
        """The decode step on the planned cache (`decode_step`), compiled once `decode_compiled`, its guard check
        skipped where the engine knows its answer (`_unguarded`)."""
        call = ("forward", input_ids.shape)
        return self._unguarded(call, self._decode_model, self.model, input_ids, self.cache, positions)

    def _unguarded(self, call: tuple, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """compiled(*args, **kwargs), a decode step on the planned cache (eager until `_compile_decode`: run as it is).
        Dynamo's guard check (~0.7 ms of a `small` step once the step's weights have pushed the Python objects it reads
        out of the CPU caches) is skipped where the engine knows its answer:
        - `call` (what picks the graph beyond the cache: the input shape, a speculative step's draft count) of a fully
          guarded call under the same `_graph_state` (the model unchanged here, no graph compiled in the process
          since, the same `cpu_kernels.set_enabled`);
        - no adapter loaded (its rows' selection is a branch of the graph);
        - on `guard_skip_thread`: the skip is torch's process-wide stance, under which another thread's compiled call
          skips its check too and one that needs a compile raises (a GRPO run's compiled training blocks on the main
          thread beside `async_rollouts`' rollout thread, whose steps therefore never skip); other engines' compiled
          calls, on any thread, wait for the skipped step to end (`_COMPILED_CALLS`).
        Skipped, dynamo still checks the guards that tell its cached graphs apart (every input and buffer tensor's
        shape, dtype and device, the size guards, any guard that ever failed) and raises, before running anything,
        where none passes: the step then runs guarded. What the engine does not see (a hook or an attribute set on a
        module by hand) reaches a skipped step unchecked: give such a model a new engine."""
        if not self.decode_compiled:
            return compiled(*args, **kwargs)
        if (
            threading.current_thread() is self.guard_skip_thread
            and not self.lora.slots
            and self._graph_state() == self._guarded_state
            and call in self._guarded_calls
        ):
            try:
                with _COMPILED_CALLS, torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return compiled(*args, **kwargs)
            except RuntimeError as error:  # no cached graph's differentiating guards passed
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
        out = compiled(*args, **kwargs)
        state = self._graph_state()  # after the call: a compile in it counts
        if state != self._guarded_state:
            self._guarded_state, self._guarded_calls = state, set()
        self._guarded_calls.add(call)
        return out

    def _graph_state(self) -> tuple[int, int, bool]:
        """What picks a compiled decode step's graph beyond its inputs' shapes and the guards dynamo keeps under
        `skip_guard_eval_unsafe`: the engine's changes to the model, the graphs compiled in the process, and the
        cpu_kernels switch (a global the graph guards on: `bench/decode_options.py` flips it between engines)."""
        return (self._model_changes, torch._dynamo.utils.counters["stats"]["unique_graphs"], cpu_kernels._switch["on"])

    def _inputs(
        self,
        batch: list[_Request],
        rows: list[list[int]],
        starts: list[int],
        counts: list[int],
        lookahead: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan the cache for the next forward (keys gathered `lookahead` slots further, by default the most drafts
        need); the rows' token ids padded to one width and their positions (B, T)."""
        width = max(counts)
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self.device)
        if (weights := self.model.embed_tokens.weight.dtype) != (pools := self.cache.pools[0].dtype):
            raise RuntimeError(
                f"the model's weights are {weights} but this engine's KV cache holds {pools}, their dtype when it was "
                f"built: after converting the model (model.to({weights})), build a new Engine on it"
            )
        # the weights changed since (a load_state_dict, an RL weight sync): those the versions tell of, each read once
        changed = self._head_versions.changed_modules()
        if changed or cpu_kernels.reads_panels(len(rows) * width):
            changed += self._panel_versions.changed_modules()
        if changed:
            self._follow_weights(changed)
        self.lora.select([r.adapter_slot for r in batch], self.device)
        lookahead = self.lookahead if lookahead is None else lookahead
        return input_ids, self.cache.plan([r.request_id for r in batch], starts, counts, width, lookahead)

    def _draft(
        self,
        hidden: torch.Tensor,
        next_rows: list[list[int]],
        counts: list[int],
        count: int,
        fill_cache: bool = True,
        prefill: bool = False,
    ) -> list[list[int]]:
        """The MTP module's `count` drafts after each row's last real position, counts[b] - 1, of the main forward just
        run (`mtp_drafts`). It reuses that forward's cache plan; a row with fewer real tokens feeds padding, which
        lands in an MTP cache slot that the next step overwrites before anything reads it."""
        width = hidden.shape[1]
        next_ids = torch.tensor([row + [0] * (width - len(row)) for row in next_rows], device=self.device)
        last = torch.tensor(counts, device=self.device) - 1
        positions, vocabulary = self.cache.positions(), self._draft_vocabulary()
        arguments = (self.model, hidden, next_ids, positions, last, self.cache, count, fill_cache, vocabulary)
        if prefill:
            return mtp_drafts(*arguments).tolist()
        call = ("drafts", hidden.shape, count, fill_cache, vocabulary is None)
        return self._unguarded(call, self._decode_drafts, *arguments).tolist()

    def _draft_vocabulary(self) -> DraftVocabulary | None:
        """The drafts' vocabulary, unless a served adapter replaces the output head (its rows are the adapter's)."""
        return self.draft_vocabulary if isinstance(self.model.lm_head, torch.nn.Linear) else None

    # ------------------------------------------------------------------ sampling and output
    @property
    def _token_count(self) -> int | None:
        """The tokenizer's ids where the model's vocabulary is padded past them, else None: the ids from it on are
        never sampled and have no log-probability (`without_padded_ids`)."""
        return self.tokenizer.vocab_size if self.tokenizer.vocab_size < self.config.vocab_size else None

    def _sampling_batch(self, batch: list[_Request]) -> SamplingBatch:
        return SamplingBatch(
            [r.params for r in batch], [r.generator for r in batch], [r.penalties for r in batch], self.device,
            [r.constraint for r in batch], self._token_count,
            [r.stop_ids | self.eos_ids if len(r.output_ids) < r.params.min_tokens else frozenset()
             for r in batch],  # min_tokens: EOS too with ignore_eos, as vLLM bans its all_stop_token_ids
            [r.params.min_tokens - len(r.output_ids) for r in batch],
        )  # fmt: skip

    def _raw_argmax(self, batch: list[_Request]) -> bool:
        """Whether every row's token is its logits' argmax as the model gave them (`SamplingBatch.raw_argmax`: no
        padded ids, no min_tokens' bans left), read off the requests without making the SamplingBatch."""
        return self._token_count is None and all(
            r.raw_argmax and len(r.output_ids) >= r.params.min_tokens for r in batch
        )

    def _sample(
        self, batch: list[_Request], logits: torch.Tensor, greedy: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per request from logits (B, V), with log-probabilities for the requests that ask for them; a
        request whose sampling raises gets token 0 and ends alone at its output (`_isolated`). A batch of rows whose
        token is the raw argmax takes it without a SamplingBatch (3% of a compiled `tiny` 1-row step, 5% at 8 rows),
        and takes a compiled step's argmaxes (`greedy`, `decode_step`) where every row has a distribution."""
        raw = self._raw_argmax(batch)
        if raw and greedy is not None and bool(greedy[1]):
            tokens = greedy[0]
        else:
            (tokens,) = self._isolated(
                batch,
                lambda rows: (
                    greedy_tokens(logits[rows]) if raw else self._sampling_batch(batch[rows]).sample(logits[rows]),
                ),
                failed_row=(torch.zeros(1, dtype=torch.long),),
            )
        logprobs = (
            self._logprobs(batch, logits, tokens) if any(r.params.logprobs for r in batch) else [None] * len(batch)
        )
        return tokens.tolist(), logprobs

    def _isolated(
        self,
        batch: list[_Request],
        compute: Callable[[slice], tuple[torch.Tensor, ...]],
        failed_row: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        """`compute(rows)`: tensors whose first dimension is those rows of `batch` (a slice: views of the step's
        tensors, no copies), for all rows at once. When that raises, each row alone (generators as they were): a row
        that still raises takes `failed_row` and its request's `error` is set, so one request's parameters end that
        request, not the step of all."""
        states = [request.generator.get_state() for request in batch]
        try:
            return compute(slice(0, len(batch)))
        except Exception:
            for request, state in zip(batch, states, strict=True):
                request.generator.set_state(state)
        parts = []
        for row, request in enumerate(batch):
            try:
                parts.append(compute(slice(row, row + 1)))
            except Exception as error:
                request.error = error
                parts.append(failed_row)
        return tuple(torch.cat(column).to(self.device) for column in zip(*parts, strict=True))

    def _logprobs(self, batch: list[_Request], logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        """The log-probability of each request's token under logits (B, V), for the requests that ask for them."""
        top_n = max(r.params.top_logprobs for r in batch)
        chosen, ranks, top_values, top_ids = token_logprobs(
            without_padded_ids(logits, self._token_count), tokens, top_n
        )
        columns = (chosen.tolist(), top_values.tolist(), top_ids.tolist(), tokens.tolist(), ranks.tolist())
        return [
            self._logprob_entry(r.params.top_logprobs, r.params.detokenize, *row) if r.params.logprobs else None
            for r, *row in zip(batch, *columns, strict=True)
        ]

    def _record_prompt_logprobs(
        self, batch: list[_Request], logits: torch.Tensor, starts: list[int], counts: list[int]
    ) -> None:
        """Add to each request asking for prompt_logprobs those of the prompt tokens its chunk predicts, from logits
        (B, T, V): position t of a chunk starting at `start` predicts token start + t + 1. A chunk computed again
        (after a preemption) adds none twice."""
        for b, (request, start, count) in enumerate(zip(batch, starts, counts, strict=True)):
            top_n = request.params.prompt_logprobs
            first, end = len(request.prompt_logprobs), min(start + count + 1, len(request.prompt_ids))
            if top_n is None or first >= end:
                continue
            targets = torch.tensor(request.prompt_ids[first:end], device=self.device)
            rows = without_padded_ids(logits[b, first - start - 1 : end - start - 1].float(), self._token_count)
            chosen, ranks, top_values, top_ids = token_logprobs(rows, targets, top_n)
            columns = (chosen.tolist(), top_values.tolist(), top_ids.tolist(), targets.tolist(), ranks.tolist())
            request.prompt_logprobs += [
                self._logprob_entry(top_n, request.params.detokenize, *row) for row in zip(*columns, strict=True)
            ]

    def _logprob_entry(
        self,
        top_n: int,
        detokenize: bool,
        logprob: float,
        top_values: list[float],
        top_ids: list[int],
        token: int,
        rank: int,
    ) -> TokenLogprob:
        """A token's log-probability and `rank` with the `top_n` likeliest tokens', their texts "" without
        `detokenize` (an `UndecodedTokenLogprob`)."""
        text = self._token_text if detokenize else _no_text  # ids only, as its text
        top = [(i, text(i), v) for i, v in zip(top_ids[:top_n], top_values[:top_n], strict=True)]
        return (TokenLogprob if detokenize else UndecodedTokenLogprob)(token, text(token), logprob, top, rank)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _emit(self, request: _Request, tokens: list[int], logprobs: list) -> RequestOutput:
        """Hand out `tokens` until one of them finishes the request: stop token, stop string or length; or end it with
        its error, handing out nothing, when its sampling raised."""
        if request.error is not None:
            self.running.remove(request)
            self.cache.free(request.request_id)
            error = request.error
            if isinstance(error, ConfigError):  # a field of the request left no token to sample: said where
                error = error.at(f"token {len(request.output_ids) + 1} of the reply")
            reason = f"{type(error).__name__}: {error}"
            return dataclasses.replace(self._output(request, [], "", [], "error"), error=reason, cause=error)
        text, emitted, reason, stop_reason = "", [], None, None
        for token in tokens:
            emitted.append(token)
            request.output_ids.append(token)
            if request.penalties is not None:
                request.penalties.add(token)
            if token in request.stop_ids:
                # vLLM's: the tokenizer's EOS gives None; generation_config.json's other eos_token_id ids are its
                # stop_token_ids (SamplingParams.update_from_generation_config), named as those are
                reason, stop_reason = "stop", None if token == self.tokenizer.eos_id else token
                if request.params.include_stop_str_in_output:  # vLLM's: the stop token's text too (a special one's
                    text += request.stream.push(token)[0]  # only with skip_special_tokens=False)
                text += request.stream.flush()
                break
            if request.constraint is not None:
                request.constraint.accept(token)
            piece, stopped = request.stream.push(token)
            text += piece
            if stopped:
                reason, stop_reason = "stop", request.stream.matched_stop
                break
            complete = request.constraint is not None and request.constraint.complete  # e.g. a whole JSON value
            if complete or len(request.output_ids) >= request.params.max_new_tokens:
                reason = "stop" if complete else "length"
                text += request.stream.flush()
                break
        if reason is not None:
            self.running.remove(request)
            self.cache.free(request.request_id)
        return self._output(request, emitted, text, logprobs[: len(emitted)], reason, stop_reason)

    def _emit_each(
        self, batch: list[_Request], tokens: list[int], logprobs: list[TokenLogprob | None]
    ) -> list[RequestOutput]:
        """`_emit` one new token per request."""
        return [
            self._emit(r, [token], logprobs[b : b + 1]) for b, (r, token) in enumerate(zip(batch, tokens, strict=True))
        ]

    def _output(
        self,
        request: _Request,
        tokens: list[int],
        text: str,
        logprobs: list,
        reason: str | None,
        stop_reason: int | str | None = None,
    ) -> RequestOutput:
        """`request`'s output of `tokens`, with their `logprobs` if it asked for them (an empty list with none: its
        joined completion then keeps one entry per token, whatever its last output); its first output carries its
        prompt's log-probabilities where it asked for prompt_logprobs."""
        first = len(request.output_ids) == len(tokens)
        asked = request.params.prompt_logprobs is not None and first
        return RequestOutput(
            request_id=request.request_id,
            token_ids=tokens,
            text=text,
            logprobs=logprobs if request.params.logprobs else None,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.output_ids),
            scheduled_at=request.scheduled_at,
            cached_tokens=request.cached_tokens,
            prompt_logprobs=request.prompt_logprobs if asked else None,
            stop_reason=stop_reason,
        )

    # ------------------------------------------------------------------ convenience
    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate`, `chat` and `stream` sample with when given no sampling_params, by the name and as vLLM's
        LLM.get_default_sampling_params: SamplingParams' defaults but where the checkpoint's generation_config.json sets
        them (`sampling_defaults`)."""
        return SamplingParams(**self.sampling_defaults)

    def _prompt_token_ids(self, prompt: str | Sequence[int] | Mapping[str, Any]) -> list[int]:
        """The token ids of one prompt of `generate` or `stream`: a text (`Tokenizer.encode_prompt`), token ids, or
        vLLM's TextPrompt {"prompt": text} or TokensPrompt {"prompt_token_ids": ids} (whose ids it reads, as vLLM);
        ValueError for a mapping of other keys (multi_modal_data, ...), which would go unread."""
        if isinstance(prompt, Mapping):
            unread = sorted(set(prompt) - set(PROMPT_KEYS))
            if unread or not prompt:
                problem = f"'s {', '.join(map(repr, unread))} would go unread" if unread else " holds no prompt"
                raise ValueError(
                    f"a prompt mapping{problem}: give {{'prompt': text}} or {{'prompt_token_ids': ids}}, vLLM's "
                    "TextPrompt and TokensPrompt"
                )
            if isinstance(prompt.get("prompt_token_ids"), str):  # its text would be encoded, not read as ids
                raise TypeError(
                    f"prompt_token_ids={prompt['prompt_token_ids']!r} is a text: give token ids, or the text as "
                    "{'prompt': text}"
                )
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt)
        if not holds_token_ids(prompt):
            decode = " (decode bytes to text first)" if isinstance(prompt, (bytes, bytearray)) else ""
            raise TypeError(
                f"prompt {shown_value(prompt)} is no prompt: give a text{decode}, token ids or vLLM's "
                "{'prompt': text}"
            )
        return list(map(token_id, prompt))

    def stream(
        self, prompt: str | list[int] | Mapping[str, Any], sampling_params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Add one request, a text (encoded as `generate` encodes it), token ids or vLLM's {"prompt": text} or
        {"prompt_token_ids": ids}, and step until it finishes, yielding its outputs as they come (other requests run
        too); no sampling_params (vLLM's name for them): `get_default_sampling_params`."""
        prompt_ids = self._prompt_token_ids(prompt)
        inbox: deque[RequestOutput] = deque()
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        request_id = self._add_awaited(prompt_ids, params, inbox)
        try:
            finished = False
            while not finished:
                self.step()
                while inbox:
                    output = inbox.popleft()
                    finished = output.finished
                    yield output
        finally:
            self._forget(request_id)  # a consumer that stops early frees the request's blocks

    def generate(
        self,
        prompts: str | list[int] | Mapping[str, Any] | Sequence[str | list[int] | Mapping[str, Any]] | torch.Tensor,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | Sequence[str | None] | None = None,
        use_tqdm: bool | Callable[..., Any] = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: int | Sequence[int] | None = None,
    ) -> list[Completion]:
        """Add all prompts (a str, a list of token ids, vLLM's TextPrompt {"prompt": text} or TokensPrompt
        {"prompt_token_ids": ids} is one prompt, as in vLLM; a tensor of ids reads as its list: 1-D one prompt, 2-D a
        prompt per row, as transformers' input_ids; text is encoded by `encode_prompt`:
        BOS first with a DeepSeek release's tokenizer, as transformers encodes it, none with seekstack's, as its
        training shards hold none), each on the base or on the loaded adapter `adapters` names for it (one name: all
        on that adapter), and step until all finish. A prompt refused (too long, an adapter not loaded) raises
        ValueError naming it by its index among several, the prompts added before it aborted, none left queued.
        `sampling_params` (vLLM's name), one for all or one per prompt; none: `get_default_sampling_params`, as
        vLLM's. `use_tqdm`: a bar of the requests finished on stderr, as vLLM's (off by default here: RL and eval
        loops call generate often), or, as vLLM's too, a callable making one (functools.partial(tqdm, leave=False)).
        `lora_request`, vLLM's (a `LoRARequest`, or one per prompt), in place of
        `adapters`: the adapter each names (`_adapter_of_lora_request`). `priority`, vLLM's, one per prompt (an int or
        a 0-d tensor: the same for each, as a newer vLLM's), is taken as 0 for each prompt (or None) alone: requests
        are admitted first come, first served."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() not in (1, 2) or prompts.is_floating_point() or prompts.is_complex():
                raise ValueError(
                    f"a tensor of prompts holds integer token ids, 1-D (one prompt) or 2-D (a prompt per row); got "
                    f"{prompts.dtype} of shape {tuple(prompts.shape)}"
                )
            prompts = prompts.tolist()
        if isinstance(prompts, Iterator):  # a generator or a map of prompts, read once (it has no len)
            prompts = list(prompts)
        # one prompt: a text, vLLM's prompt mapping, token ids (5.0 too), or none (None, bytes), which is refused below
        one_prompt = not isinstance(prompts, Iterable) or isinstance(prompts, (str, bytes, bytearray, Mapping))
        one_prompt = one_prompt or (len(prompts) > 0 and not any(isinstance(t, Iterable) for t in prompts))
        prompts = [prompts] if one_prompt else list(prompts)
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if isinstance(priority, torch.Tensor):  # a 0-d tensor one for all, as an int; 1-D one per prompt
            priority = priority.tolist()
        one_priority = not isinstance(priority, Iterable) or isinstance(priority, str)  # None, an int, 0.0, "0"
        priorities = [priority] * len(prompts) if one_priority else list(priority)
        number = next((one for one in priorities if not isinstance(one, numbers.Real)), 0)
        if priority is not None and number != 0:  # text ("0"), None beside ints: not read as a priority other than 0
            raise TypeError(
                f"priority={priority if one_priority else priorities!r} holds {number!r}, a {type(number).__name__}: "
                "give vLLM's int priority, 0 for each prompt, or leave priority out"
            )
        if priority is not None and any(priorities):
            raise ValueError(
                f"priority={priority if one_priority else priorities!r}: vLLM's, taken here only as 0 for each prompt, "
                "its default: the engine admits requests first come, first served, as vLLM's default scheduling "
                "policy, which refuses other priorities too; add the urgent prompts first, or in a generate call of "
                "their own"
            )
        parts: dict[str, list[RequestOutput]] = {}
        # the adapters this call's lora_request resolved: held (none unloaded for another thread's) until it ends
        held: list[str] = []
        try:
            adapters_name = "adapters"
            if lora_request is not None:
                if adapters is not None:
                    raise ValueError(
                        "adapters= beside lora_request=: lora_request is vLLM's way to name them; give one"
                    )
                adapters_name = "lora_request"
                if isinstance(lora_request, (list, tuple)):
                    # every prompt's adapter, a later prompt's too: none is unloaded for another prompt of this call
                    named = {one.lora_name for one in lora_request if isinstance(getattr(one, "lora_name", None), str)}
                    adapters = [self._adapter_of_lora_request(one, held, keep=named) for one in lora_request]
                else:
                    adapters = self._adapter_of_lora_request(lora_request, held)
            # one adapter's name for all prompts, as one SamplingParams (vLLM's one lora_request), not one per letter
            one_adapter = adapters is None or isinstance(adapters, str)
            if not one_adapter and not isinstance(adapters, Iterable):  # vLLM's third argument, use_tqdm: a keyword
                raise TypeError(
                    f"adapters={adapters!r}: give a loaded adapter's name for all prompts or one per prompt (None: the "
                    "base model); use_tqdm, vLLM's third argument, is a keyword here: generate(prompts, params, "
                    "use_tqdm=True)"
                )
            adapter_list = [adapters] * len(prompts) if one_adapter else list(adapters)
            for name, values, one in (  # an int priority or None: one per prompt already
                ("sampling_params", params_list, "or one SamplingParams for all"),
                (adapters_name, adapter_list, f"(None: the base model), one for all, or leave {adapters_name} out"),
                ("priority", priorities, "(0), one int for all, or leave priority out"),
            ):
                if len(values) != len(prompts):
                    raise ValueError(f"{len(prompts)} prompts but {len(values)} {name}: give one per prompt {one}")
            prompt_ids = [self._prompt_token_ids(p) for p in prompts]
            prompt_texts = [
                p if isinstance(p, str) else p.get("prompt") if isinstance(p, Mapping) else None for p in prompts
            ]
            started = time.perf_counter()
            inbox: deque[RequestOutput] = deque()  # these requests' outputs, whichever thread's step made them
            first_token: dict[str, float] = {}
            finished_at: dict[str, float] = {}
            compiling: dict[str, float] = {}  # per request, the compile seconds of its decode steps (`compile_s`)
            samples: list[list[str]] = []  # each prompt's requests, one per sample (SamplingParams.n)
            for index, (ids, p, a) in enumerate(zip(prompt_ids, params_list, adapter_list, strict=True)):
                samples.append([])
                for sample in p.samples() if isinstance(p, SamplingParams) else [p]:  # add_request names a wrong p
                    try:
                        request_id = self._add_awaited(ids, sample, inbox, adapter=a)
                    except ValueError as error:  # which of many prompts (a ConfigError names its field: kept as is)
                        if len(prompt_ids) == 1 or isinstance(error, ConfigError):
                            raise
                        raise ValueError(f"prompt {index + 1} of {len(prompt_ids)}: {error}") from None
                    parts[request_id] = []
                    samples[-1].append(request_id)
            with _finished_counter(len(parts), use_tqdm) as count_finished:
                while len(finished_at) < len(parts):
                    self.step()
                    while inbox:
                        output = inbox.popleft()
                        parts[output.request_id].append(output)
                        first_token.setdefault(output.request_id, time.perf_counter())
                        compiling.setdefault(output.request_id, -self.compile_s)
                        if output.finished:
                            finished_at[output.request_id] = time.perf_counter()
                            compiling[output.request_id] += self.compile_s
                            count_finished()
        finally:  # a prompt refused, a failing step or an interrupt leaves no request behind holding cache blocks
            for request_id in parts:
                self._forget(request_id)
            with self.lock:
                self._held_adapters.subtract(held)
        completions = []
        for ids, text, request_ids in zip(prompt_ids, prompt_texts, samples, strict=True):
            first, *others = (
                joined_completion(  # the prompt's tokens the request kept (truncate_prompt_tokens: its last ones)
                    request_id, ids[len(ids) - parts[request_id][0].prompt_tokens :], parts[request_id], started,
                    first_token[request_id], finished_at[request_id], compiling[request_id], index, text,
                )
                for index, request_id in enumerate(request_ids)
            )  # fmt: skip
            first.others = others
            completions.append(first)
        return completions

    def _adapter_of_lora_request(
        self, request: LoRARequest | None, held: list[str], keep: Iterable[str | None] = ()
    ) -> str | None:
        """The name of the adapter vLLM's LoRARequest (`LoRARequest`, or vLLM's own) names, its lora_path loaded as
        lora_name first where no adapter of that name is (vLLM loads it on first use too), in the slot of the least
        recently asked for adapter that lora_request loaded, no request uses, no call holds and `keep` does not name,
        where every slot is taken (as vLLM's LRU cache evicts one); None: the base model. A loaded adapter is held
        (`_held_adapters`, its name appended to `held`, which the caller gives back) in the same hold of the lock that
        found or loaded it, so another thread's lora_request cannot unload it before this call's requests use it."""
        from seekstack.adapters.registry import adapter_folder

        if request is None:
            return None
        name, path = getattr(request, "lora_name", None), getattr(request, "lora_path", "")
        folder = adapter_folder(path) if path else None
        if not isinstance(name, str):
            raise TypeError(
                f"lora_request={shown_value(request)}: give a LoRARequest(lora_name, lora_int_id, lora_path) "
                "(seekstack.infer's or vLLM's) for all prompts or one per prompt; a loaded adapter's name goes in "
                "adapters="
            )
        with self.lock:
            loaded = self.lora.folder(name)  # not loaded and no folder: add_request names the loaded ones
            if loaded is not None:
                self._hold_adapter(name, held)
        if folder is not None and loaded is None:
            loaded = self._load_requested(name, folder, set(keep), held)
        if folder is not None and loaded is not None and folder.resolve() != loaded.resolve():
            shown = shown_value(name)
            raise ValueError(
                f"lora_request names adapter {shown} at {folder}, but {shown} is loaded from {loaded}: "
                f"unload_adapter({shown}) first, or give this one another lora_name"
            )
        return name

    def _load_requested(self, name: str, folder: Path, keep: set[str | None], held: list[str]) -> Path:
        """Load the adapter in `folder` as `name` for a lora_request and hold it (`_hold_adapter`), returning the folder
        it is loaded from: its folder read first, so one that holds no adapter (CheckpointError) unloads none; then,
        under one hold of the lock (two threads neither take the same free slot nor unload the same adapter), where
        every slot is taken, the least recently asked for adapter that lora_request loaded, no unfinished request
        uses, no call holds and `keep` does not name gives up its slot, and comes back if the engine refuses this one
        (its name, its rank)."""
        from seekstack.adapters.registry import read_factors

        factors = read_factors(self.config, folder)  # outside the lock: the steps go on meanwhile
        with self.lock:
            if self.lora.folder(name) is None:  # else another thread's request loaded it meanwhile
                unloaded = self._unload_least_recent(keep)
                try:
                    self.lora.add(name, factors)
                except Exception:
                    if unloaded is not None:
                        self.lora.add(*unloaded)
                        self._requested_adapters = {unloaded[0]: None, **self._requested_adapters}  # least recent
                    raise
                self._requested_adapters[name] = None
            self._hold_adapter(name, held)
            return self.lora.weights[name].folder

    def _hold_adapter(self, name: str, held: list[str]) -> None:
        """Hold loaded adapter `name` for a generate call (`held`, its holds) and make it the most recently asked for
        of those lora_request loaded; under the lock."""
        self._held_adapters[name] += 1
        held.append(name)
        if name in self._requested_adapters:
            self._requested_adapters[name] = self._requested_adapters.pop(name)

    def _unload_least_recent(self, keep: set[str | None]) -> tuple[str, Any] | None:
        """Where every adapter slot is taken, unload the least recently asked for adapter that lora_request loaded, no
        unfinished request uses, no generate call holds and `keep` does not name, if any: its name and weights;
        under the lock."""
        if len(self.lora.slots) < self.lora.max_loras:
            return None
        for name in list(self._requested_adapters):
            if name not in keep and not self._held_adapters[name] and not self._requests_on_adapter(name):
                unloaded = name, self.lora.weights[name]
                self.lora.remove(name)
                del self._requested_adapters[name]
                return unloaded
        return None

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        chat_template_content_format: str = "auto",
        mm_processor_kwargs: Mapping[str, Any] | None = None,
    ) -> list[Completion]:
        """The assistant's reply to one conversation (a list of messages, as OpenAI's) or to each of a list of them,
        as vLLM's LLM.chat: each rendered by the tokenizer's chat template (`Tokenizer.encode_chat`, which refuses a
        malformed message naming it) and generated (`generate`), the reply ending at the template's special tokens
        (the end of its turn), as `seekstack chat` ends one, unless ignore_eos (`ending_at_special_tokens`);
        `sampling_params`, `use_tqdm` and `lora_request` as generate's, in vLLM's order (the options after them are
        keywords). `tools`
        (OpenAI's function definitions, read and refused as the server reads a request's) are listed in each prompt, as
        vLLM's chat template lists them, and each reply's calls are parsed out as the server parses them: its
        `tool_calls` (`completion_with_calls`). vLLM's `chat_template_kwargs` are read as the server reads a request's:
        keys the template does not read dropped, as vLLM drops them, one it reads refused (ValueError), as is a
        `chat_template` of the caller's: the tokenizer's own is rendered as it is. vLLM's
        `chat_template_content_format` is taken as its default, "auto", alone (content given as a string or as OpenAI's
        text parts is rendered in the form the template reads), and its `mm_processor_kwargs` as None alone."""
        from seekstack.infer.chat import ending_at_special_tokens
        from seekstack.posttrain.conversations import offered
        from seekstack.serve.protocol import template_kwarg_read
        from seekstack.serve.tool_calls import completion_with_calls

        if chat_template is not None:
            raise ValueError(
                "chat_template= (vLLM's) is not taken: chat renders the tokenizer's own chat template as it is; "
                "render a conversation another way yourself and give its text or token ids to generate"
            )
        if chat_template_content_format != "auto":
            raise ValueError(
                f"chat_template_content_format={chat_template_content_format!r} (vLLM's) is taken as 'auto', its "
                "default, alone: content given as a string or as OpenAI's text parts ([{'type': 'text', 'text': "
                "...}]) is rendered in the form the chat template reads; leave it out"
            )
        if mm_processor_kwargs is not None:
            raise ValueError(
                "mm_processor_kwargs= (vLLM's) is not taken: they set a multimodal model's image or audio processing, "
                "and this engine serves text models; leave it out"
            )
        key = template_kwarg_read(chat_template_kwargs, self.tokenizer)
        if key is not None:
            raise ValueError(
                f"chat_template_kwargs {key!r}: a name the chat template reads, which chat sets from its own "
                "keywords (add_generation_prompt, continue_final_message, tools) or leaves unset: leave it out "
                "(keys the template does not read are dropped, as vLLM drops them)"
            )

        if isinstance(messages, str):  # its characters would read as messages: "chat message 0 ... got 'h'"
            raise TypeError(
                f"messages is a str; give a conversation, [{{'role': 'user', 'content': {messages[:20]!r}}}], or a "
                "list of them (generate continues a text as it is)"
            )
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence):  # one message (KeyError 0), None
            asked = f"one message, {shown_value(messages)}" if isinstance(messages, Mapping) else shown_value(messages)
            written = shown_value([messages]) if isinstance(messages, Mapping) else "[{'role': 'user', 'content': ...}]"
            raise TypeError(f"messages is {asked}; give a conversation, {written}, or a list of them")
        offered_tools = offered(tools, self.tokenizer)
        one = len(messages) > 0 and isinstance(messages[0], Mapping)
        conversations = [messages] if one else list(messages)
        for index, conversation in enumerate(conversations):
            if isinstance(conversation, str):  # as messages itself: "chat message 0 ... got 'h'"
                raise TypeError(
                    f"messages[{index}] is a str; give each conversation as a list of messages, [{{'role': 'user', "
                    f"'content': {conversation[:20]!r}}}] (generate continues a text as it is)"
                )
        prompts = [
            self.tokenizer.encode_chat(list(conversation), add_generation_prompt, continue_final_message, offered_tools)
            for conversation in conversations
        ]
        rendered = [{"prompt_token_ids": ids, "prompt": self.tokenizer.decode(ids)} for ids in prompts]  # vLLM's
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ending = [
            ending_at_special_tokens(p, self.tokenizer, calls=bool(offered_tools)) if isinstance(p, SamplingParams)
            else p
            for p in params_list
        ]  # fmt: skip
        completions = self.generate(rendered, ending, use_tqdm=use_tqdm, lora_request=lora_request)
        if not offered_tools:
            return completions
        return [
            completion_with_calls(completion, self.tokenizer, p.skip_special_tokens)
            for completion, p in zip(completions, params_list, strict=True)
        ]


def decode_step(
    model: Transformer, input_ids: torch.Tensor, cache: PagedLatentCache, positions: torch.Tensor
) -> tuple[ModelOutput, torch.Tensor, torch.Tensor]:
    """A decode step's forward on the planned cache, each row's argmax at its last column (B,), and whether every row
    has a distribution there (`has_distribution`, 0-d): the greedy pick `greedy_tokens` makes, inside the compiled
    graph rather than as separate host ops after it."""
    out = model(input_ids, cache=cache, positions=positions, output_expert_load=False)
    largest, best = out.logits[:, -1].max(dim=-1)
    return out, best, has_distribution(largest).all()


# Inductor's options for the compiled decode steps (`_compiled` says why each); bench/decode_options.py times others.
DECODE_COMPILE_OPTIONS: dict[str, Any] = {
    "cpp_wrapper": True,
    "post_grad_fusion_options": {"decompose_mm_pass": {}},
    "size_asserts": False,
}


# Held around each compiled call of the engines in this process and around a decode step that skips dynamo's guard
# check (`_unguarded`): torch's stance is process-wide, so another thread's compiled call during the skip would skip
# its guards too (a graph whose guards no longer hold, or a raise where it needs a compile), and two threads' skips
# ending out of order would leave the stance skipping for the whole process; `_compiled`'s settings are process-wide
# too.
_COMPILED_CALLS = threading.RLock()


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process: a step that raised it compiled one."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` through torch.compile with dynamic shapes, one graph for every batch of 2 or more rows (a GRPO
    rollout's 16 rows finishing one by one, a server's batch): sizes that happen to be equal at the first trace (16
    rows, 16 key slots) are not assumed equal after (no duck sizing). A batch of 1 keeps a graph of its own
    (dynamo's 0/1 specialisation): a 1-row step (generate, chat) at its fastest. Marking the batch unbacked gives one
    graph for all, but its 16-row steps measured 8-30% slower on a 2-core Zen 3; running 1 row as 2 copies, ~35%
    slower 1-row steps. The model's float settings (norm epsilons, softmax scales) are constants of the graph: as
    symbols, inductor could not keep them and compiled the whole step a second time (19 s against 8 s for the demo
    model's decode step, inductor's caches warm). Where seekstack.model.cpu_kernels are not built (they take a step's
    float32 products where they are), inductor's `decompose_mm_pass` turns a 1-row graph's
    matrix-vector products with both weight sides <= 2048 into its own loops: they stream the weights faster than
    the BLAS call (`small`, batch 1, one thread: +12-30% decode tokens/s in four alternating runs; the output head,
    wider, stays the BLAS call of infer/packed.py, which measured 1.8x faster than inductor's loop there).
    Inductor's size asserts are off (`size_asserts`: each input's and each fallback op's output's sizes and strides
    checked at every call, 277 checks in `small`'s 1-row step, each reading a tensor the step's weights have pushed
    out of the CPU caches): dynamo's guards check the inputs' shapes before a graph runs, skipped or not
    (`Engine._unguarded`), and tests/model/test_cpu_kernels.py the kernels' registered output shapes. Compiled engines
    without and with them alternating in one process, batch 1, one thread, CPU clock, load 9-11: `tiny` 1.135x and
    1.169x (8 of 10 rounds each); `small` 1.034x (8 of 10), then 1.012x (5 of 10): within its rounds' spread.
    Not adopted: `memory_planning` (one pooled allocation for a step's buffers): `bench/decode_options.py`, `small`,
    one thread, five A/B runs at batch 1 and 8 moved decode tokens/s by -5% to +7%, the sign changing between runs;
    `aggressive_fusion`: -3% at batch 1."""
    compiled = torch.compile(function, dynamic=True, options=copy.deepcopy(DECODE_COMPILE_OPTIONS))
    settings = (
        (torch.fx.experimental._config, "use_duck_shape", False),
        (torch._dynamo.config, "specialize_float", True),
    )

    def run(*args: Any, **kwargs: Any) -> Any:
        # set and restored by hand at each call: the configs' patch() context costs ~0.1-0.3 ms a call, a decode step;
        # not in this thread's step that skips the guard check (`_unguarded`): a call that needs a trace raises there
        with _COMPILED_CALLS:
            if torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe:
                return compiled(*args, **kwargs)
            saved = [getattr(config, name) for config, name, _ in settings]
            for config, name, value in settings:
                setattr(config, name, value)
            try:
                return compiled(*args, **kwargs)
            finally:
                for (config, name, _), value in zip(settings, saved, strict=True):
                    setattr(config, name, value)

    return run


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode inside, each of its modules in the mode it had after: an engine on a model that is being
    trained (RL rollouts, samples in a training loop of one's own) leaves it training, balance loss and all. A model
    in eval mode (its root's flag; `from_pretrained`'s own) is left as it is: setting every module's mode twice a step
    costs a decode step at `tiny` a quarter of its time."""
    if not model.training:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _finished_counter(total: int, shown: bool | Callable[..., Any]) -> Iterator[Callable[[], None]]:
    """A callable that counts one of `total` requests finished, on a rich progress bar on stderr where `shown` (vLLM's
    use_tqdm), or on the bar a callable `shown` makes, as vLLM calls one (tqdm's keywords total and desc; its update
    and close); nothing is made otherwise."""
    if not shown:
        yield lambda: None
        return
    if callable(shown):
        made = shown(total=total, desc="Processed prompts")
        try:
            yield lambda: made.update(1)
        finally:
            made.close()
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("Processed prompts", total=total)
        yield lambda: bar.advance(task)


def _no_text(token: int) -> str:
    """A token's text where the request asked for none (detokenize=False): "", as vLLM leaves it undecoded."""
    return ""


def holds_token_ids(prompt: Any) -> bool:
    """Whether `prompt` reads as token ids: an iterable, but no text or bytes, whose characters or bytes would read as
    ids ("123" as [1, 2, 3], b"hi" as [104, 105]); None or an int holds none."""
    return isinstance(prompt, Iterable) and not isinstance(prompt, (str, bytes, bytearray))


def token_id(token: Any) -> int:
    """`token` as a token id: an integer (an int, numpy's, a 0-d integer tensor); TypeError naming it otherwise
    (int() read a prompt's 5.7 as token 5, and True is no id, as vLLM refuses a bool for an int)."""
    if not isinstance(token, bool):
        with contextlib.suppress(TypeError):
            return operator.index(token)
    raise TypeError(f"prompt holds {token!r}, which is no token id: give integers")


def refuse_adapters_not_served(
    adapters: Mapping[str, str | Path | AdapterWeights] | None, max_loras: int | None, max_lora_rank: int | None
) -> None:
    """Before any weights are read: TypeError for `adapters` that are no mapping of names to folders or to adapters read
    from them (a list, a folder alone), ValueError for a max_loras or max_lora_rank that is no count
    (`refuse_a_non_count`), and ConfigError naming max_loras where it is fewer than the adapters given, each loaded
    from the start."""
    from seekstack.adapters.registry import AdapterWeights

    if adapters is not None and not (
        isinstance(adapters, Mapping)
        and all(
            isinstance(name, str) and isinstance(folder, (str, os.PathLike, AdapterWeights))
            for name, folder in adapters.items()
        )
    ):
        raise TypeError(
            f"adapters={shown_value(adapters)} must map names to adapter folders, as vLLM's --lora-modules name=path: "
            "adapters={'legal': '/path/to/adapter'} (or adapter='/path/to/adapter', merged into the weights)"
        )
    for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
        if value is not None:  # the default: what `adapters` need
            refuse_a_non_count(name, value)
    if max_loras is not None and adapters and len(adapters) > max_loras:
        raise ConfigError(
            f"has value {max_loras}: must be at least the {len(adapters)} adapters given "
            f"({shown_value(', '.join(adapters), str)}), "
            f"each loaded from the start: give max_loras={len(adapters)} or more, or fewer adapters",
            field="max_loras",
        )


def _fail_rows_without_distribution(batch: list[_Request], distributed: list[list[bool]], kept: list[int]) -> None:
    """Set the error of each request of a greedy speculative step whose `kept` new tokens, the argmaxes of its first
    columns, include one of a column without a distribution (`distributed`: `has_distribution` of each column's
    largest logit, (B, K+1)): it ends as `SamplingBatch.sample` ends a plain step's."""
    for request, columns, count in zip(batch, distributed, kept, strict=True):
        if not all(columns[:count]):
            request.error = ValueError(NO_DISTRIBUTION)


def _shifted_rows(batch: list[_Request], starts: list[int], counts: list[int]) -> list[list[int]]:
    """The tokens one position after each row's new tokens: what MTP depth 1 embeds (token i+1 at position i)."""
    return [r.ids[start + 1 : start + count + 1] for r, start, count in zip(batch, starts, counts, strict=True)]


def _note_on_stderr(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)
