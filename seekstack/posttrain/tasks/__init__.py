"""Verifiable tasks, the embedded default data of post-training: seeded generators and exact verifiers.

Adding a task: write a class with `name`, `difficulty`, `generate(rng) -> Problem` and
`verify(problem, answer) -> bool` (see base.Task), and add it to TASKS.
"""

from __future__ import annotations

from seekstack.posttrain.tasks.arithmetic import Addition, Multiplication, Subtraction
from seekstack.posttrain.tasks.base import Problem, Split, Task, sample_problems, split_of
from seekstack.posttrain.tasks.countdown import Countdown

TASKS = {"addition": Addition, "subtraction": Subtraction, "multiplication": Multiplication, "countdown": Countdown}

__all__ = ["TASKS", "Problem", "Split", "Task", "make_task", "sample_problems", "split_of"]


def make_task(name: str, difficulty: int | None = None) -> Task:
    """The task called `name` at `difficulty` (its default when None)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks are {', '.join(TASKS)}")
    if difficulty is not None and difficulty < 1:
        raise ValueError(f"difficulty {difficulty}: must be at least 1 (digits or numbers of task {name!r})")
    return TASKS[name]() if difficulty is None else TASKS[name](difficulty=difficulty)
