"""Document-level quality rules in the style of the Gopher, C4 and FineWeb filters, and their thresholds.

Each rule is named and reads its thresholds from `CleaningConfig`. The defaults are chosen so that both prose
and source code pass (a typical standard-library module does) while data tables, blobs and minified files do not.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from seekstack.schema import Fraction, NonNegative, NonNegativeFloat, Positive, PositiveFloat


@dataclass
class CleaningConfig:
    """Thresholds of every cleaning rule, plus the dedup and split settings of `data build`."""

    min_chars: NonNegative = 200  # drop stubs and empty modules
    max_chars: Positive = 1_000_000
    min_words: NonNegative = 30
    max_words: Positive = 200_000
    max_symbol_word_ratio: NonNegativeFloat = (
        0.5  # Gopher: ('#' + '...') per word; 0.1 for prose, code comments need more
    )
    max_digit_fraction: Fraction = 0.2  # digits / characters; tables of numbers exceed it
    max_duplicate_line_fraction: Fraction = 0.5  # Gopher 0.3 for prose; code repeats `else:`, `return None`, ...
    max_duplicate_line_char_fraction: Fraction = 0.4  # Gopher 0.2; characters in non-blank lines seen before
    max_top_2gram_char_fraction: Fraction = 0.25  # Gopher 0.20/0.18/0.16: characters in the most frequent word n-gram
    max_top_3gram_char_fraction: Fraction = 0.22
    max_top_4gram_char_fraction: Fraction = 0.2
    max_mean_line_chars: PositiveFloat = 100.0  # minified code and blobs have long lines
    long_line_chars: Positive = 200
    max_long_line_fraction: Fraction = 0.05
    min_alpha_word_fraction: Fraction = 0.5  # Gopher 0.8 for prose; code has many `=`, `(`, `0` tokens
    near_duplicate_threshold: Fraction = 0.8  # MinHash Jaccard estimate above which a document is a near duplicate
    minhash_permutations: Positive = 128
    val_fraction: Fraction = 0.01  # share of documents in the validation split


def normalise(text: str) -> str:
    """Unicode NFC with `\\n` line endings, the form every later stage (rules, hashes, output) sees."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


class TextStats:
    """Lazily computed statistics of one document that the rules share."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.split()
        self.lines = text.split("\n")

    @cached_property
    def nonblank_lines(self) -> list[str]:
        return [line for line in self.lines if line.strip()]

    @cached_property
    def word_chars(self) -> int:
        return sum(len(word) for word in self.words)

    @cached_property
    def duplicate_lines(self) -> tuple[float, float]:
        """Fractions of non-blank lines, and of their characters, that repeat an earlier line (Gopher)."""
        lines = self.nonblank_lines
        if not lines:
            return 0.0, 0.0
        seen: set[str] = set()
        repeated_lines = repeated_chars = 0
        for line in lines:
            if line in seen:
                repeated_lines += 1
                repeated_chars += len(line)
            seen.add(line)
        return repeated_lines / len(lines), repeated_chars / max(1, sum(len(line) for line in lines))

    def top_ngram_char_fraction(self, n: int) -> float:
        """Share of word characters covered by the most frequent word n-gram, when it occurs more than once."""
        if len(self.words) < n or not self.word_chars:
            return 0.0
        counts = Counter(zip(*(self.words[i:] for i in range(n)), strict=False))  # n-grams; shorter tails end it
        ngram, count = counts.most_common(1)[0]
        return 0.0 if count < 2 else count * sum(len(word) for word in ngram) / self.word_chars


_ALPHA = re.compile(r"[^\W\d_]")


def _symbol_word_ratio(stats: TextStats) -> float:
    symbols = stats.text.count("#") + stats.text.count("...") + stats.text.count("\u2026")
    return symbols / max(1, len(stats.words))


def _digit_fraction(stats: TextStats) -> float:
    return sum(char.isdigit() for char in stats.text) / max(1, len(stats.text))


def _alpha_word_fraction(stats: TextStats) -> float:
    return sum(1 for word in stats.words if _ALPHA.search(word)) / max(1, len(stats.words))


def _mean_line_chars(stats: TextStats) -> float:
    return sum(len(line) for line in stats.nonblank_lines) / max(1, len(stats.nonblank_lines))


def _long_line_fraction(stats: TextStats, config: CleaningConfig) -> float:
    long_lines = sum(1 for line in stats.nonblank_lines if len(line) > config.long_line_chars)
    return long_lines / max(1, len(stats.nonblank_lines))


@dataclass(frozen=True)
class Rule:
    """A named quality check: `passes(stats, config)` is False for documents the rule removes."""

    name: str
    passes: Callable[[TextStats, CleaningConfig], bool]


RULES: tuple[Rule, ...] = (
    Rule("min_chars", lambda s, c: len(s.text) >= c.min_chars),
    Rule("max_chars", lambda s, c: len(s.text) <= c.max_chars),
    Rule("min_words", lambda s, c: len(s.words) >= c.min_words),
    Rule("max_words", lambda s, c: len(s.words) <= c.max_words),
    Rule("symbol_word_ratio", lambda s, c: _symbol_word_ratio(s) <= c.max_symbol_word_ratio),
    Rule("digit_fraction", lambda s, c: _digit_fraction(s) <= c.max_digit_fraction),
    Rule("mean_line_chars", lambda s, c: _mean_line_chars(s) <= c.max_mean_line_chars),
    Rule("long_line_fraction", lambda s, c: _long_line_fraction(s, c) <= c.max_long_line_fraction),
    Rule("alpha_word_fraction", lambda s, c: _alpha_word_fraction(s) >= c.min_alpha_word_fraction),
    Rule("duplicate_lines", lambda s, c: s.duplicate_lines[0] <= c.max_duplicate_line_fraction),
    Rule("duplicate_line_chars", lambda s, c: s.duplicate_lines[1] <= c.max_duplicate_line_char_fraction),
    Rule("top_2gram", lambda s, c: s.top_ngram_char_fraction(2) <= c.max_top_2gram_char_fraction),
    Rule("top_3gram", lambda s, c: s.top_ngram_char_fraction(3) <= c.max_top_3gram_char_fraction),
    Rule("top_4gram", lambda s, c: s.top_ngram_char_fraction(4) <= c.max_top_4gram_char_fraction),
)


def failed_rule(text: str, config: CleaningConfig) -> str | None:
    """The name of the first rule the (normalised) text fails, or None when it passes them all."""
    stats = TextStats(text)
    for rule in RULES:
        if not rule.passes(stats, config):
            return rule.name
    return None
