"""The peak FLOP/s MFU divides by: a card's dense spec in the run's precision, and CPU ranks that share a machine's
cores share its peak."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from seekstack.parallel import distributed
from seekstack.parallel.distributed import Ranks, ranks_cpus
from seekstack.train.mfu import (
    MATMUL_PROBE_SIZE,
    Peak,
    card_peak_flops,
    default_peak_flops,
    matmul_rates,
    measured_core_matmul_rates,
    probed_in_turns,
    shared_cpu_peak_flops,
)
from tests.support import mm_beside_a_busy_process, spawn
from tests.train.test_distributed import _rank_main, free_port
from tests.train.test_trainer import data_dir, read_metrics, run_config  # noqa: F401  (data_dir is a fixture)

TWO_CORES = frozenset({0, 1})


def test_four_single_thread_ranks_on_two_shared_cores_reach_two_cores_peak_not_four():
    """torchrun --nproc-per-node 4 on 2 cores: each rank's 1-thread probe was multiplied by 4 (MFU 1.6% where one
    process read 5.6%); the 4 ranks can keep only the 2 cores busy."""
    assert shared_cpu_peak_flops(10e9, 1, [("host", TWO_CORES)] * 4) == pytest.approx(20e9)


def test_ranks_pinned_to_cores_of_their_own_each_add_their_peak():
    pinned = [("host", frozenset({core})) for core in range(4)]
    assert shared_cpu_peak_flops(10e9, 1, pinned, rank=2) == pytest.approx(40e9)


def test_each_machine_is_bounded_by_its_own_cores():
    """Two machines of 2 cores, 2 ranks of 2 threads on the first, 3 of 1 thread on the second: 2 + 2 cores busy."""
    ranks = [("a", TWO_CORES)] * 2 + [("b", TWO_CORES)] * 3
    assert shared_cpu_peak_flops(20e9, 2, ranks) == pytest.approx(4 * 10e9)


def test_one_process_keeps_its_measured_peak_and_threads_beyond_its_cores_add_nothing():
    assert shared_cpu_peak_flops(20e9, 2, [("host", TWO_CORES)]) == pytest.approx(20e9)
    assert shared_cpu_peak_flops(20e9, 8, [("host", TWO_CORES)]) == pytest.approx(20e9)  # 8 threads ran on 2 cores


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_the_cpu_peak_is_one_cores_rate_on_its_cpu_clock_times_the_cores_torchs_threads_keep_busy(monkeypatch, threads):
    """Probed on torch's 2 threads by the wall clock on a busy 2-core machine the peak read 11.4 GFLOP/s where one core
    multiplies at 88.7, and the demo's MFU read 61%. Each matmul here takes 1 ms of its thread's CPU time and 3 ms
    more off the core (another process holding it): the peak is one core's CPU-clock rate, on one thread, times the
    cores torch's threads keep busy (8 threads on 2 CPUs: 2), and says so (in the singular for one)."""
    seen_threads: set[int] = set()
    monkeypatch.setattr(torch, "mm", mm_beside_a_busy_process(3e-3, seen_threads))
    measured_core_matmul_rates.cache_clear()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = default_peak_flops(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
        measured_core_matmul_rates.cache_clear()
    one_core, cores = 2 * MATMUL_PROBE_SIZE**3 / 1e-3, min(threads, len(distributed.own_cpus()))
    assert seen_threads == {1} and 0.8 * cores * one_core < peak.flops <= cores * one_core
    named = f"{cores} core" + "s" * (cores > 1)
    assert peak.source == f"a 1024^3 float32 matmul measured on one CPU thread's clock, times {named}"


def test_a_single_process_reads_its_own_affinity_mask():
    [(machine, cpus)] = ranks_cpus(Ranks(0, 1, torch.device("cpu")))
    assert machine and cpus == frozenset(os.sched_getaffinity(0))


def test_cpu_peak_is_the_fastest_layout_of_a_training_steps_matmuls(monkeypatch):
    """bfloat16 on a CPU without native support ran a @ b (the probe's only layout) 14x slower than a.T @ b, which a
    Linear's weight gradient multiplies in: MFU read 300%. A matmul slow in a @ b alone must not lower the peak."""

    def mm_slow_untransposed(lhs, rhs):
        if lhs.is_contiguous() and rhs.is_contiguous():
            time.sleep(0.05)  # the transposed layouts return at once

    monkeypatch.setattr(torch, "mm", mm_slow_untransposed)
    assert statistics.median(matmul_rates(torch.bfloat16)) > 100 * 2 * MATMUL_PROBE_SIZE**3 / 0.05


def test_the_cpu_peak_is_timed_on_the_clock_it_is_given(monkeypatch):
    """The benchmarks' --clock cpu timed their steps on CPU time against a peak probed on the wall clock: while other
    processes held the core the peak read low and the share of it high (527%). Each matmul here takes 1 s of the
    clock given, whatever the wall clock says."""
    ticks = iter(range(1_000))
    monkeypatch.setattr(torch, "mm", lambda lhs, rhs: None)
    assert statistics.median(matmul_rates(torch.float32, clock=lambda: next(ticks))) == 2 * MATMUL_PROBE_SIZE**3 / 1


def test_the_cpu_peak_is_the_median_block_of_the_layout_fastest_by_median(monkeypatch):
    """One cold 256^3 call per layout picked g.T @ x as often as not in bfloat16 on an AMX core (the three within 20%
    there), a layout that runs at half x @ W.T's rate at 1024^3: the peak read 799-1,451 GFLOP/s between processes.
    Each matmul here takes the seconds scripted for its layout and size on a virtual clock, one warm-up call and then
    one per block (each call outlasts a block): a layout with one fast block but slow ones else is not picked, and the
    peak is the median of the blocks timed, not the fastest."""
    n = MATMUL_PROBE_SIZE
    now = [0.0]
    seconds: dict[tuple[bool, bool, int], list[float]] = {}

    def mm(lhs, rhs):
        now[0] += seconds[(not lhs.is_contiguous(), not rhs.is_contiguous(), lhs.shape[0])].pop(0)

    def script() -> None:  # (lhs transposed, rhs transposed, size): the warm-up call, then the 5 blocks'
        seconds[(False, True, 256)] = [1, 1, 1, 1, 1, 1]
        seconds[(False, False, 256)] = [1, 0.1, 2, 2, 2, 2]  # the best of its blocks beats every other block
        seconds[(True, False, 256)] = [1, 4, 4, 4, 4, 4]
        seconds[(False, True, n)] = [1, 1, 2, 1, 4, 1]

    monkeypatch.setattr(torch, "mm", mm)
    flops = 2 * n**3
    script()
    assert matmul_rates(torch.float32, clock=lambda: now[0]) == [flops / 1, flops / 2, flops / 1, flops / 4, flops / 1]
    script()
    assert statistics.median(matmul_rates(torch.float32, clock=lambda: now[0])) == flops / 1


@pytest.mark.parametrize(
    ("name", "flops", "card"),
    [
        ("NVIDIA H800", 989e12, "H800"),  # DeepSeek-V3's: an A100's 312 assumed read its MFU 3.2x high, 100% at 31%
        ("NVIDIA H800 PCIe", 756e12, "H800 PCIe"),
        ("NVIDIA H100 80GB HBM3", 989e12, "H100"),
        ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),  # was the SXM's 989
        ("NVIDIA H20", 148e12, "H20"),
        ("NVIDIA H200", 989e12, "H200"),
        ("NVIDIA B200", 2.25e15, "B200"),
        ("NVIDIA A100-SXM4-80GB", 312e12, "A100"),
        ("NVIDIA A10G", 70e12, "A10G"),  # AWS's G5 card: was the A10's 125, MFU read 0.56x its own
        ("NVIDIA A10", 125e12, "A10"),
        ("NVIDIA L40", 181e12, "L40"),  # was the L4's 121: "L4" is in its name
        ("NVIDIA L40S", 362e12, "L40S"),
        ("AMD Instinct MI300X", 1.3074e15, "MI300X"),
    ],
)
def test_a_cards_peak_is_its_dense_bf16_spec_looked_up_by_its_name(name, flops, card):
    assert card_peak_flops(name) == Peak(flops, f"{name}: the {card}'s dense bf16 spec")


@pytest.mark.parametrize(
    ("name", "dtype", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, "highest", Peak(989e12, "the H100's dense bf16 spec")),
        ("NVIDIA H100 80GB HBM3", torch.float32, "highest", Peak(67e12, "the H100's dense float32 spec")),
        ("NVIDIA H100 80GB HBM3", torch.float32, "high", Peak(494.5e12, "the H100's dense tf32 spec")),
        ("NVIDIA A100-SXM4-80GB", torch.float32, "highest", Peak(19.5e12, "the A100's dense float32 spec")),
        ("NVIDIA A100-SXM4-80GB", torch.float32, "medium", Peak(156e12, "the A100's dense tf32 spec")),
        (
            "AMD Instinct MI250X",
            torch.float32,
            "high",
            Peak(47.85e12, "the MI250X's dense float32 spec (it has no TF32 tensor cores)"),
        ),
        ("NVIDIA RTX PRO 6000", torch.float32, "highest", Peak(19.5e12, "no float32 peak known for it, an A100's "
                                                                        "assumed (set peak_flops)")),
    ],
)  # fmt: skip
def test_a_cards_peak_is_its_spec_in_the_precision_the_run_multiplies_in(monkeypatch, name, dtype, precision, peak):
    """A run in the default dtype, float32, was given its MFU against the H100's 989 TFLOP/s of bf16 (only a note said
    so), where torch multiplies float32 at 67 without TF32 (the default) and at 494.5 with it: an MFU of a few percent
    read against a peak it cannot reach."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert default_peak_flops(torch.device("cuda"), dtype) == Peak(peak.flops, f"{name}: {peak.source}")
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_card_not_in_the_table_is_given_an_a100s_peak_and_its_source_says_so():
    assert card_peak_flops("NVIDIA RTX PRO 6000 Blackwell") == Peak(
        312e12, "NVIDIA RTX PRO 6000 Blackwell: no bf16 peak known for it, an A100's assumed (set peak_flops)"
    )


def _rank_probing(rank: int, world_size: int, port: int, folder: Path) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    ranks = distributed.init_distributed()

    def probe() -> Peak:
        start = time.time()
        time.sleep(0.5)  # a matmul probe's time
        (folder / f"rank_{rank}").write_text(f"{start} {time.time()}")
        return Peak(1e9 * (rank + 1), f"rank {rank}'s probe")

    try:
        assert probed_in_turns(probe, ranks) == Peak(1e9 * (rank + 1), f"rank {rank}'s probe")
    finally:
        distributed.shutdown(ranks)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_cpu_ranks_probe_their_peak_one_at_a_time_not_on_the_cores_they_share_at_once(tmp_path):
    """Every rank probed right after the same collective: ranks sharing cores each measured its share of them (two
    ranks on one core read half its rate each), a peak too low that put MFU above 100%."""
    spawn(_rank_probing, (2, free_port(), tmp_path))
    (first_start, first_end), (second_start, second_end) = (
        map(float, (tmp_path / f"rank_{rank}").read_text().split()) for rank in range(2)
    )
    assert first_end <= second_start  # rank 1 probed once rank 0 had done
    assert second_end - second_start >= 0.5 and first_end - first_start >= 0.5


def _rank_training_on_a_busy_machine(rank: int, world_size: int, port: int, config, folder: Path) -> None:
    import seekstack.train.trainer as trainer

    def probe(dtype: torch.dtype) -> float:
        start = time.time()
        time.sleep(0.3)  # a matmul probe's time
        with (folder / f"rank_{rank}").open("a") as spans:
            spans.write(f"{start} {time.time()}\n")
        return 1e18  # the machine is free again: no step beats this

    trainer.default_peak_flops = lambda device, dtype: Peak(1e6 if rank == 0 else 1e18, "a probe on a busy machine")
    trainer.core_matmul_flops = probe
    _rank_main(rank, world_size, port, config)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ranks_probe_again_together_and_in_turns_when_one_ranks_step_beats_its_peak(data_dir, tmp_path):  # noqa: F811
    """Each rank decided alone to probe again where its own step's MFU was above 100%: ranks whose start probes all
    read low probed again all at once on the cores they share (the start's probes take turns), and a rank whose MFU
    stayed below kept a peak the others had replaced. Rank 0's start probe read low here: both ranks probe again,
    one after the other, once."""
    config = run_config(data_dir, tmp_path / "run", max_steps=2, eval_every=0, save_every=0)
    spawn(_rank_training_on_a_busy_machine, (2, free_port(), config, tmp_path))
    [(first_start, first_end)], [(second_start, second_end)] = (
        [tuple(map(float, line.split())) for line in (tmp_path / f"rank_{rank}").read_text().splitlines()]
        for rank in range(2)
    )
    assert first_end <= second_start  # rank 1 probed once rank 0 had done
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps[0]["peak_source"] == "a probe on a busy machine, measured again at step 1"
