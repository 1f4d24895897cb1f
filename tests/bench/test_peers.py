"""A peer the benchmarks time ours against (trl, llama.cpp, datatrove) that is not installed is skipped in one line
naming the package and how to install it, and distill_step needs two steps (the first is warm-up, not timed)."""

import json
import re
import subprocess
import sys

from tests.bench.support import BENCH, run_in_process

sys.path.insert(0, str(BENCH))  # the scripts import peers.py as their sibling
from bench.peers import peer_missing  # noqa: E402


def test_a_peer_whose_packages_import_is_not_missing():
    assert peer_missing("stdlib", ("json", "csv"), "nothing to install") is None


def test_a_peer_not_installed_is_one_line_naming_each_missing_package_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setitem(sys.modules, "gguf", None)
    message = peer_missing("llama.cpp", ("llama_cpp", "json", "gguf"), "pip install -e '.[bench]'")
    assert message == "llama.cpp: skipped, llama_cpp and gguf not installed (pip install -e '.[bench]')"


def micro_checkpoint(folder):
    """A checkpoint folder the benches' checkpoint arguments accept (options.checkpoint_folder reads its config)."""
    import seekstack
    from tests.conftest import micro_config

    seekstack.save_pretrained(seekstack.Transformer(micro_config()), folder)
    return str(folder)


def test_distill_step_refuses_one_step_before_loading_anything(tmp_path, monkeypatch, capsys):
    from tests.train.test_trainer import write_split

    checkpoint = micro_checkpoint(tmp_path / "model")
    write_split(tmp_path / "tokens", "train", 2_000, seed=1)  # --data's default is make demo's, absent in a clean clone
    options = (checkpoint, checkpoint, "--data", str(tmp_path / "tokens"), "--steps", "1")
    run = run_in_process("distill_step.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2
    assert "--steps 1: at least 2, the first step (warm-up) is not timed" in run.stderr


def test_eval_parity_without_lm_eval_stops_in_one_line_before_loading_anything(tmp_path, monkeypatch, capsys):
    (tmp_path / "corpus").mkdir()  # --corpus's default is make demo's, absent in a clean clone
    (tmp_path / "corpus" / "val.jsonl").write_text('{"id": "a", "text": "x = 1"}\n', encoding="utf-8")
    options = ("--model", micro_checkpoint(tmp_path / "model"), "--corpus", str(tmp_path / "corpus"))
    run = run_in_process("eval_parity.py", *options, monkeypatch=monkeypatch, capsys=capsys, without="lm_eval")
    assert run.returncode == 1
    assert run.stderr.strip() == "lm_eval's HF backend: skipped, lm_eval not installed (pip install -e '.[eval]')"


def test_eval_parity_runs_both_backends_on_one_device_and_their_log_likelihoods_and_next_lines_agree(tmp_path):
    """Our backend ran where resolve_device put it (CUDA when there is one) and lm_eval's HF backend on the CPU, so on
    a GPU machine the scoring wall times compared a GPU with a CPU; --device puts both on one device. Generation was
    compared by code_next_line's exact match alone (0 on both for a model that misses, whatever each wrote): the
    greedy next lines themselves are compared."""
    from tests.infer.support import model_dir

    checkpoint = model_dir(tmp_path / "model")
    module = "\n".join(f"value_{i} = compute({i})" for i in range(40))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "val.jsonl").write_text(json.dumps({"id": "m.py", "text": module}) + "\n")
    command = [sys.executable, str(BENCH / "eval_parity.py"), "--model", str(checkpoint), "--corpus",
               str(tmp_path / "corpus"), "--limit", "1", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"checkpoint {checkpoint}, both backends on cpu" in run.stdout
    difference = re.search(r"loglikelihood: 4 requests, max \|ours - hf\| = (\S+), is_greedy agrees 4/4", run.stdout)
    assert difference is not None and float(difference[1]) < 1e-4, run.stdout
    assert "generate_until: 1 greedy next lines, identical texts 1/1" in run.stdout
