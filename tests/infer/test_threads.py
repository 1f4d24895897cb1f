"""Engine steps on few CPU threads when they are small: the choice, the restore, and what an engine step runs on."""

from __future__ import annotations

import pytest
import torch

from seekstack.accounting import forward_flops_per_token
from seekstack.infer import Engine, SamplingParams
from seekstack.infer.threads import (
    MIN_PARALLEL_FLOPS,
    IdleCores,
    LoadAwareThreads,
    StepThreads,
    configured_threads,
    threads_beside,
)
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


def _stat(path, user: int, idle: int, iowait: int, steal: int) -> None:
    """A /proc/stat of two cores whose summed ticks are these (the per-core lines only count the cores)."""
    cores = "cpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n"
    path.write_text(f"cpu  {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0\n{cores}")


def test_idle_cores_are_the_idle_and_iowait_share_of_the_ticks_times_the_cores(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, user=1000, idle=5000, iowait=100, steal=0)
    meter = IdleCores(stat)
    # over the interval: 100 user ticks (our thread), 80 idle + 10 iowait, 10 stolen by a VM's host: of 200 ticks on
    # 2 cores, 90 idle = 0.9 cores
    _stat(stat, user=1100, idle=5080, iowait=110, steal=10)
    assert meter.idle() == pytest.approx(0.9)
    meter.restart()
    _stat(stat, user=1300, idle=5080, iowait=110, steal=10)  # a competing process took the other core
    assert meter.idle() == 0.0
    assert IdleCores(tmp_path / "missing").idle() is None


def test_one_thread_more_per_core_idle_at_least_four_fifths_of_the_time_and_one_when_unknown():
    assert [threads_beside(idle, 2) for idle in (0.0, 0.79, 0.8, 1.95)] == [1, 1, 2, 2]
    assert threads_beside(6.75, 8) == 7 and threads_beside(6.8, 8) == 8 and threads_beside(7.9, 4) == 4
    assert threads_beside(None, 8) == 1


class ScriptedIdle:
    """IdleCores whose readings are given: one per interval, in order."""

    readable = True

    def __init__(self, readings):
        self.readings = list(readings)

    def restart(self) -> None:
        pass

    def idle(self):
        return self.readings.pop(0)


def test_training_steps_look_at_the_machine_on_one_thread_and_leave_a_busy_core_alone(two_threads):
    # every 4th step from step 1 looks (on 1 thread): quiet at step 1, the other core busy at steps 5 and 6, idle
    # again at 7
    guard = LoadAwareThreads(2, probe_every=4, idle=ScriptedIdle([1.0, 0.0, 0.1, 0.95]))
    ran = []
    for number in range(9):
        with guard.step(number):
            ran.append(torch.get_num_threads())
    assert ran == [2, 1, 2, 2, 2, 1, 1, 1, 2]
    assert torch.get_num_threads() == 2


def test_training_threads_stay_where_the_counters_cannot_be_read_or_one_thread_is_all(two_threads, tmp_path):
    unreadable = LoadAwareThreads(2, probe_every=1, idle=IdleCores(tmp_path / "missing"))
    off = LoadAwareThreads(2, probe_every=1, idle=ScriptedIdle([]), enabled=False)  # threads=N, a GPU, RL
    single = LoadAwareThreads(1, probe_every=1, idle=ScriptedIdle([]))
    for guard in (unreadable, off, single):
        for number in range(3):
            with guard.step(number):
                assert torch.get_num_threads() == 2  # torch's setting, whatever `most` says


def test_a_runs_threads_field_sets_torchs_threads_for_the_run_and_restores_them(two_threads):
    for field, inside in ((1, 1), (0, 2), ("auto", 2)):
        with configured_threads(field):
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="field 'threads' 100000: must be from 1"), configured_threads(100000):
        pass
