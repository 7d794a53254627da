"""Run N episodes with the current policy and write the episode log (`agent-spo rollout`).

The log is JSON lines, one trajectory per line (``Trajectory.to_json``), appended and
flushed as each episode finishes, so an interrupted run keeps every finished episode.
It is the input of replay and evaluation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent_spo.data.problems import Problem
from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner
from agent_spo.episode.trajectory import Trajectory


@dataclass
class RolloutSummary:
    episodes: int = 0
    dropped: int = 0
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
    progress=None,
) -> RolloutSummary:
    """Play n episodes over `problems` (cycled in order) with `workers` in flight."""
    summary = RolloutSummary()
    out.parent.mkdir(parents=True, exist_ok=True)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    t0 = time.perf_counter()
    with open(out, "w", encoding="utf-8") as log:  # one log per run, like its summary

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                prob = problems[i % len(problems)]
                try:
                    traj = await runner.run(
                        prob, seed=seed % 2**20 * 1_000_003 + i, info={"index": i}
                    )
                except EpisodeDropped:
                    summary.dropped += 1
                else:
                    log.write(traj.to_json() + "\n")
                    log.flush()
                    summary.add(traj)
                if progress is not None:
                    progress(summary)

        await asyncio.gather(*(worker() for _ in range(max(1, min(workers, n)))))
    summary.wall_s = time.perf_counter() - t0
    return summary


def write_summary(summary: RolloutSummary, path: Path) -> None:
    path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
