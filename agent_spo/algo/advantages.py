"""Trajectory-level advantages: SPO (tracker baseline + global normalisation) and GRPO.

Spec §2 and §5. All functions take one scalar reward per trajectory and return one
scalar advantage per trajectory; the learner broadcasts it to every trainable token.
Pure numpy: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def normalize_global(adv: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """A~ = (A - mean_B(A)) / (std_B(A) + eps), unbiased std over the whole batch (paper Eq. 9).

    A batch of one has no spread: its normalised advantage is 0.
    """
    adv = np.asarray(adv, dtype=np.float64)  # [B]
    if adv.ndim != 1 or adv.size == 0:
        raise ValueError(f"expected a non-empty 1-D batch of advantages, got shape {adv.shape}")
    if not np.isfinite(adv).all():
        raise ValueError(
            f"advantages must be finite; got {adv[~np.isfinite(adv)][:3]} in the batch"
        )
    if adv.size == 1:
        return np.zeros_like(adv)
    return (adv - adv.mean()) / (adv.std(ddof=1) + eps)


def spo_advantages(
    rewards: np.ndarray, baselines: np.ndarray, eps: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """SPO: A = r - v_hat_prev(x) (paper Eq. 8), then global normalisation (Eq. 9).

    ``baselines`` must be the tracker values *before* this trajectory's reward was added,
    so the baseline does not depend on the sampled action. Returns (A~, A).
    """
    r = np.asarray(rewards, dtype=np.float64)  # [B]
    b = np.asarray(baselines, dtype=np.float64)  # [B]
    if r.shape != b.shape:
        raise ValueError(f"rewards {r.shape} and baselines {b.shape} differ in shape")
    raw = r - b
    return normalize_global(raw, eps), raw


def no_baseline_advantages(rewards: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Ablation "no baseline": A = r, then the same global normalisation. Returns (A~, A)."""
    raw = np.asarray(rewards, dtype=np.float64)
    return normalize_global(raw, eps), raw


def grpo_advantages(
    rewards: np.ndarray, group_ids: Sequence[Hashable], eps: float = 1e-6
) -> np.ndarray:
    """GRPO: A = (r - mean_g) / (std_g + eps), unbiased std within each group g (spec §5).

    A group of one follows verl's convention: mean 0 and std 1, so A = r / (1 + eps).
    """
    r = np.asarray(rewards, dtype=np.float64)  # [B]
    if r.ndim != 1 or len(group_ids) != r.size:
        raise ValueError(f"need one group id per reward: {len(group_ids)} ids, shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("rewards must be finite")
    adv = np.empty_like(r)
    for idx in _group_indices(group_ids).values():
        g = r[idx]
        if g.size == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = g.mean(), g.std(ddof=1)
        adv[idx] = (g - mean) / (std + eps)
    return adv


@dataclass(frozen=True)
class GroupStats:
    """Degenerate-group accounting for GRPO batches (paper Fig. 3a)."""

    n_groups: int
    n_degenerate: int  # every member got the same reward: zero advantage, no signal
    n_solve_all: int  # all members reward 1
    n_solve_none: int  # all members reward 0
    frac_degenerate: float  # n_degenerate / n_groups
    frac_samples_degenerate: float  # share of trajectories that sit in degenerate groups


def group_stats(rewards: np.ndarray, group_ids: Sequence[Hashable]) -> GroupStats:
    """Count groups whose rewards are all equal (all 0, all 1, or any other constant)."""
    r = np.asarray(rewards, dtype=np.float64)
    if len(group_ids) != r.size:
        raise ValueError(f"need one group id per reward: {len(group_ids)} ids, {r.size} rewards")
    groups = _group_indices(group_ids)
    n_deg = n_all = n_none = n_samples_deg = 0
    for idx in groups.values():
        g = r[idx]
        if np.all(g == g[0]):
            n_deg += 1
            n_samples_deg += g.size
            n_all += int(g[0] == 1.0)
            n_none += int(g[0] == 0.0)
    n_groups = len(groups)
    return GroupStats(
        n_groups=n_groups,
        n_degenerate=n_deg,
        n_solve_all=n_all,
        n_solve_none=n_none,
        frac_degenerate=n_deg / n_groups if n_groups else 0.0,
        frac_samples_degenerate=n_samples_deg / r.size if r.size else 0.0,
    )


def near_zero_fraction(adv: np.ndarray, tol: float) -> float:
    """Share of trajectories with |A| <= tol: samples that carry (almost) no signal (Fig. 3a)."""
    a = np.asarray(adv, dtype=np.float64)
    return float(np.mean(np.abs(a) <= tol)) if a.size else 0.0


def _group_indices(group_ids: Sequence[Hashable]) -> dict[Hashable, np.ndarray]:
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return {g: np.asarray(idx) for g, idx in groups.items()}
