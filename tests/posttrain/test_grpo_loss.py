import math

import pytest
import torch

from seekstack.posttrain.config import GRPOConfig
from seekstack.posttrain.evaluate import pass_at_k
from seekstack.posttrain.grpo import STD_EPS, group_advantages, k3_kl, policy_loss, reward_std
from seekstack.posttrain.rl import reward_spread_metrics

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])  # 2 groups of 4


def test_group_advantages_divide_by_each_groups_std():
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 0.75, std 0.5
    expected = [0.5 / (3**-0.5 + STD_EPS)] * 4
    expected = [e if r else -e for e, r in zip(expected, [1, 0, 0, 1], strict=True)]
    expected += [0.25 / (0.5 + STD_EPS)] * 3
    expected.insert(6, -0.75 / (0.5 + STD_EPS))
    assert torch.allclose(group_advantages(REWARDS, 4, "group"), torch.tensor(expected), atol=1e-6)


def test_batch_and_none_scaling():
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
    assert torch.allclose(group_advantages(REWARDS, 4, "none"), centred)
    batch_std = REWARDS.std().item()  # over all 8: mean 0.625
    assert torch.allclose(group_advantages(REWARDS, 4, "batch"), centred / (batch_std + STD_EPS))


def test_identical_rewards_give_zero_advantage():
    assert torch.equal(group_advantages(torch.ones(4), 4, "group"), torch.zeros(4))


def test_reward_std_is_each_groups_or_the_batchs_as_the_advantages_divide_by():
    """rl logs its mean as reward_std (TRL's: the groups' mean std; the batch std it logged instead was 0.46 where
    one group of two had no spread) and the share where it is 0 as frac_reward_zero_std."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    std = reward_std(rewards, 4, "group")
    assert torch.allclose(std, torch.tensor([0.57735] * 4 + [0.0] * 4), atol=1e-5)
    assert torch.equal(reward_std(rewards, 4, "none"), std)  # divides nothing, but says which groups have advantages
    assert torch.equal(reward_std(rewards, 4, "batch"), rewards.std().expand(8))


@pytest.mark.parametrize(
    ("scale_rewards", "logged_std"), [("group", 0.57735 / 2), ("batch", 0.46291), ("none", 0.57735 / 2)]
)
def test_frac_reward_zero_std_is_the_share_of_completions_whose_group_has_no_spread_at_any_scaling(
    scale_rewards, logged_std
):
    """One group all right (no advantage, no gradient) beside one with spread: half the completions at any
    scale_rewards; at batch it logged 0, the batch's std being tested (not 0), though group_advantages centres each
    group."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert torch.equal(group_advantages(rewards, 4, scale_rewards)[4:], torch.zeros(4))
    metrics = reward_spread_metrics(rewards, 4, scale_rewards)
    assert metrics["frac_reward_zero_std"] == 0.5
    assert metrics["reward_std"] == pytest.approx(logged_std, abs=1e-5)


def test_k3_matches_its_formula_and_is_zero_on_equal_policies():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert torch.allclose(k3_kl(logps, ref), torch.tensor(expected))
    assert torch.equal(k3_kl(logps, logps), torch.zeros(2))


# Two completions, three positions; the second is two tokens long.
LOGPS = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.2, -9.0]])
OLD = torch.tensor([[-1.1, -0.9, -2.0], [-0.1, -1.0, -9.0]])
REF = torch.tensor([[-1.0, -0.7, -2.1], [-0.3, -1.0, -9.0]])
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def hand_token_losses(epsilon, epsilon_high, beta):
    """Per-token losses computed one scalar at a time."""
    rows = []
    for i in range(2):
        row = []
        for t in range(3):
            ratio = math.exp(LOGPS[i, t] - OLD[i, t])
            clipped = min(max(ratio, 1 - epsilon), 1 + epsilon_high)
            a = ADV[i].item()
            delta = (REF[i, t] - LOGPS[i, t]).item()
            row.append(-min(ratio * a, clipped * a) + beta * (math.exp(delta) - delta - 1))
        rows.append(row)
    return rows


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_each_loss_type_matches_a_hand_computed_reference(beta):
    eps, eps_high = 0.2, 0.28
    tokens = hand_token_losses(eps, eps_high, beta)
    lengths = [3, 2]
    grpo = (sum(tokens[0][:3]) / 3 + sum(tokens[1][:2]) / 2) / 2
    dr_grpo = (sum(tokens[0][:3]) + sum(tokens[1][:2])) / (2 * 8)  # max_completion_length 8
    dapo = (sum(tokens[0][:3]) + sum(tokens[1][:2])) / sum(lengths)
    for loss_type, expected in (("grpo", grpo), ("dr_grpo", dr_grpo), ("dapo", dapo)):
        result = policy_loss(LOGPS, OLD, ADV, MASK, loss_type, eps, eps_high, beta, REF, max_completion_length=8)
        assert result.loss.item() == pytest.approx(expected, rel=1e-5), loss_type


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_sequence_level_importance_sampling_is_gspos_one_clipped_ratio_per_completion(beta):
    """GSPO (TRL's importance_sampling_level="sequence"): row 0's ratio exp((.1 + .4 + 0) / 3) = 1.18 is clipped at
    1 + 0.1 (A > 0), row 1's exp((-.1 - .2) / 2) = 0.86 is not (A < 0, above 1 - 0.2); the k3 KL stays per token."""
    eps, eps_high = 0.2, 0.1
    lengths = [3, 2]
    ratios = [math.exp(sum((LOGPS[i, t] - OLD[i, t]).item() for t in range(n)) / n) for i, n in enumerate(lengths)]
    tokens = []
    for i, n in enumerate(lengths):
        a, ratio = ADV[i].item(), ratios[i]
        surrogate = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps_high) * a)
        deltas = [(REF[i, t] - LOGPS[i, t]).item() for t in range(n)]
        tokens.append([surrogate + beta * (math.exp(d) - d - 1) for d in deltas])
    expected = (sum(tokens[0]) / 3 + sum(tokens[1]) / 2) / 2
    result = policy_loss(LOGPS, OLD, ADV, MASK, "grpo", eps, eps_high, beta, REF, importance_sampling_level="sequence")
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    token_level = policy_loss(LOGPS, OLD, ADV, MASK, "grpo", eps, eps_high, beta, REF)
    assert abs(token_level.loss.item() - expected) > 1e-3  # the check can fail
    assert result.clip_high_fraction == pytest.approx(3 / 5) and result.clip_low_fraction == 0.0  # row 0's 3 tokens


def test_clip_fraction_counts_tokens_outside_the_trust_region():
    # ratios: row 0 exp(.1), exp(.4)=1.49 (> 1.28, A > 0: clipped), 1; row 1 exp(-.1), exp(-.2)=0.82 (A < 0: fine)
    result = policy_loss(LOGPS, OLD, ADV, MASK, "dapo", 0.2, 0.28)
    assert result.clip_high_fraction == pytest.approx(1 / 5)
    assert result.clip_low_fraction == 0.0
    assert result.clip_fraction == pytest.approx(1 / 5)


def test_a_ratio_outside_the_trust_region_counts_as_clipped_only_where_the_clip_binds():
    """As TRL counts them: above 1 + eps_high with A > 0, below 1 - eps with A < 0. With the advantages flipped, row 0's
    1.49 (A < 0) and row 1's 0.82 (A > 0, under 1 - 0.1) are outside the region but the min takes the unclipped term."""
    result = policy_loss(LOGPS, OLD, -ADV, MASK, "dapo", 0.1, 0.28)
    assert (result.clip_low_fraction, result.clip_high_fraction, result.clip_fraction) == (0.0, 0.0, 0.0)


def test_the_clip_above_one_is_epsilon_high_or_epsilon_when_it_is_unset():
    assert GRPOConfig(epsilon=0.2, epsilon_high=0.28).clip_high == 0.28  # DAPO's clip-higher
    assert GRPOConfig(epsilon=0.2).clip_high == 0.2


def test_on_policy_gradient_is_the_advantage_weighted_score():
    logps = LOGPS.clone().requires_grad_(True)
    policy_loss(logps, logps.detach(), ADV, MASK, "dapo", 0.2, 0.2).loss.backward()
    assert torch.allclose(logps.grad, -ADV[:, None] * MASK / MASK.sum())


def test_beta_without_a_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(LOGPS, OLD, ADV, MASK, "grpo", 0.2, 0.2, beta=0.1)


def test_kl_is_measured_only_against_a_reference():
    """At beta 0 no reference is scored: no KL to log (a logged 0.0 read as a policy that had not moved)."""
    assert policy_loss(LOGPS, OLD, ADV, MASK, "grpo", 0.2, 0.2).kl is None
    moved = policy_loss(LOGPS, OLD, ADV, MASK, "grpo", 0.2, 0.2, beta=0.1, ref_logps=OLD).kl
    assert moved == pytest.approx(float((k3_kl(LOGPS, OLD) * MASK).sum() / MASK.sum()))
    assert moved > 0


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
