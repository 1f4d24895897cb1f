"""Document-level quality rules in the style of the Gopher, C4 and FineWeb filters, with thresholds per kind of text.

Each rule is named, measures one statistic of a document and compares it with a threshold read from the
`KindRules` of the document's kind (code, prose or CJK; `kinds.py`); a threshold of None turns the rule off for
that kind. Lengths and n-grams count words as `kinds.words` splits them, so every CJK character is one word.
  code   the stdlib-tuned rules: long or minified lines fail, symbols and repeated lines are allowed more room.
  prose  Gopher's thresholds (Rae et al. 2021, appendix A) and FineWeb's line punctuation, short-line and list
         rules; a paragraph may be one line of any length, as web-text JSONL stores it, or hard-wrapped, as text files
         hold it.
  cjk    prose rules counted in characters; no word-length, short-line or list rule (a "word" is one character).
Thai, Lao, Tibetan, Myanmar and Khmer prose (no spaces between words, so its space-separated "words" are phrases)
has its words counted as its characters over `UNSPACED_WORD_CHARS`, its n-grams as n times that many characters, and
is not judged by the mean word length; Thai and Lao, which end sentences with no mark, are not judged by the line
punctuation rule either. Prose in a script whose words are long (`WORDS_PER_ENGLISH_WORD`: Malayalam, Tamil, Telugu,
Kannada, Georgian), or in Vietnamese, whose words are syllables written apart, has its words counted as English
words: the word-count, symbol and mean word length rules hold it to English's thresholds.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import ftfy
import ftfy.badness
import ftfy.fixes
import regex

from seekstack.corpus.dedup import lsh_can_band, max_lsh_threshold
from seekstack.corpus.kinds import (
    HTML_PAGE_START,
    KINDS,
    UNSPACED_WORD_CHARS,
    Kind,
    detect_kind,
    ends_sentences_without_marks,
    japanese,
    japanese_words,
    korean,
    looks_like_code,
    prose_language,
    spaced_words,
    words,
    written_without_spaces,
)
from seekstack.schema import (
    ConfigError,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    nested_config,
    require,
)

Profile = Literal["auto", "web", "code", "zh"]
_DIGIT = re.compile(r"\d")
_LOREM_IPSUM = re.compile(r"lorem ipsum", re.IGNORECASE)  # as C4 (and FineWeb, through it) finds it
_LETTER = re.compile(r"[^\W\d_]")
# Gopher's English stop words, as datatrove's GopherQualityFilter lists them (Rae et al. 2021, appendix A)
GOPHER_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
_WORD_EDGE_PUNCTUATION = regex.compile(r"^\p{P}+|\p{P}+$")
# A character that is neither punctuation nor a symbol: a word holding none is no word to Gopher (datatrove's
# PUNCTUATION_SET: `-`, `|`, `...`, `—`, `»`, `+`, `=`, `$`)
_NOT_PUNCTUATION_OR_SYMBOL = regex.compile(r"[^\p{P}\p{S}]")
# Characters that end a sentence: those Unicode gives the Sentence_Terminal property, as datatrove's
# TERMINAL_PUNCTUATION lists them: Latin . ! ?, CJK 。！？, halfwidth ｡ and fullwidth ． (Japanese technical and
# academic writing's full stop, with ， for its comma), Devanagari (Hindi, Marathi, Nepali, also Bengali's) danda । and
# ॥, Arabic ؟ and Urdu ۔, Armenian ։, Ethiopic ። ፧, Myanmar ။, Khmer ។ ៕, Santali's Ol Chiki ᱾ ᱿, Mongolian ᠃,
# Meetei Mayek ꯫, Syriac ܂, Canadian syllabics ᙮ and every other script's; and more: closing quotes, each language's
# (English " ” ' ’, French » ›, German “ ‘ and « ‹, whose »quotes« close with them), the ellipsis …, CJK ；：」』 and
# Tibetan ། (and `GREEK_QUESTION_END`).
SENTENCE_END_MARK = regex.compile(
    "[\\p{Sentence_Terminal}\"\u201d'\u2019\u00bb\u203a\u201c\u2018\u00ab\u2039\u2026\uff1b\uff1a\u300d\u300f\u0f0d]"
)
# Greek's question mark U+037E, which NFC makes ";" (Unicode gives neither the Sentence_Terminal property, and
# datatrove's TERMINAL_PUNCTUATION holds neither): Greek writes its semicolon as the ano teleia `·`, so a ";" right
# after a Greek letter ends a question (`Πού είναι η βιβλιοθήκη;`); after anything else it is a semicolon.
GREEK_QUESTION_END = regex.compile("\\p{Greek}[;\u037e]\\Z")


# What may follow a sentence's end on its line without leaving the sentence open: closing parentheses (`(It rained.)`
# ends a paragraph line; a short line ending in `)` is judged no sentence but code, `looks_like_code`), fullwidth
# `）】》`, citation marks (`[12]`, `[3, 4]`, C4's `[edit]` and `[citation needed]`; `(Smith, 2020)`), footnote
# superscripts (`¹`), emoji (`Done! 🎉`), invisible format characters (the right-to-left and left-to-right marks
# Hebrew and Arabic text sets after its punctuation, `שלום.\u200f`, bidi embeddings and isolates, zero-width space,
# a byte-order mark); not `]` or `}` (`#[link(name = "m")]` ends no sentence); read in the line's last
# `SENTENCE_END_TAIL_CHARS` characters.
_AFTER_SENTENCE_END = re.compile(
    r"(?:\s|[)\uff09\uff3d\u3011\u3015\u3009\u300b]|\[(?:\d+(?:[,\u2013-]\s*\d+)*|edit|citation needed)\]"
    r"|\([^()]*\b\d{4}[a-z]?\)|[\u00b9\u00b2\u00b3\u2070-\u2079]|[\u2600-\u27bf\U0001f000-\U0001faff\ufe0f\u200d]"
    r"|[\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff])+\Z"
)
BULLETS = ("\u2022", "-")  # what a line of a list starts with, as datatrove counts them (not Markdown's `*`)
SENTENCE_END_TAIL_CHARS = 80  # bounds the regex's work on a long line (a paragraph is one line)
# Hard-wrapped text (man pages, READMEs, RFCs, e-mail, Project Gutenberg) is filled at 60-100 columns; its fill width
# is read as the 90th percentile of its non-blank lines' lengths, and text whose width is outside these is not wrapped.
FILL_WIDTHS = (60, 100)
FILL_WIDTH_PERCENTILE = 0.9
# Words per English word in the scripts (ISO 15924, as `kinds.script_code` names them) of languages that join
# suffixes into long words: the median over GNOME's translations of the same English messages (documents of 60
# English words; 66-213 a language). Such text's `word_count` is its words over this share, so 50 English words
# translated into Malayalam (32 words of 9.3 characters) count as 50 words of 6.0. Latin-script languages that do the
# same (Finnish 0.74, Turkish 0.82, Estonian 0.82) cannot be told from English by script: the defaults hold them to
# English's counts (set `prose.min_words`, `prose.max_mean_word_chars` for such a corpus).
WORDS_PER_ENGLISH_WORD = {"Mlym": 0.65, "Telu": 0.68, "Taml": 0.69, "Knda": 0.74, "Geor": 0.77}
# Vietnamese writes each syllable apart, so its words run the other way: 1.43 words per English word (the median over
# the 3,013 documents of 60 English words its translations in a Debian system's /usr/share/locale/vi make), of 3.2-3.4
# characters in clean prose, at Gopher's floor of 3.0; counted as the English words they make, 4.6-4.9
VIETNAMESE_WORDS_PER_ENGLISH_WORD = 1.43


@dataclass
class KindRules:
    """Thresholds of the quality rules for one kind of text; None turns a rule off. Defaults: code."""

    min_chars: NonNegative = 200  # drop stubs and empty modules
    max_chars: Positive = 1_000_000
    min_words: NonNegative = 30
    max_words: Positive = 200_000
    max_symbol_word_ratio: NonNegativeFloat = 0.5  # Gopher: '#' or '...' per word, 0.1; code comments need more
    max_bullet_line_fraction: Fraction | None = None  # Gopher 0.9: share of lines starting with a bullet (a list page)
    max_ellipsis_line_fraction: Fraction | None = None  # Gopher 0.3: share of lines ending in ... (teasers, cut text)
    max_digit_fraction: Fraction = 0.2  # digits / characters; tables of numbers exceed it
    max_mean_line_chars: PositiveFloat | None = 100.0  # minified code and blobs have long lines
    long_line_chars: Positive = 200
    max_long_line_fraction: Fraction | None = 0.05
    min_alpha_word_fraction: Fraction = 0.5  # Gopher 0.8 for prose; code has many `=`, `(`, `0` tokens
    # Gopher 2: how many of its English stop words (`GOPHER_STOP_WORDS`) the text holds, each counted once. Off for
    # every kind: English prose holds them (all 698 English documents `bench/data_corpora.py`'s corpora keep), but
    # little else does: it would remove prose in other languages whole, 169 of 195 Chinese pages and 65 of 621 stdlib
    # modules kept; 2 for a corpus of English alone, where it removes pages of keywords (`cheap flights paris deals`)
    min_stop_words: NonNegative | None = None
    min_mean_word_chars: NonNegativeFloat | None = None  # Gopher: mean word length within [3, 10] for prose
    max_mean_word_chars: PositiveFloat | None = None
    min_terminal_line_fraction: Fraction | None = None  # FineWeb: share of lines ending in . ! ? and the like
    short_line_chars: Positive = 30  # FineWeb: a line of at most this many characters is short
    max_short_line_fraction: Fraction | None = None  # FineWeb 0.67: share of lines that are short (menus, link lists)
    max_newline_word_ratio: NonNegativeFloat | None = None  # FineWeb 0.3: line breaks (blank lines too) per word
    max_duplicate_line_fraction: Fraction = 0.5  # Gopher 0.3 for prose; code repeats `else:`, `return None`, ...
    duplicates_skip_code_lines: bool = False  # in prose: the `}` and `return x` lines of listings do not count
    max_duplicate_line_char_fraction: Fraction = 0.4  # Gopher 0.2; characters in non-blank lines seen before
    max_top_2gram_char_fraction: Fraction = 0.25  # Gopher 0.20/0.18/0.16: characters in the most frequent n-gram
    max_top_3gram_char_fraction: Fraction = 0.22
    max_top_4gram_char_fraction: Fraction = 0.2
    # Gopher 0.10: characters of words inside a word 10-gram seen twice or more; the text repeated on one line, which
    # the line rules miss, scores ~1. Off for code (its repetition is caught by lines); 0.3 for prose, where license
    # texts that restate their clauses score up to 0.14.
    max_duplicate_10gram_char_fraction: Fraction | None = None
    max_lorem_ipsum: NonNegative | None = None  # C4: how often `lorem ipsum` may occur; 0, a placeholder page
    # 1 for a text opening as an HTML page (`<!DOCTYPE html>`, `<html>`: a JSON Lines row of raw pages), whose markup
    # is no text to train on, as an input file that opens so is refused; 0 removes it. Off for code (HTML is code)
    max_html_page: NonNegative | None = None


@dataclass
class CodeRules(KindRules):
    """Rules for source code: the `KindRules` defaults."""


@dataclass
class ProseRules(KindRules):
    """Rules for prose: Gopher's thresholds, no line-length rules, FineWeb's terminal punctuation rule."""

    min_words: NonNegative = 50
    max_words: Positive = 100_000
    max_symbol_word_ratio: NonNegativeFloat = 0.1
    max_bullet_line_fraction: Fraction | None = 0.9
    max_ellipsis_line_fraction: Fraction | None = 0.3
    max_mean_line_chars: PositiveFloat | None = None
    max_long_line_fraction: Fraction | None = None
    min_alpha_word_fraction: Fraction = 0.8
    min_mean_word_chars: NonNegativeFloat | None = 3.0
    max_mean_word_chars: PositiveFloat | None = 10.0
    min_terminal_line_fraction: Fraction | None = 0.12
    max_short_line_fraction: Fraction | None = 0.67
    max_newline_word_ratio: NonNegativeFloat | None = 0.3
    max_duplicate_line_fraction: Fraction = 0.3
    duplicates_skip_code_lines: bool = True
    max_duplicate_line_char_fraction: Fraction = 0.2
    max_top_2gram_char_fraction: Fraction = 0.2
    max_top_3gram_char_fraction: Fraction = 0.18
    max_top_4gram_char_fraction: Fraction = 0.16
    max_duplicate_10gram_char_fraction: Fraction | None = 0.3
    max_lorem_ipsum: NonNegative | None = 0
    max_html_page: NonNegative | None = 0


@dataclass
class CJKRules(ProseRules):
    """Rules for Chinese, Japanese and Korean: prose rules counted in characters, no word-length rule."""

    min_chars: NonNegative = 100  # a CJK character carries about as much as an English word
    min_words: NonNegative = 80
    max_words: Positive = 200_000  # characters: Gopher's 100,000 words are 150,000-270,000 of them
    min_alpha_word_fraction: Fraction = 0.6  # each punctuation mark is a word of its own
    max_short_line_fraction: Fraction | None = None  # 30 characters are ~15 words: most clean Chinese pages would fail
    max_newline_word_ratio: NonNegativeFloat | None = None  # line breaks per character: a list of words still passes
    min_mean_word_chars: NonNegativeFloat | None = None
    max_mean_word_chars: PositiveFloat | None = None
    # n-grams of `TextStats.ngram_units`: Chinese's characters, Japanese's runs of one script, Korean's spaced words;
    # set for Chinese characters: clean Chinese pages' 99th percentiles 0.15, 0.12, 0.13
    max_top_2gram_char_fraction: Fraction = 0.2
    max_top_3gram_char_fraction: Fraction = 0.16
    max_top_4gram_char_fraction: Fraction = 0.15
    # 10 Chinese characters are ~6 English words (1.67 characters per English word in this system's translations,
    # /usr/share/locale): Gopher's 5-gram threshold 0.15, relaxed x3 as prose's 10-gram one is (0.10 -> 0.3).
    # Japanese's runs (1.16 per English word) and Korean's words (0.89) are nearer English words, so for them this is
    # laxer than prose's 0.3: a hotel-booking template of 12 Japanese lines scores 0.42 (its English, 0.46, fails
    # prose's), though it fails top_4gram; the 114 Japanese documents of this system's vimtutor, gnupg help and man
    # pages score <= 0.14 (top n-grams <= 0.12), and none would fail prose's n-gram limits. The n-gram limits are this
    # kind's, not each language's: datatrove's Gopher repetition filter holds every language to the same limits
    # (top 2/3/4-grams 0.20/0.18/0.16, duplicate 5- to 10-grams 0.15 to 0.10) over its language tokenizer's words
    max_duplicate_10gram_char_fraction: Fraction | None = 0.45


BOUNDS = (  # the `KindRules` thresholds that bound one statistic from below and above
    ("min_chars", "max_chars"),
    ("min_words", "max_words"),
    ("min_mean_word_chars", "max_mean_word_chars"),
)


@dataclass
class CleaningConfig:
    """The rules' thresholds per kind of text, how a document's kind is chosen, and the dedup and split settings
    of `data build`."""

    profile: Profile = "auto"  # auto: each document's detected kind; web: prose or cjk by script; code; zh: cjk
    code: CodeRules = field(default_factory=CodeRules)
    prose: ProseRules = field(default_factory=ProseRules)
    cjk: CJKRules = field(default_factory=CJKRules)
    near_duplicate_threshold: Fraction = 0.8  # MinHash Jaccard estimate above which a document is a near duplicate
    minhash_permutations: Positive = 128
    val_fraction: Fraction = 0.01  # share of documents in the validation split, below 1
    min_kept_fraction: Fraction = 0.05  # a build keeping a smaller share of its documents fails, naming the rules

    def __post_init__(self) -> None:
        """No kind's lower bound above its upper bound (every document of the kind would fail, found only once the
        corpus was read); MinHash LSH splits the permutations into 2 or more bands: at least 2 of them, and a
        threshold above 0 and low enough for that (datasketch's own errors name no field); a val_fraction below 1 (1
        held every document out of a large corpus and kept one in train of a small one, without a word)."""
        for kind in KINDS:
            for low, high in BOUNDS:
                floor, ceiling = getattr(self.rules_for(kind), low), getattr(self.rules_for(kind), high)
                if floor is not None and ceiling is not None and floor > ceiling:
                    raise ConfigError(
                        f"has value {ceiling!r}: must be at least {kind}.{low}={floor!r}, or no {kind} document "
                        "passes both",
                        field=f"{kind}.{high}",
                    )
        require(self.val_fraction < 1, "val_fraction", "below 1 (1 leaves nothing to train on)")
        permutations, threshold = self.minhash_permutations, self.near_duplicate_threshold
        require(permutations >= 2, "minhash_permutations", "at least 2 (MinHash LSH splits them into 2 or more bands)")
        if threshold <= 0:  # every candidate's estimate is at least 0: what LSH happened to pair would decide
            raise ConfigError(
                f"has value {threshold!r}: must be above 0; at 0 any document that shares a MinHash band with a kept "
                "one is its near duplicate, however unlike it (49 of 50 unrelated documents went); the default is 0.8",
                field="near_duplicate_threshold",
            )
        if not lsh_can_band(threshold, permutations):
            raise ConfigError(
                f"has value {threshold!r}: must be at most {max_lsh_threshold(permutations)} with "
                f"minhash_permutations={permutations} (MinHash LSH needs 2 or more bands; more permutations allow a "
                "higher threshold)",
                field="near_duplicate_threshold",
            )

    def rules_for(self, kind: Kind) -> KindRules:
        """The thresholds that apply to documents of `kind`."""
        return {"code": self.code, "prose": self.prose, "cjk": self.cjk}[kind]


for _kind in ("code", "prose", "cjk"):
    nested_config(CleaningConfig, _kind, type(getattr(CleaningConfig(), _kind)), prefix=_kind)


# Terminal formatting that text saved from a terminal holds: ECMA-48 escape sequences (colours, `\x1b[32mPASSED\x1b[0m`;
# an OSC title or link, `\x1b]8;;https://x.org\x1b\\`), and nroff's overstrike, as a man page saved with its bold
# (`N\bNA\bAM\bME\bE`) and underline (`_\bf_\bi_\bl_\be`) holds it: a backspace shows the character after it in place
# of the one before, as `col -b` keeps it.
_TERMINAL_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_OVERSTRUCK = re.compile(r"[^\n]?\x08")
# Mojibake, text once decoded in the wrong encoding (`â\x80\x93` for `–`, UTF-8 read as Latin-1, in libxml2's NEWS;
# `\x93quoted\x94`, Windows-1252 read as Latin-1, in scraped rows), mended by ftfy as datatrove's FTFYFormatter mends
# it for FineWeb; its other fixes are left out (quotes, widths and ligatures stay as written)
_MOJIBAKE_ONLY = ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    fix_surrogates=False,
    remove_control_chars=False,
    normalization=None,
    explain=False,
)
# What such text holds, found at C speed where ftfy's own test reads ~6 MB/s (a fifth of the analysis of text beyond
# ASCII): a C1 control (Windows-1252 read as Latin-1), or a UTF-8 lead byte read as Latin-1 or Windows-1252 before a
# continuation byte so read (`Ã©` for `é`, `â€“` for `–`, `Ð¿` for `п`), not as a letter (`Lukáš` is Czech)
_WINDOWS_1252_PUNCTUATION = "".join(
    char for char in bytes(range(0x80, 0xA0)).decode("cp1252", "ignore") if not char.isalpha()
)
_MOJIBAKE_SIGN = re.compile(f"[\x80-\x9f]|[\xc2-\xf4][\xa0-\xbf{_WINDOWS_1252_PUNCTUATION}]")


def normalise(text: str) -> str:
    """Unicode NFC with `\\n` line endings, HTML character references decoded where no markup is, mojibake mended,
    terminal formatting rendered as the terminal shows it (escape sequences dropped, overstrike resolved) and no other
    control characters, the form every later stage (rules, hashes, output) sees."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # HTML character references in a text that holds no markup (a scraped row's `Fish &amp; Chips`, `&#163;5`, an
    # address hidden as `bob&#64;example.com`) are decoded, as datatrove's FTFYFormatter decodes them (ftfy's
    # unescape_html="auto"); a text holding a `<` may be HTML or code quoting it, and keeps them
    if "&" in text and "<" not in text:
        text = ftfy.fixes.unescape_html(text)
    if _MOJIBAKE_SIGN.search(text) and ftfy.badness.is_bad(text):
        text = ftfy.fix_text(text, _MOJIBAKE_ONLY)
    text = _OVERSTRUCK.sub("", _TERMINAL_ESCAPE.sub("", text))
    # Control characters that no text shows, as datatrove's FTFYFormatter removes them with ftfy: C0 but tab, line
    # feed, form feed and carriage return (NUL, the padding of binary formats; DOS's end of file, ^Z), DEL, a byte-order
    # mark inside the text (files joined by `cat`, a row scraped from a file with one), the object replacement
    # character U+FFFC (an image pasted from a rich-text editor), interlinear annotations and Arabic's deprecated
    # format controls; joiners, bidirectional marks and emoji tags stay
    return unicodedata.normalize("NFC", ftfy.fixes.remove_control_chars(text))


def rule_kind(text: str, profile: Profile, name: str = "") -> tuple[Kind, str]:
    """The kind whose rules judge `text` (named `name`, a path or id) under `profile`, and the detected
    `kind/lang` label for the report."""
    detected = detect_kind(text, name)
    if profile == "auto":
        return detected.kind, detected.label
    if profile == "web":
        return ("cjk" if detected.kind == "cjk" else "prose"), detected.label
    return ("code" if profile == "code" else "cjk"), detected.label


class TextStats:
    """Lazily computed statistics of one document that the rules share."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = words(text)
        self.lines = text.split("\n")
        self._duplicates: dict[bool, tuple[float, float]] = {}

    @cached_property
    def nonblank_lines(self) -> list[str]:
        return [line for line in self.lines if line.strip()]

    @cached_property
    def word_chars(self) -> int:
        return sum(len(word) for word in self.words)

    @cached_property
    def non_symbol_words(self) -> list[str]:
        """The words that are not punctuation or symbols alone (`-`, `|`, `...`, `»`): Gopher leaves those out of the
        word count and the mean word length."""
        return [word for word in self.words if _NOT_PUNCTUATION_OR_SYMBOL.search(word)]

    @cached_property
    def non_symbol_word_chars(self) -> int:
        return sum(len(word) for word in self.non_symbol_words)

    @cached_property
    def unspaced(self) -> bool:
        return written_without_spaces(self.text)

    @cached_property
    def word_count(self) -> int:
        """How many words the text holds (`_counted_as_words`)."""
        return self._counted_as_words(self.words, self.word_chars)

    @cached_property
    def non_symbol_word_count(self) -> int:
        """How many of its words are not punctuation or symbols alone (`_counted_as_words`)."""
        return self._counted_as_words(self.non_symbol_words, self.non_symbol_word_chars)

    def _counted_as_words(self, tokens: list[str], chars: int) -> int:
        """How many words `tokens` (of `chars` characters) make: one each, or in text written without spaces (whose
        `words` are phrases) their characters over `UNSPACED_WORD_CHARS`, or in Vietnamese or a script of long words
        the English words they make (`words_per_english_word`)."""
        if self.unspaced:
            return chars // UNSPACED_WORD_CHARS
        return round(len(tokens) / self.words_per_english_word)

    @cached_property
    def words_per_english_word(self) -> float:
        """How many of its words make one English word, by the language `detect_kind` gives prose
        (`prose_language`): `VIETNAMESE_WORDS_PER_ENGLISH_WORD` in Vietnamese, its script's `WORDS_PER_ENGLISH_WORD`
        in a script of long words, 1 otherwise (English, though it holds Vietnamese or Malayalam words)."""
        language = prose_language(self.text)
        if language == "vi":
            return VIETNAMESE_WORDS_PER_ENGLISH_WORD
        return WORDS_PER_ENGLISH_WORD.get(language.removeprefix("und-"), 1.0)

    @cached_property
    def ngram_units(self) -> tuple[Sequence[str], int]:
        """What the n-gram rules count as Gopher's words, and how many of them make one word: the `words`; in text
        written without spaces (whose `words` are phrases: a run of keyword spam is one), its characters (as one
        string), `UNSPACED_WORD_CHARS` to a word, where datatrove splits Thai into words with pythainlp's
        dictionary; in Korean, the words it writes between spaces, not its syllables, whose polite ending `습니다.`
        closes every sentence (a character 3-gram of a fifth of a clean page's characters); in Japanese, its runs of
        one script (`japanese_words`), where datatrove segments it with a dictionary, not its characters, whose polite
        ending `ます。` closes every sentence likewise."""
        if self.unspaced:
            return "".join(self.words), UNSPACED_WORD_CHARS
        if korean(self.text):
            return spaced_words(self.text), 1
        if japanese(self.text):
            return japanese_words(self.text), 1
        return self.words, 1

    @cached_property
    def sentence_lines(self) -> list[tuple[str, bool]]:
        """The non-blank lines that a hard wrap did not break in the middle of a sentence, each with whether it ends
        one (`ends_sentence`): in hard-wrapped text a line broken before a word that would not fit in the fill width
        continues on the next line, and only the line where the sentence or paragraph stops is judged, as a web
        page's one-line paragraph is."""
        lengths = sorted(len(line.rstrip()) for line in self.nonblank_lines)
        width = lengths[int(FILL_WIDTH_PERCENTILE * (len(lengths) - 1))] if lengths else 0
        wrapped = FILL_WIDTHS[0] <= width <= FILL_WIDTHS[1]
        judged = []
        for line, next_line in zip(self.lines, [*self.lines[1:], ""], strict=True):
            if not line.strip():
                continue
            ended = ends_sentence(line)
            length = len(line.rstrip())
            broken = wrapped and bool(next_line.strip()) and length <= FILL_WIDTHS[1]
            if ended or not broken or length + 1 + len(next_line.split()[0]) <= width:
                judged.append((line, ended))
        return judged

    def duplicate_lines(self, skip_code_lines: bool) -> tuple[float, float]:
        """Fractions of the non-blank lines, and of their characters, that repeat an earlier line (Gopher); if asked,
        a repeated line that looks like code is no repeat (a tutorial's listings repeat `import os` and `}`), but
        still one of the lines, as datatrove counts every line: a page of prose among its listings is judged by the
        share of the whole page its repeats make."""
        if skip_code_lines not in self._duplicates:
            seen: set[str] = set()
            repeated_lines = repeated_chars = 0
            for line in self.nonblank_lines:
                if line in seen and not (skip_code_lines and looks_like_code(line)):
                    repeated_lines += 1
                    repeated_chars += len(line)
                seen.add(line)
            total_chars = sum(len(line) for line in self.nonblank_lines)
            self._duplicates[skip_code_lines] = (
                repeated_lines / max(1, len(self.nonblank_lines)),
                repeated_chars / max(1, total_chars),
            )
        return self._duplicates[skip_code_lines]

    def duplicate_ngram_char_fraction(self, n: int) -> float:
        """Share of word characters inside word n-grams (of `ngram_units`) that occur more than once (each word
        counted once)."""
        units, per_word = self.ngram_units
        n *= per_word
        grams = _ngrams(units, n)
        counts = Counter(grams)
        repeated = covered_until = 0  # the n-grams start in order: each unit is counted once, past those covered
        for start, gram in enumerate(grams):
            if counts[gram] > 1:
                repeated += sum(map(len, units[max(start, covered_until) : start + n]))
                covered_until = start + n
        return repeated / self.word_chars if self.word_chars else 0.0

    def top_ngram_char_fraction(self, n: int) -> float:
        """Share of word characters covered by the most frequent word n-gram (of `ngram_units`), when it occurs more
        than once."""
        units, per_word = self.ngram_units
        n *= per_word
        if len(units) < n or not self.word_chars:
            return 0.0
        ngram, count = Counter(_ngrams(units, n)).most_common(1)[0]
        return 0.0 if count < 2 else count * sum(map(len, ngram)) / self.word_chars


def _ngrams(units: Sequence[str], n: int) -> list[str] | list[tuple[str, ...]]:
    """The n-grams of `units`, in order: tuples of words, or substrings of a string of characters (hashed several
    times faster than tuples of its characters)."""
    if isinstance(units, str):
        return [units[start : start + n] for start in range(len(units) - n + 1)]
    return list(zip(*(units[start:] for start in range(n)), strict=False))  # shorter tails end it


def _symbol_word_ratio(stats: TextStats, _: KindRules) -> float:
    """Hash signs per word, or ellipses (`...`, `…`) per word, whichever is higher: Gopher holds each symbol to the
    threshold alone."""
    ellipses = stats.text.count("...") + stats.text.count("\u2026")
    return max(stats.text.count("#"), ellipses) / max(1, stats.word_count)


def _bullet_line_fraction(stats: TextStats, _: KindRules) -> float:
    """Share of the non-blank lines that start with a bullet, `•` or `-` (Gopher)."""
    bulleted = sum(1 for line in stats.nonblank_lines if line.lstrip().startswith(BULLETS))
    return bulleted / max(1, len(stats.nonblank_lines))


def _ellipsis_line_fraction(stats: TextStats, _: KindRules) -> float:
    """Share of the non-blank lines that end in an ellipsis, `...` or `…` (Gopher)."""
    cut = sum(1 for line in stats.nonblank_lines if line.rstrip().endswith(("...", "\u2026")))
    return cut / max(1, len(stats.nonblank_lines))


def _digit_fraction(stats: TextStats, _: KindRules) -> float:
    return len(_DIGIT.findall(stats.text)) / max(1, len(stats.text))


def _alpha_word_fraction(stats: TextStats, _: KindRules) -> float:
    """Share of the words that hold a letter; in text written without spaces, whose runs holding letters are phrases,
    the share of its `word_count` left by the runs without one (numbers, and marks set apart: Khmer writes `។` after a
    space), each a word."""
    if stats.unspaced:
        without_letters = sum(1 for word in stats.words if not _LETTER.search(word))
        return max(0.0, 1 - without_letters / max(1, stats.word_count))
    return sum(1 for word in stats.words if _LETTER.search(word)) / max(1, len(stats.words))


def _stop_word_count(stats: TextStats, _: KindRules) -> int:
    """How many of `GOPHER_STOP_WORDS` the text holds, each counted once, in any case and with the punctuation set
    against a word left out (`The`, `and,`), where datatrove's spaCy splits punctuation off and counts lower case
    alone."""
    return len(GOPHER_STOP_WORDS.intersection(_WORD_EDGE_PUNCTUATION.sub("", word).lower() for word in stats.words))


def _mean_word_chars(stats: TextStats, _: KindRules) -> float | None:
    """Characters per word of the `non_symbol_word_count` (in a script of long words, per English word they make);
    None (not judged) for Thai, Lao, Tibetan, Myanmar or Khmer text, whose space-separated "words" are phrases."""
    if stats.unspaced:
        return None
    return stats.non_symbol_word_chars / max(1, stats.non_symbol_word_count)


def _mean_line_chars(stats: TextStats, _: KindRules) -> float:
    return sum(len(line) for line in stats.nonblank_lines) / max(1, len(stats.nonblank_lines))


def _long_line_fraction(stats: TextStats, rules: KindRules) -> float:
    long_lines = sum(1 for line in stats.nonblank_lines if len(line) > rules.long_line_chars)
    return long_lines / max(1, len(stats.nonblank_lines))


def _short_line_fraction(stats: TextStats, rules: KindRules) -> float:
    """Share of the non-blank lines of at most `short_line_chars` characters (FineWeb's short_line_ratio)."""
    short_lines = sum(1 for line in stats.nonblank_lines if len(line) <= rules.short_line_chars)
    return short_lines / max(1, len(stats.nonblank_lines))


def _newline_word_ratio(stats: TextStats, _: KindRules) -> float:
    """Line breaks, those of blank lines too, per word (FineWeb's list_ratio)."""
    return stats.text.count("\n") / max(1, stats.word_count)


def _terminal_line_fraction(stats: TextStats, _: KindRules) -> float | None:
    """Share of the `sentence_lines` that end a sentence, of those that end one or are not code (a tutorial's
    listings are neither sentences nor junk; a sentence's last line that starts `with` or `from`, or ends in `.)`,
    is a sentence); None (not judged) for Thai or Lao text, which ends sentences with no mark."""
    if ends_sentences_without_marks(stats.text):
        return None
    judged = [ended for line, ended in stats.sentence_lines if ended or not looks_like_code(line)]
    return sum(judged) / max(1, len(judged))


def ends_sentence(line: str) -> bool:
    """Whether the line ends a sentence: its last mark is a `SENTENCE_END_MARK` (or Greek's question mark after a
    Greek letter), after which only closing brackets, citation or footnote marks and emoji may come (`...in 1850.[3]`,
    `(It rained.)`, `Done! 🎉`)."""
    tail = _AFTER_SENTENCE_END.sub("", line.rstrip()[-SENTENCE_END_TAIL_CHARS:])
    return SENTENCE_END_MARK.fullmatch(tail[-1:]) is not None or GREEK_QUESTION_END.search(tail) is not None


@dataclass(frozen=True)
class Rule:
    """A named quality check: the document fails when `measure` is above (`is_max`) or below its threshold,
    the `KindRules` field `threshold`; a threshold of None turns the rule off."""

    name: str
    measure: Callable[[TextStats, KindRules], float | None]  # None: the statistic means nothing for this text
    threshold: str
    is_max: bool

    def passes(self, stats: TextStats, rules: KindRules) -> bool:
        limit = getattr(rules, self.threshold)
        if limit is None:
            return True
        value = self.measure(stats, rules)
        if value is None:
            return True
        return value <= limit if self.is_max else value >= limit


RULES: tuple[Rule, ...] = (
    Rule("min_chars", lambda s, r: len(s.text), "min_chars", is_max=False),
    Rule("max_chars", lambda s, r: len(s.text), "max_chars", is_max=True),
    Rule("min_words", lambda s, r: s.non_symbol_word_count, "min_words", is_max=False),
    Rule("max_words", lambda s, r: s.non_symbol_word_count, "max_words", is_max=True),
    Rule("symbol_word_ratio", _symbol_word_ratio, "max_symbol_word_ratio", is_max=True),
    Rule("bullet_lines", _bullet_line_fraction, "max_bullet_line_fraction", is_max=True),
    Rule("ellipsis_lines", _ellipsis_line_fraction, "max_ellipsis_line_fraction", is_max=True),
    Rule("digit_fraction", _digit_fraction, "max_digit_fraction", is_max=True),
    Rule("mean_line_chars", _mean_line_chars, "max_mean_line_chars", is_max=True),
    Rule("long_line_fraction", _long_line_fraction, "max_long_line_fraction", is_max=True),
    Rule("alpha_word_fraction", _alpha_word_fraction, "min_alpha_word_fraction", is_max=False),
    Rule("stop_words", _stop_word_count, "min_stop_words", is_max=False),
    Rule("min_mean_word_chars", _mean_word_chars, "min_mean_word_chars", is_max=False),
    Rule("max_mean_word_chars", _mean_word_chars, "max_mean_word_chars", is_max=True),
    Rule("terminal_line_fraction", _terminal_line_fraction, "min_terminal_line_fraction", is_max=False),
    Rule("short_lines", _short_line_fraction, "max_short_line_fraction", is_max=True),
    Rule("newline_word_ratio", _newline_word_ratio, "max_newline_word_ratio", is_max=True),
    Rule(
        "duplicate_lines",
        lambda s, r: s.duplicate_lines(r.duplicates_skip_code_lines)[0],
        "max_duplicate_line_fraction",
        is_max=True,
    ),
    Rule(
        "duplicate_line_chars",
        lambda s, r: s.duplicate_lines(r.duplicates_skip_code_lines)[1],
        "max_duplicate_line_char_fraction",
        is_max=True,
    ),
    Rule("top_2gram", lambda s, r: s.top_ngram_char_fraction(2), "max_top_2gram_char_fraction", is_max=True),
    Rule("top_3gram", lambda s, r: s.top_ngram_char_fraction(3), "max_top_3gram_char_fraction", is_max=True),
    Rule("top_4gram", lambda s, r: s.top_ngram_char_fraction(4), "max_top_4gram_char_fraction", is_max=True),
    Rule("lorem_ipsum", lambda s, r: len(_LOREM_IPSUM.findall(s.text)), "max_lorem_ipsum", is_max=True),
    Rule("html_page", lambda s, r: HTML_PAGE_START.match(s.text) is not None, "max_html_page", is_max=True),
    Rule(
        "duplicate_10grams",
        lambda s, r: s.duplicate_ngram_char_fraction(10),
        "max_duplicate_10gram_char_fraction",
        is_max=True,
    ),
)


def failed_rule(text: str, rules: KindRules) -> str | None:
    """The name of the first rule the (normalised) text fails under `rules`, or None when it passes them all."""
    stats = TextStats(text)
    for rule in RULES:
        if not rule.passes(stats, rules):
            return rule.name
    return None
