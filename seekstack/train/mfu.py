"""Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak (PaLM, Chowdhery et al. 2022, App. B).

The FLOPs per token come from `seekstack.accounting.training_flops_per_token` (3x the forward, MTP included).
Peak FLOP/s per device, unless `TrainConfig.peak_flops` gives one:
- CUDA: the card's dense data-sheet peak, looked up by name, in the precision the run multiplies in: bf16 tensor cores
  for dtype=bfloat16 (H100/H800/H200 989 TFLOP/s, A100 312, B200 2250, MI300X 1307, A10G 70, ...; nanochat and
  torchtitan, which train in bf16, divide by the same spec); for float32 (dtype=auto on a GPU), its float32 rate (H100
  67, A100 19.5), or its TF32 tensor-core rate (H100 494.5, A100 156) where torch is allowed TF32
  (`torch.backends.cuda.matmul.allow_tf32`, `torch.set_float32_matmul_precision("high")`). A card not in the table is
  given an A100's, and its source says so.
- CPU: measured, one core's rate times the cores torch's threads keep busy (`thread_cores`): the median rate of blocks
  of square `torch.mm`s in the training dtype on one thread after a warm-up (once per process and dtype), timed on
  that thread's CPU clock, in the fastest of the operand layouts a training step uses: the rate this machine's matmul
  library really reaches, whatever its instruction set (on some CPUs bfloat16 runs 3x slower than float32, on others
  2x faster) and whichever layout it is fastest in, and one that other processes holding the cores do not lower (they
  stop the thread's clock, where a wall clock runs on: at load 18 on 2 cores torch's 2 threads read 11.4 GFLOP/s by
  the wall clock, one thread 88.7 by its CPU clock, and the demo's MFU read 61%). Cores run matmuls side by side:
  threads times one core's rate is the peak of as many cores, a step's wall-clock rate set against it the share of
  them the run got to use. A probe can still read low (a core shared with another process's hyperthread), and a
  step's MFU then comes out above 100%: the trainer probes again at that step (`core_matmul_flops`) and keeps the
  higher peak; under torchrun every rank probes again once any rank's MFU is above 100%, one rank after another
  (`probed_in_turns`). The benchmarks report against the same probe.
  CPU ranks on one machine share its cores: their summed peak is bounded by the distinct CPUs of their affinity
  masks (`shared_cpu_peak_flops`), where a card's peak counts once per rank.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from seekstack.infer.threads import running_on
from seekstack.parallel.distributed import Ranks, barrier, own_cpus

MATMUL_PROBE_SIZE = 1024  # n of the n x n x n probe: 2.1 GFLOP, large enough to run at the library's full rate
LAYOUT_PROBE_SIZE = 256  # the layouts are compared on (n x n) matrices this small: a slow one costs little
# Each probe (a layout, a size) first runs untimed matmuls this long, then times PROBE_BLOCKS blocks of as many as
# take about PROBE_BLOCK_SECONDS each, and its rate is the median block's, as torch.utils.benchmark's: in bfloat16 on
# an AMX core g.T @ x runs 20% below the other layouts at 256^3, within what one cold call swings, and at half their
# rate at 1024^3. (Timer.blocked_autorange sizes its blocks in steps of 10x, 3 to 32 blocks a probe on an AMX core,
# after one untimed call of a 1024^3 matmul.)
PROBE_WARMUP_SECONDS = 0.02
PROBE_BLOCK_SECONDS = 0.01
PROBE_BLOCKS = 5
# which operands of a training step's matmuls are transposed: x @ W.T (a Linear's forward), g @ W (its input's
# gradient), g.T @ x (its weight's gradient)
MATMUL_LAYOUTS = ((False, True), (False, False), (True, False))
# Dense (no sparsity) peak FLOP/s per device, from the vendors' data sheets (the bf16 column is nanochat's and
# torchtitan's tables'): bf16 and TF32 on tensor cores (None: the card has no TF32, and multiplies float32 at its
# float32 rate), and float32 without them (an AMD card's matrix FP32, the rate its BLAS multiplies float32 at). The
# first row whose words all appear in the lower-cased device name is the card's, so a variant comes before its family
# ("h100 pcie" before "h100", "l40s" before "l40" before "l4"); an MI250X is two devices, its peak per die. AWS's A10G
# (G5 instances) is no A10: its data sheet (NVIDIA A10G for AWS, 2022) gives 70 TFLOP/s dense bf16 (140 with sparsity)
# and 35 FP32, where the A10's gives 125 and 31.2
CARD_PEAK_FLOPS = (  # words, card, bf16, tf32, float32
    (("gb200",), "GB200", 2.5e15, 1.25e15, 80e12), (("b200",), "B200", 2.25e15, 1.125e15, 75e12),
    (("b100",), "B100", 1.8e15, 0.9e15, 60e12),
    (("h200", "nvl"), "H200 NVL", 836e12, 418e12, 60e12), (("h200",), "H200", 989e12, 494.5e12, 67e12),
    (("h100", "nvl"), "H100 NVL", 835e12, 417.5e12, 60e12), (("h100", "pcie"), "H100 PCIe", 756e12, 378e12, 51e12),
    (("h100",), "H100", 989e12, 494.5e12, 67e12),
    (("h800", "pcie"), "H800 PCIe", 756e12, 378e12, 51e12), (("h800",), "H800", 989e12, 494.5e12, 67e12),
    (("h20",), "H20", 148e12, 74e12, 44e12),
    (("a100",), "A100", 312e12, 156e12, 19.5e12), (("a800",), "A800", 312e12, 156e12, 19.5e12),
    (("a10g",), "A10G", 70e12, 35e12, 35e12), (("a10",), "A10", 125e12, 62.5e12, 31.2e12),
    (("l40s",), "L40S", 362e12, 183e12, 91.6e12), (("l40",), "L40", 181e12, 90.5e12, 90.5e12),
    (("l4",), "L4", 121e12, 60e12, 30.3e12),
    (("mi355",), "MI355X", 2.5e15, None, 157.3e12), (("mi325",), "MI325X", 1.3074e15, 653.7e12, 163.4e12),
    (("mi300x",), "MI300X", 1.3074e15, 653.7e12, 163.4e12), (("mi250x",), "MI250X", 191.5e12, None, 47.85e12),
)  # fmt: skip
PRECISIONS = ("bf16", "tf32", "float32")  # CARD_PEAK_FLOPS's columns
A100_PEAKS = next(row for row in CARD_PEAK_FLOPS if row[1] == "A100")[2:]
UNKNOWN_GPU_PEAK_FLOPS = dict(zip(PRECISIONS, A100_PEAKS, strict=True))  # an A100's, for cards not in the table
FLOPS_UNITS = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("", 1.0))
Probed = TypeVar("Probed")


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s of one device that MFU divides by, and where it comes from (told at a run's start and logged
    with its steps, so that an MFU can be read against it)."""

    flops: float
    source: str


def default_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> Peak:
    """Peak FLOP/s of one `device`: by card name on CUDA, its spec in the precision `dtype` multiplies in (float32:
    TF32 where torch is allowed it, `torch.get_float32_matmul_precision()` not "highest"), on a CPU one core's measured
    `dtype` matmul rate times the cores torch's threads keep busy."""
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            precision = "bf16"
        else:  # torch multiplies float32 on the tensor cores only as TF32, and only where allowed
            precision = "float32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        return card_peak_flops(torch.cuda.get_device_name(device), precision)
    cores = thread_cores(torch.get_num_threads())
    probe = f"a {MATMUL_PROBE_SIZE}^3 {dtype_name} matmul measured on one CPU thread's clock"
    core = statistics.median(measured_core_matmul_rates(dtype))
    return Peak(cores * core, f"{probe}, times {cores_named(cores)}")


@functools.cache
def card_peak_flops(name: str, precision: str = "bf16") -> Peak:
    """The dense peak of the card named `name` in `precision` (bf16, tf32 or float32: `CARD_PEAK_FLOPS`); a card
    without TF32 multiplies float32 at its float32 rate; an A100's for a card the table does not name. Its source says
    which."""
    words = name.lower()
    card = next((row for row in CARD_PEAK_FLOPS if all(word in words for word in row[0])), None)
    if card is None:
        return Peak(
            UNKNOWN_GPU_PEAK_FLOPS[precision],
            f"{name}: no {precision} peak known for it, an A100's assumed (set peak_flops)",
        )
    label, *peaks = card[1:]
    flops = dict(zip(PRECISIONS, peaks, strict=True))
    if flops[precision] is None:
        return Peak(flops["float32"], f"{name}: the {label}'s dense float32 spec (it has no TF32 tensor cores)")
    return Peak(flops[precision], f"{name}: the {label}'s dense {precision} spec")


def core_matmul_rates(dtype: torch.dtype = torch.float32) -> list[float]:
    """One CPU core's matmul FLOP/s in `dtype`, probed anew: `matmul_rates` on one thread, timed on that thread's CPU
    clock, which stops while other processes hold the core."""
    with running_on(1):
        return matmul_rates(dtype, time.thread_time)


def core_matmul_flops(dtype: torch.dtype = torch.float32) -> float:
    """The median of `core_matmul_rates(dtype)`, probed anew."""
    return statistics.median(core_matmul_rates(dtype))


@functools.cache
def measured_core_matmul_rates(dtype: torch.dtype = torch.float32) -> tuple[float, ...]:
    """`core_matmul_rates(dtype)`, probed once per process."""
    return tuple(core_matmul_rates(dtype))


def thread_cores(threads: int) -> int:
    """The cores `threads` intra-op threads keep busy: at most the CPUs this process may run on."""
    return min(threads, len(own_cpus()))


def cores_named(cores: int) -> str:
    """`cores` as a peak's source says it: "1 core", "2 cores"."""
    return f"{cores} core" + "s" * (cores > 1)


def matmul_rates(dtype: torch.dtype = torch.float32, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """FLOP/s of each timed block (`block_rates`) of (n x n) @ (n x n) CPU matmuls in `dtype` (2 n^3 FLOPs each), in
    the fastest (by median) of the layouts a training step multiplies in (`MATMUL_LAYOUTS`), picked on small matrices:
    the library's rate differs by layout (bfloat16 without native CPU support runs g @ W 14x slower than g.T @ x, and a
    probe of that layout alone put MFU at 300%). Seconds are `clock`'s: the clock the rates set against it are timed
    on (a CPU-time rate against a wall-clock peak probed while others held the core read 527% of peak)."""
    layout = max(
        MATMUL_LAYOUTS,
        key=lambda layout: statistics.median(block_rates(layout, dtype, LAYOUT_PROBE_SIZE, clock)),
    )
    return block_rates(layout, dtype, MATMUL_PROBE_SIZE, clock)


def block_rates(layout: tuple[bool, bool], dtype: torch.dtype, size: int, clock: Callable[[], float]) -> list[float]:
    """FLOP/s on `clock` of each of `PROBE_BLOCKS` blocks of (size x size) `torch.mm`s in `dtype`, each operand
    transposed where `layout` says, after `PROBE_WARMUP_SECONDS` (at least one call) of untimed ones, whose pace sets
    how many a block repeats to last `PROBE_BLOCK_SECONDS`."""
    generator = torch.Generator().manual_seed(0)
    lhs, rhs = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    lhs, rhs = (operand.t() if transposed else operand for operand, transposed in zip((lhs, rhs), layout, strict=True))
    calls, start = 0, clock()
    while not calls or (warm_seconds := clock() - start) < PROBE_WARMUP_SECONDS:
        torch.mm(lhs, rhs)
        calls += 1
    repeats = max(1, round(PROBE_BLOCK_SECONDS * calls / warm_seconds))
    rates = []
    for _ in range(PROBE_BLOCKS):
        begin = clock()
        for _ in range(repeats):
            torch.mm(lhs, rhs)
        rates.append(2 * size**3 * repeats / (clock() - begin))
    return rates


def probed_in_turns(probe: Callable[[], Probed], ranks: Ranks) -> Probed:
    """`probe` run by each rank in turn, the others waiting at a barrier (every rank calls it: the start's peak, and a
    re-probe the ranks agree on): CPU ranks probing at once on the cores they share each measured its share of them
    (2 ranks on the same cores read half the rate each), a peak too low that put MFU above 100%
    (`shared_cpu_peak_flops` already counts the cores the ranks share)."""
    for _ in range(ranks.rank):  # rank r probes once the r ranks before it have passed their barriers
        barrier(ranks)
    measured = probe()
    for _ in range(ranks.rank, ranks.world_size):
        barrier(ranks)
    return measured


def shared_cpu_peak_flops(
    rank_peak: float, threads: int, ranks_cpus: Sequence[tuple[str, frozenset[int]]], rank: int = 0
) -> float:
    """Peak FLOP/s of CPU ranks together, from `rank_peak`, the rate `rank` measured on `threads` threads: that rate
    per CPU a thread of it runs on, times the CPUs all ranks keep busy, which on each machine are no more than the
    distinct CPUs of its ranks' affinity masks (`ranks_cpus`: each rank's machine and mask). Four ranks sharing two
    cores reach two cores' peak, not four times one rank's."""
    machines: dict[str, tuple[int, frozenset[int]]] = {}
    for machine, cpus in ranks_cpus:
        busy, union = machines.get(machine, (0, frozenset()))
        machines[machine] = (busy + min(threads, len(cpus)), union | cpus)
    per_cpu = rank_peak / min(threads, len(ranks_cpus[rank][1]))
    return per_cpu * sum(min(busy, len(union)) for busy, union in machines.values())


def model_flops_utilisation(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """MFU = tokens/s x training FLOPs per token / peak FLOP/s (all devices together)."""
    return tokens_per_second * flops_per_token / peak_flops


def mfu_text(mfu: float) -> str:
    """MFU as the progress line shows it: one above 100% is no utilisation but a peak FLOP/s too low (a CPU probe that
    ran while other processes held the cores, a card or `peak_flops` below the truth), and says so."""
    return f"MFU {mfu:.1%}" if mfu <= 1 else f"MFU n/a ({mfu:.0%} of a peak too low)"


def flops_text(flops: float) -> str:
    """FLOP/s in the unit that reads best: '55.3 GFLOP/s', '989 TFLOP/s'."""
    unit, scale = next(((unit, scale) for unit, scale in FLOPS_UNITS if flops >= scale), FLOPS_UNITS[-1])
    return f"{flops / scale:.3g} {unit}FLOP/s"
