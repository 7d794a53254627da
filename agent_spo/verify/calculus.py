"""Evaluate integrals, sums, products, limits and derivatives within the parser's bounds.

`parse.bounded_eval` evaluates each argument first; an operator whose arguments all came
back small is then evaluated here. Work is bounded before sympy starts where it can be:
a finite sum or product is refused when its n terms of up to B bits each could need more
than `MAX_WORK_BITS` (n * B) of exact arithmetic (a sum of a polynomial has a closed
form, so only its value counts), and a derivative above `MAX_ORDER` is refused. After
evaluation the value itself must fit in `max_bits`. A refused operator stays as written
and opaque (compared by structure). What sympy cannot do in closed form (the integral
of x^x) stays as written but not opaque: it is symbolic, like a variable, and is compared
numerically. sympy may still run long on a hard integral or limit: that is why every
check runs in a killable worker with a wall clock (pool.py), never in the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import sympy

OPERATORS = (sympy.Integral, sympy.Sum, sympy.Product, sympy.Limit, sympy.Derivative)
MAX_WORK_BITS = 1 << 20  # finite sum or product: terms x bits per term, at most
MAX_ORDER = 100  # highest derivative order evaluated

Bound = Callable[[sympy.Basic, dict], float]  # parse._log2_bound: (expr, memo) -> log2|value|


def remnants(e: sympy.Basic) -> dict[int, float]:
    """A bound memo giving each operator left in an evaluated tree the size of a symbol.

    Such an operator is one sympy could not evaluate: it stays symbolic in any parent,
    so it cannot make the parent's exact value large."""
    return {id(s): 2.0 for s in sympy.preorder_traversal(e) if isinstance(s, OPERATORS)}


def _work_bits(node: sympy.Sum | sympy.Product, bound: Bound) -> float:
    """Exact work of a sum or product over finite numeric ranges: n terms x bits each;
    0 when a range is symbolic or infinite (nothing to bound before sympy's closed form)."""
    memo = remnants(node.function)
    term = node.function
    terms = 1
    for var, lo, hi in node.limits:
        if not all(b.is_number and b.is_finite and b.is_real for b in (lo, hi)):
            return 0.0  # symbolic or infinite: sympy finds a closed form or gives up
        first, last = int(sympy.floor(lo)), int(sympy.ceiling(hi))
        terms *= max(last - first + 1, 0)
        stand_in = sympy.Dummy()  # a fresh object, so the memo entry is for it alone
        term = term.xreplace({var: stand_in})
        memo[id(stand_in)] = float(max(abs(first), abs(last)).bit_length() + 1)
    if terms == 0:
        return 0.0
    term_bits = bound(term, memo)
    if isinstance(node, sympy.Sum) and all(node.function.is_polynomial(v) for v in node.variables):
        return term_bits + math.log2(terms) + 1  # closed form (Faulhaber): the value only
    return terms * term_bits


def _refused(node: sympy.Basic, bound: Bound) -> bool:
    if isinstance(node, (sympy.Sum, sympy.Product)):
        return _work_bits(node, bound) > MAX_WORK_BITS
    if isinstance(node, sympy.Derivative):
        order = node.derivative_count
        return bool(order.is_Integer and order > MAX_ORDER)
    return False


def evaluate_operator(node: sympy.Basic, bound: Bound, max_bits: int) -> tuple[sympy.Basic, bool]:
    """(value, opaque) of an operator whose arguments are evaluated and small.

    opaque: refused or too large, kept as written. A value sympy could not find is
    returned unevaluated and not opaque."""
    if _refused(node, bound):
        return node, True
    try:
        value = node.doit()
    except Exception:  # noqa: BLE001 - sympy raises anything (NotImplementedError, ...)
        return node, False
    if isinstance(value, OPERATORS):  # not evaluated (a NonElementaryIntegral: no evalf)
        return node, False
    if bound(value, remnants(value)) > max_bits:
        return node, True
    return value, False
