"""tests/bench/support.py's run_in_process: a script that does not stop in time fails the test, as the subprocess
runs' timeout did, and the alarm, environment variables and working directory it set are gone afterwards."""

import os
import signal

import pytest

from tests.bench.support import run_in_process


def test_a_script_still_running_after_the_limit_fails_the_test_even_through_except_exception(
    tmp_path, monkeypatch, capsys
):
    script = tmp_path / "waits.py"
    script.write_text("import time\ntry:\n    time.sleep(30)\nexcept Exception:\n    print('swallowed')\n")
    handler = signal.getsignal(signal.SIGALRM)
    with pytest.raises(pytest.fail.Exception, match=f"{script}: no refusal within 1 s"):
        run_in_process(str(script), monkeypatch=monkeypatch, capsys=capsys, limit_s=1)
    assert "swallowed" not in capsys.readouterr().out
    assert signal.getsignal(signal.SIGALRM) is handler and signal.alarm(0) == 0  # handler back, no alarm pending


def test_a_script_that_stops_in_time_leaves_no_alarm_behind(tmp_path, monkeypatch, capsys):
    script = tmp_path / "refuses.py"
    script.write_text("import sys\nsys.exit('refused')\n")
    handler = signal.getsignal(signal.SIGALRM)
    run = run_in_process(str(script), monkeypatch=monkeypatch, capsys=capsys, limit_s=5)
    assert (run.returncode, run.stderr) == (1, "refused\n")
    assert signal.getsignal(signal.SIGALRM) is handler and signal.alarm(0) == 0


def test_a_script_that_sets_the_environment_and_changes_folder_leaves_both_as_they_were(tmp_path, monkeypatch, capsys):
    script, elsewhere = tmp_path / "moves.py", tmp_path / "elsewhere"
    elsewhere.mkdir()
    script.write_text(
        "import os, sys\n"
        "os.environ.setdefault('SEEKSTACK_SUPPORT_PROBE', '1')\n"
        "os.environ.pop('SEEKSTACK_SUPPORT_GONE')\n"
        f"os.chdir({str(elsewhere)!r})\n"
        "sys.exit('refused')\n"
    )
    monkeypatch.setenv("SEEKSTACK_SUPPORT_GONE", "kept")
    environ, cwd = dict(os.environ), os.getcwd()
    run = run_in_process(str(script), monkeypatch=monkeypatch, capsys=capsys, limit_s=5)
    assert (run.returncode, run.stderr) == (1, "refused\n")
    assert "SEEKSTACK_SUPPORT_PROBE" not in os.environ and os.environ["SEEKSTACK_SUPPORT_GONE"] == "kept"
    assert (dict(os.environ), os.getcwd()) == (environ, cwd)
