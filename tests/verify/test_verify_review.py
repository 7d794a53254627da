"""Inputs from a review that hung or ran for seconds in-process: each must now finish fast."""

import time

import pytest

from agent_spo.verify import check
from agent_spo.verify.normalize import normalize


def _boxed(s: str) -> str:
    return "The answer is $\\boxed{" + s + "}$."


@pytest.mark.parametrize(
    "answer",
    [
        "3.5\\cdot2^{10^{10}}",
        "0.5+9^{9^{9}}",
        "1.5e-999999999",
        "\\Gamma(10^{10})",
        "\\exp(10^{10})",
        "\\gcd(10^{10^{10}},6)",
        "x^" * 300 + "2",
        "1" * 20000 + "x",
        ".1" * 5000,
    ],
)
def test_hostile_answer_is_quick_and_wrong(answer):
    start = time.perf_counter()
    verdict = check("5", _boxed(answer))
    assert time.perf_counter() - start < 2.0
    assert not verdict.correct


@pytest.mark.parametrize("text", ["1" * 3900 + "x", "1" * 3900 + ".x", "0." + "1" * 3900 + "x"])
def test_decimal_patterns_are_linear(text):
    start = time.perf_counter()
    normalize(text)
    assert time.perf_counter() - start < 0.5


def test_many_boxes_are_linear():
    start = time.perf_counter()
    assert check("5", "\\boxed{5}, " * 30000).correct
    assert time.perf_counter() - start < 2.0
