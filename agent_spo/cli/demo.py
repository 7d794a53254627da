"""`agent-spo demo-model`: build the embedded demo policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent_spo.cli.args import fail, stderr, stdout


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
    from agent_spo.demo.build import NotADemoDir, prepare_demo_model

    try:
        path = prepare_demo_model(out_dir, force=force, log=stderr.print)
    except NotADemoDir as e:
        fail(str(e))
    typer.echo(str(path))
    if probe:
        from agent_spo.demo.probe import probe_model_dir

        result = probe_model_dir(path, probe)
        table = Table(title=f"copying, teacher-forced, {result.tasks} demo tasks (hermes)")
        for col in ("family:level", "code right", "answer right", "tasks"):
            table.add_column(col)
        for kind, (code, answer, count) in sorted(result.by_kind.items()):
            table.add_row(kind, str(code), str(answer), str(count))
        table.add_row("all", f"{result.code:.3f}", f"{result.answer:.3f}", str(result.tasks))
        stdout.print(table)
