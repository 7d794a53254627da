"""kl_exact's store: compact records, the rebuilt trajectory, D, files; and the step that
feeds the tracker (with a learner whose log-probs are set by the test)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from agent_spo.algo import PrioritizedSampler, ValueTracker
from agent_spo.episode.trajectory import Segment, Trajectory
from agent_spo.exact_drift import ExactDrift
from agent_spo.pipeline import Finished, StreamState, _observe_exact


def _traj(key: str, reward: float = 1.0) -> Trajectory:
    return Trajectory(key, (5, 6, 7), (
        Segment("model", (10, 11), (-0.5, -1.0), 0),
        Segment("tool", (20, 21, 22)),
        Segment("model", (12,), (-2.0,), 0),
    ), reward=reward)  # fmt: skip


def test_a_record_rebuilds_its_trajectory_and_measures_d_over_sampled_tokens_only():
    store = ExactDrift()
    t = _traj("a")
    store.remember("a", t, [-0.25, -0.5, -9.0, -9.0, -9.0, -1.0])
    kept = store.trajectory("a")
    assert kept.token_ids == t.token_ids and kept.loss_mask == t.loss_mask
    assert kept.logprobs == (-0.25, -0.5, 0.0, 0.0, 0.0, -1.0)  # tool tokens: not kept
    # |then - now| over the three sampled tokens; the tool tokens' values do not count
    assert store.drift("a", [-0.35, -0.3, 5.0, 5.0, 5.0, -1.6]) == pytest.approx(
        (0.1 + 0.2 + 0.6) / 3
    )
    assert store.nbytes == 3 * 4 + 6 * 9
    with pytest.raises(ValueError, match="5 log-probs for 6"):
        store.remember("b", t, [0.0] * 5)


def test_the_store_round_trips_through_its_file(tmp_path):
    store = ExactDrift()
    store.remember("a", _traj("a"), [-0.25, -0.5, 0, 0, 0, -1.0])
    store.remember("b", _traj("b"), [-1.5, -2.5, 0, 0, 0, -3.0])
    store.save(tmp_path / "s.npz")
    back = ExactDrift.load(tmp_path / "s.npz")
    assert len(back) == 2 and back.nbytes == store.nbytes
    for k in ("a", "b"):
        assert back.trajectory(k) == store.trajectory(k)
    empty = tmp_path / "e.npz"
    ExactDrift().save(empty)
    assert len(ExactDrift.load(empty)) == 0


class _Learner:
    """Log-probs set by the test: each call returns the next list."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def token_logprobs(self, trajs):
        self.calls.append([t.prompt_id for t in trajs])
        return [torch.tensor(x, dtype=torch.float64) for x in self.answers.pop(0)]


def test_the_step_feeds_the_tracker_in_draw_order_with_d_from_the_kept_trajectory():
    tracker = ValueTracker(rho_mode="kl_exact")
    sampler = PrioritizedSampler(["a", "b"], seed=0)
    store = ExactDrift()
    then = [-0.5, -1.0, 0, 0, 0, -2.0]
    state = StreamState()
    # step 1: a (first visit) and b (first visit); both kept
    step1 = [Finished(_traj("a", 1.0), "a", 0.5, draw=0), Finished(_traj("b", 0.0), "b", 0.5, 1)]
    m = asyncio.run(_observe_exact(step1, [], _Learner([[then, then]]), tracker, sampler, store,
                                   state))  # fmt: skip
    assert m["tracker/kl_exact_scored"] == 0 and len(store) == 2
    assert state.rhos == [tracker.rho_max, tracker.rho_max]  # first visits: D = 0
    # step 2: a comes back twice (draws 3 and 2) and b once, dropped as stale (late)
    now_a = [-0.5 - 0.03, -1.0 + 0.03, 0, 0, 0, -2.0 + 0.03]  # D(a) = 0.03
    now_b = [-0.5 - 0.006, -1.0, 0, 0, 0, -2.0 - 0.003]  # D(b) = 0.003
    batch = [Finished(_traj("a", 1.0), "a", 0.6, draw=3), Finished(_traj("a", 0.0), "a", 0.6, 2)]
    late = [Finished(_traj("b", 1.0), "b", 0.4, draw=4)]
    latest = [-0.1, -0.2, 0, 0, 0, -0.3]  # draw 3's trajectory under the new policy
    b_now = [-0.7, -0.8, 0, 0, 0, -0.9]  # draw 4's (stale, but kept all the same)
    learner = _Learner([[now_a, now_b, then, latest, b_now]])
    state.rhos.clear()
    a_before, b_before = tracker.alpha_beta("a"), tracker.alpha_beta("b")
    m = asyncio.run(_observe_exact(batch, late, learner, tracker, sampler, store, state))
    # the kept ones, then the step's own in draw order (a: 2, a: 3, b: 4, the stale one)
    assert learner.calls == [["a", "b", "a", "a", "b"]]
    rho_a = min(max(2 ** (-0.03 / tracker.d_half), tracker.rho_min), tracker.rho_max)
    rho_b = min(max(2 ** (-0.003 / tracker.d_half), tracker.rho_min), tracker.rho_max)
    # draw order: a (draw 2, reward 0) with D(a); a again (draw 3) under this same policy:
    # D = 0; then b (draw 4, late) with D(b)
    assert state.rhos == pytest.approx([rho_a, tracker.rho_max, rho_b])
    al, be = a_before
    al, be = rho_a * al + 0.0, rho_a * be + 1.0
    al, be = tracker.rho_max * al + 1.0, tracker.rho_max * be + 0.0
    assert tracker.alpha_beta("a") == pytest.approx((al, be))
    assert tracker.alpha_beta("b") == pytest.approx((rho_b * b_before[0] + 1, rho_b * b_before[1]))
    assert batch[0].v_after == pytest.approx(al / (al + be))  # draw 3 went in last for a
    assert m["tracker/kl_exact_scored"] == 2 and m["tracker/kl_exact_unkept"] == 0
    assert m["tracker/kl_exact_drift_mean"] == pytest.approx((0.03 + 0.003) / 2)
    # a came twice: the later draw (3) is the one kept; b's stale trajectory is kept too
    assert np.allclose(store.trajectory("a").logprobs, latest)
    assert np.allclose(store.trajectory("b").logprobs, b_now)
