"""Specifications of online data mixing: the EXP3 update, its sampler, and a training run that resumes it exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from seekstack.schema import ConfigError
from seekstack.tokens.bandit import Exp3Mixture, exploration_rate
from seekstack.tokens.mixture import MixtureSchedule, MixtureWindows
from seekstack.train.config import load_train_config
from seekstack.train.trainer import train
from tests.tokens.test_mixture import SEQ_LEN, SOURCE_IDS, sources_of, write_constant_split
from tests.train.test_trainer import read_metrics, run_config, write_split

SOURCES = list(SOURCE_IDS)  # easy, medium, hard


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bandit")
    for split, first_id in SOURCE_IDS.items():
        write_constant_split(path, split, first_id)
    return path


# ---------------------------------------------------------------------------------- the EXP3 update
def test_exploration_rate_starts_at_one_over_k_then_decays():
    assert exploration_rate(0, 3) == exploration_rate(3, 3) == pytest.approx(1 / 3)  # sqrt(ln 3 / 9) > 1/3
    assert exploration_rate(4, 3) == pytest.approx(0.302574, abs=1e-6)  # sqrt(ln 3 / 12)
    assert exploration_rate(100, 2) == pytest.approx(0.058871, abs=1e-6)  # sqrt(ln 2 / 200)


def test_exp3_update_matches_a_hand_computation():
    bandit = Exp3Mixture(["x", "y"], reward_scale=0.5)
    assert bandit.weights_at() == {"x": 0.5, "y": 0.5}  # t = 1: eps_1 = 1/2, all exploration
    bandit.update(["x"], [2.0])
    assert bandit.rewards == {"x": 2.0, "y": 0.0}  # 0 + 0.5 * 2.0 / 0.5
    # t = 2: eps_2 = sqrt(ln 2 / 4) = 0.416277, eps_1 = 0.5; softmax(0.5 * [2, 0]) = [0.731059, 0.268941]
    # pi = (1 - 2 * 0.416277) * softmax + 0.416277
    assert bandit.weights_at() == pytest.approx({"x": 0.538690, "y": 0.461310}, abs=1e-6)
    bandit.update(["y", "y"], [1.0, 3.0])  # two micro-batches from y: their losses add up to y's reward
    assert bandit.rewards == pytest.approx({"x": 2.0, "y": 4.335477}, abs=1e-6)  # 0 + 0.5 * 4.0 / 0.461310
    # t = 3: eps_3 = sqrt(ln 2 / 6) = 0.339889; softmax(0.416277 * [2, 4.335477]) = [0.274441, 0.725559]
    assert bandit.weights_at()["x"] == pytest.approx(0.427771, abs=1e-6)  # 0.320222 * 0.274441 + 0.339889
    bandit.update(["x"], [1.0])
    assert bandit.rewards["x"] == pytest.approx(3.168850, abs=1e-6)  # cumulative: 2.0 + 0.5 * 1.0 / 0.427771
    assert bandit.updates == 3


def test_exp3_moves_weight_to_the_source_with_the_higher_loss_and_keeps_exploring():
    bandit = Exp3Mixture(SOURCES)
    loss = {"easy": 3.0, "medium": 5.0, "hard": 6.0}
    rng = np.random.default_rng(0)
    for _ in range(300):
        weights = bandit.weights_at()
        arm = SOURCES[rng.choice(3, p=list(weights.values()))]
        bandit.update([arm], [loss[arm]])
    weights = bandit.weights_at()
    assert weights["hard"] > weights["medium"] > weights["easy"] >= exploration_rate(301, 3)
    assert weights["hard"] > 0.5 and sum(weights.values()) == pytest.approx(1.0)


def test_a_reward_past_floats_range_is_refused_naming_the_reward_scale_and_leaves_the_rewards_as_they_were():
    bandit = Exp3Mixture(SOURCES, reward_scale=1e307)  # finite, as the config takes it, but x 7 x 3 is not
    with pytest.raises(ValueError, match=r"reward of source 'easy' overflowed to inf .*smaller bandit_reward_scale"):
        bandit.update(["hard", "easy"], [1.0, 7.0])
    assert bandit.state_dict() == {"rewards": dict.fromkeys(SOURCES, 0.0), "updates": 0}
    assert bandit.weights_at() == pytest.approx(dict.fromkeys(SOURCES, 1 / 3))  # not NaN


def test_bandit_mode_needs_equal_weights_and_two_sources():
    with pytest.raises(ValueError, match="give every source the same single weight"):
        Exp3Mixture.over(MixtureSchedule({"easy": [0.7, 0.3], "hard": [0.3, 0.7]}))
    with pytest.raises(ValueError, match="at least two sources"):
        Exp3Mixture.over(MixtureSchedule({"train": 1.0}))
    with pytest.raises(ConfigError, match=r"field 'mixture': mixture_mode=bandit learns the weights"):
        load_train_config(None, ["mixture_mode=bandit", "mixture={train_easy: 1, train_hard: 2}"])
    with pytest.raises(ConfigError, match="bandit_reward_scale"):
        load_train_config(None, ["bandit_reward_scale=0"])


# ---------------------------------------------------------------------------------- the sampler
def test_bandit_sampler_draws_each_micro_batch_from_one_source_fixed_by_the_seed(data_dir):
    def arms(seed: int) -> list[str]:
        mixture = MixtureWindows(data_dir, Exp3Mixture(SOURCES), SEQ_LEN, seed=seed)
        drawn = []
        for _ in range(12):
            batch_sources = sources_of(mixture.batch(4, progress=0.0))
            assert len(set(batch_sources)) == 1  # a micro-batch is one arm's
            drawn.append(batch_sources[0])
            mixture.observe([{"easy": 1.0, "medium": 2.0, "hard": 3.0}[drawn[-1]]])
        return drawn

    assert arms(0) == arms(0)
    assert arms(0) != arms(1)
    assert set(arms(0)) == set(SOURCES)


def test_bandit_sampler_resumes_exactly_from_its_state(data_dir):
    def step(mixture: MixtureWindows) -> np.ndarray:
        batch = mixture.batch(4, progress=0.0)
        mixture.observe([float(batch[0, 0]) / 100])  # a loss that depends on the source
        return batch.numpy()

    whole = MixtureWindows(data_dir, Exp3Mixture(SOURCES), SEQ_LEN, seed=5)
    for _ in range(6):
        step(whole)
    state = json.loads(json.dumps(whole.state_dict()))  # it must survive serialisation
    expected = [step(whole) for _ in range(6)]
    resumed = MixtureWindows(data_dir, Exp3Mixture(SOURCES), SEQ_LEN, seed=0)
    resumed.load_state_dict(state)
    assert all(np.array_equal(step(resumed), batch) for batch in expected)
    assert resumed.schedule.state_dict() == whole.schedule.state_dict()
    schedule_state = {key: value for key, value in state.items() if key != "bandit"}
    with pytest.raises(ValueError, match="no bandit state"):
        MixtureWindows(data_dir, Exp3Mixture(SOURCES), SEQ_LEN).load_state_dict(schedule_state)


# ---------------------------------------------------------------------------------- in training
BUCKETS = {"train_easy": 1.0, "train_medium": 1.0, "train_hard": 1.0}


@pytest.fixture(scope="module")
def bucket_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bandit_buckets")
    for seed, split in enumerate([*BUCKETS, "val"], start=3):
        write_split(path, split, 8_000, seed=seed)
    return path


def test_training_with_the_bandit_resumes_with_the_same_sources_and_losses(bucket_dir, tmp_path, monkeypatch):
    drawn: list[list[str]] = []  # the sources of each step's micro-batches, in order, over both runs
    observe = MixtureWindows.observe

    def recording_observe(self: MixtureWindows, losses: list[float]) -> None:
        drawn.append(list(self.step_arms))
        observe(self, losses)

    monkeypatch.setattr(MixtureWindows, "observe", recording_observe)
    settings = dict(max_steps=6, save_every=3, mixture=BUCKETS, mixture_mode="bandit", bandit_reward_scale=0.5)
    whole = train(run_config(bucket_dir, tmp_path / "whole", **settings))
    whole_drawn, drawn[:] = list(drawn), []
    resumed = train(
        run_config(bucket_dir, tmp_path / "resumed", **settings), resume=tmp_path / "whole/checkpoints/step_3"
    )
    assert drawn == whole_drawn[3:]  # the same source for every micro-batch after the resume
    assert resumed.losses == whole.losses[3:]  # bit-for-bit
    assert len({arm for arms in whole_drawn for arm in arms}) > 1
    mixes = [m["mix"] for m in read_metrics(tmp_path / "whole") if "loss" in m]
    assert mixes[0] == pytest.approx(dict.fromkeys(BUCKETS, 1 / 3))  # uniform until eps_t falls below 1/K
    assert mixes[-1] != pytest.approx(mixes[0])  # then the bandit moves the weights
    assert [m["mix"] for m in read_metrics(tmp_path / "resumed") if "loss" in m] == mixes[3:]


def test_a_run_resumed_as_a_bandit_from_a_scheduled_one_names_its_checkpoint_and_how_to_go_on(bucket_dir, tmp_path):
    train(run_config(bucket_dir, tmp_path, max_steps=2, save_every=2, mixture=BUCKETS))
    checkpoint = tmp_path / "checkpoints" / "step_2"
    with pytest.raises(ValueError) as refused:
        train(run_config(bucket_dir, tmp_path, max_steps=4, mixture=BUCKETS, mixture_mode="bandit"), resume=True)
    assert str(refused.value) == (
        f"{checkpoint / 'train_state.pt'}: the saved data state has no bandit state: it was saved by a run with a "
        f"fixed schedule; resume with the run's mixture and mixture_mode, or start a new run from its weights with "
        f"init_from={checkpoint}"
    )
