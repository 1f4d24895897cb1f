"""What torchrun tells each process it starts, through the environment: WORLD_SIZE, RANK and LOCAL_RANK. Read
without torch, so that the command line knows which rank prints before torch loads."""

from __future__ import annotations

import os

TORCHRUN_ADVICE = "start the run with torchrun, which sets them, or unset WORLD_SIZE to train in one process"


def launch_environment() -> tuple[int, int]:
    """WORLD_SIZE and RANK as torchrun sets them (1, 0 when WORLD_SIZE is not set, whatever RANK is left in the
    environment); ValueError naming the variable where one was set by hand and cannot be right."""
    world_size = _environment_number("WORLD_SIZE", "1")
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE={world_size} is not a number of processes; {TORCHRUN_ADVICE}")
    if world_size == 1:
        return 1, 0
    if "RANK" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world_size} is set but RANK is not; {TORCHRUN_ADVICE}")
    rank = _environment_number("RANK", "0")
    if rank < 0:
        raise ValueError(f"RANK={rank} is negative: ranks count from 0 to WORLD_SIZE-1; {TORCHRUN_ADVICE}")
    if rank >= world_size:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world_size}; {TORCHRUN_ADVICE}")
    return world_size, rank


def local_gpu(world_size: int, gpus: int) -> int:
    """LOCAL_RANK as torchrun sets it: the GPU of its machine a rank of `world_size` computes on, cuda:LOCAL_RANK of
    the `gpus` visible; ValueError naming it where it is unset (every rank took cuda:0) or names no visible GPU."""
    if "LOCAL_RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set but LOCAL_RANK is not: each rank computes on GPU cuda:LOCAL_RANK of its "
            f"machine, and without it every rank would take cuda:0; {TORCHRUN_ADVICE}"
        )
    local_rank = _environment_number("LOCAL_RANK", "0")
    if not 0 <= local_rank < gpus:
        raise ValueError(
            f"LOCAL_RANK={local_rank} names no GPU of this machine, which shows {gpus} (cuda:0 to cuda:{gpus - 1}, "
            f"as CUDA_VISIBLE_DEVICES allows): start at most {gpus} ranks on it (torchrun --nproc-per-node {gpus})"
        )
    return local_rank


def require_rendezvous_address(world_size: int) -> None:
    """ValueError naming MASTER_ADDR or MASTER_PORT where either is missing or empty, or MASTER_PORT where it is no
    TCP port: where the ranks meet to join their process group (torchrun sets both; torch's refusals said that one
    was 'expected' and not what to do, or 'invalid literal for int()' naming no variable)."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: the ranks join at MASTER_ADDR:MASTER_PORT, on rank 0's "
            f"machine; {TORCHRUN_ADVICE}"
        )
    port = _environment_number("MASTER_PORT", "")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is no TCP port (1 to 65535) for the ranks to join at; {TORCHRUN_ADVICE}")


def _environment_number(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number; {TORCHRUN_ADVICE}") from None


def launch_rank() -> int:
    """This process's RANK as `launch_environment` reads it: 0 in a run of one process (WORLD_SIZE unset, whatever
    RANK is left in the environment: that run prints its errors), and 0 too where the environment cannot be right,
    which `launch_environment` refuses naming the variable: that error is then printed, as rank 0's, not lost in a
    traceback."""
    try:
        return launch_environment()[1]
    except ValueError:
        return 0
