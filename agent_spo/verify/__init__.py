"""The sympy verifier: one pure function for the reward and the grader.

`check(gold, response) -> Verdict` and `verify(gold, response) -> bool` run in-process;
`VerifierPool` runs the same function in killable worker processes with a wall clock,
which is how untrusted model output is checked in training and evaluation.
"""

from agent_spo.verify.check import check, verify
from agent_spo.verify.pool import VerifierPool
from agent_spo.verify.verdict import STATUSES, Status, Verdict, Verifier

__all__ = ["STATUSES", "Status", "Verdict", "Verifier", "VerifierPool", "check", "verify"]
