"""Every training metric, defined once: its name, what it means, and where it is written.

Names are namespaced by what they describe:

    rollout/  episodes and what happened to them      reward/  verifier rewards
    tracker/  the value tracker (baseline, drift)     loss/    the learner's objective
    tool/     tool use inside episodes                sandbox/ code the episodes ran
    perf/     time and throughput                     eval/    held-out evaluation
    grpo/     GRPO-only group statistics

:class:`MetricsLog` writes one JSON line per logged step to ``metrics.jsonl`` (always)
and, optionally, TensorBoard scalars. A key that is not defined here is refused, so the
table below is the complete list (``agent-spo plot`` and the README read from it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

METRICS: dict[str, str] = {
    "step": "learner steps done (the row's x-axis)",
    # rollout/
    "rollout/episodes": "episodes finished since the run (or resume) started, trained or not",
    "rollout/staleness_mean": "mean policy-version lag of the batch's oldest segments",
    "rollout/unscored": "episodes with no reward (deadline): never trained on, never tracked",
    "rollout/dropped/*": "episodes dropped, by cause (sandbox, engine, prompt, stale)",
    "rollout/batch_trajectories": "trajectories in the batch the learner trained on",
    "rollout/batch_tokens": "trainable (model-sampled) tokens in that batch",
    "rollout/groups_incomplete": "GRPO groups that lost members to drops or deadlines",
    "rollout/replica_drops": "replica pool: requests a failing replica lost (sent to another)",
    "rollout/replicas_live": "replica pool: replicas in rotation after the step's sync",
    "rollout/replica*_requests": "replica pool: generations that replica returned so far",
    "rollout/replica*_version": "replica pool: the policy version that replica holds (-1: none)",
    # reward/
    "reward/mean": "mean verifier reward of the batch",
    # tracker/
    "tracker/v_hat_mean": "mean baseline v̂(x) of the batch, read before each reward",
    "tracker/drift": "the step's policy drift d_s (mean |log-ratio| new vs old policy)",
    "tracker/rho_mean": "mean discount rho of the tracker updates since the last step",
    "tracker/rho_at_min": "share of those updates whose rho sat on rho_min",
    "tracker/rho_at_max": "share of those updates whose rho sat on rho_max (first visits too)",
    "tracker/kl_exact_s": "kl_exact: time to score the kept and the new trajectories",
    "tracker/kl_exact_scored": "kl_exact: prompts whose D was measured on a kept trajectory",
    "tracker/kl_exact_unkept": "kl_exact: revisited prompts with no trained trajectory kept",
    "tracker/kl_exact_mb": "kl_exact: memory of the kept trajectories (MiB)",
    "tracker/kl_exact_drift_mean": "kl_exact: mean measured D of the step's prompts",
    # loss/
    "loss/pg": "PPO-clip policy-gradient loss (token-mean)",
    "loss/clip_frac": "share of trainable tokens whose ratio was clipped",
    "loss/approx_kl": "approximate KL(old || new) over trainable tokens",
    "loss/grad_norm": "gradient norm before clipping",
    "loss/is_weight": "decoupled: mean importance weight pi_recomputed / pi_behaviour (capped)",
    "loss/entropy": "with loss.entropy_coef: mean policy entropy at trainable tokens (nats)",
    "loss/tis_frac": "decoupled with loss.tis_cap: share of tokens whose weight was capped",
    "loss/adv_raw_var": "variance of the advantages before normalisation",
    "loss/adv_zero_frac": "share of samples whose raw advantage is ~0 (no learning signal)",
    # tool/
    "tool/calls_per_episode": "mean tool calls per episode in the batch",
    # sandbox/
    "sandbox/runs_per_episode": "mean sandbox executions per episode in the batch",
    "sandbox/latency_mean_s": "mean wait of the batch's sandbox executions (absent if none)",
    "sandbox/latency_p95_s": "95th percentile of that wait (absent if none)",
    "sandbox/failed_frac": "share of the batch's sandbox executions whose status is not ok",
    "sandbox/status/*": "the batch's sandbox executions ending in a non-ok status, by status",
    "sandbox/servers_live": "sandbox fleet: servers in rotation (answering their health check)",
    "sandbox/server*_live": "sandbox fleet: 1 while that server is in rotation, else 0",
    "sandbox/server*_calls": "sandbox fleet: tool calls in flight on that server (its queue)",
    "sandbox/server*_sessions": "sandbox fleet: episodes' sessions open on that server",
    "sandbox/server*_served": "sandbox fleet: tool calls that server has answered so far",
    # perf/
    "perf/wait_s": "time the learner waited for the batch to be ready (idle)",
    "perf/learner_s": "time of the learner's update on the batch",
    "perf/pad_frac": "share of the update's token positions that were padding (all ranks)",
    "perf/weight_push_s": "time to hand the new weights to the engine",
    "perf/engine_sleep_s": "colocated: time to put the engine to sleep and wake it again",
    "perf/weight_sync_s": "replica pool: time to write the weights and load them everywhere",
    "perf/weight_write_s": "replica pool: of which writing the weights to the sync folder",
    "perf/weight_sync_bytes": "replica pool: bytes of weights synced",
    "perf/elapsed_s": "wall time since training (or the resume) started",
    "perf/eval_s": "time of the held-out evaluation logged in this row",
    # grpo/
    "grpo/degenerate_frac": "share of the batch's groups with identical rewards",
    "grpo/samples_degenerate_frac": "share of samples in such groups (zero advantage)",
    # eval/
    "eval/accuracy": "held-out accuracy, one episode per prompt, fixed seeds",
    "eval/tool_use_rate": "share of held-out episodes that called a tool",
    "eval/valid_call_rate": "share of held-out tool calls with valid syntax and arguments",
    "eval/episodes": "held-out episodes scored",
}


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(r"\*", "[^/]+") + "$")


_PATTERNS = [_pattern(k) for k in METRICS]


def is_defined(key: str) -> bool:
    return any(p.match(key) for p in _PATTERNS)


class UndefinedMetric(KeyError):
    """A metric written without a definition in :data:`METRICS`."""


class LoggerUnavailable(RuntimeError):
    """An optional metrics sink (TensorBoard, W&B) could not start."""


class MetricsLog:
    """metrics.jsonl (append, flushed per row) plus optional TensorBoard scalars."""

    def __init__(
        self, run_dir: Path, *, tensorboard: bool = False, wandb: dict | Any = None
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        self._own_wandb = isinstance(wandb, dict)  # opened here, so finished here
        if isinstance(wandb, dict):
            try:
                self._wandb = open_wandb(Path(run_dir), **wandb)
            except LoggerUnavailable:
                self._f.close()
                raise
        elif wandb is not None:  # a W&B run the caller opened (and will finish)
            self._wandb = wandb
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._f.close()
                raise LoggerUnavailable(
                    "train.tensorboard=true needs the tensorboard package: "
                    "pip install 'agent-spo[tensorboard]'"
                ) from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, row: dict) -> None:
        bad = [k for k in row if not is_defined(k)]
        if bad:
            raise UndefinedMetric(f"metrics {bad} are not defined in agent_spo.metrics.METRICS")
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)},
                step=int(row["step"]),
            )

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None and self._own_wandb:
            self._wandb.finish()
        self._wandb = None


def open_wandb(run_dir: Path, *, project: str, name: str, config: dict, resumed_at: int = 0):
    """A Weights & Biases run under RUN_DIR/wandb. Each start of the trainer is its own
    W&B run in the group ``name`` (a resume repeats the steps after its checkpoint, which
    W&B would drop from the run it continued); a resumed one is named
    "NAME (resumed at step N)". WANDB_MODE=offline writes it only locally (`wandb sync`
    uploads it later). Raises :class:`LoggerUnavailable` when W&B is missing or does
    not start (no login, no network)."""
    try:
        import wandb
    except ImportError as e:
        raise LoggerUnavailable(
            "train.wandb=true needs the wandb package: pip install 'agent-spo[wandb]'"
        ) from e
    mode: Any = os.environ.get("WANDB_MODE") or None  # read now: wandb caches it per process
    try:
        return wandb.init(
            project=project, group=name, dir=str(run_dir), config=config,
            mode=mode,
            name=name if not resumed_at else f"{name} (resumed at step {resumed_at})",
            settings=wandb.Settings(console="off", quiet=True),
        )  # fmt: skip
    except (wandb.errors.Error, ValueError, OSError) as e:  # login/network; a bad setting
        raise LoggerUnavailable(f"train.wandb: Weights & Biases did not start: {e}") from e


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
