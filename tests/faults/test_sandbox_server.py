"""The HTTP sandbox server under load and faults, against real servers on 127.0.0.1.

Each test is one fault: a burst of connections, a client that hangs up mid-call, a
client that asks for more time than the server allows, a server that is stopped.
"""

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import httpx
import pytest

from sandboxes.local import LocalSandbox
from sandboxes.remote import RemoteSandbox, SandboxServer

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server():
    srv = SandboxServer(LocalSandbox(workers=2), port=0, token=TOKEN).start()
    yield srv
    srv.stop()


def test_256_session_calls_in_flight_lose_nothing(server):
    # 8 sessions with 32 calls each, all in flight at once: the client opens a connection
    # per call in flight (a session per call would hit the workers' process limit, a
    # backend bound this test is not about)
    async def go():
        async with RemoteSandbox(server.url, token=TOKEN, max_in_flight=256) as sb:
            sessions = await asyncio.gather(*(sb.open_session() for _ in range(8)))
            results = await asyncio.gather(
                *(sessions[i % 8].run(f"print({i})") for i in range(256))
            )
            await asyncio.gather(*(s.close() for s in sessions))
            return results

    results = asyncio.run(go())
    lost = [r.detail for r in results if r.status != "ok"]
    assert not lost, f"{len(lost)} of 256 lost, e.g. {lost[:3]}"
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(256)]


def test_a_burst_of_200_connections_has_no_transport_errors(server):
    async def go():
        # one connection per request, all opened at once: the listen backlog takes the burst
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=AUTH, limits=limits, timeout=60) as client:

            async def one(i: int) -> str:
                try:
                    r = await client.post(f"{server.url}/v1/run", json={"code": f"print({i})"})
                except httpx.TransportError as e:
                    return f"{type(e).__name__}: {e}"
                return "" if r.json()["stdout"] == f"{i}\n" else r.text

            return await asyncio.gather(*(one(i) for i in range(200)))

    errors = [e for e in asyncio.run(go()) if e]
    assert not errors, f"{len(errors)} of 200 failed, e.g. {errors[:3]}"


def test_a_client_hanging_up_mid_call_is_a_quiet_debug_line(server, caplog, capfd):
    body = b'{"code": "import time\\ntime.sleep(0.3)"}'
    request = (
        f"POST /v1/run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    caplog.set_level(logging.DEBUG, logger="sandboxes.remote")
    with socket.create_connection(server.address) as sock:
        sock.sendall(request)
        time.sleep(0.1)  # the call is running on the server
        # hang up with a reset (SO_LINGER 0) before the reply: the server's write fails
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(1.0)  # the call ends and the server tries to reply
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    assert "Traceback" not in capfd.readouterr().err
    assert any("went away" in r.getMessage() for r in caplog.records), caplog.text
    r = httpx.post(f"{server.url}/v1/run", json={"code": "print(7)"}, headers=AUTH)
    assert r.json()["stdout"] == "7\n"


def test_stop_cancels_the_session_reaper():
    srv = SandboxServer(LocalSandbox(workers=1), port=0).start()
    reaper = srv._reaper
    srv.stop()
    assert reaper.cancelled()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_timeout_caps_what_a_client_asks_for():
    cli = os.path.join(os.path.dirname(sys.executable), "agent-spo")
    port = _free_port()
    proc = subprocess.Popen(
        [cli, "sandbox", "serve", "--port", str(port), "--workers", "1", "--timeout", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), "server did not start"

        async def go():
            async with RemoteSandbox(url) as sb:
                t0 = time.monotonic()
                r = await sb.run("import time\ntime.sleep(5)\nprint('slept')", timeout_s=60)
                return r, time.monotonic() - t0

        r, wall = asyncio.run(go())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert r.status == "timeout", r
    assert wall < 4, wall  # the server's 1 s limit, not the client's 60 s
