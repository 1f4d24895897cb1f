"""Routed-expert pruning of a trained model by router statistics: bits per byte, KL and top-1 agreement against the
original, file size and greedy decode tokens/s, for several fractions of experts removed (no healing fine-tune).

    .venv/bin/python bench/prune.py --model runs/quant/train/checkpoints/step_150 --data runs/demo/tokens
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import seekstack
from seekstack.compress.prune import gate_mass, prune_experts
from seekstack.compress.quality import bytes_per_token, held_out_batches, measure
from seekstack.compress.quantize import checkpoint_bytes

sys.path.insert(0, str(Path(__file__).parent))
from quantize import decode_speeds  # noqa: E402  (bench/quantize.py: the same interleaved decode timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quant/train/checkpoints/step_150")
    parser.add_argument("--data", default="runs/demo/tokens")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--batches", type=int, default=8, help="validation batches of 8 x 256 tokens")
    parser.add_argument("--calibration-batches", type=int, default=4, help="train batches of 8 x 256 tokens")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    original = seekstack.load_pretrained(args.model).eval()
    calibration = held_out_batches(args.data, batches=args.calibration_batches, split="train")
    mass = gate_mass(original, calibration)
    batches, per_token = held_out_batches(args.data, batches=args.batches), bytes_per_token(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench_prune_"))
    models, disk = {"unpruned": original}, {"unpruned": checkpoint_bytes(args.model)}
    for fraction in args.fractions:
        name = f"experts -{fraction:.0%}"
        model = copy.deepcopy(original)
        prune_experts(model, mass, fraction)
        seekstack.save_pretrained(model, work / name.replace(" ", "_"))
        models[name], disk[name] = model, checkpoint_bytes(work / name.replace(" ", "_"))
    speeds = decode_speeds(models, (1, 8), args.reps, time.process_time)
    base = None
    print(f"\nmodel {args.model}; calibration {args.calibration_batches} x 8 x 256 train tokens; no healing")
    print(
        "| model | routed experts | bytes on disk | val bits/byte | change | mean KL | top-1 | decode tok/s b=1 | b=8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        quality = measure(model, original, batches, per_token)
        base = base or quality.bits_per_byte
        print(
            f"| {name} | {model.config.n_routed_experts} | {disk[name]:,} ({disk[name] / disk['unpruned']:.0%}) | "
            f"{quality.bits_per_byte:.4f} | {quality.bits_per_byte / base - 1:+.2%} | {quality.mean_kl:.4f} | "
            f"{quality.top1_agreement:.2%} | {speeds[name][1]:,.0f} | {speeds[name][8]:,.0f} |"
        )


if __name__ == "__main__":
    main()
