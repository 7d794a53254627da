"""Symbolic math tools built on sympy. They run inside the sandbox: sympy on hostile input
can hang or exhaust memory, so the sandbox's deadline and limits bound every call.

Expressions use Python/sympy syntax; `^` means power and implicit multiplication is
allowed (`2x` is `2*x`).
"""

from __future__ import annotations

from tools.sdk import tool


def _parse(text: str):
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)
    import re

    parts = re.split(r"(?<![<>!=])=(?!=)", text)  # a lone '=', not <=, >=, != or ==
    if len(parts) == 2:
        import sympy

        lhs, rhs = parts
        return sympy.Eq(
            parse_expr(lhs, transformations=transformations),
            parse_expr(rhs, transformations=transformations),
        )
    return parse_expr(text, transformations=transformations)


@tool
def simplify(expression: str) -> str:
    """Simplify a mathematical expression exactly (sympy.simplify).

    Args:
        expression: The expression, e.g. "sin(x)**2 + cos(x)**2" or "(x^2 - 1)/(x - 1)".
    """
    import sympy

    return str(sympy.simplify(_parse(expression)))


@tool
def factor(expression: str) -> str:
    """Factor a polynomial over the rationals, or an integer into primes.

    Args:
        expression: A polynomial such as "x^3 - x", or an integer such as "360".
    """
    import sympy

    value = _parse(expression)
    if value.is_Integer:
        return " * ".join(
            f"{p}^{k}" if k > 1 else str(p) for p, k in sorted(sympy.factorint(value).items())
        ) or str(value)
    return str(sympy.factor(value))


@tool
def expand(expression: str) -> str:
    """Expand products and powers in an expression.

    Args:
        expression: The expression, e.g. "(x + 1)^3".
    """
    import sympy

    return str(sympy.expand(_parse(expression)))


@tool
def solve(equations: list[str], variables: list[str] | None = None) -> str:
    """Solve equations exactly. Each equation is "lhs = rhs" or an expression equal to 0.

    Args:
        equations: One or more equations, e.g. ["x^2 = 2"] or ["x + y = 3", "x - y = 1"].
        variables: Unknowns to solve for, e.g. ["x", "y"]; default: all free symbols.
    """
    import sympy

    eqs = [_parse(e) for e in equations]
    syms = [sympy.Symbol(v) for v in variables] if variables else None
    solutions = sympy.solve(eqs, syms, dict=True) if syms else sympy.solve(eqs, dict=True)
    if not solutions:
        return "no solution"
    return "; ".join(", ".join(f"{k} = {v}" for k, v in sol.items()) for sol in solutions)


@tool
def integrate(
    expression: str, variable: str = "x", lower: str | None = None, upper: str | None = None
) -> str:
    """Integrate an expression: an antiderivative, or a definite integral if both bounds are given.

    Args:
        expression: The integrand, e.g. "x*exp(x)".
        variable: The integration variable.
        lower: Lower bound of a definite integral, e.g. "0" or "-oo".
        upper: Upper bound of a definite integral, e.g. "pi" or "oo".
    """
    import sympy

    x = sympy.Symbol(variable)
    f = _parse(expression)
    if (lower is None) != (upper is None):
        raise ValueError("give both lower and upper for a definite integral, or neither")
    if lower is None:
        return str(sympy.integrate(f, x))
    assert upper is not None  # both or neither, checked above
    return str(sympy.integrate(f, (x, _parse(lower), _parse(upper))))


@tool
def evaluate(expression: str, digits: int = 15) -> str:
    """Evaluate an expression numerically to the given number of significant digits.

    Args:
        expression: A closed-form expression, e.g. "sqrt(2) + pi" or "binomial(30, 15)".
        digits: Significant digits, 1 to 1000.
    """
    import sympy

    if not 1 <= digits <= 1000:
        raise ValueError("digits must be between 1 and 1000")
    return str(sympy.N(_parse(expression), digits))
