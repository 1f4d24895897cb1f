"""The routed experts of a decode step's few tokens, each chosen expert's weights read once (a C++ kernel).

A decode step reads far more weight bytes than it has FLOPs for them, so its MoE time is the expert weights it
streams. Each (token, expert) pair gathering its expert (`RoutedExperts.forward_pairs`, what inductor fuses) reads
N*K expert weight sets; `small`'s 8 tokens x 4 choices read 32 sets for ~14 distinct experts. The kernel groups the
pairs by expert and loads each weight row once for all of that expert's tokens (AVX2 + FMA where the CPU has them,
plain loops elsewhere), one expert per thread. `bench/moe_decode.py`, `small`, float32, one thread, 7 MoE layers
with the L3 flushed: 16.3 against 23.3 ms at 8 tokens, 22.9 against 38.1 at 16; about even at 1-2 tokens, where
compiled steps keep the pairs. In the engine (`small`, compiled, alternating in one process, same greedy tokens)
decode ran +13-34% faster at 8 rows and +19-29% at 16.

It is built for this CPU on first use (torch.utils.cpp_extension, cached under TORCH_EXTENSIONS_DIR, ~15 s) and
registered as `torch.ops.seekstack.grouped_experts`, an op that compiled steps call like any other. Where no C++
compiler is found the build fails once, with a warning, and the experts keep their other paths.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

SOURCE = Path(__file__).with_name("expert_kernel.cpp")
NAME = "seekstack_expert_kernel"
MAX_TOKENS = 16  # up to here the kernel runs the eager path's routed experts too (bench/moe_decode.py)

_built: dict[str, bool] = {}  # "ok": whether the build succeeded, once it was tried


def available() -> bool:
    """Build (on the first call) and load the kernel; whether it can be used. Call it outside a compiled region:
    `usable` inside one only reads the outcome."""
    if "ok" not in _built:
        _built["ok"] = _build()
    return _built["ok"]


def usable(x: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    """Whether the kernel (already built) takes these tensors: float32 tokens and plain (not sharded) float32 expert
    weights, on the CPU."""
    return (
        _built.get("ok", False)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and gate_up_proj.dtype == torch.float32
        and not isinstance(gate_up_proj, DTensor)
    )


def grouped_experts(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """x (N, D), routing experts / weights (N, K), stacked expert weights (E, 2I, D) / (E, D, I) -> (N, D)."""
    return torch.ops.seekstack.grouped_experts(x, experts, weights.float(), gate_up_proj, down_proj)


def _build() -> bool:
    from torch.utils.cpp_extension import get_default_build_root, load

    folder = Path(get_default_build_root()) / f"{NAME}-torch{torch.__version__}-{_cpu_tag()}"
    if not (folder / f"{NAME}.so").exists():
        print(f"note: building {SOURCE.name} for this CPU in {folder} (once, ~15 s)", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        load(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native"],
            build_directory=str(folder),
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, an unknown -march: the experts keep their other paths
        warnings.warn(f"seekstack: {SOURCE.name} did not build, the experts run without it: {error}", stacklevel=3)
        return False
    torch.library.register_fake("seekstack::grouped_experts")(_shape_of_result)
    return True


def _cpu_tag() -> str:
    """The machine and a hash of its CPU's instruction-set flags: a build for one CPU (-march=native) is never loaded
    on another that shares the cache folder (a cluster's network home)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = (
        next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
        if cpuinfo.exists()
        else ""
    )
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def _shape_of_result(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape)
