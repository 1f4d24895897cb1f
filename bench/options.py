"""Command-line option types the benchmarks share."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type for how many (steps, reps, rounds, tokens, ...): a whole number of at least 1, so that a 0
    is refused by name before any work instead of failing on an empty median after it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value
