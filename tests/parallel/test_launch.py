"""What torchrun tells a process through its environment, as the command line reads it before torch loads."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from seekstack.cli import app


@pytest.mark.parametrize("rank", ["x", ""])
def test_a_rank_that_is_no_number_is_refused_by_the_command_naming_it_not_in_a_traceback(
    tmp_path, torchrun_environment, rank
):
    """RANK='x' beside WORLD_SIZE=2: the command line read RANK to know which rank prints, before the refusal that
    names it, and ended in 'ValueError: invalid literal for int() with base 10' with a traceback."""
    torchrun_environment(rank)
    result = CliRunner().invoke(app, ["train", "max_steps=1", f"out_dir={tmp_path / 'run'}"])
    assert (result.exit_code, result.output) == (
        1,
        f"error: RANK={rank!r} is not a whole number; start the run with torchrun, which sets them, or unset "
        "WORLD_SIZE to train in one process\n",
    )


def test_a_negative_rank_is_refused_as_negative(torchrun_environment):
    """RANK=-1 beside WORLD_SIZE=2 was refused as 'RANK=-1 is not below WORLD_SIZE=2', which it is."""
    from seekstack.parallel.launch import launch_environment

    torchrun_environment(-1)
    with pytest.raises(ValueError) as refused:
        launch_environment()
    assert str(refused.value) == (
        "RANK=-1 is negative: ranks count from 0 to WORLD_SIZE-1; start the run with torchrun, which sets them, or "
        "unset WORLD_SIZE to train in one process"
    )


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"MASTER_PORT": "29500"}, "MASTER_ADDR is"),
        ({"MASTER_ADDR": "", "MASTER_PORT": "29500"}, "MASTER_ADDR is"),
        ({}, "MASTER_ADDR and MASTER_PORT are"),
    ],
)
def test_ranks_without_the_address_to_join_at_are_refused_naming_it_and_the_way_on(
    tmp_path, torchrun_environment, given, named
):
    """torch's refusal said 'environment variable MASTER_ADDR expected, but not set', and not what to do (also where
    MASTER_ADDR is set empty, which passed as set)."""
    torchrun_environment(0, **given)
    result = CliRunner().invoke(app, ["train", "max_steps=1", f"out_dir={tmp_path / 'run'}"])
    assert (result.exit_code, result.output) == (
        1,
        f"error: WORLD_SIZE=2 is set but {named} not: the ranks join at MASTER_ADDR:MASTER_PORT, on rank 0's "
        "machine; start the run with torchrun, which sets them, or unset WORLD_SIZE to train in one process\n",
    )


def test_a_rank_left_in_the_environment_without_world_size_is_a_run_of_one_process_that_prints_its_errors(
    tmp_path, torchrun_environment
):
    """RANK=1 without WORLD_SIZE (left from another job's environment): the run trained in one process, as torch
    does, but its errors were those of a rank but 0, which say nothing: a typo exited 1 without a word."""
    torchrun_environment(1, WORLD_SIZE=None)
    result = CliRunner().invoke(app, ["train", "max_stepz=1", f"out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 1 and result.output.startswith(
        "error: override 'max_stepz=1': unknown field 'max_stepz'; did you mean 'max_steps'?"
    ), result.output


@pytest.mark.parametrize(
    ("port", "named"),
    [("abc", "MASTER_PORT='abc' is not a whole number"), ("99999", "MASTER_PORT=99999 is no TCP port (1 to 65535)")],
)
def test_a_master_port_that_is_no_port_is_refused_naming_it(tmp_path, torchrun_environment, port, named):
    """torch's refusal of MASTER_PORT=abc was 'invalid literal for int() with base 10: 'abc'', naming no variable."""
    torchrun_environment(0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    result = CliRunner().invoke(app, ["train", "max_steps=1", f"out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 1 and result.output.startswith(f"error: {named}"), result.output
    assert result.output.endswith(
        "; start the run with torchrun, which sets them, or unset WORLD_SIZE to train in one process\n"
    )


def test_without_the_address_to_join_at_a_gpu_rank_is_refused_naming_it_as_a_cpu_rank_is(
    monkeypatch, torchrun_environment
):
    """On a GPU machine LOCAL_RANK was read before the address: a launch environment set by hand without MASTER_ADDR
    was refused for its LOCAL_RANK there, for MASTER_ADDR on CPUs (and the tests of that refusal failed on GPUs)."""
    import torch

    from seekstack.parallel.distributed import init_distributed

    torchrun_environment(1, LOCAL_RANK=None, MASTER_PORT="29500")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="^WORLD_SIZE=2 is set but MASTER_ADDR is not: the ranks join at MASTER_ADDR"):
        init_distributed()


JOINING_ALONE = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a shell's background job ignores it
from seekstack.parallel.distributed import init_distributed
print("joining", flush=True)
try:
    init_distributed()
except KeyboardInterrupt:
    sys.exit(130)
"""


def listened_at(port: int) -> bool:
    """Whether a process listens at `port` on this machine: the port can no longer be bound."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_ctrl_c_while_a_rank_waits_for_the_others_to_join_ends_it_at_once(torchrun_environment):
    """A rank started before the others (or without them) waits in torch's rendezvous, native code that Ctrl-C did
    not reach: it went on waiting, up to gloo's 30 minutes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun_environment(0, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # the rank started alone
    rank = subprocess.Popen([sys.executable, "-c", JOINING_ALONE], stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline() == "joining\n"
        deadline = time.monotonic() + 120
        while not listened_at(port):  # rank 0 holds the rendezvous: listening, it waits for the others in native code
            assert rank.poll() is None and time.monotonic() < deadline, "the rank never waited at its port"
            time.sleep(0.05)
        rank.send_signal(signal.SIGINT)
        assert rank.wait(timeout=30) == 130
    finally:
        rank.kill()
        rank.wait()


def test_a_master_port_another_process_listens_at_is_refused_by_the_command_naming_it_not_in_a_traceback(
    tmp_path, torchrun_environment
):
    """Rank 0 started by hand at a MASTER_PORT in use (another run's) ended in a traceback of torch's DistNetworkError
    'The server socket has failed to listen on any local network address', naming no variable."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        torchrun_environment(0, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        result = CliRunner().invoke(app, ["train", "max_steps=1", f"out_dir={tmp_path / 'run'}"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(
        f"error: the ranks' store at MASTER_ADDR:MASTER_PORT (127.0.0.1:{port}), which rank 0 serves, failed: "
        "The server socket has failed to listen"
    ), result.output
    assert "give a MASTER_PORT no other process on rank 0's machine listens at" in result.output
    assert "or another rank of this run was given RANK=0 too" in result.output  # the same command started twice


def test_a_rank_that_does_not_reach_rank_0s_store_is_told_to_start_rank_0_not_to_free_a_port(
    tmp_path, monkeypatch, torchrun_environment
):
    """Rank 1 started by hand that met no rank 0 at MASTER_ADDR:MASTER_PORT within torch's 30 minutes was told to give
    a MASTER_PORT no other process listens at, rank 0's advice, after torch's own sentence ('...29500).;')."""
    import torch.distributed as dist

    timed_out = "The client socket has timed out after 1800000ms while trying to connect to (127.0.0.1, 29500)."

    def not_reached(url):
        raise dist.DistNetworkError(timed_out)

    monkeypatch.setattr(dist, "rendezvous", not_reached)
    torchrun_environment(1, LOCAL_RANK=None, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    result = CliRunner().invoke(app, ["train", "max_steps=1", f"out_dir={tmp_path / 'run'}"])
    assert (result.exit_code, result.output) == (
        1,
        "error (rank 1): the ranks' store at MASTER_ADDR:MASTER_PORT (127.0.0.1:29500), which rank 0 serves, "
        f"failed: {timed_out[:-1]}; start rank 0 with the same MASTER_PORT (it was not started, or has ended) and give "
        "a MASTER_ADDR this machine reaches rank 0's at, or start the run with torchrun, which picks a free port\n",
    )
