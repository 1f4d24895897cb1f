"""Quantized weights and the modules that run them: the low-bit matmuls of this CPU, used in place of nn.Linear,
of the SwiGLU feed-forward and of the stacked routed experts.

Kernels (measured in bench/quantize.py): int8 runs `torch._weight_int8pack_mm`, int4
`torch._weight_int4pack_mm_for_cpu`;
both are fast only with bfloat16 activations (with float32 ones they fall to a path ~10-20x slower than the float32
matmul), so a quantized layer multiplies in bfloat16 and returns its input's dtype. At decode widths a cast costs as
much as the kernel, so each module casts once around all its kernel calls (a SwiGLU and the routed experts run their
whole block in bfloat16: one cast in, one out), and the per-call Python path is kept short (the kernel operands,
per expert too, are held ready). This CPU has no FP8 matmul
(`torch._scaled_mm` on CPU took 43 ms for a 1x1024 @ 1024x4096 product), so FP8 weights stay e4m3 in memory and are
expanded block by block to the activation dtype inside each call.

Shapes: N rows of activations, O output features, I input features, E experts, G = I / group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.compress.formats import (
    SCALE_DTYPE,
    dequantize_int,
    pack_codes,
    quantize_int4,
    quantize_int8,
    unpack_codes,
)
from seekstack.model.moe import FeedForward, RoutedExperts, Routing, swiglu

COMPUTE_DTYPE = torch.bfloat16  # the activation dtype of the int8/int4 kernels
# torch's int8 CPU kernel (_weight_int8pack_mm, torch 2.13, AVX512) reads input columns 16 at a time: at another
# width it reads past each row, giving garbage (NaN at decode widths) or a segmentation fault
INT8_KERNEL_COLUMNS = 16
# The group sizes torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) takes, largest first: a checkpoint's larger
# group (compressed-tensors' one scale per row, "channel", or per matrix, "tensor", of a wide layer) runs as groups of
# the largest of these dividing it, its scale repeated, which is the same weight
INT4_KERNEL_GROUPS = (256, 128, 64, 32)


class QuantizedWeight(nn.Module):
    """One matrix (O, I) or a stack of expert matrices (E, O, I) in a low-bit format.

    `matmul(lower(x), index)` is x @ W[index]^T on the format's kernel, in the kernel's activation dtype (the caller
    casts back, once); `stored()` gives the tensors as a checkpoint holds them (names relative to the layer: `weight`,
    `weight_scale`, ...), with the expert dimension first if stacked. Buffers keep their dtypes when the model is moved
    or cast.
    """

    scheme: str
    kernel_dtype: torch.dtype | None = None  # the activation dtype the kernel takes; None: the activations' own
    operand_names: tuple[str, ...] = ()  # the buffers the kernel takes, in its argument order
    stored_buffers: tuple[str, str]  # the buffers of its codes and of its scales, each built from one stored tensor
    kernel_limit = ""  # the weights its kernel cannot run (`kernel_runs`), as a note names them

    @staticmethod
    def codes_buffer(q: torch.Tensor) -> torch.Tensor:
        """The codes buffer holding codes q (..., O, I) as stored unpacked."""
        return q.contiguous()

    @staticmethod
    def scale_buffer(scale: torch.Tensor) -> torch.Tensor:
        """The scales buffer holding scales `scale` as stored."""
        raise NotImplementedError

    def buffer_from_stored(self, buffer: str, stored: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """Buffer `buffer` of a weight in this format, built from the one stored tensor it comes from, as
        `weight_from_stored` takes it (codes `bits`-bit packed in int32 words, or unpacked; or scales): a stack of
        experts' buffers built expert by expert as a checkpoint is read."""
        if buffer == self.stored_buffers[1]:
            return self.scale_buffer(stored)
        return self.codes_buffer(unpack_codes(stored, bits or 4) if stored.dtype == torch.int32 else stored)

    def bind_operands(self) -> None:
        """Hold the kernel's operands as plain attributes, whole and per expert (views, no copies): a buffer
        lookup or an expert slice costs a Python dispatch on every call, a sizeable part of a decode-width call.
        Called again whenever the buffers' data is swapped (moved, filled, memory-mapped), or the views go stale."""
        tensors = [self._buffers[name] for name in self.operand_names]
        stacked = bool(tensors) and tensors[0].dim() == 3
        self.operands = tuple(tensors)
        self.expert_operands = list(zip(*(t.unbind(0) for t in tensors), strict=True)) if stacked else []

    def fill_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        """Hold `buffers` in place of the buffers of those names, whose dtypes and shapes they have: a stack of
        experts' weights built empty (on meta) and filled expert by expert as a checkpoint is read."""
        for name, tensor in buffers.items():
            setattr(self, name, tensor)
        self.bind_operands()

    def kernel_operands(self, index: int | None) -> tuple[torch.Tensor, ...]:
        return self.operands if index is None else self.expert_operands[index]

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x (N, I) as `matmul` takes them: in the kernel's activation dtype, packed row after row (torch's int8
        kernel checks only the last stride and reads a view of wider rows, a one-head attention's output, out of
        bounds: a segfault; its int4 kernel refuses one)."""
        if self.kernel_dtype is None:
            return x
        return x.to(dtype=self.kernel_dtype).contiguous()  # keyword: skips overload matching; contiguous: no copy

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x (N, I) from `lower` -> x @ W[index]^T (N, O), in x's dtype."""
        raise NotImplementedError

    def kernel_runs(self) -> bool:
        """Whether the format's kernel computes `matmul` right at this weight's shape."""
        return True

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the format represents, (O, I) or (E, O, I)."""
        raise NotImplementedError

    def stored(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Move with the model, never cast: `model.to(torch.float32)` must not turn codes or scales into floats."""
        for name, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        self.bind_operands()
        return self


class Int8Weight(QuantizedWeight):
    """Per-output-channel int8: W = q * s, s (..., O, 1) on disk, held flat (..., O) as the kernel takes it."""

    scheme = "int8"
    kernel_dtype = COMPUTE_DTYPE
    operand_names = stored_buffers = ("weight", "weight_scale")
    kernel_limit = (
        f"an input width that is not a multiple of {INT8_KERNEL_COLUMNS}, which torch's int8 CPU kernel misreads, "
        "or a scale per group of columns, where it takes one a row"
    )

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", self.codes_buffer(q))
        self.register_buffer("weight_scale", self.scale_buffer(scale))
        self.bind_operands()

    @staticmethod
    def scale_buffer(scale: torch.Tensor) -> torch.Tensor:
        return scale.to(SCALE_DTYPE).squeeze(-1).contiguous()

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        return cls(*quantize_int8(weight))

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, *self.kernel_operands(index))

    def kernel_runs(self) -> bool:
        return self._one_scale_a_row() and self.shape[-1] % INT8_KERNEL_COLUMNS == 0

    def _one_scale_a_row(self) -> bool:
        """Whether the scales are one per row, held flat (..., O); else per group of columns, (..., O, G) as stored."""
        return self.weight_scale.shape == self.weight.shape[:-1]

    def dequantize(self) -> torch.Tensor:
        return dequantize_int(self.weight, self.stored()["weight_scale"])

    def stored(self) -> dict[str, torch.Tensor]:
        scale = self.weight_scale.unsqueeze(-1) if self._one_scale_a_row() else self.weight_scale
        return {"weight": self.weight, "weight_scale": scale}

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape


class Int4Weight(QuantizedWeight):
    """Group-wise int4: W = q * s per `group` input columns, held in the CPU kernel's tiled packing (I/2 bytes a row)
    with its (G, O, 2) scale-and-zero table; the kernel computes (u - 8) * scale + zero from the stored u = q + 8."""

    scheme = "int4"
    kernel_dtype = COMPUTE_DTYPE
    operand_names = stored_buffers = ("packed", "scales_and_zeros")
    kernel_limit = f"groups of columns no multiple of {INT4_KERNEL_GROUPS[-1]}, which torch's int4 CPU kernel refuses"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self._shape = q.shape
        self.group = _int4_kernel_group(q.shape[-1] // scale.shape[-1])
        self.register_buffer("packed", self.codes_buffer(q))
        self.register_buffer("scales_and_zeros", self.scale_buffer(scale))
        self.bind_operands()

    @staticmethod
    def codes_buffer(q: torch.Tensor) -> torch.Tensor:
        unsigned = (q.to(torch.int32) + 8).reshape(-1, *q.shape[-2:])
        packed = torch.stack([torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1) for u in unsigned])
        return packed.view(*q.shape[:-1], -1)

    def scale_buffer(self, scale: torch.Tensor) -> torch.Tensor:
        """The kernel's (..., G, O, 2) scale-and-zero table of scales (..., O, groups as stored), each stored group's
        scale repeated over the kernel groups it spans (`self.group`)."""
        scale = scale.repeat_interleave(self._shape[-1] // self.group // scale.shape[-1], dim=-1)
        scales_and_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1).transpose(-3, -2)  # (..., G, O, 2)
        return scales_and_zeros.to(SCALE_DTYPE).contiguous()

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int) -> Int4Weight:
        return cls(*quantize_int4(weight, group))

    def kernel_runs(self) -> bool:
        return self.group in INT4_KERNEL_GROUPS

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        packed, table = self.kernel_operands(index)
        return torch._weight_int4pack_mm_for_cpu(x, packed, self.group, table)

    def codes(self) -> torch.Tensor:
        """q (..., O, I) int8, read back from the kernel's tiling by the kernel itself: I @ W^T with unit scales."""
        identity = torch.eye(self._shape[-1], dtype=COMPUTE_DTYPE)
        unit = torch.zeros_like(self.scales_and_zeros[..., :1, :, :]).expand_as(self.scales_and_zeros).clone()
        unit[..., 0] = 1
        packed, unit = self.packed.reshape(-1, *self.packed.shape[-2:]), unit.reshape(-1, *unit.shape[-3:])
        codes = [
            torch._weight_int4pack_mm_for_cpu(identity, p, self.group, u).t() for p, u in zip(packed, unit, strict=True)
        ]
        return torch.stack(codes).round().to(torch.int8).view(self._shape)

    def scale(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 0].transpose(-2, -1).contiguous()  # (..., O, G)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int(self.codes(), self.scale())

    def stored(self) -> dict[str, torch.Tensor]:
        return {"weight_packed": pack_codes(self.codes(), 4), "weight_scale": self.scale()}

    @property
    def shape(self) -> torch.Size:
        return self._shape


def _int4_kernel_group(group: int) -> int:
    """The group size int4 weights stored at `group` columns a scale run at: the largest of INT4_KERNEL_GROUPS that
    divides it (`group` itself when none does; the kernel then refuses it)."""
    return next((size for size in INT4_KERNEL_GROUPS if group % size == 0), group)


class Fp8Weight(QuantizedWeight):
    """e4m3 with a float32 scale per block (DeepSeek-V3): W = Q * s blockwise. `parts` matrices stacked by rows
    (an expert's [W_gate; W_up]) each have their own blocks, as the checkpoint stores them separately."""

    scheme = "fp8"
    stored_buffers = ("weight", "weight_scale_inv")

    def __init__(self, q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], parts: int = 1):
        super().__init__()
        self.register_buffer("weight", self.codes_buffer(q))
        self.register_buffer("weight_scale_inv", self.scale_buffer(scale_inv))
        self.block, self.parts = tuple(block), parts

    @staticmethod
    def scale_buffer(scale: torch.Tensor) -> torch.Tensor:
        return scale.float().contiguous()

    @classmethod
    def from_float(cls, weight: torch.Tensor, block: tuple[int, int], parts: int = 1) -> Fp8Weight:
        from seekstack.checkpoint import quantize_fp8

        matrices = weight.reshape(-1, *weight.shape[-2:])
        pieces = [[quantize_fp8(part, block) for part in m.chunk(parts)] for m in matrices]
        q = torch.stack([torch.cat([p[0] for p in m]) for m in pieces]).view(weight.shape)
        scale = torch.stack([torch.cat([p[1] for p in m]) for m in pieces])
        return cls(q, scale.view(*weight.shape[:-2], *scale.shape[-2:]), block, parts)

    def _expand(self, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        from seekstack.checkpoint import dequantize_fp8

        row_blocks = scale_inv.shape[0] // self.parts
        parts = zip(q.chunk(self.parts), scale_inv.split(row_blocks), strict=True)
        return torch.cat([dequantize_fp8(part, scale, self.block) for part, scale in parts])

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        q, scale = (self.weight, self.weight_scale_inv) if index is None else (
            self.weight[index], self.weight_scale_inv[index]
        )  # fmt: skip
        return F.linear(x, self._expand(q, scale).to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        if self.weight.dim() == 2:
            return self._expand(self.weight, self.weight_scale_inv)
        return torch.stack([self._expand(q, s) for q, s in zip(self.weight, self.weight_scale_inv, strict=True)])

    def stored(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "weight_scale_inv": self.weight_scale_inv}

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape


def weight_from_stored(
    tensors: dict[str, torch.Tensor], fp8_block: tuple[int, int] | None, parts: int = 1, bits: int | None = None
) -> QuantizedWeight:
    """The QuantizedWeight for tensors as a checkpoint stores them (`weight_packed`: `bits`-bit codes, default 4; int8
    `weight`: codes unpacked, as seekstack's stacked-experts layout and compressed-tensors' `int-quantized` format
    have them, int8's, or int4's with `bits` 4; e4m3 `weight`: fp8); a stack of experts has the expert dimension
    first."""
    if "weight_packed" in tensors:
        codes = unpack_codes(tensors["weight_packed"], bits or 4)
        return Int8Weight(codes, tensors["weight_scale"]) if bits == 8 else Int4Weight(codes, tensors["weight_scale"])
    weight = tensors["weight"]
    if weight.dtype == torch.int8:
        return (Int4Weight if bits == 4 else Int8Weight)(weight, tensors["weight_scale"])
    if weight.dtype == torch.float8_e4m3fn and fp8_block is not None:
        return Fp8Weight(weight, tensors["weight_scale_inv"], fp8_block, parts)
    raise ValueError(f"no quantized format stores a {weight.dtype} weight with {sorted(tensors)}")


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W quantized; drop-in for nn.Linear at inference."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def kernel(self) -> QuantizedWeight:
        """`qweight`, read from the module dict: nn.Module's attribute fallback costs ~0.5 us a lookup here, a
        sizeable part of a decode-width call (so the hot paths below read submodules this way)."""
        return self._modules["qweight"]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel
        out = weight.matmul(weight.lower(x.reshape(-1, self.in_features))).to(dtype=x.dtype)
        out = out.view(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.qweight.scheme}"


class QuantizedFeedForward(FeedForward):
    """SwiGLU whose three projections are quantized: the gate and up products, SiLU and their product stay in the
    kernels' activation dtype (one cast in, one out, as DeepSeek's bf16 inference runs the MLP), not a cast pair
    around each projection. The projections stay `gate_proj`, `up_proj`, `down_proj` (checkpoint keys unchanged)."""

    def __init__(self, gate_proj: QuantizedLinear, up_proj: QuantizedLinear, down_proj: QuantizedLinear):
        nn.Module.__init__(self)  # not FeedForward.__init__: no float parameters to allocate
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = self._modules
        gate, up, down = projections["gate_proj"].kernel, projections["up_proj"].kernel, projections["down_proj"].kernel
        lowered = gate.lower(x.reshape(-1, x.shape[-1]))  # one kernel dtype for all three (see below)
        hidden = swiglu(gate.matmul(lowered), up.matmul(lowered))
        return down.matmul(hidden).to(dtype=x.dtype).view(x.shape)


def use_quantized_feed_forwards(model: nn.Module) -> None:
    """Swap, in place, each FeedForward of `model` whose three projections are quantized (no bias, one kernel
    activation dtype) for a QuantizedFeedForward over the same projection modules; a model freshly quantized and
    one loaded from its checkpoint both get it, so they compute alike."""
    for name, module in list(model.named_modules()):
        if type(module) is not FeedForward:
            continue
        projections = (module.gate_proj, module.up_proj, module.down_proj)
        if all(isinstance(p, QuantizedLinear) and p.bias is None for p in projections) and (
            len({p.qweight.kernel_dtype for p in projections}) == 1
        ):
            model.set_submodule(name, QuantizedFeedForward(*projections))


class QuantizedExperts(RoutedExperts):
    """Routed experts with quantized stacked weights; the token dispatch is RoutedExperts' own, run in the kernels'
    activation dtype: tokens cast once in, the combined output once out (DeepSeek's bf16 inference also applies
    the routing weights and sums the experts in bf16)."""

    def __init__(self, gate_up_proj: QuantizedWeight, down_proj: QuantizedWeight):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: no float parameters to allocate
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return super().forward(self._modules["gate_up_proj"].lower(x), routing).to(dtype=x.dtype)

    def grouped_linear(self, x: torch.Tensor, name: str, load: torch.Tensor) -> torch.Tensor:
        """x (n, in) in the kernel's dtype, sorted by expert, load[e] rows for expert e -> (n, out): one kernel call
        per expert that has rows."""
        weight, outputs, start = self._modules[name], [], 0
        for expert, rows in enumerate(load.tolist()):
            if rows:
                outputs.append(weight.matmul(x[start : start + rows], expert))
                start += rows
        return torch.cat(outputs)

    def forward_gathered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The compiled (sync-free) path: every expert on every token, combined with the routing weights as a dense
        (N, E) matrix (zero for experts not chosen). E/K times the FLOPs of the gathered path, on the low-bit kernel;
        meant for the few tokens of a decode step. Returns x's dtype."""
        num_experts = routing.scores.shape[1]
        lowered = self.gate_up_proj.lower(x)
        dense_weights = torch.zeros_like(routing.scores).scatter_(1, routing.experts, routing.weights.float())
        dense_weights = dense_weights.to(lowered.dtype)
        combined = torch.zeros_like(lowered)
        for e in range(num_experts):
            gate, up = self.gate_up_proj.matmul(lowered, e).chunk(2, dim=-1)
            out = self.down_proj.matmul(self.down_proj.lower(swiglu(gate, up)), e)
            combined = combined + out * dense_weights[:, e : e + 1]
        return combined.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.gate_up_proj.shape)}, {tuple(self.down_proj.shape)}, {self.gate_up_proj.scheme}"


def kernels_run(layer: nn.Module) -> bool:
    """Whether each quantized weight of `layer` (a QuantizedLinear, QuantizedExperts) runs right on its kernel."""
    return all(weight.kernel_runs() for weight in layer.modules() if isinstance(weight, QuantizedWeight))


def layer_weight(layer: nn.Module) -> QuantizedWeight:
    """The quantized weight of a QuantizedLinear, or a QuantizedExperts' gate/up weight (its format is both's)."""
    return layer.qweight if isinstance(layer, QuantizedLinear) else layer.gate_up_proj
