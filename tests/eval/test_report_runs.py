"""`seekstack report` on post-training runs (rl, sft on a task or on a conversations file) and on a run evaluated
before its newest checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from seekstack.eval.report import EVAL_RESULTS, _evaluation, _fenced, write_report
from seekstack.eval.samples import conversation_samples
from seekstack.infer.engine import Engine
from seekstack.posttrain.conversations import (
    hold_out,
    prompt_messages,
    read_conversations,
    write_conversations,
    write_held_out,
)
from seekstack.posttrain.rewards import R1_SYSTEM_PROMPT
from seekstack.posttrain.tasks import make_task, sample_problems
from seekstack.tokenizer import ASSISTANT, EOS, USER, Tokenizer, tools_prompt
from seekstack.train.runs import TRAIN_STATE_FILE
from tests.posttrain.support import micro_checkpoint

RL_CONFIG = {"init_from": "../sft", "task": "addition", "difficulty": 1, "batch_size": 2, "num_generations": 4,
             "max_completion_length": 12}  # fmt: skip


EVAL_OPTIONS = {"tasks": ["reason_addition"], "corpus": "/data/my corpus", "backend": "hf", "batch_size": 2,
                "limit": 40, "per_module": 4, "device": "cpu", "num_fewshot": 3,
                "apply_chat_template": False}  # fmt: skip


def _write_eval_results(run_dir: Path, model: str, **options: object) -> None:
    """eval/results.json as `seekstack eval` writes it, having measured checkpoint `model` with `options` (none: as
    it wrote the file before it recorded them)."""
    (run_dir / EVAL_RESULTS).parent.mkdir(parents=True)
    (run_dir / EVAL_RESULTS).write_text(json.dumps({
        "model": model, "backend": "seekstack", "wall_s": 3.0, "results": {"reason_addition": {"exact_match": 0.5}},
        "n-samples": {"reason_addition": {"original": 30, "effective": 10}},
        **({"options": options} if options else {}),
    }))  # fmt: skip


def test_evaluation_names_the_checkpoint_it_measured_and_says_when_the_run_has_a_newer_one(tmp_path):
    run_dir = tmp_path / "rlA"
    _write_eval_results(run_dir, "rlA/checkpoints/step_16", **EVAL_OPTIONS)  # the run named as the user named it
    stale = _evaluation(run_dir, run_dir / "checkpoints" / "step_18")
    assert (
        "lm-evaluation-harness on `rlA/checkpoints/step_16`" in stale and "| reason_addition | exact_match |" in stale
    )
    assert "**Not the newest checkpoint:** these results are `rlA/checkpoints/step_16`'s; the run's newest is" in stale
    rerun = (
        f"seekstack eval {run_dir} --tasks reason_addition --corpus '/data/my corpus' --backend hf --batch-size 2 "
        "--limit 40 --per-module 4 --device cpu --num-fewshot 3"
    )
    assert f"`{rerun}` measures `step_18` and rewrites `eval/results.json`" in stale
    current = _evaluation(run_dir, run_dir / "checkpoints" / "step_16")
    assert "on `rlA/checkpoints/step_16`" in current and "newest" not in current


def test_evaluation_results_from_before_eval_recorded_its_options_still_name_the_rerun(tmp_path):
    _write_eval_results(tmp_path, "checkpoints/step_16")
    stale = _evaluation(tmp_path, tmp_path / "checkpoints" / "step_18")
    assert f"`seekstack eval {tmp_path} --tasks reason_addition` (with the options it ran with) measures" in stale


@pytest.mark.parametrize(
    "train_config, task",
    [(RL_CONFIG, "addition"), ({"task": "countdown", "data": "", "examples": 64}, "countdown"),
     ({"task": "addition", "data": "chats.jsonl"}, None), ({"task": "", "data": "traces.jsonl"}, None),
     ({"data_dir": "../tokens", "seq_len": 64}, None)],
)  # fmt: skip
def test_a_run_is_sampled_on_the_task_it_trained_on_when_it_trained_on_one(train_config, task):
    from seekstack.eval.report import trained_task

    found = trained_task(train_config)
    assert (found and found.name) == task
    if found:
        assert found.difficulty == train_config.get("difficulty", make_task(task).difficulty)


def _post_training_run(run_dir: Path, train_config: dict, records: list[dict]) -> Path:
    """A run's folder: train_config.json, metrics.jsonl of `records`, a micro checkpoint at the last record's step."""
    checkpoint = micro_checkpoint(run_dir / "checkpoints" / f"step_{records[-1]['step']}")
    torch.save({}, checkpoint / TRAIN_STATE_FILE)  # a complete checkpoint to latest_checkpoint
    return _run_files(run_dir, train_config, records)


def _run_files(run_dir: Path, train_config: dict, records: list[dict]) -> Path:
    """A run's train_config.json and its metrics.jsonl of `records`."""
    (run_dir / "train_config.json").write_text(json.dumps(train_config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def test_report_of_a_3d_attention_run_says_why_it_has_no_samples(checkpoint_3d, tmp_path):
    """The engine refuses attention_variant=3d: the report is written, its samples section saying why it has none
    (the whole report failed on the engine's refusal)."""
    import shutil

    checkpoint = Path(shutil.copytree(checkpoint_3d, tmp_path / "run" / "checkpoints" / "step_2"))
    torch.save({}, checkpoint / TRAIN_STATE_FILE)
    records = [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": 0.3} for step in (1, 2)]
    run_dir = _run_files(tmp_path / "run", {"model": "tiny", "data_dir": "../tokens"}, records)
    report = write_report(run_dir).read_text()
    said = "## Samples\n\nNone: the model's attention_variant='3d' is a training ablation the inference engine"
    assert said in report
    assert "## Model" in report and "```python" not in report


def test_report_of_a_run_whose_checkpoint_holds_no_tokenizer_says_why_it_has_no_samples(tmp_path):
    """A run that found no tokenizer.json for its data (moved or deleted since it was tokenized) saves checkpoints
    without one: the whole report failed ("step_2/tokenizer.json: no such file; train a tokenizer into ..."), after
    it had written curves.png, where its samples section can say why it has none."""
    records = [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": 0.3} for step in (1, 2)]
    run_dir = _post_training_run(tmp_path / "run", {"model": "tiny", "data_dir": "../tokens"}, records)
    checkpoint = run_dir / "checkpoints" / "step_2"
    (checkpoint / "tokenizer.json").unlink()
    page = write_report(run_dir).read_text()
    assert page.endswith(
        f"## Samples\n\nNone: no tokenizer.json in `{checkpoint}` to read the model's text (the run found none for "
        "its data; set `tokenizer` in a run to put one in its checkpoints, or copy the data's tokenizer.json there "
        "and report again).\n"
    )
    assert "## Model" in page


def test_report_of_a_run_stopped_before_its_first_complete_save_gives_its_data_and_curves(tmp_path):
    """It was refused whole ("no complete checkpoint: step_2 ... hold no train_state.pt ...: pass such a model folder
    itself", which `report` does not take), though the run's metrics and curves were there to read."""
    records = [{"step": step, "loss": 3 - step / 10, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": 0.3} for step in (1, 2)]
    (tmp_path / "run" / "checkpoints" / "step_2").mkdir(parents=True)  # a save cut short: no train_state.pt
    run_dir = _run_files(tmp_path / "run", {"model": "tiny", "data_dir": "../tokens"}, records)
    page = write_report(run_dir).read_text()
    assert "from the run's files; no complete checkpoint." in page
    assert "## Model\n\nNo complete checkpoint under" in page and "a save cut short" in page
    assert "Last step 2: loss (total 2.8000)." in page and (run_dir / "curves.png").is_file()
    assert "## Evaluation" not in page and "## Samples" not in page  # nothing measured, no model to sample


@pytest.mark.parametrize("kind", ["pretraining", "rl"])
def test_a_last_metrics_line_cut_short_is_told_once_though_page_and_curves_read_it(kind, tmp_path, request, capsys):
    """The page and its curves each read metrics.jsonl, and the report said "dropped the last line" twice."""
    if kind == "rl":
        run_dir = request.getfixturevalue("rl_run")
    else:
        records = [{"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": 0.3} for step in (1, 2)]
        (tmp_path / "run").mkdir()
        run_dir = _run_files(tmp_path / "run", {"model": "tiny", "data_dir": "../tokens"}, records)
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 9, "loss": 5.1')  # what a run stopped while appending leaves
    write_report(run_dir, samples=False)
    assert capsys.readouterr().err.count("dropped the last line, cut short") == 1


@pytest.fixture
def rl_run(tmp_path) -> Path:
    """An `rl` run's folder: its config, 8 steps of metrics (GRPO's loss ~0, the reward rising), checkpoint step_8."""
    records = [
        {"step": step, "loss": 1e-8, "lm_loss": 1e-8, "reward": 0.1 * step, "accuracy": step / 16,
         "reward_format": 1.0, "completion_length": 20.0 - step,
         "completion_length_incorrect": 20.0 - step, "kl": 0.0, "entropy": 0.5, "generate_share": 0.5,
         "tokens_per_s": 900.0, "mfu": 0.3, "step_s": 1.0}
        for step in range(1, 9)
    ]  # fmt: skip
    return _post_training_run(tmp_path / "rl", RL_CONFIG, records)


def test_report_of_an_rl_run_on_a_problems_file_names_the_file_and_no_difficulty(rl_run):
    """A file has no difficulty: the report said 'task `problems.jsonl` (default difficulty)' and '(difficulty 1)'."""
    path = rl_run / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {n} + {n}?", "answer": 2 * n}) + "\n" for n in range(40)))
    (rl_run / "train_config.json").write_text(json.dumps(RL_CONFIG | {"task": str(path), "difficulty": None}))
    page = write_report(rl_run).read_text()
    assert f"Prompts of the problems of `{path}`, 4 completions each" in page
    assert f"held-out questions of the problems of `{path}`, in the chat template" in page
    assert "(difficulty" not in page and "default difficulty" not in page


def test_report_of_an_rl_run_gives_its_rewards_and_answers_to_the_tasks_questions_in_the_chat_template(rl_run):
    _write_eval_results(rl_run, "rl/checkpoints/step_4")
    page = write_report(rl_run).read_text()
    assert "loss" not in page.split("## Training")[1].split("## Evaluation")[0]  # ~1e-8 by construction
    assert "![RL curves](rl_curves.png)" in page and (rl_run / "rl_curves.png").stat().st_size > 1000
    assert (
        f"`rl_curves.png`: steps 1-8 of `{rl_run / 'metrics.jsonl'}`, as `seekstack rl-plot {rl_run} --smooth 2`"
        in page
    )
    assert "|  | steps 1-2 (mean) | steps 7-8 (mean) |" in page  # the first and last quarter of 8 steps
    for row in ("| reward | 0.150 | 0.750 |", "| accuracy (answers that verify) | 9.4% | 46.9% |",
                "| format reward | 1.000 | 1.000 |", "| completion length (tokens) | 18.5 | 12.5 |"):  # fmt: skip
        assert row in page
    assert "these results are `rl/checkpoints/step_4`'s; the run's newest is `step_8`" in page
    samples = page.split("## Samples")[1]
    assert (
        "```python" not in samples
        and R1_SYSTEM_PROMPT in samples
        and f"Greedy answers from the engine on `{rl_run / 'checkpoints' / 'step_8'}` to held-out questions of task "
        "`addition` (difficulty 1)"
        in samples
    )
    tokenizer = Tokenizer.from_file(rl_run / "checkpoints" / "step_8")
    for problem in sample_problems(make_task("addition", 1), 4, "heldout", seed=0, distinct=True):
        assert f"```text\n{tokenizer.render_chat(prompt_messages(problem))}" in samples
    verdicts = samples.count("Verifies.") + samples.count("Does not verify (the answer is ")
    assert verdicts == 4 and f"{samples.count('Verifies.')} of 4 verify." in samples


CHATS = [
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "Now louder."}, {"role": "assistant", "content": "HI!"}],
    [{"role": "user", "content": "x " * 600}, {"role": "assistant", "content": "too long to answer"}],
    [{"role": "user", "content": "x " * 250 + "2 + 2?"}, {"role": "assistant", "content": "4"}],  # ~510 tokens
    [{"role": "user", "content": "The fifth question"}, {"role": "assistant", "content": "not sampled"}],
]  # fmt: skip


@pytest.fixture
def sft_run(tmp_path) -> Path:
    """An `sft data=chats.jsonl` run's folder (sft's config keeps its default task), 2 steps, checkpoint step_2."""
    write_conversations(CHATS, tmp_path / "chats.jsonl")
    train_config = {"model": "tiny", "data": "../chats.jsonl", "task": "addition", "seq_len": 16, "batch_size": 2}
    records = [
        {"step": step, "loss": 2.0, "lm_loss": 2.0, "lr": 1e-3, "tokens_per_s": 900.0, "mfu": 0.3} for step in (1, 2)
    ]
    return _post_training_run(tmp_path / "sft", train_config, records)


def test_report_of_an_sft_run_on_a_conversations_file_answers_its_conversations_beside_the_files_answers(sft_run):
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert "```python" not in samples and "def fibonacci" not in samples and R1_SYSTEM_PROMPT not in samples
    assert f"the first 4 conversations of `{sft_run.parent / 'chats.jsonl'}`" in samples
    assert "1 of them left out: a prompt that fills the model's context" in samples and "x " * 600 not in samples
    tokenizer = Tokenizer.from_file(sft_run / "checkpoints" / "step_2")
    for chat in (CHATS[0], CHATS[1], CHATS[3]):  # each up to its last assistant turn, that turn the reference
        prompt = tokenizer.render_chat(chat[:-1])
        assert (
            f"```text\n{prompt}" in samples and f"The file's answer:\n\n```text\n{chat[-1]['content']}\n```" in samples
        )
    assert f"{ASSISTANT}hi{EOS}{USER}Now louder." in samples  # the earlier answer, in the prompt
    assert "The fifth question" not in samples and samples.count("The file's answer") == 3


def _holding_out(run_dir: Path, val_fraction: float) -> None:
    """Give the run's train_config.json a val_fraction (and room for its answers)."""
    train_config = json.loads((run_dir / "train_config.json").read_text())
    (run_dir / "train_config.json").write_text(
        json.dumps({**train_config, "val_fraction": val_fraction, "seq_len": 64})
    )


def test_report_of_an_sft_run_that_held_out_conversations_answers_those_it_recorded(sft_run):
    """The held-out conversations are those the run recorded in its folder, not a choice redone by today's rule."""
    _holding_out(sft_run, 0.4)
    held_out = [CHATS[1], CHATS[4]]
    assert hold_out(CHATS, 0.4)[1] != held_out  # the rule now would choose others
    write_held_out(sft_run, held_out)
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert "2 of the run's held-out conversations (never trained on)" in samples and "the first" not in samples
    assert samples.count("The file's answer") == 2
    for chat in held_out:
        assert f"The file's answer:\n\n```text\n{chat[-1]['content']}\n```" in samples


def test_report_of_an_sft_run_from_an_earlier_seekstack_calls_none_of_its_conversations_held_out(sft_run):
    """A run that held conversations out but recorded not which (an earlier seekstack, whose rule differed) may
    have trained on any of them: its samples are the file's first conversations, said to be perhaps trained on."""
    _holding_out(sft_run, 0.4)
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert "held-out conversations" not in samples and "never trained on" not in samples
    assert (
        f"the first 4 conversations of `{sft_run.parent / 'chats.jsonl'}` (perhaps trained on: the run held some "
        "conversations out, but an earlier seekstack started it and recorded not which)" in samples
    )


def test_a_conversations_answer_stops_at_the_runs_seq_len_or_where_the_context_ends(sft_run, monkeypatch):
    asked = []  # (prompt tokens, max_new_tokens) of each request
    generate = Engine.generate

    def recording_generate(engine, prompts, params, adapters=None):
        asked.extend((len(prompt), request.max_new_tokens) for prompt, request in zip(prompts, params, strict=True))
        return generate(engine, prompts, params, adapters)

    monkeypatch.setattr(Engine, "generate", recording_generate)
    answers = conversation_samples(sft_run, [CHATS[0], CHATS[3]], max_new_tokens=16)
    assert [answer.reference for answer in answers] == ["Paris", "4"]
    (_, short_cap), (long, long_cap) = asked
    assert short_cap == 16 and 512 - 16 < long < 512 and long_cap == 512 - long  # micro_checkpoint's context: 512


def test_a_conversation_longer_than_the_cache_holds_is_left_out_as_one_that_fills_the_context(sft_run, monkeypatch):
    # A cache of 16 blocks (of 16 tokens) for the 512-token context: the engine's context_len is 240.
    monkeypatch.setattr("seekstack.infer.engine.blocks_in_free_memory", lambda *_: 16)
    answers = conversation_samples(sft_run, [CHATS[0], CHATS[3]], max_new_tokens=16)
    assert [answer.reference for answer in answers] == ["Paris"]  # CHATS[3]'s prompt: 496 to 512 tokens


def test_a_conversation_that_opens_with_its_answer_is_left_out_having_no_message_to_ask_it(sft_run):
    """A conversation whose one message is the assistant's (TRL's prompt-completion with an empty prompt) was asked with
    a chat of no messages, which is refused now (as transformers refuses it): the report failed on such a file."""
    answer_alone = [{"role": "assistant", "content": "Hello."}]
    answers = conversation_samples(sft_run, [CHATS[0], answer_alone], max_new_tokens=4)
    assert [answer.reference for answer in answers] == ["Paris"]


def test_report_of_an_sft_run_whose_conversations_file_is_gone_names_it(sft_run):
    (sft_run.parent / "chats.jsonl").rename(sft_run.parent / "moved.jsonl")
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert f"the run's conversations file `{sft_run.parent / 'chats.jsonl'}` is gone (moved or deleted)" in samples
    assert f"`seekstack chat --model {sft_run / 'checkpoints' / 'step_2'}`" in samples and "```python" not in samples


def test_report_of_a_run_on_a_file_of_problems_not_found_from_here_is_written_saying_why_it_has_no_samples(tmp_path):
    """train_config.json holds `task` as given, relative to where the run started: a report from another folder
    failed whole, "error: task 'problems.jsonl': no such file of problems ..."."""
    records = [{"step": 2, "loss": 0.0, "reward": 0.5, "lr": 1e-3}]
    run_dir = _post_training_run(tmp_path / "rl", {**RL_CONFIG, "task": "problems.jsonl", "difficulty": None}, records)
    samples = write_report(run_dir).read_text().split("## Samples")[1]
    assert "None: the run's task is not there to ask (task 'problems.jsonl': no such file of problems" in samples
    assert f"`seekstack chat --model {run_dir / 'checkpoints' / 'step_2'}`" in samples


def test_report_of_an_sft_run_with_a_val_data_file_answers_it_and_says_when_it_is_gone(sft_run):
    """With its data file gone the samples said none were left, though the held-out file was there; with the
    held-out file gone, they called the run one that 'holds none out'."""
    write_conversations([CHATS[1]], sft_run.parent / "held.jsonl")
    train_config = json.loads((sft_run / "train_config.json").read_text())
    (sft_run / "train_config.json").write_text(json.dumps({**train_config, "val_data": "../held.jsonl"}))
    (sft_run.parent / "chats.jsonl").rename(sft_run.parent / "moved.jsonl")
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert "1 of the run's held-out conversations (never trained on)" in samples and "is gone" not in samples
    assert samples.count("The file's answer") == 1 and "The file's answer:\n\n```text\nHI!\n```" in samples
    (sft_run.parent / "moved.jsonl").rename(sft_run.parent / "chats.jsonl")
    (sft_run.parent / "held.jsonl").unlink()
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert (
        f"the first 4 conversations of `{sft_run.parent / 'chats.jsonl'}` (data the run trained on: its held-out "
        f"conversations' file `{sft_run.parent / 'held.jsonl'}` is gone)" in samples
    )


def test_report_of_a_run_whose_val_data_file_was_emptied_says_why_it_has_no_samples(sft_run):
    """With the held-out conversations' file emptied and the data file gone, the whole report failed: 'error:
    .../held.jsonl: no conversations'."""
    (sft_run.parent / "held.jsonl").write_text("")
    train_config = json.loads((sft_run / "train_config.json").read_text())
    (sft_run / "train_config.json").write_text(json.dumps({**train_config, "val_data": "../held.jsonl"}))
    (sft_run.parent / "chats.jsonl").unlink()
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert f"None: the run's conversations are not there to ask ({sft_run}/../held.jsonl: no conversations)" in samples
    assert f"`seekstack chat --model {sft_run / 'checkpoints' / 'step_2'}`" in samples


def test_report_of_a_run_whose_newest_weights_are_cut_short_is_written_saying_why_it_has_no_samples(sft_run):
    """A model.safetensors cut short (a copy stopped midway) failed the whole report, 'error: ...: not a valid
    safetensors file', though only its samples need the weights."""
    weights = sft_run / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    report = write_report(sft_run).read_text()
    assert "## Training" in report and report.split("## Samples")[1] == (
        f"\n\nNone: the checkpoint cannot be read ({weights}: not a valid safetensors file (Error while "
        "deserializing header: invalid header length); it is truncated or damaged: re-save or re-download the "
        "checkpoint).\n"
    )


def test_report_of_a_run_whose_checkpoint_config_disagrees_with_its_weights_does_not_blame_the_weights(sft_run):
    """A config.json of one decoder layer too many left the samples saying 'the checkpoint's weights cannot be read
    (.../config.json: num_hidden_layers is 4 ...)', though the weights were whole."""
    config = sft_run / "checkpoints" / "step_2" / "config.json"
    layers = json.loads(config.read_text())["num_hidden_layers"]
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": layers + 1}))
    samples = write_report(sft_run).read_text().split("## Samples")[1]
    assert samples.startswith(f"\n\nNone: the checkpoint cannot be read ({config}: num_hidden_layers is {layers + 1}, ")


def test_a_run_on_prompt_completion_text_is_reported_as_asked_without_the_chat_template(tmp_path):
    """`lora train BASE pc.jsonl` on TRL's prompt-completion text: its samples, its prompts as they are, were said to be
    'each in the chat template up to its last assistant turn'."""
    from seekstack.eval.report import _conversation_answers

    rows = [{"prompt": f"问题 {number}：", "completion": "答案"} for number in range(2)]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    checkpoint = micro_checkpoint(tmp_path / "lora" / "checkpoints" / "step_2")
    train_config = {"data_dir": str(tmp_path / "pc.jsonl"), "seq_len": 4}
    samples = _conversation_answers(tmp_path / "lora", checkpoint, tmp_path / "pc.jsonl", train_config)
    assert "each its prompt as it is (TRL's prompt-completion text: no chat template), beside its completion" in samples
    assert "chat template up to" not in samples and "```text\n问题 1：" in samples


@pytest.fixture
def lora_run(tmp_path) -> Path:
    """A `lora train` run's folder: its checkpoint holds an adapter (non-zero LoRA weights) on a base it records,
    the tokenizer, and no config.json of its own."""
    from tests.adapters.support import write_base, write_random_adapter

    base = write_base(tmp_path / "base", with_tokenizer=True)
    run_dir = tmp_path / "lora"
    checkpoint = write_random_adapter(base, run_dir / "checkpoints" / "step_2", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((base / name).read_bytes())
    torch.save({}, checkpoint / TRAIN_STATE_FILE)
    records = [{"step": step, "loss": 2.0, "lr": 1e-2, "tokens_per_s": 900.0, "mfu": 0.3} for step in (1, 2)]
    return _run_files(run_dir, {"model": "tiny", "init_from": "../base", "data_dir": "../tokens"}, records)


def test_report_and_explain_of_a_lora_run_use_its_base_with_the_adapter_merged(lora_run, tmp_path):
    from typer.testing import CliRunner

    from seekstack.adapters.files import merge_adapter
    from seekstack.cli import app
    from seekstack.eval.samples import demo_samples

    merged = merge_adapter(lora_run.parent / "base", lora_run / "checkpoints" / "step_2", tmp_path / "merged")
    report = write_report(lora_run).read_text()
    assert "| routed experts | 4 (2 per token) in 1 of 2 layers and the MTP module |" in report
    assert re.search(r"\| LoRA adapter \| rank \d+, alpha [\d.]+: [\d,]+ parameters \([\d.]+% of the base's\)", report)
    for prompt, greedy, _ in demo_samples(merged, max_new_tokens=48):  # the adapter's model, not the base's
        assert _fenced(prompt + greedy, "python") in report
    for model, out in ((lora_run, tmp_path / "lora_explain"), (merged, tmp_path / "merged_explain")):
        result = CliRunner().invoke(app, ["explain", str(model), "def f(x):", "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "lora_explain" / "explain.html").read_text() == (
        tmp_path / "merged_explain" / "explain.html"
    ).read_text()


def test_a_lora_runs_folder_stands_for_its_newest_adapter_checkpoint_on_its_base(lora_run):
    """A run whose adapter is not yet published at its root (training under way or cut short) still resolves."""
    from seekstack.adapters.files import model_folders

    checkpoint = lora_run / "checkpoints" / "step_2"
    assert not (lora_run / "adapter_config.json").exists()
    assert model_folders(lora_run) == (lora_run.parent / "base", checkpoint, checkpoint)


def test_explain_of_an_adapter_checkpoint_without_a_tokenizer_reads_with_its_base_tokenizer(lora_run, tmp_path):
    """As generate, eval and report do (`model_folders`): the adapter holds no tokenizer.json, its base does."""
    from typer.testing import CliRunner

    from seekstack.cli import app

    checkpoint = lora_run / "checkpoints" / "step_2"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    result = CliRunner().invoke(app, ["explain", str(checkpoint), "def f(x):", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "def" in (tmp_path / "out" / "explain.html").read_text()


@pytest.mark.parametrize("backend", ["seekstack", "hf"])
def test_eval_of_a_lora_run_scores_its_base_with_the_adapter_merged(lora_run, tmp_path, backend):
    """lm_eval's `peft` model arg (the HF backend's, and ours) carries the adapter: the scores are the merged
    checkpoint's (it was refused for the adapter checkpoint's missing config.json)."""
    from seekstack.adapters.files import merge_adapter
    from seekstack.eval.evaluate import evaluate
    from tests.eval.test_tasks import MODULE, write_corpus

    corpus = write_corpus(tmp_path / "corpus", [MODULE])
    merged = merge_adapter(lora_run.parent / "base", lora_run / "checkpoints" / "step_2", tmp_path / "merged")
    base, adapter, merged_scores = (
        evaluate(model, ("code_perplexity",), corpus, backend, limit=1)["results"]["code_perplexity"]
        for model in (lora_run.parent / "base", lora_run / "checkpoints" / "step_2", merged)
    )
    assert adapter["bits_per_byte"] == pytest.approx(merged_scores["bits_per_byte"], rel=1e-4)
    assert adapter["bits_per_byte"] != pytest.approx(base["bits_per_byte"], rel=1e-3)  # the adapter counts


def test_eval_of_an_adapter_without_a_tokenizer_asks_the_reasoning_tasks_with_its_base_tokenizer(checkpoint, tmp_path):
    """The reasoning tasks' chat prompts are rendered by the tokenizer the adapter's model reads with (its base's),
    as the model lm_eval runs is given it; the scores are the merged checkpoint's."""
    from seekstack.adapters.files import merge_adapter
    from seekstack.eval.evaluate import documents_scored, evaluate
    from tests.adapters.support import write_random_adapter

    adapter = write_random_adapter(checkpoint, tmp_path / "adapter", seed=0)  # no tokenizer.json beside it
    merged = merge_adapter(checkpoint, adapter, tmp_path / "merged")
    ours, merged_scores = (evaluate(model, ("reason_addition",), limit=2) for model in (adapter, merged))
    assert ours["n-samples"] == merged_scores["n-samples"] and documents_scored(ours) == {"reason_addition": 2}
    assert ours["results"] == merged_scores["results"]


def test_explain_of_a_lora_run_whose_base_is_gone_names_the_base_and_the_merge(lora_run, tmp_path):
    from typer.testing import CliRunner

    from seekstack.cli import app

    (lora_run.parent / "base").rename(tmp_path / "moved")
    result = CliRunner().invoke(app, ["explain", str(lora_run), "def f(x):", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"the adapter's base model {lora_run.parent / 'base'} (base_model_name_or_path) holds no config.json" in (
        result.output.replace("\n", "")
    )
    assert "seekstack lora merge BASE" in result.output.replace("\n", "")


def test_samples_holding_a_code_fence_or_backticks_stay_inside_their_blocks(sft_run, monkeypatch):
    from seekstack.eval import report
    from seekstack.eval.samples import ConversationSample, TaskSample

    markdown_it = pytest.importorskip("markdown_it")
    answer = "Here:\n```python\nprint(1)\n```\nand ```` four"
    monkeypatch.setattr("seekstack.eval.samples.demo_samples", lambda *_, **__: [("def f():", answer, "")])
    monkeypatch.setattr("seekstack.eval.samples.task_samples", lambda *_: [TaskSample("Q: ", answer, "3", False)])
    monkeypatch.setattr(
        "seekstack.eval.samples.conversation_samples", lambda *_: [ConversationSample("Q: ", answer, answer)]
    )
    checkpoint = sft_run / "checkpoints" / "step_2"
    sections = [
        report._samples(sft_run, checkpoint, {}),
        report._task_answers(checkpoint, make_task("addition"), {}),
        report._conversation_answers(sft_run, checkpoint, sft_run.parent / "chats.jsonl", {}),
    ]
    blocks = [[t.content for t in markdown_it.MarkdownIt().parse(s) if t.type == "fence"] for s in sections]
    assert blocks == [[f"def f():{answer}\n"], [f"Q: {answer}\n"], [f"Q: {answer}\n", f"{answer}\n"]]


def test_control_bytes_of_a_sample_are_written_visibly_in_its_block(sft_run, monkeypatch):
    """A random byte-level model's continuation put its NUL, ^C and ESC into report.md as they are."""
    from seekstack.eval import report

    markdown_it = pytest.importorskip("markdown_it")
    continuation = "\x00x\x03\ty\r\nz\x1b[31m\rw\x7f\x85 é"
    monkeypatch.setattr("seekstack.eval.samples.demo_samples", lambda *_, **__: [("def f():", continuation, "")])
    section = report._samples(sft_run, sft_run / "checkpoints" / "step_2", {})
    [block] = [t.content for t in markdown_it.MarkdownIt().parse(section) if t.type == "fence"]
    assert "\r\nz" in section  # a Windows line break kept as one, which the parser reads as \n
    assert block == "def f():\\x00x\\x03\ty\nz\\x1b[31m\\x0dw\\x7f\\x85 é\n"


def test_a_tool_conversation_is_asked_with_the_tools_it_was_trained_with(sft_run, tmp_path):
    """A sample of a conversation offering tools (sft trains its row with the tools' prompt) was asked without them."""
    weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    path = tmp_path / "agent.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0], "tools": [weather]}) + "\n")
    answers = conversation_samples(sft_run, read_conversations(path), max_new_tokens=4)
    assert tools_prompt([weather]) in answers[0].prompt
