"""The engine protocol: token ids in, token ids + log-probs + finish reason out (DESIGN §5).

Every engine (transformers, in-process vLLM, an OpenAI-compatible server) answers the same
three questions, so the episode runner and the pipeline never know which one they drive:

* ``generate(prompt_ids, sampling)``: sample a continuation. The returned tokens are the
  exact ids the engine sampled, including the token that completed a stop string or the
  stop token itself, so a conversation continues from them without re-tokenising. Each
  log-prob is the *raw* model's log-probability of that token (temperature 1, no top-k /
  top-p), which is what the learner recomputes for the PPO ratio.
* ``update_weights(weights, version)``: load new policy weights; later generations carry
  ``version``.
* ``version``: the policy version that the next generation will be sampled with.

Failures of the engine itself (a dead server, an engine crash) raise :class:`EngineError`:
they are infrastructure faults, so the episode is dropped and counted, never scored.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """The engine failed (infrastructure fault): drop the episode, do not score it."""


@dataclass(frozen=True)
class Sampling:
    """How to sample one continuation."""

    max_tokens: int  # most new tokens; >= 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = -1  # -1 = off
    stop: tuple[str, ...] = ()  # stop strings, matched on the generated text
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's end-of-sequence ids
    seed: int | None = None  # per-request seed (reproducible sampling), where supported

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")


@dataclass(frozen=True)
class Generation:
    """One sampled continuation."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # raw-model log-prob of each sampled token
    finish_reason: FinishReason  # stop: a stop string/token or EOS; length: max_tokens
    policy_version: int  # the weights that sampled it (the oldest, if several did)
    stop: str | int | None = None  # the stop string or token id that ended it, if any
    # the policy version of each token, when a weight update landed mid-generation;
    # None: every token has ``policy_version``
    versions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.versions is not None:
            object.__setattr__(self, "versions", tuple(int(v) for v in self.versions))
            if len(self.versions) != len(self.token_ids):
                raise ValueError(f"{len(self.token_ids)} tokens but {len(self.versions)} versions")
            if self.versions and min(self.versions) != self.policy_version:
                raise ValueError(
                    f"policy_version {self.policy_version} is not the oldest of the token "
                    f"versions ({min(self.versions)})"
                )
            if len(set(self.versions)) <= 1:
                object.__setattr__(self, "versions", None)  # one version: nothing to split

    def runs(self) -> list[tuple[int, int, int]]:
        """``(start, end, version)`` of each stretch of tokens one policy version sampled,
        in order: one stretch, unless a weight update landed mid-generation."""
        if self.versions is None:
            return [(0, len(self.token_ids), self.policy_version)]
        out: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(self.versions) + 1):
            if i == len(self.versions) or self.versions[i] != self.versions[start]:
                out.append((start, i, self.versions[start]))
                start = i
        return out


_affinity: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "agent_spo_affinity", default=None
)


@contextlib.contextmanager
def affinity(key: object) -> Iterator[None]:
    """Generations requested inside this block (in this task and the tasks it starts)
    belong together, e.g. the turns of one episode: an engine over several replicas sends
    them to the same one, whose prefix cache holds the conversation so far."""
    token = _affinity.set(key)
    try:
        yield
    finally:
        _affinity.reset(token)


def affinity_key() -> object | None:
    """The key of the innermost :func:`affinity` block around this call, or None."""
    return _affinity.get()


@runtime_checkable
class Engine(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def max_model_len(self) -> int:
        """Longest context (prompt + generation) the engine accepts, in tokens."""
        ...

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation: ...

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None: ...

    async def close(self) -> None: ...


def find_stop(text: str, stops: Sequence[str]) -> str | None:
    """The first of `stops` that occurs in `text`, or None."""
    for s in stops:
        if s and s in text:
            return s
    return None
