"""Data parallelism applied from outside the model: process group, DDP wrapper, per-rank batch slices.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) every rank draws the same global batch
and keeps its own rows, so the global batch, and the loss, are those of one process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from seekstack.interrupts import interruptible, sigint_handled_by
from seekstack.parallel.launch import launch_environment, launch_rank, local_gpu, require_rendezvous_address
from seekstack.schema import ConfigError

CUDA_AND_CPU_BACKENDS = "cuda:nccl,cpu:gloo"  # a backend per tensor device (pytorch/pytorch#148532)
Result = TypeVar("Result")
_joined = False  # whether init_distributed joined the process group now initialized (not its caller), for shutdown
_store: dist.Store | None = None  # the last group's rendezvous store, held past it (see init_distributed's join)
_group_keys: dist.Store | None = None  # the joined group's own keys in it: where a failed rank tells the others why
FAILED_FIRST_KEY = "seekstack_failed_first"  # the first rank's failure, "rank R failed: Type: message"


@dataclass
class Ranks:
    """Where this process sits: its rank among `world_size` processes and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """Whether this process is rank 0 of the run torchrun describes (or runs alone): the one that prints."""
    return launch_rank() == 0


def init_distributed(cpu_collectives: bool = False) -> Ranks:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA), or run as a single process. A CUDA run
    whose collectives also take CPU tensors (`cpu_collectives`: the gradients FSDP's cpu_offload keeps on the CPU,
    which NCCL cannot reduce) gets gloo beside NCCL for those; other CUDA runs NCCL alone, whose network interface
    choice multi-node clusters are set up for. A process group the caller initialized is used as it is."""
    global _joined
    world_size, rank = launch_environment()
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return Ranks(0, 1, torch.device("cuda" if cuda else "cpu"))
    joined = dist.is_initialized()
    if not joined:  # before LOCAL_RANK, so that an environment set by hand is refused alike on CPUs and GPUs
        require_rendezvous_address(world_size)
    device = torch.device("cuda", local_gpu(world_size, torch.cuda.device_count())) if cuda else torch.device("cpu")
    # Ctrl-C ends this rank's wait, not its join's thread, which joins the others' group once they come: kept, that
    # group would be the next run's in this process while the others wait in it. Whichever of the join and Ctrl-C comes
    # second leaves it.
    settling = threading.Lock()
    came: set[str] = set()  # "joined", "interrupted"

    def leave_once_both_came(event: str) -> None:
        with settling:
            came.add(event)
            if came == {"joined", "interrupted"}:
                dist.destroy_process_group()

    def join() -> None:  # in a thread of its own, where CUDA's current device is set apart from the main thread's
        if cuda:
            torch.cuda.set_device(device)
        global _store, _group_keys
        try:
            store, _, _ = next(dist.rendezvous("env://"))
        except dist.DistNetworkError as error:  # started by hand: rank 0's port taken, or no rank 0 at the address
            address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            advice = (  # rank 0 could not serve the store; another rank did not reach it (torch's 30 minutes)
                "give a MASTER_PORT no other process on rank 0's machine listens at (a run started before may still "
                "hold it: a process that trained as rank 0 by hand holds it until it exits; or another rank of this "
                "run was given RANK=0 too) and a MASTER_ADDR every rank reaches that machine at"
                if rank == 0
                else "start rank 0 with the same MASTER_PORT (it was not started, or has ended) and give a MASTER_ADDR "
                "this machine reaches rank 0's at"
            )
            raise ConnectionError(
                f"the ranks' store at MASTER_ADDR:MASTER_PORT ({address}), which rank 0 serves, failed: "
                f"{str(error).rstrip('.')}; {advice}, or start the run with torchrun, which picks a free port"
            ) from None
        # Started by hand (no torchrun agent's store), rank 0's store serves the ranks at MASTER_PORT. It is held past
        # its group: another rank may already wait at the next run's join in it when rank 0 leaves this group (freed,
        # it ends that wait in "Failed to recv"), and it serves the next group too (torch's stores at one address in a
        # process share a server).
        _store = store
        # torch names a group's keys by a count that destroy_process_group restarts, and torchrun's store (its agent's)
        # outlives the group: the next run in this process read the last one's keys, a rank connecting to the other's
        # old address (gloo's "Connection refused"). Ranks agree on a group by their counts, as torch's new_group does:
        # every rank must join as often as the others. Each rank's joins are counted in the store, not in its process:
        # a rank started afresh joins the group of a rank 0 that trained before, and a store started afresh (another
        # MASTER_PORT, rank 0 started afresh) counts every rank's from 0.
        group = store.add(f"seekstack_joins_of_rank_{rank}", 1) - 1
        keys = dist.PrefixStore(f"seekstack_group_{group}", store)
        try:
            dist.init_process_group(_backend(cuda, cpu_collectives), store=keys, rank=rank, world_size=world_size)
        except dist.DistStoreError as error:  # the others did not come within the timeout (30 minutes on gloo)
            raise dist.DistStoreError(
                f"{error}: the other ranks did not join this process's group {group} in time: one failed "
                "or was not started; or, in processes that trained before, the ranks are at different groups: a rank "
                "that stopped waiting in a group its peers never joined (they failed before joining) stays one ahead "
                "of them ever after: start the ranks afresh"
            ) from None
        _group_keys = keys
        leave_once_both_came("joined")

    if cuda:
        torch.cuda.set_device(device)
    if not joined:  # waits for every rank to come (30 minutes on gloo) in native code, which Ctrl-C does not reach
        try:
            interruptible(join)
        except KeyboardInterrupt:
            leave_once_both_came("interrupted")
            raise
        _joined = True
    return Ranks(rank, world_size, device)


def _backend(cuda: bool, cpu_collectives: bool) -> str:
    """The process group's backend: gloo on CPU; NCCL on CUDA, with gloo for CPU tensors when `cpu_collectives`."""
    if not cuda:
        return "gloo"
    return CUDA_AND_CPU_BACKENDS if cpu_collectives else "nccl"


def shutdown(ranks: Ranks) -> None:
    """Leave the process group this module joined (one its caller initialized stays the caller's, to go on with), once
    the DDP model wrapped in it is freed: DDP's reducer holds the group, and the last holder destroys it, joining
    gloo's worker threads; the reducer does so holding the GIL, which a worker freeing the last collective's tensors
    may wait for (the process then hangs where the model is freed)."""
    global _joined, _group_keys
    if ranks.distributed and _joined and dist.is_initialized():
        dist.destroy_process_group()
        _joined, _group_keys = False, None


def told_failure(error: BaseException, ranks: Ranks) -> ConnectionError | None:
    """Tell `error`, this rank's failure in a run of several, to the others in the group's keys of the store they met
    in (the first rank to fail writes it). Where `error` is a cut collective's (a DistError, or gloo's bare
    RuntimeError "Connection closed by peer", which names no rank and no cause), a ConnectionError naming the rank
    that told its failure and its error, or saying that another rank stopped untold (killed, interrupted, or rank 0
    started by hand, whose store went with it); else None: the error is this rank's own, a Ctrl-C, or the group is
    the caller's. A cut collective is never told as a failure: where the rank that cut it told nothing (killed), the
    others would blame the first of them to write."""
    if not (ranks.distributed and _group_keys is not None and isinstance(error, Exception)):
        return None
    collective = isinstance(error, dist.DistError) or (type(error) is RuntimeError and "gloo" in str(error))
    if not collective:  # this rank's own failure (a bare RuntimeError too: torch's "can't allocate memory")
        with contextlib.suppress(RuntimeError, OSError):  # the store gone with rank 0
            _group_keys.compare_set(FAILED_FIRST_KEY, "", f"rank {ranks.rank} failed: {type(error).__name__}: {error}")
        return None
    try:
        # a silent connection first: started by hand, the store is rank 0's and ends with it, and torch's read of a
        # store gone prints its C++ warning "recvValue failed ... Connection was likely closed" and 30 frames
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=5).close()
        first = _group_keys.get(FAILED_FIRST_KEY).decode() if _group_keys.check([FAILED_FIRST_KEY]) else None
    except (RuntimeError, OSError):  # OSError: nothing listens at the store's address
        first = None
    # untold too: the command's one-line error, not gloo's RuntimeError and its traceback
    cause = first or (
        "another rank stopped without telling why (killed, interrupted, hung, or rank 0 started by hand, whose store "
        "went with it): its own output says why"
    )
    return ConnectionError(f"{cause}; this rank then stopped, its collective with it cut ({error})")


def wrap_model(model: nn.Module, ranks: Ranks, rank_local: list[str] = ()) -> nn.Module:
    """DistributedDataParallel around `model` when there are several ranks; the model itself otherwise.

    Routed experts live in one stacked parameter per layer, so an expert that gets no token still
    receives a (zero) gradient and every parameter takes part in each step; MTP is skipped only for
    sequences too short to have targets, which the trainer never feeds, so `find_unused_parameters`
    stays off. Buffers are not broadcast: the routing biases change only through `update_expert_bias`
    with all-reduced loads, hence identically on every rank. Parameters named in `rank_local` are left out.
    """
    if not ranks.distributed:
        return model
    if rank_local:  # expert-parallel experts: each rank's own, never averaged
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(rank_local))
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    with warnings.catch_warnings():  # torch's own advice: keep broadcast_buffers=False until init_sync_buffers exists
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def done_by_main(work: Callable[[], Result], ranks: Ranks) -> Result:
    """`work()` done by rank 0 alone, its result handed to every rank: files all ranks then read (text a LoRA run
    tokenizes) are written once, not by every rank over each other. An error `work` raises is raised on every rank
    (a ConfigError quoting it on the others), so that none waits on rank 0 after it gave up."""
    if not ranks.distributed:
        return work()
    outcome: list[Any] = [None]
    if ranks.is_main:
        try:
            result = work()
        except Exception as error:
            dist.broadcast_object_list([(None, f"{type(error).__name__} on rank 0: {error}")], src=0)
            raise
        outcome = [(result, None)]
    dist.broadcast_object_list(outcome, src=0)
    result, failure = outcome[0]
    if failure is not None:
        raise ConfigError(failure)
    return result


SAME_SETTINGS_ADVICE = "give every rank the same config file and key=value overrides"
DIFFERENCES_NAMED = 5  # per rank, in an error about ranks that disagree: a whole folder missing has many


def require_same_settings(
    settings: dict[str, Any], ranks: Ranks, what: str = "settings", advice: str = SAME_SETTINGS_ADVICE
) -> None:
    """ConfigError on every rank unless all ranks were given rank 0's `settings` (or see its files: `what`, and
    `advice` on what to do): ranks with another seq_len or lr would train one DDP model on other rows or steps
    without a word, and another max_steps ends the run in a collective error when one rank stops before the
    others."""
    if not ranks.distributed:
        return
    everyone: list[dict[str, Any] | None] = [None] * ranks.world_size
    dist.all_gather_object(everyone, settings)
    reference = everyone[0]
    differing = [
        f"rank {rank} has {_differences(given, reference)}" for rank, given in enumerate(everyone) if given != reference
    ]
    if differing:
        raise ConfigError(f"the ranks were given different {what}: {'; '.join(differing)}; {advice}")


def _differences(given: dict[str, Any], reference: dict[str, Any]) -> str:
    """`key=value (rank 0: value)` for each setting where `given` differs from rank 0's `reference` (the first
    DIFFERENCES_NAMED, and how many more); a key one of them lacks (a file one rank does not see) is `missing`."""
    keys = [key for key in {**reference, **given} if given.get(key) != reference.get(key)]
    named = ", ".join(
        f"{key}={given.get(key, 'missing')} (rank 0: {reference.get(key, 'missing')})"
        for key in keys[:DIFFERENCES_NAMED]
    )
    more = len(keys) - DIFFERENCES_NAMED
    return f"{named} and {more} more" if more > 0 else named


def require_rows_divisible(rows: int, ranks: Ranks) -> None:
    """ConfigError unless the ranks divide a global batch of `rows` (batch_size): each keeps an equal slice."""
    if rows % ranks.world_size:
        raise ConfigError(f"batch_size={rows} is not divisible by the {ranks.world_size} ranks (WORLD_SIZE)")


def local_rows(global_batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous slice of the global batch's rows."""
    rows = global_batch.shape[0]
    require_rows_divisible(rows, ranks)
    per_rank = rows // ranks.world_size
    return global_batch[ranks.rank * per_rank : (ranks.rank + 1) * per_rank]


def all_reduce_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The element-wise sum of `tensor` over ranks (in place, and returned)."""
    if ranks.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def broadcast_text(text: str, ranks: Ranks) -> str:
    """Rank 0's `text`, on every rank."""
    if not ranks.distributed:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def require_shared_folder(folder: Path, ranks: Ranks) -> None:
    """ConfigError on every rank unless every rank sees the files rank 0 writes into `folder` (made by rank 0): where
    each rank writes its own part of a checkpoint into the folder rank 0 renames, a rank whose `folder` is on a disk
    of its own machine (or, relative, in another working directory) would leave its part there, and rank 0 save
    checkpoints without it, which cannot resume."""
    if not ranks.distributed:
        return
    marker = ""
    if ranks.is_main:
        descriptor, marker = tempfile.mkstemp(prefix=".ranks_see_", dir=folder)
        os.close(descriptor)
    marker = Path(folder) / Path(broadcast_text(marker, ranks)).name  # in `folder` as this rank names it
    seen: list[bool | None] = [None] * ranks.world_size
    dist.all_gather_object(seen, marker.is_file())
    if ranks.is_main:
        marker.unlink()
    blind = [str(rank) for rank, sees in enumerate(seen) if not sees]
    if blind:
        raise ConfigError(
            f"out_dir {folder}: rank {', '.join(blind)} does not see the files rank 0 writes there (a folder of that "
            "name on a disk of its own machine, or a relative out_dir from another working directory); each rank "
            "writes its part of every checkpoint into it (FSDP's optimizer shards, expert-parallel optimizer files, "
            "grad_compression's state), without which a checkpoint cannot resume: give an out_dir on a file system "
            "every rank shares"
        )


class RankEnded(ConnectionError):
    """Another rank of the run ended (an error, or killed) and this one was then interrupted: torchrun's SIGTERM to
    the ranks left. The checkpoint an interrupt saves needs every rank, so this one ends at once, saving none."""


@contextlib.contextmanager
def interrupts_agreed(ranks: Ranks) -> Iterator[Callable[[], None]]:
    """Ctrl-C of a run on several ranks, taken by all of them at the same point. Each rank is reached at another
    place of its step (torchrun passes SIGINT on to every rank; a terminal reaches only its own machine's), and the
    checkpoint an interrupt saves runs collectives that would meet another rank's step's: the ranks would wait on
    each other until torchrun kills them, with nothing saved. So inside the block SIGINT only marks this rank, and
    the yielded check, which every rank calls at the same point (a step's start), raises KeyboardInterrupt on all of
    them once any was marked. An interrupt that finds a rank of this machine gone (torchrun stops the others when
    one fails) raises RankEnded where it lands instead: the rank would otherwise go on with work of its own (its
    rows of an evaluation, rank 0's checkpoint) until torchrun kills it 30 s later. In one process, or outside the
    main thread, Ctrl-C raises where it lands and the check does nothing."""
    if not ranks.distributed:
        yield lambda: None
        return
    neighbours = _neighbours(ranks)
    marked: list[int] = []

    def mark(signum: int, frame: FrameType | None) -> None:
        gone = {rank: pid for rank, pid in neighbours.items() if _process_gone(pid)}
        if gone:
            named = ", ".join(f"{rank} (process {pid})" for rank, pid in gone.items())
            raise RankEnded(
                f"rank {named} of this run has ended (torchrun's report says how); rank {ranks.rank} stops too, "
                "without a checkpoint, which needs every rank: continue from the run's newest checkpoint with --resume"
            )
        marked.append(signum)

    with sigint_handled_by(mark):

        def stop_if_interrupted() -> None:
            anywhere = all_reduce_sum(torch.tensor([len(marked)], device=ranks.device), ranks)
            if anywhere.item():
                raise KeyboardInterrupt

        yield stop_if_interrupted


def _neighbours(ranks: Ranks) -> dict[int, int]:
    """The process id of each other rank whose process this one can see (same machine and pid namespace), by rank."""
    everyone: list[tuple[str, int] | None] = [None] * ranks.world_size
    dist.all_gather_object(everyone, (_process_space(), os.getpid()))
    here = _process_space()
    return {rank: pid for rank, (space, pid) in enumerate(everyone) if space == here and rank != ranks.rank}


def ranks_cpus(ranks: Ranks) -> list[tuple[str, frozenset[int]]]:
    """Each rank's machine (its process space) and the CPUs its affinity mask lets it run on, by rank."""
    own = (_process_space(), own_cpus())
    if not ranks.distributed:
        return [own]
    everyone: list[tuple[str, frozenset[int]] | None] = [None] * ranks.world_size
    dist.all_gather_object(everyone, own)
    return everyone


def own_cpus() -> frozenset[int]:
    """The CPUs this process may run on: its affinity mask (Linux), else all of the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def _process_space() -> str:
    """What a process id is unique within: this boot of this machine and this pid namespace (Linux), else the host."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() + os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        return False
    return False


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) for micro-batches before the last of an
    accumulation step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        yield
    elif sync or not isinstance(model, DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield
