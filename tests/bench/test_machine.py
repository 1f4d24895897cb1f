"""bench/machine.py: the matmul peak every bench sets its results against is the one its probe measured, printed with
the spread of the blocks it timed, in the seconds of the clock the results are timed on."""

import sys

import torch

from seekstack.train.mfu import MATMUL_PROBE_SIZE, measured_core_matmul_rates, thread_cores
from tests.bench.support import BENCH
from tests.support import mm_beside_a_busy_process

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench import machine  # noqa: E402


def test_the_printed_peak_is_the_median_of_the_probes_blocks_with_their_spread(monkeypatch, capsys):
    """The bf16 probe read 853 to 1,425 GFLOP/s between runs with nothing to tell a reader how far to trust it; the
    peak is now the median of the probe's timed blocks, and the line shows their lowest and highest. A CPU second is
    one core's, whatever the threads."""
    blocks = {
        torch.float32: (150e9, 190e9, 180e9, 170e9, 160e9),
        torch.bfloat16: (1.5e12, 0.9e12, 1.4e12, 1.3e12, 1.45e12),
    }
    monkeypatch.setattr(machine, "measured_core_matmul_rates", lambda dtype: blocks[dtype])
    assert machine.matmul_peaks("cpu") == {"float32": 170e9, "bfloat16": 1.4e12}
    assert capsys.readouterr().out == (
        f"measured matmul peak of 1 core ({torch.get_num_threads()} threads, cpu clock): float32 170 GFLOP/s (150-190 "
        "in 5 blocks), bfloat16 1,400 GFLOP/s (900-1,500 in 5 blocks)\n"
    )


def test_the_wall_clock_peak_is_one_cores_cpu_clock_rate_times_the_cores_the_threads_keep_busy(monkeypatch):
    """bench/decode.py's default --clock wall on a busy 2-core machine printed "matmul peak on 2 threads: float32 11
    GFLOP/s", where one core multiplies at 89. Each matmul here takes 1 ms of its thread's CPU time and 2 ms more off
    the core (another process holding it)."""

    monkeypatch.setattr(torch, "mm", mm_beside_a_busy_process(2e-3))
    measured_core_matmul_rates.cache_clear()
    try:
        peak = machine.matmul_peaks("wall")["float32"]
    finally:
        measured_core_matmul_rates.cache_clear()
    cores_peak = thread_cores(torch.get_num_threads()) * 2 * MATMUL_PROBE_SIZE**3 / 1e-3
    assert 0.8 * cores_peak < peak <= cores_peak
