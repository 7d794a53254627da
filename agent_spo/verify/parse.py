"""Parse a normalised answer into a typed value.

The structure (lists, tuples, intervals, sets, relations, matrices, base-n numbers,
multiple-choice letters, text) is found by splitting at top-level brackets and
separators; each mathematical expression inside is parsed by `latex2sympy2_extended`
(the ANTLR LaTeX grammar math-verify uses), never by a grammar of our own.

Work is bounded before anything is evaluated: inputs over `MAX_CHARS` or nested deeper
than `MAX_DEPTH` are refused, numeric literals over `MAX_DIGITS` digits are refused,
and every sub-expression whose value could exceed `MAX_BITS` bits (power towers, huge
factorials) is kept unevaluated, so such answers are compared by structure, never
computed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import sympy
from latex2sympy2_extended import NormalizationConfig, latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig

from agent_spo.verify.calculus import OPERATORS, evaluate_operator, remnants
from agent_spo.verify.normalize import MATH_WORDS, text_key

MAX_CHARS = 1500  # longest answer we parse; longer ones are only compared as text
MAX_DEPTH = 40  # deepest bracket nesting we parse
MAX_DIGITS = 4000  # longest integer literal (Python refuses int(str) past 4300 digits)
MAX_BITS = 1 << 13  # largest |value| we evaluate: 2**8192, about 2,470 decimal digits
MAX_ITEMS = 200  # most elements in a list, set, tuple or matrix

_LATEX_CONFIG = NormalizationConfig(
    basic_latex=True, units=False, malformed_operators=True, nits=False, boxed="none"
)
# Symbols keep their case: P is not p, and \pi R^2 is not \pi r^2 (the parser lowercases
# them by default). Only text answers and choice letters are compared case-insensitively.
_CONVERSION_CONFIG = ConversionConfig(lowercase_symbols=False)
I_SYMBOL = sympy.Symbol("i")


class Unparseable(ValueError):
    """The text is not an answer we can read; the message says why."""


@dataclass(frozen=True)
class Scalar:
    """A number or expression. `decimals`: places of a plain decimal literal ("0.78" -> 2)."""

    value: sympy.Basic
    decimals: int | None = None
    has_float: bool = False  # written with a decimal point somewhere
    opaque: bool = False  # part of it is too large to evaluate; compared by structure

    def __str__(self) -> str:
        return _short(sympy.sstr(self.value, order="none"))


@dataclass(frozen=True)
class Seq:
    """A bracketed or bare list. left/right: '(' '[' '{' or '' for a bare comma list."""

    items: tuple
    left: str
    right: str

    def __str__(self) -> str:
        inner = ", ".join(str(i) for i in self.items)
        left = {"{": "{", "(": "(", "[": "[", "": ""}[self.left]
        right = {"}": "}", ")": ")", "]": "]", "": ""}[self.right]
        return _short(f"{left}{inner}{right}")


@dataclass(frozen=True)
class SetValue:
    """A set built with set operations or named sets: unions, R, the empty set."""

    value: sympy.Set

    def __str__(self) -> str:
        return _short(sympy.sstr(self.value, order="none"))


@dataclass(frozen=True)
class Matrix:
    """Rows of Scalar entries."""

    rows: tuple  # tuple of tuples of Scalar

    def __str__(self) -> str:
        return _short("[" + "; ".join(", ".join(str(c) for c in r) for r in self.rows) + "]")


@dataclass(frozen=True)
class Relation:
    """`a op b op c ...`; ops from = < <= > >= !=."""

    parts: tuple  # Scalar per side
    ops: tuple

    def __str__(self) -> str:
        out = str(self.parts[0])
        for op, part in zip(self.ops, self.parts[1:], strict=True):
            out += f" {op} {part}"
        return _short(out)


@dataclass(frozen=True)
class Text:
    """A word answer, compared by its key (lower case, letters and digits)."""

    key: str

    def __str__(self) -> str:
        return f"text:{self.key}"


@dataclass(frozen=True)
class Choice:
    """A multiple-choice letter."""

    letter: str

    def __str__(self) -> str:
        return f"choice:{self.letter}"


@dataclass(frozen=True)
class BaseN:
    """A numeral in base 2..36, kept as its digits."""

    digits: str
    base: int

    def __str__(self) -> str:
        return f"{self.digits}_{self.base}"


Answer = Scalar | Seq | SetValue | Matrix | Relation | Text | Choice | BaseN


def _short(s: str, limit: int = 300) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------------------- splitting

_OPEN = "([{"
_CLOSE = ")]}"


def _depth_ok(text: str) -> bool:
    depth = worst = 0
    for c in text:
        if c in _OPEN:
            depth += 1
            worst = max(worst, depth)
        elif c in _CLOSE:
            depth -= 1
    return worst <= MAX_DEPTH


def split_top(text: str, separators: re.Pattern) -> tuple[list[str], list[str]]:
    """Split at separator matches outside brackets and environments: (pieces, separators)."""
    pieces: list[str] = []
    seps: list[str] = []
    depth = 0
    start = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if depth == 0:
                m = separators.match(text, i)
                if m:
                    pieces.append(text[start:i])
                    seps.append(m.group(0).strip())
                    i = start = m.end()
                    continue
            if text.startswith("\\begin", i) or text.startswith("\\langle", i):
                depth += 1
            elif text.startswith("\\end", i) or text.startswith("\\rangle", i):
                depth -= 1
            elif text.startswith("\\{", i):
                depth += 1
            elif text.startswith("\\}", i):
                depth -= 1
            j = i + 1
            while j < n and text[j].isalpha():
                j += 1
            i = j if j > i + 1 else i + 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0:
            m = separators.match(text, i)
            if m:
                pieces.append(text[start:i])
                seps.append(m.group(0).strip())
                i = start = m.end()
                continue
        i += 1
    pieces.append(text[start:])
    return pieces, seps


_COMMA = re.compile(r"[,;]")
_RELATION = re.compile(
    r"\\(?:leqslant|geqslant|leq|geq|neq|le|ge|ne|lt|gt|approx|equiv)(?![a-zA-Z])"
    r"|<=|>=|!=|=|<|>"
)
_REL_NAMES = {
    "\\leqslant": "<=", "\\geqslant": ">=", "\\leq": "<=", "\\geq": ">=", "\\le": "<=",
    "\\ge": ">=", "\\neq": "!=", "\\ne": "!=", "\\lt": "<", "\\gt": ">", "<=": "<=",
    ">=": ">=", "!=": "!=", "=": "=", "<": "<", ">": ">", "\\equiv": "=", "\\approx": "~",
}  # fmt: skip
_SET_OPS = re.compile(r"\\(?:cup|cap|setminus)(?![a-zA-Z])|\\mathbb\{R\}|\\emptyset")
_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_BASE_N = re.compile(r"([+-]?)\s*([0-9A-Za-z]+)\s*_\{?\s*(\d{1,2})\s*\}?")
_CHOICE = re.compile(r"\(?\s*([A-J])\s*\)?")
_CLOCK = re.compile(r"(\d{1,2})\s*:\s*(\d{2})(\s*:\s*\d{2})?")
_WORDY = re.compile(r"[A-Za-z][A-Za-z ,'\-]*")


def _outer_brackets(text: str) -> tuple[str, str, str] | None:
    """(left, inner, right) when the whole text is one bracketed group, e.g. `(1,2]`.

    left is one of ( [ {, right one of ) ] }; `\\{..\\}` is a set, `\\langle..\\rangle` a tuple.
    """
    if text.startswith("\\{"):
        left, i = "{", 2
    elif text.startswith("\\langle"):
        left, i = "(", 7
    elif text[:1] in ("(", "["):
        left, i = text[0], 1
    else:
        return None
    start = i
    depth = 1
    n = len(text)
    while i < n:
        if text.startswith("\\{", i) or text.startswith("\\langle", i):
            depth += 1
            i += 2 if text[i + 1] == "{" else 7
            continue
        if text.startswith("\\}", i) or text.startswith("\\rangle", i):
            width, right = (2, "}") if text[i + 1] == "}" else (7, ")")
            depth -= 1
            if depth == 0:
                break
            i += width
            continue
        c = text[i]
        if c == "\\":
            j = i + 1
            while j < n and text[j].isalpha():
                j += 1
            i = j if j > i + 1 else i + 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                width, right = 1, c
                break
        i += 1
    else:
        return None
    if i + width != n:
        return None
    if (left == "{") != (right == "}"):
        return None
    return left, text[start:i], right


# ---------------------------------------------------------------------------- scalars

_INT = re.compile(r"[+-]?\d+")
_DEC = re.compile(r"[+-]?(\d*)\.(\d+)")
_SLASH = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_MIXED = re.compile(r"([+-]?)(\d+)\s+(\d+)\s*/\s*(\d+)")
_FRAC = re.compile(r"([+-]?)\\frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
MAX_UNBRACED_POWERS = 8  # `x^x^...^2`: the parser is superlinear in these
_UNBRACED_POWER = re.compile(r"\^\s*[^{\s]")
_GCD_LCM = re.compile(r"\\gcd|\\operatorname\{lcm\}|\\lcm|\\operatorname\{gcd\}")
_LONG_NUMBER = re.compile(rf"\d{{{MAX_DIGITS + 1},}}")


def _log2_bound(e: sympy.Basic, memo: dict) -> float:
    """An upper bound on log2|value| of a numeric sub-tree; inf when it may be huge."""
    key = id(e)
    if key in memo:
        return memo[key]
    if e.is_Integer:
        out = float(abs(int(e)).bit_length())
    elif e.is_Rational:
        out = float(max(abs(e.p).bit_length(), e.q.bit_length()))
    elif e.is_Float:
        _, _, exp, bc = e._mpf_[:4] if e._mpf_[1] else (0, 0, 0, 0)
        out = float(abs(exp + bc) + 1)
    elif e.is_Atom:
        out = 2.0
    elif e.is_Add:
        out = max(_log2_bound(a, memo) for a in e.args) + math.log2(len(e.args)) + 1
    elif e.is_Mul:
        out = sum(_log2_bound(a, memo) for a in e.args)
    elif e.is_Pow:
        base, exp_ = e.args
        bb = _log2_bound(base, memo)
        if exp_.is_Rational:
            out = bb * float(abs(exp_.p)) + 1
        else:
            eb = _log2_bound(exp_, memo)
            out = math.inf if eb > 40 else bb * 2.0**eb + 1
    elif isinstance(e, (sympy.exp, sympy.sinh, sympy.cosh)):
        xb = _log2_bound(e.args[0], memo)
        out = math.inf if xb > 40 else 2.0**xb * 1.45 + 1
    elif isinstance(e, (sympy.factorial, sympy.gamma, sympy.factorial2, sympy.subfactorial)):
        nb = _log2_bound(e.args[0], memo)
        out = math.inf if nb > 24 else 2.0**nb * (nb + 1)
    elif isinstance(e, OPERATORS):
        out = math.inf  # never by doit(): bounded_eval hands them to calculus.py
    elif e.args:
        out = max(_log2_bound(a, memo) for a in e.args) + 1
    else:
        out = 2.0
    memo[key] = out
    return out


def bounded_eval(e: sympy.Basic) -> tuple[sympy.Basic, bool]:
    """Evaluate every sub-tree whose value fits in MAX_BITS; the rest stays as written.

    Returns (value, opaque) where opaque says that some part was left unevaluated.
    Integrals, sums, limits, ... are evaluated by calculus.py once their arguments are.
    """
    memo: dict = {}

    def go(node: sympy.Basic) -> tuple[sympy.Basic, bool]:
        if _log2_bound(node, memo) <= MAX_BITS:
            return node.doit(), False
        if not node.args:
            return node, True
        done = [go(a) for a in node.args]
        args, opaque = [d[0] for d in done], any(d[1] for d in done)
        if isinstance(node, OPERATORS) and not opaque:
            return evaluate_operator(node.func(*args), _log2_bound, MAX_BITS)
        with sympy.evaluate(False):  # not evaluate=False: Integral, Limit, ... refuse it
            rebuilt = node.func(*args)
        if opaque or _log2_bound(rebuilt, remnants(rebuilt)) > MAX_BITS:
            return rebuilt, True
        return node.func(*args), False  # small now that its arguments are known

    return go(e)


def _exact(value: sympy.Basic, evaluate: bool = True) -> sympy.Basic:
    """Floats become the exact rationals they were written as; the symbol i becomes I.

    evaluate=False for a tree left partly unevaluated (too large): rebuilding it with
    evaluation on would compute what bounded_eval refused to."""
    with sympy.evaluate(evaluate):
        floats = value.atoms(sympy.Float)
        if floats:
            value = value.xreplace({f: sympy.Rational(str(f)) for f in floats})
        if I_SYMBOL in value.free_symbols:
            value = value.xreplace({I_SYMBOL: sympy.I})
    return value


def _latex(text: str) -> sympy.Basic:
    try:
        return latex2sympy(
            text, normalization_config=_LATEX_CONFIG, conversion_config=_CONVERSION_CONFIG
        )
    except Exception as e:  # noqa: BLE001 - the parser raises bare Exceptions
        first = str(e).strip().split("\n", 1)[0] or type(e).__name__
        raise Unparseable(f"LaTeX parser: {first}") from None


def collapse_double_brackets(text: str) -> str:
    """`((5))` -> `(5)`, `[[5]]` -> `[5]`, `{{x}}` -> `{x}`: a pair of brackets whose
    whole content is one more pair of the same kind says nothing more. The LaTeX parser's
    prediction is slow in nesting depth (30 pairs around a number took seconds), so the
    redundant pairs go first. Pairs around a comma or semicolon are kept: `((1, 2))` may
    be a tuple in parentheses or an interval, and the parser tells those apart."""
    if "((" not in text and "[[" not in text and "{{" not in text:
        return text
    match: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # `\{`, `\(`: escaped, not grouping
            i += 2
            continue
        if c in "([{":
            stack.append(i)
        elif c in ")]}":
            if not stack or text[stack[-1]] != {")": "(", "]": "[", "}": "{"}[c]:
                return text  # unbalanced or crossed: leave it to the parser to refuse
            match[stack.pop()] = i
        i += 1
    if stack:
        return text
    drop: set[int] = set()
    for start, end in match.items():
        inner = start + 1
        if (
            match.get(inner) == end - 1
            and text[inner] == text[start]
            and "," not in text[inner:end]
            and ";" not in text[inner:end]
        ):
            drop.update((start, end))
    if not drop:
        return text
    return "".join(c for k, c in enumerate(text) if k not in drop)


def parse_scalar(text: str) -> Answer:
    """One expression. Usually a Scalar; the parser may also return a set (`2 \\pm 1`)."""
    text = text.strip()
    if not text:
        raise Unparseable("empty expression")
    if _LONG_NUMBER.search(text):
        raise Unparseable(f"a number with more than {MAX_DIGITS} digits")
    if _INT.fullmatch(text):
        return Scalar(sympy.Integer(int(text)))
    m = _DEC.fullmatch(text)
    if m:
        return Scalar(sympy.Rational(text), decimals=len(m.group(2)), has_float=True)
    m = _SLASH.fullmatch(text) or None
    if m and int(m.group(2)) != 0:
        return Scalar(sympy.Rational(int(m.group(1)), int(m.group(2))))
    m = _MIXED.fullmatch(text)
    if m and int(m.group(4)) != 0:  # `7 3/4`, a mixed number in plain text
        value = int(m.group(2)) + sympy.Rational(int(m.group(3)), int(m.group(4)))
        return Scalar(-value if m.group(1) == "-" else value)
    m = _FRAC.fullmatch(text)
    if m and int(m.group(3)) != 0:
        sign = -1 if m.group(1) == "-" else 1
        return Scalar(sympy.Rational(sign * int(m.group(2)), int(m.group(3))))
    if len(_UNBRACED_POWER.findall(text)) > MAX_UNBRACED_POWERS:
        raise Unparseable("too many unbraced powers")
    if _GCD_LCM.search(text) and "^" in text:
        raise Unparseable("gcd/lcm of powers: the parser would compute it at any size")
    raw = _latex(collapse_double_brackets(text))
    return from_sympy(raw, has_float=bool(re.search(r"\d\.\d|(?<!\d)\.\d", text)))


def from_sympy(raw, has_float: bool = False) -> Answer:
    """Wrap what the LaTeX parser returned in our types, evaluating within bounds."""
    if isinstance(raw, sympy.MatrixBase):
        if raw.rows * raw.cols > MAX_ITEMS:
            raise Unparseable("matrix too large")
        return Matrix(
            tuple(tuple(from_sympy(raw[r, c]) for c in range(raw.cols)) for r in range(raw.rows))
        )
    if isinstance(raw, sympy.Tuple):
        return Seq(tuple(from_sympy(a) for a in raw.args), "(", ")")
    if isinstance(raw, sympy.FiniteSet):
        return Seq(tuple(from_sympy(a) for a in raw.args), "{", "}")
    if isinstance(raw, sympy.Set):
        return SetValue(_exact(raw))
    if isinstance(raw, sympy.core.relational.Relational):
        op = {"==": "=", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "!=": "!="}[raw.rel_op]
        return Relation((from_sympy(raw.lhs), from_sympy(raw.rhs)), (op,))
    if not isinstance(raw, sympy.Expr):
        raise Unparseable(f"not an expression: {type(raw).__name__}")
    value, opaque = bounded_eval(raw)
    if value.has(sympy.zoo, sympy.nan):
        raise Unparseable("undefined value (division by zero)")
    return Scalar(_exact(value, not opaque), has_float=has_float, opaque=opaque)


# ---------------------------------------------------------------------------- answers


def _is_text(text: str) -> bool:
    if not _WORDY.fullmatch(text):
        return False
    words = re.findall(r"[A-Za-z]+", text)
    return any(len(w) >= 3 and w.lower() not in MATH_WORDS for w in words)


def _parse_relation(pieces: list[str], seps: list[str]) -> Answer:
    ops = [_REL_NAMES[s] for s in seps]
    if "~" in ops:  # `x = 1/3 \approx 0.333`: the exact part before the first ≈ counts
        k = ops.index("~")
        if k == 0:  # `x \approx 3.14`: the approximation is all there is
            first = parse_answer(pieces[0]) if pieces[0].strip() else None
            if isinstance(first, Scalar) and not (
                isinstance(first.value, sympy.Symbol)
                or isinstance(first.value, sympy.core.function.AppliedUndef)
            ):  # `\frac{\sqrt3}{2} \approx 0.866`: the exact value comes first
                return first
            pieces, ops = pieces, ["=" if o == "~" else o for o in ops]
        else:
            pieces, ops = pieces[: k + 1], ops[:k]
    if any(not p.strip() for p in pieces):
        raise Unparseable("relation with an empty side")
    parts: list[Scalar | Seq | SetValue] = []
    for p in pieces:
        value = parse_answer(p)
        if not isinstance(value, Scalar):
            if isinstance(value, (Seq, SetValue)) and len(pieces) == 2:
                parts.append(value)  # `x = (1, 2)`, `x \in [1,2]`: kept for assignment
                continue
            raise Unparseable("relation between non-expressions")
        parts.append(value)
    if len(parts) == 1:
        return parts[0]
    return Relation(tuple(parts), tuple(ops))


def parse_answer(text: str) -> Answer:
    """The typed value of one normalised answer; raises Unparseable with a reason."""
    text = text.strip()
    if not text:
        raise Unparseable("empty answer")
    if len(text) > MAX_CHARS:
        raise Unparseable(f"longer than {MAX_CHARS} characters")
    if not _depth_ok(text):
        raise Unparseable(f"nested deeper than {MAX_DEPTH} brackets")
    m = _CHOICE.fullmatch(text)
    if m and (text.startswith("(") or len(text) == 1):
        return Choice(m.group(1))
    m = _BASE_N.fullmatch(text)
    if m and (re.search(r"\d", m.group(2)) or m.group(2).isupper()):
        digits, base = m.group(2).upper(), int(m.group(3))
        if 2 <= base <= 36 and all(int(d, 36) < base for d in digits):
            return BaseN(m.group(1).replace("+", "") + (digits.lstrip("0") or "0"), base)
        if m.group(2).isdigit():
            raise Unparseable(f"{m.group(2)} is not a base-{base} number")
    if _is_text(text):
        return Text(text_key(text))
    m = _CLOCK.fullmatch(text)
    if m:  # a time of day, 5:00 or 05:00
        return Text(f"{int(m.group(1))}:{m.group(2)}{m.group(3) or ''}")
    m = _MATRIX.fullmatch(text)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        cells = [[c for c in r.split("&")] for r in rows]
        if not cells or len({len(r) for r in cells}) != 1:
            raise Unparseable("matrix rows of different lengths")
        if sum(len(r) for r in cells) > MAX_ITEMS:
            raise Unparseable("matrix too large")
        return Matrix(tuple(tuple(_scalar_only(c) for c in r) for r in cells))

    pieces, _ = split_top(text, _COMMA)
    if len(pieces) > 1:
        if len(pieces) > MAX_ITEMS:
            raise Unparseable(f"more than {MAX_ITEMS} items")
        items: list = []
        for p in pieces:
            if not p.strip():
                continue
            item = parse_answer(p)
            if "\\pm" in p or "\\mp" in p:  # `\pm 1, \pm 2` lists four values
                if isinstance(item, Seq) and item.left == "{":
                    items.extend(item.items)
                    continue
            items.append(item)
        return Seq(tuple(items), "", "")
    pieces, seps = split_top(text, _RELATION)
    if len(pieces) > 1:
        return _parse_relation(pieces, seps)
    if _SET_OPS.search(text):
        raw = _latex(text)
        if isinstance(raw, sympy.Set):
            return SetValue(_exact(raw))
        return from_sympy(raw)
    outer = _outer_brackets(text)
    if outer:
        left, inner, right = outer
        items, _ = split_top(inner, _COMMA)
        if left == "{" and right == "}":
            if not inner.strip():
                return SetValue(sympy.S.EmptySet)
            return Seq(tuple(parse_answer(p) for p in items), "{", "}")
        if len(items) > 1:
            if len(items) > MAX_ITEMS:
                raise Unparseable(f"more than {MAX_ITEMS} items")
            return Seq(tuple(parse_answer(p) for p in items), left, right)
    return parse_scalar(text)


def _scalar_only(text: str) -> Scalar:
    value = parse_answer(text)
    if not isinstance(value, Scalar):
        raise Unparseable("matrix entry is not an expression")
    return value


@lru_cache(maxsize=4096)
def parse_cached(normalized: str) -> Answer | Unparseable:
    """parse_answer, memoised: the gold of one problem is parsed once for its k samples."""
    try:
        return parse_answer(normalized)
    except Unparseable as e:
        return e
    except Exception as e:  # sympy can raise anything (TypeError, RecursionError, ...)
        return Unparseable(f"{type(e).__name__}: {str(e)[:120]}")
