"""bench/speculative.py's prompts: the openings of a corpus's held-out documents, from the corpus it is given."""

import json
import math
import sys
import time
import types
from pathlib import Path

import pytest

from tests.bench.support import BENCH, run_in_process

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench import speculative  # noqa: E402
from bench.speculative import held_out_prompts  # noqa: E402
from tests.infer.support import tiny_tokenizer  # noqa: E402


def write_corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir()
    rows = "".join(json.dumps({"id": str(i), "text": text}) + "\n" for i, text in enumerate(texts))
    (folder / "val.jsonl").write_text(rows, encoding="utf-8")
    return folder


def test_prompts_are_the_openings_of_the_held_out_documents_long_enough(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    texts = ["x", "def main():\n    return os.path.join(a, b)\n", "import sys\nprint(sys.argv[1:])\n"]
    corpus = write_corpus(tmp_path / "corpus", texts)
    prompts = held_out_prompts(corpus, tokenizer, count=2, length=4)
    assert prompts == [tokenizer.encode(text)[:4] for text in texts[1:]]
    with pytest.raises(ValueError, match=r"val\.jsonl has no document of 400 tokens or more: lower --prompt-len"):
        held_out_prompts(corpus, tokenizer, count=2, length=400)


def test_a_corpus_without_held_out_documents_is_refused_naming_the_option(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    options = ["--model", str(tmp_path / "model"), "--corpus", str(empty)]
    run = run_in_process("speculative.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2
    assert f"--corpus {empty}: no val.jsonl there" in run.stderr


class WorkStarted(Exception):
    """Raised in place of the work the script would start (training a model, building the demo data)."""


def test_a_wrong_corpus_is_refused_before_the_script_trains_its_model(tmp_path, monkeypatch, capsys):
    """Without --model and a demo checkpoint the script trains one (~10 min): a --corpus without val.jsonl was refused
    only after it. The demo corpus, which the script builds on its way to a model when the demo data are missing,
    is not refused for being missing yet."""
    from bench import speculative

    def work(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(speculative, "DEMO", tmp_path / "demo")
    monkeypatch.setattr(speculative, "OWN_RUN", tmp_path / "own_run")
    monkeypatch.setattr(speculative, "train", work)
    monkeypatch.setattr(speculative.subprocess, "run", work)
    (tmp_path / "demo" / "tokens").mkdir(parents=True)
    (tmp_path / "demo" / "tokens" / "train_index.json").write_text("{}")  # demo shards: the script would train on them
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sys, "argv", ["speculative.py", "--corpus", str(empty)])
    with pytest.raises(SystemExit) as refusal:
        speculative.main()
    assert refusal.value.code == 2 and f"--corpus {empty}: no val.jsonl there" in capsys.readouterr().err

    (tmp_path / "demo" / "tokens" / "train_index.json").unlink()  # no demo data: built with the model, corpus first
    monkeypatch.setattr(sys, "argv", ["speculative.py"])
    with pytest.raises(WorkStarted):
        speculative.main()


@pytest.mark.parametrize("option", ["--batches", "--draft-tokens", "--prompt-len", "--threads", "--train-steps"])
def test_a_count_below_one_is_refused_naming_the_option_before_any_work(tmp_path, monkeypatch, capsys, option):
    """--batches 0 ended in a traceback from the engine (max_batch_size), --draft-tokens 0 from its draft_tokens,
    --prompt-len 0 from add_request's empty prompt and --threads 0 from torch: each is now argparse's one line."""
    corpus = write_corpus(tmp_path / "corpus", ["x"])
    options = ["--model", str(tmp_path / "model"), "--corpus", str(corpus), option, "0"]
    run = run_in_process("speculative.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2
    assert f"argument {option}: 0: at least 1" in run.stderr


def test_a_model_folder_that_is_no_checkpoint_is_refused_naming_the_option(tmp_path, monkeypatch, capsys):
    """It ended in a CheckpointError traceback from the engine's load."""
    corpus = write_corpus(tmp_path / "corpus", ["x"])
    run = run_in_process("speculative.py", "--model", str(tmp_path), "--corpus", str(corpus), monkeypatch=monkeypatch,
                         capsys=capsys)  # fmt: skip
    assert run.returncode == 2
    assert f"--model {tmp_path}: {tmp_path / 'config.json'}: no such file" in run.stderr


def test_one_new_token_is_refused_naming_the_option_before_any_work(tmp_path, monkeypatch, capsys):
    """--new-tokens 1 timed t(1) against itself and ended, after every engine's runs, in a ZeroDivisionError."""
    corpus = write_corpus(tmp_path / "corpus", ["x"])
    options = ["--model", str(tmp_path / "model"), "--corpus", str(corpus), "--new-tokens", "1"]
    run = run_in_process("speculative.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2
    assert "argument --new-tokens: 1: at least 2" in run.stderr


def test_rates_are_nan_where_the_timing_noise_hides_the_decode_time(monkeypatch):
    """t(N) at or below t(1) gave -109.4 tok/s and -1.60x; the rate is nan, as bench/decode.py's is."""
    counts = types.SimpleNamespace(passed=[0], checked=[0])
    stats = types.SimpleNamespace(spec_drafted=0, spec_accepted=0)
    engine = types.SimpleNamespace(stats=lambda: stats, draft_count=counts)
    seconds = {"plain": {1: 0.02, 4: 0.05}, "speculative": {1: 0.02, 4: 0.0199}}
    timings = iter([0.0] * 2 + [seconds[name][n] for name in ("plain", "speculative") for n in (1, 4)])
    monkeypatch.setattr(speculative, "timed", lambda engine, prompts, n, clock: (next(timings), [[1] * n]))
    row = speculative.compare(engine, engine, [[1, 2], [3, 4]], new_tokens=4, reps=1, clock=time.perf_counter)
    assert row["plain_tok_s"] == pytest.approx(2 * 3 / 0.03)
    assert math.isnan(row["speculative_tok_s"])


def test_the_cpu_clock_times_this_process_not_the_seconds_others_take():
    """--clock cpu (bench/machine.py's CLOCKS) times this process's CPU seconds: a decode that waits 0.2 s while other
    processes run counts those 0.2 s on the wall clock only."""
    engine = types.SimpleNamespace(generate=lambda prompts, params: time.sleep(0.2) or [])
    wall, _ = speculative.timed(engine, [[1]], 2, speculative.CLOCKS["wall"])
    cpu, _ = speculative.timed(engine, [[1]], 2, speculative.CLOCKS["cpu"])
    assert wall >= 0.2 and cpu < 0.1
