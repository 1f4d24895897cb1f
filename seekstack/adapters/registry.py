"""The LoRA adapters a served model holds, by name and slot, loaded and unloaded while it serves.

An adapter's factors (and the head or embedding rows it trains in full, `lora.head_tokens`) are read through peft
onto a weightless (meta device) copy of the model, so reading never touches the model that serves. Adding or removing
an adapter then re-lays the factors and rows of all loaded adapters into the adapted layers
(seekstack.adapters.multi), whose stacks have a fixed capacity, as vLLM's: `max_loras` slots of `max_lora_rank`, so that
a load or an unload changes no shape of a compiled decode step (which would compile it again); an adapted layer stays
adapted, with zeros, while any adapter is loaded. A slot stays with its adapter while it is loaded (requests hold slot
numbers); a removed adapter's slot is reused by the next one loaded, so what the prefix cache keeps is keyed by
`cache_salt`, which names the load, not the slot.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from seekstack.adapters.config import ADAPTER_NAME
from seekstack.adapters.files import ADAPTER_CONFIG_FILE, read_lora_config, refuse_quantized_base, weightless_adapter
from seekstack.adapters.multi import (
    FEED_FORWARD,
    MERGED_EXPERTS_BYTES,
    MERGED_LINEAR_BYTES,
    AdapterRows,
    Factors,
    MultiLoRAAttention,
    MultiLoRAEmbedding,
    MultiLoRAExperts,
    MultiLoRAFeedForward,
    MultiLoRALinear,
    MultiTokenRows,
    MultiTokenRowsEmbedding,
    TokenRows,
)
from seekstack.checkpoint import CheckpointError
from seekstack.config import ModelConfig
from seekstack.infer.cache import free_memory, refuse_a_non_count
from seekstack.infer.packed import WeightVersions
from seekstack.infer.placement import planned_devices
from seekstack.model.attention import MultiHeadLatentAttention
from seekstack.model.moe import FeedForward, RoutedExperts, Router
from seekstack.model.transformer import Transformer
from seekstack.schema import ConfigError, shown_value

Target = tuple[str, str]  # (module name, parameter name), in seekstack's names

# The capacity an engine's adapters get unless it is given one (vLLM's max_loras, max_lora_rank; rank 16 is also
# vLLM's default); adapters given at the start that need more raise it to what they need.
DEFAULT_MAX_LORAS = 8
DEFAULT_MAX_LORA_RANK = 16

SERVING_UNSUPPORTED = {  # peft's LoraConfig fields that merging applies and serving's per-row layers do not
    "use_dora": "a DoRA adapter (use_dora, lora.dora) rescales each output row",
    "use_bdlora": "a block-diagonal LoRA adapter (use_bdlora) stores A or B as diagonal blocks",
}


class UnknownAdapter(ValueError):
    """A request or an unload names an adapter that is not loaded."""


class AdapterConflict(ValueError):
    """A load under a name in use, or an unload of an adapter that unfinished requests still use."""


class AdapterInUse(AdapterConflict):
    """An unload or a replacement (load_inplace) of an adapter that unfinished requests still use."""


@dataclass
class AdapterWeights:
    """What the per-row layers apply of one adapter: (A, B * alpha/r) per adapted weight, and the token ids and
    trained rows per module whose rows it replaces (peft's trainable tokens, `lora.head_tokens`)."""

    factors: dict[Target, Factors]
    token_rows: dict[str, TokenRows]
    folder: Path  # where it was read from

    @property
    def rank(self) -> int:
        """The largest rank of its factors (peft's rank_pattern may give modules other ranks than r); 0: none."""
        return max((a.shape[-2] for a, _ in self.factors.values()), default=0)


def read_factors(config: ModelConfig, folder: str | Path) -> AdapterWeights:
    """The weights of the adapter saved in `folder` for a model with `config`; CheckpointError naming the file when
    the adapter does not fit the model, is DoRA (`dora`) or block-diagonal (`use_bdlora`) or adapts an MoE router
    (peft's all-linear targets `mlp.gate.weight`), which the per-row layers (seekstack.adapters.multi) do not apply,
    was saved by peft for a residual base (`_residual_init`), or replaces token rows of a base whose head and embedding
    are tied."""
    config_file = Path(folder) / ADAPTER_CONFIG_FILE
    peft_config = read_lora_config(folder)
    for option, what in SERVING_UNSUPPORTED.items():
        if getattr(peft_config, option):
            raise CheckpointError(
                f"{config_file}: {what}, which serving beside other adapters does not apply; serve the merged "
                "checkpoint of `seekstack lora merge` instead"
            )
    if peft_config.trainable_token_indices and config.tie_word_embeddings:
        raise CheckpointError(
            f"{config_file}: the adapter replaces token rows (trainable_token_indices) of a base whose output head and "
            "embedding are tied (tie_word_embeddings), which serving beside other adapters does not apply; serve the "
            "merged checkpoint of `seekstack lora merge` instead"
        )
    if _residual_init(peft_config.init_lora_weights):
        raise CheckpointError(
            f"{config_file}: init_lora_weights={peft_config.init_lora_weights!r}: peft saved the adapter unconverted, "
            "for the residual base W - s B0 A0 it recomputes from the base on loading, which serving beside other "
            "adapters does not apply; save it converted to plain LoRA (peft's save_pretrained with "
            "path_initial_model_for_weight_conversion) or serve the merged checkpoint of `seekstack lora merge`"
        )
    peft_model = weightless_adapter(config, folder)
    factors = _lora_factors(peft_model)
    adapted = peft_model.get_base_model()
    routers = [name for name, _ in factors if isinstance(adapted.get_submodule(name).get_base_layer(), Router)]
    if routers:
        raise CheckpointError(
            f"{config_file}: the adapter adapts the MoE router ({', '.join(f'{name}.weight' for name in routers)}, "
            "as peft's all-linear does), which serving beside other adapters does not apply; serve the merged "
            "checkpoint of `seekstack lora merge` instead, or retrain without the routers"
        )
    return AdapterWeights(factors, _token_rows(peft_model), Path(folder))


def _residual_init(init: bool | str) -> bool:
    """Whether peft's `init_lora_weights` replaces the base weight W by a residual on loading (PiSSA, CorDA, OLoRA:
    W - s B0 A0; LoftQ: W's quantization residual), as peft does when it loads an adapter saved unconverted."""
    return isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "loftq"))


ADAPTED = (MultiLoRALinear, MultiLoRAExperts, MultiTokenRows)  # the layers a model serving adapters holds


@dataclass
class LoadedAdapters:
    """The adapters attached to a model: their folders and slots by name (slot 0, the base, has none), and the row
    selection its adapted layers read. At most `max_loras` adapters of rank <= `max_lora_rank` at once (the stacks'
    capacity, fixed: vLLM's max_loras and max_lora_rank)."""

    model: Transformer
    max_loras: int = DEFAULT_MAX_LORAS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    rows: AdapterRows = field(default_factory=AdapterRows)
    loaded_at: dict[str, int] = field(default_factory=dict)  # Unix seconds of each load; replaced as `weights`
    slots: dict[str, int] = field(default_factory=dict)
    weights: dict[str, AdapterWeights] = field(default_factory=dict)  # replaced, never changed: other threads read it
    salts: dict[int, str] = field(default_factory=lambda: {0: ""})  # per slot, what its cached values depend on
    _loads: itertools.count = field(default_factory=lambda: itertools.count(1))
    _base_versions: WeightVersions = field(init=False)  # the model's weights, as the last restack read them

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            refuse_a_non_count(name, getattr(self, name))
        # layers another LoadedAdapters adapted read its rows, never these: a second engine's rows would run with the
        # other's adapters, or fail
        adapted = next(((name, m) for name, m in self.model.named_modules() if isinstance(m, ADAPTED)), None)
        if adapted is not None and adapted[1].rows.attached():
            gc.collect()  # an engine let go of may wait in a reference cycle
        if adapted is not None and adapted[1].rows.attached():
            raise ValueError(
                f"this model already serves LoRA adapters another engine attached ({adapted[0]} is adapted), and its "
                "layers read that engine's choice of adapter for each row: build this engine on a model of its own "
                "(load it again), or unload the other engine's adapters first (engine.unload_adapter)"
            )
        self.rows.slot_count = self.max_loras + 1
        self.rows.owner = weakref.ref(self)
        self._base_versions = WeightVersions(self.model)
        if adapted is not None:  # the engine that adapted the layers is gone: they are made plain again
            self._restack()

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def folders(self) -> dict[str, Path]:
        """Each loaded adapter's folder, by name in the order they loaded."""
        return {name: read.folder for name, read in self.weights.items()}

    def folder(self, name: str) -> Path | None:
        """The folder adapter `name` loaded from, None where no adapter of that name is loaded."""
        read = self.weights.get(name)
        return None if read is None else read.folder

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (None: the base); UnknownAdapter naming the loaded ones."""
        if name is None:
            return 0
        if name not in self.slots:
            raise UnknownAdapter(f"no adapter {shown_value(name)}; loaded: {self._listed_names()}")
        return self.slots[name]

    def _listed_names(self) -> str:
        """The loaded adapters' names as an error lists them, each cut to its start where long (`shown_value`)."""
        return ", ".join(shown_value(name, str) for name in self.names) or "none"

    def cache_salt(self, slot: int) -> str:
        """What the cached keys and values of a request on `slot` depend on besides its tokens: the adapter's load."""
        return self.salts[slot]

    def select(self, slots: list[int], device: torch.device) -> None:
        """The rows' slots for the next forward; the layers' merged copies and layouts, which hold the base's weights,
        made again first where those changed in place since (a load_state_dict, an optimizer step)."""
        if self.slots and self._base_versions.changed():
            with torch.inference_mode(False):  # in a step: tensors as a load makes them, which a compiled step guards
                self._restack()
        self.rows.select(slots, device)

    def add(self, name: str, weights: AdapterWeights, replace: bool = False, requests_in_flight: int = 0) -> None:
        """Serve `weights` (`read_factors`) as adapter `name` in the lowest free slot. `replace` (vLLM's
        load_inplace): a loaded `name` takes these weights in its own slot, AdapterInUse while
        `requests_in_flight` (unfinished ones using it) > 0, as for `remove`."""
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"adapter name {shown_value(name)}: use letters, digits and . _ - : @ / + only")
        folder = weights.folder
        refuse_quantized_base(self.model, folder)
        if name in self.slots and not replace:
            raise AdapterConflict(
                f"an adapter named {shown_value(name)} is already loaded (from {self.weights[name].folder}); to "
                "replace its weights, load it with load_inplace=true"
            )
        refuse_a_rank_beyond(self.max_lora_rank, name, folder, weights.rank)
        adapted = {target for loaded in self.weights.values() for target in loaded.factors}  # their stacks exist
        new_layers = {target: factors for target, factors in weights.factors.items() if target not in adapted}
        itemsize = next(self.model.parameters()).itemsize
        refuse_stacks_past_free_memory(
            self.model.config, new_layers, self.max_loras, self.max_lora_rank, self._device_of, itemsize, adapted
        )
        if name in self.slots:
            _refuse_in_flight(name, requests_in_flight)
        taken = set(self.slots.values())
        slot = self.slots.get(name) or next((s for s in range(1, self.max_loras + 1) if s not in taken), None)
        if slot is None:
            raise ConfigError(
                f": all {self.max_loras} adapter slots are taken, so adapter {shown_value(name)} cannot load (loaded: "
                f"{self._listed_names()}); unload one first, or start the engine with a larger value",
                field="max_loras",
            )
        with self._undone_on_error():
            self.salts = {**self.salts, slot: f"{name}#{next(self._loads)}"}
            self.loaded_at = {**self.loaded_at, name: int(time.time())}  # before `weights`, which readers go by
            self.slots, self.weights = {**self.slots, name: slot}, {**self.weights, name: weights}
            self._restack()

    def _device_of(self, module_name: str) -> torch.device:
        """Where the stacks of layer `module_name` are made: beside its weight (the CPU for a part placed on disk, whose
        weights are memory-mapped)."""
        return next(self.model.get_submodule(module_name).parameters()).device

    def remove(self, name: str, requests_in_flight: int = 0) -> None:
        """Stop serving adapter `name`; AdapterInUse while `requests_in_flight` (unfinished ones using it) > 0."""
        self.slot(name)
        _refuse_in_flight(name, requests_in_flight)
        del self.salts[self.slots[name]], self.slots[name]
        self.weights = {key: value for key, value in self.weights.items() if key != name}
        self.loaded_at = {key: value for key, value in self.loaded_at.items() if key != name}
        self._restack()

    @contextmanager
    def _undone_on_error(self) -> Iterator[None]:
        """The adapters as they were, their factors laid out again, when what runs inside raises (a failed load must
        leave no entry that every later restack would fail on); what runs inside replaces the dicts, never changes
        them."""
        before = self.slots, self.weights, self.salts, self.loaded_at
        try:
            yield
        except BaseException:
            self.slots, self.weights, self.salts, self.loaded_at = before
            self._restack()
            raise

    def _restack(self) -> None:
        """Give every adapted layer the factors and rows of all loaded adapters, in stacks of the fixed capacity; a
        layer none of them adapts holds zeros while any adapter is loaded (its wrapping, and so a compiled step's
        graph, kept), and is plain again once none is."""
        slot_count, rank = self.rows.slot_count, self.max_lora_rank
        self._base_versions.mark()
        self.rows.slots_in_use = max(self.slots.values(), default=0) + 1  # eager steps compute on these slots only
        per_target: dict[Target, list[Factors | None]] = {}
        per_module: dict[str, list[TokenRows | None]] = {}
        for name, slot in self.slots.items():
            for target, factors in self.weights[name].factors.items():
                per_target.setdefault(target, [None] * slot_count)[slot] = factors
            for module_name, rows in self.weights[name].token_rows.items():
                per_module.setdefault(module_name, [None] * slot_count)[slot] = rows
        held_rows: dict[str, int] = {}  # module name -> how many rows per slot it held
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MultiTokenRows):  # unwrapped first: the LoRA layers below sit inside it
                held_rows[name] = module.token_ids.shape[1]
                self.model.set_submodule(name, module.base)
        if self.slots:  # rows no loaded adapter replaces any more stay held, as zeros, as many as before
            for name in held_rows:
                per_module.setdefault(name, [None] * slot_count)
        linears: dict[str, list[Factors | None]] = {}
        experts: dict[str, dict[str, list[Factors | None]]] = {}
        for (module_name, param_name), per_slot in per_target.items():
            if isinstance(self.model.get_submodule(module_name), RoutedExperts):
                experts.setdefault(module_name, {})[param_name] = per_slot
            else:
                linears[module_name] = per_slot
        for name, module in list(self.model.named_modules()):
            if isinstance(module, MultiLoRALinear) and name not in linears:
                if self.slots:
                    module.clear_factors()
                else:
                    self.model.set_submodule(name, module.base)
            elif isinstance(module, MultiLoRAExperts) and name not in experts:
                if self.slots:
                    module.set_factors({}, rank)
                else:
                    module.restore()
        for name, per_slot in linears.items():
            module = self.model.get_submodule(name)
            if not isinstance(module, MultiLoRALinear):
                wrapper = MultiLoRAEmbedding if isinstance(module, nn.Embedding) else MultiLoRALinear
                module = wrapper(module, self.rows)
                self.model.set_submodule(name, module)
            module.set_factors(per_slot, rank)
        for module in self.model.modules():
            if isinstance(module, FeedForward) and any(
                isinstance(getattr(module, n), MultiLoRALinear) for n in FEED_FORWARD
            ):
                MultiLoRAFeedForward.adapt(module, self.rows)
            elif isinstance(module, MultiLoRAFeedForward):
                module.restore()
        for name, per_param in experts.items():
            module = self.model.get_submodule(name)
            if not isinstance(module, MultiLoRAExperts):
                module = MultiLoRAExperts.adapt(module, self.rows)
            module.set_factors(per_param, rank)
        for name, per_slot in per_module.items():
            module = self.model.get_submodule(name)
            inner = module.base if isinstance(module, MultiLoRALinear) else module
            wrapper = MultiTokenRowsEmbedding if isinstance(inner, nn.Embedding) else MultiTokenRows
            rows = wrapper(module, self.rows)
            rows.set_rows(per_slot, held_rows.get(name, 0) if self.slots else 0)
            self.model.set_submodule(name, rows)
        for module in self.model.modules():
            if not isinstance(module, MultiHeadLatentAttention):
                continue
            if isinstance(module.kv_b_proj, MultiLoRALinear):
                MultiLoRAAttention.adapt(module)
            elif isinstance(module, MultiLoRAAttention):
                module.restore()


def _refuse_in_flight(name: str, requests_in_flight: int) -> None:
    """AdapterInUse when adapter `name` serves `requests_in_flight` > 0 unfinished requests, which an unload or a
    replacement would leave without the weights they started with."""
    if requests_in_flight:
        raise AdapterInUse(
            f"adapter {shown_value(name)} serves {requests_in_flight} unfinished request(s); unload or replace it once "
            "they are done"
        )


def adapter_folder(path: str | Path) -> Path:
    """An adapter's folder as given, a leading ~ read as the user's home, as vLLM reads a lora_path (JSON and Python
    strings have no shell to expand it); os.path's leaves ~user of no such user as it is, named as missing, where
    Path.expanduser raises RuntimeError. An empty one, which Path reads as the working directory, is refused."""
    if not os.fspath(path).strip():
        raise CheckpointError(
            f"adapter folder {os.fspath(path)!r}: a blank path (a variable left unset?); give the adapter's folder"
        )
    return Path(os.path.expanduser(path))


def refuse_a_rank_beyond(max_lora_rank: int, name: str, folder: str | Path, rank: int) -> None:
    """ConfigError of field max_lora_rank when adapter `name` (in `folder`) has a larger `rank`: the stacks' capacity,
    fixed as the engine starts. A caller names the field as its user set it (serve's --max-lora-rank)."""
    if rank > max_lora_rank:
        raise ConfigError(
            f"is {max_lora_rank}, less than the rank {rank} of adapter {shown_value(name)} ({folder}), and is fixed "
            f"as the engine starts: start it with {rank} or more",
            field="max_lora_rank",
        )


def refuse_stacks_past_free_memory(
    config: ModelConfig,
    factors: Mapping[Target, Factors],
    max_loras: int,
    max_lora_rank: int,
    device_of: Callable[[str], torch.device],
    itemsize: int,
    adapted: Collection[Target] = (),
) -> None:
    """ConfigError where what the layers adapted by `factors` hold at this capacity (`capacity_bytes`, and the merged
    copies `merged_copy_bytes` counts, none of those the layers in `adapted` hold already), and the largest layer's
    stacks once more as they are laid out, outgrow the memory free on the device they are made on (`device_of` a
    layer's module name: a placed model's are on several; torch's bare "can't allocate memory" once the weights were
    read, or the kernel's kill): of field max_lora_rank or max_loras, whichever is the more times its default.
    `itemsize`: bytes an element."""
    per_device: dict[torch.device, list[tuple[int, int]]] = {}
    for (name, _), pair in factors.items():
        held = capacity_bytes(config, name, pair, max_loras, max_lora_rank, itemsize)
        per_device.setdefault(device_of(name), []).append(held)
    merged = merged_copy_bytes(config, factors, max_loras + 1, device_of, itemsize, adapted)
    for device, held in per_device.items():
        needed = sum(copies for copies, _ in held) + max(stacks for _, stacks in held) + merged.get(device, 0)
        free = free_memory(device)
        if needed <= free:
            continue
        asked = {"max_lora_rank": (max_lora_rank, DEFAULT_MAX_LORA_RANK), "max_loras": (max_loras, DEFAULT_MAX_LORAS)}
        field = max(asked, key=lambda name: asked[name][0] / asked[name][1])
        raise ConfigError(
            f"is {asked[field][0]}: the adapted layers' stacks at that capacity ({max_loras} + 1 slots x rank "
            f"{max_lora_rank} of {len(held)} layers, with their copies for eager steps, merged ones included, x "
            f"{itemsize} bytes) take {needed} bytes, more than the {free} bytes free on {device}: start the engine "
            "with a smaller value",
            field=field,
        )


def merged_copy_bytes(
    config: ModelConfig,
    factors: Mapping[Target, Factors],
    slot_count: int,
    device_of: Callable[[str], torch.device],
    itemsize: int,
    adapted: Collection[Target] = (),
) -> dict[torch.device, int]:
    """Bytes per device of the merged copies W + B_s A_s (seekstack.adapters.multi) that the layers adapted by
    `factors` may hold for eager decode steps, with up to `slot_count` slots in use, those the layers in `adapted`
    hold already left out: a linear's own (`MultiLoRALinear.loaded_merged`; kv_b_proj's twice, as
    `MultiLoRAAttention.merged_absorbed` too; an embedding holds none), and on the CPU, where the experts kernel runs,
    a dense FFN's or shared expert's (`MultiLoRAFeedForward`: its three linears, 3 x in x out) and a MoE layer's routed
    experts' (`MultiLoRAExperts`: E x 3 x I x D). A layer holds s copies while s x its weight fits its bound, none
    past it, so at most min(slot_count, bound // weight) x weight."""
    held_already = {owner for name, _ in adapted for owner in (name, _feed_forward_of(name)) if owner is not None}
    merged: dict[str, tuple[int, int, int, bool]] = {}  # owner -> (copies a slot, weight bytes, bound, CPU alone)
    for (name, _), (lora_a, lora_b) in factors.items():
        if lora_a.dim() > 2:  # routed experts
            experts = (config.n_routed_experts or 0) * 3 * config.moe_intermediate_size * config.hidden_size
            merged[name] = (1, experts * itemsize, MERGED_EXPERTS_BYTES, True)
            continue
        weight = lora_a.shape[-1] * lora_b.shape[-2] * itemsize  # in x out
        if not name.endswith("embed_tokens"):
            merged[name] = (2 if name.endswith("kv_b_proj") else 1, weight, MERGED_LINEAR_BYTES, False)
        feed_forward = _feed_forward_of(name)
        if feed_forward is not None:
            merged[feed_forward] = (1, 3 * weight, MERGED_EXPERTS_BYTES, True)
    per_device: dict[torch.device, int] = {}
    for owner, (copies, weight, bound, cpu_alone) in merged.items():
        device = device_of(owner)
        if owner not in held_already and (device.type == "cpu" or not cpu_alone):
            per_device[device] = per_device.get(device, 0) + copies * min(slot_count, bound // weight) * weight
    return per_device


def _feed_forward_of(module_name: str) -> str | None:
    """The dense FFN or shared expert whose linear `module_name` is, None for any other layer."""
    parent, _, leaf = module_name.rpartition(".")
    return parent if leaf in FEED_FORWARD else None


def capacity_bytes(
    config: ModelConfig, module_name: str, factors: Factors, max_loras: int, max_lora_rank: int, itemsize: int
) -> tuple[int, int]:
    """(all it holds, its stacks) in bytes for the layer `module_name` adapted by `factors` at this capacity, every
    slot loaded at the largest rank. Its stacks are max_loras + 1 slots of A (..., max_lora_rank, in) and B (..., out,
    max_lora_rank) (`stack_factors`); a linear holds them twice, the second for the loaded extent eager steps read
    (`MultiLoRALinear.loaded`), and MLA's kv_b_proj twice more, as `MultiLoRAAttention`'s layouts: its weight W
    (H*(N+V), C), A's rows per head for keys and values (H, 2*S*r, C), and B again (H*(N+V), S*r)."""
    lora_a, lora_b = factors
    units = (max_loras + 1) * max_lora_rank  # S*r
    stacks = units * lora_a.shape[:-2].numel() * (lora_a.shape[-1] + lora_b.shape[-2])  # in + out, each expert's
    if lora_a.dim() > 2:  # routed experts: the stacks alone (`MultiLoRAExperts.set_factors`)
        return stacks * itemsize, stacks * itemsize
    held = stacks
    if module_name.endswith("self_attn.kv_b_proj"):
        heads, latent = config.num_attention_heads, config.kv_lora_rank
        per_head = config.qk_nope_head_dim + config.v_head_dim
        held += heads * per_head * latent + units * heads * (2 * latent + per_head)
    return 2 * held * itemsize, stacks * itemsize


def capacity(
    weights: Mapping[str, AdapterWeights], max_loras: int | None, max_lora_rank: int | None
) -> tuple[int, int]:
    """(max_loras, max_lora_rank) for adapters `weights` loaded from the start; None: the default (DEFAULT_MAX_LORAS,
    DEFAULT_MAX_LORA_RANK), or what `weights` need where that is more."""
    if max_loras is None:
        max_loras = max(DEFAULT_MAX_LORAS, len(weights))
    if max_lora_rank is None:
        max_lora_rank = max([DEFAULT_MAX_LORA_RANK, *(read.rank for read in weights.values())])
    return max_loras, max_lora_rank


# Before the weights load, the model's dtype is not known: its stacks take at least bfloat16's 2 bytes an element
FEWEST_STACK_BYTES = 2


class CheckedAdapters(dict[str, AdapterWeights]):
    """Adapters by name, read from their folders and checked before the weights load for `checked_for`: the config,
    capacity and devices `refuse_adapters_past_capacity` was asked about, which given these again for the same reads
    and checks none of them again (serve checks before opening its database, then builds the engine, which checks)."""

    def __init__(self, weights: Mapping[str, AdapterWeights], checked_for: tuple[object, ...]):
        super().__init__(weights)
        self.checked_for = checked_for


def read_adapters(
    config: ModelConfig, adapters: Mapping[str, str | Path | AdapterWeights]
) -> dict[str, AdapterWeights]:
    """Each of `adapters` read from its folder for a model with `config` (`read_factors`), those already read kept."""
    return {
        name: folder if isinstance(folder, AdapterWeights) else read_factors(config, adapter_folder(folder))
        for name, folder in adapters.items()
    }


def refuse_adapters_past_capacity(
    config: ModelConfig,
    adapters: Mapping[str, str | Path | AdapterWeights],
    max_loras: int | None,
    max_lora_rank: int | None,
    device: torch.device,
    device_map: str | None = None,
) -> CheckedAdapters:
    """Before the weights load: `adapters` read on a weightless model with `config` (`read_adapters`: a mistyped
    folder or another base's adapter is told then too), `refuse_a_rank_beyond` for each unless `max_lora_rank` is None
    (the largest rank given), and `refuse_stacks_past_free_memory` at the capacity asked, on `device` or, for a model
    placed by `device_map` (seekstack.infer.placement's text), on each layer's device (an `auto:` plan's are known
    once the weights have loaded, when each load checks them). Adapters this returned, asked about again for the same,
    are returned as they are."""
    asked = (config, max_loras, max_lora_rank, device, device_map)
    if isinstance(adapters, CheckedAdapters) and adapters.checked_for == asked:
        return adapters
    weights = CheckedAdapters(read_adapters(config, adapters), asked)
    if max_lora_rank is not None:
        for name, read in weights.items():
            refuse_a_rank_beyond(max_lora_rank, name, read.folder, read.rank)
    device_of = planned_devices(config, device_map) if device_map is not None else lambda module_name: device
    if device_of is None:
        return weights
    factors = {target: pair for read in weights.values() for target, pair in read.factors.items()}  # each layer once
    refuse_stacks_past_free_memory(
        config, factors, *capacity(weights, max_loras, max_lora_rank), device_of, FEWEST_STACK_BYTES
    )
    return weights


def attach_adapters(
    model: Transformer,
    adapters: Mapping[str, str | Path | AdapterWeights],
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
) -> LoadedAdapters:
    """Make `model` serve each adapter folder (peft format), or adapter read from one (`read_factors`), by name, per
    row; the base weights stay as they are. `max_loras`, `max_lora_rank`: the capacity for adapters loaded now and
    later (`LoadedAdapters`); None: the default (DEFAULT_MAX_LORAS, DEFAULT_MAX_LORA_RANK), or what `adapters` need
    where that is more."""
    weights = read_adapters(model.config, adapters)
    max_loras, max_lora_rank = capacity(weights, max_loras, max_lora_rank)
    loaded = LoadedAdapters(model, max_loras=max_loras, max_lora_rank=max_lora_rank)
    try:
        for name, read in weights.items():
            loaded.add(name, read)
    except BaseException:
        for name in loaded.names:  # the model plain again, as given: the caller's next engine on it is not refused
            loaded.remove(name)
        raise
    return loaded


def _token_rows(peft_model: nn.Module) -> dict[str, TokenRows]:
    """Module name -> (token ids, trained rows) for every module whose rows the adapter replaces (trainable tokens)."""
    from peft.utils.other import TrainableTokensWrapper

    return {
        name: (torch.tensor(module.token_adapter.token_indices["default"]),
               module.token_adapter.trainable_tokens_delta["default"].detach())
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, TrainableTokensWrapper)
    }  # fmt: skip


def _lora_factors(peft_model: nn.Module) -> dict[Target, Factors]:
    """(module name, parameter name) -> (A, B * alpha/r) in seekstack's layout, for every layer peft adapted."""
    from peft.tuners.lora import Embedding, Linear, ParamWrapper

    factors: dict[Target, Factors] = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, Embedding):  # A (r, vocab), B (D, r), as a linear layer's over one-hot inputs
            lora_a, lora_b = module.lora_embedding_A["default"].detach(), module.lora_embedding_B["default"].detach()
            factors[(name, "weight")] = (lora_a, lora_b * module.scaling["default"])
            continue
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
