"""The engine bridge: a request group closed by a client that left says which of its choices the engine had not
started yet, so a request that never left the queue is not billed for its prompt, and hands over the outputs
generated before the abort that nobody read, so their tokens are billed."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from seekstack.infer import Engine, SamplingParams
from seekstack.infer.outputs import EngineStats
from seekstack.serve.bridge import AsyncEngine, EngineFailure
from seekstack.serve.metrics import ServerMetrics
from tests.infer.support import micro_model, tiny_tokenizer


def test_closing_a_group_names_the_choices_still_queued(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path), max_batch_size=1)  # one running request at a time
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[set[int], set[int], set[int]]:
        running = await bridge.submit([[5, 6, 7]], [long])
        await anext(aiter(running))  # its first token: it runs, and holds the only slot
        queued = await bridge.submit([[8, 9], [8, 9]], [long, long])  # two choices waiting behind it
        left_queued = (await queued.close()).unstarted
        left_running = (await running.close()).unstarted
        return left_queued, left_running, (await running.close()).unstarted

    bridge.start()
    try:
        left_queued, left_running, closed_twice = asyncio.run(scenario())
    finally:
        bridge.stop()
    assert left_queued == {0, 1}  # never started: their prompt was never computed
    assert left_running == set() and closed_twice == set()
    assert not engine.has_unfinished()


def test_closing_a_group_hands_over_the_outputs_generated_before_the_abort_that_nobody_read(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[int, list[tuple[int, int]]]:
        group = await bridge.submit([[5, 6, 7], [5, 6, 7]], [long, long])
        await anext(aiter(group))  # one output read; then the reader stops, as a client that hangs up
        while group.queue.qsize() < 10:
            await asyncio.sleep(0.01)
        closed = await group.close()
        return closed, [(index, output.completion_tokens) for index, output in closed.unread]

    bridge.start()
    try:
        closed, unread = asyncio.run(scenario())
    finally:
        bridge.stop()
    generated = bridge.metrics.registry.get_sample_value("seekstack:generation_tokens_total", {"model_name": "micro"})
    assert closed.unstarted == set() and len(unread) >= 9  # was: dropped with the group's queue
    last = {index: tokens for index, tokens in unread}  # each output carries its choice's tokens so far
    assert sorted(last) == [0, 1] and sum(last.values()) == generated


def test_a_prompt_computed_in_a_step_whose_output_an_abort_dropped_is_counted_and_measured_with_its_call(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))  # its thread not started: the steps are taken here
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> set[int]:
        submitting = asyncio.ensure_future(bridge.submit([[5, 6, 7, 8], [9, 10]], [long, long]))
        await asyncio.sleep(0)  # its requests handed to the engine thread
        bridge._apply_adds()
        group = await submitting
        engine.step()  # the prompts computed, their first tokens made; then the client leaves before they are routed
        closing = asyncio.ensure_future(group.close())
        await asyncio.sleep(0)  # its abort handed to the engine thread
        bridge._apply_aborts()
        return (await closing).unstarted

    unstarted = asyncio.run(scenario())

    def sample(name: str, **labels: str) -> float:
        return bridge.metrics.registry.get_sample_value("seekstack:" + name, {"model_name": "micro", **labels})

    assert unstarted == set()  # started: the ledger bills both prompts
    assert sample("prompt_tokens_total") == 6  # was: 0, /metrics short of the ledger's prompt tokens
    # the call, ended by the abort, measured with its prompt tokens, as vLLM observes an aborted request's
    assert (sample("request_prompt_tokens_count"), sample("request_prompt_tokens_sum")) == (1, 6)  # was: (1, 0)
    assert sample("request_success_total", finished_reason="abort") == 1


def test_preemptions_reach_the_metrics_as_vllms_num_preemptions(tmp_path):
    # 16 usable blocks of 4 tokens: the four prompts fit, but not their 24-token completions beside them
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path), block_size=4, num_blocks=17)
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    long = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    prompts = [[5 + i] * length for i, length in enumerate((9, 14, 5, 11))]

    async def scenario() -> None:
        group = await bridge.submit(prompts, [long] * 4)
        async for _ in group:
            pass

    bridge.start()
    try:
        asyncio.run(scenario())
    finally:
        bridge.stop()
    preempted = bridge.metrics.registry.get_sample_value("seekstack:num_preemptions_total", {"model_name": "micro"})
    assert engine.preemptions > 0 and preempted == engine.preemptions


def test_requests_submitted_during_a_long_step_leave_the_worker_threads_free(tmp_path):
    """/health's and every request's database reads and JSON parsing run on the event loop's worker threads: requests
    waiting for a long step (a long prefill) to end must not hold them, or those wait for the step too."""
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    real_step, stepping, step_over = engine.step, threading.Event(), threading.Event()

    def long_step():
        with engine.lock:
            if not step_over.is_set():  # the first step lasts until the test has probed the workers (at most 5 s)
                stepping.set()
                step_over.wait(5)
                step_over.set()
            return real_step()

    engine.step = long_step
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    short = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)

    async def scenario() -> bool:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))  # two worker threads
        groups = [await bridge.submit([[5, 6, 7]], [short])]
        await asyncio.to_thread(stepping.wait)
        arriving = [asyncio.create_task(bridge.submit([[8, 9]], [short])) for _ in range(3)]  # more than the workers
        await asyncio.sleep(0.1)
        probed_during_the_step = not await asyncio.to_thread(step_over.is_set)  # as /health reads the keys
        step_over.set()
        groups += await asyncio.gather(*arriving)
        for group in groups:
            async for _ in group:
                pass
        return probed_during_the_step

    bridge.start()
    try:
        assert asyncio.run(scenario())  # was: the workers waited in add_request for the step's lock
    finally:
        bridge.stop()
    assert not engine.has_unfinished()


def test_a_submission_cancelled_before_or_after_the_engine_thread_adds_it_leaves_no_request_running(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))  # its thread not started: its work is done here
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def cancelled(added_first: bool) -> bool:
        submitting = asyncio.ensure_future(bridge.submit([[5, 6, 7]], [long]))
        await asyncio.sleep(0)  # handed to the engine thread
        if added_first:
            bridge._apply_adds()  # added; its caller learns so at the loop's next turn, cancelled by then
        submitting.cancel()  # a stopping server
        bridge._apply_adds()
        await asyncio.sleep(0)  # the engine thread's answer
        bridge._apply_aborts()
        engine.step()  # reports the abort, if any
        return engine.has_unfinished()

    assert asyncio.run(cancelled(added_first=False)) is False  # never added
    assert asyncio.run(cancelled(added_first=True)) is False  # added, then closed


def test_every_finish_reason_is_scraped_from_zero_before_its_first_request():
    """As vLLM's: a series that first appears at 1 is missed by Prometheus' increase() and rate()."""
    metrics = ServerMetrics("micro", 64)
    counts = {
        reason: metrics.registry.get_sample_value(
            "seekstack:request_success_total", {"model_name": "micro", "finished_reason": reason}
        )
        for reason in ("stop", "length", "abort", "error")
    }
    assert counts == {"stop": 0, "length": 0, "abort": 0, "error": 0}  # was: no sample until one finished so


def test_requests_a_failed_step_ends_are_counted_as_finished_by_an_error(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    real_step, steps = engine.step, []

    def step_failing_third():
        steps.append(None)
        if len(steps) == 3:
            raise RuntimeError("injected failure")
        return real_step()

    engine.step = step_failing_third
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> None:
        group = await bridge.submit([[5, 6, 7], [8, 9]], [long, long])  # one call of two choices
        with pytest.raises(EngineFailure):
            async for _ in group:
                pass
        await group.close()  # as the server closes it: once the engine thread has handed over every failure

    bridge.start()
    try:
        asyncio.run(scenario())
    finally:
        bridge.stop()
    sample = bridge.metrics.registry.get_sample_value
    labels = {"model_name": "micro"}
    assert sample("seekstack:request_success_total", {**labels, "finished_reason": "error"}) == 1  # was: 0
    assert sample("seekstack:e2e_request_latency_seconds_count", labels) == 1


@pytest.mark.parametrize("first_step", ["fails", "delivers"])
def test_the_engine_thread_outlives_the_loop_of_a_request_it_still_runs(tmp_path, first_step):
    """A step failing, or delivering, after its caller's loop closed (a server shutting down) must not end the thread:
    the next request is served."""
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    real_step, loop_closed, steps, failures = engine.step, threading.Event(), threading.Semaphore(0), []

    def step():
        loop_closed.wait()  # the first step runs once the loop of the request it runs has closed
        steps.release()
        if first_step == "fails" and not failures:
            failures.append(None)
            raise RuntimeError("injected failure")
        return real_step()

    engine.step = step
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)

    async def submit_and_leave() -> None:
        await bridge.submit([[5, 6, 7]], [greedy])

    async def complete() -> int:
        group = await asyncio.wait_for(bridge.submit([[8, 9]], [greedy]), 30)  # a dead thread never adds it
        return len([output async for _, output in group])

    bridge.start()
    try:
        asyncio.run(submit_and_leave())
        loop_closed.set()
        assert steps.acquire(timeout=30)
        assert asyncio.run(complete()) == 4  # was: TimeoutError, the thread dead ("Event loop is closed")
        assert bridge.alive
    finally:
        bridge.stop()
    assert not engine.has_unfinished()  # the request nobody reads was aborted, not run to its end


def test_the_stats_line_gives_the_throughput_since_the_last_then_one_line_drained_and_nothing_while_idle():
    """vLLM logs such a line every 10 s of work, and one more for the first idle interval (its last throughput was not
    0), so the log ends showing the server drained; the server logged none, then none for that interval: requests
    aborted with no token since the last line left it saying they ran however long the server stayed idle. As vLLM's,
    the line ends with the prefix cache's hit rate (it had none)."""
    metrics = ServerMetrics("micro", 64)
    assert metrics.stats_line(100.0) is None  # idle since the server started
    metrics.prompt_tokens.inc(50)
    metrics.generation_tokens.inc(200)
    metrics.prefix_cache_queries.inc(80)
    metrics.prefix_cache_hits.inc(20)
    metrics.engine_state(EngineStats(running=2, waiting=1, cache_usage=0.25, prefill_tokens=50, spec_drafted=0,
                                     spec_accepted=0))  # fmt: skip
    assert metrics.stats_line(110.0) == (
        "Avg prompt throughput: 5.0 tokens/s, Avg generation throughput: 20.0 tokens/s, Running: 2 reqs, "
        "Waiting: 1 reqs, KV cache usage: 25.0%, Prefix cache hit rate: 25.0%"
    )
    # its requests aborted, no token generated since
    metrics.engine_state(EngineStats(running=0, waiting=0, cache_usage=0.0, prefill_tokens=50, spec_drafted=0,
                                     spec_accepted=0))  # fmt: skip
    assert metrics.stats_line(120.0) == (
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 tokens/s, Running: 0 reqs, "
        "Waiting: 0 reqs, KV cache usage: 0.0%, Prefix cache hit rate: 0.0%"
    )  # was: None, the last line logged saying 2 running, 1 waiting and 25% of the cache in use
    assert metrics.stats_line(130.0) is None
    assert metrics.stats_line(140.0) is None


def test_a_finished_request_is_measured_under_vllms_per_request_token_and_phase_histograms(tmp_path):
    """vLLM's request_prompt_tokens, request_generation_tokens and request_prefill/decode/inference_time_seconds were
    missing from /metrics; a call of n choices counts once, as in vLLM."""
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)

    async def complete() -> None:
        async for _ in await bridge.submit([[5, 6, 7], [8, 9]], [greedy, greedy]):  # one call of two choices
            pass

    bridge.start()
    try:
        asyncio.run(complete())
    finally:
        bridge.stop()

    def sample(name: str) -> float:
        return bridge.metrics.registry.get_sample_value("seekstack:" + name, {"model_name": "micro"})

    assert (sample("request_prompt_tokens_count"), sample("request_prompt_tokens_sum")) == (1, 5)
    assert (sample("request_generation_tokens_count"), sample("request_generation_tokens_sum")) == (1, 8)
    phases = ("prefill", "decode", "inference")
    assert [sample(f"request_{phase}_time_seconds_count") for phase in phases] == [1, 1, 1]
    prefill, decode, inference = (sample(f"request_{phase}_time_seconds_sum") for phase in phases)
    assert prefill > 0 and decode > 0 and inference == pytest.approx(prefill + decode)


def test_prefix_cache_lookups_and_hits_are_counted_as_vllms_prefix_cache_queries_and_hits(tmp_path):
    """vLLM's prefix_cache_queries and prefix_cache_hits (prompt tokens looked up, found) were missing from /metrics:
    the cache's hit rate, which usage's cached_tokens shows per request, had no server-wide figure."""
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path), block_size=4)
    bridge = AsyncEngine(engine, ServerMetrics("micro", 64))
    greedy = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    prompt = list(range(5, 15))  # 10 tokens: two whole blocks of 4 to share

    async def complete() -> list[int]:
        cached = []
        for _ in range(2):  # the same prompt twice, one after the other
            async for _, output in await bridge.submit([prompt], [greedy]):
                cached.append(output.cached_tokens)
        return cached

    bridge.start()
    try:
        cached = asyncio.run(complete())
    finally:
        bridge.stop()

    def sample(name: str) -> float:
        return bridge.metrics.registry.get_sample_value("seekstack:" + name, {"model_name": "micro"})

    assert cached[0] == 0 and cached[-1] == 8  # the second call found the first's two blocks
    assert (sample("prefix_cache_queries_total"), sample("prefix_cache_hits_total")) == (20, 8)  # was: None
