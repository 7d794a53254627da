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

The modelled episode times and the timeline they imply are in
:mod:`agent_spo.bench.stragglers`.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent_spo.bench.stragglers import (
    DISTRIBUTIONS,
    PAPER_BATCH,
    PAPER_GROUP_READY_S,
    PAPER_GROUP_SIZE,
    PAPER_STREAM_READY_S,
    DelayedEngine,
    DelayModel,
    simulate,
)

if TYPE_CHECKING:
    from agent_spo.config import TrainConfig
    from agent_spo.episode.render import ChatRenderer
    from agent_spo.episode.runner import EpisodeSettings
    from agent_spo.episode.toolbox import Toolbox


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
            sandbox = await stack.enter_async_context(
                builders.build_sandbox(cfg.sandbox, cfg.rollout)
            )
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
            probe_tokens=cfg.algo.rho.probe_tokens,
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
