"""Packing: useful (non-padding) tokens per second of `seekstack sft`, `seekstack distill` and `seekstack lora train`
on conversations with packing=true against padded batches.

Conversations of mixed lengths (most a short exchange, one in five a long answer) are written as a chat file, a
byte-level tokenizer is trained on them, and each stage trains twice through its own run function, `batch_size` rows
a micro-batch both times: padded, each row one conversation right-padded to the batch's longest; packed, each row up
to seq_len tokens of several conversations (best-fit decreasing, each attending within itself). sft fine-tunes a
fresh micro DeepSeek-V3 model (MoE, MLA, MTP); distill trains the same fresh student against a saved micro model of
that shape (the teacher, whose forward is not counted as useful work); lora train adapts that saved model (the
base). The batches are replayed from the same seed by the stage's batch source (SFTSource) to count the tokens that
are not padding, and the useful tokens per second of the timed steps (all but the first two) are printed for each,
with the packed / padded ratio per stage.
Usage:
    OMP_NUM_THREADS=2 python bench/sft_packing.py [--stages sft distill lora] [--conversations 256] [--steps 12]
        [--batch-size 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from options import check_context, positive_int

from seekstack.adapters.data import chat_source
from seekstack.adapters.training import lora_train_config, train_adapter
from seekstack.checkpoint import save_pretrained
from seekstack.distill.config import DistillConfig
from seekstack.distill.run import run_distill
from seekstack.model.transformer import Transformer
from seekstack.posttrain.config import ConversationConfig, SFTConfig
from seekstack.posttrain.conversations import Conversation, write_conversations
from seekstack.posttrain.padding import real_tokens
from seekstack.posttrain.sft import conversation_source, run_sft
from seekstack.tokenizer import TOKENIZER_FILE, train_tokenizer
from seekstack.train.config import TrainConfig, resolve_train_config

WARMUP_STEPS = 2  # not timed: the first steps allocate and warm the kernels
STAGES = ("sft", "distill", "lora")
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


def useful_tokens_per_s(config: TrainConfig, run: Callable[[], object]) -> tuple[float, float]:
    """(useful tokens per second over the timed steps of `run`, the share of computed positions that are padding)."""
    run()
    steps = [json.loads(line) for line in (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    # the stage's own batch source: the same seed draws the same batches
    replay = (
        conversation_source(config, config.packing) if isinstance(config, ConversationConfig) else chat_source(config)
    )
    useful, computed, seconds = 0, 0, 0.0
    for step in (step for step in steps if "step_s" in step):
        batch = replay.batch(config.batch_size, 0.0)
        if step["step"] > WARMUP_STEPS:
            input_ids, labels = batch[0], batch[1]
            useful += int(real_tokens(input_ids, labels, replay.tokenizer.pad_id).sum())
            computed += input_ids.numel()
            seconds += step["step_s"]
    return useful / seconds, 1 - useful / computed


def stage_run(
    stage: str, overrides: list[str], data: Path, base: Path, out: Path
) -> tuple[TrainConfig, Callable[[], object]]:
    """A stage's config and the call that trains it into `out`: sft a fresh model of MODEL, distill the same against
    `base` as its teacher, lora train an adapter of `base`."""
    if stage == "lora":
        run = lora_train_config(base, data, out, overrides)
        return run.config, lambda: train_adapter(*run)
    overrides = [*overrides, f"data={data}", f"out_dir={out}", *MODEL]
    if stage == "distill":
        config = resolve_train_config(None, [*overrides, f"teacher={base}"], cls=DistillConfig)
        return config, lambda: run_distill(config)
    config = resolve_train_config(None, [*overrides, f"tokenizer={base}"], cls=SFTConfig)
    return config, lambda: run_sft(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
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
        base = Path(work) / "base"  # the micro model distill's teacher and lora's base, with the tokenizer
        train_tokenizer(texts, vocab_size=512, out_path=Path(work) / "tok")
        model_config = resolve_train_config(
            None, [*MODEL, f"tokenizer={Path(work) / 'tok'}"], cls=SFTConfig
        ).model_config()
        check_context(parser, "--seq-len", args.seq_len, model_config.max_position_embeddings, "the model's")
        save_pretrained(Transformer(model_config), base)
        shutil.copyfile(Path(work) / "tok" / TOKENIZER_FILE, base / TOKENIZER_FILE)
        common = [f"seq_len={args.seq_len}", "eval_every=0", "warmup_steps=0", f"batch_size={args.batch_size}"]
        common += [f"max_steps={args.steps}"]
        ratios = {}
        for stage in args.stages:
            rates = {}
            for name, packing in [("padded", False), ("packed", True)]:
                overrides = [*common, f"packing={str(packing).lower()}"]
                run = stage_run(stage, overrides, data, base, Path(work) / stage / name)
                rates[name], padding = useful_tokens_per_s(*run)
                print(f"{stage} {name}: {rates[name]:,.0f} useful tokens/s, {padding:.0%} of the positions padding")
            ratios[stage] = rates["packed"] / rates["padded"]
    for stage, ratio in ratios.items():
        print(f"{stage} packed / padded: {ratio:.2f}x useful tokens/s")


if __name__ == "__main__":
    main()
