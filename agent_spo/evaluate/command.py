"""`agent-spo eval` on screen: config and checkpoint resolution, progress bar, tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent_spo.evaluate.config import EvalConfig, load_eval_config


def model_dir_of(checkpoint: Path) -> Path:
    """The model directory of a checkpoint, a run's checkpoints/ folder, or a run directory."""
    from agent_spo.checkpoint import Checkpoint, latest_checkpoint

    p = Path(checkpoint)
    if (p / "config.json").is_file():  # already a model directory
        return p
    found = []
    if (p / "model" / "config.json").is_file():  # one ckpt-* directory
        found.append(Checkpoint(p, 0, {}))
    for root in (p, p / "checkpoints"):
        if not found and root.is_dir():
            ckpt = latest_checkpoint(root)
            if ckpt is not None and (ckpt.model_dir / "config.json").is_file():
                found.append(ckpt)
    if found:
        if not found[0].has_weights:
            raise ValueError(
                f"--checkpoint {p}: {found[0].path.name} holds sharded weights (written by "
                f"several learner ranks): export it first (agent-spo export {p} --out DIR) "
                "and evaluate DIR"
            )
        return found[0].model_dir
    raise ValueError(
        f"--checkpoint {p}: no model found (expected a ckpt-* directory with model/, a run's "
        "checkpoints/ directory, a run directory, or a model directory)"
    )


# How a policy was trained to talk: evaluated "as trained", a checkpoint gets these from
# its run's config.yaml unless the command line sets them.
TRAINED_FORMAT = ("tool_format", "max_turns", "enable_thinking", "tools", "system_prompt",
                  "tool_output_chars")  # fmt: skip


def trained_format(checkpoint: Path, overrides: Sequence[str]) -> list[str]:
    """Overrides that evaluate a checkpoint in the format its run trained with (read from
    the run's ``config.yaml``), leaving out the keys ``overrides`` sets; [] when no run
    config is found (a bare model directory)."""
    import json

    import yaml

    p = Path(checkpoint)
    for run in (p, p.parent, p.parent.parent):  # run dir, checkpoints/, ckpt-*
        cfg = run / "config.yaml"
        if cfg.is_file() and (run / "checkpoints").is_dir():
            rollout = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("rollout")
            break
    else:
        return []
    given = {o.split("=", 1)[0].strip() for o in overrides}
    return [
        f"rollout.{k}={json.dumps(rollout[k])}"
        for k in TRAINED_FORMAT
        if isinstance(rollout, dict) and k in rollout and f"rollout.{k}" not in given
    ]


def build_config(
    config: str,
    overrides: Sequence[str],
    *,
    checkpoint: Path | None,
    samples: int | None,
    problems: int | None,
    out: Path | None,
) -> EvalConfig:
    """The eval config with the command-line options applied as overrides; with a
    checkpoint, in the format its run trained with (:func:`trained_format`) unless the
    overrides say otherwise."""
    extra = [] if checkpoint is None else trained_format(checkpoint, overrides)
    extra += list(overrides)
    if samples is not None:
        extra.append(f"eval.n={samples}")
    if problems is not None:
        extra.append(f"eval.max_problems={problems}")
    if out is not None:
        extra += [f"run.output_dir={out.parent}", f"run.name={out.name}"]
    if checkpoint is not None:
        extra.append(f"model.path={model_dir_of(checkpoint)}")
    return load_eval_config(config, extra)


def progress_bar(console: Console):
    """A rich bar fed by run_eval's progress callback; returns (bar, callback)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )  # fmt: skip
    task = bar.add_task("samples", total=None)

    def update(state) -> None:
        acc = state.correct / max(1, state.done - state.dropped)
        bar.update(
            task, total=state.total, completed=state.done,
            description=f"{state.dataset}  correct {acc:.2f}  dropped {state.dropped}",
        )  # fmt: skip

    return bar, update


def results_table(results: dict, title: str) -> Table:
    """The per-dataset table and the unweighted mean (percentages)."""
    ks, n = results["k"], results["n"]
    cols = [f"avg@{n}", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)]
    table = Table(title=title, title_justify="left")
    for c in ("dataset", "problems", "dropped", "unscored", *cols):
        table.add_column(c, justify="left" if c == "dataset" else "right")
    for name, d in results["datasets"].items():
        table.add_row(
            name, str(d["problems"]), str(d["dropped"]), str(d["unscored"]),
            *(f"{100 * d['metrics'][c]:.1f}" for c in cols),
        )  # fmt: skip
    table.add_section()
    table.add_row("mean", "", "", "", *(f"{100 * results['mean'][c]:.1f}" for c in cols),
                  style="bold")  # fmt: skip
    return table


def print_results(results: dict, title: str, console: Console | None = None) -> None:
    """The results table on stdout; piped output gets room for every column."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 40 + 9 * (1 + 2 * len(results["k"])))
    console.print(results_table(results, title))
