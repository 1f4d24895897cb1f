"""What the benchmarks share about the machine they run on: the clock, torch's threads, a quiet transformers,
the measured matmul peak every result is set against, and the decode rate that timing noise can hide."""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from options import positive_int

from seekstack.allocator import keep_freed_memory
from seekstack.train.mfu import cores_named, measured_core_matmul_rates, thread_cores

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
PEAK_DTYPES = (torch.float32, torch.bfloat16)


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """--threads and --clock, as every comparison with transformers takes them."""
    parser.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: this process's CPU seconds, steadier on a busy machine",
    )


def prepare_machine(args: argparse.Namespace) -> None:
    """Apply --threads, the command's allocator setting (seekstack/allocator.py) and silence transformers' logging,
    progress bars and warnings."""
    from transformers.utils import logging as transformers_logging

    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")


def matmul_peaks(clock: str = "wall") -> dict[str, float]:
    """Measure and print this machine's float32 and bfloat16 matmul FLOP/s (train/mfu.py's probe: one core's, on one
    thread timed on its CPU clock, the median of its timed blocks, printed with their spread), the yardstick every
    result of the run is also given as a fraction of, in the seconds of `clock` (CLOCKS: --clock's) those results are
    timed on: on the wall clock the cores torch's threads keep busy multiply side by side, and a CPU second is one
    core's."""
    threads = torch.get_num_threads()
    cores = thread_cores(threads) if clock == "wall" else 1
    rates = {
        str(dtype).removeprefix("torch."): [cores * rate for rate in measured_core_matmul_rates(dtype)]
        for dtype in PEAK_DTYPES
    }
    measured = ", ".join(
        f"{name} {statistics.median(blocks) / 1e9:,.0f} GFLOP/s ({min(blocks) / 1e9:,.0f}-{max(blocks) / 1e9:,.0f} "
        f"in {len(blocks)} blocks)"
        for name, blocks in rates.items()
    )
    print(f"measured matmul peak of {cores_named(cores)} ({threads} threads, {clock} clock): {measured}", flush=True)
    return {name: statistics.median(blocks) for name, blocks in rates.items()}


def share_of_peak(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> str:
    """'123 GFLOP/s = 45% of peak' for a throughput and the matmul FLOPs (seekstack.accounting) of one token."""
    flops = tokens_per_second * flops_per_token
    return f"{flops / 1e9:.3g} GFLOP/s = {flops / peak_flops:.1%} of peak"


def decode_rate(medians: dict[str, float], name: str, sequences: int, new_tokens: int) -> float:
    """sequences x (new_tokens - 1) / (t(new_tokens) - t(1)) from medians keyed `name_1`, `name_<new_tokens>`; nan
    where t(new_tokens) is not above t(1): the decode time is within timing noise, and no rate can be told from it."""
    decode_seconds = medians[f"{name}_{new_tokens}"] - medians[f"{name}_1"]
    return sequences * (new_tokens - 1) / decode_seconds if decode_seconds > 0 else math.nan


def print_noise_notice(rates: list[float]) -> None:
    """Say why a rate printed above is nan, and what to do."""
    if any(math.isnan(rate) for rate in rates):
        print("  nan: t(new tokens) was not above t(1 new token), within timing noise: raise --new-tokens or --reps")
