"""The `agent-spo` command line.

Exit codes: 0 success; 1 the job failed (e.g. every episode dropped); 2 bad config or
bad usage (named key, before any work). Heavy imports (torch, transformers, vLLM)
stay inside the commands so `agent-spo --help` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from agent_spo.config import ConfigError, TrainConfig, dump_config, load_config, write_resolved

EXIT_CONFIG = 2

_stderr = Console(stderr=True)

app = typer.Typer(
    name="agent-spo",
    help="Train tool-using math agents with Single-stream Policy Optimization (SPO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
sandbox_app = typer.Typer(
    help="Run sandboxes: the processes where the agent's tool calls execute.",
    no_args_is_help=True,
)
tools_app = typer.Typer(
    help="Inspect and exercise the tools the agent can call (schemas, test calls).",
    no_args_is_help=True,
)
bench_app = typer.Typer(
    help="Benchmarks that back changes to the algorithm and pipeline with numbers.",
    no_args_is_help=True,
)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(tools_app, name="tools")
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        from agent_spo import __version__

        typer.echo(f"agent-spo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Train tool-using math agents with Single-stream Policy Optimization (SPO)."""


def _load(config: str | None, overrides: list[str] | None) -> TrainConfig:
    """Load and validate a training config; on failure print every problem and exit 2.

    A first argument of the form key=value that is not a file is taken as an override,
    so `agent-spo train learner.lr=1e-5` works without naming a config.
    """
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None


ConfigArg = Annotated[
    str | None,
    typer.Argument(
        help="YAML run config (e.g. configs/demo.yaml). Omitted: the built-in defaults, "
        "which are the embedded CPU demo (the same as configs/demo.yaml).",
        metavar="CONFIG",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as key.path=value, applied after the file, e.g. "
        "algo.rho.mode=constant learner.lr=1e-5 learner.betas=[0.9,0.95].",
        metavar="OVERRIDES",
        show_default=False,
    ),
]


@app.command()
def config(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Print the fully resolved training config as YAML (defaults filled, overrides applied).

    Validates exactly as `train` does: a bad key or value exits with code 2 and names it.

    Example: `agent-spo config configs/demo.yaml algo.rho.mode=constant`
    """
    typer.echo(dump_config(_load(config, overrides)), nl=False)


@app.command()
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
    cfg = _load(config, overrides)
    if dry_run:
        _stderr.print(Text("config ok", style="green"))
        typer.echo(dump_config(cfg), nl=False)
        return
    import asyncio

    from rich.progress import Progress

    from agent_spo.pipeline import AllEpisodesDropped
    from agent_spo.train import RunExists, UnsupportedConfig, run_training
    from agent_spo.values import ValuesFileError

    with Progress(*_bar_columns(), console=_stderr) as bar:
        task = bar.add_task("training", total=cfg.train.total_steps)
        est = None
        last_eval = {"acc": float("nan")}

        def on_estimate(s) -> None:
            nonlocal est
            if est is None:
                est = bar.add_task("initial values", total=s.prompts_total)
            bar.update(est, completed=s.prompts_done,
                       description=f"initial values  mean v0 {s.mean_value:.2f}")  # fmt: skip

        def on_metrics(m: dict) -> None:
            if "eval/accuracy" in m:
                last_eval["acc"] = m["eval/accuracy"]
            eps = m["rollout/episodes"] / max(1e-9, m["perf/elapsed_s"])
            bar.update(
                task,
                completed=m["step"],
                description=f"{cfg.algo.name}  reward {m['reward/mean']:.2f}  "
                f"held-out {last_eval['acc']:.2f}  "
                f"tool calls {m['tool/calls_per_episode']:.2f}  {eps:.1f} ep/s",
            )

        try:
            summary = asyncio.run(
                run_training(
                    cfg,
                    resume=resume,
                    log=lambda m: bar.console.print(m),
                    on_metrics=on_metrics,
                    on_estimate=on_estimate,
                )  # fmt: skip
            )
        except (RunExists, UnsupportedConfig) as e:
            _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
            raise typer.Exit(EXIT_CONFIG) from None
        except ValuesFileError as e:
            _stderr.print(Text(f"error: algo.init.values_path: {e}", style="red"), soft_wrap=True)
            raise typer.Exit(EXIT_CONFIG) from None
        except AllEpisodesDropped as e:
            _stderr.print(Text(f"error: {e}; checkpoints written so far are kept: continue "
                               "with --resume once fixed", style="red"), soft_wrap=True)  # fmt: skip
            raise typer.Exit(1) from None
    _stderr.print(_done_line(summary))


def _done_line(summary: dict) -> str:
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


@app.command()
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

    cfg = _load(config, overrides)
    if split not in ("held_out", "train"):
        _stderr.print(Text(f"error: --split must be held_out or train, got {split!r}", style="red"))
        raise typer.Exit(EXIT_CONFIG)
    out = out or Path(cfg.run.output_dir) / cfg.run.name / "rollout.jsonl"
    summary = asyncio.run(_rollout(cfg, n, split, out))
    _print_rollout(summary, out)


async def _rollout(cfg: TrainConfig, n: int, split: str, out: Path):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from agent_spo import builders
    from agent_spo.rollout import run_rollout, write_summary

    train, held_out = builders.build_datasets(cfg.data, cfg.run.seed)
    problems = held_out if split == "held_out" else train
    if not problems:
        _stderr.print(Text(f"error: the {split} split is empty (data.held_out)", style="red"))
        raise typer.Exit(EXIT_CONFIG)
    model_path = builders.resolve_model_path(cfg.model, log=lambda m: _stderr.print(m))
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    engine = builders.build_engine(model_path, cfg.model, cfg.rollout, cfg.run.seed)
    try:
        with builders.build_verifier(cfg.verifier) as verifier:
            async with builders.build_sandbox(cfg.sandbox) as sandbox:
                runner = await builders.build_runner(cfg, engine, model_path, sandbox, verifier)
                with Progress(*columns, console=_stderr, transient=True) as bar:
                    task = bar.add_task("episodes", total=n)

                    def progress(s) -> None:
                        bar.update(
                            task,
                            completed=s.episodes + s.dropped,
                            description=f"episodes  acc {s.accuracy:.2f}  tool use "
                            f"{s.used_tool / max(1, s.episodes):.2f}",
                        )

                    summary = await run_rollout(
                        runner, problems, n, out, workers=cfg.rollout.workers,
                        seed=cfg.run.seed, progress=progress,
                    )  # fmt: skip
    finally:
        await engine.close()
    write_summary(summary, out.with_suffix(".summary.json"))
    return summary


def _print_rollout(summary, out: Path) -> None:
    from rich.table import Table

    d = summary.to_dict()
    table = Table(title="rollout", show_header=False)
    for key in ("episodes", "dropped", "accuracy", "tool_use_rate", "valid_call_rate",
                "tool_calls", "tool_faults", "stop_reasons", "episodes_per_s", "wall_s"):  # fmt: skip
        table.add_row(key, _cell(d[key]))
    Console().print(table)
    _stderr.print(f"episode log: {out}")


@app.command("eval")
def evaluate(
    config: Annotated[str, typer.Argument(help="Evaluation config, e.g. configs/eval/paper.yaml.")],
    overrides: OverridesArg = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Evaluate this instead of the config's model: a ckpt-* directory, a run's "
            "checkpoints/ (its latest), a run directory, or a model directory."
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="Samples per problem n (eval.n).", min=1)
    ] = None,
    problems: Annotated[
        int | None,
        typer.Option(help="Only the first N problems of each dataset (eval.max_problems).", min=1),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory. Default: run.output_dir/run.name."),
    ] = None,
) -> None:
    """Evaluate a model or checkpoint on math benchmarks: avg@k, pass@k (unbiased), maj@k.

    The spec's protocol: AIME 24/25, BeyondAIME, BRUMO 25, HMMT Feb 25; 32 samples per
    problem at T = 0.6, top_p = 0.95, top_k = 20, with the same tool loop and verifier
    as training. maj@k groups answers by verifier equivalence. Writes the episode log
    (input of `agent-spo replay`), results.json and results.md to the output directory;
    run it again to resume: finished samples are kept, only missing ones are generated.

    Example: `agent-spo eval configs/eval/paper.yaml --samples 4 --problems 5`
    """
    import asyncio

    from agent_spo.data.problems import DatasetError
    from agent_spo.evaluate.command import build_config, print_results, progress_bar
    from agent_spo.evaluate.run import EvalMismatch, run_eval

    try:
        cfg = build_config(config, overrides or [], checkpoint=checkpoint, samples=samples,
                           problems=problems, out=out)  # fmt: skip
    except (ConfigError, ValueError) as e:
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    bar, update = progress_bar(_stderr)
    try:
        with bar:
            results, out_dir = asyncio.run(
                run_eval(cfg, log=lambda m: bar.console.print(m), progress=update)
            )
    except (EvalMismatch, DatasetError) as e:
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    title = (f"eval {cfg.run.name}: {results['n']} samples per problem, model "
             f"{results['model']}")  # fmt: skip
    print_results(results, title)
    _stderr.print(
        f"{results['generated']} samples generated in {results['generate_s']:.0f} s, "
        f"{results['dropped_now']} dropped; wrote {out_dir}/ (results.json, results.md, "
        "episodes.jsonl)"
    )


@app.command()
def replay(
    episodes: Annotated[
        Path,
        typer.Argument(
            help="Episode log (RUN_DIR/episodes.jsonl, a rollout or eval log) or the "
            "run/eval directory that holds it."
        ),
    ],
    episode: Annotated[
        str | None,
        typer.Argument(
            help="Episode number (the list's # column); omitted: list the episodes.",
            show_default=False,
        ),
    ] = None,
    failed: Annotated[
        bool, typer.Option("--failed", help="List only episodes whose reward is not 1.")
    ] = False,
    prompt: Annotated[
        str | None, typer.Option(help="List only this prompt id (or prompt key).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="List only this training step.")] = None,
    verdict: Annotated[
        str | None,
        typer.Option(help="List only this verdict: correct, incorrect, no_answer, ..."),
    ] = None,
    tool_error: Annotated[
        bool, typer.Option("--tool-error", help="List only episodes with a faulty tool call.")
    ] = False,
    limit: Annotated[
        int, typer.Option(help="Most episodes listed (and put in --html).", min=1)
    ] = 50,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="Colour every token: trainable vs masked.")
    ] = False,
    rerun: Annotated[
        bool,
        typer.Option("--rerun", help="Re-execute the tool calls in a fresh sandbox and re-verify."),
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(help="Also write the views as one self-contained HTML page here."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model (tokenizer) directory. Default: from config.yaml beside the log, "
            "else the demo model."
        ),
    ] = None,
) -> None:
    """Show logged episodes: a filtered list, or one episode turn by turn.

    The detail view prints each turn's model text, tool calls with their code, the typed
    sandbox result and latency, truncation markers, the final answer, the verdict and its
    reason, the tracker value before and after, the advantage and the policy-version lag.
    --rerun re-runs the tool calls in a fresh sandbox session and re-verifies the answer,
    reporting any difference from the log.

    Examples: `agent-spo replay runs/demo --failed --step 3`;
    `agent-spo replay runs/demo 17 --tokens --rerun`; `agent-spo replay runs/demo --html page.html`
    """
    from agent_spo.replay.command import ReplayError, run_replay
    from agent_spo.replay.episode import Filters

    filters = Filters(failed=failed, prompt=prompt, step=step, verdict=verdict,
                      tool_error=tool_error)  # fmt: skip
    try:
        run_replay(
            episodes, episode, filters=filters, limit=limit, tokens=tokens, rerun=rerun,
            html_out=html, model=model, console=Console(), err=_stderr,
        )  # fmt: skip
    except ReplayError as e:
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def verify(
    gold: Annotated[
        str | None,
        typer.Argument(help="Gold (reference) answer, e.g. '\\frac{1}{2}'.", show_default=False),
    ] = None,
    response: Annotated[
        str | None,
        typer.Argument(
            help="Model response or bare answer; the final \\boxed{…}, 'Answer:' line, etc. "
            "is extracted.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="JSONL with one {gold, response} object per line (id and label optional); "
            "checks every line.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print verdicts as JSON.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Wall-clock limit per check, in seconds.", min=0.01)
    ] = 2.0,
    workers: Annotated[int, typer.Option(help="Worker processes for --file.", min=1)] = 2,
) -> None:
    """Check a response against a gold answer with the training verifier.

    Prints the verdict (correct, incorrect, no_answer, unparseable or timeout), the
    reason, the extracted answer and both parsed forms. Every check runs in a killable
    worker process with a wall clock, as in training.

    Examples: `agent-spo verify '\\frac{1}{2}' 'so the answer is \\boxed{0.5}'`;
    `agent-spo verify --file cases.jsonl --json`
    """
    import json

    from agent_spo.verify import VerifierPool

    if (file is None) == (gold is None or response is None) or (file and (gold or response)):
        _stderr.print(
            Text("error: give GOLD and RESPONSE, or --file CASES.jsonl (not both)", style="red")
        )
        raise typer.Exit(EXIT_CONFIG)
    if file is None:
        with VerifierPool(workers=1, timeout_s=timeout) as pool:
            v = pool.check(gold, response)
        if as_json:
            typer.echo(json.dumps(v.as_dict(), ensure_ascii=False))
            return
        style = {"correct": "green", "timeout": "yellow"}.get(v.status, "red")
        Console().print(Text(v.status, style=f"bold {style}"), Text(f"  {v.reason}"))
        for label, value in (
            ("extracted", v.prediction),
            ("found by", v.how),
            ("prediction", v.pred_parsed),
            ("gold", v.gold_parsed),
            ("reward", v.reward if v.reward is not None else "not scorable"),
            ("time", f"{v.elapsed_s * 1000:.1f} ms"),
        ):
            typer.echo(f"{label:>11}: {value}")
        return

    try:
        rows = [json.loads(line) for line in file.read_text().split("\n") if line.strip()]
        pairs = [(str(r["gold"]), str(r["response"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        _stderr.print(Text(f"error: --file {file}: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    with VerifierPool(workers=workers, timeout_s=timeout) as pool:
        verdicts = pool.check_many(pairs)
    counts: dict[str, int] = {}
    fp = fn = labelled = 0
    for i, (row, v) in enumerate(zip(rows, verdicts, strict=True)):
        counts[v.status] = counts.get(v.status, 0) + 1
        if "label" in row:
            labelled += 1
            fp += v.correct and not row["label"]
            fn += (not v.correct) and bool(row["label"])
        name = row.get("id", i)
        if as_json:
            extra = {"label": row["label"]} if "label" in row else {}
            typer.echo(json.dumps({"id": name, **extra, **v.as_dict()}, ensure_ascii=False))
        else:
            typer.echo(f"{name}\t{v.status}\t{v.reason}")
    summary = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    if labelled:
        summary += (
            f"; against labels: accuracy {(labelled - fp - fn) / labelled:.3f}, FP {fp}, FN {fn}"
        )
    _stderr.print(f"{len(verdicts)} checks: {summary}", soft_wrap=True)


@app.command("estimate-values")
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

    cfg = _load(config, overrides)
    if out.exists() and not resume:
        _stderr.print(Text(f"error: {out} exists: pass --resume to continue that estimate "
                           "(made with the same model and config), or choose another --out",
                           style="red"), soft_wrap=True)  # fmt: skip
        raise typer.Exit(EXIT_CONFIG)
    asyncio.run(_estimate_values(cfg, out))


async def _estimate_values(cfg: TrainConfig, out: Path) -> None:
    from rich.progress import Progress

    from agent_spo import builders
    from agent_spo.values import estimate_values, load_values, value_summary

    train_set, _ = builders.build_datasets(cfg.data, cfg.run.seed)
    model_path = builders.resolve_model_path(cfg.model, log=lambda m: _stderr.print(m))
    engine = builders.build_engine(model_path, cfg.model, cfg.rollout, cfg.run.seed)
    try:
        with builders.build_verifier(cfg.verifier) as verifier:
            async with builders.build_sandbox(cfg.sandbox) as sandbox:
                runner = await builders.build_runner(cfg, engine, model_path, sandbox, verifier)
                with Progress(*_bar_columns(), console=_stderr, transient=True) as bar:
                    task = bar.add_task("prompts", total=len(train_set))

                    def progress(s) -> None:
                        bar.update(task, completed=s.prompts_done,
                                   description=f"prompts  mean v0 {s.mean_value:.2f}")  # fmt: skip

                    state = await estimate_values(
                        runner, train_set, cfg.algo.init.n0, out, workers=cfg.rollout.workers,
                        seed=cfg.run.seed + 3, progress=progress,
                    )  # fmt: skip
    finally:
        await engine.close()
    summary = value_summary(load_values(out))
    _stderr.print(
        f"{summary['prompts']} prompts, {state.episodes} scored episodes in {state.wall_s:.0f} s "
        f"({state.dropped} dropped, {state.unscored} unscored); mean v0 "
        f"{summary.get('mean_value', 0):.3f}, always solved {summary.get('always_solved', 0):.2f},"
        f" never solved {summary.get('never_solved', 0):.2f}\nvalues file: {out}  (train with "
        f"algo.init.values_path={out})"
    )


def _bar_columns():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


@app.command()
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
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    _stderr.print(f"wrote {path}")


@app.command("demo-model")
def demo_model(
    out_dir: Annotated[
        Path | None,
        typer.Argument(help="Directory for the model and tokenizer. Default: the cache."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if it exists.")] = False,
    probe: Annotated[
        int,
        typer.Option(
            help="Then measure copying on this many demo tasks (teacher-forced: are the "
            "number tokens of the code and of the answer predicted right?). 0 = skip.",
            min=0,
        ),
    ] = 0,
) -> None:
    """Build the embedded demo policy: a tiny Qwen3-architecture model and its tokenizer.

    Trains a small BPE tokenizer with a Qwen3-style chat template, initialises a ~1M
    parameter Qwen3 and warm-starts it by supervised fine-tuning on synthetic tool-use
    demonstrations (both tool formats), then saves a normal Hugging Face model directory.
    Without OUT_DIR it is cached (AGENT_SPO_CACHE, default ~/.cache/agent-spo) and reused;
    configs with model.path = null build it on first use.
    """
    import shutil

    from agent_spo.demo.build import DemoModelSettings, build_demo_model, ensure_demo_model

    settings = DemoModelSettings()
    log = lambda m: _stderr.print(m)  # noqa: E731
    if out_dir is None:
        from agent_spo.demo.build import demo_model_dir

        if force:
            shutil.rmtree(demo_model_dir(settings), ignore_errors=True)
        path = ensure_demo_model(settings, log=log)
    else:
        out_dir = out_dir.resolve()
        is_demo = (out_dir / "demo.json").exists()
        if out_dir.exists() and any(out_dir.iterdir()) and not is_demo:
            _stderr.print(
                Text(
                    f"error: {out_dir} exists and is not a demo-model directory; "
                    "choose a new or empty directory",
                    style="red",
                )  # fmt: skip
            )
            raise typer.Exit(EXIT_CONFIG)
        path = out_dir if is_demo and not force else build_demo_model(out_dir, settings, log=log)
    typer.echo(str(path))
    if probe:
        _probe_demo_model(path, probe)


def _probe_demo_model(path: Path, n: int) -> None:
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_spo.data.synthetic import make_tasks
    from agent_spo.demo.build import renderer_for
    from agent_spo.demo.probe import copy_probe

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    result = copy_probe(model, renderer_for(tok, "hermes"), make_tasks(n, seed=0))
    table = Table(title=f"copying, teacher-forced, {result.tasks} demo tasks (hermes)")
    for col in ("family:level", "code right", "answer right", "tasks"):
        table.add_column(col)
    for kind, (code, answer, count) in sorted(result.by_kind.items()):
        table.add_row(kind, str(code), str(answer), str(count))
    table.add_row("all", f"{result.code:.3f}", f"{result.answer:.3f}", str(result.tasks))
    Console().print(table)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, float) else str(value)


@bench_app.command("bandit")
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
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from agent_spo.bandit import (
        BANDIT_DEFAULT_OVERRIDES,
        plot_curves,
        run_bandit,
        settings_from_config,
        summarize,
    )

    user = list(overrides or [])
    if config is not None and "=" in config and not Path(config).is_file():
        config, user = None, [config, *user]
    cfg = _load(config, [*BANDIT_DEFAULT_OVERRIDES, *user] if config is None else user)
    names = [a.strip() for a in algos.split(",") if a.strip()]
    bad = [a for a in names if a not in ("spo", "grpo")]
    if bad or not names:
        _stderr.print(
            Text(f"error: --algos: got {bad or algos!r}; allowed: spo, grpo", style="red")
        )
        raise typer.Exit(EXIT_CONFIG)
    try:
        plans = [
            settings_from_config(cfg, algo=a, seed=seed, n_prompts=prompts, steps=steps)
            for a in names
            for seed in range(seeds)
        ]
    except ValueError as e:
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None

    out_dir = out if out is not None else Path(cfg.run.output_dir) / cfg.run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out_dir)
    results = []
    columns = [
        *Progress.get_default_columns()[:1],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with (
        (out_dir / "metrics.jsonl").open("w") as metrics,
        Progress(*columns, console=_stderr) as bar,
    ):
        task = bar.add_task("bandit", total=len(plans) * steps)
        for plan in plans:
            bar.update(task, description=f"{plan.algo} seed {plan.seed}")

            def log(row, plan=plan):
                metrics.write(json.dumps({"algo": plan.algo, "seed": plan.seed, **row}) + "\n")
                bar.advance(task)

            results.append(run_bandit(plan, on_step=log))
    summary = summarize(results, target)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(results, out_dir / "curves.png")

    table = Table(
        title=f"bandit: {prompts} prompts, {steps} steps, batch "
        f"{cfg.learner.batch_size}, median of {seeds} seed(s)"
    )
    keys = list(
        dict.fromkeys(k for row in summary.values() for k in row if k != "final_accuracy_all")
    )
    table.add_column("metric")
    for algo in summary:
        table.add_column(algo.upper(), justify="right")
    for k in keys:
        cells = [summary[a].get(k) for a in summary]
        table.add_row(k, *(_cell(c) for c in cells))
    Console().print(table)
    typer.echo(f"wrote {out_dir}/ (config.yaml, metrics.jsonl, summary.json, curves.png)")


@bench_app.command("learning")
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

    from agent_spo.bench_learning import VARIANTS, _fmt, run_learning_bench

    _load(config, overrides)  # fail before any work on a bad config
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *(overrides or [])]
    names = [v.strip() for v in variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        bad.append(f"--seeds {seeds!r}")
    if bad or not names or not seed_list:
        _stderr.print(Text(f"error: bad --variants/--seeds: {bad or 'empty'}; variants are "
                           f"{', '.join(VARIANTS)}", style="red"))  # fmt: skip
        raise typer.Exit(EXIT_CONFIG)
    from agent_spo.pipeline import AllEpisodesDropped
    from agent_spo.train import UnsupportedConfig

    try:
        result = asyncio.run(
            run_learning_bench(
                config,
                overrides or [],
                out,
                seeds=seed_list,
                variants=names,
                log=lambda m: _stderr.print(m, soft_wrap=True),
            )  # fmt: skip
        )
    except (UnsupportedConfig, ConfigError) as e:
        _stderr.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except AllEpisodesDropped as e:
        _stderr.print(Text(f"error: {e}; rerun the same command to continue", style="red"))
        raise typer.Exit(1) from None
    table = Table(title=f"learning benchmark, seeds {seed_list}")
    for col in ("variant", "before", "final (mean ± std)", "zero-adv share", "adv var",
                "trained", "train s"):  # fmt: skip
        table.add_column(col)
    for name, v in result["variants"].items():
        table.add_row(name, f"{v['before_mean']:.3f}",
                      f"{v['final_mean']:.3f} ± {v['final_std']:.3f}",
                      _fmt(v['zero_adv_share']), f"{v['adv_raw_var']:.3f}",
                      f"{v['trained_trajectories']:.0f}", f"{v['train_s']:.0f}")  # fmt: skip
    Console().print(table)
    _stderr.print(f"results: {out}/learning.md, learning.json, learning.png")


@bench_app.command("verify")
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
    import json

    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn
    from rich.table import Table

    from agent_spo.verify.bench import run_bench

    root = Path(__file__).resolve().parents[1]
    cases = cases or root / "tests" / "verify" / "cases.jsonl"
    if not cases.is_file():
        _stderr.print(Text(f"error: --cases: {cases} not found", style="red"))
        raise typer.Exit(EXIT_CONFIG)
    if data is None and (root.parent / "shared" / "data").is_dir():
        data = root.parent / "shared" / "data"
    default_mv = root / ".venv-mathverify" / "bin" / "python"
    if mathverify_python is None and default_mv.exists():
        mathverify_python = str(default_mv)
    if mathverify_python is None:
        _stderr.print(
            Text(
                "note: math-verify not found; running ours only (python -m venv "
                ".venv-mathverify && .venv-mathverify/bin/pip install 'math-verify[antlr4_13_2]')",
                style="yellow",
            ),
            soft_wrap=True,
        )
    with Progress(SpinnerColumn(), *Progress.get_default_columns()[:1], TimeElapsedColumn(),
                  console=_stderr) as bar:  # fmt: skip
        task = bar.add_task("starting", total=None)
        report = run_bench(
            cases, data, workers, timeout, mathverify_python, mv_timeout, integer, latex,
            on_stage=lambda name: bar.update(task, description=name),
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    per_case = report.pop("per_case")
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "per_case.jsonl").open("w") as f:
        for row in per_case:
            f.write(json.dumps(row) + "\n")

    names = list(report["verifiers"])
    console = Console()

    def fmt(x, digits=1):
        if x is None:
            return "-"
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)

    table = Table(title=f"labelled set: {report['n_cases']} cases, {workers} workers")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    rows = [
        ("accuracy", lambda e: fmt(e["labelled"]["all"]["accuracy"], 3)),
        ("false positives", lambda e: fmt(e["labelled"]["all"]["fp"])),
        ("false negatives", lambda e: fmt(e["labelled"]["all"]["fn"])),
        ("timeouts", lambda e: fmt(e["labelled"]["all"]["timeouts"])),
        ("median ms", lambda e: fmt(e["labelled"]["speed"]["median_ms"], 2)),
        ("p99 ms", lambda e: fmt(e["labelled"]["speed"]["p99_ms"], 1)),
        ("max ms", lambda e: fmt(e["labelled"]["speed"]["max_ms"], 1)),
        ("checks/s", lambda e: fmt(e["labelled"]["speed"]["checks_per_s"], 0)),
    ]
    for label, get in rows:
        table.add_row(label, *(get(report["verifiers"][n]) for n in names))
    console.print(table)

    types = Table(title="per answer type: accuracy (FP/FN)")
    types.add_column("answer type")
    types.add_column("n", justify="right")
    for n in names:
        types.add_column(n, justify="right")
    first = report["verifiers"][names[0]]["labelled"]["answer_type"]
    for kind, row in first.items():
        cells = []
        for n in names:
            r = report["verifiers"][n]["labelled"]["answer_type"][kind]
            cells.append(f"{r['accuracy']:.2f} ({r['fp']}/{r['fn']})")
        types.add_row(kind, str(row["n"]), *cells)
    console.print(types)

    speed = Table(title=f"throughput ({workers} workers; latency measured inside the worker)")
    speed.add_column("set")
    speed.add_column("metric")
    for n in names:
        speed.add_column(n, justify="right")
    for set_name in report["verifiers"][names[0]]["throughput"]:
        for metric, digits in (("n", 0), ("median_ms", 3), ("p99_ms", 2), ("checks_per_s", 0),
                               ("timeouts", 0)):  # fmt: skip
            speed.add_row(
                set_name, metric,
                *(fmt(report["verifiers"][n]["throughput"][set_name][metric], digits)
                  for n in names),
            )  # fmt: skip
    console.print(speed)
    typer.echo(f"wrote {out}/ (summary.json, per_case.jsonl)")


@bench_app.command("throughput")
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

    from agent_spo.bench_throughput import DISTRIBUTIONS, BenchSettings, run_bench, tables

    user = list(overrides or [])
    if config is not None and "=" in config and not Path(config).is_file():
        config, user = None, [config, *user]
    spo_cfg = _load(config, user)
    if spo_cfg.algo.name != "spo":
        _stderr.print(Text("error: CONFIG must be an SPO config (algo.name=spo); "
                           "give GRPO's with --grpo-config", style="red"))  # fmt: skip
        raise typer.Exit(EXIT_CONFIG)
    default_grpo = Path(__file__).resolve().parents[1] / "configs" / "demo_grpo.yaml"
    if grpo_config is not None:
        grpo_cfg = _load(str(grpo_config), user)
    elif config is None and default_grpo.is_file():
        grpo_cfg = _load(str(default_grpo), user)
    else:
        grpo_cfg = _load(config, [*user, "algo.name=grpo", "algo.sampler.mode=uniform"])
    names = tuple(c.strip() for c in cases.split(",") if c.strip())
    bad = [c for c in names if c not in DISTRIBUTIONS]
    if bad or batch % group_size:
        what = (f"--cases: unknown {bad}; allowed: {', '.join(DISTRIBUTIONS)}" if bad
                else f"--batch {batch} is not a multiple of --group-size {group_size}")  # fmt: skip
        _stderr.print(Text(f"error: {what}", style="red"))
        raise typer.Exit(EXIT_CONFIG)
    bench = BenchSettings(
        cases=names, steps=steps, repeats=repeats, batch=batch, workers=workers,
        group_size=group_size, time_scale=time_scale, sigma=sigma, alpha=alpha,
        median_s=median, cap_s=cap, demo=demo, demo_steps=demo_steps,
        demo_repeats=demo_repeats, seed=seed,
    )  # fmt: skip
    report = asyncio.run(run_bench(spo_cfg, grpo_cfg, bench, log=lambda m: _stderr.print(m)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console = Console()
    for table in tables(report):
        console.print(table)
    for target, ok in report["targets"].items():
        console.print(f"target {target}: {'met' if ok else 'NOT met'}")
    typer.echo(f"wrote {out}")


# Commands implemented in their own modules register themselves on the groups above.
from agent_spo import cli_sandbox  # noqa: E402, F401

if __name__ == "__main__":
    app()
