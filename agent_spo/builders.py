"""Builders: config sections in, components out (STYLE rule 6).

Components never see config objects; these functions turn one section into plain
constructor arguments, so every component can also be built in a test without a config.
Heavy imports (torch, transformers) stay inside the functions, so `train --dry-run`
and `--help` never load them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_spo.config import (
    AlgoConfig,
    DataConfig,
    LearnerConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RolloutConfig,
    SandboxConfig,
    TrainConfig,
    VerifierConfig,
)

if TYPE_CHECKING:
    from agent_spo.algo import PrioritizedSampler, ValueTracker
    from agent_spo.dist.driver import LearnerGroup
    from agent_spo.learner import Learner
    from agent_spo.pipeline import StreamSettings, TrainLoop


def build_tracker(algo: AlgoConfig) -> ValueTracker:
    """The value tracker for `algo.rho`; priors come later from offline values, if any."""
    from agent_spo.algo import ValueTracker

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
    from agent_spo.algo import PrioritizedSampler

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


def build_learner(
    model_path: str,
    tokenizer,
    learner: LearnerConfig,
    loss: LossConfig,
    *,
    mini_batches: int | None = None,
    probe_tokens: int | None = None,
    threads: int | None = None,
    launch=None,
    host: str = "127.0.0.1",
    rank0_device: int | None = None,
) -> Learner | LearnerGroup:
    """The learner: one process (world size 1), or a :class:`LearnerGroup` of FSDP2 ranks
    started now (learner.world_size > 1, CPU offload, or torchrun), used the same way.
    ``mini_batches`` replaces learner.mini_batches (a benchmark with a smaller batch);
    ``probe_tokens`` is algo.rho.probe_tokens (the drift's probe); ``threads`` is the torch
    thread count the other ranks use (this process keeps its own). ``launch`` starts
    ranks 1..N-1 elsewhere (a cluster's placement; see ``dist.group.start``), and ``host``
    is the address they reach this process's store at; ``rank0_device`` the CUDA device
    this process (rank 0) uses when a cluster reserved one for it."""
    from agent_spo.dist import torchrun_env

    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "learner": learner.model_dump(mode="json"),
        "loss": loss.model_dump(mode="json"),
        "mini_batches": mini_batches,
        "probe_tokens": probe_tokens,
    }
    launched = torchrun_env()
    world = learner.world_size
    if launched is not None:
        if world not in (1, launched[1]):
            raise ValueError(
                f"learner.world_size is {world} but torchrun started {launched[1]} ranks "
                "(set it to the launcher's world size, or leave it at 1)"
            )
        world = launched[1]
    if rank0_device is not None:
        import torch

        torch.cuda.set_device(rank0_device)
    if world == 1 and not learner.cpu_offload and launched is None:
        return learner_rank(rank=0, world_size=1, tokenizer=tokenizer, **kwargs)
    from agent_spo.dist.driver import LearnerGroup, RankSpec

    spec = RankSpec(
        "agent_spo.builders:learner_rank", {**kwargs, "threads": threads}, world_size=world,
        timeout_s=learner.rank_timeout_s, torchrun=launched is not None, host=host,
        rank0_device=rank0_device,
    )  # fmt: skip
    return LearnerGroup.start(spec, launch)


def learner_rank(
    *,
    rank: int,
    world_size: int,
    model_path: str,
    learner: dict,
    loss: dict,
    mini_batches: int | None = None,
    probe_tokens: int | None = None,
    tokenizer=None,
    threads: int | None = None,
) -> Learner:
    """One rank's learner on the best device: float32 master weights (AdamW on bf16
    weights loses small updates; the engine samples in model.dtype), the loss section's
    clip settings, the precision and gradient checkpointing the learner section asks for.
    Every rank calls this with the same arguments (sections as plain dicts)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from agent_spo.learner import Learner

    L, S = LearnerConfig.model_validate(learner), LossConfig.model_validate(loss)
    if rank > 0:  # the trainer (rank 0) speaks for the run
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads is not None:
            torch.set_num_threads(threads)
    if L.cpu_offload and not torch.cuda.is_available():
        raise ValueError("learner.cpu_offload moves shards between CPU and GPU: it needs CUDA")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dtype = AutoConfig.from_pretrained(model_path).dtype  # before the float32 load
    bf16 = L.precision == "bfloat16" or (L.precision == "auto" and device == "cuda")
    # LoRA's frozen base never changes, so one unsharded process under bf16 holds a bf16
    # model in bf16 (no float32 masters); sharded ranks keep float32 shards
    frozen_bf16 = (bool(L.lora.rank) and bf16 and world_size == 1 and not L.cpu_offload
                   and str(model_dtype).removeprefix("torch.") == "bfloat16")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if frozen_bf16 else torch.float32
    )
    if L.lora.rank:  # adapters on the frozen base: only they train, in float32
        from agent_spo import lora

        lora.inject(model, L.lora)
    if not L.cpu_offload:  # offloaded shards stay on the CPU; FSDP moves each layer's
        # transformers declares PreTrainedModel.to with @wraps(nn.Module.to), which types
        # it as the unbound function (self first)
        model = model.to(device)  # type: ignore[arg-type]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checkpointing = L.gradient_checkpointing == "on" or (
        L.gradient_checkpointing == "auto" and device == "cuda"
    )
    return Learner(
        model,
        lr=L.lr,
        betas=L.betas,
        weight_decay=L.weight_decay,
        grad_clip=L.grad_clip,
        mini_batches=L.mini_batches if mini_batches is None else mini_batches,
        micro_batch_tokens=L.micro_batch_tokens,
        eps_low=S.eps_low,
        eps_high=S.eps_high,
        dual_clip_c=S.dual_clip_c,
        pad_token_id=pad or 0,
        logp_old=S.logp_old,
        tis_cap=S.tis_cap,
        entropy_coef=S.entropy_coef,
        log_ratio_clamp=S.log_ratio_clamp,
        compute_dtype=torch.bfloat16 if bf16 else None,
        gradient_checkpointing=checkpointing,
        logprob_chunk=L.logprob_chunk,
        probe_tokens=probe_tokens,
        world_size=world_size,
        rank=rank,
        cpu_offload=L.cpu_offload,
        pack=L.pack == "on" or (L.pack == "auto" and _flash_attention(model)),
        model_dtype=str(model_dtype).removeprefix("torch.") if model_dtype else None,
    )


def _flash_attention(model) -> bool:
    """Whether the model attends with flash attention (packing needs no mask there)."""
    return getattr(model.config, "_attn_implementation", "") in (
        "flash_attention_2", "flash_attention_3",
    )  # fmt: skip


def build_stream_settings(
    cfg: TrainConfig,
    *,
    seed: int,
    first_step: int = 0,
    batch_size: int | None = None,
    total_steps: int | None = None,
    workers: int | None = None,
) -> StreamSettings:
    """The loop's settings from the learner, algo and rollout sections; the keyword
    arguments replace the config's batch size, steps and workers (benchmarks)."""
    from agent_spo.pipeline import StreamSettings

    L = cfg.learner
    return StreamSettings(
        batch_size=L.batch_size if batch_size is None else batch_size,
        batch_tokens=L.batch_tokens,
        total_steps=cfg.train.total_steps if total_steps is None else total_steps,
        workers=cfg.rollout.workers if workers is None else workers,
        max_staleness=L.max_staleness,
        baseline=cfg.algo.baseline,
        seed=seed,
        first_step=first_step,
        adv_eps=cfg.algo.adv_eps,
        grpo_std_eps=cfg.algo.grpo.std_eps,
        max_drop_share=cfg.train.max_drop_share,
        drop_window=cfg.train.drop_window,
        colocate=cfg.rollout.colocate,
    )


def build_loop(name: str, *, group_size: int = 8, exact_drift=None) -> TrainLoop:
    """The training loop for an algorithm: SPO's single stream (with the kl_exact store,
    if given), or GRPO's group barrier with groups of ``group_size``; both are called
    with the same keyword arguments."""
    from agent_spo.pipeline import train_grpo, train_spo

    if name == "spo":
        if exact_drift is not None:
            return functools.partial(train_spo, exact_drift=exact_drift)
        return train_spo
    if name == "grpo":
        return functools.partial(train_grpo, group_size=group_size)
    raise ValueError(f"unknown algorithm {name!r}; choose spo or grpo")


def build_sandbox(cfg: SandboxConfig, rollout: RolloutConfig | None = None):
    """LocalSandbox, DockerSandbox or RemoteSandbox (not started: `async with` it), able
    to run the rollout section's tools: a local or docker pool shows the user's tool
    modules to its workers; a remote server must offer every tool (checked at start).

    The remote server's bearer token comes from the environment variable that
    sandbox.token_env names, so it never lands in a run's config.yaml."""
    toolbox = build_toolbox(rollout) if rollout is not None else None
    if cfg.backend == "remote" and cfg.urls:
        from sandboxes.fleet import SandboxFleet

        return SandboxFleet(
            cfg.urls, token=os.environ.get(cfg.token_env) or None,
            default_timeout_s=cfg.timeout_s, max_in_flight=cfg.max_in_flight,
            max_sessions=cfg.max_sessions, sessions_per_s=cfg.sessions_per_s,
            required_tools=toolbox.offered() if toolbox is not None else None,
        )  # fmt: skip
    if cfg.backend == "remote":
        from sandboxes.remote import RemoteSandbox

        assert cfg.url is not None  # SandboxConfig requires url or urls for remote
        token = os.environ.get(cfg.token_env) or None
        return RemoteSandbox(
            cfg.url, token=token, default_timeout_s=cfg.timeout_s,
            max_in_flight=cfg.max_in_flight,
            required_tools=toolbox.offered() if toolbox is not None else None,
        )  # fmt: skip
    from sandboxes.local import Limits

    limits = Limits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
    sources = tool_sources(rollout) if rollout is not None else []
    if cfg.backend == "docker":
        from sandboxes.docker import DockerSandbox

        return DockerSandbox(workers=cfg.pool_size, limits=limits, tool_sources=sources)
    from sandboxes.local import LocalSandbox

    return LocalSandbox(workers=cfg.pool_size, limits=limits, tool_sources=sources)


# the tools SDK the trainer's generated calls need, and a line of Python
SMOKE_CODE = "from tools.sdk import run_in_sandbox\nprint(6 * 7)"


async def check_sandbox(sandbox) -> None:
    """Refuse to start on a sandbox that cannot run code: a remote server must answer its
    health check with these credentials, and every backend must run one line of Python
    and print the answer. Raises SandboxCheckFailed (a SandboxUnavailable), naming the
    cause."""
    from sandboxes.errors import SandboxCheckFailed, SandboxError

    where = str(getattr(sandbox, "url", None) or getattr(sandbox, "backend", "sandbox"))
    if hasattr(sandbox, "health"):
        try:
            health = await sandbox.health()
        except SandboxError as e:
            raise SandboxCheckFailed(f"sandbox at {where} failed its health check: {e}") from e
        required = getattr(sandbox, "required_tools", None)
        if required is not None and hasattr(sandbox, "member_healths"):  # a fleet
            for url, h, _ in await sandbox.member_healths():
                if h is not None:  # one that does not answer is out of rotation
                    _check_offered_tools(url, required, h.get("tools"))
        elif required is not None:
            _check_offered_tools(where, required, health.get("tools"))
    result = await sandbox.run(SMOKE_CODE, timeout_s=30)
    if result.exc_type == "ImportError":
        raise SandboxCheckFailed(
            f"sandbox at {where} has an older tools package than this trainer "
            f"({result.exc_message}): rebuild the docker image, or upgrade the server"
        )
    if result.status != "ok" or result.stdout.strip() != "42":
        detail = result.exc_message or result.stderr.strip()[-300:] or result.stdout[-300:]
        raise SandboxCheckFailed(
            f"sandbox at {where} could not run {SMOKE_CODE!r}: {result.status}: {detail}"
        )


def _check_offered_tools(where: str, required: list[dict], offered: list[dict] | None) -> None:
    """A sandbox server must offer every tool the episodes call: the same schema, and
    the same module and function behind it (Toolbox.offered on both sides)."""
    import json

    from sandboxes.errors import SandboxCheckFailed

    if offered is None:
        raise SandboxCheckFailed(
            f"the sandbox server at {where} does not list its tools (an agent-spo older "
            "than this trainer?); upgrade it, or serve with: agent-spo sandbox serve"
        )
    theirs = {o["schema"]["function"]["name"]: o for o in offered}
    mine = json.loads(json.dumps(required))  # defaults as JSON gives them back
    missing = [o["schema"]["function"]["name"] for o in mine
               if o["schema"]["function"]["name"] not in theirs]  # fmt: skip
    differ = [o["schema"]["function"]["name"] for o in mine
              if o["schema"]["function"]["name"] in theirs
              and theirs[o["schema"]["function"]["name"]] != o]  # fmt: skip
    if missing or differ:
        problem = f"lacks the tools {missing}" if missing else ""
        if differ:
            problem += (" and " if problem else "") + (
                f"has other versions of {differ} (another schema, or another module)"
            )
        raise SandboxCheckFailed(
            f"the sandbox server at {where} {problem}: this run's tools are "
            f"{[o['schema']['function']['name'] for o in mine]}, the server's "
            f"{sorted(theirs)}; start it with the same references: "
            "agent-spo sandbox serve --tools REF ..."
        )


def build_verifier(cfg: VerifierConfig):
    """The killable verifier pool (start-up happens on first use)."""
    from agent_spo.verify import VerifierPool

    return VerifierPool(workers=cfg.workers, timeout_s=cfg.timeout_s)


def build_toolbox(rollout: RolloutConfig):
    """The tools the rollout section offers (retool: its one code tool), output-capped."""
    from agent_spo.episode.toolbox import Toolbox
    from tools.refs import resolve

    tools = resolve(rollout.tools).tools
    if rollout.tool_format == "retool":
        tools = [t for t in tools if t.kind == "code"] or resolve(["python"]).tools
    return Toolbox(tools, max_output_chars=rollout.tool_output_chars)


def tool_sources(rollout: RolloutConfig) -> list:
    """The user tool modules (ToolSource) a sandbox must expose for the rollout's tools."""
    from tools.refs import resolve

    return resolve(rollout.tools).sources


def build_datasets(data: DataConfig, seed: int):
    """(train, held_out) problem lists: the synthetic set or a .jsonl/.parquet file."""
    from agent_spo.data.problems import load_problems, split
    from agent_spo.data.synthetic import make_tasks, synthetic_families

    families = synthetic_families(data.train)
    if families is not None:
        problems = make_tasks(data.synthetic_tasks, seed=seed, families=families)
    else:
        problems = list(load_problems(data.train, data.max_prompts).problems)
    if data.max_prompts is not None:
        problems = problems[: data.max_prompts]
    if data.held_out_file is not None:
        held = list(load_problems(data.held_out_file).problems)
        keys = {p.key for p in held}
        return [p for p in problems if p.key not in keys], held
    return split(problems, data.held_out)


def cap_prompts(problems, renderer, max_tokens: int | None) -> tuple[list, int]:
    """``problems`` without those whose rendered opening exceeds ``max_tokens``, and how
    many were dropped (data.max_prompt_tokens)."""
    if max_tokens is None:
        return list(problems), 0
    kept = [p for p in problems if len(renderer.prompt_ids(p.problem)) <= max_tokens]
    return kept, len(problems) - len(kept)


def check_model_path(model: ModelConfig, rollout: RolloutConfig | None = None) -> list[str]:
    """What is wrong with model.path, one line naming the key; [] = usable.

    model.path must be a local model directory: nothing here downloads from a model hub
    (a name like ``org/model`` that is not a directory is refused at once). The
    openai_http engine only needs the tokenizer's files from it."""
    if model.path is None:
        return []
    p = Path(model.path).expanduser()
    hint = ""
    if not p.exists() and not model.path.startswith(("/", ".", "~")) and model.path.count("/") == 1:
        hint = (
            "; it looks like a model hub name, and agent-spo never downloads: fetch it first "
            f"(e.g. `huggingface-cli download {model.path} --local-dir DIR`) and set "
            "model.path=DIR"
        )
    if not p.exists():
        return [f"model.path: {model.path} does not exist{hint}"]
    if not p.is_dir():
        return [f"model.path: {model.path} is not a directory (expected a model directory)"]
    tokenizer_only = rollout is not None and rollout.engine == "openai_http"
    missing = [] if tokenizer_only else [f for f in ("config.json",) if not (p / f).is_file()]
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json or tokenizer_config.json")
    if not tokenizer_only and not any(
        next(p.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.index.json")
    ):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        return [
            f"model.path: {model.path} has no {'; no '.join(missing)}; expected a "
            "HuggingFace-format model directory (config.json, weights, tokenizer files)"
        ]
    return []


class ModelPathError(ValueError):
    """model.path is not a usable local model directory; the message names the key."""


def resolve_model_path(model: ModelConfig, log=print, rollout: RolloutConfig | None = None) -> str:
    """The policy's model directory; None means the embedded demo model (built if missing).
    Raises ModelPathError for a path that is not a model directory (see check_model_path)."""
    if model.path is not None:
        if problems := check_model_path(model, rollout):
            raise ModelPathError("; ".join(problems))
        return str(Path(model.path).expanduser())
    if model.demo_tool is not None:  # the tool demo: the demo model, taught the user's tool
        from agent_spo.demo.tool_demo import ensure_tool_demo_model

        offered = rollout.tools if rollout is not None else ["python", model.demo_tool]
        chars = rollout.tool_output_chars if rollout is not None else 256
        return str(ensure_tool_demo_model(model.demo_tool, offered, chars, log=log))
    from agent_spo.demo.build import ensure_demo_model

    return str(ensure_demo_model(log=log))


def build_engine(
    model_path: str,
    model: ModelConfig,
    rollout: RolloutConfig,
    seed: int,
    *,
    sync_dir: str | Path | None = None,
    log=print,
    lora: LoraConfig | None = None,
    adapter_dir: str | Path | None = None,
):
    """The generation engine named by rollout.engine (not started; hf and vllm load now).
    openai_http: a :class:`ReplicaPool` over ``rollout.urls`` (or one ``url``) when there
    are several or when ``sync_dir`` is given (training: the pool takes the weights),
    else the plain HTTP client. ``lora`` (learner.lora when on): the hf engine holds the
    same adapter layers as the learner, the vllm engine serves it through vLLM's LoRA
    support; both take adapter-only updates, and so does a replica pool whose replicas
    hold the adapter's layers. ``adapter_dir``: where the vllm engine writes each
    adapter version (default: a temporary directory)."""
    if rollout.engine == "hf":
        from agent_spo.engines.hf import HFEngine

        return HFEngine.from_pretrained(
            model_path,
            dtype=model.dtype,
            lora=lora if lora is not None and lora.rank else None,
            max_batch=rollout.max_batch,
            max_model_len=rollout.max_model_len,
            seed=seed,
            prefix_cache=rollout.prefix_cache,
        )
    if rollout.engine == "vllm":
        from agent_spo.engines.vllm import DEFAULT_MAX_MODEL_LEN as VLLM_DEFAULT_LEN
        from agent_spo.engines.vllm import VLLMEngine

        return VLLMEngine(
            model_path, dtype=model.dtype, seed=seed, sleep_mode=rollout.colocate,
            max_model_len=rollout.max_model_len or VLLM_DEFAULT_LEN,
            lora=lora if lora is not None and lora.rank else None, adapter_dir=adapter_dir,
        )  # fmt: skip
    api_key = None
    if rollout.api_key_env is not None:
        from agent_spo.engines.base import EngineError

        api_key = os.environ.get(rollout.api_key_env)
        if not api_key:
            raise EngineError(f"rollout.api_key_env names {rollout.api_key_env}, which is not set")
    if rollout.urls or sync_dir is not None:
        from agent_spo.engines.pool import ReplicaPool

        return ReplicaPool(
            rollout.urls or [rollout.url or ""],
            sync_dir=sync_dir,
            api_key=api_key,
            max_model_len=rollout.max_model_len,
            route=rollout.route,
            transport=rollout.weight_sync,
            advertise_host=rollout.trainer_host,
            sync_timeout_s=rollout.sync_timeout_s,
            bucket_bytes=rollout.sync_bucket_mb * 2**20,
            lora=lora if lora is not None and lora.rank else None,
            log=log,
        )
    from agent_spo.engines.openai_http import OpenAIHTTPEngine

    assert rollout.url is not None  # RolloutConfig requires url or urls for openai_http
    return OpenAIHTTPEngine(rollout.url, max_model_len=rollout.max_model_len, api_key=api_key)


def build_renderer(tokenizer, rollout: RolloutConfig, toolbox):
    """Token-exact chat rendering for the rollout section's format and tools."""
    from agent_spo.episode.formats import get_format
    from agent_spo.episode.render import ChatRenderer

    code_tool = next(iter(toolbox.tools.values())) if rollout.tool_format == "retool" else None
    return ChatRenderer(
        tokenizer,
        get_format(rollout.tool_format, code_tool),
        tools=toolbox.schemas(),
        system_prompt=rollout.system_prompt,
        enable_thinking=rollout.enable_thinking,
    )


def build_episode_settings(rollout: RolloutConfig, sandbox: SandboxConfig, reward=None):
    """The runner's settings; ``reward`` (a RewardConfig) adds the reference's reward
    conditions."""
    from agent_spo.episode.rules import RewardRules
    from agent_spo.episode.runner import EpisodeSettings

    rules = RewardRules(**reward.model_dump()) if reward is not None else RewardRules()
    return EpisodeSettings(
        rules=rules,
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
    # a training config's reward rules hold for its rollouts and value estimates too
    settings = build_episode_settings(cfg.rollout, cfg.sandbox, getattr(cfg, "reward", None))
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
        sandbox = await stack.enter_async_context(build_sandbox(cfg.sandbox, cfg.rollout))
        await check_sandbox(sandbox)  # before the model loads: it can take minutes
        model_path = None
        if engine is None:
            model_path = resolve_model_path(cfg.model, log=log, rollout=cfg.rollout)
            engine = build_engine(model_path, cfg.model, cfg.rollout, cfg.run.seed)
        stack.push_async_callback(engine.close)
        if verifier is None:
            verifier = stack.enter_context(build_verifier(cfg.verifier))
        yield await build_runner(cfg, engine, model_path, sandbox, verifier)
