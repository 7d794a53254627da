"""Run N episodes with the current policy and write the episode log (`agent-spo rollout`).

The log is JSON lines, one trajectory per line (``Trajectory.to_json``), appended and
flushed as each episode finishes, so an interrupted run keeps every finished episode.
It is the input of replay and evaluation.

A dropped episode (the engine or sandbox failed) is counted by cause in the summary
(``drop_causes``); a run where more than half of the episodes dropped has failed
(:meth:`RolloutSummary.failure`), though its log and summary are still written.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent_spo.data.problems import Problem
from agent_spo.episode.pool import (
    EpisodeJob,
    Outcome,
    drop_cause,
    episode_seed,
    job_failure,
    play,
)
from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner
from agent_spo.episode.trajectory import Trajectory

if TYPE_CHECKING:
    from agent_spo.config import TrainConfig


@dataclass
class RolloutSummary:
    episodes: int = 0
    dropped: int = 0
    drop_causes: Counter = field(default_factory=Counter)  # drop_cause -> episodes
    correct: int = 0
    scored: int = 0
    tool_calls: int = 0
    tool_faults: Counter = field(default_factory=Counter)  # model / tool
    used_tool: int = 0  # episodes with at least one call
    stop_reasons: Counter = field(default_factory=Counter)
    model_tokens: int = 0
    wall_s: float = 0.0

    def add(self, t: Trajectory) -> None:
        self.episodes += 1
        self.stop_reasons[t.stop_reason] += 1
        self.model_tokens += t.num_model_tokens
        if t.reward is not None:
            self.scored += 1
            self.correct += int(t.reward > 0)
        self.tool_calls += len(t.tool_calls)
        self.used_tool += int(bool(t.tool_calls))
        for c in t.tool_calls:
            if c.fault:
                self.tool_faults[c.fault] += 1

    def drop(self, e: EpisodeDropped) -> None:
        self.dropped += 1
        self.drop_causes[drop_cause(e)] += 1

    def failure(self) -> str | None:
        """Why the rollout failed (more than half of its episodes dropped), else None."""
        return job_failure(self.drop_causes, self.episodes + self.dropped)

    @property
    def accuracy(self) -> float:
        return self.correct / self.scored if self.scored else 0.0

    @property
    def valid_call_rate(self) -> float:
        """Share of tool calls whose syntax and arguments were valid (not a model fault)."""
        if not self.tool_calls:
            return 0.0
        return 1.0 - self.tool_faults["model"] / self.tool_calls

    def to_dict(self) -> dict:
        return {
            "episodes": self.episodes,
            "dropped": self.dropped,
            "drop_causes": dict(self.drop_causes.most_common()),
            "scored": self.scored,
            "accuracy": round(self.accuracy, 4),
            "tool_use_rate": round(self.used_tool / max(1, self.episodes), 4),
            "tool_calls": self.tool_calls,
            "valid_call_rate": round(self.valid_call_rate, 4),
            "tool_faults": dict(self.tool_faults),
            "stop_reasons": dict(self.stop_reasons),
            "model_tokens": self.model_tokens,
            "wall_s": round(self.wall_s, 2),
            "episodes_per_s": round(self.episodes / self.wall_s, 3) if self.wall_s else 0.0,
        }


async def run_rollout(
    runner: EpisodeRunner,
    problems: list[Problem],
    n: int,
    out: Path,
    *,
    workers: int,
    seed: int = 0,
    progress: Callable[[RolloutSummary], None] | None = None,
) -> RolloutSummary:
    """Play n episodes over `problems` (cycled in order) with `workers` in flight."""
    summary = RolloutSummary()
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [
        EpisodeJob(problems[i % len(problems)], episode_seed(seed, "rollout", i), {"index": i})
        for i in range(n)
    ]
    t0 = time.perf_counter()
    with open(out, "w", encoding="utf-8") as log:  # one log per run, like its summary

        def record(o: Outcome) -> None:
            if o.dropped is not None:
                summary.drop(o.dropped)
            else:
                assert o.trajectory is not None  # an outcome has its trajectory or its drop
                log.write(o.trajectory.to_json() + "\n")
                log.flush()
                summary.add(o.trajectory)
            if progress is not None:
                progress(summary)

        await play(runner, jobs, workers=workers, on_outcome=record)
    summary.wall_s = time.perf_counter() - t0
    return summary


def write_summary(summary: RolloutSummary, path: Path) -> None:
    path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


class EmptySplit(ValueError):
    """The chosen split holds no prompts."""


async def rollout_from_config(
    cfg: TrainConfig,
    n: int,
    split: str,
    out: Path,
    *,
    log: Callable[[str], None] = print,
    progress: Callable[[RolloutSummary], None] | None = None,
) -> RolloutSummary:
    """`agent-spo rollout`: n episodes over a split of the config's data with its model,
    engine, tools, sandbox and verifier; writes the log and its .summary.json."""
    from agent_spo import builders

    train, held_out = builders.build_datasets(cfg.data, cfg.run.seed)
    problems = held_out if split == "held_out" else train
    if not problems:
        raise EmptySplit(f"the {split} split is empty (data.held_out)")
    async with builders.open_episode_runner(cfg, log=log) as runner:
        summary = await run_rollout(
            runner, problems, n, out, workers=cfg.rollout.workers, seed=cfg.run.seed,
            progress=progress,
        )  # fmt: skip
    write_summary(summary, out.with_suffix(".summary.json"))
    return summary
