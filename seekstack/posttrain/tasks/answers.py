"""Reading a final answer as math-verify (TRL's accuracy_reward, verl's math rewards) reads one: the last
`\\boxed{...}` wherever it stands in the answer, else the answer whole, inside `<answer>` tags or `$...$` maybe; then
one number, exactly, as a Fraction (`\\frac{1}{2}`, `1/2` and `0.5` alike; `57.0` is 57), or (read_items) a tuple, an
interval or a set of numbers (`(1, 2)`, `[0, 1)`, `\\{1, 2\\}`), compared by brackets and numbers (math-verify, laxer,
takes `(1, 2)` and `\\{1, 2\\}` for one another).

A closing `\\text{...}` is a unit, dropped as math-verify drops it (`57\\text{ apples}` is 57); a `\\text{...}` that is
the whole answer is read where its words are the number as sympy writes it (`\\text{57}`, `\\text{-1/2}`), as
math-verify compares them, as text, with the gold's value so written (`\\text{5.0}`, `\\text{2/4}` are no number).
Where it is stricter than math-verify: prose with no box around its number is no answer, but for what follows its last
answer label ("... so 48 + 9 = 57. The answer is 57.", "Answer: 57"), one number alone (math-verify takes the last
number of "56 or 57"), nor are units outside `\\text{...}` (`57 apples`), nor symbolic answers (`\\sqrt{4}`, `2^{10}`,
`\\pi`: math-verify evaluates them with sympy); of several boxes the last is the answer (math-verify reads them all as
one set, wrong against one number). Where it is laxer: `−3` (U+2212, the minus sign) is -3 (math-verify reads nothing),
and a leading `+` is read outside a box too. Every pattern here matches in time linear in the answer's length.
"""

from __future__ import annotations

import re
from collections import deque
from fractions import Fraction
from typing import NamedTuple

# Where an unbraced box's math ends: "$\boxed 57$", "\(\boxed 57\)", "<answer>\boxed 57</answer>"
MATH_END = re.compile(r"(?<!\\)\$|\\\)|\\\]|</answer>")  # not at "\$", a dollar sign
# \boxed{57} (\fbox{57}, text mode's box, as math-verify reads it too), or without braces (\boxed 57): then, as
# math-verify reads it, its argument is the rest of its math. An empty box ("\boxed{}", "\boxed{\,}", "$\boxed$") is
# no answer: the answer is the last box that holds something ("\boxed{5}\boxed{}" is 5)
LATEX_SPACE = r"\\(?:[ ,;:!]|q?quad(?![A-Za-z]))"  # LaTeX's spaces in math, nothing to the value: "\ ", "\,", "\quad"
BOX_COMMAND = r"\\(?:boxed|fbox)(?![A-Za-z])\s*+"  # the box's command and the spaces after it
EMPTY_ARGUMENT = rf"\{{(?:\s|{LATEX_SPACE})*+\}}"  # braces holding only spaces: "{}", "{ }", "{\,}"
BOXED = re.compile(rf"{BOX_COMMAND}(?!{EMPTY_ARGUMENT}|{MATH_END.pattern}|(?:\s|{LATEX_SPACE})*+\Z)")
# A box where BOXED finds none holding something: an empty one, dropped before the answer is read without a box
# ("The answer is 5 \boxed{}" is 5, as math-verify reads it; "\boxed{}" alone, "$\boxed{}$", hold no answer)
EMPTY_BOX = re.compile(rf"{BOX_COMMAND}(?:{EMPTY_ARGUMENT})?")
MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# LaTeX's sizing of parentheses (\left( \Big( \bigr); with its null delimiter "." too, \left. and \right., which draw
# nothing), its math styles (\displaystyle) and its declarations of a font ("\boxed{\bf 50}", \rm, \it, \cal, ...) or a
# size (\large, ...), nothing to the value (math-verify reads through them)
FONT = r"bf|it|rm|sf|tt|sl|sc|em|cal|mit|bfseries|itshape|rmfamily|sffamily|ttfamily|mdseries|upshape|normalfont"
SIZE = r"tiny|scriptsize|footnotesize|small|normalsize|large|Large|LARGE|huge|Huge"
STYLE = re.compile(
    rf"\\(?:(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])(?:\s*\.)?"
    rf"|(?:(?:display|text|script|scriptscript)style|{FONT}|{SIZE})(?![A-Za-z]))"
)
OPENING_SPACE = re.compile(rf"\A(?:\s|{LATEX_SPACE})+")  # before an answer ("\boxed{\,57\,}", "\boxed{\quad 57}")
# One after an answer, its whitespace stripped: then "\ " is a backslash alone ("\boxed{57\ }")
CLOSING_SPACE = re.compile(rf"(?:{LATEX_SPACE}|\\)\Z")
# What the answer equals, named ("x = 57", "a_{n} = 57", "\theta = 57", "\angle ABC = 57", "f(2) = 57"): the right
# side is the answer, as math-verify takes it. A name opens with a letter (Latin, or Greek as models write it:
# "\boxed{θ = 57}", "α_1 = 57", as math-verify reads them) or a LaTeX command, then letters (digits
# after one: "x1"), commands with arguments of no digit ("\overline{AB}"), subscripts ("x_1", "a_{12}"), arguments in
# parentheses ("f(2)"), primes. A number makes it an expression, no name: "2 + 55 = 57", "\frac{1}{2} = 57",
# "\frac12 = 57", "x \cdot 2 = 57". Names may be chained, as math-verify reads them: "x = y = 57" ("x = 56 = 57" not).
# A name approximately equal to the answer ("x \approx 57", "x ≈ 57") is read alike, as math-verify reads it, and so is
# the relation with no name before it ("\boxed{= 57}", "\boxed{\approx 57}": math-verify reads 57)
APPROX = r"\\approx(?![A-Za-z])|\u2248"
NAME_LETTER = "[A-Za-z\u0391-\u03a1\u03a3-\u03a9\u03b1-\u03c9\u03d1\u03d5\u03f5]"  # Latin and Greek (ϑ, ϕ, ϵ)
COMMAND = r"\\(?!approx(?![A-Za-z]))[A-Za-z]++"  # a LaTeX command in a name, not the relation \approx
# A command's argument, no digit but in a group inside it ("\overline{AB}", "\overline{A_{1}B}"), a subscript ("x_1",
# "a_{n+1}", "P_{\text{max}}", "x_\alpha") and a function's argument ("f(2)", "f(g(2))"): one group nested at most
ARGUMENT = r"\{(?:[^{}0-9=]|\{[^{}=]*+\})*+\}"
SUBSCRIPT = rf"_(?:\{{(?:[^{{}}=]|\{{[^{{}}=]*+\}})*+\}}|{NAME_LETTER}|[0-9]|{COMMAND})"
PARENTHESES = r"\((?:[^()=]|\([^()=]*+\))*+\)"
VARIABLE = re.compile(
    rf"(?:(?:(?:{COMMAND}|{NAME_LETTER}[0-9]*+)"
    rf"(?:{COMMAND}|{NAME_LETTER}[0-9]*+|{ARGUMENT}|{SUBSCRIPT}|{PARENTHESES}|['\s])*+)?"
    rf"(?:=|{APPROX})\s*)++"
)
# DAPO's "Answer: 57" (its prompt asks for that line; verl's math_dapo reads what follows, math-verify reads it too),
# and the sentence "The answer is 57." (lm-eval's gsm8k_cot reads the number after it; "The answer is: 57" too), as
# Minerva's "Final Answer: The final answer is 57. I hope it is correct." (lm-eval's minerva_math) writes both; in
# Markdown's bold maybe ("**Answer:** 57", "**Final Answer**", as chat models write them and math-verify reads them)
# or heading ("### Final Answer" on a line of its own, then 57); in Chinese, "答案是 57。", "最终答案：57" (lighteval's
# multilingual math metrics read its answer word 答案 and its colon)
ANSWER_WORDS = r"(?:(?:the\s+)?(?:final\s+)?answer|(?:最终)?答案)"
LABEL_END = r"(?:\s*[:：]|\s+is\b(?:\s*:)?|\s*[是为](?:\s*[:：])?)"
HEADING = r"#{1,6}[ \t]*"  # Markdown's, before a label
ANSWER_LABEL = re.compile(
    rf"(?i:(?:{ANSWER_WORDS}{LABEL_END}|\*\*{ANSWER_WORDS}{LABEL_END}?\*\*[:：]?|{HEADING}{ANSWER_WORDS}{LABEL_END}?"
    rf"|{ANSWER_WORDS}[ \t]*(?=\n))\s*)+"  # the words alone on their line too: a heading's after GSM8K's "####" went
)
# Where such a label opens after the working ("... so 48 + 24 = 72. The answer is 72.", gsm8k_cot's exemplars): the
# final answer follows the last one, as lm-eval's gsm8k_cot searches the whole reply for the sentence
LABEL_OPENING = re.compile(
    rf"(?<![A-Za-z0-9_*])(?:\*\*)?(?i:{ANSWER_WORDS}(?:{LABEL_END}|\*\*))|(?<!#){HEADING}(?i:{ANSWER_WORDS})"
)
GSM8K_MARKER = "####"  # GSM8K's solutions end "#### 72": the final answer after it (lm-eval's gsm8k strict-match)
PERIODS = (".", "\u3002")  # a sentence's closing period, or Chinese's "。", after a final answer
# what closes a reply's last sentence after its answer outside a box or math, as lm-eval's gsm8k_cot reads the
# sentence ("The answer is 5;"); inside them a closing period is the answer's ("\boxed{5.}", "$5.$"), which TRL's
# accuracy_reward reads as no number
SENTENCE_END = ".,;:!?\u3002"
# The sentence after Minerva's final answer, which minerva_math drops (its period too, or none: a reply cut at it)
MINERVA_CLOSING = "I hope it is correct"
# A closing `\text{...}`, to a power maybe: the unit math-verify drops ("57\text{ apples}", "8\text{ cm}^2",
# "5\text{ cm}^{-1}"); a unit of several, by LaTeX spaces, "/" or \cdot maybe ("9.8\,\text{m}\,\text{s}^{-2}",
# "9.8\text{ m}/\text{s}^2", "9.8\,\mathrm{m\,s^{-2}}": one group inside), is dropped whole as math-verify drops it, up
# to MAX_UNITS of them
TEXT = r"\\(?:text(?:bf|it|rm|normal)?|mbox|math(?:rm|it|bf))"  # text in math, as math-verify reads a unit in it
PERCENT_WORD = r"(?:percent(?:age)?|pct)(?![A-Za-z])"  # what math-verify reads for "%": no unit (PERCENT)
TEXT_UNIT = re.compile(
    rf"{TEXT}\s*\{{(?!\s*{PERCENT_WORD}\s*\}})(?P<words>(?:[^{{}}]|\{{[^{{}}]*+\}})*+)\}}"
    r"(?:\^\s*(?:[0-9]|\{\s*[+\-\u2212]?[0-9]+\s*\}))?\Z"
)
UNIT_PRODUCTS = ("/", "\\cdot")  # between a unit's parts ("\text{m}/\text{s}", "\text{N} \cdot \text{m}")
MAX_UNITS = 4  # parts of a unit dropped, at most (kg m^2 s^-2 is 3), so that reading stays linear
# A closing degree sign, which math-verify drops as a unit ("30^\circ", "30^{\circ}", "30°", gensymb's "30\degree")
DEGREES = re.compile(r"(?:\^\s*(?:\\circ|\{\s*\\circ\s*\})|\u00b0|\\degree)\Z")
# The brackets of a tuple or an interval ("(1, 2)", "[0, 1)") and of a set ("\{1, 2\}"), as math-verify reads them
OPENINGS, CLOSINGS = ("(", "[", "\\{"), (")", "]", "\\}")
# A number plus or minus ("\pm 5", "\mp 5", "±5"): the set of both, {-5, 5}, as math-verify reads it
PLUS_MINUS = re.compile(r"(?:\\(?:pm|mp)(?![A-Za-z])|[\u00b1\u2213])\s*")
MAX_ITEMS = 100  # numbers of a tuple or a set read, at most: a longer one is no answer (and read in bounded time)
# Between thousands: ",", ",\!" (the MATH dataset's answers, "10,\!000": a comma less its space after it), "{,}",
# LaTeX's thin space "\,", a space, a thin or narrow no-break space (SI's "1 000"), a no-break space (U+00A0, as French
# text groups them)
THOUSANDS_SEPARATOR = r",\\!|,|\{,\}|\\,|[ \u00a0\u2009\u202f]"
# ASCII digits, in thousands of three by a THOUSANDS_SEPARATOR maybe ("1,000", not "1,00"); a decimal part maybe.
UNSIGNED = rf"(?:[0-9]{{1,3}}(?:(?:{THOUSANDS_SEPARATOR})[0-9]{{3}})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+"
# A mixed number's whole part, before a fraction of an unsigned top ("1\frac{1}{2}", "1 \frac12", "1\ \frac12", and
# "1\,\frac12" with a LaTeX space as math-verify reads it)
WHOLE = r"(?P<whole>[0-9]+)(?:\s|\\[ ,;:])*(?=\\[cdt]?frac\s*\{?\s*[0-9.])"
# Signs, and the whitespace LaTeX ignores or a LaTeX space after each ("- 5", "-\,5", "\frac{- 1}{2}", "--5", "-+5", as
# math-verify reads them: --5 is 5, -+5 is -5)
SIGN = rf"(?:[+\-\u2212](?:\s|{LATEX_SPACE})*+)*+"
# \frac{a}{b}, \dfrac, \tfrac, \cfrac (amsmath's, which math-verify reads too), \frac12; spaces around its arguments
# as LaTeX takes them ("\frac 12", "\frac {1} {2}")
FRACTION = (
    rf"\\[cdt]?frac\s*(?:\{{\s*(?P<top_sign>{SIGN})(?P<top>{UNSIGNED})\s*\}}|(?P<top_digit>[0-9]))"
    rf"\s*(?:\{{\s*(?P<bottom_sign>{SIGN})(?P<bottom>{UNSIGNED})\s*\}}|(?P<bottom_digit>[0-9]))"
)
# Scientific notation's power of ten after a number ("3 \times 10^{5}", "3\cdot 10^5", "1.5 \times 10^{-3}"), a
# fraction ("\frac{1}{2} \cdot 10^{3}", "3/2 \cdot 10^{3}": 500 and 1500, as math-verify reads them) too; an exponent
# of up to 3 digits, a number int reads
POWER = r"\s*\\(?:times|cdot)\s*10\s*\^\s*(?:\{\s*(?P<exponent>[+\-\u2212]?[0-9]{1,3})\s*\}|(?P<exponent_digit>[0-9]))"
DOLLAR = r"(?:\\?\$(?:\s|\\[ ,;:!])*)?"  # a dollar sign before the number or its sign, spaced maybe ("$5", "-\$ 5")
# "%", "\%", and the words math-verify reads for "%" ("50 percent", "50 percentage", "50 pct", "50\text{ percent}"; not
# a unit)
PERCENT = rf"\\?%|{PERCENT_WORD}|{TEXT}\s*\{{\s*{PERCENT_WORD}\s*\}}"
RATIO = "[/:]"  # "3/2", and a ratio "3:2" as math-verify reads it: 3/2 ("10:30" is 1/3, not a time)
# Parentheses or square brackets around a number, nested maybe, a sign before each pair maybe ("(42)", "-(42)",
# "-(-42)", "-(-(42))", "-\left(\frac{1}{2}\right)", "[42]", "-[(42)]"), as math-verify reads them (a bracket of one
# number is that number there; of two, "[1, 2]", an interval: read_items): the opening ones with their signs, and
# (matched on the answer reversed, so in linear time) the closing ones
OPENING_PARENTHESES = re.compile(rf"(?:{SIGN}[(\[]\s*+)*+")
CLOSING_PARENTHESES = re.compile(r"\s*+(?:[)\]]\s*+)*+")
PAIRS = {"(": ")", "[": "]"}  # each opening of OPENING_PARENTHESES and the closing that ends it
COMMA = re.compile(r"(?<!\\),")  # not LaTeX's thin space "\,"
# NUMBER's groups of signs ("-\frac{1}{-2}", "1/-2"): an odd number of minus signs in them makes the number negative
SIGNS = ("sign", "top_sign", "bottom_sign", "denominator_sign")
NUMBER = re.compile(
    rf"{DOLLAR}(?P<sign>{SIGN}){DOLLAR}(?:(?:{WHOLE})?{FRACTION}"
    rf"|(?P<numerator>{UNSIGNED})(?:\s*{RATIO}\s*(?P<denominator_sign>{SIGN})(?P<denominator>{UNSIGNED}))?)(?:{POWER})?"
    rf"(?P<percent>(?:\s|\\[ ,;:!])*(?:{PERCENT}))?"  # a space before it as math-verify reads it ("5 %"), SI's "5\,\%"
)


def final_answer(answer: str) -> str | None:
    """The text of the final answer: the contents of the last `\\boxed{...}` (its braces nested; `\\boxed 57` to the
    end of its math, or of the answer less a closing period), else of the last `<answer>...</answer>`, else `answer`;
    after its last `####` (GSM8K's), from its last `Answer:` label or sentence `The answer is` (`Final Answer: The
    final answer is 57. I hope it is correct.`, Minerva's; `**Answer:**`, Markdown's bold; `答案是`, `最终答案：`,
    Chinese), outside math delimiters (`$57$`; a period inside them kept, `$57.$`), Markdown's bold (`**57**`) and the
    sentence's closing period (`.`, `。`); empty boxes dropped when no box holds something. None when the last box is
    never closed, or when nothing is left (`\\boxed{}`, `$\\boxed{}$`)."""
    box = _last(BOXED, answer)
    if box is not None:
        start = box.end()
        if answer.startswith("{", start):
            return _braced(answer, start + 1)
        end = MATH_END.search(answer, start)  # the box's math ends there, or the answer's sentence with its period
        return answer[start : end.start()].strip() if end else _less_period(answer[start:])
    text = _from_last_label(_tagged(EMPTY_BOX.sub("", answer)).rpartition(GSM8K_MARKER)[2])
    text = _less_period(_less_sentence_end(text).removesuffix(MINERVA_CLOSING))
    labelled = ANSWER_LABEL.match(text)
    if labelled is None:  # "**The answer is 57.**", the sentence in bold
        text = _unadorned(text)
        labelled = ANSWER_LABEL.match(text)
    text = _unadorned(text[labelled.end() if labelled else 0 :])
    for opening, closing in MATH_DELIMITERS:
        if len(text) >= len(opening) + len(closing) and text.startswith(opening) and text.endswith(closing):
            return text[len(opening) : len(text) - len(closing)].strip() or None
    return text or None


def _from_last_label(text: str) -> str:
    """`text` from where its last answer label opens (`So the answer is 57.`), else `text` whole."""
    label = _last(LABEL_OPENING, text)
    return text[label.start() :] if label is not None else text


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last match of `pattern` in `text`, or None; keeping none of the others (a list of 10,000 boxes filled the
    heap enough to start a full garbage collection, ~1 s in a large process)."""
    last = deque(pattern.finditer(text), maxlen=1)
    return last[0] if last else None


def _unadorned(text: str) -> str:
    """`text` less the whitespace around it, a closing period and Markdown's bold around it whole (`**57**.`)."""
    text = _less_period(text)
    if len(text) > 4 and text.startswith("**") and text.endswith("**"):
        return _less_period(text[2:-2])
    return text


def _less_sentence_end(text: str) -> str:
    """`text` less the whitespace and the punctuation (SENTENCE_END) that close it (`5;`, `5.;`, `$5$ !`)."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] in SENTENCE_END):
        end -= 1
    return text[:end]


def _less_period(text: str) -> str:
    """`text` less the whitespace around it and the period closing its sentence (`.`, or `。`, Chinese's)."""
    text = text.strip()
    return text[:-1].strip() if text.endswith(PERIODS) else text


def _tagged(answer: str) -> str:
    """The text inside the last `<answer>...</answer>`, else `answer`."""
    closing = answer.rfind("</answer>")
    opening = answer.rfind("<answer>", 0, max(closing, 0))
    return answer[opening + len("<answer>") : closing] if opening >= 0 else answer


def _braced(text: str, start: int) -> str | None:
    """The text from `start` to the brace closing the one just before it, or None when none does."""
    depth = 1
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index].strip()
    return None


class Reading(NamedTuple):
    """The number a final answer gives, and whether it was written as a percentage ("5%": 5, True)."""

    value: Fraction
    percent: bool


def read_number(answer: str) -> Fraction | None:
    """The number `answer` gives as its final answer (`final_answer`), or None when it gives none, or more than one
    thing. Read: a sign (`-`, `+`, `−`; whitespace after it), ASCII digits with thousands by `,`, `{,}`, `\\,` or a
    space, a decimal part, `a/b` and `\\frac{a}{b}` (`\\dfrac`, `\\tfrac`, `\\cfrac`, `\\frac12`), a mixed number
    (`1\\frac{1}{2}` is 3/2), `a \\times 10^{n}` (`\\cdot`; `a` a fraction too); around it `x = ` (`\\theta = `,
    `f(2) = `), `$` or `\\$` before, `%` or `\\%` after (dropped: "5%" is 5; `reads_as` tries 0.05 too), a
    `\\text{...}` unit or `^\\circ` after (dropped), `\\left(...\\right)`, `(...)` or `[...]`, nested maybe, a sign
    before each pair maybe (`-(-42)` is 42; no comma inside). A number with more digits than `int` reads
    (sys.get_int_max_str_digits) or a zero denominator is a wrong answer, not an error."""
    reading = read_answer(answer)
    return reading.value if reading else None


def reads_as(answer: str, value: Fraction | int, percent: bool = False) -> bool:
    """Whether `answer` gives `value` as its final answer (`read_number`), `value` written as a percentage when
    `percent` (a gold "5%"). As math-verify, a percentage on one side is its hundredth ("5%" against 0.05, 0.05 against
    a gold 5%), and its number too where that is whole ("5%" against 5: the sign left off or added; "0.5%" is not 0.5
    nor "12.5%" 12.5, as math-verify compares them); two percentages compare as written."""
    reading = read_answer(answer)
    if reading is None:
        return False
    if reading.percent == percent:
        return reading.value == value
    written, other = (Fraction(reading.value), value) if reading.percent else (Fraction(value), reading.value)
    return other == written / 100 or (other == written and written.denominator == 1)


def read_answer(answer: str) -> Reading | None:
    """The number `answer` gives as read_number reads it, and whether it was written as a percentage; None when it
    gives no number (a tuple, an interval or a set of them too: `read_items`; a set of one number is that number)."""
    text = _answer_text(answer)
    if text is None:
        return None
    items = _items(text)
    if items is not None:  # a set of one number is that number, as math-verify compares {5} (and \pm 0) with 5
        one = items.brackets == "{}" and len(items.values) == 1
        return Reading(items.values[0], percent=False) if one else None
    unparenthesized = _unparenthesized(text)
    if unparenthesized is None:
        return None
    negative, inside = unparenthesized
    reading = _number(inside)
    return reading._replace(value=-reading.value) if reading and negative else reading


def _unparenthesized(text: str) -> tuple[bool, str] | None:
    """`text` less the parentheses or square brackets around it whole and the signs before them (`-(-(42))`, `[42]`:
    `42`), with whether those signs negate it (an odd number of minus signs); `text` whole where the closing ones do
    not end the opening ones (`((42)`, `(42]`). None for a comma in them (`{,}` too), which separates numbers there
    as in `(1,234)`, a pair: math-verify reads `-(1,234)` and `((1,234))` as no number alike."""
    opening = OPENING_PARENTHESES.match(text)
    closing = CLOSING_PARENTHESES.match(text[::-1])
    assert opening is not None and closing is not None  # both match the empty string
    closings = [PAIRS[bracket] for bracket in opening.group() if bracket in PAIRS]
    if closings != [bracket for bracket in closing.group() if bracket in PAIRS.values()]:
        return False, text  # "((5)", "(5]": no number
    inside = text[opening.end() : len(text) - closing.end()].strip()
    if closings and COMMA.search(inside):
        return None
    return _negates(opening.group()), inside


class Items(NamedTuple):
    """A tuple, an interval or a set of numbers: its brackets ("()", "[)", ...; "{}" a set) and its numbers, in order
    (a set's sorted, each once)."""

    brackets: str
    values: tuple[Fraction, ...]


def read_items(answer: str) -> Items | None:
    """The tuple, interval or set of numbers `answer` gives as its final answer (`final_answer`), as math-verify reads
    one: two to MAX_ITEMS numbers (as read_number reads one, no percentage) between commas, inside `(` or `[` and `)` or
    `]` (`\\left`, `\\right` dropped), or inside `\\{` and `\\}` (a set: order and repeats do not matter), or
    `\\pm a` (`\\mp`, `±`: the set {-a, a}); a set of one number too (`\\{5\\}`, `\\{5, 5\\}`), which read_answer
    reads as that number; None for anything else, a number alone too."""
    text = _answer_text(answer)
    return _items(text) if text is not None else None


def _answer_text(answer: str) -> str | None:
    """The final answer's text less LaTeX spaces around it (`\\boxed{\\,5\\,}`, as math-verify reads it; a closing
    period is kept: `\\boxed{5.}` is no number, as TRL's accuracy_reward reads it), its sizing and fonts (STYLE:
    `\\boxed{\\bf 5}`), braces around it whole (`\\boxed{{5}}`, a TeX group math-verify reads through), unit and
    `x = `; None when the last box is never closed."""
    text = final_answer(answer)
    if text is None:
        return None
    text = _less_latex_space(OPENING_SPACE.sub("", text))
    if text.startswith("{") and text.endswith("}") and _braced(text, 1) == text[1:-1].strip():
        text = text[1:-1].strip()
    text = _without_unit(STYLE.sub("", text))
    named = VARIABLE.match(text)
    return text[named.end() if named else 0 :].strip()


def _items(text: str) -> Items | None:
    """`text` read as a tuple, an interval or a set of numbers (`read_items`), or None."""
    plus_minus = PLUS_MINUS.match(text)
    if plus_minus is not None:
        number = _number(text[plus_minus.end() :])
        return None if not number or number.percent else Items("{}", tuple(sorted({-number.value, number.value})))
    opening = next((bracket for bracket in OPENINGS if text.startswith(bracket)), None)
    closing = next((bracket for bracket in CLOSINGS if text.endswith(bracket)), None)
    if opening is None or closing is None or (opening == "\\{") != (closing == "\\}"):
        return None
    parts = text[len(opening) : -len(closing)].split(",", MAX_ITEMS)
    least = 1 if opening == "\\{" else 2  # a set of one number: read_answer reads it as that number
    if not least <= len(parts) <= MAX_ITEMS or len(text) < len(opening) + len(closing):
        return None
    numbers = [_number(part.strip()) for part in parts]
    if any(not number or number.percent for number in numbers):
        return None
    values = tuple(number.value for number in numbers)
    return Items("{}", tuple(sorted(set(values)))) if opening == "\\{" else Items(opening + closing, values)


def _number(text: str) -> Reading | None:
    """`text` read whole as a NUMBER, or None."""
    match = NUMBER.fullmatch(text)
    if match is None or (match["whole"] and match["bottom_sign"]):  # a whole before a signed fraction: no mixed number
        return None
    top = match["numerator"] or match["top"] or match["top_digit"]
    bottom = match["denominator"] or match["bottom"] or match["bottom_digit"] or "1"
    exponent = int((match["exponent"] or match["exponent_digit"] or "0").replace("\u2212", "-"))
    try:
        value = (_fraction(match["whole"] or "0") + _fraction(top) / _fraction(bottom)) * Fraction(10) ** exponent
    except (ValueError, ZeroDivisionError):
        return None
    negative = _negates("".join(match[group] or "" for group in SIGNS))
    return Reading(-value if negative else value, bool(match["percent"]))


def _negates(signs: str) -> bool:
    """Whether `signs` hold an odd number of minus signs (`-`, `−`)."""
    return (signs.count("-") + signs.count("\u2212")) % 2 == 1


def _without_unit(text: str) -> str:
    """`text` less its closing `\\text{...}` (TEXT_UNIT), of up to MAX_UNITS parts, each with the LaTeX space before
    it (`12\\,\\text{cm}`, `9.8\\,\\text{m}\\,\\text{s}^{-2}`, `9.8\\text{ m}/\\text{s}^2`), and its degree sign
    (DEGREES) and the LaTeX space before it (`30\\,^\\circ`), as math-verify drops a unit; the words inside
    `\\text{...}` when they are all there is, a degree sign after them maybe (`\\text{57}^\\circ` is 57), and are the
    number as sympy writes it (`_sympy_written`)."""
    for part in range(MAX_UNITS):
        unit = TEXT_UNIT.search(text)
        if unit is None:
            break
        rest = _less_latex_space(text[: unit.start()])
        if not rest:  # the words of a unit after none, as math-verify reads them ("\\text{57}\\text{ cm}" not)
            text = "" if part else _sympy_written(unit["words"])
            break
        product = next((product for product in UNIT_PRODUCTS if rest.endswith(product)), None)
        factor = _less_latex_space(rest.removesuffix(product)) if product else rest
        text = factor if product and TEXT_UNIT.search(factor) else rest
    degrees = DEGREES.search(text)
    if degrees is None:
        return text
    text = _less_latex_space(text[: degrees.start()])
    words = TEXT_UNIT.match(text)  # the words of a unit alone before the degree sign ("\\text{30}^\\circ" is 30)
    return _sympy_written(words["words"]) if words and words.end("words") == len(text) - 1 else text


def _sympy_written(words: str) -> str:
    """The words of a `\\text{...}` that is the whole answer, less their whitespace, where they are a number as sympy
    writes one (`57`, `-3`, `1/2`: an integer, or a fraction in lowest terms), else "", no number: math-verify reads
    them as a symbol, which verifies only where its name is the gold's value written so (`5.0`, `+5`, `05`, `2/4`,
    `1,000` verify against nothing)."""
    plain = re.sub(r"\s", "", words)
    try:
        return plain if str(Fraction(plain)) == plain else ""
    except (ValueError, ZeroDivisionError):
        return ""


def _less_latex_space(text: str) -> str:
    """`text` less its closing whitespace and one LaTeX space (LATEX_SPACE): `\\,`, `\\;`, `\\:`, `\\!`, `\\ `,
    `\\quad` or `\\qquad`."""
    text = text.rstrip()
    space = CLOSING_SPACE.search(text)
    return text[: space.start()].rstrip() if space else text


def _fraction(number: str) -> Fraction:
    """An UNSIGNED number as a Fraction (thousands separators dropped); a ValueError when it groups its thousands by
    two separators ("1,000 000"), which math-verify refuses (",\\!" is "," less a space: "1,\\!000,000" is one)."""
    if len({separator.removesuffix("\\!") for separator in re.findall(THOUSANDS_SEPARATOR, number)}) > 1:
        raise ValueError(f"{number!r}: thousands by two separators")
    plain = re.sub(THOUSANDS_SEPARATOR, "", number)
    return Fraction(plain)
