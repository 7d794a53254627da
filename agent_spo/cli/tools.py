"""`agent-spo tools ...`: inspect the tools the agent can call and call one in a sandbox."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from agent_spo.cli.args import EXIT_CONFIG, fail, stdout
from agent_spo.cli.sandbox import (
    AsJson,
    Timeout,
    Unisolated,
    exit_for,
    local_sandbox,
    print_result,
    run_async,
)

app = typer.Typer(
    help="Inspect and exercise the tools the agent can call (schemas, test calls).",
    no_args_is_help=True,
)


def _toolbox():
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    return Toolbox(builtin_tools())


@app.command("list")
def tools_list() -> None:
    """List the available tools with their one-line descriptions."""
    table = Table(title="tools")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("description")
    for t in _toolbox().tools.values():
        kind = "code (session)" if t.kind == "code" else "function"
        table.add_row(t.name, kind, t.description.splitlines()[0])
    stdout.print(table)


@app.command("show")
def tools_show(name: Annotated[str, typer.Argument(help="Tool name.")]) -> None:
    """Print the exact function-calling schema the model receives for one tool (JSON)."""
    box = _toolbox()
    if name not in box:
        fail(f"unknown tool {name!r}; available: {', '.join(box.tools)}")
    typer.echo(json.dumps(box.tools[name].schema(), indent=2, ensure_ascii=False))


@app.command("test")
def tools_test(
    name: Annotated[str, typer.Argument(help="Tool name.")],
    args: Annotated[
        str,
        typer.Option("--args", help='Call arguments as a JSON object, e.g. \'{"code": "1+1"}\'.'),
    ] = "{}",
    max_chars: Annotated[
        int, typer.Option(help="Cap on the observation shown to the model (head + tail).")
    ] = 256,
    timeout: Timeout = 10.0,
    unisolated: Unisolated = False,
    as_json: AsJson = False,
) -> None:
    """Call one tool in a real sandbox; show what the model would see and the typed result.

    Bad arguments are reported exactly as the model would receive them.
    """
    from agent_spo.episode.toolbox import Toolbox
    from tools import builtin_tools

    box = Toolbox(builtin_tools(), max_output_chars=max_chars)

    async def go():
        async with local_sandbox(1, timeout, 1024, unisolated) as sb:
            async with await sb.open_session() as session:
                return await box.call(name, args, sandbox=sb, session=session)

    call = run_async(go())
    if as_json:
        typer.echo(json.dumps({
            "name": call.name, "arguments": call.arguments, "fault": call.fault,
            "observation": call.observation,
            "result": call.result.to_dict() if call.result else None,
        }, indent=2, ensure_ascii=False))  # fmt: skip
    else:
        stdout.print(
            Text(f"fault: {call.fault or 'none'}", style="green" if call.ok else "bold red")
        )
        stdout.print(Text("observation (what the model sees):", style="bold"))
        stdout.print(Text(call.observation), soft_wrap=True)
        if call.result is not None:
            stdout.print(Text("sandbox result:", style="bold"))
            print_result(call.result, False)
    if call.fault == "model":
        raise typer.Exit(EXIT_CONFIG)
    if call.result is not None:
        exit_for(call.result)
