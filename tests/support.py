"""Helpers the tests of several packages share."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from multiprocessing import reduction
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import torch.multiprocessing as mp

T = TypeVar("T")


@contextlib.contextmanager
def edited_json(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON object in `path` (a checkpoint's config.json, its safetensors index) as a dict, written back as the
    with block leaves it."""
    edited = json.loads(path.read_text())
    yield edited
    path.write_text(json.dumps(edited))


def fp8_block_warnings(action: Callable[[], T]) -> tuple[T, list[str]]:
    """What `action()` returns, and the fp8 block warnings (`warn_fp8_blocks_transformers_misreads`'s, naming
    weight_block_size) it gave, each given however often the same one was given before."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = action()
    return value, [str(warning.message) for warning in caught if "weight_block_size" in str(warning.message)]


def free_ports(count: int) -> list[int]:
    """`count` different free ports on 127.0.0.1, all held at once while they are picked."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    """A free port on 127.0.0.1 (a rendezvous' MASTER_PORT, a server's port)."""
    return free_ports(1)[0]


SPAWN_LIMIT_S = 300  # ranks that all hang (a collective none of them leaves) would otherwise hold the test for ever


def spawn(
    rank_main: Callable[..., None], args: tuple, nprocs: int = 2, join: bool = True, limit_s: float = SPAWN_LIMIT_S
) -> mp.ProcessContext | None:
    """`mp.spawn(rank_main, args, nprocs, join)`, each rank forked from one server process per pytest worker that
    imported torch and the first spawning test's module (seekstack with it, ~4 s of a CPU) once, not a fresh
    interpreter importing them again for every rank; the rank writes to the test's output and runs in its
    environment, as a spawned one does. Joined ranks still running after `limit_s` seconds write where each of their
    threads is (a Python stack each) to the test's stderr, are killed, and the test fails, naming them."""
    mp.set_forkserver_preload([rank_main.__module__])  # read once, when the first spawn starts the server
    ranks_args = (rank_main, args, _TestsOutput(), dict(os.environ))
    context = mp.start_processes(_rank_as_spawned, ranks_args, nprocs, join=False, start_method="forkserver")
    if not join:
        return context
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1):  # raises, ending the others, when a rank fails
        if time.monotonic() > deadline:
            running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for rank in running:  # one at a time: two ranks' stacks written at once interleave on the one stderr
                os.kill(context.processes[rank].pid, signal.SIGUSR1)
                time.sleep(0.5)  # its stack written
            for process in context.processes:
                process.kill()
                process.join()
            ranks = " and ".join(map(str, running))
            pytest.fail(
                f"{rank_main.__name__}: rank {ranks} still ran after {limit_s} s (hung?), killed; where each was is in "
                "the captured stderr"
            )
    return None


class _TestsOutput:
    """The spawning test's stdout and stderr (pytest's capture of them), handed to a rank, whose own are the fork
    server's: those of the test that started it."""

    def __reduce__(self):
        return tuple, ([reduction.DupFd(fd) for fd in (1, 2)],)


def _rank_as_spawned(rank: int, rank_main: Callable[..., None], args: tuple, outputs: tuple, environ: dict) -> None:
    """`rank_main(rank, *args)` writing to the test's `outputs` in the test's `environ`, not the fork server's."""
    for fd, output in zip((1, 2), outputs, strict=True):
        os.dup2(output.detach(), fd)
    os.environ.clear()
    os.environ.update(environ)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where each thread is, to the test's stderr, on a hang
    rank_main(rank, *args)


def mm_beside_a_busy_process(off_core_seconds: float, threads_seen: set[int] | None = None) -> Callable[..., None]:
    """A stand-in for torch.mm that takes 1 ms of its thread's CPU time and `off_core_seconds` more off the core (as
    when another process holds it), noting in `threads_seen` the torch thread count it ran under."""

    def mm(lhs: torch.Tensor, rhs: torch.Tensor) -> None:
        if threads_seen is not None:
            threads_seen.add(torch.get_num_threads())
        start = time.thread_time()
        while time.thread_time() - start < 1e-3:
            pass
        time.sleep(off_core_seconds)

    return mm
