"""Find the final answer in a model's response.

Order (the first that finds something wins):

1. `\\boxed{...}` / `\\boxed {...}` / `\\boxed 7` / `\\fbox{...}`, brace-matched. Policy for
   several boxes: the *last* box is the answer; boxes right before it that are separated
   from it only by commas, "and", "or", `\\quad` or math delimiters form one list with it
   ("`\\boxed{2}, \\boxed{3}`" is the list 2, 3). Boxes separated by other text are
   earlier attempts or intermediate results, so a re-boxed self-correction keeps only the
   last one. Boxes joined by "or" are competing candidates: they stay a list, which never
   equals a single gold (the hedge fails), and the extraction is marked hedged.
2. "final answer is X" / "the answer is X" / "the correct option is X" (last occurrence).
3. `Answer: X` lines (last; markdown bold allowed), then `#### X` (GSM8K). In 2 and 3 a
   short prose subject that only names the quantity is dropped ("Final Answer: the
   largest n is 34" -> 34); one that transforms or hedges keeps the line whole, and a
   sentence that only poses the question ("check whether the answer is 5") is skipped.
4. A short response is taken whole (a bare answer; parsed as LaTeX later).
5. The last number of the last line that has one, unless that line hedges with "or".

Every pattern here is linear-time: the input is model output and must never make a
regex backtrack for long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BARE_MAX_CHARS = 1500  # a one-line response up to this long may be a bare answer


@dataclass(frozen=True)
class Extraction:
    """The answer text found in a response, and how it was found."""

    answer: str | None
    how: str  # boxed | boxes | final-answer-is | answer-line | hash | bare | last-number | none
    hedged: bool = False  # several boxed candidates joined by "or"


_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_SEPARATOR = re.compile(
    r"(?:\s|,|;|&|\$|\\\(|\\\)|\\\[|\\\]|\\quad|\\qquad|\\,|\\;|\\ |~|\\\\|\band\b|\bor\b"
    r"|\\text\s*\{\s*(?:and|or)?\s*\}|\\(?:mbox|textrm)\s*\{\s*(?:and|or)?\s*\})*",
    re.IGNORECASE,
)
_OR = re.compile(r"\bor\b", re.IGNORECASE)
# A line with these words may name a number only to reject it ("It is not 5", "I first
# thought it was 5"): no bare number is taken from it.
_DOUBT = re.compile(
    r"n't\b|n’t\b|\b(?:not|no|never|nor|thought|instead|wrong|incorrect|mistake|mistaken"
    r"|initially|originally|previously|earlier|except|excluding|unless|rather|cannot)\b",
    re.IGNORECASE,
)
_MATH_SPAN_AFTER = re.compile(r"\s*(?:\$|\\\(|\\\[|\d)")
_FINAL_IS = re.compile(
    r"(?:final\s+answer|\bthe\s+(?:(?:correct|right|final)\s+)?answer"
    r"|\bthe\s+(?:correct|right)\s+(?:option|choice))\s+(?:is|would\s+be|=)\s*:?\s*",
    re.IGNORECASE,
)
# "the largest n is 34" after `Final Answer:`: a short prose subject, then the value. The
# subject is words and one-letter variables only (no digits, no operators, no `=`), with
# one word of three letters or more, so "34 is too big, ..." and "x is 2x" stay whole.
_SUBJECT_IS = re.compile(
    r"((?:[A-Za-z]{2,}|[A-Za-z]|\$[A-Za-z]\$|\\\([A-Za-z]\\\))"
    r"(?:\s+(?:[A-Za-z]{2,}|[A-Za-z]|\$[A-Za-z]\$|\\\([A-Za-z]\\\))){0,11})"
    r"\s+(?:is|equals)\s+"
)
_PROSE_SUBJECT = re.compile(r"[A-Za-z]{3,}")  # a subject of lone variables (`x is`) is math
# The only words a dropped subject may hold: generic ones that name whatever was asked
# for. A word that transforms it ("half of the total is 12", "x squared is 4", "the answer
# minus one is 5"), hedges ("the answer probably is 3") or names one particular quantity
# ("the side length is 12", when the question may ask for the perimeter) keeps the line
# whole.
_NAMING_WORDS = frozenset(
    "the a an our this final required desired requested largest smallest greatest least "
    "maximum minimum maximal minimal possible only unique positive real number numbers "
    "value values answer integer integers result count of ways solutions pair pairs line "
    "equation curve point function polynomial expression set interval matrix vector "
    "coordinates".split()
)
# A sentence that only poses the question ("check whether the correct option is (A)")
# states no answer.
_HYPOTHESIS = re.compile(
    r"\bwhether\b|\bsuppos|\bhypothes|\bto\s+(?:check|verify|test|see|determine)\b",
    re.IGNORECASE,
)
_ANSWER_LINE = re.compile(
    r"\banswer\s*(?:\*\*|__)?\s*(?:[:：]|(?=\$|\\\(|\\\[))\s*(?:\*\*|__)?[ \t]*([^\n]*)",
    re.IGNORECASE,
)
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ENVIRONMENT = re.compile(r"\\(begin|end)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_COMMAND_ARG = re.compile(r"\\[a-zA-Z]+\s*\{[^{}]*\}")  # \text{..}, \begin{..}: not prose
_WORDS_ONLY = re.compile(r"[\w\s'\-.,()\\{}]+")
_CALCULATOR = re.compile(r"<<[^<>\n]{0,200}>>")  # GSM8K calculator annotations
_SPACING_TAILS = ("\\qquad", "\\quad", "\\,", "\\;", "\\:", "\\!", "\\>", "\\ ", "~")


def _strip_trailing_spacing(text: str) -> str:
    """`5\\,`, `5\\;`, `5\\ ` (whose space `find_boxes` already stripped, leaving `5\\`)."""
    end = len(text)
    while True:
        while end > 0 and text[end - 1].isspace():
            end -= 1
        for tail in _SPACING_TAILS:
            if text.endswith(tail, 0, end) and not text.endswith("\\" + tail, 0, end):
                end -= len(tail)
                break
        else:
            if text.endswith("\\", 0, end) and not text.endswith("\\\\", 0, end):
                end -= 1
            return text[:end]


_HOPE = re.compile(r"\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)


def _match_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at open_at (escaped braces skipped), or None."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_boxes(text: str) -> list[tuple[int, int, str]]:
    """Every top-level box as (start, end, content); boxes inside boxes are not listed."""
    boxes: list[tuple[int, int, str]] = []
    pos = 0
    while True:
        m = _BOX.search(text, pos)
        if m is None:
            return boxes
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_brace(text, i)
            if close is None:  # unclosed: a truncated response; nothing after it is an answer
                return boxes
            boxes.append((m.start(), close + 1, text[i + 1 : close].strip()))
            pos = close + 1
        else:  # `\boxed 7`: one token, up to white space or a math delimiter
            token = re.match(r"[^\s$]+", text[i:])
            if token and i > m.end():
                content = token.group(0).rstrip(".,;")
                boxes.append((m.start(), i + token.end(), content))
                pos = i + token.end()
            else:
                pos = m.end()


def _unwrap_inner_boxes(content: str) -> str:
    """`\\boxed{\\boxed{5}}` -> `5`."""
    for _ in range(100):
        inner = find_boxes(content)
        if len(inner) == 1 and inner[0][0] == 0 and inner[0][1] == len(content):
            content = inner[0][2]
        else:
            break
    return content


def _from_boxes(text: str, boxes: list[tuple[int, int, str]]) -> Extraction:
    group = [boxes[-1]]  # built last box first, then reversed
    hedged = False
    for box in reversed(boxes[:-1]):
        between = text[box[1] : group[-1][0]]
        if len(between) > 200 or _SEPARATOR.fullmatch(between) is None:
            break
        hedged = hedged or bool(_OR.search(between))
        group.append(box)
    group.reverse()
    contents: list[str] = []
    for _, _, content in group:
        content = _unwrap_inner_boxes(content)
        if not contents or contents[-1] != content:  # the same box repeated is one answer
            contents.append(content)
    if len(contents) == 1:
        return Extraction(contents[0], "boxed")
    return Extraction(", ".join(contents), "boxes", hedged=hedged and len(contents) > 1)


def _first_math_span(text: str) -> str:
    """Text up to the end of its first sentence, or the first `$...$` span if it starts so."""
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left):
            end = text.find(right, len(left))
            if end > 0:
                return text[len(left) : end]
    text = _HOPE.sub("", text.split("\n", 1)[0])
    sentence_end = re.search(r"\.\s", text)
    if sentence_end:
        text = text[: sentence_end.start()]
    return text


def _hedged_span(rest: str, answer: str) -> bool:
    """After a leading math span, the same sentence offers another one with "or"."""
    rest = rest.strip()
    if not rest.startswith(("$", "\\(", "\\[")):
        return False
    at = rest.find(answer)
    tail = rest[at + len(answer) :] if at >= 0 else rest
    tail = tail.lstrip("$\\)] ")
    sentence = re.split(r"\.\s|\n", tail, maxsplit=1)[0]
    m = _OR.search(sentence)
    return m is not None and _MATH_SPAN_AFTER.match(sentence, m.end()) is not None


def clean_answer(text: str) -> str:
    """Strip math delimiters, markdown emphasis and trailing punctuation around an answer."""
    text = _HOPE.sub("", text.strip())
    for _ in range(4):
        before = text
        text = text.strip()
        for left, right in (
            ("**", "**"),
            ("__", "__"),
            ("$$", "$$"),
            ("$", "$"),
            ("\\(", "\\)"),
            ("\\[", "\\]"),
            ("`", "`"),
        ):
            if (
                len(text) >= len(left) + len(right)
                and text.startswith(left)
                and text.endswith(right)
            ):
                text = text[len(left) : len(text) - len(right)].strip()
        text = _strip_trailing_spacing(text).rstrip(" ;:,")
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1].rstrip()
        if text.startswith(("**", "__")):
            text = text[2:]
        if text.endswith(("**", "__")):
            text = text[:-2]
        if text == before:
            break
    return text


def _drop_subject(answer: str) -> str:
    """`the largest n is 34` -> `34`; anything that might negate or hedge stays whole."""
    if len(answer) > 300:
        return answer
    m = _SUBJECT_IS.match(answer)
    if m is None or _DOUBT.search(answer) or _OR.search(m.group(0)):
        return answer
    if _PROSE_SUBJECT.search(m.group(1)) is None:
        return answer
    words = re.findall(r"[A-Za-z]+", m.group(1))
    if any(len(w) > 1 and w.lower() not in _NAMING_WORDS for w in words):
        return answer
    value = clean_answer(answer[m.end() :])
    return value or answer


def _poses(response: str, at: int) -> bool:
    """Whether the sentence around ``at`` only poses the question ("we check whether the
    answer is 5")."""
    start = max(response.rfind(c, 0, at) for c in ".!?\n") + 1
    return _HYPOTHESIS.search(response[start:at]) is not None


def last_number(response: str) -> str | None:
    """The last number of the last line that has one; None if that line hedges with "or",
    or if the number sits inside a LaTeX environment (an entry of a matrix, a case of a
    `cases`): that line's answer is the environment, not one of its numbers."""
    text = response.strip()
    for line in reversed(text.splitlines()):
        numbers = list(_NUMBER.finditer(line))
        if numbers:
            if _OR.search(line) or _DOUBT.search(line):
                return None
            if _inside_environment(text, text.rindex(line) + numbers[-1].start()):
                return None
            return numbers[-1].group().strip()
    return None


def _inside_environment(text: str, at: int) -> bool:
    """Whether position ``at`` lies between a `\\begin{...}` and its `\\end{...}`."""
    depth = 0
    for m in _ENVIRONMENT.finditer(text, 0, at):
        depth += 1 if m.group(1) == "begin" else -1
    return depth > 0


def extract_answer(response: str) -> Extraction:
    """The final answer of a response (see the module docstring for the order)."""
    if "<<" in response:
        response = _CALCULATOR.sub("", response)
    boxes = find_boxes(response)
    if boxes:
        found = _from_boxes(response, boxes)
        answer = clean_answer(found.answer or "")
        return Extraction(answer or None, found.how if answer else "none", found.hedged)

    # Anchored statements: the one written last is the final answer.
    candidates: list[tuple[int, str, str]] = []
    finals = list(_FINAL_IS.finditer(response))
    posed = bool(finals) and _poses(response, finals[-1].start())
    if posed:
        # the last statement only poses the question: no earlier statement, number or
        # line may stand in for it; an `Answer:` line written after it still counts
        after = finals[-1].end()
        for pattern, how in ((_ANSWER_LINE, "answer-line"), (_HASH, "hash")):
            later = [m for m in pattern.finditer(response) if m.start() >= after]
            if later and (answer := _drop_subject(clean_answer(later[-1].group(1)))):
                candidates.append((later[-1].start(), answer, how))
        if candidates:
            _, answer, how = max(candidates)
            return Extraction(answer, how)
        return Extraction(None, "none")
    if finals:
        rest = response[finals[-1].end() :]
        answer = _drop_subject(clean_answer(_first_math_span(rest)))
        if answer and _hedged_span(rest, answer):
            answer = ""  # "The answer is $3$ or $4$.": competing candidates, no answer
        if answer:
            candidates.append((finals[-1].start(), answer, "final-answer-is"))
    for pattern, how in ((_ANSWER_LINE, "answer-line"), (_HASH, "hash")):
        matches = list(pattern.finditer(response))
        if matches:
            answer = _drop_subject(clean_answer(matches[-1].group(1)))
            if answer:
                candidates.append((matches[-1].start(), answer, how))
    if candidates:
        _, answer, how = max(candidates)
        return Extraction(answer, how)

    stripped = response.strip()
    if stripped and "\n" not in stripped and len(stripped) <= BARE_MAX_CHARS:
        # Bare LaTeX has no prose words; a bare text answer ("Friday") has few words.
        prose = [
            w
            for w in _PROSE_WORD.findall(_COMMAND_ARG.sub(" ", stripped))
            if w.lower() not in ("and", "or")
        ]
        if not prose or (len(stripped.split()) <= 3 and _WORDS_ONLY.fullmatch(stripped)):
            answer = clean_answer(stripped)
            if answer:
                return Extraction(answer, "bare")

    number = last_number(stripped)
    return Extraction(number, "last-number") if number else Extraction(None, "none")
