"""`agent-spo bench ...`: the benchmarks whose numbers the README quotes (the code is in
:mod:`agent_spo.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from agent_spo.cli.args import (
    EXIT_FAILED,
    ConfigArg,
    OverridesArg,
    cell,
    fail,
    load,
    positive_ints,
    split_config,
    stderr,
    stdout,
)

app = typer.Typer(
    help="Benchmarks that back changes to the algorithm and pipeline with numbers.",
    no_args_is_help=True,
)


@app.command("bandit")
def bench_bandit(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    prompts: Annotated[int, typer.Option(help="Prompts in the synthetic task set.", min=2)] = 256,
    steps: Annotated[int, typer.Option(help="Training steps per run.", min=1)] = 150,
    seeds: Annotated[
        int, typer.Option(help="Seeds per algorithm (medians are reported).", min=1)
    ] = 3,
    algos: Annotated[
        str, typer.Option(help="Comma-separated algorithms to run: spo, grpo.")
    ] = "spo,grpo",
    target: Annotated[
        float, typer.Option(help="Report the steps needed to reach this true accuracy.")
    ] = 0.5,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory. Default: <run.output_dir>/<run.name>."),
    ] = None,
) -> None:
    """SPO vs GRPO on a synthetic Bernoulli bandit, with the real algorithm core (seconds).

    Each prompt is answered correctly with probability sigmoid(difficulty + features·w +
    bias); SPO (value tracker, prioritised sampler, global normalisation) and GRPO
    (groups of G, uniform prompts) train the same policy with the same PPO-clip loss and
    the same samples per step. Writes config.yaml, metrics.jsonl, summary.json and
    curves.png. Without CONFIG, the defaults get bandit-sized learner settings
    (lr 0.05, batch 64, 2 mini-batches, no weight decay); overrides such as
    algo.rho.mode=constant or algo.baseline=false run the paper's ablations.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from agent_spo.bench.bandit import BANDIT_DEFAULT_OVERRIDES, run_bandit_bench

    config, user = split_config(config, overrides)
    cfg = load(config, [*BANDIT_DEFAULT_OVERRIDES, *user] if config is None else user)
    out_dir = out if out is not None else Path(cfg.run.output_dir) / cfg.run.name
    names = [a.strip() for a in algos.split(",") if a.strip()]
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=stderr) as bar:
        task = bar.add_task("bandit", total=len(names) * seeds * steps)
        try:
            summary = run_bandit_bench(
                cfg, algos=names, seeds=seeds, prompts=prompts, steps=steps, target=target,
                out_dir=out_dir,
                on_run=lambda plan: bar.update(task, description=f"{plan.algo} seed {plan.seed}"),
                on_step=lambda: bar.advance(task),
            )  # fmt: skip
        except ValueError as e:
            fail(str(e))
    table = Table(title=f"bandit: {prompts} prompts, {steps} steps, batch "
                  f"{cfg.learner.batch_size}, median of {seeds} seed(s)")  # fmt: skip
    keys = dict.fromkeys(k for row in summary.values() for k in row if k != "final_accuracy_all")
    table.add_column("metric")
    for algo in summary:
        table.add_column(algo.upper(), justify="right")
    for k in keys:
        table.add_row(k, *(cell(summary[a].get(k)) for a in summary))
    stdout.print(table)
    typer.echo(f"wrote {out_dir}/ (config.yaml, metrics.jsonl, summary.json, curves.png)")


@app.command("learning")
def bench_learning(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated run seeds.")] = "0,1,2",
    variants: Annotated[
        str, typer.Option(help="Comma-separated: spo, grpo, no_baseline, no_init.")
    ] = "spo,grpo,no_baseline,no_init",
    out: Annotated[
        Path, typer.Option(help="Benchmark directory (one run per variant and seed).")
    ] = Path("runs/bench-learning"),
) -> None:
    """Demo SPO vs matched GRPO (same trajectories per step) and SPO's ablations, over seeds.

    Every (variant, seed) is a full training run on the config (default: the demo);
    reports the held-out accuracy curve and its final value (mean ± std over seeds), the
    share of zero-advantage samples (GRPO: degenerate groups), the raw advantage
    variance (vs the no-baseline ablation) and time. Finished runs are reused, so an
    interrupted benchmark continues. Writes learning.json, learning.md, learning.png.
    """
    import asyncio

    from rich.table import Table

    from agent_spo.bench.learning import VARIANTS, _fmt, run_learning_bench

    load(config, overrides)  # fail before any work on a bad config
    config, overrides = split_config(config, overrides)
    names = [v.strip() for v in variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        bad.append(f"--seeds {seeds!r}")
    if bad or not names or not seed_list:
        fail(f"bad --variants/--seeds: {bad or 'empty'}; variants are {', '.join(VARIANTS)}")
    from agent_spo.config import ConfigError
    from agent_spo.pipeline import AllEpisodesDropped
    from agent_spo.train import UnsupportedConfig

    try:
        result = asyncio.run(
            run_learning_bench(
                config,
                overrides,
                out,
                seeds=seed_list,
                variants=names,
                log=lambda m: stderr.print(m, soft_wrap=True),
            )  # fmt: skip
        )
    except (UnsupportedConfig, ConfigError) as e:
        fail(str(e))
    except AllEpisodesDropped as e:
        fail(f"{e}; rerun the same command to continue", EXIT_FAILED)
    table = Table(title=f"learning benchmark, seeds {seed_list}")
    for col in ("variant", "before", "final (mean ± std)", "zero-adv share", "adv var",
                "trained", "train s"):  # fmt: skip
        table.add_column(col)
    for name, v in result["variants"].items():
        table.add_row(name, f"{v['before_mean']:.3f}",
                      f"{v['final_mean']:.3f} ± {v['final_std']:.3f}",
                      _fmt(v['zero_adv_share']), f"{v['adv_raw_var']:.3f}",
                      f"{v['trained_trajectories']:.0f}", f"{v['train_s']:.0f}")  # fmt: skip
    stdout.print(table)
    stderr.print(f"results: {out}/learning.md, learning.json, learning.png")


@app.command("verify")
def bench_verify(
    cases: Annotated[
        Path | None,
        typer.Option(help="Labelled JSONL set. Default: tests/verify/cases.jsonl in the checkout."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Benchmark data folder (dapo_math_17k/, math500/) for the throughput sets. "
            "Default: ../shared/data beside the checkout when present, else synthetic golds."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes, for both verifiers.", min=1)] = 2,
    timeout: Annotated[
        float, typer.Option(help="Our wall-clock limit per check, in seconds.", min=0.01)
    ] = 2.0,
    mathverify_python: Annotated[
        str | None,
        typer.Option(
            help="Python of an environment with math-verify installed, run side by side. "
            "Default: .venv-mathverify/bin/python in the checkout when present; '': ours only."
        ),
    ] = None,
    mv_timeout: Annotated[
        float,
        typer.Option(help="math-verify's outer wall-clock limit per check (its own are 5+5 s)."),
    ] = 10.0,
    integer: Annotated[
        int, typer.Option(help="Checks in the integer throughput set.", min=1)
    ] = 2000,
    latex: Annotated[int, typer.Option(help="Checks in the LaTeX throughput set.", min=1)] = 400,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/bench-verify"),
) -> None:
    """Accuracy and speed of the verifier, side by side with HuggingFace math-verify.

    On the labelled set: accuracy, false positives, false negatives and timeouts, per
    answer type and category. On throughput sets (integer AIME/DAPO-style answers in
    long responses; MATH-500 LaTeX answers): median and p99 latency per check (inside
    the worker) and checks per second with WORKERS processes. Writes summary.json and
    per_case.jsonl.
    """
    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

    from agent_spo.bench.verify import default_inputs, run_bench, tables, write_report

    cases, data, mathverify_python = default_inputs(cases, data, mathverify_python)
    if not cases.is_file():
        fail(f"--cases: {cases} not found")
    if mathverify_python is None:
        stderr.print(Text("note: math-verify not found; running ours only (python -m venv "
                          ".venv-mathverify && .venv-mathverify/bin/pip install "
                          "'math-verify[antlr4_13_2]')", style="yellow"), soft_wrap=True)  # fmt: skip
    with Progress(SpinnerColumn(), *Progress.get_default_columns()[:1], TimeElapsedColumn(),
                  console=stderr) as bar:  # fmt: skip
        task = bar.add_task("starting", total=None)
        report = run_bench(
            cases, data, workers, timeout, mathverify_python, mv_timeout, integer, latex,
            on_stage=lambda name: bar.update(task, description=name),
        )  # fmt: skip
    write_report(report, out)
    for table in tables(report):
        stdout.print(table)
    typer.echo(f"wrote {out}/ (summary.json, per_case.jsonl)")


@app.command("throughput")
def bench_throughput(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    grpo_config: Annotated[
        Path | None,
        typer.Option(
            help="GRPO's config. Default: configs/demo_grpo.yaml without CONFIG, else "
            "CONFIG with algo.name=grpo and a uniform sampler. OVERRIDES apply to both."
        ),
    ] = None,
    cases: Annotated[
        str,
        typer.Option(
            help="Modelled episode-time distributions, comma-separated: paper, lognormal, "
            "pareto, constant (the zero-variance control). '' skips part (b)."
        ),
    ] = "paper,lognormal,pareto,constant",
    demo: Annotated[
        bool, typer.Option(help="Part (a): both configs as they are, no added delay.")
    ] = True,
    steps: Annotated[int, typer.Option(help="Learner steps per modelled run.", min=1)] = 2,
    repeats: Annotated[
        int, typer.Option(help="Runs per mode and case (medians are reported).", min=1)
    ] = 3,
    demo_steps: Annotated[int, typer.Option(help="Learner steps per demo run.", min=1)] = 8,
    demo_repeats: Annotated[int, typer.Option(help="Runs per mode on the demo.", min=1)] = 3,
    batch: Annotated[int, typer.Option(help="B for the modelled cases (paper: 24).", min=1)] = 24,
    workers: Annotated[
        int, typer.Option(help="Episodes in flight for the modelled cases (paper: 48).", min=1)
    ] = 48,
    group_size: Annotated[int, typer.Option(help="GRPO's G for the modelled cases.", min=2)] = 8,
    time_scale: Annotated[
        float,
        typer.Option(
            help="Real seconds per modelled second (paper's 553 s -> 553 x this). The "
            "pipeline's own time (about 2 s per cohort of 48 demo episodes on 2 busy cores) "
            "adds to the stream's short times: 0.1 gives the paper's ratio within 1%.",
            min=1e-6,
        ),
    ] = 0.02,
    median: Annotated[
        float, typer.Option(help="lognormal/pareto median and constant value, modelled s.")
    ] = 100.0,
    sigma: Annotated[float, typer.Option(help="lognormal: std of log time.", min=1e-6)] = 1.0,
    alpha: Annotated[float, typer.Option(help="pareto: tail index.", min=1e-6)] = 1.5,
    cap: Annotated[float, typer.Option(help="Longest modelled time, s.", min=1e-6)] = 600.0,
    seed: Annotated[int, typer.Option(help="First seed; repeat r uses seed + r.")] = 0,
    scale_gpus: Annotated[
        str | None,
        typer.Option(
            help="Also model the paper's setting (B = 2,048, 16k tokens) on these GPU "
            "counts, e.g. 8,32,128: SPO vs GRPO trajectories/s and learner idle share, "
            "with the learner's steps and the weight sync taking time (docs/cluster.md)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path(
        "runs/bench-throughput.json"
    ),
) -> None:
    """Trajectories/s into the learner and learner idle time, SPO's stream vs GRPO's
    group barrier (spec §8), through the real pipeline.

    (a) The real demo configs for a few steps each, nothing added. (b) The same engine,
    runner, sandbox, verifier and learner, with each episode's first model turn returning
    no sooner than a time drawn from a distribution (the paper's 6 x 8 example among
    them), the same times for both modes, beside the timeline those times imply. Prints
    tables and writes a JSON report to --out.
    """
    import asyncio
    import json

    from agent_spo.bench.throughput import (
        DISTRIBUTIONS,
        BenchSettings,
        load_configs,
        run_bench,
        tables,
    )
    from agent_spo.config import ConfigError

    config, user = split_config(config, overrides)
    try:
        spo_cfg, grpo_cfg = load_configs(
            config, user, None if grpo_config is None else str(grpo_config)
        )
    except ConfigError as e:
        fail(str(e))
    names = tuple(c.strip() for c in cases.split(",") if c.strip())
    bad = [c for c in names if c not in DISTRIBUTIONS]
    if bad or batch % group_size:
        what = (f"--cases: unknown {bad}; allowed: {', '.join(DISTRIBUTIONS)}" if bad
                else f"--batch {batch} is not a multiple of --group-size {group_size}")  # fmt: skip
        fail(what)
    bench = BenchSettings(
        cases=names, steps=steps, repeats=repeats, batch=batch, workers=workers,
        group_size=group_size, time_scale=time_scale, sigma=sigma, alpha=alpha,
        median_s=median, cap_s=cap, demo=demo, demo_steps=demo_steps,
        demo_repeats=demo_repeats, seed=seed,
    )  # fmt: skip
    gpus = None if scale_gpus is None else positive_ints(scale_gpus, "--scale-gpus", "8,32,128")
    if gpus is not None and any(n % 2 for n in gpus):
        fail(f"--scale-gpus: every count must be even (half learner, half engines), got {gpus}")
    report: dict = {}
    if names or demo:
        report = asyncio.run(run_bench(spo_cfg, grpo_cfg, bench, log=stderr.print))
    if gpus is not None:
        report["cluster_model"] = cluster_scale(gpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if names or demo:
        for table in tables(report):
            stdout.print(table)
        for target, ok in report["targets"].items():
            stdout.print(f"target {target}: {'met' if ok else 'NOT met'}")
    typer.echo(f"wrote {out}")


def cluster_scale(gpus: list[int]) -> dict:
    """The cluster model's tables (gloo sync as built, and a broadcast sync), printed."""
    from dataclasses import asdict, replace

    from rich.table import Table

    from agent_spo.bench.cluster_model import ClusterAssumptions, scale_report

    base = ClusterAssumptions()
    variants = {
        "gloo": (base, f"weights sent to each replica in turn at {base.sync_mib_s:g} MiB/s "
                       "(gloo, as built; rate from bench fleet)"),
        "broadcast": (replace(base, sync_broadcast=True, sync_mib_s=25 * 1024),
                      "weights broadcast to all replicas at once at 25 GiB/s (NCCL over "
                      "InfiniBand; not built)"),
    }  # fmt: skip
    out = {}
    for key, (a, sync_text) in variants.items():
        report = scale_report(gpus, a)
        out[key] = report
        table = Table(title=f"the paper's setting on N GPUs (modelled): B {a.batch}, "
                      f"{a.per_replica} episodes in flight per replica, the paper's episode "
                      f"times (16k-token cap); {sync_text}")  # fmt: skip
        for col in ("GPUs", "replicas", "learner step s", "sync s", "SPO traj/s",
                    "GRPO traj/s", "SPO/GRPO", "SPO idle", "GRPO idle", "dropped stale (SPO / GRPO)"):  # fmt: skip
            table.add_column(col, justify="right")
        for row in report["rows"]:
            s, g = row["spo"], row["grpo"]
            table.add_row(str(s["gpus"]), str(s["replicas"]), f"{s['learner_step_s']:.0f}",
                          f"{s['sync_s']:.0f}", f"{s['traj_per_s']:.2f}",
                          f"{g['traj_per_s']:.2f}", f"{row['traj_per_s_ratio']:.2f}x",
                          f"{s['idle_frac']:.0%}", f"{g['idle_frac']:.0%}",
                          f"{s['dropped_stale']:,} / {g['dropped_stale']:,}")  # fmt: skip
        stdout.print(table)
    stdout.print("assumptions: " + ", ".join(f"{k}={v}" for k, v in asdict(base).items()))
    return out


def _scale_table(episodes: Path, model: str | None, worlds: list[int], batches: int) -> dict:
    from rich.progress import Progress
    from rich.table import Table

    from agent_spo.bench.learner import run_scale_bench
    from agent_spo.builders import resolve_model_path
    from agent_spo.cli.args import bar_columns
    from agent_spo.config import ModelConfig
    from agent_spo.dist.group import RankFailed

    model_path = resolve_model_path(ModelConfig(path=model), log=stderr.print)
    with Progress(*bar_columns(), console=stderr, transient=True) as bar:
        task = bar.add_task("settings", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, description=name, completed=done, total=total)

        try:
            report = run_scale_bench(episodes, model_path=model_path, world_sizes=worlds,
                                     batches=batches, progress=progress)  # fmt: skip
        except (ValueError, RankFailed) as e:
            fail(str(e))
    table = Table(title=f"learner at scale: {report['parameters'] / 1e6:.1f}M parameters, "
                  f"{report['batches']} batches of {report['trajectories_per_batch']} "
                  f"trajectories ({report['tokens_per_batch']} tokens), {report['cores']} cores")  # fmt: skip
    for col in ("setting", "step s (median)", "tokens/s", "padding", "peak RSS MiB (per process)",
                "trainable", "sync MiB"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in report["rows"]:
        pad = "-" if r["pad_frac"] is None else f"{r['pad_frac']:.2f}"
        table.add_row(r["setting"], f"{r['step_s_median']:.3f}", f"{r['tokens_per_s']:.0f}",
                      pad, " + ".join(f"{m:.0f}" for m in r["peak_rss_mib"]),
                      f"{r['trainable'] / 1e6:.2f}M", f"{r['sync_mib']:.2f}")  # fmt: skip
    stdout.print(table)
    return report


@app.command("learner")
def bench_learner(
    episodes: Annotated[
        Path, typer.Option(help="A training run's episodes.jsonl: the batches to replay.")
    ],
    probes: Annotated[
        str, typer.Option(help="Probe sizes (trainable tokens) to compare with the whole batch.")
    ] = "64,128,256",
    batches: Annotated[int, typer.Option(help="Batches to time (after one warm-up).", min=1)] = 8,
    model: Annotated[
        str | None, typer.Option(help="Model directory. Default: the demo model.")
    ] = None,
    threads: Annotated[
        int, typer.Option(help="torch threads (the demo's learner uses 1 on 2 cores).", min=1)
    ] = 1,
    world_sizes: Annotated[
        str | None,
        typer.Option(
            help="Instead: the learner at these world sizes (e.g. 1,2) and the plain "
            "loop on a ~24M-parameter Qwen3-shaped model: tokens/s, peak memory."
        ),
    ] = None,  # fmt: skip
    out: Annotated[Path | None, typer.Option(help="Write the report (JSON) here.")] = None,
) -> None:
    """What measuring the drift on a probe (algo.rho.probe_tokens) saves, and how close
    its d_s is to the whole batch's (or, with --world-sizes, the learner at scale).

    Replays the logged batches (trajectories and advantages) through one learner per
    setting, side by side, from the same weights: the updates are identical, so each
    step's d_s is compared at the same weights. Prints the median step time, its ratio to
    the whole-batch measurement, and the drift's relative error.
    """
    import json

    import torch
    from rich.progress import Progress
    from rich.table import Table

    from agent_spo.bench.learner import run_learner_bench
    from agent_spo.builders import resolve_model_path
    from agent_spo.cli.args import bar_columns
    from agent_spo.config import ModelConfig

    sizes = positive_ints(probes, "--probes", "64,128,256")
    if not episodes.is_file():
        fail(f"--episodes: {episodes} not found")
    if world_sizes is not None:
        worlds = positive_ints(world_sizes, "--world-sizes", "1,2")
        report = _scale_table(episodes, model, worlds, batches)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        return
    torch.set_num_threads(threads)
    model_path = resolve_model_path(ModelConfig(path=model), log=stderr.print)
    with Progress(*bar_columns(), console=stderr, transient=True) as bar:
        task = bar.add_task("batches", total=batches + 1)
        try:
            report = run_learner_bench(
                episodes, model_path=model_path, probes=[None, *sizes], batches=batches,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
        except ValueError as e:
            fail(str(e))
    table = Table(title=f"learner: {report['batches']} batches of "
                  f"{report['trajectories_per_batch']} trajectories, "
                  f"{report['trainable_tokens_per_batch']} trainable tokens, "
                  f"{report['torch_threads']} thread(s)")  # fmt: skip
    for col in ("drift measured on", "step s (median)", "vs whole batch", "mean d_s",
                "d_s rel. error (median / max)"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in report["rows"]:
        who = "whole batch" if r["probe_tokens"] is None else f"probe {r['probe_tokens']} tokens"
        err = ("-" if r["probe_tokens"] is None else
               f"{r['drift_rel_error_median']:.3f} / {r['drift_rel_error_max']:.3f}")  # fmt: skip
        table.add_row(who, f"{r['step_s_median']:.3f}", f"{r['vs_full']:.2f}",
                      f"{r['drift_mean']:.4f}", err)  # fmt: skip
    stdout.print(table)
    stdout.print(f"plain PyTorch loop (one padded pass, backward, AdamW; no drift passes): "
                 f"{report['plain_loop_step_s_median']:.3f} s per step, "
                 f"{report['plain_loop_vs_full']:.2f} x the whole-batch learner step")  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


@app.command("fleet")
def bench_fleet(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    sizes: Annotated[
        str, typer.Option(help="Model sizes for the sync timing, from 1M, 10M, 100M ('' skips).")
    ] = "1M,10M,100M",
    repeats: Annotated[int, typer.Option(help="Syncs per size (medians).", min=1)] = 3,
    episodes: Annotated[
        int, typer.Option(help="Demo episodes per engine setting (0 skips).", min=0)
    ] = 64,
    workers: Annotated[int, typer.Option(help="Episodes in flight.", min=1)] = 32,
    episode_repeats: Annotated[
        int, typer.Option(help="Runs per engine setting (medians).", min=1)
    ] = 1,
    requests: Annotated[
        int, typer.Option(help="Short generations for the pool's overhead (0 skips).", min=0)
    ] = 50,
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path("runs/bench-fleet.json"),
) -> None:
    """The replica pool on real `agent-spo engine serve` processes: (a) weight-sync time
    against model size, beside the in-process engine's copy; (b) demo episodes/s through
    the in-process engine and pools of 1 and 2 replicas; (c) the pool's overhead per
    request against the bare HTTP client. CONFIG (default: the demo's) sets the model,
    tools, sandbox and verifier of (b) and (c)."""
    import asyncio
    import json

    from agent_spo.bench.fleet import SIZES, run_fleet_bench, tables

    cfg = load(config, overrides)
    names = [s.strip() for s in sizes.split(",") if s.strip()]
    if bad := [s for s in names if s not in SIZES]:
        fail(f"--sizes: unknown {bad}; choose from {', '.join(SIZES)}")
    report = asyncio.run(run_fleet_bench(
        cfg, sizes=names, repeats=repeats, episodes=episodes, workers=workers,
        episode_repeats=episode_repeats, requests=requests, log=stderr.print,
    ))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for table in tables(report):
        stdout.print(table)
    typer.echo(f"wrote {out} ({report['wall_s']:.0f} s)")
