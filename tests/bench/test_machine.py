"""bench/machine.py: the matmul peak every bench sets its results against is the one its probe measured, printed with
the spread of the blocks it timed."""

import sys

import torch

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench import machine  # noqa: E402


def test_the_printed_peak_is_the_median_of_the_probes_blocks_with_their_spread(monkeypatch, capsys):
    """The bf16 probe read 853 to 1,425 GFLOP/s between runs with nothing to tell a reader how far to trust it; the
    peak is now the median of the probe's timed blocks, and the line shows their lowest and highest."""
    blocks = {
        torch.float32: (150e9, 190e9, 180e9, 170e9, 160e9),
        torch.bfloat16: (1.5e12, 0.9e12, 1.4e12, 1.3e12, 1.45e12),
    }
    monkeypatch.setattr(machine, "measured_matmul_rates", lambda dtype, threads, clock: blocks[dtype])
    assert machine.matmul_peaks("cpu") == {"float32": 170e9, "bfloat16": 1.4e12}
    assert capsys.readouterr().out == (
        f"measured matmul peak on {torch.get_num_threads()} threads, cpu clock: float32 170 GFLOP/s (150-190 in 5 "
        "blocks), bfloat16 1,400 GFLOP/s (900-1,500 in 5 blocks)\n"
    )
