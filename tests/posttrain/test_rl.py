import copy
import dataclasses
import itertools
import json
import re
import time

import pytest
import torch
from typer.testing import CliRunner

from seekstack.checkpoint import load_pretrained
from seekstack.cli import app
from seekstack.config import ConfigError
from seekstack.infer import SamplingParams
from seekstack.posttrain import rl
from seekstack.posttrain.config import GRPOConfig
from seekstack.posttrain.grpo import group_advantages, policy_loss
from seekstack.posttrain.padding import pad_rows
from seekstack.posttrain.rl import GRPOSource, rollout_metrics, run_rl
from seekstack.posttrain.rollout import Rollout, completion_logps, trained_tokens
from seekstack.posttrain.tasks import split_of
from seekstack.schema import write_config
from seekstack.train.config import CONFIG_FILE, resolve_train_config
from tests.posttrain.support import assert_refused_naming_ours, micro_checkpoint

RUN = ["batch_size=2", "num_generations=4", "max_completion_length=12", "temperature=1.0", "compile_decode=false"]


def test_engine_samples_from_the_updated_weights_without_a_reload(tmp_path):
    model_dir = micro_checkpoint(tmp_path / "model")
    config = resolve_train_config(None, [f"init_from={model_dir}", *RUN], cls=GRPOConfig)
    source = GRPOSource(config)
    model = load_pretrained(model_dir, dtype=torch.float32)
    source.attach(model)
    assert source.engine.model is model
    prompt = source.tokenizer.encode("What is 1 + 2?")
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    before = source.engine.generate([prompt], greedy)[0].token_ids
    target = next(t for t in range(10, 200) if t not in before)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(30):  # teach the policy to say `target` everywhere
        logits = model(torch.tensor([prompt])).logits
        loss = torch.nn.functional.cross_entropy(logits[0], torch.full((len(prompt),), target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = source.engine.generate([prompt], greedy)[0].token_ids
    assert after[0] == target and before[0] != target


def test_async_rollouts_sample_each_batch_with_the_weights_before_the_last_update(tmp_path):
    """A copy of the policy samples the next batch on the rollout thread, synced when the current batch is taken:
    batch k + 1 is sampled, and its old log-probabilities computed, by the weights before update k, and the next
    batch by the updated ones; no batch is sampled that no step would train on."""
    model_dir = micro_checkpoint(tmp_path / "model")
    config = [f"init_from={model_dir}", *RUN, "async_rollouts=true", "max_steps=3"]
    source = GRPOSource(resolve_train_config(None, config, cls=GRPOConfig))
    model = load_pretrained(model_dir, dtype=torch.float32)
    source.attach(model)
    assert source.engine.model is not model
    cpu = torch.device("cpu")

    def logps(policy: torch.nn.Module, batch: dict) -> torch.Tensor:
        policy = copy.deepcopy(policy).eval()  # the sampler's mode
        with torch.no_grad():
            return completion_logps(policy, batch["rollout"], 1.0, cpu)[0]

    first = source.batch(2, 0.0)
    assert torch.allclose(first["old_logps"], logps(model, first), atol=1e-6)
    before = copy.deepcopy(model)
    with torch.no_grad():  # an optimizer step's worth of change
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    second = source.batch(2, 1 / 3)
    assert torch.allclose(second["old_logps"], logps(before, second), atol=1e-6)
    assert not torch.allclose(second["old_logps"], logps(model, second), atol=1e-3)
    third = source.batch(2, 2 / 3)
    assert torch.allclose(third["old_logps"], logps(model, third), atol=1e-6)
    assert source.ahead is None  # the third step is the last


def test_async_rollouts_at_two_iterations_take_each_ratio_against_the_weights_that_sampled_the_batch(
    tmp_path, monkeypatch
):
    """async_rollouts with num_iterations=2 through the trainer: every step's ratio, the second iteration's too, is
    taken against the log-probabilities of the weights that sampled its batch (as TRL's old_per_token_logps), never
    against the weights being trained. Batch k + 1 starts as batch k is taken, so it is num_iterations updates
    behind when first trained on: batches 0 and 1 are the starting weights', batch 2 those after two updates."""
    step = torch.optim.AdamW.step

    def moving_step(optimizer, *args, **kwargs):  # an update that surely moves the weights, whatever the rewards
        result = step(optimizer, *args, **kwargs)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.add_(0.05 * torch.randn_like(parameter))
        return result

    trained: list[tuple[dict, dict]] = []  # each step's (weights being trained, batch)
    loss = GRPOSource.loss

    def recording_loss(self, model, batch, mtp_loss_weight):
        trained.append((copy.deepcopy(model.state_dict()), batch))
        return loss(self, model, batch, mtp_loss_weight)

    monkeypatch.setattr(torch.optim.AdamW, "step", moving_step)
    monkeypatch.setattr(GRPOSource, "loss", recording_loss)
    model_dir = micro_checkpoint(tmp_path / "model")
    config = [f"init_from={model_dir}", *RUN, "async_rollouts=true", "num_iterations=2", "max_steps=6"]
    run_rl(resolve_train_config(None, [*config, f"out_dir={tmp_path / 'run'}"], cls=GRPOConfig))
    policy = load_pretrained(model_dir, dtype=torch.float32).eval()  # the sampler's mode

    def logps(weights: dict, batch: dict) -> torch.Tensor:
        policy.load_state_dict(weights)
        with torch.no_grad():
            return completion_logps(policy, batch["rollout"], 1.0, torch.device("cpu"))[0]

    start = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    sampled_by = [start, start, start, start, trained[2][0], trained[2][0]]  # steps 0-5: the weights before update k
    batches = [batch for _, batch in trained]
    assert [id(batch) for batch in batches[::2]] == [id(batch) for batch in batches[1::2]]  # each trained twice
    assert len({id(batch) for batch in batches}) == 3
    for index, ((weights, batch), sampling) in enumerate(zip(trained, sampled_by, strict=True)):
        assert torch.allclose(batch["old_logps"], logps(sampling, batch), atol=1e-6), index
        if index % 2:  # the second iteration: the weights trained have moved off the sampling ones
            assert not torch.allclose(batch["old_logps"], logps(weights, batch), atol=1e-3), index


def slow_rollouts(monkeypatch, seconds: float) -> None:
    """Each rollout takes `seconds` more than it would: slower than a micro model's training step, whatever the load."""
    sample_groups = rl.sample_groups

    def slow_sample_groups(*args, **kwargs):
        time.sleep(seconds)
        return sample_groups(*args, **kwargs)

    monkeypatch.setattr(rl, "sample_groups", slow_sample_groups)


def test_an_async_steps_wait_for_a_rollout_slower_than_training_is_its_wait_s(tmp_path, monkeypatch):
    """The mark each step takes at its start (for Ctrl-C) waited for the batch sampled ahead, outside the step's clock:
    wait_s read 0.0, and step_s and tokens/s left the wait out, while rollouts were 1 s slower than a step."""
    slow_rollouts(monkeypatch, 1.0)
    model_dir = micro_checkpoint(tmp_path / "model")
    config = [f"init_from={model_dir}", *RUN, "async_rollouts=true", "max_steps=3", f"out_dir={tmp_path / 'run'}"]
    run_rl(resolve_train_config(None, config, cls=GRPOConfig))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # steps 2 and 3 wait for a rollout that started as the step before took its batch, a second at least before it ends
    assert all(line["wait_s"] > 0.5 and line["step_s"] >= line["wait_s"] for line in lines[1:]), lines


def test_a_checkpoints_wait_for_the_batch_sampled_ahead_is_the_next_steps_save_wait_s(tmp_path, monkeypatch):
    """A checkpoint saves the batch being sampled ahead, so it waits for it, after its step: with save_every=1 and
    rollouts 1 s slower than a step, every step's wait_s read ~0 (its batch was ready) and no metric showed the
    second the run waited in each checkpoint. The next step logs it as save_wait_s."""
    slow_rollouts(monkeypatch, 1.0)
    model_dir = micro_checkpoint(tmp_path / "model")
    config = [f"init_from={model_dir}", *RUN, "async_rollouts=true", "max_steps=3", f"out_dir={tmp_path / 'run'}"]
    run_rl(resolve_train_config(None, [*config, "save_every=1"], cls=GRPOConfig))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["save_wait_s"] == 0  # no checkpoint before the first step
    # the checkpoints after steps 1 and 2 waited for the rollouts those steps started, each a second at least
    assert all(line["save_wait_s"] > 0.5 and line["wait_s"] < 0.5 for line in lines[1:]), lines


def test_an_async_run_interrupted_in_a_step_resumes_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Ctrl-C in step 3, after it took its batch and started the next one's rollout; that rollout ends before the
    checkpoint is saved. It added 1 to the batches' count on the rollout thread after the rewind to the step's start,
    so the checkpoint's count was one ahead and the resumed run's step 4 trained on another batch."""
    from seekstack.train import trainer

    model_dir = micro_checkpoint(tmp_path / "model")
    common = [f"init_from={model_dir}", *RUN, "async_rollouts=true", "max_steps=4", "save_every=0"]
    straight = run_rl(resolve_train_config(None, [*common, f"out_dir={tmp_path / 'a'}"], cls=GRPOConfig))
    train_step, save = trainer._Run.train_step, trainer._Run.save

    def interrupted_step(self):
        if self.step == 2:
            self.data.batch(2, progress=self.step / 4)  # its batch taken, the next one's rollout started
            raise KeyboardInterrupt
        return train_step(self)

    def save_once_the_rollout_ended(self):
        self.data.ahead_thread.submit(lambda: None).result()  # one rollout thread: the ones before have ended
        return save(self)

    monkeypatch.setattr(trainer._Run, "train_step", interrupted_step)
    monkeypatch.setattr(trainer._Run, "save", save_once_the_rollout_ended)
    config = resolve_train_config(None, [*common, f"out_dir={tmp_path / 'b'}"], cls=GRPOConfig)
    with pytest.raises(KeyboardInterrupt):
        run_rl(config)
    monkeypatch.setattr(trainer._Run, "train_step", train_step)
    resumed = run_rl(config, resume=True)
    assert resumed.losses == straight.losses[2:]
    runs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in "ab"]
    assert [line["step"] for line in runs[1]] == [1, 2, 3, 4]
    assert [line["entropy"] for line in runs[1]] == [line["entropy"] for line in runs[0]]  # the same batches trained


def test_a_completion_length_past_the_models_context_is_refused_by_name_before_a_config_is_written(tmp_path):
    """It was refused once the run's source was attached to the model: --write-config wrote a config that cannot run."""
    model_dir = micro_checkpoint(tmp_path / "model")  # a context of 512 positions, 192 of them a prompt's room
    with pytest.raises(
        ConfigError, match="'max_completion_length' has value 321: .* context of 512 tokens; at most 320"
    ):
        resolve_train_config(None, [f"init_from={model_dir}", *RUN, "max_completion_length=321"], cls=GRPOConfig)
    written = tmp_path / "rl.yaml"
    args = ["rl", f"init_from={model_dir}", "max_completion_length=321", "--write-config", str(written)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and not written.exists()
    assert refused.output.startswith("error: field 'max_completion_length' has value 321: it and a task prompt's room")


def test_a_model_whose_context_holds_no_more_than_a_prompts_room_is_refused_naming_it(tmp_path):
    model_dir = micro_checkpoint(tmp_path / "model", context=160)  # a prompt's room is 192 positions
    message = f"{model_dir}: its context of 160 tokens .* leaves no room for a completion after a task prompt's room"
    with pytest.raises(ValueError, match=message):  # was: "max_completion_length' is 12: ...; at most -32"
        resolve_train_config(None, [f"init_from={model_dir}", *RUN], cls=GRPOConfig)


def test_a_model_whose_context_holds_a_rollout_but_not_seq_len_trains(tmp_path):
    """rl's rows are a prompt's room and a completion (204 tokens here), not seq_len (256, unused by rl, which
    refuses any other value): a 224-position model was refused for the seq_len it could not change."""
    model_dir = micro_checkpoint(tmp_path / "model", context=224)
    run = tmp_path / "run"
    args = ["rl", f"init_from={model_dir}", *RUN, "task=addition", "max_steps=1", "save_every=0", f"out_dir={run}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step_1").is_dir()


def test_a_difficulty_whose_prompts_pass_the_prompt_room_is_refused_before_anything_is_written(tmp_path):
    model_dir = micro_checkpoint(tmp_path / "model")  # byte-level: 2 more prompt tokens a digit, 198 at 60 digits
    run = tmp_path / "run"
    args = ["rl", f"init_from={model_dir}", *RUN, "task=addition", "difficulty=60", "max_steps=1", f"out_dir={run}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # was: the engine's "prompt has 196 tokens, more than max_model_len"
    assert result.output.startswith(
        "error: field 'max_prompt_length' has value 192: addition prompts (difficulty 60) take up to 198 tokens; give "
        "max_prompt_length=198 or more (it and max_completion_length within the model's context)"
    ), result.output
    assert not run.exists()


LONG_QUESTION_TASK = """
from seekstack.posttrain.tasks import Problem


class LongEcho:
    name = "long_echo"
    difficulty = 1

    def generate(self, rng):
        number = str(rng.randrange(10**6))
        return Problem(number, "Read the following carefully. " * 10 + f"Repeat {number}.", number, number)

    def verify(self, problem, answer):
        return answer.strip() == problem.answer
"""


def test_a_custom_task_whose_prompts_pass_192_tokens_trains_at_a_max_prompt_length_that_holds_them(tmp_path):
    """Its prompts take ~350 tokens: the fixed room of 192 refused them for good, telling to lower a difficulty the
    task does not have; max_prompt_length (TRL's name) sizes the room, and the rollouts sample those prompts whole."""
    (tmp_path / "long_task.py").write_text(LONG_QUESTION_TASK)
    model_dir = micro_checkpoint(tmp_path / "model")  # a context of 512 positions
    run = tmp_path / "run"
    task = f"task={tmp_path / 'long_task.py'}:LongEcho"
    args = ["rl", f"init_from={model_dir}", *RUN, task, "max_steps=1", f"out_dir={run}"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and not run.exists()
    assert re.match(
        r"error: field 'max_prompt_length' has value 192: long_echo prompts \(difficulty 1\) take up to 3\d\d "
        r"tokens; give max_prompt_length=3\d\d or more",
        refused.output,
    ), refused.output
    config = resolve_train_config(None, args[1:] + ["max_prompt_length=400"], cls=GRPOConfig)
    source = GRPOSource(config)
    source.attach(load_pretrained(model_dir, dtype=torch.float32))
    assert source.engine.max_model_len == 412
    rollout = source.batch(2, 0.0)["rollout"]
    assert rollout.prompt_lengths.min() > 300  # sampled whole, not cut to 192
    assert torch.isfinite(source.loss(source.model, source.current, 0.0)[0].loss)


def test_a_long_question_anywhere_in_a_problems_file_is_refused_before_the_run_starts(tmp_path):
    """rl measured 256 drawn problems' prompts: a file's one long question, seldom drawn there, stopped the run
    mid-way, at the first rollout that drew it."""
    model_dir = micro_checkpoint(tmp_path / "model")
    padded = ("Read the following carefully. " * 10 + f"What is {n} + 1?" for n in range(100))
    long_question = next(question for question in padded if split_of(question) == "train")
    lines = [{"question": f"What is {n} + {n}?", "answer": 2 * n} for n in range(1000)]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [*lines, {"question": long_question, "answer": 2}]))
    run = tmp_path / "run"
    args = ["rl", f"init_from={model_dir}", *RUN, f"task={path}", "max_steps=1", f"out_dir={run}"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and not run.exists()
    taking = rf"the prompt of the question on {re.escape(str(path))}:1001 takes 3\d\d tokens; give max_prompt_length"
    assert re.match(rf"error: field 'max_prompt_length' has value 192: {taking}", refused.output), refused.output


def test_a_problems_file_whose_questions_are_all_held_out_is_refused_naming_task(tmp_path):
    """A small file whose questions all hashed to the held-out split stopped rl with 'max() arg is an empty sequence'
    (no training prompt to measure against max_prompt_length)."""
    model_dir = micro_checkpoint(tmp_path / "model")
    held_out = [q for q in (f"What is {n} + 1?" for n in range(100)) if split_of(q) == "heldout"][:3]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"question": question, "answer": 1}) + "\n" for question in held_out))
    run = tmp_path / "run"
    refused = CliRunner().invoke(app, ["rl", f"init_from={model_dir}", *RUN, f"task={path}", f"out_dir={run}"])
    assert refused.exit_code == 1 and not run.exists()
    reason = (
        f"error: field 'task' has value {path}: its 3 questions are all held out (each question's split is its hash's"
    )
    assert refused.output.startswith(reason) and "leaving none to train on; add questions" in refused.output


@pytest.mark.parametrize("command", ["rl", "sft"])
def test_a_difficulty_past_the_most_is_refused_naming_difficulty_before_a_config_is_written(tmp_path, command):
    """difficulty=5000 passed the config's checks, so --write-config wrote a config that cannot run, and a run was
    refused only once its task was made, naming no field ("error: difficulty 5000: at most 1000 ...")."""
    written = tmp_path / "run.yaml"
    args = [command, f"init_from={micro_checkpoint(tmp_path / 'model')}", "task=addition", "difficulty=5000"]
    refused = CliRunner().invoke(app, args + ["--write-config", str(written)])
    assert refused.exit_code == 1 and not written.exists()
    assert refused.output.startswith("error: field 'difficulty': difficulty 5000: at most 1000 (digits or numbers of")


def test_a_difficulty_for_a_problems_file_is_refused_naming_difficulty_before_a_config_is_written(tmp_path):
    """difficulty=3 beside task=problems.jsonl passed the config's checks, so --write-config wrote a config that
    cannot run, and a run was refused only once its source was built, naming no field ("error: difficulty 3: task
    ... is a file of problems, which has none")."""
    model_dir = micro_checkpoint(tmp_path / "model")
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": 2}) + "\n")
    written = tmp_path / "rl.yaml"
    args = ["rl", f"init_from={model_dir}", f"task={path}", "difficulty=3", "--write-config", str(written)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and not written.exists()
    assert refused.output.startswith(f"error: field 'difficulty': difficulty 3: task '{path}' is a file of problems")
    assert CliRunner().invoke(app, args[:-3] + ["--write-config", str(written)]).exit_code == 0 and written.exists()


def test_a_prompt_room_that_leaves_the_context_no_completion_is_refused_naming_max_prompt_length(tmp_path):
    model_dir = micro_checkpoint(tmp_path / "model")  # a context of 512 positions
    with pytest.raises(
        ConfigError, match="field 'max_prompt_length' has value 512: .* its context of 512 tokens .*; at most 511"
    ):
        resolve_train_config(None, [f"init_from={model_dir}", *RUN, "max_prompt_length=512"], cls=GRPOConfig)
    match = r"'max_completion_length' has value 12: it and a task prompt's room of 505 tokens \(max_prompt_length\) "
    match += ".*; at most 7"
    with pytest.raises(ConfigError, match=match):
        resolve_train_config(None, [f"init_from={model_dir}", *RUN, "max_prompt_length=505"], cls=GRPOConfig)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("many", "a valid integer or input should be 'auto'"),
        ("-1", "greater than or equal to 0 or input should be 'auto'"),
    ],
)
def test_a_bad_thread_count_is_refused_naming_the_field_its_value_and_both_choices(value, reason):
    with pytest.raises(ConfigError, match=f"field 'threads' has value '?{value}'?: input should be {reason}$"):
        resolve_train_config(None, ["tokenizer=x.json", f"threads={value}"], cls=GRPOConfig)


def test_one_generation_per_prompt_is_refused_saying_that_group_advantages_need_two(tmp_path):
    model_dir = micro_checkpoint(tmp_path / "model")
    reason = "field 'num_generations' must be at least 2, not 1: a completion's advantage is its reward against the"
    with pytest.raises(ConfigError, match=f"^{reason} mean and std of its prompt's group"):
        resolve_train_config(None, [f"init_from={model_dir}", "num_generations=1"], cls=GRPOConfig)


def test_a_kl_weight_without_a_starting_checkpoint_is_refused_naming_beta_before_a_config_is_written(tmp_path):
    """beta=0.1 on a fresh preset was taken by the config (--write-config wrote it) and refused only when the run built
    its reference, as a ValueError naming no field."""
    tokenizer = micro_checkpoint(tmp_path / "model") / "tokenizer.json"
    reason = "field 'beta' must be 0 without init_from, not 0.1: its k3 KL is to the reference model, the checkpoint"
    with pytest.raises(ConfigError, match=f"^{re.escape(reason)}"):
        resolve_train_config(None, [f"tokenizer={tokenizer}", "beta=0.1"], cls=GRPOConfig)
    written = tmp_path / "rl.yaml"
    result = CliRunner().invoke(app, ["rl", f"tokenizer={tokenizer}", "beta=0.1", "--write-config", str(written)])
    assert result.exit_code == 1 and reason in result.output and not written.exists()
    assert resolve_train_config(None, [f"tokenizer={tokenizer}", "beta=0"], cls=GRPOConfig).beta == 0


def test_top_k_minus_one_is_vllms_and_verls_off_sampling_as_zero(tmp_path, monkeypatch):
    """verl's rollout default top_k=-1 (vLLM's off, which the engine's SamplingParams takes) was refused, 7005743
    naming 0 in the refusal: it is taken, and the run's rollouts are those of top_k=0, every token in reach (at
    temperature 1 the micro model's 8 completions all differ); -2 is refused."""
    with pytest.raises(ConfigError, match="has value -2: input should be greater than or equal to -1$"):
        resolve_train_config(None, ["top_k=-2"], cls=GRPOConfig)
    model_dir = micro_checkpoint(tmp_path / "model")
    rollouts = keep_rollouts(monkeypatch)
    settings = [f"init_from={model_dir}", *RUN, "task=addition", "difficulty=1", "max_steps=1"]
    for top_k in (-1, 0):
        config = resolve_train_config(
            None, [*settings, f"top_k={top_k}", f"out_dir={tmp_path / str(top_k)}"], cls=GRPOConfig
        )
        assert config.top_k == top_k
        run_rl(config)
    assert torch.equal(rollouts[0].input_ids, rollouts[1].input_ids)
    assert sum(len(set(map(tuple, group.tolist()))) for group in rollouts[0].input_ids.view(2, 4, -1)) == 8


def test_epsilon_high_above_one_bounds_the_ratio_as_trl_and_verl_take_it(tmp_path):
    """epsilon_high=2 (a ratio bound of 3) was refused ("input should be less than or equal to 1") where TRL's
    epsilon_high and verl's clip_ratio_high take any bound above 1; a negative one stays refused."""
    with pytest.raises(ConfigError, match="'epsilon_high' has value -0.1: input should be greater than or equal to 0"):
        resolve_train_config(None, ["epsilon_high=-0.1"], cls=GRPOConfig)
    model_dir = micro_checkpoint(tmp_path / "model")
    config = resolve_train_config(None, [f"init_from={model_dir}", "epsilon_high=2"], cls=GRPOConfig)
    assert config.clip_high == 2.0
    ratio = torch.tensor([[2.5, 3.5]])  # one under the bound of 3, one over it
    loss = policy_loss(ratio.log(), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), "dapo", 0.2, config.clip_high)
    assert loss.clip_high_fraction == 0.5
    assert float(loss.loss) == pytest.approx(-(2.5 + 3.0) / 2)


def test_trls_bnpo_loss_is_refused_naming_dapo_which_computes_it_here():
    """TRL's bnpo divides by a micro-batch's tokens, its dapo by the generation batch's: one and the same batch here."""
    choices = "input should be 'grpo', 'dr_grpo' or 'dapo'"
    with pytest.raises(ConfigError, match=f"'bnpo': {choices}; TRL's bnpo .* is what dapo computes here"):
        resolve_train_config(None, ["loss_type=bnpo"], cls=GRPOConfig)
    with pytest.raises(ConfigError, match=f"'foo': {choices}$"):  # no note for a value no tool takes
        resolve_train_config(None, ["loss_type=foo"], cls=GRPOConfig)


@pytest.mark.parametrize("trls", ["cispo", "sapo", "luspo", "vespo"])
def test_trls_losses_that_are_no_clipped_surrogate_are_refused_saying_they_are_not_offered(trls):
    """TRL 1.16's loss_type takes cispo, sapo, luspo and vespo, losses other than GRPO's clipped surrogate: each was
    refused with the three choices alone."""
    note = "TRL's cispo, sapo, luspo and vespo losses are not offered: the loss here is GRPO's clipped surrogate"
    with pytest.raises(ConfigError, match=f"'{trls}': input should be 'grpo', 'dr_grpo' or 'dapo'; {note}"):
        resolve_train_config(None, [f"loss_type={trls}"], cls=GRPOConfig)


@pytest.mark.parametrize(
    ("trl_name", "ours"),
    [("learning_rate=1e-6", "TRL's learning_rate is lr here"),
     ("per_device_train_batch_size=8", "TRL's per_device_train_batch_size counts completions; batch_size here counts "
      "prompts"),
     ("generation_batch_size=16", "is batch_size x num_generations here"),
     ("gradient_accumulation_steps=4", "is grad_accum_steps here, which rl keeps at 1"),
     ("steps_per_generation=2", "TRL's steps_per_generation, which splits it over several steps, is not offered"),
     ("num_train_epochs=1", "a run is max_steps optimizer steps"),
     ("reward_weights=[1.0, 0.5]", "TRL's reward_weights=[1, w] over an accuracy and a format reward is "
      "format_weight=w"),
     ("delta=1.5", "TRL's delta (INTELLECT-2's two-sided clipping) is not offered"),
     ("multi_objective_aggregation=normalize_then_sum", "as TRL's multi_objective_aggregation=sum_then_normalize (its "
      "default) does; normalize_then_sum (GDPO's) is not offered"),
     ("repetition_penalty=1.1", "TRL's repetition_penalty is not offered: rollouts are sampled at temperature"),
     ("reward_funcs=[accuracy, format]", "the reward is the task's (task=: a built-in, your module:Class or a"),
     ("use_vllm=true", "rollouts always run on seekstack's inference engine, built on the model being trained"),
     ("log_completions=true", "rl logs no completions; `seekstack traces CHECKPOINT` samples a checkpoint's"),
     # were asked "did you mean" another field: max_completion_length (following it would cut every completion to
     # one token), importance_sampling_level, num_generations
     ("num_completions_to_print=1", "rl prints no completions; `seekstack traces CHECKPOINT` samples"),
     ("vllm_importance_sampling_correction=true", "TRL's vLLM importance sampling correction (its loss weighed"),
     ("vllm_importance_sampling_cap=2", "not offered: rollouts are sampled by seekstack's engine on the trained model"),
     ("generation_kwargs={}", "TRL's generation_kwargs is not offered; rollouts are sampled at temperature, top_p"),
     ("top_entropy_quantile=0.2", "TRL's top_entropy_quantile (the loss on each completion's highest-entropy"),
     # were asked "did you mean" a field that is another thing: num_generations (the training group),
     # max_prompt_length, importance_sampling_level (GSPO's ratio), temperature (the rollouts' sampling)
     ("num_generations_eval=4", "TRL's num_generations_eval (completions per prompt at evaluation) is not offered"),
     ("vllm_max_model_length=512", "engine, whose context is max_prompt_length + max_completion_length"),
     ("vllm_importance_sampling_mode=token_truncate", "TRL's vLLM importance sampling correction (its loss weighed"),
     ("vllm_importance_sampling_clip_max=3", "(importance_sampling_level is GSPO's ratio per token or sequence)"),
     ("sapo_temperature_pos=1", "TRL's SAPO (loss_type=sapo, a soft gate in place of the clip) is not offered"),
     ("sapo_temperature_neg=1.05", "(temperature here is the rollouts' sampling temperature)"),
     ("save_steps=100", "transformers' save_steps (steps between checkpoints) is save_every here"),
     ("max_grad_norm=1.0", "transformers' max_grad_norm is grad_clip here"),
     ("warmup_ratio=0.1", "warmup_steps = warmup_ratio x max_steps"), ("bf16=true", "bf16=true is dtype=bfloat16"),
     # TRL's script arguments, on every `trl grpo` command line: were refused with the list of fields alone
     ("model_name_or_path=Qwen/Qwen2.5-0.5B", "TRL's model_name_or_path (the model trained) is init_from here"),
     ("dataset_name=trl-lib/DeepMath-103K", "TRL's dataset_name (prompts and the solution column its accuracy_reward "
      "verifies against) is task here: a problems .jsonl")],
)  # fmt: skip
def test_trls_grpo_field_names_are_refused_naming_ours(tmp_path, trl_name, ours):
    """A TRL GRPOConfig name is no field here: the refusal says which field it is (was: 'did you mean' the closest
    name, delta's 'beta' and reward_weights' 'format_weight' with nothing on how they differ, or nothing at all)."""
    assert_refused_naming_ours(tmp_path, GRPOConfig, trl_name, ours)


@pytest.mark.parametrize(("trls", "ours"), [("true", "group"), ("false", "none")])
def test_trls_boolean_scale_rewards_is_refused_naming_the_choice_that_computes_it(trls, ours):
    """TRL's GRPOConfig maps scale_rewards=True to "group" and False to "none" (its __post_init__)."""
    note = f"TRL's scale_rewards={trls} .* is scale_rewards={ours}"
    with pytest.raises(ConfigError, match=f"input should be 'group', 'batch' or 'none'; {note}$"):
        resolve_train_config(None, [f"scale_rewards={trls}"], cls=GRPOConfig)


def test_trls_unset_max_prompt_length_is_refused_saying_no_prompt_is_cut_here(tmp_path):
    """TRL's max_prompt_length=None keeps prompts whole; it was refused as "input should be a valid integer" alone,
    leaving a TRL user to guess a length that would not cut theirs."""
    note = "TRL's max_prompt_length=None (no prompt cut) is how rl takes every prompt: none is cut"
    with pytest.raises(ConfigError, match=f"has value None: input should be a valid integer; {re.escape(note)}"):
        resolve_train_config(None, ["max_prompt_length=null"], cls=GRPOConfig)
    config = tmp_path / "config.yaml"
    config.write_text("max_prompt_length: null\n")
    with pytest.raises(ConfigError, match=f"config.yaml: .*{re.escape(note)}"):
        resolve_train_config(config, [], cls=GRPOConfig)


@pytest.mark.parametrize(
    ("verls", "ours"), [("token-mean", "dapo"), ("seq-mean-token-mean", "grpo"), ("seq-mean-token-sum-norm", "dr_grpo")]
)
def test_verls_loss_aggregation_names_are_refused_naming_the_loss_type_that_computes_each(verls, ours):
    with pytest.raises(ConfigError, match=f"'{verls}': input should be .*; verl's {verls} .* is loss_type={ours}"):
        resolve_train_config(None, [f"loss_type={verls}"], cls=GRPOConfig)


@pytest.mark.parametrize(
    ("verl_name", "ours"),
    [("loss_agg_mode=token-mean", "verl's loss_agg_mode is loss_type here: token-mean is dapo"),
     ("clip_ratio=0.2", "verl's clip_ratio (clip_ratio_low) is epsilon here"),
     ("clip_ratio_low=0.2", "verl's clip_ratio (clip_ratio_low) is epsilon here"),
     ("clip_ratio_high=0.28", "verl's clip_ratio_high (DAPO's clip-higher) is epsilon_high here"),
     ("ppo_epochs=2", "verl's ppo_epochs (updates on each generation batch) is num_iterations here"),
     ("kl_loss_coef=0.001", "the k3 KL in the loss) is beta here"),
     ("use_kl_loss=true", "(verl's use_kl_loss with kl_loss_coef=beta)"),
     # was asked "did you mean 'max_prompt_length'?": following it sets the prompt's room, not the completion's
     ("max_response_length=64", "verl's max_response_length is max_completion_length here"),
     ("norm_adv_by_std_in_grpo=false", "false (Dr. GRPO's) scale_rewards=none")],
)  # fmt: skip
def test_verls_grpo_field_names_are_refused_naming_ours(tmp_path, verl_name, ours):
    """A verl GRPO name is no field here: the refusal says which field it is (was: nothing, or a wrong guess), as
    loss_type's refusal already named verl's loss_agg_mode values."""
    assert_refused_naming_ours(tmp_path, GRPOConfig, verl_name, ours)


@pytest.mark.parametrize(
    "override",
    ["eval_every=5", "eval_batches=3", "seq_len=8", "mixture={train: 1.0}", "mixture_mode=bandit",
     "bandit_reward_scale=0.5", "mtp_loss_weight=0", "mtp_loss_weight_late=0", "mtp_switch_fraction=0.5",
     "packing=true"],
)  # fmt: skip
def test_trainer_fields_rl_does_not_use_are_refused_unless_left_at_their_defaults(tmp_path, override):
    model_dir = micro_checkpoint(tmp_path / "model")
    name = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"field '{name}' has value .*: rl does not use it \\(.+\\); leave it at"):
        resolve_train_config(None, [f"init_from={model_dir}", override], cls=GRPOConfig)
    run = tmp_path / "run"  # a --write-config file and a run's saved config carry the field at its default
    written = write_config(
        resolve_train_config(None, [f"init_from={model_dir}", f"out_dir={run}"], cls=GRPOConfig), run / CONFIG_FILE
    )
    assert name in json.loads(written.read_text())
    default = getattr(GRPOConfig(), name)
    assert getattr(resolve_train_config(written, cls=GRPOConfig), name) == default
    assert getattr(resolve_train_config(None, [f"out_dir={run}"], resume=True, cls=GRPOConfig), name) == default


def test_more_threads_than_the_machine_has_cpus_is_refused_before_anything_runs(tmp_path):
    config = [
        f"init_from={micro_checkpoint(tmp_path / 'model')}",
        *RUN,
        "threads=100000",
        f"out_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(ValueError, match="field 'threads' 100000: must be from 1 to this machine's"):
        run_rl(resolve_train_config(None, config, cls=GRPOConfig))
    assert not (tmp_path / "run").exists() and torch.get_num_threads() == 1


def test_a_group_prefills_its_prompt_once(tmp_path):
    """Each prompt is fed to the model once for its G requests (the engine's twin prefill)."""
    model_dir = micro_checkpoint(tmp_path / "model")
    source = GRPOSource(resolve_train_config(None, [f"init_from={model_dir}", *RUN], cls=GRPOConfig))
    source.attach(load_pretrained(model_dir, dtype=torch.float32))
    rollout = source.batch(2, 0.0)["rollout"]
    assert source.config.num_generations > 1
    assert source.engine.stats().prefill_tokens == sum(rollout.prompt_lengths[:: source.config.num_generations])


@pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's notes on the host compiler
@pytest.mark.parametrize("compile_decode", [False, True])
def test_engine_samples_what_the_learner_scores_after_an_update(tmp_path, compile_decode):
    """The engine's log-probabilities of a rollout equal the loss's, also after an optimizer step: the chat prompt
    spans several cache blocks, which the engine's prefix cache must not serve from the old weights; a compiled
    decode step reads the weights the step changed in place; it compiles in the first rollout, and the step that did
    says how long it took; a row decoding alone (here the engine's own generate) runs eagerly, without a graph of its
    own."""
    torch._dynamo.reset()  # a graph an earlier test compiled would serve this engine
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model_dir = micro_checkpoint(tmp_path / "model")
    config = [f"init_from={model_dir}", *RUN, f"compile_decode={compile_decode}"]
    source = GRPOSource(resolve_train_config(None, config, cls=GRPOConfig))
    model = load_pretrained(model_dir, dtype=torch.float32)
    source.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for rollout_index in range(2):  # the second rollout is sampled after an update
        batch = source.batch(2, 0.0)
        rollout = batch["rollout"]
        prompt = rollout.input_ids[0, : rollout.prompt_lengths[0]].tolist()
        assert len(prompt) > 2 * source.engine.cache.block_size
        seed = (source.generation - 1) * 1_000_003  # row 0 of the batch just sampled (config seed 0)
        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed, logprobs=True)
        engine_out = source.engine.generate([prompt], params)[0]
        length = int(rollout.completion_lengths[0])
        assert engine_out.token_ids == rollout.input_ids[0, len(prompt) : len(prompt) + length].tolist()
        model.train()
        out, metrics = source.loss(model, batch, 0.0)
        assert (metrics["compile_s"] > 0) == (compile_decode and rollout_index == 0)
        logps, _, _ = completion_logps(model, rollout, 1.0, torch.device("cpu"))
        engine_logps = torch.tensor([entry.logprob for entry in engine_out.logprobs])
        assert torch.allclose(logps[0, :length].detach(), engine_logps, atol=1e-4)
        optimizer.zero_grad()
        (out.loss - logps[0, :length].sum()).backward()  # the GRPO loss plus a push that surely moves the weights
        optimizer.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == compile_decode  # the one for 2+ rows


@pytest.mark.parametrize("async_rollouts", [False, True], ids=["on_policy", "async"])
def test_rl_run_logs_every_term_and_resumes_exactly(tmp_path, sft_model, async_rollouts):
    """With async_rollouts the checkpoint at step 2 holds the batch being sampled ahead for step 3."""
    common = [f"init_from={sft_model}", *RUN, "num_iterations=2", "beta=0.1", "lr=1e-3", "max_steps=4"]
    common += [f"async_rollouts={async_rollouts}"]
    common += ["max_completion_length=40", "task=addition", "difficulty=1"]
    straight = run_rl(
        resolve_train_config(
            None, [*common, f"out_dir={tmp_path / 'a'}", "save_every=2", "keep_checkpoints=2"], cls=GRPOConfig
        )
    )
    resumed = run_rl(
        resolve_train_config(None, [*common, f"out_dir={tmp_path / 'b'}"], cls=GRPOConfig),
        resume=tmp_path / "a" / "checkpoints" / "step_2",
    )
    assert resumed.losses == straight.losses[2:]
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for name in ("reward", "reward_std", "reward_correctness", "reward_format_std", "accuracy", "kl", "entropy",
                 "truncated_fraction", "frac_reward_zero_std"):  # fmt: skip
        assert all(name in line for line in lines), name
    # reward_std is the groups' mean std: 0 exactly where no group's rewards differ
    assert all((line["reward_std"] == 0) == (line["frac_reward_zero_std"] == 1) for line in lines)
    assert all("clip_fraction" in line and "generate_share" in line for line in lines)
    assert lines[0]["generate_share"] > 0 and lines[1]["generate_share"] == 0  # num_iterations=2: one rollout, 2 steps
    assert any(0 < line["reward_format"] < 1 for line in lines)
    # an update on rewards that differ moves the policy off the reference (a rollout whose rewards are all equal, all
    # wrong as the first one can be, has no advantage to move it)
    assert any(line["reward_std"] > 0 for line in lines[:-1]) and lines[-1]["kl"] > 0
    assert any(line["loss"] != 0 for line in lines)
    # the tokens the loss is on, which `report` counts: the step's 2 x 4 completions, each with its EOS
    assert all(line["completion_tokens"] == 8 * line["completion_length"] for line in lines)
    weights_a = load_pretrained(tmp_path / "a" / "checkpoints" / "step_4").state_dict()
    weights_b = load_pretrained(tmp_path / "b" / "checkpoints" / "step_4").state_dict()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def test_an_async_run_resumed_from_a_checkpoint_saved_mid_batch_logs_what_the_uninterrupted_one_logs(
    tmp_path, sft_model
):
    """save_every=1 at num_iterations=2: the checkpoint after step 1 holds the batch half trained on and the one
    sampled ahead, which it waited for. The run resumed from it takes the same batches and logs the same metrics as
    the uninterrupted run (all but the clock's), and ends on the same weights."""
    common = [f"init_from={sft_model}", *RUN, "num_iterations=2", "lr=1e-3", "max_steps=4", "async_rollouts=true"]
    common += ["max_completion_length=40", "task=addition", "difficulty=1"]
    straight = [*common, f"out_dir={tmp_path / 'a'}", "save_every=1", "keep_checkpoints=4"]
    run_rl(resolve_train_config(None, straight, cls=GRPOConfig))
    resumed = resolve_train_config(None, [*common, f"out_dir={tmp_path / 'b'}"], cls=GRPOConfig)
    run_rl(resumed, resume=tmp_path / "a" / "checkpoints" / "step_1")
    clock = ("_s", "_share", "tokens_per_s", "mfu", "peak_flops", "peak_source", "threads")

    def logged(run: str) -> list[dict]:
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{name: value for name, value in line.items() if not name.endswith(clock)} for line in lines]

    assert logged("b") == logged("a")[1:]
    assert logged("b")[0]["reward_std"] > 0 or logged("b")[1]["reward_std"] > 0  # batches with an advantage
    weights_a = load_pretrained(tmp_path / "a" / "checkpoints" / "step_4").state_dict()
    weights_b = load_pretrained(tmp_path / "b" / "checkpoints" / "step_4").state_dict()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def test_the_share_of_completions_the_token_limit_cut_is_logged():
    """They score 0 (no final answer): how many there are says whether max_completion_length is too short."""
    eos = 1
    rollout = Rollout(
        input_ids=torch.tensor([[5, 6, 7, eos], [5, 6, 7, 8], [5, 9, eos, 0]]),  # prompt 5 6 | 5 6 | 5, then padding
        prompt_lengths=torch.tensor([2, 2, 1]),
        completion_lengths=torch.tensor([2, 2, 2]),
        rewards=torch.zeros(3),
        terms={"correctness": torch.zeros(3), "format": torch.zeros(3)},
        generate_s=0.0,
    )
    assert rollout.ended(eos).tolist() == [True, False, True]
    assert rollout_metrics(rollout, eos)["truncated_fraction"] == pytest.approx(1 / 3)


def test_a_run_resumed_with_beta_mid_batch_scores_the_saved_batch_against_the_reference(tmp_path, sft_model):
    """The checkpoint at step 3 holds a batch sampled at beta=0 (no reference log-probabilities) for one more step."""
    common = [f"init_from={sft_model}", *RUN, "num_iterations=2", "lr=1e-3", "max_steps=4", "task=addition"]
    common += ["max_completion_length=40", "difficulty=1"]
    run_rl(
        resolve_train_config(
            None, [*common, "beta=0", f"out_dir={tmp_path / 'a'}", "save_every=1", "keep_checkpoints=4"], cls=GRPOConfig
        )
    )
    resumed = resolve_train_config(None, [*common, "beta=0.1", f"out_dir={tmp_path / 'b'}"], cls=GRPOConfig)
    run_rl(resumed, resume=tmp_path / "a" / "checkpoints" / "step_3")
    at_beta_0 = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert not any("kl" in line for line in at_beta_0)  # no reference scored, no KL to log (it logged 0.0)
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4]
    assert lines[0]["kl"] > 0  # three updates moved the policy off the starting checkpoint


def test_a_run_resumed_at_more_iterations_samples_anew_where_its_batch_has_no_sampling_logps(tmp_path, sft_model):
    """At num_iterations=1 a batch keeps no old log-probabilities; trained on again after the update, its importance
    ratio would be taken against weights that did not sample it (and be 1)."""
    common = [f"init_from={sft_model}", *RUN, "task=addition", "difficulty=1"]
    first = [*common, "num_iterations=1", "max_steps=1", f"out_dir={tmp_path / 'a'}"]
    run_rl(resolve_train_config(None, first, cls=GRPOConfig))
    resumed = [*common, "num_iterations=2", "max_steps=3", f"out_dir={tmp_path / 'b'}"]
    run_rl(resolve_train_config(None, resumed, cls=GRPOConfig), resume=tmp_path / "a" / "checkpoints" / "step_1")
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3]
    assert lines[0]["generate_s"] > 0 and lines[1]["generate_s"] == 0  # sampled at step 2, trained on twice


def test_a_run_resumed_at_fewer_iterations_than_its_batch_has_had_samples_anew(tmp_path):
    """Saved after 3 of num_iterations=4 updates on its batch and resumed at num_iterations=2, the run samples a new
    batch at once and then every 2 steps (it trained on the saved batch for the rest of the run)."""
    model_dir = micro_checkpoint(tmp_path / "model")
    common = [f"init_from={model_dir}", *RUN, "task=addition", "difficulty=1"]
    first = [*common, "num_iterations=4", "max_steps=3", f"out_dir={tmp_path / 'a'}"]
    run_rl(resolve_train_config(None, first, cls=GRPOConfig))
    resumed = [*common, "num_iterations=2", "max_steps=6", f"out_dir={tmp_path / 'b'}"]
    run_rl(resolve_train_config(None, resumed, cls=GRPOConfig), resume=tmp_path / "a" / "checkpoints" / "step_3")
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 5, 6]
    assert [line["generate_s"] > 0 for line in lines] == [True, False, True]


@pytest.mark.parametrize("saved_batch", [["num_iterations=2", "max_steps=1"], ["async_rollouts=true", "max_steps=2"]])
def test_a_run_resumed_at_another_temperature_samples_anew_where_its_saved_batch_was_sampled_at_the_old_one(
    tmp_path, monkeypatch, saved_batch
):
    """The saved batch (the current one mid-iteration, or one sampled ahead) has its old policy's log-probabilities at
    the old temperature and the weights that sampled it are gone: trained on at another, the importance ratio would
    be off by the temperature's change, not the update's. A new batch is sampled by the resumed weights, so the first
    step's ratio is 1."""
    model_dir = micro_checkpoint(tmp_path / "model")
    common = [f"init_from={model_dir}", *RUN, "task=addition", "difficulty=1", "save_every=1", "keep_checkpoints=2"]
    common += saved_batch
    run_rl(resolve_train_config(None, [*common, f"out_dir={tmp_path / 'a'}"], cls=GRPOConfig))
    log_ratios = []  # the first step's largest |log ratio| first

    def spy(logps, old_logps, advantages, mask, *rest):
        log_ratios.append(float(((logps.detach() - old_logps).abs() * mask).max()))
        return policy_loss(logps, old_logps, advantages, mask, *rest)

    monkeypatch.setattr(rl, "policy_loss", spy)
    resumed = [*common, "temperature=0.5", "max_steps=3", f"out_dir={tmp_path / 'b'}"]
    run_rl(resolve_train_config(None, resumed, cls=GRPOConfig), resume=tmp_path / "a" / "checkpoints" / "step_1")
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 2 and lines[0]["generate_s"] > 0  # sampled at step 2, at temperature 0.5
    assert log_ratios[0] < 1e-5


def keep_rollouts(monkeypatch) -> list:
    """The rollouts each `rl.sample_groups` call of the run returns, in order."""
    rollouts = []
    sample_groups = rl.sample_groups

    def kept_sample_groups(*args, **kwargs):
        rollouts.append(sample_groups(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(rl, "sample_groups", kept_sample_groups)
    return rollouts


def test_rollouts_are_sampled_at_the_configured_temperature(tmp_path, monkeypatch):
    """Near temperature 0 (0.001: sampled, not greedy) the micro model's completions of a prompt are mostly one and
    the same (its logits are near flat: at 0.01 not so); at 1 they all differ."""
    model_dir = micro_checkpoint(tmp_path / "model")
    rollouts = keep_rollouts(monkeypatch)
    settings = [f"init_from={model_dir}", *RUN, "task=addition", "difficulty=1", "max_steps=1", "save_every=0"]
    for temperature in (0.001, 1.0):
        run_rl(
            resolve_train_config(
                None,
                [*settings, f"temperature={temperature}", f"out_dir={tmp_path / str(temperature)}"],
                cls=GRPOConfig,
            )
        )
    distinct = [
        sum(len(set(map(tuple, group.tolist()))) for group in rollout.input_ids.view(2, 4, -1)) for rollout in rollouts
    ]
    assert distinct[0] <= 4 and distinct[1] == 8  # of the 2 prompts x 4 completions, the same seed's draws


@pytest.mark.parametrize("truncation", ["top_k=1", "top_p=0.001", "min_p=1"])
def test_rollouts_sample_within_the_configured_top_k_top_p_and_min_p(tmp_path, monkeypatch, truncation):
    """Keeping the likeliest token alone, each group's 4 completions, each of its own seed, are the greedy one (at
    temperature 1 without them all 8 differ: the test above); top_k and top_p were not rl keys, nor TRL's min_p."""
    model_dir = micro_checkpoint(tmp_path / "model")
    rollouts = keep_rollouts(monkeypatch)
    settings = [f"init_from={model_dir}", *RUN, "task=addition", "difficulty=1", "max_steps=1", truncation]
    run_rl(resolve_train_config(None, [*settings, f"out_dir={tmp_path / 'run'}"], cls=GRPOConfig))
    groups = rollouts[0].input_ids.view(2, 4, -1)
    assert [len(set(map(tuple, group.tolist()))) for group in groups] == [1, 1]


@pytest.mark.parametrize("masked", [False, True])
def test_mask_truncated_completions_leaves_the_cut_ones_out_of_the_loss(tmp_path, monkeypatch, masked):
    """DAPO's overlong filtering (TRL's mask_truncated_completions): the loss's mask holds the completions that ended
    with their EOS alone (rows 0 and 3 here); by default every completion's tokens."""
    model_dir = micro_checkpoint(tmp_path / "model")
    config = [f"init_from={model_dir}", *RUN, "num_generations=3", f"mask_truncated_completions={str(masked).lower()}"]
    source = GRPOSource(resolve_train_config(None, config, cls=GRPOConfig))
    model = load_pretrained(model_dir, dtype=torch.float32)
    source.attach(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        rollout = _grouped_rollout(source.tokenizer.pad_id)
    last = rollout.prompt_lengths + rollout.completion_lengths - 1
    ends = torch.tensor([True, False, False, True, False, False])
    rollout.input_ids[torch.arange(6), last] = torch.where(ends, source.tokenizer.eos_id, 7)
    rollout.terms = {"correctness": torch.zeros(6), "format": torch.zeros(6)}
    trained = []

    def spy(logps, old_logps, advantages, mask, *rest):
        trained.append(mask)
        return policy_loss(logps, old_logps, advantages, mask, *rest)

    monkeypatch.setattr(rl, "policy_loss", spy)
    batch = {"rollout": rollout, "advantages": torch.ones(6), "old_logps": None, "ref_logps": None, "fresh": True}
    metrics = source.loss(model, batch, 0.0)[1]
    kept = ends if masked else torch.ones(6, dtype=torch.bool)
    assert torch.equal(trained[0], rollout.completion_mask * kept[:, None])
    assert metrics["completion_tokens"] == float(rollout.completion_lengths[kept].sum())  # 4 + 7 masked, all 30 not


def test_rl_trains_at_the_importance_sampling_level_it_is_given(tmp_path, monkeypatch):
    levels = []

    def spy(*args):
        levels.append(args[-1])
        return policy_loss(*args)

    monkeypatch.setattr(rl, "policy_loss", spy)
    model_dir = micro_checkpoint(tmp_path / "model")
    settings = [f"init_from={model_dir}", *RUN, "difficulty=1", "max_steps=1", "importance_sampling_level=sequence"]
    run_rl(resolve_train_config(None, [*settings, f"out_dir={tmp_path / 'run'}"], cls=GRPOConfig))
    assert levels == ["sequence"]


def test_a_run_resumed_with_other_reward_settings_samples_anew_where_its_saved_batch_has_the_old_advantages(
    tmp_path, monkeypatch, sft_model
):
    """A saved batch's advantages are its rewards (format_weight) normalised per group (scale_rewards) as they were
    set when it was sampled; the resumed run trains on advantages of its own settings."""
    rows = itertools.count()

    def terms_differing_within_each_group(task, problem, completion, ended):
        row = next(rows)  # the micro model's samples may score alike on every row, whatever the seed
        return {"correctness": float(row % 2), "format": float(row % 3 == 0)}

    monkeypatch.setattr("seekstack.posttrain.rollout.reward_terms", terms_differing_within_each_group)
    common = [f"init_from={sft_model}", *RUN, "task=addition", "difficulty=1", "num_iterations=2", "save_every=1"]
    run_rl(resolve_train_config(None, [*common, "max_steps=1", f"out_dir={tmp_path / 'a'}"], cls=GRPOConfig))
    trained = []
    original = GRPOSource.loss

    def spy(self, model, batch, mtp_loss_weight):
        trained.append(batch)
        return original(self, model, batch, mtp_loss_weight)

    monkeypatch.setattr(GRPOSource, "loss", spy)
    resumed = [*common, "format_weight=1.0", "scale_rewards=none", "max_steps=2", f"out_dir={tmp_path / 'b'}"]
    run_rl(resolve_train_config(None, resumed, cls=GRPOConfig), resume=tmp_path / "a" / "checkpoints" / "step_1")
    rollout = trained[0]["rollout"]
    rewards = rollout.terms["correctness"] + 1.0 * rollout.terms["format"]
    assert torch.equal(trained[0]["advantages"], group_advantages(rewards, 4, "none"))
    assert trained[0]["advantages"].abs().sum() > 0  # the rewards differ within a group: the check can fail


def test_a_fresh_models_vocabulary_is_checked_against_the_tokenizer_rl_names_not_data_dir(tmp_path):
    tokenizer = micro_checkpoint(tmp_path / "start")  # 300 tokens
    config = [f"tokenizer={tokenizer}", f"out_dir={tmp_path / 'run'}", *RUN, "model.vocab_size=512", "max_steps=1"]
    named = re.escape(f"{tokenizer}: its tokenizer has 300 tokens, fewer than model vocab_size=512: ids 300..511")
    with pytest.raises(ValueError, match=named):
        run_rl(resolve_train_config(None, config, cls=GRPOConfig))


def _grouped_rollout(pad_id: int) -> Rollout:
    """Two prompts of different lengths, three completions each, of different lengths (one of a single token)."""
    prompts = [torch.randint(2, 300, (11,)).tolist(), torch.randint(2, 300, (6,)).tolist()]
    completion_lengths = [4, 9, 1, 7, 7, 2]
    rows = [prompts[row // 3] + torch.randint(2, 300, (n,)).tolist() for row, n in enumerate(completion_lengths)]
    return Rollout(
        input_ids=pad_rows(rows, pad_id),
        prompt_lengths=torch.tensor([len(prompts[row // 3]) for row in range(6)]),
        completion_lengths=torch.tensor(completion_lengths),
        rewards=torch.zeros(6),
        terms={},
        generate_s=0.0,
    )


def test_completion_logps_share_each_prompt_and_equal_whole_row_forwards(tmp_path):
    """A group's rows share one forward of their prompt; the log-probabilities and the GRPO loss's gradients equal
    those of a forward over each whole row."""
    model = load_pretrained(micro_checkpoint(tmp_path / "model"), dtype=torch.float32).train()
    rollout = _grouped_rollout(pad_id=0)
    mask, advantages = rollout.completion_mask, torch.randn(6)

    def grpo_loss_and_grads(logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = policy_loss(logps, logps.detach() - 0.05, advantages, mask, "grpo", 0.2, 0.2).loss
        model.zero_grad()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole = torch.zeros(mask.shape)
    for row in range(6):  # the reference: each whole row alone, its completion tokens' log-probs at temperature 0.7
        start, length = int(rollout.prompt_lengths[row]), int(rollout.completion_lengths[row])
        ids = rollout.input_ids[row, : start + length][None]
        log_probs = (model(ids).logits[0, start - 1 : -1] / 0.7).log_softmax(dim=-1)
        whole[row, :length] = log_probs.gather(1, ids[0, start:, None]).squeeze(1)
    whole_loss, whole_grads = grpo_loss_and_grads(whole)
    logps, _, out = completion_logps(model, rollout, 0.7, torch.device("cpu"))
    shared_loss, shared_grads = grpo_loss_and_grads(logps)
    assert torch.allclose(logps * mask, whole * mask, rtol=1e-5, atol=1e-5)
    assert torch.allclose(shared_loss, whole_loss, rtol=1e-5, atol=1e-7)
    assert shared_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        assert (shared_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-7, name
    # the prompts ran once, padded to 11, and the completions without their last, padded to 8; the expert load
    # (the balance bias's input) counts the prompts' 11 + 6 tokens and the completions' first 8 at most, no padding
    tokens_per_layer = out.expert_load.sum(dim=1) // model.config.num_experts_per_tok
    assert tokens_per_layer.tolist() == [11 + 6 + (4 + 8 + 1 + 7 + 7 + 2)] * len(tokens_per_layer)
    assert trained_tokens(rollout) == (2 * 11 + 6 * (9 - 1), 11 + 9)  # what tokens/s and MFU count
    distinct = dataclasses.replace(
        rollout, input_ids=rollout.input_ids[[0, 3]], prompt_lengths=rollout.prompt_lengths[[0, 3]],
        completion_lengths=rollout.completion_lengths[[0, 3]],
    )  # fmt: skip
    out = completion_logps(model, distinct, 0.7, torch.device("cpu"))[2]  # whole rows, padded to 11 + 9
    assert (out.expert_load.sum(dim=1) // model.config.num_experts_per_tok).tolist()[0] == (11 + 4) + (6 + 7)


@pytest.mark.parametrize("threads", [0, 1])
def test_rl_runs_on_its_threads_and_restores_torchs_setting(tmp_path, monkeypatch, threads):
    """`threads` sets torch's intra-op threads for the whole run (0 keeps torch's); the caller's setting comes back."""
    seen = []
    loss = GRPOSource.loss

    def spy(self, *args):
        seen.append(torch.get_num_threads())
        return loss(self, *args)

    monkeypatch.setattr(GRPOSource, "loss", spy)
    torch.set_num_threads(2)
    config = [f"init_from={micro_checkpoint(tmp_path / 'model')}", *RUN, "max_steps=1", f"threads={threads}"]
    run_rl(resolve_train_config(None, [*config, f"out_dir={tmp_path / 'run'}"], cls=GRPOConfig))
    assert seen == [threads or 2] and torch.get_num_threads() == 2


def test_auto_threads_sample_on_one_and_train_on_one_more_per_core_the_machine_left_idle(tmp_path, monkeypatch):
    """threads=auto: rollouts on one thread; each training half on 1 + the cores idle while they ran (here 1.9, then
    0.3 of 2 cores: 2, then 1 thread), logged per step; torch's setting comes back after the run."""
    idle = iter([1.9, 0.3])
    monkeypatch.setattr(rl.IdleCores, "idle", lambda self: next(idle))
    sampled, trained = [], []
    sample, loss = rl.sample_groups, GRPOSource.loss

    def sample_spy(*args, **kwargs):
        sampled.append(torch.get_num_threads())
        return sample(*args, **kwargs)

    def loss_spy(self, *args):
        trained.append(torch.get_num_threads())
        return loss(self, *args)

    monkeypatch.setattr(rl, "sample_groups", sample_spy)
    monkeypatch.setattr(GRPOSource, "loss", loss_spy)
    torch.set_num_threads(2)
    config = [f"init_from={micro_checkpoint(tmp_path / 'model')}", *RUN, "max_steps=2", "threads=auto"]
    run_rl(resolve_train_config(None, [*config, f"out_dir={tmp_path / 'run'}"], cls=GRPOConfig))
    assert sampled == [1, 1] and trained == [2, 1] and torch.get_num_threads() == 2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["threads"] for m in metrics] == [2, 1]


def test_an_unknown_rl_key_is_answered_with_the_closest_known_one():
    result = CliRunner().invoke(app, ["rl", "num_generation=4"])
    assert result.exit_code == 1
    assert "unknown field 'num_generation'; did you mean 'num_generations'? known fields are" in result.output


@pytest.mark.parametrize("command", [["pass-at-k"], ["traces", "--out", "traces.jsonl"]])
def test_sampling_commands_refuse_a_difficulty_below_1_naming_the_option(tmp_path, command):
    model_dir = micro_checkpoint(tmp_path / "model")
    result = CliRunner().invoke(app, [command[0], str(model_dir), *command[1:], "--difficulty", "0"])
    assert result.exit_code == 2, result.output  # was: "error: difficulty 0: must be at least 1 (...)"
    assert "Invalid value for '--difficulty': has value 0: input should be greater than or equal to 1" in result.output


@pytest.mark.parametrize("command", [["pass-at-k"], ["traces", "--out", "traces.jsonl"]])
@pytest.mark.parametrize(
    ("options", "refusal"),
    [(["--task", "additon"], "Invalid value for '--task': unknown task 'additon'; known tasks are addition"),
     (["--task", "{bad}"], "Invalid value for '--task': {bad}:1: field answer is \"x\": not one number"),
     (["--task", "{good}", "--difficulty", "2"],
      "Invalid value for '--difficulty': difficulty 2: task '{good}' is a file of problems, which has none"),
     (["--task", "addition", "--difficulty", "5000"],  # was: named --task
      "Invalid value for '--difficulty': difficulty 5000: at most 1000 (digits or numbers of task 'addition')")],
)  # fmt: skip
def test_sampling_commands_refuse_a_task_they_cannot_make_naming_the_option(tmp_path, command, options, refusal):
    """Was "error: unknown task 'additon'; ..." (exit 1), naming no option, where --difficulty 0 was already the
    parser's usage error naming it."""
    model_dir = micro_checkpoint(tmp_path / "model")
    files = {"bad": tmp_path / "bad.jsonl", "good": tmp_path / "good.jsonl"}
    files["bad"].write_text('{"question": "What is 1 + 1?", "answer": "x"}\n')
    files["good"].write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    options = [option.format(**files) for option in options]
    result = CliRunner().invoke(app, [command[0], str(model_dir), *command[1:], *options], terminal_width=1000)
    assert result.exit_code == 2, result.output
    assert refusal.format(**files) in " ".join(result.output.replace("│", " ").split()), result.output


def test_pass_at_k_refuses_more_problems_than_the_task_has_naming_the_option(tmp_path):
    """Was "error: task addition at difficulty 1 yielded only 15 ... of 100 asked: ...; raise the difficulty or ask for
    fewer", fewer of what unsaid; now a usage error naming --problems, as the parser's own refusals (traces' is
    test_distill's test_traces_command_refuses_more_prompts_than_distinct_problems_and_writes_nothing)."""
    model_dir = micro_checkpoint(tmp_path / "model")
    asked = ["--task", "addition", "--difficulty", "1", "--problems", "100"]
    result = CliRunner().invoke(app, ["pass-at-k", str(model_dir), *asked])
    assert result.exit_code == 2, result.output
    refusal = "Invalid value for '--problems': task addition at difficulty 1 yielded only 15 distinct heldout problems"
    assert f"{refusal} of 100 asked" in result.output


@pytest.mark.parametrize("command", [["pass-at-k"], ["traces", "--out", "traces.jsonl"]])
def test_sampling_commands_refuse_samples_whose_token_ids_pass_the_memory_naming_the_option(
    tmp_path, monkeypatch, command
):
    """--samples 10**20 hung, building its requests without end: the rollout's token ids (problems x samples x
    tokens) are counted against the machine's free memory before an engine is built."""
    from seekstack.infer import Engine

    def built(*args, **kwargs):
        raise AssertionError("an engine was built for 10**20 samples")

    monkeypatch.setattr(Engine, "from_pretrained", built)
    model_dir = micro_checkpoint(tmp_path / "model")
    asked = ["--problems", "1", "--samples", str(10**20), "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, [command[0], str(model_dir), *command[1:], *asked], terminal_width=1000)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert f"Invalid value for '--samples': has value {10**20}: 1 prompt x {10**20:,} completions of up to" in said
    assert "of token ids at once, more than this machine's" in said and "free; ask for fewer" in said


@pytest.mark.parametrize("command", [["pass-at-k", "--problems", "1"], ["traces", "--prompts", "1"]])
def test_sampling_commands_hold_prompts_past_192_tokens_and_refuse_those_past_the_context_naming_difficulty(
    tmp_path, command
):
    """pass-at-k and traces kept a fixed prompt room of 192 tokens: addition at 60 digits (196-token prompts) was
    refused in a model of 512 positions; each request now holds its longest prompt and max_new_tokens, and only a
    prompt the model's context cannot hold is refused, naming --difficulty."""
    out = ["--out", str(tmp_path / "traces.jsonl")] if command[0] == "traces" else []
    task = ["--task", "addition", "--difficulty", "60", "--samples", "1", "--max-new-tokens", "8"]
    for context in (512, 160):
        model_dir = micro_checkpoint(tmp_path / f"model_{context}", context)  # 196 prompt tokens at 60 digits
        result = CliRunner().invoke(app, [command[0], str(model_dir), *command[1:], *out, *task])
        if context == 512:  # sampled: a JSON line of scores, or no trace of a random model verified
            sampled = '"pass@1": 0.0' in result.output or "none of 1 traces verified" in result.output
            assert sampled, result.output
        else:
            assert result.exit_code == 2, result.output  # a usage error, as the parser's own refusals
            assert "Invalid value for '--difficulty': has value 60: addition prompts" in result.output
            assert "take up to 196 tokens" in result.output
            assert "160 tokens; lower difficulty, or sample a model of a longer context" in result.output
