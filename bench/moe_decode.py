"""Compiled decode's routed experts: each (token, expert) pair gathering its expert, every expert on every token, and
the grouped-experts kernel (each chosen expert read once; float32 only, seekstack.model.cpu_kernels).

`RoutedExperts.forward_gathered` picks one of them by dtype and shape; this times each, and the pick, as the engine
compiles them (dynamic shapes, cpp wrapper), over the MoE layers of a preset chained as in one decode step.
Each timed step gets fresh tokens and routing and starts with the L3 cache flushed: a real step
reads the rest of the model's weights between two MoE layers. Outputs are checked against the pairs run eagerly
first. Median wall milliseconds per step.

    python bench/moe_decode.py                          # small, 1-64 tokens, float32 and bfloat16, one thread
    python bench/moe_decode.py --tokens 8 16 --dtypes bfloat16

Shapes: N tokens, D hidden.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from options import positive_int

import seekstack
from seekstack.model import cpu_kernels
from seekstack.model.moe import MoE, Routing

FLUSH_FLOATS = 32 * 1024 * 1024  # 128 MB written before each step, beyond any L3


def step(moes: list[MoE], path: str, xs: list[torch.Tensor], routings: list[Routing]) -> torch.Tensor:
    """The routed experts of every MoE layer, one after another, summed (so no layer's work is dropped)."""
    return sum(getattr(moe.experts, path)(x, routing) for moe, x, routing in zip(moes, xs, routings, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--reps", type=positive_int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 256  # a graph per path, dtype and token count class
    torch.manual_seed(0)
    model = seekstack.Transformer(seekstack.preset(args.preset)).eval()
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    flush = torch.zeros(FLUSH_FLOATS)
    print(f"{args.preset}: {len(moes)} MoE layers, {args.threads} thread(s), median wall ms per step of {args.reps}")
    kernel = cpu_kernels.available()
    header = f"{'dtype':9s} {'N':>4s} {'pairs':>8s} {'dense':>8s} {'kernel':>8s} {'dense/pairs':>12s}"
    print(f"{header} {'kernel/pairs':>13s} {'gathered (the pick)':>20s}")
    for dtype in [getattr(torch, name) for name in args.dtypes]:
        for moe in moes:
            moe.to(dtype)
        for tokens in args.tokens:
            with torch.no_grad():
                inputs = []
                for _ in range(args.reps):
                    xs = [torch.randn(tokens, model.config.hidden_size, dtype=dtype) for _ in moes]
                    inputs.append((xs, [moe.gate(x) for moe, x in zip(moes, xs, strict=True)]))
                reference = step(moes, "forward_pairs", *inputs[0])
                scale = reference.float().abs().max().item()
                ms = {"forward_kernel": float("nan")}
                paths = ["forward_pairs", "forward_dense", "forward_gathered"]
                for path in paths + (["forward_kernel"] if kernel and dtype == torch.float32 else []):
                    compiled = torch.compile(
                        lambda xs, routings, path=path: step(moes, path, xs, routings),
                        dynamic=True,
                        options={"cpp_wrapper": True},
                    )
                    error = (compiled(*inputs[0]).float() - reference.float()).abs().max().item() / scale
                    assert error < (1e-5 if dtype == torch.float32 else 3e-2), f"{path} {dtype} N={tokens}: {error}"
                    seconds = []
                    for xs, routings in inputs:
                        flush.add_(1)
                        start = time.perf_counter()
                        compiled(xs, routings)
                        seconds.append(time.perf_counter() - start)
                    ms[path] = 1e3 * statistics.median(seconds)
            pairs, dense, grouped = ms["forward_pairs"], ms["forward_dense"], ms["forward_kernel"]
            print(
                f"{str(dtype)[6:]:9s} {tokens:4d} {pairs:8.2f} {dense:8.2f} {grouped:8.2f} {dense / pairs:11.2f}x "
                f"{grouped / pairs:12.2f}x {ms['forward_gathered']:20.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
