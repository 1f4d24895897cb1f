"""The "3D attention" ablation: plain MLA against MLA + channel gate + temporal convolution
(`attention_variant="3d"`, seekstack/model/attention_3d.py) on the demo token shards.

Both variants train `tiny` with the same seed, data order, schedule and number of tokens (the same compute up to
the variant's extra terms, whose parameters and time are printed), for each seed given. Printed per run:
parameters, validation loss and bits per byte over the whole validation split, training tokens/s; then the mean
change of the 3D variant per seed. Needs the shards `make demo` writes.

    python bench/attention_3d.py --steps 300 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from options import positive_int, token_shards
from short_runs import short_run  # noqa: E402

from seekstack.config import preset  # noqa: E402
from seekstack.model.transformer import Transformer  # noqa: E402
from seekstack.train.trainer import METRICS_FILE  # noqa: E402

VARIANTS = ("mla", "3d")


def parameter_count(variant: str) -> int:
    return sum(p.numel() for p in Transformer(preset("tiny", attention_variant=variant)).parameters())


def training_speed(run_dir: Path) -> float:
    """Median training tokens/s over the logged steps after the first (compile and warm-up)."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r and r.get("step", 0) > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=token_shards("train", "val"), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention_3d"))
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    params = {variant: parameter_count(variant) for variant in VARIANTS}
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            run_dir = args.out / f"{variant}_seed{seed}"
            summary = short_run(
                args.data, run_dir, args.steps, seed=seed, model_overrides={"attention_variant": variant}
            )
            rows.append({"variant": variant, "seed": seed, **summary, "tokens_per_s": training_speed(run_dir)})

    print(f"\ntiny, {args.steps} steps x {16 * 256} tokens, validation over the whole val split")
    print(f"{'variant':<8} {'seed':>4} {'params':>10} {'val loss':>9} {'val bpb':>8} {'train tok/s':>12}")
    for row in rows:
        print(
            f"{row['variant']:<8} {row['seed']:>4} {params[row['variant']]:>10,} {row['val_loss']:>9.4f} "
            f"{row['val_bpb']:>8.4f} {row['tokens_per_s']:>12,.0f}"
        )
    by = {(row["variant"], row["seed"]): row for row in rows}
    bpb_change = [by[("3d", s)]["val_bpb"] / by[("mla", s)]["val_bpb"] - 1 for s in args.seeds]
    speed_ratio = [by[("3d", s)]["tokens_per_s"] / by[("mla", s)]["tokens_per_s"] for s in args.seeds]
    print(
        f"\n3d vs mla: parameters {params['3d'] / params['mla'] - 1:+.2%}, "
        f"val bpb {statistics.mean(bpb_change):+.2%} (per seed {', '.join(f'{c:+.2%}' for c in bpb_change)}), "
        f"training speed {statistics.mean(speed_ratio):.2f}x"
    )
    (args.out / "summary.json").write_text(json.dumps({"params": params, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
