"""Modelled stragglers for the throughput benchmark: episode-time distributions, an engine
wrapper that makes each episode's first turn take its drawn time, and the timeline those
times imply when generation and learning cost nothing.

The paper's example as a distribution (``paper``, :func:`paper_times`): the paper gives
the slowest member of each of six groups of 8 (553, 519, 495, 486, 130, 133 s) and, for
the same 48 episodes without groups, the 24th fastest (112 s). The other 42 times are not
given; here they are 42 evenly spaced quantiles of a lognormal (σ = 0.25), scaled so that
the 24th fastest of all 48 is exactly 112 s (61–190 s). The two fast groups hold every
other one of the 28 shortest, the four slow groups the rest. Episode i (in start order)
takes ``times[i mod 48]``: the first 48 are the paper's cohort, and GRPO's groups, which
start 8 at a time, are the paper's groups. B = 24 with W = 48 then gives the paper's
486 s (GRPO: the 3rd-fastest group's slowest member) and 112 s (the stream's 24th).
Every modelled time is multiplied by ``time_scale`` so a run takes seconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from agent_spo.engines.base import Generation, Sampling

if TYPE_CHECKING:
    import torch


PAPER_GROUP_MAX_S = (553.0, 519.0, 495.0, 486.0, 130.0, 133.0)  # spec §8, in paper order
PAPER_GROUP_SIZE = 8
PAPER_BATCH = 24
PAPER_GROUP_READY_S = 486.0  # the 3rd-fastest group's slowest member
PAPER_STREAM_READY_S = 112.0  # the 24th fastest of the 48
_PAPER_BODY_SIGMA = 0.25
DISTRIBUTIONS = ("paper", "lognormal", "pareto", "constant")


def paper_times() -> np.ndarray:
    """The paper's 48 episode times (s) as six consecutive blocks of 8, one per group."""
    g, n_groups = PAPER_GROUP_SIZE, len(PAPER_GROUP_MAX_S)
    n_body = n_groups * (g - 1)
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n_body) for i in range(n_body)])
    # every group maximum is slower than 112 s, so the 24th fastest of the 48 is the 24th
    # of the body
    body = PAPER_STREAM_READY_S * np.exp(_PAPER_BODY_SIGMA * (z - z[PAPER_BATCH - 1]))
    fast = [4, 5]  # the groups whose slowest members are 130 and 133 s
    slow = [i for i in range(n_groups) if i not in fast]
    members: list[list[float]] = [[] for _ in range(n_groups)]
    short = list(body[: 2 * (g - 1) * len(fast)])
    for k, t in enumerate(short[::2]):
        members[fast[k % len(fast)]].append(float(t))
    rest = short[1::2] + list(body[len(short) :])
    for k, t in enumerate(rest):
        members[slow[k % len(slow)]].append(float(t))
    times = []
    for i, m in enumerate(members):
        assert len(m) == g - 1 and max(m) < PAPER_GROUP_MAX_S[i], (i, m)
        times.extend([*m, PAPER_GROUP_MAX_S[i]])
    return np.array(times)


@dataclass(frozen=True)
class DelayModel:
    """Each episode's modelled time (s); ``time_scale`` converts it to real seconds.

    ``paper``: the paper's 48 times replayed in order (module docstring). ``lognormal``:
    median ``median_s``, log-std ``sigma``. ``pareto``: tail index ``alpha`` (heavier as it
    falls; the mean is infinite at alpha <= 1), minimum chosen so the median is
    ``median_s``. ``constant``: always ``median_s`` (the zero-variance control, where the
    barrier costs nothing). Draws are capped at ``cap_s`` (an episode deadline).
    """

    name: str
    time_scale: float = 0.01
    median_s: float = 100.0
    sigma: float = 1.0
    alpha: float = 1.5
    cap_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.name!r}; allowed: {DISTRIBUTIONS}")
        for key in ("time_scale", "median_s", "sigma", "alpha", "cap_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")

    @property
    def label(self) -> str:
        extra = {"lognormal": f" σ={self.sigma:g}", "pareto": f" α={self.alpha:g}"}
        return self.name + extra.get(self.name, "")

    def modelled(self) -> Iterator[float]:
        """Modelled seconds, episode by episode in start order (reproducible by seed)."""
        if self.name == "paper":
            yield from (float(t) for t in itertools.cycle(paper_times()))
        else:
            rng = np.random.default_rng(self.seed)
            while True:
                yield from (float(t) for t in self._draw(rng, 256))

    def sequence(self) -> Iterator[float]:
        """Real seconds (modelled × time_scale), episode by episode in start order."""
        return (t * self.time_scale for t in self.modelled())

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.name == "lognormal":
            x = self.median_s * np.exp(self.sigma * rng.standard_normal(n))
        elif self.name == "pareto":
            x_min = self.median_s / 2 ** (1 / self.alpha)
            x = x_min * (1.0 - rng.random(n)) ** (-1 / self.alpha)  # 1 − U in (0, 1]
        else:
            x = np.full(n, self.median_s)
        return np.minimum(x, self.cap_s)


class DelayedEngine:
    """An Engine under which each episode's first model turn takes at least a drawn time.

    An episode's first model turn is the call whose context is a bare rendered prompt
    (later turns carry the model's own tokens); that call draws the episode's delay ``d``
    the moment it is made (so draws follow episode-start order) and returns no sooner
    than ``d`` seconds after it was made. Its tokens and policy version are the ones the
    real engine sampled at the start, so staleness counts the wait. A retried attempt is a
    new episode and draws again.
    """

    def __init__(
        self, inner, delays: Iterator[float], first_turn_prompts: Collection[Sequence[int]]
    ) -> None:
        self.inner = inner
        self._delays = delays
        self._prompts = frozenset(tuple(p) for p in first_turn_prompts)
        self.drawn: list[float] = []  # real seconds, one per episode started

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation:
        if tuple(prompt_ids) not in self._prompts:
            return await self.inner.generate(prompt_ids, sampling)
        t0 = time.perf_counter()
        d = next(self._delays)
        self.drawn.append(d)
        gen = await self.inner.generate(prompt_ids, sampling)
        await asyncio.sleep(max(0.0, t0 + d - time.perf_counter()))
        return gen

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int):
        await self.inner.update_weights(weights, version)

    async def close(self) -> None:
        await self.inner.close()


# ---------------------------------------------------------------------------------------
# What the times imply: the loop with free generation and an instant learner
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """When each of the first ``steps`` batches is ready, in the modelled loop."""

    batch_ready_s: tuple[float, ...]
    trajectories: int
    dropped_stale: int

    @property
    def first_batch_s(self) -> float:
        return self.batch_ready_s[0]

    @property
    def batches_per_s(self) -> float:
        return len(self.batch_ready_s) / self.batch_ready_s[-1]

    @property
    def traj_per_s(self) -> float:
        return self.trajectories / self.batch_ready_s[-1]


def simulate(
    mode: str,
    times: Iterator[float],
    *,
    batch: int,
    workers: int,
    steps: int,
    group_size: int = 8,
    max_staleness: int = 4,
) -> Timeline:
    """The loop's timeline if every episode took exactly its time and learning were free.

    Same rules as the pipeline: W episodes in flight (GRPO: W // G groups of G), a worker
    starts its next episode (group) the moment one finishes, episode i in start order
    takes ``times``' i-th value, the learner takes finished trajectories (whole groups) in
    order, drops those more than ``max_staleness`` versions old, and steps on every B.
    With an instant learner, back-pressure and SPO's sampling budget never bind, so they
    are not modelled.
    """
    if mode not in ("spo", "grpo"):
        raise ValueError(f"mode must be spo or grpo, got {mode!r}")
    g = group_size if mode == "grpo" else 1
    if batch % g:
        raise ValueError(f"batch {batch} is not a multiple of G={g}")
    heap: list[tuple[float, int, int]] = []  # (finish time, start order, policy version)
    order = itertools.count()
    version = 0

    def start(t: float) -> None:
        d = max(next(times) for _ in range(g))  # a group finishes with its slowest member
        heapq.heappush(heap, (t + d, next(order), version))

    for _ in range(max(1, workers // g)):
        start(0.0)
    ready: list[float] = []
    n = trained = stale = 0
    while len(ready) < steps:
        t, _, v = heapq.heappop(heap)
        start(t)  # the worker goes on before the learner steps
        if version - v > max_staleness:
            stale += g
            continue
        n += g
        trained += g
        if n >= batch:
            ready.append(t)
            version += 1
            n = 0
    return Timeline(tuple(ready), trained, stale)


# ---------------------------------------------------------------------------------------
# Measuring the real loop
# ---------------------------------------------------------------------------------------
