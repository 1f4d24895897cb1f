"""GRPO step time: seekstack rl vs TRL's GRPOTrainer on the same checkpoint, task, prompts and settings.

Both runs: one checkpoint (ours loads in transformers as DeepseekV3ForCausalLM), the same task and reward terms
(correctness + 0.1 x format), P prompts x G generations per step, the same max completion length, temperature
1, beta 0, loss_type grpo, one policy update per generation batch, N steps. Prints seconds per step (the median
of steps 2..N, the first includes warm-up), the share spent generating (median of those steps' shares: a step that
compiles a new decode graph does not skew it) and the reward of the last steps, and the ratio; then the seconds our
rollouts spent compiling their decode step, and the total of all N steps, warm-up included, with and without them.
`--compile-decode` is rl's `compile_decode` (true, its default, or false), `--threads` rl's `threads` (auto, its
default: rollouts on one thread, the training half on as many as the machine leaves idle; N; 0 = torch's setting,
which TRL runs on). Ours runs twice: as rl's defaults do (on-policy, as TRL) and with `async_rollouts` (the next
batch sampled beside the training, one step off-policy), whose share is the step's wait for its batch.
Usage:
    OMP_NUM_THREADS=2 python bench/grpo_step.py CHECKPOINT [--steps 10] [--prompts 2] [--generations 8] [--tokens 64]
        [--compile-decode true|false] [--threads auto|N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from seekstack.posttrain.config import GRPOConfig
from seekstack.posttrain.conversations import prompt_messages
from seekstack.posttrain.rewards import reward_terms
from seekstack.posttrain.rl import run_rl
from seekstack.posttrain.tasks import make_task, sample_problems
from seekstack.tokenizer import Tokenizer
from seekstack.train.config import resolve_train_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from options import check_task, learning_rate, positive_int
from peers import peer_missing
from trainer_timing import record_step_seconds  # noqa: E402


def run_ours(args: argparse.Namespace, out_dir: Path, async_rollouts: bool) -> dict:
    overrides = [
        f"init_from={args.checkpoint}", f"out_dir={out_dir}", f"task={args.task}", f"max_steps={args.steps}",
        f"batch_size={args.prompts}", f"num_generations={args.generations}", f"max_completion_length={args.tokens}",
        f"lr={args.lr}", f"min_lr={args.lr}", "temperature=1.0", "beta=0.0", "loss_type=grpo", "seed=0",
        "format_weight=0.1", "grad_clip=1.0",
        f"compile_decode={args.compile_decode}", f"threads={args.threads}", f"async_rollouts={async_rollouts}",
    ]  # fmt: skip
    if args.difficulty:
        overrides.append(f"difficulty={args.difficulty}")
    run_rl(resolve_train_config(None, overrides, cls=GRPOConfig))
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": [line["step_s"] for line in lines],
        "generate_s": [line["wait_s" if async_rollouts else "generate_s"] for line in lines],
        "share_of": "waiting" if async_rollouts else "generating",
        "reward": [line["reward"] for line in lines],
        "compile_s": [line["compile_s"] for line in lines],
    }


def run_trl(args: argparse.Namespace, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    task = make_task(args.task, args.difficulty or None)
    ours = Tokenizer.from_file(args.checkpoint)
    problems = sample_problems(task, args.steps * args.prompts, "train", seed=0)
    by_prompt = {ours.render_chat(prompt_messages(p)): p for p in problems}
    dataset = Dataset.from_dict({"prompt": list(by_prompt)})

    def terms(prompts: list[str], completions: list[str], completion_ids: list[list[int]]) -> list[dict]:
        # TRL decodes without special tokens; a completion ended by the model ends with its EOS id
        return [
            reward_terms(task, by_prompt[p], c, ended=bool(ids) and ids[-1] == ours.eos_id)
            for p, c, ids in zip(prompts, completions, completion_ids, strict=True)
        ]

    def correctness(prompts, completions, completion_ids, **kwargs):
        return [t["correctness"] for t in terms(prompts, completions, completion_ids)]

    def format_reward(prompts, completions, completion_ids, **kwargs):
        return [t["format"] for t in terms(prompts, completions, completion_ids)]

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config = TRLConfig(
        output_dir=str(out_dir), use_cpu=True, max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.tokens, temperature=1.0, beta=0.0, loss_type="grpo", scale_rewards="group",
        reward_weights=[1.0, 0.1], logging_steps=1, report_to="none", save_strategy="no", seed=0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, shuffle_dataset=False,
        dataloader_num_workers=0, bf16=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[correctness, format_reward], args=config, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    generate_s: list[float] = []
    generate = model.generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            generate_s.append(time.perf_counter() - started)

    model.generate = timed_generate
    step_s = record_step_seconds(trainer)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    return {"step_s": step_s, "generate_s": generate_s, "reward": rewards, "compile_s": [0.0]}  # TRL runs eagerly


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: a busy machine (above its core count) makes both timings unreliable."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def summary(name: str, result: dict) -> dict:
    steady = result["step_s"][1:] or result["step_s"]
    generate = result["generate_s"][1 : len(result["step_s"])] or result["generate_s"]
    tail = result["reward"][-max(1, len(result["reward"]) // 2) :]
    row = {
        "name": name,
        "s_per_step": statistics.median(steady),
        "generate_share": statistics.median(g / s for g, s in zip(generate, steady, strict=False)),
        "reward_first": result["reward"][0],
        "reward_last_half": sum(tail) / len(tail),
        "total_s": sum(result["step_s"]),
        "compile_s": sum(result["compile_s"]),
    }
    print(
        f"{name:10s} {row['s_per_step']:7.3f} s/step  {result.get('share_of', 'generating')} "
        f"{row['generate_share']:5.1%}  "
        f"reward step 1 {row['reward_first']:.3f}, last half {row['reward_last_half']:.3f}  "
        f"compiling {row['compile_s']:.1f} s"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--difficulty", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--prompts", type=positive_int, default=2)
    parser.add_argument("--generations", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=64)
    parser.add_argument("--lr", type=learning_rate, default=1e-5)
    parser.add_argument(
        "--compile-decode", choices=["true", "false"], default="true", help="rl's compile_decode for our rollouts"
    )
    parser.add_argument("--threads", default="auto", help="rl's threads for our run: auto, N, or 0 = torch's setting")
    args = parser.parse_args()
    check_task(parser, args.task, args.difficulty or None)
    print(
        f"torch threads: {torch.get_num_threads()}; {args.prompts} prompts x {args.generations} x {args.tokens} "
        f"tokens; ours: compile_decode={args.compile_decode}, threads={args.threads}"
    )
    trl_missing = peer_missing("trl", ("trl",), "pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as scratch:
        print(f"load average before: {load_average()}")
        ours = summary("seekstack", run_ours(args, Path(scratch) / "ours", async_rollouts=False))
        print(f"load average between: {load_average()}")
        if trl_missing:
            print(trl_missing)
        else:
            trl = summary("trl", run_trl(args, Path(scratch) / "trl"))
            print(f"load average between: {load_average()}")
        ahead = summary("async", run_ours(args, Path(scratch) / "async", async_rollouts=True))
        print(f"load average after: {load_average()}")
    if trl_missing:
        return
    print(f"seekstack is {trl['s_per_step'] / ours['s_per_step']:.2f}x faster per step")
    print(f"seekstack with async_rollouts is {trl['s_per_step'] / ahead['s_per_step']:.2f}x faster per step")
    print(
        f"all {args.steps} steps, warm-up included: seekstack {ours['total_s']:.1f} s, trl {trl['total_s']:.1f} s "
        f"({trl['total_s'] / ours['total_s']:.2f}x); without our {ours['compile_s']:.1f} s of compiling: seekstack "
        f"{ours['total_s'] - ours['compile_s']:.1f} s ({trl['total_s'] / (ours['total_s'] - ours['compile_s']):.2f}x)"
    )


if __name__ == "__main__":
    main()
