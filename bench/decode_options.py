"""Inductor options of the compiled decode step against each other: engines built with each set, decoding the same
prompts greedily, timed alternately in one process (the machine's drift hits every set alike).

    python bench/decode_options.py --preset small --rows 1 --options '{}' '{"memory_planning": true}'

Each OPTIONS is JSON merged over seekstack.infer.engine.DECODE_COMPILE_OPTIONS (the default set, '{}'), except the
keys "weight_first_linears": false, which gives that engine's block linears back their plain x W^T product, neither
the rows_linear kernel nor the weight-first form (seekstack/infer/packed.py `DecodeLinear`), and "cpu_kernels":
false, which runs that engine without seekstack.model.cpu_kernels (MoE and linears alike). Prints each
set's median decode tokens/s over the rounds, its median per-round ratio to the first set, and whether every set
produced the same tokens. One thread (as bench/decode.py's like-for-like rows), random weights of the preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode import CORPUS, random_prompts
from options import new_token_count, positive_int
from torch import nn

import seekstack
from seekstack.config import PRESETS
from seekstack.infer import Engine, SamplingParams
from seekstack.infer import engine as engine_module
from seekstack.infer.packed import DecodeLinear
from seekstack.model import cpu_kernels
from seekstack.tokenizer import train_tokenizer

OUR_KEYS = ("weight_first_linears", "cpu_kernels")  # the options that are seekstack's, not inductor's


def build_engines(directory: Path, option_sets: list[dict], rows: int) -> list[Engine]:
    """One engine per option set, each warmed up (its decode step compiled) on its own copy of the weights."""
    default = engine_module.DECODE_COMPILE_OPTIONS
    engines = []
    try:
        for options in option_sets:
            inductor = {key: value for key, value in options.items() if key not in OUR_KEYS}
            engine_module.DECODE_COMPILE_OPTIONS = {**default, **inductor}
            engine = Engine.from_pretrained(directory, compile=True, max_batch_size=max(rows, 2))
            if not options.get("weight_first_linears", True):
                for module in engine.model.modules():
                    if type(module) is DecodeLinear:
                        module.__class__ = nn.Linear
            cpu_kernels.set_enabled(options.get("cpu_kernels", True))
            started = time.perf_counter()
            engine.generate([[5] * 8] * rows, SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
            print(f"{json.dumps(options)}: warmed up in {time.perf_counter() - started:.0f} s", flush=True)
            engines.append(engine)
    finally:
        engine_module.DECODE_COMPILE_OPTIONS = default
        cpu_kernels.set_enabled(True)
    return engines


def decode_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    """rows x (new_tokens - 1) / (t(new_tokens) - t(1)): decode tokens/s without the prefill; the tokens."""
    seconds = []
    for count in (1, new_tokens):
        params = SamplingParams(max_new_tokens=count, temperature=0, ignore_eos=True, detokenize=False)
        started = time.perf_counter()
        outputs = engine.generate(prompts, params)
        seconds.append(time.perf_counter() - started)
    return len(prompts) * (new_tokens - 1) / (seconds[1] - seconds[0]), [o.token_ids for o in outputs]


def json_object(text: str) -> dict:
    """An argparse type for one OPTIONS: a JSON object ({"memory_planning": true}), refused by name otherwise."""
    try:
        options = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of inductor options ({{...}})")
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--rows", type=positive_int, default=1, help="concurrent sequences")
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=new_token_count, default=33)
    parser.add_argument("--rounds", type=positive_int, default=8)
    parser.add_argument("--options", nargs="+", type=json_object, default=[{}, {"memory_planning": True}])
    args = parser.parse_args()
    known = {*torch._inductor.config.get_config_copy(), *OUR_KEYS}
    for options in args.options:
        if unknown := sorted(set(options) - known):
            parser.error(f"--options {json.dumps(options)}: {', '.join(unknown)} is not an inductor option")
    torch.set_num_threads(1)
    config = seekstack.preset(args.preset, num_nextn_predict_layers=0)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        seekstack.save_pretrained(seekstack.Transformer(config), Path(folder))
        texts = [path.read_text() for path in sorted(CORPUS.rglob("*.py"))] * 4
        train_tokenizer(texts, vocab_size=config.vocab_size, out_path=Path(folder))
        engines = build_engines(Path(folder), args.options, args.rows)
    prompts = random_prompts(args.rows, args.prompt_len, config.vocab_size).tolist()
    rates: list[list[float]] = [[] for _ in engines]
    tokens = []
    for round_number in range(args.rounds):
        order = range(len(engines)) if round_number % 2 == 0 else reversed(range(len(engines)))
        for index in order:
            cpu_kernels.set_enabled(args.options[index].get("cpu_kernels", True))
            rate, produced = decode_rate(engines[index], prompts, args.new_tokens)
            rates[index].append(rate)
            tokens.append(produced)
    print(f"{args.preset}, {args.rows} row(s), {args.new_tokens - 1} decode steps, {args.rounds} alternating rounds")
    for options, values in zip(args.options, rates, strict=True):
        ratio = statistics.median(a / b for a, b in zip(values, rates[0], strict=True))
        print(f"  {json.dumps(options):50s} {statistics.median(values):8.1f} tok/s   {ratio:.3f}x the first")
    print(f"  same tokens from every set: {all(t == tokens[0] for t in tokens)}")


if __name__ == "__main__":
    main()
