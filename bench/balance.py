"""Load balancing study: no balancing, auxiliary-loss-free bias balancing, and the sequence-wise loss alone.

The same short run of `tiny` on the demo shards under each setting; reported: MaxVio (each step's over its
whole batch, averaged over the last quarter of the run), per MoE layer and averaged, and the validation loss.
DeepSeek-V3 §2.1.2 and Wang et al. 2024 report that the bias method balances better than an auxiliary loss
without hurting the loss; this measures what we get.

    python bench/balance.py                     # 200 steps x 4 settings, ~8 min on 2 cores
    python bench/balance.py --steps 40          # quick check
"""

from __future__ import annotations

import argparse
from pathlib import Path

from options import positive_int, token_shards
from short_runs import short_run

SETTINGS = {  # name (also the run's folder) -> the TrainConfig fields it sets
    "none": dict(bias_update_rate=0.0, aux_loss_alpha=0.0),
    "bias_gamma_1e-3": dict(bias_update_rate=1e-3, aux_loss_alpha=0.0),
    "loss_alpha_1e-4": dict(bias_update_rate=0.0, aux_loss_alpha=1e-4),
    "loss_alpha_1e-2": dict(bias_update_rate=0.0, aux_loss_alpha=1e-2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=token_shards("train", "val"), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_balance"))
    parser.add_argument("--steps", type=positive_int, default=200)
    args = parser.parse_args()

    results = {}
    for name, changes in SETTINGS.items():
        results[name] = short_run(args.data, args.out / name, args.steps, **changes)
        print(f"{name}: MaxVio {results[name]['maxvio']:.3f}, val loss {results[name]['val_loss']:.4f}")
    layers = list(next(iter(results.values()))["maxvio_per_layer"])
    print(f"\ntiny, {args.steps} steps x 16 x 256; MaxVio over each step's batch, mean of the last quarter of steps")
    header = "".join(f"{'layer ' + layer:>10s}" for layer in layers)
    print(f"{'balancing':20s} {'MaxVio':>7s}{header} {'val MaxVio':>11s} {'val loss':>9s} {'val bpb':>8s}")
    for name, summary in results.items():
        per_layer = "".join(f"{summary['maxvio_per_layer'][layer]:10.3f}" for layer in layers)
        print(
            f"{name:20s} {summary['maxvio']:7.3f}{per_layer} {summary['val_maxvio']:11.3f} "
            f"{summary['val_loss']:9.4f} {summary['val_bpb']:8.4f}"
        )


if __name__ == "__main__":
    main()
