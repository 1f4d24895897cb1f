"""How many CPU threads an engine step runs on: one for a small decode step, torch's full count for a large one.

A decode step of a small model is thousands of tiny matmuls. Split over threads, every op ends in a barrier; on a
quiet machine that costs about what the split saves, and on a busy one the barrier waits for a thread the OS has
descheduled, a whole time slice per op: with a competing process `tiny` decodes ~20-50x slower on 2 threads than on
1 (bench/decode.py --busy). Steps whose forward is below `min_parallel_flops` therefore run on one thread; torch's
setting is restored after each step, so prefill and whatever else the process runs keep every thread.

The same holds in bfloat16, although a bf16 GEMV alone runs ~1.8x faster on 2 threads than on 1 on a quiet 2-core
Zen 5: `small`'s compiled bf16 decode on 2 threads made 11 tok/s against 70 on 1 at batch 1 (65 against 220 at batch
8) with other jobs on the machine (load ~6), and 1.4 against 32 beside a busy process; so the threshold is one for
every dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from seekstack.accounting import forward_flops_per_token
from seekstack.config import ModelConfig

MIN_PARALLEL_FLOPS = 1e9  # a forward below this (~10 ms on one core) runs on one thread


class StepThreads:
    """Chooses torch's intra-op threads for one engine step from the FLOPs of its forward (CPU only)."""

    def __init__(self, config: ModelConfig, device: torch.device, min_parallel_flops: float = MIN_PARALLEL_FLOPS):
        self.flops_per_token = forward_flops_per_token(config, 0)  # the matmuls; attention over the cache is small
        self.enabled = device.type == "cpu"
        self.min_parallel_flops = min_parallel_flops

    def threads_for(self, tokens: int) -> int:
        """Threads for a forward over `tokens` tokens: 1 below the threshold, else torch's current setting."""
        if not self.enabled or tokens * self.flops_per_token >= self.min_parallel_flops:
            return torch.get_num_threads()
        return 1

    def running(self, tokens: int) -> contextlib.AbstractContextManager[None]:
        """Run the body on `threads_for(tokens)` threads, then restore torch's setting."""
        return running_on(self.threads_for(tokens))


@contextlib.contextmanager
def running_on(threads: int) -> Iterator[None]:
    """Run the body on `threads` intra-op threads, then restore torch's setting."""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
