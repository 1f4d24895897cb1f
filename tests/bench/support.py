"""Runs a bench script as `python bench/SCRIPT ...` would, but in the test's process: a refusal test then costs
the script's argument parsing, not a fresh interpreter importing torch (~5 CPU seconds each). Only sys.argv,
sys.path, os.environ, the working directory and torch's thread count are undone afterwards, so it is only for
scripts that refuse before doing any work: the seeds a script sets, the threads it starts and the modules it imports
stay as it left them (a run that works goes in a subprocess)."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_in_process(
    script: str,
    *options: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    limit_s: int = 120,
    without: str = "",
) -> subprocess.CompletedProcess:
    """bench/`script` run as __main__ with `options`; its exit status, stdout and stderr as the interpreter gives
    them (sys.exit("message") is status 1 with the message on stderr). Its sys.argv, the sibling folder it puts on
    sys.path (at the test's end, through `monkeypatch`), the environment variables it sets or removes (the whole of
    os.environ: bench/eval_parity.py sets HF_DATASETS_OFFLINE at import), the working directory it changes to and
    the thread count it sets are undone, nothing else. A
    script still running after `limit_s` seconds fails the test (SIGALRM; pytest's Failed is a BaseException, so the
    script's `except Exception` cannot swallow it), as the subprocess runs' timeout did: a refusal that regressed
    does not run a whole benchmark in the test's process. `without`: packages (space-separated) unimportable for the
    test, as if not installed."""
    for name in without.split():
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *options])
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])  # its siblings (options.py, peers.py), as when run
    threads, status, message = torch.get_num_threads(), 0, ""
    environ, cwd = dict(os.environ), os.getcwd()
    alarm = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"{script}: no refusal within {limit_s} s"))
    signal.alarm(limit_s)
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    except SystemExit as exited:
        if exited.code is None or isinstance(exited.code, int):
            status = exited.code or 0
        else:
            status, message = 1, f"{exited.code}\n"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        torch.set_num_threads(threads)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, status, captured.out, captured.err + message)
