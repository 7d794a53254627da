"""The HTTP backend against real servers on 127.0.0.1: restarts, auth, TTL, bounds."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from sandboxes.local import LocalSandbox
from sandboxes.remote import RemoteSandbox, SandboxServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, *extra: str) -> subprocess.Popen:
    cli = os.path.join(os.path.dirname(sys.executable), "agent-spo")
    proc = subprocess.Popen(
        [cli, "sandbox", "serve", "--port", str(port), "--workers", "2", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().startswith("http://127.0.0.1:"), "server did not start"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_40_server_restart_mid_batch_is_survived_by_stateless_retries():
    port = _free_port()
    server = _serve(port)

    async def scenario():
        async with RemoteSandbox(
            f"http://127.0.0.1:{port}", retries=6, backoff_s=0.5, queue_budget_s=5, grace_s=1
        ) as sb:
            session = await sb.open_session()
            await session.run("x = 1")
            calls = [
                asyncio.create_task(sb.run(f"import time\ntime.sleep(0.5)\nprint({i})"))
                for i in range(6)
            ]
            await asyncio.sleep(0.2)
            _stop(server)  # mid-batch: some calls are in flight, some queued
            restarted.append(_serve(port))
            results = await asyncio.gather(*calls)
            lost = await session.run("x")
            return results, lost

    restarted: list[subprocess.Popen] = []
    try:
        results, lost = asyncio.run(scenario())
    finally:
        for p in restarted:
            _stop(p)
    assert [r.status for r in results] == ["ok"] * 6, [r.detail for r in results]
    assert sorted(int(r.stdout) for r in results) == list(range(6))
    # the session lived in the old server: it is reported lost, not silently re-created
    assert lost.status == "session_lost" and lost.infrastructure_failure


@pytest.fixture(scope="module")
def server():
    srv = SandboxServer(LocalSandbox(workers=4), port=0, token="s3cret", session_ttl_s=1.0)
    srv.start()
    yield srv
    srv.stop()


def test_token_is_required(server):
    async def go():
        async with RemoteSandbox(server.url, retries=0) as anon:
            bad = await anon.run("1")
        async with RemoteSandbox(server.url, token="s3cret") as ok:
            good = await ok.run("1")
        return bad, good

    bad, good = asyncio.run(go())
    assert bad.status == "sandbox_error" and "401" in bad.detail
    assert good.status == "ok" and good.stdout == "1\n" and good.backend == "remote/local"


def test_idle_sessions_expire(server):
    async def go():
        async with RemoteSandbox(server.url, token="s3cret") as sb:
            s = await sb.open_session()
            await s.run("x = 1")
            await asyncio.sleep(2.0)
            return await s.run("x")

    r = asyncio.run(go())
    assert r.status == "session_lost", r


def test_bad_requests_are_errors_not_crashes(server):
    headers = {"Authorization": "Bearer s3cret"}
    r = httpx.post(f"{server.url}/v1/run", json={"code": 5}, headers=headers)
    assert r.status_code == 400 and "string 'code'" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/run", content=b"{nope", headers=headers)
    assert r.status_code == 400
    r = httpx.get(f"{server.url}/v2/anything", headers=headers)
    assert r.status_code == 404
    r = httpx.post(
        f"{server.url}/v1/run_batch",
        headers=headers,
        json={"calls": [{"code": "1"}, {"code": "2", "timeout_s": 5}]},
    )
    assert [x["stdout"] for x in r.json()] == ["1\n", "2\n"]


def test_client_bounds_its_in_flight_calls(server):
    async def go():
        async with RemoteSandbox(server.url, token="s3cret", max_in_flight=2) as sb:
            t0 = time.monotonic()
            rs = await asyncio.gather(*(sb.run("import time\ntime.sleep(0.3)") for _ in range(6)))
            return rs, time.monotonic() - t0

    rs, elapsed = asyncio.run(go())
    assert all(r.ok for r in rs)
    # 6 calls, 2 at a time, 0.3 s each: at least 3 rounds although the server has 4 workers
    assert elapsed >= 0.9, elapsed


def test_unreachable_server_is_an_infrastructure_failure():
    async def go():
        async with RemoteSandbox(
            f"http://127.0.0.1:{_free_port()}", retries=1, backoff_s=0.01
        ) as sb:
            return await sb.run("1")

    r = asyncio.run(go())
    assert r.status == "sandbox_error" and "unreachable" in r.detail


def test_serve_refuses_a_public_address_without_a_token():
    cli = os.path.join(os.path.dirname(sys.executable), "agent-spo")
    r = subprocess.run(
        [cli, "sandbox", "serve", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "without --token" in r.stderr


def test_a_stopped_server_answers_a_kept_alive_connection_at_once():
    """After stop(), a client whose connection the server kept alive gets a failure at
    once (503, then a refused connection), not a wait for its whole deadline."""

    async def go():
        server = SandboxServer(LocalSandbox(workers=1), port=0).start()
        async with RemoteSandbox(server.url, retries=0) as sb:
            first = await sb.run("print(1)")
            server.stop()  # the client's connection is still open on a handler thread
            t0 = time.monotonic()
            after = await sb.run("print(2)")
            return first, after, time.monotonic() - t0

    first, after, waited = asyncio.run(go())
    assert first.ok and after.infrastructure_failure
    assert waited < 10, waited  # the client's deadline is 75 s
