"""Serving throughput with 4 LoRA adapters mixed in every batch vs the base model alone, at the same concurrency,
through the official `openai` client.

    python bench/lora_serve.py BASE ADAPTER [ADAPTER ...] [--concurrency 8] [--requests 32] [--max-tokens 32]
        [--compile]

Two `seekstack serve` processes: one with the base only, one with 4 adapters (the given folders, cycled, as
adapter-1..4). Requests to the second cycle through the 4 adapters, so every decode batch holds rows of all four.
Rounds alternate between the servers (the CPU may be shared); the medians are compared. `--engine-only` compares
the engine alone in this process instead (no HTTP, one torch thread): base rows vs rows cycling the 4 adapters.
`--compile` runs both with compiled decode steps (`serve --compile`); two warm-up rounds take the compiles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).parents[1]))
from options import adapter_folder, checkpoint_folder, positive_int

from tests.serve.server import running_server  # noqa: E402  (the test suite's live-server helper)

PROMPTS = ["The licence", "Permission is hereby granted", "You may not", "This program is free", "def main():"]


def round_throughput(api: openai.OpenAI, models: list[str], args: argparse.Namespace) -> float:
    """Completion tokens per second over `args.requests` requests, `args.concurrency` at a time."""

    def one(number: int) -> int:
        reply = api.completions.create(
            model=models[number % len(models)], prompt=PROMPTS[number % len(PROMPTS)], max_tokens=args.max_tokens,
            temperature=0.8, seed=number, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(one, range(args.requests)))
    return tokens / (time.perf_counter() - started)


def engine_rounds(
    args: argparse.Namespace, names: list[str], flags: dict[str, Path]
) -> tuple[list[float], list[float]]:
    """Tokens per second of the engine generating `args.requests` rows at once, base rows vs adapter rows."""
    import torch

    from seekstack.infer import Engine, SamplingParams

    torch.set_num_threads(1)
    plain = Engine.from_pretrained(args.base, max_batch_size=args.concurrency, compile=args.compile)
    multi = Engine.from_pretrained(args.base, adapters=flags, max_batch_size=args.concurrency, compile=args.compile)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.8, ignore_eos=True, seed=0)
    prompts = [plain.tokenizer.encode(PROMPTS[number % len(PROMPTS)]) for number in range(args.requests)]

    def rate(engine: Engine, models: list[str] | None) -> float:
        started = time.perf_counter()
        engine.generate(prompts, params, adapters=models)
        return args.requests * args.max_tokens / (time.perf_counter() - started)

    cycled = [names[number % len(names)] for number in range(args.requests)]
    rate(plain, None), rate(multi, cycled)  # warm-up
    rates = [(rate(plain, None), rate(multi, cycled)) for _ in range(args.rounds)]
    return [base for base, _ in rates], [lora for _, lora in rates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=checkpoint_folder)
    parser.add_argument("adapters", type=adapter_folder, nargs="+")
    parser.add_argument("--concurrency", type=positive_int, default=8)
    parser.add_argument("--requests", type=positive_int, default=32)
    parser.add_argument("--max-tokens", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--engine-only", action="store_true", help="the engine in this process, no server")
    parser.add_argument("--compile", action="store_true", help="compiled decode steps, in both")
    args = parser.parse_args()
    names = [f"adapter-{i + 1}" for i in range(4)]
    if args.engine_only:
        base_rates, lora_rates = engine_rounds(
            args, names, {n: args.adapters[i % len(args.adapters)] for i, n in enumerate(names)}
        )
        base_rate, lora_rate = statistics.median(base_rates), statistics.median(lora_rates)
        print(
            f"engine only, {args.requests} rows x {args.max_tokens} tokens: base {base_rate:.1f} tok/s, 4 adapters "
            f"{lora_rate:.1f} tok/s: {lora_rate / base_rate:.2f}x"
        )
        return
    flags = [
        f for i, name in enumerate(names) for f in ("--adapter", f"{name}={args.adapters[i % len(args.adapters)]}")
    ]
    base_name = args.base.resolve().name
    common = ("--max-batch-size", str(args.concurrency), *(["--compile"] if args.compile else []))
    with tempfile.TemporaryDirectory() as scratch:
        with (
            running_server(args.base, Path(scratch) / "base.db", *common, timeout_s=300) as plain,
            running_server(args.base, Path(scratch) / "lora.db", *common, *flags, timeout_s=300) as multi,
        ):
            plain_api = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="-", max_retries=0, timeout=600)
            multi_api = openai.OpenAI(base_url=f"{multi.url}/v1", api_key="-", max_retries=0, timeout=600)
            for _ in range(2 if args.compile else 1):  # warm-up of both (compiled: a second batch shape recompiles)
                round_throughput(plain_api, [base_name], args)
                round_throughput(multi_api, names, args)
            base_rates, lora_rates = [], []
            for number in range(args.rounds):
                base_rates.append(round_throughput(plain_api, [base_name], args))
                lora_rates.append(round_throughput(multi_api, names, args))
                print(f"round {number + 1}: base {base_rates[-1]:.1f} tok/s, 4 adapters {lora_rates[-1]:.1f} tok/s")
    base_rate, lora_rate = statistics.median(base_rates), statistics.median(lora_rates)
    print(
        f"concurrency {args.concurrency}, {args.requests} requests x {args.max_tokens} tokens per round: base alone "
        f"{base_rate:.1f} tok/s, 4 adapters in every batch {lora_rate:.1f} tok/s: {lora_rate / base_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
