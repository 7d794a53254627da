"""The learning benchmark: SPO against matched GRPO, and SPO's ablations, over seeds.

Every variant is the same run (model, data, loss, learner, engine, workers, batch size and
steps, so the same number of trained trajectories) except for the algorithm:

    spo          the config as given (value tracker baseline, offline init, priorities)
    grpo         G = 4 episodes per prompt behind a group barrier, uniform prompts
    no_baseline  SPO with A = r (spec §2 ablation)
    no_init      SPO with the tracker starting from its prior (no offline estimate)

Each (variant, seed) is a full ``agent-spo train`` run under ``OUT/{variant}-s{seed}``;
finished runs are reused, so an interrupted benchmark continues where it stopped. The
offline estimate of a seed is made once (by its spo run) and reused by no_baseline.
Results: ``OUT/learning.json``, ``OUT/learning.md`` and ``OUT/learning.png``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from agent_spo.config import load_config
from agent_spo.metrics import read_metrics

VARIANTS: dict[str, list[str]] = {
    "spo": [],
    "grpo": ["algo.name=grpo", "algo.grpo.group_size=4", "algo.sampler.mode=uniform"],
    "no_baseline": ["algo.baseline=false"],
    "no_init": ["algo.init.mode=none"],
}


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


async def run_learning_bench(
    config: str | None,
    overrides: list[str],
    out: Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] = tuple(VARIANTS),
    log: Callable[[str], None] = print,
) -> dict:
    from agent_spo.train import run_training

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(variants, key=lambda v: v != "spo")  # spo first: it makes the estimate
    for seed in seeds:
        for variant in order:
            run_dir = out / f"{variant}-s{seed}"
            if (run_dir / "summary.json").exists():
                log(f"{run_dir.name}: done before, reused")
                continue
            extra = list(VARIANTS[variant])
            values = out / f"spo-s{seed}" / "values.jsonl"
            if variant == "no_baseline" and values.exists():
                extra.append(f"algo.init.values_path={values}")
            cfg = load_config(config, [*overrides, *extra, f"run.seed={seed}",
                                       f"run.output_dir={out}", f"run.name={run_dir.name}"])  # fmt: skip
            # anything started before (estimate, evaluation, steps) continues; a changed
            # learning setting is refused by the resume check, naming the key
            resume = (run_dir / "config.yaml").exists()
            log(f"{run_dir.name}: training{' (resumed)' if resume else ''}")

            def run_log(m: str, n: str = run_dir.name) -> None:
                log(f"  {n}: {m}")

            await run_training(cfg, resume=resume, log=run_log)
    result = summarize(out, seeds, variants)
    (out / "learning.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "learning.md").write_text(to_markdown(result))
    plot_learning(out, result)
    return result


def summarize(out: Path, seeds: Sequence[int], variants: Sequence[str]) -> dict:
    """Per variant: accuracy curve (mean over seeds), final and initial accuracy, learning
    signal, advantage variance, sampled trajectories and time."""
    result: dict = {"seeds": list(seeds), "variants": {}}
    for variant in variants:
        runs = []
        for seed in seeds:
            run_dir = out / f"{variant}-s{seed}"
            rows = read_metrics(run_dir / "metrics.jsonl")
            summary = json.loads((run_dir / "summary.json").read_text())
            train_rows = [r for r in rows if "reward/mean" in r]
            # with A = r (no baseline) a zero raw advantage is just a failure, not a lack
            # of signal: the share is not reported for that variant
            zero_key = {"grpo": "grpo/samples_degenerate_frac", "no_baseline": None}.get(
                variant, "loss/adv_zero_frac"
            )
            est = summary.get("values", {})
            runs.append({
                "seed": seed,
                "curve": {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r},
                "final": summary["held_out"]["accuracy"],
                "before": next((r["eval/accuracy"] for r in rows
                                if r["step"] == 0 and "eval/accuracy" in r), None),  # fmt: skip
                "zero_adv": _mean([r[zero_key] for r in train_rows if zero_key in r])
                if zero_key
                else None,
                "adv_var": _mean([r["loss/adv_raw_var"] for r in train_rows]),
                "trained": sum(1 for _ in open(run_dir / "episodes.jsonl")),
                "sampled": train_rows[-1]["rollout/episodes"] if train_rows else 0,
                "estimate_prompts": est.get("prompts", 0),
                "train_s": summary.get("train_s"),
            })  # fmt: skip
        steps = sorted(set.intersection(*(set(r["curve"]) for r in runs)))
        result["variants"][variant] = {
            "curve": {s: _mean([r["curve"][s] for r in runs]) for s in steps},
            "final_mean": _mean([r["final"] for r in runs]),
            "final_std": _std([r["final"] for r in runs]),
            "before_mean": _mean([r["before"] for r in runs if r["before"] is not None]),
            "zero_adv_share": _mean([r["zero_adv"] for r in runs if r["zero_adv"] is not None]),
            "adv_raw_var": _mean([r["adv_var"] for r in runs]),
            "trained_trajectories": _mean([r["trained"] for r in runs]),
            "sampled_episodes": _mean([r["sampled"] for r in runs]),
            "train_s": _mean([r["train_s"] for r in runs if r["train_s"] is not None]),
            "runs": runs,
        }
    return result


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"  # NaN: not measured for this variant


def to_markdown(result: dict) -> str:
    lines = [
        "| variant | held-out before | final (mean ± std) | zero-advantage share | "
        "raw advantage variance | trained trajectories | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        lines.append(
            f"| {name} | {v['before_mean']:.3f} | {v['final_mean']:.3f} ± {v['final_std']:.3f} "
            f"| {_fmt(v['zero_adv_share'])} | {v['adv_raw_var']:.3f} | "
            f"{v['trained_trajectories']:.0f} | {v['train_s']:.0f} |"
        )
    return "\n".join(lines) + f"\n\nseeds: {result['seeds']}\n"


def plot_learning(out: Path, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for i, (name, v) in enumerate(result["variants"].items()):
        steps = [int(s) for s in v["curve"]]
        ax.plot(steps, list(v["curve"].values()), "o-", color=f"C{i}", label=name)
        lo = [min(r["curve"][s] for r in v["runs"]) for s in v["curve"]]
        hi = [max(r["curve"][s] for r in v["runs"]) for s in v["curve"]]
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_xlabel("learner step (same trajectories per step for every variant)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"demo: mean over seeds {result['seeds']} (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "learning.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
