"""The float type inference runs in when asked for `auto`: bfloat16 where every device the model runs on computes it
fast, float32 elsewhere.

A decode step reads every active weight once, so half the bytes per weight is up to half the time per token. Whether
bfloat16 is faster depends on the instruction set: a CPU with AVX512-BF16 or AMX-BF16 runs bf16 matmuls in
dot-product instructions; without them torch widens bf16 to float32 around each op and bf16 can run 3.5x slower
than float32. CUDA GPUs with native bf16 (compute capability 8.0 and later) run it at least as fast as float32.
Other CPUs (ARM's bf16 included, unmeasured here) stay in float32.

Even with the instructions, torch's bf16 matmul costs ~15 us more per call than float32's (2-core Zen 4 EPYC with
avx512_bf16 and no AMX, one thread, torch 2.13: a 256x256 GEMV 21.5 us against 6.7). seekstack's kernels take a
decode step's 1-16-row products without that cost, yet a model whose float32 weights fit in the last-level cache gains
nothing from fewer bytes: on that CPU the 2.8M-parameter `tiny` (the demo model's size) decodes in bf16 at 1.00x
float32's speed eager and 1.06x compiled at batch 1, and 0.89x eager at batch 8 (CPU clock, 7-9 alternating rounds
under load; 8 rows slower in 7 of 7). Past MIN_BF16_CPU_PARAMETERS the weights stream from memory and bf16's halved
bytes win: `small` (58M) at 1.23x compiled (batch 1, 5 of 5 rounds). A prefill is bound by matmul FLOPs instead, so
there the rule costs a small model speed: `tiny`'s 4 x 128 / 512 / 1,024-token forward runs 1.44x / 1.79x / 1.76x
faster in bf16 on that CPU (4 of 4 alternating rounds each); `auto` weighs the decode steps, of which a generation
has many, and bench/forward.py reports ours in both dtypes.

A dtype asked for by name is run as asked; `asked_dtype_caveat` says why it may run slower there than float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

FAST_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")  # torch.cpu.get_capabilities() names
# Without these, float16 runs slower than float32 on a CPU (torch widens it around each op): `small` decoded at 0.68x
# float32's speed at batch 1 and 0.44x at batch 8 (eager, one thread, 2-core Zen 4 with avx512_bf16 alone).
FAST_FP16_CPU_FEATURES = ("avx512_fp16", "amx_fp16")
MIN_BF16_CPU_PARAMETERS = 16_000_000  # 64 MB of float32 weights: past a CPU's last-level cache (32 MB on that Zen 4)


def map_devices(device_map: str | None) -> list[str]:
    """The devices a model runs on: those a device map (seekstack.infer.placement) names (disk computes on the CPU),
    else the CPU; ValueError naming an entry that names no device."""
    from seekstack.infer.placement import DISK, named_devices

    named = named_devices(device_map) if device_map else []
    return sorted({"cpu" if device == DISK else device for device in named}) or ["cpu"]


def cpu_features() -> Mapping[str, object]:
    """This CPU's instruction-set features, as torch detects them."""
    import torch

    return torch.cpu.get_capabilities()


def present_features(names: Iterable[str], features: Mapping[str, object] | None = None) -> list[str]:
    """Those of the feature `names` this CPU has (`features`: the CPU's, default detected)."""
    features = cpu_features() if features is None else features
    return [name for name in names if features.get(name)]


def runs_bf16_fast(
    device: str, parameters: int | None = None, features: Mapping[str, object] | None = None
) -> tuple[bool, str]:
    """Whether `device` runs a model of `parameters` (None: unknown, taken as large) faster in bfloat16, and why;
    `features` (the CPU's, default detected) decides a CPU."""
    import torch

    if device == "cpu":
        present = present_features(FAST_BF16_CPU_FEATURES, features)
        if not present:
            return False, f"this CPU has none of {', '.join(FAST_BF16_CPU_FEATURES)}"
        if parameters is not None and parameters < MIN_BF16_CPU_PARAMETERS:
            return False, (
                f"this CPU has {' and '.join(present)}, but a model of {parameters / 1e6:.1f}M parameters "
                f"(under {MIN_BF16_CPU_PARAMETERS / 1e6:.0f}M) runs faster in float32"
            )
        return True, f"this CPU has {' and '.join(present)}"
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{device} supports bf16 natively"
        return False, f"{device} has no native bf16"
    return False, f"bf16 speed on {device} is not known"


def auto_dtype(
    devices: Iterable[str], parameters: int | None = None, features: Mapping[str, object] | None = None
) -> tuple[str, str]:
    """("bfloat16" or "float32", the reason): bfloat16 only when every one of `devices` runs it fast."""
    verdicts = [runs_bf16_fast(device, parameters, features) for device in devices]
    reasons = "; ".join(reason for _, reason in verdicts)
    return ("bfloat16" if all(fast for fast, _ in verdicts) else "float32"), reasons


def asked_dtype_caveat(
    dtype: str, devices: Iterable[str], parameters: int | None = None, features: Mapping[str, object] | None = None
) -> str | None:
    """Why `dtype`, asked for by name, can run a model of `parameters` slower than float32 on `devices`, or None where
    nothing known says so: bfloat16 where `runs_bf16_fast` says no, float16 on a CPU without FAST_FP16_CPU_FEATURES."""
    if dtype == "bfloat16":
        verdicts = [runs_bf16_fast(device, parameters, features) for device in devices]
        slow = [reason for fast, reason in verdicts if not fast]
    elif dtype == "float16" and "cpu" in devices and not present_features(FAST_FP16_CPU_FEATURES, features):
        slow = [f"this CPU has none of {', '.join(FAST_FP16_CPU_FEATURES)}"]
    else:
        slow = []
    return "; ".join(slow) or None


def checkpoint_parameters(model_dir: str | Path) -> int:
    """Parameters of the main model in checkpoint folder `model_dir`, from its config.json."""
    from seekstack.accounting import main_parameters
    from seekstack.checkpoint import read_config

    return main_parameters(read_config(model_dir)).total
