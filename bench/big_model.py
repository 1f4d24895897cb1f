"""A DeepSeek-V2-Lite-shaped model with random int8 weights on this machine: load time, peak RSS, time to first
token and decode speed against the bound that memory bandwidth sets.

The checkpoint (compressed-tensors int8 for every block projection and the routed experts; embedding, head,
norms, routers and kv_b_proj in bfloat16, as `seekstack quantize` writes them) is written once under
runs/big_model/ by a child process that builds it layer by layer from random int8 codes, never in float. This
process then loads it with `load_pretrained` (quantized layers stay int8 and run the int8 kernel) and generates
greedily with the engine. The bound:

    bound tok/s = copy bandwidth / bytes of weights one token reads
    bytes read per token = all weight bytes - (1 - K/E) x routed-expert bytes - all but one row of the embedding
    copy bandwidth = bytes / time of one large tensor copy, the best of a few: bytes copied per second, as
                     memcpy benchmarks (mbw) report it; STREAM's convention counts the read and the write, twice
                     this, and the JSON gives the fraction of that stricter bound too
    decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token))

Times are this process's CPU seconds on one torch thread (`--clock wall` for wall time): on a machine others
load, wall time measures the queue for a core, and the copy and the decode would not see the same share of it.

    python bench/big_model.py                 # full V2-Lite shape: ~16 GB on disk and in memory
    python bench/big_model.py --layers 4      # the first 4 layers (1 dense + 3 MoE): ~2.3 GB
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import seekstack
from seekstack.checkpoint import load_pretrained
from seekstack.compress.linear import Int8Weight, QuantizedExperts, QuantizedLinear
from seekstack.compress.quantize import QuantConfig, quantizable_layers
from seekstack.infer import Engine, SamplingParams
from seekstack.model.moe import RoutedExperts
from seekstack.model.norm import RMSNorm
from seekstack.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STD = 0.02


def random_int8(shape: tuple[int, ...]) -> Int8Weight:
    """Uniform int8 codes with one scale per output row: weights of standard deviation STD."""
    codes = torch.randint(-127, 128, shape, dtype=torch.int8)
    return Int8Weight(codes, torch.full((*shape[:-1], 1), STD * 3**0.5 / 127))


def write_checkpoint(directory: Path, layers: int) -> None:
    """The int8 model, built on the meta device and filled one layer at a time, saved with `save_pretrained`."""
    config = seekstack.preset("deepseek-v2-lite", num_hidden_layers=layers)
    with torch.device("meta"):
        model = seekstack.Transformer(config).to(torch.bfloat16)
    scheme = QuantConfig(scheme="int8")
    for name in quantizable_layers(model):
        if scheme.scheme_of(name) is None:
            continue
        module = model.get_submodule(name)
        if isinstance(module, RoutedExperts):
            quantized = QuantizedExperts(random_int8(module.gate_up_proj.shape), random_int8(module.down_proj.shape))
        else:
            quantized = QuantizedLinear(random_int8(tuple(module.weight.shape)))
        model.set_submodule(name, quantized)
    for module in model.modules():  # what stays in bfloat16: random normal, norms one
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or not tensor.is_meta:
                continue
            value = torch.ones(tensor.shape) if isinstance(module, RMSNorm) else torch.randn(tensor.shape) * STD
            if name in module._buffers:
                module._buffers[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
            else:
                module._parameters[name] = nn.Parameter(value.to(tensor.dtype), requires_grad=False)
    model.reset_rope()
    seekstack.save_pretrained(model, directory)


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
    """This process's resident memory now: anonymous (the model's own copies) and file-backed (mapped checkpoint
    pages, which the OS drops under pressure), from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {f"{name}_gb": int(fields[name].split()[0]) * 1024 / 1e9 for name in ("RssAnon", "RssFile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=27, help="V2-Lite has 27")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    if args.write_only:
        write_checkpoint(args.write_only, args.layers)
        return

    directory = ROOT / "runs" / "big_model" / f"v2-lite-int8-{args.layers}-layers"
    if not (directory / "config.json").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--write-only", str(directory)],
                       check=True)  # fmt: skip
        print(f"wrote {directory} in {time.perf_counter() - started:.0f} s")
    bandwidth = copy_bandwidth(clock)

    started = time.perf_counter()
    model = load_pretrained(directory, dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - started
    total, active = bytes_read_per_token(model)
    texts = [path.read_text() for path in sorted((ROOT / "seekstack").rglob("*.py"))]
    tokenizer = train_tokenizer(texts, vocab_size=1024, out_path=Path(tempfile.mkdtemp()))
    engine = Engine(model, tokenizer, max_batch_size=1, max_model_len=4096, kv_cache_memory=2**28)
    prompt = torch.randint(5, 1024, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompt[:8]], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    seconds = {}
    for new_tokens in (1, args.new_tokens):
        start = clock()
        [completion] = engine.generate([prompt], dataclasses.replace(params, max_new_tokens=new_tokens))
        seconds[new_tokens] = clock() - start
    decode = (args.new_tokens - 1) / (seconds[args.new_tokens] - seconds[1])
    bound = bandwidth / active
    result = {
        "layers": args.layers,
        "weights_gb": total / 1e9,
        "read_per_token_gb": active / 1e9,
        "load_s": load_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        **resident_gb(),
        "clock": args.clock,
        "ttft_s": seconds[1],
        "decode_tok_s": decode,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_bound_tok_s": bound,
        "fraction_of_bound": decode / bound,
        "fraction_of_read_plus_write_bound": decode / (2 * bound),
        "llama_cpp": "not run: llama-cpp-python is not installed in .venv",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
