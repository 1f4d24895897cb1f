"""SFT packing: useful (non-padding) tokens per second of `seekstack sft` with packing=true against padded batches.

Conversations of mixed lengths (most a short exchange, one in five a long answer) are written as a chat file, a
byte-level tokenizer is trained on them, and a fresh micro DeepSeek-V3 model (MoE, MLA, MTP) is fine-tuned on them
twice by the trainer (`run_sft`), `batch_size` rows a micro-batch both times: padded, each row one conversation
right-padded to the batch's longest; packed, each row up to seq_len tokens of several conversations (best-fit
decreasing, each attending within itself). The batches are replayed from the same seed (`SFTSource`) to count the
tokens that are not padding, and the useful tokens per second of the timed steps (all but the first two) are printed
for each, with their ratio.
Usage:
    OMP_NUM_THREADS=2 python bench/sft_packing.py [--conversations 256] [--steps 12] [--batch-size 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from options import positive_int

from seekstack.posttrain.config import SFTConfig
from seekstack.posttrain.conversations import Conversation, write_conversations
from seekstack.posttrain.padding import real_tokens
from seekstack.posttrain.sft import SFTSource, run_sft
from seekstack.tokenizer import train_tokenizer
from seekstack.train.config import resolve_train_config

WARMUP_STEPS = 2  # not timed: the first steps allocate and warm the kernels
MODEL = [
    "model.hidden_size=128", "model.num_hidden_layers=4", "model.intermediate_size=256", "model.num_attention_heads=4",
    "model.moe_intermediate_size=64", "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.n_group=1",
    "model.topk_group=1", "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_nope_head_dim=32",
    "model.qk_rope_head_dim=16", "model.v_head_dim=32", "model.num_nextn_predict_layers=1", "model.vocab_size=512",
]  # fmt: skip
WORDS = ["alpha", "beta", "gamma", "delta", "sum", "carry", "digit", "answer", "first", "then", "so", "is"]


def conversation(rng: random.Random) -> Conversation:
    """A question and its answer: a few words, or one time in five a few hundred bytes."""
    words = rng.randint(60, 100) if rng.random() < 0.2 else rng.randint(2, 12)
    question = f"What is {rng.randint(1, 999)} + {rng.randint(1, 999)}?"
    answer = " ".join(rng.choice(WORDS) for _ in range(words))
    return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def useful_tokens_per_s(config: SFTConfig, packing: bool) -> tuple[float, float]:
    """(useful tokens per second over the timed steps, the share of computed positions that are padding)."""
    run_sft(config)
    steps = [json.loads(line) for line in (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    replay = SFTSource(config, packing=packing)  # the same seed draws the same batches
    useful, computed, seconds = 0, 0, 0.0
    for step in steps:
        batch = replay.batch(config.batch_size, 0.0)
        if step["step"] > WARMUP_STEPS:
            input_ids, labels = batch[0], batch[1]
            useful += int(real_tokens(input_ids, labels, replay.tokenizer.pad_id).sum())
            computed += input_ids.numel()
            seconds += step["step_s"]
    return useful / seconds, 1 - useful / computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=12, help="per run, the first two untimed")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per micro-batch")
    parser.add_argument("--seq-len", type=positive_int, default=512)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps {args.steps}: at least {WARMUP_STEPS + 1}, the first {WARMUP_STEPS} being untimed")
    rng = random.Random(0)
    conversations = [conversation(rng) for _ in range(args.conversations)]
    with tempfile.TemporaryDirectory() as work:
        data = write_conversations(conversations, Path(work) / "chats.jsonl")
        texts = [message["content"] for c in conversations for message in c]
        train_tokenizer(texts, vocab_size=512, out_path=Path(work) / "tok")
        common = [f"data={data}", f"tokenizer={Path(work) / 'tok'}", f"seq_len={args.seq_len}", "eval_every=0"]
        common += [f"batch_size={args.batch_size}", f"max_steps={args.steps}", "warmup_steps=0", *MODEL]
        rates = {}
        for name, packing in [("padded", False), ("packed", True)]:
            overrides = [*common, f"packing={str(packing).lower()}", f"out_dir={Path(work) / name}"]
            rates[name], padding = useful_tokens_per_s(resolve_train_config(None, overrides, cls=SFTConfig), packing)
            print(f"{name}: {rates[name]:,.0f} useful tokens/s, {padding:.0%} of the computed positions padding")
    print(f"packed / padded: {rates['packed'] / rates['padded']:.2f}x useful tokens/s")


if __name__ == "__main__":
    main()
