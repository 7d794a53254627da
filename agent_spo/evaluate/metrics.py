"""Evaluation metrics over n samples per problem: avg@k, pass@k, maj@k (spec §7).

Pure functions: rewards and answer clusters in, numbers out. Grouping answers into
clusters needs the verifier (equivalence, not string equality); that happens in
:func:`cluster_answers`, which takes the equivalence test as an argument.

For one problem with n samples of which c are correct:

* ``avg@k``: the expected accuracy of k samples. Every sample is equally likely to be
  among the k, so the unbiased estimate is c / n for every k <= n; it is reported once
  per k for the table's sake.
* ``pass@k = 1 − C(n − c, k) / C(n, k)``: the probability that at least one of k samples
  drawn without replacement from the n is correct (the unbiased estimator of Chen et
  al. 2021).
* ``maj@k``: the reward of the most frequent final answer among k samples, answers
  grouped into equivalence clusters. Samples without an answer do not vote; if none of
  the k voted the score is 0; a tie between clusters scores the mean of the tied
  clusters' rewards (the expected reward of a uniform tie-break). The estimate is the
  mean over all C(n, k) subsets when there are at most ``exact_limit`` of them, else
  over ``resamples`` random subsets drawn with a fixed seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: 1 − C(n−c, k)/C(n, k); needs 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def avg_at_k(rewards: Sequence[float], k: int) -> float:
    """Unbiased avg@k: the mean reward over all n samples (the same for every k <= n)."""
    n = len(rewards)
    if not 1 <= k <= n:
        raise ValueError(f"avg@k needs 1 <= k <= n; got n={n}, k={k}")
    return float(np.mean(rewards))


def cluster_answers(
    answers: Sequence[str | None],
    rewards: Sequence[float],
    equivalent: Callable[[str, str], bool],
) -> list[int | None]:
    """A cluster id per sample (None: no answer), grouping answers by `equivalent`.

    Each new distinct answer is compared with one representative per cluster, first
    cluster that matches wins. Two answers that are both correct are the same cluster
    (both equal the gold), and a correct and an incorrect answer never are, so the
    verifier is only asked about pairs of incorrect answers. `equivalent(rep, answer)`
    takes the representative as the gold side.
    """
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers but {len(rewards)} rewards")
    reps: list[tuple[str, bool]] = []  # (representative, correct)
    by_text: dict[tuple[str, bool], int] = {}
    out: list[int | None] = []
    for answer, r in zip(answers, rewards, strict=True):
        if answer is None or not answer.strip():
            out.append(None)
            continue
        text, correct = answer.strip(), r > 0
        key = (text, correct)
        if key not in by_text:
            found = None
            for cid, (rep, rep_correct) in enumerate(reps):
                if correct and rep_correct:
                    found = cid
                elif not correct and not rep_correct and equivalent(rep, text):
                    found = cid
                if found is not None:
                    break
            if found is None:
                reps.append((text, correct))
                found = len(reps) - 1
            by_text[key] = found
        out.append(by_text[key])
    return out


def maj_is_exact(n: int, k: int, exact_limit: int) -> bool:
    """Whether maj@k averages over every k-subset (else over random subsets)."""
    return comb(n, k) <= exact_limit


def _majority_scores(onehot: np.ndarray, cluster_reward: np.ndarray) -> np.ndarray:
    """Per subset row of vote counts [S, m]: the tie-averaged reward of the top cluster."""
    top = onehot.max(axis=1, keepdims=True)  # [S, 1]
    winners = (onehot == top) & (top > 0)  # [S, m]
    n_win = winners.sum(axis=1)  # [S]
    score = (winners * cluster_reward).sum(axis=1)
    return np.where(n_win > 0, score / np.maximum(n_win, 1), 0.0)


def maj_at_k(
    clusters: Sequence[int | None],
    rewards: Sequence[float],
    k: int,
    *,
    exact_limit: int = 5000,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, bool]:
    """(maj@k, exact) for one problem; exact is False when subsets were sampled."""
    n = len(clusters)
    if len(rewards) != n:
        raise ValueError(f"{n} clusters but {len(rewards)} rewards")
    if not 1 <= k <= n:
        raise ValueError(f"maj@k needs 1 <= k <= n; got n={n}, k={k}")
    ids = sorted({c for c in clusters if c is not None})
    if not ids:
        return 0.0, True
    col = {c: i for i, c in enumerate(ids)}
    votes = np.zeros((n, len(ids)))  # [n, m] one-hot votes; no answer = no vote
    reward_sum = np.zeros(len(ids))
    members = np.zeros(len(ids))
    for i, (c, r) in enumerate(zip(clusters, rewards, strict=True)):
        if c is not None:
            votes[i, col[c]] = 1.0
            reward_sum[col[c]] += float(r)
            members[col[c]] += 1
    cluster_reward = reward_sum / members  # [m]; equal within a cluster by construction
    if maj_is_exact(n, k, exact_limit):
        subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)  # [S, k]
        exact = True
    else:
        rng = np.random.default_rng(seed)
        subsets = np.argsort(rng.random((resamples, n)), axis=1)[:, :k]  # [S, k]
        exact = False
    counts = votes[subsets].sum(axis=1)  # [S, m]
    return float(_majority_scores(counts, cluster_reward).mean()), exact
