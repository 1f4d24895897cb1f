"""A task of your own problems, read from a JSON Lines file of `{"question": "...", "answer": ...}`, one a line (or
`problem` and `solution`, the MATH dataset's and TRL's names): as TRL's GRPO trains on a dataset's prompts with
accuracy_reward against its solution column. The answer after
</think> verifies when it reads (answers.reads_as) as the number the line's answer reads as, or is; a percentage
("5%") as its hundredth, and its number where that is whole, as math-verify reads one. An answer that is a tuple,
an interval or a set of numbers ("(1, 2)", "[0, 1)", "\\{1, 2\\}") verifies against the same brackets and numbers
(answers.read_items; a set's in any order).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from seekstack.jsonl import jsonl_records
from seekstack.posttrain.tasks.answers import (
    GSM8K_MARKER,
    Items,
    Reading,
    final_answer,
    read_answer,
    read_items,
    reads_as,
)
from seekstack.posttrain.tasks.base import Problem, refuse_forged_turn_in_problem
from seekstack.tokenizer import template_message

LINE_FORMAT = (
    'a line is {"question": "...", "answer": ...} (or "problem" and "solution", MATH\'s and TRL\'s names), the '
    'answer a number or a string of one ("\\\\frac{1}{2}", a solution\'s \\\\boxed{...}), or of a tuple, an interval '
    'or a set of numbers ("(1, 2)"); the question may be TRL GRPO\'s "prompt", its text or its one user message'
)
# The fields a line's question and gold answer are read from, the first a line has: ours (GSM8K's), then the MATH
# dataset's and NuminaMath's, whose `solution` TRL's accuracy_reward verifies against (its final \boxed{...}), then
# TRL's GRPO `prompt` (its text, or its conversational form's one user message)
QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution")
# GSM8K's calculator annotations ("48/2 = <<48/2=24>>24"), which its authors' calculator ran at sampling time; the
# engine runs none, so they are dropped from a trace, as GSM8K's README says to train without one
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>\n]*>>")


def is_problems_file(name: str) -> bool:
    """Whether the task `name` is a file of problems: a JSON Lines file (.jsonl, compressed maybe)."""
    return ".jsonl" in Path(name).suffixes


@dataclass
class ProblemsFile:
    """The problems of a file, drawn at random; each question's split is its hash's (base.split_of), as a
    generated problem's."""

    name: str  # the file's path, as task= names it
    problems: list[Problem]
    lines: dict[str, int]  # each problem's key: the line it is first asked on
    difficulty: int = 1  # no knob: the file's problems are what they are

    @classmethod
    def read(cls, path: str) -> ProblemsFile:
        """The problems of `path`; a ValueError naming the file, the line and the field at fault."""
        if not Path(path).is_file():
            why = "a folder, not a file" if Path(path).is_dir() else "no such file"
            raise ValueError(f"task {path!r}: {why} of problems ({LINE_FORMAT})")
        problems: dict[str, tuple[int, Problem]] = {}
        for number, record in jsonl_records(path):
            where = f"{path}:{number}"
            problem = _problem(record, where)
            first = problems.setdefault(problem.key, (number, problem))
            if first[1].data != problem.data:
                field = _field(record, QUESTION_FIELDS)
                raise ValueError(f"{where}: field {field}: line {first[0]}'s question, with another answer")
        if not problems:
            raise ValueError(f"{path}: no problems; {LINE_FORMAT}")
        return cls(path, [problem for _, problem in problems.values()], {key: n for key, (n, _) in problems.items()})

    def where(self, problem: Problem) -> str:
        """The file and line `problem` is asked on, as `path:line`."""
        return f"{self.name}:{self.lines[problem.key]}"

    def generate(self, rng: random.Random) -> Problem:
        return rng.choice(self.problems)

    def verify(self, problem: Problem, answer: str) -> bool:
        if "brackets" in problem.data:
            return read_items(answer) == Items(problem.data["brackets"], tuple(map(Fraction, problem.data["values"])))
        return reads_as(answer, Fraction(problem.data["value"]), problem.data["percent"])


def _problem(record: Any, where: str) -> Problem:
    """The problem of one line, or a ValueError naming `where` and the field at fault."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: {_shown(record)} is no object; {LINE_FORMAT}")
    question_field, answer_field = _field(record, QUESTION_FIELDS), _field(record, ANSWER_FIELDS)
    for names, field in ((QUESTION_FIELDS, question_field), (ANSWER_FIELDS, answer_field)):
        if field is None:
            raise ValueError(f"{where}: no field {' nor '.join(names)}; {LINE_FORMAT}")
    question, answer = record[question_field], record[answer_field]
    if question_field == "prompt" and isinstance(question, list):
        question = _user_question(question, where)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field {question_field} is {_shown(question)}: must be the question's text")
    for field, text in ((question_field, question), (answer_field, answer)):
        refuse_forged_turn_in_problem(text, f"{where}: field {field}")
    gold = _gold(answer)
    if gold is None:
        raise ValueError(
            f"{where}: field {answer_field} is {_shown(answer)}: not one number (as answers.read_number reads one: 42, "
            '0.5, "1,042", "\\\\frac{1}{2}") nor a tuple, an interval or a set of them ("(1, 2)", "[0, 1)", '
            '"\\\\{1, 2\\\\}"); symbolic answers ("\\\\sqrt{2}", "\\\\pi", "x^2 + 1"), which math-verify compares with '
            "sympy, are not compared here: a task whose answers are such is a class of your own (module:Class)"
        )
    if isinstance(answer, str) and (answer_field == "solution" or GSM8K_MARKER in answer):
        # worked out: its reasoning (a MATH solution whole, a GSM8K answer up to its "#### 72", less its calculator
        # annotations), then its final answer
        before_marker, marker, _ = answer.rpartition(GSM8K_MARKER)
        reasoning = CALCULATOR_ANNOTATION.sub("", before_marker) if marker else answer
        return Problem(question, question, final_answer(answer), reasoning.strip(), _data(gold))
    return Problem(question, question, str(answer), "", _data(gold))


def _user_question(messages: list, where: str) -> Any:
    """The question of TRL's conversational prompt: the content of its one message, the user's, read as a chat's (a
    list of text parts is its text); a ValueError naming `where` for a prompt of other messages (a system prompt: rl
    asks in the R1 format's own) or content a chat's message cannot hold."""
    if len(messages) == 1 and isinstance(messages[0], dict) and messages[0].get("role") == "user":
        try:
            return template_message(1, messages[0])["content"]
        except ValueError as error:
            raise ValueError(f"{where}: field prompt: {error}") from None
    raise ValueError(
        f"{where}: field prompt is {_shown(messages)}: a conversational prompt is read as its one user message, "
        "the question, which rl asks after the R1 format's system prompt; give that message alone, or its text as "
        '"question"'
    )


def _field(record: dict[str, Any], names: tuple[str, ...]) -> str | None:
    """The first of `names` that `record` has, None when it has none."""
    return next((name for name in names if name in record), None)


def _data(gold: Reading | Items) -> dict[str, Any]:
    """A gold answer as its problem's data holds it: JSON's, as eval's documents hold it."""
    if isinstance(gold, Items):
        return {"brackets": gold.brackets, "values": [str(value) for value in gold.values]}
    return {"value": str(gold.value), "percent": gold.percent}


def _gold(answer: Any) -> Reading | Items | None:
    """The number a line's answer is: a JSON number (a float as written: 0.1 is 1/10), or a string read as an answer
    is read ("5%" a percentage; "(1, 2)" a tuple); None for any other value (true, null, a list, NaN)."""
    if isinstance(answer, str):
        return read_answer(answer) or read_items(answer)
    if isinstance(answer, int) and not isinstance(answer, bool):
        return Reading(Fraction(answer), percent=False)
    if isinstance(answer, float) and math.isfinite(answer):
        return Reading(Fraction(repr(answer)), percent=False)
    return None


def _shown(value: Any) -> str:
    """`value` as the line wrote it, cut to 60 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
