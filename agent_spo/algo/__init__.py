"""The SPO algorithm core: pure functions and small stateful objects, no I/O, no config."""

from agent_spo.algo.advantages import (
    GroupStats,
    group_stats,
    grpo_advantages,
    near_zero_fraction,
    no_baseline_advantages,
    normalize_global,
    spo_advantages,
)
from agent_spo.algo.loss import PolicyLossStats, ppo_clip_loss
from agent_spo.algo.sampler import PrioritizedSampler, priority_weights
from agent_spo.algo.value_tracker import (
    TrackerUpdate,
    ValueTracker,
    prior_from_scores,
    rho_from_drift,
)

__all__ = [
    "GroupStats",
    "PolicyLossStats",
    "PrioritizedSampler",
    "TrackerUpdate",
    "ValueTracker",
    "group_stats",
    "grpo_advantages",
    "near_zero_fraction",
    "no_baseline_advantages",
    "normalize_global",
    "ppo_clip_loss",
    "prior_from_scores",
    "priority_weights",
    "rho_from_drift",
    "spo_advantages",
]
