"""Which HTTP server should `agent-spo sandbox serve` use? Losses and throughput side by side.

Each option serves a real LocalSandbox (2 workers) from its own process; this process
drives it like a trainer would:

* ``session``: rounds of N session calls in flight through a fresh ``RemoteSandbox``
  (max_in_flight=N, so every round opens its connections at once);
* ``burst``: 200 plain httpx POSTs to /v1/run at once, each on a new connection.

Options: the stdlib ThreadingHTTPServer with its old listen backlog of 5, the same with
the backlog SandboxServer now uses (1024), and uvicorn (an ASGI app over the same
`SandboxServer.handle`, on the same event loop). uvicorn is not a dependency of this
project; the option is skipped when it is not installed.

    python scripts/bench_sandbox_server.py [--rounds 3] [--in-flight 64,256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time

import httpx

from sandboxes.errors import SandboxError
from sandboxes.local import LocalSandbox
from sandboxes.remote import RemoteSandbox, SandboxServer

OPTIONS = ("stdlib-backlog-5", "stdlib-backlog-1024", "uvicorn")


def _asgi_app(server: SandboxServer):
    """A minimal ASGI front for SandboxServer.handle (no token: this is a benchmark)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            status, payload = await server.handle(
                scope["method"], scope["path"], json.loads(body) if body else None
            )
        except ValueError as e:
            status, payload = 400, {"error": str(e)}
        except SandboxError as e:
            status, payload = 503, {"error": str(e)}
        data = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


def _serve(option: str, conn) -> None:
    """Child process: serve one option until the parent closes the pipe."""
    backlog = 5 if option == "stdlib-backlog-5" else 1024
    server = SandboxServer(LocalSandbox(workers=2), port=0, backlog=backlog).start()
    url = server.url
    if option == "uvicorn":
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(_asgi_app(server), lifespan="off", log_level="warning")
        asyncio.run_coroutine_threadsafe(uvicorn.Server(config).serve([sock]), server.loop)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    conn.send(url)
    try:
        conn.recv()
    except EOFError:
        pass
    server.stop()


def _summary(latencies: list[float], failures: int, calls: int, wall: float) -> dict:
    return {
        "calls": calls,
        "lost": failures,
        "calls_per_s": round(calls / wall, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
    }


async def _session_call(session, i: int, latencies: list[float]) -> bool:
    t0 = time.perf_counter()
    r = await session.run(f"print({i})")
    latencies.append(time.perf_counter() - t0)
    return r.status == "ok"


async def _sessions(url: str, in_flight: int, rounds: int) -> dict:
    latencies: list[float] = []
    failures = calls = 0
    wall = 0.0
    for _ in range(rounds):
        async with RemoteSandbox(url, max_in_flight=in_flight) as sb:
            sessions = await asyncio.gather(*(sb.open_session() for _ in range(16)))
            t0 = time.perf_counter()
            ok = await asyncio.gather(
                *(_session_call(sessions[i % 16], i, latencies) for i in range(in_flight))
            )
            wall += time.perf_counter() - t0
            failures += ok.count(False)
            calls += in_flight
            await asyncio.gather(*(s.close() for s in sessions))
    return _summary(latencies, failures, calls, wall)


async def _burst(url: str, n: int, rounds: int) -> dict:
    latencies: list[float] = []
    failures = 0
    wall = 0.0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(i: int) -> bool:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/run", json={"code": f"print({i})"})
            except httpx.TransportError:
                return False
            latencies.append(time.perf_counter() - t0)
            return r.status_code == 200 and r.json()["status"] == "ok"

        for _ in range(rounds):
            t0 = time.perf_counter()
            ok = await asyncio.gather(*(one(i) for i in range(n)))
            wall += time.perf_counter() - t0
            failures += ok.count(False)
    return _summary(latencies, failures, n * rounds, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-flight", default="64,256")
    ap.add_argument("--options", default=",".join(OPTIONS))
    args = ap.parse_args()
    levels = [int(x) for x in args.in_flight.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    for option in args.options.split(","):
        if option == "uvicorn":
            try:
                import uvicorn  # noqa: F401
            except ImportError:
                print("uvicorn: not installed, skipped")
                continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(option, child), daemon=True)
        proc.start()
        url = parent.recv()
        asyncio.run(_burst(url, 20, 1))  # warm the workers
        for n in levels:
            rows.append((option, f"session x{n}", asyncio.run(_sessions(url, n, args.rounds))))
        rows.append((option, "burst x200", asyncio.run(_burst(url, 200, args.rounds))))
        parent.close()
        proc.join(60)
    print(f"{'server':22} {'load':14} {'calls':>6} {'lost':>5} {'calls/s':>8} {'p50 ms':>7}")
    for option, load, r in rows:
        print(
            f"{option:22} {load:14} {r['calls']:>6} {r['lost']:>5} "
            f"{r['calls_per_s']:>8} {r['p50_ms']!s:>7}"
        )


if __name__ == "__main__":
    main()
