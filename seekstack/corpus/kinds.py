"""What kind of text a document is — code, prose, or CJK (Chinese, Japanese, Korean) — its language, and how
to split it into words when it has no spaces.

A document whose name ends in a source-code suffix (`CODE_SUFFIXES`: `.py`, `.c`, `.rs`, ...; through a compression
suffix, `mod.py.gz`) is code in that language, whatever its text; a Python module holding pages of documentation in
strings is still code. A README (`README`, `README.Debian`, `readme.txt`) or man page (`ls.1`, `printf.3`) is never
code: man pages indent every line, and READMEs their commands, and such lines read as code. Otherwise detection reads
the first `SAMPLE_CHARS` characters:
  cjk    Han, kana or Hangul characters are >= `CJK_MIN_SHARE` of the words (each such character one word, as
         `words` splits text), unless it is code in a language its markers name whose lines that read as code hold
         half its characters or more and whose CJK characters are under `CODE_MAX_CJK_SHARE` of its non-space
         characters (a Python module commented and named in Chinese); language `ja` when kana are
         >= `KANA_MIN_SHARE` of those characters, `ko` when Hangul is most of them, `zh` otherwise.
  code   >= `CODE_MIN_LINE_SHARE` of the non-blank lines look like code (`looks_like_code`: a keyword at the
         start, an ending in `{ } ; ) :`, an indented line with an operator or a trailing comma; a line longer
         than `CODE_MAX_LINE_CHARS` only when dense with brackets and operators); language: the one whose
         markers occur most, `unknown` when none does.
  prose  everything else; language `en` when >= `ENGLISH_MIN_STOPWORD_SHARE` of the words are English
         stop words, `vi` when >= `VIETNAMESE_MIN_WORD_SHARE` of them hold a letter only Vietnamese writes (`ơ`,
         `ư`, `ả`, `ự`), `und` (undetermined, BCP 47) otherwise, with the ISO 15924 code of the script most of its
         letters are written in when that is not Latin (`und-Cyrl`, `und-Arab`, `und-Deva`, `und-Thai`), so that
         the report counts Russian, Arabic or Hindi prose apart.
Words: a run of non-space characters, except that every CJK character is a word of its own (the unit the
length and repetition rules count for text without spaces; word segmentation would need a dictionary); Korean, which
writes spaces between its words, has its n-grams counted in those words (`spaced_words`), and Japanese in the runs of
one script its words are written in (`japanese_words`: a kanji stem, its kana ending, a katakana loanword). Thai, Lao,
Tibetan (whose tsheg ་ parts syllables, not words), Myanmar and Khmer, also written without spaces between words, keep
their runs (phrases; their characters carry combining vowels and marks), and the rules count their words by
characters instead (`written_without_spaces`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Literal, NamedTuple

from seekstack.compression import source_kind, uncompressed

Kind = Literal["code", "prose", "cjk"]
KINDS: tuple[Kind, ...] = ("code", "prose", "cjk")

SAMPLE_CHARS = 20_000
CJK_MIN_SHARE = 0.3
UNSPACED_MIN_SHARE = 0.3
UNSPACED_WORD_CHARS = 4  # a Thai word's length in code points, vowel and tone marks included (4.0 in our test text)
KANA_MIN_SHARE = 0.1
CODE_MIN_LINE_SHARE = 0.35
CODE_MAX_LINE_CHARS = 160  # a longer line is a paragraph of prose, whatever it ends with ...
CODE_MIN_SYMBOL_SHARE = 0.08  # ... unless this share of its characters are brackets and operators
# code commented and named in CJK stays code while CJK characters are under this share of its non-space characters (a
# Python module commented in Chinese: 0.51); CJK posts whose lines merely hold a marker (`@小明`, `=>`) hold 0.8 or more
CODE_MAX_CJK_SHARE = 2 / 3
ENGLISH_MIN_STOPWORD_SHARE = 0.08
VIETNAMESE_MIN_WORD_SHARE = 0.2  # of the words holding a letter Vietnamese alone writes (half of its prose's hold one)
SCRIPT_SAMPLE_CHARS = 4000  # characters of the sample whose letters' script is read
# ISO 15924 codes of the scripts prose is written in besides Latin (and CJK's), by the first word of their letters'
# Unicode names (`CYRILLIC SMALL LETTER A`, `DEVANAGARI LETTER KA`)
SCRIPT_CODES = {
    "CYRILLIC": "Cyrl", "GREEK": "Grek", "ARMENIAN": "Armn", "GEORGIAN": "Geor", "HEBREW": "Hebr", "ARABIC": "Arab",
    "SYRIAC": "Syrc", "THAANA": "Thaa", "DEVANAGARI": "Deva", "BENGALI": "Beng", "GURMUKHI": "Guru",
    "GUJARATI": "Gujr", "ORIYA": "Orya", "TAMIL": "Taml", "TELUGU": "Telu", "KANNADA": "Knda", "MALAYALAM": "Mlym",
    "SINHALA": "Sinh", "THAI": "Thai", "LAO": "Laoo", "TIBETAN": "Tibt", "MYANMAR": "Mymr", "KHMER": "Khmr",
    "ETHIOPIC": "Ethi", "MONGOLIAN": "Mong", "CHEROKEE": "Cher", "CANADIAN": "Cans", "TIFINAGH": "Tfng",
    "NKO": "Nkoo", "ADLAM": "Adlm", "VAI": "Vaii", "OL": "Olck", "MEETEI": "Mtei", "LIMBU": "Limb", "LISU": "Lisu",
    "JAVANESE": "Java", "BALINESE": "Bali", "SUNDANESE": "Sund", "BUGINESE": "Bugi", "CHAM": "Cham", "YI": "Yiii",
}  # fmt: skip

# An HTML page opens so, after blank space and comments: its markup, scripts and menus are no text to train on. A
# comment ends at its first `-->`, for good (possessive): linear time after many comments, where a comment read on
# through the next ones made the ways to split them exponential
HTML_PAGE_START = re.compile(r"(?i)(?:\s|<!--.*?-->|<\?xml[^>]*>)*+<(?:!doctype\s+html|html[\s>])", re.DOTALL)

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_KANA = "\u3040-\u30ff\uff66-\uff9f"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
CJK_CHAR = re.compile(f"[{_HAN}{_KANA}{_HANGUL}]")
_KANA_CHAR = re.compile(f"[{_KANA}]")
_HANGUL_CHAR = re.compile(f"[{_HANGUL}]")
# Thai, Lao, Tibetan, Myanmar, Khmer: scripts that put no spaces between words (only between phrases or sentences)
_UNSPACED = "\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u19e0-\u19ff"
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
# Every script written without spaces between words, as ranges for a character class: CJK and the four above
UNSPACED_SCRIPT_RANGES = f"{_HAN}{_KANA}{_HANGUL}{_UNSPACED}"
# Thai and Lao: of those, the ones that end a sentence with no mark either (a space or a line break ends it)
_UNMARKED_SENTENCE_CHAR = re.compile("[\u0e00-\u0eff]")
_LETTER = re.compile(r"[^\W\d_]")
# The Latin letters Vietnamese alone writes: the horned ơ and ư, and the vowels with a hook above, or a tone mark over
# a circumflex, breve or horn (U+1EA0-U+1EF9, less ẹ ọ ẽ ỹ, which Yoruba and Guarani write too, and ị ụ, which Igbo
# writes in most sentences); not đ, which Croatian, Serbian and Northern Sami write (of 3,013 Vietnamese documents,
# 2,825 hold such letters on `VIETNAMESE_MIN_WORD_SHARE` of their words, 2,841 with đ ị ụ)
_VIETNAMESE_LETTER = re.compile(
    "[\u01a0\u01a1\u01af\u01b0\u1ea0-\u1eb7\u1eba\u1ebb\u1ebe-\u1ec9\u1ece-\u1ee3\u1ee6-\u1ef7]"
)
_NON_LATIN_LETTER = re.compile(r"[^\W\d_A-Za-z\u00aa\u00b5\u00ba\u00c0-\u024f\u1e00-\u1eff]")
ZERO_WIDTH_SPACE = "\u200b"
_CJK_WORD = re.compile(f"[{_HAN}{_KANA}{_HANGUL}]|[^\\s{_HAN}{_KANA}{_HANGUL}]+")
# Japanese text's runs of one script: kanji (with the iteration mark 々), hiragana, katakana (with the prolonged sound
# mark ー), Hangul, and anything else but spaces (punctuation, Latin words, digits)
_JAPANESE_WORD = re.compile(
    f"[{_HAN}\u3005]+|[\u3040-\u309f]+|[\u30a0-\u30ff\uff66-\uff9f]+|[{_HANGUL}]+|[^\\s{_HAN}{_KANA}{_HANGUL}\u3005]+"
)

_CODE_LINE = re.compile(
    r"^\s*(?:def|class|import|from|return|elif|else|try|except|finally|with|raise|yield|async|await|assert"
    r"|#include|#define|#if|#endif|fn|let|mut|impl|pub|use|struct|enum|match|const|var|function|public|private"
    r"|protected|static|void|int|package|func|switch|case|break|continue|throw|catch|echo|fi|done|esac)\b"
    r"|[{};)]\s*$|:\s*$|^\s*[}\])]"
    r"|^(?:\s{2,}|\t).*(?:[=(\[{]|->|=>|::|,\s*$)"
)
_CODE_SYMBOL = re.compile(r"[{}()\[\];=<>]")
_CODE_LANGUAGES = {
    "python": re.compile(r"^\s*(?:def |class \w+.*:$|import \w|from \S+ import |elif |except\b|@[A-Za-z_])", re.M),
    "c": re.compile(r"^\s*#include\b|^\s*(?:int|void|char|static|struct)\b.*[;{)]\s*$", re.M),
    "rust": re.compile(r"^\s*(?:pub |fn |let (?:mut )?|impl\b|use \w+::|#\[)", re.M),
    "javascript": re.compile(r"^\s*(?:function\b|const |let |var |export |import .* from )|=>", re.M),
    "shell": re.compile(r"^#!.*\b(?:ba|z)?sh\b|^\s*(?:fi|done|esac|then|echo )\b|\$\{\w+\}", re.M),
}
CODE_SUFFIXES = {
    ".py": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".rs": "rust",
    ".go": "go", ".js": "javascript", ".ts": "typescript", ".java": "java", ".sh": "shell",
}  # fmt: skip
# The names of documentation that is never code: READMEs and man pages (a name, then a section 1-9; not a version
# such as `pkg-2.7.1`)
_DOCUMENTATION_NAME = re.compile(r"readme(?:\.|$)|.*[a-z_]\.[1-9]$")
_STOPWORDS = frozenset(
    "the of and to a in is that it for as with was on be by are this not or from at which an have has but can "
    "you your we they their will if when there been its these also more one all".split()
)


class DetectedKind(NamedTuple):
    """A document's kind and its language (`zh`, `ja`, `ko`; `en`, `und`, `und-Cyrl`; or a programming language)."""

    kind: Kind
    lang: str

    @property
    def label(self) -> str:
        """`kind/lang`, as the report counts documents."""
        return f"{self.kind}/{self.lang}"


def words(text: str) -> list[str]:
    """The text's words: runs parted by whitespace or a zero-width space (the invisible word break Khmer, Thai and
    Myanmar text sets between words, which `str.split` keeps in a word), and each CJK character alone."""
    if CJK_CHAR.search(text) is None:
        return spaced_words(text)
    return _CJK_WORD.findall(text.replace(ZERO_WIDTH_SPACE, " "))


def spaced_words(text: str) -> list[str]:
    """The text's runs parted by whitespace or a zero-width space, CJK characters kept in them: Korean's words
    (eojeol, `합니다.`), which it writes between spaces as English does, where Chinese and Japanese write none."""
    return text.replace(ZERO_WIDTH_SPACE, " ").split()


def japanese_words(text: str) -> list[str]:
    """Japanese text's words as its runs of one script: a kanji stem apart from its hiragana ending (`起` `きます`,
    `散歩` `します`), a katakana loanword, a punctuation mark, as dictionary segmenters (MeCab, Sudachi) part them
    closely enough for the n-gram rules without a dictionary: the polite ending `ます。` is not a word n-gram of its
    own."""
    return _JAPANESE_WORD.findall(text.replace(ZERO_WIDTH_SPACE, " "))


def japanese(text: str) -> bool:
    """True when kana are >= `KANA_MIN_SHARE` of the CJK characters among the text's first `SAMPLE_CHARS` characters,
    and Hangul not most of them."""
    sample = text[:SAMPLE_CHARS]
    cjk = len(CJK_CHAR.findall(sample))
    return bool(cjk) and len(_KANA_CHAR.findall(sample)) >= KANA_MIN_SHARE * cjk and not korean(sample)


def korean(text: str) -> bool:
    """True when Hangul is most of the CJK characters among the text's first `SAMPLE_CHARS` characters."""
    sample = text[:SAMPLE_CHARS]
    return len(_HANGUL_CHAR.findall(sample)) > len(CJK_CHAR.findall(sample)) / 2


def vietnamese(text: str) -> bool:
    """True when >= `VIETNAMESE_MIN_WORD_SHARE` of the words among the text's first `SAMPLE_CHARS` characters hold a
    letter only Vietnamese writes (`ơ`, `ư`, `ả`, `ấ`, `ự`; not `đ`, `ị`, `ụ`, which Croatian and Igbo write too); its
    words are syllables, written apart."""
    sample_words = spaced_words(text[:SAMPLE_CHARS])
    vietnamese_words = sum(1 for word in sample_words if _VIETNAMESE_LETTER.search(word))
    return bool(sample_words) and vietnamese_words >= VIETNAMESE_MIN_WORD_SHARE * len(sample_words)


def written_without_spaces(text: str) -> bool:
    """True for Thai, Lao, Tibetan, Myanmar or Khmer text, scripts with no spaces between words: its `words` are
    phrases, whose number and length say little of the text's quality."""
    return _mostly_in(text, _UNSPACED_CHAR)


def ends_sentences_without_marks(text: str) -> bool:
    """True for Thai or Lao text, which ends a sentence with a space or a line break, never a punctuation mark."""
    return _mostly_in(text, _UNMARKED_SENTENCE_CHAR)


def _mostly_in(text: str, script: re.Pattern[str]) -> bool:
    """True when characters of `script` are >= `UNSPACED_MIN_SHARE` of the first `SAMPLE_CHARS` characters that are
    not spaces."""
    sample = "".join(text[:SAMPLE_CHARS].split())
    return bool(sample) and len(script.findall(sample)) >= UNSPACED_MIN_SHARE * len(sample)


def looks_like_code(line: str) -> bool:
    """True for a line that reads as source code rather than as a sentence; a long line only when it is dense
    with brackets and operators (minified code), since a long line is otherwise a paragraph of prose."""
    if len(line) > CODE_MAX_LINE_CHARS:
        return len(_CODE_SYMBOL.findall(line)) >= CODE_MIN_SYMBOL_SHARE * len(line)
    return _CODE_LINE.search(line) is not None


def detect_kind(text: str, name: str = "") -> DetectedKind:
    """The kind and language of `text`, from the suffix of its `name` (a path or document id) when that names
    source code, else from its first `SAMPLE_CHARS` characters, never code when the name is a README's or a man
    page's (see the module docstring)."""
    suffix = source_kind(Path(name))  # through a compression's, as sources read files: `mod.py.xz` is code
    if suffix in CODE_SUFFIXES:
        return DetectedKind("code", CODE_SUFFIXES[suffix])
    documentation = _DOCUMENTATION_NAME.match(uncompressed(Path(name)).name.lower()) is not None
    sample = text[:SAMPLE_CHARS]
    lines = [line for line in sample.split("\n") if line.strip()]
    code_lines = [] if documentation else [line for line in lines if looks_like_code(line)]
    language = ""  # not code
    if lines and len(code_lines) >= CODE_MIN_LINE_SHARE * len(lines):
        counts = {lang: len(marker.findall(sample)) for lang, marker in _CODE_LANGUAGES.items()}
        best = max(counts, key=counts.__getitem__)
        language = best if counts[best] else "unknown"
    # code in a language its markers name, its lines most of the text, stays code whatever its comments and names are
    # written in (a Python module commented in Chinese) while CJK is not most of it; CJK prose whose lines merely read
    # as code (indented, ending in `)`, holding `=>`) or a tutorial's paragraphs around a listing stay CJK
    cjk = len(CJK_CHAR.findall(sample))
    non_space = len("".join(sample.split()))
    code_first = (
        language not in ("", "unknown")
        and 2 * sum(map(len, code_lines)) >= sum(map(len, lines))
        and cjk < CODE_MAX_CJK_SHARE * non_space
    )
    if cjk and cjk >= CJK_MIN_SHARE * len(words(sample)) and not code_first:
        if korean(sample):
            return DetectedKind("cjk", "ko")
        return DetectedKind("cjk", "ja" if japanese(sample) else "zh")
    if language:
        return DetectedKind("code", language)
    return DetectedKind("prose", prose_language(sample))


def prose_language(text: str) -> str:
    """The language of prose, from its first `SAMPLE_CHARS` characters: `en` by its English stop words, else `vi` by
    the letters only Vietnamese writes, else `und` with the ISO 15924 code of its script when that is not Latin."""
    sample = text[:SAMPLE_CHARS]
    sample_words = sample.lower().split()
    stopwords = sum(1 for word in sample_words if word.strip(".,;:!?\"'()") in _STOPWORDS)
    if sample_words and stopwords >= ENGLISH_MIN_STOPWORD_SHARE * len(sample_words):
        return "en"
    if vietnamese(sample):
        return "vi"
    script = script_code(sample)
    return "und" + (f"-{script}" if script else "")


def script_code(text: str) -> str:
    """The ISO 15924 code of the script of most letters among the text's first `SCRIPT_SAMPLE_CHARS` characters
    (`Cyrl`), or "" when that is Latin or a script not in `SCRIPT_CODES`."""
    if _NON_LATIN_LETTER.search(text, 0, SCRIPT_SAMPLE_CHARS) is None:  # the most of prose, found at C speed
        return ""
    letters = Counter(_LETTER.findall(text, 0, SCRIPT_SAMPLE_CHARS))  # each letter's script looked up once
    scripts: Counter[str] = Counter()
    for letter, count in letters.items():
        scripts[unicodedata.name(letter, "").partition(" ")[0]] += count
    script = scripts.most_common(1)[0][0] if scripts else ""
    return SCRIPT_CODES.get(script, "")
