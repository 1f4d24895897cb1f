"""Distillation quality: a tiny MoE teacher trained on the demo corpus, a dense student with <= 1/8 of its
parameters, six ways of training the student at an equal token budget.

The teacher (the `tiny` preset, MoE) is trained once on the demo shards and cached in OUT/teacher. Each variant
trains the same dense DeepSeek-V3 student (every layer dense, tied embeddings) for the same steps, batch and
sequence length through `seekstack distill`: CE only (the scratch student), forward KL (with CE: 0.5 + 0.5, and
alone), reverse KL, GKD on-policy (JSD beta=0.5, half the batches the student's own continuations), GKD +
hierarchical feature KD (cosine, student layers 0, 1 -> teacher layers 1, 3), and two on-policy ablations: forward
KL with half the batches on-policy, and GKD whose on-policy batches start half way (a warm student); T=1 throughout.
All are scored on the same held-out windows of the demo's validation split: bits per byte, next-token top-1
accuracy, top-1 agreement with the teacher; then the fraction of the scratch-student-to-teacher gap in bits per
byte each closes, and accuracy as a percentage of the teacher's (the "7B reaches 92% of 70B"-style figure). Runs
already trained in OUT are reused. Usage (after `make demo`, which builds runs/demo/tokens):
    OMP_NUM_THREADS=1 python bench/distill.py [--steps 200] [--batch-size 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from options import check_context, positive_int, token_shards

from seekstack.checkpoint import load_pretrained
from seekstack.distill.config import DistillConfig
from seekstack.distill.run import run_distill
from seekstack.model.transformer import Transformer
from seekstack.tokens.shards import TokenWindows, load_index
from seekstack.train.config import TrainConfig, resolve_train_config
from seekstack.train.runs import latest_checkpoint
from seekstack.train.trainer import train

TEACHER_STEPS = 400
TEACHER = [
    "model=tiny", f"max_steps={TEACHER_STEPS}", "batch_size=16", "seq_len=256", "lr=3e-3", "min_lr=3e-4",
    "warmup_steps=40", f"eval_every={TEACHER_STEPS}", "eval_batches=20", "save_every=100", "keep_checkpoints=1",
]  # fmt: skip
# Dense DeepSeek-V3 student: 2 dense layers (first_k_dense_replace = num_hidden_layers), width 48, tied embeddings.
STUDENT = [
    "model=tiny", "model.hidden_size=48", "model.intermediate_size=128", "model.num_hidden_layers=2",
    "model.first_k_dense_replace=2", "model.num_attention_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.num_nextn_predict_layers=0",
    "model.tie_word_embeddings=true",
]  # fmt: skip
GKD = ["beta=0.5", "lmbda=0.5", "prompt_tokens=64"]
VARIANTS = {
    "ce_only": ["ce_weight=1.0", "kd_weight=0.0"],
    "forward_kl": ["beta=0.0"],
    "forward_kl_only": ["beta=0.0", "ce_weight=0.0", "kd_weight=1.0"],  # no cross-entropy
    "reverse_kl": ["beta=1.0"],
    "gkd_on_policy": GKD,
    "gkd_features": [*GKD, "feature_layers={0: 1, 1: 3}", "feature_loss=cosine"],
    "forward_kl_on_policy": ["beta=0.0", "lmbda=0.5", "prompt_tokens=64"],  # forward_kl with on-policy batches
    "gkd_warm": [*GKD, "on_policy_after=100"],  # on-policy batches in the second half of the default 200 steps
}


def teacher_checkpoint(data_dir: Path, out: Path) -> Path:
    """The cached teacher, trained first when absent."""
    folder = out / "teacher"
    final = folder / "checkpoints" / f"step_{TEACHER_STEPS}"
    if not final.is_dir():
        config = resolve_train_config(None, [*TEACHER, f"data_dir={data_dir}", f"out_dir={folder}"], cls=TrainConfig)
        train(config, resume=(folder / "checkpoints").is_dir())
    return final


def train_student(name: str, teacher: Path, data_dir: Path, out: Path, args: argparse.Namespace) -> Path:
    folder = out / name
    final = folder / "checkpoints" / f"step_{args.steps}"
    if not final.is_dir():
        run = [
            *STUDENT, f"data_dir={data_dir}", f"out_dir={folder}", f"teacher={teacher}", f"max_steps={args.steps}",
            f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", "lr=3e-3", "min_lr=3e-4", "warmup_steps=30",
            "eval_every=0", "save_every=100", "keep_checkpoints=1", "bias_update_rate=0.0", *VARIANTS[name],
        ]  # fmt: skip
        run_distill(resolve_train_config(None, run, cls=DistillConfig))
    return latest_checkpoint(folder)


def parameters(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def score(models: dict[str, Transformer], data_dir: Path, seq_len: int, batches: int) -> dict[str, dict]:
    """Bits per byte, top-1 accuracy and top-1 agreement with the teacher of each model, on the same windows."""
    val = TokenWindows(data_dir, "val", seq_len)
    index = load_index(data_dir, "val")
    nats = {name: 0.0 for name in models}
    correct = {name: 0 for name in models}
    agree = {name: 0 for name in models}
    targets = 0
    for number, batch in enumerate(val.sequential(16)):
        if number == batches:
            break
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = {name: model(inputs).logits.float() for name, model in models.items()}
        teacher_top1 = logits["teacher"].argmax(-1)
        for name, values in logits.items():
            nats[name] += torch.nn.functional.cross_entropy(values.flatten(0, 1), labels.flatten(), reduction="sum")
            correct[name] += int((values.argmax(-1) == labels).sum())
            agree[name] += int((values.argmax(-1) == teacher_top1).sum())
        targets += labels.numel()
    bytes_per_token = index["text_bytes"] / index["total_tokens"]
    return {
        name: {
            "val_bpb": float(nats[name]) / targets / (math.log(2) * bytes_per_token),
            "accuracy": correct[name] / targets,
            "agreement": agree[name] / targets,
        }
        for name in models
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=token_shards("train", "val"), default="runs/demo/tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/distill"))
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--eval-batches", type=positive_int, default=40)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    context = resolve_train_config(None, STUDENT, cls=TrainConfig).model_config().max_position_embeddings
    check_context(parser, "--seq-len", args.seq_len, context, "the student's and the teacher's (preset tiny)")
    teacher = teacher_checkpoint(args.data, args.out)
    students = {name: train_student(name, teacher, args.data, args.out, args) for name in args.variants}
    models = {"teacher": load_pretrained(teacher).eval()}
    models |= {name: load_pretrained(path).eval() for name, path in students.items()}
    scores = score(models, args.data, args.seq_len, args.eval_batches)
    teacher_score = scores["teacher"]
    scratch = scores.get("ce_only")
    sizes = {name: parameters(model) for name, model in models.items()}
    without_mtp = sizes["teacher"] - sum(p.numel() for p in models["teacher"].mtp.parameters())
    print(f"teacher {sizes['teacher']:,} parameters (MoE; {without_mtp:,} without its MTP module), student "
          f"{sizes[args.variants[0]]:,} (dense): 1/{sizes['teacher'] / sizes[args.variants[0]]:.1f} "
          f"(1/{without_mtp / sizes[args.variants[0]]:.1f}); {args.steps} steps x {args.batch_size} x "
          f"{args.seq_len} tokens per student")  # fmt: skip
    print(f"{'model':<15} {'val bpb':>8} {'gap closed':>10} {'top-1 acc':>9} {'% teacher':>9} {'agree':>6}")
    for name, result in scores.items():
        if scratch is not None and name != "teacher":
            gap = scratch["val_bpb"] - teacher_score["val_bpb"]
            result["gap_closed"] = (scratch["val_bpb"] - result["val_bpb"]) / gap
        result["accuracy_vs_teacher"] = result["accuracy"] / teacher_score["accuracy"]
        result["parameters"] = sizes[name]
        gap_text = f"{result['gap_closed']:.1%}" if "gap_closed" in result else "-"
        print(
            f"{name:<15} {result['val_bpb']:>8.4f} {gap_text:>10} {result['accuracy']:>9.2%} "
            f"{result['accuracy_vs_teacher']:>9.1%} {result['agreement']:>6.1%}"
        )
    (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"data": str(args.data),
        "out": str(args.out)}, "scores": scores}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
