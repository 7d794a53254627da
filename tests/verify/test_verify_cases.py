"""The labelled set (cases.jsonl): every case, by category, through the worker pool.

Each case cites its source; near misses are labelled false. A case that fails here is a
verifier bug or a deliberate policy change (then relabel it, with a note).
"""

import collections
import json
from pathlib import Path

import pytest

CASES_PATH = Path(__file__).with_name("cases.jsonl")
CASES = [json.loads(line) for line in CASES_PATH.read_text().splitlines() if line.strip()]

REQUIRED_FIELDS = {"id", "category", "answer_type", "gold", "response", "label", "source"}


def test_cases_file_is_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        assert REQUIRED_FIELDS <= set(c), c["id"]
        assert isinstance(c["label"], bool) and c["source"], c["id"]
    by_category = collections.Counter(c["category"] for c in CASES)
    false_by_category = collections.Counter(c["category"] for c in CASES if not c["label"])
    for category in by_category:
        if category != "normalisation":
            assert false_by_category[category] >= 3, f"{category}: too few near misses"
    assert sum(not c["label"] for c in CASES) >= 0.25 * len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_labelled_case(pool, case):
    verdict = pool.check(case["gold"], case["response"])
    assert verdict.status != "timeout", verdict.reason
    assert verdict.correct == case["label"], (
        f"{case['note'] or ''} | got {verdict.status}: {verdict.reason} "
        f"(prediction {verdict.prediction!r}, parsed {verdict.pred_parsed!r}, "
        f"gold {verdict.gold_parsed!r})"
    )
