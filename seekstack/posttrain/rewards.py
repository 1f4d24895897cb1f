"""The R1 format and the rule-based rewards of GRPO (DeepSeek-R1 §2.2.2): correctness from the task's verifier,
format from the shape of the completion. Each term is a number in [0, 1]; the reward is their weighted sum.

Format: `<think> reasoning </think> answer` — one think block at the start, then a non-empty answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from seekstack.posttrain.tasks import Problem, Task, raised_at
from seekstack.tokenizer import THINK_CLOSE, THINK_OPEN

R1_SYSTEM_PROMPT = "Think step by step inside <think> </think>, then give only the final answer after </think>."
R1_COMPLETION = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<answer>.*)", re.DOTALL)
REWARD_TERMS = ("correctness", "format")


def r1_completion(thinking: str, answer: str) -> str:
    """An assistant message in the R1 format."""
    return f"{THINK_OPEN} {thinking} {THINK_CLOSE} {answer}"


def extract_answer(completion: str) -> str | None:
    """The answer after a well-formed think block, or None: no block at the start, a second block, or no answer."""
    match = R1_COMPLETION.fullmatch(completion)
    if match is None:
        return None
    answer = match["answer"].strip()
    if not answer or THINK_OPEN in match["think"] or THINK_OPEN in answer or THINK_CLOSE in answer:
        return None
    return answer


@dataclass(frozen=True)
class RewardWeights:
    """How the terms add up to the reward GRPO normalises."""

    correctness: float = 1.0
    format: float = 0.1


def reward_terms(task: Task, problem: Problem, completion: str, ended: bool) -> dict[str, float]:
    """Each reward term of one completion: correctness 1 when the extracted answer verifies, format 1 when the
    completion has the R1 shape. A completion cut at its token limit (not `ended` by the model's EOS) gave no final
    answer, its last one perhaps the start of a longer one ("1" of "12"): both terms 0."""
    answer = extract_answer(completion) if ended else None
    return {
        "correctness": float(answer is not None and verified(task, problem, answer)),
        "format": float(answer is not None),
    }


def verified(task: Task, problem: Problem, answer: str) -> bool:
    """The task's verdict on `answer`; a ValueError naming the task, the problem and the answer when `verify` raises
    (with the error and the line that raised it) or returns other than True or False (a NaN or a partial score would
    become the reward, and a NaN the loss)."""
    call = f"task {task.name!r}: verify(problem {problem.key!r}, answer {answer!r})"
    try:
        verdict = task.verify(problem, answer)
    except Exception as error:
        raise ValueError(
            f"{call} raised {type(error).__name__} {raised_at(error)}: {error}; a verifier returns False for an answer "
            "it cannot read"
        ) from error
    if verdict not in (True, False):
        raise ValueError(
            f"{call} returned {verdict!r}; a verifier returns True or False (Task.verify in "
            "seekstack/posttrain/tasks/base.py)"
        )
    return bool(verdict)


def total_reward(terms: dict[str, float], weights: RewardWeights) -> float:
    """The weighted sum of the terms."""
    return sum(getattr(weights, name) * value for name, value in terms.items())
