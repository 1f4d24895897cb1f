"""Content safety: a policy file of categories, each found by terms, regular expressions and/or a trained classifier,
and what to do when one is found (block, redact, flag), applied to prompts and to generated text as it streams.

A policy (`--moderation-policy FILE`, .yaml/.toml/.json):

    categories:
      pii:      {action: redact, patterns: ['[\\w.+-]+@[\\w-]+\\.[\\w.]+']}
      weapons:  {action: block, terms: [pipe bomb, nerve agent], classifier: weapons.npz, threshold: 0.8,
                 billing: none}
    plans: {free: [pii, weapons]}        # categories enforced for keys on a plan (default: every category)
    keys: {research: [pii]}              # ... or for one key (before its plan)

Terms match whole words (in scripts without spaces between words, such as Chinese, inside their sentences),
case-insensitively, their words apart by any whitespace, in the text's NFKC form without invisible characters
(`folded`: `ｓｅｌｆ` and `s<zero-width space>elf` are `self`). A classifier is any object with
`score(text) -> probability` (`Classifier`); the one we ship is the hashed n-gram logistic regression of
`seekstack data quality-train --reference CATEGORY_EXAMPLES --pool ACCEPTABLE_EXAMPLES --out FILE.npz`. Terms and
patterns act on the span they match (a block cuts the text before it, a redaction replaces it); a classifier judges
the whole text so far. Patterns run on the `regex` module (Python's syntax), which lets other threads run while it
matches and gives up after `MATCH_TIMEOUT_S` (`PolicyTimeout`): a pattern that backtracks without end on some text
(`(a|aa)+$`) costs that request, not the server.

Streaming: text is released `holdback` characters behind what was generated (and in full at the end), so a term
or pattern match of up to that many characters is acted on before any of it is sent; a classifier's judgement
(every `CLASSIFY_EVERY_CHARS` new characters and at the end) can only stop what follows. A blocked generation
ends with finish_reason "content_filter", as OpenAI's API reports it. Logprobs go out with the text they are of,
never ahead of it, and never for blocked or redacted text (`HeldLogprobs`).
"""

from __future__ import annotations

import bisect
import unicodedata
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Protocol

import regex
from annotated_types import Interval

from seekstack.corpus.kinds import UNSPACED_SCRIPT_RANGES
from seekstack.infer.detokenize import TextStream
from seekstack.infer.outputs import TokenLogprob
from seekstack.schema import ConfigError, check, read_config_file
from seekstack.tokenizer import Tokenizer

CLASSIFY_EVERY_CHARS = 200
CONTEXT_CHARS = 64  # characters before a scan's start that its matches may look back at
MATCH_TIMEOUT_S = 10.0  # longest one scan of a text by a category's terms and patterns may take
# what renders as nothing (Unicode's Default_Ignorable_Code_Point): zero-width spaces and joiners, soft hyphens,
# direction marks, variation selectors, tag characters, Hangul fillers
INVISIBLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")
COMBINING = regex.compile(r"\p{M}")  # marks that combine with the character before them (a decomposed `é`'s acute)
DOTLESS_I = str.maketrans("ı", "i")  # read as i, as Python's `re` matched it case-insensitively (`regex` does not)
Action = Literal["block", "redact", "flag"]


class Classifier(Protocol):
    """What a category's classifier offers: the probability that a text belongs to the category."""

    def score(self, text: str) -> float: ...


class PolicyTimeout(Exception):
    """A category's terms and patterns took longer than `MATCH_TIMEOUT_S` to scan a text."""

    def __init__(self, category: str, length: int):
        super().__init__(f"category {category!r}: its patterns took over {MATCH_TIMEOUT_S:g} s to scan {length} "
                         "characters of text; send shorter text (or, as the policy's author, write patterns that do "
                         "not backtrack without end, such as `(a|aa)+`)")  # fmt: skip


@dataclass
class CategoryRule:
    """How one category is found and what is done when it is."""

    action: Action = "block"
    terms: tuple[str, ...] = ()  # whole words or phrases, any case
    patterns: tuple[str, ...] = ()  # regular expressions (Python syntax)
    classifier: str | None = None  # a model file of `seekstack data quality-train`, relative to the policy file
    threshold: Annotated[float, Interval(ge=0, le=1)] = 0.5  # classifier probability at which the category is found
    billing: Literal["tokens", "none"] = "tokens"  # what a request this category acted on costs
    holdback: Annotated[int, Interval(ge=0, le=4096)] = 64  # characters of a stream held back for span matches


@dataclass
class PolicyFile:
    """The policy file's fields."""

    categories: dict[str, CategoryRule] = field(default_factory=dict)
    plans: dict[str, tuple[str, ...]] = field(default_factory=dict)
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A category found in a text: where (a span, or None for a classifier's judgement of the whole) and how sure."""

    category: str
    action: Action
    span: tuple[int, int] | None
    score: float


@dataclass
class Category:
    """A category ready to match: its rule, one compiled expression for its terms and patterns, its classifier."""

    name: str
    rule: CategoryRule
    expression: regex.Pattern | None
    classifier: Classifier | None

    def spans(self, text: str, start: int = 0) -> list[Hit]:
        """Every term or pattern match in text[start:] as `folded` reads it (positions in `text`)."""
        if self.expression is None:
            return []
        view, starts, ends = folded(text, max(0, start - CONTEXT_CHARS))  # what precedes `start`: `\b`, lookbehinds
        matches = self.expression.finditer(view, bisect.bisect_left(starts, start), concurrent=True,
                                           timeout=MATCH_TIMEOUT_S)  # fmt: skip
        try:
            return [Hit(self.name, self.rule.action, (starts[m.start()], ends[m.end() - 1]), 1.0)
                    for m in matches if m.end() > m.start()]  # fmt: skip
        except TimeoutError:
            raise PolicyTimeout(self.name, len(view)) from None

    def probability(self, text: str) -> float:
        """The classifier's probability that the text, as `folded` reads it, is of the category; ValueError for a score
        that is no probability (NaN, 1.5), which would let the text through unjudged (NaN >= threshold is false)."""
        score = float(self.classifier.score(folded(text)[0]))
        if not 0 <= score <= 1:
            raise ValueError(f"category {self.name!r}: its classifier {type(self.classifier).__name__} scored a text "
                             f"{score!r}, which is no probability in [0, 1]; the text cannot be judged")  # fmt: skip
        return score

    def judge(self, text: str) -> Hit | None:
        """The classifier's verdict on the whole text, if it finds the category."""
        if self.classifier is None:
            return None
        score = self.probability(text)
        return Hit(self.name, self.rule.action, None, score) if score >= self.rule.threshold else None


class Policy:
    """The categories of a policy file and who they apply to."""

    def __init__(
        self,
        name: str,
        categories: list[Category],
        plans: dict[str, tuple[str, ...]],
        keys: dict[str, tuple[str, ...]],
    ):
        self.name = name  # its file's name, which /v1/moderations names as the model that ran
        self.categories = {category.name: category for category in categories}
        self.plans, self.keys = plans, keys

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """The policy in `path`; ConfigError naming the file and the category or expression at fault."""
        from seekstack.corpus.quality import QualityModel

        path = Path(path)
        given = read_config_file(path)
        policy = check(PolicyFile, given, str(path))
        if not policy.categories:
            raise ConfigError(f"{path}: no categories: the policy would moderate nothing; define them under "
                              "`categories:` (or serve without --moderation-policy)")  # fmt: skip
        categories = []
        for name, rule in policy.categories.items():
            blank = next((term for term in rule.terms if not folded(term)[0].split()), None)
            if blank is not None:
                raise ConfigError(f"{path}: category {name!r} has a blank term {blank!r}, which matches nothing")
            if "" in rule.patterns:
                raise ConfigError(f"{path}: category {name!r} has an empty pattern '', which matches no text")
            if rule.classifier is None and "threshold" in given["categories"][name]:
                raise ConfigError(f"{path}: category {name!r} has a threshold but no classifier, whose probability "
                                  "it would judge; give `classifier:` or leave the threshold out")  # fmt: skip
            longest = max(rule.terms, key=lambda term: len(" ".join(folded(term)[0].split())), default="")
            length = len(" ".join(folded(longest)[0].split()))
            if length > rule.holdback and rule.action != "flag":  # a flag shows the text anyway
                raise ConfigError(f"{path}: category {name!r} has a term of {length} characters, longer than its "
                                  f"holdback of {rule.holdback}: a stream would show the start of {longest!r} before "
                                  f"finding it; set `holdback: {length}` or more (at most 4096)")  # fmt: skip
            try:
                expression = _expression(rule)
            except regex.error as error:
                raise ConfigError(f"{path}: category {name!r} has an invalid pattern: {error}") from None
            classifier = None
            if rule.classifier is not None:
                model_path = path.parent / rule.classifier
                if not model_path.is_file():
                    raise ConfigError(f"{path}: category {name!r}: no classifier file {model_path}")
                try:
                    classifier = QualityModel.load(model_path)
                except ValueError as error:  # names the model file only
                    raise ConfigError(f"{path}: category {name!r}: {error}") from None
            if expression is None and classifier is None:
                raise ConfigError(f"{path}: category {name!r} needs terms, patterns or a classifier")
            categories.append(Category(name, rule, expression, classifier))
        for section, scopes in (("plans", policy.plans), ("keys", policy.keys)):
            for scope, names in scopes.items():
                unknown = [name for name in names if name not in policy.categories]
                if unknown:
                    raise ConfigError(f"{path}: {section}.{scope} names unknown category {unknown[0]!r}")
        return cls(path.name, categories, policy.plans, policy.keys)

    def for_caller(self, key_name: str | None, plan: str | None) -> list[Category]:
        """The categories enforced for a key (by its name, else its plan, else all)."""
        if key_name in self.keys:
            names = self.keys[key_name]
        elif plan in self.plans:
            names = self.plans[plan]
        else:
            return list(self.categories.values())
        return [self.categories[name] for name in names]


def scan(categories: list[Category], text: str) -> list[Hit]:
    """Every hit of `categories` in the whole of `text`: spans in order, then classifier verdicts."""
    spans = sorted((hit for category in categories for hit in category.spans(text)), key=lambda hit: hit.span)
    verdicts = [hit for category in categories if (hit := category.judge(text)) is not None]
    return spans + verdicts


def redacted(text: str, hits: list[Hit]) -> str:
    """`text` with the spans of redacting hits replaced by [REDACTED:category] (overlaps: the first wins)."""
    out, position = [], 0
    for hit in hits:
        if hit.action == "redact" and hit.span is not None and hit.span[0] >= position:
            out += [text[position : hit.span[0]], f"[REDACTED:{hit.category}]"]
            position = hit.span[1]
    return "".join(out) + text[position:]


@dataclass
class ModeratedStream:
    """One choice's generated text, released as it proves clean: `push` new text, get what may be shown and the
    hit that blocks it (the text shown stops before a blocked span)."""

    categories: list[Category]
    text: str = ""  # generated so far
    released: int = 0  # characters of `text` judged and shown (after redaction); after a block, what came before it
    judged: int = 0  # length of `text` at the classifiers' last verdict
    hits: list[Hit] = field(default_factory=list)  # every hit so far, blocking or not

    @property
    def holdback(self) -> int:
        return max((c.rule.holdback for c in self.categories if c.expression is not None), default=0)

    @property
    def redacted_spans(self) -> list[tuple[int, int]]:
        """The spans of `text` replaced by [REDACTED:category] so far."""
        return [hit.span for hit in self.hits if hit.action == "redact" and hit.span is not None]

    def push(self, piece: str, final: bool = False) -> tuple[str, Hit | None]:
        """Add generated text; return the text now safe to show and the blocking hit, if any (then stop)."""
        self.text += piece
        if final or len(self.text) - self.judged >= CLASSIFY_EVERY_CHARS:
            self.judged = len(self.text)
            verdicts = [hit for category in self.categories if (hit := category.judge(self.text)) is not None]
            self.hits += verdicts
            blocking = next((hit for hit in verdicts if hit.action == "block"), None)
            if blocking is not None:
                return "", blocking
        end = len(self.text) if final else max(self.released, len(self.text) - self.holdback)
        spans = sorted((hit for category in self.categories for hit in category.spans(self.text, self.released)),
                       key=lambda hit: hit.span)  # fmt: skip
        if not final:  # a match reaching the text's end may grow or vanish with what follows (`bomb`, then `shell`):
            waiting = len(self.text)  # it, and any match across its start, is judged at a later push
            for hit in reversed(spans):
                if hit.span[1] == len(self.text) or hit.span[1] > waiting:
                    waiting = hit.span[0]
            spans, end = [hit for hit in spans if hit.span[0] < waiting], min(end, waiting)
        acted = []
        for hit in spans:
            start, stop = hit.span
            if hit.action == "block":  # wherever it is: nothing from its start on may go out, all before it goes
                acted = [earlier for earlier in spans if earlier.action != "block" and earlier.span[0] < start]
                self.hits += [*acted, hit]
                shown, self.released = redacted(self.text[self.released : start], _shifted(acted, self.released)), start
                return shown, hit
            if start >= end:
                continue
            acted.append(hit)
            end = max(end, stop)  # a match begun before the boundary is released whole (redacted or flagged)
        self.hits += acted
        shown = redacted(self.text[self.released : end], _shifted(acted, self.released))
        self.released = end
        return shown, None


class HeldLogprobs:
    """The logprobs of one choice whose text is held back (moderated, or while it may start a stop string), let out
    only with the text they are of: a token's entry goes once the text is shown past the end of that token's text,
    and never when the text was blocked, redacted or cut at a stop string.

    The choice's tokens are decoded again (as the engine does) to place each token's text in the generated text; a
    token whose text appears only with a later one's (part of a UTF-8 character, a skipped special token) ends where
    its bytes reach in that text, a character it holds part of counting whole."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self.decoded = TextStream(tokenizer, (), skip_special_tokens)
        self.length = 0  # characters of generated text placed
        # tokens whose text has not appeared yet, each with the characters of the held text its bytes reach
        self.unplaced: list[tuple[TokenLogprob, int]] = []
        self.pending: deque[tuple[int, int, TokenLogprob]] = deque()  # (start, end) of each token's text, its entry

    def add(self, entries: list[TokenLogprob], final: bool = False) -> None:
        """Place the entries of newly generated tokens (with `final`, also whatever has not appeared by the end)."""
        for entry in entries:
            piece, _ = self.decoded.push(entry.token_id)
            held = piece or self.decoded.held_text()  # decoded lossily: a part of a character reads as one U+FFFD
            self.unplaced.append((entry, len(held)))
            if piece:
                self._place(len(piece))
        if final:
            self._place(len(self.decoded.flush()))

    def release(self, shown: int, withheld: Sequence[tuple[int, int]] = ()) -> list[TokenLogprob]:
        """The entries whose text lies in the first `shown` characters of the generated text, less those of the
        `withheld` (redacted) spans."""
        out = []
        while self.pending and self.pending[0][1] <= shown:
            start, end, entry = self.pending.popleft()
            if not any(left < end and start < right for left, right in withheld):
                out.append(entry)
        return out

    def _place(self, length: int) -> None:
        start, self.length = self.length, self.length + length
        self.pending.extend((start, min(start + reach, self.length), entry) for entry, reach in self.unplaced)
        self.unplaced = []


def _shifted(hits: list[Hit], offset: int) -> list[Hit]:
    return [Hit(hit.category, hit.action, (hit.span[0] - offset, hit.span[1] - offset), hit.score) for hit in hits
            if hit.span is not None]  # fmt: skip


def folded(text: str, start: int = 0) -> tuple[str, Sequence[int], Sequence[int]]:
    """text[start:] as the policy reads it, so that look-alike spellings match what they spell: each character with
    the combining marks after it in their NFKC compatibility form (fullwidth `ｓｅｌｆ` -> `self`, the ligature `ﬁ` ->
    `fi`, `e` + combining acute -> `é`; dotless `ı` -> `i`), invisible ones (`INVISIBLE`: zero-width spaces and
    joiners, soft hyphens, direction marks...) dropped; and per character of it, where in `text` the characters it
    came from start and end."""
    if text.isascii():
        return text[start:], range(start, len(text)), range(start + 1, len(text) + 1)
    invisible = {match.start() for match in INVISIBLE.finditer(text, start)}
    marks = {match.start() for match in COMBINING.finditer(text, start)}
    characters, starts, ends = [], [], []
    position = start
    while position < len(text):
        if position in invisible:
            position += 1
            continue
        end = position + 1  # the marks that combine with it (a decomposed `é`) are folded with it
        while end in marks or end in invisible:
            end += 1
        cluster = (
            text[position]
            if end == position + 1
            else "".join(text[at] for at in range(position, end) if at not in invisible)
        )
        form = cluster if cluster.isascii() else unicodedata.normalize("NFKC", cluster).translate(DOTLESS_I)
        characters.append(form)
        if len(form) == 1:  # most characters: appended, not lists of one made and added
            starts.append(position)
            ends.append(end)
        else:
            starts += [position] * len(form)
            ends += [end] * len(form)
        position = end
    return "".join(characters), starts, ends


def _expression(rule: CategoryRule) -> regex.Pattern | None:
    """One case-insensitive expression for a rule's terms (as whole words, their words apart by any run of whitespace:
    `pipe  bomb` and `pipe<newline>bomb` are `pipe bomb`) and patterns."""
    terms = [r"\s+".join(map(regex.escape, folded(term)[0].split())) for term in rule.terms]  # read as the text is
    # whole words: no word character just before or after (`\b` would ask for one beside a term's `+` or `@`: `c++`)
    # and in any case as Unicode's full case folding has it (`str.casefold`: STRASSE is straße), for terms only: it
    # makes a pattern's classes slow (`[\w.+-]+@` 46 times)
    parts = [_whole_word(term) for term in terms] + [f"(?:{pattern})" for pattern in rule.patterns]
    return regex.compile("|".join(parts), regex.IGNORECASE | regex.VERSION0) if parts else None


def _whole_word(term: str) -> str:
    """A term's expression as a whole word. Scripts written without spaces between words (Chinese, Japanese, Thai...)
    have no word boundaries to find: a letter of theirs beside a term joins it to no word, and a term's end in one
    needs none (`炸弹` is found in `怎么制造炸弹`, `bomb` in `制造bomb的`, `폭탄` in `폭탄을`)."""
    unspaced, spaced_word = f"[{UNSPACED_SCRIPT_RANGES}]", f"[^\\W{UNSPACED_SCRIPT_RANGES}]"
    before = "" if regex.match(unspaced, term) else rf"(?<!{spaced_word})"
    after = "" if regex.search(f"{unspaced}$", term) else rf"(?!{spaced_word})"
    return f"{before}(?f:{term}){after}"
