"""Curriculum vs uniform sampling at the same token budget: validation loss and bits per byte of each.

Uniform draws windows from the whole `train` split; the curriculum draws from the zlib-difficulty buckets
(`data tokenize --buckets`) at 70/20/10 (easy/medium/hard) in the first third of training, 20/50/30 in the
second and 10/30/60 in the last. Same model, seed, schedule, steps and batch; the validation split is the same
whole split for both.

    python bench/curriculum.py                  # 300 steps of tiny x 2 runs, ~8 min on 2 cores
    python bench/curriculum.py --steps 60       # quick check
"""

from __future__ import annotations

import argparse
from pathlib import Path

from options import positive_int, token_shards
from short_runs import short_run

CURRICULUM = {"train_easy": [0.7, 0.2, 0.1], "train_medium": [0.2, 0.5, 0.3], "train_hard": [0.1, 0.3, 0.6]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=token_shards("train", "val", *CURRICULUM), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_curriculum"))
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        for name, mixture in (("uniform", {}), ("curriculum", CURRICULUM)):
            summary = short_run(args.data, args.out / f"{name}_seed{seed}", args.steps, mixture=mixture, seed=seed)
            rows.append((name, seed, summary))
            print(f"{name} seed {seed}: val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.4f} bits/byte")
    tokens = args.steps * 16 * 256
    print(f"\ntiny, {args.steps} steps x 16 x 256 = {tokens:,} training tokens per run; whole validation split")
    print(f"{'sampling':12s} {'seed':>4s} {'val loss':>9s} {'val bpb':>8s}")
    for name, seed, summary in rows:
        print(f"{name:12s} {seed:4d} {summary['val_loss']:9.4f} {summary['val_bpb']:8.4f}")
    for seed in args.seeds:
        uniform, curriculum = (s for _, row_seed, s in rows if row_seed == seed)
        difference = curriculum["val_bpb"] - uniform["val_bpb"]
        verdict = "curriculum better" if difference < 0 else "uniform better"
        print(f"seed {seed}: curriculum - uniform = {difference:+.4f} bits/byte ({verdict})")


if __name__ == "__main__":
    main()
