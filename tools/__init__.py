"""Tools the agent can call: the tool SDK and the built-in tools.

Imported inside sandboxes, so this package must never import torch or the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tools.sdk import Tool


def builtin_tools() -> list[Tool]:
    """The python interpreter and the sympy math tools."""
    from tools import algebra, interpreter

    return [
        interpreter.python,
        algebra.simplify,
        algebra.factor,
        algebra.expand,
        algebra.solve,
        algebra.integrate,
        algebra.evaluate,
    ]
