"""glibc malloc settings a launcher chooses once per process (the `seekstack` command, the benches): large tensors
served from the heap and kept there once freed, so that a forward's fresh buffers reuse pages already touched instead
of faulting them in anew. A program importing seekstack keeps its own allocator unless it calls `keep_freed_memory`."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc serves a block above M_MMAP_THRESHOLD (128 KiB, raised as blocks are freed, to 32 MiB at most) with fresh
# mmap'd pages and unmaps it when freed, so every forward faults its large buffers in again, 4 KiB a fault: a
# 4 x 512 `small` forward's 64 MiB of bfloat16 logits took 16,384 of them. Below both thresholds a freed block
# stays in the heap for the next. (torch's CPU launcher, torch.backends.xeon.run_cpu, preloads jemalloc or tcmalloc,
# which keep freed pages, for the same reason.)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
# Both thresholds 256 MiB, not higher: the heap gives back only the free memory at its top, so a real-size model's
# weights (V2-Lite's experts: 369-738 MiB a tensor) kept there stayed held once freed, 2.8 GB of a 3.3 GB model, and
# converting a checkpoint tensor by tensor grew to 4.2 GB of holes; above 256 MiB a block is mmap'd and unmapped again.
HEAP_THRESHOLD = 256 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own environment, read at start
OFF_SWITCH = "SEEKSTACK_KEEP_FREED_MEMORY"  # "0" (or false, no, off): glibc's own setting
OFF_VALUES = ("0", "false", "no", "off")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 256 MiB; True when set. Left alone where the C library is not glibc,
    SEEKSTACK_KEEP_FREED_MEMORY is 0 (false, no, off), or the user set either threshold (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES's glibc.malloc)."""
    if not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        return False
    if os.environ.get(OFF_SWITCH, "").strip().lower() in OFF_VALUES or any(
        name in os.environ for name in USER_SETTINGS
    ):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return all([libc.mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD), libc.mallopt(M_TRIM_THRESHOLD, HEAP_THRESHOLD)])
