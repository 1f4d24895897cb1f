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

import dataclasses
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seekstack.checkpoint import load_pretrained, read_config
from seekstack.infer.cache import PagedLatentCache
from seekstack.infer.detokenize import TextStream
from seekstack.infer.outputs import Completion, EngineStats, RequestOutput, TokenLogprob, joined_completion
from seekstack.infer.params import EngineOptions, SamplingParams
from seekstack.infer.sampling import PenaltyState, SamplingBatch, token_logprobs
from seekstack.infer.speculative import accept_drafts, greedy_speculation, mtp_drafts
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import TOKENIZER_FILE, Tokenizer


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stream: TextStream
    stop_ids: frozenset[int]
    penalties: PenaltyState | None
    ids: list[int]  # prompt + sampled tokens
    num_cached: int = 0  # tokens in the cache (main layers; the MTP layer keeps pace)
    drafts: list[int] = field(default_factory=list)  # the MTP module's guesses for the K tokens after the pending one
    scheduled_at: float | None = None  # time.perf_counter() when admitted out of `waiting`
    output_ids: list[int] = field(default_factory=list)  # tokens handed out
    adapter_slot: int = 0  # the LoRA adapter its rows use (seekstack.adapters.multi); 0 = the base model


class Engine:
    """Serves many concurrent requests on one `Transformer`; `add_request`, `abort`, `step`, `stats` are thread-safe."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = EngineOptions.max_batch_size,
        max_model_len: int | None = EngineOptions.max_model_len,
        block_size: int = 16,
        num_blocks: int | None = None,
        speculative: bool = EngineOptions.speculative,
        draft_tokens: int = EngineOptions.draft_tokens,
        prefill_chunk: int = 256,
        device: torch.device | str | None = None,
        compile: bool = EngineOptions.compile,
        adapters: Mapping[str, str | Path] | None = None,
    ):
        """`adapters` name LoRA adapter folders (peft format) that requests may pick by name (`add_request`); rows
        of different adapters share every step, each with its own adapter (seekstack.adapters.multi)."""
        self.device = torch.device(device) if device is not None else model.embed_tokens.weight.device
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.model_name = "seekstack"
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
        if adapters and compile:
            raise ValueError("compile=True does not support LoRA adapters yet: serve adapters without --compile")
        if speculative and len(model.mtp) == 0:
            raise ValueError("speculative decoding needs an MTP module; this model has num_nextn_predict_layers=0")
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("prefill_chunk", prefill_chunk),
            ("draft_tokens", draft_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.speculative = speculative
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.draft_tokens = draft_tokens if speculative else 0
        # Verification writes K slots past the pending token; the MTP module's drafts after k accepted reach K - 1
        # further (`mtp_drafts`). Those are the cache plan's lookahead and, with the K, the slots a request
        # holds beyond its last token.
        self.lookahead = max(self.draft_tokens - 1, 0)
        self.draft_slots = self.draft_tokens + self.lookahead
        if num_blocks is None:
            num_blocks = max_batch_size * math.ceil((self.max_model_len + self.draft_slots) / block_size) + 1
        from seekstack.adapters.multi import attach_adapters

        self.lora = attach_adapters(self.model, adapters or {})
        self.cache = PagedLatentCache(self.config, num_blocks, block_size, model.embed_tokens.weight.dtype, self.device)
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []
        self.running: list[_Request] = []
        self.aborted: list[RequestOutput] = []
        self.prefill_tokens = self.spec_drafted = self.spec_accepted = 0
        self.lock = threading.RLock()
        self._ids = itertools.count()
        # Decode steps (and their MTP drafts) run compiled when asked: one graph each, no device sync inside, the
        # MoE on its gathered path. Prefill stays eager: long chunks of varied widths, bound by the matmuls.
        self._decode_model, self._decode_drafts, self._greedy_speculation = model, mtp_drafts, greedy_speculation
        if compile:
            # A compiled function gets a graph per batch shape class and draft count, and engines in one process
            # share those graphs' cache: several engines (a benchmark comparing draft counts) pass dynamo's
            # default of 8, after which it would run the function eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            options = {"guard_filter_fn": _skip_model_guards, "cpp_wrapper": True}
            self._decode_model = torch.compile(model, dynamic=True, options=options)
            self._decode_drafts = torch.compile(mtp_drafts, dynamic=True, options=options)
            self._greedy_speculation = torch.compile(greedy_speculation, dynamic=True, options=options)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        adapter: str | Path | None = None,
        **kwargs,
    ) -> Engine:
        """An engine on the checkpoint in `model_dir`, with its tokenizer.json (or the one at `tokenizer`).

        `adapter`, a LoRA adapter folder, is merged into the weights for every request (generate, chat); `adapters`
        (see `Engine`) are kept apart and picked per request (serve). A missing folder, config or tokenizer is
        reported before any weights load."""
        model_dir = Path(model_dir)
        read_config(model_dir)  # CheckpointError naming the folder when it does not exist or has no config.json
        if tokenizer is None and not (model_dir / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(
                f"{model_dir} has no {TOKENIZER_FILE}: pass tokenizer= the path of a tokenizer.json or its folder"
            )
        loaded_tokenizer = Tokenizer.from_file(tokenizer or model_dir)
        device = kwargs.get("device") or "cpu"
        model = load_pretrained(model_dir, dtype=dtype, device=device)
        if adapter is not None:
            from seekstack.adapters.files import merged_model

            model = merged_model(model, adapter)
        engine = cls(model, loaded_tokenizer, **kwargs)
        engine.model_name = model_dir.resolve().name
        return engine

    def fit_max_new_tokens(self, prompt_len: int, params: SamplingParams) -> tuple[SamplingParams, str | None]:
        """`params` with max_new_tokens capped so that the prompt and the completion fit max_model_len, and a
        notice saying so when it had to be capped; ValueError when the prompt alone leaves no room."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(
                f"prompt is {prompt_len} tokens; the context of {self.max_model_len} leaves no room for a new "
                "token: shorten the prompt"
            )
        if params.max_new_tokens <= room:
            return params, None
        notice = (
            f"prompt is {prompt_len} tokens; max_new_tokens capped from {params.max_new_tokens} to {room} "
            f"to fit the context of {self.max_model_len}"
        )
        return dataclasses.replace(params, max_new_tokens=room), notice

    # ------------------------------------------------------------------ requests
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, adapter: str | None = None
    ) -> str:
        """Queue a request, on the base model or on the loaded LoRA adapter named `adapter`; raises ValueError for an
        empty prompt, unknown token ids, one that cannot fit, or an adapter not loaded."""
        params = params.validate()
        try:
            adapter_slot = self.lora.slot(adapter)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.config.vocab_size
        for name, ids in (("prompt", prompt_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [token for token in ids if not 0 <= token < vocab]
            if bad:
                raise ValueError(f"{name} holds token id {bad[0]}, outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_new_tokens
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, more than max_model_len={self.max_model_len}")
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"exceeds max_model_len={self.max_model_len}; shorten the prompt or lower max_new_tokens"
            )
        if self.cache.blocks_for(total + self.draft_slots) > self.cache.num_blocks - 1:
            raise ValueError(
                f"{total} tokens need {self.cache.blocks_for(total + self.draft_slots)} cache blocks; "
                f"the cache has {self.cache.num_blocks - 1}: raise num_blocks"
            )
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else {self.tokenizer.eos_id})
        penalties = PenaltyState.from_prompt(prompt_ids, vocab, self.device) if params.penalized else None
        with self.lock:
            request_id = request_id or f"req-{next(self._ids)}"
            if any(r.request_id == request_id for r in self._unfinished()):
                raise ValueError(f"request id {request_id!r} is already in use")
            stream = TextStream(self.tokenizer, params.stop, params.skip_special_tokens)
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
            )
            self.waiting.append(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request and free its cache blocks at once; its last output says finish_reason "abort"."""
        with self.lock:
            for queue in (self.waiting, self.prefilling, self.running):
                for request in queue:
                    if request.request_id == request_id:
                        queue.remove(request)
                        self.cache.free(request_id)
                        self.aborted.append(self._output(request, [], "", None, "abort"))
                        return

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running, or has an abort not yet reported by `step`."""
        with self.lock:
            return bool(self.aborted) or any(True for _ in self._unfinished())

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
            )

    def _unfinished(self):
        return itertools.chain(self.waiting, self.prefilling, self.running)

    # ------------------------------------------------------------------ scheduling
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One step: admit waiting requests, decode all running ones together, prefill one chunk of prompts."""
        with self.lock:
            outputs, self.aborted = self.aborted, []
            self._admit()
            if self.running:
                outputs += self._decode()
            if self.prefilling:
                outputs += self._prefill()
            return outputs

    def _admit(self) -> None:
        """Move waiting requests to prefilling, first come first served, while the batch and the cache have room."""
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            tokens = len(request.prompt_ids) + request.params.max_new_tokens + self.draft_slots
            if not self.cache.can_allocate(tokens):
                return
            self.cache.allocate(request.request_id, tokens)
            request.scheduled_at = time.perf_counter()
            self.prefilling.append(self.waiting.popleft())

    def _prefill(self) -> list[RequestOutput]:
        """Feed up to `prefill_chunk` prompt tokens, over as many prefilling requests as they reach."""
        batch, counts, budget = [], [], self.prefill_chunk
        for request in self.prefilling:
            if budget == 0:
                break
            counts.append(min(len(request.prompt_ids) - request.num_cached, budget))
            batch.append(request)
            budget -= counts[-1]
        starts = [request.num_cached for request in batch]
        rows = [r.ids[start : start + count] for r, start, count in zip(batch, starts, counts, strict=True)]
        self.prefill_tokens += sum(counts)
        logits, hidden = self._forward(batch, rows, starts, counts, prefill=True)
        done, finished, tokens, logprobs = [], [], [], []
        for row, (request, count) in enumerate(zip(batch, counts, strict=True)):
            request.num_cached += count
            if request.num_cached == len(request.prompt_ids):
                done.append(row)
        if done:
            finished = [batch[row] for row in done]
            tokens, logprobs = self._sample(finished, logits[torch.tensor(done, device=self.device), 0])
            for request, token in zip(finished, tokens, strict=True):
                request.ids.append(token)
        if self.speculative:  # every chunk enters the MTP layer's cache too; finished prompts get their first drafts
            drafts = self._draft(hidden, _shifted_rows(batch, starts, counts), counts, prefill=True)
            for row in done:
                batch[row].drafts = drafts[row]
        for request in finished:
            self.prefilling.remove(request)
            self.running.append(request)
        return self._emit_each(finished, tokens, logprobs)

    def _decode(self) -> list[RequestOutput]:
        """One token per running request, or with speculative decoding the verified draft plus one."""
        batch = list(self.running)
        starts = [len(r.ids) - 1 for r in batch]
        if not self.speculative:
            logits, _ = self._forward(batch, [[r.ids[-1]] for r in batch], starts, [1] * len(batch))
            tokens, logprobs = self._sample(batch, logits[:, 0])
            for request, token in zip(batch, tokens, strict=True):
                request.ids.append(token)
            return self._emit_each(batch, tokens, logprobs)
        return self._decode_speculative(batch, starts)

    def _decode_speculative(self, batch: list[_Request], starts: list[int]) -> list[RequestOutput]:
        """Verify each request's K drafts with one forward over [pending, drafts]; keep the accepted ones plus one."""
        width = self.draft_tokens + 1
        rows = [[r.ids[-1], *r.drafts] for r in batch]
        input_ids, positions = self._inputs(batch, rows, starts, [width] * len(batch))
        sampling = self._sampling_batch(batch)
        next_drafts = None
        if sampling.all_greedy and not sampling.penalized:  # p is one-hot too: accept exactly when the argmax agrees
            logits, chosen, accepted, next_drafts = self._greedy_speculation(
                self.model, input_ids, positions, self.cache, self.draft_tokens
            )
        else:
            out = self._decode_model(input_ids, cache=self.cache, positions=positions)
            logits, hidden = out.logits, out.hidden_states
            accepted, chosen = accept_drafts(sampling, logits, input_ids[:, 1:])
        chosen_list, accepted_list = chosen.tolist(), accepted.tolist()
        self.spec_drafted += self.draft_tokens * len(batch)
        self.spec_accepted += sum(accepted_list)
        new_tokens = [chosen_list[b][: count + 1] for b, count in enumerate(accepted_list)]
        logprobs: list[list] = [[] for _ in batch]
        if any(r.params.logprobs for r in batch):
            columns = [self._logprobs(batch, logits[:, t], chosen[:, t]) for t in range(width)]
            logprobs = [[column[b] for column in columns][: len(tokens)] for b, tokens in enumerate(new_tokens)]
        for request, tokens in zip(batch, new_tokens, strict=True):
            request.ids.extend(tokens)
        if next_drafts is None:
            counts = [len(tokens) for tokens in new_tokens]
            next_list = self._draft(hidden, _shifted_rows(batch, starts, counts), counts)
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model over each row's new tokens at their positions: logits (B, T, V) or, for `prefill`, (B, 1, V)
        at each row's last real token; hidden states (B, T, D)."""
        input_ids, positions = self._inputs(batch, rows, starts, counts)
        if prefill:
            logits_at = torch.tensor(counts, device=self.device) - 1
            out = self.model(input_ids, cache=self.cache, positions=positions, logits_at=logits_at)
        else:
            out = self._decode_model(input_ids, cache=self.cache, positions=positions)
        return out.logits, out.hidden_states

    def _inputs(
        self, batch: list[_Request], rows: list[list[int]], starts: list[int], counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plan the cache for the next forward; the rows' token ids padded to one width and their positions (B, T)."""
        width = max(counts)
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self.device)
        self.lora.select([r.adapter_slot for r in batch], self.device)
        return input_ids, self.cache.plan([r.request_id for r in batch], starts, counts, width, self.lookahead)

    def _draft(
        self, hidden: torch.Tensor, next_rows: list[list[int]], counts: list[int], prefill: bool = False
    ) -> list[list[int]]:
        """The MTP module's K drafts after each row's last real position, counts[b] - 1, of the main forward just
        run (`mtp_drafts`). It reuses that forward's cache plan; a row with fewer real tokens feeds padding, which
        lands in an MTP cache slot that the next step overwrites before anything reads it."""
        width = hidden.shape[1]
        next_ids = torch.tensor([row + [0] * (width - len(row)) for row in next_rows], device=self.device)
        last = torch.tensor(counts, device=self.device) - 1
        draft = mtp_drafts if prefill else self._decode_drafts
        return draft(self.model, hidden, next_ids, self.cache.positions(), last, self.cache, self.draft_tokens).tolist()

    # ------------------------------------------------------------------ sampling and output
    def _sampling_batch(self, batch: list[_Request]) -> SamplingBatch:
        return SamplingBatch(
            [r.params for r in batch], [r.generator for r in batch], [r.penalties for r in batch], self.device
        )

    def _sample(self, batch: list[_Request], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per request from logits (B, V), with log-probabilities for the requests that ask for them."""
        tokens = self._sampling_batch(batch).sample(logits)
        logprobs = (
            self._logprobs(batch, logits, tokens) if any(r.params.logprobs for r in batch) else [None] * len(batch)
        )
        return tokens.tolist(), logprobs

    def _logprobs(self, batch: list[_Request], logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob | None]:
        top_n = max(r.params.top_logprobs for r in batch)
        chosen, top_values, top_ids = token_logprobs(logits, tokens, top_n)
        chosen, top_values, top_ids, tokens = chosen.tolist(), top_values.tolist(), top_ids.tolist(), tokens.tolist()
        entries: list[TokenLogprob | None] = []
        for b, request in enumerate(batch):
            if not request.params.logprobs:
                entries.append(None)
                continue
            n = request.params.top_logprobs
            top = [(i, self.tokenizer.decode([i]), v) for i, v in zip(top_ids[b][:n], top_values[b][:n], strict=True)]
            entries.append(TokenLogprob(tokens[b], self.tokenizer.decode([tokens[b]]), chosen[b], top))
        return entries

    def _emit(self, request: _Request, tokens: list[int], logprobs: list) -> RequestOutput:
        """Hand out `tokens` until one of them finishes the request: stop token, stop string or length."""
        text, emitted, reason = "", [], None
        for token in tokens:
            emitted.append(token)
            request.output_ids.append(token)
            if request.penalties is not None:
                request.penalties.add(token)
            if token in request.stop_ids:
                reason = "stop"
                text += request.stream.flush()
                break
            piece, stopped = request.stream.push(token)
            text += piece
            if stopped:
                reason = "stop"
                break
            if len(request.output_ids) >= request.params.max_new_tokens:
                reason = "length"
                text += request.stream.flush()
                break
        if reason is not None:
            self.running.remove(request)
            self.cache.free(request.request_id)
        chosen = logprobs[: len(emitted)] if request.params.logprobs else None
        return self._output(request, emitted, text, chosen, reason)

    def _emit_each(
        self, batch: list[_Request], tokens: list[int], logprobs: list[TokenLogprob | None]
    ) -> list[RequestOutput]:
        """`_emit` one new token per request."""
        return [
            self._emit(r, [token], logprobs[b : b + 1]) for b, (r, token) in enumerate(zip(batch, tokens, strict=True))
        ]

    def _output(
        self, request: _Request, tokens: list[int], text: str, logprobs: list | None, reason: str | None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            token_ids=tokens,
            text=text,
            logprobs=logprobs,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.output_ids),
            scheduled_at=request.scheduled_at,
        )

    # ------------------------------------------------------------------ convenience
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Add one request and step until it finishes, yielding its outputs as they come (other requests run too)."""
        request_id = self.add_request(prompt_ids, params)
        try:
            finished = False
            while not finished:
                for output in self.step():
                    if output.request_id == request_id:
                        finished = output.finished
                        yield output
        finally:
            self.abort(request_id)  # a consumer that stops early frees the request's blocks

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> list[Completion]:
        """Add all prompts (text is encoded without BOS, as training shards are), each on the base or on the loaded
        adapter `adapters` names for it, and step until all finish."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapter_list = adapters if adapters is not None else [None] * len(prompts)
        if not len(params_list) == len(adapter_list) == len(prompts):
            counts = f"{len(params_list)} sampling parameter sets and {len(adapter_list)} adapters"
            raise ValueError(f"{len(prompts)} prompts but {counts}")
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        started = time.perf_counter()
        request_ids = [
            self.add_request(ids, p, adapter=a) for ids, p, a in zip(prompt_ids, params_list, adapter_list, strict=True)
        ]
        parts: dict[str, list[RequestOutput]] = {request_id: [] for request_id in request_ids}
        first_token: dict[str, float] = {}
        finished_at: dict[str, float] = {}
        try:
            while any(request_id not in finished_at for request_id in request_ids):
                for output in self.step():
                    if output.request_id in parts:
                        parts[output.request_id].append(output)
                        first_token.setdefault(output.request_id, time.perf_counter())
                        if output.finished:
                            finished_at[output.request_id] = time.perf_counter()
        finally:  # a failing step or an interrupt leaves no request behind holding cache blocks
            for request_id in request_ids:
                if request_id not in finished_at:
                    self.abort(request_id)
        return [
            joined_completion(
                request_id, ids, parts[request_id], started, first_token[request_id], finished_at[request_id]
            )
            for request_id, ids in zip(request_ids, prompt_ids, strict=True)
        ]


def _skip_model_guards(entries: list) -> list[bool]:
    """Drop torch.compile's checks on the model (its weights do not change shape under an engine): ~100 tensor
    checks per call. Those on the batch, its cache plan and the cache pools stay, so a new shape recompiles.
    The model is `self` in the compiled `Transformer.forward` and `model` in the compiled functions."""
    return [not entry.name.startswith(("L['self']", "L['model']")) for entry in entries]


def _shifted_rows(batch: list[_Request], starts: list[int], counts: list[int]) -> list[list[int]]:
    """The tokens one position after each row's new tokens: what MTP depth 1 embeds (token i+1 at position i)."""
    return [r.ids[start + 1 : start + count + 1] for r, start, count in zip(batch, starts, counts, strict=True)]
