"""`agent-spo tools ...`: inspect the tools the agent can call, call one in a sandbox, and
start a tool of your own."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from agent_spo.cli.args import EXIT_CONFIG, fail, stderr, stdout
from agent_spo.cli.sandbox import (
    AsJson,
    Timeout,
    Unisolated,
    exit_for,
    print_result,
    run_async,
)

app = typer.Typer(
    help="Inspect, test and write the tools the agent can call (built-in and your own; "
    "see docs/tools.md).",
    no_args_is_help=True,
)

REF_HELP = (
    "A built-in tool's name, or your own: a file (my_tools.py, my_tools.py:lookup) or a "
    "module (mypkg.tools, mypkg.tools:lookup)."
)


def _resolve(refs: list[str]):
    from tools.refs import ToolReferenceError, resolve

    try:
        return resolve(refs)
    except ToolReferenceError as e:
        fail(str(e))


def _kind(t) -> str:
    if t.kind == "code":
        return "code (session)"
    return "function (session)" if t.stateful else "function"


@app.command("list")
def tools_list(
    refs: Annotated[
        list[str] | None,
        typer.Argument(help="Your tool files or modules to list beside the built-in tools."),
    ] = None,
) -> None:
    """List the built-in tools (and those REFS offer) with their one-line descriptions."""
    from tools.refs import builtin_names

    extra = [r for r in refs or [] if r not in builtin_names()]
    found = _resolve(builtin_names() + extra)
    table = Table(title="tools")
    for col in ("name", "kind", "from", "description"):
        table.add_column(col)
    for t in found.tools:
        ref = found.origin[t.name]
        where = "built-in" if ref in builtin_names() else ref
        table.add_row(t.name, _kind(t), where, t.description.splitlines()[0])
    stdout.print(table)


@app.command("show")
def tools_show(ref: Annotated[str, typer.Argument(help=REF_HELP)]) -> None:
    """Print the exact function-calling schema the model receives (JSON): one object for
    one tool, a list for a module of several."""
    schemas = [t.schema() for t in _resolve([ref]).tools]
    out = schemas[0] if len(schemas) == 1 else schemas
    typer.echo(json.dumps(out, indent=2, ensure_ascii=False))


@app.command("test")
def tools_test(
    ref: Annotated[str, typer.Argument(help=REF_HELP + " It must offer one tool.")],
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

    Your tool's module is shown to the sandbox exactly as in training (read-only, nothing
    else of its directory). Bad arguments are reported as the model would receive them.
    """
    from agent_spo.testing import call_tool_async
    from tools.refs import ToolReferenceError

    _resolve([ref])  # a bad reference: a clear exit before any sandbox starts
    try:
        call = run_async(
            call_tool_async(
                ref, args, timeout_s=timeout, max_output_chars=max_chars, unisolated=unisolated
            )
        )
    except ToolReferenceError as e:
        fail(str(e))
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


@app.command("new")
def tools_new(
    name: Annotated[str, typer.Argument(help="The tool's name (a Python identifier).")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write NAME.py and test_NAME.py.")
    ] = Path("."),
) -> None:
    """Write a commented template tool NAME.py, its test test_NAME.py, and NAME_demo.yaml,
    a demo training run whose tasks need it.

    The template works as written: `agent-spo tools test NAME.py --args '{"n": 2024}'`
    calls it in the sandbox, `pytest test_NAME.py` passes, and `agent-spo train
    NAME_demo.yaml` trains the demo model to call it. Edit them, then offer the tool to
    any run with rollout.tools=[python,NAME.py].
    """
    from agent_spo.tool_template import DEMO_TEMPLATE, TEMPLATE, TEST_TEMPLATE
    from tools.refs import RESERVED, builtin_names
    from tools.sdk import _NAME

    if not _NAME.match(name) or not name.isidentifier():
        fail(f"tool name {name!r} must be a Python identifier (letters, digits, _)")
    if name in builtin_names() or name in RESERVED:
        fail(f"{name!r} is taken (a built-in tool or the sandbox's own module); pick another")
    directory.mkdir(parents=True, exist_ok=True)
    paths = [
        directory / f"{name}.py",
        directory / f"test_{name}.py",
        directory / f"{name}_demo.yaml",
    ]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        fail(f"refusing to overwrite {', '.join(existing)}")
    if name in sys.stdlib_module_names or importlib.util.find_spec(name) is not None:
        fail(f"{name!r} is the name of an importable module; pick another")
    paths[0].write_text(TEMPLATE.replace("NAME", name))
    paths[1].write_text(TEST_TEMPLATE.replace("NAME", name))
    paths[2].write_text(DEMO_TEMPLATE.replace("NAME", name))
    for p in paths:
        typer.echo(str(p))
    cd = "" if directory.resolve() == Path.cwd() else f"cd {directory}, then: "
    stderr.print(
        f'next: {cd}agent-spo tools test {name}.py --args \'{{"n": 2024, "base": 7}}\''
        f"   then: pytest test_{name}.py   then: agent-spo train {name}_demo.yaml "
        "(its paths are relative to the directory you run it from)"
    )
