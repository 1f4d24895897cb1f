"""Compressed gradient all-reduce for DDP: communication hooks that send fewer bytes per step, each counting them.

  none        float32 all-reduce (torch's default, counted)
  bf16, fp16  torch's `bf16_compress_hook` / `fp16_compress_hook`: half the bytes
  powersgd    torch's PowerSGD (Vogels et al. 2019): rank-r factors P, Q of each gradient matrix, error feedback
  int8        8-bit integers, a scale per 1,024 values of a parameter, error feedback (32 -> 8 bits): ~a quarter
  int8_no_ef  the same without error feedback, to show what the feedback buys

int8 (1-bit SGD / EF-SGD, Seide et al. 2014, Karimireddy et al. 2019): each rank adds the quantisation error it
kept from the last step, e = g + r, sends q = round(e / s) as int8 with s = max|e| / 127 per block of up to 1,024
values of one parameter, keeps r = e - s q, and every rank averages the gathered s_k q_k. An all-gather is used
because a sum of int8 values would overflow.

PowerSGD starts its P and Q all-reduces from future callbacks. On gloo, a callback runs on the thread that finished
the previous collective, racing DDP's start of the next bucket and the backward pass's own collectives (expert
parallel's all-to-all), so the ranks could issue their collectives in different orders (gloo's "collective
mismatch" abort, or a hang). On gloo, each bucket's collectives therefore end before the backward pass goes on,
giving up the overlap of a bucket's communication with the rest of the backward pass.

int8's residuals and PowerSGD's error feedback and Q factors are kept per parameter, not per bucket: DDP regroups
its buckets after a run's first step (a resumed run's too), and a checkpoint saves them (`Compression.state_dict`),
so a run resumed at the same number of ranks continues as the uninterrupted one does.

No `from __future__ import annotations` here: DDP checks the hooks' annotations as objects.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
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
    """What the int8 hook keeps between steps: each gradient's quantisation error (error feedback), by parameter
    name (`names`: id of each parameter -> its name)."""

    counter: CommCounter
    error_feedback: bool = True
    names: dict[int, str] = field(default_factory=dict)
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {name: residual.clone() for name, residual in self.residuals.items()}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.residuals = dict(saved["residuals"])


@dataclass
class PowerSGDMemory:
    """PowerSGD's state by parameter: each gradient's error feedback and each compressed matrix's Q factor (its warm
    start), which torch's `PowerSGDState` keys by bucket. Before a bucket whose parameters changed (DDP regrouped
    them), everything torch holds is split by parameter; a bucket torch holds nothing for is joined from it."""

    state: powerSGD_hook.PowerSGDState
    shapes: dict[str, torch.Size]  # of each parameter, by name
    layouts: dict[int, tuple[str, ...]] = field(default_factory=dict)  # bucket -> its parameters, as torch holds it
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    qs: dict[str, torch.Tensor] = field(default_factory=dict)

    def prepare(self, bucket_index: int, layout: tuple[str, ...]) -> None:
        """Give torch's state for `bucket_index` the layout of the bucket about to be reduced."""
        if self.layouts.get(bucket_index, layout) != layout:
            self._split()
        if bucket_index not in self.layouts:
            self._join(bucket_index, layout)

    def state_dict(self) -> dict[str, Any]:
        self._split()
        return {
            "iter": self.state.iter,
            "rng": self.state.rng.get_state(),
            "errors": {name: error.clone() for name, error in self.errors.items()},
            "qs": {name: q.clone() for name, q in self.qs.items()},
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """The step, RNG, errors and Q factors `state_dict` saved; a Q factor of another powersgd_rank (a run resumed
        with another) cannot warm-start this one's and is left, its matrix starting from a random Q as at the first
        PowerSGD step (torch's hook read it as this rank's: a shape error, or a split that does not sum). A run
        resumed with a powersgd_start past the saved step all-reduces whole gradients until then, and PowerSGD starts
        there as at a run's first PowerSGD step, without errors or Q factors (those saved are of gradients that whole
        all-reduces have since sent; torch's hook added them at its first PowerSGD step)."""
        self._split()
        self.state.iter = saved["iter"]
        self.state.rng.set_state(saved["rng"])
        if saved["iter"] < self.state.start_powerSGD_iter:
            self.errors, self.qs = {}, {}
            return
        self.errors = dict(saved["errors"])
        self.qs = {name: q for name, q in saved["qs"].items() if q.numel() == self._q_size(name)}

    def _split(self) -> None:
        """Move everything torch's state holds by bucket into `errors` and `qs`, by parameter."""
        state = self.state
        for index, layout in self.layouts.items():
            if index in state.error_dict:
                sizes = [self.shapes[name].numel() for name in layout]
                self.errors |= dict(zip(layout, state.error_dict[index].split(sizes), strict=True))
            if index in state.q_memory_dict:
                names, sizes = self._q_layout(layout)
                self.qs |= dict(zip(names, state.q_memory_dict[index].split(sizes), strict=True))
        for memory in (state.error_dict, state.p_memory_dict, state.q_memory_dict):
            memory.clear()
        self.layouts.clear()

    def _join(self, index: int, layout: tuple[str, ...]) -> None:
        """Fill torch's state for bucket `index` from `errors` and `qs` (what they hold of its parameters)."""
        state = self.state
        self.layouts[index] = layout
        if all(name in self.errors for name in layout):
            state.error_dict[index] = torch.cat([self.errors.pop(name) for name in layout])
        names, _ = self._q_layout(layout)
        if names and all(name in self.qs for name in names):  # P is computed from Q before it is read
            state.q_memory_dict[index] = torch.cat([self.qs.pop(name) for name in names])
            state.p_memory_dict[index] = state.q_memory_dict[index].new_zeros(self._p_size(names))

    def _ranks(self, name: str) -> tuple[int, int, int]:
        """Rows, columns and approximation rank of a parameter's gradient as PowerSGD sees it."""
        shape = self.shapes[name]
        rows, cols = shape[0], shape.numel() // shape[0]
        return rows, cols, min(rows, cols, self.state.matrix_approximation_rank)

    def _q_layout(self, layout: tuple[str, ...]) -> tuple[list[str], list[int]]:
        """The matrices PowerSGD compresses in a bucket, in the order of its Q memory (grouped by shape, as torch's
        hook does), and each one's Q size."""
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name in layout:
            rows, cols, rank = self._ranks(name)
            if powerSGD_hook._should_compress(rows, cols, rank, self.state.min_compression_rate)[0]:
                by_shape.setdefault((rows, cols), []).append(name)
        names = [name for group in by_shape.values() for name in group]
        return names, [self._q_size(name) for name in names]

    def _q_size(self, name: str) -> int:
        """Values of a parameter's Q factor (columns x approximation rank)."""
        _, cols, rank = self._ranks(name)
        return cols * rank

    def _p_size(self, names: list[str]) -> int:
        return sum(self._ranks(name)[0] * self._ranks(name)[2] for name in names)


@dataclass
class Compression:
    """A registered hook's byte counter and the state it keeps between steps (int8's residuals, PowerSGD's), if any."""

    counter: CommCounter
    memory: Int8State | PowerSGDMemory | None = None

    @property
    def keeps_state(self) -> bool:
        return self.memory is not None

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.memory.load_state_dict(saved)


def register_compression(
    model: DistributedDataParallel, scheme: str, powersgd_rank: int = 4, powersgd_start: int = 10
) -> Compression:
    """Register the hook of `scheme` on a DDP model; returns its byte counter, which grows by the bytes each step
    sends, and the state it keeps between steps."""
    if scheme not in SCHEMES:
        raise ValueError(f"grad_compression={scheme!r} is not one of {', '.join(SCHEMES)}")
    counter = CommCounter()
    parameters = dict(model.module.named_parameters())
    names = {id(param): name for name, param in parameters.items()}
    if scheme in ("int8", "int8_no_ef"):
        state = Int8State(counter, error_feedback=scheme == "int8", names=names)
        model.register_comm_hook(state, int8_hook)
        return Compression(counter, state if state.error_feedback else None)  # without it, nothing kept between steps
    if scheme == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=powersgd_start,
            use_error_feedback=True,
            warm_start=True,
        )
        memory = PowerSGDMemory(state, {name: param.shape for name, param in parameters.items()})
        hook = _by_parameter(_counted(powerSGD_hook.powerSGD_hook, counter, _powersgd_bytes(state)), memory, names)
        if dist.get_backend() == dist.Backend.GLOO:
            hook = _whole_bucket_at_a_time(hook)
        model.register_comm_hook(state, hook)
        return Compression(counter, memory)
    hook, width = {
        "none": (default_hooks.allreduce_hook, 4),
        "bf16": (default_hooks.bf16_compress_hook, 2),
        "fp16": (default_hooks.fp16_compress_hook, 2),
    }[scheme]
    model.register_comm_hook(None, _counted(hook, counter, lambda bucket: bucket.buffer().numel() * width))
    return Compression(counter)


def int8_hook(state: Int8State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-gather each rank's int8 gradient bucket with its scales (one per block of up to INT8_BLOCK values of one
    parameter); return the mean of the dequantised buckets."""
    gradient = bucket.buffer()
    world = dist.get_world_size()
    sizes = [values.numel() for values in bucket.gradients()]
    names = _bucket_names(bucket, state.names)
    signal = gradient.float()
    if state.error_feedback and all(name in state.residuals for name in names):
        signal = signal + torch.cat([state.residuals[name] for name in names])
    held = _held_values(sizes, signal.device)
    blocks = signal.new_zeros(held.shape).masked_scatter_(held, signal).view(-1, INT8_BLOCK)
    scales = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    quantised = torch.round(blocks / scales).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    if state.error_feedback:
        residual = signal - (quantised.float() * scales).flatten()[held]
        state.residuals |= dict(zip(names, residual.split(sizes), strict=True))
    codes = quantised.flatten()[held]
    payload = torch.cat([codes.view(torch.uint8), scales.flatten().view(torch.uint8)])
    gathered = [torch.empty_like(payload) for _ in range(world)]
    state.counter.bytes_sent += payload.numel()
    work = dist.all_gather(gathered, payload, async_op=True)

    def average(_: Any) -> torch.Tensor:
        total = torch.zeros_like(blocks)
        for part in gathered:
            values = blocks.new_zeros(held.shape).masked_scatter_(held, part[: codes.numel()].view(torch.int8).float())
            total += values.view(-1, INT8_BLOCK) * part[codes.numel() :].view(torch.float32).view(-1, 1)
        gradient.copy_((total.flatten()[held] / world).to(gradient.dtype))
        return gradient

    return work.get_future().then(average)


def _held_values(sizes: list[int], device: torch.device) -> torch.Tensor:
    """Each parameter's values padded to whole blocks of INT8_BLOCK: True where a value is, False in the padding.
    A block never spans two parameters, so the quantisation does not change when DDP regroups its buckets."""
    return torch.cat([torch.arange(-(-size // INT8_BLOCK) * INT8_BLOCK, device=device) < size for size in sizes])


def _bucket_names(bucket: dist.GradBucket, names: dict[int, str]) -> tuple[str, ...]:
    """The names of a bucket's parameters, in the order of its buffer."""
    return tuple(names[id(param)] for param in bucket.parameters())


def _by_parameter(hook: Callable, memory: PowerSGDMemory, names: dict[int, str]) -> Callable:
    """The PowerSGD `hook`, its state given each bucket's layout first (`PowerSGDMemory.prepare`)."""

    def prepared(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        memory.prepare(bucket.index(), _bucket_names(bucket, names))
        return hook(state, bucket)

    return prepared


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
    """Bytes PowerSGD sends for a bucket: float32 all-reduce before `start_powerSGD_iter`, then per gradient as an
    (n x m) matrix the factors P (n x r) and Q (m x r) where torch's hook compresses it (`_should_compress`: factors
    under 1 / `min_compression_rate` of its size), else the whole matrix (vectors, matrices too small to pay)."""

    def bytes_of(bucket: dist.GradBucket) -> int:
        if state.iter < state.start_powerSGD_iter:
            return bucket.buffer().numel() * 4
        sent = 0
        for tensor in bucket.gradients():
            rows, cols = tensor.shape[0], tensor.numel() // tensor.shape[0]
            rank = min(rows, cols, state.matrix_approximation_rank)
            compress, whole, factors = powerSGD_hook._should_compress(rows, cols, rank, state.min_compression_rate)
            sent += (factors if compress else whole) * 4
        return sent

    return bytes_of
