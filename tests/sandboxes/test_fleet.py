"""The sandbox fleet against real servers on 127.0.0.1: spreading calls, sticky sessions,
a server that dies and comes back, the fleet-wide caps, and its checks at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandboxes.errors import SandboxUnavailable
from sandboxes.fleet import SandboxFleet
from sandboxes.local import LocalSandbox
from sandboxes.remote import SandboxServer


def _server(port: int = 0) -> SandboxServer:
    return SandboxServer(LocalSandbox(workers=1), port=port).start()


@pytest.fixture
def servers():
    started = [_server(), _server()]
    yield started
    for s in started:
        s.stop()


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_calls_spread_and_each_session_stays_on_its_server(servers):
    async def go():
        async with SandboxFleet([s.url for s in servers]) as fleet:
            results = await asyncio.gather(
                *(fleet.run("import time; time.sleep(0.05); print(1)") for _ in range(12))
            )
            sessions = [await fleet.open_session() for _ in range(4)]
            for i, s in enumerate(sessions):
                await s.run(f"x = {i}")
            seen = [(await s.run("print(x)")).stdout.strip() for s in sessions]
            where = [s.server for s in sessions]
            for s in sessions:
                await s.close()
            return results, seen, where, [m.served for m in fleet.members], fleet.stats()

    results, seen, where, served, stats = run(go())
    assert all(r.ok and r.stdout == "1\n" for r in results)
    assert seen == ["0", "1", "2", "3"]  # each session kept its state on its server
    assert sorted(where) == sorted([servers[0].url] * 2 + [servers[1].url] * 2)
    assert all(n > 3 for n in served), served  # both servers took stateless calls
    assert stats["sandbox/server0_live"] == stats["sandbox/server1_live"] == 1.0


def _serve(port: int = 0) -> subprocess.Popen:
    """`agent-spo sandbox serve` in its own process (killed for real below)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_spo.cli", "sandbox", "serve", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("http://127.0.0.1:"), "server did not start"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_dead_server_loses_its_sessions_and_a_restarted_one_rejoins():
    from agent_spo.engines.replicas import free_port

    ports = [free_port(), free_port()]
    procs = [_serve(p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]

    async def go():
        async with SandboxFleet(urls, health_interval_s=0.2, retries=0) as fleet:
            a, b = await fleet.open_session(), await fleet.open_session()
            on0 = a if a.server == urls[0] else b
            on1 = b if on0 is a else a
            await on0.run("x = 1")
            await on1.run("y = 2")
            _kill(procs[0])
            lost = await on0.run("print(x)")
            kept = await on1.run("print(y)")
            after = [await fleet.run("print(3)") for _ in range(4)]
            live_after_death = [m.live for m in fleet.members]
            fresh = await fleet.open_session()
            procs[0] = _serve(ports[0])  # back on the same address
            await asyncio.sleep(1.0)
            rejoined = [m.live for m in fleet.members]
            for s in (a, b, fresh):
                await s.close()
            return lost, kept, after, live_after_death, fresh.server, rejoined

    try:
        lost, kept, after, live_after_death, fresh_server, rejoined = run(go())
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    assert lost.status == "session_lost" and lost.infrastructure_failure  # dropped, not scored
    assert kept.ok and kept.stdout == "2\n"
    assert all(r.ok and r.stdout == "3\n" for r in after)  # retried on the live server
    assert live_after_death == [False, True] and fresh_server == urls[1]
    assert rejoined == [True, True]


def test_the_fleet_wide_caps_hold():
    server = _server()
    try:

        async def calls():
            async with SandboxFleet([server.url], max_in_flight=2) as fleet:
                t0 = time.monotonic()
                await asyncio.gather(*(fleet.run("import time; time.sleep(0.4)") for _ in range(4)))
                return time.monotonic() - t0

        assert run(calls()) >= 0.8  # 4 calls of 0.4 s, 2 at a time

        async def sessions():
            async with SandboxFleet([server.url], max_sessions=2) as fleet:
                opened = [await fleet.open_session() for _ in range(2)]
                third = asyncio.create_task(fleet.open_session())
                await asyncio.sleep(0.3)
                waited = not third.done()  # the cap of 2 holds it
                await opened[0].close()
                opened.append(await asyncio.wait_for(third, 10))
                for s in opened[1:]:
                    await s.close()
                return waited

        assert run(sessions())

        async def rate(per_s):
            async with SandboxFleet([server.url], sessions_per_s=per_s) as fleet:
                t0 = time.monotonic()
                for _ in range(8):
                    await (await fleet.open_session()).close()
                return time.monotonic() - t0

        # a second's burst (4), then 4 per second: the last 4 take about a second
        limited, free = run(rate(4.0)), run(rate(None))
        assert limited >= 0.9 and free < limited, (limited, free)
    finally:
        server.stop()


def test_a_fleet_with_no_live_server_refuses_to_start_and_names_them():
    from agent_spo.engines.replicas import free_port

    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with pytest.raises(SandboxUnavailable, match=r"no sandbox server of the fleet answers: "
                       rf"{urls[0]}: .*; {urls[1]}: "):  # fmt: skip
        run(SandboxFleet(urls).start())
    with pytest.raises(ValueError, match="listed twice"):
        SandboxFleet([urls[0], urls[0]])


def test_the_config_builds_a_fleet_and_checks_every_servers_tools(servers, tmp_path):
    from agent_spo import builders
    from agent_spo.config import ConfigError, load_config
    from sandboxes.errors import SandboxCheckFailed

    urls = "[" + ", ".join(s.url for s in servers) + "]"
    cfg = load_config(None, ["sandbox.backend=remote", f"sandbox.urls={urls}"])
    sandbox = builders.build_sandbox(cfg.sandbox, cfg.rollout)
    assert isinstance(sandbox, SandboxFleet)

    async def check(sb):
        async with sb:
            await builders.check_sandbox(sb)

    run(check(sandbox))  # both servers offer the built-in python tool
    mine = tmp_path / "fleet_tool_x1.py"
    mine.write_text('from tools.sdk import tool\n\n@tool\ndef mine(x: int) -> str:\n'
                    '    """Echo.\n\n    Args:\n        x: X.\n    """\n    return str(x)\n')  # fmt: skip
    cfg = load_config(None, ["sandbox.backend=remote", f"sandbox.urls={urls}",
                             f"rollout.tools=[python,{mine}]"])  # fmt: skip
    with pytest.raises(SandboxCheckFailed, match=r"lacks the tools \['mine'\]"):
        run(check(builders.build_sandbox(cfg.sandbox, cfg.rollout)))
    for bad, message in [
        (["sandbox.backend=remote"], "url or sandbox.urls is required"),
        (["sandbox.backend=remote", "sandbox.url=http://a", "sandbox.urls=[http://b]"],
         "not both"),
        (["sandbox.backend=remote", "sandbox.urls=[http://a, http://a]"], "listed twice"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)
