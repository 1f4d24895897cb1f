"""What the benchmarks share about the machine they run on: the clock, torch's threads, a quiet transformers."""

from __future__ import annotations

import argparse
import time
import warnings

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    """--threads and --clock, as every comparison with transformers takes them."""
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: this process's CPU seconds, steadier on a busy machine",
    )


def prepare_machine(args: argparse.Namespace) -> None:
    """Apply --threads and silence transformers' logging, progress bars and warnings."""
    from transformers.utils import logging as transformers_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
