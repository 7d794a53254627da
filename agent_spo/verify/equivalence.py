"""Decide whether a predicted answer equals the gold answer (both already parsed).

Rules, each returning (equal, reason):

- Numbers are compared exactly: rationals as rationals; irrational and complex values
  by 60-digit evaluation with a *relative* tolerance of 1e-40 (so 1/2^99 != 1/2^98), then
  exactly: g - p must evaluate to zero under sympy's adaptive evalf (so e^100 != e^100 + 1
  and sqrt(10^200 + 1) != 10^100). Where a side is a decimal, rounding noise past digit 40
  is allowed, but only below 1e-30 absolutely. Irrational values over 10^1000 that are not
  identical count as different. An integral, sum or limit sympy cannot evaluate in closed
  form has no exact test in bounded time: agreement to 40 digits counts there. A
  decimal prediction is the rational it spells (0.333 != 1/3). One allowance: when the
  gold itself is a decimal with k places and the prediction is an exact non-decimal
  value (pi, 1/3, sqrt 2), the prediction counts if it rounds to the gold at k places.
- Expressions with variables: the same variables, then `expand(g - p) == 0` for small
  polynomials, else agreement to 1e-30 at three fixed generic points.
- Unordered: sets and bare "all solutions" lists; repeats are dropped unless the gold
  list itself repeats an item, then it is matched as a multiset (`_unordered`). Ordered:
  tuples, points, vectors; a list of assignments `y = 2, x = 3` is read in alphabetical
  order of the names, as the point (3, 2). A bracketed pair is also an interval, so for two items the bracket
  types must agree (except at infinite endpoints). Unions and named sets are compared
  as sets (sympy), and a gold inequality in solved form matches the equivalent interval.
- Matrices by shape and entries. Equations up to a nonzero factor, inequalities up to a
  positive factor (so flipped inequalities match), `x = 3` matches `3` both ways. A gold
  named tuple `(p, q) = (2, 3)` matches the bare `(2, 3)` (and `q = 3, p = 2`, by name),
  and a gold named ratio `\\frac{A}{B} = \\frac{3}{4}` matches `3/4`; an answer's names are
  not trusted that way (`(b, a) = (2, 3)` is no answer to a bare gold). Other equations
  (`x + y = 5`, `xy = 6`) name nothing and never match a bare value.
- Multiple-choice letters, text (lower case, letters and digits only), base-n numbers
  (same digits; the subscript may be omitted).
"""

from __future__ import annotations

import collections

import mpmath
import sympy

from agent_spo.verify.calculus import OPERATORS
from agent_spo.verify.parse import (
    Answer,
    BaseN,
    Choice,
    Matrix,
    Relation,
    Scalar,
    Seq,
    SetValue,
    Text,
)

DPS = 60  # digits for numeric evaluation
REL_TOL = mpmath.mpf(10) ** -40  # numbers: relative difference allowed (rounding noise only)
ABS_DIGITS = 30  # numbers: absolute difference allowed is 10^-ABS_DIGITS as well
MAX_MAGNITUDE = 1000  # digits before the point beyond which irrational values are not compared
POINT_TOL = mpmath.mpf(10) ** -30  # expressions: relative difference at sample points
# Generic sample points for identity testing: positive (roots and logs stay real) and
# unrelated to each other, one per variable and point.
_POINTS = [
    [sympy.Rational(p, q) for p, q in row]
    for row in (
        [(7, 11), (13, 9), (29, 17), (5, 23), (41, 19), (3, 7), (53, 31), (11, 29)],
        [(19, 7), (5, 13), (23, 37), (47, 11), (17, 41), (61, 29), (9, 43), (37, 13)],
        [(31, 41), (43, 17), (11, 47), (73, 19), (59, 53), (29, 61), (67, 23), (13, 59)],
    )
]
# More points where the answers must also agree when both are defined there: negative
# non-integers and mixed-sign integers, which tell |x| from x, sqrt(x^2) from x, max(x, 0)
# from x, ceil from floor + 1 and ln(x^2) from 2 ln x.
_EXTRA_POINTS = [
    [sympy.Rational(p, q) for p, q in row]
    for row in (
        [(-7, 3), (-5, 11), (-17, 7), (-3, 13), (-29, 11), (-8, 5), (-41, 17), (-9, 19)],
        [(-3, 1), (2, 1), (-5, 1), (4, 1), (-1, 1), (3, 1), (-2, 1), (5, 1)],
        [(2, 1), (-3, 1), (3, 1), (-2, 1), (5, 1), (-4, 1), (7, 1), (-6, 1)],
    )
]
_MAX_EXACT_DEGREE = 200  # rational functions up to this degree are evaluated exactly
Result = tuple[bool, str]


# ------------------------------------------------------------------------------ numbers


def to_mpc(e: sympy.Basic, dps: int = DPS) -> mpmath.mpc | None:
    """The value of a closed expression as a dps-digit complex number; None if it has none."""
    try:
        v = sympy.N(e, dps)
        if not v.is_number:
            return None
        re_, im_ = v.as_real_imag()
        with mpmath.workdps(dps):
            out = mpmath.mpc(
                mpmath.mpf(sympy.Float(re_, dps)._mpf_), mpmath.mpf(sympy.Float(im_, dps)._mpf_)
            )
        if not (mpmath.isfinite(out.real) and mpmath.isfinite(out.imag)):
            return None
        return out
    except Exception:
        return None


def _close(a: mpmath.mpc, b: mpmath.mpc, tol: mpmath.mpf) -> bool:
    with mpmath.workdps(DPS):
        scale = max(abs(a), abs(b))
        return abs(a - b) <= tol * scale if scale != 0 else True


def _close_absolute(gv: sympy.Basic, pv: sympy.Basic, a: mpmath.mpc, b: mpmath.mpc) -> bool:
    """Whether two values already equal to 40 significant digits also agree absolutely.

    The relative test alone accepts e^100 vs e^100 + 1, since 1 is beyond the 40th digit.
    Both sides are evaluated again with as many more digits as the value has before the
    point, so that |g - p| is known to ABS_DIGITS places; values beyond MAX_MAGNITUDE
    digits cannot be compared that way and count as different (identical ones never get
    here)."""
    with mpmath.workdps(DPS):
        scale = max(abs(a), abs(b))
        if scale == 0:
            return True
        magnitude = int(mpmath.floor(mpmath.log10(scale))) + 1
    if magnitude > MAX_MAGNITUDE:
        return False
    dps = DPS + max(0, magnitude)
    if dps > DPS:
        a, b = to_mpc(gv, dps), to_mpc(pv, dps)
        if a is None or b is None:
            return False
    with mpmath.workdps(dps):
        return abs(a - b) <= mpmath.mpf(10) ** -ABS_DIGITS


def _difference_vanishes(gv: sympy.Basic, pv: sympy.Basic, a: mpmath.mpc, b: mpmath.mpc) -> bool:
    """Whether g - p (exact values, no decimals) evaluates to zero, not just to something
    small: sympy's adaptive evalf raises its working precision through cancellation, so
    sqrt(10^200 + 1) - 10^100 comes out as 5e-101, while log 8 - 3 log 2 has no
    significant bit left at any precision."""
    with mpmath.workdps(DPS):
        scale = max(abs(a), abs(b))
        magnitude = int(mpmath.floor(mpmath.log10(scale))) + 1 if scale != 0 else 0
    if magnitude > MAX_MAGNITUDE:
        return False
    try:
        v = (gv - pv).evalf(15, maxn=int((max(0, magnitude) + 200) * 3.33) + 2000)
        if not v.is_number:
            return False
        for part in v.as_real_imag():
            if part.is_zero:
                continue
            if not part.is_Float or part._prec > 1:  # a definite nonzero value
                return False
        return True
    except Exception:
        return False


def _show(v: mpmath.mpc) -> str:
    return mpmath.nstr(v.real if v.imag == 0 else v, 8)


def numbers_equal(g: Scalar, p: Scalar) -> Result:
    """Closed numbers: exact for rationals; otherwise equal to 40 significant digits and
    then exactly (the difference evaluates to zero), or to 1e-30 where a side is a decimal."""
    gv, pv = g.value, p.value
    if gv.is_Rational and pv.is_Rational:
        if gv == pv:
            return True, "equal numbers"
        return False, f"different numbers: {gv} vs {pv}"
    if gv == pv:
        return True, "equal numbers"
    a, b = to_mpc(gv), to_mpc(pv)
    if a is None or b is None:
        return False, "cannot evaluate both sides; not the same expression"
    if _close(a, b, REL_TOL):
        if g.has_float or p.has_float:  # a decimal: rounding noise beyond digit 40 allowed
            if _close_absolute(gv, pv, a, b):
                return True, f"equal values (to {DPS - 20} significant digits)"
        elif gv.has(*OPERATORS) or pv.has(*OPERATORS):  # adaptive evalf of these may hang
            return True, f"equal values (to {DPS - 20} digits; an operator without closed form)"
        elif _difference_vanishes(gv, pv, a, b):
            return True, "equal values (their difference evaluates to zero)"
    if (
        g.decimals is not None
        and not p.has_float
        and b.imag == 0
        and abs(a) < mpmath.mpf(10) ** (DPS - 10 - g.decimals)  # a - b is known to the place
    ):
        half = mpmath.mpf(5) * mpmath.mpf(10) ** -(g.decimals + 1)
        if abs(a - b) <= half:
            return (
                True,
                f"the gold is rounded to {g.decimals} places; the exact prediction rounds to it",
            )
    if _close(a, b, REL_TOL):
        return False, f"values equal to {DPS - 20} digits but not exactly: {_show(a)}"
    return False, f"different values: {_show(a)} vs {_show(b)}"


# --------------------------------------------------------------------------- expressions


def _small_polynomial(e: sympy.Basic) -> bool:
    if sympy.count_ops(e, visual=False) > 80:
        return False
    return all(not (p.exp.is_Integer and abs(int(p.exp)) > 12) for p in e.atoms(sympy.Pow))


def _at_points(e: sympy.Basic, syms: list, k: int, rows=_POINTS) -> mpmath.mpc | None:
    return to_mpc(e.xreplace(dict(zip(syms, rows[k], strict=False))))


def _rational_function(e: sympy.Basic) -> bool:
    """Built from symbols and rationals by +, * and integer powers of bounded degree."""
    for node in sympy.preorder_traversal(e):
        if node.is_Symbol or node.is_Rational or node.is_Add or node.is_Mul:
            continue
        if node.is_Pow and node.exp.is_Integer and abs(int(node.exp)) <= _MAX_EXACT_DEGREE:
            continue
        return False
    return True


def _exact_at(e: sympy.Basic, point: dict) -> sympy.Rational | None:
    try:
        v = e.xreplace(point)
    except Exception:
        return None
    return v if v.is_Rational else None


def _rational_functions_equal(gv: sympy.Basic, pv: sympy.Basic, syms: list) -> Result:
    """Exact comparison at rational points: no tolerance, so x != x + 10^-31."""
    agree = 0
    for row in (*_POINTS, *_EXTRA_POINTS):
        point = dict(zip(syms, row, strict=False))
        a, b = _exact_at(gv, point), _exact_at(pv, point)
        if a is None or b is None:
            continue
        if a != b:
            return False, "different values at a sample point (exact)"
        agree += 1
    if agree >= 3:
        return True, f"equal at {agree} sample points (exact)"
    return False, "cannot evaluate; not the same expression"


def _real(v: mpmath.mpc) -> bool:
    return abs(v.imag) <= POINT_TOL * max(abs(v), 1)


def expressions_equal(gv: sympy.Basic, pv: sympy.Basic, has_float: bool = False) -> Result:
    """Expressions with variables: same variables, then expansion or sample points.

    At the sample points the values must agree to 1e-30 and then, unless a side was
    written with decimals (has_float), exactly (x + e^100 != x + e^100 + 1)."""
    gs, ps = gv.free_symbols, pv.free_symbols
    if gs != ps:
        names = lambda s: ", ".join(sorted(map(str, s))) or "none"  # noqa: E731
        return False, f"different variables: {names(gs)} vs {names(ps)}"
    syms = sorted(gs, key=str)
    if len(syms) > len(_POINTS[0]):
        return False, "too many variables to compare"
    diff = gv - pv
    if _small_polynomial(diff):
        try:
            if sympy.expand(diff) == 0:
                return True, "difference expands to 0"
        except Exception:
            pass
    if _rational_function(gv) and _rational_function(pv):
        return _rational_functions_equal(gv, pv, syms)
    for k in range(len(_EXTRA_POINTS)):
        a = _at_points(gv, syms, k, _EXTRA_POINTS)
        b = _at_points(pv, syms, k, _EXTRA_POINTS)
        if a is None or b is None or not (_real(a) or _real(b)):
            continue  # undefined on one side, or complex on both
        if not _close(a, b, POINT_TOL):
            return False, f"different values at a sample point: {_show(a)} vs {_show(b)}"
    agree = 0
    for k in range(len(_POINTS)):
        a, b = _at_points(gv, syms, k), _at_points(pv, syms, k)
        if a is None or b is None:
            continue
        if not _close(a, b, POINT_TOL):
            return False, f"different values at a sample point: {_show(a)} vs {_show(b)}"
        if not has_float and not (gv.has(*OPERATORS) or pv.has(*OPERATORS)):
            point = dict(zip(syms, _POINTS[k], strict=False))
            if not _difference_vanishes(gv.xreplace(point), pv.xreplace(point), a, b):
                return (
                    False,
                    f"values at a sample point equal to 30 digits, not exactly: {_show(a)}",
                )
        agree += 1
    if agree >= 2:
        return True, f"equal at {agree} sample points"
    return False, "cannot evaluate; not the same expression"


def scalars_equal(g: Scalar, p: Scalar) -> Result:
    """Two expressions: structure first, then numbers or expressions."""
    if g.value == p.value:
        return True, "identical after evaluation"
    if g.value.has(*OPERATORS) and g.value.as_dummy() == p.value.as_dummy():
        return True, "identical up to the names of bound variables"
    if g.opaque or p.opaque:
        return False, "too large to evaluate, and not the same expression"
    if not g.value.free_symbols and not p.value.free_symbols:
        return numbers_equal(g, p)
    return expressions_equal(g.value, p.value, g.has_float or p.has_float)


def _proportional(gexpr: sympy.Basic, pexpr: sympy.Basic, positive: bool) -> bool:
    """gexpr = c * pexpr for one constant c != 0 (c > 0 when positive)."""
    if gexpr == pexpr:
        return True
    syms = sorted(gexpr.free_symbols | pexpr.free_symbols, key=str)
    if not syms or len(syms) > len(_POINTS[0]):
        return False
    ratio = None
    seen = 0
    for k in range(len(_POINTS)):
        a, b = _at_points(gexpr, syms, k), _at_points(pexpr, syms, k)
        if a is None or b is None or b == 0:
            continue
        r = a / b
        if r == 0 or (ratio is not None and not _close(r, ratio, POINT_TOL)):
            return False
        ratio = r
        seen += 1
    if seen < 2 or ratio is None:
        return False
    return not positive or (abs(ratio.imag) <= POINT_TOL * abs(ratio) and ratio.real > 0)


# ---------------------------------------------------------------------------- relations

_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!="}


def _lone_symbol(x) -> bool:
    return isinstance(x, Scalar) and (
        isinstance(x.value, sympy.Symbol) or isinstance(x.value, sympy.core.function.AppliedUndef)
    )


def _assigned_value(r: Relation):
    """The right side of `x = value` (x a lone symbol not used on the right), else None."""
    if len(r.parts) == 2 and r.ops == ("=",) and _lone_symbol(r.parts[0]):
        rhs = r.parts[1]
        if not isinstance(rhs, Scalar) or r.parts[0].value not in rhs.value.free_symbols:
            return rhs
    return None


def _named_tuple(r: Relation) -> dict | None:
    """`(p, q) = (2, 3)` as {p: 2, q: 3}: a tuple of distinct lone symbols set equal to a
    tuple of as many values, none of which uses those symbols; else None."""
    if len(r.parts) != 2 or r.ops != ("=",):
        return None
    lhs, rhs = r.parts
    if not (isinstance(lhs, Seq) and isinstance(rhs, Seq) and lhs.left == rhs.left == "("):
        return None
    if len(lhs.items) < 2 or len(lhs.items) != len(rhs.items):
        return None
    if not all(_lone_symbol(x) for x in lhs.items):
        return None
    names = [x.value for x in lhs.items]
    if len(set(names)) != len(names):
        return None
    for x in rhs.items:
        if not isinstance(x, Scalar) or x.value.free_symbols & set(names):
            return None
    return dict(zip(names, rhs.items, strict=True))


def _named_ratio(r: Relation) -> Scalar | None:
    """The number in `\\frac{A}{B} = \\frac{3}{4}`: a quotient of two distinct lone symbols
    set equal to a closed number. `x + y = 5`, `xy = 6` and `\\frac{2A}{B} = 3` are
    equations, not names, and give None."""
    if len(r.parts) != 2 or r.ops != ("=",):
        return None
    lhs, rhs = r.parts
    if not (isinstance(lhs, Scalar) and isinstance(rhs, Scalar)) or lhs.opaque or rhs.opaque:
        return None
    if rhs.value.free_symbols or not rhs.value.is_number:
        return None
    num, den = lhs.value.as_numer_denom()
    if num.is_Symbol and den.is_Symbol and num != den:
        return rhs
    return None


def _named_value(r: Relation):
    """The value a relation assigns to named quantities: `x = 5`, `(p, q) = (2, 3)` (the
    tuple), `\\frac{A}{B} = \\frac{3}{4}`; None for any other relation."""
    value = _assigned_value(r)
    if value is not None:
        return value
    named = _named_tuple(r)
    if named is not None:
        return r.parts[1]
    return _named_ratio(r)


def _named_tuple_vs(named: dict, other) -> Result | None:
    """A named tuple against a list that itself names: `(p, q) = (2, 3)` vs `q = 3, p = 2`
    by name. None when the other side names nothing."""
    if isinstance(other, Relation):
        other_named = _named_tuple(other)
        if other_named is None:
            return False, "a different relation for a named tuple"
    elif isinstance(other, Seq) and any(isinstance(x, Relation) for x in other.items):
        other_named = _assignments(other) if other.left == "" else None
        if other_named is None:
            return False, "a list of relations that does not name each coordinate"
    else:
        return None
    if set(other_named) != set(named):
        return False, "different variables assigned"
    return _ordered([named[k] for k in named], [other_named[k] for k in named])


def _one_sided(lhs: Scalar, op: str, rhs: Scalar) -> tuple[sympy.Basic, str]:
    """`lhs op rhs` as `E op' 0` with op' in < <= = != (the sides moved left)."""
    if op in (">", ">="):
        return rhs.value - lhs.value, _FLIP[op]
    return lhs.value - rhs.value, op


def _collapse(r: Relation) -> Relation:
    """`x = 5+5+1 = 11` -> `x = 11`: an equation chain states its first and last sides equal."""
    if len(r.parts) > 2 and all(op == "=" for op in r.ops):
        return Relation((r.parts[0], r.parts[-1]), ("=",))
    return r


def relations_equal(g: Relation, p: Relation) -> Result:
    """Equations up to a nonzero factor, inequalities up to a positive one, or as sets."""
    g, p = _collapse(g), _collapse(p)
    gset, pset = as_set(g), as_set(p)
    if gset is not None and pset is not None:
        return sets_equal(gset, pset)
    if len(g.parts) == 2 and len(p.parts) == 2:
        g_named = _named_tuple(g)
        if g_named is not None:
            return _named_tuple_vs(g_named, p) or (False, "different relations")
        if _named_tuple(p) is not None:
            return False, "a named tuple for a different relation"
        if not all(isinstance(x, Scalar) for x in (*g.parts, *p.parts)):
            gv, pv = _assigned_value(g), _assigned_value(p)
            if gv is not None and pv is not None:
                return equivalent(gv, pv)
            return False, "different relations"
        if any(x.opaque for x in (*g.parts, *p.parts)):
            same = g == p
            return same, "identical relations" if same else "too large to compare"
        ge, gop = _one_sided(g.parts[0], g.ops[0], g.parts[1])
        pe, pop = _one_sided(p.parts[0], p.ops[0], p.parts[1])
        if gop != pop:
            return False, f"different relations: {g.ops[0]} vs {p.ops[0]}"
        if _proportional(ge, pe, positive=gop in ("<", "<=")):
            return True, "equivalent relations (sides proportional)"
        gv, pv = _assigned_value(g), _assigned_value(p)
        if gv is not None and pv is not None and not gv.value.free_symbols:
            ok, why = equivalent(gv, pv)
            if ok:
                return True, "same assigned value"
        return False, "different relations"
    if len(g.parts) == len(p.parts):
        for parts, ops in ((p.parts, p.ops), (p.parts[::-1], tuple(_FLIP[o] for o in p.ops[::-1]))):
            if ops == g.ops and all(
                equivalent(a, b)[0] for a, b in zip(g.parts, parts, strict=True)
            ):
                return True, "same chain of relations"
    return False, "different relations"


# --------------------------------------------------------------------------------- sets


def _real_number(x) -> bool:
    return (
        isinstance(x, Scalar)
        and not x.opaque
        and x.value.is_number
        and x.value.is_extended_real is not False
    )


def as_set(a: Answer) -> sympy.Set | None:
    """The answer as a sympy set when it denotes one (interval, set, solved inequality)."""
    try:
        if isinstance(a, SetValue):
            return a.value
        if (
            isinstance(a, Seq)
            and a.left == "{"
            and all(_real_number(x) or isinstance(x, Scalar) for x in a.items)
        ):
            return sympy.FiniteSet(*[x.value for x in a.items])
        if isinstance(a, Seq) and a.left in "([" and a.left and len(a.items) == 2:
            lo, hi = a.items
            if _real_number(lo) and _real_number(hi) and bool(lo.value < hi.value):
                return sympy.Interval(lo.value, hi.value, a.left == "(", a.right == ")")
            return None
        if (
            isinstance(a, Seq)
            and a.left == ""
            and a.items
            and all(isinstance(x, Relation) for x in a.items)
        ):
            parts = [as_set(x) for x in a.items]
            return None if any(p is None for p in parts) else sympy.Union(*parts)
        if isinstance(a, Relation):
            return _solved_inequality(a)
    except Exception:
        return None
    return None


def _solved_inequality(r: Relation) -> sympy.Set | None:
    """`x < 3`, `3 >= x`, `-2 < x <= 5`, `x != 1` as sets; other relations: None."""
    parts, ops = list(r.parts), list(r.ops)
    if "=" in ops:
        return None
    if len(parts) == 2:
        if _lone_symbol(parts[1]) and not _lone_symbol(parts[0]):
            parts, ops = parts[::-1], [_FLIP[ops[0]]]
        x, op, c = parts[0], ops[0], parts[1]
        if not (_lone_symbol(x) and _real_number(c)):
            return None
        v = c.value
        return {
            "<": sympy.Interval.open(-sympy.oo, v),
            "<=": sympy.Interval(-sympy.oo, v),
            ">": sympy.Interval.open(v, sympy.oo),
            ">=": sympy.Interval(v, sympy.oo),
            "!=": sympy.Complement(sympy.S.Reals, sympy.FiniteSet(v)),
        }[op]
    if (
        len(parts) == 3
        and _lone_symbol(parts[1])
        and _real_number(parts[0])
        and _real_number(parts[2])
    ):
        if ops[0] in (">", ">="):
            parts, ops = parts[::-1], [_FLIP[ops[1]], _FLIP[ops[0]]]
        if ops[0] in ("<", "<=") and ops[1] in ("<", "<="):
            return sympy.Interval(parts[0].value, parts[2].value, ops[0] == "<", ops[1] == "<")
    return None


def sets_equal(a: sympy.Set, b: sympy.Set) -> Result:
    """Sympy sets with the same elements."""
    try:
        if a == b:
            return True, "equal sets"
        if (
            sympy.Complement(a, b) == sympy.S.EmptySet
            and sympy.Complement(b, a) == sympy.S.EmptySet
        ):
            return True, "equal sets"
    except Exception:
        pass
    return False, "different sets"


# -------------------------------------------------------------------------- sequences


def _infinite(x) -> bool:
    return isinstance(x, Scalar) and x.value in (sympy.oo, -sympy.oo)


def _dedupe(items) -> list:
    out: list = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def _numeric_key(x) -> str | None:
    """A bucket for matching many numbers by value: the exact value for a rational, else
    30 digits (a candidate only: every match is confirmed with `equivalent`)."""
    if isinstance(x, Scalar) and not x.opaque and not x.value.free_symbols:
        if x.value.is_Rational:
            return f"q:{x.value}"
        v = to_mpc(x.value)
        if v is not None:
            return mpmath.nstr(v, 30)
    return None


def _unordered(g_items, p_items, multiset: bool = False) -> Result:
    """Items in any order. With multiset=False (sets, and lists whose gold has no repeated
    item) repeats are dropped on both sides first, so a repeated root `1, 1, 2` still
    answers `1, 2`. With multiset=True (a bare gold list that itself repeats an item, such
    as `1, 1, 2`) every item counts, so `1, 2` does not answer it."""
    if not multiset:
        g_items, p_items = _dedupe(g_items), _dedupe(p_items)
    if len(g_items) != len(p_items):
        return False, f"{len(p_items)} items, expected {len(g_items)}"
    # Pair identical items first, then numbers by value: linear, not quadratic, in the items.
    try:
        counts = collections.Counter(p_items)
        rest_g = []
        for g in g_items:
            if counts[g] > 0:
                counts[g] -= 1
            else:
                rest_g.append(g)
        g_items, p_items = rest_g, list(counts.elements())
    except TypeError:  # an unhashable value: fall through to pairwise matching
        pass
    if len(g_items) > 8:
        free: dict[str, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(p_items):
            key = _numeric_key(p)
            if key is not None:
                free[key].append(i)
        used: set[int] = set()
        rest_g = []
        for g in g_items:
            key = _numeric_key(g)
            candidates = free[key] if key is not None else []
            for n, i in enumerate(candidates):
                if equivalent(g, p_items[i])[0]:
                    used.add(i)
                    del candidates[n]
                    break
            else:
                rest_g.append(g)
        g_items = rest_g
        p_items = [p for i, p in enumerate(p_items) if i not in used]
    left = list(p_items)
    for g in g_items:
        for j, p in enumerate(left):
            if g == p or equivalent(g, p)[0]:
                del left[j]
                break
        else:
            return False, f"no match for {g}"
    return True, "same items (order ignored)"


def _ordered(g_items, p_items) -> Result:
    if len(g_items) != len(p_items):
        return False, f"{len(p_items)} items, expected {len(g_items)}"
    for k, (g, p) in enumerate(zip(g_items, p_items, strict=True)):
        ok, why = equivalent(g, p)
        if not ok:
            return False, f"item {k + 1} differs: {why}"
    return True, "same items in order"


def _assignments(s: Seq) -> dict | None:
    """`x = 1, y = 2` as {x: 1, y: 2} when every item assigns a distinct lone variable."""
    out = {}
    for item in s.items:
        value = _assigned_value(item) if isinstance(item, Relation) else None
        if value is None or item.parts[0].value in out:
            return None
        out[item.parts[0].value] = value
    return out


def _in_name_order(s: Seq) -> tuple:
    """The items of `y = 2, x = 3` as the point (3, 2): assignments to distinct variables
    are taken in alphabetical order of the names (x before y, a before b), not in the
    order they were listed; any other list as it is."""
    named = _assignments(s)
    if named is None:
        return s.items
    return tuple(named[k] for k in sorted(named, key=sympy.default_sort_key))


def seqs_equal(g: Seq, p: Seq) -> Result:
    """Lists, sets, tuples and intervals by their brackets (module docstring)."""
    named = _assignments(g) if g.left == "" else None
    if named is not None:  # `x = 1, y = 2, z = 3`: a point with named coordinates
        pred_named = _assignments(p) if p.left == "" else None
        if pred_named is not None:
            if set(pred_named) != set(named):
                return False, "different variables assigned"
            return _ordered([named[k] for k in named], [pred_named[k] for k in named])
        if p.left in ("", "("):
            return _ordered(list(named.values()), p.items)
    multiset = g.left == "" and len(_dedupe(g.items)) < len(g.items)
    if g.left in ("{", "") and p.left in ("{", ""):
        return _unordered(g.items, p.items, multiset)
    if g.left == "" and p.left in "([":
        if len(p.items) == 2:
            return False, "a bracketed pair (interval or point) for a list of values"
        return _unordered(g.items, p.items, multiset)
    if g.left == "{" or p.left == "{":
        return False, "a set for an ordered tuple, or the reverse"
    if p.left == "":  # a bare `3, 5` for a point (3, 5)
        if g.left == "(":
            return _ordered(g.items, _in_name_order(p))
        return False, "a bare list for an interval or bracketed list"
    if len(g.items) == 2 and len(p.items) == 2:
        for side, (gb, pb) in enumerate(((g.left, p.left), (g.right, p.right))):
            if gb != pb and not (_infinite(g.items[side]) and _infinite(p.items[side])):
                return False, f"different brackets: {g.left}..{g.right} vs {p.left}..{p.right}"
    return _ordered(g.items, _in_name_order(p))


def _vector(m: Matrix) -> tuple | None:
    if len(m.rows) == 1:
        return m.rows[0]
    if all(len(r) == 1 for r in m.rows):
        return tuple(r[0] for r in m.rows)
    return None


def matrices_equal(g: Matrix, p: Matrix) -> Result:
    """Same shape and equal entries."""
    gshape, pshape = (len(g.rows), len(g.rows[0])), (len(p.rows), len(p.rows[0]))
    if gshape != pshape:
        return False, f"shape {pshape[0]}x{pshape[1]}, expected {gshape[0]}x{gshape[1]}"
    return _ordered([c for r in g.rows for c in r], [c for r in p.rows for c in r])


# ---------------------------------------------------------------------------- dispatch


def equivalent(gold: Answer, pred: Answer) -> Result:
    """Whether pred states the same answer as gold, with the rule that decided."""
    if gold == pred:
        return True, "identical"
    if isinstance(gold, Choice):
        if isinstance(pred, Choice):
            return (
                gold.letter == pred.letter,
                "same choice" if gold.letter == pred.letter else "different choice",
            )
        return False, "expected a choice letter"
    if isinstance(gold, Text) or isinstance(pred, Text):
        if isinstance(gold, Text) and isinstance(pred, Text) and gold.key == pred.key:
            return True, "same text"
        return False, "different text"
    if isinstance(gold, BaseN):
        if isinstance(pred, BaseN):
            ok = pred.base == gold.base and pred.digits == gold.digits
            return ok, "same base-n number" if ok else "different base-n number"
        if isinstance(pred, Scalar) and pred.value.is_Integer and str(pred.value) == gold.digits:
            return True, f"same digits (base {gold.base} subscript omitted)"
        return False, f"not the base-{gold.base} number {gold}"
    if isinstance(pred, BaseN):
        if isinstance(gold, Scalar) and pred.base == 10:
            return equivalent(gold, Scalar(sympy.Integer(pred.digits)))
        return False, "a base-n number where none was expected"

    if isinstance(gold, Relation):
        if isinstance(pred, Relation):
            return relations_equal(gold, pred)
        named = _named_tuple(gold)
        if named is not None:
            by_name = _named_tuple_vs(named, pred)
            if by_name is not None:
                return by_name
        value = _named_value(gold)
        if value is not None:
            ok, why = equivalent(value, pred)
            return ok, f"{why} (gold is an assignment)"
        gset, pset = as_set(gold), as_set(pred)
        if gset is not None and pset is not None:
            return sets_equal(gset, pset)
        return False, "expected a relation"
    if isinstance(pred, Relation):
        if all(op == "=" for op in pred.ops):
            # `x = 5`, `x = 5+5+1 = 11`, `5 = x`: the value is the one side that is not a
            # lone symbol, and every other such side must agree with it (so `2+2 = 5` and
            # `x^2 = 4` state no value).
            values = [x for x in pred.parts if not _lone_symbol(x)]
            if not values:
                return False, "an equation of symbols where a value was expected"
            value = values[-1]
            for other in values[:-1]:
                if not equivalent(value, other)[0]:
                    return False, "the sides of the equation differ; no value is stated"
            ok, why = equivalent(gold, value)
            return ok, f"{why} (side of an equation)"
        gset, pset = as_set(gold), as_set(pred)
        if gset is not None and pset is not None:
            return sets_equal(gset, pset)
        return False, "a relation where a value was expected"

    if isinstance(gold, Scalar) and isinstance(pred, Scalar):
        return scalars_equal(gold, pred)
    if isinstance(gold, Seq) and isinstance(pred, Seq):
        ok, why = seqs_equal(gold, pred)
        if ok or len(gold.items) != 2:
            return ok, why
    if isinstance(gold, Matrix) and isinstance(pred, Matrix):
        return matrices_equal(gold, pred)
    if isinstance(gold, Matrix) and isinstance(pred, Seq) and pred.left in "([" and pred.left:
        vec = _vector(gold)
        if vec is not None:
            return _ordered(vec, pred.items)
        return False, "a tuple for a matrix"
    if isinstance(gold, Seq) and isinstance(pred, Matrix) and gold.left in "([" and gold.left:
        vec = _vector(pred)
        if vec is not None:
            return _ordered(gold.items, vec)
        return False, "a matrix for a tuple"
    if isinstance(gold, Seq) and len(gold.items) == 1 and not isinstance(pred, Seq):
        return equivalent(gold.items[0], pred)
    if isinstance(pred, Seq) and len(pred.items) == 1 and not isinstance(gold, Seq):
        return equivalent(gold, pred.items[0])
    gset, pset = as_set(gold), as_set(pred)
    if (
        gset is not None
        and pset is not None
        and (isinstance(gold, SetValue) or isinstance(pred, SetValue))
    ):
        return sets_equal(gset, pset)
    if isinstance(gold, Seq) and isinstance(pred, Seq):
        return seqs_equal(gold, pred)
    if isinstance(gold, Scalar) and isinstance(pred, Seq):
        return False, f"{len(pred.items)} candidates for one answer"
    return False, f"different kinds of answer: {type(gold).__name__} vs {type(pred).__name__}"
