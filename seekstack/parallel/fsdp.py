"""FSDP2 (ZeRO-3) applied from outside the model, as torchtitan does, and its sharded checkpoints.

`fully_shard` each decoder block (main and MTP) and then the root: parameters, gradients and optimizer state
are split over the ranks; a block's parameters are all-gathered just before it runs and freed after it, and
gradients are reduce-scattered (averaged) as the backward pass leaves each block. On CUDA with
dtype=bfloat16 the gathered parameters and the reduction run in bf16/float32 (`MixedPrecisionPolicy`); on a
CPU the trainer's autocast does the mixed precision instead. Optimizer state is saved with
`torch.distributed.checkpoint` (one file per rank, resharded on load, so a run saved at N ranks resumes at M).
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, Metadata
from torch.distributed.checkpoint import metadata as metadata_classes
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from seekstack.checkpoint.keys import CheckpointError, refused_global
from seekstack.model.transformer import Transformer
from seekstack.parallel.distributed import Ranks
from seekstack.parallel.parallelize import decoder_blocks
from seekstack.schema import ConfigError

METADATA_FILE = ".metadata"  # where torch.distributed.checkpoint's FileSystemWriter says what each shard file holds


def apply_fsdp(
    model: Transformer,
    ranks: Ranks,
    bfloat16: bool = False,
    cpu_offload: bool = False,
    ignored: set[nn.Parameter] | None = None,
) -> None:
    """Shard `model` over all ranks: each main and MTP decoder block, then the root (embeddings, norms, head,
    MTP projections: the root's parameters stay gathered through its forward, where the MTP head reads them).
    `cpu_offload` keeps the shards in CPU memory between a GPU's uses of them; ConfigError on a CPU run."""
    require_offload_device(cpu_offload, ranks.device)
    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    bf16_on_cuda = bfloat16 and ranks.device.type == "cuda"
    options: dict[str, Any] = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_on_cuda
        else MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
        ignored_params=ignored,  # expert-parallel experts: already split over the ranks
    )
    for block in decoder_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


def require_offload_device(cpu_offload: bool, device: torch.device) -> None:
    """ConfigError where cpu_offload=true is asked of a run that is not on a GPU."""
    if cpu_offload and device.type != "cuda":
        raise ConfigError(
            f"cpu_offload=true keeps FSDP's shards in CPU memory for a GPU run; this run is on {device.type}, "
            "where they are in CPU memory already: set cpu_offload=false"
        )


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict gathered on rank 0 (on the CPU); empty on the other ranks. All ranks call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shard of the optimizer state into `directory` (all ranks call it). A rank's write that
    fails (its disk full) raises its error on every rank, where torch raised a CheckpointException, a BaseException
    no handler of a refused write catches."""
    try:
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory)
    except CheckpointException as error:  # raised alike on every rank, with every rank's failure
        failure, _ = error.failures[min(error.failures)]
        raise failure from None


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Fill `optimizer` from a saved state written at any number of ranks (resharded to this run's, or to one
    process); CheckpointError naming what could not be read (its .metadata or a shard missing, cut short), on every
    rank."""
    metadata = read_metadata(directory)  # before torch, which logs two tracebacks of a missing one as it falls back
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():  # alone, torch warns that it assumes what we mean: to load in a single process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            dcp.load(state, storage_reader=MetadataReader(directory), planner=WeightsOnlyLoadPlanner(directory))
        except CheckpointException as error:  # raised alike on every rank, with every rank's failure
            raised = [failure for failure, _ in error.failures.values()]
            unsafe = next((failure for failure in raised if isinstance(failure, UnsafeState)), None)
            if unsafe is not None:
                raise CheckpointError(f"{unsafe}; it was not written by seekstack, or altered since") from None
            failures = cut_short_shards(directory, metadata) or [str(failure) for failure in raised]
            raise unreadable_state(directory, failures) from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def read_metadata(directory: Path) -> Metadata:
    """The `.metadata` of the sharded state in `directory` (what each shard file holds, and where)."""
    try:
        return MetadataReader(directory).read_metadata()
    except UnsafeState as error:
        raise CheckpointError(f"{error}; it was not written by seekstack, or altered since") from None
    except Exception as error:  # missing, or cut short (pickle's error names no file)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise unreadable_state(directory, [f"{directory / METADATA_FILE}: {reason}"]) from None


class UnsafeState(pickle.UnpicklingError):
    """A file of a sharded state holding an object no torch.distributed.checkpoint save writes, which would run code
    as it loads."""


def unsafe_state(file: Path, unsafe: str) -> UnsafeState:
    """The error for `file`, holding the object `unsafe` names."""
    return UnsafeState(
        f"{file}: holds a Python object of {unsafe}, which no torch.distributed.checkpoint save writes and which "
        "loading would run: refused"
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Makes only what a torch.distributed.checkpoint save pickles into `.metadata`: its metadata classes, torch's
    sizes, dtypes and layouts, paths (torch's reader unpickles whatever the file holds, running its code)."""

    SAVED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    SAVED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    SAVED |= {(module, "PosixPath") for module in ("pathlib", "pathlib._local")}  # the save's folder; 3.13's module

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SAVED:
            return super().find_class(module, name)
        found = getattr(metadata_classes, name, None)
        if module == metadata_classes.__name__ and isinstance(found, type) and found.__module__ == module:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise unsafe_state(self.path, f"{module}.{name}")


class MetadataReader(FileSystemReader):
    """torch's FileSystemReader, whose `.metadata` is read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE  # never a rank's own: no save writes one
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """torch's DefaultLoadPlanner, whose items that are no tensors (the param groups' settings) are first read as
    `torch.load(weights_only=True)` reads; torch's then loads them with weights_only=False, running the pickle."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            unsafe = refused_global(error)
            if unsafe is None:
                raise
            shard = self.directory / self.metadata.storage_data[read_item.storage_index].relative_path
            raise unsafe_state(shard, unsafe) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def unreadable_state(directory: Path, failures: list[str]) -> CheckpointError:
    """The error for a sharded state in `directory` that cannot be read, for `failures` (each said once)."""
    return CheckpointError(
        f"{directory}: its sharded optimizer state cannot be read ({'; '.join(dict.fromkeys(failures))}): a file "
        "each rank wrote at the save is missing or damaged (the ranks must share the file system checkpoints are "
        "written to)"
    )


def cut_short_shards(directory: Path, metadata: Metadata) -> list[str]:
    """The shard files of the sharded state in `directory` that end before the last byte its `metadata` places in
    them (a save or copy cut short: torch's error names no file), each with both sizes."""
    ends: dict[str, int] = {}
    for item in metadata.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    sizes = {name: (directory / name).stat().st_size for name in ends if (directory / name).is_file()}
    return [
        f"{directory / name} is cut short: {sizes[name]:,} of its {end:,} bytes"
        for name, end in sorted(ends.items())
        if sizes.get(name, end) < end
    ]


def load_whole_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, whole: dict[str, Any], source: Path
) -> None:
    """Fill the sharded `optimizer` from the whole state a run without FSDP saved (`optimizer.state_dict()` of one
    process, its parameters numbered in the order of this optimizer's groups, read from `source`): each rank keeps
    its shard."""
    groups, saved_groups = optimizer.param_groups, whole["param_groups"]
    if [len(group["params"]) for group in groups] != [len(group["params"]) for group in saved_groups]:
        raise ValueError(
            f"{source}: its optimizer state has parameter groups of {[len(g['params']) for g in saved_groups]} "
            f"parameters, this run's optimizer {[len(g['params']) for g in groups]}: it is not this model's"
        )
    name_of = {id(param): name for name, param in model.named_parameters()}
    state, named_groups = {}, []
    for group, saved in zip(groups, saved_groups, strict=True):
        names = [name_of[id(param)] for param in group["params"]]
        for index, name in zip(saved["params"], names, strict=True):
            if index in whole["state"]:  # a parameter that never had a gradient has no state yet
                state[name] = whole["state"][index]
        named_groups.append({**saved, "params": names})
    full = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": named_groups}, options=full)


@dataclass
class RankMemory:
    """Bytes this rank holds of the parameters, their gradients and the optimizer state."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


def rank_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> RankMemory:
    """What this rank stores: the local shards under FSDP, everything under DDP or in one process."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return RankMemory(_local_bytes(params), _local_bytes(grads), _local_bytes(states))


def _local_bytes(tensors: list[torch.Tensor]) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total
