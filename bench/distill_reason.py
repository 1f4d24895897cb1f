"""Distilling the reasoning model: held-out task accuracy a small dense student keeps of its teacher's.

The teacher is bench/distill.py's tiny MoE (trained on the demo corpus) after `seekstack sft` on the task's worked
traces, cached in OUT/teacher. It writes its own traces on training problems, kept when the verifier accepts them
(`seekstack traces`, R1's rejection sampling). Every student starts from the same checkpoint (bench/distill.py's
dense CE-only student: 1/11 of the teacher's parameters, pretrained on the corpus, unable to answer) and trains for
the same steps on the same conversations, every loss on the assistant's tokens only:
  - sft:         cross-entropy alone (`seekstack sft data=traces.jsonl`; R1-distill);
  - kd:          0.5 CE + 0.5 forward KL to the teacher's next-token distributions (`seekstack distill data=...`);
  - kd_only:     forward KL alone;
  - gkd_warm:    kd for the first half of the steps, then half the batches the student's own answers to the
                 prompts scored by the teacher (GKD, JSD beta=0.5; on_policy_after).
Prints each model's held-out pass@1 (8 samples at temperature 1), greedy accuracy and format rate, and pass@1 as a
fraction of the teacher's. Runs already in OUT are reused. Usage (after bench/distill.py):
    OMP_NUM_THREADS=1 python bench/distill_reason.py [--steps 300] [--problems 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from options import check_task, checkpoint_folder, positive_int

from seekstack.distill.config import DistillConfig
from seekstack.distill.run import run_distill
from seekstack.infer import Engine
from seekstack.posttrain.config import SFTConfig
from seekstack.posttrain.conversations import write_conversations
from seekstack.posttrain.distill import verified_traces
from seekstack.posttrain.evaluate import evaluate_task
from seekstack.posttrain.sft import run_sft
from seekstack.posttrain.tasks import make_task
from seekstack.train.config import resolve_train_config
from seekstack.train.runs import latest_checkpoint

TEACHER_STEPS = 800
TEACHER_SFT = [
    f"max_steps={TEACHER_STEPS}", "batch_size=32", "lr=3e-3", "min_lr=1e-4", "warmup_steps=20", "examples=20000",
]  # fmt: skip
STUDENT_RUN = ["batch_size=32", "seq_len=128", "lr=3e-3", "min_lr=1e-4", "warmup_steps=20", "save_every=0"]
KD = ["ce_weight=0.5", "kd_weight=0.5", "beta=0.0"]
VARIANTS = {
    "sft": None,  # seekstack sft
    "kd": KD,
    "kd_only": ["ce_weight=0.0", "kd_weight=1.0", "beta=0.0"],
    "gkd_warm": ["ce_weight=0.5", "kd_weight=0.5", "beta=0.5", "lmbda=0.5"],  # + on_policy_after=steps/2
}


def task_args(args: argparse.Namespace) -> list[str]:
    return [f"task={args.task}", f"difficulty={args.difficulty}"]


def teacher_checkpoint(args: argparse.Namespace) -> Path:
    """The reasoning teacher: the corpus MoE after SFT on the task's traces, trained first when absent."""
    folder = args.out / "teacher"
    final = folder / "checkpoints" / f"step_{TEACHER_STEPS}"
    if not final.is_dir():
        run = [f"init_from={args.base_teacher}", f"out_dir={folder}", *task_args(args), *TEACHER_SFT]
        run_sft(resolve_train_config(None, run, cls=SFTConfig))
    return final


def teacher_traces(teacher: Path, args: argparse.Namespace) -> Path:
    """The teacher's verified traces on training problems (one sample each), written once."""
    path = args.out / "traces.jsonl"
    if not path.is_file():
        engine = Engine.from_pretrained(teacher, max_batch_size=256, max_model_len=256)
        traces = verified_traces(engine, make_task(args.task, args.difficulty), args.prompts, 1, seed=1)
        write_conversations(traces.conversations, path)
        print(json.dumps({"traces": len(traces.conversations), "accept_rate": traces.accept_rate}))
    return path


def train_student(name: str, teacher: Path, traces: Path, args: argparse.Namespace) -> Path:
    folder = args.out / name
    if not (folder / "checkpoints" / f"step_{args.steps}").is_dir():
        run = [f"init_from={args.student}", f"out_dir={folder}", f"data={traces}", f"max_steps={args.steps}"]
        run += [*task_args(args), *STUDENT_RUN]
        if VARIANTS[name] is None:
            run_sft(resolve_train_config(None, run, cls=SFTConfig))
        else:
            run += [f"teacher={teacher}", *VARIANTS[name], f"on_policy_after={args.steps // 2}"]
            run_distill(resolve_train_config(None, run, cls=DistillConfig))
    return latest_checkpoint(folder)


def held_out(checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    engine = Engine.from_pretrained(checkpoint, max_batch_size=8 * args.problems, max_model_len=256)
    task = make_task(args.task, args.difficulty)
    return evaluate_task(engine, task, problems=args.problems, samples=8, max_new_tokens=64, seed=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the defaults are bench/distill.py's; a string default goes through `type` too, so a missing one is refused
    parser.add_argument("--base-teacher", type=checkpoint_folder, default="runs/distill/teacher/checkpoints/step_400")
    parser.add_argument("--student", type=checkpoint_folder, default="runs/distill/ce_only/checkpoints/step_200")
    parser.add_argument("--task", default="addition")
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--prompts", type=positive_int, default=4000)
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--problems", type=positive_int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/distill_reason"))
    args = parser.parse_args()
    check_task(parser, args.task, args.difficulty)
    torch.manual_seed(0)
    teacher = teacher_checkpoint(args)
    traces = teacher_traces(teacher, args)
    models = {"teacher": teacher, "student (start)": args.student}
    models |= {name: train_student(name, teacher, traces, args) for name in args.variants}
    scores = {name: held_out(path, args) for name, path in models.items()}
    sizes = {name: sum(p.numel() for p in Engine.from_pretrained(path).model.parameters()) for name, path in
             (("teacher", teacher), ("student", args.student))}  # fmt: skip
    print(f"{args.task} difficulty {args.difficulty}; teacher {sizes['teacher']:,} parameters (MoE), student "
          f"{sizes['student']:,} (dense, 1/{sizes['teacher'] / sizes['student']:.1f}); {args.steps} steps x 32 "
          f"conversations per student; {args.problems} held-out problems x 8 samples")  # fmt: skip
    print(f"{'model':<16} {'pass@1':>7} {'retained':>8} {'greedy':>7} {'format':>7}")
    for name, result in scores.items():
        result["retained"] = result["pass@1"] / scores["teacher"]["pass@1"]
        print(
            f"{name:<16} {result['pass@1']:>7.3f} {result['retained']:>8.1%} {result['greedy']:>7.3f} "
            f"{result['format']:>7.3f}"
        )
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "scores": scores}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
