"""Dr. GRPO vs GRPO from the same start and seeds: accuracy and the length of incorrect answers over training.

Runs `seekstack rl` twice from one checkpoint with the same seed, prompts and settings: `loss_type=grpo
scale_rewards=group` (DeepSeek-Math) and `loss_type=dr_grpo scale_rewards=none` (Liu et al. 2025, who report that
GRPO's per-completion length normalisation inflates the length of wrong answers). Prints, per window of steps, the
training accuracy and the mean length of correct and of incorrect completions (metrics.jsonl), then both final
checkpoints' held-out pass@1 / pass@8, and draws both runs' curves (`seekstack rl-plot`). A run in --out continues
from its newest checkpoint (a finished one is only read). Usage (one thread):
    OMP_NUM_THREADS=1 python bench/dr_grpo.py START_CHECKPOINT [--steps 150] [--window 30] [--out runs/dr_grpo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from options import check_task, checkpoint_folder, learning_rate, positive_int

from seekstack.infer import Engine
from seekstack.posttrain.config import GRPOConfig
from seekstack.posttrain.evaluate import evaluate_task
from seekstack.posttrain.plot import plot_rl_runs
from seekstack.posttrain.rl import run_rl
from seekstack.posttrain.tasks import make_task
from seekstack.train.config import resolve_train_config
from seekstack.train.plot import read_metrics
from seekstack.train.runs import list_checkpoints

LOSSES = {"grpo": ["loss_type=grpo", "scale_rewards=group"], "dr_grpo": ["loss_type=dr_grpo", "scale_rewards=none"]}


def train_both(args: argparse.Namespace) -> dict[str, Path]:
    """Each loss's run directory, trained (or continued) to `args.steps`."""
    shared = [
        f"init_from={args.start}", f"task={args.task}", f"difficulty={args.difficulty}", f"max_steps={args.steps}",
        "batch_size=8", "num_generations=8", "max_completion_length=40", f"lr={args.lr}", f"min_lr={args.lr}",
        "format_weight=0", "seed=0", f"save_every={args.window}", "keep_checkpoints=1",
    ]  # fmt: skip
    runs = {}
    for name, loss in LOSSES.items():
        out_dir = args.out / name
        config = resolve_train_config(None, [*shared, *loss, f"out_dir={out_dir}"], cls=GRPOConfig)
        run_rl(config, resume=bool(list_checkpoints(out_dir)))
        runs[name] = out_dir
    return runs


def mean(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", type=checkpoint_folder, help="the SFT checkpoint both runs start from")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--steps", type=positive_int, default=150)
    parser.add_argument("--lr", type=learning_rate, default=5e-5)
    parser.add_argument("--window", type=positive_int, default=30, help="steps per row of the table")
    parser.add_argument("--out", type=Path, default=Path("runs/dr_grpo"))
    args = parser.parse_args()
    check_task(parser, args.task, args.difficulty)
    runs = train_both(args)
    history = {name: [r for r in read_metrics(run) if "reward" in r] for name, run in runs.items()}
    print(f"{'steps':>9s}  " + "  ".join(f"{name + ' acc':>12s} {'len ok':>7s} {'len wrong':>9s}" for name in runs))
    for start in range(0, args.steps, args.window):
        cells = []
        for records in history.values():
            window = [r for r in records if start < r["step"] <= start + args.window]
            cells.append(
                f"{mean(window, 'accuracy'):12.3f} {mean(window, 'completion_length_correct'):7.2f} "
                f"{mean(window, 'completion_length_incorrect'):9.2f}"
            )
        print(f"{start + 1:4d}-{start + args.window:<4d}  " + "  ".join(cells))
    task = make_task(args.task, args.difficulty)
    for name, run in runs.items():
        engine = Engine.from_pretrained(list_checkpoints(run)[-1], max_batch_size=800, max_model_len=256)
        scores = evaluate_task(engine, task, problems=100, samples=8, max_new_tokens=64)
        held_out = f"pass@1 {scores['pass@1']:.3f}, pass@8 {scores['pass@8']:.3f}"
        print(f"{name:8s} after {args.steps} steps, held out: {held_out}")
    print(f"wrote {plot_rl_runs(list(runs.values()), args.out / 'grpo_vs_dr_grpo.png', smooth=args.window // 3)}")


if __name__ == "__main__":
    main()
