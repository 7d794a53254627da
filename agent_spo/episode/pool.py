"""The episode worker pool: a fixed list of episodes played with N in flight.

Rollout, offline value estimation and evaluation all play a known list of episodes
(unlike training, whose stream draws prompts as it goes) and use this one pool, so they
share one seed rule and one crash policy:

- **Seeds.** An episode's seed comes from the run seed and the episode's identity
  (:func:`episode_seed`), never from scheduling order, so an interrupted job that resumes
  draws what an uninterrupted one would have drawn (where the engine honours seeds).
- **Crashes.** An infrastructure failure (:class:`EpisodeDropped`) is an outcome: it is
  handed to ``on_outcome`` and the pool goes on. Anything else is a bug: it cancels the
  other workers and propagates with its traceback.
- **Drops.** The callers count drops by :func:`drop_cause` (a short bucket, so a summary
  holds a small table of causes, not a line per episode) and fail the job by one rule,
  :func:`job_failure`: more than half of its episodes dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent_spo.data.problems import Problem
from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner
from agent_spo.episode.trajectory import Trajectory


def episode_seed(run_seed: int, *identity: object) -> int:
    """A stable per-episode seed (< 2**40) from the run seed and the episode's identity."""
    h = hashlib.sha256("\x1f".join(str(x) for x in (run_seed, *identity)).encode())
    return int(h.hexdigest()[:10], 16)


@dataclass(frozen=True)
class EpisodeJob:
    """One episode to play: the problem, its seed, and what the trajectory's info records."""

    problem: Problem
    seed: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """A played job: its trajectory, or why the infrastructure dropped it."""

    job: EpisodeJob
    trajectory: Trajectory | None
    dropped: EpisodeDropped | None = None


_URL_OR_NUMBER = re.compile(r"\S+://\S+|(?<!HTTP )\b\d+(?:\.\d+)?\b")
_MAX_CAUSE = 160


def drop_cause(e: EpisodeDropped) -> str:
    """A drop's bucket: ``source: reason``, on one line, numbers as N (URLs and HTTP status
    codes kept), at most 160 characters; drops that differ only in counts share one."""
    first = e.reason.strip().splitlines()[0] if e.reason.strip() else "no reason given"
    reason = _URL_OR_NUMBER.sub(lambda m: m[0] if "://" in m[0] else "N", first)
    cause = f"{e.source}: {reason}"
    return cause if len(cause) <= _MAX_CAUSE else cause[: _MAX_CAUSE - 3] + "..."


def job_failure(drop_causes: Counter[str], played: int) -> str | None:
    """Why a job of ``played`` episodes failed, naming its main cause, when more than half
    of them dropped (``drop_causes``: counts by :func:`drop_cause`); else None."""
    dropped = sum(drop_causes.values())
    if 2 * dropped <= played:
        return None
    cause, count = drop_causes.most_common(1)[0]
    return f"{dropped} of {played} episodes dropped; main cause ({count}): {cause}"


async def play(
    runner: EpisodeRunner,
    jobs: Sequence[EpisodeJob],
    *,
    workers: int,
    on_outcome: Callable[[Outcome], None],
    on_start: Callable[[EpisodeJob], None] | None = None,
) -> None:
    """Play every job with up to ``workers`` in flight, started in list order.

    ``on_outcome`` sees each finished episode (the caller logs, counts and reports
    progress there); ``on_start``, if given, each job as a worker takes it.
    """
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:  # shared iterator: each job goes to exactly one worker
            if on_start is not None:
                on_start(job)
            try:
                traj = await runner.run(job.problem, seed=job.seed, info=job.info)
            except EpisodeDropped as e:
                on_outcome(Outcome(job, None, e))
            else:
                on_outcome(Outcome(job, traj))

    try:
        async with asyncio.TaskGroup() as group:  # one worker's bug cancels the others
            for _ in range(max(1, min(workers, len(jobs)))):
                group.create_task(worker())
    except BaseExceptionGroup as eg:  # surface the bug itself, with its own traceback
        if len(eg.exceptions) == 1:
            raise eg.exceptions[0] from None
        raise
