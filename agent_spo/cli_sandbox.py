"""`agent-spo sandbox ...` and `agent-spo tools ...`: run code and tools in real sandboxes."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent_spo.cli import sandbox_app, tools_app

EXIT_CODE_FAILED = 1  # the sandboxed code failed (error, timeout, limit, crash)
EXIT_SANDBOX = 4  # the sandbox itself failed or is unavailable

_out = Console()
_err = Console(stderr=True)

Workers = Annotated[int, typer.Option(help="Sandbox workers (jails) to start.", min=1)]
Timeout = Annotated[float, typer.Option("--timeout", help="Wall-clock limit per call, seconds.")]
MemoryMb = Annotated[int, typer.Option(help="Address-space limit per call, MiB.", min=16)]
Unisolated = Annotated[
    bool,
    typer.Option(
        "--unisolated",
        help="Run WITHOUT the bubblewrap jail (rlimits, Landlock and seccomp only). "
        "For hosts without user namespaces; the code can read your files.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _sandbox(workers: int, timeout: float, memory_mb: int, unisolated: bool):
    from sandboxes.local import Limits, LocalSandbox

    if unisolated:
        _err.print(Text("warning: sandbox isolation is OFF (--unisolated)", style="bold yellow"))
    return LocalSandbox(
        workers=workers,
        limits=Limits(timeout_s=timeout, memory_mb=memory_mb),
        isolation="none" if unisolated else "bwrap",
    )


def _run_async(coro):
    from sandboxes.jail import SandboxUnavailable

    try:
        return asyncio.run(coro)
    except SandboxUnavailable as e:
        _err.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_SANDBOX) from None


def _print_result(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    style = "green" if result.ok else "red"
    _out.print(Text(f"status: {result.status}", style=f"bold {style}"))
    if result.stdout:
        _out.print(Text("stdout:", style="bold"))
        _out.print(Text(result.stdout.rstrip("\n")), soft_wrap=True)
    if result.stderr:
        _out.print(Text("stderr:", style="bold"))
        _out.print(Text(result.stderr.rstrip("\n")), soft_wrap=True)
    if result.traceback:
        _out.print(Text(result.traceback.rstrip("\n"), style="red"), soft_wrap=True)
    extras = [f"wall {result.wall_s * 1000:.1f} ms", f"cpu {result.cpu_s * 1000:.1f} ms"]
    if result.stdout_truncated or result.stderr_truncated:
        extras.append(f"output truncated ({result.stdout_bytes + result.stderr_bytes} bytes)")
    if result.signal:
        extras.append(f"signal {result.signal}")
    if result.detail:
        extras.append(result.detail)
    _out.print(Text(" · ".join(extras), style="dim"))


def _exit_for(result) -> None:
    if result.infrastructure_failure:
        raise typer.Exit(EXIT_SANDBOX)
    if not result.ok:
        raise typer.Exit(EXIT_CODE_FAILED)


@sandbox_app.command("run")
def sandbox_run(
    file: Annotated[str, typer.Argument(help="Python file to run, or - for standard input.")],
    workers: Workers = 1,
    timeout: Timeout = 10.0,
    memory_mb: MemoryMb = 1024,
    unisolated: Unisolated = False,
    as_json: AsJson = False,
) -> None:
    """Run a Python file in the local sandbox and print the typed result.

    The last expression is echoed like a notebook cell. Exit code: 0 ok, 1 the code
    failed (error, timeout, limit, crash), 4 the sandbox failed.
    """
    code = sys.stdin.read() if file == "-" else _read(file)

    async def go():
        async with _sandbox(workers, timeout, memory_mb, unisolated) as sb:
            return await sb.run(code)

    result = _run_async(go())
    _print_result(result, as_json)
    _exit_for(result)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _err.print(Text(f"error: cannot read {path}: {e}", style="red"))
        raise typer.Exit(2) from None


@sandbox_app.command("bench")
def sandbox_bench(
    workers: Workers = 2,
    calls: Annotated[int, typer.Option(help="Calls per workload and concurrency.", min=1)] = 300,
    concurrency: Annotated[
        str, typer.Option(help="Comma-separated client counts, e.g. 1,2,4.")
    ] = "1,2,4",
    soak: Annotated[
        int, typer.Option(help="Extra calls for the leak check (processes, RSS, fds).", min=0)
    ] = 0,
    think_ms: Annotated[
        float,
        typer.Option(help="Pause before each call, as a model generating between tool calls."),
    ] = 0.0,
    unisolated: Unisolated = False,
    as_json: AsJson = False,
) -> None:
    """Latency (p50/p99) and calls/s of stateless, session and sympy-tool calls.

    Runs each workload at each concurrency level against a fresh local sandbox pool;
    with --soak N, also runs N more calls and reports the jails' process count, RSS and
    this process's open fds before and after.
    """
    from sandboxes.bench import run_bench

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        _err.print(
            Text(f"error: --concurrency: got {concurrency!r}; expected e.g. 1,2,4", style="red")
        )
        raise typer.Exit(2)
    report = _run_async(
        run_bench(
            workers=workers,
            calls=calls,
            concurrency=levels,
            soak=soak,
            isolation="none" if unisolated else "bwrap",
            think_ms=think_ms,
        )
    )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    caps = report["capabilities"]["workers"][0]
    table = Table(
        title=f"sandbox bench: {workers} worker(s), {report['isolation']}, Landlock "
        f"ABI {caps['landlock_abi']}, seccomp {'on' if caps['seccomp'] else 'off'}"
    )
    for col in ("workload", "clients", "p50 ms", "p99 ms", "calls/s", "failures"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in report["results"]:
        table.add_row(
            r["workload"],
            str(r["concurrency"]),
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['calls_per_s']:.0f}",
            str(r["failures"]),
        )
    _out.print(table)
    if "soak" in report:
        s = report["soak"]
        b, a = s["before"], s["after"]
        _out.print(
            f"soak {s['calls']} calls: jail processes {b['processes']} -> {a['processes']}, "
            f"jail RSS {b['rss_mb']:.0f} -> {a['rss_mb']:.0f} MiB, "
            f"controller fds {b['fds']} -> {a['fds']}"
        )


@sandbox_app.command("serve")
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (0: pick a free one).", min=0)] = 8000,
    workers: Workers = 2,
    timeout: Timeout = 10.0,
    memory_mb: MemoryMb = 1024,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="AGENT_SPO_SANDBOX_TOKEN", help="Require this bearer token on every request."
        ),
    ] = None,
    session_ttl: Annotated[
        float, typer.Option(help="Close sessions idle for this many seconds.")
    ] = 900.0,
    unisolated: Unisolated = False,
) -> None:
    """Serve a local sandbox pool over HTTP so rollout machines can share it.

    Clients use `RemoteSandbox(url)` (sandbox.backend=remote, sandbox.url=...). Binds to
    loopback unless --host says otherwise; a non-loopback address without --token is
    refused.
    """
    from sandboxes.jail import SandboxUnavailable
    from sandboxes.remote import SandboxServer

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        _err.print(
            Text(
                f"error: refusing to serve on {host} without --token "
                "(anyone who can reach it could run code here)",
                style="red",
            )
        )
        raise typer.Exit(2)
    server = SandboxServer(
        _sandbox(workers, timeout, memory_mb, unisolated),
        host=host,
        port=port,
        token=token,
        session_ttl_s=session_ttl,
    )
    try:
        server.start()
    except SandboxUnavailable as e:
        _err.print(Text(f"error: {e}", style="red"), soft_wrap=True)
        raise typer.Exit(EXIT_SANDBOX) from None
    _err.print(f"serving {workers} sandbox worker(s) on {server.url} (Ctrl-C to stop)")
    print(server.url, flush=True)
    server.serve_forever()


def _toolbox():
    from tools.toolbox import Toolbox, builtin_tools

    return Toolbox(builtin_tools())


@tools_app.command("list")
def tools_list() -> None:
    """List the available tools with their one-line descriptions."""
    table = Table(title="tools")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("description")
    for t in _toolbox().tools.values():
        kind = "code (session)" if t.kind == "code" else "function"
        table.add_row(t.name, kind, t.description.splitlines()[0])
    _out.print(table)


@tools_app.command("show")
def tools_show(name: Annotated[str, typer.Argument(help="Tool name.")]) -> None:
    """Print the exact function-calling schema the model receives for one tool (JSON)."""
    box = _toolbox()
    if name not in box:
        _err.print(
            Text(f"error: unknown tool {name!r}; available: {', '.join(box.tools)}", style="red")
        )
        raise typer.Exit(2)
    typer.echo(json.dumps(box.tools[name].schema(), indent=2, ensure_ascii=False))


@tools_app.command("test")
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
    from tools.toolbox import Toolbox, builtin_tools

    box = Toolbox(builtin_tools(), max_output_chars=max_chars)

    async def go():
        async with _sandbox(1, timeout, 1024, unisolated) as sb:
            async with await sb.open_session() as session:
                return await box.call(name, args, sandbox=sb, session=session)

    call = _run_async(go())
    if as_json:
        typer.echo(json.dumps({
            "name": call.name, "arguments": call.arguments, "fault": call.fault,
            "observation": call.observation,
            "result": call.result.to_dict() if call.result else None,
        }, indent=2, ensure_ascii=False))  # fmt: skip
    else:
        _out.print(Text(f"fault: {call.fault or 'none'}", style="green" if call.ok else "bold red"))
        _out.print(Text("observation (what the model sees):", style="bold"))
        _out.print(Text(call.observation), soft_wrap=True)
        if call.result is not None:
            _out.print(Text("sandbox result:", style="bold"))
            _print_result(call.result, False)
    if call.fault == "model":
        raise typer.Exit(2)
    if call.result is not None:
        _exit_for(call.result)
