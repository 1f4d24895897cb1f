"""Pruning a trained model: attention heads by importance (gradient of the loss w.r.t. a head mask), routed experts
by router gate mass, and both; each without and with a short healing fine-tune (the project's trainer). Reports
routed experts and heads, bytes on disk, validation bits per byte and its change, mean KL and top-1 agreement
against the original, and greedy decode tokens/s at batch 1 and 8.

Healing is more training, which helps the unpruned model too: the `unpruned + heal` row is the control, trained
the same steps on the same batches.

    .venv/bin/python bench/prune.py --model runs/quant/train/checkpoints/step_150 --data runs/quant/data/tokens
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
from torch import nn

import seekstack
from seekstack.compress.heads import head_importance, prune_heads, refuse_too_few_heads
from seekstack.compress.heal import heal
from seekstack.compress.prune import gate_mass, has_moe_layers, prune_experts, refuse_too_few_kept, rounding_notes
from seekstack.compress.quality import held_out_batches, log_probs, measure
from seekstack.compress.quantize import checkpoint_bytes, save_with_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from options import learning_rate, load_model_and_data, non_negative_int, number_between, positive_int
from quantize import decode_speeds  # noqa: E402  (bench/quantize.py: the same interleaved decode timing)


def pruned_models(
    original: nn.Module, mass: dict[str, torch.Tensor], importance: dict[str, torch.Tensor], args: argparse.Namespace
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """name -> each row's model, unpruned and pruned by `args.heads`, `args.experts` and both, each healed too where
    `args.heal_steps` asks, and name -> its checkpoint's bytes on disk; the checkpoints and healing runs go to a
    temporary folder, removed on return."""
    variants = {
        "unpruned": (0.0, 0.0),
        f"heads -{args.heads:.0%}": (args.heads, 0.0),
        f"experts -{args.experts:.0%}": (0.0, args.experts),
        f"heads -{args.heads:.0%}, experts -{args.experts:.0%}": (args.heads, args.experts),
    }
    models, disk, shapes = {}, {}, set()
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as work:
        for name, (heads, experts) in variants.items():
            model = copy.deepcopy(original)
            if heads:
                prune_heads(model, importance, heads)
            if experts:
                prune_experts(model, mass, experts)
            shape = (model.config.num_attention_heads, model.config.n_routed_experts)
            if shape in shapes:  # a fraction of 0, or one removing no whole head or expert: a row above again
                continue
            shapes.add(shape)
            folder = Path(work) / name.replace(" ", "_").replace(",", "")
            save_with_tokenizer(model, args.model, folder)
            models[name], disk[name] = model, checkpoint_bytes(folder)
            if args.heal_steps:
                healed = heal(
                    folder,
                    args.data,
                    args.heal_steps,
                    folder.with_name(f"{folder.name}_heal"),
                    args.heal_lr,
                    args.heal_batch_size,
                )
                models[f"{name} + heal"] = seekstack.load_pretrained(healed).eval()
                disk[f"{name} + heal"] = checkpoint_bytes(healed)
    return models, disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quant/train/checkpoints/step_150")
    parser.add_argument("--data", default="runs/quant/data/tokens")
    fraction = number_between(0, 1)
    parser.add_argument("--heads", type=fraction, default=0.25, help="fraction of attention heads removed per layer")
    parser.add_argument("--experts", type=fraction, default=0.25, help="fraction of routed experts removed per layer")
    parser.add_argument("--heal-steps", type=non_negative_int, default=25, help="0: no healed rows")
    parser.add_argument("--heal-lr", type=learning_rate, default=1e-4)
    parser.add_argument(
        "--heal-batch-size", type=positive_int, default=8, help="healing: sequences of 256 tokens per step"
    )
    parser.add_argument("--batches", type=positive_int, default=8, help="validation batches of 8 x 256 tokens")
    parser.add_argument("--calibration-batches", type=positive_int, default=4, help="train batches of 8 x 256 tokens")
    parser.add_argument("--reps", type=positive_int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    original, per_token = load_model_and_data(parser, args.model, args.data)
    try:  # fractions that leave too few heads or experts: refused before calibrating, as `seekstack prune` does
        refuse_too_few_heads(original.config.num_attention_heads, args.heads)
    except ValueError as error:
        parser.error(f"--heads: {error}")
    try:
        if args.experts:
            refuse_too_few_kept(original.config, args.experts)
    except ValueError as error:
        parser.error(f"--experts: {error}")
    try:  # as `seekstack prune`: fractions that remove no whole head or expert are refused, those rounded said so
        for note in rounding_notes(original.config, args.experts, args.heads):
            print(f"note: {note}", file=sys.stderr)
    except ValueError as error:
        parser.error(str(error))
    context = original.config.max_position_embeddings
    calibration = held_out_batches(args.data, context, batches=args.calibration_batches, split="train")
    mass, importance = gate_mass(original, calibration), head_importance(original, calibration)
    batches = held_out_batches(args.data, context, batches=args.batches)
    models, disk = pruned_models(original, mass, importance, args)
    speeds = decode_speeds(models, (1, 8), args.reps, time.process_time)
    print(
        f"\nmodel {args.model}; calibration {args.calibration_batches} x 8 x 256 train tokens; healing "
        f"{args.heal_steps} steps of {args.heal_batch_size} x 256 train tokens at lr {args.heal_lr}; "
        f"decode: median of {args.reps} rounds"
    )
    print("| model | heads | routed experts | bytes on disk | val bits/byte | change | mean KL | top-1 ", end="")
    print("| decode tok/s b=1 | b=8 |\n|---|---|---|---|---|---|---|---|---|---|")
    reference = [log_probs(original, batch) for batch in batches]
    base = measure(original, reference, batches, per_token).bits_per_byte
    for name, model in models.items():
        quality, config = measure(model, reference, batches, per_token), model.config
        speed = {b: f"{speeds[name][b]:,.0f} ({speeds[name][b] / speeds['unpruned'][b]:.2f}x)" for b in (1, 8)}
        experts = config.n_routed_experts if has_moe_layers(config) else "none (no MoE layer)"
        print(
            f"| {name} | {config.num_attention_heads} | {experts} | {disk[name]:,} "
            f"({disk[name] / disk['unpruned']:.0%}) | {quality.bits_per_byte:.4f} | "
            f"{quality.bits_per_byte / base - 1:+.2%} | {quality.mean_kl:.4f} | {quality.top1_agreement:.2%} | "
            f"{speed[1]} | {speed[8]} |"
        )


if __name__ == "__main__":
    main()
