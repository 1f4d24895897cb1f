"""Held-out accuracy of a model on a verifiable task: pass@1 and pass@k from n samples per problem (the unbiased
estimator of Chen et al. 2021, eq. 1), plus greedy accuracy and the share of well-formed completions."""

from __future__ import annotations

from math import comb

from seekstack.infer import Engine
from seekstack.posttrain.rewards import RewardWeights
from seekstack.posttrain.rollout import sample_groups
from seekstack.posttrain.tasks import Problem, Task, sample_problems


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """P(at least one of k samples drawn from `samples` is correct), given `correct` of them are."""
    if samples - correct < k:
        return 1.0
    return 1.0 - comb(samples - correct, k) / comb(samples, k)


def heldout_problems(task: Task, problems: int, seed: int) -> list[Problem]:
    """The distinct held-out problems `evaluate_task` scores."""
    return sample_problems(task, problems, "heldout", seed, distinct=True)


def evaluate_task(
    engine: Engine,
    task: Task,
    problems: int = 100,
    samples: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """pass@1, pass@{samples}, greedy accuracy and format rate on `problems` held-out problems of `task`."""
    heldout = heldout_problems(task, problems, seed)
    weights = RewardWeights()
    sampled = sample_groups(engine, task, heldout, samples, max_new_tokens, temperature, seed, weights)
    correct = sampled.terms["correctness"].view(problems, samples).sum(dim=1).tolist()
    greedy = sample_groups(engine, task, heldout, 1, max_new_tokens, 0.0, seed, weights)
    return {
        "pass@1": sum(pass_at_k(samples, int(c), 1) for c in correct) / problems,
        f"pass@{samples}": sum(pass_at_k(samples, int(c), samples) for c in correct) / problems,
        "greedy": float(greedy.terms["correctness"].double().mean()),
        "format": float(sampled.terms["format"].double().mean()),
        "completion_length": float(sampled.completion_lengths.double().mean()),
    }
