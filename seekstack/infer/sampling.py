"""The per-row, batched sampler of the engine (the parameters are `params.SamplingParams`).

Shapes: B rows (one per sequence being sampled), V vocabulary.
Order of operations, as vLLM: constraints (JSON mode), logit bias and penalties on the raw logits -> temperature ->
top-k / top-p / min-p -> draw.
Greedy rows (temperature 0) become one-hot distributions, so speculative verification treats them like any other.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from seekstack.infer.params import SamplingParams
from seekstack.schema import ConfigError, shown_value


@dataclass
class PenaltyState:
    """What the penalties of one sequence look at: tokens seen in prompt or output, and output token counts."""

    seen: torch.Tensor  # (V,) bool, prompt and output: repetition penalty
    output_counts: torch.Tensor  # (V,) float, output only: presence and frequency penalties

    @classmethod
    def from_prompt(cls, prompt_ids: list[int], vocab_size: int, device: torch.device) -> PenaltyState:
        """The state before any output: the prompt's tokens seen, no output counts."""
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt_ids, device=device)] = True
        return cls(seen, torch.zeros(vocab_size, device=device))

    def add(self, token_id: int) -> None:
        """Count one generated token."""
        self.seen[token_id] = True
        self.output_counts[token_id] += 1


MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / the golden ratio, odd


def splitmix64(state: int) -> int:
    """SplitMix64's output function (Steele, Lea and Flood 2014; Vigna's constants): a 64-bit avalanche mix."""
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class SeededUniforms:
    """One request's U(0, 1) numbers: draw n is SplitMix64's n-th output for the request's seed, a function of
    (seed, n) alone, so a request samples the same tokens whatever the batch around it. Its state is the count of
    draws (`get_state`/`set_state`, as a torch.Generator's). A batch's draws cost a few integer operations per row
    in Python and one tensor, not a torch.rand call and an indexed write per row. Without a seed, the seed is drawn
    from torch's default generator: after torch.manual_seed(s), the same requests sample the same tokens, as vLLM's
    global seed makes its unseeded requests reproducible."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int(torch.randint(-(2**63), 2**63 - 1, ()))
        self.seed = seed & MASK64  # negative seeds: two's complement
        self.draws = 0

    def next(self) -> float:
        """The next number in [0, 1): the top 24 bits of the next output, as torch.rand's float32 has."""
        self.draws += 1
        return (splitmix64((self.seed + self.draws * GOLDEN_GAMMA) & MASK64) >> 40) * 2.0**-24

    def get_state(self) -> int:
        return self.draws

    def set_state(self, draws: int) -> None:
        self.draws = draws


class TokenConstraint(Protocol):
    """A rule on which tokens one request may sample next (JSON mode: `seekstack.infer.json_mode`)."""

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(V,) bool: the tokens that may come next; ValueError when the rule's state is broken."""
        ...

    def allowed_after(self, drafts: list[int], vocab_size: int) -> torch.Tensor:
        """(K+1, V) bool: `allowed` at [pending, K drafts], each column after the drafts before it (speculative
        decoding); the state as it was."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token."""
        ...

    @property
    def complete(self) -> bool:
        """Whether the output is whole: the request stops."""
        ...


class BadWords:
    """vLLM's bad_words as a `TokenConstraint`: a word's last token is never sampled after the tokens before it in the
    output (a one-token word never), each word taken as encoded at the text's start and, where that gives other
    tokens of the same count, after a space (vLLM's SamplingParams.update_from_tokenizer)."""

    def __init__(self, words: list[list[int]]):
        self.words = words  # each word's token ids
        # the last tokens accepted, as many as the longest word has before its last: all a word's ban is read from
        self.recent: deque[int] = deque(maxlen=max((len(word) - 1 for word in words), default=0))

    @classmethod
    def encoded(cls, words: Iterable[str], encode: Callable[[str], list[int]]) -> BadWords:
        """The words' token ids by `encode` (a tokenizer's, no special tokens added), as vLLM encodes them."""
        encodings = []
        for word in words:
            alone, spaced = encode(word.lstrip()), encode(" " + word.lstrip())
            encodings.append(alone)
            if spaced[0] != alone[0] and len(spaced) == len(alone):  # a new word token with its space
                encodings.append(spaced)
        return cls(encodings)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: every token but the last of each word whose other tokens end the output."""
        return self._allowed_after(list(self.recent), vocab_size)

    def _allowed_after(self, tail: list[int], vocab_size: int) -> torch.Tensor:
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        for *prefix, last in self.words:
            if len(prefix) <= len(tail) and tail[len(tail) - len(prefix) :] == prefix:
                allowed[last] = False
        return allowed

    def allowed_after(self, drafts: list[int], vocab_size: int) -> torch.Tensor:
        """(K+1, vocab_size) bool: `allowed` at [pending, K drafts], column t after the drafts before it."""
        recent = list(self.recent)
        return torch.stack([self._allowed_after(recent + drafts[:t], vocab_size) for t in range(len(drafts) + 1)])

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token."""
        self.recent.append(token_id)

    @property
    def complete(self) -> bool:
        """Never: banning words ends no output."""
        return False


NO_DISTRIBUTION = (
    "the logits hold an infinity or NaN, which leaves no distribution to sample from: a float16 model's overflow "
    "(run it in bfloat16 or float32), or the request's LoRA adapter's (its lora_alpha or factors far too large; "
    "other requests go on), or a repetition_penalty so far from 1 (such as 1e-40) that the penalized logits "
    "overflow float32; or every one of allowed_token_ids forbidden here by the constraint (JSON mode: "
    "response_format's grammar, forced tool calls); or every one of allowed_token_ids banned here, after the tokens "
    "so far, by bad_words"
)


class SamplingBatch:
    """The sampling settings of B rows with each row's random numbers, penalty state and token constraint; (B,) tensors
    of the settings are made only when a step needs them (an all-greedy batch needs none)."""

    def __init__(
        self,
        params: list[SamplingParams],
        uniforms: list[SeededUniforms],
        penalties: list[PenaltyState | None],
        device: torch.device,
        constraints: list[TokenConstraint | None] | None = None,
        token_count: int | None = None,
        banned: list[frozenset[int]] | None = None,
        banned_for: list[int] | None = None,
    ):
        """`token_count`: the tokenizer's ids, where the model's vocabulary is padded past them (as released
        checkpoints round it up): the ids from it on decode to no token and are never sampled. None: all are ids.
        `banned`: each row's ids never sampled (a request short of its min_tokens: its EOS and stop ids), for its
        `banned_for` next tokens (given with `banned`: the min_tokens it lacks, as a speculative step's later columns
        may come after them)."""
        self.params, self.uniforms, self.penalties = params, uniforms, penalties
        self.token_count = token_count
        self.constraints = constraints or [None] * len(params)
        self.constrained = [row for row, constraint in enumerate(self.constraints) if constraint is not None]
        # per row, the first later column of a speculative step (`constrain` with drafts) that its constraint leaves
        # none of its allowed_token_ids: no accepted draft reaches it (`before_dead_columns`)
        self.dead_columns: dict[int, int] = {}
        self.device = device
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.filtered = any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params if not p.greedy)
        self.penalized = any(p.penalized for p in params)
        self.biased = any(p.logit_bias for p in params)
        self.restricted = [row for row, p in enumerate(params) if p.allowed_token_ids is not None]
        self.banned = banned if banned is not None and any(banned) else None
        self.banned_for = banned_for

    @property
    def raw_argmax(self) -> bool:
        """Whether every row's token is the argmax of its logits as the model gave them."""
        return (
            all(takes_raw_argmax(p, c) for p, c in zip(self.params, self.constraints, strict=True))
            and self.token_count is None and self.banned is None
        )  # fmt: skip

    def _column(self, values: list) -> torch.Tensor:
        return torch.tensor(values, device=self.device)

    def _settings(self, *names: str) -> list[torch.Tensor]:
        """The named parameters of every row as (B,) tensors."""
        return [self._column([float(getattr(p, name)) for p in self.params]) for name in names]

    @functools.cached_property
    def _bias_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's `logit_bias` as (rows, token ids, biases), each (N,): made once per batch (a
        speculative step biases each of its columns)."""
        rows, ids, values = [], [], []
        for row, params in enumerate(self.params):
            rows += [row] * len(params.logit_bias)
            ids += params.logit_bias.keys()
            values += params.logit_bias.values()
        return self._column(rows), self._column(ids), self._column(values).float()

    def bias(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V), float32, plus each row's `logit_bias` (OpenAI: added to the logits before sampling)."""
        if not self.biased:
            return logits
        rows, ids, values = self._bias_entries
        return logits.float().index_put((rows, ids), values, accumulate=True)

    def _disallowed(self, vocab: int) -> torch.Tensor:
        """(B, V) bool: the ids outside each row's `allowed_token_ids` (none for a row without them)."""
        disallowed = torch.zeros(len(self.params), vocab, dtype=torch.bool)
        for row in self.restricted:
            disallowed[row] = True
            disallowed[row, list(self.params[row].allowed_token_ids)] = False
        return disallowed.to(self.device)

    def adjust(self, logits: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) as each row samples from them before temperature: the padded ids past `token_count`, each
        row's `banned` ids (while its `banned_for` lasts: `extra_tokens`, the drafts before this column, count) and
        the ids outside its `allowed_token_ids` at -inf, logit bias, then penalties (`penalize`)."""
        if self.restricted:
            logits = logits.masked_fill(self._disallowed(logits.shape[-1]), float("-inf"))
        logits = without_padded_ids(logits, self.token_count)
        column = 0 if extra_tokens is None else extra_tokens.shape[1]  # this step's tokens before the one drawn
        rows, ids = [], []
        for row, row_ids in enumerate(self.banned or ()):
            if column < self.banned_for[row]:
                rows += [row] * len(row_ids)
                ids += row_ids
        if ids:
            logits = logits.float().index_put((self._column(rows), self._column(ids)), self._column(float("-inf")))
        return self.penalize(self.bias(logits), extra_tokens)

    def penalize(self, logits: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Repetition (HF/vLLM), presence and frequency (OpenAI) penalties on logits (B, V).

        `extra_tokens` (B, n) are counted as if already generated: speculative drafts before their verification.
        """
        if not self.penalized:
            return logits
        # each penalty only where a row sets it: every one is a few passes over B x V values (torch.where's ~40x a
        # multiplication's on a CPU), and OpenAI clients send presence and frequency penalties without a repetition one
        shape = (len(self.params), logits.shape[-1])
        drafted = None
        if extra_tokens is not None:
            drafted = (torch.arange(shape[0], device=self.device)[:, None].expand_as(extra_tokens), extra_tokens)
        if any(p.repetition_penalty != 1 for p in self.params):
            seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            for row, state in enumerate(self.penalties):
                if state is not None:
                    seen[row] = state.seen
            if drafted is not None:
                seen[drafted] = True
            [repetition] = self._settings("repetition_penalty")
            penalized = torch.where(logits > 0, logits / repetition[:, None], logits * repetition[:, None])
            logits = torch.where(seen, penalized, logits)
        if any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in self.params):
            counts = torch.zeros(shape, device=self.device)
            for row, state in enumerate(self.penalties):
                if state is not None:
                    counts[row] = state.output_counts
            if drafted is not None:
                counts.index_put_(drafted, torch.ones_like(extra_tokens, dtype=counts.dtype), accumulate=True)
            presence, frequency = (t[:, None] for t in self._settings("presence_penalty", "frequency_penalty"))
            # logit -= presence * 1[count > 0] + frequency * count   (OpenAI API reference, "parameter details")
            logits = logits - presence * (counts > 0) - frequency * counts
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution each row samples from (B, V): temperature, top-k, top-p, min-p; greedy rows one-hot."""
        if self.all_greedy:
            return _one_hot_argmax(logits)
        temperature = self._column([1.0 if p.greedy else p.temperature for p in self.params])
        scaled = logits.float() / temperature[:, None]
        probs = (self._filter(scaled) if self.filtered else scaled).softmax(dim=-1)
        if not self.any_greedy:
            return probs
        greedy = self._column([p.greedy for p in self.params])
        return torch.where(greedy[:, None], _one_hot_argmax(logits), probs)

    def _filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) outside each row's top-k, then outside the top-p nucleus and below min-p of what top-k keeps,
        at -inf. Top-k keeps the tokens tied with the k-th too, as transformers and vLLM (a k-th value, not a rank),
        and takes a topk; so does a top-p, whose nucleus is looked for among the NUCLEUS_CANDIDATES likeliest first
        (`_outside_nucleus`): a sort of 129280 ids costs ~30-50 ms a row on a CPU core, 20-60x a topk."""
        vocab = logits.shape[-1]
        ks = [min(p.top_k, vocab) or vocab for p in self.params]
        top_p, min_p = self._settings("top_p", "min_p")
        # rows without a top-k (or one >= V) keep every token: no topk of V values for them; the widest k is read
        # from the parameters, not the device (no GPU sync)
        widest = max((k for k in ks if k < vocab), default=0)
        if widest:
            top_k = self._column(ks)
            limited = top_k < vocab
            kth = logits.topk(widest, dim=-1).values.gather(-1, top_k.clamp(max=widest)[:, None] - 1)
            logits = logits.masked_fill(limited[:, None] & (logits < kth), float("-inf"))
        probs = logits.softmax(dim=-1)  # top-p and min-p within the top k
        remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        if any(p.top_p < 1 for p in self.params if not p.greedy):
            remove |= _outside_nucleus(probs, top_p)
        # the likeliest token stays, even when a tiny top_p rounds to 0 in float32
        remove.scatter_(-1, logits.argmax(dim=-1, keepdim=True), False)
        return logits.masked_fill(remove, float("-inf"))

    def constrain(self, logits: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) with the tokens each row's constraint forbids at -inf (rows without one as they are); with
        `drafts` (B, K), logits (B, K+1, V) at [pending, drafts], each column under the constraint after the drafts
        before it (`TokenConstraint.allowed_after`). A row's first column left none of its allowed_token_ids is refused
        (`_all_forbidden`); a later one is left unconstrained, so every column keeps a distribution
        to draw from, and noted in `dead_columns`: no token of it is kept (`before_dead_columns`)."""
        rows = self.constrained
        if not rows:
            return logits
        vocab = logits.shape[-1]
        if drafts is None:
            allowed = [self.constraints[row].allowed(vocab) for row in rows]
        else:
            ids = drafts.tolist()
            allowed = [self.constraints[row].allowed_after(ids[row], vocab).clone() for row in rows]
        for row, mask in zip(rows, allowed, strict=True):
            columns = mask.view(-1, vocab)
            dead = next((t for t in range(len(columns)) if self._allowed_ids_all_forbidden(row, columns[t])), None)
            if dead == 0:  # no token is left to sample next (add_request refuses those forbidden as the first)
                raise self._all_forbidden(row)
            if dead is not None:
                columns[dead:] = True
                self.dead_columns[row] = dead
        forbidden = torch.zeros(logits.shape, dtype=torch.bool)
        forbidden[rows] = ~torch.stack(allowed)
        return logits.masked_fill(forbidden.to(self.device), float("-inf"))

    def before_dead_columns(self, accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `accepted` (B,) drafts and the tokens each row keeps (B,: accepted + 1), a row's cut short of its
        `dead_columns` entry, where no token could be sampled: the drafts before it that passed stay accepted and,
        with the token after them, kept; they may end the request as plain decoding would; if they do not, the next
        step starts at that column and refuses the row there (`constrain`), naming its token."""
        kept = accepted + 1
        for row, column in self.dead_columns.items():
            accepted[row] = accepted[row].clamp(max=column)
            kept[row] = kept[row].clamp(max=column)
        return accepted, kept

    def _allowed_ids_all_forbidden(self, row: int, allowed: torch.Tensor) -> bool:
        """Whether `row` has allowed_token_ids and `allowed` (V,), its constraint's mask, forbids each of them."""
        ids = self.params[row].allowed_token_ids
        return ids is not None and not allowed[list(ids)].any()

    def _all_forbidden(self, row: int) -> ConfigError:
        """The ConfigError naming `row`'s allowed_token_ids and the rule that forbids each of them."""
        ids = self.params[row].allowed_token_ids
        rule = (
            "bad_words, after the tokens before it"
            if isinstance(self.constraints[row], BadWords)
            else "the constraint (JSON mode: response_format's grammar, forced tool calls), after the tokens before it"
        )
        return ConfigError(
            f"{shown_value(list(ids))} are each forbidden here by {rule}: no token could be sampled; allow an id it "
            "permits there",
            field="allowed_token_ids",
        )

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row (B,) from logits (B, V): constraints, bias, penalties, the row's distribution, a draw."""
        logits = self.adjust(self.constrain(logits))
        if self.all_greedy:
            return greedy_tokens(logits)
        return self.draw(self.probabilities(logits))

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row (B,): argmax for greedy rows, else the inverse CDF of the row's next U(0, 1)
        (`SeededUniforms`): the first token whose cumulative probability exceeds it (one batched search, no
        per-row torch.multinomial, which costs ~1 ms per row on a CPU)."""
        if self.all_greedy:
            return probs.argmax(dim=-1)
        cdf = probs.float().cumsum(dim=-1)  # (B, V), unnormalised rows allowed
        if not bool((cdf[:, -1] > 0).all()):  # NaN: the search would give every such row the last id
            raise ValueError(NO_DISTRIBUTION)
        u = self.uniform()[:, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)
        if not self.any_greedy:
            return drawn
        greedy = self._column([p.greedy for p in self.params])
        return torch.where(greedy, probs.argmax(dim=-1), drawn)

    def uniform(self) -> torch.Tensor:
        """One U(0, 1) number per row (B,), the row's next (greedy rows get 0: they never need one)."""
        rows = zip(self.params, self.uniforms, strict=True)
        values = [0.0 if params.greedy else numbers.next() for params, numbers in rows]
        return torch.tensor(values, device=self.device)


NUCLEUS_CANDIDATES = 256  # a top-p nucleus is looked for among this many likeliest tokens before the whole vocabulary


def _outside_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: the tokens outside each row's top-p nucleus of probs (B, V), those the more likely ones before them
    cover top_p (B,) already; none for a row at top_p 1, though float32's running sum can reach 1 before its tail.

    A sort of the vocabulary costs 20-60x a topk (129280 ids: ~30 ms a row on a CPU core): the running sum is taken
    over the NUCLEUS_CANDIDATES likeliest (a topk, sorted), and where that covers a row's top_p, all the tokens after
    them are outside as a sort would find them. Only the rows whose nucleus is wider (flat distributions) sort."""
    vocab = probs.shape[-1]
    wanted = top_p[:, None] < 1
    candidates, order = probs.topk(min(NUCLEUS_CANDIDATES, vocab), dim=-1)
    inside, covered = _nucleus(candidates, order, top_p, vocab)
    wider = (wanted[:, 0] & ~covered).nonzero()[:, 0]  # rows whose nucleus holds more than the candidates
    if candidates.shape[-1] < vocab and len(wider):
        inside[wider] = _nucleus(*probs[wider].sort(dim=-1, descending=True), top_p[wider], vocab)[0]
    return wanted & ~inside


def _nucleus(
    sorted_probs: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's likeliest probabilities in descending order (B, K) and their ids (B, K): the (B, V) bool of
    the tokens among them that the ones before do not cover top_p (B,) with, and (B,) whether all K cover it."""
    cumulative = sorted_probs.cumsum(dim=-1)
    outside = (cumulative - sorted_probs) >= top_p[:, None]
    inside = torch.zeros(order.shape[0], vocab, dtype=torch.bool, device=order.device).scatter_(-1, order, ~outside)
    return inside, cumulative[:, -1] >= top_p


def takes_raw_argmax(params: SamplingParams, constraint: TokenConstraint | None) -> bool:
    """Whether a request's token is the argmax of its logits as the model gave them at every step: greedy, with no
    penalty, logit_bias, allowed_token_ids or constraint (a padded vocabulary and min_tokens' bans aside: a batch's)."""
    return (
        params.greedy and not params.penalized and not params.logit_bias and params.allowed_token_ids is None
        and constraint is None
    )  # fmt: skip


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (B,) of logits (B, V); ValueError (NO_DISTRIBUTION) when a row has none: torch's argmax takes
    a NaN for the largest value (a row of NaN gives id 0), and a row all -inf has no token left. The check reads the
    B largest values that the max gives with the ids, no further pass over the vocabulary."""
    largest, tokens = logits.max(dim=-1)
    if not bool(has_distribution(largest).all()):
        raise ValueError(NO_DISTRIBUTION)
    return tokens


def has_distribution(largest: torch.Tensor) -> torch.Tensor:
    """Whether each row whose largest logit is `largest` has a token to take greedily: neither NaN nor -inf."""
    return largest > float("-inf")


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) float32: 1 at each row's argmax (`greedy_tokens`)."""
    return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, greedy_tokens(logits)[:, None], 1.0)


def without_padded_ids(logits: torch.Tensor, token_count: int | None) -> torch.Tensor:
    """Logits (..., V) with the ids from `token_count` on (a vocabulary padded past the tokenizer's ids, as released
    checkpoints round it up: they decode to no token) at -inf, as vLLM drops them from the logits it samples and
    reports; None: every id is the tokenizer's, logits as they are."""
    if token_count is None:
        return logits
    padded = torch.arange(token_count, logits.shape[-1], device=logits.device)
    return logits.index_fill(-1, padded, float("-inf"))


def outside_vocabulary(token_ids: Iterable[int] | Mapping[int, Any], token_count: int) -> tuple[int, int] | None:
    """The first of `token_ids` (a list, or a mapping keyed by them: logit_bias) outside [0, `token_count`), the
    tokenizer's ids (a model's padded rows decode to no token: `without_padded_ids`), as (its position in the list,
    or the id itself for a mapping; the id); None where every id is in it. Engine.add_request refuses by it, and so
    does the server's refuse_outside_vocabulary, naming the entry, before a request reaches the engine."""
    for position, token in enumerate(token_ids):
        if not 0 <= token < token_count:
            return (token if isinstance(token_ids, Mapping) else position), token
    return None


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's raw distribution (as vLLM reports them, before any sampling setting).

    logits (B, V), tokens (B,) -> chosen (B,), ranks (B,) (vLLM's Logprob.rank: 1 + the tokens likelier than the
    chosen one), top values (B, top_n), top ids (B, top_n). Tied values are listed by id, as argmax picks among them
    (bfloat16 logits tie often): a greedy token is the first of its top list.
    """
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if not top_n:
        return chosen[:, 0], ranks, logprobs[:, :0], tokens[:, None][:, :0]
    top_values, top_ids = largest_by_value_then_id(logprobs, top_n)
    return chosen[:, 0], ranks, top_values, top_ids


def largest_by_value_then_id(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest of each row of values (B, V) and their ids (B, n), ties listed by id: what a stable descending
    sort puts first, from torch.topk over the values at least the n-th largest (n of them unless ties cross it). Sorting
    the whole vocabulary took each decode step 20-60x a topk's time (129280 ids: ~50 ms a row on a CPU core)."""
    n = min(n, values.shape[-1])
    nth = values.topk(n, dim=-1).values[:, -1:]
    candidates = int((values >= nth).sum(dim=-1).max())
    top_values, top_ids = values.topk(candidates, dim=-1)
    top_ids, by_id = top_ids.sort(dim=-1)
    top_values, by_value = top_values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    return top_values[:, :n], top_ids.gather(-1, by_value)[:, :n]
