"""The curves of a run as one PNG (``RUN_DIR/curves.png``; ``agent-spo plot RUN_DIR``).

Six panels over learner steps: reward and held-out accuracy; tool use and the share of
sandbox runs that failed; the baseline against the reward; the learning signal
(zero-advantage share, clip fraction); the policy drift; and where the time went
(learner busy vs waiting for data). Several run directories can be drawn on the same
axes to compare SPO with GRPO.
"""

from __future__ import annotations

from pathlib import Path

from agent_spo.metrics import read_metrics


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(y: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= window:
            acc -= y[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(*run_dirs: Path, out: Path | None = None) -> Path:
    """Draw the runs' metrics.jsonl; returns the PNG path (default: first run's curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: is {d} a training run directory?")
        runs.append((Path(d).name, read_metrics(path)))
    out = Path(out) if out is not None else Path(run_dirs[0]) / "curves.png"
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    ax = axes.ravel()
    for i, (name, rows) in enumerate(runs):
        color = f"C{i}"
        x, y = _series(rows, "reward/mean")
        if y:
            ax[0].plot(x, y, color=color, alpha=0.25, lw=0.8)
            ax[0].plot(x, _smooth(y, 10), color=color, label=f"{name} reward (10-step mean)")
        x, y = _series(rows, "eval/accuracy")
        ax[0].plot(x, y, "o-", color=color, ms=4, lw=1.8, label=f"{name} held-out accuracy")
        x, y = _series(rows, "tool/calls_per_episode")
        ax[1].plot(x, _smooth(y, 10), color=color, label=f"{name} calls/episode")
        x, y = _series(rows, "eval/tool_use_rate")
        ax[1].plot(x, y, "o--", color=color, ms=4, label=f"{name} held-out tool use")
        x, y = _series(rows, "sandbox/failed_frac")
        if y:
            ax[1].plot(x, _smooth(y, 10), color=color, ls=":", label=f"{name} sandbox runs failed")
        x, y = _series(rows, "tracker/v_hat_mean")
        if y:
            ax[2].plot(x, _smooth(y, 10), color=color, label=f"{name} baseline v̂")
            xr, yr = _series(rows, "reward/mean")
            ax[2].plot(xr, _smooth(yr, 10), color=color, ls=":", label=f"{name} reward")
        x, y = _series(rows, "loss/adv_zero_frac")
        if not x:  # a GRPO run: its zero-advantage samples are the degenerate groups'
            x, y = _series(rows, "grpo/samples_degenerate_frac")
        ax[3].plot(x, _smooth(y, 10), color=color, label=f"{name} zero-advantage share")
        x, y = _series(rows, "loss/clip_frac")
        ax[3].plot(x, _smooth(y, 10), color=color, ls=":", label=f"{name} clip fraction")
        x, y = _series(rows, "tracker/drift")
        ax[4].plot(x, y, color=color, label=f"{name} drift d_s")
        x, busy = _series(rows, "perf/learner_s")
        _, wait = _series(rows, "perf/wait_s")
        if busy and len(busy) == len(wait):
            idle = [w / (w + b) if w + b > 0 else 0.0 for w, b in zip(wait, busy, strict=True)]
            ax[5].plot(x, _smooth(idle, 10), color=color, label=f"{name} learner idle share")
    titles = ("reward and held-out accuracy", "tool use", "baseline vs reward",
              "learning signal", "policy drift per step", "learner idle share")  # fmt: skip
    for a, t in zip(ax, titles, strict=True):
        a.set_title(t)
        a.set_xlabel("learner step")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    ax[5].set_ylim(0, 1)
    fig.suptitle(", ".join(name for name, _ in runs))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
