"""The engine bridge: a request group closed by a client that left says which of its choices the engine had not
started yet, so a request that never left the queue is not billed for its prompt, and hands over the outputs
generated before the abort that nobody read, so their tokens are billed."""

from __future__ import annotations

import asyncio

from seekstack.infer import Engine, SamplingParams
from seekstack.serve.bridge import AsyncEngine
from seekstack.serve.metrics import ServerMetrics
from tests.infer.support import micro_model, tiny_tokenizer


def test_closing_a_group_names_the_choices_still_queued(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path), max_batch_size=1)  # one running request at a time
    bridge = AsyncEngine(engine, ServerMetrics("micro"))
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
    bridge = AsyncEngine(engine, ServerMetrics("micro"))
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


def test_a_prompt_computed_in_a_step_whose_output_an_abort_dropped_is_counted_as_the_ledger_bills_it(tmp_path):
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path))
    bridge = AsyncEngine(engine, ServerMetrics("micro"))  # its thread not started: the steps are taken here
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> set[int]:
        group = await bridge.submit([[5, 6, 7, 8], [9, 10]], [long, long])
        engine.step()  # the prompts computed, their first tokens made; then the client leaves before they are routed
        closing = asyncio.ensure_future(group.close())
        await asyncio.sleep(0)  # its abort handed to the engine thread
        bridge._apply_aborts()
        return (await closing).unstarted

    unstarted = asyncio.run(scenario())
    counted = bridge.metrics.registry.get_sample_value("seekstack:prompt_tokens_total", {"model_name": "micro"})
    assert unstarted == set()  # started: the ledger bills both prompts
    assert counted == 6  # was: 0, /metrics short of the ledger's prompt tokens


def test_preemptions_reach_the_metrics_as_vllms_num_preemptions(tmp_path):
    # 16 usable blocks of 4 tokens: the four prompts fit, but not their 24-token completions beside them
    engine = Engine(micro_model(), tiny_tokenizer(tmp_path), block_size=4, num_blocks=17)
    bridge = AsyncEngine(engine, ServerMetrics("micro"))
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
