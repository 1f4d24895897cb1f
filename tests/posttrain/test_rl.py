import json
from pathlib import Path

import pytest
import torch

from seekstack.checkpoint import load_pretrained
from seekstack.infer import SamplingParams
from seekstack.posttrain.config import GRPOConfig, SFTConfig
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rl import GRPOSource, run_rl
from seekstack.posttrain.rollout import completion_logps, sample_groups
from seekstack.posttrain.sft import run_sft
from seekstack.posttrain.tasks import make_task, sample_problems
from seekstack.train.config import resolve_train_config
from tests.posttrain.support import micro_checkpoint

RUN = ["batch_size=2", "num_generations=4", "max_completion_length=12", "temperature=1.0"]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """The micro model after a short SFT on addition traces: its samples are sometimes well formed, so rewards
    vary within groups and GRPO has gradients."""
    root = tmp_path_factory.mktemp("sft")
    torch.set_num_threads(1)
    start = micro_checkpoint(root / "start")
    config = [f"init_from={start}", f"out_dir={root / 'run'}", "task=addition", "difficulty=1", "examples=64"]
    config += ["max_steps=40", "batch_size=8", "lr=1e-2", "warmup_steps=0", "seq_len=128"]
    return run_sft(resolve_train_config(None, config, cls=SFTConfig)).checkpoint


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


def test_rollout_logps_match_the_engines_sampling_distribution(tmp_path):
    model_dir = micro_checkpoint(tmp_path / "model")
    source = GRPOSource(resolve_train_config(None, [f"init_from={model_dir}", *RUN], cls=GRPOConfig))
    model = load_pretrained(model_dir, dtype=torch.float32)
    source.attach(model)
    task = make_task("addition")
    rollout = sample_groups(source.engine, task, sample_problems(task, 2, "train", 0), 4, 12, 1.0, 0, RewardWeights())
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=0, logprobs=True)
    first_prompt = rollout.input_ids[0, : rollout.prompt_lengths[0]].tolist()
    engine_out = source.engine.generate([first_prompt], params)[0]
    assert (
        engine_out.token_ids == rollout.input_ids[0, rollout.prompt_lengths[0] :][: len(engine_out.token_ids)].tolist()
    )
    with torch.no_grad():
        logps, _, _ = completion_logps(model, rollout, 1.0, torch.device("cpu"))
    engine_logps = torch.tensor([entry.logprob for entry in engine_out.logprobs])
    assert torch.allclose(logps[0, : len(engine_logps)], engine_logps, atol=1e-4)


def test_rl_run_logs_every_term_and_resumes_exactly(tmp_path, sft_model):
    common = [f"init_from={sft_model}", *RUN, "num_iterations=2", "beta=0.1", "lr=1e-3", "max_steps=4"]
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
    for name in ("reward", "reward_std", "reward_correctness", "reward_format_std", "accuracy", "kl", "entropy"):
        assert all(name in line for line in lines), name
    assert all("clip_fraction" in line and "generate_share" in line for line in lines)
    assert lines[0]["generate_share"] > 0 and lines[1]["generate_share"] == 0  # num_iterations=2: one rollout, 2 steps
    assert any(0 < line["reward_format"] < 1 for line in lines)
    assert lines[1]["kl"] > 0 and lines[1]["loss"] != 0  # the first update moved the policy off the reference
    weights_a = load_pretrained(tmp_path / "a" / "checkpoints" / "step_4").state_dict()
    weights_b = load_pretrained(tmp_path / "b" / "checkpoints" / "step_4").state_dict()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
