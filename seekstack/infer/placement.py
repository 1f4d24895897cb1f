"""Where each part of a model lives: a device map over layers and their parts, planned from per-device memory
budgets, and applied with hooks that move activations to a part's device and its results back.

The parts (units) a map places: `embed_tokens`, `layers.{i}.self_attn`, `layers.{i}.mlp` (dense layers) or
`layers.{i}.mlp.shared_experts` (with the router) and `layers.{i}.mlp.experts` (routed), `mtp.{k}`, `norm`, `lm_head`.
A device is `cpu`, `cuda:N`, or `disk`: computed on the CPU from weights memory-mapped from a file (the
checkpoint's own, where `load_pretrained` mapped them; else a copy named by a hash of what it holds, which later
runs holding the same values reuse), whose pages the OS reads in on use and may drop again. This is the DeepSeek
deployment's [CPU] -> [GPU1] -> [GPU2] -> [CPU] pipeline when blocks go to different devices, and KTransformers'
split when routed experts stay on the CPU.

Written as `pattern=device` entries separated by commas, later entries overriding earlier ones; a pattern's
dot-separated components match a unit's leading ones, each literally, by `*`, or by an inclusive range `a-b`:
`*=cuda:0,layers.*.mlp.experts=cpu` or `embed_tokens=cpu,layers.0-13=cuda:0,layers.14-26=cuda:1,norm=cpu,lm_head=cpu`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seekstack.atomic import WriteRefused, delete_unless_locked, hidden_pattern, same_file, staged_files
from seekstack.checkpoint import MappedCopy, checkpoint_key, layer_key
from seekstack.checkpoint.fp8 import _is_fp8_quantizable, fp8_scale_shape
from seekstack.checkpoint.keys import KEPT_FLOAT, STACKED_EXPERT_PARTS
from seekstack.compress.linear import QuantizedWeight
from seekstack.config import ModelConfig
from seekstack.infer.params import parse_bytes
from seekstack.model.moe import MoE, RoutedExperts
from seekstack.model.transformer import Transformer

DISK = "disk"
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}  # an offload folder this process may not write in
COPY_DIGEST_CHARS = 16  # hex digits of a disk copy's SHA-256 in its file name (`_mapped_copy`)


# ---------------------------------------------------------------------------------------- units and maps
def units(model: Transformer) -> dict[str, nn.Module]:
    """The placeable parts of `model`, by name, in the order a forward runs them."""
    parts: dict[str, nn.Module] = {"embed_tokens": model.embed_tokens}
    for i, block in enumerate(model.layers):
        parts[f"layers.{i}.self_attn"] = block.self_attn
        if isinstance(block.mlp, MoE):
            if block.mlp.shared_experts is not None:
                parts[f"layers.{i}.mlp.shared_experts"] = block.mlp.shared_experts
            parts[f"layers.{i}.mlp.experts"] = block.mlp.experts
        else:
            parts[f"layers.{i}.mlp"] = block.mlp
    parts.update({f"mtp.{k}": module for k, module in enumerate(model.mtp)})
    parts["norm"], parts["lm_head"] = model.norm, model.lm_head
    return parts


def parse_device_map(text: str, names: list[str]) -> dict[str, str]:
    """The device of every unit in `names` from `pattern=device` entries; ValueError naming an entry that matches
    nothing (but an MTP entry where `names` hold no MTP module), a bad device, or a unit no entry places."""
    placement: dict[str, str] = {}
    for entry, pattern, device in _entries(text):
        matched = [name for name in names if _matches(pattern, name)]
        if not matched and pattern.startswith("mtp.") and not any(name.startswith("mtp.") for name in names):
            continue  # a plan's MTP entry, for a model loaded without its MTP module (no speculative decoding)
        if pattern in WEIGHTLESS_MODULES:
            continue  # in a map transformers wrote (model.hf_device_map): nothing to place here
        if not matched:
            parts = ", ".join(pattern for pattern, _ in _ranged(dict.fromkeys(names, "")))
            raise ValueError(f"device map entry {entry!r} matches no part of the model; each is placed whole: {parts}")
        placement.update(dict.fromkeys(matched, device))
    missing = [name for name in names if name not in placement]
    if missing:
        unplaced = ", ".join(pattern for pattern, _ in _ranged(dict.fromkeys(missing, "")))
        raise ValueError(f"the device map places no device for {unplaced}: add an entry for each, or *=device first")
    return {name: placement[name] for name in names}


def device_name(text: str, where: str) -> str:
    """The device `text` names, written one way: `cpu`, `disk` or `cuda:N` (`cuda` is cuda:0, a bare `N` cuda:N, as
    accelerate's max_memory={0: "10GiB"} and device_map={"": 0} take a GPU; `cpu:N` the CPU, as torch reads it), in
    any case; ValueError starting with `where` (the entry it came from) for anything else, such as gpu, mps or meta."""
    name = text.strip().lower()
    kind, colon, index = name.partition(":")
    if name in ("cpu", DISK):
        return name
    if kind == "cpu" and index.isdigit():
        return kind
    if kind == "cuda" and (not colon or index.isdigit()):
        return f"cuda:{int(index or 0)}"
    if name.isdigit():
        return f"cuda:{int(name)}"
    raise ValueError(f"{where}: {text.strip()!r} is not cpu, disk, cuda:N or a GPU number N")


def named_devices(text: str) -> list[str]:
    """The devices device map `text` names (`pattern=device` entries, or `auto:` and budgets), as `device_name` writes
    them, disk among them where named; ValueError naming an entry that names no device."""
    if text.startswith("auto:"):
        return list(parse_budgets(text.removeprefix("auto:")))
    return [device for _, _, device in _entries(text)]


# transformers' modules that hold no weights, which its device maps place all the same: DeepseekV3RotaryEmbedding
# (model.rotary_emb), whose tables here stay on the CPU with the norms
WEIGHTLESS_MODULES = ("rotary_emb",)
ACCELERATE_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # its device_map= plans from free memory


def _entries(text: str) -> list[tuple[str, str, str]]:
    """Each entry of device map `text` with its pattern and device (as `device_name` writes it): `pattern=device`, or
    a device alone for the whole model (`*=device`, as transformers' device_map="cuda:0"); ValueError naming an entry
    that is neither, and accelerate's device_map="auto" (or another of its strategies), which needs budgets here."""
    entries = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        pattern, equals, device = entry.partition("=")
        if entry.lower() in ACCELERATE_STRATEGIES:
            raise ValueError(
                f"device map {entry!r}: seekstack plans within the budgets you give, not from free memory as "
                "accelerate's: auto:cuda:0=70GiB,cpu=100GiB (its max_memory; `seekstack plan` shows the placement), "
                "or pattern=device entries"
            )
        if not equals:
            try:
                entries.append((entry, "*", device_name(entry, f"device map entry {entry!r}")))
            except ValueError:
                raise ValueError(
                    f"device map entry {entry!r}: expected pattern=device, e.g. layers.*.mlp.experts=cpu, or a device "
                    "alone for the whole model"
                ) from None
        elif not device.strip():
            raise ValueError(f"device map entry {entry!r}: expected pattern=device, e.g. layers.*.mlp.experts=cpu")
        else:  # accelerate's "" is the whole model, its module names transformers' (model.layers.3; model: its base)
            pattern = pattern.strip().removeprefix("model.") or "*"
            entries.append((entry, pattern, device_name(device, f"device map entry {entry!r}")))
    return entries


def device_map_text(
    device_map: str | int | torch.device | Mapping[str, str | int | torch.device] | None,
    max_memory: Mapping[str | int, str | int] | None = None,
) -> str:
    """A device map as text: as given, a device alone (transformers' device_map=0 or torch.device("cuda:0")), or
    accelerate's dict of module names and devices ({"": 0}, {"model.layers.0": "cpu", ...}) as `name=device`
    entries; accelerate's device_map="auto" (or "sequential") with its `max_memory` ({0: "10GiB", "cpu": "30GiB"})
    as `auto:` and those budgets, filled in order as its "sequential" fills them; TypeError for another, ValueError
    for a max_memory beside any other map or none (device_map None), and for accelerate's strategies without one."""
    if max_memory is not None:
        if device_map not in ("auto", "sequential"):
            raise ValueError(
                f"max_memory is given with device_map={device_map!r}: it holds the budgets of device_map='auto' (or "
                "'sequential'), planned within them; give one of those, or leave max_memory out"
            )
        return "auto:" + ",".join(f"{device}={size}" for device, size in max_memory.items())
    if isinstance(device_map, str) and device_map.strip().lower() in ACCELERATE_STRATEGIES:
        raise ValueError(  # the text's refusal (`_entries`) names auto:'s budgets, which no keyword here writes
            f"device_map={device_map!r} without max_memory: seekstack plans within the budgets you give, not from "
            "free memory as accelerate's: give device_map='auto' with max_memory={0: '70GiB', 'cpu': '100GiB'} "
            "(`seekstack plan` shows the placement), or the device of each part ({'': 'cpu', 'lm_head': 'disk'})"
        )
    if isinstance(device_map, Mapping):
        return ",".join(f"{name}={device}" for name, device in device_map.items())
    if isinstance(device_map, torch.device):
        return str(device_map)
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int)):
        raise TypeError(
            f"device_map {device_map!r}: give pattern=device text, a device (cpu, cuda:0, 0, torch.device) or a dict "
            "of them, as accelerate's {module name: device}"
        )
    return str(device_map)


def _matches(pattern: str, name: str) -> bool:
    wanted, parts = pattern.split("."), name.split(".")
    if wanted == ["*"]:
        return True
    if wanted == ["model"]:  # transformers' base model (DeepseekV3Model, accelerate's "model"): all but the head
        return name != "lm_head"
    if len(wanted) > len(parts):
        return False
    for want, part in zip(wanted, parts, strict=False):
        low, dash, high = want.partition("-")
        if want == "*" or want == part:
            continue
        if dash and low.isdigit() and high.isdigit() and part.isdigit() and int(low) <= int(part) <= int(high):
            continue
        return False
    return True


def format_device_map(placement: dict[str, str]) -> str:
    """`placement` as device map text, a part of consecutive layers on one device written as one range."""
    return ",".join(f"{pattern}={device}" for pattern, device in _ranged(placement))


def disk_parts_note(device_map: str | None, model: nn.Module) -> str | None:
    """The note a command prints on stderr where `--device-map auto:...` put parts of `model` (placed by `place`) on
    disk, those its budgets hold nowhere: they run from there, read in as each step needs them, where accelerate's
    plan would stop to ask for an offload folder. None for another map, or one that put nothing on disk."""
    if device_map is None or not device_map.startswith("auto:"):
        return None
    placement = getattr(model, "placement", None) or {}
    on_disk = {part: device for part, device in placement.items() if device == DISK}
    if not on_disk:
        return None
    return (
        f"note: --device-map {device_map} puts {len(on_disk)} part(s) on disk, which fit in none of its budgets: "
        f"{format_device_map(on_disk)}; they are read from disk as each step runs them (raise a budget to hold them "
        "in memory)"
    )


def _ranged(placement: dict[str, str]) -> list[tuple[str, str]]:
    """`placement`'s parts as patterns with their devices, a part of consecutive layers on one device as one range."""
    entries, runs = [], {}  # runs: part -> [first layer, last layer, device] for each run
    for name, device in placement.items():
        pieces = name.split(".")
        if pieces[0] != "layers":
            entries.append((name, device))
            continue
        layer, part_runs = int(pieces[1]), runs.setdefault(".".join(pieces[2:]), [])
        if part_runs and part_runs[-1][1:] == [layer - 1, device]:
            part_runs[-1][1] = layer
        else:
            part_runs.append([layer, layer, device])
    for part, part_runs in runs.items():
        for first, last, device in part_runs:
            layers = str(first) if first == last else f"{first}-{last}"
            entries.append((f"layers.{layers}.{part}", device))
    return entries


# ---------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """A placement with what it costs: bytes resident and bytes read per decoded token, per device."""

    placement: dict[str, str]
    resident_bytes: dict[str, int]
    active_bytes: dict[str, int]  # weight bytes one token reads (routed experts: K of E)
    unplaced_bytes: int  # of the CPU's both, the norms and routers no unit holds: on the CPU whatever the budgets

    def device_map(self) -> str:
        return format_device_map(self.placement)

    def overruns(self, budgets: dict[str, int]) -> dict[str, int]:
        """The bytes each device holds past its budget: only the CPU's can, the norms and routers no unit holds
        staying there whatever its budget."""
        return {device: self.resident_bytes[device] - budget for device, budget in budgets.items()
                if self.resident_bytes[device] > budget}  # fmt: skip


def plan_placement(config: ModelConfig, budgets: dict[str, int], tensor_bytes: dict[str, int]) -> Plan:
    """Place every unit of `config`'s model within `budgets` (device -> bytes, in order of preference, fastest
    first; the CPU also holds the norms and routers), priced by `tensor_bytes` (what each tensor takes, by checkpoint
    key: `model_tensor_bytes`, `stored_tensor_bytes` of a checkpoint on disk, or `tensor_bytes_at_width`), without
    materialising a weight (meta device). Units that read the most of their bytes per token go first (attention,
    dense and shared FFNs, the head, then routed experts, then the embedding, of which a token reads one row), each
    on the first device with room; what fits nowhere goes to `disk`."""
    with torch.device("meta"):
        model = Transformer(config)
    layers = config.num_hidden_layers
    unit_of = {layer_key(name, layers): name for name in units(model)}
    routed_of = {layer_key(name, layers): name for name, m in model.named_modules() if isinstance(m, RoutedExperts)}
    held, routed = dict.fromkeys(unit_of.values(), 0), dict.fromkeys(unit_of.values(), 0)
    for key, size in tensor_bytes.items():
        unit = _owner(key, unit_of)
        if unit is not None:
            held[unit] += size
        if unit is not None and _owner(key, routed_of) is not None:
            routed[unit] += size
    sized = {name: (held[name], _read_per_token(name, held[name], routed[name], config)) for name in held}
    order = sorted(sized, key=lambda name: -sized[name][1] / max(sized[name][0], 1))  # stable: model order in ties
    # What no unit holds (the blocks' norms, the routers) stays on the CPU with the activations, and runs every token.
    rest = sum(tensor_bytes.values()) - sum(held.values())
    room, placement = dict(budgets), {}
    room["cpu"] = room.get("cpu", 0) - rest
    for name in order:
        size = sized[name][0]
        device = next((d for d, free in room.items() if free >= size), DISK)
        if device != DISK:
            room[device] -= size
        placement[name] = device
    placement = {name: placement[name] for name in sized}
    resident = {device: 0 for device in [*budgets, "cpu", DISK]}
    active = dict(resident)
    for name, device in placement.items():
        resident[device] += sized[name][0]
        active[device] += sized[name][1]
    resident["cpu"] += rest
    active["cpu"] += rest
    return Plan(placement, resident, active, rest)


def _owner(key: str, owners: dict[str, str]) -> str | None:
    """The name `owners` gives the shortest dotted prefix of `key` it holds, or None."""
    parts = key.split(".")
    return next((owners[p] for i in range(1, len(parts)) if (p := ".".join(parts[:i])) in owners), None)


def _read_per_token(name: str, held: int, routed: int, config: ModelConfig) -> int:
    """The bytes one token reads of unit `name`, which holds `held` bytes, `routed` of them routed experts: K of
    their E experts, and one row of the embedding."""
    if name == "embed_tokens":
        return held // config.vocab_size
    return int(held - routed * (1 - config.num_experts_per_tok / config.n_routed_experts))


def model_tensor_bytes(model: nn.Module) -> dict[str, int]:
    """The bytes each parameter and buffer of loaded `model` holds (a tied one once), by checkpoint key."""
    layers = model.config.num_hidden_layers
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return {checkpoint_key(name, layers): tensor.numel() * tensor.element_size() for name, tensor in tensors}


def tensor_bytes_at_width(
    config: ModelConfig, bytes_per_param: float, fp8_block: tuple[int, int] | None = None
) -> dict[str, int]:
    """The bytes each parameter of `config`'s model takes stored at `bytes_per_param`, by checkpoint key: a plan for
    a width rather than for weights at hand (meta device). With `fp8_block`, what loading DeepSeek's FP8 release
    layout holds: the projections it quantizes (routed experts too) in e4m3 with a float32 scale per block, the rest
    (embedding, head, norms, routers, MTP's eh_proj, and kv_b_proj, which loading expands) at `bytes_per_param`."""
    with torch.device("meta"):
        model = Transformer(config)
    sizes = {}
    for name, parameter in model.named_parameters():
        key = checkpoint_key(name, config.num_hidden_layers)
        parts = STACKED_EXPERT_PARTS.get(key.rpartition(".")[2]) if ".mlp.experts." in key else None
        in_fp8 = fp8_block is not None and (parts or _is_fp8_quantizable(key, parameter)) and KEPT_FLOAT not in key
        if in_fp8:
            scales = math.prod(fp8_scale_shape(tuple(parameter.shape), fp8_block, parts or 1))  # type: ignore[arg-type]
            sizes[key] = parameter.numel() + scales * torch.float32.itemsize
        else:
            sizes[key] = int(parameter.numel() * bytes_per_param)
    return sizes


def parse_budgets(text: str) -> dict[str, int]:
    """`cuda:0=80GiB,cpu=20GiB` as {device: bytes}, the order a plan fills them in: the GPUs in the order given, then
    the CPU wherever it was given (as accelerate's max_memory), devices written as `device_name` writes them;
    ValueError naming a bad entry: an unknown device, a bad size, a device named twice (`cuda` and `cuda:0`)."""
    budgets, entries = {}, {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        device, _, amount = entry.partition("=")
        if device.strip().lower() == DISK:  # accelerate's max_memory takes a "disk" entry
            raise ValueError(
                f"memory entry {entry!r}: disk takes no budget: the parts that fit in none of the others go to disk; "
                "leave it out"
            )
        if not amount:
            raise ValueError(f"memory entry {entry!r}: expected device=size, e.g. cuda:0=80GiB")
        device = device_name(device, f"memory entry {entry!r}")
        if device in budgets:  # the later budget would silently replace the first
            raise ValueError(
                f"memory entry {entry!r}: {device} named twice (also in {entries[device]!r}); give each device one "
                "budget"
            )
        entries[device] = entry
        try:
            budgets[device] = parse_bytes(amount)
        except ValueError as error:
            raise ValueError(f"memory entry {entry!r}: {error}") from None
    if not budgets:  # everything would go to disk
        raise ValueError(
            f"memory budgets {text!r}: none given; expected device=size entries, e.g. cuda:0=80GiB,cpu=20GiB"
        )
    return dict(sorted(budgets.items(), key=lambda budget: budget[0] == "cpu"))  # a GPU before the CPU, always


def device_map_for(model: Transformer, text: str) -> dict[str, str]:
    """The placement `text` asks for: `pattern=device` entries, or `auto:` and budgets planned by `plan_placement`."""
    if text.startswith("auto:"):
        budgets = parse_budgets(text.removeprefix("auto:"))
        return plan_placement(model.config, budgets, model_tensor_bytes(model)).placement
    return parse_device_map(text, list(units(model)))


def planned_devices(config: ModelConfig, device_map: str) -> Callable[[str], torch.device] | None:
    """Before the weights load, the device each module of a model with `config` placed by `device_map` will hold its
    weights on, by module name: its unit's (the CPU for a unit on disk, whose weights are memory-mapped, and for a
    module of no unit); None for an `auto:` map, planned from the loaded weights' bytes. MTP modules are left out (a
    load without drafts has none, and no adapter adapts one: seekstack.adapters.peft_targets): the CPU is said of them
    even where a load with drafts places them elsewhere."""
    if device_map.startswith("auto:"):
        return None
    with torch.device("meta"):
        names = [name for name in units(Transformer(config)) if not name.startswith("mtp.")]
    placement = parse_device_map(device_map, names)

    def device_of(module_name: str) -> torch.device:
        unit = next((name for name in placement if module_name == name or module_name.startswith(name + ".")), None)
        device = placement.get(unit, "cpu") if unit is not None else "cpu"
        return torch.device("cpu" if device == DISK else device)

    return device_of


# ---------------------------------------------------------------------------------------- applying
def place(model: Transformer, placement: dict[str, str], offload_dir: str | Path | None = None) -> Transformer:
    """Move each unit of `model` to its device (`disk`: its weights memory-mapped, from the checkpoint where they
    already are, else copied under `offload_dir` unless a copy of the same values is there, and mapped back) and
    hook it so that its inputs move to it and its outputs back. Everything else (norms of the blocks, rotary tables)
    stays on the CPU, where the cache plan and the sampler run."""
    parts = units(model)
    unknown = set(placement) ^ set(parts)
    if unknown:
        raise ValueError(f"the placement does not match the model's parts: {sorted(unknown)[:3]}")
    check_reachable(set(placement.values()))
    model.to("cpu")
    for name, module in parts.items():
        device = placement[name]
        if device == DISK:
            if offload_dir is None:
                raise ValueError(f"{name} is placed on disk: give an offload directory for its memory-mapped weights")
            _memory_map(module, Path(offload_dir) / name)
        else:
            module.to(device)
            if torch.device(device) != torch.device("cpu"):
                module.register_forward_pre_hook(_inputs_to(torch.device(device)), with_kwargs=True)
                module.register_forward_hook(_outputs_to(torch.device("cpu")))
    model.placement = dict(placement)
    return model


def check_reachable(devices: Iterable[str]) -> None:
    """ValueError naming the first of `devices` (`device_name`s; disk is the CPU's files) that this torch cannot
    reach: a GPU this machine lacks, or a torch built without CUDA."""
    for device in sorted(set(devices) - {DISK}):
        reason = unreachable_reason(device)
        if reason is not None:
            raise ValueError(f"the placement puts parts on {device}, which this torch cannot reach ({reason})")


def resolve_device(device: torch.device | str | int) -> str:
    """The device a whole model runs on for `device` (`--device`, Engine's device=), named as `device_name` names it:
    auto is cuda:0 where torch reaches a GPU, else cpu, an int N cuda:N; ValueError, its text to follow the value, for
    one that is no such device (disk, meta, mps) or that this torch cannot reach."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        name = device_name(str(device), "device")  # a torch.device by its text: cpu, cuda:N
    except ValueError:
        name = None
    if name in (None, DISK):  # disk holds a device map's weights; nothing runs there
        raise ValueError("give cpu, cuda, cuda:N or auto")
    reason = unreachable_reason(name)
    if reason is not None:
        raise ValueError(f"torch cannot reach {name} here ({reason})")
    return name


def runtime_device(device: torch.device | str | int) -> torch.device:
    """The device an engine runs on for `device`, as `--device` reads it (`resolve_device`: auto, cpu, cuda, cuda:N
    or N, in any case); ValueError naming `device` where it is none of them or one torch cannot reach, before any
    weight is read or moved."""
    try:
        return torch.device(resolve_device(device))
    except ValueError as error:
        raise ValueError(f"device={device!r}: {error}") from None


def unreachable_reason(device: str) -> str | None:
    """Why this torch cannot reach `device` (a `device_name` but disk), in torch's words; None where it can."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # no such device here, or a torch built without its kind
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def layer_devices(model: Transformer) -> list[torch.device]:
    """The device of each cache layer (main layers, then MTP): where that layer's attention runs."""
    blocks = [*model.layers, *(mtp.block for mtp in model.mtp)]
    return [block.self_attn.kv_a_layernorm.weight.device for block in blocks]


def offload_while_loading(device_map: str, offload_dir: str | Path) -> Callable[[Transformer], dict[str, MappedCopy]]:
    """What `load_pretrained(offload=...)` takes for a model to be placed by `device_map`: for each tensor of a part
    it puts on disk, the function that writes the tensor's copy under `offload_dir` piece by piece as the checkpoint
    is read and maps it (`_mapped_copy`), so the disk parts are never held in memory whole."""

    def copies(model: Transformer) -> dict[str, MappedCopy]:
        placement = device_map_for(model, device_map)
        return {
            f"{unit}.{name}": functools.partial(_mapped_copy, directory=Path(offload_dir) / unit, name=name)
            for unit, module in units(model).items()
            if placement[unit] == DISK
            for name, _ in _unit_tensors(module)
        }

    return copies


def _unit_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return itertools.chain(module.named_parameters(), module.named_buffers())


def _memory_map(module: nn.Module, directory: Path) -> None:
    """Swap in memory-mapped views of the unit's tensors: those `load_pretrained` mapped from the checkpoint or wrote
    to disk stay as they are; the others are mapped from copies under `directory` (`_mapped_copy`), and the
    quantized weights' kernels bound to them (their per-expert views would still read the tensors they replace)."""
    for name, tensor in _unit_tensors(module):
        if mapped_file(tensor) is None:
            tensor.data = _mapped_copy(tensor, lambda whole=tensor: (whole,), directory, name)
    for weight in module.modules():
        if isinstance(weight, QuantizedWeight):
            weight.bind_operands()


def _mapped_copy(
    tensor: torch.Tensor, pieces: Callable[[], Iterable[torch.Tensor]], directory: Path, name: str
) -> torch.Tensor:
    """A tensor of `tensor`'s dtype and shape holding the values `pieces` gives (in memory order, one piece at a
    time), memory-mapped from its raw copy `directory/{name}.{digest}.bin`, the digest a hash of its dtype, shape and
    bytes: a copy an earlier run wrote is reused when its name and size match (its contents are not read back), and
    writing a new one (atomically) deletes the copies of `name` that hold other values (another dtype, weights since
    changed) unless another process is mapping them. Written again when another process deleted it first. The pieces
    are given once: hashed as they are written, or, where a copy of `name` of this size may be reused, hashed first
    (and given again only to write a copy of other values)."""
    size = tensor.numel() * tensor.element_size()
    mapped = None
    if _has_copy_of_size(directory, name, size):
        digest = _digest_of(tensor)
        for piece in pieces():
            digest.update(_raw(piece))
        mapped = _map_whole_copy(_copy_path(directory, name, digest), tensor)
    while mapped is None:
        mapped = _map_whole_copy(_write_copy(tensor, pieces, directory, name), tensor)
    return mapped


def _digest_of(tensor: torch.Tensor) -> Any:
    """The hash naming a copy of `tensor`, begun with its dtype and shape; its bytes are to be added."""
    return hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())


def _copy_path(directory: Path, name: str, digest: Any) -> Path:
    return directory / f"{name}.{digest.hexdigest()[:COPY_DIGEST_CHARS]}.bin"


def _copy_pattern(name: str) -> str:
    """A regular expression matching the names of tensor `name`'s copies (and `{name}.bin`, from before copies were
    named by their digest)."""
    return rf"{re.escape(name)}(\.[0-9a-f]{{{COPY_DIGEST_CHARS}}})?\.bin"


def _has_copy_of_size(directory: Path, name: str, size: int) -> bool:
    """Whether `directory` holds a copy of tensor `name` of `size` bytes: one an earlier run may have written."""
    copy = re.compile(_copy_pattern(name))
    for entry in directory.iterdir() if directory.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by another process's `_delete_copies`
            if copy.fullmatch(entry.name) and entry.stat().st_size == size:
                return True
    return False


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of `tensor` in memory order."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()


def _map_whole_copy(path: Path, tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor`'s copy at `path` memory-mapped, or None when there is none of its size. A shared lock held from
    before the copy is found until it is mapped keeps another process's `_delete_copies` from deleting it in
    between; once mapped, it may go: a mapping outlives the file's name."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with contextlib.suppress(OSError):  # a file system without flock: nothing to hold off
            fcntl.flock(descriptor, fcntl.LOCK_SH)
        whole = same_file(path, descriptor) and os.fstat(descriptor).st_size == tensor.numel() * tensor.element_size()
        if not whole:  # absent, cut short, or deleted (or replaced) before it was locked
            return None
        return torch.from_file(str(path), shared=False, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
    finally:
        os.close(descriptor)


def _write_copy(tensor: torch.Tensor, pieces: Callable[[], Iterable[torch.Tensor]], directory: Path, name: str) -> Path:
    """Write the copy of `tensor` (state-dict name `name`) holding the values `pieces` gives, one after the other, in
    `directory` atomically, hashing them as they are written: it takes the name their digest gives once whole
    (replacing a copy of that name, which holds the same values), and the other copies of `name` are deleted
    (`_delete_copies`); returns its path. An error the offload folder's storage gives is said in its words
    (`_offload_refusal`)."""
    digest, unnamed, size, written = _digest_of(tensor), f"{name}.bin", tensor.numel() * tensor.element_size(), 0
    try:
        with staged_files(directory) as staged:
            with staged.path(unnamed).open("wb") as file:
                for piece in pieces():
                    raw = memoryview(_raw(piece))
                    digest.update(raw)
                    written += file.write(raw)
            if written != size:  # a copy never whole would be written again and again
                raise ValueError(
                    f"{name}: its parts in the checkpoint hold {written:,} B, where the {tuple(tensor.shape)} "
                    f"{tensor.dtype} tensor the model holds takes {size:,} B: they do not match it (experts stored in "
                    "different formats or group sizes?)"
                )
            path = _copy_path(directory, name, digest)
            staged.rename(unnamed, path.name)
        _delete_copies(directory, name, keep=path.name)
    except OSError as error:
        refusal = _offload_refusal(directory / unnamed, size, error)
        if refusal is None:
            raise
        raise refusal from error
    return path


class OffloadRefused(WriteRefused):
    """An offload folder the copies of the parts placed on disk cannot be written in. The message says to choose
    another with `Engine.from_pretrained`'s (and `EngineOptions`') `offload_dir=` (or the `parameter` the caller
    gave, such as transformers' `offload_folder=`: `named`); `for_command` says it with the commands'
    `--offload-dir` (`seekstack.cli.common.user_errors` reports it so)."""

    def __init__(self, problem: str, error_number: int | None, parameter: str = "offload_dir") -> None:
        super().__init__(f"{problem} {parameter}=")
        self.problem, self.errno, self.for_command = problem, error_number, f"{problem} --offload-dir"

    def named(self, parameter: str) -> OffloadRefused:
        """This refusal naming `parameter`, the keyword the caller chose the folder with."""
        return OffloadRefused(self.problem, self.errno, parameter)


def _offload_refusal(path: Path, size: int, error: OSError) -> OffloadRefused | None:
    """What writing the copy of `size` bytes at `path` met, said for the user: an offload folder this process may not
    write in, or a disk that refuses the copy (full, a file size limit); None for anything else."""
    offload_dir, reason = path.parent.parent, os.strerror(error.errno) if error.errno else str(error)
    if error.errno in UNWRITABLE:
        problem = (
            f"{offload_dir}: the copies of the parts placed on disk go in this offload folder, which cannot be "
            f"written ({reason}); choose another with"
        )
    elif isinstance(error, WriteRefused):
        problem = (
            f"{path}: the disk copy of this tensor ({size:,} B) was not written ({reason}): the disk of the offload "
            f"folder {offload_dir} is full or refuses a file this large; free room there or choose another folder with"
        )
    else:
        return None
    return OffloadRefused(problem, error.errno)


def _delete_copies(directory: Path, name: str, keep: str) -> None:
    """Delete the copies of tensor `name` in `directory` but `keep` (those named `{name}.bin` too, from before copies
    were named by their digest) and the hidden parts of those whose writer was killed, listing it once; never a copy
    another process is mapping (`_map_whole_copy` holds it locked) nor its write under way."""
    copy = _copy_pattern(name)
    stale = re.compile(rf"{copy}|{hidden_pattern(copy)}")
    for entry in directory.iterdir():
        if entry.name != keep and stale.fullmatch(entry.name):
            delete_unless_locked(entry)


def mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose memory-mapped pages hold `tensor` (from /proc/self/maps; Linux), or None for memory of its own."""
    maps = Path("/proc/self/maps")
    if tensor.device.type != "cpu" or not maps.exists():
        return None
    address = tensor.data_ptr()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def _moved(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (in tuples, lists, dicts and dataclasses) on `device`. A copy to the CPU
    waits for its data (a non-blocking one from a GPU returns before it arrives, and the CPU parts read it at once);
    one to a GPU need not, being ordered on that GPU's stream before the kernels that read it."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=device.type != "cpu")
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _moved(getattr(value, f.name), device) for f in dataclasses.fields(value)}
        )
    return value


def _inputs_to(device: torch.device):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _moved(args, device), _moved(kwargs, device)

    return hook


def _outputs_to(device: torch.device):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _moved(output, device)

    return hook
