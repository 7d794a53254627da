"""The run configuration schema: pydantic models mirroring the YAML one to one.

Every field is documented (meaning, unit, range, source); defaults live only here. The
defaults are the embedded CPU demo: the spec's value wherever the spec gives one, and a
small CPU value where the paper's is GPU-scale (the paper's value is in the docstring and
in `configs/qwen3_8b_spo.yaml`).

Validation rejects what no command can honour, naming the key. What only training
cannot honour (an engine that cannot take new weights, a tracker mode only the bandit
benchmark implements) stays valid here, for `rollout`, `eval` and `bench bandit`, and is
listed by `check_trainable`. Reading YAML and overrides lives in `loader.py`. Config
never enters a component: builders turn sections into constructor arguments.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AlgoConfig",
    "ClusterConfig",
    "DataConfig",
    "GrpoConfig",
    "InitConfig",
    "LearnerConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "RhoConfig",
    "RolloutConfig",
    "RunConfig",
    "SamplerConfig",
    "SandboxConfig",
    "Section",
    "TrainConfig",
    "TrainLoopConfig",
    "VerifierConfig",
    "check_trainable",
]


class Section(BaseModel):
    """Base of every config section: unknown keys rejected, assignment validated, and
    each field's docstring kept as its description."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


class RunConfig(Section):
    name: str = "demo"
    """Run name; the run directory is `<output_dir>/<name>`. Free text."""

    output_dir: str = "runs"
    """Directory that holds run directories (checkpoints, metrics, episode logs, resolved
    config). Relative paths are taken from the working directory."""

    seed: int = 0
    """Seed for every RNG the run owns (sampler, engine sampling, model init). Any integer."""


class ModelConfig(Section):
    path: str | None = None
    """Policy model: a HuggingFace-format directory (config, weights, tokenizer).
    None = the project's built-in tiny demo model (made by `agent-spo demo-model`).
    Paper: Qwen3-8B (spec §7)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Learner weight dtype. float32 for the CPU demo; bfloat16 on GPUs."""

    demo_tool: str | None = None
    """The tool demo (docs/tools.md): with path null, warm-start the demo model to call
    this tool of yours (a reference, e.g. digits.py) on the base_digits tasks, whose
    calls pass it n and base as `agent-spo tools new`'s template takes them. It must be
    among rollout.tools. None = the plain demo model."""

    @field_validator("demo_tool")
    @classmethod
    def _demo_tool(cls, ref: str | None) -> str | None:
        if ref is None:
            return None
        from agent_spo.demo.tool_demo import check_demo_tool
        from tools.refs import absolute

        check_demo_tool(ref)
        return absolute(ref)


class DataConfig(Section):
    train: str = "synthetic"
    """Training prompts: a .jsonl/.parquet path with fields id/problem/answer, or a
    built-in set name ('synthetic' = the embedded tool-use task set; 'synthetic:F1,F2'
    = only those families: product, modpow, primes, digit_sum, two_step, and
    base_digits, the tool demo's tasks)."""

    @field_validator("train")
    @classmethod
    def _known_families(cls, train: str) -> str:
        from agent_spo.data.synthetic import synthetic_families

        synthetic_families(train)  # raises naming the unknown family
        return train

    max_prompts: int | None = Field(None, ge=1)
    """Use at most this many prompts (first N rows). >= 1; None = all."""

    synthetic_tasks: int = Field(1000, ge=2)
    """How many tasks the built-in 'synthetic' set has (seeded by run.seed). >= 2."""

    held_out: float = Field(0.2, ge=0, lt=1)
    """Share of prompts kept out of training for evaluation, split by content key
    (stable under reordering). In [0, 1). Must be 0 when held_out_file is set."""

    held_out_file: str | None = None
    """Held-out prompts from their own .jsonl/.parquet file instead of a share of the
    training set; a prompt in both is taken out of training."""

    max_prompt_tokens: int | None = Field(None, ge=16)
    """Prompts whose rendered opening (system prompt, tool schema, problem) is longer than
    this are dropped when the run starts, and counted. >= 16; None = no cap.
    Paper: 2048."""

    @model_validator(mode="after")
    def _one_held_out(self) -> DataConfig:
        if self.held_out_file is not None and self.held_out > 0:
            raise ValueError("held_out_file replaces held_out: set held_out to 0")
        return self


class RhoConfig(Section):
    mode: Literal["kl_version", "kl_exact", "constant"] = "kl_version"
    """How the tracker's discount rho(x) is set. kl_version: D(x) = sum of per-step
    policy drift since x's last visit (streaming default); kl_exact: mean |logp_then −
    logp_now| over x's previous trajectory, measured by the learner after each step (the
    reference recipe; two more no-grad passes per step, and each prompt's last trained
    trajectory kept in memory); constant: rho = `constant` (ablation). Source: spec §1."""

    rho_min: float = Field(0.875, gt=0, le=1)
    """Lower clip of rho = 2^(−D/d_half); sets the prior strength N0 = 1/(1 − rho_min).
    In (0, 1], <= rho_max. Source: spec §1 (paper default 0.875)."""

    rho_max: float = Field(0.96, gt=0, le=1)
    """Upper clip of rho; the discount when the policy has not moved (first visit under
    kl_exact). In (0, 1], >= rho_min. Source: spec §1 (paper default 0.96)."""

    d_half: float = Field(0.06, gt=0)
    """Drift D (mean |Δ log-prob| per token, nats) at which rho halves. > 0.
    Source: spec §1 (paper default 0.06)."""

    constant: float = Field(0.875, gt=0, le=1)
    """rho used when mode = constant; equilibrium window 1/(1 − rho) (8 at 0.875).
    In (0, 1]. Source: spec §1."""

    probe_tokens: int | None = Field(None, ge=1)
    """Measure the per-step drift d_s on a probe of the batch: whole trajectories, drawn
    in a seeded order, until they hold this many trainable tokens, scored before and
    after the update. Saves two no-grad passes over the rest of the batch (logp_old =
    behaviour). >= 1; None = the whole batch."""

    @model_validator(mode="after")
    def _min_le_max(self) -> RhoConfig:
        if self.rho_min > self.rho_max:
            raise ValueError(f"rho_min ({self.rho_min}) must be <= rho_max ({self.rho_max})")
        return self


class InitConfig(Section):
    mode: Literal["paper", "smoothed", "none"] = "paper"
    """Tracker initialisation from n0 offline samples with s successes. paper: v0 = s/n0;
    smoothed: v0 = (s + 0.5)/(n0 + 1) (reference); none: alpha = beta = 0.5 (ablation
    "no offline init"). Prior strength N0 = 1/(1 − rho_min). Source: spec §1."""

    values_path: str | None = None
    """File of per-prompt success counts written by `agent-spo estimate-values`.
    None with mode paper/smoothed: v0 is estimated before training starts."""

    n0: int = Field(4, ge=1)
    """Samples of the initial policy per prompt for the offline estimate. >= 1.
    Demo: 4 (800 prompts x 4 episodes, ~3 min on 2 cores). Source: spec §1 (paper 8)."""


class SamplerConfig(Section):
    mode: Literal["prioritized", "uniform"] = "prioritized"
    """Prompt sampling. prioritized: probability ∝ sqrt(v_hat·(1 − v_hat)) + eps, divided
    by n_eff^gamma; uniform: GRPO's. Source: spec §4."""

    eps: float = Field(0.05, ge=0)
    """Floor added to every prompt's weight so solved/hopeless prompts are still visited.
    >= 0. Source: spec §4 (paper 0.05)."""

    gamma: float = Field(0.0, ge=0, le=1)
    """Exponent of the n_eff(x)^gamma divisor (ICLR version). In [0, 1]; 0 = paper v2.
    Source: spec §4."""


class GrpoConfig(Section):
    group_size: int = Field(8, ge=2)
    """G, responses per prompt when algo.name = grpo. >= 2. Source: spec §5 (paper 8)."""

    std_eps: float = Field(1e-6, gt=0)
    """Added to the group's unbiased std in A = (r − mean)/(std + std_eps). > 0.
    Source: spec §5."""


class AlgoConfig(Section):
    name: Literal["spo", "grpo"] = "spo"
    """spo: single stream, tracker baseline, no groups. grpo: G samples per prompt behind
    a group barrier, for matched comparisons (spec §5)."""

    baseline: bool = True
    """SPO: A = r − v_hat_prev(x). False = the paper's "no baseline" ablation A = r
    (then the same batch normalisation). Source: spec §2."""

    adv_eps: float = Field(1e-8, gt=0)
    """Added to std_B(A) in the global batch normalisation. > 0. Source: spec §2."""

    rho: RhoConfig = RhoConfig()
    """Value-tracker discount (spec §1)."""

    init: InitConfig = InitConfig()
    """Value-tracker initialisation (spec §1)."""

    sampler: SamplerConfig = SamplerConfig()
    """Prompt sampling (spec §4)."""

    grpo: GrpoConfig = GrpoConfig()
    """GRPO settings, used only when name = grpo (spec §5)."""


class LossConfig(Section):
    eps_low: float = Field(0.2, ge=0, lt=1)
    """PPO clip below: ratio clipped at 1 − eps_low. In [0, 1). Source: spec §3 (0.2)."""

    eps_high: float = Field(0.28, ge=0)
    """PPO clip above ("clip-higher"): ratio clipped at 1 + eps_high. >= 0.
    Source: spec §3 (0.28)."""

    dual_clip_c: float | None = Field(10.0, gt=1)
    """Dual-clip bound for negative advantages: loss capped at −Ã·c. > 1; None disables.
    Source: spec §3 (reference, not in the paper; default on)."""

    log_ratio_clamp: float = Field(20.0, gt=0)
    """logp_new − logp_old is clamped to ±this before exp. > 0. Source: spec §3 (20)."""

    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus: the loss subtracts entropy_coef × the policy's mean
    entropy over the vocabulary at the trainable tokens (computed in the learner's
    chunked log-prob pass). >= 0; 0 = off, the spec §3 default (the paper has none)."""

    logp_old: Literal["behaviour", "recompute", "decoupled"] = "behaviour"
    """Source of logp_old in the ratio. behaviour: the engine's sampling log-probs
    (streaming default: the ratio itself corrects staleness, but the clip is centred on
    the policy that sampled, up to max_staleness versions old); recompute: a learner
    forward pass before the update (the paper's regime, with fresh batches); decoupled:
    the recomputed log-probs centre the clip and each token's loss is weighted by
    pi_recomputed / pi_behaviour, truncated at tis_cap if set (the decoupled, proximal
    PPO objective: for streaming with max_staleness > 0). Source: spec §3."""

    tis_cap: float | None = Field(None, gt=0)
    """decoupled only: truncate each token's importance weight pi_recomputed / pi_behaviour
    at this value (truncated importance sampling; 2.0 is a common choice). null: no
    truncation. Not in the paper."""

    @model_validator(mode="after")
    def _tis_needs_decoupled(self) -> LossConfig:
        if self.tis_cap is not None and self.logp_old != "decoupled":
            raise ValueError(
                f"tis_cap = {self.tis_cap:g} weights the loss by pi_recomputed / "
                f"pi_behaviour, which needs logp_old = decoupled (got {self.logp_old})"
            )
        return self


class LoraConfig(Section):
    rank: int = Field(0, ge=0, le=512)
    """LoRA rank r: train low-rank adapters (peft) on the targeted linear layers instead
    of every weight; the optimizer holds only the adapters. 0 = off (full fine-tuning).
    0..512 (vLLM's largest). Typical: 16-64 for 1.7B-8B models. Demo: 32."""

    alpha: int | None = Field(None, ge=1)
    """LoRA alpha: the adapters' output is scaled by alpha / rank. null = 2 x rank."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training, in [0, 1). Log-probs for the PPO
    ratio's old side and the drift are computed without it, so with dropout the ratio is
    not 1 even on-policy (more clipping). 0 (default) is recommended for RL."""

    target_modules: str | list[str] = "all-linear"
    """The layers that get adapters: "all-linear" (every linear layer but the LM head),
    or module names (e.g. [q_proj, k_proj, v_proj, o_proj]). Linear layers only."""

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, target: str | list[str]) -> str | list[str]:
        if not target or (not isinstance(target, str) and not all(target)):
            raise ValueError("name at least one module (or all-linear)")
        return target


class LearnerConfig(Section):
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate, constant. > 0. Demo (1.2M parameters): 3e-4. Paper: 1e-6 for
    Qwen3-8B (spec §3)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1). Source: spec §3."""

    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay. >= 0. Source: spec §3 (0.01)."""

    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip. > 0. Source: spec §3 (1.0)."""

    batch_size: int = Field(32, ge=1)
    """Trajectories per training batch: the learner takes the first batch_size finished
    ones. >= 1. Paper: 2048 (SPO 2048 prompts × 1; GRPO 256 × 8). Demo: 32."""

    batch_tokens: int | None = Field(None, ge=1)
    """Also close a batch once its trajectories hold this many trainable (model-sampled)
    tokens, so a batch of long episodes does not make a long learner step: a batch is
    then the first finished trajectories up to batch_size of them or batch_tokens tokens,
    whichever comes first, and at least one (GRPO: whole groups, at least one). >= 1;
    null (default) = by count only. The workers still sample ahead by batch_size
    trajectories per step, so with max_staleness 0 what a short batch leaves over goes
    stale and is dropped (counted). The paper batches by count."""

    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per batch (one pass, batch split evenly). 1..batch_size.
    Paper: 8. Demo: 1."""

    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Learner compute precision. Weights and optimizer state stay float32; bfloat16
    runs the forward/backward under autocast. auto: bfloat16 on CUDA, float32 on CPU."""

    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Recompute activations in the backward pass (memory for time; turns the shared-
    prefix pass off). auto: on with CUDA, off on CPU."""

    micro_batch_tokens: int = Field(4096, ge=1)
    """Tokens per forward/backward pass; gradients accumulate across micro-batches with
    the step's token count as normaliser. >= 1. Memory knob only."""

    logprob_chunk: int | None = Field(1024, ge=1)
    """Response positions whose logits exist at once: the LM head and log-softmax run
    over the positions that score response tokens only, this many at a time, so the
    positions x vocabulary logits are never held. >= 1; None = the model's full logits.
    Memory knob only (equal log-probs)."""

    max_staleness: int = Field(4, ge=0)
    """Most policy versions a generated segment may lag the learner; older trajectories
    are dropped and counted. >= 0 (0 = strictly on-policy)."""

    pack: Literal["auto", "on", "off"] = "auto"
    """Put a micro-batch's trajectories end to end in one row (position ids restarting
    at each) instead of padding them to the longest: no compute on padding
    (perf/pad_frac reports the padding share either way). auto: on when the model runs
    flash attention, which reads the boundaries from the position ids; on: always (other
    attention gets a block-diagonal mask of micro_batch_tokens² booleans per pass); off:
    pad. Equal log-probs and updates either way."""

    world_size: int = Field(1, ge=1)
    """Learner ranks (FSDP2: weights, gradients and AdamW state sharded over them; each
    rank computes a token-balanced share of every mini-batch, the update equals one
    process's). 1 = one process, no sharding. N > 1: `train` starts ranks 1..N-1 itself
    on this machine (one per GPU with CUDA, gloo processes on CPU); under torchrun the
    launcher's WORLD_SIZE is used and must equal this or be left at 1. >= 1."""

    rank_timeout_s: float = Field(600.0, gt=0)
    """Seconds a learner rank may take to answer inside a step (a collective) before the
    run fails naming it; a rank that dies fails the run at once. > 0."""

    gpu_memory_gb: float | None = Field(None, gt=0)
    """Memory of one learner GPU, in GB (GiB). `train --dry-run` prints the learner's
    memory plan per rank (weights, gradients, AdamW state, gathered layers, activations,
    log-prob chunk) and refuses a config whose plan exceeds this. null = print, no check."""

    cpu_offload: bool = False
    """Keep the sharded weights, gradients and AdamW state in CPU memory and move each
    layer to the GPU for its pass (FSDP2 CPU offload): slower, for models whose state
    does not fit the GPUs. Shards even at world_size 1."""

    lora: LoraConfig = LoraConfig()
    """Low-rank adapters instead of full fine-tuning (off unless lora.rank > 0). Engines
    that can hold the adapter (the hf engine, vLLM) receive only the adapter's weights
    each step; others get the merged weights. Checkpoints hold the adapter and its
    optimizer state; `agent-spo export` writes the adapter (peft format) or, with
    --merge, the merged model."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if self.mini_batches > self.batch_size:
            raise ValueError(
                f"mini_batches ({self.mini_batches}) must be <= batch_size ({self.batch_size})"
            )
        return self


class RolloutConfig(Section):
    engine: Literal["hf", "vllm", "openai_http"] = "hf"
    """Generation engine. hf: transformers with request batching (light default);
    vllm: in-process vLLM; openai_http: engine servers over HTTP (`url`: one server;
    `urls`: a pool of replicas). `train` syncs the learner's weights to them through
    `sync_dir`, which needs replicas started with `agent-spo engine serve`."""

    workers: int = Field(32, ge=1)
    """Episodes in flight at once (async workers). >= 1. Demo: 32."""

    temperature: float = Field(1.0, ge=0)
    """Sampling temperature. >= 0. Source: paper trains at 1.0 (evaluation uses 0.6)."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass. In (0, 1]; 1 = off."""

    top_k: int = Field(-1, ge=-1)
    """Top-k sampling. -1 = off, else >= 1."""

    max_turns: int = Field(8, ge=1)
    """Most model turns per episode, each of which may make one tool call; a call in the
    last allowed turn is not run and the episode scores 0 (no answer). 1 = single-turn.
    >= 1. Source: spec §6 (8)."""

    max_response_tokens: int = Field(512, ge=1)
    """Budget of tokens the model generates over a whole episode (tool output excluded).
    >= 1. Paper: 16384; reference script 8192; demo: 512."""

    tool_format: Literal["retool", "hermes"] = "hermes"
    """Tool-call syntax. retool: <code>```python …```</code> with <interpreter> output
    (reference); hermes: JSON <tool_call> with chat-template tool messages (Qwen3
    native, needed for several tools). Source: spec §6."""

    tool_output_chars: int = Field(256, ge=1)
    """Tool output shown to the model is truncated to this many characters (head +
    tail). >= 1. Source: spec §6 (reference 256)."""

    tools: list[str] = ["python"]
    """Tools offered to the model: built-in names (python, simplify, factor, expand,
    solve, integrate, evaluate) and your own tools: a file (my_tools.py: its every
    @tool; my_tools.py:lookup: one) or a module (mypkg.tools, mypkg.tools:lookup). See
    docs/tools.md. The retool format offers one code tool: the code-kind tool listed
    (python when none is)."""

    system_prompt: str | None = None
    """System message. None = the tool format's default instructions."""

    enable_thinking: bool | None = False
    """Passed to the chat template (Qwen3: False = no <think> block). None = not passed."""

    episode_timeout_s: float | None = Field(None, gt=0)
    """Wall clock per episode, seconds. An episode past it stops (stop reason 'deadline')
    and is logged but not scored (reward None): the clock also counts engine and sandbox
    queueing, which are not the model's doing. > 0; None = no limit (default)."""

    retries: int = Field(2, ge=0)
    """Fresh attempts after an infrastructure failure (sandbox or engine) before the
    episode is dropped and counted. >= 0."""

    max_model_len: int | None = Field(None, ge=16)
    """Context limit (prompt + response) in tokens. None = the model's own limit."""

    max_batch: int = Field(64, ge=1)
    """hf engine: most sequences decoded together. >= 1."""

    prefix_cache: bool = True
    """hf engine: compute the keys/values of the opening all prompts share (system
    prompt, tool schema) once per weight version instead of once per prompt. Off by
    itself for models with other than full-attention layers."""

    url: str | None = None
    """openai_http engine: the server's base URL (e.g. http://127.0.0.1:8000/v1).
    openai_http needs url or urls."""

    urls: list[str] = []
    """openai_http engine: several replicas behind one pool, which routes each episode to
    one of them and takes out (and later re-admits) a replica that fails."""

    colocate: bool = False
    """Learner and engine share the GPUs: the engine sleeps while the learner steps
    (its KV cache freed and its weights moved off the GPU; requests in flight kept) and
    wakes before the new weights are pushed. Generation and learning then take turns
    instead of overlapping. The memory plan counts the engine's weights beside the
    learner's state (`train --dry-run`)."""

    api_key_env: str | None = None
    """openai_http: the environment variable holding the key the server(s) require
    (`Authorization: Bearer`; `agent-spo engine serve --api-key`). None = no key."""

    route: Literal["requests", "tokens"] = "requests"
    """Replica pool: a new episode goes to the replica with the fewest requests in flight,
    or the fewest tokens still to generate."""

    sync_dir: str | None = None
    """openai_http in `train`: the folder each weight version is written to for the
    replicas to load (the disk path). Every replica must read it at the same path.
    None = RUN/weights."""

    weight_sync: Literal["disk", "gloo"] = "disk"
    """openai_http in `train`: how the learner's weights reach the replicas. disk: written
    once to `sync_dir`, loaded by each; gloo: streamed to each replica over its own
    two-process gloo group (no shared file system needed; a replica that restarts
    rejoins at the next sync)."""

    trainer_host: str = "127.0.0.1"
    """weight_sync = gloo: the address the replicas reach the trainer at."""

    sync_timeout_s: float = Field(300.0, gt=0)
    """Replica pool: seconds each replica has to pause, load a version and resume; one
    that takes longer leaves the rotation until it answers again. > 0."""

    sync_bucket_mb: int = Field(512, ge=1)
    """Replica pool: weights are written in files of at most this many MiB (one in
    memory at a time). >= 1."""

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, tools: list[str]) -> list[str]:
        from tools.refs import absolute, resolve

        if not tools:
            raise ValueError("empty: name at least one tool")
        if len(set(tools)) != len(tools):
            raise ValueError("a tool is listed twice")
        resolve(tools)  # imports each reference; a ToolReferenceError names it
        return [absolute(t) for t in tools]

    @model_validator(mode="after")
    def _one_code_tool_for_retool(self) -> RolloutConfig:
        if self.tool_format == "retool" and len(code_tools(self.tools)) > 1:
            raise ValueError(
                "tool_format retool: a <code> block calls one code tool, and tools names "
                f"{len(code_tools(self.tools))}: {', '.join(t.name for t in code_tools(self.tools))}"
            )
        return self

    @model_validator(mode="after")
    def _url_for_http(self) -> RolloutConfig:
        if self.engine == "openai_http" and not self.url and not self.urls:
            raise ValueError("url or urls is required when engine is 'openai_http'")
        if self.url and self.urls:
            raise ValueError("give url (one server) or urls (a pool), not both")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"a replica is listed twice in urls {self.urls}")
        return self

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, top_k: int) -> int:
        if top_k == 0:
            raise ValueError("0 is not allowed; use -1 (off) or a value >= 1")
        return top_k


class SandboxConfig(Section):
    backend: Literal["local", "docker", "remote"] = "local"
    """Where tool code runs. local: isolated processes on this host (default);
    docker: containers via the docker SDK; remote: an `agent-spo sandbox serve` server."""

    pool_size: int = Field(4, ge=1)
    """Warm, pre-imported runners kept ready. >= 1."""

    timeout_s: float = Field(10.0, gt=0)
    """Wall-clock limit per tool call, seconds. > 0."""

    memory_mb: int = Field(1024, ge=16)
    """Memory limit per sandbox session, MiB. >= 16."""

    url: str | None = None
    """Base URL of the sandbox server; backend = remote needs url or urls."""

    urls: list[str] = []
    """backend = remote: several `agent-spo sandbox serve` servers used as one fleet
    (stateless calls to the least-loaded live server, each session sticky to one server,
    a dead server's sessions dropped and counted; see docs/sandboxes-and-tools.md)."""

    max_in_flight: int = Field(256, ge=1)
    """backend = remote: tool calls in flight at once, over all servers. >= 1."""

    max_sessions: int | None = Field(None, ge=1)
    """backend = remote with urls: sessions (episodes) open at once over the fleet; more
    wait. >= 1; None = no cap."""

    sessions_per_s: float | None = Field(None, gt=0)
    """backend = remote with urls: new sessions per second over the fleet (bursts of one
    second's worth); None = no limit."""

    token_env: str = "AGENT_SPO_SANDBOX_TOKEN"
    """Environment variable holding the remote server's bearer token (the one `agent-spo
    sandbox serve --token` requires), so the secret never lands in config.yaml. Unset or
    empty = no token."""

    @model_validator(mode="after")
    def _check(self) -> SandboxConfig:
        if self.backend == "remote" and not self.url and not self.urls:
            raise ValueError("url or urls is required when backend is 'remote'")
        if self.url and self.urls:
            raise ValueError("give url (one server) or urls (a fleet), not both")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"a sandbox server is listed twice in urls {self.urls}")
        return self


class RewardConfig(Section):
    one_think_close: bool = False
    """Reward 0 unless the model's turns close their thinking (`</think>`) exactly once,
    whatever the answer. Source: the reference reward (spec §6); on in the paper configs,
    which run Qwen3 in thinking mode."""

    no_tool_call_after_think: bool = False
    """Reward 0 for a response that calls a tool after `</think>`. Source: the reference
    reward (spec §6); on in the paper configs."""


class VerifierConfig(Section):
    timeout_s: float = Field(5.0, gt=0)
    """Wall-clock limit per verification (sympy can hang), seconds. > 0."""

    workers: int = Field(2, ge=1)
    """Killable verifier worker processes. >= 1."""


class TrainLoopConfig(Section):
    total_steps: int = Field(60, ge=1)
    """Training batches to run (each = mini_batches optimizer steps). >= 1. Demo: 60."""

    checkpoint_every: int = Field(10, ge=1)
    """Save a checkpoint (policy, optimizer, tracker, sampler RNG) every this many
    steps, and at the end. >= 1."""

    max_drop_share: float = Field(0.2, gt=0, le=1)
    """Stop with the cause when more than this share of the last drop_window episodes was
    dropped by the infrastructure (sandbox, engine); what was checkpointed is kept. In
    (0, 1]; 1 = only the N-in-a-row stop."""

    drop_window: int = Field(200, ge=1)
    """Episodes the max_drop_share rule looks back over (it applies once that many have
    finished). >= 1."""

    log_every: int = Field(1, ge=1)
    """Write metrics every this many steps. >= 1."""

    eval_every: int = Field(20, ge=0)
    """Score the held-out prompts (one episode each, fixed seeds) before training, every
    this many steps and at the end; the curve goes to metrics.jsonl as eval/*. 0 = never
    (no held-out evaluation at all)."""

    eval_temperature: float = Field(0.6, ge=0)
    """Sampling temperature of the held-out evaluation. >= 0. Source: the paper's
    evaluation protocol (spec §7); training samples at rollout.temperature."""

    eval_top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus mass of the held-out evaluation. In (0, 1]. Source: spec §7."""

    eval_top_k: int = Field(20, ge=-1)
    """Top-k of the held-out evaluation; -1 = off. Source: spec §7."""

    @field_validator("eval_top_k")
    @classmethod
    def _eval_top_k_not_zero(cls, top_k: int) -> int:
        if top_k == 0:
            raise ValueError("0 is not allowed; use -1 (off) or a value >= 1")
        return top_k

    torch_threads: int | None = Field(None, ge=1)
    """Threads one torch op may use (torch.set_num_threads) during training. null = auto:
    with the in-process hf engine and no GPU, half the CPU cores, so the engine's decode
    thread and the learner's thread each run on their own half instead of both spreading
    over all cores and contending; otherwise torch's default. On the 2-core development
    machines auto (1) made a demo step 2.0 s instead of 2.4 s and cut the learner's idle
    share from 17% to 2-7%."""

    tensorboard: bool = False
    """Also write the metrics as TensorBoard events under RUN_DIR/tensorboard (needs the
    `tensorboard` package: pip install 'agent-spo[tensorboard]')."""

    wandb: bool = False
    """Also log the metrics to Weights & Biases (needs the `wandb` package: pip install
    'agent-spo[wandb]'). The run's files go under RUN_DIR/wandb; WANDB_MODE=offline keeps
    them local (`wandb sync` uploads them later)."""

    wandb_project: str = "agent-spo"
    """The Weights & Biases project of train.wandb."""

    plot: bool = True
    """Write RUN_DIR/curves.png at the end (also: `agent-spo plot RUN_DIR`)."""


class ClusterConfig(Section):
    backend: Literal["local", "ray", "urls"] = "local"
    """Where the run's processes live. local: this machine, as the other sections say
    (nothing else to start); ray: `train` places learner ranks, engine replicas and sandbox
    servers on a Ray cluster by placement groups, waits for them, and stops them all on
    exit (see docs/cluster.md); urls: engines (rollout.urls) and sandboxes (sandbox.urls)
    were started by you (SLURM, Kubernetes), learner ranks by torchrun."""

    address: str | None = None
    """ray: the cluster to join ("auto", "HOST:6379"); null = start a Ray cluster on this
    machine for the run and stop it at the end."""

    num_cpus: int | None = Field(None, ge=1)
    """ray, a cluster started for the run: logical CPUs it declares; null = this machine's
    cores. Ray counts them to place bundles; it does not pin processes to cores."""

    num_gpus: int | None = Field(None, ge=0)
    """ray, a cluster started for the run: logical GPUs it declares; null = the GPUs Ray
    detects. Logical GPUs let the GPU placement run on a CPU machine (the demo, the tests)."""

    learner_cpus: float = Field(1.0, gt=0)
    """ray: CPUs reserved for each learner rank (learner.world_size ranks). > 0."""

    learner_gpus: int = Field(0, ge=0)
    """ray: GPUs for each learner rank (0 on CPU, 1 for FSDP2 on GPUs). >= 0. Rank 0 is
    the trainer itself: its bundle is placed on the node `agent-spo train` runs on."""

    engine_replicas: int = Field(2, ge=1)
    """ray: `agent-spo engine serve` replicas to start. >= 1."""

    engine_backend: Literal["hf", "vllm"] = "hf"
    """ray: the replicas' engine (`engine serve --backend`)."""

    engine_gpus: int = Field(0, ge=0)
    """ray: GPUs per replica; with engine_backend vllm above 1 it is vLLM's tensor-parallel
    size. >= 0; the hf engine uses at most 1."""

    engine_cpus: float = Field(1.0, gt=0)
    """ray: CPUs reserved for each replica. > 0."""

    engine_args: list[str] = []
    """ray: more `agent-spo engine serve` arguments for every replica, e.g.
    ["--dtype", "bfloat16", "--vllm-arg=--gpu-memory-utilization=0.85"]."""

    sandbox_servers: int = Field(2, ge=1)
    """ray: `agent-spo sandbox serve` servers to start, used as one fleet. >= 1."""

    sandbox_cpus: float = Field(1.0, gt=0)
    """ray: CPUs reserved for each sandbox server; its workers (jails) are
    sandbox.pool_size. > 0."""

    sandbox_spread: bool = True
    """ray: spread the sandbox servers over the nodes (Ray's SPREAD) instead of packing
    them; engines and learner ranks are always packed."""

    start_timeout_s: float = Field(600.0, gt=0)
    """ray: how long placement and the servers' start may take before the run stops,
    naming what did not come up. > 0."""

    nodes: int | None = Field(None, ge=1)
    """The cluster the config is laid out for: `train --dry-run` checks that the placement
    fits `nodes` machines of gpus_per_node GPUs and cpus_per_node CPUs. null = no check."""

    gpus_per_node: int = Field(8, ge=0)
    """See nodes. >= 0."""

    cpus_per_node: int = Field(64, ge=1)
    """See nodes. >= 1."""

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.engine_gpus and not self.learner_gpus:
            raise ValueError(
                "learner_gpus: 0 while the engine replicas get GPUs: the learner ranks would "
                "run on GPUs Ray gave the engines; set learner_gpus (1 per rank)"
            )
        if self.engine_backend == "hf" and self.engine_gpus > 1:
            raise ValueError(
                "engine_gpus: the hf engine runs on one device; use engine_backend vllm for "
                "tensor parallelism"
            )
        return self


class TrainConfig(Section):
    """A whole training run; the YAML file's top level."""

    run: RunConfig = RunConfig()
    """Run identity and output location."""

    model: ModelConfig = ModelConfig()
    """Policy model."""

    data: DataConfig = DataConfig()
    """Training prompts."""

    algo: AlgoConfig = AlgoConfig()
    """Algorithm: SPO (default) or GRPO, tracker, sampler."""

    loss: LossConfig = LossConfig()
    """Policy loss (PPO-clip)."""

    learner: LearnerConfig = LearnerConfig()
    """Optimizer and batching."""

    rollout: RolloutConfig = RolloutConfig()
    """Episode generation."""

    sandbox: SandboxConfig = SandboxConfig()
    """Tool execution."""

    verifier: VerifierConfig = VerifierConfig()
    """Answer checking."""

    reward: RewardConfig = RewardConfig()
    """Extra reward conditions beyond the verifier's verdict (off by default)."""

    train: TrainLoopConfig = TrainLoopConfig()
    """Loop length, checkpointing, logging."""

    cluster: ClusterConfig = ClusterConfig()
    """Where the processes run: this machine (default), a Ray cluster, or servers you
    started yourself."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model.demo_tool is not None:
            from tools.refs import resolve

            if self.model.path is not None:
                raise ValueError("model.demo_tool warm-starts the demo model: set model.path null")
            if self.rollout.tool_format != "hermes":
                raise ValueError("model.demo_tool: the tool demo uses tool_format hermes")
            name = resolve([self.model.demo_tool]).tools[0].name
            if name not in [t.name for t in resolve(self.rollout.tools).tools]:
                raise ValueError(
                    f"model.demo_tool {self.model.demo_tool!r}: the run must offer the tool "
                    f"{name!r}; add it to rollout.tools"
                )
        self._check_cluster()
        if self.rollout.engine == "openai_http" and self.model.path is None:
            raise ValueError(
                "model.path is required when rollout.engine is 'openai_http': it names the "
                "tokenizer and chat template of the model the server serves"
            )
        g = self.algo.grpo.group_size
        if self.algo.name == "grpo" and self.learner.batch_size % g:
            raise ValueError(
                f"learner.batch_size ({self.learner.batch_size}) must be a multiple of "
                f"algo.grpo.group_size ({g}) when algo.name is 'grpo'"
            )
        return self

    def _check_cluster(self) -> None:
        c, r, s = self.cluster, self.rollout, self.sandbox
        if c.backend == "ray":
            if r.engine == "vllm":
                raise ValueError(
                    "cluster.backend ray starts the engines as replicas: set "
                    "cluster.engine_backend vllm instead of rollout.engine vllm"
                )
            if r.url or r.urls or s.url or s.urls:
                raise ValueError(
                    "cluster.backend ray starts the engine replicas and sandbox servers "
                    "itself: leave rollout.url(s) and sandbox.url(s) empty (or use "
                    "cluster.backend urls for servers you started)"
                )
            if s.backend == "docker":
                raise ValueError(
                    "cluster.backend ray runs tool code in `agent-spo sandbox serve` servers: "
                    "set sandbox.backend local (each server's own isolation)"
                )
        if c.backend == "urls":
            if r.engine != "openai_http" or not (r.url or r.urls):
                raise ValueError(
                    "cluster.backend urls: set rollout.engine openai_http and rollout.urls "
                    "to the engine replicas you started"
                )
            if s.backend != "remote":
                raise ValueError(
                    "cluster.backend urls: set sandbox.backend remote and sandbox.urls to "
                    "the sandbox servers you started"
                )


def code_tools(refs: list[str]) -> list:
    """The code-kind tools (python-cell tools) that tool references offer."""
    from tools.refs import resolve

    return [t for t in resolve(refs).tools if t.kind == "code"]


def check_trainable(cfg: TrainConfig, train_prompts: int | None = None) -> list[str]:
    """What `train` refuses in a valid config, one line each naming the key; [] = trainable.

    These settings are valid for other commands, so they are not schema errors.
    `train_prompts`, the size of the training split once built, adds the check that the
    workers do not keep more prompts in flight than there are.
    """
    problems = []
    group = cfg.algo.grpo.group_size if cfg.algo.name == "grpo" else 1
    in_flight = cfg.rollout.workers // group
    if train_prompts is not None and in_flight > train_prompts:
        problems.append(
            f"rollout.workers keeps {in_flight} prompts in flight but there are only "
            f"{train_prompts} training prompts; lower rollout.workers"
        )
    return problems
