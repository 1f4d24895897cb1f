"""Runs a bench script as `python bench/SCRIPT ...` would, but in the test's process: a refusal test then costs
the script's argument parsing, not a fresh interpreter importing torch (~5 CPU seconds each)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_refused(script: str, *options: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """bench/`script` run as __main__ with `options`, which it must refuse with exit status 2 (argparse's); its
    stderr. The thread count it sets and the sibling folder it puts on sys.path are undone afterwards."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *options])
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])  # its siblings (options.py, peers.py), as when run
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(BENCH / script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr[-500:]
    return stderr
