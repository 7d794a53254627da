"""Imported by the pool's fork server before it forks workers (pool.py).

Importing sympy and the LaTeX parser takes about a second, and the ANTLR parser is slow
on its first inputs while it fills its prediction caches. Doing both here, once, means
every worker forked afterwards starts warm.
"""

from agent_spo.verify.check import check, parse_gold
from agent_spo.verify.parse import parse_cached

_WARM_UP = [
    ("\\frac{1}{2}", "\\boxed{0.5}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}"),
    ("(-\\infty, 3) \\cup (3, \\infty)", "\\boxed{x \\neq 3}"),
    (
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        "\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}",
    ),
    ("y = 2x + 1", "\\boxed{y = 1 + 2x}"),
    ("2\\sqrt{3} - 1", "\\boxed{\\sqrt{12} - 1}"),
    ("x^2 + 2x + 1", "\\boxed{(x+1)^2}"),
    ("-1-16i", "\\boxed{-1 - 16i}"),
    ("\\{1, 2\\}", "\\boxed{1, 2}"),
    ("[-2, 4]", "\\boxed{[-2, 4]}"),
    ("\\sin \\frac{\\pi}{6}", "\\boxed{\\cos \\frac{\\pi}{3}}"),
]

for _gold, _response in _WARM_UP:
    check(_gold, _response)
parse_gold.cache_clear()
parse_cached.cache_clear()
