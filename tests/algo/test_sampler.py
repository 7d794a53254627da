"""PrioritizedSampler: weights, in-flight exclusion, frequencies, state round trip."""

import json

import numpy as np
import pytest
from scipy.stats import chisquare

from agent_spo.algo.sampler import PrioritizedSampler, priority_weights


def test_priority_weights_hand_computed():
    # v = 0.5 -> sqrt(0.25) + 0.05 = 0.55 ; v = 0 -> 0.05 ; v = 0.1 -> sqrt(0.09) + 0.05 = 0.35
    np.testing.assert_allclose(priority_weights([0.5, 0.0, 0.1], [8, 8, 8]), [0.55, 0.05, 0.35])
    # gamma = 0.5, n_eff = 4: 0.5 / 4^0.5 + 0.05 = 0.3
    np.testing.assert_allclose(priority_weights([0.5], [4.0], gamma=0.5), [0.3])


def test_in_flight_prompts_are_excluded_until_released():
    s = PrioritizedSampler(["a", "b", "c"], seed=0)
    drawn = {s.draw() for _ in range(3)}
    assert drawn == {"a", "b", "c"}
    assert sorted(s.in_flight) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="all 3 prompts are in flight"):
        s.draw()
    s.release("b")
    assert s.draw() == "b"
    s.release("a")
    with pytest.raises(ValueError, match="not in flight"):
        s.release("a")


def test_probabilities_follow_weights_and_skip_in_flight():
    s = PrioritizedSampler(["a", "b", "c"], v_hat=[0.5, 0.0, 0.1], n_eff=[8, 8, 8])
    # w = [0.55, 0.05, 0.35], total 0.95
    np.testing.assert_allclose(s.probabilities(), [0.55 / 0.95, 0.05 / 0.95, 0.35 / 0.95])
    s._in_flight[0] = True
    np.testing.assert_allclose(s.probabilities(), [0.0, 0.125, 0.875])  # 0.05/0.4, 0.35/0.4


def test_refresh_changes_one_weight():
    s = PrioritizedSampler(["a", "b"], v_hat=[0.0, 0.0], n_eff=[1, 1])
    s.refresh("b", 0.5, 8.0)
    np.testing.assert_allclose(s.weights(), [0.05, 0.55])


def test_draw_frequencies_match_weights_chi_square():
    v_hat = np.array([0.02, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0, 0.0])
    s = PrioritizedSampler(
        [f"p{i}" for i in range(8)], v_hat=v_hat, n_eff=np.full(8, 8.0), seed=123
    )
    n = 40_000
    counts = np.zeros(8)
    for _ in range(n):
        pid = s.draw()
        counts[int(pid[1:])] += 1
        s.release(pid)
    expected = priority_weights(v_hat, np.full(8, 8.0))
    expected = expected / expected.sum() * n
    assert chisquare(counts, expected).pvalue > 1e-3
    # the same counts clearly reject uniform sampling, so the test has power
    assert chisquare(counts, np.full(8, n / 8)).pvalue < 1e-12


def test_uniform_mode_ignores_values():
    s = PrioritizedSampler(["a", "b"], v_hat=[0.5, 0.0], n_eff=[8, 8], mode="uniform")
    np.testing.assert_allclose(s.probabilities(), [0.5, 0.5])


def test_draw_batch_is_distinct_and_marks_in_flight():
    s = PrioritizedSampler([f"p{i}" for i in range(10)], seed=3)
    batch = s.draw_batch(6)
    assert len(set(batch)) == 6 and sorted(s.in_flight) == sorted(batch)
    with pytest.raises(ValueError, match="cannot draw 5 distinct prompts: 4 are not in flight"):
        s.draw_batch(5)
    assert len(set(s.draw_batch(4))) == 4


def test_zero_weights_fall_back_to_uniform():
    s = PrioritizedSampler(["a", "b"], v_hat=[0.0, 1.0], n_eff=[8, 8], eps=0.0)
    np.testing.assert_allclose(s.probabilities(), [0.5, 0.5])


def test_state_dict_round_trip_reproduces_the_draw_sequence():
    ids = [f"p{i}" for i in range(50)]
    a = PrioritizedSampler(ids, v_hat=np.linspace(0, 1, 50), n_eff=np.full(50, 8.0), seed=7)
    for _ in range(30):
        a.release(a.draw())
    a.draw()  # leave one in flight
    a.refresh("p3", 0.4, 5.0)
    state = json.loads(json.dumps(a.state_dict()))
    b = PrioritizedSampler(ids, seed=999)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    seq_a = [a.draw() for _ in range(20)]
    seq_b = [b.draw() for _ in range(20)]
    assert seq_a == seq_b
    assert a.draw_batch(5) == b.draw_batch(5)


def test_state_from_another_prompt_set_is_refused():
    a = PrioritizedSampler(["a", "b"])
    with pytest.raises(ValueError, match="different prompt set"):
        PrioritizedSampler(["a", "c"]).load_state_dict(a.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one prompt"):
        PrioritizedSampler([])
    with pytest.raises(ValueError, match="unique"):
        PrioritizedSampler(["a", "a"])
    with pytest.raises(ValueError, match="unknown sampler mode"):
        PrioritizedSampler(["a"], mode="thompson")


def test_non_finite_or_out_of_range_values_are_rejected():
    s = PrioritizedSampler(["a", "b"])
    with pytest.raises(ValueError, match="finite"):
        s.refresh("a", float("nan"), 8.0)
    with pytest.raises(ValueError, match="v_hat in"):
        s.refresh("a", 1.5, 8.0)
    with pytest.raises(ValueError, match="finite"):
        PrioritizedSampler(["a"], v_hat=[0.5], n_eff=[float("inf")])
    np.testing.assert_allclose(s.weights(), [0.55, 0.55])  # nothing was half-applied


def test_draw_batch_with_too_few_positive_weights_says_why():
    s = PrioritizedSampler(["a", "b", "c"], v_hat=[0.5, 0.0, 1.0], n_eff=[8, 8, 8], eps=0.0)
    with pytest.raises(ValueError, match="only 1 have a positive weight"):
        s.draw_batch(2)


def test_state_round_trip_with_gamma():
    ids = [f"p{i}" for i in range(20)]
    a = PrioritizedSampler(
        ids, v_hat=np.linspace(0.05, 0.95, 20), n_eff=np.arange(1, 21.0), gamma=0.5, seed=1
    )
    for _ in range(7):
        a.draw()
    b = PrioritizedSampler(ids)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    np.testing.assert_array_equal(a.probabilities(), b.probabilities())
    assert [a.draw() for _ in range(10)] == [b.draw() for _ in range(10)]
