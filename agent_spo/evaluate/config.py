"""The evaluation config: pydantic models mirroring the YAML one to one (STYLE rule 5).

An eval config reuses the training config's model, rollout, sandbox and verifier
sections, so a model is scored with exactly the tool loop and verifier it trains with,
and adds an ``eval`` section (benchmarks, samples per problem, k). Only the sampling
defaults differ: the paper evaluates at T = 0.6, top_p = 0.95, top_k = 20 (spec §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from agent_spo.config import (
    ConfigError,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    SandboxConfig,
    Section,
    VerifierConfig,
    dump_config,
    load_yaml_config,
)

CHECKOUT = Path(__file__).resolve().parents[2]  # the project root (holds configs/)


class EvalRunConfig(RunConfig):
    name: str = "eval"
    """Evaluation name; results go to `<output_dir>/<name>`. Re-running the same name
    resumes: finished samples are kept, only missing ones are generated."""


class EvalRolloutConfig(RolloutConfig):
    temperature: float = Field(0.6, ge=0)
    """Sampling temperature. >= 0. Source: spec §7 (paper evaluation 0.6)."""

    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling mass. In (0, 1]. Source: spec §7 (0.95)."""

    top_k: int = Field(20, ge=-1)
    """Top-k sampling; -1 = off, else >= 1. Source: spec §7 (20)."""


class EvalDataset(Section):
    path: str
    """A .jsonl or .parquet file with fields id, problem, answer. A relative path is
    taken from the working directory, else from the project root, so
    `../shared/data/...` works from either."""

    name: str | None = None
    """Name in the tables; None = the file name without its extension."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    def resolved(self) -> Path:
        """The file this entry names (see `path`); may not exist."""
        p = Path(self.path).expanduser()
        if p.is_absolute() or p.exists():
            return p
        return CHECKOUT / p if (CHECKOUT / p).exists() else p


class EvalSection(Section):
    datasets: list[EvalDataset] = Field(min_length=1)
    """Benchmarks to score, each scored on its own and then averaged unweighted."""

    n: int = Field(32, ge=1)
    """Samples per problem. >= 1. Source: spec §7 (32)."""

    k: list[int] | None = None
    """The k of avg@k, pass@k and maj@k, each in 1..n. None = 1, 2, 4, ... up to n, and n."""

    max_problems: int | None = Field(None, ge=1)
    """Score only the first N problems of each dataset (smoke tests). None = all."""

    maj_exact_limit: int = Field(5000, ge=1)
    """maj@k is averaged over all C(n, k) subsets of the samples when there are at most
    this many, else over `maj_resamples` random subsets (fixed seed)."""

    maj_resamples: int = Field(1000, ge=1)
    """Random subsets for maj@k when C(n, k) > maj_exact_limit. >= 1."""

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[EvalDataset]) -> list[EvalDataset]:
        labels = [d.label for d in datasets]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(
                f"dataset names repeat: {', '.join(twice)}; set `name` to tell them apart"
            )
        return datasets

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalSection:
        if self.k is not None:
            bad = [k for k in self.k if not 1 <= k <= self.n]
            if bad or not self.k:
                raise ValueError(f"k values must lie in 1..n (n = {self.n}), got {self.k}")
        return self

    @property
    def ks(self) -> list[int]:
        if self.k is not None:
            return sorted(set(self.k))
        out, k = [], 1
        while k < self.n:
            out.append(k)
            k *= 2
        return [*out, self.n]


class EvalConfig(Section):
    """A whole evaluation; the YAML file's top level."""

    run: EvalRunConfig = EvalRunConfig()
    """Evaluation identity, output location and seed."""

    model: ModelConfig = ModelConfig()
    """The model to score (None = the demo model); `agent-spo eval --checkpoint` overrides it."""

    rollout: EvalRolloutConfig = EvalRolloutConfig()
    """Episode generation: the same tool loop as training, with evaluation sampling."""

    sandbox: SandboxConfig = SandboxConfig()
    """Tool execution."""

    verifier: VerifierConfig = VerifierConfig()
    """Answer checking (the training verifier)."""

    eval: EvalSection
    """Benchmarks and metrics."""

    @model_validator(mode="after")
    def _tokenizer_for_http(self) -> EvalConfig:
        if self.rollout.engine == "openai_http" and self.model.path is None:
            raise ValueError(
                "model.path is required when rollout.engine is 'openai_http': it names the "
                "tokenizer and chat template of the model the server serves"
            )
        return self


# Settings that do not change what a sample is (throughput and addresses only).
_NOT_SAMPLE = {"rollout": ("workers", "max_batch", "url"), "sandbox": ("pool_size", "url")}


def sample_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings a finished sample depends on, as a flat dotted-key mapping."""
    d = cfg.model_dump(mode="json")
    out: dict[str, Any] = {"run.seed": d["run"]["seed"]}
    for section in ("model", "rollout", "sandbox", "verifier"):
        for key, value in d[section].items():
            if key not in _NOT_SAMPLE.get(section, ()):
                out[f"{section}.{key}"] = value
    return out


def load_eval_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read an eval YAML, apply `key.path=value` overrides, validate; ConfigError names keys
    (and the file line or override each came from), as for the training config."""
    cfg = load_yaml_config(EvalConfig, path, overrides)
    missing = [f"eval.datasets: {d.label}: file not found: {d.path}"
               for d in cfg.eval.datasets if not d.resolved().is_file()]  # fmt: skip
    if missing:
        raise ConfigError(missing, str(path))
    return cfg


def dump_eval_config(cfg: EvalConfig) -> str:
    """The resolved config as YAML (what `config.yaml` in the output directory holds)."""
    return dump_config(cfg)
