"""Addition and subtraction with carries, multiplication of small numbers: generators with digit-by-digit traces
and verifiers that read the answer as math-verify reads a number (answers.read_number: `\\boxed{57}`, `57.0`,
`1,057`). `difficulty` is the number of digits of each operand."""

from __future__ import annotations

import random
from dataclasses import dataclass

from seekstack.posttrain.tasks.answers import reads_as
from seekstack.posttrain.tasks.base import Problem


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


@dataclass
class Addition:
    """a + b, each with `difficulty` digits; the trace adds column by column, carrying."""

    difficulty: int = 2
    name: str = "addition"

    def generate(self, rng: random.Random) -> Problem:
        a, b = _operand(rng, self.difficulty), _operand(rng, self.difficulty)
        steps, carry = [], 0
        for column in range(max(len(str(a)), len(str(b)))):
            x, y = a // 10**column % 10, b // 10**column % 10
            total = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        return Problem(f"{a}+{b}", f"What is {a} + {b}?", str(a + b), ", ".join(steps), {"value": a + b})

    def verify(self, problem: Problem, answer: str) -> bool:
        return reads_as(answer, problem.data["value"])


@dataclass
class Subtraction:
    """a - b with a >= b, each with `difficulty` digits; the trace subtracts column by column, borrowing."""

    difficulty: int = 2
    name: str = "subtraction"

    def generate(self, rng: random.Random) -> Problem:
        a, b = sorted((_operand(rng, self.difficulty), _operand(rng, self.difficulty)), reverse=True)
        steps, borrow = [], 0
        for column in range(len(str(a))):
            x, y = a // 10**column % 10, b // 10**column % 10
            diff = x - y - borrow
            steps.append(f"{x}-{y}" + ("-1" if borrow else "") + f"={diff % 10}" + (" borrow" if diff < 0 else ""))
            borrow = int(diff < 0)
        return Problem(f"{a}-{b}", f"What is {a} - {b}?", str(a - b), ", ".join(steps), {"value": a - b})

    def verify(self, problem: Problem, answer: str) -> bool:
        return reads_as(answer, problem.data["value"])


@dataclass
class Multiplication:
    """a * b with a of `difficulty` digits and b of one digit; the trace multiplies column by column."""

    difficulty: int = 2
    name: str = "multiplication"

    def generate(self, rng: random.Random) -> Problem:
        a, b = _operand(rng, self.difficulty), rng.randint(2, 9)
        steps, carry = [], 0
        for column in range(len(str(a))):
            x = a // 10**column % 10
            product = x * b + carry
            steps.append(f"{x}*{b}" + (f"+{carry}" if carry else "") + f"={product}")
            carry = product // 10
        return Problem(f"{a}*{b}", f"What is {a} * {b}?", str(a * b), ", ".join(steps), {"value": a * b})

    def verify(self, problem: Problem, answer: str) -> bool:
        return reads_as(answer, problem.data["value"])
