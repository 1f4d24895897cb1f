"""A DeepSeek-V2-Lite-shaped model with random int8 weights on this machine: load time, peak RSS, time to first
token and decode speed against the bound that memory bandwidth sets, and llama.cpp on the same weights.

The checkpoint (compressed-tensors int8 for every block projection and the routed experts; embedding, head,
norms, routers and kv_b_proj in bfloat16, as `seekstack quantize` writes them; routed experts in seekstack's
stacked layout, so they memory-map as the model holds them) is written once under runs/big_model/ by a child
process, one part (embedding, block, head) at a time from random int8 codes, never in float: its memory holds one
part and one 1 GiB shard. This process then loads it with `load_pretrained`, which memory-maps every tensor (the
resident set grows with the pages a forward touches, file-backed, which the OS may drop again), and generates
greedily with the engine. A child process writes the same weights as a q8_0 GGUF (bench/gguf_deepseek2.py: the
same int8 codes and scales), and another runs llama.cpp (llama-cpp-python, one thread, mmap) on it with the same
prompt, timed the same way. The bound:

    bound tok/s = copy bandwidth / bytes of weights one token reads
    bytes read per token = all weight bytes - (1 - K/E) x routed-expert bytes - all but one row of the embedding
    copy bandwidth = bytes / time of one large tensor copy, the best of a few: bytes copied per second, as
                     memcpy benchmarks (mbw) report it (STREAM's convention counts the read and the write, twice
                     this). A decode that only reads can beat it: llama.cpp does, by ~5-40% here
    decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token))

Times are on two clocks: this process's CPU seconds on one torch thread (what it computed: on a machine others
load, wall time measures the queue for a core), and wall seconds (which also count the wait for pages of the
memory-mapped weights read from disk). The first call after loading is reported apart (cold pages).

    python bench/big_model.py                 # full V2-Lite shape: ~16 GB on disk (and a ~17 GB GGUF, deleted
                                              # after the run unless --keep-gguf)
    python bench/big_model.py --layers 6      # the first 6 layers (1 dense + 5 MoE): ~3.6 GB
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from llama_cpp_peer import open_gguf, probe_gguf
from options import new_token_count, positive_int
from peers import peer_missing
from torch import nn

import seekstack
from seekstack.atomic import atomic_directory
from seekstack.checkpoint import checkpoint_tensors, load_pretrained, write_config, write_shards
from seekstack.compress.linear import Int8Weight, QuantizedExperts, QuantizedLinear
from seekstack.compress.quantize import QuantConfig, quantizable_layers
from seekstack.config import PRESETS
from seekstack.infer import Engine, SamplingParams
from seekstack.model.moe import RoutedExperts
from seekstack.model.norm import RMSNorm
from seekstack.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STD = 0.02
INT8_SCALE = STD * 3**0.5 / 127  # uniform codes in [-127, 127] times this: weights of standard deviation STD
SHARD_BYTES = 2**30
V2_LITE_LAYERS = PRESETS["deepseek-v2-lite"]["num_hidden_layers"]


def layer_count(text: str) -> int:
    """An argparse type for --layers: V2-Lite's first 1 to 27 layers, so that more (a deeper model than V2-Lite,
    written to disk for minutes) is refused by name before any work, as 0 is."""
    layers = positive_int(text)
    if layers > V2_LITE_LAYERS:
        raise argparse.ArgumentTypeError(f"{layers}: at most {V2_LITE_LAYERS} (DeepSeek-V2-Lite's layers)")
    return layers


def int8_on_meta(shape: tuple[int, ...]) -> Int8Weight:
    """An int8 weight of `shape` with one scale per output row, on the meta device (filled by `fill`)."""
    return Int8Weight(torch.empty(shape, dtype=torch.int8, device="meta"), torch.empty((*shape[:-1], 1), device="meta"))


def int8_model_on_meta(layers: int) -> seekstack.Transformer:
    """The V2-Lite-shaped model with `layers` blocks, its quantizable layers int8 as `seekstack quantize` makes them,
    every tensor on the meta device."""
    config = seekstack.preset("deepseek-v2-lite", num_hidden_layers=layers)
    with torch.device("meta"):
        model = seekstack.Transformer(config).to(torch.bfloat16)
    scheme = QuantConfig(scheme="int8")
    for name in quantizable_layers(model):
        if scheme.scheme_of(name) is None:
            continue
        module = model.get_submodule(name)
        if isinstance(module, RoutedExperts):
            quantized = QuantizedExperts(int8_on_meta(module.gate_up_proj.shape), int8_on_meta(module.down_proj.shape))
        else:
            quantized = QuantizedLinear(int8_on_meta(tuple(module.weight.shape)))
        model.set_submodule(name, quantized)
    return model


def fill(part: nn.Module) -> None:
    """Random values for `part`'s meta tensors: int8 codes uniform with their row scale, bfloat16 weights normal,
    norms one, buffers (the routing bias) zero."""
    for module in part.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or not tensor.is_meta:
                continue
            if tensor.dtype == torch.int8:
                value = torch.randint(-127, 128, tensor.shape, dtype=torch.int8)
            elif isinstance(module, Int8Weight):
                value = torch.full(tensor.shape, INT8_SCALE, dtype=tensor.dtype)
            elif name in module._buffers:
                value = torch.zeros(tensor.shape, dtype=tensor.dtype)
            else:
                value = torch.ones(tensor.shape) if isinstance(module, RMSNorm) else torch.randn(tensor.shape) * STD
            if name in module._buffers:
                module._buffers[name] = value
            else:
                module._parameters[name] = nn.Parameter(value.to(tensor.dtype), requires_grad=False)


def write_checkpoint(directory: Path, layers: int) -> None:
    """The int8 model in the stacked-experts layout, one part at a time: fill a part, hand its tensors to the shard
    writer, put it back on meta."""
    model = int8_model_on_meta(layers)
    parts = ["embed_tokens", *(f"layers.{i}" for i in range(layers)), "norm", "lm_head"]

    def tensors():
        for part in parts:
            fill(model.get_submodule(part))
            yield from checkpoint_tensors(model, stacked_experts=True, part=part)
            model.get_submodule(part).to("meta")

    with atomic_directory(directory) as staging:
        write_shards(tensors(), staging, SHARD_BYTES)
        write_config(model, staging, stacked_experts=True)


def copy_bandwidth(clock: Callable[[], float], megabytes: int = 512, reps: int = 5) -> float:
    """Bytes copied per second by the fastest of `reps` copies of one large tensor."""
    source = torch.ones(megabytes * 2**20, dtype=torch.uint8)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(reps):
        start = clock()
        target.copy_(source)
        best = min(best, clock() - start)
    return source.numel() / best


def bytes_read_per_token(model: seekstack.Transformer) -> tuple[int, int]:
    """(all weight bytes, weight bytes one decoded token reads): K of E routed experts, one embedding row."""

    def size(module: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    config = model.config
    total = size(model) - model.rotary.inv_freq.numel() * 4
    routed = sum(size(m) for m in model.modules() if isinstance(m, RoutedExperts))
    embedding = size(model.embed_tokens)
    unread = routed * (1 - config.num_experts_per_tok / config.n_routed_experts) + embedding * (
        1 - 1 / config.vocab_size
    )
    return total, int(total - unread)


def resident_gb() -> dict[str, float]:
    """This process's resident memory, from /proc/self/status: its peak (VmHWM: unlike getrusage's maxrss, not
    inherited from the parent a child was forked from), and now, anonymous (the model's own copies) and file-backed
    (mapped checkpoint pages, which the OS drops under pressure)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    names = {"peak_rss_gb": "VmHWM", "RssAnon_gb": "RssAnon", "RssFile_gb": "RssFile"}
    return {key: int(fields[name].split()[0]) * 1024 / 1e9 for key, name in names.items()}


def clocks() -> tuple[float, float]:
    """CPU seconds of this process (on one thread: what it computed, not the wait for a core on a shared machine)
    and wall seconds (which also count waiting for pages read from disk), read together."""
    return time.process_time(), time.perf_counter()


def decode_rates(first: tuple[float, float], whole: tuple[float, float], new_tokens: int) -> dict[str, float]:
    """decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token)), on each clock."""
    return {
        f"decode_tok_s_{clock}": (new_tokens - 1) / (whole[i] - first[i]) for i, clock in enumerate(("cpu", "wall"))
    }


def timed(run: Callable[[], object]) -> tuple[tuple[float, float], object]:
    start = clocks()
    result = run()
    end = clocks()
    return (end[0] - start[0], end[1] - start[1]), result


def run_ours(directory: Path, prompt: list[int], new_tokens: int) -> dict:
    """Load (memory-mapped), a cold first call, then TTFT and decode on warm pages, with the engine."""
    started = time.perf_counter()
    model = load_pretrained(directory, dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - started
    after_load = resident_gb()
    total, active = bytes_read_per_token(model)
    texts = [path.read_text() for path in sorted((ROOT / "seekstack").rglob("*.py"))]
    tokenizer = train_tokenizer(texts, vocab_size=1024, out_path=Path(tempfile.mkdtemp()))
    engine = Engine(model, tokenizer, max_batch_size=1, max_model_len=4096, kv_cache_memory=2**28)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    cold, _ = timed(lambda: engine.generate([prompt], dataclasses.replace(params, max_new_tokens=1)))
    first, _ = timed(lambda: engine.generate([prompt], dataclasses.replace(params, max_new_tokens=1)))
    whole, [completion] = timed(lambda: engine.generate([prompt], params))
    return {
        "weights_gb": total / 1e9,
        "read_per_token_gb": active / 1e9,
        "active_bytes": active,
        "load_s": load_seconds,
        "resident_after_load": after_load,
        "cold_first_call_s_wall": cold[1],
        "ttft_s_cpu": first[0],
        "ttft_s_wall": first[1],
        **decode_rates(first, whole, new_tokens),
        "tokens": completion.token_ids,
        "resident_at_end": resident_gb(),
    }


def run_llama_cpp(path: Path, prompt: list[int], new_tokens: int) -> dict:
    """llama.cpp on the GGUF, one thread, memory-mapped, without its extra weight buffers where it aborts with them
    (`probe_gguf`): load, a cold first call, then TTFT and greedy decode timed as ours (prompt evaluation + the first
    token; then one evaluation per token)."""
    import llama_cpp
    import numpy as np

    context = len(prompt) + new_tokens  # tokens llama.cpp's context holds
    extra_buffers, note = probe_gguf(path, context)
    if extra_buffers is None:
        raise SystemExit(f"llama-cpp-python could not load {path} ({note})")
    started = time.perf_counter()
    llm = open_gguf(path, context, threads=1, extra_buffers=extra_buffers)
    load_seconds = time.perf_counter() - started
    after_load = resident_gb()

    def greedy() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # Llama.scores holds them only with logits_all
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def generate(count: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        tokens = [greedy()]
        while len(tokens) < count:
            llm.eval(tokens[-1:])
            tokens.append(greedy())
        return tokens

    cold, _ = timed(lambda: generate(1))
    first, _ = timed(lambda: generate(1))
    whole, tokens = timed(lambda: generate(new_tokens))
    return {
        "load_s": load_seconds,
        "resident_after_load": after_load,
        "cold_first_call_s_wall": cold[1],
        "ttft_s_cpu": first[0],
        "ttft_s_wall": first[1],
        **decode_rates(first, whole, new_tokens),
        "tokens": tokens,
        "resident_at_end": resident_gb(),
        "loaded": note or "as llama.cpp loads by default",
    }


def child(*args: str) -> dict | None:
    """Run this script with `args` in a child process (its own peak RSS); its last stdout line is JSON. A child that
    fails stops the run with its command and the last line of its error."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise SystemExit(f"bench/big_model.py {' '.join(args)} failed (exit {done.returncode}): {error}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=layer_count, default=V2_LITE_LAYERS, help="V2-Lite's first N (it has 27)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=64)
    parser.add_argument("--new-tokens", type=new_token_count, default=32)
    parser.add_argument("--skip-llama-cpp", action="store_true", help="time ours only (no GGUF written)")
    parser.add_argument("--keep-gguf", action="store_true", help="keep the GGUF (as large as the checkpoint)")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = ROOT / "runs" / "big_model" / f"v2-lite-int8-{args.layers}-layers"
    gguf_path = directory.with_suffix(".q8_0.gguf")
    prompt = torch.randint(5, 1024, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    if args.child:
        job, path = args.child
        if job == "write":
            write_checkpoint(Path(path), args.layers)
        elif job == "gguf":
            from gguf_deepseek2 import write_gguf

            write_gguf(load_pretrained(directory, dtype=torch.bfloat16), Path(path))
        print(json.dumps(run_llama_cpp(Path(path), prompt, args.new_tokens) if job == "llama_cpp" else resident_gb()))
        return

    skip_llama_cpp = "llama.cpp: skipped (--skip-llama-cpp)"
    if not args.skip_llama_cpp:
        skip_llama_cpp = peer_missing("llama.cpp", ("llama_cpp", "gguf"), "pip install -e '.[bench]', a long C++ build")
    if skip_llama_cpp:
        print(skip_llama_cpp, flush=True)
    written = {}
    if not (directory / "config.json").exists():
        started = time.perf_counter()
        written["checkpoint"] = {**child("--layers", str(args.layers), "--child", "write", str(directory)),
                                 "seconds": time.perf_counter() - started}  # fmt: skip
    if not skip_llama_cpp and not gguf_path.exists():
        started = time.perf_counter()
        written["gguf"] = {**child("--layers", str(args.layers), "--child", "gguf", str(gguf_path)),
                           "seconds": time.perf_counter() - started}  # fmt: skip
    ours = run_ours(directory, prompt, args.new_tokens)
    bandwidth = copy_bandwidth(time.process_time)  # after: its 1 GiB of buffers would be the peak RSS of a small model
    bound = bandwidth / ours["active_bytes"]
    result = {
        "layers": args.layers,
        "checkpoint_file_gb": sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9,
        "written": written,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound,
        "ours": ours,
        "fraction_of_bound_cpu": ours["decode_tok_s_cpu"] / bound,
        "fraction_of_bound_wall": ours["decode_tok_s_wall"] / bound,
    }
    del ours
    gc.collect()
    if skip_llama_cpp:
        result["llama_cpp"] = skip_llama_cpp
    else:
        theirs = child("--layers", str(args.layers), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
                       str(args.new_tokens), "--child", "llama_cpp", str(gguf_path))  # fmt: skip
        result["gguf_file_gb"] = gguf_path.stat().st_size / 1e9
        result["llama_cpp"] = theirs
        result["ours_over_llama_cpp_decode_cpu"] = result["ours"]["decode_tok_s_cpu"] / theirs["decode_tok_s_cpu"]
        result["ours_over_llama_cpp_decode_wall"] = result["ours"]["decode_tok_s_wall"] / theirs["decode_tok_s_wall"]
        result["llama_cpp_fraction_of_bound_cpu"] = theirs["decode_tok_s_cpu"] / bound
        pairs = zip(result["ours"]["tokens"], theirs["tokens"], strict=True)
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), args.new_tokens)
        result["greedy_tokens_agreeing_before_first_difference"] = agree
        if not args.keep_gguf:
            gguf_path.unlink()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
