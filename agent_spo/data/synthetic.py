"""The embedded task set: seeded arithmetic problems where running Python is the way to
be right (products too long to do in the head, modular powers, prime counts, digit sums,
two-step problems). Answers are exact integers; difficulty varies by size, so per-prompt
success rates differ, which is what the value tracker and the sampler feed on.

Sizes are chosen for the demo policy, a ~1M-parameter model: every number it has to copy
(an operand into code, a printed result into the answer) is at most seven digits, three
tokens of the demo tokenizer. Longer numbers are where such a model miscopies, and a task
whose only failure mode is miscopying teaches nothing about using the tool.
"""

from __future__ import annotations

import math
import random

from agent_spo.data.problems import Problem

FAMILIES = ("product", "modpow", "primes", "digit_sum", "two_step")  # the default set
# Families only a tool of your own solves: base_digits is the task set of the tool demo
# (docs/tools.md), which `agent-spo tools new`'s template answers.
EXTRA_FAMILIES = ("base_digits",)


def _product(rng: random.Random, level: int) -> tuple[str, int]:
    da, db = ((2, 2), (3, 2), (3, 3), (4, 3))[level]  # products of 3 to 7 digits
    a = rng.randrange(10 ** (da - 1), 10**da)
    b = rng.randrange(10 ** (db - 1), 10**db)
    return f"What is {a} multiplied by {b}?", a * b


def _modpow(rng: random.Random, level: int) -> tuple[str, int]:
    base = rng.randrange(2, 50)
    exp = rng.randrange(10 ** (level + 1), 10 ** (level + 2))
    mod = rng.choice([97, 1009, 10007, 100003][: level + 1])
    return f"What is the remainder when {base}^{exp} is divided by {mod}?", pow(base, exp, mod)


def _primes(rng: random.Random, level: int) -> tuple[str, int]:
    n = (
        rng.randrange(10 ** (level + 2), 2 * 10 ** (level + 2))
        if level < 3
        else rng.randrange(20_000, 60_000)
    )
    return f"How many prime numbers are less than {n}?", _count_primes(n)


def _digit_sum(rng: random.Random, level: int) -> tuple[str, int]:
    if rng.random() < 0.5:
        n = rng.randrange(10 + 10 * level, 30 + 20 * level)
        return f"What is the sum of the digits of {n}! (the factorial of {n})?", sum(
            map(int, str(math.factorial(n)))
        )
    k = rng.randrange(50 + 50 * level, 150 + 100 * level)
    return f"What is the sum of the digits of 2^{k}?", sum(map(int, str(2**k)))


def _two_step(rng: random.Random, level: int) -> tuple[str, int]:
    digits = (2, 3, 3, 4)[level]
    a = rng.randrange(10 ** (digits - 1), 10**digits)
    b = rng.randrange(10 ** (digits - 1), 10**digits)
    m = rng.randrange(101, 1000)
    c = rng.randrange(1, 100)
    text = f"Let N = {a} * {b}. What is the remainder of N when divided by {m}, plus {c}?"
    return text, (a * b) % m + c


def _base_digits(rng: random.Random, level: int) -> tuple[str, int]:
    n = rng.randrange(10 ** (level + 2), 10 ** (level + 3))  # 3 to 6 digits
    base = rng.randrange(2, 10)
    total, m = 0, n
    while m:
        m, d = divmod(m, base)
        total += d
    return f"What is the sum of the digits of {n} written in base {base}?", total


_MAKERS = {
    "product": _product,
    "modpow": _modpow,
    "primes": _primes,
    "digit_sum": _digit_sum,
    "two_step": _two_step,
    "base_digits": _base_digits,
}


def _count_primes(n: int) -> int:
    """Primes below n by a sieve of Eratosthenes."""
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for i in range(2, math.isqrt(n - 1) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, n, i)))
    return sum(sieve)


def make_tasks(
    n: int, seed: int | str = 0, levels: int = 4, families: tuple[str, ...] = FAMILIES
) -> list[Problem]:
    """n distinct problems, reproducible from the seed, spread over families and levels."""
    if n < 1 or not 1 <= levels <= 4:
        raise ValueError(f"need n >= 1 and levels in 1..4, got n={n}, levels={levels}")
    unknown = [f for f in families if f not in _MAKERS]
    if unknown or not families:
        raise ValueError(f"unknown task families {unknown}; known: {', '.join(_MAKERS)}")
    rng = random.Random(f"agent-spo-synthetic-{seed}")
    out: list[Problem] = []
    keys: set[str] = set()
    i = 0
    while len(out) < n:
        family = families[i % len(families)]
        level = rng.randrange(levels)
        text, answer = _MAKERS[family](rng, level)
        i += 1
        prob = Problem(
            f"synthetic-{seed}-{len(out)}", text, str(answer), f"synthetic:{family}:level{level}"
        )
        if prob.key in keys:
            continue  # the same question twice would share one tracker entry
        keys.add(prob.key)
        out.append(prob)
    return out


def synthetic_families(train: str) -> tuple[str, ...] | None:
    """The families a ``data.train`` value names: ``synthetic`` (the default five),
    ``synthetic:F1,F2``; None for a file path. Raises ValueError on an unknown family."""
    if train == "synthetic":
        return FAMILIES
    head, sep, rest = train.partition(":")
    if head != "synthetic" or not sep:
        return None
    families = tuple(f.strip() for f in rest.split(",") if f.strip())
    unknown = [f for f in families if f not in _MAKERS]
    if unknown or not families:
        raise ValueError(
            f"unknown synthetic task families {unknown or [rest]}; known: {', '.join(_MAKERS)}"
        )
    return families
