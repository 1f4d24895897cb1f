"""The benchmarks' count options (--reps, --rounds, --steps, --tokens, ...): a 0 is refused by name before any
work; it used to run the whole benchmark and fail on an empty median."""

import argparse
import ast
import os
import signal
import subprocess
import sys

import pytest

from tests.bench.support import BENCH, run_in_process

sys.path.insert(0, str(BENCH))  # its siblings (ctrl_c.py), as when run
import ctrl_c  # noqa: E402

from bench.options import check_task, checkpoint_folder, non_negative_int, positive_int  # noqa: E402
from tests.bench.test_peers import micro_checkpoint
from tests.train.test_trainer import write_split


def test_ctrl_c_ends_a_bench_in_one_line_by_sigint_and_other_errors_keep_their_traceback(monkeypatch, capsys):
    """Every bench imports bench/ctrl_c.py; Ctrl-C in one printed KeyboardInterrupt's traceback, then exited 1 (not
    130: torch._dynamo's atexit hook makes Python forget the interrupt). Importing it sets no hook: pytest's is kept."""
    assert sys.excepthook is not ctrl_c.interrupted_in_one_line
    signals = []
    monkeypatch.setattr(ctrl_c.signal, "signal", lambda number, handler: signals.append((number, handler)))
    monkeypatch.setattr(ctrl_c.os, "kill", lambda pid, number: signals.append((pid, number)))
    monkeypatch.setattr(sys, "argv", ["bench/quantize.py", "--model", "m"])
    ctrl_c.interrupted_in_one_line(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == "quantize.py: interrupted (Ctrl-C)\n"
    assert signals == [(signal.SIGINT, signal.SIG_DFL), (os.getpid(), signal.SIGINT)]
    ctrl_c.interrupted_in_one_line(ValueError, ValueError("no such split"), None)
    assert capsys.readouterr().err.endswith("ValueError: no such split\n") and len(signals) == 2


def test_every_bench_run_as_a_script_imports_ctrl_c_for_its_ctrl_c_line():
    """bench/data_corpora.py, data_clean.py, data_quality.py and data_datatrove.py imported no ctrl_c.py (itself or
    through a sibling), so Ctrl-C in them printed KeyboardInterrupt's traceback where the other benches print a line."""
    imports = {}  # each bench module: the sibling modules it imports
    for script in BENCH.glob("*.py"):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imports[script.stem] = {name for name in names if (BENCH / f"{name}.py").is_file()}
    without = []
    for script in BENCH.glob("*.py"):
        if 'if __name__ == "__main__":' not in script.read_text(encoding="utf-8"):
            continue
        reached, pending = set(), [script.stem]
        while pending:
            module = pending.pop()
            reached.add(module)
            pending.extend(imports[module] - reached)
        if "ctrl_c" not in reached:
            without.append(script.name)
    assert without == []


def test_the_data_benches_get_their_ctrl_c_line_without_importing_torch():
    """The data benches took their Ctrl-C line from options.py, whose checkpoint and shard readers import torch: ~3 s
    of CPU at each start for benches that use none of it."""
    imported = "import sys; import data_clean, data_datatrove, data_quality; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", imported], cwd=BENCH, capture_output=True, text=True, check=True)
    assert run.stdout == "False\n"


def test_positive_int_takes_a_whole_number_of_at_least_one():
    assert positive_int("3") == 3
    for text, message in (("0", "0: at least 1"), ("-2", "-2: at least 1"), ("2.5", "'2.5' is not a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(text)


def test_a_negative_size_is_refused_naming_the_option_where_zero_has_a_meaning(tmp_path, monkeypatch, capsys):
    """bench/speculative.py --draft-vocab 0 is the whole vocabulary; -5 ended in a ConfigError traceback after the
    model and its engines loaded."""
    assert non_negative_int("0") == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "val.jsonl").write_text('{"id": "0", "text": "x"}\n', encoding="utf-8")
    options = ["--model", str(tmp_path / "model"), "--corpus", str(corpus), "--draft-vocab", "-5"]
    run = run_in_process("speculative.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "argument --draft-vocab: -5: at least 0" in run.stderr


SCRIPTS_WITH_THREADS = ("eval_parity.py", "moe_decode.py", "moe_dispatch.py", "prefix_cache.py", "quantize.py",
                      "serve_isolation.py", "serve_json_mode.py", "serve_load.py")  # fmt: skip


@pytest.mark.parametrize(("script", "option"), [("prune.py", "--heal-steps"), ("lora_domain.py", "--eval-batches")])
def test_a_negative_count_is_refused_naming_the_option_where_zero_has_a_meaning(script, option, monkeypatch, capsys):
    """--heal-steps -3 was handed on as the healing runs' max_steps once the pruning ran; --eval-batches -1 was taken
    as all, as 0 is."""
    run = run_in_process(script, option, "-3", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"argument {option}: -3: at least 0" in run.stderr


@pytest.mark.parametrize(
    ("script", "option"),
    [
        ("forward.py", "--reps"),
        ("forward.py", "--seq-lens"),  # a (B, 0) forward failed after every model had loaded
        ("forward.py", "--profile-seq-len"),
        ("forward.py", "--profile-reps"),  # a profile of no forward, printed as one
        ("train_step.py", "--reps"),
        ("moe_decode.py", "--reps"),
        ("moe_dispatch.py", "--reps"),
        ("prefix_cache.py", "--reps"),
        ("decode_options.py", "--rounds"),
        ("serve_load.py", "--clients"),
        ("distill_step.py", "--steps"),
        ("distill_step.py", "--batch-size"),
        ("grpo_step.py", "--generations"),
        ("quantize.py", "--batches"),
        ("prune.py", "--calibration-batches"),
        ("r1_distill.py", "--sft-steps"),  # max_steps=0: the SFT config's ConfigError traceback
        # --threads 0 failed in torch.set_num_threads after the models loaded, or ran on torch's count unasked
        *((script, "--threads") for script in SCRIPTS_WITH_THREADS),
    ],
)
def test_a_count_of_zero_is_refused_naming_the_option(script, option, monkeypatch, capsys):
    run = run_in_process(script, option, "0", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"argument {option}: 0: at least 1" in run.stderr


@pytest.mark.parametrize(
    ("script", "options", "argument"),
    [
        ("distill_reason.py", ["--base-teacher", "{missing}"], "--base-teacher"),
        ("distill_step.py", ["{missing}", "{missing}"], "teacher"),
        ("eval_parity.py", ["--model", "{missing}"], "--model"),
        ("dr_grpo.py", ["{missing}"], "start"),
        ("lora_serve.py", ["{missing}", "{missing}"], "base"),
        ("lora_domain.py", ["{missing}", "{missing}"], "base"),
        ("r1_distill.py", ["--teacher", "{missing}", "--student", "{missing}"], "--teacher"),
        ("serve_load.py", ["--model", "{missing}"], "--model"),
    ],
)
def test_a_checkpoint_folder_that_is_missing_is_refused_naming_the_argument(
    script, options, argument, tmp_path, monkeypatch, capsys
):
    """It ended in a CheckpointError or ConfigError traceback (lora_serve.py: a RuntimeError once the server it had
    started exited), after the other models and data had loaded."""
    missing = tmp_path / "nope"
    run = run_in_process(script, *(option.format(missing=missing) for option in options), monkeypatch=monkeypatch,
                         capsys=capsys)  # fmt: skip
    assert run.returncode == 2, run.stderr[-500:]
    assert f"error: argument {argument}: {missing}: no such folder; a checkpoint is a folder holding" in run.stderr


def test_a_training_runs_folder_is_taken_as_its_newest_checkpoint(tmp_path):
    """eval_parity.py --model runs/eval_demo/train (its docstring's command) and dr_grpo.py START refused a run's
    out_dir, which seekstack's command line and the benches' own loaders take for its newest checkpoint."""
    for step in (1, 5):
        micro_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step}")
        (tmp_path / "run" / "checkpoints" / f"step_{step}" / "train_state.pt").write_bytes(b"")
    assert checkpoint_folder(str(tmp_path / "run")) == tmp_path / "run" / "checkpoints" / "step_5"
    assert (
        checkpoint_folder(str(tmp_path / "run" / "checkpoints" / "step_1"))
        == tmp_path / "run" / "checkpoints" / "step_1"
    )


@pytest.mark.parametrize("script", ["distill.py", "train_busy.py", "fsdp_memory.py"])
def test_a_data_folder_without_token_shards_is_refused_naming_the_option_before_any_work(
    script, tmp_path, monkeypatch, capsys
):
    """It ended in a FileNotFoundError traceback from the first training run (train_busy.py: after measuring the
    matmul peak), where the other short-run studies refuse it."""
    run = run_in_process(script, "--data", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"argument --data: no shard index at {tmp_path / 'train_index.json'}: " in run.stderr


def test_token_data_missing_a_split_a_study_reads_or_with_a_damaged_index_is_refused_naming_it(
    tmp_path, monkeypatch, capsys
):
    """The short-run studies checked their splits after parsing with one check (exiting 1) and the other benches at
    parsing with another; a damaged index passed the first and ended in a traceback from the first run."""
    for split in ("train", "val"):
        write_split(tmp_path, split, 600, seed=0)
    run = run_in_process("curriculum.py", "--data", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "argument --data: no shard index at " in run.stderr and "train_easy_index.json" in run.stderr
    assert "`seekstack data tokenize --buckets` writes" in run.stderr
    (tmp_path / "val_index.json").write_text("{", encoding="utf-8")
    run = run_in_process("balance.py", "--data", str(tmp_path), monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"argument --data: {tmp_path / 'val_index.json'} is corrupt" in run.stderr


@pytest.mark.parametrize(
    ("script", "option", "given", "said"),
    [
        ("prune.py", "--heads", "nan", "nan: a number from 0 to 1"),  # ValueError: Invalid literal for Fraction
        ("prune.py", "--experts", "-1", "-1: a number from 0 to 1"),  # RuntimeError: selected index k out of range
        ("prune.py", "--heads", "half", "'half' is not a number"),
        ("quantize.py", "--adaptive-bits", "nan", "nan: a number from 0 to 32"),  # a row "adaptive nan bits"
        # ConfigError: field 'lr' has value nan, after calibrating (prune.py) or in the first run
        ("prune.py", "--heal-lr", "nan", "nan: input should be a finite number"),
        ("grpo_step.py", "--lr", "inf", "inf: input should be a finite number"),
        ("grpo_step.py", "--lr", "0", "0.0: input should be greater than 0"),  # the trainers' rule, not a second one
        ("distill_step.py", "--lr", "-0.001", "-0.001: input should be greater than 0"),
        ("dr_grpo.py", "--lr", "fast", "'fast' is not a number"),
        ("r1_distill.py", "--grpo-lr", "nan", "nan: input should be a finite number"),
        ("lora_domain.py", "--full-lrs", "nan", "nan: input should be a finite number"),
        # SamplingParams' ConfigError once the teacher had loaded; rows "both nan" measuring nothing
        ("r1_distill.py", "--temperature", "101", "101.0: input should be less than or equal to 100"),
        ("moderation.py", "--thresholds", "nan", "nan: input should be a finite number"),
    ],
)
def test_a_number_out_of_its_range_is_refused_naming_the_option(script, option, given, said, monkeypatch, capsys):
    """They were taken as given, and ended in a traceback after the model had loaded and been calibrated, or in a
    table row measuring an adaptive precision of nan bits per weight."""
    run = run_in_process(script, option, given, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"argument {option}: {said}" in run.stderr


@pytest.mark.parametrize(
    ("script", "options", "whose"),
    [
        ("train_busy.py", ["--data", "{data}"], "preset tiny's"),  # after the matmul peak
        ("distill.py", ["--data", "{data}"], "the student's and the teacher's (preset tiny)"),  # after the teacher
        ("distill_step.py", ["{model}", "{model}", "--data", "{data}"], "{model}'s"),  # in the first run
        ("lora_domain.py", ["{model}", "{data}"], "{model}'s"),  # once the base had loaded
        ("sft_packing.py", ["--conversations", "4"], "the model's"),  # in the first run
    ],
)
def test_a_seq_len_past_the_models_context_is_refused_naming_the_option_and_the_context(
    script, options, whose, tmp_path, monkeypatch, capsys
):
    """A --seq-len longer than the model's context ended in ConfigError's traceback ("field 'seq_len' has value 5000:
    longer than the model's context") from the first training run, after the work before it."""
    for split in ("train", "val"):
        write_split(tmp_path / "data", split, 600, seed=0)
    given = dict(data=tmp_path / "data", model=micro_checkpoint(tmp_path / "model"))
    options = [option.format(**given) for option in options]
    run = run_in_process(script, *options, "--seq-len", "100000", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "argument --seq-len: 100000: at most " in run.stderr and f" ({whose.format(**given)} context)" in run.stderr


@pytest.mark.parametrize("script", ["decode_options.py", "prefix_cache.py", "quantize.py", "train_busy.py"])
def test_a_preset_that_does_not_exist_is_refused_naming_the_option_and_the_presets(script, monkeypatch, capsys):
    """It ended in a ConfigError traceback once the bench built its model (train_busy.py: after the matmul peak)."""
    run = run_in_process(script, "--preset", "tiniest", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "argument --preset: invalid choice: 'tiniest' (choose from " in run.stderr
    assert "'small'" in run.stderr and "'tiny'" in run.stderr


def test_an_adapter_folder_that_is_missing_is_refused_naming_the_argument(tmp_path, monkeypatch, capsys):
    """bench/lora_serve.py BASE ADAPTER started the base's server, then failed starting the adapters' one with a
    RuntimeError traceback."""
    import seekstack
    from tests.conftest import micro_config

    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path / "base")
    missing = tmp_path / "nope"
    run = run_in_process("lora_serve.py", str(tmp_path / "base"), str(missing), monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"error: argument adapters: {missing} does not exist; give an adapter folder (" in run.stderr


@pytest.mark.parametrize(
    ("script", "options", "argument", "said"),
    [
        ("distill_step.py", ["{base}", "{base}", "--data", "{missing}"], "--data", "no folder of token shards at"),
        ("lora_domain.py", ["{base}", "{missing}"], "data", "no folder of token shards at"),
        ("eval_parity.py", ["--model", "{base}", "--corpus", "{missing}"], "--corpus", "{missing}/val.jsonl: no such"),
    ],
)
def test_data_that_is_missing_is_refused_naming_the_argument(
    script, options, argument, said, tmp_path, monkeypatch, capsys
):
    """Token shards or a corpus that are not there ended in a FileNotFoundError traceback."""
    import seekstack
    from tests.conftest import micro_config

    seekstack.save_pretrained(seekstack.Transformer(micro_config()), tmp_path / "base")
    where = dict(base=tmp_path / "base", missing=tmp_path / "nope")
    run = run_in_process(script, *(option.format(**where) for option in options), monkeypatch=monkeypatch,
                         capsys=capsys)  # fmt: skip
    assert run.returncode == 2, run.stderr[-500:]
    assert f"error: argument {argument}: {said.format(**where)}" in run.stderr


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--options", "5", "argument --options: '5' is not a JSON object of inductor options"),
        ("--prompt-len", "0", "argument --prompt-len: 0: at least 1"),
        (
            "--new-tokens",
            "1",
            "argument --new-tokens: 1: at least 2, the decode rate is t(N new tokens) - t(1 new token)",
        ),
    ],
)
def test_decode_options_refuses_settings_that_measure_nothing_naming_the_option(
    option, value, said, monkeypatch, capsys
):
    """--options 5 was a TypeError traceback, --prompt-len 0 the engine's ValueError after every engine was built, and
    --new-tokens 1 measured 0 tok/s for every set and then divided by it."""
    run = run_in_process("decode_options.py", "--preset", "tiny", option, value, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"error: {said}" in run.stderr


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--system-tokens", "-5"], "argument --system-tokens: -5: at least 1"),
        (["--question-tokens", "-1"], "argument --question-tokens: -1: at least 0"),
        (["--system-tokens", "1000"], "--system-tokens 1000 + --question-tokens 32 + 1 new token: past preset tiny's"),
    ],
)
def test_prefix_cache_refuses_prompts_it_cannot_build_naming_the_options(options, said, monkeypatch, capsys):
    """A negative size was torch.randint's traceback; a prompt past the context the engine's 'prompt has 1032 tokens,
    more than max_model_len=1024' ValueError once the model and tokenizer were built."""
    run = run_in_process("prefix_cache.py", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"error: {said}" in run.stderr


@pytest.mark.parametrize("option", ["--small-vocab", "--large-vocab"])
def test_serve_json_mode_refuses_a_vocabulary_below_the_bytes_and_special_tokens(option, monkeypatch, capsys):
    """--small-vocab -3 was the tokenizer's ConfigError traceback; --large-vocab -3 was taken, a tokenizer of the bytes
    and special tokens alone (270) timed as one of -3."""
    run = run_in_process("serve_json_mode.py", option, "-3", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert f"error: argument {option}: -3: at least 270" in run.stderr


@pytest.mark.parametrize(
    ("script", "checkpoints"),
    [
        ("r1_distill.py", ["--teacher", "{model}", "--student", "{model}"]),
        ("dr_grpo.py", ["{model}"]),
        ("distill_reason.py", ["--base-teacher", "{model}", "--student", "{model}"]),
        ("grpo_step.py", ["{model}"]),
    ],
)
def test_a_difficulty_the_task_refuses_is_refused_naming_the_options(
    script, checkpoints, tmp_path, monkeypatch, capsys
):
    """The run config's ConfigError ("field 'difficulty': difficulty 5000: at most 1000 ...") came as a traceback
    from the first run, after the work before it (r1_distill.py: the teacher's traces)."""
    model = micro_checkpoint(tmp_path / "model")
    options = [option.format(model=model) for option in checkpoints]
    run = run_in_process(script, *options, "--difficulty", "5000", monkeypatch=monkeypatch, capsys=capsys)
    assert run.returncode == 2, run.stderr[-500:]
    assert "error: --task addition --difficulty 5000: difficulty 5000: at most 1000" in run.stderr.splitlines()[-1]


def test_a_task_there_is_none_of_is_refused_naming_the_task_alone_when_no_difficulty_was_given(capsys):
    """check_task named "--task nothing --difficulty None" for a --difficulty never typed."""
    with pytest.raises(SystemExit):
        check_task(argparse.ArgumentParser(prog="dr_grpo.py"), "nothing", None)
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("dr_grpo.py: error: --task nothing: ") and "None" not in last


@pytest.mark.parametrize("script", ["eval_parity.py", "distill.py", "sft_tools.py"])
def test_help_describes_the_bench_in_its_docstrings_whole_first_paragraph(script, monkeypatch, capsys):
    """Their --help took the docstring's first line alone and ended mid-sentence ('... log-likelihoods of the')."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line a paragraph: argparse wraps at hyphens too ('per-\nrequest')
    run = run_in_process(script, "--help", monkeypatch=monkeypatch, capsys=capsys)
    paragraph = ast.get_docstring(ast.parse((BENCH / script).read_text())).split("\n\n")[0]
    assert run.returncode == 0 and " ".join(paragraph.split()) in " ".join(run.stdout.split())
