"""Builders: config sections in, components out (STYLE rule 6).

Components never see config objects; these functions turn one section into plain
constructor arguments, so every component can also be built in a test without a config.
Heavy imports stay inside the functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from agent_spo.algo import PrioritizedSampler, ValueTracker
from agent_spo.config import (
    AlgoConfig,
    DataConfig,
    ModelConfig,
    RolloutConfig,
    SandboxConfig,
    VerifierConfig,
)


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


def build_verifier(cfg: VerifierConfig):
    """The killable verifier pool (start-up happens on first use)."""
    from agent_spo.verify import VerifierPool

    return VerifierPool(workers=cfg.workers, timeout_s=cfg.timeout_s)


def build_toolbox(rollout: RolloutConfig):
    """The tools the rollout section offers (retool: python only), output-capped."""
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    names = ["python"] if rollout.tool_format == "retool" else rollout.tools
    chosen = {t.name: t for t in builtin_tools()}
    return Toolbox([chosen[n] for n in names], max_output_chars=rollout.tool_output_chars)


def build_datasets(data: DataConfig, seed: int):
    """(train, held_out) problem lists: the synthetic set or a .jsonl/.parquet file."""
    from agent_spo.data.problems import load_problems, split

    if data.train == "synthetic":
        from agent_spo.data.synthetic import make_tasks

        problems = make_tasks(data.synthetic_tasks, seed=seed)
    else:
        problems = list(load_problems(data.train, data.max_prompts).problems)
    if data.max_prompts is not None:
        problems = problems[: data.max_prompts]
    return split(problems, data.held_out)


def resolve_model_path(model: ModelConfig, log=print) -> str:
    """The policy's model directory; None means the embedded demo model (built if missing)."""
    if model.path is not None:
        return model.path
    from agent_spo.demo.build import ensure_demo_model

    return str(ensure_demo_model(log=log))


def build_engine(model_path: str, model: ModelConfig, rollout: RolloutConfig, seed: int):
    """The generation engine named by rollout.engine (not started; hf and vllm load now)."""
    if rollout.engine == "hf":
        from agent_spo.engines.hf import HFEngine

        return HFEngine.from_pretrained(
            model_path,
            dtype=model.dtype,
            max_batch=rollout.max_batch,
            max_model_len=rollout.max_model_len,
            seed=seed,
            prefix_cache=rollout.prefix_cache,
        )
    if rollout.engine == "vllm":
        from agent_spo.engines.vllm import VLLMEngine

        kwargs = {} if rollout.max_model_len is None else {"max_model_len": rollout.max_model_len}
        return VLLMEngine(model_path, dtype=model.dtype, seed=seed, **kwargs)
    from agent_spo.engines.openai_http import OpenAIHTTPEngine

    return OpenAIHTTPEngine(rollout.url, max_model_len=rollout.max_model_len)


def build_renderer(tokenizer, rollout: RolloutConfig, toolbox):
    """Token-exact chat rendering for the rollout section's format and tools."""
    from agent_spo.episode.formats import get_format
    from agent_spo.episode.render import ChatRenderer

    return ChatRenderer(
        tokenizer,
        get_format(rollout.tool_format),
        tools=toolbox.schemas(),
        system_prompt=rollout.system_prompt,
        enable_thinking=rollout.enable_thinking,
    )


def build_episode_settings(rollout: RolloutConfig, sandbox: SandboxConfig):
    from agent_spo.episode.runner import EpisodeSettings

    return EpisodeSettings(
        max_turns=rollout.max_turns,
        max_response_tokens=rollout.max_response_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        deadline_s=rollout.episode_timeout_s,
        tool_timeout_s=sandbox.timeout_s,
        retries=rollout.retries,
    )


async def build_runner(cfg, engine, model_path: str | None, sandbox, verifier):
    """The episode runner for a started-or-not engine: starts a remote engine, takes the
    tokenizer from the engine (else from model_path), and wires tools, renderer and
    the config's episode settings around the given sandbox and verifier."""
    from agent_spo.episode.runner import EpisodeRunner

    if hasattr(engine, "start"):  # remote engines: reach the server before any episode
        await engine.start()
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    toolbox = build_toolbox(cfg.rollout)
    renderer = build_renderer(tokenizer, cfg.rollout, toolbox)
    settings = build_episode_settings(cfg.rollout, cfg.sandbox)
    return EpisodeRunner(engine, renderer, toolbox, sandbox, verifier, settings)


@contextlib.asynccontextmanager
async def open_episode_runner(
    cfg, *, log: Callable[[str], None] = print, verifier=None, engine=None
) -> AsyncIterator:
    """An episode runner for the config's model, engine, sandbox and verifier, closed
    (engine, sandbox, verifier) on exit; what rollout, estimate-values and eval play with.

    ``verifier`` and ``engine`` replace the built ones (the caller's verifier stays open;
    a given engine is closed on exit like a built one).
    """
    async with contextlib.AsyncExitStack() as stack:
        model_path = None
        if engine is None:
            model_path = resolve_model_path(cfg.model, log=log)
            engine = build_engine(model_path, cfg.model, cfg.rollout, cfg.run.seed)
        stack.push_async_callback(engine.close)
        if verifier is None:
            verifier = stack.enter_context(build_verifier(cfg.verifier))
        sandbox = await stack.enter_async_context(build_sandbox(cfg.sandbox))
        yield await build_runner(cfg, engine, model_path, sandbox, verifier)
