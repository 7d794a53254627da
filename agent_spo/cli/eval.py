"""`agent-spo eval`: score a model or checkpoint on math benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agent_spo.cli.args import EXIT_FAILED, OverridesArg, fail, stderr


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
    from collections import Counter

    from agent_spo.config import ConfigError
    from agent_spo.data.problems import DatasetError
    from agent_spo.episode.pool import job_failure
    from agent_spo.evaluate.command import build_config, print_results, progress_bar
    from agent_spo.evaluate.run import EvalMismatch, run_eval

    try:
        cfg = build_config(config, overrides or [], checkpoint=checkpoint, samples=samples,
                           problems=problems, out=out)  # fmt: skip
    except (ConfigError, ValueError) as e:
        fail(str(e))
    bar, update = progress_bar(stderr)
    try:
        with bar:
            results, out_dir = asyncio.run(
                run_eval(cfg, log=lambda m: bar.console.print(m), progress=update)
            )
    except (EvalMismatch, DatasetError) as e:
        fail(str(e))
    title = (f"eval {cfg.run.name}: {results['n']} samples per problem, model "
             f"{results['model']}")  # fmt: skip
    print_results(results, title)
    stderr.print(
        f"{results['generated']} samples generated in {results['generate_s']:.0f} s, "
        f"{results['dropped_now']} dropped; wrote {out_dir}/ (results.json, results.md, "
        "episodes.jsonl)"
    )
    played = results["generated"] + results["dropped_now"]
    if why := job_failure(Counter(results["drop_causes"]), played):
        fail(f"{why} (results in {out_dir}; run again to retry the dropped samples)", EXIT_FAILED)
