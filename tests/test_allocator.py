import os
import resource
import sys

import pytest
import torch

import seekstack.model  # noqa: F401  (importing the model sets the allocator, as every forward's process does)
from seekstack.allocator import keep_freed_memory

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
    reason="glibc's malloc only",
)


def _faults_of_a_fresh_64_mib_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(32 << 20, dtype=torch.bfloat16).fill_(1)  # a 4 x 512 `small` forward's logits, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_a_large_tensor_freed_and_made_again_reuses_pages_already_faulted_in():
    for _ in range(8):  # glibc's memalign needs a little more than a freed block: a few rounds until they merge
        _faults_of_a_fresh_64_mib_tensor()
    faults = min(_faults_of_a_fresh_64_mib_tensor() for _ in range(3))
    assert faults < 1_000, f"{faults} page faults: 64 MiB mmap'd afresh (16,384 faults) on every allocation"


@glibc
@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
    ],
)
def test_the_users_own_malloc_thresholds_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False
    monkeypatch.delenv(name)
    assert keep_freed_memory() is True
