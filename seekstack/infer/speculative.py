"""MTP speculative decoding: the MTP module's drafts, and their verification by the main model, greedy or by
speculative sampling's acceptance rule (Leviathan et al. 2023, Alg. 1).

Shapes: B sequences, T tokens per sequence, K drafts per sequence, V vocabulary, D hidden.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from seekstack.config import ModelConfig
from seekstack.infer.cache import PagedLatentCache
from seekstack.infer.draft_vocab import DraftVocabulary
from seekstack.infer.sampling import SamplingBatch
from seekstack.infer.threads import StepThreads

if TYPE_CHECKING:
    from seekstack.model.transformer import Transformer


def draft_argmax(model: Transformer, normed: torch.Tensor, vocabulary: DraftVocabulary | None) -> torch.Tensor:
    """The draft (B, 1) from the MTP module's normalised state (B, 1, D): the output head's argmax over the whole
    vocabulary, or over `vocabulary` alone."""
    if vocabulary is None:
        return model.lm_head(normed).argmax(dim=-1)
    return vocabulary.ids[(normed @ vocabulary.head_t).argmax(dim=-1)]


def mtp_drafts(
    model: Transformer,
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    positions: torch.Tensor,
    last: torch.Tensor,
    cache: PagedLatentCache,
    count: int,
    fill_cache: bool = True,
    vocabulary: DraftVocabulary | None = None,
) -> torch.Tensor:
    """`count` drafts (B, K) after column last[b] of a main forward: its hidden (B, T, D) at positions (B, T), with
    the tokens one position on (B, T).

    MTP depth 1 runs over all T columns (position i reads h_i and the embedding of token i+1, so every position
    enters the MTP layer's cache) and column last guesses the token after the next. Further drafts apply the
    same module again one position on, its own output standing in for the main model's hidden state there (as
    vLLM drafts past a model's MTP depth). The cache entries those write are guesses; the next step writes
    over them before anything reads them. With `count` 0 depth 1 still fills the MTP layer's cache when
    `fill_cache` (a prompt's chunk, which the engine's drafts after it read; a decode step fills it only as it
    drafts). Drafts are among `vocabulary`'s
    tokens when given (`draft_argmax`).
    """
    no_drafts = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
    if count == 0 and not fill_cache:
        return no_drafts
    mtp = model.mtp[0]
    rows, width = torch.arange(hidden.shape[0], device=hidden.device), positions.shape[1]
    # One rotary table for the T columns and the count - 1 positions past them that the follow-up drafts can reach
    # (a row's positions are consecutive): the follow-ups index it instead of computing their own.
    reach = positions[:, :1] + torch.arange(width + max(count - 1, 0), device=positions.device)  # (B, T + K - 1)
    cos, sin = model.rotary(reach)
    out, _ = mtp(hidden, model.embed_tokens(next_ids), cos[:, :width], sin[:, :width], cache, output_expert_load=False)
    if count == 0:
        return no_drafts
    hidden, column = out[rows, last][:, None], last  # (B, 1, D), (B,)
    drafts = [draft_argmax(model, mtp.head_input(hidden), vocabulary)]  # (B, 1) each
    for _ in range(count - 1):
        column = column + 1
        at = (rows, column)
        embedded, follow = model.embed_tokens(drafts[-1]), cache.follow(reach[at][:, None])
        hidden, _ = mtp(hidden, embedded, cos[at][:, None], sin[at][:, None], follow, output_expert_load=False)
        drafts.append(draft_argmax(model, mtp.head_input(hidden), vocabulary))
    return torch.cat(drafts, dim=1)


def greedy_speculation(
    model: Transformer,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: PagedLatentCache,
    count: int,
    fill_cache: bool = True,
    vocabulary: DraftVocabulary | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A greedy speculative step in one call: verify each row's [pending, K drafts] (B, K+1) and draft again.

    Returns logits (B, K+1, V), their largest values and argmaxes (B, K+1) as a plain greedy step takes them
    (`greedy_tokens`), how many drafts each row accepted (B,) — those up to the first that differs from the argmax
    before it — and the next K drafts (B, K). The first accepted + 1 argmaxes are the new tokens: the accepted
    drafts and the token after them (a replacement or a bonus). `count`, `fill_cache` and `vocabulary` are those
    of `mtp_drafts`.
    """
    out = model(input_ids, cache=cache, positions=positions, output_expert_load=False)
    largest, best = out.logits.max(dim=-1)
    accepted = accepted_prefix(best[:, :-1] == input_ids[:, 1:])
    next_drafts = mtp_drafts(model, out.hidden_states, best, positions, accepted, cache, count, fill_cache, vocabulary)
    return out.logits, largest, best, accepted, next_drafts


def accept_drafts(
    sampling: SamplingBatch, logits: torch.Tensor, drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative sampling over K drafts per row (B, K) from the target's logits (B, K+1, V) at [pending, drafts].

    The drafts are the MTP module's argmax (over the draft vocabulary when there is one, as in FR-Spec), so the draft
    distribution q is one-hot, and Leviathan et al.'s rule (accept with min(1, p/q) = p(draft), else draw from
    norm(max(0, p - q)), p without the draft) is the same as drawing the token from p and accepting the draft where
    that token is the draft. So each column draws its token from its target p as plain sampling draws it
    (`SamplingBatch.draw`: the row's next uniform), and a row keeps the tokens up to its first that differs from its
    draft, that one included: accepted + 1, fewer where a constraint leaves a column no token
    (`SamplingBatch.before_dead_columns`). Its generator then stands one draw on per token kept, so a request's n-th
    token takes its n-th draw, drafts or none: a seeded request samples the tokens plain decoding samples (but for the
    verification forward's rounding) whatever the draft count and whatever else shares the batch.

    Draft t is judged under the distribution after the drafts before it (`SamplingBatch.adjust`: the logit bias, then
    penalties that count those drafts as generated); when all K pass, the last column gives a bonus token. A row's
    token constraint (JSON mode) masks each column as the drafts before it leave it (`SamplingBatch.constrain`); no
    row keeps a column where it leaves none of the row's allowed_token_ids. Returns how many drafts each row
    accepted (B,), the tokens (B, K+1) and how many of them each row keeps (B,).
    """
    logits = sampling.constrain(logits, drafts)
    draws = [numbers.get_state() for numbers in sampling.uniforms]
    columns = range(drafts.shape[1] + 1)
    tokens = torch.stack(
        [
            sampling.draw(sampling.probabilities(sampling.adjust(logits[:, t], extra_tokens=drafts[:, :t])))
            for t in columns
        ],
        dim=1,
    )
    accepted, kept = sampling.before_dead_columns(accepted_prefix(tokens[:, :-1] == drafts))
    for numbers, params, before, count in zip(sampling.uniforms, sampling.params, draws, kept.tolist(), strict=True):
        if not params.greedy:  # a greedy row draws no numbers
            numbers.set_state(before + count)
    return accepted, tokens, kept


def accepted_prefix(passed: torch.Tensor) -> torch.Tensor:
    """How many drafts each row keeps (B,): those before its first failed check in passed (B, K)."""
    return passed.long().cumprod(dim=1).sum(dim=1)


# The cached context of each row in the measured steps (`measured_step_costs`): about a prompt and its first answer.
MEASURED_CONTEXT = 128
MEASURED_BATCHES = 64  # batches above this take its costs: measuring them would slow the engine's start
# No turn starts once the turns so far took this long, on the clock they are timed with (the warm-up and one timed turn
# always run): a fast start. On one CPU thread that is CPU time, so another process's load does not cut the turns
# short: on a wall-clock budget a loaded machine fit 2 turns, and the one timed turn's noise (4 rows verifying 3 drafts
# measured 1.08 plain steps where 5 turns give 1.40) turned drafting on where it decoded at 0.71x.
MEASURE_SECONDS = 1.0
# Where nothing is measured (`StepCosts.modelled`): tokens a decode forward takes for about the cost of a one-token
# forward; below this the step is bound by its fixed costs (weights read, kernel launches, Python).
FREE_VERIFY_TOKENS = {"cpu": 4, "cuda": 64}


@dataclass(frozen=True)
class StepCosts:
    """What a decode step costs at each batch size in `batches` (ascending), relative to a plain step of as many rows:
    `draft` one draft per row (the MTP block and the draft head), `verify` a forward of g + 1 tokens per row at index g
    (1 at g = 0). A batch between two sizes takes the costs of the larger one, a batch above them the largest's."""

    batches: list[int]
    draft: list[float]
    verify: list[list[float]]

    def index(self, batch: int) -> int:
        """Which measured batch size a step of `batch` rows takes the costs of."""
        return min(bisect.bisect_left(self.batches, batch), len(self.batches) - 1)

    def at(self, batch: int) -> tuple[float, list[float]]:
        """The draft cost and the verification costs by draft count of a step of `batch` rows."""
        index = self.index(batch)
        return self.draft[index], self.verify[index]

    @classmethod
    def modelled(cls, config: ModelConfig, most: int, device: torch.device) -> StepCosts:
        """Costs from the model's shapes, for an engine that measured none (a model placed over devices): a step's time
        goes by layers more than by FLOPs, a draft being one MTP block and the head against L blocks and the head, and
        a forward over N tokens costs max(N, F) / F one-token forwards (F: FREE_VERIFY_TOKENS)."""
        free = FREE_VERIFY_TOKENS.get(device.type, FREE_VERIFY_TOKENS["cpu"])
        batches = [2**power for power in range(free.bit_length() + 1)]  # up to twice F: every row then costs
        verify = [[max(batch * (count + 1), free) / max(batch, free) for count in range(most + 1)] for batch in batches]
        return cls(batches, [1.5 / (config.num_hidden_layers + 1)] * len(batches), verify)


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock a decode step on `device` is timed with, on the thread count set now: on one CPU thread its CPU time
    (time that another process takes is then not counted), else the wall clock."""
    return time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def measured_step_costs(
    model: Transformer,
    vocabulary: DraftVocabulary | None,
    most: int,
    max_batch: int,
    block_size: int = 16,
    repeats: int = 5,
) -> StepCosts:
    """`StepCosts` measured on the model's device, eager, at batch sizes 1, 2, 4, ... up to `max_batch` (at most
    MEASURED_BATCHES): cached decode forwards of 1 to `most` + 1 tokens per row and one draft per row (the MTP block
    on one token and the draft head), every row after MEASURED_CONTEXT cached tokens, as the engine's steps run them
    (the cache planned for each forward in blocks of the engine's `block_size`, attention over the context). All are
    taken in turns, `repeats` times after a warm-up or as many as MEASURE_SECONDS allows, and the fastest of each
    counts (another process's load then counts less)."""
    device, config = model.embed_tokens.weight.device, model.config
    largest = min(max_batch, MEASURED_BATCHES)
    batches = sorted({2**power for power in range(largest.bit_length()) if 2**power < largest} | {largest})
    tokens = MEASURED_CONTEXT + most + 1
    blocks = largest * math.ceil(tokens / block_size) + 1
    cache = PagedLatentCache(config, blocks, block_size, model.embed_tokens.weight.dtype, device, prefix_caching=False)
    rows = [f"measured-{row}" for row in range(largest)]
    for row in rows:
        cache.allocate(row, tokens)
    # Tokens of varied ids, as text has: the same id in every row would send every token to the same few experts, and
    # a wide verification would measure cheaper than it runs (the demo model at 16 rows: 1.6 plain steps, 1.7 so).
    generator = torch.Generator(device).manual_seed(0)
    ids = torch.randint(config.vocab_size, (largest, most + 1), generator=generator, device=device)
    mtp = model.mtp[0]

    def forward(batch: int, width: int) -> None:
        positions = cache.plan(rows[:batch], [MEASURED_CONTEXT] * batch, [width] * batch, width)
        model(ids[:batch, :width], cache=cache, positions=positions, output_expert_load=False)

    def draft(batch: int) -> None:
        positions = cache.plan(rows[:batch], [MEASURED_CONTEXT] * batch, [1] * batch, 1)
        embedded = model.embed_tokens(ids[:batch, :1])  # (B, 1, D), standing in for the main model's hidden state too
        cos, sin = model.rotary(positions)
        hidden, _ = mtp(embedded, embedded, cos, sin, cache, output_expert_load=False)
        draft_argmax(model, mtp.head_input(hidden), vocabulary)

    # On as many threads as the engine's steps of each batch (seekstack.infer.threads), each timed on `step_clock`.
    threads = StepThreads(config, device)
    runs: dict[tuple[int, int | str], Callable[[], None]] = {}  # (batch, tokens per row or "draft"): the step
    for batch in batches:
        runs[batch, "draft"] = functools.partial(draft, batch)
        for width in range(1, most + 2):
            runs[batch, width] = functools.partial(forward, batch, width)
    seconds: dict[tuple[int, int | str], list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        for turn in range(repeats + 1):
            if turn >= 2 and sum(map(sum, seconds.values())) > MEASURE_SECONDS:
                break
            for (batch, name), run in runs.items():
                with threads.running(batch * (most + 1)):
                    clock = step_clock(device)
                    start = clock()
                    run()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds[batch, name].append(clock() - start)
    fastest = {key: min(times[1:]) for key, times in seconds.items()}
    # A forward over more tokens never costs less: a wider one measured faster (noise) counts as the one before it.
    verify = [
        list(itertools.accumulate((fastest[batch, width] / fastest[batch, 1] for width in range(1, most + 2)), max))
        for batch in batches
    ]
    return StepCosts(batches, [fastest[batch, "draft"] / fastest[batch, 1] for batch in batches], verify)


# A draft's cost at a batch size (`observe_step`): each plain step against the median of the last STEPS_TIMED steps
# of the count drafted before it, the median of the last STEP_WINDOW such pairs once there are STEPS_TIMED of them. A
# step slowed by something else (another process's use of the caches, a collection) moves it little; a pair's steps
# run close in time, so another process's load, which moves every step's time from one second to the next, does not
# tell apart counts timed at different moments.
STEP_WINDOW = 9
STEPS_TIMED = 3
ACCEPTANCE_MEMORY = 0.95  # weight of a request's acceptance seen so far at each of its new steps (~20 steps of memory)
# A depth's prior, worth PRIOR_CHECKS checks: at depth 1 the acceptance DeepSeek-V3 reports for its MTP module's
# token (85-90%, tech report 5.4.3), so a fresh engine drafts the most and measures every depth at once; at deeper
# depths the rate of the depth before.
PRIOR_ACCEPTANCE = 0.85
PRIOR_CHECKS = 2.0
NEAR_BEST = 0.05  # draft counts whose expected speed-up is within this share of the best's tie; the most wins
# Below the most drafts, one step in this many drafts one more, to measure the next depth; while drafting, two steps in
# this many draft none, so that one of them is a plain step (its step before verified drafts), timed.
PROBE_EVERY = 32
# At 2+ rows: the least speed-up drafts at the prior must promise for a batch size to draft at all. Rows that draft
# finish unevenly (acceptance differs by text), and a batch's last rows then step with few others, each step costing
# them its fixed part alone, the more so the more drafts a step makes: bench/speculative.py, eager, demo model, its 16
# prompts at 4 and 16 rows (AVX512 VM, 3 runs): 1 and 3 fixed drafts gave 0.93-1.13x and 0.79-1.08x of plain where
# the measured costs promised 1.14-1.37x at the prior (1.2 here let a 16-row batch draft: 0.78x).
UNEVEN_FINISH_GAIN = 1.4


@dataclass
class DraftChecks:
    """A request's draft checks passed and made at each depth, its recent steps weighted most (ACCEPTANCE_MEMORY)."""

    passed: list[float] = field(default_factory=list)
    checked: list[float] = field(default_factory=list)


class DraftCount:
    """How many drafts the next step verifies, 0..`most`: fixed at `most`, or (adaptive) the count with the best
    expected speed-up under the acceptance measured at each draft depth and the step's costs at the current batch size.

    Leviathan et al. 2023, Thm. 3.8, with an acceptance a_d per depth (draft d passes with a_d once all before it
    did) and costs measured per batch size (`StepCosts`): gamma drafts of relative cost c each and a verification
    forward of relative cost v_gamma yield 1 + a_1 + a_1 a_2 + ... + a_1...a_gamma tokens for gamma c + v_gamma plain
    steps. Depths may differ: the MTP module is trained for depth 1 only (`mtp_drafts` reapplies it for the others).
    A step without drafts is a plain step (speed-up 1): the MTP block does not run, and the positions it skips stay
    out of the MTP cache. A depth not drafted takes the rate of the depth before,
    which undersells it (once a draft passes the next usually does: 0.97 at depth 2 after 0.57 at depth 1 on the demo
    checkpoint), so one step in PROBE_EVERY drafts one more than the best count and measures the next depth (the
    first, with drafts off).

    The costs that decide come from the steps the engine takes (`observe_step`: the engine's own work outside the
    model included, compiled steps as compiled, on `step_clock`): per batch size of `StepCosts`, a step of gamma
    drafts costs 1 + gamma c plain steps, c timed as plain steps against the drafting steps before them; while
    drafting, two steps in PROBE_EVERY draft none, so that plain steps keep being timed. Until c is timed, the
    start-up measurement's costs decide (`StepCosts`: eager, and noisy on a busy machine, where it can read a draft
    at twice the cost the steps time, or more).

    Acceptance is a property of the text as much as of the model: on the demo checkpoint one prompt passes every
    draft and the next none. So each request has its own rates (`DraftChecks`), starting from the engine's rates
    over all requests so far as their prior and following its own checks, and a step's expected tokens are the mean
    over its rows: a request whose drafts fail turns drafting off for itself, not for the requests after it.

    At 2+ rows drafts at the prior must promise UNEVEN_FINISH_GAIN for a batch size to draft at all; where they do
    not, the engine's steps are plain ones (`Engine._decode`).
    """

    def __init__(
        self, config: ModelConfig, most: int, adaptive: bool, device: torch.device, costs: StepCosts | None = None
    ):
        self.most, self.adaptive = most, adaptive
        # As `measured_step_costs` finds them on this machine, else from the model's shapes.
        self.costs = costs or StepCosts.modelled(config, most, device)
        self.passed, self.checked = [0] * most, [0] * most  # per depth, over every request and step alike
        self.steps_below_most = self.steps_drafting = 0
        # By `StepCosts.index`: the count drafted last and its last STEPS_TIMED steps' seconds; a draft's cost, in
        # plain steps, from the last STEP_WINDOW plain steps; its median once timed (`observe_step`).
        self.drafting_seconds: dict[int, tuple[int, deque[float]]] = {}
        self.draft_costs: dict[int, deque[float]] = {}
        self.timed_draft_cost: dict[int, float] = {}

    def acceptance(self, request: DraftChecks | None = None) -> list[float]:
        """a_d for depths 1..most: the share of depth d's checks that passed, with PRIOR_CHECKS checks of its prior;
        the engine's over all requests, or `request`'s own with the engine's rates as its prior."""
        rates, prior = [], PRIOR_ACCEPTANCE
        for passed, checked in zip(self.passed, self.checked, strict=True):
            prior = (passed + PRIOR_CHECKS * prior) / (checked + PRIOR_CHECKS)
            rates.append(prior)
        if request is None or not request.checked:
            return rates
        return [
            (passed + PRIOR_CHECKS * rate) / (checked + PRIOR_CHECKS)
            for passed, checked, rate in zip(request.passed, request.checked, rates, strict=True)
        ]

    def expected_tokens(self, count: int, rates: list[list[float]] | None = None) -> float:
        """Tokens a row gets from a step of `count` drafts (those accepted and one more): 1 + a_1 + a_1 a_2 + ...,
        under the engine's rates or, averaged over the rows, under each row's `rates`."""
        rows = rates or [self.acceptance()]
        drafts_passed = 0.0
        for row in rows:
            reach = 1.0
            for rate in row[:count]:
                reach *= rate
                drafts_passed += reach
        return 1 + drafts_passed / len(rows)

    def drafting_can_pay(self, batch: int) -> bool:
        """Whether steps of `batch` rows draft at all: at one row always (its probes time what a draft costs, however
        dear the start-up measurement read it), at more where drafts accepted at PRIOR_ACCEPTANCE at every depth would
        speed them up by UNEVEN_FINISH_GAIN at the start-up costs, against which that margin was found."""
        prior = [[PRIOR_ACCEPTANCE] * self.most]
        return batch == 1 or any(
            self.expected_tokens(count, prior) / self.start_up_cost(count, batch) > UNEVEN_FINISH_GAIN
            for count in range(1, self.most + 1)
        )

    def start_up_cost(self, count: int, batch: int) -> float:
        """A step of `batch` rows verifying `count` drafts per row and drafting as many, in plain steps, from the
        start-up costs: v_count + count d."""
        draft, verify = self.costs.at(batch)
        return verify[count] + count * draft

    def step_cost(self, count: int, batch: int) -> float:
        """A step as `start_up_cost`'s: 1 + count c with c timed (`observe_step`), else the start-up costs'."""
        timed = self.timed_draft_cost.get(self.costs.index(batch))
        return self.start_up_cost(count, batch) if timed is None else 1 + count * timed

    def speedup(self, count: int, batch: int, rates: list[list[float]] | None = None) -> float:
        """Expected tokens per unit of step cost with `count` drafts per row of `batch` rows (under each row's
        `rates`, or the engine's), against plain decoding."""
        if count == 0:
            return 1.0
        return self.expected_tokens(count, rates) / self.step_cost(count, batch)

    def choose(self, rows: list[DraftChecks]) -> int:
        """The draft count of the next step for the running requests' `rows` (0: a plain step)."""
        if not self.adaptive:
            return self.most
        if not self.drafting_can_pay(len(rows)):
            return 0
        batch, rates = len(rows), [self.acceptance(row) for row in rows]
        # Once drafting pays, counts within NEAR_BEST of the best speed-up count as equal and the most drafts among
        # them wins: the deeper depths stay measured, and the count (a graph each) does not flip on acceptance noise.
        speedups = [self.speedup(count, batch, rates) for count in range(self.most + 1)]
        best = max(range(self.most + 1), key=lambda count: (speedups[count], -count))
        if best > 0:
            best = max(
                count for count in range(best, self.most + 1) if speedups[count] >= speedups[best] * (1 - NEAR_BEST)
            )
        if best > 0:
            self.steps_drafting += 1
            if self.steps_drafting % PROBE_EVERY in (PROBE_EVERY - 1, 0):  # the last two of each PROBE_EVERY
                return 0
        if best < self.most:
            self.steps_below_most += 1
            # With drafts off, the probe drafts for STEPS_TIMED steps and more, so that the plain step after them
            # times a draft too (`observe_step`): a draft timed dear at start-up is not kept off for good.
            probe_steps = 1 if best > 0 else STEPS_TIMED + 1
            phase = self.steps_below_most % PROBE_EVERY
            if phase == 0 or phase > PROBE_EVERY - probe_steps:
                return best + 1
        return best

    def observe_step(self, batch: int, verified: int, drafted: int, seconds: float) -> None:
        """Time a decode step of `batch` rows that verified `verified` drafts per row and drafted `drafted` (a step
        between two counts costs neither's): a drafting step joins its count's last steps, and a plain step after
        STEPS_TIMED of them times a draft, c = (their median / its seconds - 1) / count, at least 0."""
        if verified != drafted:
            return
        index = self.costs.index(batch)
        if drafted > 0:
            count, recent = self.drafting_seconds.get(index, (0, deque()))
            if count != drafted:
                recent = deque(maxlen=STEPS_TIMED)
                self.drafting_seconds[index] = drafted, recent
            recent.append(seconds)
            return
        count, recent = self.drafting_seconds.get(index, (0, deque()))
        if len(recent) < STEPS_TIMED:
            return
        costs = self.draft_costs.setdefault(index, deque(maxlen=STEP_WINDOW))
        costs.append(max(statistics.median(recent) / seconds - 1, 0.0) / count)
        recent.clear()  # one pair a stretch of drafting steps: later plain steps would repeat it
        if len(costs) >= STEPS_TIMED:
            self.timed_draft_cost[index] = statistics.median(costs)

    def forget_step_times(self) -> None:
        """Drop the steps timed so far: the steps from now on run otherwise (compiled)."""
        self.drafting_seconds.clear()
        self.draft_costs.clear()
        self.timed_draft_cost.clear()

    def observe(
        self, drafted: int, accepted: list[int], rows: list[DraftChecks] | None = None, kept: list[int] | None = None
    ) -> None:
        """Count a step's checks: each row (of `rows`' requests) checked its drafts up to the first that failed
        (`drafted` per row), none past the tokens it `kept` (None: accepted + 1; fewer where a constraint cut them)."""
        if drafted == 0:
            return
        for b, count in enumerate(accepted):
            checked = [int(min(count + 1 if kept is None else kept[b], drafted) > depth) for depth in range(self.most)]
            passed = [int(count > depth) for depth in range(self.most)]
            self.passed = [total + p for total, p in zip(self.passed, passed, strict=True)]
            self.checked = [total + c for total, c in zip(self.checked, checked, strict=True)]
            if rows is not None:
                row = rows[b]
                if not row.checked:
                    row.passed, row.checked = [0.0] * self.most, [0.0] * self.most
                row.passed = [ACCEPTANCE_MEMORY * before + p for before, p in zip(row.passed, passed, strict=True)]
                row.checked = [ACCEPTANCE_MEMORY * before + c for before, c in zip(row.checked, checked, strict=True)]
