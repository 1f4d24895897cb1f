"""bench/big_model.py: a failed child says why, and sizes that cannot measure a decode rate are refused naming the
option."""

import subprocess
import sys

import pytest

from tests.bench.support import BENCH

SCRIPT = BENCH / "big_model.py"
sys.path.insert(0, str(BENCH))  # its siblings (gguf_deepseek2.py), as when run
from bench.big_model import child  # noqa: E402


def test_a_failed_child_stops_the_run_with_its_command_and_error():
    with pytest.raises(SystemExit) as stopped:
        child("--layers", "many")
    assert str(stopped.value).startswith("bench/big_model.py --layers many failed (exit 2): ")
    assert "invalid int value: 'many'" in str(stopped.value)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--layers", "0", "--layers 0: at least 1"),
        ("--prompt-tokens", "0", "--prompt-tokens 0: at least 1"),
        ("--new-tokens", "1", "--new-tokens 1: at least 2"),
    ],
)
def test_sizes_that_measure_nothing_are_refused_naming_the_option(option, value, message):
    command = [sys.executable, str(SCRIPT), "--layers", "1", "--skip-llama-cpp", option, value]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)  # a hang's bound: loaded, ~80 s
    assert run.returncode == 2
    assert message in run.stderr
