"""ValueTracker: hand-computed updates, the three rho modes, initialisation, state round trip."""

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_spo.algo.value_tracker import ValueTracker, prior_from_scores, rho_from_drift

DEFAULTS = dict(d_half=0.06, rho_min=0.875, rho_max=0.96)


def test_rho_from_drift_hand_computed():
    # D = 0      -> 2^0 = 1, clipped to rho_max = 0.96
    assert rho_from_drift(0.0, **DEFAULTS) == 0.96
    # D = 0.006  -> 2^(-0.1) = 0.9330329915  (inside the clip)
    assert rho_from_drift(0.006, **DEFAULTS) == pytest.approx(0.9330329915, abs=1e-10)
    # D = 0.06   -> 2^(-1) = 0.5, clipped to rho_min = 0.875
    assert rho_from_drift(0.06, **DEFAULTS) == 0.875
    # clip edges: 2^(-D/0.06) = 0.96 at D = 0.06*log2(1/0.96) = 0.0035336
    assert rho_from_drift(0.0035, **DEFAULTS) == 0.96
    assert rho_from_drift(0.0036, **DEFAULTS) < 0.96
    with pytest.raises(ValueError, match="finite number >= 0"):
        rho_from_drift(-0.1, **DEFAULTS)
    with pytest.raises(ValueError, match="finite number >= 0"):
        rho_from_drift(math.nan, **DEFAULTS)


def test_update_binary_matches_hand_arithmetic_and_ema_form():
    t = ValueTracker(rho_mode="constant", prior_alpha=2.0, prior_beta=6.0)
    assert t.value("x") == 0.25 and t.n_eff("x") == 8.0
    t.update("x", 1.0, rho=0.9)
    # alpha = 0.9*2 + 1 = 2.8, beta = 0.9*6 + 0 = 5.4, v = 2.8/8.2 = 0.3414634146
    assert t.alpha_beta("x") == pytest.approx((2.8, 5.4))
    assert t.value("x") == pytest.approx(0.3414634146, abs=1e-10)
    # EMA form: eta = 1/(0.9*8 + 1) = 1/8.2 ; v = 0.25 + (1 - 0.25)/8.2 = 0.3414634146
    assert t.value("x") == pytest.approx(0.25 + 0.75 / 8.2, abs=1e-12)
    assert t.n_eff("x") == pytest.approx(8.2)


def test_update_fractional_reward_is_the_ema_form():
    t = ValueTracker(rho_mode="constant", prior_alpha=2.0, prior_beta=6.0)
    t.update("x", 0.3, rho=0.9)
    # alpha = 1.8 + 0.3 = 2.1, beta = 5.4 + 0.7 = 6.1, v = 2.1/8.2 = 0.2560975610
    # EMA: v = 0.25 + (0.3 - 0.25)/8.2 = 0.25 + 0.0060975610
    assert t.value("x") == pytest.approx(0.2560975610, abs=1e-10)
    assert t.value("x") == pytest.approx(0.25 + 0.05 / 8.2, abs=1e-12)


@pytest.mark.parametrize("bad", [None, -0.1, 1.5, math.nan])
def test_rewards_outside_unit_interval_or_missing_are_rejected(bad):
    t = ValueTracker()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t.update("x", bad, rho=0.9)
    assert "x" not in t  # nothing was half-applied


def test_prior_strength_and_offline_init_both_forms():
    t = ValueTracker(rho_min=0.875)
    # N0 = 1/(1 - 0.875) = 8
    assert t.prior_strength == pytest.approx(8.0)
    # paper: 3 of 8 correct -> v0 = 3/8 = 0.375 -> alpha0 = 3, beta0 = 5
    assert prior_from_scores(3, 8, prior_strength=8.0, form="paper") == pytest.approx((3.0, 5.0))
    # smoothed: v0 = 3.5/9 = 0.3888889 -> alpha0 = 3.1111111, beta0 = 4.8888889
    a, b = prior_from_scores(3, 8, prior_strength=8.0, form="smoothed")
    assert (a, b) == pytest.approx((28 / 9, 44 / 9))
    # 0 of 8: paper v0 = 0 exactly; smoothed v0 = 0.5/9 -> alpha0 = 4/9 = 0.444444
    assert prior_from_scores(0, 8, prior_strength=8.0, form="paper") == pytest.approx((0.0, 8.0))
    assert prior_from_scores(0, 8, prior_strength=8.0, form="smoothed")[0] == pytest.approx(4 / 9)

    t.init_from_scores({"p": [1, 0, 1, 0, 0, 1, 0, 0], "q": [0] * 8}, form="smoothed")
    assert t.value("p") == pytest.approx(3.5 / 9)
    assert t.n_eff("p") == pytest.approx(8.0)
    assert t.value("q") == pytest.approx(0.5 / 9)
    with pytest.raises(ValueError, match="n_samples > 0"):
        t.init_from_scores({"r": []})
    with pytest.raises(ValueError, match="unknown init form"):
        prior_from_scores(1, 2, prior_strength=8.0, form="bayes")


def test_no_offline_init_ablation_prior():
    t = ValueTracker()  # alpha = beta = 0.5 for every unseen prompt
    assert t.value("never-seen") == 0.5
    assert t.n_eff("never-seen") == 1.0
    assert len(t) == 0  # reading does not create entries


def test_kl_version_accumulates_drift_since_last_visit():
    t = ValueTracker(rho_mode="kl_version", **DEFAULTS)
    t.record_step_drift(0.01)  # drift before x was ever seen does not count
    u = t.observe("x", 1.0)
    assert u.first_visit and u.drift == 0.0 and u.rho == 0.96
    # prior (0.5, 0.5): alpha = 0.96*0.5 + 1 = 1.48, beta = 0.96*0.5 = 0.48
    assert t.alpha_beta("x") == pytest.approx((1.48, 0.48))
    t.record_step_drift(0.004)
    t.record_step_drift(0.002)
    assert t.drift_since_visit("x") == pytest.approx(0.006)
    u = t.observe("x", 0.0)
    # D = 0.004 + 0.002 = 0.006 -> rho = 2^(-0.1) = 0.9330329915
    assert u.drift == pytest.approx(0.006) and u.rho == pytest.approx(0.9330329915)
    assert u.v_hat_before == pytest.approx(1.48 / 1.96)
    # revisiting with no step in between: D = 0 -> rho_max
    assert t.observe("x", 1.0).rho == 0.96
    assert t.steps == 3 and t.visits("x") == 3
    with pytest.raises(ValueError, match="computes the drift itself"):
        t.rho("x", drift=0.1)


def test_kl_exact_takes_the_measured_drift():
    t = ValueTracker(rho_mode="kl_exact", **DEFAULTS)
    assert t.observe("x", 1.0).rho == 0.96  # first visit: D = 0
    with pytest.raises(ValueError, match="needs the measured drift"):
        t.observe("x", 1.0)
    # D = 0.03 -> 2^(-0.5) = 0.7071, clipped to 0.875
    assert t.observe("x", 1.0, drift=0.03).rho == 0.875
    # D = 0.0045 -> 2^(-0.075) = 0.9493421
    assert t.observe("x", 0.0, drift=0.0045).rho == pytest.approx(0.9493421, abs=1e-7)


def test_constant_mode_ignores_drift_bookkeeping():
    t = ValueTracker(rho_mode="constant", rho_constant=0.9)
    t.record_step_drift(5.0)
    assert t.observe("x", 1.0).rho == 0.9
    assert t.observe("x", 1.0).rho == 0.9
    with pytest.raises(ValueError, match="takes no drift"):
        t.rho("x", drift=0.1)


def test_bad_construction_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="unknown rho_mode"):
        ValueTracker(rho_mode="kl")
    with pytest.raises(ValueError, match="rho_min <= rho_max"):
        ValueTracker(rho_min=0.97, rho_max=0.96)
    with pytest.raises(ValueError, match="d_half"):
        ValueTracker(d_half=0.0)


def _exercise(t: ValueTracker, seed: int, n: int = 200) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pid = f"p{rng.randrange(7)}"
        out.append((t.observe(pid, float(rng.random() < 0.4)).v_hat_before, t.value(pid)))
        if rng.random() < 0.3:
            t.record_step_drift(rng.random() * 0.01)
    return out


@pytest.mark.parametrize("mode", ["kl_version", "constant"])
def test_state_dict_round_trips_exactly_through_json(mode):
    a = ValueTracker(rho_mode=mode, rho_constant=0.9)
    a.init_from_scores({"p0": [1, 1, 0, 0, 1, 0, 0, 0]}, form="smoothed")
    _exercise(a, seed=1)
    state = json.loads(json.dumps(a.state_dict()))
    b = ValueTracker.from_state_dict(state)
    assert b.state_dict() == a.state_dict()
    # and the two evolve identically afterwards
    assert _exercise(a, seed=2) == _exercise(b, seed=2)


def test_load_rejects_unknown_state_version():
    with pytest.raises(ValueError, match="state version"):
        ValueTracker().load_state_dict({"version": 99})


rewards = st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=200)


@settings(max_examples=200, deadline=None)
@given(rewards=rewards, rhos=st.lists(st.floats(0.5, 1.0), min_size=1, max_size=200))
def test_values_stay_strictly_inside_unit_interval(rewards, rhos):
    for t in (
        ValueTracker(rho_mode="constant"),
        _smoothed_tracker(),
    ):
        for i, r in enumerate(rewards):
            t.update("p", r, rho=rhos[i % len(rhos)])
            assert 0.0 < t.value("p") < 1.0


def _smoothed_tracker() -> ValueTracker:
    t = ValueTracker()
    t.init_from_scores({"p": [0.0] * 8}, form="smoothed")
    return t


@settings(max_examples=100, deadline=None)
@given(rho=st.floats(0.5, 0.96), rewards=rewards, n0=st.floats(0.1, 50.0))
def test_constant_rho_equilibrium_window(rho, rewards, n0):
    # n_eff_k = rho^k * n0 + (1 - rho^k)/(1 - rho) -> 1/(1 - rho): 8 at 0.875, 25 at 0.96
    t = ValueTracker(rho_mode="constant", rho_constant=rho, prior_alpha=n0 / 2, prior_beta=n0 / 2)
    for k in range(800):
        t.observe("p", rewards[k % len(rewards)])
    assert t.n_eff("p") == pytest.approx(1.0 / (1.0 - rho), rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(
    batch=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from([0.0, 1.0])),
        max_size=20,
        unique_by=lambda x: x[0],
    ),
    drifts=st.lists(st.floats(0.0, 0.02), min_size=31, max_size=31),
    seed=st.integers(0, 2**16),
)
def test_batch_order_does_not_change_the_tracker(batch, drifts, seed):
    # Updates of distinct prompts inside one batch commute, including their discounts:
    # every prompt is visited once first, at different times, so D and rho differ per prompt.
    trackers = []
    for order in (batch, random.Random(seed).sample(batch, len(batch))):
        t = ValueTracker()
        for pid in range(31):
            t.observe(f"p{pid}", float(pid % 2))
            t.record_step_drift(drifts[pid])
        for pid, r in order:
            t.observe(f"p{pid}", r)
        trackers.append(t)
    assert trackers[0].state_dict() == trackers[1].state_dict()


def test_numpy_and_torch_scalars_are_stored_as_floats():
    import numpy as np
    import torch

    t = ValueTracker()
    t.update("x", np.float32(1.0), rho=np.float32(0.9))
    t.record_step_drift(torch.tensor(0.003))
    t.observe("x", np.float64(0.0))
    state = json.loads(json.dumps(t.state_dict()))  # would fail on float32 / tensors
    assert ValueTracker.from_state_dict(state).state_dict() == t.state_dict()
    assert all(type(v) is float for v in t.state_dict()["alpha"].values())


def test_non_finite_drift_is_rejected():
    t = ValueTracker()
    for bad in (math.inf, math.nan, -1e-9):
        with pytest.raises(ValueError, match="finite number >= 0"):
            t.record_step_drift(bad)
    assert t.cumulative_drift == 0.0 and t.steps == 0
    with pytest.raises(ValueError, match="d_half"):
        ValueTracker(d_half=math.nan)


def test_kl_exact_first_visit_refuses_a_drift():
    t = ValueTracker(rho_mode="kl_exact")
    with pytest.raises(ValueError, match="no previous visit"):
        t.observe("x", 1.0, drift=0.05)


def test_kl_version_offline_init_counts_as_a_visit_by_the_initial_policy():
    t = ValueTracker(rho_mode="kl_version", **DEFAULTS)
    t.init_from_scores({"x": [1, 0, 0, 0, 0, 0, 0, 0]})  # alpha0 = 1, beta0 = 7
    t.record_step_drift(0.003)
    t.record_step_drift(0.003)
    u = t.observe("x", 1.0)
    # D = 0.006 since the offline estimate -> rho = 2^(-0.1) = 0.9330329915
    # alpha = 0.933033*1 + 1 = 1.933033, beta = 0.933033*7 = 6.531231
    assert u.first_visit and u.drift == pytest.approx(0.006)
    assert t.alpha_beta("x") == pytest.approx((1.9330329915, 6.5312309405))
    # a prompt with neither init nor visit starts at D = 0
    assert t.observe("fresh", 1.0).rho == 0.96


def test_reinitialising_forgets_the_visit_history():
    t = ValueTracker()
    t.observe("x", 1.0)
    t.record_step_drift(0.01)
    t.init_from_scores({"x": [1, 1, 0, 0]})
    assert t.visits("x") == 0 and t.drift_since_visit("x") == 0.0
    assert t.value("x") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s["beta"].update(p0=-5.0), "not a valid Beta"),
        (lambda s: s["beta"].pop("p0"), "different prompts"),
        (lambda s: s["visits"].update(ghost=1), "without alpha/beta"),
        (lambda s: s.update(cum_drift=float("inf")), "drift"),
    ],
)
def test_load_rejects_corrupt_state(corrupt, message):
    a = ValueTracker()
    _exercise(a, seed=5)
    state = a.state_dict()
    corrupt(state)
    with pytest.raises(ValueError, match=message):
        ValueTracker().load_state_dict(state)
