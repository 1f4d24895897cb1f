"""Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak (PaLM, Chowdhery et al. 2022, App. B).

The FLOPs per token come from `seekstack.accounting.training_flops_per_token` (3x the forward, MTP included).
Peak FLOP/s per device, unless `TrainConfig.peak_flops` gives one:
- CUDA: the dense bf16 tensor-core peak of the card, looked up by name (H100/H200 989 TFLOP/s, A100 312, ...).
- CPU: an assumption, stated here because it cannot be read from the machine: each of torch's threads runs
  one core at 2.6 GHz doing 64 float32 FLOP/cycle (two AVX-512 FMA units x 16 lanes x 2), i.e. 166 GFLOP/s
  per core. An AVX2-only core peaks at half that, so there the MFU shown is half the true one.
"""

from __future__ import annotations

import torch

CPU_CLOCK_HZ = 2.6e9
CPU_FLOP_PER_CYCLE = 64
GPU_BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
UNKNOWN_GPU_PEAK_FLOPS = 312e12  # an A100's, for cards the table does not name


def default_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one `device`: by card name on CUDA, cores x clock x FLOP/cycle on a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_BF16_PEAK_FLOPS.items() if key in name), UNKNOWN_GPU_PEAK_FLOPS)
    return torch.get_num_threads() * CPU_CLOCK_HZ * CPU_FLOP_PER_CYCLE


def model_flops_utilisation(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """MFU = tokens/s x training FLOPs per token / peak FLOP/s (all devices together)."""
    return tokens_per_second * flops_per_token / peak_flops
