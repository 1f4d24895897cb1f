"""Quantized checkpoints of one trained model, side by side: bytes on disk and resident, validation bits per byte
and its change, mean KL from the original and top-1 agreement, greedy decode tokens/s at batch 1 and 8.

Ours: int8 (per channel), int4 (group 32 and 128), fp8 (128x128 blocks), each saved and re-loaded through
`seekstack.load_pretrained` (so the figures are those of the checkpoint generate/serve run). Reference: torchao's
`quantize_` (int8 weight-only, int4 weight-only) on the same float model, in memory, when torchao runs here
(it sees nn.Linear only, so the stacked routed experts stay float32 there).

    .venv/bin/python bench/quantize.py --model runs/quant/train/checkpoints/step_150 --data runs/quant/data/tokens

`--kernels`: one linear layer instead, microseconds per call of float32 `nn.Linear` and of our int8 layer (with the
float32 -> bfloat16 -> float32 casts it needs around the kernel), of the kernel alone and of one cast, at the widths of
`tiny` (128) and `small`: where the time goes when a quantized model decodes; and of our fp8 layer (e4m3 expanded to
float in each call, 128x128 blocks), what holding a float-quantized layer in e4m3, not dequantized, would cost.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from options import load_model_and_data, number_between, positive_int
from peers import peer_missing
from torch import nn

import seekstack
from seekstack.compress.adaptive import (
    BASE_OPTION,
    adaptive_config,
    assign,
    average_bits,
    refuse_budget_below_smallest,
    sensitivities,
    unmeasured_choices,
)
from seekstack.compress.quality import held_out_batches, log_probs, measure
from seekstack.compress.quantize import QuantConfig, checkpoint_bytes, quantize_model, resident_bytes
from seekstack.config import PRESETS
from seekstack.model.attention import ContiguousLatentCache
from seekstack.tokens.token_bytes import split_byte_lengths


@torch.no_grad()
def decode_seconds(model, batch: int, clock, prompt: int = 32, new: int = 64) -> float:
    """Seconds to greedily decode `new` tokens for `batch` rows after a `prompt`-token prefill (not timed)."""
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    cache = ContiguousLatentCache(model.config, batch, prompt + new, dtype=model.embed_tokens.weight.dtype)
    token = model(ids, cache=cache).logits[:, -1:].argmax(-1)
    start = clock()
    for _ in range(new):
        token = model(token, cache=cache).logits[:, -1:].argmax(-1)
    return clock() - start


def saved_and_loaded(models: dict[str, nn.Module]) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """name -> each model saved and re-loaded, in the dtype it was saved in, through `seekstack.load_pretrained` (the
    checkpoint generate/serve run), and name -> its bytes on disk; the checkpoints go to a temporary folder, removed
    on return."""
    loaded, disk = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as work:
        for name, model in models.items():
            directory = Path(work) / name.replace(" ", "_")
            seekstack.save_pretrained(model, directory)
            loaded[name], disk[name] = seekstack.load_pretrained(directory, dtype="auto"), checkpoint_bytes(directory)
    return loaded, disk


def decode_speeds(models: dict, batches: tuple[int, ...], reps: int, clock, new: int = 64) -> dict:
    """name -> {batch: tokens/s}, the median of `reps` rounds that run every model in turn (interleaved, so a
    busy spell of the machine slows all of them alike)."""
    seconds: dict = {name: {b: [] for b in batches} for name in models}
    for _ in range(reps):
        for batch in batches:
            for name, model in models.items():
                seconds[name][batch].append(decode_seconds(model, batch, clock, new=new))
    return {name: {b: b * new / sorted(t)[len(t) // 2] for b, t in per.items()} for name, per in seconds.items()}


def adaptive_models(original, data: str, budgets: list[float]) -> dict:
    """Per-layer precision by sensitivity (KL on 2 train batches, measured once) within each of `budgets` bits per
    weight: name -> quantized model."""
    context = original.config.max_position_embeddings
    batches = held_out_batches(data, context, batches=2, split="train")
    per_token = split_byte_lengths(data, "train")[0]
    reference = [log_probs(original, batch) for batch in batches]
    choices = sensitivities(original, lambda m: measure(m, reference, batches, per_token).mean_kl)
    # uniform int4 g32 as the "int4 g32" row (`seekstack quantize --scheme int4`) quantizes it: a layer whose shapes
    # int4 g32 does not take (BASE_OPTION not among its options) is kept in float, at its weights' bits
    uniform_bits = sum(
        c.weights * c.bits.get(BASE_OPTION, next(original.get_submodule(c.name).parameters()).element_size() * 8)
        for c in choices
    ) / sum(c.weights for c in choices)
    models = {}
    for budget in budgets:
        assignment = assign(choices, budget)
        print(
            f"adaptive {budget}: {average_bits(choices, assignment):.3f} bits per weight (uniform int4 g32, layers "
            f"it does not take kept in float: {uniform_bits:.3f}); "
            + ", ".join(f"{n} {o}" for n, o in assignment.items())
        )
        model = copy.deepcopy(original)
        quantize_model(model, adaptive_config(assignment))
        models[f"adaptive {budget} bits"] = model
    return models


def kernel_table(reps: int = 2000) -> None:
    """Microseconds per call (process CPU clock): float32 nn.Linear, our int8 QuantizedLinear, its kernel, a cast, our
    fp8 QuantizedLinear (`reps` / 100 calls: it expands its weight in each)."""
    from seekstack.compress.linear import COMPUTE_DTYPE, Fp8Weight, Int8Weight, QuantizedLinear

    def micros(call, reps: int = reps) -> float:
        for _ in range(reps // 10):
            call()
        start = time.process_time()
        for _ in range(reps):
            call()
        return (time.process_time() - start) / reps * 1e6

    print(
        "| out x in | rows | float32 nn.Linear | our int8 layer | kernel alone (bf16 in) | one cast | int8 / float32 "
        "| our fp8 layer | fp8 / float32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rows in (1, 8):
        for out_features, in_features in ((192, 64), (384, 128), (1024, 1024), (4096, 1024)):
            weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
            layer = QuantizedLinear(Int8Weight.from_float(weight))
            float_layer = torch.nn.Linear(in_features, out_features, bias=False)
            float_layer.weight.data = weight
            q, scale, x_bf16 = layer.qweight.weight, layer.qweight.weight_scale.view(-1), x.to(COMPUTE_DTYPE)
            calls = [
                partial(float_layer, x),
                partial(layer, x),
                partial(torch._weight_int8pack_mm, x_bf16, q, scale),
                partial(x.to, COMPUTE_DTYPE),
            ]
            times = [micros(call) for call in calls]
            fp8 = micros(partial(QuantizedLinear(Fp8Weight.from_float(weight, (128, 128))), x), reps=reps // 100)
            print(
                f"| {out_features} x {in_features} | {rows} | " + " | ".join(f"{t:.1f}" for t in times)
                + f" | {times[1] / times[0]:.2f} | {fp8:.1f} | {fp8 / times[0]:.1f} |"
            )  # fmt: skip


def torchao_variant(model, kind: str):
    """torchao's `quantize_` on a copy, on the Linear layers ours quantizes (not lm_head; kv_b_proj is read as a
    matrix by MLA's absorbed decode, which torchao's tensor subclasses do not support)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model)
    config = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=32)
    if kind == "int4":
        quantized = quantized.to(torch.bfloat16)  # torchao's int4 takes bfloat16 weights

    def chosen(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith("kv_b_proj")

    quantize_(quantized, config, filter_fn=chosen)
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quant/train/checkpoints/step_150")
    parser.add_argument("--data", default="runs/quant/data/tokens")
    parser.add_argument("--batches", type=positive_int, default=8, help="validation batches of 8 x 256 tokens")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--reps", type=positive_int, default=5, help="interleaved decode rounds (median)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="cpu: process CPU seconds")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="decode speed only, on random weights of this preset (e.g. small)"
    )
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="only the per-call timing of one linear layer")
    parser.add_argument(
        "--adaptive-bits",
        type=number_between(0, 32),  # float32's bits per weight
        nargs="*",
        default=[4.5],
        help="adaptive precision budgets (bits per weight)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.kernels:
        kernel_table()
        return

    if args.preset:
        original = seekstack.Transformer(seekstack.preset(args.preset)).eval()
    else:
        original, per_token = load_model_and_data(parser, args.model, args.data)
        choices = unmeasured_choices(original)
        for budget in args.adaptive_bits:  # refused from the layers' shapes, before any measuring
            try:
                refuse_budget_below_smallest(choices, budget)
            except ValueError as error:
                parser.error(f"--adaptive-bits {budget}: {error}")
    variants = {"bfloat16": copy.deepcopy(original).to(torch.bfloat16)}
    for name, config in [
        ("int8", QuantConfig(scheme="int8")),
        ("int4 g32", QuantConfig(scheme="int4", group_size=32)),
        ("int4 g128", QuantConfig(scheme="int4", group_size=128)),
        ("fp8 128x128", QuantConfig(scheme="fp8")),
    ]:
        model = copy.deepcopy(original)
        quantize_model(model, config)
        variants[name] = model
    if not args.preset:
        variants.update(adaptive_models(original, args.data, args.adaptive_bits))
    reloaded, saved_bytes = saved_and_loaded(variants)
    models = {"float32": original, **reloaded}
    disk = {"float32": checkpoint_bytes(args.model) if not args.preset else None, **saved_bytes}
    torchao_missing = None if args.no_torchao else peer_missing("torchao", ("torchao",), "pip install -e '.[bench]'")
    if torchao_missing:
        print(torchao_missing)
    for kind in () if args.no_torchao or torchao_missing else ("int8", "int4"):
        try:
            models[f"torchao {kind} weight-only"] = torchao_variant(original, kind)
        except Exception as error:  # report, keep the rest of the table
            print(f"torchao {kind}: failed: {type(error).__name__}: {str(error)[:200]}")

    speeds = decode_speeds(models, (1, 8), args.reps, clock)
    qualities = {}
    if not args.preset:
        batches = held_out_batches(args.data, original.config.max_position_embeddings, batches=args.batches)
        reference = [log_probs(original, batch) for batch in batches]  # once for every model measured
        qualities = {name: measure(model, reference, batches, per_token) for name, model in models.items()}

    source = f"random {args.preset}" if args.preset else args.model
    print(f"\nmodel {source}; {args.batches} x 8 x 256 validation tokens; decode: 32-token prompt + 64 greedy tokens, ")
    print(f"{args.threads} thread(s), {args.clock} clock, median of {args.reps} interleaved rounds")
    print("| scheme | bytes on disk | resident bytes | val bits/byte | change | mean KL (nats) | top-1 agree ", end="")
    print("| decode tok/s b=1 | b=8 |\n|---|---|---|---|---|---|---|---|---|")
    base_resident = resident_bytes(original)
    for name, model in models.items():
        size = disk.get(name)
        disk_text = f"{size:,} ({size / disk['float32']:.0%})" if size and disk["float32"] else "-"
        resident = resident_bytes(model)
        quality = qualities.get(name)
        quality_text = "| - | - | - | -"
        if quality is not None:
            change = quality.bits_per_byte / qualities["float32"].bits_per_byte - 1
            quality_text = (
                f"| {quality.bits_per_byte:.4f} | {change:+.2%} | {quality.mean_kl:.5f} | {quality.top1_agreement:.2%}"
            )
        print(
            f"| {name} | {disk_text} | {resident:,} ({resident / base_resident:.0%}) {quality_text} | "
            f"{speeds[name][1]:,.0f} | {speeds[name][8]:,.0f} |"
        )


if __name__ == "__main__":
    main()
