"""`seekstack eval`, `explain` and `report` through the command line, on a micro run trained for a few steps."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seekstack.atomic import hidden_pattern
from seekstack.cli import app
from seekstack.train.runs import run_checkpoint
from tests.conftest import micro_config

pytest.importorskip("lm_eval")

# A checkpoint's config.json where lm_eval is stubbed: eval reads it before it runs the tasks.
MICRO_CONFIG = json.dumps(micro_config().to_dict())

MICRO = (
    "model.hidden_size=64 model.intermediate_size=96 model.moe_intermediate_size=32 model.num_hidden_layers=2 "
    "model.num_attention_heads=2 model.q_lora_rank=32 model.kv_lora_rank=16 model.qk_nope_head_dim=16 "
    "model.qk_rope_head_dim=8 model.v_head_dim=16 model.n_routed_experts=4 model.vocab_size=400"
).split()


def run(*args):
    result = CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """Corpus (stdlib openings) -> tokenizer -> shards -> 4 steps of a micro model, evaluated on 4 documents."""
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus"
    corpus.mkdir()
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    texts = [path.read_text(encoding="utf-8", errors="replace")[:3000] for path in paths]
    for split, documents in (("train", texts[:26]), ("val", texts[26:])):
        rows = ({"id": f"{split}{i}", "text": t, "kind": "code/python"} for i, t in enumerate(documents))
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (corpus / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    (corpus / "report.json").write_text(json.dumps({
        "documents_in": 31, "bytes_in": 90000, "documents_kept": 30, "train_documents": 26, "val_documents": 4,
        "removed": {"min_chars": 1},
    }))  # fmt: skip
    run("tokenizer", "train", "--corpus", corpus, "--vocab-size", 400, "--out", root / "tokenizer")
    run("data", "tokenize", "--corpus", corpus, "--tokenizer", root / "tokenizer", "--out", root / "tokens")
    settings = f"data_dir={root / 'tokens'} out_dir={root / 'run'} max_steps=4 batch_size=4 seq_len=64 warmup_steps=1"
    run("train", *settings.split(), "eval_every=4", "eval_batches=2", *MICRO)
    return root


def test_eval_writes_json_and_a_table(small_run):
    result = run("eval", small_run / "run", "--tasks", "code_cloze,code_perplexity", "--corpus",
                 small_run / "corpus", "--limit", 4, "--batch-size", 4, "--device", "cpu")  # fmt: skip
    assert "| code_cloze | acc |" in result.output and "wall time" in result.output
    saved = json.loads((small_run / "run" / "eval" / "results.json").read_text())
    assert set(saved["results"]) == {"code_cloze", "code_perplexity"}
    assert saved["options"] == {
        "tasks": ["code_cloze", "code_perplexity"], "corpus": str((small_run / "corpus").resolve()),
        "backend": "seekstack", "batch_size": 4, "limit": 4, "per_module": 4, "device": "cpu", "num_fewshot": None,
        "apply_chat_template": False, "fewshot_as_multiturn": None, "system_instruction": None, "include_path": None,
        "dtype": "float32", "difficulty": None, "seed": None, "gen_kwargs": None,
    }  # fmt: skip
    assert 0 <= saved["results"]["code_cloze"]["acc"] <= 1 and saved["results"]["code_perplexity"]["bits_per_byte"] > 0
    assert (small_run / "run" / "eval" / "results.md").read_text().count("| code_") == 5  # acc, acc_norm, 3 ppl


def test_report_is_one_page_with_every_section_and_its_png(small_run):
    test_eval_writes_json_and_a_table(small_run)
    run("report", small_run / "run", "--out", small_run / "page")
    page = (small_run / "page" / "report.md").read_text()
    for heading in ("## Environment", "## Data", "## Tokenizer", "## Model", "## Training", "## Evaluation",
                    "## Samples"):  # fmt: skip
        assert heading in page
    assert "![training curves](curves.png)" in page and (small_run / "page" / "curves.png").stat().st_size > 1000
    assert "| train | 26 |" in page and "400 tokens" in page and "4 steps" in page
    assert "| code_cloze | acc |" in page and "```python\ndef fibonacci(n):" in page
    assert f"on `{small_run / 'run' / 'checkpoints' / 'step_4'}`" in page and "Not the newest" not in page
    assert f"Greedy continuations from the engine on `{small_run / 'run' / 'checkpoints' / 'step_4'}`:" in page
    assert "26 train / 4 val" in page


def test_report_out_named_as_a_markdown_file_is_refused_before_anything_is_written(tmp_path):
    """`report RUN --out notes.md` made a folder notes.md/ holding report.md and curves.png."""
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "notes.md")])
    assert result.exit_code == 1
    assert "notes.md: names a .md file, but --out is the folder report.md and its PNGs" in result.output
    assert f"give a folder, e.g. --out {tmp_path / 'notes'}" in result.output and not (tmp_path / "notes.md").exists()


@pytest.mark.parametrize("backend", ["seekstack", "hf"])
def test_eval_runs_either_backend_on_the_device_asked_for_or_the_cpu_without_cuda(backend, tmp_path, monkeypatch):
    import lm_eval
    import torch

    from seekstack.config import preset
    from seekstack.eval.evaluate import evaluate

    asked = []
    output = {"results": {"hellaswag": {"acc,none": 0.5}}, "n-samples": {"hellaswag": {"effective": 2}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs["model_args"]) or output)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_dict()))  # the hf backend's check reads it
    assert evaluate(tmp_path, ("hellaswag",), None, backend, device="cpu")["options"]["device"] == "cpu"
    with pytest.warns(UserWarning, match="'cuda': CUDA is not available here"):
        evaluate(tmp_path, ("hellaswag",), None, backend, device="cuda")
    assert evaluate(tmp_path, ("hellaswag",), None, backend)["options"]["device"] == "cpu"  # the default, here
    assert [args["device"] for args in asked] == ["cpu", "cpu", "cpu"]


@pytest.mark.parametrize("backend", ["seekstack", "hf"])
def test_eval_runs_the_weights_in_the_dtype_asked_for_and_the_report_reruns_it_so(backend, tmp_path, monkeypatch):
    """seekstack eval had no --dtype (lm_eval's dtype model arg): the seekstack backend ran float32, the hf backend
    was told float32, whatever the user wanted."""
    import lm_eval
    import torch

    from seekstack.config import preset
    from seekstack.eval.report import _eval_again

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs["model_args"]) or output)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_dict()))  # the hf backend's check reads it
    command = ["eval", str(tmp_path), "--tasks", "mc", "--backend", backend, "--out", str(tmp_path / "results")]
    result = CliRunner().invoke(app, [*command, "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert asked[-1]["dtype"] == "bfloat16"
    options = json.loads((tmp_path / "results.json").read_text())["options"]
    assert options["dtype"] == "bfloat16" and _eval_again(tmp_path, {"options": options}).endswith("--dtype bfloat16`")
    assert CliRunner().invoke(app, command).exit_code == 0 and asked[-1]["dtype"] == "float32"  # the default
    refused = CliRunner().invoke(app, [*command, "--dtype", "half"])
    assert refused.exit_code == 2 and "Invalid value for '--dtype': 'half': choose one of float32" in refused.output
    assert len(asked) == 2


def test_eval_out_naming_a_folder_writes_the_results_into_it_as_lm_evals_output_path(tmp_path, monkeypatch):
    """`seekstack eval MODEL --out runs/x/eval` (a folder) wrote runs/x/eval.json and eval.md beside the folder, where
    lm_eval's --output_path writes into a folder it is given; so did `--out newdir/`, a folder not yet made."""
    import lm_eval

    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    folder = tmp_path / "scores"
    folder.mkdir()
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in folder.iterdir()) == ["results.json", "results.md"]
    assert json.loads((folder / "results.json").read_text())["results"] == {"mc": {"acc": 0.5}}
    assert not (tmp_path / "scores.json").exists()
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--out", str(tmp_path / "named")])
    assert result.exit_code == 0 and (tmp_path / "named.json").is_file()  # a path not yet a folder: its stem, as before
    # a folder not yet made, named with a trailing slash as lm_eval's --output_path takes one: made, the files in it
    # (it wrote newdir.json and newdir.md beside it)
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--out", f"{tmp_path / 'newdir'}/"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (tmp_path / "newdir").iterdir()) == ["results.json", "results.md"]
    assert not (tmp_path / "newdir.json").exists()


@pytest.mark.parametrize("name", ["r", "r.json"])
def test_eval_out_under_a_file_is_refused_before_the_evaluation_runs(tmp_path, monkeypatch, name):
    """`--out notes.txt/results` (a file where its folder would be) ran the whole evaluation, then failed writing the
    results ('Not a directory'), the scores lost. The refusal names the files write_results would make: r.json and
    r.md for r.json too (it said r.json.json and r.json.md)."""
    import lm_eval

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    (tmp_path / "notes.txt").write_text("mine")
    out = str(tmp_path / "notes.txt" / name)
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--out", out])
    assert result.exit_code == 1 and asked == []
    said = f"{tmp_path / 'notes.txt'}: is a file, not a folder; choose another output folder for r.json and r.md"
    assert "".join(said.split()) in "".join(result.output.split()) and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("tasks", [",", " , ", ""])
def test_tasks_naming_no_task_is_refused_naming_the_option(tmp_path, tasks):
    """It reached lm_eval, whose 'error: No tasks specified, or no tasks found. Please verify the task names.' named
    neither --tasks nor what it was given."""
    refused = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", tasks], env={"COLUMNS": "200"})
    said = f"Invalid value for '--tasks': {tasks!r} names no task: give task names, comma-separated"
    assert refused.exit_code == 2 and said in refused.output and not (tmp_path / "eval").exists()


def test_the_seekstack_backend_loads_the_weights_in_the_dtype_its_model_args_name(checkpoint):
    import torch

    from seekstack.eval.harness import SeekstackLM

    for dtype, expected in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        lm = SeekstackLM(pretrained=checkpoint, dtype=dtype, device="cpu")
        assert {parameter.dtype for parameter in lm.model.parameters()} == {expected}


def test_each_filter_of_a_task_keeps_its_value_in_the_results_and_the_table(tmp_path, monkeypatch):
    """gsm8k's two filters (strict-match, flexible-extract) were both read as exact_match, the last one kept."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate, results_table

    scores = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
              "exact_match,flexible-extract": 0.75, "exact_match_stderr,flexible-extract": 0.04}  # fmt: skip
    output = {"results": {"gsm8k": scores, "mc": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
              "n-samples": {"gsm8k": {"effective": 8}, "mc": {"effective": 4}}}  # fmt: skip
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    report = evaluate(tmp_path, ("gsm8k", "mc"), None, device="cpu")
    assert report["results"] == {
        "gsm8k": {key: value for key, value in scores.items() if key != "alias"},
        "mc": {"acc": 0.5, "acc_stderr": 0.1},
    }
    assert results_table(report).splitlines()[2:] == [
        "| gsm8k | exact_match,strict-match | 0.2500 | 0.0500 | 8 |",
        "| gsm8k | exact_match,flexible-extract | 0.7500 | 0.0400 | 8 |",
        "| mc | acc | 0.5000 | 0.1000 | 4 |",
    ]


def test_the_table_prints_a_huge_perplexity_as_a_power_of_ten_and_scores_to_4_decimals_as_lm_eval():
    """An untrained model's word perplexity (1.2e12) printed with lm_eval's 4 decimals read 1234567890123.4568. A
    standard error lm_eval records "N/A" (a perplexity's: no stderr function) printed "-", where lm_eval's table
    prints N/A; one not recorded at all (seekstack's own tasks) still reads "-"."""
    from seekstack.eval.evaluate import results_table

    scores = {"word_perplexity": 1234567890123.4567, "word_perplexity_stderr": "N/A", "byte_perplexity": 4.2351,
              "bits_per_byte": 2.08412, "acc": 0.33, "acc_stderr": 0.0471, "ppl": 25000000.0,
              "ppl_stderr": 3100000.0}  # fmt: skip
    report = {"results": {"t": scores}, "n-samples": {"t": {"effective": 40}}}
    assert results_table(report).splitlines()[2:] == [
        "| t | word_perplexity | 1.2346e+12 | N/A | 40 |",
        "| t | byte_perplexity | 4.2351 | - | 40 |",
        "| t | bits_per_byte | 2.0841 | - | 40 |",
        "| t | acc | 0.3300 | 0.0471 | 40 |",
        "| t | ppl | 2.5000e+07 | 3.1000e+06 | 40 |",
    ]


def test_eval_of_an_lm_eval_task_leaves_datasets_online_to_download_it_as_lm_eval_does(tmp_path, monkeypatch):
    """eval set HF_DATASETS_OFFLINE=1 whatever the tasks, so on a machine online `--tasks arc_easy` failed with
    "Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)" where lm_eval downloads it; only an eval of
    local tasks alone, which never download, says so to `datasets`."""
    import os

    import lm_eval

    from seekstack.eval.evaluate import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")  # unset here, and again once the test ends
    offline = []
    output = {"results": {"arc_easy": {"acc,none": 0.5}}, "n-samples": {}}
    monkeypatch.setattr(
        lm_eval, "simple_evaluate", lambda **kwargs: offline.append(os.environ.get("HF_DATASETS_OFFLINE")) or output
    )
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    evaluate(tmp_path, ("arc_easy",), None, device="cpu")
    assert offline == [None]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "val.jsonl").write_text(json.dumps({"id": "m.py", "text": "x = 1\n" * 40}) + "\n")
    evaluate(tmp_path, ("code_perplexity",), corpus, device="cpu")
    assert offline == [None, "1"]


def test_eval_batch_size_auto_reaches_lm_eval_and_a_size_that_is_neither_is_refused(tmp_path, monkeypatch):
    import lm_eval

    from seekstack.eval.evaluate import evaluate

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs["batch_size"]) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    for given in ("auto", "16", 4):
        assert evaluate(tmp_path, ("mc",), None, batch_size=given, device="cpu")["options"]["batch_size"] == asked[-1]
    assert asked == ["auto", 16, 4]
    with pytest.raises(ValueError, match="field 'batch_size': 'big': give a number of requests per batch, or auto"):
        evaluate(tmp_path, ("mc",), None, batch_size="big", device="cpu")
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--batch-size", "auto", "--out",
                                      str(tmp_path / "results"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert asked[-1] == "auto"


def test_eval_runs_tasks_few_shot_and_in_the_chat_template_and_the_report_reruns_it_so(tmp_path, monkeypatch):
    """seekstack eval had no --num-fewshot nor --apply-chat-template: a task ran zero-shot (or at its YAML's
    num_fewshot) on plain prompts only."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate
    from seekstack.eval.report import _eval_again

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--num-fewshot", "5",
                                      "--apply-chat-template", "--out", str(tmp_path / "results")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (asked[-1]["num_fewshot"], asked[-1]["apply_chat_template"]) == (5, True)
    options = json.loads((tmp_path / "results.json").read_text())["options"]
    assert (options["num_fewshot"], options["apply_chat_template"]) == (5, True)
    rerun = _eval_again(tmp_path, {"options": options})
    assert rerun.endswith(f"--device {options['device']} --num-fewshot 5 --apply-chat-template --dtype float32`")
    evaluate(tmp_path, ("mc",), device="cpu")
    assert (asked[-1]["num_fewshot"], asked[-1]["apply_chat_template"]) == (None, False)  # each task's own, plain
    with pytest.raises(ValueError, match="reason_addition: their prompts are in the model's chat template already"):
        evaluate(tmp_path, ("mc", "reason_addition"), device="cpu", apply_chat_template=True)
    with pytest.raises(ValueError, match="reason_addition: each prompt is a whole chat .* --num-fewshot 2 would glue"):
        evaluate(tmp_path, ("mc", "reason_addition"), device="cpu", num_fewshot=2)


def test_no_fewshot_as_multiturn_puts_the_examples_in_one_turn_as_lm_evals_and_the_report_reruns_it(
    tmp_path, monkeypatch
):
    """seekstack eval had no --fewshot-as-multiturn: with --apply-chat-template the examples were always earlier
    turns, where lm_eval's --fewshot_as_multiturn false puts them in the first user turn."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate
    from seekstack.eval.report import _eval_again

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--num-fewshot", "2",
                                      "--apply-chat-template", "--no-fewshot-as-multiturn", "--out",
                                      str(tmp_path / "results")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (asked[-1]["apply_chat_template"], asked[-1]["fewshot_as_multiturn"]) == (True, False)
    options = json.loads((tmp_path / "results.json").read_text())["options"]
    assert (options["apply_chat_template"], options["fewshot_as_multiturn"]) == (True, False)
    assert "--apply-chat-template --no-fewshot-as-multiturn --dtype" in _eval_again(tmp_path, {"options": options})
    # lm_eval's default: earlier turns in the chat template (recorded as not given), nothing without it
    for chat, multiturn in ((True, True), (False, False)):
        report = evaluate(tmp_path, ("mc",), device="cpu", apply_chat_template=chat)
        assert asked[-1]["fewshot_as_multiturn"] is multiturn and report["options"]["fewshot_as_multiturn"] is None
    with pytest.raises(ValueError, match="--fewshot-as-multiturn puts the few-shot examples .* --apply-chat-template"):
        evaluate(tmp_path, ("mc",), device="cpu", fewshot_as_multiturn=True)


def test_eval_limit_is_a_number_of_documents_or_a_fraction_of_them_as_lm_evals(tmp_path, monkeypatch):
    """seekstack eval --limit 0.1 was refused ('Invalid value for '--limit': Input should be a valid integer'), where
    lm_eval takes a tenth; so was --limit 2.5, which lm_eval runs as int(2.5) = 2 documents (get_sample_size). --limit
    1e30 ended in "error: Stop argument for islice() must be None or an integer: 0 <= x <= sys.maxsize": it runs all."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs["limit"]) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    for given in ("0.1", "40"):
        result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--limit", given, "--out",
                                          str(tmp_path / "results"), "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "results.json").read_text())["options"]["limit"] == asked[-1]
    assert asked == [0.1, 40] and isinstance(asked[1], int)
    with pytest.warns(UserWarning, match=r"^--limit 2.5 runs 2 documents per task: .* whole part taken, as lm_eval"):
        report = evaluate(tmp_path, ("mc",), limit=2.5, device="cpu")
    assert asked[-1] == report["options"]["limit"] == 2 and isinstance(asked[-1], int)
    assert evaluate(tmp_path, ("mc",), limit=1e30, device="cpu")["options"]["limit"] == asked[-1] == sys.maxsize
    for wrong in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"field 'limit': {wrong}: give a number of documents per task .* below 1"):
            evaluate(tmp_path, ("mc",), limit=wrong, device="cpu")


@pytest.mark.parametrize(
    "option, given, said",
    [("--limit", "-1", "-1: give a number of documents per task (40) or a fraction of them below 1 (0.1)"),
     ("--batch-size", "0", "0: give at least 1 request per batch, or auto"),
     ("--seed", "1,2", "'1,2': Argument requires 4 integers or None, separated by ','; give one number")],
)  # fmt: skip
def test_eval_refuses_a_limit_batch_size_or_seed_it_cannot_use_as_a_usage_error_naming_the_option(
    tmp_path, option, given, said
):
    """They ended as 'error: limit -1.0: give ...' (exit 1), naming the value as evaluate() takes it (limit,
    batch_size=0, seed) where --dtype's is a usage error naming --dtype (exit 2)."""
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    refused = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", option, given], env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and f"Invalid value for '{option}': {said}" in refused.output, refused.output


def test_eval_of_a_runs_checkpoint_writes_its_results_into_the_run_never_into_the_checkpoint(tmp_path, monkeypatch):
    """They went to RUN/checkpoints/step_N/eval/, which the run's keep_checkpoints deletes and `report RUN` never
    reads."""
    import seekstack.eval.evaluate

    measured = {"model": "m", "backend": "seekstack", "wall_s": 1.0, "results": {"t": {"acc": 0.5}}, "n-samples": {}}
    monkeypatch.setattr(seekstack.eval.evaluate, "evaluate", lambda model, *args: measured | {"model": str(model)})
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(MICRO_CONFIG)
    (checkpoint / "train_state.pt").write_bytes(b"")
    (checkpoint / "model.safetensors").write_bytes(b"")
    model = tmp_path / "exported"
    shutil.copytree(checkpoint, model)
    for given, written in ((checkpoint, tmp_path / "run"), (tmp_path / "run", tmp_path / "run"), (model, model)):
        run("eval", given, "--tasks", "t")
        saved = json.loads((written / "eval" / "results.json").read_text())
        assert saved["model"] == str(checkpoint if given != model else model)
        (written / "eval" / "results.json").unlink()
    assert not (checkpoint / "eval").exists()


def test_eval_of_a_run_reads_the_code_tasks_from_the_corpus_its_shards_were_encoded_from(tmp_path, monkeypatch):
    """Without --corpus, eval read ./runs/demo/corpus whatever corpus the run trained on: from any other folder
    'runs/demo/corpus/val.jsonl: no such file', though `report` finds the run's corpus through its shards."""
    import seekstack.eval.evaluate

    read = []
    measured = {"model": "m", "backend": "seekstack", "wall_s": 1.0, "results": {"t": {"acc": 0.5}}, "n-samples": {}}
    monkeypatch.setattr(
        seekstack.eval.evaluate, "evaluate", lambda model, tasks, corpus, *_: read.append(corpus) or measured
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    for name, content in (("config.json", MICRO_CONFIG), ("train_state.pt", ""), ("model.safetensors", "")):
        (checkpoint / name).write_text(content)
    (tmp_path / "run" / "train_config.json").write_text('{"data_dir": "../tokens"}')
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.jsonl").write_text("")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "train_index.json").write_text(
        json.dumps({"source": str(tmp_path / "corpus" / "train.jsonl")})
    )
    for given in (tmp_path / "run", checkpoint):
        run("eval", given, "--tasks", "t")
    run("eval", tmp_path / "run", "--tasks", "t", "--corpus", tmp_path / "elsewhere")
    (tmp_path / "run" / "train_config.json").unlink()  # no run: the demo's corpus, as before
    run("eval", checkpoint, "--tasks", "t")
    assert read == [tmp_path / "corpus", tmp_path / "corpus", tmp_path / "elsewhere", Path("runs/demo/corpus")]


def test_explain_through_the_command_line_writes_the_page_and_routing_statistics(small_run, monkeypatch):
    from matplotlib.figure import Figure

    titles, overflow, savefig = {}, {}, Figure.savefig

    def kept(figure, path, *args, **kwargs):  # each PNG's title as it is saved, and how far it runs past the figure
        name = re.fullmatch(hidden_pattern("(.+)"), Path(path).name).group(1)  # saved beside it, then renamed
        titles[name] = figure.get_suptitle()
        figure.canvas.draw()
        extent = figure._suptitle.get_window_extent()
        overflow[name] = max(0.0, figure.bbox.x0 - extent.x0, extent.x1 - figure.bbox.x1)
        return savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    out = small_run / "explain"
    run("explain", small_run / "run", "def f(x):\n    return x\n", "--out", out, "--corpus", small_run / "corpus",
        "--max-tokens", 512)  # fmt: skip
    # each names the checkpoint it was drawn from (the run's newest), as report.md's figures name their run
    checkpoint = run_checkpoint(small_run / "run")
    assert {name: title.rsplit("\n", 1)[-1] for name, title in titles.items()} == {
        name: f"checkpoint: {checkpoint}" for name in ("routing_stats.png", "attention.png", "routing.png")
    }
    # the path in full on each: routing.png of one MoE layer is ~3.5 inches wide, and cut a 12-point path at both sides
    assert overflow == {"routing_stats.png": 0.0, "attention.png": 0.0, "routing.png": 0.0}
    assert {"attention.png", "routing.png", "explain.html", "routing_stats.png", "routing_stats.json"} <= {
        path.name for path in out.iterdir()
    }
    [record] = json.loads((out / "routing_stats.json").read_text())  # the micro model has one MoE layer
    assert record["tokens"] == 512 and len(record["load"]) == 4


def test_explain_classes_a_prose_corpus_in_words_not_python_keywords_and_identifiers(small_run, tmp_path):
    """A Python corpus's tokens are Python's keywords and identifiers; a prose corpus's `and`, `in`, `is`, `for`
    are words as the others are."""
    prose = tmp_path / "prose"
    prose.mkdir()
    text = "The cat and the dog sat in the sun for a while, and it is warm there. " * 40
    rows = [{"id": f"val{i}", "text": text, "kind": "prose/en"} for i in range(2)]
    (prose / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    classes = {}
    for name, corpus in (("code", small_run / "corpus"), ("prose", prose)):
        run("explain", small_run / "run", "--out", tmp_path / name, "--corpus", corpus, "--max-tokens", 256)
        [record] = json.loads((tmp_path / name / "routing_stats.json").read_text())
        classes[name] = set(record["class_tokens"])
    assert {"keyword", "identifier"} <= classes["code"] and "word" not in classes["code"]
    assert "word" in classes["prose"] and not {"keyword", "identifier"} & classes["prose"]


def test_explain_into_a_used_out_leaves_only_this_runs_files_and_what_else_is_there(small_run, tmp_path):
    """An earlier run's routing_stats.* (or attention.png, explain.html) stayed beside the new files, read as theirs."""
    out = tmp_path / "explain"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    corpus = ("--corpus", small_run / "corpus", "--max-tokens", 512)
    text_files = {"attention.png", "routing.png", "explain.html"}
    for args, files in (
        (("def f(x):", *corpus), text_files | {"routing_stats.png", "routing_stats.json"}),
        (("import os",), text_files),
        (corpus, {"routing_stats.png", "routing_stats.json"}),
    ):
        run("explain", small_run / "run", *args, "--out", out)
        assert {path.name for path in out.iterdir()} == files | {"notes.txt"}
    assert (out / "notes.txt").read_text() == "mine"


def test_explain_out_on_a_file_names_it_and_says_out_is_a_folder_before_loading_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "no_model").mkdir()  # a folder that holds no model: loading it would fail
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "maps"):
        result = CliRunner().invoke(app, ["explain", str(tmp_path / "no_model"), "x", "--out", str(out)])
        assert result.exit_code == 1 and "Errno" not in result.output
        assert f"{tmp_path / 'notes.txt'} is a file; --out is the folder explain writes" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_results_are_written_beside_the_name_given_whatever_dots_it_holds(tmp_path):
    from seekstack.eval.evaluate import write_results

    report = {"model": "m", "backend": "seekstack", "wall_s": 1.0, "results": {"t": {"acc": 0.5}}, "n-samples": {}}
    (tmp_path / "model_v1.json").write_text("earlier results")
    names = ("model_v1.5", "plain", "named.json", "upper.JSON", "table.MD")  # a suffix in any case, as Windows'
    written = [write_results(report, tmp_path / name) for name in names]
    assert [(j.name, t.name) for j, t in written] == [
        ("model_v1.5.json", "model_v1.5.md"), ("plain.json", "plain.md"), ("named.json", "named.md"),
        ("upper.json", "upper.md"), ("table.json", "table.md"),
    ]  # fmt: skip
    assert sorted(path.name for path in tmp_path.iterdir() if "upper" in path.name or "table" in path.name) == [
        "table.json", "table.md", "upper.json", "upper.md",
    ]  # fmt: skip
    assert (tmp_path / "model_v1.json").read_text() == "earlier results"


def test_reports_data_section_says_when_the_runs_shards_are_gone(tmp_path):
    from seekstack.eval.report import _data

    section = _data(tmp_path / "run", {"data_dir": "../tokens"})  # as train_config.json holds it: from the run
    assert f"Token shards `{tmp_path / 'tokens'}`: no *_index.json there" in section and "| split |" not in section


def test_reports_data_table_gives_each_split_then_its_difficulty_buckets_easiest_first(tmp_path):
    """The rows came in the index files' name order: train_easy, train_hard, train, train_medium, val."""
    from seekstack.eval.report import _data

    (tmp_path / "tokens").mkdir()
    buckets = {"train_easy": ("easy", 0.18), "train_medium": ("medium", 0.23), "train_hard": ("hard", 0.27)}
    for split in ("train", "val", *buckets):
        index = {"split": split, "documents": 1, "total_tokens": 1}
        if split in buckets:
            index["difficulty"] = {"bucket": buckets[split][0], "lowest_score": buckets[split][1]}
        (tmp_path / "tokens" / f"{split}_index.json").write_text(json.dumps(index))
    section = _data(tmp_path / "run", {"data_dir": "../tokens"})
    rows = [line.split(" | ")[0].removeprefix("| ") for line in section.splitlines() if line.startswith("| ")]
    assert rows == ["split", "train", "train_easy", "train_medium", "train_hard", "val"]


def _step_checkpoint(root: Path, step: int, **fields) -> Path:
    """A checkpoint folder holding config.json (the tiny preset with `fields` changed) and empty weights."""
    from seekstack.config import preset

    path = root / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(preset("tiny", **fields).to_dict()))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_report_of_an_rl_run_names_its_task_and_the_tokens_it_logged_not_unused_shards(tmp_path):
    from seekstack.eval.report import _data, _model

    rl_config = {"data_dir": "../data/shards", "seq_len": 256, "batch_size": 2, "init_from": "../base/step_20",
                 "task": "addition", "difficulty": 3, "num_generations": 4}  # fmt: skip
    data = _data(tmp_path, rl_config)
    assert "Prompts of task `addition` (difficulty 3), 4 completions each" in data and "shards" not in data
    records = [{"step": 1, "tokens_per_s": 100.0, "step_s": 3.0}, {"step": 2, "tokens_per_s": 50.0, "step_s": 2.0}]
    model = _model(tmp_path, _step_checkpoint(tmp_path, 2), rl_config, records)
    assert "| tokens trained | 400 (2 steps) |" in model  # 300 + 100 logged, not 2 x 256 x 2
    assert "FLOP" not in model.replace("FLOPs per token", "") and f"from `{tmp_path.parent / 'base/step_20'}`" in model
    missing = "| tokens trained | 100 (1 of 2 steps; step 1: no tokens/s and step time in metrics.jsonl, not counted) |"
    assert missing in _model(tmp_path, tmp_path / "checkpoints" / "step_2", rl_config, records[1:])


def test_tokens_trained_of_a_log_missing_steps_says_which_it_did_not_count(tmp_path):
    """A run resumed from another run's checkpoint (--resume-from FOLDER into a new out_dir) logs only its own steps:
    its Model table had no tokens trained and no training compute, saying nothing, as though they were not known for
    any step."""
    from seekstack.eval.report import _model

    config = {"data_dir": "../tokens", "seq_len": 64}
    records = [{"step": step, "loss": 2.0, "tokens_per_s": 100.0, "step_s": 1.0} for step in (3, 4, 6)]
    model = _model(tmp_path, _step_checkpoint(tmp_path, 6), config, records)
    assert (
        "| tokens trained | 300 (3 of 6 steps; steps 1-2, 5: no tokens/s and step time in metrics.jsonl, not "
        "counted) |" in model
    )
    assert "training compute" not in model and "| training FLOPs per token (with MTP) |" in model
    whole = [{"step": step, "loss": 2.0, "tokens_per_s": 100.0, "step_s": 1.0} for step in range(1, 7)]
    model = _model(tmp_path, tmp_path / "checkpoints" / "step_6", config, whole)
    assert "| tokens trained | 600 (6 steps) |" in model and "| training compute |" in model


def test_report_of_an_rl_run_counts_the_completion_tokens_its_loss_trained_beside_every_position(tmp_path):
    """It read "tokens trained | 5,472 (6 steps)", prompts and padding in them, for 2,200 completion tokens."""
    from seekstack.eval.report import _model

    rl_config = {"init_from": "../sft/step_20", "task": "addition", "num_generations": 4}
    records = [{"step": step, "reward": 0.5, "tokens_per_s": 900.0, "step_s": 1.0, "completion_tokens": 360.0}
               for step in (1, 2)]  # fmt: skip
    model = _model(tmp_path, _step_checkpoint(tmp_path, 2), rl_config, records)
    assert "| tokens trained (sampled completion tokens) | 720 of 1,800 positions (2 steps) |" in model


def test_report_of_an_sft_run_counts_the_assistant_tokens_its_loss_trained_beside_every_position(tmp_path):
    """It read "tokens trained | 784 (2 steps)": every position, prompts and padding in them, though the run logged
    the 172 assistant tokens its loss was on."""
    from seekstack.eval.report import _model

    sft_config = {"model": "tiny", "data": "../chats.jsonl", "seq_len": 49, "batch_size": 8}
    records = [{"step": step, "loss": 2.0, "tokens_per_s": 392.0, "step_s": 1.0, "assistant_tokens": 86.0}
               for step in (1, 2)]  # fmt: skip
    model = _model(tmp_path, _step_checkpoint(tmp_path, 2), sft_config, records)
    assert "| tokens trained (labelled assistant tokens) | 172 of 784 positions (2 steps) |" in model
    assert "| tokens trained |" not in model


def test_report_of_a_dense_student_without_mtp_claims_no_experts_and_no_mtp(tmp_path):
    from seekstack.eval.report import _model

    student = _step_checkpoint(tmp_path, 1, first_k_dense_replace=4, num_nextn_predict_layers=0)
    model = _model(tmp_path, student, {"data_dir": "../tokens", "seq_len": 64, "teacher": "../teacher"}, [])
    assert "| routed experts | none (a dense FFN in every layer) |" in model
    assert "MTP" not in model and "| training FLOPs per token |" in model and "tokens trained" not in model
    moe = _model(tmp_path, _step_checkpoint(tmp_path / "moe", 1), {"data_dir": "../tokens", "seq_len": 64}, [])
    assert "| routed experts | 8 (2 per token) in 3 of 4 layers and the MTP module |" in moe and "(with MTP)" in moe


def test_report_of_a_dense_student_with_an_moe_mtp_module_says_where_its_experts_are(tmp_path):
    """It read "routed experts | none (a dense FFN in every layer)" while its validation table showed the MaxVio of
    its MTP module's experts (MTP blocks are numbered on from the main model's: block 4 of first_k_dense_replace=4
    is MoE)."""
    from seekstack.eval.report import _model

    student = _step_checkpoint(tmp_path, 1, first_k_dense_replace=4, num_nextn_predict_layers=1)
    model = _model(tmp_path, student, {"data_dir": "../tokens", "seq_len": 64, "teacher": "../teacher"}, [])
    said = "| routed experts | 8 (2 per token) in the MTP module (the main model has a dense FFN in every layer) |"
    assert said in model


@pytest.mark.parametrize(
    "saved, message",
    [('{"backend": "seekst', "not valid JSON"), ("[]", "holds \\[\\], not a JSON object"),
     ('{"results": {}}', "key 'backend' is missing"),
     ('{"backend": "seekstack", "wall_s": 1, "results": {"t": 3}, "n-samples": {}}', 'key \'results\' holds {"t": 3}'),
     ('{"backend": "seekstack", "wall_s": 1, "results": {}, "n-samples": {"t": 3}}', "key 'n-samples' holds {.t.: 3}")],
)  # fmt: skip
def test_a_damaged_eval_results_file_is_named_with_what_to_do(tmp_path, saved, message):
    from seekstack.eval.report import EVAL_RESULTS, _evaluation

    (tmp_path / EVAL_RESULTS).parent.mkdir()
    (tmp_path / EVAL_RESULTS).write_text(saved)
    with pytest.raises(
        ValueError, match=f"{tmp_path / EVAL_RESULTS}: {message}.*run `seekstack eval {tmp_path}` again"
    ):
        _evaluation(tmp_path, tmp_path / "checkpoints" / "step_1")


@pytest.mark.parametrize(
    "counts",
    [{"n-samples": {"t": {"original": 9, "effective": 4}}},  # lm_eval's, as `seekstack eval` writes it
     {"samples": {"t": 4}}],  # a results.json written before, its counts under "samples"
)  # fmt: skip
def test_the_evaluation_table_counts_the_documents_of_lm_evals_n_samples_and_of_an_older_files_samples(
    tmp_path, counts
):
    from seekstack.eval.report import EVAL_RESULTS, _evaluation

    (tmp_path / EVAL_RESULTS).parent.mkdir()
    measured = {"model": "m", "backend": "seekstack", "wall_s": 1.0, "results": {"t": {"acc": 0.5}}}
    (tmp_path / EVAL_RESULTS).write_text(json.dumps(measured | counts))
    assert "| t | acc | 0.5000 | - | 4 |" in _evaluation(tmp_path, None)


def test_a_damaged_run_config_or_shard_index_is_named(tmp_path):
    from seekstack.eval.report import _data, write_report

    (tmp_path / "train_config.json").write_text('{"model": "tiny",')
    with pytest.raises(ValueError, match=f"{tmp_path / 'train_config.json'}: not valid JSON"):
        write_report(tmp_path, samples=False)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "train_index.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokens' / 'train_index.json'}: not valid JSON.*data tokenize"):
        _data(tmp_path / "run", {"data_dir": "../tokens"})
    (tmp_path / "tokens" / "train_index.json").write_text('{"split": "train"}')
    with pytest.raises(ValueError, match="train_index.json: a shard index without 'documents', 'total_tokens'"):
        _data(tmp_path / "run", {"data_dir": "../tokens"})


@pytest.mark.parametrize("out", [None, "elsewhere"])
def test_a_folder_that_is_no_run_is_named_and_left_as_it_was(tmp_path, out):
    """A mistyped RUN (or --out beside it) is refused naming it, and no empty folder is made for the report."""
    run_dir = tmp_path / "runs" / "tnyi"
    out_dir = tmp_path / out if out else None
    result = CliRunner().invoke(app, ["report", str(run_dir), *(["--out", str(out_dir)] if out else [])])
    assert result.exit_code == 1 and f"{run_dir}: no such folder" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


def test_report_out_on_a_file_names_it_and_says_out_is_a_folder_before_any_work(tmp_path, monkeypatch):
    """It ended, after the page's samples, with a bare "[Errno 17] File exists: 'notes.md'"."""
    monkeypatch.setattr("seekstack.eval.report._write_page", lambda *arguments: pytest.fail("the page was begun"))
    (tmp_path / "notes.md").write_text("mine")
    for out in (tmp_path / "notes.md", tmp_path / "notes.md" / "page"):
        result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(out)])
        assert result.exit_code == 1 and "Errno" not in result.output
        said = " ".join(result.output.split())
        assert f"{tmp_path / 'notes.md'}: is a file, not a folder" in said and "report.md and its PNGs" in said
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_a_runs_checkpoint_given_for_the_run_names_the_run_to_give(tmp_path):
    """`report RUN/checkpoints/step_2` (where `eval` takes a checkpoint) said "no metrics.jsonl in ...: is it the
    out_dir of a `seekstack train` run?", not which run it is part of."""
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    result = CliRunner().invoke(app, ["report", str(checkpoint)])
    said = f"no metrics.jsonl in {checkpoint}: it is a checkpoint of the run {tmp_path / 'run'}, whose folder holds it"
    assert result.exit_code == 1 and said in " ".join(result.output.split()), result.output
    assert sorted(path.name for path in checkpoint.iterdir()) == []


PEAK = "a 1024^3 float32 matmul measured on 2 CPU threads"


@pytest.mark.parametrize(
    ("mfu", "logged", "said"),
    [
        (0.42, {}, "MFU 42.0%."),  # a run logged before its peak was
        (0.42, {"peak_flops": 5.53e10, "peak_source": PEAK}, f"MFU 42.0% (against a peak of 55.3 GFLOP/s: {PEAK})."),
        (1.935, {}, "MFU not known: 193.5% logged, above 100%"),
        (
            1.935,
            {"peak_flops": 5.53e9, "peak_source": PEAK},
            f"not known: 193.5% logged (against a peak of 5.53 GFLOP/s: {PEAK})",
        ),
        (math.nan, {}, "MFU not known: NaN logged."),  # was "nan% logged, above 100% because the peak ... too low"
        (0.42, {"peak_flops": None, "peak_source": None}, "MFU 42.0%."),  # was a TypeError ('>=' ... 'NoneType')
    ],
)
def test_speed_gives_the_mfu_against_its_peak_and_calls_one_above_100_percent_a_peak_too_low(
    tmp_path, mfu, logged, said
):
    """The report gave an MFU without the peak it divides by or where that came from (a CPU probe, a card's spec)."""
    from seekstack.eval.report import _training

    records = [{"step": step, "loss": 2.0, "lm_loss": 2.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": mfu}
               for step in (1, 2)]  # fmt: skip
    records[0] |= logged  # the source is logged with the first step, the peak with every one
    records[1] |= {key: value for key, value in logged.items() if key == "peak_flops"}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    speed = _training(tmp_path, tmp_path, {}, records)
    assert said in speed and "900 tokens/s, MFU " in speed and ("too low" in speed) == (mfu > 1)


@pytest.mark.parametrize(
    ("logged", "said"),
    [
        ({"tokens_per_s": 900.0}, "(median): 900 tokens/s, MFU not logged."),
        ({"mfu": 0.42}, "(median): tokens/s not logged, MFU 42.0%."),
        ({}, "(median): tokens/s not logged, MFU not logged."),
        ({"tokens_per_s": 900.0, "mfu": None}, "(median): 900 tokens/s, MFU not logged."),  # was a TypeError
        ({"tokens_per_s": None, "mfu": 0.42}, "(median): tokens/s not logged, MFU 42.0%."),
    ],
)
def test_speed_gives_what_the_steps_logged_and_says_what_they_did_not(tmp_path, logged, said):
    """A metrics.jsonl whose steps logged tokens_per_s but no mfu (another trainer's, or one written by hand) stopped
    `seekstack report` with "error: no median for empty data", and one logging them null with a TypeError traceback
    ('<=' not supported between instances of 'NoneType' and 'int')."""
    from seekstack.eval.report import _training

    records = [{"step": step, "loss": 2.0, "lr": 1e-3, **logged} for step in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert f"Speed over the last quarter of the steps {said}" in _training(tmp_path, tmp_path, {}, records)


def test_speed_logged_as_no_number_is_refused_naming_the_step_and_the_key(tmp_path):
    """A metrics.jsonl step logging mfu "42%" (a string, written by hand) stopped `seekstack report` with a TypeError
    traceback; it is refused as `plot` refuses a step's lr that is no number, naming the file, the step and the key."""
    from seekstack.eval.report import _training

    records = [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": "42%"} for step in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(ValueError, match=r"metrics\.jsonl: the record of step 2 has no number 'mfu'; mend or delete"):
        _training(tmp_path, tmp_path, {}, records)


def test_the_curves_figure_names_the_metrics_it_draws_and_the_command_that_draws_it_again(tmp_path):
    """report.md's figure said "![training curves](curves.png)" alone: neither which steps of which run's metrics it
    shows nor how to draw it again (beside a page written elsewhere, or after the run trained on)."""
    from seekstack.eval.report import _training

    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    records = [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 9.0, "mfu": 0.1} for step in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    metrics = run_dir / "metrics.jsonl"
    assert (
        f"![training curves](curves.png)\n\n`curves.png`: steps 1-3 of `{metrics}`, as `seekstack plot '{run_dir}'` "
        "draws it.\n\n" in _training(run_dir, run_dir, {}, records)
    )
    page = tmp_path / "page"
    assert (
        f"`curves.png`: steps 1-3 of `{metrics}`, as `seekstack plot '{run_dir}' --out {page / 'curves.png'}` draws it."
        in _training(run_dir, page, {}, records)
    )


def test_an_rl_runs_metrics_are_reported_by_their_rewards_as_plot_draws_them_whatever_its_config(tmp_path):
    """A run whose metrics are `seekstack rl`'s but whose train_config.json says nothing of it (none, or one written by
    hand) was reported by GRPO's ~0 loss in curves.png, captioned "as `seekstack plot RUN` draws it", where plot draws
    it as rl-plot does, to rl_curves.png."""
    from seekstack.eval.report import _training

    records = [
        {"step": step, "loss": 0.0, "reward": step / 4, "lr": 1e-5, "tokens_per_s": 9.0} for step in (1, 2, 3, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    text = _training(tmp_path, tmp_path, {}, records)
    assert text.startswith(
        f"## Training\n\n![RL curves](rl_curves.png)\n\n`rl_curves.png`: steps 1-4 of `{tmp_path / 'metrics.jsonl'}`, "
        f"as `seekstack rl-plot {tmp_path} --smooth 1` draws it.\n\n|  | step 1 | step 4 |\n|---|---|---|\n"
        "| reward | 0.250 | 1.000 |"
    )
    assert (tmp_path / "rl_curves.png").is_file() and not (tmp_path / "curves.png").exists()
    without_loss = [{key: value for key, value in record.items() if key != "loss"} for record in records]
    assert (  # another trainer's, or written by hand: rl-plot draws its rewards all the same
        f"`rl_curves.png`: steps 1-4 of `{tmp_path / 'metrics.jsonl'}`, as `seekstack rl-plot {tmp_path} --smooth 1` "
        "draws it.\n\n|  | step 1 | step 4 |\n|---|---|---|\n| reward | 0.250 | 1.000 |"
    ) in _training(tmp_path, tmp_path, {}, without_loss)


def test_environment_names_seekstacks_own_commit_not_that_of_the_folder_it_runs_in(tmp_path, monkeypatch):
    import subprocess

    import seekstack
    from seekstack.eval.report import _environment

    def git(folder: Path, *arguments: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments], cwd=folder,
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"

    other = tmp_path / "other"
    (other / "site-packages" / "seekstack").mkdir(parents=True)
    git(other, "init", "-q")
    git(other, "commit", "-q", "--allow-empty", "-m", "another project")
    monkeypatch.chdir(other)
    own = git(Path(seekstack.__file__).parent, "rev-parse", "--short", "HEAD")
    assert f"| commit | {own} |" in _environment() and own != git(other, "rev-parse", "--short", "HEAD")
    installed = other / "site-packages" / "seekstack" / "__init__.py"  # a wheel's copy, in another repository's folder
    installed.write_text("")
    monkeypatch.setattr(seekstack, "__file__", str(installed))
    assert "| commit | unknown (not a git checkout) |" in _environment()


@pytest.mark.parametrize(("saved", "origin"), [({}, "-"), ({"model": "tiny"}, "tiny")])
def test_a_hand_written_train_config_naming_no_data_is_reported_by_what_it_holds(tmp_path, saved, origin):
    """`report RUN --no-samples` of a run whose train_config.json names no data ({"model": "tiny"}) ended in
    KeyError: 'task', and of one naming no preset either ({}) in KeyError: 'model' (the curves' MTP layer count):
    such a file is reported by what it holds, as a run without one is."""
    checkpoint = _step_checkpoint(tmp_path, 2)
    (checkpoint / "train_state.pt").write_bytes(b"")
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    records = [{"step": step, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 900.0} for step in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--no-samples"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.md").read_text()
    assert f"| preset / layers | {origin} / 4 |" in page and "Last step 2: loss (total 2.5000)." in page
    assert "## Data" not in page and (tmp_path / "curves.png").is_file()


def test_the_last_steps_loss_is_named_as_the_progress_line_names_it(tmp_path):
    """metrics.jsonl's `loss` is the total (MTP and balance terms in it); the report's loss is the next-token one,
    with the total beside it as on the progress line."""
    from seekstack.eval.report import _training

    records = [{"step": step, "loss": 8.3473, "lm_loss": 8.3469, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": 0.4}
               for step in (1, 2)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert "Last step 2: loss 8.3469 (total 8.3473)." in _training(tmp_path, tmp_path, {}, records)


def test_explain_corpus_on_a_model_without_moe_layers_refuses_before_writing_anything(tmp_path):
    import seekstack
    from tests.infer.support import micro_model, tiny_tokenizer

    model = seekstack.save_pretrained(micro_model(first_k_dense_replace=3), tmp_path / "dense")
    tiny_tokenizer(model)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "val.jsonl").write_text(json.dumps({"id": "a", "text": "x = 1\n" * 400}) + "\n")
    out = tmp_path / "explain"
    result = CliRunner().invoke(app, ["explain", str(model), "def f(x):", "--out", str(out), "--corpus", str(corpus)])
    # the micro model's MTP module (block 3) routes: the model is dense in its main layers alone
    mtp_note = "Its MTP module (block 3) routes to experts"
    assert result.exit_code == 1 and "The main model has no MoE layers" in result.output and mtp_note in result.output
    assert not out.exists()
    text_only = run("explain", model, "def f(x):", "--out", out)
    assert "routing: none. The main model has no MoE layers" in text_only.output and mtp_note in text_only.output
    assert sorted(path.name for path in out.iterdir()) == ["attention.png", "explain.html"]


def test_the_last_step_logged_past_the_newest_checkpoint_is_said_to_be_in_none(tmp_path):
    """A run killed after logging step 5 but saving step_4 (or still training) read 'Last step 5' above a model
    table of 4 steps, with nothing to say which steps the checkpoint holds."""
    from seekstack.eval.report import _training

    records = [{"step": s, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 9.0, "mfu": 0.1} for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    checkpoints = tmp_path / "checkpoints"
    text = _training(tmp_path, tmp_path, {}, records, checkpoints / "step_4")
    assert "Last step 5: loss (total 3.0000). Step 5 is in no checkpoint yet (the newest is step_4)" in text
    assert "Steps 3-5 are in no checkpoint yet" in _training(tmp_path, tmp_path, {}, records, checkpoints / "step_2")
    assert "no checkpoint yet" not in _training(tmp_path, tmp_path, {}, records, checkpoints / "step_5")


def test_validation_table_shows_maxvio_only_for_a_run_that_logged_it(tmp_path):
    from seekstack.eval.report import _training

    dense = [{"step": 2, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 9.0, "mfu": 0.1, "val_loss": 3.1, "val_bpb": 1.2}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dense[0]) + "\n")
    table = _training(tmp_path, tmp_path, {}, dense)
    assert "| step | val loss | val bits/byte |\n|---|---|---|\n| 2 | 3.1000 | 1.2000 |" in table
    assert "MaxVio" not in table
    moe = [*dense, {**dense[0], "step": 4, "val_maxvio": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in moe))
    table = _training(tmp_path, tmp_path, {}, moe)
    assert "| 2 | 3.1000 | 1.2000 | - |\n| 4 | 3.1000 | 1.2000 | 0.25 |" in table


def test_a_report_the_disk_refuses_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """report.md was written in place: a disk that filled midway left the earlier report cut short."""
    monkeypatch.setattr("seekstack.eval.report.plot_run", lambda run_dir, path, records: path)  # PNG written apart
    from seekstack.atomic import WriteRefused
    from seekstack.eval.report import write_report
    from tests.test_atomic import file_size_limit

    run_dir = _step_checkpoint(tmp_path / "run", 2).parent.parent
    (run_dir / "checkpoints" / "step_2" / "train_state.pt").write_bytes(b"")
    (run_dir / "train_config.json").write_text(json.dumps({"model": "tiny", "data_dir": "../tokens", "seq_len": 64}))
    record = {"loss": 4.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_s": 1.0, "mfu": 0.1}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **record}) + "\n" for s in (1, 2)))
    report = write_report(run_dir, samples=False)
    earlier = report.read_bytes()
    with pytest.raises(WriteRefused), file_size_limit(len(earlier) // 2):
        write_report(run_dir, samples=False)
    assert report.read_bytes() == earlier and not list(run_dir.glob(".*"))


def test_a_report_of_a_run_that_deletes_its_checkpoint_meanwhile_describes_the_newer_one(tmp_path, monkeypatch):
    """A run still training with keep_checkpoints saved step_3 and deleted step_2 while the page described step_2:
    'error: RUN/checkpoints/step_2: no such folder; a checkpoint is a folder holding config.json ...'."""
    import seekstack.eval.report as report

    monkeypatch.setattr(report, "plot_run", lambda run_dir, path, records: path)  # PNG written apart
    run_dir = _step_checkpoint(tmp_path / "run", 2).parent.parent
    (run_dir / "checkpoints" / "step_2" / "train_state.pt").write_bytes(b"")
    (run_dir / "train_config.json").write_text(json.dumps({"model": "tiny", "data_dir": "../tokens", "seq_len": 64}))
    record = {"loss": 4.0, "lr": 1e-3, "tokens_per_s": 100.0, "step_s": 1.0, "mfu": 0.1}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **record}) + "\n" for s in (1, 2, 3)))
    describe = report._model

    def run_saves_step_3_and_prunes_step_2(run, checkpoint, *arguments):
        if checkpoint.name == "step_2":
            (_step_checkpoint(run_dir, 3) / "train_state.pt").write_bytes(b"")
            shutil.rmtree(checkpoint)
        return describe(run, checkpoint, *arguments)

    monkeypatch.setattr(report, "_model", run_saves_step_3_and_prunes_step_2)
    page = report.write_report(run_dir, samples=False).read_text()
    assert (
        f"newest checkpoint `{run_dir / 'checkpoints' / 'step_3'}`" in page
        and "| tokens trained | 300 (3 steps) |" in page
    )
    (run_dir / "checkpoints" / "step_3" / "config.json").write_text("{")  # damaged, not deleted: named at once
    with pytest.raises(ValueError, match="step_3"):
        report.write_report(run_dir, samples=False)


def test_eval_records_the_corpus_and_per_module_only_where_a_task_read_them(tmp_path, monkeypatch):
    """results.json recorded the default corpus runs/demo/corpus (and per_module 4) for a task-only eval that never
    read it, and the report's rerun command passed it on."""
    import lm_eval

    from seekstack.eval.report import _eval_again

    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: output)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "eval" / "results.json").read_text())["options"]
    assert (options["corpus"], options["per_module"]) == (None, None)
    assert "--corpus" not in _eval_again(tmp_path, {"options": options})


def test_a_tokenizer_with_ids_past_the_models_vocabulary_is_refused_before_the_weights_load(checkpoint, tmp_path):
    """explain and eval fed its ids to the embedding: "IndexError: index out of range in self" in a traceback, once a
    text holding one of the extra tokens reached the model; generate, chat and serve refuse it (check_tokenizer_fits)
    """
    from seekstack.tokenizer import Tokenizer

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    tokenizer = Tokenizer.from_file(folder)
    tokenizer.backend.add_tokens(["return", "def"])  # ids 512 and 513 of a 512-token model
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "val.jsonl").write_text(json.dumps({"id": "m", "text": "def f():\n    return 1\n" * 40}))
    refusal = f"tokenizer {folder / 'tokenizer.json'} has 514 tokens, more than the model's vocabulary (512, {folder})"
    for command in (
        ["explain", folder, "def f(): return 1", "--out", tmp_path / "explain"],
        ["eval", folder, "--tasks", "code_perplexity", "--corpus", tmp_path / "corpus", "--out", tmp_path / "r"],
        ["eval", folder, "--tasks", "code_perplexity", "--corpus", tmp_path / "corpus", "--out", tmp_path / "r",
         "--backend", "hf"],
    ):  # fmt: skip
        result = CliRunner().invoke(app, [str(arg) for arg in command], env={"COLUMNS": "400"})
        assert result.exit_code == 1 and refusal in " ".join(result.output.split()), result.output
    assert not (tmp_path / "explain").exists() and not (tmp_path / "r.json").exists()


def test_eval_seeds_python_numpy_torch_and_the_few_shot_sampler_as_lm_evals_seed_and_the_report_reruns_it_so(
    tmp_path, monkeypatch
):
    """seekstack eval had no --seed: every run drew its few-shot examples (and sampled) with lm_eval's default seeds,
    so a user could not see how much a score moves with the examples drawn, as `lm_eval --seed` shows."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate
    from seekstack.eval.report import _eval_again

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    names = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
    for given, seeds in (("7", [7, 7, 7, 7]), ("1,None,3", [1, None, 3, 1234]), ("5,6,7,8", [5, 6, 7, 8])):
        result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--num-fewshot", "2", "--seed", given,
                                          "--out", str(tmp_path / "results"), "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert [asked[-1][name] for name in names] == seeds
        options = json.loads((tmp_path / "results.json").read_text())["options"]
        assert options["seed"] == ",".join(map(str, seeds))
        assert _eval_again(tmp_path, {"options": options}).endswith(f"--seed {options['seed']}`")
    report = evaluate(tmp_path, ("mc",), device="cpu")
    assert [asked[-1][name] for name in names] == [0, 1234, 1234, 1234] and report["options"]["seed"] is None
    with pytest.raises(ValueError, match=r"field 'seed': '1,2': Argument requires 4 integers .* \(42\), or Python's"):
        evaluate(tmp_path, ("mc",), device="cpu", seed="1,2")


def test_gen_kwargs_update_each_tasks_generation_kwargs_as_lm_evals_and_the_report_reruns_them(
    checkpoint, tmp_path, monkeypatch
):
    """seekstack eval had no --gen-kwargs (lm_eval's --gen_kwargs): a generating task could not be run with another
    max_gen_toks or sampled, as lm_eval users run gsm8k with --gen_kwargs max_gen_toks=512."""
    import lm_eval

    from seekstack.eval.evaluate import evaluate
    from seekstack.eval.report import _eval_again
    from seekstack.infer.engine import Engine
    from seekstack.infer.params import SamplingParams

    # a real run: the task's config records the kwarg, and its answer is the first 2 of the greedy continuation's tokens
    (tmp_path / "corpus").mkdir()
    module = "\n".join(f"value_{i} = compute({i})" if i % 3 else "" for i in range(60))
    (tmp_path / "corpus" / "val.jsonl").write_text(json.dumps({"id": "m.py", "text": module}) + "\n")
    report = evaluate(checkpoint, ("code_next_line",), tmp_path / "corpus", limit=1, device="cpu",
                      gen_kwargs="max_gen_toks=2", samples_folder=tmp_path / "samples")  # fmt: skip
    assert report["configs"]["code_next_line"]["generation_kwargs"]["max_gen_toks"] == 2
    (samples,) = (tmp_path / "samples").rglob("samples_code_next_line_*.jsonl")
    (sample,) = (json.loads(line) for line in samples.read_text().splitlines())
    engine = Engine.from_pretrained(checkpoint)
    context = sample["arguments"]["gen_args_0"]["arg_0"]
    (greedy,) = engine.generate(context, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert len(greedy.token_ids) == 8 and "\n" not in greedy.text  # the limit, not a stop, ends it
    assert sample["resps"] == [[engine.tokenizer.decode(greedy.token_ids[:2])]] and greedy.text != sample["resps"][0][0]

    asked = []
    output = {"results": {"mc": {"acc,none": 0.5}}, "n-samples": {"mc": {"effective": 4}}}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: asked.append(kwargs) or output)
    (tmp_path / "config.json").write_text(MICRO_CONFIG)
    for given, parsed in (("max_gen_toks=5,do_sample=True,until=['\\n\\n']",
                           {"max_gen_toks": 5, "do_sample": True, "until": ["\n\n"]}),
                          ('{"temperature": 0.6}', {"temperature": 0.6})):  # fmt: skip
        result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--gen-kwargs", given, "--out",
                                          str(tmp_path / "results"), "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert asked[-1]["gen_kwargs"] == parsed
        options = json.loads((tmp_path / "results.json").read_text())["options"]
        assert options["gen_kwargs"] == given
        assert _eval_again(tmp_path, {"options": options}).endswith(f"--gen-kwargs {shlex.quote(given)}`")
    report = evaluate(tmp_path, ("mc",), device="cpu")
    assert asked[-1]["gen_kwargs"] is None and report["options"]["gen_kwargs"] is None
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", "mc", "--gen-kwargs", "temperature"])
    assert result.exit_code == 2
    assert "Invalid value for '--gen-kwargs': 'temperature': expected `key=value`" in result.output


def test_report_of_a_lora_run_whose_adapter_is_peft_pickle_names_it_not_a_missing_safetensors(tmp_path):
    """A checkpoint holding peft's adapter_model.bin (safe_serialization=False) ended the report in safetensors'
    'No such file or directory: .../adapter_model.safetensors' traceback; it is refused as generate and serve do."""
    from seekstack.checkpoint import CheckpointError
    from seekstack.eval.report import _model

    base = _step_checkpoint(tmp_path / "base", 1)
    adapter = tmp_path / "run" / "checkpoints" / "step_2"
    adapter.mkdir(parents=True)
    lora = {"base_model_name_or_path": str(base), "peft_type": "LORA", "r": 8, "lora_alpha": 16}
    (adapter / "adapter_config.json").write_text(json.dumps(lora | {"target_modules": ["q_proj"]}))
    (adapter / "adapter_model.bin").write_bytes(b"a pickle")
    with pytest.raises(CheckpointError, match=r"step_2: no adapter_model\.safetensors; it holds adapter_model\.bin "):
        _model(tmp_path / "run", adapter, {}, [])


@pytest.mark.parametrize(
    "attention",
    [["q_proj", "o_proj"], ["o_proj", "o_proj"]],  # a query the base lacks (it has q_lora_rank), a target twice
)
def test_a_lora_run_whose_targets_an_earlier_seekstack_took_is_reported_with_the_compute_it_trained(
    tmp_path, attention
):
    """lora train took these (ab2376a and ee898b0 refuse them now: the first trained o_proj alone, the second counted
    o_proj twice); the report of such a run failed on its lora_config.json, then left its FLOPs and MFU out, where
    `AdapterConfig.as_trained` (a resume's reading) gives the targets it trained: o_proj's compute."""
    from seekstack.adapters.config import CONFIG_FILE, AdapterConfig
    from seekstack.config import preset
    from seekstack.eval.report import _training_flops_per_token
    from seekstack.schema import ConfigError

    AdapterConfig(attention=["o_proj"], feed_forward=[], experts=[]).save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**saved, "attention": attention}))
    run = {"seq_len": 32, "batch_size": 2}
    as_saved = _training_flops_per_token(preset("tiny"), run, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    assert as_saved == _training_flops_per_token(preset("tiny"), run, tmp_path) > 0
    (tmp_path / CONFIG_FILE).write_text("{")  # damaged: named, as before
    with pytest.raises(ConfigError, match=f"{CONFIG_FILE}: cannot be parsed"):
        _training_flops_per_token(preset("tiny"), run, tmp_path)
