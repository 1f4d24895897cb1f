"""Decode-time layout of the bias-free linears: the calls their few rows of inference are fastest in, on a CPU.

A decode step multiplies a few token rows x (M, D) by each weight W (out, D), the output head's (V, D) the largest.
Where seekstack's kernels are built (seekstack.model.cpu_kernels), every bias-free float32 or bfloat16 linear, the head
too, runs 1-16 rows of inference through `rows_linear`, compiled or eager (`DecodeLinear`), and a float32 one also keeps
its weight as panels (`DecodeLinear.lay_out`, outside the state dict), which `rows_linear` reads at 3-16 rows (at 1-2 it
reads W itself, faster there): the weight's bytes again (`decode_layout_bytes`), traded for decode steps of several rows
that stream their weights faster. The head's one row reads W through `rows_linear` too, with no W^T copy: faster than
MKL's x @ W^T over a contiguous copy, and the copy's bytes saved.
Without the kernels, compiled steps take the weight-first form (W x^T)^T at 2-16 rows and x W^T at one, which
inductor's `decompose_mm_pass` turns into its own loops (engine.py `_compiled`), and the head keeps W^T for its one-row
products (`DecodeHead`: MKL's x W^T with W row-major streams W at under half the rate of x @ W^T).
The engine copies the weights into these copies again when they change (`refresh_copies`, `WeightVersions`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.model import cpu_kernels
from seekstack.model.attention import MultiHeadLatentAttention
from seekstack.model.moe import FeedForward
from seekstack.model.norm import RMSNorm
from seekstack.model.transformer import Transformer

WEIGHT_FIRST_MAX_ROWS = 16  # up to here (W x^T)^T; beyond it F.linear (measured at 4, 8 and 16 rows)


@torch.library.custom_op("seekstack::decode_head", mutates_args=())
def decode_head(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x (M, D) W^T -> (M, V) in the BLAS call fastest for M rows. An op of its own, so that a compiled decode step,
    whose batch size is unbacked (one graph for every batch), still picks the call by the rows it runs on."""
    rows = x.shape[0]
    if rows == 1:
        return x @ weight_t
    if rows <= WEIGHT_FIRST_MAX_ROWS:
        return (weight @ x.t()).t().contiguous()
    return F.linear(x, weight)


@decode_head.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class DecodeHead(nn.Linear):
    """The output head where the kernels are not built (an nn.Linear: same parameter, same state dict), with W^T kept
    contiguous for one-row products (`weight_t`, a copy outside the state dict)."""

    weight_t: torch.Tensor

    @classmethod
    def adapt(cls, head: nn.Linear) -> DecodeHead:
        """Turn `head` into a DecodeHead in place and lay out its W^T."""
        head.__class__ = cls
        assert isinstance(head, DecodeHead)
        head.lay_out()
        return head

    @torch.no_grad()
    def lay_out(self) -> None:
        """Copy the weight's current values into `weight_t` (in, out), in place once it exists: a compiled step keeps
        reading the same buffer."""
        held = self._buffers.get("weight_t")
        if held is not None and held.shape == self.weight.t().shape and held.dtype == self.weight.dtype:
            held.copy_(self.weight.t())
        else:
            self.register_buffer("weight_t", self.weight.detach().t().contiguous(), persistent=False)

    def holds_weight(self) -> bool:
        """Whether `weight_t` holds the weight's current values (compared; the first difference ends it)."""
        return torch.equal(self.weight_t, self.weight.detach().t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., V); F.linear where gradients flow (`weight_t` is a copy outside autograd)."""
        if torch.is_grad_enabled():
            return F.linear(x, self.weight)
        flat = x.reshape(-1, x.shape[-1])
        return decode_head(flat, self.weight, self.weight_t).view(*x.shape[:-1], -1)


def takes_panels(weight: torch.Tensor) -> bool:
    """Whether `rows_linear` reads a copy of this weight as panels: a float32 one on the CPU, the kernels built."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and cpu_kernels.available()


def _panels_beside_weight(panels: torch.Tensor, weight: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each part of `panels` viewed as the part of `weight` it copies (`cpu_kernels.panel_parts`)."""
    parts = cpu_kernels.panel_parts(weight)
    copies = panels.split([part.numel() for part in parts])
    return [(copy.view(part.shape), part) for copy, part in zip(copies, parts, strict=True)]


class DecodeLinear(nn.Linear):
    """A bias-free linear (an nn.Linear: same parameter, same state dict) that runs 1-16 rows of inference through the
    `rows_linear` kernel, 3-16 of them over the copy of its float32 weight in `weight_panels` (`lay_out`), or,
    compiled and without the kernel, 2-16 rows as (W x^T)^T, which inductor streams faster than x W^T there."""

    @property
    def panels(self) -> torch.Tensor | None:
        """The weight's `weight_panels` copy, None where `lay_out` made none (or was not called)."""
        return self._buffers.get("weight_panels")

    @torch.no_grad()
    def lay_out(self) -> None:
        """Copy a float32 weight into `weight_panels`, `rows_linear`'s layout for 3-16 rows (outside the state dict; in
        place once it exists: a compiled step keeps reading the same buffer); None for other weights, or where the
        kernels are not built."""
        weight, held = self.weight.detach(), self.panels
        if not takes_panels(weight):
            self.register_buffer("weight_panels", None, persistent=False)
        elif held is not None and held.dtype == weight.dtype and held.numel() == weight.numel():
            for copy, part in _panels_beside_weight(held, weight):
                copy.copy_(part)
        else:
            self.register_buffer("weight_panels", cpu_kernels.weight_panels(weight), persistent=False)

    def holds_weight(self) -> bool:
        """Whether `weight_panels` holds what `lay_out` lays out for the weight now: its current values
        (compared; the first difference ends it), or None for a weight that takes no panels."""
        held, weight = self.panels, self.weight.detach()
        if held is None or not takes_panels(weight):
            return held is None and not takes_panels(weight)
        if held.dtype != weight.dtype or held.numel() != weight.numel():
            return False
        return all(torch.equal(copy, part) for copy, part in _panels_beside_weight(held, weight))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DecodeLinear:
        """nn.Module's conversions (`.to(torch.bfloat16)`, `.float()`, ...) convert the weight alone; the panels are
        then laid out for the weight they leave (none for a bfloat16 one), as nn.RNNBase flattens its weights again
        after them: converted with the weight, float32 panels would reach `rows_linear` in another dtype."""
        laid_out = "weight_panels" in self._buffers
        panels = self._buffers.pop("weight_panels", None)
        before = self.weight.dtype, self.weight.device, self.weight.data_ptr()
        converted = super()._apply(fn, recurse)
        if (self.weight.dtype, self.weight.device, self.weight.data_ptr()) == before:
            if laid_out:  # the weight as it was (a conversion to its own dtype): the same panels, the same buffer
                self._buffers["weight_panels"] = panels
        elif laid_out:
            self.lay_out()
        return converted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled():
            return F.linear(x, self.weight)
        flat = x.reshape(rows, -1)
        if torch.compiler.is_compiling():  # rows_linear passes more than MAX_TOKENS rows on to F.linear itself
            if cpu_kernels.usable(x, self.weight):
                return cpu_kernels.rows_linear(flat, self.weight, self.panels).view(*x.shape[:-1], -1)
            if rows == 1:
                return F.linear(x, self.weight)
            return (self.weight @ flat.t()).t().view(*x.shape[:-1], -1)
        if rows <= cpu_kernels.MAX_TOKENS and cpu_kernels.available() and cpu_kernels.usable(x, self.weight):
            return cpu_kernels.rows_linear(flat, self.weight, self.panels).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


def _one_call(x: torch.Tensor, *linears: nn.Module, norm: nn.Module | None = None) -> bool:
    """Whether x's rows run `linears` (and `norm`) as one kernel call: eager inference of 1-16 rows, each linear a
    `DecodeLinear` (not an adapter's or a quantized linear) the kernels take, `norm` an RMSNorm that takes them too."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.numel() // x.shape[-1] > cpu_kernels.MAX_TOKENS:
        return False
    for linear in linears:
        if type(linear) is not DecodeLinear or not cpu_kernels.usable(x, linear.weight):  # or the kernels off
            return False
    return norm is None or (type(norm) is RMSNorm and norm.takes_kernel(x))


class DecodeFeedForward(FeedForward):
    """A dense FFN or shared expert (a FeedForward: same modules, same state dict) whose 1-16 rows of eager inference,
    where its three linears are `DecodeLinear`s, run as one kernel call (`feed_forward_rows`: the same rows_linear,
    swiglu and rows_linear, bitwise): at a few rows the three modules' and the SwiGLU's Python calls and checks
    cost several times their products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if not _one_call(x, gate, up, down):
            return super().forward(x)
        return torch.ops.seekstack.feed_forward_rows(
            x, gate.weight, up.weight, down.weight, gate.panels, up.panels, down.panels
        )


class DecodeLatentAttention(MultiHeadLatentAttention):
    """MLA (same modules, same state dict) whose low-rank query of 1-16 rows of eager inference, where its two
    projections are `DecodeLinear`s, is one kernel call (`latent_query_rows`: the same rows_linear, rms_norm and
    rows_linear, bitwise) instead of three modules' calls."""

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj") or not _one_call(x, self.q_a_proj, self.q_b_proj, norm=self.q_a_layernorm):
            return super().project_query(x)  # a plain q_proj (q_lora_rank null), or the modules' calls
        down, norm, up = self.q_a_proj, self.q_a_layernorm, self.q_b_proj
        return torch.ops.seekstack.latent_query_rows(
            x, down.weight, norm.weight, norm.eps, up.weight, down.panels, up.panels
        )


def pack_for_decode(model: Transformer) -> None:
    """Give a CPU model's bias-free float32 linears, and bfloat16 ones where the kernels are built, their decode
    products (`DecodeLinear`), the head too where the kernels are built (`DecodeHead` where not);
    `decode_layout_bytes` counts the copies they hold. bfloat16 runs its 1-16 rows through `rows_linear`: it streams
    half float32's bytes, where the BLAS call at a few bfloat16 rows ran no faster than float32. Other layers are left
    as they are: quantized, biased or adapter-wrapped ones keep their own forward."""
    kernels = cpu_kernels.available()
    for module in model.modules():
        if not (type(module) is nn.Linear and module.bias is None) or module.weight.device.type != "cpu":
            continue
        dtype = module.weight.dtype
        if not (dtype == torch.float32 or (dtype == torch.bfloat16 and kernels)):
            continue
        if module is model.lm_head and not kernels:
            DecodeHead.adapt(module)
        else:
            module.__class__ = DecodeLinear
            module.lay_out()
    for module in model.modules():  # after the linears: these read their linears' classes at each call
        if type(module) is FeedForward:
            module.__class__ = DecodeFeedForward
        elif type(module) is MultiHeadLatentAttention:
            module.__class__ = DecodeLatentAttention


def decode_layout_bytes(model: nn.Module) -> int:
    """The bytes the decode layout holds beside `model`'s weights: the float32 linears' `weight_panels`, or the head's
    W^T (`weight_t`) where the kernels are not built."""
    return sum(
        copy.numel() * copy.element_size()
        for module in model.modules()
        for name in ("weight_t", "weight_panels")
        if (copy := module._buffers.get(name)) is not None
    )


class WeightVersions:
    """Tells whether the weights of `modules` changed since `mark`, and whose, for the copies laid out from them: in
    place (an optimizer step, a copy_ under no_grad, a load_state_dict: each grows the tensor's version counter) or
    replaced (load_state_dict(assign=True), a Parameter set in a weight's place: `module.weight = ...`). A write
    through `.data` grows no counter and is not seen, nor is an in-place change to an inference tensor (a base loaded
    under torch.inference_mode), which keeps none."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.mark()

    def mark(self) -> None:
        """Take the weights as they are now for the unchanged ones."""
        # each weight where it is held, all weak: the weights a load replaces are not kept alive here; inference
        # tensors keep no version counter
        weights = [
            (index, (weakref.ref(module), name, weakref.ref(weight), not weight.is_inference()))
            for index, held in enumerate(self.modules)
            for module in held.modules()
            for name, weight in module._parameters.items()
            if weight is not None
        ]
        self._holders = [index for index, _ in weights]  # each weight's module among `modules`
        self._weights = [weight for _, weight in weights]
        self._versions = self._versions_now()

    def changed(self) -> bool:
        return self._versions_now() != self._versions

    def changed_modules(self) -> list[nn.Module]:
        """The modules, of those watched, whose weights changed since `mark` (none: one comparison of the counters)."""
        now = self._versions_now()
        if now == self._versions:
            return []
        changed = {holder for holder, old, new in zip(self._holders, self._versions, now, strict=True) if new != old}
        return [self.modules[index] for index in sorted(changed)]

    def _versions_now(self) -> list[int | None]:
        """Each weight's version counter (0 where it keeps none); None once it was replaced (its module holds another
        Parameter)."""
        return [
            (weight._version if counted else 0)
            if (weight := held()) is not None
            and (owner := module()) is not None
            and owner._parameters.get(name) is weight
            else None
            for module, name, held, counted in self._weights
        ]


def refresh_copies(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Copy the weights again, in place, into the copies of those of `modules` that hold one (`DecodeLinear`,
    `DecodeHead`) and no longer hold their weight's values (each compared: the first difference ends the comparison,
    so a changed weight costs its copy alone, an unchanged one a read of both, no write); the modules rewritten."""
    rewritten = [m for m in modules if isinstance(m, DecodeLinear | DecodeHead) and not m.holds_weight()]
    for module in rewritten:
        module.lay_out()
    return rewritten


def copied_linears(model: Transformer) -> list[DecodeLinear]:
    """The block linears of `model` holding a copy of their weight for 3-16 rows (`weight_panels`), the head apart:
    its copies follow its own weight (engine `_head_versions`)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, DecodeLinear) and module.panels is not None and module is not model.lm_head
    ]
