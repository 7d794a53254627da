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
With ``algo.rho.mode = kl_exact`` (an :class:`~agent_spo.exact_drift.ExactDrift` store)
the tracker takes rewards at the learner step instead, as the reference recipe does: the
worker reads v̂ at once, and after the update each prompt's drift is measured on its
previous trajectory, the rewards go in (in draw order, those dropped as stale too), and
the batch's trajectories are kept for their next visit.
The queue holds at most ``queue_limit`` finished trajectories: when the learner is the
bottleneck, workers wait to hand theirs over rather than generate samples that would
only go stale. A sampling budget bounds how far workers run ahead of the learner
(``max_staleness + 1`` batches), so with ``max_staleness = 0`` the stream is exactly the
synchronous loop (:func:`train_sync`, the reference it is tested against). Batches are
ordered by draw, not by finish, so which episode finished first never changes the update.

:func:`train_grpo` is the matched baseline on the same runner, learner and engine: G
episodes per prompt behind a group barrier, uniform prompts, group-normalised advantages.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

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
from agent_spo.episode.pool import drop_cause
from agent_spo.episode.runner import EpisodeDropped, EpisodeRunner
from agent_spo.episode.trajectory import Trajectory
from agent_spo.exact_drift import ExactDrift
from agent_spo.learner import LearnerLike
from agent_spo.lora import policy_weights


@dataclass(frozen=True)
class StreamSettings:
    batch_size: int = 16
    batch_tokens: int | None = None  # also close a batch at this many trainable tokens
    total_steps: int = 30
    workers: int = 8
    max_staleness: int = 4
    baseline: bool = True  # False: the "no baseline" ablation, A = r
    seed: int = 0
    queue_limit: int | None = None  # finished trajectories waiting; None = batch_size
    first_step: int = 0  # resume: steps already done
    adv_eps: float = 1e-8  # SPO: added to the batch std in the global normalisation
    grpo_std_eps: float = 1e-6  # GRPO: added to each group's std
    # Stop with an error after this many episodes in a row could not be trained on
    # (dropped, or unscored): a broken sandbox, engine or verifier must not leave the
    # learner waiting forever. None = max(200, 2 x workers).
    max_consecutive_drops: int | None = None
    # ... or as soon as more than this share of the last `drop_window` episodes was
    # dropped by the infrastructure: a sandbox that fails every tool call while episodes
    # that never call it still train would otherwise teach the policy to avoid the tool.
    max_drop_share: float = 0.2
    drop_window: int = 200
    # colocated: the engine sleeps (frees its GPU memory, keeps its requests) while the
    # learner steps on the same GPUs, and wakes before the new weights are pushed
    colocate: bool = False


class AllEpisodesDropped(RuntimeError):
    """Too many recent episodes were dropped or unscored; training stops."""


class _DropWatch:
    """Stops the run (AllEpisodesDropped) on ``limit`` untrainable episodes in a row, or
    when the share of the last ``window`` episodes that the infrastructure (sandbox,
    engine) dropped exceeds ``max_share``. Other drops (a prompt too long for the
    context, a deadline) are the data's or the settings' doing and count as kept."""

    INFRASTRUCTURE = ("sandbox", "engine")

    def __init__(self, limit: int, max_share: float = 1.0, window: int = 200) -> None:
        self.limit, self.run, self.last = limit, 0, ""
        self.max_share = max_share
        self.recent: deque[str | None] = deque(maxlen=window)  # drop cause, or None

    def dropped(self, e: EpisodeDropped) -> None:
        self._window(drop_cause(e) if e.source in self.INFRASTRUCTURE else None)
        self._miss(f"{e.source}: {e.reason}")

    def unscored(self, traj: Trajectory) -> None:
        self._window(None)
        self._miss(f"unscored ({traj.stop_reason})")

    def ok(self) -> None:
        self._window(None)
        self.run = 0

    def _window(self, cause: str | None) -> None:
        self.recent.append(cause)
        if len(self.recent) < (self.recent.maxlen or 0):
            return
        causes = Counter(c for c in self.recent if c is not None)
        dropped = sum(causes.values())
        if dropped > self.max_share * len(self.recent):
            top, n = causes.most_common(1)[0]
            raise AllEpisodesDropped(
                f"{dropped} of the last {len(self.recent)} episodes were dropped, over the "
                f"limit train.max_drop_share={self.max_share:g}; most common cause ({n}x): "
                f"{top}; check the sandbox and engine (agent-spo sandbox run, agent-spo "
                "rollout)"
            )

    def _miss(self, why: str) -> None:
        self.run += 1
        self.last = why
        if self.run >= self.limit:
            raise AllEpisodesDropped(
                f"the last {self.run} episodes were all dropped or unscored (last: "
                f"{self.last}); check the sandbox, engine and verifier (agent-spo sandbox run, "
                "agent-spo rollout) and rollout.episode_timeout_s"
            )


def _watch(settings: StreamSettings) -> _DropWatch:
    limit = settings.max_consecutive_drops
    return _DropWatch(
        limit if limit is not None else max(200, 2 * settings.workers),
        settings.max_drop_share,
        settings.drop_window,
    )


@dataclass
class Finished:
    """A trained trajectory with what the learner made of it (the episode log's ``train``)."""

    traj: Trajectory
    key: str
    v_hat: float | None  # SPO: the baseline, read before this reward was added
    draw: int = 0  # SPO: the draw's sequence number (fixes the seed and the batch order)
    v_after: float | None = None  # SPO: the tracker's value after this reward
    group: int | None = None  # GRPO: the group's index in the batch
    adv: float | None = None  # the normalised advantage the learner used


class TrainLoop(Protocol):
    """:func:`train_spo` or :func:`train_grpo` (with its group size bound): one call."""

    def __call__(
        self,
        *,
        runner: EpisodeRunner,
        problems: Mapping[str, Problem],
        tracker: ValueTracker,
        sampler: PrioritizedSampler,
        learner: LearnerLike,
        engine: Any,
        settings: StreamSettings,
        on_step: Callable[[dict, list[Finished]], object] | None = None,
    ) -> Awaitable[StreamState]: ...


@dataclass
class StreamState:
    step: int = 0
    episodes: int = 0
    counters: Counter = field(default_factory=Counter)
    rhos: list[float] = field(default_factory=list)  # the tracker's discounts since a step


def _rho_metrics(rhos: list[float], tracker: ValueTracker) -> dict:
    """How the step's tracker updates were discounted: the mean rho and the shares that
    sat on each clip bound (a first visit counts at rho_max)."""
    if not rhos or tracker.rho_mode == "constant":
        rhos.clear()
        return {}
    r = np.asarray(rhos)
    out = {
        "tracker/rho_mean": float(r.mean()),
        "tracker/rho_at_min": float(np.mean(r <= tracker.rho_min)),
        "tracker/rho_at_max": float(np.mean(r >= tracker.rho_max)),
    }
    rhos.clear()
    return out


def _room(settings: StreamSettings, n: int, tokens: int) -> bool:
    """Whether a batch of n trajectories holding this many trainable tokens takes more."""
    if n >= settings.batch_size:
        return False
    return settings.batch_tokens is None or tokens < settings.batch_tokens


def _episode_seed(run_seed: int, draw: int) -> int:
    """Draw n's sampling seed: the same prompt draw gets the same seed in every loop."""
    return (run_seed * 1_000_003 + draw) % 2**40


class _SamplingBudget:
    """How far the workers may sample ahead of the learner.

    An episode started at policy version v is trained on only if the learner has not
    moved more than ``max_staleness`` versions past v by then, so at most
    ``trained + (1 + max_staleness) × batch_size`` episodes may be started in all;
    episodes that never reach the learner (dropped, unscored, stale) give their place
    back. With ``max_staleness = 0`` and batches closed by count this is the synchronous
    loop: exactly one batch is sampled per policy version, and nothing is ever sampled
    only to be dropped.
    """

    def __init__(self, batch_size: int, max_staleness: int) -> None:
        self.batch_size, self.max_staleness = batch_size, max_staleness
        self.started = 0
        self.trained = 0
        self._cond = asyncio.Condition()

    def _open(self) -> bool:
        return self.started < self.trained + (1 + self.max_staleness) * self.batch_size

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(self._open)
            self.started += 1

    async def give_back(self) -> None:
        async with self._cond:
            self.started -= 1
            self._cond.notify_all()

    async def stepped(self, trained: int) -> None:
        async with self._cond:
            self.trained += trained
            self._cond.notify_all()


async def train_spo(
    *,
    runner: EpisodeRunner,
    problems: Mapping[str, Problem],
    tracker: ValueTracker,
    sampler: PrioritizedSampler,
    learner: LearnerLike,
    engine,
    settings: StreamSettings,
    on_step: Callable[[dict, list[Finished]], object] | None = None,
    exact_drift: ExactDrift | None = None,
) -> StreamState:
    """Run ``settings.total_steps`` learner steps on the single stream; returns counters.
    ``exact_drift``: the kl_exact store (the tracker then takes rewards at the learner
    step; see the module doc)."""
    state = StreamState()
    # Back-pressure: when the learner is the bottleneck, workers wait to hand over their
    # trajectory instead of sampling more that would only go stale and be dropped.
    queue: asyncio.Queue[Finished] = asyncio.Queue(settings.queue_limit or settings.batch_size)
    budget = _SamplingBudget(settings.batch_size, settings.max_staleness)
    watch = _watch(settings)
    stop = asyncio.Event()
    draws = 0

    async def worker() -> None:
        nonlocal draws
        while not stop.is_set():
            await budget.acquire()
            key, draw = sampler.draw(), draws
            draws += 1
            try:
                traj = await runner.run(
                    problems[key], seed=_episode_seed(settings.seed, draw), info={"draw": draw}
                )
            except EpisodeDropped as e:
                state.counters[f"dropped/{e.source}"] += 1
                await budget.give_back()
                watch.dropped(e)
                continue
            finally:
                sampler.release(key)
            state.episodes += 1
            if traj.reward is None:
                state.counters["unscored"] += 1
                await budget.give_back()
                watch.unscored(traj)
                continue
            watch.ok()
            if exact_drift is not None:  # the reward goes in at the learner step
                await queue.put(Finished(traj, key, tracker.value(key), draw))
                continue
            upd = tracker.observe(key, traj.reward)
            state.rhos.append(upd.rho)
            sampler.refresh(key, tracker.value(key), tracker.n_eff(key))
            await queue.put(Finished(traj, key, upd.v_hat_before, draw, upd.v_hat_after))

    late: list[Finished] = []  # kl_exact: rewards of trajectories dropped as stale
    tasks = [asyncio.create_task(worker()) for _ in range(settings.workers)]
    try:
        for step in range(settings.first_step, settings.total_steps):
            t_wait = time.perf_counter()
            batch: list[Finished] = []
            tokens = 0
            while _room(settings, len(batch), tokens):
                item = await _next(queue, tasks)
                if item.traj.staleness(learner.version) > settings.max_staleness:
                    state.counters["dropped/stale"] += 1
                    await budget.give_back()
                    if exact_drift is not None:
                        late.append(item)
                    continue
                batch.append(item)
                tokens += item.traj.num_model_tokens
            # Draw order, not finish order: mini-batches and float sums do not depend
            # on which episode happened to finish first.
            batch.sort(key=lambda b: b.draw)
            wait_s = time.perf_counter() - t_wait
            then = None
            if exact_drift is not None:
                then = functools.partial(_observe_exact, batch, list(late), learner, tracker,
                                         sampler, exact_drift, state)  # fmt: skip
                late.clear()
            metrics = await _learn_spo(batch, settings, learner, engine, tracker, then=then)
            metrics.update(_rho_metrics(state.rhos, tracker))
            await budget.stepped(len(batch))
            state.step = step + 1
            metrics.update({
                "step": state.step,
                "rollout/episodes": state.episodes,
                "perf/wait_s": wait_s,
                **{f"rollout/{k}": v for k, v in state.counters.items()},
            })  # fmt: skip
            if on_step is not None:
                await _maybe_await(on_step(metrics, batch))
    finally:
        await _stop_workers(stop, tasks)
    return state


async def train_sync(
    *,
    runner: EpisodeRunner,
    problems: Mapping[str, Problem],
    tracker: ValueTracker,
    sampler: PrioritizedSampler,
    learner: LearnerLike,
    engine,
    settings: StreamSettings,
    on_step: Callable[[dict, list[Finished]], object] | None = None,
    exact_drift: ExactDrift | None = None,
) -> StreamState:
    """The textbook synchronous loop, kept as the reference the stream reduces to.

    Each step: draw ``batch_size`` prompts, play them all with the current policy, wait
    for the last, update the tracker in draw order, learn. :func:`train_spo` with
    ``max_staleness = 0`` and ``workers = batch_size`` must produce exactly this run
    (tests/test_pipeline.py checks it); it is not meant for training.
    """
    state = StreamState()
    draws = 0
    for step in range(settings.first_step, settings.total_steps):
        keys = [sampler.draw() for _ in range(settings.batch_size)]
        ids = range(draws, draws + len(keys))
        draws += len(keys)
        results = await asyncio.gather(
            *(runner.run(problems[k], seed=_episode_seed(settings.seed, d), info={"draw": d})
              for k, d in zip(keys, ids, strict=True)),
            return_exceptions=True,
        )  # fmt: skip
        batch = []
        for key, draw, r in zip(keys, ids, results, strict=True):
            sampler.release(key)
            if isinstance(r, EpisodeDropped):
                state.counters[f"dropped/{r.source}"] += 1
                continue
            if isinstance(r, BaseException):
                raise r
            state.episodes += 1
            if r.reward is None:
                state.counters["unscored"] += 1
                continue
            if exact_drift is not None:  # the reward goes in at the learner step
                batch.append(Finished(r, key, tracker.value(key), draw))
                continue
            upd = tracker.observe(key, r.reward)
            state.rhos.append(upd.rho)
            sampler.refresh(key, tracker.value(key), tracker.n_eff(key))
            batch.append(Finished(r, key, upd.v_hat_before, draw, upd.v_hat_after))
        then = None
        if exact_drift is not None:
            then = functools.partial(_observe_exact, batch, [], learner, tracker, sampler,
                                     exact_drift, state)  # fmt: skip
        metrics = await _learn_spo(batch, settings, learner, engine, tracker, then=then)
        metrics.update(_rho_metrics(state.rhos, tracker))
        state.step = step + 1
        metrics.update({"step": state.step, "rollout/episodes": state.episodes})
        if on_step is not None:
            await _maybe_await(on_step(metrics, batch))
    return state


async def _observe_exact(
    batch: list[Finished],
    late: list[Finished],
    learner: LearnerLike,
    tracker: ValueTracker,
    sampler: PrioritizedSampler,
    store: ExactDrift,
    state: StreamState,
) -> dict:
    """kl_exact, after the learner's update: score the kept trajectories of the step's
    prompts and the step's own (trained, and dropped as stale) under the new policy (one
    learner call, in a thread), then give the tracker the rewards in draw order with D
    measured on each prompt's kept trajectory, and keep the step's trajectories with
    their log-probs now (a stale one too: D needs a trajectory, not a trained one)."""
    t0 = time.perf_counter()
    observed = sorted(batch + late, key=lambda b: b.draw)
    kept = [k for k in dict.fromkeys(b.key for b in observed) if k in store]
    to_score = [store.trajectory(k) for k in kept] + [b.traj for b in observed]
    scored = await asyncio.to_thread(learner.token_logprobs, to_score) if to_score else []
    drift = {k: store.drift(k, lp.numpy()) for k, lp in zip(kept, scored, strict=False)}
    seen: set[str] = set()
    missing = 0
    for b in observed:
        if tracker.visits(b.key) == 0:
            d = None  # a first visit: D = 0
        elif b.key in seen:
            d = 0.0  # visited a moment ago, under this same policy
        elif b.key in drift:
            d = drift[b.key]
        else:  # visited before, but nothing kept (e.g. a run resumed without the file)
            d, missing = 0.0, missing + 1
        assert b.traj.reward is not None  # unscored episodes never reach the queue
        upd = tracker.observe(b.key, b.traj.reward, drift=d)
        state.rhos.append(upd.rho)
        sampler.refresh(b.key, tracker.value(b.key), tracker.n_eff(b.key))
        b.v_after = upd.v_hat_after
        seen.add(b.key)
    for b, lp in zip(observed, scored[len(kept) :], strict=True):
        store.remember(b.key, b.traj, lp.numpy())  # in draw order: a repeat keeps its latest
    return {
        "tracker/kl_exact_s": time.perf_counter() - t0,
        "tracker/kl_exact_scored": float(len(kept)),
        "tracker/kl_exact_unkept": float(missing),
        "tracker/kl_exact_mb": store.nbytes / 2**20,
        **(
            {"tracker/kl_exact_drift_mean": float(np.mean(list(drift.values())))} if drift else {}
        ),  # fmt: skip
    }


async def _learn_spo(
    batch: list[Finished], settings, learner, engine, tracker, *, then=None
) -> dict:
    """SPO advantages over the whole batch (spec §2), then one learner step (and
    ``then``, see :func:`_learn`)."""
    rewards = np.array([b.traj.reward for b in batch])
    if settings.baseline:
        adv, raw = spo_advantages(rewards, np.array([b.v_hat for b in batch]), eps=settings.adv_eps)
    else:
        adv, raw = no_baseline_advantages(rewards, eps=settings.adv_eps)
    for b, a in zip(batch, np.asarray(adv).tolist(), strict=True):
        b.adv = a
    metrics = await _learn([b.traj for b in batch], adv, raw, learner, engine, tracker,
                           colocate=settings.colocate, then=then)  # fmt: skip
    metrics["tracker/v_hat_mean"] = float(np.mean([b.v_hat for b in batch]))
    return metrics


async def _learn(
    trajs, adv, raw, learner: LearnerLike, engine, tracker, *, colocate: bool = False,
    then: Callable[[], Awaitable[dict]] | None = None,
) -> dict:  # fmt: skip
    """One learner step on a batch, the drift for the tracker, the weight push; metrics.
    ``then`` runs right after the step, before anything else touches the policy (the
    kl_exact passes), and adds its metrics. Colocated, the engine sleeps through the step
    and ``then``, and wakes before the push."""
    sleep_s = 0.0
    extra: dict = {}
    if colocate:
        t0 = time.perf_counter()
        await engine.sleep()
        sleep_s = time.perf_counter() - t0
    try:
        stats = await asyncio.to_thread(learner.step, trajs, np.asarray(adv).tolist())
        if then is not None:
            extra = await then()
    finally:
        if colocate:
            t0 = time.perf_counter()
            await engine.wake()
            sleep_s += time.perf_counter() - t0
    if tracker is not None:
        tracker.record_step_drift(stats.drift)
    t_push = time.perf_counter()
    await engine.update_weights(policy_weights(learner, engine), learner.version)
    t_push = time.perf_counter() - t_push
    engine_metrics = engine.metrics() if hasattr(engine, "metrics") else {}
    rewards = np.array([t.reward for t in trajs])
    return {
        **engine_metrics,
        "reward/mean": float(rewards.mean()),
        "rollout/staleness_mean": float(np.mean([t.staleness(learner.version - 1) for t in trajs])),
        "tracker/drift": stats.drift,
        "loss/pg": stats.pg_loss,
        "loss/clip_frac": stats.clip_frac,
        "loss/approx_kl": stats.approx_kl,
        **({"loss/is_weight": stats.is_weight} if stats.is_weight is not None else {}),
        **({"loss/tis_frac": stats.tis_frac} if stats.tis_frac is not None else {}),
        **({"loss/entropy": stats.entropy} if stats.entropy is not None else {}),
        "loss/grad_norm": stats.grad_norm,
        "loss/adv_raw_var": float(np.var(raw)),
        "loss/adv_zero_frac": near_zero_fraction(np.asarray(raw), 1e-6),
        "rollout/batch_trajectories": len(trajs),
        "rollout/batch_tokens": sum(t.num_model_tokens for t in trajs),
        "tool/calls_per_episode": float(np.mean([len(t.tool_calls) for t in trajs])),
        **sandbox_metrics(trajs),
        "perf/learner_s": stats.step_s,
        "perf/pad_frac": stats.pad_frac,
        "perf/weight_push_s": t_push,
        **({"perf/engine_sleep_s": sleep_s} if colocate else {}),
        **extra,
    }


def sandbox_metrics(trajs) -> dict:
    """The batch's sandbox executions: how many, how long the episodes waited, how they ended.

    Calls that never reached the sandbox (malformed, or a tool that runs no code) have no
    status and are not counted.
    """
    runs = [c for t in trajs for c in t.tool_calls if c.status is not None]
    out = {
        "sandbox/runs_per_episode": len(runs) / max(len(trajs), 1),
        "sandbox/failed_frac": sum(c.status != "ok" for c in runs) / len(runs) if runs else 0.0,
    }
    if runs:
        waits = np.array([c.latency_s for c in runs])
        out["sandbox/latency_mean_s"] = float(waits.mean())
        out["sandbox/latency_p95_s"] = float(np.percentile(waits, 95))
    for status, n in sorted(Counter(c.status for c in runs if c.status != "ok").items()):
        out[f"sandbox/status/{status}"] = n
    return out


async def train_grpo(
    *,
    runner: EpisodeRunner,
    problems: Mapping[str, Problem],
    sampler: PrioritizedSampler,
    tracker: ValueTracker | None = None,  # unused: GRPO's baseline is the group mean
    learner: LearnerLike,
    engine,
    settings: StreamSettings,
    group_size: int = 8,
    on_step: Callable[[dict, list[Finished]], object] | None = None,
) -> StreamState:
    """The matched GRPO baseline on the same machinery: G episodes per prompt behind a
    group barrier (a group is handed over only when all its members finished), uniform
    prompts (pass a uniform sampler), A = (r − mean_g)/(std_g + eps) (spec §5)."""
    if settings.batch_size % group_size:
        raise ValueError(f"batch_size {settings.batch_size} is not a multiple of G={group_size}")
    state = StreamState()
    per_batch = settings.batch_size // group_size
    watch = _watch(settings)
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
                    watch.dropped(r)
                elif isinstance(r, BaseException):
                    raise r
                else:
                    state.episodes += 1
                    if r.reward is None:
                        state.counters["unscored"] += 1
                        watch.unscored(r)
                    else:
                        watch.ok()
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
            n_traj = tokens = 0
            while _room(settings, n_traj, tokens):
                key, group = await _next(queue, tasks)
                if max(t.staleness(learner.version) for t in group) > settings.max_staleness:
                    state.counters["dropped/stale"] += len(group)
                    continue
                groups.append((key, group))
                n_traj += len(group)
                tokens += sum(t.num_model_tokens for t in group)
            wait_s = time.perf_counter() - t_wait
            items = [
                Finished(t, key, None, group=i) for i, (key, g) in enumerate(groups) for t in g
            ]
            trajs = [b.traj for b in items]
            ids = [b.group for b in items]
            rewards = np.array([t.reward for t in trajs])
            adv = grpo_advantages(rewards, ids, eps=settings.grpo_std_eps)
            for b, a in zip(items, np.asarray(adv).tolist(), strict=True):
                b.adv = a
            gs = group_stats(rewards, ids)
            metrics = await _learn(trajs, adv, adv, learner, engine, None,
                                   colocate=settings.colocate)  # fmt: skip
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
                await _maybe_await(on_step(metrics, items))
    finally:
        await _stop_workers(stop, tasks)
    return state


async def _maybe_await(result) -> None:
    """``on_step`` may be a plain or an async callback (e.g. one that runs an evaluation)."""
    if inspect.isawaitable(result):
        await result


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
            exc = t.exception()
            if exc is not None:
                get.cancel()
                raise exc
        tasks = [t for t in tasks if not t.done()]
        if not tasks:
            get.cancel()
            raise RuntimeError("every episode worker stopped")
