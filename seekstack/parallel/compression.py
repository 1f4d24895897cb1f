"""Compressed gradient all-reduce for DDP: communication hooks that send fewer bytes per step, each counting them.

  none        float32 all-reduce (torch's default, counted)
  bf16, fp16  torch's `bf16_compress_hook` / `fp16_compress_hook`: half the bytes
  powersgd    torch's PowerSGD (Vogels et al. 2019): rank-r factors P, Q of each gradient matrix, error feedback
  int8        8-bit integers, a scale per 1,024 values, error feedback (the 32 -> 8 bit scheme): ~a quarter
  int8_no_ef  the same without error feedback, to show what the feedback buys

int8 (1-bit SGD / EF-SGD, Seide et al. 2014, Karimireddy et al. 2019): each rank adds the quantisation error it
kept from the last step, e = g + r, sends q = round(e / s) as int8 with s = max|e| / 127 per block of 1,024 values
of the bucket, keeps r = e - s q, and every rank averages the gathered s_k q_k. An all-gather is used because a
sum of int8 values would overflow.

PowerSGD starts its P and Q all-reduces from future callbacks. On gloo, a callback runs on the thread that finished
the previous collective, racing DDP's start of the next bucket and the backward pass's own collectives (expert
parallel's all-to-all), so the ranks could issue their collectives in different orders (gloo's "collective
mismatch" abort, or a hang). On gloo, each bucket's collectives therefore end before the backward pass goes on,
giving up the overlap of a bucket's communication with the rest of the backward pass.

No `from __future__ import annotations` here: DDP checks the hooks' annotations as objects.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

SCHEMES = ("none", "bf16", "fp16", "powersgd", "int8", "int8_no_ef")
INT8_MAX = 127
INT8_BLOCK = 1024  # values per int8 scale: 4 bytes of scale per 1,024 bytes of codes


@dataclass
class CommCounter:
    """Bytes this rank handed to gradient collectives since the start."""

    bytes_sent: int = 0


@dataclass
class Int8State:
    """What the int8 hook keeps between steps: the quantisation error of each bucket (error feedback)."""

    counter: CommCounter
    error_feedback: bool = True
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)


def register_compression(
    model: DistributedDataParallel, scheme: str, powersgd_rank: int = 4, powersgd_start: int = 10
) -> CommCounter:
    """Register the hook of `scheme` on a DDP model; the returned counter grows by the bytes each step sends."""
    if scheme not in SCHEMES:
        raise ValueError(f"grad_compression={scheme!r} is not one of {', '.join(SCHEMES)}")
    counter = CommCounter()
    if scheme in ("int8", "int8_no_ef"):
        model.register_comm_hook(Int8State(counter, error_feedback=scheme == "int8"), int8_hook)
    elif scheme == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start,
            use_error_feedback=True,
            warm_start=True,
        )
        hook = _counted(powerSGD_hook.powerSGD_hook, counter, _powersgd_bytes(state))
        if dist.get_backend() == dist.Backend.GLOO:
            hook = _whole_bucket_at_a_time(hook)
        model.register_comm_hook(state, hook)
    else:
        hook, width = {
            "none": (default_hooks.allreduce_hook, 4),
            "bf16": (default_hooks.bf16_compress_hook, 2),
            "fp16": (default_hooks.fp16_compress_hook, 2),
        }[scheme]
        model.register_comm_hook(None, _counted(hook, counter, lambda bucket: bucket.buffer().numel() * width))
    return counter


def int8_hook(state: Int8State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-gather each rank's int8 gradient bucket with its scales (one per block of INT8_BLOCK values); return
    the mean of the dequantised buckets."""
    gradient = bucket.buffer()
    world = dist.get_world_size()
    signal = gradient.float()
    residual = state.residuals.get(bucket.index())
    if state.error_feedback and residual is not None and residual.shape == signal.shape:
        signal = signal + residual  # (DDP regroups its buckets after the first step; the errors kept then lapse)
    size = signal.numel()
    blocks = F.pad(signal, (0, -size % INT8_BLOCK)).view(-1, INT8_BLOCK)
    scales = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    quantised = torch.round(blocks / scales).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    if state.error_feedback:
        state.residuals[bucket.index()] = signal - (quantised.float() * scales).flatten()[:size]
    payload = torch.cat([quantised.flatten().view(torch.uint8), scales.flatten().view(torch.uint8)])
    gathered = [torch.empty_like(payload) for _ in range(world)]
    state.counter.bytes_sent += payload.numel()
    work = dist.all_gather(gathered, payload, async_op=True)
    codes = quantised.numel()

    def average(_: Any) -> torch.Tensor:
        total = torch.zeros_like(blocks)
        for part in gathered:
            values = part[:codes].view(torch.int8).float().view(-1, INT8_BLOCK)
            total += values * part[codes:].view(torch.float32).view(-1, 1)
        gradient.copy_((total.flatten()[:size] / world).to(gradient.dtype))
        return gradient

    return work.get_future().then(average)


def _counted(hook: Callable, counter: CommCounter, bytes_of: Callable[[dist.GradBucket], int]) -> Callable:
    """`hook`, adding the bytes it sends for each bucket to `counter`."""

    def counted(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        counter.bytes_sent += bytes_of(bucket)
        return hook(state, bucket)

    return counted


def _whole_bucket_at_a_time(hook: Callable) -> Callable:
    """`hook`, returning only once the bucket's future, with every collective its callbacks issued, has completed.
    DDP calls the hook in bucket order from the backward pass, so every rank then issues the same collectives in the
    same order, the backward's own (expert parallel's all-to-all) included. NCCL needs no such wait: its futures
    complete when the collective is queued, so the callbacks run at once, in order, on the backward's thread."""

    def whole(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        future = hook(state, bucket)
        future.wait()
        return future

    return whole


def _powersgd_bytes(state: powerSGD_hook.PowerSGDState) -> Callable[[dist.GradBucket], int]:
    """Bytes PowerSGD sends for a bucket: float32 all-reduce before `start_powerSGD_iter`, then the rank-1
    tensors in full plus, per matrix (n x m), the factors P (n x r) and Q (m x r)."""

    def bytes_of(bucket: dist.GradBucket) -> int:
        if state.iter < state.start_powerSGD_iter:
            return bucket.buffer().numel() * 4
        sent = 0
        for tensor in bucket.gradients():
            if tensor.ndim <= 1:
                sent += tensor.numel() * 4
                continue
            rows, cols = tensor.shape[0], tensor.numel() // tensor.shape[0]
            rank = min(rows, cols, state.matrix_approximation_rank)
            sent += min((rows + cols) * rank, rows * cols) * 4  # too small to pay: sent uncompressed
        return sent

    return bytes_of
