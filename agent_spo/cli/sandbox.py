"""`agent-spo sandbox ...`: run code in real sandboxes, benchmark them, serve them over HTTP."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from agent_spo.cli.args import EXIT_FAILED, EXIT_SANDBOX, fail, positive_ints, stderr, stdout

app = typer.Typer(
    help="Run sandboxes: the processes where the agent's tool calls execute.",
    no_args_is_help=True,
)

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


ToolRefs = Annotated[
    list[str] | None,
    typer.Option(
        "--tools",
        help="Your tool modules for the sandbox to run: a file (my_tools.py) or a module "
        "(mypkg.tools), optionally :function; repeat it for several (see docs/tools.md).",
    ),
]


def resolve_tool_refs(refs: list[str] | None):
    """The tools references offer with the built-in ones (a clear exit on a bad one)."""
    from tools.refs import ToolReferenceError, builtin_names, resolve

    wanted = [r.strip() for r in refs or [] if r.strip()]
    try:
        return resolve(builtin_names() + [r for r in wanted if r not in builtin_names()])
    except ToolReferenceError as e:
        fail(str(e))


def local_sandbox(workers: int, timeout: float, memory_mb: int, unisolated: bool, sources=()):
    from sandboxes.local import Limits, LocalSandbox

    if unisolated:
        stderr.print(Text("warning: sandbox isolation is OFF (--unisolated)", style="bold yellow"))
    return LocalSandbox(
        workers=workers,
        limits=Limits(timeout_s=timeout, memory_mb=memory_mb),
        isolation="none" if unisolated else "bwrap",
        tool_sources=sources,
    )


def run_async(coro):
    from sandboxes import SandboxError

    try:
        return asyncio.run(coro)
    except SandboxError as e:
        fail(f"{e}", EXIT_SANDBOX)


def print_result(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    style = "green" if result.ok else "red"
    stdout.print(Text(f"status: {result.status}", style=f"bold {style}"))
    if result.stdout:
        stdout.print(Text("stdout:", style="bold"))
        stdout.print(Text(result.stdout.rstrip("\n")), soft_wrap=True)
    if result.stderr:
        stdout.print(Text("stderr:", style="bold"))
        stdout.print(Text(result.stderr.rstrip("\n")), soft_wrap=True)
    if result.traceback:
        stdout.print(Text(result.traceback.rstrip("\n"), style="red"), soft_wrap=True)
    extras = [f"wall {result.wall_s * 1000:.1f} ms", f"cpu {result.cpu_s * 1000:.1f} ms"]
    if result.stdout_truncated or result.stderr_truncated:
        extras.append(f"output truncated ({result.stdout_bytes + result.stderr_bytes} bytes)")
    if result.signal:
        extras.append(f"signal {result.signal}")
    if result.detail:
        extras.append(result.detail)
    stdout.print(Text(" · ".join(extras), style="dim"))


def exit_for(result) -> None:
    if result.infrastructure_failure:
        raise typer.Exit(EXIT_SANDBOX)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


@app.command("run")
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
        async with local_sandbox(workers, timeout, memory_mb, unisolated) as sb:
            return await sb.run(code)

    result = run_async(go())
    print_result(result, as_json)
    exit_for(result)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {path}: {e}")


@app.command("bench")
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
    from agent_spo.bench.sandbox import run_bench

    levels = positive_ints(concurrency, "--concurrency", "1,2,4")
    report = run_async(
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
    stdout.print(table)
    if "soak" in report:
        s = report["soak"]
        b, a = s["before"], s["after"]
        stdout.print(
            f"soak {s['calls']} calls: jail processes {b['processes']} -> {a['processes']}, "
            f"jail RSS {b['rss_mb']:.0f} -> {a['rss_mb']:.0f} MiB, "
            f"controller fds {b['fds']} -> {a['fds']}"
        )


@app.command("serve")
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (0: pick a free one).", min=0)] = 8000,
    workers: Workers = 2,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            help="Wall-clock limit per call, seconds; also the most a client may ask for "
            "(a larger timeout_s is clamped to it).",
            min=0.001,
            max=3600,
        ),
    ] = 10.0,
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
    tools: ToolRefs = None,
) -> None:
    """Serve a local sandbox pool over HTTP so rollout machines can share it.

    Clients use `RemoteSandbox(url)` (sandbox.backend=remote, sandbox.url=...). Binds to
    loopback unless --host says otherwise; a non-loopback address without --token is
    refused. --timeout caps every call: a client asking for more gets --timeout.
    --tools adds your tool modules to the built-in tools; a trainer whose tools the
    server lacks refuses to start, naming both lists.
    """
    from sandboxes import SandboxError
    from sandboxes.remote import SandboxServer
    from tools.refs import offer

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        fail(
            f"refusing to serve on {host} without --token "
            "(anyone who can reach it could run code here)"
        )
    offered = resolve_tool_refs(tools)
    server = SandboxServer(
        local_sandbox(workers, timeout, memory_mb, unisolated, offered.sources),
        tools=offer(offered.tools),
        host=host,
        port=port,
        token=token,
        session_ttl_s=session_ttl,
        max_timeout_s=timeout,
    )
    try:
        server.start()
    except SandboxError as e:
        fail(f"{e}", EXIT_SANDBOX)
    stderr.print(f"serving {workers} sandbox worker(s) on {server.url} (Ctrl-C to stop)")
    print(server.url, flush=True)
    server.serve_forever()
