"""MTP drafting through the paged cache: each draft is what the MTP module run without a cache makes of the row; the
draft count's costs and its choice at several rows."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

import seekstack.infer.speculative as speculative
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.cache import PagedLatentCache
from seekstack.infer.speculative import DraftChecks, DraftCount, StepCosts, measured_step_costs, mtp_drafts
from seekstack.model.transformer import Transformer
from tests.conftest import micro_config
from tests.infer.support import micro_model, tiny_tokenizer


def drafts_without_a_cache(
    model: Transformer, hidden: torch.Tensor, next_ids: torch.Tensor, count: int
) -> tuple[list[int], torch.Tensor]:
    """One row's `count` drafts and their normalised states (count, D), the MTP module run over the whole row each
    time: a draft is read at the position after the row's last, from the module's own output at the last position
    and the embedding of the draft before (the main model's hidden (1, T, D) and next tokens (1, T) before that)."""
    mtp, drafts, states = model.mtp[0], [], []
    for _ in range(count):
        cos, sin = model.rotary(torch.arange(next_ids.shape[1]))
        out, _ = mtp(hidden, model.embed_tokens(next_ids), cos, sin)
        state = mtp.head_input(out[:, -1:])
        draft = model.lm_head(state).argmax(dim=-1)  # (1, 1)
        drafts.append(draft.item())
        states.append(state[0, 0])
        hidden, next_ids = torch.cat((hidden, out[:, -1:]), dim=1), torch.cat((next_ids, draft), dim=1)
    return drafts, torch.stack(states)


@torch.inference_mode()
def test_mtp_drafts_through_the_paged_cache_are_those_of_the_mtp_module_without_a_cache():
    """Rows of 7 and 5 tokens in blocks of 4, 3 drafts each: the follow-up drafts cross into a new block."""
    torch.manual_seed(0)
    model = Transformer(micro_config()).eval()
    rows = [torch.randint(0, 128, (length,)).tolist() for length in (7, 5)]
    pending, count, width = [11, 13], 3, 7  # the token each row samples next; drafts per row; the longest row
    cache = PagedLatentCache(model.config, num_blocks=16, block_size=4)
    for name, row in zip("ab", rows, strict=True):
        cache.allocate(name, len(row) + count)
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    positions = cache.plan(["a", "b"], [0, 0], [len(row) for row in rows], width, lookahead=count - 1)
    hidden = model(input_ids, cache=cache, positions=positions).hidden_states
    padded = [row[1:] + [token] + [0] * (width - len(row)) for row, token in zip(rows, pending, strict=True)]
    next_ids = torch.tensor(padded)  # each row's tokens one position on
    last = torch.tensor([len(row) - 1 for row in rows])
    states: list[torch.Tensor] = []  # the normalised state of each draft step (B, 1, D)
    hook = model.mtp[0].shared_head["norm"].register_forward_hook(lambda module, inputs, out: states.append(out))
    drafts = mtp_drafts(model, hidden, next_ids, positions, last, cache, count)
    hook.remove()
    for b, row in enumerate(rows):
        expected, expected_states = drafts_without_a_cache(
            model, hidden[b : b + 1, : len(row)], next_ids[b : b + 1, : len(row)], count
        )
        assert drafts[b].tolist() == expected
        torch.testing.assert_close(torch.stack([state[b, 0] for state in states]), expected_states, atol=1e-5, rtol=0)


def test_sixteen_rows_whose_measured_costs_promise_under_the_margin_at_the_prior_decode_plainly():
    """The demo model's costs measured at 16 rows (bench/speculative.py's start, AVX512 VM: a draft 0.40 of a plain
    step, verifying 1/2/3 drafts 1.16/1.31/1.35) promise 1.22x for 2 drafts at the prior; that batch then drafted
    and decoded at 0.78x plain, so it stays plain (no draft, no MTP cache fill), while one row drafts the most."""
    costs = StepCosts([1, 16], [0.40, 0.40], [[1.0, 1.16, 1.31, 1.35]] * 2)
    count = DraftCount(micro_config(num_hidden_layers=4), 3, True, torch.device("cpu"), costs)
    assert count.choose([DraftChecks() for _ in range(16)]) == 0
    assert count.choose([DraftChecks()]) == 3


@torch.inference_mode()
def test_the_step_costs_take_every_turn_on_one_thread_however_slow_the_wall_clock(monkeypatch):
    """Another process's load stretches the wall clock (here 10 s between any two readings), not one thread's CPU
    time: all 5 timed turns and the warm-up run (a wall-clock budget stopped after one timed turn), 2 forwards each."""
    model = Transformer(micro_config()).eval()
    wall = iter(range(0, 10**6, 10))
    monkeypatch.setattr(
        speculative, "time", SimpleNamespace(perf_counter=lambda: next(wall), thread_time=time.thread_time)
    )
    forwards = []
    model.register_forward_hook(lambda module, inputs, out: forwards.append(1))
    measured_step_costs(model, None, most=1, max_batch=1, repeats=5)  # one thread: a step this small runs on one
    assert len(forwards) == 6 * 2


def test_a_plain_step_of_a_speculative_engine_gathers_the_keys_of_a_plain_engines_step(tmp_path, monkeypatch):
    """4 rows whose drafts do not pay: every one-token step plans the cache as an engine without MTP does, with no
    keys gathered past its rows (it gathered a speculative step's lookahead, draft_tokens - 1, masked)."""
    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    batch = [list(range(5, 5 + n)) for n in (3, 6, 9, 12)]
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    dear_drafts = StepCosts([1, 4], [0.3, 0.3], [[1.0, 3.0, 5.0, 7.0]] * 2)
    monkeypatch.setattr("seekstack.infer.engine.measured_step_costs", lambda *args: dear_drafts)
    lookaheads = {}
    for name, speculation in (("plain", {}), ("speculative", {"speculative": True, "draft_tokens": 3})):
        engine = Engine(model, tokenizer, max_batch_size=4, **speculation)

        def recording_plan(ids, starts, counts, width, lookahead=0, plan=engine.cache.plan, name=name):
            if width == 1:
                lookaheads.setdefault(name, []).append(lookahead)
            return plan(ids, starts, counts, width, lookahead)

        engine.cache.plan = recording_plan
        engine.generate(batch, params)
    assert lookaheads["speculative"] == lookaheads["plain"] == [0] * 5


def test_a_prompt_chunk_that_finishes_no_prompt_fills_the_mtp_cache_without_drafting(tmp_path, monkeypatch):
    """A 20-token prompt in chunks of 8: the first two chunks enter the MTP layer's cache and draft nothing (they
    drafted 3 each, dropped, as no row of theirs had a token to draft after); the last drafts 3, and the tokens stay
    plain greedy decoding's."""
    import seekstack.infer.engine as engine_module

    model, tokenizer = micro_model(), tiny_tokenizer(tmp_path)
    prompt, params = list(range(5, 25)), SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    plain = Engine(model, tokenizer, prefill_chunk=8).generate([prompt], params)[0].token_ids
    prefill_counts: list[int] = []

    def recording_drafts(*arguments, drafts=engine_module.mtp_drafts):
        prefill_counts.append(arguments[6])  # count: the eager prefill's calls (decode steps call _greedy_speculation)
        return drafts(*arguments)

    monkeypatch.setattr(engine_module, "mtp_drafts", recording_drafts)
    engine = Engine(model, tokenizer, prefill_chunk=8, speculative=True, draft_tokens=3, adaptive_drafts=False)
    assert engine.generate([prompt], params)[0].token_ids == plain
    assert prefill_counts == [0, 0, 3]


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on the traced step
@pytest.mark.parametrize(
    ("temperature", "compiled_calls"),
    [(0.0, ("_greedy_speculation",)), (0.8, ("_decode_model", "_decode_drafts"))],
    ids=["greedy", "sampled"],
)
def test_a_compiled_speculative_step_skips_the_guard_check_as_a_plain_step_does(
    tmp_path, monkeypatch, temperature, compiled_calls
):
    """A compiled plain step whose input shape was guarded skips dynamo's guard check (`Engine._unguarded`), and so
    do now a speculative step's compiled calls whose shapes and draft count were: greedy, the verification and the
    next drafts in one call; sampled, the verification and then the drafts. They ran every step guarded (demo
    checkpoint, batch 1, 3 drafts: a compiled greedy speculative engine 1.07x a compiled plain one where the plain
    one skipped). The tokens stay eager decoding's."""
    from torch._dynamo import eval_frame

    import seekstack.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "_compiled", lambda f: torch.compile(f, dynamic=True, backend="eager"))
    model, tokenizer = micro_model(num_hidden_layers=1), tiny_tokenizer(tmp_path)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=3, ignore_eos=True)
    eager, compiled = (
        Engine(model, tokenizer, max_batch_size=1, speculative=True, draft_tokens=2, adaptive_drafts=False, compile=on)
        for on in (False, True)
    )
    skipped: list[bool] = []  # whether each compiled call of a decode step ran with the check skipped

    def recording(call):
        def run(*args, **kwargs):
            skipped.append(eval_frame._stance.skip_guard_eval_unsafe)
            return call(*args, **kwargs)

        return run

    for name in compiled_calls:
        setattr(compiled, name, recording(getattr(compiled, name)))
    prompt = [[5, 6, 7, 8]]
    [expected] = [completion.token_ids for completion in eager.generate(prompt, params)]
    assert [completion.token_ids for completion in compiled.generate(prompt, params)] == [expected]
    assert not any(skipped[: len(compiled_calls)])  # the first step of its shapes and count is guarded
    guarded_run = len(skipped)
    assert [completion.token_ids for completion in compiled.generate(prompt, params)] == [expected]
    assert len(skipped) > guarded_run and all(skipped[guarded_run:])  # every call: was none
