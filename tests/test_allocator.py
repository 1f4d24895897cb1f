import os
import resource
import subprocess
import sys

import pytest
import torch

from seekstack.allocator import OFF_SWITCH, USER_SETTINGS, keep_freed_memory

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="glibc's malloc only",
)


@pytest.fixture(autouse=True)
def _no_malloc_settings_of_the_runs_own(monkeypatch):
    """The tests' own shell may set glibc's thresholds or the off switch: each test starts without them."""
    for name in [*USER_SETTINGS, OFF_SWITCH, "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name, raising=False)


def _faults_of_a_fresh_64_mib_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(32 << 20, dtype=torch.bfloat16).fill_(1)  # a 4 x 512 `small` forward's logits, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


@glibc
def test_a_large_tensor_freed_and_made_again_reuses_pages_already_faulted_in():
    keep_freed_memory()  # as the seekstack command does for its process
    for _ in range(8):  # glibc's memalign needs a little more than a freed block: a few rounds until they merge
        _faults_of_a_fresh_64_mib_tensor()
    faults = min(_faults_of_a_fresh_64_mib_tensor() for _ in range(3))
    assert faults < 1_000, f"{faults} page faults: 64 MiB mmap'd afresh (16,384 faults) on every allocation"


@glibc
def test_a_freed_tensor_above_the_heap_threshold_goes_back_to_the_system():
    keep_freed_memory()
    before = _resident_bytes()
    weight = torch.empty(300 << 20, dtype=torch.uint8).fill_(1)  # a real-size model's stacked experts
    assert _resident_bytes() - before > 250 << 20
    del weight
    assert _resident_bytes() - before < 50 << 20, "300 MiB freed and still resident: kept in the heap"


@glibc
@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
        ("SEEKSTACK_KEEP_FREED_MEMORY", "0"),
        ("SEEKSTACK_KEEP_FREED_MEMORY", "false"),
        ("SEEKSTACK_KEEP_FREED_MEMORY", "Off"),
    ],
)
def test_the_users_own_malloc_thresholds_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False
    monkeypatch.delenv(name)
    assert keep_freed_memory() is True


@glibc
def test_importing_the_model_leaves_glibc_alone_and_the_seekstack_command_sets_it():
    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_allocator import _faults_of_a_fresh_64_mib_tensor as faults
import seekstack.model
from seekstack.cli import main
print(min(faults() for _ in range(3)))
main()  # the command's callback, run before every subcommand
for _ in range(8):
    faults()
print(min(faults() for _ in range(3)))
"""
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_"))}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True)
    imported, commanded = map(int, run.stdout.split())
    assert imported > 10_000, f"{imported} page faults: importing seekstack.model changed the process's malloc"
    assert commanded < 1_000, f"{commanded} page faults: the seekstack command left glibc's mmap threshold"
