"""The single-stream SPO loop (DESIGN §3): workers never wait for each other.

    sampler ─prompt─▶ worker ×N ─episode─▶ verifier ─reward─▶ tracker ─(traj, v̂)─▶ queue
                                                                                  │
    engine.update_weights ◀── learner.step ◀── SPO advantages ◀── first B finished ┘

Each worker draws a prompt (∝ sqrt(v̂(1−v̂)) + ε among prompts not in flight), plays one
episode, reads the baseline v̂(x) *before* adding the reward, updates the tracker, and puts
the trajectory on the queue. The learner takes the first ``batch_size`` finished
trajectories, drops any whose oldest segment lags the learner by more than
``max_staleness`` versions (counted, never trained on), normalises r − v̂ over the batch,
updates, records its drift for the ``kl_version`` discount, and pushes weights.
Unscorable episodes (reward None) and dropped ones never reach the tracker or the queue.
The queue holds at most ``queue_limit`` finished trajectories: when the learner is the
bottleneck, workers wait to hand theirs over rather than generate samples that would
only go stale.

:func:`train_grpo` is the matched baseline on the same runner, learner and engine: G
episodes per prompt behind a group barrier, uniform prompts, group-normalised advantages.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from agent_spo.algo import PrioritizedSampler, ValueTracker
from agent_spo.algo.advantages import (
    group_stats,
    grpo_advantages,
    near_zero_fraction,
    no_baseline_advantages,
    spo_advantages,
)
from agent_spo.data.problems import Problem
from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner
from agent_spo.episode.trajectory import Trajectory
from agent_spo.learner import Learner


@dataclass(frozen=True)
class StreamSettings:
    batch_size: int = 16
    total_steps: int = 30
    workers: int = 8
    max_staleness: int = 4
    baseline: bool = True  # False: the "no baseline" ablation, A = r
    seed: int = 0
    queue_limit: int | None = None  # finished trajectories waiting; None = batch_size
    first_step: int = 0  # resume: steps already done
    adv_eps: float = 1e-8  # SPO: added to the batch std in the global normalisation
    grpo_std_eps: float = 1e-6  # GRPO: added to each group's std


@dataclass
class _Finished:
    traj: Trajectory
    key: str
    v_hat: float  # the baseline, read before this reward was added


@dataclass
class StreamState:
    step: int = 0
    episodes: int = 0
    counters: Counter = field(default_factory=Counter)


async def train_spo(
    *,
    runner: EpisodeRunner,
    problems: Mapping[str, Problem],
    tracker: ValueTracker,
    sampler: PrioritizedSampler,
    learner: Learner,
    engine,
    settings: StreamSettings,
    on_step: Callable[[dict, list[_Finished]], None] | None = None,
) -> StreamState:
    """Run ``settings.total_steps`` learner steps on the single stream; returns counters."""
    state = StreamState()
    # Back-pressure: when the learner is the bottleneck, workers wait to hand over their
    # trajectory instead of sampling more that would only go stale and be dropped.
    queue: asyncio.Queue[_Finished] = asyncio.Queue(settings.queue_limit or settings.batch_size)
    stop = asyncio.Event()

    async def worker(wid: int) -> None:
        n = 0
        while not stop.is_set():
            key = sampler.draw()
            try:
                seed = (settings.seed * 1009 + wid) * 1_000_003 + n
                n += 1
                traj = await runner.run(problems[key], seed=seed % 2**40)
            except EpisodeDropped as e:
                state.counters[f"dropped/{e.source}"] += 1
                continue
            finally:
                sampler.release(key)
            state.episodes += 1
            if traj.reward is None:
                state.counters["unscored"] += 1
                continue
            upd = tracker.observe(key, traj.reward)
            sampler.refresh(key, tracker.value(key), tracker.n_eff(key))
            await queue.put(_Finished(traj, key, upd.v_hat_before))

    tasks = [asyncio.create_task(worker(i)) for i in range(settings.workers)]
    try:
        for step in range(settings.first_step, settings.total_steps):
            t_wait = time.perf_counter()
            batch: list[_Finished] = []
            while len(batch) < settings.batch_size:
                item = await _next(queue, tasks)
                if item.traj.staleness(learner.version) > settings.max_staleness:
                    state.counters["dropped/stale"] += 1
                    continue
                batch.append(item)
            wait_s = time.perf_counter() - t_wait
            rewards = np.array([b.traj.reward for b in batch])
            if settings.baseline:
                adv, raw = spo_advantages(
                    rewards, np.array([b.v_hat for b in batch]), eps=settings.adv_eps
                )
            else:
                adv, raw = no_baseline_advantages(rewards, eps=settings.adv_eps)
            metrics = await _learn([b.traj for b in batch], adv, raw, learner, engine, tracker)
            state.step = step + 1
            metrics.update({
                "step": state.step,
                "rollout/episodes": state.episodes,
                "tracker/v_hat_mean": float(np.mean([b.v_hat for b in batch])),
                "perf/wait_s": wait_s,
                **{f"rollout/{k}": v for k, v in state.counters.items()},
            })  # fmt: skip
            if on_step is not None:
                on_step(metrics, batch)
    finally:
        await _stop_workers(stop, tasks)
    return state


async def _learn(trajs, adv, raw, learner: Learner, engine, tracker) -> dict:
    """One learner step on a batch, the drift for the tracker, the weight push; metrics."""
    stats = await asyncio.to_thread(learner.step, trajs, np.asarray(adv).tolist())
    if tracker is not None:
        tracker.record_step_drift(stats.drift)
    t_push = time.perf_counter()
    await engine.update_weights(learner.named_weights(), learner.version)
    rewards = np.array([t.reward for t in trajs])
    return {
        "reward/mean": float(rewards.mean()),
        "rollout/staleness_mean": float(np.mean([t.staleness(learner.version - 1) for t in trajs])),
        "tracker/drift": stats.drift,
        "loss/pg": stats.pg_loss,
        "loss/clip_frac": stats.clip_frac,
        "loss/approx_kl": stats.approx_kl,
        "loss/grad_norm": stats.grad_norm,
        "loss/adv_raw_var": float(np.var(raw)),
        "loss/adv_zero_frac": near_zero_fraction(np.asarray(raw), 1e-6),
        "tool/calls_per_episode": float(np.mean([len(t.tool_calls) for t in trajs])),
        "perf/learner_s": stats.step_s,
        "perf/weight_push_s": time.perf_counter() - t_push,
    }


async def train_grpo(
    *,
    runner: EpisodeRunner,
    problems: Mapping[str, Problem],
    sampler: PrioritizedSampler,
    learner: Learner,
    engine,
    settings: StreamSettings,
    group_size: int = 8,
    on_step: Callable[[dict, list[tuple[str, list[Trajectory]]]], None] | None = None,
) -> StreamState:
    """The matched GRPO baseline on the same machinery: G episodes per prompt behind a
    group barrier (a group is handed over only when all its members finished), uniform
    prompts (pass a uniform sampler), A = (r − mean_g)/(std_g + eps) (spec §5)."""
    if settings.batch_size % group_size:
        raise ValueError(f"batch_size {settings.batch_size} is not a multiple of G={group_size}")
    state = StreamState()
    per_batch = settings.batch_size // group_size
    queue: asyncio.Queue = asyncio.Queue(settings.queue_limit or per_batch)
    stop = asyncio.Event()

    async def group_worker(wid: int) -> None:
        n = 0
        while not stop.is_set():
            key = sampler.draw()
            base = ((settings.seed * 1009 + wid) * 1_000_003 + n * group_size) % 2**40
            n += 1
            try:
                results = await asyncio.gather(
                    *(runner.run(problems[key], seed=base + j) for j in range(group_size)),
                    return_exceptions=True,
                )
            finally:
                sampler.release(key)
            group = []
            for r in results:
                if isinstance(r, EpisodeDropped):
                    state.counters[f"dropped/{r.source}"] += 1
                elif isinstance(r, BaseException):
                    raise r
                else:
                    state.episodes += 1
                    if r.reward is None:
                        state.counters["unscored"] += 1
                    else:
                        group.append(r)
            if len(group) < group_size:
                state.counters["groups_incomplete"] += 1
            if group:
                await queue.put((key, group))

    tasks = [
        asyncio.create_task(group_worker(i)) for i in range(max(1, settings.workers // group_size))
    ]
    try:
        for step in range(settings.first_step, settings.total_steps):
            t_wait = time.perf_counter()
            groups: list[tuple[str, list[Trajectory]]] = []
            n_traj = 0
            while n_traj < settings.batch_size:
                key, group = await _next(queue, tasks)
                if max(t.staleness(learner.version) for t in group) > settings.max_staleness:
                    state.counters["dropped/stale"] += len(group)
                    continue
                groups.append((key, group))
                n_traj += len(group)
            wait_s = time.perf_counter() - t_wait
            trajs = [t for _, g in groups for t in g]
            ids = [i for i, (_, g) in enumerate(groups) for _ in g]
            rewards = np.array([t.reward for t in trajs])
            adv = grpo_advantages(rewards, ids, eps=settings.grpo_std_eps)
            gs = group_stats(rewards, ids)
            metrics = await _learn(trajs, adv, adv, learner, engine, None)
            state.step = step + 1
            metrics.update({
                "step": state.step,
                "rollout/episodes": state.episodes,
                "grpo/degenerate_frac": gs.frac_degenerate,
                "grpo/samples_degenerate_frac": gs.frac_samples_degenerate,
                "perf/wait_s": wait_s,
                **{f"rollout/{k}": v for k, v in state.counters.items()},
            })  # fmt: skip
            if on_step is not None:
                on_step(metrics, groups)
    finally:
        await _stop_workers(stop, tasks)
    return state


async def _stop_workers(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Stop drawing prompts and cancel the episodes in flight (their prompts are released)."""
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _next(queue: asyncio.Queue, tasks: list[asyncio.Task]):
    """The next finished trajectory; re-raises a worker's crash instead of waiting forever."""
    get = asyncio.ensure_future(queue.get())
    while True:
        done, _ = await asyncio.wait([get, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        for t in done:
            if t.exception() is not None:
                get.cancel()
                raise t.exception()
        tasks = [t for t in tasks if not t.done()]
        if not tasks:
            get.cancel()
            raise RuntimeError("every episode worker stopped")
