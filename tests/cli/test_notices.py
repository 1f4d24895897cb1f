"""Other libraries' notices to their own developers stay off a seekstack user's terminal; real failures still show."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import seekstack.compress.quantize
from seekstack import cli
from seekstack.cli.notices import quiet_third_party_notices
from tests.adapters.support import write_base, write_random_adapter
from tests.infer.support import model_dir

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


def test_eval_prints_no_lm_eval_notice_about_seekstacks_own_tasks(tmp_path):
    pytest.importorskip("lm_eval")
    model = model_dir(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    modules = [Path(module.__file__) for module in (json.decoder, json.encoder)]  # held-out Python, as the demo's
    rows = [json.dumps({"id": path.name, "text": path.read_text()}) for path in modules]
    (corpus / "val.jsonl").write_text("\n".join(rows) + "\n")
    command = [sys.executable, "-m", "seekstack", "eval", str(model), "--corpus", str(corpus), "--limit", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "| code_cloze | acc |" in result.stdout
    # lm_eval's hint at its own CLI's option, and its defaults for metrics whose aggregation the task did not state
    assert "--metadata" not in result.stderr and "is defined, but" not in result.stderr, result.stderr


def test_a_command_prints_seekstacks_own_warnings_in_one_line_and_other_libraries_in_pythons_format(monkeypatch):
    """`seekstack quantize --scheme fp8` printed '/.../seekstack/compress/quantize.py:383: UserWarning: ...' and the
    line of code that warned, where the commands' own warnings print 'warning: ...'."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # set for this process by the command
    cli.main()  # the seekstack command's callback, run before each command
    ours = seekstack.compress.quantize.__file__
    assert warnings.formatwarning("blocks do not divide", UserWarning, ours, 383, "save(...)") == (
        "warning: blocks do not divide\n"
    )
    assert warnings.formatwarning("deprecated", FutureWarning, torch.__file__, 7, "x()") == (
        f"{torch.__file__}:7: FutureWarning: deprecated\n  x()\n"
    )
