"""Countdown: reach a target from `difficulty` numbers with + - * / and parentheses, each number used exactly once.

The verifier reads the final answer as the arithmetic tasks do (answers.final_answer: the last `\\boxed{...}`, else
inside `<answer>` tags or `$...$` maybe, as TRL's Countdown rewards read `<answer>` tags), parses the expression with
`ast` (only plain decimal numbers, the four operators, parentheses and spaces are accepted; nothing is executed; the
operators as LaTeX and Unicode write them, `\\times`, `\\cdot`, `\\div`, `×`, `÷`, `−`, are read as `*`, `/`, `-`;
LaTeX's sizing of parentheses, `\\left(`, `\\bigr)`, and its spaces, `\\,`, are dropped),
checks that the numbers used are exactly the given ones, and evaluates it in exact fractions (a division by zero is
a wrong answer).
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from seekstack.posttrain.tasks.answers import LATEX_SPACE, STYLE, final_answer
from seekstack.posttrain.tasks.base import Problem

OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
MAX_ANSWER_CHARS = 200
# What an answer may be written with: ASCII digits, + - * /, parentheses and spaces. Checked before `ast` reads it,
# which would also take 0x5, 0b101, 1_0, other digit scripts and a trailing # comment as Python does.
EXPRESSION_CHARACTERS = re.compile(r"[0-9+\-*/() ]+")
# The operators as models write them in a box ("\boxed{(3+4) \times 5}", "12 \div 4", "3 × 4", "7 − 2"): each read as
# the ASCII operator it is, before the check above; a command runs on to no letter ("\timesx" is no operator)
LATEX_OPERATORS = re.compile(r"\\(?:times|cdot|div)(?![A-Za-z])|[\u00d7\u00f7\u2212]")
ASCII_OPERATORS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\u00d7": "*", "\u00f7": "/", "\u2212": "-"}
# LaTeX's sizing of parentheses ("\boxed{\left(3+4\right) \times 5}", \bigl( ...) and its spaces ("\,"), nothing to
# the value (answers.STYLE and LATEX_SPACE, which the arithmetic tasks' answers drop too): dropped before the check
LAYOUT = re.compile(f"{STYLE.pattern}|{LATEX_SPACE}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """(value, numbers used) of an arithmetic expression, or None when it is not one or divides by zero."""
    text = text.strip()
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = LATEX_OPERATORS.sub(lambda operator: ASCII_OPERATORS[operator.group()], LAYOUT.sub(" ", text)).strip()
    if not EXPRESSION_CHARACTERS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    numbers: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ZeroDivisionError
            return left / right
        raise ValueError(f"not allowed in a Countdown answer: {type(node).__name__}")

    try:
        return value(tree.body), numbers
    except (ValueError, ZeroDivisionError):
        return None


@dataclass
class Countdown:
    """Numbers 1..`max_number` (`difficulty` of them) and a target an expression over all of them reaches."""

    difficulty: int = 3
    max_number: int = 20
    name: str = "countdown"

    def generate(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.difficulty)]
            order = rng.sample(numbers, len(numbers))
            expression, value, steps = str(order[0]), Fraction(order[0]), []
            for number in order[1:]:
                symbol = rng.choice("+-*")
                new_value = {"+": value + number, "-": value - number, "*": value * number}[symbol]
                steps.append(f"{value}{symbol}{number}={new_value}")
                wrapped = f"({expression})" if symbol == "*" and not expression.isdigit() else expression
                expression, value = f"{wrapped}{symbol}{number}", new_value
            if value > 0:
                break
        target = int(value)
        given = " ".join(str(n) for n in numbers)
        return Problem(
            key=f"{sorted(numbers)}->{target}",
            question=f"Using the numbers {given} once each, with + - * / and parentheses, make {target}.",
            answer=expression,
            trace=", ".join(steps),
            data={"numbers": numbers, "target": target},
        )

    def verify(self, problem: Problem, answer: str) -> bool:
        expression = final_answer(answer)
        result = evaluate_expression(expression) if expression is not None else None
        if result is None:
            return False
        value, used = result
        return value == problem.data["target"] and Counter(used) == Counter(problem.data["numbers"])
