"""avg@k, pass@k and maj@k against hand-computed numbers and brute force."""

from __future__ import annotations

import itertools
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_spo.evaluate.metrics import (
    avg_at_k,
    cluster_answers,
    maj_at_k,
    maj_is_exact,
    pass_at_k,
)
from agent_spo.verify import check


def same_by_verifier(rep: str, answer: str) -> bool:
    return check(rep, "\\boxed{" + answer + "}").correct


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(32, 1, 1) == pytest.approx(1 / 32)  # pass@1 = c/n
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(4, 3, 2) == 1.0  # C(1,2) = 0: any pair holds a correct one


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n),
                                                     st.integers(1, n))))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(nck):
    n, c, k = nck
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / comb(n, k))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=5"):
        avg_at_k([1, 0], 5)
    with pytest.raises(ValueError, match="k=0"):
        maj_at_k([0, 1], [1, 0], 0)


def test_avg_at_k_is_the_mean_over_all_samples():
    assert avg_at_k([1, 0, 0, 1], 1) == avg_at_k([1, 0, 0, 1], 4) == 0.5


def test_maj_hand_computed_with_a_tie_and_a_sample_without_answer():
    # samples: A (correct), A, B (wrong), no answer
    clusters, rewards = [0, 0, 1, None], [1.0, 1.0, 0.0, 0.0]
    assert maj_at_k(clusters, rewards, 4) == (1.0, True)  # A has 2 votes, B 1
    # pairs: {A,A} 1, {A,B} tie 0.5 (twice), {A,-} 1 (twice), {B,-} 0 -> (1+.5+.5+1+1+0)/6
    assert maj_at_k(clusters, rewards, 2)[0] == pytest.approx(4 / 6)
    # singles: A 1, A 1, B 0, no answer 0 -> 2/4
    assert maj_at_k(clusters, rewards, 1)[0] == pytest.approx(0.5)
    assert maj_at_k([None, None], [0.0, 0.0], 2) == (0.0, True)  # nobody voted


def test_maj_samples_subsets_when_there_are_too_many():
    n = 16
    clusters = [i % 3 for i in range(n)]  # 6, 5, 5 votes
    rewards = [1.0 if c == 2 else 0.0 for c in clusters]
    assert not maj_is_exact(n, 6, 5000) and maj_is_exact(n, 2, 5000)  # C(16,6) = 8008
    est, exact = maj_at_k(clusters, rewards, 6, resamples=4000, seed=1)
    ref, ref_exact = maj_at_k(clusters, rewards, 6, exact_limit=comb(n, 6))
    assert not exact and ref_exact
    assert est == pytest.approx(ref, abs=0.03)
    assert maj_at_k(clusters, rewards, 6, resamples=500, seed=1) == maj_at_k(
        clusters, rewards, 6, resamples=500, seed=1
    )  # a fixed seed: the same estimate every time
    assert maj_at_k(clusters, rewards, n) == (0.0, True)  # cluster 0 has the most votes


def test_clusters_group_by_verifier_equivalence_not_string_equality():
    # gold 1/2: three ways to write it are one correct cluster; 6, 6.0 and 12/2 are one
    # wrong cluster; 7 is its own
    answers = ["0.5", "\\frac{1}{2}", "6", "6.0", "12/2", "7", None, "2/4"]
    rewards = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    asked = []

    def same(rep, ans):
        asked.append((rep, ans))
        return same_by_verifier(rep, ans)

    clusters = cluster_answers(answers, rewards, same)
    assert clusters == [0, 0, 1, 1, 1, 2, None, 0]
    # correct answers join without asking; only wrong/wrong pairs reach the verifier
    assert all(r not in ("0.5", "\\frac{1}{2}", "2/4") for r, _ in asked)
    # maj@8: the correct cluster and the {6} cluster have 3 votes each -> tie -> 0.5
    assert maj_at_k(clusters, rewards, 8)[0] == pytest.approx(0.5)


def test_equivalence_changes_the_majority():
    # gold 1/2, five samples: correct written three ways, a wrong answer twice.
    answers, rewards = ["0.5", "1/2", "\\frac{1}{2}", "3", "3"], [1.0, 1.0, 1.0, 0.0, 0.0]
    clusters = cluster_answers(answers, rewards, same_by_verifier)
    assert maj_at_k(clusters, rewards, 5)[0] == 1.0  # 3 equivalent votes beat 2
    by_string = [{"0.5": 0, "1/2": 1, "\\frac{1}{2}": 2, "3": 3}[a] for a in answers]
    assert maj_at_k(by_string, rewards, 5)[0] == 0.0  # string grouping: "3" wins


def test_cluster_input_lengths_must_match():
    with pytest.raises(ValueError, match="3 answers but 2 rewards"):
        cluster_answers(["1", "2", "3"], [0.0, 1.0], same_by_verifier)
