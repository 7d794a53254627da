"""Rewrite an extracted answer into the LaTeX subset the parser reads.

Gold and prediction go through the same function. It handles Unicode math, thin spaces
and thousands separators, `\\text{}` units and words, `\\$`, `%`, degrees,
`\\dfrac`/`\\tfrac`, `\\left`/`\\right`, repeating decimals, E-notation, plain-text math
(`sqrt(2)`, `x**2`, `pi`), `\\varnothing` and `\\mathbb{R}`. Mixed numbers
(`3\\frac12`) are left to the parser, which reads them as 3 + 1/2.

All patterns are linear-time (the input is model output).
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

_UNICODE = {
    "½": "\\frac{1}{2}", "⅓": "\\frac{1}{3}", "⅔": "\\frac{2}{3}", "¼": "\\frac{1}{4}",
    "¾": "\\frac{3}{4}", "⅕": "\\frac{1}{5}", "⅖": "\\frac{2}{5}", "⅗": "\\frac{3}{5}",
    "⅘": "\\frac{4}{5}", "⅙": "\\frac{1}{6}", "⅚": "\\frac{5}{6}", "⅛": "\\frac{1}{8}",
    "⅜": "\\frac{3}{8}", "⅝": "\\frac{5}{8}", "⅞": "\\frac{7}{8}", "⅐": "\\frac{1}{7}",
    "⅑": "\\frac{1}{9}", "⅒": "\\frac{1}{10}",
    "π": "\\pi ", "∞": "\\infty ", "−": "-", "–": "-", "—": "-", "≥": "\\ge ", "≤": "\\le ",
    "≠": "\\ne ", "×": "\\times ", "·": "\\cdot ", "⋅": "\\cdot ", "÷": "/", "°": "",
    "∪": "\\cup ", "∩": "\\cap ", "∅": "\\emptyset ", "ℝ": "\\mathbb{R}", "∈": "\\in ",
    "±": "\\pm ", "∓": "\\mp ", "≈": "\\approx ", "⟨": "\\langle ", "⟩": "\\rangle ",
    "θ": "\\theta ", "α": "\\alpha ", "β": "\\beta ", "γ": "\\gamma ", "λ": "\\lambda ",
    "ω": "\\omega ", "φ": "\\phi ", "μ": "\\mu ", "σ": "\\sigma ", "Δ": "\\Delta ",
    "\u2009": " ", "\u202f": " ", "\u00a0": " ", "\u2002": " ", "\u2003": " ", "\u200b": "",
    "\u2061": "", "\u2062": "",
}  # fmt: skip
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_SUPERSCRIPT_RUN = re.compile(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+")
_SQRT_SIGN = re.compile(r"([√∛∜])\s*(\d+(?:\.\d+)?|[a-zA-Z]|\\[a-zA-Z]+)")

# Words that are mathematics, never units or prose.
MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp sqrt pi "
    "lim max min gcd lcm det mod infty inf infinity i e".split()
)
_FUNCTIONS = "arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|log|ln|exp"
_PLAIN_FUNCTION = re.compile(rf"(?<![\\a-zA-Z])({_FUNCTIONS})(?![a-zA-Z])")
_PLAIN_PI = re.compile(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])")
_PLAIN_INF = re.compile(r"(?<![\\a-zA-Z])(?:infinity|inf)(?![a-zA-Z])", re.IGNORECASE)
_TEXT_CMD = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|emph|hbox)"
    r"\s*\{"
)
_SPACES = re.compile(r"(?<!\\)\\[,;:> ]|\\q?quad|~|\\(?:hspace|vspace)\*?\{[^{}]*\}")
_SIZING = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![a-zA-Z])"
)
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_TRIG = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![a-zA-Z])")
_SCI = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)\s*[eE]\s*([+-]?\d+)(?![\w.])")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACE_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_OVERLINE = re.compile(r"(?<!\d)(\d*)\.(\d*)\\(?:overline|bar|dot)\s*\{(\d+)\}")
_DOT_DIGIT = re.compile(r"(?<!\d)(\d*)\.(\d*)\\dot\s*(\d)")
_PAREN_REPEAT = re.compile(r"(?<![\d)])(\d*)\.(\d*)\((\d+)\)")
_ELLIPSIS_DECIMAL = re.compile(r"(?<!\d)(\d*)\.(\d+)\s*(?:\.\.\.|\\ldots|\\cdots|\\dots|…)")
_AND_OR = re.compile(r"\s*,?\s*(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z])\s*")
_LEADING_APPROX = re.compile(r"^\s*(?:\\approx|=)\s*")
_IN_SET = re.compile(r"^\s*[a-zA-Z]\s*\\in\s*")
_EMPTY = re.compile(r"\\varnothing|\\emptyset|\\O(?![a-zA-Z])|\\\{\s*\\\}")
_REALS = re.compile(r"\\(?:mathbb|Bbb|mathbf)\s*\{?\s*R\s*\}?|\\R(?![a-zA-Z])")
_EMPTY_WORDS = re.compile(
    r"(?:there\s+(?:is|are)\s+)?(?:no\s+(?:real\s+)?solutions?|none|the\s+empty\s+set|empty\s+set)",
    re.IGNORECASE,
)


def _unicode(text: str) -> str:
    text = _SUPERSCRIPT_RUN.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPTS) + "}", text)
    text = _SQRT_SIGN.sub(
        lambda m: (
            {"√": "\\sqrt", "∛": "\\sqrt[3]", "∜": "\\sqrt[4]"}[m.group(1)] + "{" + m.group(2) + "}"
        ),
        text,
    )
    text = text.replace("√", "\\sqrt").replace("∛", "\\sqrt[3]").replace("∜", "\\sqrt[4]")
    if any(c in _UNICODE for c in text):
        text = "".join(_UNICODE.get(c, c) for c in text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).replace("⁄", "/")
    return text


def _match_close(text: str, i: int, left: str, right: str) -> int | None:
    """Index of the bracket closing text[i] (== left), or None."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == left:
            depth += 1
        elif text[j] == right:
            depth -= 1
            if depth == 0:
                return j
    return None


def _text_commands(text: str) -> str:
    """Unwrap `\\text{...}`-like commands; `\\text{ and }` becomes a comma."""
    for _ in range(50):
        m = _TEXT_CMD.search(text)
        if m is None:
            return text
        close = _match_close(text, m.end() - 1, "{", "}")
        if close is None:
            return text[: m.start()] + text[m.end() :]
        inner = text[m.end() : close].strip()
        if inner.lower() in ("and", "or", ",", "and/or"):
            inner = ","
        text = text[: m.start()] + " " + inner + " " + text[close + 1 :]
    return text


def _paren_to_braces(text: str, head: str, latex: str) -> str:
    """`sqrt(x+1)` -> `\\sqrt{x+1}` and `^(1/2)` -> `^{1/2}`, with parentheses matched."""
    out = []
    i = 0
    while True:
        j = text.find(head, i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        k = j + len(head)
        if head[0].isalpha() and j > 0 and (text[j - 1].isalpha() or text[j - 1] == "\\"):
            out.append(text[i:k])
            i = k
            continue
        while k < len(text) and text[k] == " ":
            k += 1
        close = _match_close(text, k, "(", ")") if k < len(text) and text[k] == "(" else None
        if close is None:
            out.append(text[i : j + len(head)])
            i = j + len(head)
            continue
        out.append(text[i:j] + latex + "{" + text[k + 1 : close] + "}")
        i = close + 1


def _repeating(whole: str, fixed: str, period: str) -> str:
    """`1.2(3)` as an exact fraction in LaTeX: whole.fixed followed by period repeated."""
    value = Fraction(int(whole or "0")) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _ellipsis_decimal(m: re.Match) -> str:
    """`0.333...` is 1/3 when its digits end in a period written at least twice."""
    whole, digits = m.group(1), m.group(2)
    for p in range(1, len(digits) // 2 + 1):
        tail = digits[-2 * p :]
        if tail[:p] == tail[p:]:
            start = len(digits) - 2 * p
            while start - p >= 0 and digits[start - p : start] == digits[start : start + p]:
                start -= p
            return _repeating(whole, digits[:start], digits[start : start + p])
    return m.group(0)


# Unit words that may follow a number, by canonical unit. Only these are dropped: any
# other trailing word ("thousand", "squared", "or more", "is wrong") may change the value,
# so the answer is left as written and does not parse.
_UNIT_GROUPS = {
    "mm": "mm millimeter millimeters millimetre millimetres",
    "cm": "cm centimeter centimeters centimetre centimetres",
    "m": "meter meters metre metres",
    "km": "km kilometer kilometers kilometre kilometres",
    "inch": "inch inches",
    "foot": "ft foot feet",
    "yard": "yd yds yard yards",
    "mile": "mi mile miles",
    "ms": "ms millisecond milliseconds",
    "second": "sec secs second seconds",
    "minute": "min mins minute minutes",
    "hour": "hr hrs hour hours",
    "day": "day days",
    "week": "wk wks week weeks",
    "month": "month months",
    "year": "yr yrs year years",
    "decade": "decade decades",
    "century": "century centuries",
    "mg": "mg milligram milligrams",
    "gram": "gram grams",
    "kg": "kg kilogram kilograms kilo kilos",
    "pound": "lb lbs pound pounds",
    "ounce": "oz ounce ounces",
    "ton": "ton tons tonne tonnes",
    "dollar": "dollar dollars usd",
    "cent": "cent cents",
    "euro": "euro euros",
    "degree": "deg degree degrees",
    "radian": "rad rads radian radians",
    "ml": "ml milliliter milliliters millilitre millilitres",
    "liter": "liter liters litre litres",
    "gallon": "gal gallon gallons",
    "quart": "qt quart quarts",
    "pint": "pt pint pints",
    "cup": "cup cups",
    "mph": "mph",
    "kph": "kph kmh",
    "unit": "unit units",
    "%": "percent",
}  # fmt: skip
_UNIT_CANON = {w: canon for canon, words in _UNIT_GROUPS.items() for w in words.split()}
_UNIT_MODIFIERS = frozenset("square sq cubic cu per".split())
# A plural count noun ("12 apples", "5 ways") is dropped too, unless it is one of these
# words that scale or negate the number or are not nouns at all.
_NOT_COUNT_NOUNS = frozenset(
    "thousands millions billions trillions hundreds dozens tens scores pairs couples times "
    "less plus minus was has does is this thus yes as us its unless always perhaps "
    "perimeters areas squares cubes powers factorials percents digits tenths hundredths "
    "thousandths halves thirds fourths quarters fifths sixths sevenths eighths ninths "
    "lots gross others otherwise besides".split()
)
_UNIT_TOKEN = re.compile(r"([A-Za-z]{2,})(?:/([A-Za-z]{1,}))?(\^\{?[23]\}?)?")
_UNIT_POWER = re.compile(r"\^\{?[23]\}?")


def _unit_token(w: str) -> str | None:
    """The canonical unit a trailing word names ("" for a modifier or power), else None."""
    if _UNIT_POWER.fullmatch(w):
        return ""
    m = _UNIT_TOKEN.fullmatch(w)
    if m is None:
        return None
    word, per, power = m.group(1), m.group(2), m.group(3) or ""
    low = word.lower()
    if per is not None:
        a = _UNIT_CANON.get(low)
        b = _UNIT_CANON.get(per.lower()) or {"s": "second", "h": "hour", "m": "m"}.get(per)
        return None if a is None or b is None else f"{a}/{b}{power}"
    if low in _UNIT_MODIFIERS:
        return "" if not power else None
    if word in _UNIT_CANON or low in _UNIT_CANON and word[0].isupper() and word[1:].islower():
        return _UNIT_CANON[low] + power
    return None


def split_units(text: str) -> tuple[str, str | None]:
    """`20 days` -> ("20", "day"); text without recognised trailing units -> (text, None)."""
    words = text.rstrip(". ").split(" ")
    cut = len(words)
    units: list[str] = []
    while cut > 1:
        w = words[cut - 1].strip(".")
        u = _unit_token(w) if w else ""
        if u is None:
            break
        if u:
            units.append(u)
        cut -= 1
    if cut == len(words) and len(words) == 2:  # one plural count noun: `12 apples`
        w = words[1].strip(".")
        if (
            len(w) >= 3
            and w.isalpha()
            and w.islower()
            and w.endswith("s")
            and w not in _NOT_COUNT_NOUNS
            and w not in MATH_WORDS
        ):
            cut, units = 1, ["count"]
    if cut == len(words) or cut == 0:
        return text, None
    head = " ".join(words[:cut]).rstrip()
    if head and (head[-1].isdigit() or head[-1] in "})" or head.endswith("\\pi")):
        # The key ignores powers and `square`/`cubic`: `cm^2` and `square cm` are one unit.
        return head, "*".join(_UNIT_POWER.sub("", u) for u in reversed(units)) or None
    return text, None


def _strip_units(text: str) -> str:
    """Drop trailing unit words after a number: `20 days`, `5 square units`, `9 min`."""
    return split_units(text)[0]


def _binomials(text: str) -> str:
    """`\\binom{n}{k}` -> `\\frac{(n)!}{(k)!((n)-(k))!}`: the parser would compute a binomial
    eagerly, however large; factorials stay unevaluated until their size is checked."""
    for _ in range(20):
        i = text.find("\\binom")
        if i < 0:
            return text
        j = i + len("\\binom")
        while j < len(text) and text[j] == " ":
            j += 1
        args = []
        for _ in range(2):
            if j < len(text) and text[j] == "{":
                close = _match_close(text, j, "{", "}")
                if close is None:
                    return text
                args.append(text[j + 1 : close])
                j = close + 1
            elif j < len(text) and text[j].isalnum():
                args.append(text[j])
                j += 1
            else:
                return text
            while j < len(text) and text[j] == " ":
                j += 1
        n, k = args
        text = text[:i] + f"\\frac{{({n})!}}{{({k})!(({n})-({k}))!}}" + text[j:]
    return text


# `\frac 1 3`: TeX takes one token per argument, spaces skipped. Rewritten with braces only
# when nothing that could be a third number follows (`\frac 1 3 2` stays ambiguous).
_BRACELESS_FRAC = re.compile(r"\\frac\s*([0-9A-Za-z])\s+([0-9A-Za-z])(?=\s*(?:$|[^\s0-9A-Za-z.]))")


# A one-letter unit in upright text after a thin space, ending the answer: `12\,\text{m}`,
# `5\;\mathrm{s}`, `3\text{ g}`. Without the space or the upright text (`12m`, `12\,x`)
# the letter is a variable, and with a power after it (`12\,\text{m}^2`) the answer stays
# as written.
_ONE_LETTER_UNITS = {"m": "meters", "s": "seconds", "g": "grams", "h": "hours", "L": "liters"}
_ONE_LETTER_UNIT = re.compile(
    r"(?<=[\d}])\s*(?:(?:(?<!\\)\\[,;: ]|~)\s*\\(?:text|mathrm|textrm)\s*\{\s*([msghL])\s*\}"
    r"|\\(?:text|mathrm|textrm)\s*\{\s+([msghL])\s*\})\s*$"
)


def _one_letter_unit(text: str) -> str:
    m = _ONE_LETTER_UNIT.search(text)
    if m is None:
        return text
    return text[: m.start()] + " \\text{ " + _ONE_LETTER_UNITS[m.group(1) or m.group(2)] + "}"


def _prepare(text: str) -> str:
    text = _one_letter_unit(_unicode(text))
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\cfrac", "\\frac").replace("\\dbinom", "\\binom")
    text = _BRACELESS_FRAC.sub(r"\\frac{\1}{\2}", text)
    text = text.replace("\\tbinom", "\\binom").replace("\\displaystyle", " ")
    text = re.sub(r",\s*\\!\s*(?=\d{3})", ",", text)  # `11,\! 111` is a thousands separator
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\$", " ").replace("$", " ")
    text = text.replace("\\(", " ").replace("\\)", " ").replace("\\[", " ").replace("\\]", " ")
    text = text.replace("\\%", " ").replace("%", " ").replace("\\mid", "|")
    text = text.replace("\\infin", "\\infty").replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    text = _SIZING.sub("", text)
    text = _binomials(text)
    if _TRIG.search(text):  # degrees inside trigonometry are an angle unit: 60° = 60·π/180
        text = _DEGREE.sub(lambda m: " \\cdot \\frac{\\pi}{180} ", text)
    text = _DEGREE.sub(" ", text)
    text = _SPACES.sub(" ", text)
    text = _text_commands(text)
    text = re.sub(r"\\(?:operatorname|mathop)\s*\{\s*([a-zA-Z]+)\s*\}", r"\\\1", text)
    text = text.replace("\\lcm", "\\operatorname{lcm}")
    return " ".join(text.split())


def answer_unit(text: str) -> str | None:
    """The canonical trailing unit of an answer (`5 \\text{ min}` -> minute), else None."""
    return split_units(_prepare(text))[1]


def normalize(text: str) -> str:
    """The normalised LaTeX form of one answer (see the module docstring)."""
    text = _strip_units(_prepare(text))
    if _EMPTY_WORDS.fullmatch(text.strip(" .")):
        return "\\emptyset"
    text = _EMPTY.sub("\\\\emptyset", text)
    text = _REALS.sub("\\\\mathbb{R}", text)
    text = _IN_SET.sub("", text)
    text = _LEADING_APPROX.sub("", text)
    # Plain-text mathematics, as models write it outside LaTeX.
    text = text.replace("**", "^")
    text = _paren_to_braces(text, "sqrt", "\\sqrt")
    text = _paren_to_braces(text, "^", "^")
    text = _PLAIN_FUNCTION.sub(r"\\\1", text)
    text = _PLAIN_PI.sub(r"\\pi ", text)
    text = _PLAIN_INF.sub(r"\\infty ", text)
    text = _SCI.sub(lambda m: f"{m.group(1)}\\times 10^{{{m.group(2)}}}", text)
    text = _OVERLINE.sub(lambda m: _repeating(m.group(1), m.group(2), m.group(3)), text)
    text = _DOT_DIGIT.sub(lambda m: _repeating(m.group(1), m.group(2), m.group(3)), text)
    text = _PAREN_REPEAT.sub(lambda m: _repeating(m.group(1), m.group(2), m.group(3)), text)
    text = _ELLIPSIS_DECIMAL.sub(_ellipsis_decimal, text)
    text = _AND_OR.sub(", ", text)
    text = " ".join(text.split()).lstrip(" ;,").rstrip(" ;,")
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    elif _SPACE_THOUSANDS.fullmatch(text):
        text = text.replace(" ", "")
    return text


_JUXTAPOSED = re.compile(r"(?<![\d._^])\d[\d.]*\s+\d[\d.]*(?!\s*/)(?![\d.])")


def juxtaposed_numbers(text: str) -> bool:
    """`2 3` or `1 2 3`: numbers side by side, which the parser would add or multiply and
    squashing would join. A mixed number (`1 1/2`) is not this."""
    return _JUXTAPOSED.search(text) is not None


def text_key(text: str) -> str:
    """A comparison key for text answers: lower case, only letters, digits and commas."""
    return re.sub(r"[^a-z0-9,]", "", _text_commands(text).lower())
