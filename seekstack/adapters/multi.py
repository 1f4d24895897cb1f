"""Many LoRA adapters on one base model, mixed in one batch (as vLLM's multi-LoRA serving does).

Every adapted layer keeps the base weight W and, stacked over slots, the factors of each loaded adapter: A (S, r, in)
and B (S, out, r) with the scale alpha/r folded into B. Slot 0 is the base model (zeros); a smaller rank is
zero-padded to the largest. Before each forward the engine says which slot each row of the batch uses
(`AdapterRows.slots`, (B,)), and each adapted layer adds its row's own update, gathered per row:

    y_b = W x_b + B_{s_b} (A_{s_b} x_b)         (LoRA, Hu et al. 2021, eq. 3; one pair per row b)

Routed experts add, per (token, expert) pair, the token's adapter's factors of that expert. The absorbed decode
path of MLA folds kv_b_proj's weight into the query and output (DeepSeek-V2 §2.1.2), so an adapted kv_b_proj
differs per row: attention runs once per adapter present in the batch, each time with W + B_s A_s.
Shapes: B rows, T tokens per row, N = B*T tokens, E experts, S slots, r rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from seekstack.adapters.files import load_adapter
from seekstack.model.attention import MultiHeadLatentAttention
from seekstack.model.moe import RoutedExperts, Routing
from seekstack.model.transformer import Transformer

Factors = tuple[torch.Tensor, torch.Tensor]  # A (..., r, in), B (..., out, r) with the scale folded into B


@dataclass
class AdapterRows:
    """The slot of each row of the next forward, (B,) on the model's device; None runs the base alone."""

    slots: torch.Tensor | None = None

    def per_token(self, tokens: int) -> torch.Tensor:
        """The slot of each of N = B*T flattened tokens, row-major as the MoE flattens them."""
        return self.slots.repeat_interleave(tokens // self.slots.shape[0])

    @property
    def active(self) -> bool:
        return self.slots is not None and bool(self.slots.any())


def stack_factors(per_slot: list[Factors | None], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot-stacked A (S, ..., r, in) and B (S, ..., out, r), zero for slots without factors, ranks padded."""
    present = [f for f in per_slot if f is not None]
    rank = max(a.shape[-2] for a, _ in present)
    a_shape, b_shape = (*present[0][0].shape[:-2], rank, present[0][0].shape[-1]), (*present[0][1].shape[:-1], rank)
    lora_a = like.new_zeros(len(per_slot), *a_shape)
    lora_b = like.new_zeros(len(per_slot), *b_shape)
    for slot, factors in enumerate(per_slot):
        if factors is not None:
            a, b = factors
            lora_a[slot, ..., : a.shape[-2], :] = a
            lora_b[slot, ..., : b.shape[-1]] = b
    return lora_a, lora_b


class MultiLoRALinear(nn.Module):
    """An nn.Linear plus, per row, its slot's low-rank update."""

    def __init__(self, base: nn.Linear, rows: AdapterRows, per_slot: list[Factors | None]):
        super().__init__()
        self.base, self.rows = base, rows
        lora_a, lora_b = stack_factors(per_slot, base.weight)
        self.register_buffer("lora_A", lora_a)  # (S, r, in)
        self.register_buffer("lora_B", lora_b)  # (S, out, r)
        self.absorbing: int | None = None  # a slot whose whole weight `weight` returns (absorbed attention)

    @property
    def weight(self) -> torch.Tensor:
        """W, or W + B_s A_s while `absorbing` slot s."""
        if self.absorbing is None:
            return self.base.weight
        return self.base.weight + self.lora_B[self.absorbing] @ self.lora_A[self.absorbing]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) or (N, in) -> W x + B_s (A_s x) per row."""
        out = self.base(x)
        if not self.rows.active:
            return out
        slots = self.rows.slots
        rows = x.reshape(slots.shape[0], -1, x.shape[-1])  # (B, T, in)
        low = torch.bmm(rows, self.lora_A[slots].transpose(1, 2))  # (B, T, r)
        update = torch.bmm(low, self.lora_B[slots].transpose(1, 2))  # (B, T, out)
        return out + update.reshape(out.shape)

    @contextmanager
    def absorbed(self, slot: int) -> Iterator[None]:
        self.absorbing = slot
        try:
            yield
        finally:
            self.absorbing = None


class MultiLoRAExperts(RoutedExperts):
    """Routed experts whose every (token, expert) pair adds the token's slot's update of that expert."""

    def __init__(self, base: RoutedExperts, rows: AdapterRows, per_slot: dict[str, list[Factors | None]]):
        nn.Module.__init__(self)
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.rows = rows
        for name, factors in per_slot.items():  # A (S, E, r, in), B (S, E, out, r)
            lora_a, lora_b = stack_factors(factors, base.gate_up_proj)
            self.register_buffer(f"{name}_A", lora_a)
            self.register_buffer(f"{name}_B", lora_b)
        self.chunk_slots: list[torch.Tensor] = []  # per expert, the slot of each of its tokens, in dispatch order

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows.active:
            # The order `RoutedExperts.forward` hands each expert its tokens in: assignments sorted by expert.
            flat_experts = routing.experts.flatten()
            token_of = flat_experts.argsort(stable=True) // routing.experts.shape[1]
            counts = torch.bincount(flat_experts, minlength=routing.scores.shape[1]).tolist()
            self.chunk_slots = list(self.rows.per_token(x.shape[0])[token_of].split(counts))
        try:
            return super().forward(x, routing)
        finally:
            self.chunk_slots = []

    def expert_linear(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        out = super().expert_linear(x, name, expert)
        if not self.chunk_slots or not hasattr(self, f"{name}_A"):
            return out
        slots = self.chunk_slots[expert]  # (n,) the slot of each of the expert's tokens
        lora_a, lora_b = getattr(self, f"{name}_A")[slots, expert], getattr(self, f"{name}_B")[slots, expert]
        low = torch.bmm(x.unsqueeze(1), lora_a.transpose(1, 2))  # (n, 1, r)
        return out + torch.bmm(low, lora_b.transpose(1, 2)).squeeze(1)  # (n, out)


class MultiLoRAAttention(MultiHeadLatentAttention):
    """MLA whose absorbed decode runs once per slot in the batch, with that slot's adapted kv_b_proj weight."""

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        rows: AdapterRows = self.kv_b_proj.rows
        if not rows.active:
            return super().attend_absorbed(q_nope, q_rope, cached, mask)
        B, T, H, _ = q_nope.shape
        out = q_nope.new_empty(B, T, H, self.v_dim)
        for slot in rows.slots.unique().tolist():
            picked = (rows.slots == slot).nonzero().squeeze(1)
            with self.kv_b_proj.absorbed(slot):
                out[picked] = super().attend_absorbed(
                    q_nope[picked], q_rope[picked], cached[picked], None if mask is None else mask[picked]
                )
        return out


@dataclass
class LoadedAdapters:
    """The adapters attached to a model: their names by slot (slot 0, the base, has none) and the row selection."""

    folders: dict[str, Path] = field(default_factory=dict)  # name -> adapter folder, in slot order
    rows: AdapterRows = field(default_factory=AdapterRows)

    @property
    def names(self) -> list[str]:
        return list(self.folders)

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (None: the base); KeyError naming the loaded ones."""
        if name is None:
            return 0
        if name not in self.names:
            raise KeyError(f"no adapter {name!r}; loaded: {', '.join(self.names) or 'none'}")
        return self.names.index(name) + 1

    def select(self, slots: list[int], device: torch.device) -> None:
        self.rows.slots = torch.tensor(slots, device=device) if any(slots) else None


def attach_adapters(model: Transformer, adapters: Mapping[str, str | Path]) -> LoadedAdapters:
    """Load each adapter folder (peft format) and make `model` serve all of them per row; the base weights stay."""
    loaded = LoadedAdapters({name: Path(folder) for name, folder in adapters.items()})
    if not adapters:
        return loaded
    per_target: dict[tuple[str, str], list[Factors | None]] = {}
    for slot, folder in enumerate(adapters.values(), start=1):
        peft_model = load_adapter(model, folder)
        for target, factors in _lora_factors(peft_model).items():
            per_target.setdefault(target, [None] * (len(adapters) + 1))[slot] = factors
        peft_model.unload()  # the base modules back in place, unchanged
    experts: dict[str, dict[str, list[Factors | None]]] = {}
    for (module_name, param_name), per_slot in per_target.items():
        module = model.get_submodule(module_name)
        if isinstance(module, RoutedExperts):
            experts.setdefault(module_name, {})[param_name] = per_slot
        else:
            model.set_submodule(module_name, MultiLoRALinear(module, loaded.rows, per_slot))
    for module_name, per_param in experts.items():
        model.set_submodule(module_name, MultiLoRAExperts(model.get_submodule(module_name), loaded.rows, per_param))
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention) and isinstance(module.kv_b_proj, MultiLoRALinear):
            module.__class__ = MultiLoRAAttention  # the same module, with the per-slot absorbed decode
    return loaded


def _lora_factors(peft_model: nn.Module) -> dict[tuple[str, str], Factors]:
    """(module name, parameter name) -> (A, B * alpha/r) in seekstack's layout, for every layer peft adapted."""
    from peft.tuners.lora import Linear, ParamWrapper

    factors: dict[tuple[str, str], Factors] = {}
    for name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, (Linear, ParamWrapper)):
            continue
        lora_a, lora_b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        scale = module.scaling["default"]
        if isinstance(module, Linear):
            factors[(name, "weight")] = (lora_a, lora_b * scale)
            continue
        target = name.replace(".base_layer", "")
        experts = module.num_experts  # peft stores the E pairs side by side: A (E*r, in), B (out, r*E)
        lora_a = lora_a.reshape(experts, -1, lora_a.shape[-1])  # (E, r, in)
        lora_b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
        if module.get_param().dim() == 2:
            lora_a, lora_b = lora_a[0], lora_b[0]
        factors[(target, module.parameter_name)] = (lora_a.clone(), (lora_b * scale).clone())
    return factors
