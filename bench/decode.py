"""Generation speed of the seekstack engine against transformers' `generate` on the same weights.

A preset with random weights is saved once with `seekstack.save_pretrained` and loaded by both
`seekstack.infer.Engine.from_pretrained` and `transformers.AutoModelForCausalLM`. Ours runs in the dtype `generate`,
`chat` and `serve` choose by default (`auto`, seekstack/infer/precision.py: bfloat16 where the CPU has avx512_bf16 or
amx_bf16, else float32), or in the one `--dtype` names, as their `--dtype` does; transformers runs in float32, its
default, and in bfloat16. Each ratio is labelled: "like for like" sets ours against the peer in our dtype, "default vs
default" against what its users get without options. Both decode greedily from the same random prompts for exactly
the same number of tokens (neither stops at an end-of-sequence token); their greedy tokens are compared first. Each
timed run of ours alternates with one of theirs, and the median over repetitions is reported, so load from other
processes falls on both sides alike.

    prefill tok/s = B x prompt_len / t(1 new token)
    decode tok/s  = B x (new_tokens - 1) / (t(new_tokens) - t(1 new token)), nan where t(new_tokens) is not above
                    t(1 new token): the decode time is within timing noise (raise --new-tokens or --reps)

KV-cache bytes per token: ours from the paged pool, (kv_lora_rank + qk_rope_head_dim) x layers x dtype
size; theirs by measuring the tensors of the cache object `generate` returns. Then the total decode
throughput of ours with 1, 4 and 16 concurrent sequences.

llama.cpp (`--llama-cpp-source`, see llama_cpp_peer.py) decodes the same checkpoint converted to GGUF f32, bf16 and
q8_0, one stream at a time; ours is set against it at batch 1 and with 8 concurrent sequences, llama.cpp on the
threads ours runs that row on. There each side's greedy tokens are compared with ours in float32, the precision of the
saved weights and of the f32 GGUF (bfloat16's rounding flips a random model's near-ties). `--busy` then repeats batch
1 with a competing busy process on the machine: ours as it runs by default (threads chosen per step,
seekstack/infer/threads.py), ours forced onto all threads, and theirs in float32.
Every rate is also given as matmul FLOP/s against the machine's matmul peak in our dtype, measured at the start.

    python bench/decode.py                        # a few minutes on 2 cores
    python bench/decode.py --reps 1 --new-tokens 16 --scaling 1 4   # quick check
    python bench/decode.py --threads 1 --clock cpu   # on a machine others are using
    python bench/decode.py --llama-cpp-source /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp --busy
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from llama_cpp_peer import load_llama_cpp
from machine import (
    CLOCKS,
    add_machine_options,
    decode_rate,
    matmul_peaks,
    prepare_machine,
    print_noise_notice,
    share_of_peak,
)
from options import new_token_count, positive_int
from transformers import AutoModelForCausalLM

import seekstack
from seekstack.accounting import forward_flops_per_token
from seekstack.infer import Engine, EngineOptions, SamplingParams
from seekstack.infer.packed import decode_layout_bytes
from seekstack.tokenizer import train_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "seekstack"  # our own source: enough text for a small BPE
THEIR_DTYPES = ("float32", "bfloat16")  # transformers' default first


def build(
    preset: str, directory: Path, max_batch: int, dtype: str
) -> tuple[Engine, Engine, dict[str, torch.nn.Module]]:
    """Random weights saved once, a tokenizer of the preset's vocabulary beside them; all models load them.
    Ours twice, both in `dtype` (auto by default): eager (`--no-compile`), and as `generate`, `chat` and `serve` run
    it by default (EngineOptions), whose decode steps compile once eager decoding has run as long as a compile takes.
    Theirs by dtype name: float32 (transformers' default) and bfloat16."""
    config = seekstack.preset(preset, num_nextn_predict_layers=0)  # transformers does not run MTP
    torch.manual_seed(0)
    seekstack.save_pretrained(seekstack.Transformer(config), directory)
    texts = [path.read_text() for path in sorted(CORPUS.rglob("*.py"))] * 4
    train_tokenizer(texts, vocab_size=config.vocab_size, out_path=directory)
    options = EngineOptions(max_batch_size=max_batch, dtype=dtype)
    ours = Engine.from_pretrained(directory, **replace(options, compile=False).engine_kwargs(directory))
    ours_default = Engine.from_pretrained(directory, **options.engine_kwargs(directory))
    print(f"ours in {dtype_name(ours)}: dtype {options.resolved_dtype(directory)[1]}", flush=True)
    extra_mb = decode_layout_bytes(ours.model) / 1e6
    layout = "pack_for_decode: the float32 weights' panels, or the head's W^T where the kernels are not built"
    print(f"ours: the decode layout ({layout}) holds {extra_mb:.1f} MB more")
    theirs = {}
    for name in THEIR_DTYPES:
        theirs[name] = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, name)).eval()
        # No end-of-sequence token: both run exactly the asked number of steps, without a min-length processor.
        theirs[name].generation_config.eos_token_id = None
    return ours, ours_default, theirs


def dtype_name(engine: Engine) -> str:
    """The dtype an engine's weights are in, by name: "float32", "bfloat16"."""
    return str(engine.model.embed_tokens.weight.dtype).removeprefix("torch.")


def random_prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(5, vocab, (batch, length), generator=generator)


def ours_generate(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts.tolist(), params)]


def theirs_generate(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, **extra) -> object:
    return model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **extra,
    )


def theirs_cache_bytes_per_token(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    """Bytes of every tensor in the cache `generate` returns, per cached token of one sequence."""
    out = theirs_generate(model, prompts, new_tokens, return_dict_in_generate=True)
    cache = out.past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    batch, cached = prompts.shape[0], cache.get_seq_length()
    return total / (batch * cached)


def interleaved(runs: dict[str, Callable[[], object]], reps: int, clock: str = "wall") -> dict[str, float]:
    """Median seconds of each run after one untimed warm-up; every repetition runs them all, starting with another."""
    names, seconds, now = list(runs), {name: [] for name in runs}, CLOCKS[clock]
    for run in runs.values():
        run()
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = now()
            runs[name]()
            seconds[name].append(now() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def warm_up(engine: Engine, vocab: int, new_tokens: int) -> None:
    """Decode until the default engine runs its decode step compiled, as a server or chat session soon does."""
    started = time.perf_counter()
    while not engine.decode_compiled:
        ours_generate(engine, random_prompts(1, 16, vocab), new_tokens)
    ours_generate(engine, random_prompts(1, 16, vocab), 2)  # the first compiled step compiles (untimed)
    print(f"default engine warmed up (eager decoding, then its compile) in {time.perf_counter() - started:.0f} s")


def speed_row(
    engine,
    default,
    theirs: dict[str, torch.nn.Module],
    batch: int,
    prompt_len: int,
    new_tokens: int,
    reps: int,
    clock: str,
) -> dict[str, float]:
    """Prefill and decode tok/s of ours (eager and default) and theirs (each dtype) at one batch size, and how many
    greedy tokens agree with theirs in our dtype (the lower of our two)."""
    prompts = random_prompts(batch, prompt_len, engine.config.vocab_size)
    like = theirs.get(dtype_name(engine), theirs["float32"])
    theirs_tokens = theirs_generate(like, prompts, new_tokens)[:, prompt_len:].tolist()
    agree = 1.0
    for ours in (engine, default):  # the default engine compiles a new batch shape in its first call (untimed)
        ours_tokens = ours_generate(ours, prompts, new_tokens)
        assert all(len(tokens) == new_tokens for tokens in ours_tokens + theirs_tokens), "a side stopped early"
        common = sum(_common_prefix(a, b) for a, b in zip(ours_tokens, theirs_tokens, strict=True))
        agree = min(agree, common / (batch * new_tokens))
    runs = {}
    for n in (1, new_tokens):
        runs[f"ours_{n}"] = lambda n=n: ours_generate(engine, prompts, n)
        runs[f"default_{n}"] = lambda n=n: ours_generate(default, prompts, n)
        for name, model in theirs.items():
            runs[f"{name}_{n}"] = lambda model=model, n=n: theirs_generate(model, prompts, n)
    medians = interleaved(runs, reps, clock)
    row = {"batch": batch, "agree": agree}
    for side in ("ours", "default", *theirs):
        row[f"{side}_prefill"] = batch * prompt_len / medians[f"{side}_1"]
        row[f"{side}_decode"] = decode_rate(medians, side, batch, new_tokens)
    return row


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=new_token_count, default=64)
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    parser.add_argument("--scaling", nargs="+", type=positive_int, default=[1, 4, 16], help="concurrent sequences")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--llama-cpp-source", type=Path, help="llama.cpp source tree with convert_hf_to_gguf.py")
    parser.add_argument("--busy", action="store_true", help="also batch 1 beside a competing busy process")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="ours' dtype, as generate's --dtype (default auto); float32 sets ours against llama.cpp's f32 GGUF like "
        "for like",
    )
    add_machine_options(parser)
    args = parser.parse_args()
    context = seekstack.preset(args.preset).max_position_embeddings  # where ours stops a sequence
    if args.prompt_len + args.new_tokens > context:
        parser.error(
            f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens}: past preset {args.preset}'s context of "
            f"{context} tokens, where ours stops decoding and transformers would go on"
        )
    prepare_machine(args)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}; ours in dtype "
        f"{args.dtype}, transformers in {' and '.join(THEIR_DTYPES)}",
        flush=True,
    )
    peaks = matmul_peaks(args.clock)

    with tempfile.TemporaryDirectory() as root, torch.inference_mode():
        engine, default, theirs = build(
            args.preset, Path(root) / args.preset, max(args.batches + args.scaling + [LLAMA_CPP_SEQUENCES]), args.dtype
        )
        warm_up(default, engine.config.vocab_size, args.new_tokens)
        ours_dtype = dtype_name(default)
        peak = peaks[ours_dtype]  # results are set against the peak of the dtype ours runs in
        print(
            f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, "
            f"median of {args.reps}, {args.clock} clock\n"
        )
        like = ours_dtype if ours_dtype in theirs else "float32"
        print(
            f"tok/s; ours in {ours_dtype}: eager (--no-compile) and default (decode steps compiled once warm); "
            f"theirs in float32 (their default) and bfloat16.\n"
            f"default vs default: ours default / theirs float32; like for like: ours default / theirs {like}; "
            f"greedy agree: with theirs in {like}"
        )
        header = (
            f"{'batch':>5s} {'prefill ours':>13s} {'f32':>7s} {'bf16':>7s} {'decode eager':>13s} {'default':>8s} "
            f"{'theirs f32':>11s} {'bf16':>7s} {'default vs default':>19s} {'like for like':>14s} {'eager, like':>12s} "
            f"{'greedy agree':>13s}"
        )
        print(header + "\n" + "-" * len(header))
        rates = []
        for batch in args.batches:
            row = speed_row(engine, default, theirs, batch, args.prompt_len, args.new_tokens, args.reps, args.clock)
            print(
                f"{batch:5d} {row['ours_prefill']:13.0f} {row['float32_prefill']:7.0f} {row['bfloat16_prefill']:7.0f} "
                f"{row['ours_decode']:13.1f} {row['default_decode']:8.1f} {row['float32_decode']:11.1f} "
                f"{row['bfloat16_decode']:7.1f} {row['default_decode'] / row['float32_decode']:18.2f}x "
                f"{row['default_decode'] / row[f'{like}_decode']:13.2f}x "
                f"{row['ours_decode'] / row[f'{like}_decode']:11.2f}x {row['agree']:13.0%}",
                flush=True,
            )
            rates += [value for key, value in row.items() if key.endswith("_decode")]
        print_noise_notice(rates)

        prompts = random_prompts(1, args.prompt_len, engine.config.vocab_size)
        ours_bytes = engine.cache.bytes_per_token()
        theirs_bytes = theirs_cache_bytes_per_token(theirs[like], prompts, args.new_tokens)
        config, size = engine.config, getattr(torch, ours_dtype).itemsize
        formula = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * size
        print(
            f"\nKV cache bytes per token, {ours_dtype}: ours {ours_bytes} (formula (C + R) x layers x {size} = ", end=""
        )
        print(f"{formula}), theirs {theirs_bytes:.0f}; theirs / ours = {theirs_bytes / ours_bytes:.2f}")

        print("\nThroughput scaling, ours: total decode tok/s with N concurrent sequences (eager / default)")
        for concurrent in args.scaling:
            prompts = random_prompts(concurrent, args.prompt_len, engine.config.vocab_size)
            ours_generate(default, prompts, args.new_tokens)  # a new batch size may compile once more (untimed)
            medians = interleaved(
                {
                    f"{name}_{n}": lambda e=ours, p=prompts, n=n: ours_generate(e, p, n)
                    for name, ours in (("eager", engine), ("default", default))
                    for n in (1, args.new_tokens)
                },
                args.reps,
                args.clock,
            )
            rates = [decode_rate(medians, name, concurrent, args.new_tokens) for name in ("eager", "default")]
            print(f"  {concurrent:3d} sequences: {rates[0]:8.1f} / {rates[1]:8.1f} tok/s", flush=True)
            print_noise_notice(rates)

        flops_per_token = forward_flops_per_token(config, args.prompt_len + args.new_tokens // 2)
        llama_cpp_rows(engine, default, Path(root) / args.preset, args, flops_per_token, peak)
        if args.busy:
            busy_rows(engine, theirs["float32"], args, flops_per_token, peak)


LLAMA_CPP_SEQUENCES = 8  # ours decodes these at once against llama.cpp's one stream
GGUF_OF_DTYPE = {"float32": "f32", "bfloat16": "bf16"}  # the llama.cpp file type that is like for like with ours


def llama_cpp_rows(engine: Engine, default: Engine, model_dir: Path, args, flops_per_token: float, peak: float) -> None:
    """Batch-1 greedy decode of llama.cpp (GGUF f32, bf16, q8_0) against ours (eager and default), and ours with 8
    sequences against its one stream; llama.cpp runs on the threads ours runs each row on."""
    one, eight = default.step_threads.threads_for(1), default.step_threads.threads_for(LLAMA_CPP_SEQUENCES)
    context = args.prompt_len + args.new_tokens + 8
    peers, reason = load_llama_cpp(model_dir, args.llama_cpp_source, context, one)
    ours_dtype = dtype_name(default)
    print(f"\nllama.cpp, one stream, against ours in {ours_dtype} (like for like: GGUF {GGUF_OF_DTYPE[ours_dtype]}):")
    if reason:
        print(f"  skipped: {reason}")
    if not peers:
        return
    prompt = random_prompts(1, args.prompt_len, engine.config.vocab_size)
    # Greedy tokens are compared with ours in float32, the precision of the saved weights and of the f32 GGUF: a random
    # model's logits are nearly flat (max ~2 on `small`), so bfloat16's rounding flips near-ties and ours in bfloat16
    # parts from llama.cpp f32 within a few tokens, the first one included, though both compute the same model.
    exact = engine
    if dtype_name(engine) != "float32":
        exact = Engine.from_pretrained(
            model_dir, **EngineOptions(compile=False, dtype="float32").engine_kwargs(model_dir)
        )
    exact_tokens = ours_generate(exact, prompt, args.new_tokens)[0]

    def agreement(tokens: list[int]) -> float:
        return _common_prefix(tokens, exact_tokens) / args.new_tokens

    prompts8 = random_prompts(LLAMA_CPP_SEQUENCES, args.prompt_len, engine.config.vocab_size)

    def peer_run(peer, threads: int, n: int) -> list[int]:
        peer.use_threads(threads)
        return peer.generate(prompt[0].tolist(), n)

    runs = {}
    for n in (1, args.new_tokens):
        runs[f"ours_{n}"] = lambda n=n: ours_generate(default, prompt, n)
        runs[f"eager_{n}"] = lambda n=n: ours_generate(engine, prompt, n)
        runs[f"ours8_{n}"] = lambda n=n: ours_generate(default, prompts8, n)
        for peer in peers:
            for threads in sorted({one, eight}):
                runs[f"{peer.outtype}@{threads}_{n}"] = lambda p=peer, t=threads, n=n: peer_run(p, t, n)
    medians = interleaved(runs, args.reps, args.clock)
    ours = decode_rate(medians, "ours", 1, args.new_tokens)
    eager = decode_rate(medians, "eager", 1, args.new_tokens)
    print(f"  greedy agree: the share of {args.new_tokens} greedy tokens each side shares with ours in float32")
    print(
        f"  {'ours (default)':24s} {ours:8.1f} tok/s   {share_of_peak(ours, flops_per_token, peak)}   "
        f"greedy agree {agreement(ours_generate(default, prompt, args.new_tokens)[0]):.0%}"
    )
    print(f"  {'ours (eager)':24s} {eager:8.1f} tok/s   {share_of_peak(eager, flops_per_token, peak)}")
    print(f"  batch 1, llama.cpp on {one} thread(s) as ours:")
    rates = [ours, eager]
    for peer in peers:
        rate = decode_rate(medians, f"{peer.outtype}@{one}", 1, args.new_tokens)
        rates.append(rate)
        like = "  <- like for like" if peer.outtype == GGUF_OF_DTYPE[ours_dtype] else ""
        print(
            f"  {'llama.cpp ' + peer.outtype:24s} {rate:8.1f} tok/s   ours default / this = {ours / rate:.2f}x "
            f"(eager {eager / rate:.2f}x)   greedy agree {agreement(peer_run(peer, one, args.new_tokens)):.0%}   "
            f"(converted in {peer.convert_seconds:.0f} s{'; ' + peer.note if peer.note else ''}){like}"
        )
    eight_rate = decode_rate(medians, "ours8", LLAMA_CPP_SEQUENCES, args.new_tokens)
    rates.append(eight_rate)
    print(
        f"  ours (default), 8 concurrent sequences on {eight} thread(s): {eight_rate:.1f} tok/s; llama.cpp on {eight}:"
    )
    for peer in peers:
        single = decode_rate(medians, f"{peer.outtype}@{eight}", 1, args.new_tokens)
        rates.append(single)
        like = "  <- like for like" if peer.outtype == GGUF_OF_DTYPE[ours_dtype] else ""
        print(f"    = {eight_rate / single:5.2f}x llama.cpp {peer.outtype}'s one stream ({single:.1f} tok/s){like}")
    print_noise_notice(rates)


def busy_rows(engine: Engine, model: torch.nn.Module, args, flops_per_token: float, peak: float) -> None:
    """Batch-1 decode beside a competing busy process: ours by default, ours on all threads, and theirs."""
    prompts = random_prompts(1, args.prompt_len, engine.config.vocab_size)
    threads = engine.step_threads

    def ours_all_threads(n: int) -> list[list[int]]:
        default, threads.min_parallel_flops = threads.min_parallel_flops, 0.0
        try:
            return ours_generate(engine, prompts, n)
        finally:
            threads.min_parallel_flops = default

    runs = {}
    for n in (1, args.new_tokens):
        runs[f"ours_{n}"] = lambda n=n: ours_generate(engine, prompts, n)
        runs[f"all_{n}"] = lambda n=n: ours_all_threads(n)
        runs[f"theirs_{n}"] = lambda n=n: theirs_generate(model, prompts, n)
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        medians = interleaved(runs, args.reps, args.clock)
    finally:
        competitor.kill()
        competitor.wait()
    print(f"\nbatch 1 beside a competing busy process, torch threads {torch.get_num_threads()}:")
    theirs = decode_rate(medians, "theirs", 1, args.new_tokens)
    rates = []
    for name, label in (
        ("ours", "ours eager, default threads"),
        ("all", "ours eager, all threads"),
        ("theirs", "theirs (float32)"),
    ):
        rate = decode_rate(medians, name, 1, args.new_tokens)
        rates.append(rate)
        share = share_of_peak(rate, flops_per_token, peak)
        print(f"  {label:22s} {rate:8.1f} tok/s   / theirs = {rate / theirs:.2f}x   {share}")
    print_noise_notice(rates)


if __name__ == "__main__":
    main()
