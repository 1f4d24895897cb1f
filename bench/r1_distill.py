"""R1-distill vs GRPO alone on the same student, for the same wall-clock time (DeepSeek-R1 §4.1's comparison).

Distill: the teacher samples traces on training prompts through the engine, rejection sampling keeps the verified
ones (`seekstack traces`), the student is SFT-trained on them (`seekstack sft data=...`). The wall-clock time of
both stages is the budget; GRPO then trains the same student from the same start, in chunks of steps, until the
seconds its steps took (metrics.jsonl `step_s`) reach the budget. Prints held-out pass@1 / pass@8 of both. Usage:
    OMP_NUM_THREADS=1 python bench/r1_distill.py --teacher TEACHER --student STUDENT [--prompts 500] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from seekstack.checkpoint import load_pretrained
from seekstack.infer import Engine
from seekstack.posttrain.config import GRPOConfig, SFTConfig
from seekstack.posttrain.conversations import write_conversations
from seekstack.posttrain.distill import verified_traces
from seekstack.posttrain.evaluate import evaluate_task
from seekstack.posttrain.rl import run_rl
from seekstack.posttrain.sft import run_sft
from seekstack.posttrain.tasks import make_task
from seekstack.tokenizer import Tokenizer
from seekstack.train.config import resolve_train_config


def held_out(checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    engine = Engine(load_pretrained(checkpoint), Tokenizer.from_file(checkpoint), max_batch_size=800, max_model_len=256)
    return evaluate_task(engine, make_task(args.task, args.difficulty), problems=100, samples=8, max_new_tokens=64)


def distill(args: argparse.Namespace, out: Path) -> tuple[Path, float, dict]:
    started = time.perf_counter()
    teacher = Engine(
        load_pretrained(args.teacher), Tokenizer.from_file(args.teacher), max_batch_size=64 * args.samples,
        max_model_len=256,
    )  # fmt: skip
    traces = verified_traces(teacher, make_task(args.task, args.difficulty), args.prompts, args.samples, seed=1)
    data = write_conversations(traces.conversations, out / "traces.jsonl")
    overrides = [
        f"init_from={args.student}", f"out_dir={out / 'sft'}", f"data={data}", f"task={args.task}",
        f"difficulty={args.difficulty}", f"max_steps={args.sft_steps}", "batch_size=32", "lr=3e-3", "min_lr=1e-4",
        "warmup_steps=20",
    ]  # fmt: skip
    checkpoint = run_sft(resolve_train_config(None, overrides, cls=SFTConfig)).checkpoint
    stats = {"traces_kept": len(traces.conversations), "accept_rate": traces.accept_rate}
    return checkpoint, time.perf_counter() - started, stats


def grpo_for(budget_s: float, args: argparse.Namespace, out: Path) -> tuple[Path, float, int]:
    overrides = [
        f"init_from={args.student}", f"out_dir={out / 'grpo'}", f"task={args.task}", f"difficulty={args.difficulty}",
        "batch_size=8", "num_generations=8", "max_completion_length=40", "lr=5e-5", "min_lr=5e-5",
        "format_weight=0.1", "save_every=10",
    ]  # fmt: skip
    steps, spent, checkpoint = 0, 0.0, None
    while spent < budget_s:
        steps += 10
        config = resolve_train_config(None, [*overrides, f"max_steps={steps}"], cls=GRPOConfig)
        checkpoint = run_rl(config, resume=steps > 10).checkpoint
        lines = (out / "grpo" / "metrics.jsonl").read_text().splitlines()
        spent = sum(json.loads(line)["step_s"] for line in lines)
    assert checkpoint is not None
    return checkpoint, spent, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--task", default="addition")
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("runs/r1_distill"))
    args = parser.parse_args()
    torch.manual_seed(0)
    distilled, budget, stats = distill(args, args.out)
    grpo, spent, steps = grpo_for(budget, args, args.out)
    rows = {
        "student (start)": held_out(args.student, args),
        f"distilled ({budget:.0f} s)": held_out(distilled, args),
        f"GRPO alone ({spent:.0f} s, {steps} steps)": held_out(grpo, args),
    }
    print(json.dumps(stats))
    print(f"{'student':34s} pass@1  pass@8  format")
    for name, scores in rows.items():
        print(f"{name:34s} {scores['pass@1']:.3f}   {scores['pass@8']:.3f}   {scores['format']:.3f}")


if __name__ == "__main__":
    main()
