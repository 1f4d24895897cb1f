"""Engine steps on few CPU threads when they are small: the choice, the restore, and what an engine step runs on."""

from __future__ import annotations

import pytest
import torch

from seekstack.accounting import forward_flops_per_token
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.threads import MIN_PARALLEL_FLOPS, StepThreads
from tests.infer.support import micro_model, tiny_tokenizer


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_step_below_the_threshold_runs_on_one_thread_and_a_large_one_on_all(two_threads):
    model = micro_model()
    threads = StepThreads(model.config, torch.device("cpu"))
    per_token = forward_flops_per_token(model.config, 0)
    small, large = int(MIN_PARALLEL_FLOPS // per_token), int(MIN_PARALLEL_FLOPS // per_token) + 1
    assert (threads.threads_for(1), threads.threads_for(small), threads.threads_for(large)) == (1, 1, 2)
    assert StepThreads(model.config, torch.device("cuda")).threads_for(1) == 2  # a GPU step leaves torch's setting


def test_the_thread_count_is_restored_after_the_step_even_when_it_fails(two_threads):
    threads = StepThreads(micro_model().config, torch.device("cpu"))
    with threads.running(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads.running(1):
        raise RuntimeError("a failing step")
    assert torch.get_num_threads() == 2


def test_engine_decodes_on_one_thread_and_prefills_a_long_prompt_on_all(two_threads, tmp_path):
    model = micro_model()
    engine = Engine(model, tiny_tokenizer(tmp_path), prefill_chunk=512)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[0].numel(), torch.get_num_threads())))
    # The micro model's forward is small: a threshold of 100 tokens' FLOPs puts a 200-token prefill above it.
    engine.step_threads.min_parallel_flops = 100 * engine.step_threads.flops_per_token
    engine.generate([list(range(5, 205))], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    assert seen == [(200, 2), (1, 1), (1, 1)]
    assert torch.get_num_threads() == 2
