"""Typed results of sandboxed calls, shared by every backend and the wire protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

Status = Literal[
    "ok",  # the code ran to the end
    "error",  # the code raised (traceback in exc_*)
    "timeout",  # wall-clock deadline or CPU limit hit; the call was killed
    "memory",  # MemoryError / address-space limit
    "output_limit",  # stdout+stderr passed the hard cap; the call was killed
    "crashed",  # the process died on its own (signal, os._exit, abort)
    "queue_timeout",  # no worker became free in time; the code never ran
    "sandbox_error",  # infrastructure failed (worker died, protocol broke); not the code's fault
    "session_lost",  # the session's state is gone; open a new session
]
STATUSES: tuple[str, ...] = Status.__args__  # type: ignore[attr-defined]

# Whose fault a status is (DESIGN §4): the code's own doing is fed back to the model;
# infrastructure failures drop the episode and are counted, never scored.
INFRA_STATUSES = frozenset({"queue_timeout", "sandbox_error", "session_lost"})


@dataclass(frozen=True)
class ExecResult:
    """What one call did. Text fields are decoded with replacement characters."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: int = 0  # total bytes the code wrote, including any truncated part
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    exc_type: str | None = None  # e.g. "ZeroDivisionError"
    exc_message: str | None = None
    traceback: str | None = None  # user frames only
    exit_code: int | None = None  # process exit code, when the process exited
    signal: int | None = None  # signal that killed the process, if any
    wall_s: float = 0.0
    cpu_s: float = 0.0
    backend: str = ""
    worker: int | None = None
    detail: str | None = None  # infrastructure detail for sandbox_error / session_lost

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def infrastructure_failure(self) -> bool:
        """True when the failure is not the code's fault (drop the episode, do not score it)."""
        return self.status in INFRA_STATUSES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExecResult:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ExecResult fields: {sorted(unknown)}")
        if data.get("status") not in STATUSES:
            raise ValueError(f"unknown status {data.get('status')!r}; allowed: {STATUSES}")
        return cls(**data)


def infra_result(
    status: Status, detail: str, backend: str = "", worker: int | None = None, wall_s: float = 0.0
) -> ExecResult:
    """A result for a call that failed before or around the code (never the code's fault)."""
    return ExecResult(status=status, detail=detail, backend=backend, worker=worker, wall_s=wall_s)
