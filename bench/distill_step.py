"""Distillation step time with the teacher in the loop: seekstack distill vs TRL's GKDTrainer, same pair and batch.

Both runs: the same teacher and student checkpoints (ours, which load in transformers as DeepseekV3ForCausalLM),
the same rows of token shards (B x T tokens per step), the loss GKD's JSD with beta=0.5 at temperature 1 alone
(no cross-entropy), off-policy (lmbda=0), AdamW at a constant rate, gradient clipping at 1, N steps. Prints each
one's seconds per step (the median of steps 2..N; the first includes warm-up), student tokens per second, and the
ratio. Usage (bench/distill.py trains the pair):
    OMP_NUM_THREADS=1 python bench/distill_step.py runs/distill/teacher/checkpoints/step_400 \\
        runs/distill/ce_only/checkpoints/step_200 [--data runs/demo/tokens] [--steps 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from seekstack.checkpoint import read_config
from seekstack.distill.config import DistillConfig
from seekstack.distill.run import run_distill
from seekstack.tokens.shards import TokenWindows
from seekstack.train.config import resolve_train_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from options import check_context, checkpoint_folder, learning_rate, positive_int, token_shards
from peers import peer_missing
from trainer_timing import record_step_seconds  # noqa: E402


def run_ours(args: argparse.Namespace, out_dir: Path) -> list[float]:
    overrides = [
        f"init_from={args.student}", f"teacher={args.teacher}", f"data_dir={args.data}", f"out_dir={out_dir}",
        f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", f"lr={args.lr}",
        f"min_lr={args.lr}", "warmup_steps=0", "weight_decay=0.0", "grad_clip=1.0", "ce_weight=0.0", "kd_weight=1.0",
        "beta=0.5", "temperature=1.0", "lmbda=0.0", "mtp_loss_weight=0", "mtp_loss_weight_late=0",
        "bias_update_rate=0.0", "eval_every=0", "save_every=0", "seed=0",
    ]  # fmt: skip
    run_distill(resolve_train_config(None, overrides, cls=DistillConfig))
    return [json.loads(line)["step_s"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def run_trl(args: argparse.Namespace, out_dir: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    windows = TokenWindows(args.data, "train", args.seq_len)
    rows = torch.cat([batch for _, batch in zip(range(args.steps), windows.sequential(args.batch_size), strict=False)])
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([example["input_ids"] for example in examples])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    config = GKDConfig(
        output_dir=str(out_dir), use_cpu=True, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        lmbda=0.0, beta=0.5, temperature=1.0, max_length=args.seq_len + 1, logging_steps=1, report_to="none",
        save_strategy="no", seed=0, bf16=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, data_collator=collate,
        processing_class=AutoTokenizer.from_pretrained(args.student),
    )  # fmt: skip
    step_s = record_step_seconds(trainer)
    trainer.train()
    return step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", type=checkpoint_folder)
    parser.add_argument("student", type=checkpoint_folder)
    parser.add_argument("--data", type=token_shards("train"), default="runs/demo/tokens")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--lr", type=learning_rate, default=1e-4)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2, the first step (warm-up) is not timed")
    for model in (args.teacher, args.student):
        check_context(parser, "--seq-len", args.seq_len, read_config(model).max_position_embeddings, f"{model}'s")
    tokens = args.batch_size * args.seq_len
    print(f"torch threads: {torch.get_num_threads()}; {args.batch_size} x {args.seq_len} tokens per step")
    runs = {"seekstack": run_ours, "trl": run_trl}
    trl_missing = peer_missing("trl", ("trl",), "pip install -e '.[bench]'")
    if trl_missing:
        print(trl_missing)
        del runs["trl"]
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, run in runs.items():
            steady = statistics.median(run(args, Path(scratch) / name)[1:])
            seconds[name] = steady
            print(f"{name:10s} {steady:7.3f} s/step  {tokens / steady:8,.0f} student tokens/s")
    if "trl" in seconds:
        print(f"seekstack is {seconds['trl'] / seconds['seekstack']:.2f}x TRL's GKDTrainer throughput")


if __name__ == "__main__":
    main()
