"""Data mixing ablation at an equal token budget: uniform, the fixed easy-to-hard curriculum and the EXP3 bandit
(Online Data Mixing) over the zlib-difficulty buckets, two seeds each, scored by validation bits per byte.

All three draw from the same three splits (`data tokenize --buckets`: train_easy, train_medium, train_hard, equal
bytes each): uniform at 1/3 each; the curriculum at 70/20/10, 20/50/30, 10/30/60 over the thirds of training;
the bandit starts uniform and moves weight towards the buckets whose micro-batches have the higher training loss.
Same micro model (tiny's layout, shrunk so that a run fits a shared 2-core machine), schedule, steps, batch;
the validation split is the demo's whole `val`.

    make demo                                    # or just its `data build / tokenizer train / data tokenize --buckets`
    python bench/data_mixing.py                  # 3 modes x 2 seeds x 120 steps, ~40 min on 2 loaded cores
    python bench/data_mixing.py --steps 40       # quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from options import positive_int, token_shards
from short_runs import short_run

from seekstack.train.trainer import METRICS_FILE

BUCKETS = ("train_easy", "train_medium", "train_hard")
MODES = {
    "uniform": dict(mixture=dict.fromkeys(BUCKETS, 1.0)),
    "curriculum": dict(mixture=dict(zip(BUCKETS, ([0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]), strict=True))),
    "bandit": dict(mixture=dict.fromkeys(BUCKETS, 1.0), mixture_mode="bandit"),
}
# tiny's layout at a quarter of its width and half its depth; 16 x 128 tokens a step
MICRO = dict(
    seq_len=128, batch_size=16, warmup_steps=20,
    model_overrides=dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
    ),
)  # fmt: skip


def mean_mix(out_dir: Path) -> dict[str, float]:
    """Each bucket's weight averaged over the run's steps (the `mix` each step logged)."""
    mixes = [r["mix"] for r in map(json.loads, (out_dir / METRICS_FILE).read_text().splitlines()) if "mix" in r]
    return {name: statistics.mean(mix[name] for mix in mixes) for name in BUCKETS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=token_shards("val", *BUCKETS), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_data_mixing"))
    parser.add_argument("--steps", type=positive_int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        for mode, changes in MODES.items():
            out_dir = args.out / f"{mode}_seed{seed}"
            summary = short_run(args.data, out_dir, args.steps, seed=seed, **MICRO, **changes)
            rows.append((mode, seed, summary["val_bpb"], mean_mix(out_dir)))
            print(f"{mode} seed {seed}: {summary['val_bpb']:.4f} bits/byte", flush=True)

    tokens = args.steps * MICRO["batch_size"] * MICRO["seq_len"]
    print(f"\nmicro model, {args.steps} steps x {MICRO['batch_size']} x {MICRO['seq_len']} = {tokens:,} tokens per run")
    print(f"{'mode':11s} {'seed':>4s} {'val bpb':>8s}  mean mix easy/medium/hard")
    for mode, seed, bpb, mix in rows:
        print(f"{mode:11s} {seed:4d} {bpb:8.4f}  " + " / ".join(f"{mix[name]:.2f}" for name in BUCKETS))
    means = {mode: statistics.mean(bpb for m, _, bpb, _ in rows if m == mode) for mode in MODES}
    print("mean over seeds: " + ", ".join(f"{mode} {bpb:.4f}" for mode, bpb in means.items()))
    better = [mode for mode in MODES if mode != "uniform" and means[mode] < means["uniform"]]
    spread = {
        mode: max(b for m, _, b, _ in rows if m == mode) - min(b for m, _, b, _ in rows if m == mode) for mode in MODES
    }
    print("seed spread (max - min): " + ", ".join(f"{mode} {value:.4f}" for mode, value in spread.items()))
    print(f"beats uniform on the mean: {', '.join(better) if better else 'nothing'}")


if __name__ == "__main__":
    main()
