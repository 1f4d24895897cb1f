"""R1-distill vs GRPO alone on the same smaller student, for the same wall-clock time (DeepSeek-R1 §4.1's comparison).

Distill: the teacher (the GRPO-trained model) samples traces on training prompts through the engine, rejection
sampling keeps the verified ones (`seekstack traces`), the student is SFT-trained on them (`seekstack sft data=...`).
The wall-clock seconds of both stages are the budget. GRPO alone then trains the same student from the same
pretrained start (no SFT, as R1 §4.1's RL-on-the-base arm), in chunks of steps, until the seconds its steps took
(metrics.jsonl `step_s`) reach the budget. Prints the teacher's, the student start's and both arms' held-out
pass@1 / pass@8 / greedy accuracy and sizes. Usage (one thread):
    OMP_NUM_THREADS=1 python bench/r1_distill.py --teacher TEACHER --student STUDENT [--prompts 2000] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from options import check_task, checkpoint_folder, config_number, learning_rate, positive_int

from seekstack.accounting import main_parameters
from seekstack.checkpoint import load_pretrained
from seekstack.infer import Engine, SamplingParams
from seekstack.posttrain.config import GRPOConfig, SFTConfig
from seekstack.posttrain.conversations import write_conversations
from seekstack.posttrain.distill import verified_traces
from seekstack.posttrain.evaluate import evaluate_task
from seekstack.posttrain.rl import run_rl
from seekstack.posttrain.sft import run_sft
from seekstack.posttrain.tasks import make_task
from seekstack.tokenizer import Tokenizer
from seekstack.train.config import resolve_train_config


def engine_for(checkpoint: Path, max_batch_size: int) -> Engine:
    return Engine(
        load_pretrained(checkpoint), Tokenizer.from_file(checkpoint), max_batch_size=max_batch_size, max_model_len=256
    )


def held_out(checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    engine = engine_for(checkpoint, max_batch_size=800)
    scores = evaluate_task(engine, make_task(args.task, args.difficulty), problems=100, samples=8, max_new_tokens=64)
    return {**scores, "parameters": main_parameters(engine.model.config).total}


def distill(args: argparse.Namespace, out: Path) -> tuple[Path, float, dict]:
    started = time.perf_counter()
    teacher = engine_for(args.teacher, max_batch_size=64 * args.samples)
    task = make_task(args.task, args.difficulty)
    traces = verified_traces(teacher, task, args.prompts, args.samples, temperature=args.temperature, seed=1)
    data = write_conversations(traces.conversations, out / "traces.jsonl")
    traces_s = time.perf_counter() - started
    overrides = [
        f"init_from={args.student}", f"out_dir={out / 'sft'}", f"data={data}", f"task={args.task}",
        f"difficulty={args.difficulty}", f"max_steps={args.sft_steps}", "batch_size=32", "lr=3e-3", "min_lr=1e-4",
        "warmup_steps=20",
    ]  # fmt: skip
    checkpoint = run_sft(resolve_train_config(None, overrides, cls=SFTConfig)).checkpoint
    stats = {
        "traces_kept": len(traces.conversations), "traces_sampled": traces.sampled, "accept_rate": traces.accept_rate,
        "prompts_solved": traces.prompts_solved / traces.prompts, "traces_s": traces_s,
        "sft_s": time.perf_counter() - started - traces_s,
    }  # fmt: skip
    return checkpoint, time.perf_counter() - started, stats


def grpo_for(budget_s: float, args: argparse.Namespace, out: Path) -> tuple[Path, float, int]:
    """GRPO from the student's start until its steps' seconds reach `budget_s` (resumed in chunks of steps)."""
    overrides = [
        f"init_from={args.student}", f"out_dir={out / 'grpo'}", f"task={args.task}", f"difficulty={args.difficulty}",
        "batch_size=8", "num_generations=8", "max_completion_length=40", f"lr={args.grpo_lr}",
        f"min_lr={args.grpo_lr}", "format_weight=0.1", f"save_every={args.chunk}",
    ]  # fmt: skip
    steps, spent, checkpoint = 0, 0.0, None
    while spent < budget_s:
        steps += args.chunk
        config = resolve_train_config(None, [*overrides, f"max_steps={steps}"], cls=GRPOConfig)
        checkpoint = run_rl(config, resume=steps > args.chunk).checkpoint
        lines = (out / "grpo" / "metrics.jsonl").read_text().splitlines()
        spent = sum(json.loads(line)["step_s"] for line in lines)
    assert checkpoint is not None
    return checkpoint, spent, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=checkpoint_folder, required=True, help="the GRPO-trained checkpoint")
    parser.add_argument("--student", type=checkpoint_folder, required=True, help="a smaller pretrained checkpoint")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--prompts", type=positive_int, default=2000, help="training problems the teacher samples on")
    parser.add_argument("--samples", type=positive_int, default=2, help="teacher samples per problem")
    parser.add_argument(
        "--temperature",
        type=config_number(SamplingParams, "temperature"),
        default=1.0,
        help="the teacher's sampling temperature, as the engine takes it (0: greedy)",
    )
    parser.add_argument("--sft-steps", type=positive_int, default=150)
    parser.add_argument("--grpo-lr", type=learning_rate, default=5e-5)
    parser.add_argument("--chunk", type=positive_int, default=20, help="GRPO steps between budget checks")
    parser.add_argument("--out", type=Path, default=Path("runs/r1_distill"))
    args = parser.parse_args()
    check_task(parser, args.task, args.difficulty)
    if args.out.exists():
        parser.error(f"--out {args.out} exists: remove it or name another (the GRPO arm resumes from what is there)")
    print(f"torch threads: {torch.get_num_threads()}")
    torch.manual_seed(0)
    distilled, budget, stats = distill(args, args.out)
    grpo, spent, steps = grpo_for(budget, args, args.out)
    rows = {
        "teacher (GRPO-trained)": held_out(args.teacher, args),
        "student (pretrained start)": held_out(args.student, args),
        f"student distilled ({budget:.0f} s)": held_out(distilled, args),
        f"student GRPO alone ({spent:.0f} s, {steps} st.)": held_out(grpo, args),
    }
    print(json.dumps(stats))
    print(f"{'model':40s} params  pass@1  pass@8  greedy  format")
    for name, s in rows.items():
        scores = "   ".join(f"{s[key]:.3f}" for key in ("pass@1", "pass@8", "greedy", "format"))
        print(f"{name:40s} {s['parameters'] / 1e6:5.2f}M  {scores}")
    (args.out / "results.json").write_text(json.dumps({"stats": stats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
