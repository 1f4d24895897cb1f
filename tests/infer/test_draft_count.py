"""The adaptive draft count of speculative decoding: acceptance bookkeeping, the choice, and an engine using it."""

from __future__ import annotations

import itertools

import pytest
import torch

from seekstack.infer import Engine, SamplingParams
from seekstack.infer.engine import MAX_DRAFT_TOKENS
from seekstack.infer.speculative import (
    PRIOR_ACCEPTANCE,
    PROBE_EVERY,
    STEP_WINDOW,
    STEPS_TIMED,
    UNEVEN_FINISH_GAIN,
    DraftChecks,
    DraftCount,
    StepCosts,
    measured_step_costs,
)
from tests.conftest import micro_config
from tests.infer.support import micro_model, tiny_tokenizer

CPU = torch.device("cpu")
UNLOADED_MICRO_MODEL_COSTS = StepCosts([1, 2], [0.5, 0.5], [[1.0, 1.0, 1.1, 1.1]] * 2)  # as an idle CPU measures them


def draft_count(*rates: float, adaptive: bool = True, layers: int = 4) -> DraftCount:
    """Six drafts at most, each depth measured at its rate in `rates` (the last one for the deeper depths)."""
    count = DraftCount(micro_config(num_hidden_layers=layers), 6, adaptive, CPU)
    rates = rates + rates[-1:] * (6 - len(rates))
    count.passed, count.checked = [rate * 1e6 for rate in rates], [1e6] * 6
    return count


def rows(batch: int) -> list[DraftChecks]:
    """`batch` requests without checks of their own: the engine's rates are theirs."""
    return [DraftChecks() for _ in range(batch)]


def given_step_costs(monkeypatch, given: StepCosts) -> None:
    """Engines made from here on take `given` for the step costs they would measure: a measurement on a busy machine
    can find drafting too dear, and an engine that never drafts checks nothing of what a test asks of drafting."""
    monkeypatch.setattr("seekstack.infer.engine.measured_step_costs", lambda *args: given)


def test_each_row_checks_its_drafts_up_to_the_first_that_fails():
    count = DraftCount(micro_config(), 3, True, CPU)
    count.observe(3, [3, 0, 1])  # all passed (3 checks); the first failed (1); one passed, the next failed (2)
    assert (count.passed, count.checked) == ([2, 1, 1], [3, 2, 1])
    count.observe(0, [0, 0])  # a step without drafts checks nothing
    assert (count.passed, count.checked) == ([2, 1, 1], [3, 2, 1])


def test_each_request_follows_its_own_checks_from_the_engines_rates():
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU)
    passing, failing = DraftChecks(), DraftChecks()
    for _ in range(30):
        count.observe(3, [3], [passing])
    for _ in range(30):
        count.observe(3, [0], [failing])  # this request's drafts all fail
    assert count.acceptance()[0] == pytest.approx((30 + 2 * PRIOR_ACCEPTANCE) / 62)  # every step alike
    assert count.acceptance(failing)[0] < 0.1 and count.acceptance(passing)[0] > 0.9  # each from its own checks
    assert count.choose([failing]) == 0
    assert count.choose([DraftChecks()]) == 3  # the next request starts from the engine's rates: drafts again
    assert count.choose([failing, failing]) == 0
    assert count.choose([failing, passing]) == 1  # rows expect ~1 and ~2 tokens from a draft: it pays


def costs(draft: float, verify: list[float], batches: tuple[int, ...] = (1,)) -> StepCosts:
    """The same costs at every batch size in `batches`: a draft's, and verifying 1, 2, ... drafts per row."""
    return StepCosts(list(batches), [draft] * len(batches), [[1.0, *verify]] * len(batches))


def test_the_draft_cost_given_decides_how_many_drafts_pay():
    """At 60% acceptance per depth three drafts pay when a draft costs 0.1 of a plain step, one when it costs 0.5."""
    counts = {
        cost: DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU, costs(cost, [1.0] * 3)) for cost in (0.1, 0.5)
    }
    for count in counts.values():
        count.passed, count.checked = [0.6e6] * 3, [1e6] * 3
    assert counts[0.1].choose(rows(1)) == 3 and counts[0.5].choose(rows(1)) == 1


@pytest.mark.parametrize(("verify_three", "expected"), [(1.2, 3), (4.0, 0)])
def test_the_measured_verification_cost_decides_whether_a_busy_batch_drafts(verify_three, expected):
    """4 rows at 80% acceptance: when verifying 4x the tokens costs 1.2 plain steps, three drafts pay; when it costs 4,
    none do and the steps are plain."""
    measured = costs(0.3, [1 + (verify_three - 1) / 3 * g for g in (1, 2, 3)], batches=(1, 2, 4, 8))
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU, measured)
    count.passed, count.checked = [0.8e6] * 3, [1e6] * 3
    assert count.choose(rows(4)) == expected


def test_each_batch_size_takes_the_costs_measured_at_the_next_size_up():
    measured = StepCosts([1, 4, 16], [0.2, 0.3, 0.4], [[1.0, 1.1], [1.0, 1.5], [1.0, 2.0]])
    assert [measured.at(batch)[0] for batch in (1, 2, 4, 5, 16, 64)] == [0.2, 0.3, 0.3, 0.4, 0.4, 0.4]
    count = DraftCount(micro_config(), 1, True, CPU, measured)
    assert count.speedup(1, 3) == pytest.approx((1 + PRIOR_ACCEPTANCE) / (0.3 + 1.5))


def timed_pairs(count: DraftCount, drafts: int, drafting_seconds: float, plain_seconds: float, pairs: int) -> None:
    """`pairs` times: STEPS_TIMED steps of `drafts` drafts at one row, then a plain one, each of the seconds given."""
    for _ in range(pairs):
        for _ in range(STEPS_TIMED):
            count.observe_step(1, drafts, drafts, drafting_seconds)
        count.observe_step(1, 0, 0, plain_seconds)


def test_the_count_follows_the_draft_cost_the_steps_taken_show_not_the_one_measured_at_start_up():
    """At 70% acceptance per depth, a start-up that read a draft at 0.6 of a plain step (a busy machine) picks one
    draft; plain steps of 3.0 s after three-draft steps of 4.2 s (a draft 0.13 of a plain step) pick three; once
    three-draft steps take 7.5 s (0.5), two."""
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU, costs(0.6, [1.0] * 3))
    count.passed, count.checked = [0.7e6] * 3, [1e6] * 3
    assert count.choose(rows(1)) == 1
    timed_pairs(count, 3, 4.2, 3.0, pairs=STEPS_TIMED)
    assert count.speedup(3, 1) == pytest.approx((1 + 0.7 + 0.7**2 + 0.7**3) / (4.2 / 3.0))  # 1 + 3 c plain steps
    assert count.choose(rows(1)) == 3
    timed_pairs(count, 3, 7.5, 3.0, pairs=STEP_WINDOW // 2 + 1)
    assert count.choose(rows(1)) == 2


def test_a_lone_row_probes_drafts_its_start_up_read_too_dear_and_drafts_once_its_steps_show_them_cheap():
    """A start-up that read a draft at 1.5 plain steps (a busy machine: no count pays even at the prior) kept a lone
    row's steps plain for good, its probes included; the probes now draft, and once their steps time a draft at 0.3
    of a plain step, the most drafts pay."""
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU, costs(1.5, [1.0] * 3))
    assert max(count.choose(rows(1)) for _ in range(PROBE_EVERY)) == 1
    timed_pairs(count, 1, 1.3, 1.0, pairs=STEPS_TIMED)
    assert count.choose(rows(1)) == 3


def test_a_draft_is_timed_by_plain_steps_against_the_drafting_steps_just_before_them():
    """A draft's cost c is timed from (the median of the last STEPS_TIMED steps drafting g / a plain step's seconds - 1)
    / g, one pair a stretch of drafting steps, steps between two counts counting for neither; it decides once
    STEPS_TIMED pairs give it (their median), each batch size of StepCosts its own."""
    count = DraftCount(micro_config(), 3, True, CPU, costs(0.5, [1.1, 1.2, 1.3], batches=(1, 4)))
    count.observe_step(1, 0, 0, 1.0)  # no drafting steps before it: nothing to pair
    for seconds in (2.0, 40.0, 2.2, 2.4):  # the last three count, one slowed by something else
        count.observe_step(1, 2, 2, seconds)
    count.observe_step(1, 2, 0, 9.0)  # verified 2, drafted none: neither count's cost
    count.observe_step(1, 0, 0, 2.0)
    count.observe_step(1, 0, 0, 1.0)  # the drafting steps are paired already
    assert list(count.draft_costs[0]) == [pytest.approx((2.4 / 2.0 - 1) / 2)]
    assert count.step_cost(2, 1) == pytest.approx(1.2 + 2 * 0.5)  # one pair: the start-up costs still decide
    timed_pairs(count, 1, 1.5, 1.0, pairs=2)
    assert count.timed_draft_cost == {0: pytest.approx(0.5)}  # the median of 0.1, 0.5, 0.5
    assert count.step_cost(2, 1) == pytest.approx(1 + 2 * 0.5)
    assert count.step_cost(2, 4) == pytest.approx(1.2 + 2 * 0.5)  # batch 4 has timed nothing


def test_while_drafting_two_steps_in_so_many_draft_none_so_that_plain_steps_stay_timed():
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU)
    count.passed, count.checked = [0.95e6] * 3, [1e6] * 3  # the most drafts pay
    choices = [count.choose(rows(1)) for _ in range(2 * PROBE_EVERY)]
    plain = [step for step, choice in enumerate(choices) if choice == 0]
    assert plain == [PROBE_EVERY - 2, PROBE_EVERY - 1, 2 * PROBE_EVERY - 2, 2 * PROBE_EVERY - 1]
    assert set(choices) == {0, 3}


def counting_clock(seconds_a_reading: float = 1.0):
    """A step clock that moves `seconds_a_reading` at each reading: a step timed between two readings took that."""
    readings = itertools.count()
    return lambda device: lambda: next(readings) * seconds_a_reading


def test_a_speculative_engine_times_its_decode_steps_on_the_step_clock_but_not_those_that_compiled(
    tmp_path, monkeypatch
):
    """Drafts of 2 for the prompt and 4 steps, then none: the engine hands the steps' seconds on its step clock (0.25 s
    a step here) to the count, which times a draft at 0 from the plain step after them; steps that compiled a graph
    are not timed."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    monkeypatch.setattr("seekstack.infer.engine.step_clock", counting_clock(0.25))
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    for compiling in (False, True):
        engine = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=True, max_batch_size=2)
        script = itertools.chain([2] * 5, itertools.repeat(0))
        monkeypatch.setattr(engine.draft_count, "choose", lambda rows, script=script: next(script))
        if compiling:
            graphs = itertools.count()  # every step compiles a graph
            monkeypatch.setattr("seekstack.infer.engine._graphs_compiled", graphs.__next__)
        engine.generate([[5, 6, 7]], params)
        expected = {} if compiling else {0: [0.0]}
        assert {index: list(costs) for index, costs in engine.draft_count.draft_costs.items()} == expected


def test_a_draft_count_past_the_most_is_refused_before_the_engine_times_its_steps(tmp_path):
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=f"draft_tokens={MAX_DRAFT_TOKENS + 1}: at most {MAX_DRAFT_TOKENS}"):
        Engine(model, tokenizer, speculative=True, draft_tokens=MAX_DRAFT_TOKENS + 1)


def test_measured_costs_draft_cheaper_against_a_deeper_model_and_verify_a_tiny_one_almost_free():
    """The costs an adaptive engine starts with, relative to a plain cached step of as many rows: a draft (one MTP block
    and the head) costs less the more blocks the model has; a forward over more tokens costs no less, and on a model
    this small (its fixed costs dominate) 4 rows of 4 tokens cost far less than 4 forwards (the modelled 4.0)."""
    shallow = measured_step_costs(micro_model(num_hidden_layers=1), None, 3, 4, repeats=3)
    deep = measured_step_costs(micro_model(num_hidden_layers=8), None, 3, 4, repeats=3)
    assert shallow.batches == deep.batches == [1, 2, 4]
    assert all(d < 0.5 < s for d, s in zip(deep.draft, shallow.draft, strict=True))
    assert all(verify[0] == 1.0 and verify == sorted(verify) for verify in deep.verify + shallow.verify)
    assert deep.at(4)[1][3] < 2.0


def test_an_adaptive_engine_drafts_in_a_busy_batch_only_where_it_measured_verification_cheap(tmp_path, monkeypatch):
    """The engine's measurement, here replaced by given costs, decides: verifying 4x the tokens for 1.01 plain steps,
    4 rows draft (and keep plain greedy's tokens); for 4 plain steps, they do not."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    batch = [list(range(5, 5 + n)) for n in (3, 6, 9, 12)]
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    plain = [c.token_ids for c in Engine(model, tokenizer).generate(batch, params)]
    drafted = {}
    for verify_three in (1.01, 4.0):
        measured = costs(0.05, [1 + (verify_three - 1) * g / 3 for g in (1, 2, 3)], batches=(1, 2, 4))
        given_step_costs(monkeypatch, measured)
        engine = Engine(model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=True, max_batch_size=4)
        assert [c.token_ids for c in engine.generate(batch, params)] == plain
        drafted[verify_three] = engine.stats().spec_drafted
    assert drafted[1.01] > 0 and drafted[4.0] == 0


def test_a_depth_without_checks_takes_the_rate_of_the_depth_before():
    count = DraftCount(micro_config(), 3, True, CPU)
    assert count.acceptance() == [PRIOR_ACCEPTANCE] * 3  # nothing measured: the prior
    assert count.choose(rows(1)) == 3  # a fresh engine drafts the most
    for _ in range(50):
        count.observe(1, [1])  # depth 1 always passes; depths 2 and 3 are never drafted
    rates = count.acceptance()
    assert rates[0] > 0.9 and rates[0] == rates[1] == rates[2]


def test_the_expected_speedup_follows_leviathan_et_al_with_a_rate_per_depth():
    count = draft_count(0.8)  # 4 layers: a draft costs 1.5 / 5 of a forward
    assert count.speedup(0, 1) == count.speedup(0, 16) == 1.0  # a step without drafts is a plain step
    assert count.speedup(2, 1) == pytest.approx((1 + 0.8 + 0.64) / (2 * 0.3 + 1))
    # 16 rows verifying 3 tokens each: 48 tokens cost 48 / 16 = 3 forwards of 16.
    assert count.speedup(2, 16) == pytest.approx((1 + 0.8 + 0.64) / (2 * 0.3 + 3))
    # Draft 2 reached in 0.9 of the steps passes half the time: 1 + 0.9 + 0.9 * 0.5 tokens.
    assert draft_count(0.9, 0.5).speedup(2, 1) == pytest.approx((1 + 0.9 + 0.45) / (2 * 0.3 + 1))


def test_more_drafts_when_they_are_accepted_none_when_they_are_not_or_the_batch_is_busy():
    assert [draft_count(rate).choose(rows(1)) for rate in (0.1, 0.5, 0.83, 0.95)] == [0, 1, 3, 3]
    # 1 and 2 drafts at 0.6 expect 1.231x and 1.225x: within NEAR_BEST, the more drafts win.
    assert draft_count(0.6).choose(rows(1)) == 2
    assert draft_count(0.95).choose(rows(2)) == 1  # 2 rows verify 2 tokens each for free, 3 each cost more
    assert draft_count(0.95).choose(rows(4)) == 0  # verifying would widen all 4 rows: plain steps
    assert draft_count(0.1, adaptive=False).choose(rows(16)) == 6  # fixed: always the most


def test_a_weak_depth_is_not_drafted_though_the_depths_before_it_pass():
    assert draft_count(0.9, 0.9, 0.9).choose(rows(1)) >= 3
    assert draft_count(0.9, 0.9, 0.3).choose(rows(1)) == 2  # the third draft rarely passes: two a step


def test_with_drafts_off_a_few_steps_in_so_many_draft_once_to_measure_acceptance_and_a_drafts_cost_again():
    """STEPS_TIMED + 1 steps in a row: the first makes the drafts the rest verify, and the plain step after them times
    a draft against them (`observe_step`); a start-up that read drafts too dear then does not keep them off."""
    count = draft_count(0.05)
    choices = [count.choose(rows(1)) for _ in range(2 * PROBE_EVERY)]
    probe = list(range(PROBE_EVERY - STEPS_TIMED - 1, PROBE_EVERY))
    assert [step for step, choice in enumerate(choices) if choice] == probe + [step + PROBE_EVERY for step in probe]
    assert set(choices) == {0, 1}  # plain steps in between


def test_below_the_most_one_step_in_so_many_drafts_one_more_to_measure_the_next_depth():
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, CPU)  # a draft costs 1.5 / 5 of a forward
    for _ in range(200):  # depth 1 passes 2 times in 5: one draft a step, depth 2 never measured
        for accepted in (1, 1, 0, 0, 0):
            count.observe(1, [accepted])
    choices = []
    for _ in range(6 * PROBE_EVERY):  # the probes find depths 2 and 3 passing whenever depth 1 did
        drafted = count.choose(rows(1))
        choices.append(drafted)
        for step in range(5):
            count.observe(drafted, [drafted if step < 2 else 0])
    drafting = [choice for choice in choices if choice > 0]  # not the plain steps taken to time them
    assert drafting[: PROBE_EVERY - 1] == [1] * (PROBE_EVERY - 1) and drafting[PROBE_EVERY - 1] == 2
    assert drafting[-1] == 3 and count.acceptance()[1] > 0.8


def test_adaptive_engine_gives_plain_greedy_tokens_and_stops_drafting_what_is_rejected(tmp_path, monkeypatch):
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    given_step_costs(monkeypatch, UNLOADED_MICRO_MODEL_COSTS)  # alone, drafting pays at first
    batch = [list(range(5, 5 + n)) for n in (7, 15)]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    plain = [c.token_ids for c in Engine(model, tokenizer).generate(batch, params)]
    fixed = Engine(model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=False)
    adaptive = Engine(model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=True)
    assert [c.token_ids for c in fixed.generate(batch, params)] == plain
    assert [c.token_ids for c in adaptive.generate(batch, params)] == plain
    assert [adaptive.generate([prompt], params)[0].token_ids for prompt in batch] == plain  # each alone: it drafts
    # The random MTP module's drafts are rejected: the adaptive engine's estimate falls below 1/2 and it
    # soon drafts (almost) nothing.
    assert adaptive.draft_count.acceptance()[0] < 0.5
    assert adaptive.stats().spec_drafted < fixed.stats().spec_drafted / 3


def test_a_seeded_request_samples_the_plain_engines_tokens_whatever_the_draft_count(tmp_path):
    """A seeded request's n-th token takes its n-th number, drafts or none (`accept_drafts`), so the adaptive count
    drafts for it as for any other request: it kept to the most drafts, where sampled drafts rarely pay."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=20, seed=7, ignore_eos=True)
    expected = Engine(model, tokenizer).generate([[5, 6, 7]], params)[0].token_ids
    fixed = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=False)
    adaptive = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=True)
    adaptive.draft_count.passed, adaptive.draft_count.checked = [0.0] * 2, [1000.0] * 2  # alone: drafts off
    assert fixed.generate([[5, 6, 7]], params)[0].token_ids == expected
    assert adaptive.generate([[5, 6, 7]], params)[0].token_ids == expected
    assert adaptive.stats().spec_drafted < fixed.stats().spec_drafted / 3


def test_a_busy_batch_of_the_adaptive_engine_decodes_as_the_plain_engine_does(tmp_path):
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    batch = [list(range(5, 5 + n)) for n in (3, 6, 9, 12)]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)
    plain = Engine(model, tokenizer).generate(batch, params)
    adaptive = Engine(model, tokenizer, speculative=True, draft_tokens=3, adaptive_drafts=True)
    adaptive.draft_count.costs = costs(0.3, [2.0, 3.0, 4.0], batches=(1, 4))  # 4 rows: every verified token costs
    outputs = adaptive.generate(batch, params)
    assert [c.token_ids for c in outputs] == [c.token_ids for c in plain]
    logprobs = [[entry.logprob for entry in c.logprobs] for c in outputs]
    assert logprobs == [pytest.approx([entry.logprob for entry in c.logprobs], abs=1e-5) for c in plain]
    assert adaptive.stats().spec_drafted == 0


def test_at_several_rows_a_batch_size_drafts_only_where_drafts_at_the_prior_promise_the_margin():
    """One draft at the prior (85%) expects 1.85 tokens for 1.6 plain steps (1.16x): drafted at 1 row, at 2 not at
    all (UNEVEN_FINISH_GAIN), however well its rows' drafts pass, and the MTP cache is not filled."""
    count = DraftCount(micro_config(num_hidden_layers=4), 1, True, CPU, costs(0.3, [1.3], batches=(1, 2)))
    prior = [[PRIOR_ACCEPTANCE]]
    assert count.speedup(1, 2, prior) == pytest.approx(1.85 / 1.6) and 1 < 1.85 / 1.6 < UNEVEN_FINISH_GAIN
    assert count.choose(rows(1)) == 1
    count.passed, count.checked = [1e6], [1e6]
    assert count.choose(rows(2)) == 0


def test_at_several_rows_drafts_timed_cheap_do_not_lift_the_margin_found_against_the_start_up_costs():
    """UNEVEN_FINISH_GAIN was found against what the start-up costs promise: 2 rows whose start-up costs promise 1.16x
    at the prior stay plain though their steps time a draft at 0.1 of a plain step (1.68x at the prior)."""
    count = DraftCount(micro_config(num_hidden_layers=4), 1, True, CPU, costs(0.3, [1.3], batches=(1, 2)))
    count.passed, count.checked = [1e6], [1e6]
    for _ in range(STEPS_TIMED):
        for _ in range(STEPS_TIMED):
            count.observe_step(2, 1, 1, 1.1)
        count.observe_step(2, 0, 0, 1.0)
    assert count.timed_draft_cost == {1: pytest.approx(0.1)}
    assert count.choose(rows(2)) == 0


def recording(function, calls: list[int]):
    """`function`, still run, with each call noted in `calls`: a step that should not call it fails on `calls`, not
    on a stand-in's return value."""
    return lambda *args, **kwargs: calls.append(1) or function(*args, **kwargs)


def test_where_drafting_is_off_a_speculative_engines_steps_are_plain_ones(tmp_path, monkeypatch):
    """4 rows whose drafts would not pay even at the prior: after the prefill's drafts are verified, every step is a
    plain step (no MTP call, the same tokens as an engine without speculation)."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    batch = [list(range(5, 5 + n)) for n in (3, 6, 9, 12)]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    plain = [c.token_ids for c in Engine(model, tokenizer).generate(batch, params)]
    engine = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=True, max_batch_size=4)
    engine.draft_count.costs = costs(0.3, [3.0, 5.0], batches=(1, 4))
    mtp_calls = []
    for name in ("_decode_drafts", "_greedy_speculation"):
        monkeypatch.setattr(engine, name, recording(getattr(engine, name), mtp_calls))
    assert [c.token_ids for c in engine.generate(batch, params)] == plain
    assert mtp_calls == [] and engine.stats().spec_drafted == 0


def test_a_sampled_speculative_request_runs_on_when_the_count_turns_drafts_off(tmp_path):
    """An unseeded sampled request alone on an adaptive engine whose drafts all fail: steps without drafts accept
    none and draw one token (they raised on an empty list of checks, ending the request with an error)."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    engine = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=True)
    engine.draft_count.passed, engine.draft_count.checked = [0.0] * 2, [1000.0] * 2  # drafts off from the start
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    output = engine.generate([[5, 6, 7]], params)[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 12


def test_a_lone_request_whose_drafts_do_not_pay_decodes_with_plain_steps(tmp_path, monkeypatch):
    """Alone, a request whose drafts fail (a sampled one at a high temperature: its drafts pass with the probability
    of the model's top token) took steps without drafts that still ran the MTP block over the new token, half a
    draft's cost a step: 0.78x plain sampling on the demo checkpoint. Now those steps are plain ones."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    params = SamplingParams(max_new_tokens=PROBE_EVERY - STEPS_TIMED - 2, temperature=1.0, seed=3, ignore_eos=True)
    expected = Engine(model, tokenizer).generate([[5, 6, 7]], params)[0].token_ids
    engine = Engine(model, tokenizer, speculative=True, draft_tokens=2, adaptive_drafts=True)
    engine.draft_count.passed, engine.draft_count.checked = [0.0] * 2, [1000.0] * 2  # drafts off from the start
    mtp_calls = []
    monkeypatch.setattr(engine, "_decode_drafts", recording(engine._decode_drafts, mtp_calls))
    assert engine.generate([[5, 6, 7]], params)[0].token_ids == expected
    assert mtp_calls == [] and engine.stats().spec_drafted == 0
