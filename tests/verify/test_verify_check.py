"""The pure entry point: the Verdict record, never raising, statuses, the gold cache."""

import dataclasses
import math

import pytest

from agent_spo.verify import STATUSES, Verdict, check, verify
from agent_spo.verify.check import parse_gold
from agent_spo.verify.extract import extract_answer
from agent_spo.verify.normalize import normalize
from agent_spo.verify.parse import collapse_double_brackets


def test_verify_is_check_correct():
    assert verify("\\frac{1}{2}", "so $\\boxed{0.5}$") is True
    assert verify("\\frac{1}{3}", "so $\\boxed{0.333}$") is False


def test_verdict_fields_and_reward():
    v = check("\\frac{1}{2}", "The answer is $\\boxed{\\dfrac{2}{4}}$.")
    assert dataclasses.is_dataclass(v) and v.status == "correct" and v.correct
    assert v.prediction == "\\dfrac{2}{4}" and v.how == "boxed"
    assert v.gold_parsed == "1/2" and v.pred_parsed == "1/2"
    assert v.elapsed_s > 0 and v.reward == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.correct = False  # type: ignore[misc]
    d = v.as_dict()
    assert d["status"] == "correct" and d["reward"] == 1.0 and "elapsed_ms" in d


@pytest.mark.parametrize(
    "gold,response,status",
    [
        ("5", "\\boxed{5}", "correct"),
        ("5", "\\boxed{6}", "incorrect"),
        ("5", "", "no_answer"),
        ("5", "I could not solve it.", "no_answer"),
        ("5", "\\boxed{\\frac{1}{}}", "unparseable"),
        ("5", "\\boxed{1/0}", "unparseable"),
    ],
)
def test_statuses(gold, response, status):
    v = check(gold, response)
    assert v.status == status and v.status in STATUSES
    assert v.correct == (status == "correct")
    assert v.reward == (1.0 if status == "correct" else 0.0)


def test_bad_gold_is_not_scorable():
    v = check("\\frac{1}{", "\\boxed{5}")
    assert v.status == "unparseable" and not v.gold_ok and v.reward is None


def test_timeout_verdict_has_no_reward():
    assert Verdict(False, "timeout", "killed").reward is None


@pytest.mark.parametrize(
    "gold,response",
    [
        (None, None),
        (5, 5),
        ("5", None),
        (None, "\\boxed{5}"),
        ("\x00\ud800", "\\boxed{\x00}"),
        ("\\boxed{", "\\boxed{}}}}{{{"),
        ("}" * 1000, "{" * 1000),
        ("\\frac" * 500, "\\sqrt" * 500),
        ("$" * 999, "\\(" * 999),
        (math.pi, float("nan")),
    ],
)
def test_never_raises(gold, response):
    v = check(gold, response)
    assert isinstance(v, Verdict) and v.status in STATUSES


def test_numbers_are_exact():
    assert not verify("\\frac{1}{2^{99}}", "\\boxed{\\frac{1}{2^{98}}}")  # relative, not absolute
    assert not verify("1000000", "\\boxed{1000050}")  # no relative tolerance
    assert not verify("0.5", "\\boxed{50}")  # no percentage rule
    assert verify("0.5", "\\boxed{\\frac{1}{2}}")
    assert verify("3.14", "\\boxed{\\pi}")  # exact value rounds to a decimal gold
    assert not verify("\\pi", "\\boxed{3.14}")


def test_integer_answers_skip_the_parser():
    v = check("204", "Thus the answer is $\\boxed{204}$.")
    assert v.correct and v.reason == "equal integers"


def test_gold_parse_is_cached_across_samples():
    parse_gold.cache_clear()
    gold = "\\left( 3, \\frac{\\pi}{2} \\right)"
    for k in range(8):
        check(gold, f"\\boxed{{({k}, \\pi/2)}}")
    info = parse_gold.cache_info()
    assert info.misses == 1 and info.hits == 7


@pytest.mark.parametrize(
    "response,answer,how",
    [
        ("so \\boxed{7}", "7", "boxed"),
        ("so \\boxed {7}", "7", "boxed"),
        ("so \\boxed 7.", "7", "boxed"),
        ("so \\fbox{7}", "7", "boxed"),
        ("$\\boxed{1}$ and $\\boxed{2}$", "1, 2", "boxes"),
        ("$\\boxed{1}$. Wait, no: $\\boxed{2}$", "2", "boxed"),
        (
            "The final answer is $\\frac{1}{2}$. I hope it is correct.",
            "\\frac{1}{2}",
            "final-answer-is",
        ),
        ("work\nAnswer: $x^2$", "x^2", "answer-line"),
        ("work\n**Answer:** 12", "12", "answer-line"),
        ("work\n#### 1,000", "1,000", "hash"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", "bare"),
        ("We get 3 apples, then 4 more, 7 in all.", "7", "last-number"),
        ("Either 3 or 4 apples.", None, "none"),
        ("So the correct option is (A).", "(A)", "final-answer-is"),
        ("The correct choice is **(C)**.", "(C)", "final-answer-is"),
        ("Option (A) fails. The correct option is (B).", "(B)", "final-answer-is"),
        ("The correct option is not (A).", "not (A)", "final-answer-is"),
        ("work\nFinal Answer: the largest n is 34.", "34", "answer-line"),
        ("Final Answer: The largest value of $n$ is $34$.", "34", "answer-line"),
        ("Final Answer: the largest n is 34 + 1", "34 + 1", "answer-line"),
        ("Final Answer: the largest n is not 34.", "the largest n is not 34", "answer-line"),
        ("Final Answer: n or m is 34", "n or m is 34", "answer-line"),
        ("Final Answer: 34 is too big, the answer is 35", "35", "final-answer-is"),
    ],
)
def test_extraction(response, answer, how):
    found = extract_answer(response)
    assert (found.answer, found.how) == (answer, how)


def test_hedged_boxes_are_flagged():
    found = extract_answer("either $\\boxed{3}$ or $\\boxed{5}$")
    assert found.answer == "3, 5" and found.hedged
    assert "hedged" in check("3", "either $\\boxed{3}$ or $\\boxed{5}$").reason


@pytest.mark.parametrize(
    "raw,normal",
    [
        ("½", "\\frac{1}{2}"),
        ("96,\\!569", "96569"),
        ("1\\,000", "1000"),
        ("20\\text{ days}", "20"),
        ("\\$5.50", "5.50"),
        ("45\\%", "45"),
        ("100^\\circ", "100"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "( 1, 2 )"),
        ("0.\\overline{3}", "\\frac{1}{3}"),
        ("1.5e3", "1.5\\times 10^{3}"),
        ("\\varnothing", "\\emptyset"),
        ("x**2", "x^2"),
        ("sqrt(x+1)", "\\sqrt{x+1}"),
        ("x ≤ 3", "x \\le 3"),
    ],
)
def test_normalize(raw, normal):
    assert normalize(raw) == normal


@pytest.mark.parametrize(
    "gold, response, correct",
    [
        # brace-less arguments, as TeX reads them: one token each, spaces skipped
        ("\\frac{1}{3}", "\\boxed{\\frac 1 3}", True),
        ("\\frac{1}{3}", "The answer is \\boxed{\\dfrac 1 3}.", True),
        ("-\\frac{1}{2}", "\\boxed{-\\frac 1 2}", True),
        ("\\frac{a}{b}", "\\boxed{\\frac a b}", True),
        ("\\frac{1}{2}+x", "\\boxed{\\frac 1 2 + x}", True),
        # near misses that must stay false
        ("3", "\\boxed{\\frac 1 3}", False),
        ("13", "\\boxed{\\frac 1 3}", False),
        ("\\frac{1}{32}", "\\boxed{\\frac 1 3 2}", False),  # a third number: ambiguous
        ("\\frac{2}{3}", "\\boxed{\\frac 1 3 2}", False),
        ("\\frac{12}{5}", "\\boxed{\\frac 12 5}", False),  # TeX: \frac{1}{2} 5
        ("\\frac{1}{3}", "\\boxed{\\frac 1 3.5}", False),
    ],
)  # fmt: skip
def test_brace_less_fractions_read_as_tex_reads_them(gold, response, correct):
    assert check(gold, response).correct is correct


@pytest.mark.parametrize(
    "raw,collapsed",
    [
        ("((5))", "(5)"),
        ("[[[5]]]", "[5]"),
        ("{{x}}", "{x}"),
        ("(((x+1)))^2", "(x+1)^2"),
        ("\\frac{{1}}{{2}}", "\\frac{1}{2}"),
        # kept as written
        ("((x)+(y))", "((x)+(y))"),  # the outer pair holds two groups
        ("((1,2))", "((1,2))"),  # a comma inside: tuple or interval, the parser decides
        ("([5])", "([5])"),  # different kinds
        ("\\{\\{5\\}\\}", "\\{\\{5\\}\\}"),  # escaped braces are sets
        ("((5)", "((5)"),  # unbalanced
        ("((1,2])", "((1,2])"),  # crossed: a half-open interval inside
    ],
)
def test_collapse_double_brackets(raw, collapsed):
    assert collapse_double_brackets(raw) == collapsed


def test_deeply_parenthesised_number_is_fast(pool):
    nested = "(" * 30 + "5" + ")" * 30
    v = pool.check("5", f"\\boxed{{{nested}}}")
    assert v.status == "correct", v.reason
    assert v.elapsed_s < 1.0  # the parser alone took ~3 s on this before the collapse
    assert not pool.check("6", f"\\boxed{{{nested}}}").correct
