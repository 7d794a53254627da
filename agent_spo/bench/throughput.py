"""Throughput of the single stream against the group barrier (spec §8), in the real pipeline.

Both modes run the real loop (:func:`~agent_spo.pipeline.train_spo`,
:func:`~agent_spo.pipeline.train_grpo`) with the real episode runner, engine, sandbox,
verifier and learner, with the same batch size B, the same number of episodes in flight W
and the same sequence of episode times. Per run:

* ``batches_per_s`` / ``traj_per_s``: learner steps (trained trajectories) per second of
  the loop's wall time, from the call to the end of the last step;
* ``first_batch_s``: seconds from the start until the learner holds its first batch (the
  paper's number: with a cohort of 2B episodes in flight, when is B's worth ready?);
* ``idle_frac``: the learner's idle share, Σ perf/wait_s (waiting for data) / wall time.

Two settings:

(a) the real demo (``configs/demo.yaml`` and ``configs/demo_grpo.yaml``), nothing added;
(b) modelled stragglers: :class:`DelayedEngine` wraps the real engine and holds each
    episode's first model turn until ``d`` seconds after it was asked for, ``d`` drawn
    from a :class:`DelayModel` in episode-start order, so both modes see the same times.
    :func:`simulate` gives the timeline those times imply when generation and learning
    cost nothing: the expected numbers beside the measured ones.

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
import contextlib
import functools
import heapq
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from agent_spo.engines.base import Generation, Sampling

if TYPE_CHECKING:
    import torch

    from agent_spo.config import TrainConfig
    from agent_spo.episode.render import ChatRenderer
    from agent_spo.episode.runner import EpisodeSettings
    from agent_spo.episode.toolbox import Toolbox

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


@dataclass
class RunResult:
    """One run of one mode; times in seconds."""

    mode: str
    steps: int
    trajectories: int  # trained
    wall_s: float  # from the loop's start to the end of its last step
    first_batch_s: float
    wait_s: float  # Σ perf/wait_s: the learner waiting for data
    learner_s: float  # Σ perf/learner_s + perf/weight_push_s
    episodes: int  # finished, trained or not
    dropped_stale: int
    delays_drawn: int | None  # episodes the delay wrapper started (None: no wrapper)
    episode_s_median: float  # trained episodes' wall time, median
    step_end_s: list[float] = field(default_factory=list)
    step_wait_s: list[float] = field(default_factory=list)

    @property
    def batches_per_s(self) -> float:
        return self.steps / self.wall_s

    @property
    def traj_per_s(self) -> float:
        return self.trajectories / self.wall_s

    @property
    def idle_frac(self) -> float:
        return self.wait_s / self.wall_s

    @property
    def idle_frac_after_first(self) -> float:
        """Idle share once the first batch is in: without the pipeline's one-off fill."""
        rest = self.wall_s - self.first_batch_s
        return (self.wait_s - self.first_batch_s) / rest if rest > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "batches_per_s": self.batches_per_s,
            "traj_per_s": self.traj_per_s,
            "idle_frac": self.idle_frac,
            "idle_frac_after_first": self.idle_frac_after_first,
        }


METRICS = (
    "batches_per_s", "traj_per_s", "first_batch_s", "idle_frac", "idle_frac_after_first",
    "wall_s",
)  # fmt: skip


def medians(runs: Sequence[RunResult]) -> dict:
    """Median of each headline metric over repeats."""
    return {k: statistics.median(r.to_dict()[k] for r in runs) for k in METRICS}


@dataclass
class Parts:
    """What both modes share: model, tokenizer, prompts, tools, sandbox and verifier."""

    model_path: str
    tokenizer: Any
    renderer: ChatRenderer
    toolbox: Toolbox
    episode_settings: EpisodeSettings
    problems: dict
    sandbox: object | None  # None: each run opens its own from its config (no leftovers)
    verifier: object

    @functools.cached_property
    def first_turn_prompts(self) -> frozenset[tuple[int, ...]]:
        """Every training prompt as rendered: the context of an episode's first turn."""
        return frozenset(tuple(self.renderer.prompt_ids(p.problem)) for p in self.problems.values())


async def run_mode(
    parts: Parts,
    cfg: TrainConfig,
    mode: str,
    *,
    batch: int,
    workers: int,
    steps: int,
    group_size: int,
    seed: int,
    delays: Iterator[float] | None = None,
    make_engine: Callable[[int], Any] | None = None,
) -> RunResult:
    """One fresh run (new engine, learner, tracker, sampler) of ``mode`` for ``steps``.

    ``make_engine(seed)`` replaces the configured engine (tests use a scripted one).
    """
    from agent_spo import builders
    from agent_spo.episode.runner import EpisodeRunner

    async with contextlib.AsyncExitStack() as stack:
        sandbox = parts.sandbox
        if sandbox is None:
            sandbox = await stack.enter_async_context(builders.build_sandbox(cfg.sandbox))
        if make_engine is not None:
            engine = make_engine(seed)
        else:
            engine = builders.build_engine(parts.model_path, cfg.model, cfg.rollout, seed)
        stack.push_async_callback(engine.close)
        wrapped = engine
        if delays is not None:
            wrapped = DelayedEngine(engine, delays, parts.first_turn_prompts)
        learner = builders.build_learner(
            parts.model_path, parts.tokenizer, cfg.learner, cfg.loss,
            mini_batches=min(cfg.learner.mini_batches, batch),
        )  # fmt: skip
        tracker = builders.build_tracker(cfg.algo)
        sampler = builders.build_sampler(cfg.algo, list(parts.problems), tracker, seed)
        runner = EpisodeRunner(wrapped, parts.renderer, parts.toolbox, sandbox,
                               parts.verifier, parts.episode_settings)  # fmt: skip
        settings = builders.build_stream_settings(
            cfg, seed=seed, batch_size=batch, total_steps=steps, workers=workers
        )
        rows: list[dict] = []
        trajs: list = []
        t0 = time.perf_counter()

        def on_step(metrics: dict, got) -> None:
            # items carry .traj; a GRPO loop may instead hand over (key, group) pairs
            batch_trajs = [t for x in got for t in ([x.traj] if hasattr(x, "traj") else x[1])]
            trajs.extend(batch_trajs)
            rows.append({**metrics, "t": time.perf_counter() - t0, "n": len(batch_trajs)})

        loop = builders.build_loop(mode, group_size=group_size)
        state = await loop(
            runner=runner, problems=parts.problems, tracker=tracker, sampler=sampler,
            learner=learner, engine=wrapped, settings=settings, on_step=on_step,
        )  # fmt: skip
    return RunResult(
        mode=mode,
        steps=len(rows),
        trajectories=sum(r["n"] for r in rows),
        wall_s=rows[-1]["t"],
        first_batch_s=rows[0]["perf/wait_s"],
        wait_s=sum(r["perf/wait_s"] for r in rows),
        learner_s=sum(r["perf/learner_s"] + r["perf/weight_push_s"] for r in rows),
        episodes=state.episodes,
        dropped_stale=state.counters.get("dropped/stale", 0),
        delays_drawn=len(wrapped.drawn) if delays is not None else None,
        episode_s_median=float(np.median([t.timings["total_s"] for t in trajs])),
        step_end_s=[r["t"] for r in rows],
        step_wait_s=[r["perf/wait_s"] for r in rows],
    )


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """What to run; see `agent-spo bench throughput --help` for each field."""

    cases: tuple[str, ...] = DISTRIBUTIONS
    steps: int = 4
    repeats: int = 3
    batch: int = PAPER_BATCH
    workers: int = 2 * PAPER_BATCH
    group_size: int = PAPER_GROUP_SIZE
    time_scale: float = 0.01
    sigma: float = 1.0
    alpha: float = 1.5
    median_s: float = 100.0
    cap_s: float = 600.0
    demo: bool = True
    demo_steps: int = 8
    demo_repeats: int = 3
    seed: int = 0


def _ratios(spo: dict, grpo: dict) -> dict:
    return {
        "batches_per_s": spo["batches_per_s"] / grpo["batches_per_s"],
        "traj_per_s": spo["traj_per_s"] / grpo["traj_per_s"],
        "first_batch_speedup": grpo["first_batch_s"] / spo["first_batch_s"],
    }


async def _side_by_side(
    run: Callable[[str, int], Awaitable[RunResult]],
    repeats: int,
    seed: int,
    log: Callable[[str], None],
    what,
) -> dict:
    """SPO and GRPO alternately (machine drift hits both alike), medians and ratios."""
    runs: dict[str, list[RunResult]] = {"spo": [], "grpo": []}
    for r in range(repeats):
        for mode in ("spo", "grpo"):
            res = await run(mode, seed + r)
            runs[mode].append(res)
            log(f"{what}: {mode} repeat {r + 1}/{repeats}: {res.batches_per_s:.3f} batches/s, "
                f"first batch {res.first_batch_s:.2f} s, idle {res.idle_frac:.0%}")  # fmt: skip
    out = {m: {**medians(rs), "runs": [x.to_dict() for x in rs]} for m, rs in runs.items()}
    out["ratio"] = _ratios(out["spo"], out["grpo"])
    return out


async def run_bench(
    spo_cfg: TrainConfig,
    grpo_cfg: TrainConfig,
    bench: BenchSettings,
    log: Callable[[str], None] = print,
) -> dict:
    """Everything `agent-spo bench throughput` measures, as one JSON-ready dict."""
    from agent_spo.train import apply_torch_threads

    threads_before = apply_torch_threads(spo_cfg)  # as training would run
    try:
        return await _run_bench(spo_cfg, grpo_cfg, bench, log)
    finally:
        if threads_before is not None:
            import torch

            torch.set_num_threads(threads_before)


async def _run_bench(spo_cfg, grpo_cfg, bench: BenchSettings, log) -> dict:
    from agent_spo import builders

    train, _ = builders.build_datasets(spo_cfg.data, spo_cfg.run.seed)
    model_path = builders.resolve_model_path(spo_cfg.model, log=log)
    probe = builders.build_engine(model_path, spo_cfg.model, spo_cfg.rollout, 0)
    tokenizer = probe.tokenizer
    await probe.close()
    toolbox = builders.build_toolbox(spo_cfg.rollout)
    report: dict = {"settings": asdict(bench), "model_path": model_path, "cases": {}}
    with builders.build_verifier(spo_cfg.verifier) as verifier:
        parts = Parts(
            model_path, tokenizer, builders.build_renderer(tokenizer, spo_cfg.rollout, toolbox),
            toolbox, builders.build_episode_settings(spo_cfg.rollout, spo_cfg.sandbox),
            {p.key: p for p in train}, None, verifier,
        )  # fmt: skip
        if bench.demo:

            async def demo_run(mode: str, seed: int) -> RunResult:
                cfg = spo_cfg if mode == "spo" else grpo_cfg
                return await run_mode(
                    parts, cfg, mode, batch=cfg.learner.batch_size,
                    workers=cfg.rollout.workers, steps=bench.demo_steps,
                    group_size=cfg.algo.grpo.group_size, seed=seed,
                )  # fmt: skip

            demo = await _side_by_side(demo_run, bench.demo_repeats, bench.seed, log, "demo")
            demo["setup"] = {
                m: {"batch": c.learner.batch_size, "workers": c.rollout.workers,
                    "group_size": c.algo.grpo.group_size if m == "grpo" else None}
                for m, c in (("spo", spo_cfg), ("grpo", grpo_cfg))
            }  # fmt: skip
            report["demo"] = demo
        for name in bench.cases:
            report["cases"][name] = await _case(name, parts, spo_cfg, grpo_cfg, bench, log)
    report["targets"] = _targets(report)
    return report


async def _case(name, parts, spo_cfg, grpo_cfg, bench: BenchSettings, log) -> dict:
    def model(seed: int) -> DelayModel:
        return DelayModel(
            name, time_scale=bench.time_scale, median_s=bench.median_s, sigma=bench.sigma,
            alpha=bench.alpha, cap_s=bench.cap_s, seed=seed,
        )  # fmt: skip

    async def case_run(mode: str, seed: int) -> RunResult:
        return await run_mode(
            parts, spo_cfg if mode == "spo" else grpo_cfg, mode, batch=bench.batch,
            workers=bench.workers, steps=bench.steps, group_size=bench.group_size,
            seed=seed, delays=model(seed).sequence(),
        )  # fmt: skip

    out = await _side_by_side(case_run, bench.repeats, bench.seed, log, model(0).label)
    expected = {}
    for mode, cfg in (("spo", spo_cfg), ("grpo", grpo_cfg)):
        tls = [
            simulate(mode, model(bench.seed + r).sequence(), batch=bench.batch,
                     workers=bench.workers, steps=bench.steps, group_size=bench.group_size,
                     max_staleness=cfg.learner.max_staleness)
            for r in range(bench.repeats)
        ]  # fmt: skip
        expected[mode] = {
            k: statistics.median(getattr(t, k) for t in tls)
            for k in ("batches_per_s", "traj_per_s", "first_batch_s")
        }
    expected["ratio"] = _ratios(expected["spo"], expected["grpo"])
    out["expected"] = expected
    out["label"] = model(0).label
    if name == "paper":
        out["paper"] = {
            "grpo_first_batch_s": PAPER_GROUP_READY_S * bench.time_scale,
            "spo_first_batch_s": PAPER_STREAM_READY_S * bench.time_scale,
            "first_batch_speedup": PAPER_GROUP_READY_S / PAPER_STREAM_READY_S,
            "applies": (bench.batch, bench.workers, bench.group_size)
            == (PAPER_BATCH, 2 * PAPER_BATCH, PAPER_GROUP_SIZE),
        }
    return out


def _targets(report: dict) -> dict:
    """The issue's targets: SPO ≥ 4× GRPO on the paper's example; demo idle below 10%."""
    out = {}
    paper = report["cases"].get("paper")
    if paper is not None:
        out["paper_first_batch_speedup_ge_4"] = paper["ratio"]["first_batch_speedup"] >= 4
        out["paper_batches_per_s_ratio_ge_4"] = paper["ratio"]["batches_per_s"] >= 4
    if "demo" in report:
        out["demo_spo_idle_below_0.10"] = report["demo"]["spo"]["idle_frac"] < 0.10
        spo = report["demo"]["spo"]
        out["demo_spo_idle_after_first_batch_below_0.10"] = spo["idle_frac_after_first"] < 0.10
    return out


# ---------------------------------------------------------------------------------------
# On screen
# ---------------------------------------------------------------------------------------


def tables(report: dict) -> list:
    """Rich renderables of a report: the demo side by side, then each modelled case."""
    from rich.table import Table

    def f(x, digits=3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    rows = (
        ("first batch s", "first_batch_s", "first_batch_speedup", 2),
        ("batches/s", "batches_per_s", "batches_per_s", 3),
        ("traj/s", "traj_per_s", "traj_per_s", 2),
        ("idle", "idle_frac", None, 2),
        ("idle after 1st", "idle_frac_after_first", None, 2),
    )
    out: list = [
        "ratio = SPO's rate / GRPO's; for the first batch, GRPO's time / SPO's. idle = the "
        "learner's time waiting for data / wall time; after 1st: from the first batch on."
    ]
    s = report["settings"]
    demo = report.get("demo")
    if demo is not None:
        setup = demo["setup"]
        t = Table(
            title=f"(a) real demo, no added delay: SPO B={setup['spo']['batch']} "
            f"W={setup['spo']['workers']} vs GRPO B={setup['grpo']['batch']} "
            f"W={setup['grpo']['workers']} G={setup['grpo']['group_size']}; "
            f"{s['demo_steps']} steps, median of {s['demo_repeats']}"
        )
        for c in ("metric", "SPO", "GRPO", "ratio"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        for label, key, ratio, d in rows:
            r = demo["ratio"].get(ratio) if ratio else None
            t.add_row(label, f(demo["spo"][key], d), f(demo["grpo"][key], d), f(r, 2))
        out.append(t)
    if report["cases"]:
        out.append(
            f"(b) modelled stragglers: B={s['batch']}, W={s['workers']} in flight, "
            f"G={s['group_size']}, time scale {s['time_scale']:g}, {s['steps']} steps, "
            f"median of {s['repeats']}. exp. = the same episode times with free generation "
            "and learning."
        )
    for case in report["cases"].values():
        t = Table(title=f"(b) {case['label']}")
        for c in ("metric", "SPO", "GRPO", "ratio", "exp. SPO", "exp. GRPO", "exp. ratio"):
            t.add_column(c, justify="left" if c == "metric" else "right")
        exp = case["expected"]
        for label, key, ratio, d in rows:
            t.add_row(
                label,
                f(case["spo"][key], d),
                f(case["grpo"][key], d),
                f(case["ratio"].get(ratio) if ratio else None, 2),
                f(exp["spo"].get(key), d),
                f(exp["grpo"].get(key), d),
                f(exp["ratio"].get(ratio) if ratio else None, 2),
            )
        if case.get("paper", {}).get("applies"):
            p = case["paper"]
            t.add_row("paper §8 1st s", "", "", "", f(p["spo_first_batch_s"], 2),
                      f(p["grpo_first_batch_s"], 2), f(p["first_batch_speedup"], 2))  # fmt: skip
        out.append(t)
    return out


def load_configs(
    config: str | None, overrides: Sequence[str], grpo_config: str | None
) -> tuple[TrainConfig, TrainConfig]:
    """(SPO's, GRPO's) configs. GRPO's: ``grpo_config``; else configs/demo_grpo.yaml when
    no config was named; else the SPO config with algo.name=grpo and a uniform sampler.
    The overrides apply to both. Raises ConfigError (also when SPO's is not SPO)."""
    from agent_spo.config import ConfigError, load_config

    spo = load_config(config, overrides)
    if spo.algo.name != "spo":
        raise ConfigError("CONFIG must be an SPO config (algo.name=spo); give GRPO's with "
                          "--grpo-config")  # fmt: skip
    default_grpo = Path(__file__).resolve().parents[2] / "configs" / "demo_grpo.yaml"
    if grpo_config is not None:
        return spo, load_config(grpo_config, overrides)
    if config is None and default_grpo.is_file():
        return spo, load_config(default_grpo, overrides)
    return spo, load_config(config, [*overrides, "algo.name=grpo", "algo.sampler.mode=uniform"])
