"""Builders map each config section onto its component's constructor arguments."""

import asyncio

from agent_spo.builders import (
    build_sampler,
    build_sandbox,
    build_toolbox,
    build_tracker,
    build_verifier,
)
from agent_spo.config import load_config
from sandboxes.docker import DockerSandbox
from sandboxes.local import LocalSandbox
from sandboxes.remote import RemoteSandbox


def test_tracker_and_sampler_follow_the_algo_section():
    cfg = load_config(
        None,
        [
            "algo.rho.mode=constant",
            "algo.rho.constant=0.9",
            "algo.sampler.eps=0.1",
            "algo.sampler.gamma=0.5",
        ],
    )
    tracker = build_tracker(cfg.algo)
    assert tracker.rho_mode == "constant" and tracker.observe("a", 1.0).rho == 0.9
    sampler = build_sampler(cfg.algo, ["a", "b"], tracker, seed=3)
    assert (sampler.eps, sampler.gamma, sampler.mode) == (0.1, 0.5, "prioritized")
    # "a" was observed: its weight comes from the tracker's (v_hat, n_eff), not the prior's
    from agent_spo.algo import priority_weights

    v, n = tracker.values(["a", "b"])
    assert v[0] != 0.5 and n[0] != 1.0
    assert list(sampler.weights()) == list(priority_weights(v, n, eps=0.1, gamma=0.5))


def test_grpo_samples_uniformly():
    cfg = load_config(None, ["algo.name=grpo"])
    sampler = build_sampler(cfg.algo, ["a", "b", "c"], build_tracker(cfg.algo), seed=0)
    assert sampler.mode == "uniform"


def test_sandbox_backends():
    local = build_sandbox(
        load_config(
            None, ["sandbox.pool_size=3", "sandbox.timeout_s=2.5", "sandbox.memory_mb=512"]
        ).sandbox
    )
    assert isinstance(local, LocalSandbox) and local._n == 3
    assert local.limits.timeout_s == 2.5 and local.limits.memory_mb == 512
    remote = build_sandbox(
        load_config(None, ["sandbox.backend=remote", "sandbox.url=http://127.0.0.1:9"]).sandbox
    )
    assert isinstance(remote, RemoteSandbox) and remote.url == "http://127.0.0.1:9"
    docker = build_sandbox(load_config(None, ["sandbox.backend=docker"]).sandbox)
    assert isinstance(docker, DockerSandbox)


def test_local_sandbox_from_config_runs_code():
    sb = build_sandbox(load_config(None, ["sandbox.pool_size=1"]).sandbox)

    async def go():
        async with sb:
            return await sb.run("6 * 7")

    assert asyncio.run(go()).stdout == "42\n"


def test_toolbox_and_verifier():
    cfg = load_config(None, ["rollout.tool_output_chars=64", "verifier.workers=1"])
    assert build_toolbox(cfg.rollout).max_output_chars == 64
    with build_verifier(cfg.verifier) as pool:
        assert pool.check("7", "\\boxed{7}").correct
