"""The verifier's one pure entry point: `check(gold, response) -> Verdict`.

Used for both the training reward and evaluation. It never raises: any failure inside
becomes a Verdict. It has no clock of its own; `VerifierPool` (pool.py) runs it in
killable worker processes with a wall-clock limit, which is how untrusted model output
must be checked. Calling it in-process is for trusted inputs and tests.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from functools import lru_cache

from agent_spo.verify.equivalence import equivalent
from agent_spo.verify.extract import (
    Extraction,
    clean_answer,
    extract_answer,
    find_boxes,
    last_number,
)
from agent_spo.verify.normalize import (
    answer_unit,
    juxtaposed_numbers,
    normalize,
    text_key,
)
from agent_spo.verify.parse import Answer, Choice, Text, Unparseable, parse_cached
from agent_spo.verify.verdict import Verdict

_INT = re.compile(r"[+-]?\d{1,1000}")  # longer literals go through the guarded parser
_CHOICE_PREFIX = re.compile(r"\(?\s*([A-J])\s*\)?(?:[\s.:)]|$)")
_OTHER_CHOICE = re.compile(
    r"(?<![A-Za-z\\])(?-i:[A-J])(?![A-Za-z])|(?<![A-Za-z])(?:or|and|also|not|nor|either)(?![A-Za-z])",
    re.IGNORECASE,
)
_BARE_LETTER_WORD = re.compile(r"[A-J]\s+[a-z]")  # `A total of 5`, `I think it is B`
MAX_ANSWER_CHARS = 4000  # longer answers are not normalised (parse.MAX_CHARS is 1500)
# An integral, sum, product, limit or derivative (LaTeX or Unicode). A final answer that
# still holds one restates a computation, often the question's own: evaluating it would
# pay a policy for copying the problem into \boxed{}, so it counts only where the gold
# is written that way too.
_OPERATOR = re.compile(
    r"\\(?:i{1,3}nt|oint|sum|prod|lim|partial)(?![a-zA-Z])"
    r"|\\frac\s*\{\s*d\s*[a-zA-Z]?\s*(?:\^\s*\S+?)?\s*\}\s*\{\s*d\s*[a-zA-Z]"
    r"|[∫∬∭∮∑∏∂]"
)
_HASH = re.compile(r"####\s*(.+)\s*$", re.S)


def gold_answer_text(gold: str) -> str:
    """The answer inside a gold: a boxed gold is unboxed, a GSM8K solution cut at ####."""
    boxes = find_boxes(gold)
    if boxes:
        return clean_answer(boxes[-1][2])
    m = _HASH.search(gold)
    if m and "\n" in gold:
        return clean_answer(m.group(1))
    return clean_answer(gold)


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple[str, Answer | Unparseable]:
    """(normalised text, parsed value) of a gold; cached across the k samples of a problem."""
    normalized = normalize(gold_answer_text(gold))
    return normalized, parse_cached(normalized)


@lru_cache(maxsize=4096)
def gold_unit(gold: str) -> str | None:
    """The canonical unit written after the gold's value (`5 \\text{ hours}`), else None."""
    return answer_unit(gold_answer_text(gold))


def _units_differ(g_unit: str | None, p_unit: str | None) -> bool:
    """Both sides name a recognised unit, and not the same one (5 hours vs 5 minutes)."""
    known = {None, "count", "%"}
    return g_unit not in known and p_unit not in known and g_unit != p_unit


def _squash(text: str) -> str:
    return "".join(text.split())


def _verdict(correct: bool, reason: str, ext: Extraction, pred: str | None, g, p, status=None):
    return Verdict(
        correct=correct,
        status=status or ("correct" if correct else "incorrect"),
        reason=reason,
        prediction=pred,
        how=ext.how,
        gold_parsed=None if isinstance(g, Unparseable) else str(g),
        pred_parsed=None if p is None or isinstance(p, Unparseable) else str(p),
        gold_ok=not isinstance(g, Unparseable),
    )


def _check(gold: str, response: str) -> Verdict:
    g_norm, g = parse_gold(gold)
    ext = extract_answer(response)
    if ext.answer is None:
        return Verdict(False, "no_answer", "no final answer found", how=ext.how,
                       gold_parsed=None if isinstance(g, Unparseable) else str(g),
                       gold_ok=not isinstance(g, Unparseable))  # fmt: skip
    pred = ext.answer
    if len(pred) > MAX_ANSWER_CHARS:
        return _verdict(False, "the extracted answer is too long", ext, pred, g, None)
    p_norm = normalize(pred)
    if not p_norm:
        return _verdict(False, "the extracted answer is empty", ext, pred, g, None, "no_answer")
    if juxtaposed_numbers(p_norm) and p_norm != g_norm:
        return _verdict(False, f"numbers side by side: {p_norm}", ext, pred, g, None)
    if _OPERATOR.search(pred) and not _OPERATOR.search(gold):
        why = "the answer is not a final value: it still holds an integral, sum, limit, ..."
        return _verdict(False, why, ext, pred, g, None)
    g_unit, p_unit = gold_unit(gold), answer_unit(pred)
    if _units_differ(g_unit, p_unit):
        return _verdict(False, f"different units: {p_unit} vs {g_unit}", ext, pred, g, None)

    # Integers, the common case for AIME/DAPO-style training, need no parser at all.
    if _INT.fullmatch(g_norm) and _INT.fullmatch(p_norm):
        same = int(g_norm) == int(p_norm)
        return _verdict(
            same,
            "equal integers" if same else f"different integers: {p_norm} vs {g_norm}",
            ext,
            pred,
            g,
            g if same else p_norm,
        )
    if _squash(g_norm) == _squash(p_norm):
        return _verdict(True, "same text after normalisation", ext, pred, g, g)
    if isinstance(g, Choice):
        m = _CHOICE_PREFIX.match(p_norm)
        letter = m.group(1) if m else None
        if m and (
            _OTHER_CHOICE.search(p_norm, m.end(1) + 1) or _BARE_LETTER_WORD.match(p_norm)
        ):  # `A or B`, `(A)(B)`, `A B C D`: several letters; `A total of 5`: a word
            letter = None
        ok = letter == g.letter
        why = f"choice {letter}" if letter else "no choice letter in the answer"
        return _verdict(ok, f"{why}, expected {g.letter}", ext, pred, g, letter)

    p = parse_cached(p_norm)
    if isinstance(p, Unparseable) and ext.how == "bare":
        number = last_number(response)
        if number is not None:  # "I think it is 12": a short sentence, not LaTeX
            ext = Extraction(number, "last-number")
            pred, p_norm = number, normalize(number)
            p = parse_cached(p_norm)
    same_text = _squash(g_norm).lower() == _squash(p_norm).lower()
    if isinstance(g, Unparseable):
        if same_text:
            return _verdict(True, "same text (the gold does not parse)", ext, pred, g, p)
        return _verdict(False, f"gold does not parse: {g}", ext, pred, g, p, "unparseable")
    if isinstance(p, Unparseable):
        if same_text:
            return _verdict(True, "same text (the answer does not parse)", ext, pred, g, p)
        return _verdict(False, f"answer does not parse: {p}", ext, pred, g, p, "unparseable")

    ok, why = equivalent(g, p)
    if (
        not ok
        and (isinstance(g, Text) or isinstance(p, Text))
        and text_key(g_norm) == text_key(p_norm)
    ):
        ok, why = True, "same text"
    if ext.hedged and not ok:
        why = f"hedged between several boxed answers; {why}"
    return _verdict(ok, why, ext, pred, g, p)


def check(gold: str, response: str) -> Verdict:
    """Verify one response against one gold answer; never raises."""
    start = time.perf_counter()
    try:
        verdict = _check(
            str(gold) if gold is not None else "", str(response) if response is not None else ""
        )
    except Exception as e:  # noqa: BLE001 - hostile input: sympy raises anything; one verdict
        verdict = Verdict(
            False, "unparseable", f"verifier error: {type(e).__name__}: {str(e)[:200]}"
        )
    return replace(verdict, elapsed_s=time.perf_counter() - start)


def verify(gold: str, response: str) -> bool:
    """True when the response's final answer equals the gold answer."""
    return check(gold, response).correct
