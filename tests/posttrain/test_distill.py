import json
import re

import pytest
import torch
from typer.testing import CliRunner

from seekstack.atomic import WriteRefused
from seekstack.checkpoint import load_pretrained
from seekstack.cli import app
from seekstack.infer import Engine
from seekstack.posttrain.conversations import read_conversations, write_conversations
from seekstack.posttrain.distill import verified_traces
from seekstack.posttrain.rewards import RewardWeights, extract_answer
from seekstack.posttrain.rollout import sample_groups
from seekstack.posttrain.tasks import make_task, sample_problems, split_of
from seekstack.tokenizer import Tokenizer
from tests.posttrain.support import micro_checkpoint
from tests.test_atomic import file_size_limit


def test_rejection_sampling_keeps_only_verified_traces_of_training_problems(teacher_model):
    task = make_task("addition", 1)
    model, tokenizer = load_pretrained(teacher_model), Tokenizer.from_file(teacher_model)
    engine = Engine(model, tokenizer, max_batch_size=64, max_model_len=160)
    traces = verified_traces(engine, task, prompts=16, samples=4, max_new_tokens=40, seed=0, batch_prompts=8)
    assert traces.sampled == 64 and 0 < len(traces.conversations) < traces.sampled
    problems = {p.question: p for p in sample_problems(task, 16, "train", 0, distinct=True)}
    for messages in traces.conversations:
        problem = problems[messages[1]["content"]]
        assert split_of(problem.key) == "train"
        assert task.verify(problem, extract_answer(messages[2]["content"]))
    texts = [(m[1]["content"], m[2]["content"]) for m in traces.conversations]
    assert len(set(texts)) == len(texts)  # each distinct trace once


def test_traces_sample_each_distinct_problem_once_and_keep_each_trace_once(teacher_model):
    task = make_task("addition", 1)  # 85 distinct training problems
    model, tokenizer = load_pretrained(teacher_model), Tokenizer.from_file(teacher_model)
    engine = Engine(model, tokenizer, max_batch_size=64, max_model_len=160)
    traces = verified_traces(engine, task, prompts=85, samples=1, max_new_tokens=40, seed=0, batch_prompts=64)
    questions = [m[1]["content"] for m in traces.conversations]
    assert traces.sampled == traces.prompts == 85 and 0 < len(questions) == len(set(questions))
    assert traces.prompts_solved == len(questions)  # one sample a problem: each solved problem keeps its one trace
    with pytest.raises(ValueError, match="yielded only 85 distinct train problems of 86 asked"):
        verified_traces(engine, task, prompts=86, samples=1, max_new_tokens=40)


def test_traces_command_refuses_more_prompts_than_distinct_problems_and_writes_nothing(teacher_model, tmp_path):
    out = tmp_path / "traces.jsonl"
    args = ["traces", str(teacher_model), "--out", str(out), "--difficulty", "1", "--prompts", "5000"]
    result = CliRunner().invoke(app, [*args, "--samples", "1", "--max-new-tokens", "40"])
    assert result.exit_code == 2, result.output  # a usage error naming the option, --prompts' first name
    refusal = "Invalid value for '--problems': task addition at difficulty 1 yielded only 85 distinct train problems"
    assert f"{refusal} of 5000 asked" in result.output
    assert not out.exists()


def test_traces_of_a_base_teacher_that_verifies_none_say_to_train_it_on_the_task_first(tmp_path):
    """A pretrained-only teacher writes no R1 answer format: 'none of 2 traces verified' said nothing of why."""
    teacher = micro_checkpoint(tmp_path / "micro-base")
    args = ["traces", str(teacher), "--out", str(tmp_path / "t.jsonl"), "--difficulty", "1", "--prompts", "2"]
    result = CliRunner().invoke(app, [*args, "--samples", "1", "--max-new-tokens", "8"])
    assert result.exit_code == 1 and "none of 2 traces verified (it looks like a base model" in result.output
    assert "its folder is named 'micro-base'" in result.output and "seekstack sft task=addition" in result.output
    assert not (tmp_path / "t.jsonl").exists()


def test_traces_interrupted_say_so_and_that_nothing_was_written(tmp_path, monkeypatch):
    """Ctrl-C while the teacher sampled (minutes for thousands of prompts) ended traces with exit 130 and no word."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("seekstack.posttrain.distill.trace_problems", interrupted)
    out = tmp_path / "t.jsonl"
    result = CliRunner().invoke(app, ["traces", str(tmp_path / "teacher"), "--out", str(out), "--prompts", "2"])
    assert result.exit_code == 130 and not out.exists()
    assert result.stderr == f"error: interrupted (Ctrl-C): nothing was written to {out}\n"


def test_traces_command_writes_conversations_sft_reads(teacher_model, tmp_path):
    out = tmp_path / "traces.jsonl"
    args = ["traces", str(teacher_model), "--out", str(out), "--difficulty", "1", "--prompts", "8", "--samples", "4"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "40"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    conversations = read_conversations(out)
    assert summary["kept"] == len(conversations) > 0 and summary["sampled"] == 32
    assert all(m[-1]["role"] == "assistant" for m in conversations)
    assert summary["accept_rate"] == len(conversations) / 32
    # prompts_solved was a share (solved / prompts) under a count's name: the count now, its share beside it
    solved = len({messages[-2]["content"] for messages in conversations})
    assert (summary["prompts"], summary["prompts_solved"], summary["solved_rate"]) == (8, solved, solved / 8)


def test_traces_the_disk_refuses_leave_the_earlier_file_whole(tmp_path):
    """`traces --out` was written in place: a disk that filled midway left the earlier traces.jsonl cut short, which
    `sft data=` then read as fewer conversations, or failed on its last line."""
    chat = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>1+1</think> 2"}]
    out = write_conversations([chat] * 10, tmp_path / "traces.jsonl")
    earlier = out.read_bytes()
    with pytest.raises(WriteRefused), file_size_limit(4 * len(earlier)):
        write_conversations([chat] * 100, out)
    assert out.read_bytes() == earlier and sorted(tmp_path.iterdir()) == [out]


def test_pass_at_k_command_tables_several_models(teacher_model):
    args = ["pass-at-k", str(teacher_model), str(teacher_model), "--difficulty", "1", "--problems", "4"]
    result = CliRunner().invoke(app, [*args, "--samples", "2", "--max-new-tokens", "40"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert first == second  # the same model, problems and seeds
    assert lines[2].split()[:3] == ["model", "pass@1", "pass@2"] and len(lines) == 5
    assert float(lines[3].split()[1]) == round(first["pass@1"], 3)
    missing = CliRunner().invoke(app, [*args[:2], str(teacher_model.parent / "nope"), "--problems", "4"])
    assert missing.exit_code == 1 and "nope: no such folder" in missing.output and not missing.output.startswith("{")
    too_long = CliRunner().invoke(app, [*args[:2], "--max-new-tokens", "100000"])
    assert too_long.exit_code == 2  # a usage error, as the parser's own refusals (5732a2a)
    assert "Invalid value for '--max-new-tokens': has value 100000: addition prompts" in too_long.output
    assert re.search(r"512 tokens; at most 4\d\d\b", too_long.output), too_long.output  # the context less a prompt


def test_pass_at_k_rates_are_the_exact_shares_of_their_counts(teacher_model):
    """greedy, format and completion_length were float32 means: 1 right of 10 printed 0.10000000149011612."""
    args = ["pass-at-k", str(teacher_model), "--difficulty", "1", "--problems", "5", "--samples", "2"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "40"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    counts = {"greedy": 5, "format": 10, "completion_length": 10}  # problems, then problems x samples
    for name, count in counts.items():
        assert scores[name] == round(scores[name] * count) / count, (name, scores[name])
    assert torch.tensor(scores["completion_length"]).item() != scores["completion_length"]  # float32 cannot hold it


def test_pass_at_k_interrupted_says_which_model_it_was_scoring(tmp_path, monkeypatch):
    """Ctrl-C in pass-at-k exited 130 without a word, where the commands that write print one line."""
    model = micro_checkpoint(tmp_path / "model")
    calls = []

    def evaluated(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second model samples
        return {"pass@1": 0.5}

    monkeypatch.setattr("seekstack.posttrain.evaluate.evaluate_task", evaluated)
    args = ["pass-at-k", str(model), str(tmp_path / "model"), "--difficulty", "1", "--problems", "2"]
    result = CliRunner().invoke(app, args)
    first = {"model": str(model), "task": "addition", "pass@1": 0.5}
    assert result.exit_code == 130 and result.stdout == json.dumps(first) + "\n"
    assert result.stderr == (
        f"error: interrupted (Ctrl-C) while scoring {tmp_path / 'model'}: the lines above score the models before it\n"
    )


@pytest.mark.parametrize("command", [["pass-at-k"], ["traces", "--out", "traces.jsonl"]])
def test_sampling_a_model_whose_context_holds_no_prompt_of_the_task_is_refused_naming_difficulty(tmp_path, command):
    model_dir = micro_checkpoint(tmp_path / "model", context=32)
    result = CliRunner().invoke(app, [command[0], str(model_dir), *command[1:], "--max-new-tokens", "8"])
    assert result.exit_code == 2, result.output  # was: "--max-new-tokens 8: at most -32 for ..."
    assert "Invalid value for '--difficulty': has value 2: addition prompts" in result.output
    assert "32 tokens; lower difficulty, or sample a model of a longer context" in result.output, result.output


def test_a_prompt_past_the_context_at_the_lowest_difficulty_is_not_told_to_lower_it(tmp_path):
    """Addition's prompts take ~80 tokens at difficulty 1 and 2 alike (the chat template's framing): a model of 32
    positions at --difficulty 1 was told "lower difficulty", which no value does."""
    model_dir = micro_checkpoint(tmp_path / "model", context=32)
    args = ["pass-at-k", str(model_dir), "--difficulty", "1", "--problems", "4", "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--difficulty': has value 1: addition prompts (difficulty 1) take up to" in result.output
    assert result.output.rstrip().endswith("32 tokens; sample a model of a longer context"), result.output


def test_a_seed_whose_completions_seeds_pass_2_64_samples_as_the_seed_2_64_from_it(tmp_path):
    """traces --seed 1765000000 (a timestamp) was refused naming a seed it derived, 1765010590015885000000, past
    torch's range: each completion's seed (run seed, batch, row) wraps within it, where seeds 2**64 apart draw alike."""
    model = micro_checkpoint(tmp_path / "model")
    engine = Engine(load_pretrained(model), Tokenizer.from_file(model), max_batch_size=4, max_model_len=96)
    task = make_task("addition", 1)
    problems = sample_problems(task, 2, "train", 0, distinct=True)
    large = 2**64 // 1_000_003 + 5  # its rows' seeds, large x 1,000,003 + row, pass 2**64
    sampled = [
        sample_groups(engine, task, problems, 2, 8, 1.0, seed, RewardWeights()).input_ids
        for seed in (large, large + 2**64, large + 1)
    ]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_a_completion_cut_at_its_token_limit_scores_nothing_though_its_answer_so_far_verifies(teacher_model):
    """A completion the token limit cut gave no final answer ("1" may be the start of "12"): pass-at-k, rl's rewards
    and the traces kept (an SFT row whose EOS the model never wrote) score it 0, however its text so far reads."""
    task = make_task("addition", 1)
    model, tokenizer = load_pretrained(teacher_model), Tokenizer.from_file(teacher_model)
    engine = Engine(model, tokenizer, max_batch_size=64, max_model_len=160)
    problems = sample_problems(task, 16, "train", 0, distinct=True)
    rollout = sample_groups(engine, task, problems, 4, 14, 1.0, 0, RewardWeights())  # about half cut at 14 tokens
    cut, verifies_so_far = [], 0
    for row, problem in enumerate(p for p in problems for _ in range(4)):
        start, length = int(rollout.prompt_lengths[row]), int(rollout.completion_lengths[row])
        completion = rollout.input_ids[row, start : start + length].tolist()
        if completion[-1] != tokenizer.eos_id:
            cut.append(row)
            answer = extract_answer(tokenizer.decode_reply(completion))
            verifies_so_far += answer is not None and task.verify(problem, answer)
    assert verifies_so_far > 0
    assert all(rollout.terms["correctness"][row] == rollout.terms["format"][row] == 0 for row in cut)


def test_sampling_a_model_whose_context_holds_no_question_of_a_problems_file_names_its_line(tmp_path):
    """A file has no difficulty: the refusal said '--difficulty': is 1 ... lower difficulty."""
    model_dir = micro_checkpoint(tmp_path / "model", context=32)
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {n} + {n}?", "answer": 2 * n}) + "\n" for n in range(40)))
    args = ["pass-at-k", str(model_dir), "--task", str(path), "--problems", "2", "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--task': has value {path}: the prompt of the question on {path}:" in result.output
    assert "32 tokens; shorten that question" in result.output and "difficulty" not in result.output


def test_traces_of_a_problems_file_that_verify_none_suggest_no_difficulty(tmp_path):
    """A file has no difficulty: 'none of 2 traces verified' suggested 'a lower --difficulty' for it."""
    teacher = micro_checkpoint(tmp_path / "teacher")
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {n} + {n}?", "answer": 2 * n}) + "\n" for n in range(40)))
    args = ["traces", str(teacher), "--out", str(tmp_path / "t.jsonl"), "--task", str(path), "--prompts", "2"]
    result = CliRunner().invoke(app, [*args, "--samples", "1", "--max-new-tokens", "8"])
    assert result.exit_code == 1 and "none of 2 traces verified (more --samples or a teacher" in result.output
    assert "--difficulty" not in result.output
