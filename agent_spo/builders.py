"""Builders: config sections in, components out (STYLE rule 6).

Components never see config objects; these functions turn one section into plain
constructor arguments, so every component can also be built in a test without a config.
Heavy imports stay inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent_spo.algo import PrioritizedSampler, ValueTracker
from agent_spo.config import AlgoConfig, RolloutConfig, SandboxConfig, VerifierConfig


def build_tracker(algo: AlgoConfig) -> ValueTracker:
    """The value tracker for `algo.rho`; priors come later from offline values, if any."""
    r = algo.rho
    return ValueTracker(
        rho_mode=r.mode,
        rho_min=r.rho_min,
        rho_max=r.rho_max,
        d_half=r.d_half,
        rho_constant=r.constant,
    )


def build_sampler(
    algo: AlgoConfig, prompt_keys: Sequence[str], tracker: ValueTracker, seed: int
) -> PrioritizedSampler:
    """The prompt sampler over `prompt_keys`, weighted by the tracker's current values.

    GRPO samples uniformly (spec §5) whatever `algo.sampler.mode` says.
    """
    v_hat, n_eff = tracker.values(prompt_keys)
    mode = "uniform" if algo.name == "grpo" else algo.sampler.mode
    return PrioritizedSampler(
        prompt_keys,
        v_hat=v_hat,
        n_eff=n_eff,
        eps=algo.sampler.eps,
        gamma=algo.sampler.gamma,
        mode=mode,
        seed=seed,
    )


def build_sandbox(cfg: SandboxConfig):
    """LocalSandbox, DockerSandbox or RemoteSandbox (not started: `async with` it)."""
    if cfg.backend == "remote":
        from sandboxes.remote import RemoteSandbox

        return RemoteSandbox(cfg.url, default_timeout_s=cfg.timeout_s)
    from sandboxes.local import Limits

    limits = Limits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
    if cfg.backend == "docker":
        from sandboxes.docker import DockerSandbox

        return DockerSandbox(workers=cfg.pool_size, limits=limits)
    from sandboxes.local import LocalSandbox

    return LocalSandbox(workers=cfg.pool_size, limits=limits)


def build_toolbox(rollout: RolloutConfig):
    """The built-in tools, with the model-facing output cap from the rollout section."""
    from tools.toolbox import Toolbox, builtin_tools

    return Toolbox(builtin_tools(), max_output_chars=rollout.tool_output_chars)


def build_verifier(cfg: VerifierConfig):
    """The killable verifier pool (start-up happens on first use)."""
    from agent_spo.verify import VerifierPool

    return VerifierPool(workers=cfg.workers, timeout_s=cfg.timeout_s)
