"""Routed experts: one grouped matmul over the stacked weights against one F.linear per expert, same layer.

`RoutedExperts.grouped_linear` runs `F.grouped_mm` unless a subclass replaces `expert_linear` (quantized and LoRA
experts), when it calls that once per expert; a subclass that replaces it with the same F.linear times the
per-expert path on the same weights and routing. Outputs are checked equal first; timed calls alternate, the
median is reported, on this process's CPU clock (steady while other jobs share the machine).

    python bench/moe_dispatch.py                 # tiny and small, decode (1, 8 tokens) and prefill/training (2,048)
    python bench/moe_dispatch.py --threads 2

Shapes: N tokens, D hidden.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from options import positive_int

import seekstack
from seekstack.model.moe import RoutedExperts, Routing


class PerExpertLoop(RoutedExperts):
    """The same experts with `expert_linear` replaced: `grouped_linear` falls back to one call per expert."""

    def expert_linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        return F.linear(x, getattr(self, name)[expert])


def median_ms(calls: dict[str, Callable[[], None]], reps: int, inner: int) -> dict[str, float]:
    """Median CPU milliseconds per call; each repetition runs every call `inner` times, alternating which goes first."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.process_time()
            for _ in range(inner):
                calls[name]()
            seconds[name].append((time.process_time() - start) / inner)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--reps", type=positive_int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU clock, median of {args.reps}")
    print(f"{'preset':7s} {'N':>5s} {'pass':>16s} {'grouped ms':>11s} {'per-expert ms':>14s} {'ratio':>6s}")
    for preset in ("tiny", "small"):
        torch.manual_seed(0)
        config = seekstack.preset(preset)
        moe = seekstack.Transformer(config).layers[1].mlp
        grouped = moe.experts
        loop = PerExpertLoop.__new__(PerExpertLoop)
        loop.__dict__ = grouped.__dict__.copy()  # the same parameters
        for tokens in (1, 8, 2048):
            x = torch.randn(tokens, config.hidden_size)
            with torch.no_grad():
                routing = moe.gate(x)
                difference = (grouped(x, routing)[0] - loop(x, routing)[0]).abs().max().item()
            assert difference < 1e-5, f"{preset} N={tokens}: the two dispatches differ by {difference}"
            passes = {"forward": False, "forward+backward": True} if tokens == 2048 else {"forward": False}
            for label, backward in passes.items():
                calls = {"grouped": _call(grouped, x, routing, backward), "loop": _call(loop, x, routing, backward)}
                ms = median_ms(calls, args.reps, inner=1 if tokens > 8 else 200)
                ratio = ms["loop"] / ms["grouped"]
                print(f"{preset:7s} {tokens:5d} {label:>16s} {ms['grouped']:11.3f} {ms['loop']:14.3f} {ratio:5.2f}x")


def _call(experts: RoutedExperts, x: torch.Tensor, routing: Routing, backward: bool) -> Callable[[], None]:
    def forward_only() -> None:
        with torch.no_grad():
            experts(x, routing)

    def forward_backward() -> None:
        leaf = x.clone().requires_grad_()
        experts(leaf, routing).square().sum().backward()

    return forward_backward if backward else forward_only


if __name__ == "__main__":
    main()
