"""Check a JSONL file of cases, one ``{gold, response}`` object per line (`agent-spo verify
--file`); an optional ``label`` (true when the response is right) is scored against."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agent_spo.verify.pool import VerifierPool
from agent_spo.verify.verdict import Verdict


class CasesFileError(ValueError):
    """The cases file cannot be read, or a line lacks gold/response."""


@dataclass(frozen=True)
class CaseReport:
    rows: list[dict]  # the file's objects, in order
    verdicts: list[Verdict]  # one per row
    counts: dict[str, int]  # verdict status -> rows
    labelled: int  # rows with a label
    false_positives: int  # judged correct, labelled wrong
    false_negatives: int  # judged wrong, labelled right

    def summary(self) -> str:
        """One line: counts per status and, with labels, accuracy, FP and FN."""
        text = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        if self.labelled:
            right = self.labelled - self.false_positives - self.false_negatives
            text += (f"; against labels: accuracy {right / self.labelled:.3f}, "
                     f"FP {self.false_positives}, FN {self.false_negatives}")  # fmt: skip
        return text


def check_file(path: Path, *, workers: int, timeout_s: float) -> CaseReport:
    """Verify every line of ``path`` in a killable worker pool."""
    try:
        rows = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
        pairs = [(str(r["gold"]), str(r["response"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CasesFileError(f"{path}: {e}") from None
    with VerifierPool(workers=workers, timeout_s=timeout_s) as pool:
        verdicts = pool.check_many(pairs)
    labels = [(bool(r["label"]), v.correct) for r, v in zip(rows, verdicts, strict=True)
              if "label" in r]  # fmt: skip
    return CaseReport(
        rows=rows,
        verdicts=verdicts,
        counts=dict(Counter(v.status for v in verdicts)),
        labelled=len(labels),
        false_positives=sum(judged and not label for label, judged in labels),
        false_negatives=sum(label and not judged for label, judged in labels),
    )
