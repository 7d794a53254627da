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


def test_learner_follows_the_learner_and_loss_sections():
    # train and the throughput benchmark both build their learner here, so the
    # precision and checkpointing settings cannot drift between them again
    import torch

    from agent_spo.builders import build_learner, resolve_model_path
    from agent_spo.demo.build import ensure_demo_model

    path = str(ensure_demo_model())
    cfg = load_config(None, ["learner.precision=bfloat16", "learner.gradient_checkpointing=on",
                             "learner.lr=0.002", "learner.mini_batches=4", "loss.eps_high=0.3"])  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    learner = build_learner(resolve_model_path(cfg.model), tok, cfg.learner, cfg.loss)
    assert learner.compute_dtype == torch.bfloat16
    assert learner.gradient_checkpointing is True
    assert learner.opt.param_groups[0]["lr"] == 0.002
    assert learner.mini_batches == 4 and learner.loss_kwargs["eps_high"] == 0.3
    assert next(learner.model.parameters()).dtype == torch.float32  # master weights
    small = build_learner(path, tok, cfg.learner, cfg.loss, mini_batches=1)
    assert small.mini_batches == 1


def test_stream_settings_and_loop_by_algorithm():
    import functools

    from agent_spo.builders import build_loop, build_stream_settings
    from agent_spo.pipeline import train_grpo, train_spo

    cfg = load_config(None, ["learner.batch_size=8", "learner.max_staleness=2",
                             "algo.adv_eps=0.001", "train.total_steps=5"])  # fmt: skip
    s = build_stream_settings(cfg, seed=7, first_step=2)
    assert (s.batch_size, s.max_staleness, s.adv_eps, s.total_steps, s.seed, s.first_step) == (
        8,
        2,
        0.001,
        5,
        7,
        2,
    )
    s = build_stream_settings(cfg, seed=0, batch_size=24, total_steps=2, workers=48)
    assert (s.batch_size, s.total_steps, s.workers) == (24, 2, 48)
    assert build_loop("spo") is train_spo
    grpo = build_loop("grpo", group_size=4)
    assert isinstance(grpo, functools.partial) and grpo.func is train_grpo
    assert grpo.keywords == {"group_size": 4}
    import pytest

    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        build_loop("ppo")


def test_held_out_from_its_own_file_and_long_prompts_capped(tmp_path):
    import json

    import pytest
    from transformers import AutoTokenizer

    from agent_spo.builders import build_datasets, build_renderer, build_toolbox, cap_prompts
    from agent_spo.config import ConfigError
    from agent_spo.demo.build import ensure_demo_model

    rows = [{"id": i, "problem": f"Task {i}: what is " + " + ".join(["1"] * (1 + 40 * (i % 3))),
             "answer": str(1 + 40 * (i % 3))} for i in range(12)]  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    cfg = load_config(None, [f"data.train={train}", f"data.held_out_file={held}",
                             "data.held_out=0"])  # fmt: skip
    tr, ho = build_datasets(cfg.data, 0)
    assert [p.id for p in ho] == ["0", "1"]
    assert len(tr) == 10 and not {p.key for p in tr} & {p.key for p in ho}  # taken out
    with pytest.raises(ConfigError, match="data.held_out_file replaces data.held_out"):
        load_config(None, [f"data.held_out_file={held}"])  # held_out is 0.2 by default

    tok = AutoTokenizer.from_pretrained(ensure_demo_model(log=lambda m: None))
    renderer = build_renderer(tok, cfg.rollout, build_toolbox(cfg.rollout))
    lengths = sorted({len(renderer.prompt_ids(p.problem)) for p in tr})
    assert len(lengths) >= 3  # short, middle and long problems
    cap = lengths[len(lengths) // 2]
    kept, dropped = cap_prompts(tr, renderer, cap)
    assert dropped == sum(1 for p in tr if len(renderer.prompt_ids(p.problem)) > cap)
    assert dropped > 0 and len(kept) == len(tr) - dropped
    assert cap_prompts(tr, renderer, None) == (tr, 0)
