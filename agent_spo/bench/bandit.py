"""A synthetic Bernoulli bandit that runs the algorithm core end to end in seconds.

Each prompt x has a fixed difficulty ``c_x`` and features ``f_x``; the policy answers it
correctly with probability ``sigmoid(c_x + f_x . w + b_x)``, where ``w`` (shared) and
``b_x`` (per prompt) are the trainable parameters. A "trajectory" is one answer token,
its reward is 1 if correct. Because ``w`` is shared, training on one prompt moves the
policy on every other: the tracker's values go stale and the KL-adaptive discount has
something to adapt to.

SPO and GRPO run on identical machinery — the same policy, optimiser, PPO-clip loss and
sample budget per step — and differ only in what the spec says they differ in: SPO draws
B prompts from the prioritised sampler and takes its baseline from the value tracker;
GRPO draws B/G prompts uniformly and normalises within groups of G. Everything is the
real code from ``agent_spo.algo``; only the model and the environment are toys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch

from agent_spo.algo import (
    PrioritizedSampler,
    ValueTracker,
    group_stats,
    grpo_advantages,
    near_zero_fraction,
    no_baseline_advantages,
    ppo_clip_loss,
    spo_advantages,
)


@dataclass(frozen=True)
class BanditTask:
    """The environment: per-prompt difficulty and features (drawn once from a seed)."""

    difficulty: np.ndarray  # [N] logit offset c_x
    features: np.ndarray  # [N, d]

    @classmethod
    def make(cls, n_prompts: int, dim: int = 16, seed: int = 0) -> BanditTask:
        rng = np.random.default_rng(seed)
        # Mostly hard prompts with a long easy tail, like a math set for a small model.
        difficulty = rng.normal(-1.5, 1.5, size=n_prompts)
        features = rng.normal(0.0, 1.0, size=(n_prompts, dim)) / math.sqrt(dim)
        return cls(difficulty, features)

    @property
    def prompt_ids(self) -> list[str]:
        return [f"bandit-{i}" for i in range(len(self.difficulty))]


class BanditPolicy(torch.nn.Module):
    """logit(x) = c_x + f_x . w + b_x; the answer token is "correct" with sigmoid(logit)."""

    c: torch.Tensor  # buffers, registered in __init__
    f: torch.Tensor

    def __init__(self, task: BanditTask):
        super().__init__()
        self.register_buffer("c", torch.tensor(task.difficulty, dtype=torch.float64))
        self.register_buffer("f", torch.tensor(task.features, dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.zeros(task.features.shape[1], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(len(task.difficulty), dtype=torch.float64))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.c[idx] + self.f[idx] @ self.w + self.b[idx]

    def logp(self, idx: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
        """log pi(answer | x) for answers coded 1 = correct, 0 = wrong: [B]."""
        z = self.logits(idx)
        return torch.where(
            correct.bool(), torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
        )

    @torch.no_grad()
    def success_prob(self) -> np.ndarray:
        return torch.sigmoid(self.logits(torch.arange(len(self.c)))).numpy()


@dataclass(frozen=True)
class BanditSettings:
    """Plain arguments for one bandit run (built from the config by the CLI)."""

    algo: Literal["spo", "grpo"] = "spo"
    n_prompts: int = 256
    steps: int = 150
    batch_size: int = 64  # trajectories per step, for both algorithms
    mini_batches: int = 2
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float | None = 10.0
    baseline: bool = True
    adv_eps: float = 1e-8
    rho_mode: Literal["kl_version", "kl_exact", "constant"] = "kl_version"
    rho_min: float = 0.875
    rho_max: float = 0.96
    d_half: float = 0.06
    rho_constant: float = 0.875
    init: Literal["paper", "smoothed", "none"] = "paper"
    n0: int = 8
    sampler: Literal["prioritized", "uniform"] = "prioritized"
    sampler_eps: float = 0.05
    sampler_gamma: float = 0.0
    group_size: int = 8
    grpo_eps: float = 1e-6
    probe_size: int = 8  # kl_version: trajectories per step used to measure the drift
    drift_probe: int = 64  # the fixed probe of the probe estimator (a diagnostic)
    calibration: int = 8  # revisits per step measured exactly to calibrate the sum
    seed: int = 0
    task_seed: int = 0


@dataclass
class BanditResult:
    settings: BanditSettings
    initial_accuracy: float
    history: list[dict] = field(default_factory=list)  # one row of metrics per step

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["eval/true_accuracy"]


def run_bandit(s: BanditSettings, on_step: Callable[[dict], None] | None = None) -> BanditResult:
    """Train the bandit policy with SPO or GRPO; return per-step metrics."""
    task = BanditTask.make(s.n_prompts, seed=s.task_seed)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    policy = BanditPolicy(task)
    opt = torch.optim.AdamW(
        policy.parameters(), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay
    )
    pids = task.prompt_ids
    index = {pid: i for i, pid in enumerate(pids)}

    tracker = ValueTracker(
        rho_mode=s.rho_mode,
        rho_min=s.rho_min,
        rho_max=s.rho_max,
        d_half=s.d_half,
        rho_constant=s.rho_constant,
    )
    if s.algo == "spo" and s.init != "none":
        # Offline estimate: n0 answers per prompt from the initial policy.
        p0 = policy.success_prob()
        scores = {
            pid: (rng.random(s.n0) < p0[i]).astype(float).tolist() for i, pid in enumerate(pids)
        }
        tracker.init_from_scores(scores, form=s.init)
    v_hat, n_eff = tracker.values(pids)
    sampler = PrioritizedSampler(
        pids,
        v_hat=v_hat,
        n_eff=n_eff,
        eps=s.sampler_eps,
        gamma=s.sampler_gamma,
        mode=s.sampler if s.algo == "spo" else "uniform",
        seed=s.seed,
    )
    # kl_exact: each prompt's last trajectory and its log-prob right after that visit's update.
    ref_answer: dict[int, tuple[float, float]] = {}
    # The drift estimators side by side, whatever rho mode drives the tracker (a
    # diagnostic): kl_exact's measured D, kl_version's summed one, and two candidates.
    # probe: a fixed probe of (prompt, answer) pairs from the initial policy, scored
    # after every update (probe_logp[v] = under the policy after v updates), D(x) = mean
    # |probe_logp[v_x] - probe_logp[now]| with v_x x's version at its last visit: the
    # net displacement, not a sum. calibrated: kl_version's sum times c, where c is a
    # running ratio (sum of measured D / sum of summed D) over up to `calibration`
    # revisits per step measured exactly, as of the step before (no leakage).
    probe_rng = np.random.default_rng((s.seed, 1))  # its own: the run's draws stay as they were
    probe_idx = torch.as_tensor(probe_rng.integers(0, s.n_prompts, size=s.drift_probe))
    with torch.no_grad():
        p0 = torch.sigmoid(policy.logits(probe_idx)).numpy()
        probe_ans = torch.as_tensor((probe_rng.random(s.drift_probe) < p0) * 1.0)
        probe_logp = [policy.logp(probe_idx, probe_ans)]
    visit_version: dict[int, int] = {}
    calib = [0.0, 0.0]  # running sums: measured D, summed D (decayed by 0.9 per step)

    result = BanditResult(s, initial_accuracy=float(policy.success_prob().mean()))
    for step in range(s.steps):
        # ---- rollout: draw prompts, sample one answer per trajectory
        if s.algo == "spo":
            batch = [sampler.draw() for _ in range(s.batch_size)]
            groups = batch
        else:
            n_groups = max(1, s.batch_size // s.group_size)
            prompts = sampler.draw_batch(n_groups)
            batch = [p for p in prompts for _ in range(s.group_size)]
            groups = batch
        idx = torch.tensor([index[p] for p in batch])
        with torch.no_grad():
            p_correct = torch.sigmoid(policy.logits(idx)).numpy()
        answers = (rng.random(len(batch)) < p_correct).astype(np.float64)
        rewards = answers  # the verifier: correct answer -> 1
        ans_t = torch.tensor(answers)
        with torch.no_grad():
            logp_old = policy.logp(idx, ans_t)  # behaviour log-probs, [B]

        # ---- advantages
        row: dict = {"step": step, "reward/mean": float(rewards.mean())}
        if s.algo == "spo":
            baselines = np.array([tracker.value(p) for p in batch])
            if s.baseline:
                adv, raw = spo_advantages(rewards, baselines, s.adv_eps)
            else:
                adv, raw = no_baseline_advantages(rewards, s.adv_eps)
            row["adv/raw_var"] = float(raw.var())
            row["adv/frac_near_zero"] = near_zero_fraction(raw, 0.02)
        else:
            adv = grpo_advantages(rewards, groups, s.grpo_eps)
            gs = group_stats(rewards, groups)
            row["grpo/frac_degenerate"] = gs.frac_degenerate
            row["adv/frac_near_zero"] = near_zero_fraction(adv, 1e-4)

        # ---- PPO-clip update: one pass, mini_batches optimizer steps, token mean per step
        adv_t = torch.tensor(adv)
        order = torch.randperm(len(batch))
        clip_fracs = []
        for mb in torch.tensor_split(order, s.mini_batches):
            mask = torch.ones(len(mb), 1, dtype=torch.float64)
            loss, stats = ppo_clip_loss(
                policy.logp(idx[mb], ans_t[mb]).unsqueeze(-1),
                logp_old[mb].unsqueeze(-1),
                adv_t[mb],
                mask,
                normalizer=float(len(mb)),
                eps_low=s.eps_low,
                eps_high=s.eps_high,
                dual_clip_c=s.dual_clip_c,
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), s.grad_clip)
            opt.step()
            clip_fracs.append(stats.clip_frac)
        row["loss/clip_frac"] = float(np.mean(clip_fracs))

        # ---- tracker: drift, discount, update (SPO only)
        if s.algo == "spo":
            with torch.no_grad():
                logp_after = policy.logp(idx, ans_t)
            # kl_version's d_s, recorded in every mode (only kl_version reads it for rho)
            probe = slice(0, min(s.probe_size, len(batch)))
            tracker.record_step_drift(float((logp_after[probe] - logp_old[probe]).abs().mean()))
            with torch.no_grad():
                probe_logp.append(policy.logp(probe_idx, probe_ans))
            now = len(probe_logp) - 1
            rhos = []
            side: dict[str, list[float]] = {"exact": [], "version": [], "probe": [],
                                            "calibrated": []}  # fmt: skip
            c = calib[0] / calib[1] if calib[1] > 0 else 1.0
            for j, pid in enumerate(batch):
                i = index[pid]
                drift = None
                if i in ref_answer:
                    ans_then, logp_then = ref_answer[i]
                    with torch.no_grad():
                        logp_now = policy.logp(torch.tensor([i]), torch.tensor([ans_then]))
                    measured = abs(logp_then - float(logp_now))
                    side["exact"].append(measured)
                    side["version"].append(tracker.drift_since_visit(pid))
                    side["calibrated"].append(c * side["version"][-1])
                    then = probe_logp[visit_version[i]]
                    side["probe"].append(float((then - probe_logp[now]).abs().mean()))
                    if s.rho_mode == "kl_exact":
                        drift = measured
                u = tracker.observe(pid, float(rewards[j]), drift)
                rhos.append(u.rho)
                ref_answer[i] = (float(answers[j]), float(logp_after[j]))
                visit_version[i] = now
                sampler.refresh(pid, tracker.value(pid), tracker.n_eff(pid))
            n = min(s.calibration, len(side["exact"]))
            calib = [0.9 * calib[0] + sum(side["exact"][:n]),
                     0.9 * calib[1] + sum(side["version"][:n])]  # fmt: skip
            if side["exact"]:
                # D >= d_half * log2(1 / rho_min) puts rho on its lower bound
                at_min = s.d_half * math.log2(1.0 / s.rho_min)
                for name, ds in side.items():
                    row[f"drift/{name}_mean"] = float(np.mean(ds))
                    row[f"drift/{name}_at_min"] = float(np.mean(np.asarray(ds) >= at_min))
            row["tracker/rho_mean"] = float(np.mean(rhos))
            # share of updates whose discount sits on a clip bound (reference: rho_clip_ratio)
            row["tracker/rho_clip_frac"] = float(
                np.mean([(x <= s.rho_min) or (x >= s.rho_max) for x in rhos])
            )
            row["tracker/rho_at_min"] = float(np.mean([x <= s.rho_min for x in rhos]))
            row["tracker/rho_at_max"] = float(np.mean([x >= s.rho_max for x in rhos]))
            true_p = policy.success_prob()
            seen = [i for i, p in enumerate(pids) if tracker.visits(p) > 0]
            v_seen, _ = tracker.values([pids[i] for i in seen])
            row["tracker/abs_error"] = float(np.mean(np.abs(v_seen - true_p[seen])))
        for pid in set(batch):
            sampler.release(pid)

        row["eval/true_accuracy"] = float(policy.success_prob().mean())
        result.history.append(row)
        if on_step is not None:
            on_step(row)
    return result


# ------------------------------------------------------------------------------ builder
# `agent-spo bench bandit` with no config file starts from these instead of the LLM demo's
# values (a learning rate of 1e-6 would not move a 300-parameter policy).
BANDIT_DEFAULT_OVERRIDES = (
    "run.name=bandit",
    "learner.lr=0.05",
    "learner.weight_decay=0.0",
    "learner.batch_size=64",
    "learner.mini_batches=2",
)


def settings_from_config(
    cfg, *, algo: Literal["spo", "grpo"], seed: int, n_prompts: int, steps: int
) -> BanditSettings:
    """Builder: the run config's algorithm, loss and learner sections as plain arguments."""
    a, loss, lr = cfg.algo, cfg.loss, cfg.learner
    if algo == "grpo" and lr.batch_size % a.grpo.group_size:
        raise ValueError(
            f"learner.batch_size ({lr.batch_size}) must be a multiple of "
            f"algo.grpo.group_size ({a.grpo.group_size}) to run GRPO with the same budget"
        )
    if algo == "spo" and lr.batch_size > n_prompts:
        raise ValueError(
            f"learner.batch_size ({lr.batch_size}) exceeds the number of prompts ({n_prompts}):"
            " SPO draws distinct prompts within a batch"
        )
    return BanditSettings(
        algo=algo,
        n_prompts=n_prompts,
        steps=steps,
        batch_size=lr.batch_size,
        mini_batches=lr.mini_batches,
        lr=lr.lr,
        betas=tuple(lr.betas),
        weight_decay=lr.weight_decay,
        grad_clip=lr.grad_clip,
        eps_low=loss.eps_low,
        eps_high=loss.eps_high,
        dual_clip_c=loss.dual_clip_c,
        baseline=a.baseline,
        adv_eps=a.adv_eps,
        rho_mode=a.rho.mode,
        rho_min=a.rho.rho_min,
        rho_max=a.rho.rho_max,
        d_half=a.rho.d_half,
        rho_constant=a.rho.constant,
        init=a.init.mode,
        n0=a.init.n0,
        sampler=a.sampler.mode,
        sampler_eps=a.sampler.eps,
        sampler_gamma=a.sampler.gamma,
        group_size=a.grpo.group_size,
        grpo_eps=a.grpo.std_eps,
        seed=seed,
        task_seed=cfg.run.seed,
    )


# ------------------------------------------------------------------------------ report
def steps_to_reach(history: list[dict], target: float) -> int | None:
    """First step (1-based) whose true accuracy is >= target; None if never."""
    for row in history:
        if row["eval/true_accuracy"] >= target:
            return row["step"] + 1
    return None


def summarize(results: list[BanditResult], target: float) -> dict[str, dict]:
    """Per algorithm: medians over seeds of the final accuracy and steps to the target."""
    out: dict[str, dict] = {}
    for algo in dict.fromkeys(r.settings.algo for r in results):
        runs = [r for r in results if r.settings.algo == algo]
        reach = [steps_to_reach(r.history, target) for r in runs]
        reached = [x for x in reach if x is not None]
        row = {
            "seeds": len(runs),
            "initial_accuracy": float(np.median([r.initial_accuracy for r in runs])),
            "final_accuracy": float(np.median([r.final_accuracy for r in runs])),
            "final_accuracy_all": [round(r.final_accuracy, 4) for r in runs],
            f"steps_to_{target:g}": float(np.median(reached))
            if len(reached) == len(runs)
            else None,
        }
        for key in (
            "grpo/frac_degenerate",
            "tracker/abs_error",
            "tracker/rho_mean",
            "tracker/rho_clip_frac",
            "tracker/rho_at_min",
            "tracker/rho_at_max",
            *(
                f"drift/{n}_{q}"
                for n in ("exact", "version", "probe", "calibrated")
                for q in ("mean", "at_min")
            ),  # fmt: skip
        ):
            vals = [h[key] for r in runs for h in r.history if key in h]
            if vals:
                row[f"mean {key}"] = float(np.mean(vals))
        out[algo] = row
    return out


def plot_curves(results: list[BanditResult], path) -> None:
    """Accuracy per step (median over seeds, band = min..max) and GRPO's degenerate share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_deg) = plt.subplots(1, 2, figsize=(11, 4))
    for algo, color in (("spo", "tab:blue"), ("grpo", "tab:orange")):
        runs = [r for r in results if r.settings.algo == algo]
        if not runs:
            continue
        acc = np.array(
            [[r.initial_accuracy] + [h["eval/true_accuracy"] for h in r.history] for r in runs]
        )
        x = np.arange(acc.shape[1])
        ax_acc.plot(x, np.median(acc, 0), color=color, label=algo.upper())
        ax_acc.fill_between(x, acc.min(0), acc.max(0), color=color, alpha=0.2)
        if algo == "grpo":
            deg = np.array([[h["grpo/frac_degenerate"] for h in r.history] for r in runs])
            ax_deg.plot(x[1:], np.median(deg, 0), color=color, label="GRPO degenerate groups")
        else:
            nz = np.array([[h["adv/frac_near_zero"] for h in r.history] for r in runs])
            ax_deg.plot(x[1:], np.median(nz, 0), color=color, label="SPO |A| <= 0.02")
    ax_acc.set(
        xlabel="training step (same samples per step)",
        ylabel="true accuracy",
        title="Bernoulli bandit: mean success probability over all prompts",
    )
    ax_deg.set(
        xlabel="training step",
        ylabel="share of samples",
        ylim=(0, 1),
        title="samples with (near-)zero advantage",
    )
    ax_acc.legend()
    ax_deg.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bandit_bench(
    cfg,
    *,
    algos: Sequence[str],
    seeds: int,
    prompts: int,
    steps: int,
    target: float,
    out_dir: Path,
    on_run: Callable[[BanditSettings], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, dict]:
    """`agent-spo bench bandit`: every algorithm x seed; writes config.yaml, metrics.jsonl,
    summary.json and curves.png to ``out_dir``; returns the summary (medians per algo).

    Raises ValueError for an algorithm other than spo/grpo or settings the bandit cannot
    run, before any work."""
    import json

    from agent_spo.config import write_resolved

    bad = [a for a in algos if a not in ("spo", "grpo")]
    if bad or not algos:
        raise ValueError(f"--algos: got {bad or list(algos)}; allowed: spo, grpo")
    checked = cast(Sequence[Literal["spo", "grpo"]], algos)  # every name checked just above
    plans = [
        settings_from_config(cfg, algo=a, seed=seed, n_prompts=prompts, steps=steps)
        for a in checked
        for seed in range(seeds)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out_dir)
    results = []
    with (out_dir / "metrics.jsonl").open("w") as metrics:
        for plan in plans:
            if on_run is not None:
                on_run(plan)

            def log(row: dict, plan: BanditSettings = plan) -> None:
                metrics.write(json.dumps({"algo": plan.algo, "seed": plan.seed, **row}) + "\n")
                if on_step is not None:
                    on_step()

            results.append(run_bandit(plan, on_step=log))
    summary = summarize(results, target)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(results, out_dir / "curves.png")
    return summary
