"""The data benchmarks' corpora folder (bench/data_corpora.py writes it; data_clean, data_quality, data_datatrove
and data_selection read it): --help is help, a folder without the corpora is refused naming it, and datatrove not
installed is skipped in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.support import BENCH, run_in_process


def run_bench(script: str, *args: str, cwd: Path, without: str = "") -> subprocess.CompletedProcess:
    """bench/`script` with `args` in `cwd`, in a fresh interpreter: for the runs that would loop for ever if they
    regressed (the timeout fails them); `without`: a package made unimportable first, as if not installed."""
    launcher = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({without.split()!r})); "
        f"sys.path.insert(0, {str(BENCH)!r}); sys.argv = [{script!r}, *{list(args)!r}]; "
        f"runpy.run_path({str(BENCH / script)!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", launcher], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def run_here(tmp_path, monkeypatch, capsys):
    """bench/SCRIPT run in this process in tmp_path, as run_bench runs it; `without` made unimportable meanwhile."""

    def run(script: str, *args: str, without: str = "") -> subprocess.CompletedProcess:
        monkeypatch.chdir(tmp_path)
        return run_in_process(script, *args, monkeypatch=monkeypatch, capsys=capsys, without=without)

    return run


def test_data_corpora_help_prints_usage_and_writes_no_folder_named_help(tmp_path, run_here):
    run = run_here("data_corpora.py", "--help")
    assert run.returncode == 0
    assert "usage:" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_corpora_readers_refuse_a_folder_without_the_corpora_naming_folder_and_files(tmp_path, run_here):
    (tmp_path / "code.jsonl").write_text("")
    for script in ("data_clean.py", "data_quality.py", "data_datatrove.py", "data_selection.py"):
        run = run_here(script, str(tmp_path))
        assert run.returncode == 2, script
        assert f"{tmp_path} has no prose.jsonl, zh.jsonl" in run.stderr, script
        assert "bench/data_corpora.py" in run.stderr, script


def test_datatrove_not_installed_is_skipped_in_one_line_and_ours_still_runs(tmp_path, run_here):
    for name in ("code", "prose", "zh"):
        line = json.dumps({"id": f"{name}/1", "text": "The cat sat on the mat and looked at the door. " * 20})
        (tmp_path / f"{name}.jsonl").write_text(line + "\n")
    run = run_here("data_datatrove.py", str(tmp_path), without="datatrove spacy")
    assert run.returncode == 0, run.stderr
    assert "datatrove: skipped, datatrove and spacy not installed (pip install datatrove spacy)" in run.stdout
    rows = [line.split()[:2] for line in run.stdout.splitlines()[1:]]
    assert rows == [["code.jsonl", "ours"], ["prose.jsonl", "ours"], ["zh.jsonl", "ours"]]


def test_data_throughput_refuses_a_folder_without_the_corpora_instead_of_looping_for_ever(tmp_path):
    run = run_bench("data_throughput.py", "--corpora", str(tmp_path / "nope"), "--mib", "1", cwd=tmp_path)
    assert run.returncode == 2
    assert f"--corpora {tmp_path / 'nope'} has no code.jsonl, prose.jsonl, zh.jsonl" in run.stderr


def test_data_throughput_stops_on_corpora_that_hold_no_text_instead_of_looping_for_ever(tmp_path):
    for name in ("code", "prose", "zh"):
        (tmp_path / f"{name}.jsonl").write_text("")
    run = run_bench("data_throughput.py", "--corpora", str(tmp_path), "--mib", "1", "--workers", "1", cwd=tmp_path)
    assert run.returncode == 1
    assert f"--corpora {tmp_path}: code.jsonl, prose.jsonl, zh.jsonl hold no text" in run.stderr


@pytest.mark.parametrize("mib", ["0", "inf"])
def test_data_throughput_refuses_zero_or_endless_mib(tmp_path, run_here, mib):
    """--mib inf passed `> 0` and built documents until the disk filled."""
    for name in ("code", "prose", "zh"):
        (tmp_path / f"{name}.jsonl").write_text("")
    run = run_here("data_throughput.py", "--corpora", str(tmp_path), "--mib", mib)
    assert run.returncode == 2
    assert f"--mib {float(mib)}: more than 0 MiB of documents to build, a finite number" in run.stderr


def test_datatrove_bench_skips_an_empty_corpus_in_one_line_instead_of_dividing_by_zero(tmp_path, run_here):
    """data_corpora.py writes an empty zh.jsonl on a machine without Chinese text: the bench died in
    ZeroDivisionError computing the share kept."""
    for name in ("code", "prose"):
        line = json.dumps({"id": f"{name}/1", "text": "The cat sat on the mat and looked at the door. " * 20})
        (tmp_path / f"{name}.jsonl").write_text(line + "\n")
    (tmp_path / "zh.jsonl").write_text("")
    run = run_here("data_datatrove.py", str(tmp_path), without="datatrove spacy")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()[1:]
    assert [line.split()[:2] for line in lines[:2]] == [["code.jsonl", "ours"], ["prose.jsonl", "ours"]]
    assert lines[2:] == ["zh.jsonl     skipped: no documents (bench/data_corpora.py found no source text for it)"]
