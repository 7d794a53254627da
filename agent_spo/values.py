"""Offline value estimation: n0 episodes per prompt with the initial policy (spec §1).

The tracker's baseline starts from these success counts instead of the uninformed prior,
so the first advantages already separate easy from hard prompts. The estimate runs
through the same episode loop as training (engine, tools, sandbox, verifier), so what it
measures is what training will see.

The values file is JSON lines, one prompt per line, appended as each prompt's n0 episodes
finish::

    {"prompt": "synthetic-0007", "rewards": [1.0, 0.0, 1.0, ...], "dropped": 0}

``rewards`` holds the scored episodes only: a dropped episode (sandbox or engine failure)
or an unscored one (deadline) is counted, never taken as a 0. A prompt with no scored
episode is left out, and the tracker keeps its prior for it. Interrupted estimation
resumes: prompts already in the file are not sampled again, and a torn last line (a crash
mid-write) is ignored.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
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
from agent_spo.episode.runner import EpisodeRunner

if TYPE_CHECKING:
    from agent_spo.config import TrainConfig


class ValuesFileError(ValueError):
    """A values file that cannot be used: unreadable rows, bad rewards, foreign prompts."""


@dataclass
class EstimateProgress:
    prompts_done: int = 0
    prompts_total: int = 0
    episodes: int = 0
    correct: float = 0.0
    dropped: int = 0
    drop_causes: Counter = field(default_factory=Counter)  # drop_cause -> episodes
    unscored: int = 0
    wall_s: float = 0.0

    def failure(self) -> str | None:
        """Why this session failed (more than half of its episodes dropped), else None."""
        return job_failure(self.drop_causes, self.episodes + self.unscored + self.dropped)

    @property
    def mean_value(self) -> float:
        return self.correct / self.episodes if self.episodes else 0.0

    def to_dict(self) -> dict:
        return {
            "prompts": self.prompts_done,
            "episodes": self.episodes,
            "mean_value": round(self.mean_value, 4),
            "dropped": self.dropped,
            "drop_causes": dict(self.drop_causes.most_common()),
            "unscored": self.unscored,
            "wall_s": round(self.wall_s, 1),
        }


def load_values(path: str | Path, *, known: Iterable[str] | None = None) -> dict[str, list[float]]:
    """Per-prompt offline rewards from a values file; ``known`` checks the prompt ids.

    A torn last line is skipped (the file is appended during estimation); any other bad
    row raises :class:`ValuesFileError` naming the line.
    """
    path = Path(path)
    if not path.exists():
        raise ValuesFileError(f"values file {path} does not exist (write it with "
                              "`agent-spo estimate-values`)")  # fmt: skip
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[str, list[float]] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):  # torn by a crash mid-write: that prompt is redone
                continue
            raise ValuesFileError(f"{path}:{i}: not a JSON object") from None
        try:
            key, rewards = str(row["prompt"]), [float(r) for r in row["rewards"]]
        except (KeyError, TypeError, ValueError):
            raise ValuesFileError(
                f"{path}:{i}: expected {{'prompt': str, 'rewards': [numbers]}}"
            ) from None
        if not all(0.0 <= r <= 1.0 for r in rewards):
            raise ValuesFileError(f"{path}:{i}: rewards must lie in [0, 1]")
        if rewards:
            out[key] = rewards
    if known is not None:
        known = set(known)
        foreign = [k for k in out if k not in known]
        if foreign:
            raise ValuesFileError(
                f"{path}: {len(foreign)} prompt ids are not in this run's training set "
                f"(e.g. {foreign[0]!r}); was the file estimated for another data config?"
            )
    return out


async def estimate_values(
    runner: EpisodeRunner,
    problems: list[Problem],
    n0: int,
    out: Path,
    *,
    workers: int,
    seed: int = 0,
    progress: Callable[[EstimateProgress], None] | None = None,
) -> EstimateProgress:
    """Play n0 episodes per prompt (skipping prompts already in ``out``) and append rows."""
    if n0 < 1:
        raise ValueError(f"n0 must be >= 1, got {n0}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(out)  # first: a row cut just before its newline is redone, not kept
    done = set(load_values(out)) if out.exists() else set()
    todo = [p for p in problems if p.key not in done]
    state = EstimateProgress(prompts_done=len(problems) - len(todo), prompts_total=len(problems))
    pending: dict[str, list[float | None]] = {p.key: [] for p in todo}  # None: unscored
    dropped = dict.fromkeys(pending, 0)
    # Jobs are prompt-major so every prompt finishes early and gets written.
    jobs = [
        EpisodeJob(p, episode_seed(seed, "estimate", p.key, j), {"estimate": j})
        for p in todo
        for j in range(n0)
    ]
    t0 = time.perf_counter()
    with open(out, "a", encoding="utf-8") as f:

        def record(o: Outcome) -> None:
            key = o.job.problem.key
            if o.dropped is not None:
                dropped[key] += 1
                state.dropped += 1
                state.drop_causes[drop_cause(o.dropped)] += 1
            else:
                assert o.trajectory is not None  # an outcome has its trajectory or its drop
                reward = o.trajectory.reward
                pending[key].append(reward)
                if reward is None:
                    state.unscored += 1
                else:
                    state.episodes += 1
                    state.correct += reward
            if len(pending[key]) + dropped[key] == n0:
                results = pending.pop(key)
                row = {"prompt": key, "rewards": [r for r in results if r is not None],
                       "dropped": dropped[key], "unscored": results.count(None)}  # fmt: skip
                f.write(json.dumps(row) + "\n")
                f.flush()
                state.prompts_done += 1
            state.wall_s = time.perf_counter() - t0
            if progress is not None:
                progress(state)

        await play(runner, jobs, workers=workers, on_outcome=record)
    state.wall_s = time.perf_counter() - t0
    return state


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write) so appends stay parseable."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


async def estimate_from_config(
    cfg: TrainConfig,
    out: Path,
    *,
    log: Callable[[str], None] = print,
    progress: Callable[[EstimateProgress], None] | None = None,
) -> tuple[EstimateProgress, dict]:
    """`agent-spo estimate-values`: algo.init.n0 episodes per training prompt with the
    config's initial policy; (progress counters, :func:`value_summary` of the file)."""
    from agent_spo import builders

    train, _ = builders.build_datasets(cfg.data, cfg.run.seed)
    async with builders.open_episode_runner(cfg, log=log) as runner:
        state = await estimate_values(
            runner, train, cfg.algo.init.n0, out, workers=cfg.rollout.workers,
            seed=cfg.run.seed + 3, progress=progress,
        )  # fmt: skip
    return state, value_summary(load_values(out))


def value_summary(values: dict[str, list[float]]) -> dict:
    """Mean initial value and the share of prompts the initial policy always/never solves."""
    if not values:
        return {"prompts": 0}
    means = [sum(r) / len(r) for r in values.values()]
    return {
        "prompts": len(values),
        "mean_value": round(sum(means) / len(means), 4),
        "always_solved": round(sum(m >= 1.0 for m in means) / len(means), 4),
        "never_solved": round(sum(m <= 0.0 for m in means) / len(means), 4),
        "uncertain": round(sum(0.0 < m < 1.0 for m in means) / len(means), 4),
    }
