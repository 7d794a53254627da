"""The single-stream loop end to end on the demo model: real engine, sandbox, verifier,
tracker, sampler and learner; a few small steps."""

from __future__ import annotations

import asyncio

import pytest
from fakes import ScriptedEngine

from agent_spo import builders
from agent_spo.config import load_config
from agent_spo.episode.runner import EpisodeRunner
from agent_spo.learner import Learner
from agent_spo.pipeline import StreamSettings, train_grpo, train_spo, train_sync

pytestmark = pytest.mark.slow


def _run(
    max_staleness: int, steps: int = 2, batch: int = 4, workers: int = 4, grpo: int = 0,
    sync: bool = False, batch_tokens: int | None = None, colocate: bool = False,
    learner_cls=Learner, overrides: tuple[str, ...] = (),
):  # fmt: skip
    from transformers import AutoModelForCausalLM

    from agent_spo.exact_drift import ExactDrift

    algo = ["algo.name=grpo", f"algo.grpo.group_size={grpo}"] if grpo else []
    cfg = load_config(None, ["rollout.max_response_tokens=128", "sandbox.pool_size=2", *algo,
                             *overrides])  # fmt: skip
    exact = ExactDrift() if cfg.algo.rho.mode == "kl_exact" else None
    train, _ = builders.build_datasets(cfg.data, 0)
    path = builders.resolve_model_path(cfg.model, log=lambda m: None)
    rows: list[dict] = []

    async def main():
        engine = builders.build_engine(path, cfg.model, cfg.rollout, 0)
        toolbox = builders.build_toolbox(cfg.rollout)
        renderer = builders.build_renderer(engine.tokenizer, cfg.rollout, toolbox)
        tracker = builders.build_tracker(cfg.algo)
        problems = {p.key: p for p in train}
        sampler = builders.build_sampler(cfg.algo, list(problems), tracker, 0)
        learner = learner_cls(
            AutoModelForCausalLM.from_pretrained(path), lr=1e-4,
            pad_token_id=engine.tokenizer.pad_token_id,
        )  # fmt: skip
        learner.engine = engine
        with builders.build_verifier(cfg.verifier) as verifier:
            async with builders.build_sandbox(cfg.sandbox) as sandbox:
                runner = EpisodeRunner(
                    engine, renderer, toolbox, sandbox, verifier,
                    builders.build_episode_settings(cfg.rollout, cfg.sandbox),
                )  # fmt: skip
                settings = StreamSettings(batch_size=batch, total_steps=steps,
                                          workers=workers, max_staleness=max_staleness,
                                          batch_tokens=batch_tokens, colocate=colocate)  # fmt: skip
                if grpo:
                    state = await train_grpo(
                        runner=runner, problems=problems, sampler=sampler, learner=learner,
                        engine=engine, settings=settings, group_size=grpo,
                        on_step=lambda m, b: rows.append({**m, "batch": b}),
                    )  # fmt: skip
                else:
                    state = await (train_sync if sync else train_spo)(
                        runner=runner, problems=problems, tracker=tracker, sampler=sampler,
                        learner=learner, engine=engine, settings=settings, exact_drift=exact,
                        on_step=lambda m, b: rows.append({**m, "keys": [x.key for x in b],
                                                          "batch": b}),
                    )  # fmt: skip
        await engine.close()
        if exact is not None:
            learner.exact = exact  # for the kl_exact tests
        return state, tracker, sampler, learner, engine

    return (*asyncio.run(main()), rows)


def test_stream_trains_updates_the_tracker_and_pushes_weights():
    state, tracker, sampler, learner, engine, rows = _run(max_staleness=4)
    assert state.step == 2 and learner.version == 2 and engine.version == 2
    assert [r["step"] for r in rows] == [1, 2]
    assert all(len(r["keys"]) == 4 for r in rows)
    for b in rows[0]["batch"]:  # what the episode log records per trajectory
        lo, hi = sorted((b.v_hat, b.traj.reward))  # one EMA step from v_hat towards r
        assert lo - 1e-12 <= b.v_after <= hi + 1e-12 and b.v_after != b.v_hat
    assert abs(sum(b.adv for b in rows[0]["batch"])) < 1e-6  # normalised over the batch
    for key in {k for r in rows for k in r["keys"]}:
        assert tracker.visits(key) >= 1  # every trained trajectory updated its prompt
    assert sampler.in_flight == []  # workers stopped and released their prompts
    assert rows[1]["tracker/drift"] > 0 and tracker.cumulative_drift > 0
    for key in ("reward/mean", "loss/pg", "perf/learner_s", "perf/weight_push_s"):
        assert key in rows[0]
    for r in rows:  # the sandbox metrics describe the batch's own tool calls
        runs = [c for b in r["batch"] for c in b.traj.tool_calls if c.status is not None]
        assert r["sandbox/runs_per_episode"] == len(runs) / len(r["batch"])
        if runs:
            assert r["sandbox/latency_mean_s"] > 0


def test_zero_staleness_trains_only_on_current_policy_samples():
    state, tracker, sampler, learner, engine, rows = _run(max_staleness=0, steps=3, batch=2)
    assert state.step == 3
    assert all(r["rollout/staleness_mean"] == 0 for r in rows)
    assert all("rollout/dropped/stale" not in r for r in rows)  # nothing sampled to be dropped


@pytest.mark.parametrize("rho", ["kl_version", "kl_exact"])
def test_stream_at_zero_staleness_equals_the_synchronous_loop(rho):
    """With max_staleness 0 the stream samples exactly one batch per policy version, so
    it must reproduce the synchronous loop: the same prompts, seeds, tokens, rewards,
    baselines, tracker state and weights (up to float noise from engine batching).
    kl_exact (rewards into the tracker at the learner step, 6 prompts so that they come
    back) too."""
    import torch

    over = (f"algo.rho.mode={rho}",) + (("data.synthetic_tasks=6",) if rho == "kl_exact" else ())
    a = _run(max_staleness=0, steps=3, batch=4, workers=4, overrides=over)
    b = _run(max_staleness=0, steps=3, batch=4, workers=4, sync=True, overrides=over)
    (state_a, tracker_a, sampler_a, learner_a, _, rows_a) = a
    (state_b, tracker_b, sampler_b, learner_b, _, rows_b) = b
    assert state_a.step == state_b.step == 3
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["keys"] == rb["keys"]
        for x, y in zip(ra["batch"], rb["batch"], strict=True):
            assert x.draw == y.draw
            assert x.traj.prompt_token_ids == y.traj.prompt_token_ids
            assert x.traj.response_token_ids == y.traj.response_token_ids
            assert x.traj.reward == y.traj.reward
            # kl_exact's D comes from the learner's log-probs: equal up to float noise
            assert x.v_hat == (y.v_hat if rho == "kl_version" else pytest.approx(y.v_hat))
            assert x.traj.staleness(ra["step"] - 1) == 0
    assert tracker_a.state_dict()["visits"] == tracker_b.state_dict()["visits"]
    for k in tracker_b.state_dict()["visits"]:
        tol = {"abs": 1e-9} if rho == "kl_version" else {"rel": 1e-5}  # D: float noise
        assert tracker_a.alpha_beta(k) == pytest.approx(tracker_b.alpha_beta(k), **tol)
    assert sampler_a.state_dict()["rng"] == sampler_b.state_dict()["rng"]
    from transformers import AutoModelForCausalLM

    path = builders.resolve_model_path(load_config(None, []).model, log=lambda m: None)
    w0 = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    wa, wb = dict(learner_a.named_weights()), dict(learner_b.named_weights())
    moved = 0.0
    for name, t in wb.items():
        torch.testing.assert_close(wa[name], t, atol=2e-5, rtol=0)
        if name in w0:
            moved = max(moved, (t - w0[name].detach()).abs().max().item())
    assert moved > 1e-4  # the three steps did train: equal weights are not unchanged ones
    if rho == "kl_exact":
        assert sum(r["tracker/kl_exact_scored"] for r in rows_a) > 0  # prompts came back
        assert [r["tracker/kl_exact_scored"] for r in rows_a] == [
            r["tracker/kl_exact_scored"] for r in rows_b
        ]


def test_kl_exact_keeps_each_trained_prompts_last_trajectory_and_measures_on_it():
    """6 prompts, 3 steps of 4: prompts come back. Every observation reaches the tracker
    at its learner step; the store holds each trained prompt's last trajectory, with the
    log-probs of the policy right after the update that trained it."""
    state, tracker, sampler, learner, engine, rows = _run(
        max_staleness=4, steps=3, batch=4, workers=4,
        overrides=("algo.rho.mode=kl_exact", "data.synthetic_tasks=6"),
    )  # fmt: skip
    store = learner.exact
    last = {}
    for r in rows:
        for b in r["batch"]:
            last[b.key] = b.traj
            lo, hi = sorted((b.v_hat, b.traj.reward))  # the update ran, towards r
            assert lo - 1e-12 <= b.v_after <= hi + 1e-12
    assert set(last) == {k for k in last if k in store} and len(store) == len(last)
    observed = sum(len(r["batch"]) for r in rows) + state.counters["dropped/stale"]
    assert sum(tracker.state_dict()["visits"].values()) == observed
    assert rows[-1]["tracker/kl_exact_scored"] > 0  # some prompt came back with a kept one
    assert "tracker/kl_exact_s" in rows[0] and rows[-1]["tracker/kl_exact_mb"] > 0
    assert 0 <= rows[-1]["tracker/rho_at_min"] <= 1 and "tracker/rho_mean" in rows[-1]
    # the last step's prompts were kept under the final policy: D on them is 0 now
    for b in rows[-1]["batch"]:
        kept = store.trajectory(b.key)
        assert kept.response_token_ids == b.traj.response_token_ids
        (now,) = learner.token_logprobs([kept])
        assert store.drift(b.key, now.numpy()) < 1e-5


def test_grpo_hands_over_whole_groups_behind_a_barrier():
    state, tracker, sampler, learner, engine, rows = _run(
        max_staleness=4, steps=2, batch=4, workers=4, grpo=2
    )
    assert state.step == 2 and learner.version == 2 and engine.version == 2
    assert sampler.mode == "uniform"  # GRPO samples prompts uniformly (spec §5)
    assert tracker.steps == 0  # no value tracker in GRPO
    for r in rows:
        batch = r["batch"]
        assert len(batch) >= 4
        groups = {b.group for b in batch}
        for g in groups:  # every member of a group answers the same prompt
            members = [b for b in batch if b.group == g]
            assert {b.traj.info["prompt_key"] for b in members} == {members[0].key}
            assert abs(sum(b.adv for b in members)) < 1e-6  # group-centred advantages
        assert 0.0 <= r["grpo/degenerate_frac"] <= 1.0


def test_a_token_budget_closes_batches_early():
    cap = 40  # demo episodes have >= 8 model tokens: the cap closes a batch by the 5th
    state, tracker, sampler, learner, engine, rows = _run(
        max_staleness=4, steps=3, batch=8, workers=8, batch_tokens=cap
    )
    assert state.step == 3
    for r in rows:
        sizes = [b.traj.num_model_tokens for b in r["batch"]]
        assert r["rollout/batch_trajectories"] == len(sizes) <= 8
        assert r["rollout/batch_tokens"] == sum(sizes)
        # it closed on count or on tokens, and only the last one taken crossed the cap
        assert len(sizes) == 8 or sum(sizes) >= cap
        assert sum(sizes) - max(sizes) < cap
    assert any(len(r["batch"]) < 8 for r in rows)  # the cap, not the count, closed some


class _TimedRunner:
    """Episodes that take a set time by draw and carry the policy version they started
    at; the learner and engine below are instant, so finish order is fixed by the timers."""

    def __init__(self, learner, seconds):
        self.learner, self.seconds = learner, seconds

    async def run(self, problem, *, seed=None, info=None):
        from agent_spo.episode.trajectory import Segment, Trajectory

        version = self.learner.version
        await asyncio.sleep(self.seconds(info["draw"]))
        seg = Segment("model", (5,) * 10, (-0.5,) * 10, version)
        return Trajectory(problem.key, (1, 2), (seg,), reward=float(info["draw"] % 2),
                          info={"draw": info["draw"]})  # fmt: skip


class _InstantLearner:
    version = 0

    def step(self, trajs, adv):
        from agent_spo.learner import StepStats

        self.version += 1
        return StepStats(loss=0.0, pg_loss=0.0, clip_frac=0.0, approx_kl=0.0, grad_norm=0.0,
                         drift=0.01, n_tokens=1, pad_frac=0.0, n_trajectories=len(trajs),
                         optimizer_steps=1, step_s=0.0)  # fmt: skip

    def named_weights(self):
        return []


def test_what_a_token_capped_batch_leaves_over_goes_stale_and_is_dropped():
    """max_staleness 0, 4 episodes sampled ahead per version, a cap of 10 tokens (one
    episode). Draw 0 finishes first and is the whole first batch. Draws 1-3 finish next,
    at the old version: step 2 drops them (counted), and their places go to draws 5-7,
    started while the learner is still at version 1. Step 2 trains draw 4; step 3 drops
    draws 5-7 and trains draw 8. Nothing stale is ever trained."""
    from agent_spo.algo import PrioritizedSampler, ValueTracker
    from agent_spo.data.synthetic import make_tasks

    problems = {p.key: p for p in make_tasks(20)}
    learner = _InstantLearner()
    runner = _TimedRunner(
        learner, lambda d: 0.0 if d == 0 else 0.1 if d < 4 else 0.3 if d == 4 else 0.6
    )
    settings = StreamSettings(batch_size=4, batch_tokens=10, total_steps=3, workers=4,
                              max_staleness=0)  # fmt: skip
    rows = []

    async def main():
        return await train_spo(
            runner=runner, problems=problems, tracker=ValueTracker(),
            sampler=PrioritizedSampler(list(problems), seed=0), learner=learner,
            engine=ScriptedEngine(), settings=settings,  # takes weight pushes only
            on_step=lambda m, b: rows.append({**m, "draws": [x.draw for x in b]}),
        )  # fmt: skip

    state = asyncio.run(asyncio.wait_for(main(), 30))
    assert state.step == 3
    assert [r["draws"] for r in rows] == [[0], [4], [8]]
    assert [r["rollout/batch_tokens"] for r in rows] == [10, 10, 10]
    assert "rollout/dropped/stale" not in rows[0]
    assert [r["rollout/dropped/stale"] for r in rows[1:]] == [3, 6]
    assert all(r["rollout/staleness_mean"] == 0 for r in rows)


def test_grpo_under_a_token_budget_still_takes_whole_groups():
    state, tracker, sampler, learner, engine, rows = _run(
        max_staleness=4, steps=2, batch=4, workers=4, grpo=2, batch_tokens=1
    )
    for r in rows:  # one group crosses a one-token budget: the batch is that group
        assert len({b.group for b in r["batch"]}) == 1 and 1 <= len(r["batch"]) <= 2


class _AlwaysDropped:
    """A runner whose sandbox is down (every episode dropped), or whose episodes all run
    past their deadline (every episode unscored)."""

    def __init__(self, unscored: bool = False) -> None:
        self.calls = 0
        self.unscored = unscored

    async def run(self, problem, *, seed=None, info=None):
        from types import SimpleNamespace

        from agent_spo.episode.runner import EpisodeDropped

        self.calls += 1
        await asyncio.sleep(0)
        if self.unscored:
            return SimpleNamespace(reward=None, stop_reason="deadline")
        raise EpisodeDropped("sandbox", "connection refused")


@pytest.mark.parametrize("loop", ["spo", "grpo"])
def test_a_run_whose_every_episode_is_unscored_stops_instead_of_waiting(loop):
    from agent_spo.algo import PrioritizedSampler, ValueTracker
    from agent_spo.data.synthetic import make_tasks
    from agent_spo.pipeline import AllEpisodesDropped

    problems = {p.key: p for p in make_tasks(20)}
    sampler = PrioritizedSampler(list(problems), seed=0)
    runner = _AlwaysDropped(unscored=True)
    settings = StreamSettings(batch_size=4, total_steps=1, workers=4)  # limit: max(200, 8)

    async def main():
        if loop == "spo":
            await train_spo(runner=runner, problems=problems, tracker=ValueTracker(),
                            sampler=sampler, learner=None, engine=None, settings=settings)  # fmt: skip
        else:
            await train_grpo(runner=runner, problems=problems, sampler=sampler, learner=None,
                             engine=None, settings=settings, group_size=2)  # fmt: skip

    with pytest.raises(AllEpisodesDropped, match=r"unscored \(deadline\)"):
        asyncio.run(asyncio.wait_for(main(), 30))
    assert 200 <= runner.calls < 240


@pytest.mark.parametrize("loop", ["spo", "grpo"])
def test_a_run_whose_every_episode_is_dropped_stops_with_a_clear_error(loop):
    from agent_spo.algo import PrioritizedSampler, ValueTracker
    from agent_spo.data.synthetic import make_tasks
    from agent_spo.pipeline import AllEpisodesDropped

    problems = {p.key: p for p in make_tasks(20)}
    tracker = ValueTracker()
    sampler = PrioritizedSampler(list(problems), seed=0)
    runner = _AlwaysDropped()
    settings = StreamSettings(batch_size=4, total_steps=1, workers=4, max_consecutive_drops=12)

    async def main():
        if loop == "spo":
            await train_spo(runner=runner, problems=problems, tracker=tracker, sampler=sampler,
                            learner=None, engine=None, settings=settings)  # fmt: skip
        else:
            await train_grpo(runner=runner, problems=problems, sampler=sampler, learner=None,
                             engine=None, settings=settings, group_size=2)  # fmt: skip

    with pytest.raises(
        AllEpisodesDropped,
        match=r"last 1[2-9] episodes were all dropped.*sandbox: connection refused",
    ):
        asyncio.run(asyncio.wait_for(main(), 30))
    assert 12 <= runner.calls < 40  # stopped soon after the limit, not after a timeout
    assert sampler.in_flight == []


class _WatchingLearner(Learner):
    """Notes, at the start and the end of each step, whether the engine sleeps and how
    many decode steps it has made."""

    seen: list
    stepping = False

    def step(self, trajectories, advantages):
        seen = self.__dict__.setdefault("seen", [])
        e = self.engine
        seen.append(("start", e.asleep, e.stats["steps"]))
        self.stepping = True
        try:
            stats = super().step(trajectories, advantages)
        finally:
            self.stepping = False
        seen.append(("end", e.asleep, e.stats["steps"]))
        return stats

    def token_logprobs(self, trajs):  # a call from outside step: kl_exact's passes
        if "seen" in self.__dict__ and not self.stepping:
            self.seen.append(("score", self.engine.asleep, self.engine.stats["steps"]))
        return super().token_logprobs(trajs)


@pytest.mark.parametrize("loop", ["spo", "grpo", "spo-kl_exact"])
def test_colocated_the_engine_sleeps_through_every_learner_step(loop):
    """rollout.colocate: no decode step runs while the learner steps (they take turns),
    the engine is awake again for the weight push, and the episodes in flight survive.
    kl_exact's scoring passes run inside the same sleep."""
    exact = loop == "spo-kl_exact"
    state, _, _, learner, engine, rows = _run(
        max_staleness=4, colocate=True, learner_cls=_WatchingLearner,
        grpo=2 if loop == "grpo" else 0,
        overrides=("algo.rho.mode=kl_exact",) if exact else (),
    )  # fmt: skip
    assert state.step == 2 and engine.version == 2 and not engine.asleep
    assert engine.stats["sleeps"] == 2
    seen = learner.seen
    if exact:
        scores = [s for s in seen if s[0] == "score"]
        assert len(scores) == 2 and all(asleep for _, asleep, _ in scores)
        seen = [s for s in seen if s[0] != "score"]
    assert [s[:2] for s in seen] == [("start", True), ("end", True)] * 2
    for (_, _, before), (_, _, after) in zip(seen[::2], seen[1::2], strict=True):
        assert before == after  # the engine made no decode step during the update
    assert all(r["perf/engine_sleep_s"] >= 0 for r in rows)
