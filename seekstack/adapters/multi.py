"""Many LoRA adapters on one base model, mixed in one batch (as vLLM's multi-LoRA serving does).

Each loaded adapter has a slot; slot 0 is the base model. An adapted linear layer keeps its base weight W and the
factors of every slot side by side, A (S*r, in) and B (out, S*r) (stored transposed, as `down` and `up`, for plain
matmuls), the scale alpha/r folded into B, zeros for the base, for free slots and for an adapter without that target.
S and r are the capacity the server was started with, not what is loaded (vLLM's max_loras + 1 slots of
max_lora_rank: a smaller rank is zero-padded to it), so loads and unloads never change a shape a compiled step was
traced with. Eager steps, which trace nothing, compute on a compact copy made at each load instead (`LoadedExtent`):
the slots up to the highest one in use and the largest rank loaded for that layer, as the unpadded stacks did. Before
each forward the engine says which slot each row uses (`AdapterRows.select`); from it the forward builds, once for
all layers, a mask M (N, S*r) that is 1 on the r columns of each token's slot. Every row then gets its own adapter
from two small matmuls over the whole batch, whatever the mix of adapters, with no per-row gathers or per-adapter
loops (the low-rank product runs for all S slots: N*S*r*(in+out) multiply-adds next to W's N*in*out):

    y = W x + B ((A x) * M)         (LoRA, Hu et al. 2021, eq. 3, each token with its slot's pair)

That is the eager path: there each op costs more than its arithmetic at decode sizes, and the mask takes the fewest.
An eager decode step's small linears take fewer still, one matmul, on the weights merged with each loaded slot's
update: each token's x placed in its slot's block of S' blocks, zeros elsewhere, times the S' merged copies stacked
(`MultiLoRALinear.forward_merged`; S' copies of the weight, held up to MERGED_LINEAR_BYTES).
Compiled steps instead gather each row's own slot's factors, A_s (in, r) and B_s (r, out), into two batched matmuls
(`MultiLoRALinear.forward_per_row`, punica's BGMV): inductor generates those matmuls as loops that read the gathered
rows in place, so the arithmetic counts, and it is S times less (N*r*(in+out)).
Routed experts hold E*S factor pairs per weight, of which a step's P pairs use a few, so in both paths each
(token, expert) pair gathers its own expert's factors for its slot, and only those: y_p = W_e x_p + B_k (A_k x_p),
with k = e*S + s. The eager dispatch adds this to each grouped matmul, compiled decode
(`RoutedExperts.forward_gathered`, each pair gathering its expert's weights) to each gathered one. Eager decode steps
on a CPU run the base's experts kernel instead, on each expert merged with each loaded slot's update, W_e + B_k A_k;
so do adapted dense FFNs and shared experts, one merged copy of the FFN per slot (`MultiLoRAFeedForward`).
MLA's absorbed decode folds kv_b_proj's weight into the query and the output (DeepSeek-V2 §2.1.2); an adapted
kv_b_proj adds B_s A_s there, which `MultiLoRAAttention` runs as extra latent columns of the same attention call.
An adapter may also replace whole rows of the output head or the embedding (peft's trainable tokens,
`lora.head_tokens`): `MultiTokenRows` adds each row's slot's differences to the base rows at its slot's token ids.
Shapes: B rows, T tokens per row, N = B*T tokens, E experts, K experts per token, P = N*K pairs, S slots, r rank.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.infer.packed import DecodeLatentAttention
from seekstack.model import cpu_kernels
from seekstack.model.attention import MultiHeadLatentAttention
from seekstack.model.moe import FeedForward, RoutedExperts, Routing, swiglu

Factors = tuple[torch.Tensor, torch.Tensor]  # A (..., r, in), B (..., out, r) with the scale folded into B
TokenRows = tuple[torch.Tensor, torch.Tensor]  # token ids (n,), the trained rows that replace theirs (n, D)


@dataclass
class AdapterRows:
    """The slot each row of the next forward uses, shared by every adapted layer; `slots` None: the base alone."""

    slot_count: int = 1  # S, slot 0 included: the stacks' capacity, which compiled steps compute on
    slots_in_use: int = 1  # the highest slot a loaded adapter holds + 1: the extent eager steps compute on
    slots: torch.Tensor | None = None  # (B,)
    owner: weakref.ref | None = None  # what attached the layers reading these rows (a LoadedAdapters), while it lives
    _per_forward: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # masks of this forward

    def select(self, slots: list[int], device: torch.device) -> None:
        """The rows' slots for the next forward (a batch of base rows only skips every adapter)."""
        self.slots = torch.tensor(slots, device=device) if any(slots) else None
        self._per_forward = {}

    def attached(self) -> bool:
        """Whether the LoadedAdapters that attached the layers reading these rows lives and selects them: a deep copy
        of the model has rows of its own, which no one selects."""
        owner = self.owner() if self.owner is not None else None
        return owner is not None and owner.rows is self

    @property
    def active(self) -> bool:
        return self.slots is not None

    def per_token(self, tokens: int) -> torch.Tensor:
        """The slot of each of N = B*T flattened tokens, row-major as the layers flatten them."""
        rows = self.slots.shape[0]
        return self._once((tokens, 0), lambda: self.slots.unsqueeze(1).expand(rows, tokens // rows).flatten())

    def mask(self, tokens: int, slot_count: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """M (N, slot_count*rank): 1 on the `rank` columns of each token's slot, 0 elsewhere."""
        made = self._per_forward.get((tokens, slot_count, rank))  # every layer after the first: one lookup
        if made is not None:
            return made
        one_hot = lambda: F.one_hot(self.per_token(tokens), slot_count).to(dtype)  # noqa: E731  (N, slot_count)
        return self._once((tokens, slot_count, rank), lambda: one_hot().repeat_interleave(rank, dim=1))

    def _once(self, key: tuple[int, ...], make) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if torch.compiler.is_compiling():
            return make()  # a memo keyed by sizes would tie a compiled step to one batch size (a compile per size)
        if key not in self._per_forward:
            self._per_forward[key] = make()
        return self._per_forward[key]


def stack_factors(per_slot: list[Factors | None], like: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot-stacked A (S, ..., r, in) and B (S, ..., out, r) on `like`'s device and dtype, zero for slots without
    factors, ranks zero-padded to `rank`."""
    present = [f for f in per_slot if f is not None]
    a_shape, b_shape = (*present[0][0].shape[:-2], rank, present[0][0].shape[-1]), (*present[0][1].shape[:-1], rank)
    lora_a, lora_b = like.new_zeros(len(per_slot), *a_shape), like.new_zeros(len(per_slot), *b_shape)
    for slot, factors in enumerate(per_slot):
        if factors is not None:
            a, b = factors
            lora_a[slot, ..., : a.shape[-2], :] = a
            lora_b[slot, ..., : b.shape[-1]] = b
    return lora_a, lora_b


@dataclass
class LoadedExtent:
    """A layer's stacked factors A^T (in, S*r) and B^T (S*r, out), slot-major, for S = down's columns / rank slots."""

    down: torch.Tensor
    up: torch.Tensor
    rank: int  # r; 0: no factors (an eager step skips the update)

    def mask(self, rows: AdapterRows, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """M (N, S*r) for these stacks."""
        return rows.mask(tokens, self.down.shape[1] // self.rank, self.rank, dtype)


# The most bytes an adapted linear's merged copies may take (the slots in use times its weight): small layers, where
# the update's three ops cost more than reading S' copies of the weight. The cut-off rests on a one-off profile, a
# scratch script that is not in bench/ (8 rows, 5 slots, rank 16, float32, one thread, under load: 128 x 128, 0.31 MiB
# of copies, 122 -> 65 us; 256 x 256, 1.25 MiB, 369 -> 869 us): no command reproduces these figures.
MERGED_LINEAR_BYTES = 2**19


def keyed_as_the_base(wrapper: nn.Module) -> None:
    """Give `wrapper`, which holds its layer as `base`, the layer's state-dict keys (`prefix.weight`, not
    `prefix.base.weight`), as vLLM's LoRA layers load the base's names: with adapters attached the model's state dict
    is the base's, and a plain model's loads into it (an RL weight sync). The adapters' stacks, laid out from the
    loaded adapters' files, are not in it."""

    def base_keys_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key in [key for key in state_dict if key.startswith(prefix + "base.")]:
            state_dict[prefix + key.removeprefix(prefix + "base.")] = state_dict.pop(key)

    def base_keys_in(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + "base.")]:
            state_dict[prefix + "base." + key.removeprefix(prefix)] = state_dict.pop(key)

    wrapper.register_state_dict_post_hook(base_keys_out)
    wrapper.register_load_state_dict_pre_hook(base_keys_in)


class MultiLoRALinear(nn.Module):
    """An nn.Linear plus, per token, its slot's low-rank update."""

    def __init__(self, base: nn.Linear | nn.Embedding, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        keyed_as_the_base(self)
        self.rank = 0
        self.absorbed_weight: torch.Tensor | None = None  # what `weight` returns inside MultiLoRAAttention
        self.loaded_rank = 0  # the compact copy's rank, 0: no factors (buffers, so that .to() moves them)
        self.register_buffer("loaded_down", torch.zeros(0, 0), persistent=False)
        self.register_buffer("loaded_up", torch.zeros(0, 0), persistent=False)
        self.register_buffer("loaded_merged", None, persistent=False)  # (S'*in, out), or None: `forward_merged`

    def set_factors(self, per_slot: list[Factors | None], rank: int) -> None:
        """Hold these factors, one entry per slot, each zero-padded to `rank`: A^T (in, S*r) and B^T (S*r, out),
        slot-major; and their compact copy of the loaded extent (`loaded`) for eager steps."""
        lora_a, lora_b = stack_factors(per_slot, self.base.weight, rank)  # (S, r, in), (S, out, r)
        self.rank = rank
        self.register_buffer("down", lora_a.flatten(0, 1).t().contiguous(), persistent=False)
        self.register_buffer("up", lora_b.permute(0, 2, 1).flatten(0, 1).contiguous(), persistent=False)
        used = max(a.shape[-2] for a, _ in (f for f in per_slot if f is not None))
        slots = self.rows.slots_in_use
        self.loaded_rank = used
        self.loaded_down = lora_a[:slots, :used].flatten(0, 1).t().contiguous()
        self.loaded_up = lora_b[:slots, :, :used].permute(0, 2, 1).flatten(0, 1).contiguous()
        held = isinstance(self.base, nn.Linear) and slots * self.base.weight.nbytes <= MERGED_LINEAR_BYTES
        # Row s*in + i is row i of W_s^T: x in block s of S'*in inputs, zeros elsewhere, gives W_s x.
        self.loaded_merged = self.merged_per_slot().transpose(1, 2).flatten(0, 1).contiguous() if held else None

    def clear_factors(self) -> None:
        """Hold zeros in every slot (no loaded adapter adapts this layer), keeping the stacks' shapes; eager steps
        skip the layer's update."""
        self.down.zero_()
        self.up.zero_()
        self.loaded_rank, self.loaded_down, self.loaded_up = 0, self.down[:, :0], self.up[:0]
        self.loaded_merged = None

    def merged_per_slot(self) -> torch.Tensor:
        """W + B_s A_s (S', out, in) for the S' loaded slots, summed in float32 and rounded once to the weight's dtype
        (in bfloat16, B A rounded and then the sum would be rounded twice)."""
        weight, slots, rank = self.base.weight.detach(), self.rows.slots_in_use, self.loaded_rank
        if not rank:
            return weight.expand(slots, -1, -1).contiguous()
        down = self.loaded_down.view(weight.shape[1], slots, rank).permute(1, 2, 0).float()  # (S', r, in): A_s
        up = self.loaded_up.view(slots, rank, weight.shape[0]).transpose(1, 2).float()  # (S', out, r): B_s
        return (weight.float() + torch.bmm(up, down)).to(weight.dtype)

    @property
    def loaded(self) -> LoadedExtent:
        """The compact copy of the loaded extent that eager steps compute on."""
        return LoadedExtent(self.loaded_down, self.loaded_up, self.loaded_rank)

    def stacks(self) -> LoadedExtent:
        """What this step computes on: in a compiled step the fixed capacity (a shape it was traced with), in an eager
        one the loaded extent."""
        if torch.compiler.is_compiling():
            return LoadedExtent(self.down, self.up, self.rank)
        return self.loaded

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight if self.absorbed_weight is None else self.absorbed_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> W x + B ((A x) * M) (..., out)."""
        if self.rows.active and self._merged_takes(x):
            return self.forward_merged(x)
        out = self.base(x)
        if not self.rows.active:
            return out
        if torch.compiler.is_compiling():
            return self.forward_per_row(x, out)
        rank, down = self.loaded_rank, self.loaded_down  # the loaded extent, read directly: this runs per layer
        if not rank:
            return out
        x = x.reshape(-1, x.shape[-1])  # (N, in)
        low = torch.mm(x, down).mul_(self.rows.mask(x.shape[0], down.shape[1] // rank, rank, x.dtype))  # (N, S*r)
        return torch.addmm(out.reshape(-1, out.shape[-1]), low, self.loaded_up).view(out.shape)

    def _merged_takes(self, x: torch.Tensor) -> bool:
        """Eager inference of a few tokens (a decode step), where the merged copies are held."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or self.loaded_merged is None:
            return False  # first: a compiled step reads no merged copy (its shape changes at loads)
        return x.numel() <= cpu_kernels.MAX_TOKENS * x.shape[-1]

    def forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> W_s x + b (..., out) with each token's slot s, one matmul over the merged copies (S'*in,
        out): each token's x in its slot's block of S'*in inputs, zeros in the others; b the base's bias, if any."""
        tokens, merged, bias = x.numel() // x.shape[-1], self.loaded_merged, self.base.bias
        one_hot = self.rows.mask(tokens, merged.shape[0] // x.shape[-1], 1, x.dtype).unsqueeze(-1)  # (N, S', 1)
        spread = (x.reshape(tokens, 1, -1) * one_hot).flatten(1)  # (N, S'*in)
        out = torch.mm(spread, merged) if bias is None else torch.addmm(bias, spread, merged)
        return out.view(*x.shape[:-1], -1)

    def forward_per_row(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """W x (`out`) + B_s (A_s x) with each row's own slot s, for compiled steps: there the matmuls are generated
        loops that read each row's gathered A_s and B_s in place, so N*r*(in+out) multiply-adds beat the mask's S times
        that (eager steps pay per op instead, and the mask takes fewer)."""
        slots, count = self.rows.slots, self.rows.slot_count
        down = self.down.view(-1, count, self.rank).transpose(0, 1)[slots]  # (B, in, r)
        up = self.up.view(count, self.rank, -1)[slots]  # (B, r, out)
        low = torch.bmm(x.reshape(slots.shape[0], -1, x.shape[-1]), down)  # (B, T, r)
        return out + torch.bmm(low, up).view(out.shape)


class MultiLoRAEmbedding(MultiLoRALinear):
    """An nn.Embedding plus, per token, its slot's low-rank update: A's column of the token id, times B."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> E[ids] + B (A[:, ids] * M) (..., D)."""
        out = self.base(ids)
        stacks = self.stacks()
        if not self.rows.active or not stacks.rank:
            return out
        low = F.embedding(ids.flatten(), stacks.down).mul_(stacks.mask(self.rows, ids.numel(), out.dtype))
        return torch.addmm(out.reshape(-1, out.shape[-1]), low, stacks.up).view(out.shape)


class MultiTokenRows(nn.Module):
    """An output head (or, as `MultiTokenRowsEmbedding`, an embedding) whose rows of some token ids each slot replaces
    by trained ones (peft's trainable tokens: merged, W[ids_s] = R_s). Per slot it holds the ids, zero-padded to the
    longest list, and the differences D_s = R_s - W[ids_s] (zero for the base slot and the padding), so a row of
    slot s only adds to the base layer's output, and for a head only at its own ids:
        logits[..., ids_s] += h D_s^T      (h W^T with rows ids_s replaced by R_s)
    The head computes h D^T for all S*n rows in one matmul and keeps each row's slot's n columns: N*S*n*D
    multiply-adds, fewer than the head's own N*V*D for a few slots, and cheaper than gathering (B, n, D) rows per
    step in eager and compiled steps alike."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        keyed_as_the_base(self)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def set_rows(self, per_slot: list[TokenRows | None], width: int = 0) -> None:
        """Hold these replaced rows, one entry per slot: token ids (S, n) and differences to the base rows (S, n, D),
        n the longest list or `width` where that is more (the n held before, a shape a compiled step was traced
        with)."""
        weight = self.base.weight.detach()  # no autograd history in the buffers: a compiled step guards requires_grad
        longest = max([width, *(len(rows[0]) for rows in per_slot if rows is not None)])
        token_ids = torch.zeros(len(per_slot), longest, dtype=torch.long, device=weight.device)
        deltas = torch.zeros(len(per_slot), longest, weight.shape[1], dtype=torch.float32, device=weight.device)
        for slot, rows in enumerate(per_slot):
            if rows is not None:
                ids, trained = rows[0].to(weight.device), rows[1].to(weight.device, torch.float32)
                token_ids[slot, : len(ids)] = ids
                deltas[slot, : len(ids)] = trained - weight[ids].float()
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_deltas", deltas.to(weight.dtype), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) -> logits (B, T, V), each row's slot's ids raised by h D_s^T."""
        logits = self.base(hidden)
        if not self.rows.active:
            return logits
        slots = self.rows.slots
        B, (S, n, D) = slots.shape[0], self.token_deltas.shape
        every_slot = torch.mm(hidden.reshape(-1, D), self.token_deltas.view(S * n, D).t()).view(B, -1, S, n)
        added = every_slot[torch.arange(B, device=slots.device), :, slots]  # (B, T, n): each row's own slot
        ids = self.token_ids[slots].unsqueeze(1).expand_as(added)
        return logits.reshape(B, -1, logits.shape[-1]).scatter_add(-1, ids, added).view(logits.shape)


class MultiTokenRowsEmbedding(MultiTokenRows):
    """An embedding whose listed token ids each slot reads from its trained rows: E[t] + D_s[j] where ids_s[j] = t."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D)."""
        out = self.base(ids)
        if not self.rows.active:
            return out
        slots = self.rows.slots
        listed, deltas = self.token_ids[slots], self.token_deltas[slots]  # (B, n), (B, n, D)
        hits = (ids.reshape(slots.shape[0], -1, 1) == listed.unsqueeze(1)).to(deltas.dtype)  # (B, T, n); pads add 0
        return out + torch.bmm(hits, deltas).view(out.shape)


MERGED_EXPERTS = ("gate_up_proj", "down_proj")  # the stacked weights MultiLoRAExperts holds merged copies of
# The most bytes a MoE layer's merged copies may take (the slots in use times its routed experts' weights): small
# models, where the dispatch's op count is the cost; a larger layer keeps the grouped dispatch, whose bytes are the
# factors alone (a DeepSeek-V2-Lite layer's experts are ~0.5 GiB in bfloat16: 8 slots would hold 4 GiB more).
MERGED_EXPERTS_BYTES = 64 * 2**20


class MultiLoRAExperts(RoutedExperts):
    """Routed experts whose every (token, expert) pair adds the update of its token's slot for that expert, and only
    that one (as punica's BGMV kernel does for vLLM: each pair gathers its own factor pair).

    A RoutedExperts turns into one in place (`adapt`), so the expert weights stay where they are. The factors of
    every (expert, slot) are stacked as extra weights A (E*S, in, r) and B (E*S, r, out), zero for the base slot;
    a pair of expert e and slot s gathers row k = e*S + s of both, and two batched matmuls give all pairs at once:
        y_p = W_e x_p + B_k (A_k x_p)     (P*r*(in+out) multiply-adds, not S times that)
    The eager dispatch (`grouped_linear`) adds it to each grouped matmul, compiled decode (`forward_gathered`) to each
    gathered one. Eager decode steps on a CPU instead run the experts kernel, as base rows do, on each expert's weights
    merged with each loaded slot's update (`forward_merged`): the dispatch's sort, grouped matmuls (one small matmul
    per expert on a CPU) and per-pair gathers cost ~5x the kernel's one op there, for S' copies of the experts' weights
    (S' = the highest slot in use + 1) held per adapted layer."""

    rows: AdapterRows
    pair_keys: torch.Tensor | None  # (P,) e*S + s of each (token, expert) pair in dispatch order, during a forward
    holds_factors: bool  # whether a loaded adapter has factors here (else every slot holds zeros, after an unload)

    @classmethod
    def adapt(cls, experts: RoutedExperts, rows: AdapterRows) -> MultiLoRAExperts:
        experts.__class__ = cls
        assert isinstance(experts, MultiLoRAExperts)
        experts.rows, experts.pair_keys, experts.holds_factors = rows, None, False
        return experts

    def restore(self) -> RoutedExperts:
        """Back to a plain RoutedExperts, without the adapters' buffers."""
        self._drop_factors()
        del self.rows, self.pair_keys, self.holds_factors
        self.__class__ = RoutedExperts
        return self

    def set_factors(self, per_param: dict[str, list[Factors | None]], rank: int) -> None:
        """Hold these factors per stacked parameter name, one entry per slot, each zero-padded to `rank`:
        `NAME_lora_down` A^T (E*S, in, r) and `NAME_lora_up` B^T (E*S, r, out), expert-major, for the stacked weight
        `NAME` (E, out, in). A parameter held before and not given holds zeros, its stacks' shapes kept (none given:
        eager steps run the base's experts, compiled ones keep their graph and add the zeros). Where the
        experts kernel runs (cpu_kernels: the CPU, float32 or bfloat16) and the copies fit MERGED_EXPERTS_BYTES, also
        each expert's weights merged with each loaded slot's update, `merged_NAME` (E*S', out, in) for S' = the slots
        up to the highest in use, which eager decode steps run the kernel on (`forward_merged`); None elsewhere."""
        for name in self._buffers:
            if name.endswith(("_lora_down", "_lora_up")) and name.rsplit("_lora_", 1)[0] not in per_param:
                self._buffers[name].zero_()
        stacked = {}
        for name, per_slot in per_param.items():
            stacked[name] = stack_factors(per_slot, self.gate_up_proj, rank)  # (S, E, r, in), (S, E, out, r)
            lora_a, lora_b = stacked[name]
            down = lora_a.transpose(0, 1).transpose(2, 3).flatten(0, 1).contiguous()
            self.register_buffer(f"{name}_lora_down", down, persistent=False)
            up = lora_b.transpose(0, 1).transpose(2, 3).flatten(0, 1).contiguous()
            self.register_buffer(f"{name}_lora_up", up, persistent=False)
        merged_bytes = self.rows.slots_in_use * sum(getattr(self, name).nbytes for name in MERGED_EXPERTS)
        self.holds_factors = bool(per_param)
        kernel = self.holds_factors and merged_bytes <= MERGED_EXPERTS_BYTES and cpu_kernels.available()
        # The weight stands in for the rows the kernel will take (not known yet): their dtype must match it.
        kernel = kernel and cpu_kernels.usable(self.down_proj, self.down_proj)
        for name in MERGED_EXPERTS:
            merged = self._merged(name, stacked.get(name)) if kernel else None
            self.register_buffer(f"merged_{name}", merged, persistent=False)

    def _merged(self, name: str, factors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """W_e + B_{e,s} A_{e,s} of stacked weight `name` (E, out, in) for the S' loaded slots, as (E*S', out, in),
        summed in float32 and rounded once to the weight's dtype (in bfloat16, B A rounded and then the sum would be
        rounded twice)."""
        weight, slots = getattr(self, name).detach().unsqueeze(1), self.rows.slots_in_use  # (E, 1, out, in)
        if factors is not None:
            lora_a, lora_b = factors
            update = torch.matmul(lora_b[:slots].float(), lora_a[:slots].float()).transpose(0, 1)  # (E, S', out, in)
            weight = (weight.float() + update).to(weight.dtype)
        return weight.expand(-1, slots, -1, -1).flatten(0, 1).contiguous()

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self.forward_gathered(x, routing)  # as RoutedExperts.forward does, before any dispatch work
        if self.matmuls_replaced():
            if self._merged_takes(x):
                return self.forward_merged(x, routing)
            # The order `RoutedExperts.forward` dispatches the pairs in: sorted by expert.
            order = routing.experts.flatten().argsort(stable=True)  # (P,)
            self.pair_keys = self._keys(x.shape[0], routing.experts)[order]
        try:
            return super().forward(x, routing)
        finally:
            self.pair_keys = None

    def _merged_takes(self, x: torch.Tensor) -> bool:
        """Eager inference of a few tokens (a decode step) where the experts kernel runs on the merged weights."""
        few = not torch.is_grad_enabled() and x.shape[0] <= cpu_kernels.MAX_TOKENS
        return few and self.merged_down_proj is not None and cpu_kernels.usable(x, self.merged_down_proj)

    def forward_merged(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts kernel (`RoutedExperts.forward_kernel`, one op, as for base rows) over the merged weights, each
        (token, expert) pair reading row k = e*S' + s of them, W_e + B_{e,s} A_{e,s} (its expert merged with its
        token's adapter)."""
        slots = self.rows.slots_in_use
        keys = (routing.experts * slots).add_(self.rows.per_token(x.shape[0]).unsqueeze(1))  # (N, K)
        return cpu_kernels.grouped_experts(x, keys, routing.weights, self.merged_gate_up_proj, self.merged_down_proj)

    def matmuls_replaced(self) -> bool:
        """Only while a row uses an adapter and a loaded adapter has factors here: a batch of base rows, or any batch
        while the loaded adapters leave these experts alone (zeros held after an unload), runs as the base experts
        do, through the eager kernel (the grouped matmuls it used to take made a batch of base rows ~20% slower with
        adapters loaded, and cost ~5x the kernel to add zeros)."""
        return self.rows.active and self.holds_factors

    def forward_gathered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """RoutedExperts.forward_gathered (compiled decode: each pair gathers its expert's weights) plus each pair's
        update, gathered the same way: y_p = W_e x_p + B_k (A_k x_p)."""
        if not self.rows.active:
            return super().forward_gathered(x, routing)
        N, K = routing.experts.shape
        experts = routing.experts.flatten()  # (P,) one (token, expert) pair per row, token-major
        keys = self._keys(N, routing.experts)
        pairs = x.repeat_interleave(K, dim=0).unsqueeze(1)  # (P, 1, D)
        gate, up = self._gathered_linear(pairs, "gate_up_proj", experts, keys).chunk(2, dim=-1)  # (P, 1, I) each
        hidden = swiglu(gate, up, routing.weights.view(N * K, 1))
        return self._gathered_linear(hidden, "down_proj", experts, keys).view(N, K, -1).sum(dim=1)

    def _gathered_linear(self, x: torch.Tensor, name: str, experts: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x (P, 1, in) -> (P, 1, out): each pair times its expert's W^T, plus its own update where adapted."""
        out = torch.bmm(x, getattr(self, name)[experts].transpose(1, 2))
        return self._add_update(out, x, name, keys)

    def grouped_linear(self, x: torch.Tensor, name: str, load: torch.Tensor) -> torch.Tensor:
        """The base experts' x W_e^T plus each pair's own update: x (P, in) sorted by expert -> (P, out)."""
        out = super().grouped_linear(x, name, load)
        if self.pair_keys is None:
            return out
        return self._add_update(out.unsqueeze(1), x.unsqueeze(1), name, self.pair_keys).squeeze(1)

    def _keys(self, tokens: int, experts: torch.Tensor) -> torch.Tensor:
        """e*S + s of each (token, expert) pair, token-major: the row of its factors in the stacks (P,)."""
        slots = self.rows.per_token(tokens).unsqueeze(1)  # (N, 1)
        return (experts * self.rows.slot_count + slots).flatten()

    def _add_update(self, out: torch.Tensor, x: torch.Tensor, name: str, keys: torch.Tensor) -> torch.Tensor:
        """out (P, 1, out) += B_k (A_k x_p) for x (P, 1, in), each pair's factors gathered by its key."""
        if f"{name}_lora_down" not in self._buffers:
            return out
        down, up = self._buffers[f"{name}_lora_down"], self._buffers[f"{name}_lora_up"]  # (E*S, in, r), (E*S, r, out)
        low = torch.bmm(x, down.index_select(0, keys))  # (P, 1, r)
        return out.baddbmm_(low, up.index_select(0, keys))

    def _drop_factors(self) -> None:
        for name in [name for name in self._buffers if name.endswith(("_lora_down", "_lora_up"))]:
            del self._buffers[name]
        for name in MERGED_EXPERTS:
            self._buffers.pop(f"merged_{name}", None)


FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")  # a FeedForward's linears, which MultiLoRALinear may wrap


class MultiLoRAFeedForward(FeedForward):
    """A dense FFN or shared expert with adapted linears whose eager decode steps run the experts kernel, as routed
    experts' do (`MultiLoRAExperts.forward_merged`), on its weights merged with each loaded slot's update, one
    "expert" per slot: token n reads row s_n of `merged_gate_up` (S', 2I, D) and `merged_down` (S', D, I), its own
    adapter's W + B_s A_s, with a routing weight of 1. One op for the whole FFN, where the base's three linears and
    their per-token updates (MultiLoRALinear, kept for prefill and compiled steps) take 12; for S' copies of its
    weights, held within MERGED_EXPERTS_BYTES."""

    rows: AdapterRows
    unadapted: type[FeedForward]  # the class restore turns it back into: FeedForward, or packed's DecodeFeedForward

    @classmethod
    def adapt(cls, ffn: FeedForward, rows: AdapterRows) -> MultiLoRAFeedForward:
        """Turn `ffn`, some of whose linears are MultiLoRALinear, into one in place, its merged copies made anew."""
        if not isinstance(ffn, cls):
            ffn.unadapted = type(ffn)
        ffn.__class__ = cls
        assert isinstance(ffn, MultiLoRAFeedForward)
        ffn.rows = rows
        layers = [getattr(ffn, name) for name in FEED_FORWARD]
        weights = [layer.base.weight if isinstance(layer, MultiLoRALinear) else layer.weight for layer in layers]
        held = rows.slots_in_use * sum(weight.nbytes for weight in weights) <= MERGED_EXPERTS_BYTES
        kernel = held and cpu_kernels.available() and cpu_kernels.usable(weights[0], weights[0])
        gate, up, down = map(ffn._merged, layers, weights) if kernel else (None, None, None)
        ffn.register_buffer("merged_gate_up", None if gate is None else torch.cat((gate, up), dim=1), persistent=False)
        ffn.register_buffer("merged_down", down, persistent=False)
        return ffn

    def restore(self) -> FeedForward:
        del self._buffers["merged_gate_up"], self._buffers["merged_down"], self.rows
        self.__class__ = self.unadapted
        del self.unadapted
        return self

    def _merged(self, layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """W + B_s A_s (S', out, in) of one linear for the S' loaded slots (W itself where it is not adapted)."""
        if isinstance(layer, MultiLoRALinear):
            return layer.merged_per_slot()
        return weight.detach().expand(self.rows.slots_in_use, -1, -1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D): the merged kernel for an eager inference step of a few tokens with adapter rows."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or not self.rows.active:
            return super().forward(x)  # first: a compiled step reads no merged copy (their shapes change at loads)
        tokens, merged = x.numel() // x.shape[-1], self.merged_down
        if merged is None or tokens > cpu_kernels.MAX_TOKENS or not cpu_kernels.usable(x, merged):
            return super().forward(x)
        slots = self.rows.per_token(tokens).unsqueeze(1)  # (N, 1): each token's "expert", its slot
        flat = x.reshape(tokens, -1)
        ones = torch.ones(slots.shape, device=x.device)
        return cpu_kernels.grouped_experts(flat, slots, ones, self.merged_gate_up, merged).view(x.shape)


CAPACITY_LAYOUT = ("absorbed_weight", "key_up", "value_up")  # MultiLoRAAttention's buffers for compiled steps
LOADED_LAYOUT = ("loaded_absorbed_weight", "loaded_key_up", "loaded_value_up")  # and for eager ones


class MultiLoRAAttention(MultiHeadLatentAttention):
    """MLA whose absorbed decode adds each row's kv_b_proj update as S*r extra latent columns of one attention call.

    With kv_b_proj's update B_s A_s split per head into key rows B^K_s (N, r) and value rows B^V_s (V, r):
        q^C = (W^UK + B^K_s A_s)^T q = [W^UK; A]^T [q; (B^K^T q) * M]
        o   = (W^UV + B^V_s A_s) c   = W^UV c + B^V ((A c) * M)
    so the query gains the columns (B^K^T q) * M and W^UK, W^UV gain the rows A = [A_1; ...; A_S] (`absorbed_weight`).
    S*r is kv_b_proj's capacity in compiled steps and its loaded extent in eager ones (`MultiLoRALinear.stacks`).
    An eager decode step where kv_b_proj holds its merged copies W_s = W + B_s A_s (`forward_merged`) runs on those
    instead (`merged_absorbed`): the query in its slot's block of S' gives W^UK_s^T q, and the output's S' blocks
    W^UV_s c keep its slot's.
    """

    unadapted: type[MultiHeadLatentAttention]  # restore's class: MultiHeadLatentAttention, or DecodeLatentAttention

    @classmethod
    def adapt(cls, attention: MultiHeadLatentAttention) -> MultiLoRAAttention:
        """Turn `attention`, whose kv_b_proj is a MultiLoRALinear, into one in place, with its factors' layout; one
        packed for decode keeps its one-call query (`MultiLoRADecodeAttention`)."""
        if not isinstance(attention, MultiLoRAAttention):
            attention.unadapted = type(attention)
        packed = issubclass(attention.unadapted, DecodeLatentAttention)
        attention.__class__ = MultiLoRADecodeAttention if packed else MultiLoRAAttention
        assert isinstance(attention, MultiLoRAAttention)
        attention.set_factors()
        return attention

    def restore(self) -> MultiHeadLatentAttention:
        for name in (*CAPACITY_LAYOUT, *LOADED_LAYOUT, "merged_absorbed"):
            del self._buffers[name]
        self.__class__ = self.unadapted
        del self.unadapted
        return self

    @torch.no_grad()  # copies for inference, not part of the base weight's graph: copy.deepcopy takes only leaves
    def set_factors(self) -> None:
        """Lay out kv_b_proj's current factors as buffers (not saved): its capacity's and its loaded extent's for
        eager steps (`LOADED_LAYOUT`)."""
        capacity = self._layout(self.kv_b_proj.down, self.kv_b_proj.up)
        loaded = self._layout(self.kv_b_proj.loaded_down, self.kv_b_proj.loaded_up)
        for names, layout in ((CAPACITY_LAYOUT, capacity), (LOADED_LAYOUT, loaded)):
            for name, held in zip(names, layout, strict=True):
                self.register_buffer(name, held, persistent=False)
        merged = None if self.kv_b_proj.loaded_merged is None else self._merged_layout()
        self.register_buffer("merged_absorbed", merged, persistent=False)

    def _merged_layout(self) -> torch.Tensor:
        """kv_b_proj's merged copies as the absorbed weight of S' slots side by side, per head [W^UK_1; ...;
        W^UK_S'; W^UV_1; ...; W^UV_S'] (H*S'*(N+V), C)."""
        H, N, V, C = self.num_heads, self.nope_dim, self.v_dim, self.kv_rank
        merged = self.kv_b_proj.merged_per_slot().view(-1, H, N + V, C).transpose(0, 1)  # (H, S', N+V, C)
        w_uk, w_uv = merged.split([N, V], dim=2)
        return torch.cat((w_uk.flatten(1, 2), w_uv.flatten(1, 2)), dim=1).flatten(0, 1)

    def _layout(self, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The widened absorbed weight and B^K (H, N, S*r), B^V (H, V, S*r) of stacked factors A^T `down`, B^T `up`."""
        H, N, V, C = self.num_heads, self.nope_dim, self.v_dim, self.kv_rank
        extra = down.t().expand(H, -1, -1)  # (H, S*r, C): A, the same for every head
        w_uk, w_uv = self.kv_b_proj.base.weight.view(H, N + V, C).split([N, V], dim=1)
        key_up, value_up = up.t().reshape(H, N + V, -1).split([N, V], dim=1)
        return torch.cat((w_uk, extra, w_uv, extra), dim=1).flatten(0, 1), key_up.contiguous(), value_up.contiguous()

    def attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        rows: AdapterRows = self.kv_b_proj.rows
        stacks = self.kv_b_proj.stacks()
        if not rows.active or not stacks.rank:
            return super().attend_absorbed(q_nope, q_rope, cached, mask)
        compiled = torch.compiler.is_compiling()
        B, T, H, _ = q_nope.shape
        if not compiled and self.merged_absorbed is not None and B * T <= cpu_kernels.MAX_TOKENS:
            return self.attend_merged(q_nope, q_rope, cached, mask)
        absorbed, key_up, value_up = (
            (self.absorbed_weight, self.key_up, self.value_up)
            if compiled
            else (self.loaded_absorbed_weight, self.loaded_key_up, self.loaded_value_up)
        )
        extra = key_up.shape[-1]  # S*r
        slot_mask = stacks.mask(rows, B * T, q_nope.dtype).view(B, T, 1, extra)
        q_extra = _per_head(q_nope, key_up).mul_(slot_mask)  # (B, T, H, S*r)
        with self.widened(self.nope_dim + extra, self.v_dim + extra, absorbed):
            out = super().attend_absorbed(torch.cat((q_nope, q_extra), dim=-1), q_rope, cached, mask)
        out, out_extra = out.split([self.v_dim, extra], dim=-1)  # (B, T, H, V), (B, T, H, S*r): A c
        return out + _per_head(out_extra * slot_mask, value_up.transpose(1, 2))

    def attend_merged(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The absorbed call on kv_b_proj's S' merged copies: each token's q in its slot's block of S'*N query columns
        (zeros in the others) meets W^UK_s alone, and of the S' outputs W^UV_s c it keeps its slot's."""
        B, T, H, N = q_nope.shape
        slots = self.merged_absorbed.shape[0] // (H * (N + self.v_dim))  # S'
        one_hot = self.kv_b_proj.rows.mask(B * T, slots, 1, q_nope.dtype).view(B, T, 1, slots, 1)
        spread = (q_nope.unsqueeze(3) * one_hot).flatten(3)  # (B, T, H, S'*N)
        with self.widened(slots * N, slots * self.v_dim, self.merged_absorbed):
            out = super().attend_absorbed(spread, q_rope, cached, mask)  # (B, T, H, S'*V)
        return (out.unflatten(-1, (slots, -1)) * one_hot).sum(dim=3)

    @contextmanager
    def widened(self, nope_dim: int, v_dim: int, absorbed: torch.Tensor) -> Iterator[None]:
        """N and V widened to `nope_dim` and `v_dim` and kv_b_proj's weight `absorbed` laid out for them (per head, N
        key rows then V value rows), for one absorbed call."""
        held = self.nope_dim, self.v_dim
        self.nope_dim, self.v_dim = nope_dim, v_dim
        self.kv_b_proj.absorbed_weight = absorbed
        try:
            yield
        finally:
            self.nope_dim, self.v_dim = held
            self.kv_b_proj.absorbed_weight = None


class MultiLoRADecodeAttention(MultiLoRAAttention, DecodeLatentAttention):
    """A MultiLoRAAttention packed for decode: its low-rank query, which kv_b_proj's update leaves as it is, stays one
    kernel call (`DecodeLatentAttention.project_query`) where q_a_proj and q_b_proj are not adapted."""


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, in) times each head's matrix (H, in, out) -> (B, T, H, out), as one bmm with heads as its batch."""
    B, T, H, _ = x.shape
    return torch.bmm(x.reshape(B * T, H, -1).transpose(0, 1), weight).transpose(0, 1).reshape(B, T, H, -1)
