"""Every gold answer in shared/data verifies against itself, boxed, and not against a
perturbed copy of itself."""

import json
import re
from pathlib import Path

import pytest

from agent_spo.verify import check
from agent_spo.verify.check import gold_answer_text

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
_CHOICE = re.compile(r"(\\text\{)?\(?(\\text\{)?([A-J])\}?\)?\}?,?")


def _golds() -> dict[str, str]:
    golds: dict[str, str] = {}
    for path in sorted(DATA.glob("*/*.jsonl")):
        for line in path.read_text().split("\n"):  # not splitlines(): U+2028 is in the data
            if not line.strip():
                continue
            row = json.loads(line)
            if "answer" in row and str(row["answer"]).strip():
                golds.setdefault(str(row["answer"]), f"{path.parent.name}/{path.name}")
    return golds


def perturb(answer: str) -> str:
    """A different answer: the next choice letter, or the first digit plus one."""
    m = _CHOICE.fullmatch(answer)
    if m:
        return answer.replace(m.group(3), chr(ord(m.group(3)) + 1))
    digit = re.search(r"\d", answer)
    if digit:
        i = digit.start()
        return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1 :]
    return answer + "+1" if not re.search(r"[A-Za-z]{3}", answer) else answer + "q"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data is not next to the checkout")
def test_every_gold_verifies_against_itself():
    golds = _golds()
    assert len(golds) > 10_000
    failures = []
    for gold, source in golds.items():
        answer = gold_answer_text(gold)
        for kind, response, want in (
            ("self", gold, True),
            ("boxed", f"The answer is $\\boxed{{{answer}}}$.", True),
            ("perturbed", f"\\boxed{{{perturb(answer)}}}", False),
        ):
            v = check(gold, response)
            if v.correct != want:
                failures.append(f"{source} {kind}: {gold[:60]!r} -> {v.status}: {v.reason}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])
