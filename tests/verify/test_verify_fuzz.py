"""Hypothesis fuzzing: random and adversarial strings never crash the verifier, and every
pooled check returns within its wall clock."""

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_spo.verify import STATUSES, Verdict
from agent_spo.verify.extract import extract_answer
from agent_spo.verify.normalize import normalize

TOKENS = [
    "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\{", "\\}", "(", ")", "[", "]", "^", "_",
    "\\frac", "\\dfrac", "\\sqrt", "\\sqrt[3]", "\\pi", "\\infty", "!", "\\binom", "\\cdot",
    "\\times", "\\le", "\\ge", "=", "<", ">", ",", ";", "\\cup", "\\setminus", "\\mathbb{R}",
    "\\emptyset", "\\text{", "\\left(", "\\right)", "\\begin{pmatrix}", "\\end{pmatrix}", "&",
    "\\\\", "$", "\\(", "\\)", "x", "y", "i", "e", "0", "1", "2", "9", "99", "10^{10}", "0.3",
    "\\overline{3}", "...", "%", "^\\circ", "½", "√", "π", "−", "Answer: ", "#### ",
    "The final answer is ", " or ", " and ", "\n", " ",
]  # fmt: skip
latexish = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
anything = st.one_of(st.text(max_size=300), latexish)
FAST = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(anything)
def test_extract_and_normalize_never_raise(text):
    found = extract_answer(text)
    assert found.answer is None or isinstance(found.answer, str)
    normalize(text)
    if found.answer is not None:
        normalize(found.answer)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(gold=anything, response=anything)
def test_pooled_check_always_returns_in_time(pool, gold, response):
    start = time.monotonic()
    v = pool.check(gold, "\\boxed{" + response + "}", timeout_s=2.0)
    assert time.monotonic() - start < 3.0  # 2 s limit plus kill and IPC slack
    assert isinstance(v, Verdict) and v.status in STATUSES
    assert v.correct == (v.status == "correct")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    depth=st.integers(1, 200),
    base=st.sampled_from(["2", "9", "10", "x", "\\pi", "0.5"]),
    op=st.sampled_from(["^{", "\\frac{1}{1+", "\\sqrt{", "(", "!{", "\\binom{10^{9}}{"]),
)
def test_adversarial_towers_and_nesting_return_in_time(pool, depth, base, op):
    closing = {"(": ")", "\\binom{10^{9}}{": "}{3}"}.get(op, "}")
    expr = (
        (base + op) * depth + base + closing * depth
        if op == "^{"
        else op * depth + base + closing * depth
    )
    start = time.monotonic()
    v = pool.check("1", f"\\boxed{{{expr}}}", timeout_s=2.0)
    assert time.monotonic() - start < 3.0
    assert v.status in STATUSES and not v.correct
