"""The token-exact record of one episode, and the invariants that make it trainable.

A trajectory is the prompt's token ids followed by *segments*, in the order they were
appended to the context:

* ``model``: tokens the policy sampled, with the log-probs the engine returned for them
  and the policy version that sampled them. The only trainable tokens. A turn during
  which the weights were updated is two (or more) model segments in a row, one per
  version.
* ``tool``: tokens of a tool observation (sandbox output, errors) inserted into the
  context. No loss.
* ``template``: tokens the chat template or the format inserts around turns (role
  headers, ``<interpreter>`` tags). No loss.

Each turn's context is exactly the prompt plus the segments before it: text is never
decoded and re-tokenised to continue, so what the learner trains on is what the engine
sampled.
Invariants are checked at construction and raise :class:`TrajectoryError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

SegmentKind = Literal["model", "tool", "template"]
_KINDS = ("model", "tool", "template")


class TrajectoryError(ValueError):
    """A trajectory or segment breaks an invariant (lengths, trainability, contexts)."""


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None  # model segments only, one per token
    policy_version: int | None = None  # model segments only

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", tuple(float(x) for x in self.logprobs))
        if self.kind not in _KINDS:
            raise TrajectoryError(f"segment kind {self.kind!r} is not one of {_KINDS}")
        if not self.token_ids:
            raise TrajectoryError(f"empty {self.kind} segment")
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.token_ids
        ):
            raise TrajectoryError(f"{self.kind} segment has token ids that are not ints >= 0")
        if self.kind == "model":
            if self.logprobs is None or len(self.logprobs) != len(self.token_ids):
                n = None if self.logprobs is None else len(self.logprobs)
                raise TrajectoryError(
                    f"model segment: {len(self.token_ids)} tokens but {n} log-probs"
                )
            if not all(math.isfinite(x) and x <= 0.0 for x in self.logprobs):
                raise TrajectoryError("model segment log-probs must be finite and <= 0")
            if not (isinstance(self.policy_version, int) and self.policy_version >= 0):
                raise TrajectoryError("model segment needs the policy version that sampled it")
        elif self.logprobs is not None or self.policy_version is not None:
            raise TrajectoryError(f"{self.kind} segment is not sampled: no log-probs or version")

    @property
    def trainable(self) -> bool:
        return self.kind == "model"


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call as it happened: the typed sandbox result is kept for replay."""

    name: str
    arguments: Mapping[str, Any] | None  # validated arguments; None when malformed
    observation: str  # what the model saw
    fault: str | None  # None, "model", "tool" or "infrastructure"
    status: str | None  # the sandbox status, when code ran
    latency_s: float
    result: Mapping[str, Any] | None = None  # ExecResult.to_dict(), for logs and replay


@dataclass(frozen=True)
class Trajectory:
    prompt_id: str
    prompt_token_ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    tool_calls: tuple[ToolCallRecord, ...] = ()
    answer: str | None = None  # the extracted final answer
    verdict: str | None = None  # the verifier's status
    reward: float | None = None  # None = not scorable (never a silent 0)
    timings: Mapping[str, float] = field(default_factory=dict)
    stop_reason: str | None = None  # answer, max_turns, budget, context, deadline
    info: Mapping[str, Any] = field(default_factory=dict)  # prompt key, sample index, ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        object.__setattr__(self, "segments", tuple(self.segments))
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        object.__setattr__(self, "timings", MappingProxyType(dict(self.timings)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))
        if not self.prompt_id:
            raise TrajectoryError("a trajectory needs its prompt id")
        if not self.prompt_token_ids:
            raise TrajectoryError("a trajectory needs its prompt token ids")
        if not self.segments:
            raise TrajectoryError("a trajectory needs at least one segment")
        if not any(s.trainable for s in self.segments):
            raise TrajectoryError("a trajectory needs at least one model segment")
        for i, s in enumerate(self.segments):
            if not isinstance(s, Segment):
                raise TrajectoryError(f"segment {i} is a {type(s).__name__}, not a Segment")
        if self.reward is not None and not math.isfinite(self.reward):
            raise TrajectoryError(f"reward must be finite or None, got {self.reward!r}")

    def __getstate__(self) -> dict:  # a mappingproxy does not pickle
        return {**self.__dict__, "timings": dict(self.timings), "info": dict(self.info)}

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "timings", MappingProxyType(dict(self.timings)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    # ------------------------------------------------------------------ token views
    @property
    def response_token_ids(self) -> tuple[int, ...]:
        return tuple(t for s in self.segments for t in s.token_ids)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Prompt and response: the full context the learner scores."""
        return self.prompt_token_ids + self.response_token_ids

    @property
    def loss_mask(self) -> tuple[int, ...]:
        """1 on model-sampled response tokens, 0 on tool and template tokens."""
        return tuple(int(s.trainable) for s in self.segments for _ in s.token_ids)

    @property
    def logprobs(self) -> tuple[float, ...]:
        """Behaviour log-probs aligned with the response; 0.0 where there is no loss."""
        return tuple(x for s in self.segments for x in (s.logprobs or (0.0,) * len(s.token_ids)))

    @property
    def num_model_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.trainable)

    @property
    def policy_versions(self) -> tuple[int, ...]:
        # a model segment always has its version (checked in Segment.__post_init__)
        return tuple(
            s.policy_version for s in self.segments if s.trainable and s.policy_version is not None
        )

    def context_before(self, k: int) -> tuple[int, ...]:
        """The exact context the engine saw before segment k was appended."""
        if not 0 <= k <= len(self.segments):
            raise IndexError(k)
        return self.prompt_token_ids + tuple(t for s in self.segments[:k] for t in s.token_ids)

    def staleness(self, learner_version: int) -> int:
        """How many versions the oldest model segment lags the learner."""
        return learner_version - min(self.policy_versions)

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps({
            "prompt_id": self.prompt_id,
            "prompt_token_ids": list(self.prompt_token_ids),
            "segments": [
                {"kind": s.kind, "token_ids": list(s.token_ids),
                 "logprobs": None if s.logprobs is None else list(s.logprobs),
                 "policy_version": s.policy_version}
                for s in self.segments
            ],
            "tool_calls": [
                {**c.__dict__, "arguments": None if c.arguments is None else dict(c.arguments),
                 "result": None if c.result is None else dict(c.result)}
                for c in self.tool_calls
            ],
            "answer": self.answer, "verdict": self.verdict, "reward": self.reward,
            "timings": dict(self.timings),
            "stop_reason": self.stop_reason, "info": dict(self.info),
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Trajectory:
        d = json.loads(text)
        return cls(
            prompt_id=d["prompt_id"],
            prompt_token_ids=d["prompt_token_ids"],
            segments=tuple(Segment(**s) for s in d["segments"]),
            tool_calls=tuple(ToolCallRecord(**c) for c in d["tool_calls"]),
            answer=d["answer"],
            verdict=d["verdict"],
            reward=d["reward"],
            timings=d["timings"],
            stop_reason=d.get("stop_reason"),
            info=d.get("info", {}),
        )


def check_extends(previous: Sequence[int], current: Sequence[int]) -> None:
    """Raise unless `current` is `previous` plus appended tokens (no re-tokenisation)."""
    n = len(previous)
    if len(current) < n or tuple(current[:n]) != tuple(previous):
        at = next(
            (i for i, (a, b) in enumerate(zip(previous, current, strict=False)) if a != b),
            min(n, len(current)),
        )
        raise TrajectoryError(
            f"context does not extend the previous one: first difference at token {at} "
            f"(previous {len(previous)} tokens, current {len(current)})"
        )
