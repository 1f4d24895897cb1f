"""The fused CPU kernels' build and load (cpu_kernels.py): what a user is told when the library cannot be used."""

from __future__ import annotations

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
