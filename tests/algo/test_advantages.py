"""Advantages: SPO, no-baseline, GRPO, degenerate-group accounting."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent_spo.algo.advantages import (
    group_stats,
    grpo_advantages,
    near_zero_fraction,
    no_baseline_advantages,
    normalize_global,
    spo_advantages,
)


def test_spo_advantages_hand_computed():
    rewards = [1, 0, 1, 0]
    baselines = [0.25, 0.5, 0.75, 0.5]
    norm, raw = spo_advantages(rewards, baselines)
    # A = r - v_hat_prev = [0.75, -0.5, 0.25, -0.5]; mean = 0
    np.testing.assert_allclose(raw, [0.75, -0.5, 0.25, -0.5])
    # unbiased var = (0.5625 + 0.25 + 0.0625 + 0.25)/3 = 0.375 ; std = 0.6123724357
    # A~ = A / (0.6123724357 + 1e-8) = [1.2247448, -0.8164966, 0.4082483, -0.8164966]
    np.testing.assert_allclose(norm, [1.2247448, -0.8164966, 0.4082483, -0.8164966], atol=1e-7)


def test_spo_subtracts_the_batch_mean_of_raw_advantages():
    norm, raw = spo_advantages([1, 1, 0, 1], [0.5, 0.25, 0.5, 0.75])
    # A = [0.5, 0.75, -0.5, 0.25]; mean = 0.25; deviations [0.25, 0.5, -0.75, 0]
    # unbiased var = (0.0625 + 0.25 + 0.5625 + 0)/3 = 0.2916667 ; std = 0.5400617
    # A~ = [0.4629100, 0.9258201, -1.3887301, 0]
    np.testing.assert_allclose(raw, [0.5, 0.75, -0.5, 0.25])
    np.testing.assert_allclose(norm, [0.4629100, 0.9258201, -1.3887301, 0.0], atol=1e-7)


def test_non_finite_inputs_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        spo_advantages([1.0, np.nan], [0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        grpo_advantages([1.0, np.inf], ["a", "a"])


def test_no_baseline_is_normalised_reward():
    norm, raw = no_baseline_advantages([1, 0, 0, 0])
    # mean = 0.25 ; unbiased std = sqrt((0.5625 + 3*0.0625)/3) = sqrt(0.25) = 0.5
    np.testing.assert_allclose(raw, [1, 0, 0, 0])
    np.testing.assert_allclose(norm, [1.5, -0.5, -0.5, -0.5], atol=1e-7)


def test_degenerate_global_batches():
    assert normalize_global(np.array([0.7])).tolist() == [0.0]  # batch of one: no spread
    # all advantages equal: (A - mean) = 0 -> 0 / (0 + 1e-8) = 0, not NaN
    assert normalize_global(np.array([0.3, 0.3, 0.3])).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="non-empty 1-D"):
        normalize_global(np.array([]))
    with pytest.raises(ValueError, match="differ in shape"):
        spo_advantages([1, 0], [0.5])


def test_grpo_advantages_hand_computed():
    rewards = [1, 0, 0, 1, 1, 1, 1, 1, 1]
    groups = ["a", "a", "a", "a", "b", "b", "b", "b", "c"]
    adv = grpo_advantages(rewards, groups)
    # group a: mean 0.5, unbiased std = sqrt(4*0.25/3) = 0.5773502692
    #          A = ±0.5 / (0.5773502692 + 1e-6) = ±0.8660239
    np.testing.assert_allclose(adv[:4], [0.8660239, -0.8660239, -0.8660239, 0.8660239], atol=1e-7)
    # group b: all equal -> std 0 -> A = 0 / 1e-6 = 0
    np.testing.assert_allclose(adv[4:8], 0.0)
    # group c has one member: verl's convention mean 0, std 1 -> A = 1/(1 + 1e-6)
    assert adv[8] == pytest.approx(1 / (1 + 1e-6))
    with pytest.raises(ValueError, match="one group id per reward"):
        grpo_advantages([1, 0], ["a"])


def test_group_stats_counts_degenerate_groups():
    rewards = [1, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    groups = ["a"] * 4 + ["b"] * 4 + ["d"] * 2
    s = group_stats(rewards, groups)
    # a mixed; b all 1 (solve_all); d all 0 (solve_none) -> 2 of 3 groups, 6 of 10 samples
    assert (s.n_groups, s.n_degenerate, s.n_solve_all, s.n_solve_none) == (3, 2, 1, 1)
    assert s.frac_degenerate == pytest.approx(2 / 3)
    assert s.frac_samples_degenerate == pytest.approx(0.6)


def test_near_zero_fraction():
    # |A| <= 0.02 for 0.01 and -0.02 only
    assert near_zero_fraction(np.array([0.01, -0.02, 0.5, -1.0]), 0.02) == 0.5


@settings(max_examples=300, deadline=None)
@given(adv=arrays(np.float64, st.integers(2, 300), elements=st.floats(-10, 10)))
def test_normalised_advantages_have_mean_zero_and_unit_std(adv):
    assume(adv.std(ddof=1) > 1e-2)  # eps = 1e-8 shifts the std by < 1e-6 relative
    out = normalize_global(adv)
    assert abs(out.mean()) < 1e-9
    assert out.std(ddof=1) == pytest.approx(1.0, abs=2e-6)


@settings(max_examples=200, deadline=None)
@given(
    r=arrays(np.float64, st.integers(2, 64), elements=st.sampled_from([0.0, 1.0])),
    shift=st.floats(-1, 1),
)
def test_spo_normalisation_is_invariant_to_a_common_baseline_shift(r, shift):
    # Global normalisation removes any constant added to every baseline.
    b = np.linspace(0.1, 0.9, r.size)
    np.testing.assert_allclose(spo_advantages(r, b)[0], spo_advantages(r, b + shift)[0], atol=1e-6)
