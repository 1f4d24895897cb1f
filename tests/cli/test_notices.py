"""Other libraries' notices to their own developers stay off a seekstack user's terminal; real failures still show."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from seekstack.cli.notices import quiet_third_party_notices
from tests.adapters.support import write_base, write_random_adapter

TORCHAO_KERNEL_FAILURE = (
    "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not "
    "load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so"
)


def test_an_adapter_command_prints_no_torchao_kernel_failures_or_pytree_deprecations_on_a_cpu_build(tmp_path):
    pytest.importorskip("torchao")  # what prints them: peft imports transformers, which imports torchao
    if torch.version.cuda is not None:
        pytest.skip("on a CUDA build torchao's kernels load, or their failure is real and shows")
    base = write_base(tmp_path / "base")
    adapter = write_random_adapter(base, tmp_path / "adapter", seed=1)
    command = [
        sys.executable,
        "-m",
        "seekstack",
        "lora",
        "merge",
        str(base),
        str(adapter),
        "--out",
        str(tmp_path / "m"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"wrote {tmp_path / 'm'}"
    assert "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr


def log_record(logger: str, message: str) -> logging.LogRecord:
    return logging.getLogger(logger).makeRecord(logger, logging.WARNING, __file__, 1, message, (), None)


def test_other_torchao_warnings_and_its_kernel_failures_on_a_cuda_build_still_show(monkeypatch):
    quiet_third_party_notices()
    torchao = logging.getLogger("torchao")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not torchao.filter(log_record("torchao", TORCHAO_KERNEL_FAILURE))
    assert torchao.filter(log_record("torchao", "Skipping import of cpp extensions due to incompatible torch version"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert torchao.filter(log_record("torchao", TORCHAO_KERNEL_FAILURE))
