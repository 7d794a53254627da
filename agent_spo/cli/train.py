"""`agent-spo train`, `config`, `rollout`, `estimate-values` and `plot`: a training run and
the commands around it, all reading the same training config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from agent_spo.cli.args import (
    EXIT_FAILED,
    EXIT_SANDBOX,
    ConfigArg,
    OverridesArg,
    bar_columns,
    cell,
    fail,
    load,
    stderr,
    stdout,
)
from agent_spo.config import dump_config


def config(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Print the fully resolved training config as YAML (defaults filled, overrides applied).

    Validates the schema (a bad key or value exits with code 2 and names it); `train
    --dry-run` also checks what only training refuses (e.g. an engine that cannot take
    the learner's weights).

    Example: `agent-spo config configs/demo.yaml algo.rho.mode=constant`
    """
    typer.echo(dump_config(load(config, overrides)), nl=False)


def train(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate and print the resolved config; train nothing."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run from its latest checkpoint."),
    ] = False,
) -> None:
    """Train a policy with SPO (or GRPO for comparison) from a YAML config.

    Runs the single-stream loop: sample a prompt, play a multi-turn episode with the
    sandboxed Python tool, verify the answer, update the value tracker, and step the
    learner on each batch of finished trajectories. Writes checkpoints, metrics, episode
    logs and the resolved config under run.output_dir/run.name. The config is validated
    before any work; a bad key exits with code 2.
    """
    cfg = load(config, overrides)
    from agent_spo.data.problems import DatasetError
    from agent_spo.dist import torchrun_env

    launched = torchrun_env()
    if launched is not None and launched[0] > 0 and not dry_run:
        from agent_spo.dist.rank import torchrun_main

        torchrun_main()  # a learner rank only: rank 0 runs the pipeline and speaks for the run
        return
    if dry_run:
        from agent_spo.builders import build_datasets, check_model_path
        from agent_spo.config import check_trainable

        try:
            train_prompts = len(build_datasets(cfg.data, cfg.run.seed)[0])
        except DatasetError as e:
            fail(f"data.train: {e}")
        from agent_spo.memory import check_memory

        memory, too_big = check_memory(cfg)
        if memory is not None:
            stderr.print(memory.table(), soft_wrap=True, highlight=False)
        for line in setting_lines(cfg):
            stderr.print(line, soft_wrap=True, highlight=False, markup=False)
        placement = check_placement(cfg)
        problems = check_trainable(cfg, train_prompts) + check_model_path(cfg.model) + too_big
        if problems := problems + placement:
            fail("; ".join(problems))
        stderr.print(Text("config ok", style="green"))
        typer.echo(dump_config(cfg), nl=False)
        return
    import asyncio

    from rich.progress import Progress

    from agent_spo.cluster.ray_cluster import ClusterError
    from agent_spo.dist.group import RankFailed
    from agent_spo.engines.base import EngineError
    from agent_spo.metrics import LoggerUnavailable
    from agent_spo.pipeline import AllEpisodesDropped
    from agent_spo.rundir import RunDirUnlockable, RunLocked
    from agent_spo.train import NothingToResume, RunExists, UnsupportedConfig, run_training
    from agent_spo.values import ValuesFileError
    from sandboxes.errors import SandboxCheckFailed

    with Progress(*bar_columns(), console=stderr) as bar:
        task = bar.add_task("training", total=cfg.train.total_steps)
        est = None
        held_out = float("nan")

        def on_estimate(s) -> None:
            nonlocal est
            if est is None:
                est = bar.add_task("initial values", total=s.prompts_total)
            bar.update(est, completed=s.prompts_done,
                       description=f"initial values  mean v0 {s.mean_value:.2f}")  # fmt: skip

        def on_metrics(m: dict) -> None:
            nonlocal held_out
            held_out = m.get("eval/accuracy", held_out)
            eps = m["rollout/episodes"] / max(1e-9, m["perf/elapsed_s"])
            bar.update(
                task,
                completed=m["step"],
                description=f"{cfg.algo.name}  reward {m['reward/mean']:.2f}  "
                f"held-out {'-' if held_out != held_out else f'{held_out:.2f}'}  "
                f"tool calls {m['tool/calls_per_episode']:.2f}  {eps:.1f} ep/s" + fleet_text(m),
            )

        try:
            summary = asyncio.run(
                run_training(
                    cfg,
                    resume=resume,
                    log=bar.console.print,
                    on_metrics=on_metrics,
                    on_estimate=on_estimate,
                )  # fmt: skip
            )
        except (RunExists, UnsupportedConfig, NothingToResume, RunDirUnlockable) as e:
            fail(str(e))
        except DatasetError as e:
            fail(f"data.train: {e}")
        except ValuesFileError as e:
            fail(f"algo.init.values_path: {e}")
        except (RunLocked, RankFailed, ClusterError, LoggerUnavailable) as e:
            fail(str(e), EXIT_FAILED)
        except EngineError as e:  # e.g. no replica answers, or none took the weights
            fail(f"rollout engine: {e}; checkpoints written so far are kept: continue with "
                 "--resume once fixed", EXIT_FAILED)  # fmt: skip
        except SandboxCheckFailed as e:
            fail(f"sandbox: {e}; nothing was trained", EXIT_SANDBOX)
        except AllEpisodesDropped as e:
            fail(f"{e}; checkpoints written so far are kept: continue with --resume once "
                 "fixed", EXIT_FAILED)  # fmt: skip
    stderr.print(done_line(summary))


def check_placement(cfg) -> list[str]:
    """With cluster.backend ray and cluster.nodes: print where each process goes on those
    nodes, or return why they do not fit (one line naming the key)."""
    from agent_spo.cluster.plan import PlacementError, bundles, describe, place, planned_nodes

    c = cfg.cluster
    if c.backend != "ray" or c.nodes is None:
        return []
    try:
        nodes = place(bundles(c, cfg.learner.world_size), planned_nodes(c),
                      spread_sandboxes=c.sandbox_spread)  # fmt: skip
    except PlacementError as e:
        return [f"cluster.nodes: the processes do not fit {c.nodes} node(s) of "
                f"{c.gpus_per_node} GPUs and {c.cpus_per_node} CPUs: {e}"]  # fmt: skip
    stderr.print(f"placement on cluster.nodes = {c.nodes} (Ray packs the learner ranks and "
                 "engine replicas, spreads the sandbox servers):\n" + describe(nodes),
                 soft_wrap=True, highlight=False, markup=False)  # fmt: skip
    return []


def fleet_text(m: dict) -> str:
    import re

    """The fleet's part of the status line: replicas and sandbox servers in rotation."""
    parts = []
    replicas = [k for k in m if re.fullmatch(r"rollout/replica\d+_version", k)]
    if replicas and "rollout/replicas_live" in m:
        parts.append(f"engines {m['rollout/replicas_live']:.0f}/{len(replicas)}")
    servers = [k for k in m if re.fullmatch(r"sandbox/server\d+_live", k)]
    if servers:
        parts.append(f"sandboxes {m['sandbox/servers_live']:.0f}/{len(servers)}")
    return ("  " + "  ".join(parts)) if parts else ""


def done_line(summary: dict) -> str:
    """The one line a finished training run ends with: steps, held-out accuracy, where."""
    held, before = summary.get("held_out", {}), summary.get("held_out_before", {})
    if "accuracy" in held:
        acc = f"{held['accuracy']:.3f}"
        if "accuracy" in before:
            acc = f"{before['accuracy']:.3f} -> {acc}"
        acc = f"held-out accuracy {acc} over {held.get('episodes', 0)} episodes"
    else:
        acc = "no held-out evaluation"
    return (
        f"done: {summary['steps']} steps in {summary.get('train_s', 0):.0f} s; {acc}; "
        f"run directory {summary['run_dir']}"
        + (f"; curves {summary['plot']}" if "plot" in summary else "")
    )


def rollout(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Episodes to run.")] = 64,
    split: Annotated[
        str, typer.Option(help="Prompts to use: held_out (default) or train.")
    ] = "held_out",
    out: Annotated[
        Path | None,
        typer.Option(help="Episode log (JSON lines). Default: RUN_DIR/rollout.jsonl."),
    ] = None,
) -> None:
    """Run N episodes with the current model and write the episode log (JSON lines).

    Uses the config's model, engine, tool format, sandbox and verifier, cycling through
    the chosen split's prompts in order. Prints accuracy, tool use, valid-call rate and
    stop reasons, and writes them beside the log as .summary.json. The log is the input
    of `agent-spo replay` and evaluation.

    Example: `agent-spo rollout configs/demo.yaml --n 200 rollout.tool_format=retool`
    """
    import asyncio

    from rich.progress import Progress

    from agent_spo.rollout import EmptySplit, rollout_from_config

    cfg = load(config, overrides)
    if split not in ("held_out", "train"):
        fail(f"--split must be held_out or train, got {split!r}")
    out = out or Path(cfg.run.output_dir) / cfg.run.name / "rollout.jsonl"
    with Progress(*bar_columns(), console=stderr, transient=True) as bar:
        task = bar.add_task("episodes", total=n)

        def progress(s) -> None:
            bar.update(task, completed=s.episodes + s.dropped,
                       description=f"episodes  acc {s.accuracy:.2f}  tool use "
                       f"{s.used_tool / max(1, s.episodes):.2f}")  # fmt: skip

        try:
            summary = asyncio.run(
                rollout_from_config(cfg, n, split, out, log=stderr.print, progress=progress)
            )
        except EmptySplit as e:
            fail(str(e))
    d = summary.to_dict()
    table = Table(title="rollout", show_header=False)
    for key in ("episodes", "dropped", "drop_causes", "accuracy", "tool_use_rate",
                "valid_call_rate", "tool_calls", "tool_faults", "stop_reasons", "episodes_per_s",
                "wall_s"):  # fmt: skip
        table.add_row(key, cell(d[key]))
    stdout.print(table)
    stderr.print(f"episode log: {out}")
    if why := summary.failure():
        fail(f"{why} (log and summary written beside {out})", EXIT_FAILED)


def estimate_values(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    out: Annotated[Path, typer.Option(help="Where to write per-prompt success counts.")] = Path(
        "values.jsonl"
    ),
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted estimate in OUT (same config)."),
    ] = False,
) -> None:
    """Estimate each prompt's initial success rate v0 for the value tracker (spec §1).

    Samples algo.init.n0 episodes per prompt from the initial policy with the same tool
    loop, verifies them, and writes per-prompt success counts; pass the file to training
    as algo.init.values_path.
    """
    import asyncio

    from rich.progress import Progress

    from agent_spo.values import estimate_from_config

    cfg = load(config, overrides)
    if out.exists() and not resume:
        fail(f"{out} exists: pass --resume to continue that estimate (made with the same "
             "model and config), or choose another --out")  # fmt: skip
    with Progress(*bar_columns(), console=stderr, transient=True) as bar:
        task = bar.add_task("prompts", total=None)

        def progress(s) -> None:
            bar.update(task, completed=s.prompts_done, total=s.prompts_total,
                       description=f"prompts  mean v0 {s.mean_value:.2f}")  # fmt: skip

        state, summary = asyncio.run(
            estimate_from_config(cfg, out, log=stderr.print, progress=progress)
        )
    stderr.print(
        f"{summary['prompts']} prompts, {state.episodes} scored episodes in {state.wall_s:.0f} s "
        f"({state.dropped} dropped, {state.unscored} unscored); mean v0 "
        f"{summary.get('mean_value', 0):.3f}, always solved {summary.get('always_solved', 0):.2f},"
        f" never solved {summary.get('never_solved', 0):.2f}\nvalues file: {out}  (train with "
        f"algo.init.values_path={out})"
    )
    if why := state.failure():
        fail(f"{why} (rows so far kept in {out}; continue with --resume)", EXIT_FAILED)


def plot(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="One or more run directories (drawn on the same axes).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="PNG to write. Default: FIRST_RUN/curves.png.")
    ] = None,
) -> None:
    """Draw a run's curves (reward, held-out accuracy, tool use, baseline, drift, idle time)."""
    from agent_spo.plot import plot_run

    try:
        path = plot_run(*run_dirs, out=out)
    except FileNotFoundError as e:
        fail(str(e))
    stderr.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Put this module's commands on the root app."""
    app.command()(config)
    app.command()(train)
    app.command()(rollout)
    app.command("estimate-values")(estimate_values)
    app.command()(plot)


def setting_lines(cfg) -> list[str]:
    """What a dry run says of the run's setting: the rollout, the reward, the regime."""
    r, L, loss = cfg.rollout, cfg.learner, cfg.loss
    rollout = (f"rollout: {cfg.algo.name}, thinking {'on' if r.enable_thinking else 'off'}, "
               f"{r.tool_format} tool calls, up to {r.max_turns} turns and "
               f"{r.max_response_tokens} generated tokens in all")  # fmt: skip
    conditions = [c for c, on in (("exactly one </think>", cfg.reward.one_think_close),
                                  ("no tool call after </think>",
                                   cfg.reward.no_tool_call_after_think)) if on]  # fmt: skip
    reward = "reward: the verifier's" + (
        ", and 0 unless " + " and ".join(conditions) if conditions else ""
    )
    if L.max_staleness == 0 and loss.logp_old == "recompute":
        regime = ("regime: fresh batches (learner.max_staleness 0), old log-probs recomputed "
                  "by the learner: the paper's")  # fmt: skip
    else:
        centre = {
            "behaviour": "the clip centred on the sampling policy's log-probs",
            "recompute": "the clip centred on the learner's recomputed log-probs, "
            "the lag uncorrected",
            "decoupled": "decoupled: the clip centred on the learner's recomputed "
            "log-probs, each token weighted by pi_recomputed / pi_behaviour"
            + (f" capped at {loss.tis_cap:g}" if loss.tis_cap else ""),
        }
        regime = (f"regime: streaming (episodes up to {L.max_staleness} versions stale), "
                  f"{centre[loss.logp_old]}")  # fmt: skip
    return [rollout, reward, regime]
