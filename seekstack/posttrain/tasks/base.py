"""What a verifiable task is: a seeded generator of problems and an exact verifier of answers.

A task draws `Problem`s from a `random.Random`; `verify(problem, answer)` says whether an answer string is right.
Train and held-out problems never overlap: a problem belongs to one split by the hash of its `key`
(`split_of`), and `sample_problems` keeps drawing until it has enough of the asked split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Literal, Protocol

from seekstack.schema import counted
from seekstack.tokenizer import SPECIAL_TOKENS, TOOL_TOKENS, refuse_forged_turn

Split = Literal["train", "heldout"]
CHAT_FORMAT_TOKENS = (*SPECIAL_TOKENS, *TOOL_TOKENS)  # encoded as those tokens in a problem's chat: none in its texts
HELDOUT_PERCENT = 10  # share of the problem space (by key hash) reserved for held-out evaluation


@dataclass(frozen=True)
class Problem:
    """One task instance: the question a user asks, the reference answer, a worked trace for SFT."""

    key: str  # canonical identity of the problem (decides its split)
    question: str
    answer: str
    trace: str  # the reasoning that goes inside <think> ... </think> in SFT data
    data: dict = field(default_factory=dict, compare=False)  # what the verifier needs (numbers, target)


class Task(Protocol):
    """A generator plus a verifier; `difficulty` is the task's knob (digits, or how many numbers)."""

    name: str
    difficulty: int

    def generate(self, rng: random.Random) -> Problem:
        """Draw one problem."""
        ...

    def verify(self, problem: Problem, answer: str) -> bool:
        """Whether `answer` (the text after </think>) solves `problem` exactly."""
        ...


class TooFewProblems(ValueError):
    """A task's split gave fewer distinct problems than were asked (`sample_problems`)."""


def split_of(key: str) -> Split:
    """The split a problem belongs to, fixed by its key alone: ~HELDOUT_PERCENT % of all problems are held out."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def sample_problems(
    task: Task,
    count: int,
    split: Split,
    seed: int,
    max_draws_without_one: int = 10_000,
    distinct: bool = False,
    up_to: bool = False,
) -> list[Problem]:
    """`count` problems of `split`, drawn by a generator seeded with (task, difficulty, split, seed); `distinct`:
    no problem twice (an evaluation counts each once), else problems may repeat (training draws). A split that
    yields no new problem in `max_draws_without_one` draws in a row (~0.1 s) has no more to give: then fewer than
    `count` is a TooFewProblems, or with `up_to` all it yielded."""
    rng = random.Random(f"{task.name}/{task.difficulty}/{split}/{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    draws_without_one = 0
    while len(problems) < count and draws_without_one < max_draws_without_one:
        problem = task.generate(rng)
        if not isinstance(problem, Problem):  # your own task's: read as one, it would fail far from here
            raise ValueError(
                f"task {task.name!r}: generate(rng) returned {type(problem).__name__} {str(problem)[:80]!r}, not a "
                "Problem(key, question, answer, trace) of seekstack/posttrain/tasks/base.py"
            )
        for field_name in ("question", "answer", "trace"):  # your own task's: a file's are checked as it is read
            refuse_forged_turn_in_problem(
                getattr(problem, field_name),
                f"task {task.name!r}: generate(rng) made problem {problem.key!r}, whose {field_name}",
            )
        draws_without_one += 1
        if split_of(problem.key) == split and not (distinct and problem.key in seen):
            problems.append(problem)
            seen.add(problem.key)
            draws_without_one = 0
    if len(problems) == count or up_to:
        return problems
    raise TooFewProblems(_too_few(task, len(problems), count, split, "distinct " if distinct else ""))


def refuse_forged_turn_in_problem(text: object, named: str) -> None:
    """`refuse_forged_turn` of a problem's question, answer or trace (`text`, `named`: the prompt's user turn, SFT's
    assistant turn) against the chat format's special and tool tokens, checked before any tokenizer is at hand."""
    refuse_forged_turn(str(text), named, CHAT_FORMAT_TOKENS)


def _too_few(task: Task, found: int, count: int, split: str, kind: str) -> str:
    """Why `task` gave `found` problems of `split` where `count` were asked, and what gives more: a file of problems
    has no difficulty to raise."""
    from seekstack.posttrain.tasks.problems_file import ProblemsFile

    problems = counted(found, f"{kind}{split} problem")
    if isinstance(task, ProblemsFile):
        return (
            f"task {task.name} holds only {problems} of {count} asked (each question's split is its hash's); add "
            "questions to the file or ask for fewer"
        )
    return (
        f"task {task.name} at difficulty {task.difficulty} yielded only {problems} of {count} asked: its problem "
        "space is too small; raise the difficulty or ask for fewer"
    )
