"""The `agent-spo` command line: the root app and its sub-apps, one module each.

Commands parse arguments and call library functions. Imports go one way: this module
imports the sub-apps; they import :mod:`agent_spo.cli.args` and the library. Heavy
imports (torch, transformers, vLLM) stay inside the commands so `agent-spo --help` is
instant. Exit codes are in :mod:`agent_spo.cli.args`.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from agent_spo.cli import (
    bench,
    demo,
    engine,
    eval,
    export,
    replay,
    sandbox,
    tools,
    train,
    verify,
)
from agent_spo.cli.args import EXIT_CONFIG, EXIT_FAILED, EXIT_SANDBOX, guard_commands

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_SANDBOX", "app"]

# Nothing here downloads: model.path is a local directory (checked before a run starts),
# so the HuggingFace libraries never need to reach a hub. Set before they are imported;
# HF_HUB_OFFLINE=0 in the environment turns it back on.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    name="agent-spo",
    help="Train tool-using math agents with Single-stream Policy Optimization (SPO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


train.register(app)
app.command("eval")(eval.evaluate)
app.command("export")(export.export)
app.command()(replay.replay)
app.command()(verify.verify)
app.command("demo-model")(demo.demo_model)
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(tools.app, name="tools")
app.add_typer(bench.app, name="bench")
app.add_typer(engine.app, name="engine")
guard_commands(app)
