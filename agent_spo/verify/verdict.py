"""The verifier's typed result: one frozen record per (gold, response) check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["correct", "incorrect", "no_answer", "unparseable", "timeout"]
STATUSES: tuple[Status, ...] = ("correct", "incorrect", "no_answer", "unparseable", "timeout")


@dataclass(frozen=True)
class Verdict:
    """What the verifier decided about one response, and why.

    `status` is one of correct, incorrect, no_answer (nothing could be extracted),
    unparseable (an answer was found but neither parsed nor matched the gold as text),
    timeout (the check did not finish inside the pool's wall clock, or its worker died).
    """

    correct: bool
    status: Status
    reason: str
    prediction: str | None = None  # the answer text extracted from the response
    how: str | None = None  # where it was found: boxed, boxes, answer-line, ... (extract.py)
    gold_parsed: str | None = None  # the gold's parsed form, None when the gold did not parse
    pred_parsed: str | None = None
    elapsed_s: float = 0.0  # wall time of the check (inside the worker for pooled checks)
    gold_ok: bool = True  # False: the gold itself did not parse (a data fault, not the model's)

    @property
    def reward(self) -> float | None:
        """1.0 or 0.0; None when the check says nothing about the model (timeout, bad gold)."""
        if self.status == "timeout" or (not self.gold_ok and not self.correct):
            return None
        return 1.0 if self.correct else 0.0

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field plus the reward."""
        return {
            "correct": self.correct,
            "status": self.status,
            "reason": self.reason,
            "prediction": self.prediction,
            "how": self.how,
            "gold_parsed": self.gold_parsed,
            "pred_parsed": self.pred_parsed,
            "elapsed_ms": round(self.elapsed_s * 1000, 3),
            "gold_ok": self.gold_ok,
            "reward": self.reward,
        }


class Verifier(Protocol):
    """What training and evaluation call: `VerifierPool` is the implementation."""

    def check(self, gold: str, response: str, timeout_s: float | None = None) -> Verdict:
        """Verify one response against one gold answer; never raises for bad input."""
        ...
