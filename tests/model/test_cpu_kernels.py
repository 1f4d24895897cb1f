"""The fused CPU kernels' build and load (cpu_kernels.py): what a user is told when the library cannot be used."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
import torch.utils.cpp_extension

from seekstack.model import cpu_kernels


def test_a_library_that_does_not_load_is_warned_of_with_the_loaders_reason(tmp_path, monkeypatch):
    """torch says "Could not load this library: PATH" and keeps why (an undefined symbol of an edited kernel, a
    damaged file) as the exception's cause; the warning said only the first part."""
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(b"not a shared library" * 100)

    def load_the_damaged_library(**kwargs):
        torch.ops.load_library(str(damaged))

    monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load_the_damaged_library)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match=r"Could not load this library: .*damaged\.so \(.*invalid ELF header\)"):
        assert not cpu_kernels.available()


def test_a_library_another_process_just_built_is_loaded_not_dropped_as_unproven(tmp_path, monkeypatch):
    """Two ranks building at once: B waits on A's build lock, which torch removes before A loads the library and
    proves it; B took A's new library for a truncated one and deleted it (A then ran without kernels, or B rebuilt)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels._build_folder(tmp_path)
    folder.mkdir(parents=True)
    name = f"{cpu_kernels.NAME}_{hashlib.sha256(cpu_kernels.SOURCE.read_bytes()).hexdigest()[:8]}"
    library = folder / f"{name}.so"
    (folder / "lock").touch()  # A building

    def a_finishes_its_build(seconds):
        library.write_bytes(b"\x7fELF" + bytes(4000))
        (folder / "lock").unlink()  # before A loads the library and writes its proof

    found = []

    def b_loads(**kwargs):
        found.append(library.exists())  # where it is not, B's load rebuilds it (~15 s)
        raise OSError("stop before loading")

    monkeypatch.setattr(time, "sleep", a_finishes_its_build)
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", b_loads)
    with pytest.warns(UserWarning, match="stop before loading"):
        cpu_kernels.available()
    assert found == [True]
