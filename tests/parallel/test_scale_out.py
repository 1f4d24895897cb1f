"""Scale-out on two gloo ranks on the CPU: FSDP2 trains like one process at the same global batch, its sharded
checkpoints resume at another number of ranks, and compressed gradient all-reduce sends fewer bytes."""

from __future__ import annotations

import math
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seekstack.checkpoint.keys import CheckpointError
from seekstack.parallel import distributed
from seekstack.parallel.compression import CommCounter, Int8State, int8_hook, register_compression
from seekstack.parallel.distributed import Ranks
from seekstack.schema import ConfigError
from seekstack.train.runs import list_checkpoints
from seekstack.train.state import OPTIMIZER_DIR
from seekstack.train.trainer import TrainingDiverged, train
from tests.support import free_port, spawn
from tests.train.test_trainer import MICRO_MODEL, data_dir, read_metrics, run_config  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)


def _train_rank(rank: int, world_size: int, port: int, config, resume) -> None:
    _join(rank, world_size, port)
    train(config, resume=resume)


def train_on_two_ranks(config, resume=False) -> None:
    spawn(_train_rank, (2, free_port(), config, resume))


def gloo_workers() -> list[str]:
    """This process' threads that run gloo's collectives (`pt_gloo_runloop`: some per live gloo process group)."""
    names = (comm.read_text().strip() for comm in Path("/proc/self/task").glob("*/comm"))
    return [name for name in names if name == "pt_gloo_runloop"]


def _train_rank_in_turn(rank: int, world_size: int, port: int, runs: list) -> None:
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # the store at `port` is the test's, as torchrun's agent's
    destroy = dist.destroy_process_group

    def destroy_and_check(*args, **kwargs) -> None:
        destroy(*args, **kwargs)
        if gloo_workers():  # the group outlived its shutdown: something else held it, to be freed at random later
            raise AssertionError(f"rank {rank}: {len(gloo_workers())} gloo worker threads left after the shutdown")

    dist.destroy_process_group = destroy_and_check  # in this rank's process only
    for number, (config, resume) in enumerate(runs, start=1):
        print(f"rank {rank}: run {number} of {len(runs)}", file=sys.stderr, flush=True)  # where its output starts
        if rank == 0 and number > 1:
            time.sleep(0.5)  # rank 1 first in the store, where the last run's keys are (rank 0's address among them)
        _train_rank(rank, world_size, port, config, resume)


def train_on_two_ranks_in_turn(runs: list, rank_main=_train_rank_in_turn) -> None:
    """`train_on_two_ranks` of each of `runs` ((config, resume) pairs) in turn (or `rank_main` given them), all in
    one pair of rank processes meeting in one store, as a user trains twice in one Python session under torchrun
    (whose agent holds the store): each run's shutdown must end its process group there (on Linux, where its gloo
    worker threads are seen): DDP's reducer, freed after it, destroyed the group holding the GIL, which a worker
    thread could need to free the last collective (a rank hung now and then at train()'s return)."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # noqa: F841  (held, as torchrun's)
    spawn(rank_main, (2, port, runs))


def train_on_two_ranks_within(seconds: float, config, rank_main=_train_rank) -> None:
    """`train_on_two_ranks` (each rank running `rank_main`), failing the test instead of waiting forever when the
    ranks hang, with where each rank still running was (its Python stack) in the test's stderr."""
    spawn(rank_main, (2, free_port(), config, False), limit_s=seconds)


def losses(out_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out_dir) if "loss" in m]


def test_fsdp_on_two_ranks_matches_one_process_at_the_same_global_batch(data_dir, tmp_path):  # noqa: F811
    steps = dict(max_steps=20, eval_every=10, eval_batches=2, save_every=0)  # every rank joins the evaluation
    single = train(run_config(data_dir, tmp_path / "one", **steps))
    train_on_two_ranks(run_config(data_dir, tmp_path / "fsdp", parallel="fsdp", **steps))
    sharded = read_metrics(tmp_path / "fsdp")
    assert losses(tmp_path / "fsdp") == pytest.approx(single.losses, abs=1e-5)
    one = read_metrics(tmp_path / "one")
    val_losses = [[m["val_loss"] for m in metrics if "val_loss" in m] for metrics in (sharded, one)]
    assert len(val_losses[0]) == 2 and val_losses[0] == pytest.approx(val_losses[1], abs=1e-5)
    last_sharded, last_one = ([m for m in metrics if "loss" in m][-1] for metrics in (sharded, one))
    assert last_sharded["grad_norm"] == pytest.approx(last_one["grad_norm"], rel=1e-4)
    assert last_sharded["maxvio"] == pytest.approx(last_one["maxvio"], abs=1e-5)
    # ZeRO-3: each rank holds about half of the parameters, gradients and optimizer state.
    memory = sharded[0]["rank_memory"]
    whole = sum(p.numel() * 4 for p in single_model_parameters(tmp_path / "one"))
    assert memory["parameters"] < 0.6 * whole and memory["optimizer"] < 1.2 * whole


def single_model_parameters(out_dir: Path) -> list[torch.Tensor]:
    from seekstack.checkpoint import load_pretrained

    return list(load_pretrained(list_checkpoints(out_dir)[-1]).parameters())


FSDP_STEPS = dict(max_steps=6, eval_every=0, save_every=3, keep_checkpoints=3)


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The out_dir of an FSDP run on two ranks with checkpoints at steps 3 and 6, its optimizer state sharded."""
    out_dir = tmp_path_factory.mktemp("fsdp_run")
    train_on_two_ranks(run_config(data_dir, out_dir, parallel="fsdp", **FSDP_STEPS))
    return out_dir


def test_sharded_checkpoint_resumes_at_one_and_at_two_ranks_continuing_the_loss_curve(data_dir, fsdp_run, tmp_path):  # noqa: F811
    steps = FSDP_STEPS
    reference = losses(fsdp_run)
    checkpoint = fsdp_run / "checkpoints" / "step_3"
    assert (checkpoint / OPTIMIZER_DIR).is_dir() and (checkpoint / "model.safetensors").is_file()
    # Resumed at 2 ranks and at 1 process (resharded) from the step-3 checkpoint: the same last three losses.
    for name, ranks in (("two", 2), ("one", 1)):
        out_dir = tmp_path / name
        (out_dir / "checkpoints").mkdir(parents=True)
        os.symlink(checkpoint, out_dir / "checkpoints" / "step_3")
        config = run_config(data_dir, out_dir, parallel="fsdp", **steps)
        if ranks == 2:
            train_on_two_ranks(config, resume=True)
            resumed = losses(out_dir)
        else:
            resumed = train(config, resume=True).losses
        assert resumed[-3:] == pytest.approx(reference[-3:], abs=1e-5), name


def test_a_missing_optimizer_shard_is_named_with_the_checkpoint_to_resume_from(data_dir, fsdp_run, tmp_path):  # noqa: F811
    """A shard one rank wrote is missing (a rank whose disk is not the others'): torch's CheckpointException was a
    traceback on every rank."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    shutil.copytree(fsdp_run / "checkpoints" / "step_3", checkpoint)
    (shard,) = (checkpoint / OPTIMIZER_DIR).glob("__1_*.distcp")
    shard.unlink()
    config = run_config(data_dir, tmp_path, parallel="fsdp", **FSDP_STEPS)
    with pytest.raises(CheckpointError) as refused:
        train(config, resume=True)
    assert str(refused.value) == (
        f"{checkpoint / OPTIMIZER_DIR}: its sharded optimizer state cannot be read ([Errno 2] No such file or "
        f"directory: '{shard}'): a file each rank wrote at the save is missing or damaged (the ranks must share the "
        f"file system checkpoints are written to); move {checkpoint} out of {checkpoint.parent}, and --resume "
        "continues from the checkpoint before it (if the run kept one)"
    )


def test_an_optimizer_shard_cut_short_is_named_with_both_sizes(data_dir, fsdp_run, tmp_path):  # noqa: F811
    """A shard cut short (a copy or a save interrupted): torch's error, `PytorchStreamReader failed reading zip
    archive: failed finding central directory`, named no file of the checkpoint."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    shutil.copytree(fsdp_run / "checkpoints" / "step_3", checkpoint)
    (shard,) = (checkpoint / OPTIMIZER_DIR).glob("__1_*.distcp")
    whole = shard.stat().st_size
    os.truncate(shard, whole // 2)
    with pytest.raises(CheckpointError) as refused:
        train(run_config(data_dir, tmp_path, parallel="fsdp", **FSDP_STEPS), resume=True)
    assert str(refused.value).startswith(
        f"{checkpoint / OPTIMIZER_DIR}: its sharded optimizer state cannot be read ({shard} is cut short: "
        f"{whole // 2:,} of its {whole:,} bytes): a file each rank wrote at the save is missing or damaged"
    )


def test_a_missing_optimizer_metadata_is_named_without_torchs_tracebacks(data_dir, fsdp_run, tmp_path, caplog):  # noqa: F811
    """torch logged two tracebacks (`Global metadata is not found. Falling back to rank local metadata.`, `Rank
    local metadata is not found.`) and its error named `__0.metadata`, a file no save writes."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    shutil.copytree(fsdp_run / "checkpoints" / "step_3", checkpoint)
    (checkpoint / OPTIMIZER_DIR / ".metadata").unlink()
    with pytest.raises(CheckpointError) as refused:
        train(run_config(data_dir, tmp_path, parallel="fsdp", **FSDP_STEPS), resume=True)
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    assert str(refused.value).startswith(
        f"{checkpoint / OPTIMIZER_DIR}: its sharded optimizer state cannot be read ({checkpoint / OPTIMIZER_DIR}/"
        ".metadata: No such file or directory): a file each rank wrote at the save is missing or damaged"
    )


class _OpensAFileWhenLoaded:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_an_optimizer_metadata_whose_pickle_would_run_code_is_refused_naming_it(data_dir, fsdp_run, tmp_path):  # noqa: F811
    """torch reads `.metadata` with pickle.load: a checkpoint from elsewhere ran its code on --resume."""
    checkpoint = tmp_path / "checkpoints" / "step_3"
    shutil.copytree(fsdp_run / "checkpoints" / "step_3", checkpoint)
    opened = tmp_path / "opened"
    (checkpoint / OPTIMIZER_DIR / ".metadata").write_bytes(pickle.dumps(_OpensAFileWhenLoaded(opened)))
    with pytest.raises(CheckpointError) as refused:
        train(run_config(data_dir, tmp_path, parallel="fsdp", **FSDP_STEPS), resume=True)
    assert not opened.exists()
    assert str(refused.value).startswith(
        f"{checkpoint / OPTIMIZER_DIR / '.metadata'}: holds a Python object of io.open, which no "
        "torch.distributed.checkpoint save writes and which loading would run: refused; it was not written by "
        "seekstack, or altered since"
    )


def _train_rank_under_a_file_size_limit(rank: int, world_size: int, port: int, config, resume) -> None:
    """A rank whose disk takes no file over 100 kB (`ulimit -f`: EFBIG, as a full disk's ENOSPC); it writes what it
    raised to `rank{r}.txt` beside the run."""
    _join(rank, world_size, port)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        train(config, resume=resume)
        raised = "nothing"
    except BaseException as error:  # noqa: BLE001  (torch's CheckpointException is no Exception)
        raised = f"{type(error).__name__}: {error}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    (Path(config.out_dir).parent / f"rank{rank}.txt").write_text(raised)
    os._exit(0)  # train() destroyed the process group; end before gloo's teardown can hang (see _powersgd_rank)


def test_a_disk_refusing_a_ranks_optimizer_shard_stops_every_rank_naming_the_checkpoint_and_why(data_dir, tmp_path):  # noqa: F811
    """Under FSDP each rank writes its optimizer shard: a refused one raised torch's CheckpointException (a
    BaseException, with every rank's traceback) on every rank, where one process's save names the checkpoint."""
    out_dir = tmp_path / "run"
    config = run_config(data_dir, out_dir, parallel="fsdp", max_steps=1, eval_every=0)
    train_on_two_ranks_within(120, config, _train_rank_under_a_file_size_limit)
    raised = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert raised[0] == raised[1]  # the reason: EFBIG, or torch.save's zip writer cut short, as the limit falls
    assert raised[0].startswith(f"WriteRefused: {out_dir / 'checkpoints' / 'step_1'}: not written (")
    assert raised[0].endswith(
        "; nothing was written, and what was there is as it was; training stopped at step 1: the run has no "
        "checkpoint, so all its steps are lost: free some space and start it again"
    )
    assert list((out_dir / "checkpoints").iterdir()) == []  # no part of it left, not even a hidden one


def _train_rank_1_failing_at_its_first_step(rank: int, world_size: int, port: int, config, resume) -> None:
    """A rank whose first step raises on rank 1 alone (its own file or memory, say), rank 0 meanwhile in that step's
    all-reduce; each writes what it raised to `rank{r}.txt` beside the run."""
    from seekstack.train.trainer import _Run

    _join(rank, world_size, port)
    train_step = _Run.train_step

    def failing_on_rank_1(run):  # noqa: ANN001, ANN202
        if rank == 1:
            raise ValueError("rank 1's own trouble")
        return train_step(run)

    _Run.train_step = failing_on_rank_1
    try:
        train(config, resume=resume)
        raised = "nothing"
    except Exception as error:  # noqa: BLE001
        raised = f"{type(error).__name__}: {error}"
    (Path(config.out_dir).parent / f"rank{rank}.txt").write_text(raised)
    os._exit(0)  # train() destroyed the process group; end before gloo's teardown can hang (see _powersgd_rank)


def test_a_rank_whose_collective_another_ranks_failure_cut_names_that_rank_and_its_error(data_dir, tmp_path):  # noqa: F811
    """Rank 1 failing alone left rank 0 with gloo's RuntimeError 'Connection closed by peer [127.0.0.1]:PORT' (and a
    traceback), naming neither the rank that failed nor why."""
    steps = dict(max_steps=1, grad_accum_steps=1, eval_every=0, save_every=0, peak_flops=1e11)  # no probe of the CPU
    config = run_config(data_dir, tmp_path / "run", **steps)
    train_on_two_ranks_within(120, config, _train_rank_1_failing_at_its_first_step)
    raised = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert raised[1] == "ValueError: rank 1's own trouble"
    assert raised[0].startswith(
        "ConnectionError: rank 1 failed: ValueError: rank 1's own trouble; this rank then stopped, its collective "
        "with it cut ("
    ), raised[0]


def test_a_cut_collective_is_never_told_as_the_failure_so_a_killed_rank_is_blamed_on_no_other(monkeypatch):
    """Of three ranks, rank 1 killed (the OOM killer: it tells nothing) left ranks 0 and 2 in gloo's cut collective;
    rank 0 wrote its own cut as the first failure, so rank 2 said 'rank 0 failed: RuntimeError: ... Connection closed
    by peer'. A rank's own bare RuntimeError (torch's out of memory) is still told."""
    monkeypatch.setattr(distributed, "_group_keys", dist.HashStore())
    with socket.create_server(("127.0.0.1", 0)) as listening:  # the store's address answers (closed on a failure too)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(listening.getsockname()[1]))
        cut = RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:80"
        )
        untold = [str(distributed.told_failure(cut, Ranks(rank, 3, torch.device("cpu")))) for rank in (0, 2)]
        assert all(said.startswith("another rank stopped without telling why (killed, ") for said in untold), untold
        own = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        assert distributed.told_failure(own, Ranks(1, 3, torch.device("cpu"))) is None
        told = distributed.told_failure(cut, Ranks(2, 3, torch.device("cpu")))
        assert str(told).startswith(f"rank 1 failed: RuntimeError: {own}; this rank then stopped"), told


def test_a_store_gone_with_rank_0_is_not_read_where_torch_printed_its_cpp_warning(monkeypatch):
    """Ranks started by hand, rank 0 failing: its store went with it, and the others' read of it printed torch's
    'TCPStore.cpp ... recvValue failed ... Connection was likely closed' warning and its C++ frames; where nothing
    listens at the store's address it is not read (a store that would still tell the failure, here)."""
    keys = dist.HashStore()
    keys.set(distributed.FAILED_FIRST_KEY, "rank 0 failed: ValueError: its own trouble")
    monkeypatch.setattr(distributed, "_group_keys", keys)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # nothing listens there
    cut = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    told = distributed.told_failure(cut, Ranks(1, 2, torch.device("cpu")))
    assert str(told).startswith("another rank stopped without telling why (killed, interrupted, hung, or rank 0"), told


def _rank_telling_its_environment(rank: int, told: Path) -> None:
    (told / f"rank_{rank}").write_text(os.environ.get("SEEKSTACK_SPAWNED_WITH", "unset"))


def test_ranks_run_in_the_environment_of_the_test_that_spawns_them(tmp_path, monkeypatch):
    """Ranks fork from one server, started by the first test that spawns ranks: they ran in that test's environment,
    not in the one of the test spawning them, as mp.spawn's do."""
    for value in ("first", "second"):
        monkeypatch.setenv("SEEKSTACK_SPAWNED_WITH", value)
        spawn(_rank_telling_its_environment, (tmp_path,))
        assert [(tmp_path / f"rank_{rank}").read_text() for rank in range(2)] == [value, value]


def _rank_hanging(rank: int) -> None:
    time.sleep(600)  # as both ranks waiting in a collective the other never joins


def test_ranks_that_all_hang_fail_the_test_within_its_limit_naming_them_and_where_they_were(capfd):
    """Both ranks hanging kept the test waiting for ever; after the limit they are killed and the test fails, each
    rank's stack in the test's stderr."""
    started = time.monotonic()
    # a limit that leaves the ranks time to reach _rank_hanging on a busy CI machine (at 1 s one was still starting)
    with pytest.raises(pytest.fail.Exception, match=r"^_rank_hanging: rank 0 and 1 still ran after 6 s \(hung\?\)"):
        spawn(_rank_hanging, (), limit_s=6)
    assert time.monotonic() - started < 30
    assert capfd.readouterr().err.count(" in _rank_hanging\n") == 2  # faulthandler's "File ..., line N in FUNCTION"


def _int8_rank(rank: int, world_size: int, port: int, gradients: torch.Tensor, results) -> None:
    _join(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    bucket = _Bucket(gradients[rank].clone())
    state = Int8State(CommCounter(), names={id(bucket.weight): "weight"})
    averaged = int8_hook(state, bucket).wait()
    results[rank] = (averaged.clone(), state.residuals["weight"].clone(), state.counter.bytes_sent)
    dist.destroy_process_group()


class _Bucket:
    """The methods of `dist.GradBucket` the hook uses, for a bucket of one parameter."""

    def __init__(self, buffer: torch.Tensor):
        self._buffer = buffer
        self.weight = torch.nn.Parameter(torch.empty_like(buffer))

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight]

    def gradients(self) -> list[torch.Tensor]:
        return [self._buffer]


def test_int8_hook_averages_within_one_quantisation_step_and_keeps_the_error_for_the_next():
    gradients = torch.randn(2, 3000)
    gradients[:, 1024:2048] *= 100  # a block of large values does not coarsen the others' scales
    results = mp.Manager().dict()
    spawn(_int8_rank, (2, free_port(), gradients, results))
    averaged, residual, sent = results[0]
    blocks = torch.nn.functional.pad(gradients, (0, 72)).view(2, 3, 1024)
    scales = blocks.abs().amax(dim=2, keepdim=True) / 127  # (rank, block, 1)
    step = scales.expand(2, 3, 1024).reshape(2, -1)[:, :3000].max(dim=0).values
    assert ((averaged - gradients.mean(0)).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(averaged, results[1][0])  # every rank ends with the same gradient
    quantised = (torch.round(blocks[0] / scales[0]) * scales[0]).flatten()[:3000]
    assert torch.allclose(residual, gradients[0] - quantised, atol=1e-6)
    assert sent == 3000 + 3 * 4  # one byte per value and a float32 scale per block


@pytest.mark.parametrize(("scheme", "keeps"), [("int8", True), ("int8_no_ef", False), ("bf16", False)])
def test_only_a_compression_with_error_feedback_keeps_state_for_the_checkpoints(tmp_path, scheme, keeps):
    """int8_no_ef keeps no error between steps, yet said it kept state: each rank wrote a compression_rank{r}.pt of
    {'residuals': {}}, and a resume at another number of ranks warned that its error feedback starts afresh."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
        assert register_compression(model, scheme).keeps_state is keeps
    finally:
        dist.destroy_process_group()


def _powersgd_rank(rank: int, world_size: int, port: int, results) -> None:
    _join(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=15))
    torch.manual_seed(0)
    widths = (64, 56, 48, 40, 32)  # a bucket of its own per weight, each a different size
    layers = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in pairwise(widths)))
    model = torch.nn.parallel.DistributedDataParallel(layers, bucket_cap_mb=0.005)
    counter = register_compression(model, "powersgd", powersgd_rank=2, powersgd_start=2).counter
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)  # each rank its own data
    for _ in range(6):
        model(torch.randn(8, widths[0])).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    results[rank] = (torch.cat([p.detach().flatten() for p in layers.parameters()]), counter.bytes_sent)
    dist.destroy_process_group()
    _exit_before_teardown()


def _exit_before_teardown() -> None:
    """End a PowerSGD rank without freeing its DDP model: freeing it destroys the gloo process group, whose
    destructor joins gloo's worker threads holding the GIL while a worker may still be freeing its last all-reduce's
    Python-owned tensors, which needs the GIL (a rank hung there for 18 minutes in CI, torch 2.13)."""
    os._exit(0)


def test_powersgd_on_gloo_keeps_the_ranks_collectives_in_order_across_buckets():
    """PowerSGD issues its P and Q all-reduces from future callbacks, which gloo runs on its own threads: with
    several buckets the ranks must still issue the same collectives in the same order (no mismatch, no hang)."""
    results = mp.Manager().dict()
    spawn(_powersgd_rank, (2, free_port(), results))
    (weights, sent), (other_weights, other_sent) = results[0], results[1]
    assert torch.equal(weights, other_weights)  # every step averaged the same gradient on both ranks
    full = weights.numel() * 4
    assert sent == other_sent and 2 * full < sent < 2 * full + 4 * full / 5  # 2 steps plain, 4 of rank-2 P and Q


def _powersgd_bytes_rank(rank: int, world_size: int, port: int, results) -> None:
    _join(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=15))
    carried = []
    all_reduce = dist.all_reduce

    def counted_all_reduce(tensor: torch.Tensor, *args, **kwargs):
        carried.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    # a (32, 64) weight is worth rank-2 factors; a (4, 32) one is not (its factors are over half its size)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))
    )
    counter = register_compression(model, "powersgd", powersgd_rank=2, powersgd_start=2).counter
    torch.manual_seed(rank)
    dist.all_reduce = counted_all_reduce
    for _ in range(4):  # 2 steps of plain all-reduce, 2 of PowerSGD
        model(torch.randn(8, 64)).square().mean().backward()
        model.zero_grad()
    dist.all_reduce = all_reduce
    results[rank] = (counter.bytes_sent, sum(carried))
    dist.destroy_process_group()
    _exit_before_teardown()


def test_powersgd_counts_the_bytes_its_all_reduces_carry_a_matrix_too_small_to_compress_going_whole():
    """torch's hook sends a matrix whole unless its factors are under half its size (`min_compression_rate`)."""
    results = mp.Manager().dict()
    spawn(_powersgd_bytes_rank, (2, free_port(), results))
    counted, carried = results[0]
    assert counted == carried and results[1] == results[0]


def _powersgd_resumed_rank(rank: int, world_size: int, port: int, resumes: list[tuple[int, int]], results) -> None:
    _join(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=15))

    def trained(powersgd_rank: int, powersgd_start: int, saved: dict | None = None) -> dict:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
        )
        compression = register_compression(model, "powersgd", powersgd_rank, powersgd_start)
        if saved is not None:
            compression.load_state_dict(saved)
            loaded = (compression.memory.state.iter, dict(compression.memory.errors), dict(compression.memory.qs))
            results[f"loaded at {powersgd_rank}, from {powersgd_start}"] = loaded
        for _ in range(3):  # 2 steps of plain all-reduce, then PowerSGD (a resumed run's at once)
            model(torch.randn(8, 64)).square().mean().backward()
            model.zero_grad()
        return compression.state_dict()

    results["saved"] = saved = trained(4, 2)
    for resume in resumes:
        results[f"resumed at {resume[0]}, from {resume[1]}"] = trained(*resume, saved)
    dist.destroy_process_group()
    _exit_before_teardown()


@pytest.fixture(scope="module")
def powersgd_resumes() -> dict:
    """PowerSGD's state saved after 3 steps at rank 4 from step 2, and resumed (loaded, then 3 steps) at ranks 4, 2
    and 8 from step 2, and at rank 4 from step 5: one gloo rank, spawned once for all."""
    results = mp.Manager().dict()
    resumes = [(4, 2), (2, 2), (8, 2), (4, 5)]  # (powersgd_rank, powersgd_start)
    spawn(_powersgd_resumed_rank, (1, free_port(), resumes, results), nprocs=1)
    return dict(results)


def test_powersgd_state_resumed_at_another_rank_keeps_its_errors_and_starts_its_q_factors_afresh(powersgd_resumes):
    """A run resumed with another powersgd_rank: torch's hook read the saved rank-4 Q factors as its own rank's and
    the first step failed (`shape '[1, 64, 8]' is invalid for input of size 256`, or a split that does not sum)."""
    saved = powersgd_resumes["saved"]
    for new_rank in (4, 2, 8):
        _, errors, qs = powersgd_resumes[f"loaded at {new_rank}, from 2"]
        assert errors.keys() == saved["errors"].keys()
        assert all(torch.equal(error, saved["errors"][name]) for name, error in errors.items())
        kept = {"0.weight": 64 * 4, "1.weight": 64 * 4} if new_rank == 4 else {}  # Q: (columns x rank)
        assert {name: q.numel() for name, q in qs.items()} == kept, new_rank
        resumed = powersgd_resumes[f"resumed at {new_rank}, from 2"]
        assert resumed["iter"] == 6 and [q.numel() for q in resumed["qs"].values()] == [64 * new_rank] * 2, new_rank


def test_powersgd_resumed_with_a_later_start_than_its_step_starts_there_without_the_saved_errors(powersgd_resumes):
    """powersgd_start raised past the saved step (3 -> 5): steps 3 and 4 all-reduce whole gradients, and the errors
    and Q factors saved at step 3 were kept through them and added to step 5's gradients, where a run that starts
    PowerSGD at step 5 has none."""
    saved = powersgd_resumes["saved"]
    assert saved["iter"] == 3 and len(saved["errors"]) == 4 and len(saved["qs"]) == 2  # PowerSGD had started
    assert powersgd_resumes["loaded at 4, from 5"] == (3, {}, {})
    resumed = powersgd_resumes["resumed at 4, from 5"]
    assert resumed["iter"] == 6 and [q.numel() for q in resumed["qs"].values()] == [64 * 4] * 2  # started at step 5


def test_compressed_all_reduce_sends_fewer_bytes_and_still_trains(data_dir, tmp_path):  # noqa: F811
    steps = dict(max_steps=4, eval_every=0, save_every=0, powersgd_start=2)
    schemes = ("none", "bf16", "int8", "powersgd")
    train_on_two_ranks_in_turn(
        [(run_config(data_dir, tmp_path / s, grad_compression=s, **steps), False) for s in schemes]
    )
    plain = read_metrics(tmp_path / "none")
    full = plain[-1]["comm_bytes"]
    for scheme, ratio in (("bf16", 0.5), ("int8", 0.25), ("powersgd", None)):
        compressed = read_metrics(tmp_path / scheme)
        sent = [m["comm_bytes"] for m in compressed]
        if ratio is not None:
            assert sent[-1] == pytest.approx(ratio * full, rel=0.01), scheme
        else:  # PowerSGD: plain all-reduce for its first steps, then rank-4 factors
            assert sent[0] == full and sent[-1] < 0.5 * full
        assert compressed[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)  # same start
        assert compressed[-1]["loss"] == pytest.approx(plain[-1]["loss"], rel=0.05), scheme


def _train_rank_in_a_group_of_its_own(rank: int, world_size: int, port: int, config, resume) -> None:
    _join(rank, world_size, port)
    dist.init_process_group("gloo")  # the caller's own, as a torchtitan or accelerate script makes it before training
    train(config, resume=resume)
    total = torch.ones(1)
    dist.all_reduce(total)  # the caller's collectives go on after the run
    assert total.item() == world_size
    dist.destroy_process_group()


def test_a_process_group_the_caller_made_is_left_to_it_after_training(data_dir, tmp_path):  # noqa: F811
    config = run_config(data_dir, tmp_path, max_steps=1, warmup_steps=0, eval_every=0, save_every=0)
    train_on_two_ranks_within(60, config, rank_main=_train_rank_in_a_group_of_its_own)
    assert len(losses(tmp_path)) == 1


def _train_rank_again_after_a_run_that_failed(rank: int, world_size: int, port: int, runs: list) -> None:
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # the store at `port` is the test's, as torchrun's agent's
    _join(rank, world_size, port)
    (failing, _), (then, _) = runs
    with pytest.raises(TrainingDiverged, match="is not finite") as failure:  # on every rank
        train(failing)
    # the error kept (as a notebook keeps its last one) holds no frame's DDP model, nor with it the process group
    assert not gloo_workers(), f"rank {rank}: the failed run's group outlived it, held by its {failure.typename}"
    train(then)


def test_a_run_that_failed_on_every_rank_leaves_its_process_group_and_the_next_run_trains(data_dir, tmp_path):  # noqa: F811
    steps = dict(warmup_steps=0, eval_every=0, save_every=0)
    diverging = run_config(data_dir, tmp_path / "diverging", lr=1e30, max_steps=3, **steps)
    then = run_config(data_dir, tmp_path / "then", max_steps=1, **steps)
    train_on_two_ranks_in_turn([(diverging, False), (then, False)], rank_main=_train_rank_again_after_a_run_that_failed)
    assert len(losses(tmp_path / "then")) == 1


def _join_twice_by_hand_rank_0_leaving_last(rank: int, world_size: int, port: int, results) -> None:
    from seekstack.parallel.distributed import all_reduce_sum, init_distributed, shutdown

    _join(rank, world_size, port)  # MASTER_ADDR / MASTER_PORT set by hand: rank 0 serves the store, no torchrun agent
    for run in range(2):
        ranks = init_distributed()
        total = all_reduce_sum(torch.ones(1), ranks).item()
        if rank == 0 and run == 0:
            time.sleep(0.5)  # rank 1 is at the second run's join meanwhile
        shutdown(ranks)
        results[rank, run] = total


def test_ranks_started_by_hand_without_torchrun_join_a_second_run_while_rank_0_leaves_the_first():
    """Rank 0 freed the store it served with its first group, after rank 1 reached the second run's join there:
    rank 1 then failed 'Failed to recv, got 0 bytes'."""
    results = mp.Manager().dict()
    spawn(_join_twice_by_hand_rank_0_leaving_last, (2, free_port(), results), limit_s=60)
    assert dict(results) == {(rank, run): 2.0 for rank in (0, 1) for run in (0, 1)}


def test_two_nodes_on_localhost_through_torchrun_c10d_train_like_one_process(data_dir, tmp_path):  # noqa: F811
    from tests.train.test_run_config import micro_overrides

    torchrun = Path(sys.executable).parent / "torchrun"
    port = free_port()
    overrides = micro_overrides(data_dir, tmp_path / "nodes", max_steps=3, save_every=0, parallel="fsdp")
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "seekstack-test",
                "--max-restarts",
                "0",
                "-m",
                "seekstack.cli",
                "train",
                *overrides,
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    assert sum(output.count("trained to step 3") for output in outputs) == 1, outputs  # rank 0 alone prints
    single = train(run_config_from(overrides, tmp_path / "single"))
    assert losses(tmp_path / "nodes") == pytest.approx(single.losses, abs=1e-5)


def run_config_from(overrides: list[str], out_dir: Path):
    from seekstack.train.config import load_train_config

    return load_train_config(None, [*overrides, f"out_dir={out_dir}", "parallel=ddp"])


def test_expert_parallel_on_two_ranks_matches_one_process_and_resumes_exactly(data_dir, tmp_path):  # noqa: F811
    steps = dict(max_steps=20, eval_every=10, save_every=10, keep_checkpoints=2)
    single = train(run_config(data_dir, tmp_path / "one", **steps))
    # then, in the same two ranks, resumed from its step-10 checkpoint (linked before that run writes it)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    os.symlink(tmp_path / "ep" / "checkpoints" / "step_10", resumed_dir / "checkpoints" / "step_10")
    train_on_two_ranks_in_turn(
        [
            (run_config(data_dir, tmp_path / "ep", expert_parallel=2, **steps), False),
            (run_config(data_dir, resumed_dir, expert_parallel=2, **steps), True),
        ]
    )
    assert losses(tmp_path / "ep") == pytest.approx(single.losses, abs=1e-5)
    one, ep = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ep")
    assert [m["grad_norm"] for m in ep if "grad_norm" in m] == pytest.approx(
        [m["grad_norm"] for m in one if "grad_norm" in m], rel=1e-4
    )  # the norm over both ranks' experts
    assert [m["val_loss"] for m in ep if "val_loss" in m] == pytest.approx(
        [m["val_loss"] for m in one if "val_loss" in m], abs=1e-5
    )
    # The checkpoint holds every expert: it loads whole and matches the one-process checkpoint.
    from seekstack.checkpoint import load_pretrained

    whole = load_pretrained(tmp_path / "ep" / "checkpoints" / "step_20").state_dict()
    reference = load_pretrained(tmp_path / "one" / "checkpoints" / "step_20").state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(whole[name], tensor, atol=1e-5, rtol=1e-4)
    # Resumed at the same two ranks from step 10: the same last ten losses.
    assert losses(resumed_dir)[-10:] == pytest.approx(losses(tmp_path / "ep")[-10:], abs=1e-6)


def test_int8_error_feedback_survives_ddp_regrouping_its_buckets(data_dir, tmp_path):  # noqa: F811
    """DDP rebuilds its buckets after the first step; with a small bucket cap the tiny model spans several."""
    config = run_config(
        data_dir,
        tmp_path / "int8",
        model_overrides={"vocab_size": MICRO_MODEL["vocab_size"]},  # the tiny preset's widths, the data's vocabulary
        max_steps=3,
        eval_every=0,
        save_every=0,
        grad_compression="int8",
    )
    train_on_two_ranks(config)
    assert len([m for m in read_metrics(tmp_path / "int8") if "comm_bytes" in m]) == 3


def test_powersgd_with_expert_parallel_keeps_the_ranks_collectives_in_order(data_dir, tmp_path):  # noqa: F811
    """Expert parallel's all-to-all runs in the backward pass beside PowerSGD's per-bucket all-reduces."""
    config = run_config(
        data_dir,
        tmp_path / "ep_powersgd",
        model_overrides={"vocab_size": MICRO_MODEL["vocab_size"]},  # the tiny preset's widths: several buckets
        max_steps=3,
        eval_every=0,
        save_every=0,
        expert_parallel=2,
        grad_compression="powersgd",
        powersgd_start=2,
    )
    train_on_two_ranks_within(90, config)
    sent = [m["comm_bytes"] for m in read_metrics(tmp_path / "ep_powersgd")]
    assert len(sent) == 3 and sent[2] < 0.5 * sent[0]  # the third step sent PowerSGD's factors


def test_fsdp_with_expert_parallel_on_two_ranks_matches_one_process(data_dir, tmp_path):  # noqa: F811
    steps = dict(max_steps=20, eval_every=20, save_every=20)
    single = train(run_config(data_dir, tmp_path / "one", **steps))
    train_on_two_ranks(run_config(data_dir, tmp_path / "both", parallel="fsdp", expert_parallel=2, **steps))
    assert losses(tmp_path / "both") == pytest.approx(single.losses, abs=1e-5)
    one, both = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "both")
    assert both[-2]["grad_norm"] == pytest.approx(one[-2]["grad_norm"], rel=1e-4)
    from seekstack.checkpoint import load_pretrained

    whole = load_pretrained(tmp_path / "both" / "checkpoints" / "step_20").state_dict()
    for name, tensor in load_pretrained(tmp_path / "one" / "checkpoints" / "step_20").state_dict().items():
        torch.testing.assert_close(whole[name], tensor, atol=1e-5, rtol=1e-4)


def test_float8_training_on_a_cpu_is_refused_naming_what_it_needs(data_dir, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="float8=true needs an NVIDIA GPU with FP8 tensor cores.*on a CPU"):
        train(run_config(data_dir, tmp_path / "f8", max_steps=1, float8=True))


def test_cpu_offload_on_a_cpu_run_is_refused_naming_the_key(data_dir, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(mp.ProcessRaisedException, match="cpu_offload=true keeps FSDP's shards in CPU memory for a"):
        train_on_two_ranks(run_config(data_dir, tmp_path / "offload", max_steps=1, parallel="fsdp", cpu_offload=True))


@pytest.mark.parametrize(("cpu_offload", "backend"), [(True, "cuda:nccl,cpu:gloo"), (False, "nccl")])
def test_a_gpu_run_adds_gloo_to_nccl_only_for_cpu_offload(
    data_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    torchrun_environment,
    cpu_offload,
    backend,
):
    # FSDP's cpu_offload keeps gradients on the CPU, where clip_grad_norm_ and full_tensor() run their collectives:
    # NCCL alone fails them ("No backend type associated with device type cpu"). Other runs keep NCCL alone: gloo's
    # network interface choice can fail a multi-node run that NCCL's did not.
    joined = []

    def join(group_backend, **kwargs):
        joined.append(group_backend)
        raise SystemExit  # the group is all this test is after: the run stops before it builds a model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(dist.HashStore(), 1, 2)]))  # no rank 0 to meet
    monkeypatch.setattr(dist, "init_process_group", join)
    torchrun_environment(1, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with pytest.raises(SystemExit):
        train(run_config(data_dir, tmp_path / "run", max_steps=1, parallel="fsdp", cpu_offload=cpu_offload))
    assert joined == [backend]


def test_a_rank_whose_peers_do_not_join_its_group_in_time_is_told_why_they_may_not_and_what_to_do(
    monkeypatch,
    torchrun_environment,
):
    from seekstack.parallel.distributed import init_distributed

    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(dist.HashStore(), 0, 2)]))  # rank 1 never comes
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_timeout", lambda backend: timedelta(seconds=0.2))
    torchrun_environment(0, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    told = (
        r"^[^:]*imeout.*: the other ranks did not join this process's group \d+ in time: one failed or was not "
        r"started; .* a rank that stopped waiting in a group its peers never joined .*: start the ranks afresh"
    )
    with pytest.raises(dist.DistStoreError, match=told):
        init_distributed()
    assert not dist.is_initialized()


def test_a_rank_counts_its_groups_in_the_store_the_ranks_meet_in_not_in_its_process(monkeypatch, torchrun_environment):
    """A process that trained by hand joined the next store it met (at another MASTER_PORT, or of a rank 0 started
    afresh) at its own count of groups, 2 after two runs, where the ranks started afresh there waited in group 0: each
    rank waited 30 minutes for the others. Likewise a rank started afresh against a rank 0 that trained before."""
    from seekstack.parallel import distributed

    monkeypatch.setattr(distributed, "_joined", False)  # restored after the test, as `_store`: no group is made here
    monkeypatch.setattr(distributed, "_store", None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, store, rank, world_size: store.set("joined", ""))
    torchrun_environment(1, LOCAL_RANK=None, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    before, afresh = dist.HashStore(), dist.HashStore()
    for store in (before, before, afresh):
        monkeypatch.setattr(dist, "rendezvous", lambda url, store=store: iter([(store, 1, 2)]))
        distributed.init_distributed()
    assert before.check(["seekstack_group_0/joined", "seekstack_group_1/joined"])
    assert afresh.check(["seekstack_group_0/joined"]) and not afresh.check(["seekstack_group_2/joined"])


def test_a_join_ctrl_c_stopped_waiting_for_is_left_when_the_others_come_after_all(monkeypatch, torchrun_environment):
    """Ctrl-C ended a rank's wait at its join (a notebook's train() started before the others), not the join's thread:
    when the others came, it joined their group behind its caller's back (dist.is_initialized(), which the next run
    took for its caller's group and never left, while the others waited in it)."""
    from seekstack.parallel import distributed

    others_came, events = threading.Event(), []

    def joined_once_the_others_come(backend, store, rank, world_size):
        others_came.wait()
        events.append("joined")

    monkeypatch.setattr(distributed, "_store", None)  # restored after the test
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(dist.HashStore(), 0, 2)]))
    monkeypatch.setattr(dist, "init_process_group", joined_once_the_others_come)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: events.append("left"))
    torchrun_environment(0, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    threading.Timer(0.2, signal.raise_signal, [signal.SIGINT]).start()
    with pytest.raises(KeyboardInterrupt):
        distributed.init_distributed()
    others_came.set()
    deadline = time.monotonic() + 5
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["joined", "left"]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)
def test_float8_training_runs_and_lowers_the_loss_on_a_gpu(data_dir, tmp_path):  # noqa: F811
    config = run_config(data_dir, tmp_path / "f8", max_steps=6, eval_every=0, save_every=0, float8=True)
    result = train(config)
    assert all(math.isfinite(loss) for loss in result.losses) and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize(
    ("experts", "ranks", "refusal"),
    [
        (0, 2, r"expert_parallel=2 splits the routed experts over the ranks, and the model has none \(model."
         r"n_routed_experts=0, first_k_dense_replace=1 of 2 layers\): set expert_parallel=1"),
        (4, 3, r"expert_parallel=3 needs n_routed_experts=4 divisible by it \(each rank holds as many of every "
         r"layer's routed experts\): run on a number of ranks that divides 4"),
    ],
)  # fmt: skip
def test_expert_parallel_the_experts_do_not_suit_is_refused_once_as_a_setting_naming_it(
    data_dir,  # noqa: F811
    tmp_path,
    torchrun_environment,
    capsys,
    experts,
    ranks,
    refusal,
):
    """A model whose routed experts the ranks cannot split was refused with a ValueError, which torchrun's ranks
    each printed as an error of their own ('error (rank 1): ...', 'error (rank 2): ...'); every rank meets it alike."""
    import typer

    from seekstack.cli.common import user_errors
    from seekstack.model.transformer import Transformer
    from seekstack.parallel.distributed import Ranks
    from seekstack.parallel.expert import apply_expert_parallel

    overrides = {**MICRO_MODEL, "n_routed_experts": experts}
    config = run_config(data_dir, tmp_path, model_overrides=overrides).model_config()
    for rank, printed in ((0, f"error: {refusal}\n"), (1, "")):
        torchrun_environment(rank, ranks)
        with pytest.raises(typer.Exit), user_errors():
            apply_expert_parallel(Transformer(config), Ranks(rank, ranks, torch.device("cpu")))
        assert re.fullmatch(printed, capsys.readouterr().err), rank


def resume_from(checkpoint: Path, out_dir: Path) -> Path:
    """A new run folder whose only checkpoint is `checkpoint` (linked)."""
    (out_dir / "checkpoints").mkdir(parents=True)
    os.symlink(checkpoint, out_dir / "checkpoints" / checkpoint.name)
    return out_dir


def test_a_whole_checkpoint_resumes_on_two_ranks_under_fsdp_continuing_the_loss_curve(data_dir, tmp_path):  # noqa: F811
    steps = dict(max_steps=6, eval_every=0, save_every=3, parallel="fsdp")  # one process saves it whole
    single = train(run_config(data_dir, tmp_path / "one", **steps))
    out_dir = resume_from(tmp_path / "one" / "checkpoints" / "step_3", tmp_path / "two")
    train_on_two_ranks(run_config(data_dir, out_dir, **steps), resume=True)
    assert losses(out_dir)[-3:] == pytest.approx(single.losses[-3:], abs=1e-5)


def test_resuming_with_another_optimizer_layout_is_refused_naming_what_to_resume_with(data_dir, tmp_path):  # noqa: F811
    steps = dict(max_steps=3, eval_every=0, save_every=2)
    train(run_config(data_dir, tmp_path / "one", max_steps=2, eval_every=0))
    whole = resume_from(tmp_path / "one" / "checkpoints" / "step_2", tmp_path / "whole_to_ep")
    with pytest.raises(mp.ProcessRaisedException, match="holds a whole optimizer state .saved without expert paral"):
        train_on_two_ranks(run_config(data_dir, whole, expert_parallel=2, **steps), resume=True)
    ep_ddp = resume_from(tmp_path / "ep_ddp" / "checkpoints" / "step_2", tmp_path / "ep_fsdp")  # linked before it is
    runs = [
        (run_config(data_dir, tmp_path / "ep_ddp", expert_parallel=2, **{**steps, "max_steps": 2}), False),
        (run_config(data_dir, ep_ddp, expert_parallel=2, parallel="fsdp", **steps), True),  # then resumed: refused
    ]
    with pytest.raises(mp.ProcessRaisedException, match=r"optimizer_rank\d.pt holds .* resume it with parallel=ddp"):
        train_on_two_ranks_in_turn(runs)
    # in one process, where a resharding resume (torchtitan's) would go on: the way on from its weights is named
    alone = resume_from(tmp_path / "ep_ddp" / "checkpoints" / "step_2", tmp_path / "ep_alone")
    checkpoint = alone / "checkpoints" / "step_2"
    with pytest.raises(ValueError) as refused:
        train(run_config(data_dir, alone, **steps), resume=True)
    assert str(refused.value) == (
        f"{checkpoint} holds the optimizer state of an expert-parallel run, one file per rank (optimizer_rank0.pt, "
        f"...); resume it with expert_parallel=2 on as many ranks, or start a new run from its weights with "
        f"init_from={checkpoint} (a fresh optimizer)"
    )


@pytest.mark.parametrize("scheme", ["int8", "powersgd"])
def test_a_run_with_compressed_gradients_resumes_exactly_at_the_same_number_of_ranks(data_dir, tmp_path, capfd, scheme):  # noqa: F811
    """The checkpoint holds each rank's int8 residuals or PowerSGD's step, errors and Q factors; those of another
    number of ranks are left, with a warning."""
    steps = dict(
        model_overrides={"vocab_size": MICRO_MODEL["vocab_size"]},  # the tiny preset's widths: DDP regroups buckets
        max_steps=6,
        eval_every=0,
        save_every=3,
        grad_compression=scheme,
        powersgd_start=2,
    )
    train_on_two_ranks(run_config(data_dir, tmp_path / "whole", **steps))
    out_dir = resume_from(tmp_path / "whole" / "checkpoints" / "step_3", tmp_path / "resumed")
    three_ranks = tmp_path / "three_ranks" / "checkpoints" / "step_3"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_3", three_ranks)
    shutil.copy(three_ranks / "compression_rank1.pt", three_ranks / "compression_rank2.pt")  # as if saved at 3 ranks
    one_process = tmp_path / "one_process" / "checkpoints" / "step_3"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_3", one_process)
    for rank_file in one_process.glob("compression_rank*.pt"):  # as if saved by one process, which keeps none
        rank_file.unlink()
    capfd.readouterr()
    resumed = [run_config(data_dir, tmp_path / folder, **steps) for folder in ("resumed", "three_ranks", "one_process")]
    train_on_two_ranks_in_turn([(config, True) for config in resumed])
    assert losses(out_dir)[-3:] == losses(tmp_path / "whole")[-3:]
    told = capfd.readouterr().err.split("rank 0: run ")
    assert len(told) == 1 + len(resumed)  # rank 0's output, each run's part of it: what it warned is read
    for run, why in [
        (2, "holds the compression state of 3 ranks, not 2"),
        (3, "holds no compression state (saved by one process, which exchanges no gradients)"),  # not "of 0 ranks"
    ]:
        warning = f"{why}; grad_compression={scheme} starts afresh"
        assert [part.count(warning) for part in told] == [int(i == run) for i in range(len(told))], run  # rank 0 once


@pytest.mark.parametrize(
    ("asked", "note"),
    [
        ({"grad_compression": "powersgd"}, "grad_compression=powersgd compresses the gradients ranks exchange"),
        ({"parallel": "fsdp"}, "parallel=fsdp shards the parameters, gradients and optimizer state over the ranks"),
    ],
)
def test_scale_out_asked_of_one_process_is_said_to_do_nothing(data_dir, tmp_path, capfd, asked, note):  # noqa: F811
    """parallel=fsdp in one process trained the whole model as ddp's one process does, saying nothing."""
    train(run_config(data_dir, tmp_path / "one", max_steps=1, eval_every=0, save_every=0, **asked))
    assert f"note: {note}; this run is one process" in capfd.readouterr().err


def test_expert_parallel_asked_of_one_process_is_refused_naming_torchrun(data_dir, tmp_path):  # noqa: F811
    """It said 'expert_parallel=2 must equal the number of ranks (1)', not that the run was one process nor how to
    start it on 2."""
    with pytest.raises(ConfigError) as refused:
        train(run_config(data_dir, tmp_path / "one", expert_parallel=2, max_steps=1, eval_every=0, save_every=0))
    assert str(refused.value) == (
        "expert_parallel=2 splits the routed experts over as many ranks; this run is one process: start it with "
        "torchrun --nproc-per-node 2, or set expert_parallel=1"
    )


def _train_rank_ctrl_c_on_rank_0_in_step_3(rank: int, world_size: int, port: int, config, resume) -> None:
    """A rank of a run whose rank 0 alone gets Ctrl-C at the start of the third step, before its collectives."""
    from seekstack.train import trainer

    train_step = trainer._Run.train_step

    def interrupted_step(self):
        if rank == 0 and self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return train_step(self)

    trainer._Run.train_step = interrupted_step
    _train_rank(rank, world_size, port, config, resume)


def test_ctrl_c_reaching_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint_that_resumes_exactly(
    data_dir,  # noqa: F811
    tmp_path,
):
    steps = dict(max_steps=5, eval_every=0, save_every=0)
    single = train(run_config(data_dir, tmp_path / "one", **steps))
    # a budget for the whole run, spawn and peak probes included: on 2 cores beside 2 busy processes it took 84-98 s
    train_on_two_ranks_within(
        300, run_config(data_dir, tmp_path / "cut", **steps), _train_rank_ctrl_c_on_rank_0_in_step_3
    )
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_3"]  # the step it reached was finished
    train_on_two_ranks(run_config(data_dir, tmp_path / "cut", **steps), resume=True)
    assert losses(tmp_path / "cut") == pytest.approx(single.losses, abs=1e-5)


def test_a_sharded_optimizer_state_loads_in_one_process_without_torch_warning_of_it(tmp_path):
    """A run resumed alone from an FSDP checkpoint: torch warned 'torch.distributed is disabled, ... assuming the
    intent is to load in a single process', with a line of its own source, on every such resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from seekstack.parallel.fsdp import load_optimizer

    torch.manual_seed(0)
    saved_model = torch.nn.Linear(4, 3)
    saved_optimizer = torch.optim.AdamW(saved_model.parameters())
    saved_model(torch.randn(2, 4)).sum().backward()
    saved_optimizer.step()
    dcp.save(
        {"optimizer": get_optimizer_state_dict(saved_model, saved_optimizer)}, checkpoint_id=tmp_path, no_dist=True
    )
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_optimizer(model, optimizer, tmp_path)
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(optimizer.state[model.weight][name], saved_optimizer.state[saved_model.weight][name])


def test_a_sharded_optimizer_item_whose_pickle_would_run_code_is_refused_naming_its_shard(tmp_path):
    """torch's DefaultLoadPlanner reads the items that are no tensors (a param group's lr, betas) with
    torch.load(weights_only=False): a shard from elsewhere ran its code on --resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from seekstack.parallel.fsdp import load_optimizer

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    state = get_optimizer_state_dict(model, optimizer)
    opened = tmp_path / "opened"
    state["param_groups"][0]["lr"] = _OpensAFileWhenLoaded(opened)
    dcp.save({"optimizer": state}, checkpoint_id=tmp_path / "optimizer", no_dist=True)
    with pytest.raises(CheckpointError) as refused:
        load_optimizer(model, optimizer, tmp_path / "optimizer")
    assert not opened.exists()
    (shard,) = (tmp_path / "optimizer").glob("*.distcp")
    assert str(refused.value) == (
        f"{shard}: holds a Python object of io.open, which no torch.distributed.checkpoint save writes and which "
        "loading would run: refused; it was not written by seekstack, or altered since"
    )


def test_expert_parallel_runs_its_experts_as_the_layer_does_without_a_torch_deprecation_warning(tmp_path):
    """The tokens' all-to-all went through torch.distributed.nn.functional.all_to_all_single, which warned (a
    FutureWarning: deprecated) on every rank of every expert-parallel run."""
    from seekstack.config import ModelConfig
    from seekstack.model.moe import RoutedExperts, Routing
    from seekstack.parallel.distributed import Ranks
    from seekstack.parallel.expert import ShardedExperts

    torch.manual_seed(0)
    experts = RoutedExperts(ModelConfig(**MICRO_MODEL))
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(6, MICRO_MODEL["hidden_size"], requires_grad=True)
    chosen = torch.tensor([[0, 3], [1, 2], [3, 1], [0, 2], [2, 3], [1, 0]])  # (N, K) of the 4 experts
    routing = Routing(torch.rand(6, 2), chosen, torch.rand(6, 4))
    reference = experts(x, routing)
    (expected_grad,) = torch.autograd.grad(reference.square().sum(), x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = ShardedExperts(experts, Ranks(0, 1, torch.device("cpu")))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = sharded(x, routing)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, expected_grad)


def _experts_and_tokens() -> tuple:
    """The micro model's 4 routed experts and 6 tokens, each routed to experts 0 and 1 alone."""
    from seekstack.config import ModelConfig
    from seekstack.model.moe import RoutedExperts, Routing

    torch.manual_seed(0)
    experts = RoutedExperts(ModelConfig(**MICRO_MODEL))
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.1)
    x = torch.randn(6, MICRO_MODEL["hidden_size"], requires_grad=True)  # a layer's input, as in a model
    routing = Routing(torch.rand(6, 2), torch.tensor([[0, 1], [1, 0]] * 3), torch.rand(6, 4))
    return experts, x, routing


def _adamw_stepped(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    torch.optim.AdamW(params, lr=0.1, weight_decay=0.5).step()
    return [param.detach().clone() for param in params]


def _experts_rank(rank: int, world_size: int, port: int, results) -> None:
    from seekstack.model.moe import Routing
    from seekstack.parallel.distributed import Ranks
    from seekstack.parallel.expert import ShardedExperts

    _join(rank, world_size, port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=15))
    experts, x, routing = _experts_and_tokens()
    rows = slice(rank * 3, rank * 3 + 3)  # this rank's tokens of the global batch
    sharded = ShardedExperts(experts, Ranks(rank, world_size, torch.device("cpu")))
    out = sharded(x[rows], Routing(routing.weights[rows], routing.experts[rows], routing.scores[rows]))
    out.square().sum().backward()
    results[rank] = _adamw_stepped([sharded.gate_up_proj, sharded.down_proj])
    dist.destroy_process_group()


def test_expert_parallel_steps_a_ranks_experts_that_got_no_token_as_one_process_does():
    """A rank none of whose experts was chosen in a step left them without a gradient (None), so AdamW skipped them:
    no weight decay, no momentum, where one process's stacked experts get a zero gradient for them and are stepped."""
    experts, x, routing = _experts_and_tokens()
    out = experts(x, routing)
    out.square().sum().backward()
    expected = _adamw_stepped([experts.gate_up_proj, experts.down_proj])
    results = mp.Manager().dict()
    spawn(_experts_rank, (2, free_port(), results))
    for index, name in enumerate(("gate_up_proj", "down_proj")):
        whole = torch.cat([results[0][index], results[1][index]])  # rank 1 holds experts 2 and 3, never chosen
        torch.testing.assert_close(whole, expected[index], atol=1e-6, rtol=1e-5, msg=name)
