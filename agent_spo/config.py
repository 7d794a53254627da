"""Run configuration: pydantic models mirroring the YAML one to one.

Every field is documented (meaning, unit, range, source); defaults live only here. The
defaults are the embedded CPU demo: the spec's value wherever the spec gives one, and a
small CPU value where the paper's is GPU-scale (the paper's value is in the docstring and
in `configs/qwen3_8b_spo.yaml`).

`load_config` reads YAML, applies dotted `key.path=value` overrides to the raw mapping,
then validates. Every problem is reported at once, one line each, naming the full dotted
key and what is allowed. Config never enters a component: builders turn sections into
constructor arguments.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

__all__ = [
    "ConfigError",
    "TrainConfig",
    "dump_config",
    "load_config",
    "write_resolved",
]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


class RunConfig(_Section):
    name: str = "demo"
    """Run name; the run directory is `<output_dir>/<name>`. Free text."""

    output_dir: str = "runs"
    """Directory that holds run directories (checkpoints, metrics, episode logs, resolved
    config). Relative paths are taken from the working directory."""

    seed: int = 0
    """Seed for every RNG the run owns (sampler, engine sampling, model init). Any integer."""


class ModelConfig(_Section):
    path: str | None = None
    """Policy model: a HuggingFace-format directory (config, weights, tokenizer).
    None = the project's built-in tiny demo model (made by `agent-spo demo-model`).
    Paper: Qwen3-8B (spec §7)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Learner weight dtype. float32 for the CPU demo; bfloat16 on GPUs."""


class DataConfig(_Section):
    train: str = "synthetic"
    """Training prompts: a .jsonl/.parquet path with fields id/problem/answer, or a
    built-in set name ('synthetic' = the embedded tool-use task set)."""

    max_prompts: int | None = Field(None, ge=1)
    """Use at most this many prompts (first N rows). >= 1; None = all."""

    synthetic_tasks: int = Field(1000, ge=2)
    """How many tasks the built-in 'synthetic' set has (seeded by run.seed). >= 2."""

    held_out: float = Field(0.2, ge=0, lt=1)
    """Share of prompts kept out of training for evaluation, split by content key
    (stable under reordering). In [0, 1)."""


class RhoConfig(_Section):
    mode: Literal["kl_version", "kl_exact", "constant"] = "kl_version"
    """How the tracker's discount rho(x) is set. kl_version: D(x) = sum of per-step
    policy drift since x's last visit (streaming default); kl_exact: mean |logp_then −
    logp_now| over x's previous trajectory (reference); constant: rho = `constant`
    (ablation). Source: spec §1."""

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

    @model_validator(mode="after")
    def _min_le_max(self) -> RhoConfig:
        if self.rho_min > self.rho_max:
            raise ValueError(f"rho_min ({self.rho_min}) must be <= rho_max ({self.rho_max})")
        return self


class InitConfig(_Section):
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


class SamplerConfig(_Section):
    mode: Literal["prioritized", "uniform"] = "prioritized"
    """Prompt sampling. prioritized: probability ∝ sqrt(v_hat·(1 − v_hat)) + eps, divided
    by n_eff^gamma; uniform: GRPO's. Source: spec §4."""

    eps: float = Field(0.05, ge=0)
    """Floor added to every prompt's weight so solved/hopeless prompts are still visited.
    >= 0. Source: spec §4 (paper 0.05)."""

    gamma: float = Field(0.0, ge=0, le=1)
    """Exponent of the n_eff(x)^gamma divisor (ICLR version). In [0, 1]; 0 = paper v2.
    Source: spec §4."""


class GrpoConfig(_Section):
    group_size: int = Field(8, ge=2)
    """G, responses per prompt when algo.name = grpo. >= 2. Source: spec §5 (paper 8)."""

    std_eps: float = Field(1e-6, gt=0)
    """Added to the group's unbiased std in A = (r − mean)/(std + std_eps). > 0.
    Source: spec §5."""


class AlgoConfig(_Section):
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


class LossConfig(_Section):
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

    kl_coef: float = Field(0.0, ge=0)
    """Weight of a KL penalty to the initial policy. >= 0; 0 = off (spec §3 default)."""

    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus. >= 0; 0 = off (spec §3 default)."""

    logp_old: Literal["behaviour", "recompute"] = "behaviour"
    """Source of logp_old in the ratio. behaviour: the engine's sampling log-probs
    (streaming default, corrects staleness); recompute: a learner forward pass before the
    update (reference). Source: spec §3."""


class LearnerConfig(_Section):
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

    max_staleness: int = Field(4, ge=0)
    """Most policy versions a generated segment may lag the learner; older trajectories
    are dropped and counted. >= 0 (0 = strictly on-policy)."""

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


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm", "openai_http"] = "hf"
    """Generation engine. hf: transformers with request batching (light default);
    vllm: in-process vLLM; openai_http: an OpenAI-compatible server over HTTP."""

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
    """Tools offered to the model (hermes format): any of python, simplify, factor,
    expand, solve, integrate, evaluate. The retool format always uses python only."""

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
    """openai_http engine: the server's base URL (e.g. http://127.0.0.1:8000/v1);
    required when engine = openai_http."""

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, tools: list[str]) -> list[str]:
        from tools.toolbox import builtin_tools

        known = [t.name for t in builtin_tools()]
        unknown = [t for t in tools if t not in known]
        if unknown or not tools:
            raise ValueError(
                f"unknown tools {unknown}; choose from {known}" if unknown else "empty"
            )
        if len(set(tools)) != len(tools):
            raise ValueError("a tool is listed twice")
        return tools

    @model_validator(mode="after")
    def _url_for_http(self) -> RolloutConfig:
        if self.engine == "openai_http" and not self.url:
            raise ValueError("url is required when engine is 'openai_http'")
        return self

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, top_k: int) -> int:
        if top_k == 0:
            raise ValueError("0 is not allowed; use -1 (off) or a value >= 1")
        return top_k


class SandboxConfig(_Section):
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
    """Base URL of the sandbox server; required when backend = remote."""

    @model_validator(mode="after")
    def _check(self) -> SandboxConfig:
        if self.backend == "remote" and not self.url:
            raise ValueError("url is required when backend is 'remote'")
        return self


class VerifierConfig(_Section):
    timeout_s: float = Field(5.0, gt=0)
    """Wall-clock limit per verification (sympy can hang), seconds. > 0."""

    workers: int = Field(2, ge=1)
    """Killable verifier worker processes. >= 1."""


class TrainLoopConfig(_Section):
    total_steps: int = Field(60, ge=1)
    """Training batches to run (each = mini_batches optimizer steps). >= 1. Demo: 60."""

    checkpoint_every: int = Field(10, ge=1)
    """Save a checkpoint (policy, optimizer, tracker, sampler RNG) every this many
    steps, and at the end. >= 1."""

    log_every: int = Field(1, ge=1)
    """Write metrics every this many steps. >= 1."""

    eval_every: int = Field(20, ge=0)
    """Score the held-out prompts (one episode each, fixed seeds) before training and
    every this many steps; the curve goes to metrics.jsonl as eval/*. 0 = only at the
    end. The final evaluation always runs when there is a held-out split."""

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

    plot: bool = True
    """Write RUN_DIR/curves.png at the end (also: `agent-spo plot RUN_DIR`)."""


class TrainConfig(_Section):
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

    train: TrainLoopConfig = TrainLoopConfig()
    """Loop length, checkpointing, logging."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
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


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A config could not be loaded; `problems` holds one human-readable line each."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n > 1 else ''} in {source}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.2), not as a string."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in resolvers if r[0] != _FLOAT_TAG]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[0-9][0-9_]*[eE][-+]?[0-9]+)
              |[-+]?\.(?:inf|Inf|INF)
              |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

Loc = tuple[str, ...]


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int], list[str]]:
    """Parse YAML text; return (data, line of each mapping key by dotted path, problems)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        return None, {}, [f"{source}: not valid YAML{where}: {problem}"]
    finally:
        loader.dispose()

    lines: dict[Loc, int] = {}
    problems: list[str] = []

    def walk(n: yaml.Node, loc: Loc) -> None:
        if not isinstance(n, yaml.MappingNode):
            return
        for key_node, value_node in n.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            sub = (*loc, str(key_node.value))
            line = key_node.start_mark.line + 1
            if sub in lines:
                problems.append(
                    f"duplicate key '{'.'.join(sub)}' ({source} lines {lines[sub]} and {line})"
                )
            lines[sub] = line
            walk(value_node, sub)

    if node is not None:
        walk(node, ())
    return data, lines, problems


def _read_file(path: Path) -> tuple[dict[str, Any], dict[Loc, int], list[str]]:
    source = str(path)
    if not path.exists():
        return {}, {}, [f"config file not found: {source}"]
    if not path.is_file():
        return {}, {}, [f"config path is not a file: {source}"]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return {}, {}, [f"cannot read {source}: {e}"]
    data, lines, problems = _parse_yaml(text, source)
    if problems and data is None:
        return {}, {}, problems
    if data is None:
        data = {}  # an empty file means "all defaults"
    if not isinstance(data, dict):
        problems.append(
            f"{source}: top level must be a mapping of sections "
            f"({', '.join(TrainConfig.model_fields)}), got {type(data).__name__}"
        )
        return {}, {}, problems
    return data, lines, problems


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _section_type(info: FieldInfo) -> type[_Section] | None:
    inner, _ = _unwrap_optional(info.annotation)
    return inner if isinstance(inner, type) and issubclass(inner, _Section) else None


def _key(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unknown_key(model: type[_Section], loc: Loc) -> str:
    allowed = sorted(model.model_fields)
    parent = f" under '{'.'.join(loc[:-1])}'" if len(loc) > 1 else " at the top level"
    close = difflib.get_close_matches(loc[-1], allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{'.'.join(loc)}'; allowed keys{parent}: {', '.join(allowed)}{hint}"


def _apply_override(raw: dict[str, Any], text: str) -> list[str]:
    """Set one `a.b.c=value` override in the raw mapping; return problems (if any)."""
    if "=" not in text:
        return [f"override '{text}' has no '='; expected the form key.path=value"]
    path_text, value_text = text.split("=", 1)
    loc: Loc = tuple(path_text.strip().split("."))
    if not all(loc):
        return [f"override '{text}': bad key path '{path_text}'; expected the form key.path=value"]

    # Walk the models alongside the raw mapping so a typo fails here, with a suggestion.
    model: type[_Section] = TrainConfig
    node: dict[str, Any] = raw
    for i, part in enumerate(loc):
        here = loc[: i + 1]
        if part not in model.model_fields:
            return [_unknown_key(model, here)]
        info = model.model_fields[part]
        if i == len(loc) - 1:
            node[part] = _parse_value(value_text, info)
            return []
        section = _section_type(info)
        if section is None:
            return [
                f"override '{text}': '{'.'.join(here)}' is a value, not a section; "
                f"cannot set '{loc[i + 1]}' inside it"
            ]
        model = section
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return [
                f"override '{text}': '{'.'.join(here)}' holds {child!r}, not a mapping; "
                f"cannot set '{loc[i + 1]}' inside it"
            ]
        node = child
    return []


def _parse_value(text: str, info: FieldInfo) -> Any:
    """Parse an override value as YAML; a string field keeps the text as written."""
    try:
        value = yaml.load(text, Loader=_Loader)  # safe: _Loader subclasses SafeLoader
    except yaml.YAMLError:
        return text  # let validation say what was expected
    inner, _ = _unwrap_optional(info.annotation)
    if inner is str and value is not None and not isinstance(value, str):
        return text.strip()  # `run.name=123` is the string '123'
    return value


def _lookup(raw: Any, loc: Sequence[Any]) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list | tuple) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expected(info: FieldInfo) -> str:
    """Plain-words description of what a field accepts, e.g. 'a number > 0 or null'."""
    inner, optional = _unwrap_optional(info.annotation)
    if typing.get_origin(inner) is Literal:
        what = "one of " + ", ".join(repr(v) for v in typing.get_args(inner))
    elif inner is bool:
        what = "true or false"
    elif inner is int:
        what = "an integer"
    elif inner is float:
        what = "a number"
    elif inner is str:
        what = "a string"
    elif typing.get_origin(inner) is tuple:
        what = f"a list of {len(typing.get_args(inner))} numbers"
    elif isinstance(inner, type) and issubclass(inner, _Section):
        what = "a mapping with keys " + ", ".join(inner.model_fields)
    else:
        what = str(inner)
    bounds = [
        f"{sym} {getattr(m, attr):g}"
        for m in info.metadata
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    if bounds:
        what += " " + " and ".join(bounds)
    return what + (" or null" if optional else "")


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    """Turn one pydantic error into a line naming the dotted key and what is allowed."""
    loc = tuple(err["loc"])
    # Find the deepest model field on the path; deeper parts are list indices.
    model: type[_Section] | None = TrainConfig
    field_loc: list[str] = []
    info: FieldInfo | None = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        info = model.model_fields[part]
        field_loc.append(part)
        model = _section_type(info)

    kind = err["type"]
    if kind == "extra_forbidden":
        parent = model if len(field_loc) == len(loc) - 1 and model is not None else None
        if parent is not None:
            return _unknown_key(parent, tuple(str(p) for p in loc))
        return f"unknown key '{_key(loc)}'"
    if kind in ("value_error", "assertion_error"):
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        if model is not None and len(field_loc) == len(loc):
            # A section-level rule: spell its field names as full dotted keys.
            prefix = ".".join(field_loc) + "." if field_loc else ""
            names = "|".join(sorted(model.model_fields, key=len, reverse=True))
            return re.sub(rf"(?<![\w.'])({names})(?![\w'])", lambda m: prefix + m[1], msg)
        return f"{_key(loc)}: {msg}"
    if info is None:
        return f"{_key(loc)}: {err['msg']}, got {_short(err.get('input'))}"

    key = ".".join(field_loc)
    got = _lookup(raw, field_loc) if len(field_loc) < len(loc) else err.get("input")
    inner, _ = _unwrap_optional(info.annotation)
    if kind == "literal_error" and typing.get_origin(inner) is Literal:
        allowed = ", ".join(repr(v) for v in typing.get_args(inner))
        return f"{key}: got {_short(got)}; allowed values: {allowed}"
    return f"{key}: expected {_expected(info)}, got {_short(got)}"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (None = all defaults), apply `key.path=value` overrides, validate.

    Raises ConfigError listing every problem, one line each, with its dotted key.
    """
    source = "defaults" if path is None else str(path)
    if overrides:
        source += f" + {len(overrides)} override{'s' if len(overrides) > 1 else ''}"
    raw: dict[str, Any] = {}
    lines: dict[Loc, int] = {}
    problems: list[str] = []
    if path is not None:
        raw, lines, problems = _read_file(Path(path))
        if problems and not raw:
            raise ConfigError(problems, source)

    overridden: list[tuple[Loc, str]] = []
    for text in overrides:
        found = _apply_override(raw, text)
        problems += found
        if not found:
            overridden.append((tuple(text.split("=", 1)[0].strip().split(".")), text))

    def origin(loc: Loc) -> str:
        for o_loc, text in reversed(overridden):
            if loc[: len(o_loc)] == o_loc or (loc and o_loc[: len(loc)] == loc):
                return f" (from override '{text}')"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f" ({path} line {lines[loc[:n]]})"
        return ""

    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            line = _describe(dict(err), raw) + origin(tuple(str(p) for p in err["loc"]))
            if line not in problems:
                problems.append(line)
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML, keys in model order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_resolved(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """Write `run_dir/config.yaml` (all defaults filled); `load_config` of it gives `cfg`."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved config written by agent-spo; rerun with: agent-spo train <this file>\n"
    out.write_text(header + dump_config(cfg), encoding="utf-8")
    return out
