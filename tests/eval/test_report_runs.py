"""`seekstack report` on post-training runs and on a run evaluated before its newest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seekstack.eval.report import EVAL_RESULTS, _evaluation, write_report
from seekstack.posttrain.conversations import prompt_messages
from seekstack.posttrain.rewards import R1_SYSTEM_PROMPT
from seekstack.posttrain.tasks import make_task, sample_problems
from seekstack.tokenizer import Tokenizer
from seekstack.train.state import TRAIN_STATE_FILE
from tests.posttrain.support import micro_checkpoint

RL_CONFIG = {"init_from": "../sft", "task": "addition", "difficulty": 1, "batch_size": 2, "num_generations": 4,
             "max_completion_length": 12}  # fmt: skip


def _write_eval_results(run_dir: Path, model: str) -> None:
    """eval/results.json as `seekstack eval` writes it, having measured checkpoint `model`."""
    (run_dir / EVAL_RESULTS).parent.mkdir(parents=True)
    (run_dir / EVAL_RESULTS).write_text(json.dumps({
        "model": model, "backend": "seekstack", "wall_s": 3.0, "results": {"reason_addition": {"exact_match": 0.5}},
        "samples": {"reason_addition": 10},
    }))  # fmt: skip


def test_evaluation_names_the_checkpoint_it_measured_and_says_when_the_run_has_a_newer_one(tmp_path):
    run_dir = tmp_path / "rlA"
    _write_eval_results(run_dir, "rlA/checkpoints/step_16")  # relative to where eval ran, as the user named the run
    stale = _evaluation(run_dir, run_dir / "checkpoints" / "step_18")
    assert (
        "lm-evaluation-harness on `rlA/checkpoints/step_16`" in stale and "| reason_addition | exact_match |" in stale
    )
    assert "**Not the newest checkpoint:** these results are `rlA/checkpoints/step_16`'s; the run's newest is" in stale
    assert (
        f"`seekstack eval {run_dir} --tasks reason_addition` (with the options it ran with) measures `step_18`" in stale
    )
    current = _evaluation(run_dir, run_dir / "checkpoints" / "step_16")
    assert "on `rlA/checkpoints/step_16`" in current and "newest" not in current


@pytest.mark.parametrize(
    "train_config, task",
    [(RL_CONFIG, "addition"), ({"task": "countdown", "data": "", "examples": 64}, "countdown"),
     ({"task": "addition", "data": "chats.jsonl"}, None), ({"task": "", "data": "traces.jsonl"}, None),
     ({"data_dir": "../tokens", "seq_len": 64}, None)],
)  # fmt: skip
def test_a_run_is_sampled_on_the_task_it_trained_on_when_it_trained_on_one(train_config, task):
    from seekstack.eval.report import _trained_task

    found = _trained_task(train_config)
    assert (found and found.name) == task
    if found:
        assert found.difficulty == train_config.get("difficulty", make_task(task).difficulty)


@pytest.fixture
def rl_run(tmp_path) -> Path:
    """An `rl` run's folder: its config, 8 steps of metrics (GRPO's loss ~0, the reward rising), checkpoint step_8."""
    run_dir = tmp_path / "rl"
    checkpoint = micro_checkpoint(run_dir / "checkpoints" / "step_8")
    torch.save({}, checkpoint / TRAIN_STATE_FILE)  # a complete checkpoint to latest_checkpoint
    (run_dir / "train_config.json").write_text(json.dumps(RL_CONFIG))
    records = [
        {"step": step, "loss": 1e-8, "lm_loss": 1e-8, "reward": 0.1 * step, "accuracy": step / 16,
         "reward_format": 1.0, "completion_length": 20.0 - step,
         "completion_length_incorrect": 20.0 - step, "kl": 0.0, "entropy": 0.5, "generate_share": 0.5,
         "tokens_per_s": 900.0, "mfu": 0.3, "step_s": 1.0}
        for step in range(1, 9)
    ]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def test_report_of_an_rl_run_gives_its_rewards_and_answers_to_the_tasks_questions_in_the_chat_template(rl_run):
    _write_eval_results(rl_run, "rl/checkpoints/step_4")
    page = write_report(rl_run).read_text()
    assert "loss" not in page.split("## Training")[1].split("## Evaluation")[0]  # ~1e-8 by construction
    assert "![RL curves](rl_curves.png)" in page and (rl_run / "rl_curves.png").stat().st_size > 1000
    assert "|  | steps 1-2 (mean) | steps 7-8 (mean) |" in page  # the first and last quarter of 8 steps
    for row in ("| reward | 0.150 | 0.750 |", "| accuracy (answers that verify) | 9.4% | 46.9% |",
                "| format reward | 1.000 | 1.000 |", "| completion length (tokens) | 18.5 | 12.5 |"):  # fmt: skip
        assert row in page
    assert "these results are `rl/checkpoints/step_4`'s; the run's newest is `step_8`" in page
    samples = page.split("## Samples")[1]
    assert (
        "```python" not in samples
        and R1_SYSTEM_PROMPT in samples
        and "held-out questions of task `addition` (difficulty 1)" in samples
    )
    tokenizer = Tokenizer.from_file(rl_run / "checkpoints" / "step_8")
    for problem in sample_problems(make_task("addition", 1), 4, "heldout", seed=0, distinct=True):
        assert f"```text\n{tokenizer.render_chat(prompt_messages(problem))}" in samples
    verdicts = samples.count("Verifies.") + samples.count("Does not verify (the answer is ")
    assert verdicts == 4 and f"{samples.count('Verifies.')} of 4 verify." in samples
