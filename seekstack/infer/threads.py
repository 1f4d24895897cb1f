"""How many CPU threads an engine step runs on: one for a small decode step, torch's full count for a large one.

A decode step of a small model is thousands of tiny matmuls. Split over threads, every op ends in a barrier; on a
quiet machine that costs about what the split saves, and on a busy one the barrier waits for a thread the OS has
descheduled, a whole time slice per op: with a competing process `tiny` decodes ~20-50x slower on 2 threads than on
1 (bench/decode.py --busy). Steps whose forward is below `min_parallel_flops` therefore run on one thread; torch's
setting is restored after each step, so prefill and whatever else the process runs keep every thread.

The same holds in bfloat16: on a 2-core Zen 4 EPYC (avx512_bf16, no AMX) with other jobs on the machine (load 5-9),
`small`'s compiled bf16 decode made 2-20 tok/s on 2 threads against 67-140 on 1 at batch 1, and 16-55 against 191-629
at batch 8 (4 alternating rounds each); so the threshold is one for every dtype.

Where a caller can use more threads when nothing else runs (RL's training half: its matmuls are wide enough to gain
from a second thread, and a barrier that waits on a busy machine costs it 20x), `IdleCores` says how many cores the
whole machine left idle while the caller ran on one, and `threads_beside` turns that into a thread count.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def configured_threads(threads: int | str) -> Iterator[None]:
    """A run's `threads` field around the run: N > 0 sets torch's intra-op threads to N, "auto" and 0 leave torch's
    setting to the run; afterwards torch's setting is restored either way (an "auto" run changes it as it goes)."""
    before = torch.get_num_threads()
    try:
        if threads != "auto" and threads > 0:
            torch.set_num_threads(checked_thread_count(int(threads), "field 'threads'"))
        yield
    finally:
        torch.set_num_threads(before)


def checked_thread_count(threads: int, name: str) -> int:
    """`threads` if it is from 1 to the machine's CPU count, else a ValueError naming `name`: more threads than CPUs
    only oversubscribe them, and a typo's 100000 makes torch hang creating them."""
    most = os.cpu_count() or 1
    if not 1 <= threads <= most:
        raise ValueError(f"{name} {threads}: must be from 1 to this machine's {most} CPUs")
    return threads


IDLE_SHARE_FOR_A_THREAD = 0.8  # a core idle at least this share of an interval takes one more thread


class IdleCores:
    """How many cores the machine left idle over an interval, from the kernel's CPU time counters (Linux /proc/stat:
    idle and iowait against all time; `steal`, time a VM's host took, counts as busy). None where they cannot be read.
    """

    def __init__(self, stat_path: str | Path = "/proc/stat"):
        self.stat_path = Path(stat_path)
        self.restart()

    @property
    def readable(self) -> bool:
        """Whether this system has the counters."""
        return self._since is not None

    def restart(self) -> None:
        """Start a new interval now."""
        self._since = self._read()

    def idle(self) -> float | None:
        """The average count of idle cores since `restart` (1.9: of 2 cores, nearly both idle)."""
        now = self._read()
        if now is None or self._since is None:
            return None
        idle, total = now[0] - self._since[0], now[1] - self._since[1]
        if total <= 0:
            return None
        return now[2] * idle / total

    def _read(self) -> tuple[int, int, int] | None:
        """(idle, total) clock ticks summed over all cores since boot, and the count of cores."""
        try:
            lines = self.stat_path.read_text().splitlines()
        except OSError:
            return None
        fields = lines[0].split() if lines else []
        if len(fields) < 9 or fields[0] != "cpu":
            return None
        ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest in user)
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit()) or os.cpu_count() or 1
        return ticks[3] + ticks[4], sum(ticks), cores


def threads_beside(idle_cores: float | None, most: int) -> int:
    """One thread, plus one per core that sat idle at least IDLE_SHARE_FOR_A_THREAD of the interval, at most `most`;
    one where idleness is unknown."""
    if idle_cores is None:
        return 1
    return max(1, min(most, 1 + math.floor(round(idle_cores + 1 - IDLE_SHARE_FOR_A_THREAD, 9))))


PROBE_EVERY = 20  # steps on every thread between one-thread steps that look at the machine


class LoadAwareThreads:
    """Threads for a loop of like steps (training) on a CPU that other processes may share: torch's setting while the
    machine's other cores sit idle, fewer while something else keeps them busy.

    A step that fills every core leaves nothing idle to read, so every `probe_every`-th step (from the second on)
    runs on one thread while `IdleCores` watches: the cores the rest of the machine left idle give the next steps'
    threads (`threads_beside`). Below torch's setting every step watches, so a run takes its threads back in the
    step after the other job ends.
    `tiny`, 16 x 256 tokens a step, 2-core Zen 3: 2 threads ~4,300 tok/s quiet but ~1,200 beside one busy process,
    where 1 thread makes ~2,700 (and two 2-thread trainings at once made ~245 each).
    """

    def __init__(self, most: int, probe_every: int = PROBE_EVERY, idle: IdleCores | None = None, enabled: bool = True):
        self.most = most
        self.threads = most
        self.probe_every = probe_every
        self.idle = idle or IdleCores()
        self.watches = enabled and most > 1 and self.idle.readable  # else the steps keep torch's setting

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Run step `number` (the run's count, so a resumed run looks at the same steps) on the chosen threads."""
        if not self.watches:
            yield
            return
        watching = self.threads < self.most or number % self.probe_every == 1  # the first after step 0's warm-up
        threads = 1 if watching and self.threads == self.most else self.threads
        self.idle.restart()
        with running_on(threads):
            yield
        idle = self.idle.idle() if watching else None
        if idle is not None:
            self.threads = threads_beside(idle + threads - 1, self.most)
