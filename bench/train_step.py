"""Training throughput of seekstack against transformers' DeepseekV3ForCausalLM: forward + backward + AdamW.

A model with random weights is saved once with `seekstack.save_pretrained`; ours and transformers' (in each
experts x attention implementation that runs on a CPU) load it, and each gets the same AdamW (foreach, decay
on matrices only) and gradient clipping. The batch is the same windows of the demo token shards (random ids
when they are missing). MTP is off and the balance loss weight is 0, so both compute the same loss: the
first step's losses are checked equal before anything is timed. Ours runs as the trainer calls it, without
materialising the logits (its loss fuses the output head with the cross-entropy); transformers' API always
returns them. Timed steps of the contenders alternate and
the median is reported; ratio = ours tok/s / theirs tok/s, above 1 means seekstack is faster. `--dtype bfloat16`
runs every contender's forward under the same CPU bf16 autocast (weights and AdamW stay float32, as the trainer's
`dtype=bfloat16`), so the ratio stays like for like; the first losses then agree within BF16_LOSS_ATOL, and the
shares printed are of the measured bf16 matmul peak.

    python bench/train_step.py                      # tiny, batch 8 x 256, a few minutes on 2 cores
    python bench/train_step.py --reps 3 --screen 1  # quick check
    python bench/train_step.py --threads 1 --clock cpu --seq-len 512 --batch 4   # on a machine others are using
    python bench/train_step.py --preset small --batch 4 --seq-len 512 --dtype bfloat16

Shapes: B batch, T tokens per sequence.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from machine import CLOCKS, add_machine_options, matmul_peaks, prepare_machine, share_of_peak
from options import check_context, positive_int
from torch import nn
from transformers import AutoModelForCausalLM

import seekstack
from seekstack.accounting import training_flops_per_token
from seekstack.tokens.shards import TokenWindows
from seekstack.train.config import TrainConfig
from seekstack.train.trainer import build_optimizer

DEMO_TOKENS = Path("runs/demo/tokens")
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
LOSS_ATOL = 1e-4
BF16_LOSS_ATOL = 0.05  # bf16 keeps 8 bits of mantissa (~0.4% per rounding): implementations round in other places


@dataclass
class Contender:
    """A model, its optimizer, and one training step on a batch (B, T) that returns the loss, the forward under CPU
    autocast to `dtype` unless that is float32."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]
    dtype: torch.dtype

    def step(self, batch: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()


def contenders(preset: str, directory: Path, dtype: torch.dtype) -> tuple[Contender, list[Contender]]:
    """Ours and transformers' implementations, all loaded from one saved set of random weights, stepping in `dtype`."""
    config = seekstack.preset(preset, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    torch.manual_seed(0)
    seekstack.save_pretrained(seekstack.Transformer(config), directory)
    train_config = TrainConfig()
    cpu = torch.device("cpu")
    ours_model = seekstack.load_pretrained(directory).train()
    ours = Contender(
        "ours",
        ours_model,
        build_optimizer(ours_model, train_config, cpu),
        lambda ids: ours_model(ids, labels=ids, keep_logits=False).loss,
        dtype,
    )
    theirs = []
    for experts in EXPERTS_IMPLEMENTATIONS:
        for attention in ATTENTION_IMPLEMENTATIONS:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, experts_implementation=experts, attn_implementation=attention
            ).train()
            theirs.append(
                Contender(
                    f"transformers {experts}+{attention}",
                    model,
                    build_optimizer(model, train_config, cpu),
                    lambda ids, model=model: model(input_ids=ids, labels=ids, use_cache=False).loss,
                    dtype,
                )
            )
    return ours, theirs


def training_batch(data_dir: Path | None, vocab_size: int, batch: int, seq_len: int) -> torch.Tensor:
    """The first `batch` windows of the train split of `data_dir`'s shards; without a `data_dir`, of the demo's, or
    random ids when there are none. A `data_dir` given without shards is refused: timing random ids instead would
    pass them off as the user's data; so are shards of a tokenizer of more ids than the preset's `vocab_size` embeds,
    which failed in the first step's embedding after every model had loaded, naming no folder, and a damaged index or
    shard, or a split shorter than one window, which were tracebacks. A `data_dir` above the shards' folder is told
    the folder to give."""
    folder = f"--data {data_dir}" if data_dir is not None else str(DEMO_TOKENS)
    try:
        windows = TokenWindows(data_dir or DEMO_TOKENS, "train", seq_len - 1, seed=0)
        if windows.vocab_size > vocab_size:
            raise ValueError(
                f"its tokenizer has {windows.vocab_size:,} ids, more than the preset's vocab_size {vocab_size:,} "
                "embeds: give token shards of a tokenizer of at most that many, or a larger --preset"
            )
        return windows.batch(batch)
    except FileNotFoundError as error:
        if data_dir is not None:
            below = sorted(index.parent for index in data_dir.glob("*/train_index.json"))
            # the folder above the shards' (--data runs/demo) is no folder to tokenize again
            said = f"no token shards there, but {below[0]} holds some: give --data {below[0]}" if below else error
            raise SystemExit(f"{folder}: {said}") from None
        print(f"no token shards under {DEMO_TOKENS}: random token ids")
        return torch.randint(vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    except ValueError as error:
        raise SystemExit(f"{folder}: {error}") from None


def timed_step(contender: Contender, batch: torch.Tensor, clock: str) -> float:
    start = CLOCKS[clock]()
    contender.step(batch)
    return CLOCKS[clock]() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--reps", type=positive_int, default=7, help="timed steps per contender (median reported)")
    parser.add_argument("--screen", type=positive_int, default=2, help="steps per transformers implementation")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: every contender's forward under CPU bf16 autocast (weights and AdamW float32)",
    )
    parser.add_argument("--data", type=Path, help=f"token shards (data tokenize); default: {DEMO_TOKENS}, if there")
    add_machine_options(parser)
    args = parser.parse_args()
    if args.seq_len < 2:  # each row's loss predicts tokens 2..T from the ones before: one token holds no target
        parser.error(f"argument --seq-len: {args.seq_len}: at least 2 (a row of one token holds no target to predict)")
    config = seekstack.preset(args.preset)
    check_context(parser, "--seq-len", args.seq_len, config.max_position_embeddings, f"preset {args.preset}'s")
    batch = training_batch(args.data, config.vocab_size, args.batch, args.seq_len)
    prepare_machine(args)
    peaks = matmul_peaks(args.clock)

    with tempfile.TemporaryDirectory() as directory:
        ours, theirs = contenders(args.preset, Path(directory), getattr(torch, args.dtype))
        tokens = batch.numel()
        flops_per_token = training_flops_per_token(ours.model.config, args.seq_len)  # MTP is off: no MTP FLOPs
        print(f"{args.preset}, batch {args.batch} x {args.seq_len}, {args.dtype}, {torch.get_num_threads()} threads")

        # Same weights, same batch: the first step's losses must agree, or the comparison means nothing.
        atol = LOSS_ATOL if args.dtype == "float32" else BF16_LOSS_ATOL
        reference = ours.step(batch)
        differences = []
        for contender in theirs:
            loss = contender.step(batch)
            assert abs(loss - reference) < atol, f"{contender.name}: first loss {loss} != ours {reference}"
            differences.append(abs(loss - reference))
        print(f"first-step loss {reference:.5f} in every model (|diff| <= {max(differences):.2g} < {atol})")

        best = {c.name: min(timed_step(c, batch, args.clock) for _ in range(args.screen)) for c in theirs}
        for contender in theirs:
            print(f"  screen {contender.name:34s} {tokens / best[contender.name]:8.0f} tok/s")
        default = theirs[0]  # grouped_mm + sdpa: what from_pretrained picks unasked
        fastest = min(theirs, key=lambda c: best[c.name])
        timed = [ours, default] + ([fastest] if fastest is not default else [])
        seconds: dict[str, list[float]] = {c.name: [] for c in timed}
        for rep in range(args.reps):
            shift = rep % len(timed)
            for contender in timed[shift:] + timed[:shift]:
                seconds[contender.name].append(timed_step(contender, batch, args.clock))
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        print(
            f"\ntraining step (forward + backward + clip + AdamW), {args.clock} clock, median of {args.reps}, "
            f"shares of the {args.dtype} peak:"
        )
        for contender in timed:
            rate = tokens / medians[contender.name]
            ratio = medians[contender.name] / medians["ours"]
            share = share_of_peak(rate, flops_per_token, peaks[args.dtype])
            print(f"  {contender.name:36s} {rate:8.0f} tok/s   ours / this = {ratio:.2f}x   {share}")


if __name__ == "__main__":
    main()
