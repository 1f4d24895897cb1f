"""Domain shift with LoRA: validation bits/byte of a base model on a new domain before, after LoRA (r=8, r=16) and
after a full fine-tune with the same data, steps and batch; trainable parameters in % of the base; adapter size.

    python bench/lora_domain.py BASE DATA --out runs/lora/domain [--steps 120]

BASE is a checkpoint (e.g. the demo model, pretrained on Python source), DATA token shards of the new domain made
with the base's tokenizer (train and val splits). Every figure is measured on the same validation windows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import seekstack
from seekstack.adapters.files import ADAPTER_WEIGHTS_FILE, load_adapter
from seekstack.adapters.training import lora_train_config, train_adapter
from seekstack.tokens.shards import TokenWindows, load_index
from seekstack.train.config import resolve_train_config
from seekstack.train.trainer import VAL_SPLIT, train

# LoRA variants measured (lora.FIELD overrides); alpha = 2r throughout. Without the routed experts, whose E pairs of
# factors per layer dominate the count, the trainable share falls below 2% of the base. `vocab`: the token embedding
# and the output head only, where a code -> prose shift mostly lands.
VOCAB_ONLY = ["lora.attention=[]", "lora.feed_forward=[]", "lora.experts=[]", "lora.vocabulary=[embed_tokens,lm_head]"]
LORA_VARIANTS = {
    "lora_r8": ["lora.rank=8", "lora.alpha=16"],
    "lora_r16": ["lora.rank=16", "lora.alpha=32"],
    "lora_r8_no_experts": ["lora.rank=8", "lora.alpha=16", "lora.experts=[]"],
    "lora_r8_vocab": ["lora.rank=8", "lora.alpha=16", *VOCAB_ONLY],
    "lora_r16_vocab": ["lora.rank=16", "lora.alpha=32", *VOCAB_ONLY],
}


@torch.no_grad()
def val_bits_per_byte(model: torch.nn.Module, data: Path, seq_len: int, batch_size: int, batches: int) -> float:
    """Next-token loss over the first `batches` batches of the val split (as the trainer evaluates it; 0 = all) in
    bits per UTF-8 byte, with the split's tokens per byte."""
    model.eval()
    loss_sum, targets = 0.0, 0
    for number, batch in enumerate(TokenWindows(data, VAL_SPLIT, seq_len).sequential(batch_size)):
        if number == batches:
            break
        out = model(batch, labels=batch, keep_logits=False)
        count = batch.shape[0] * (batch.shape[1] - 1)
        loss_sum, targets = loss_sum + out.lm_loss.item() * count, targets + count
    index = load_index(data, VAL_SPLIT)
    return loss_sum / targets * index["total_tokens"] / (math.log(2) * index["text_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/lora/domain"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--eval-batches", type=int, default=0, help="validation batches measured; 0 = all")
    parser.add_argument("--variants", nargs="+", default=["base", *LORA_VARIANTS, "full"], help="what to measure")
    args = parser.parse_args()
    run = [
        f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", "eval_every=0",
        f"save_every={args.steps}", "keep_checkpoints=1", "warmup_steps=10", "seed=0",
    ]  # fmt: skip
    measure = dict(data=args.data, seq_len=args.seq_len, batch_size=args.batch_size, batches=args.eval_batches)
    base_model = seekstack.load_pretrained(args.base)
    base_params = sum(p.numel() for p in base_model.parameters())
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "base" in args.variants:
        results["base"] = {"val_bpb": val_bits_per_byte(base_model, **measure)}
    lora = [*run, f"lr={args.lora_lr}", f"min_lr={args.lora_lr / 10}"]
    for variant in (v for v in args.variants if v in LORA_VARIANTS):
        out = args.out / variant
        train_adapter(*lora_train_config(args.base, args.data, out, [*lora, *LORA_VARIANTS[variant]]))
        tuned = load_adapter(seekstack.load_pretrained(args.base), out)
        trainable = sum(p.numel() for name, p in tuned.named_parameters() if ".lora_" in name)
        results[variant] = {
            "val_bpb": val_bits_per_byte(tuned, **measure),
            "trainable_percent": 100 * trainable / base_params,
            "adapter_bytes": (out / ADAPTER_WEIGHTS_FILE).stat().st_size,
        }
    if "full" in args.variants:
        full = [*run, f"lr={args.full_lr}", f"min_lr={args.full_lr / 10}", "weight_decay=0.0", "bias_update_rate=0.0"]
        paths = [f"init_from={args.base}", f"data_dir={args.data}", f"out_dir={args.out / 'full'}"]
        result = train(resolve_train_config(None, [*full, *paths]))
        results["full"] = {
            "val_bpb": val_bits_per_byte(seekstack.load_pretrained(result.checkpoint), **measure),
            "trainable_percent": 100.0,
            "checkpoint_bytes": (result.checkpoint / "model.safetensors").stat().st_size,
        }
    if "base" in results and "full" in results:
        gain_full = results["base"]["val_bpb"] - results["full"]["val_bpb"]
        for variant in (v for v in results if v in LORA_VARIANTS):
            results[variant]["recovered_of_full_gain"] = (results["base"]["val_bpb"] - results[variant]["val_bpb"]) / (
                gain_full
            )
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    for name, figures in results.items():
        print(f"{name:<22} {json.dumps(figures)}")


if __name__ == "__main__":
    main()
