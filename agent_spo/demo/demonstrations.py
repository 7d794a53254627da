"""Synthetic tool-use demonstrations for the demo model's supervised warm start.

For each task the demonstration either solves it with the python tool (the code that
computes the answer, the real output, then ``\\boxed{answer}``) or answers at once with a
plausible but wrong number, as a model that guesses would. The share of guesses differs
by task family and level, so the warm-started policy is right on some prompts far more
often than on others, and reinforcement learning has a clear thing to learn: use the
tool. Two-step tasks need two calls whose second depends on the first (session state).
"""

from __future__ import annotations

import json
import math
import random
import re

from agent_spo.data.problems import Problem

# Probability that a demonstration uses the tool, by family (minus 0.05 per level).
TOOL_SHARE = {"product": 0.55, "modpow": 0.45, "primes": 0.4, "digit_sum": 0.5, "two_step": 0.6}


def family_and_level(problem: Problem) -> tuple[str, int]:
    _, family, level = problem.source.split(":")
    return family, int(level.removeprefix("level"))


def solution_steps(problem: Problem) -> list[tuple[str, str]]:
    """The (python code, its printed output) calls that solve a synthetic task."""
    family, _ = family_and_level(problem)
    n = [int(x) for x in re.findall(r"\d+", problem.problem)]
    if family == "product":
        a, b = n
        return [(f"print({a} * {b})", str(a * b))]
    if family == "modpow":
        base, exp, mod = n
        return [(f"print(pow({base}, {exp}, {mod}))", str(pow(base, exp, mod)))]
    if family == "primes":
        (m,) = n
        return [(f"from sympy import primepi\nprint(primepi({m} - 1))", problem.answer)]
    if family == "digit_sum":
        if "factorial" in problem.problem:
            k = n[0]
            code = f"import math\nprint(sum(map(int, str(math.factorial({k})))))"
        else:
            k = n[1]
            code = f"print(sum(map(int, str(2**{k}))))"
        return [(code, problem.answer)]
    if family == "two_step":
        a, b, m, c = n
        return [(f"N = {a} * {b}\nprint(N)", str(a * b)), (f"print(N % {m} + {c})", problem.answer)]
    raise ValueError(f"no demonstration for family {family!r}")


def call_text(fmt: str, code: str) -> str:
    """A model turn that asks for one python call, in the given format."""
    if fmt == "hermes":
        return (
            "<tool_call>\n"
            + json.dumps({"name": "python", "arguments": {"code": code}})
            + "\n</tool_call>"
        )
    return f"<code>\n```python\n{code}\n```\n</code>"


def answer_text(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def wrong_guess(answer: str, rng: random.Random) -> str:
    """A number of about the right size that is not the answer."""
    digits = max(1, len(answer) + rng.choice([-1, 0, 0, 1]))
    while True:
        guess = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))
        if guess != answer:
            return guess


def demonstration(
    problem: Problem, fmt: str, rng: random.Random
) -> tuple[list[tuple[str, str | None]], bool]:
    """Turns ``[(model text, tool output or None), ...]`` and whether the tool was used."""
    family, level = family_and_level(problem)
    if rng.random() < TOOL_SHARE[family] - 0.05 * level:
        turns = [(call_text(fmt, code), out) for code, out in solution_steps(problem)]
        return [*turns, (answer_text(problem.answer), None)], True
    return [(answer_text(wrong_guess(problem.answer, rng)), None)], False


def expected_accuracy(problems: list[Problem]) -> float:
    """Accuracy of a policy that imitates the demonstrations perfectly."""
    return math.fsum(
        max(0.0, TOOL_SHARE[family_and_level(p)[0]] - 0.05 * family_and_level(p)[1])
        for p in problems
    ) / max(1, len(problems))
