"""Training throughput on a machine another process keeps busy: the trainer's `threads=auto` (LoadAwareThreads:
fewer threads while the other cores are taken) against `threads=0`, torch's thread count throughout, which is what
any other torch training loop (transformers' Trainer, TRL) runs on.

Each row is a short `seekstack train` run in this process (the real loop: data, forward, backward, AdamW,
progress), quiet and then beside `python -c "while True: pass"`; the two settings alternate over `--rounds`, and
each run's rate is its tokens over the seconds of its steps after the first two (compile and allocator warm-up).

    python bench/train_busy.py                         # after make demo's data steps (runs/demo/tokens)
    python bench/train_busy.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from machine import matmul_peaks, share_of_peak
from options import check_context, positive_int, token_shards

from seekstack.accounting import training_flops_per_token
from seekstack.config import PRESETS
from seekstack.train.config import TrainConfig
from seekstack.train.trainer import train

SETTINGS = ("auto", 0)


def run_rate(args: argparse.Namespace, threads: str | int, out_dir: Path) -> tuple[float, list[int]]:
    """Tokens/s of one short run over its steps after the first two, and the threads each of its steps ran on."""
    config = TrainConfig(
        model=args.preset, data_dir=str(args.data), out_dir=str(out_dir), max_steps=args.steps,
        batch_size=args.batch, seq_len=args.seq_len, eval_every=0, save_every=0, warmup_steps=5, threads=threads,
    )  # fmt: skip
    train(config)
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "step_s" in step][2:]
    tokens = args.batch * args.seq_len * len(steps)
    return tokens / sum(step["step_s"] for step in steps), [step["threads"] for step in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument(
        "--data", type=token_shards("train"), default="runs/demo/tokens", help="token shards (data tokenize)"
    )
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument(
        "--rounds", type=positive_int, default=2, help="runs of each setting, alternating (median reported)"
    )
    args = parser.parse_args()
    model_config = TrainConfig(model=args.preset).model_config()
    check_context(parser, "--seq-len", args.seq_len, model_config.max_position_embeddings, f"preset {args.preset}'s")
    print(f"{args.preset}, {args.batch} x {args.seq_len} tokens a step, {args.steps} steps a run, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    peak = matmul_peaks()["float32"]  # quiet, on torch's threads
    flops_per_token = training_flops_per_token(model_config, args.seq_len)
    with tempfile.TemporaryDirectory() as scratch:
        for busy in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                rates: dict[str | int, list[float]] = {setting: [] for setting in SETTINGS}
                used: dict[str | int, list[int]] = {setting: [] for setting in SETTINGS}
                for round_ in range(args.rounds):
                    for setting in SETTINGS:
                        out_dir = Path(scratch) / f"{busy}_{setting}_{round_}"
                        rate, threads = run_rate(args, setting, out_dir)
                        rates[setting].append(rate)
                        used[setting] += threads
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            auto, fixed = (statistics.median(rates[setting]) for setting in SETTINGS)
            print(f"\n{'beside a busy process' if busy else 'quiet'}:")
            for setting, label in (("auto", "threads=auto"), (0, "threads=0 (torch's)")):
                share_on_one = used[setting].count(1) / len(used[setting])
                runs = ", ".join(f"{rate:,.0f}" for rate in rates[setting])
                rate = statistics.median(rates[setting])
                print(f"  {label:20s} {rate:8,.0f} tok/s  ({runs}; {share_on_one:.0%} of steps on 1 thread)  "
                      f"{share_of_peak(rate, flops_per_token, peak)}")  # fmt: skip
            print(f"  auto / torch's = {auto / fixed:.2f}x")


if __name__ == "__main__":
    main()
