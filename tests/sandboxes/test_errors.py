"""Every backend raises its own failures as SandboxError, never a transport or OS error.

The episode runner drops (and counts) an episode only for a SandboxError; anything else
is a bug that stops the run (STYLE rule 23). These tests hold the backends to that: real
clients against a closed port, real pools before start and after close, a worker whose
binary is missing, and the docker worker against an engine that refuses.
"""

import asyncio
import socket

import pytest

import sandboxes
from sandboxes import jail
from sandboxes.errors import SandboxClosed, SandboxError, SandboxUnavailable
from sandboxes.local import LocalSandbox, _Worker
from sandboxes.remote import RemoteSandbox, RemoteSession


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_family_exported_from_the_package():
    assert issubclass(SandboxUnavailable, SandboxError) and issubclass(SandboxClosed, SandboxError)
    assert issubclass(SandboxError, RuntimeError)  # callers that caught RuntimeError still do
    assert jail.SandboxUnavailable is SandboxUnavailable
    assert sandboxes.SandboxError is SandboxError
    assert sandboxes.SandboxUnavailable is SandboxUnavailable


def test_remote_client_at_a_closed_port_raises_sandbox_errors_not_httpx_errors():
    async def go():
        async with RemoteSandbox(
            f"http://127.0.0.1:{_closed_port()}", retries=1, backoff_s=0.01
        ) as sb:
            with pytest.raises(SandboxUnavailable, match="could not open a remote session"):
                await sb.open_session()
            with pytest.raises(SandboxError, match="health"):
                await sb.health()
            with pytest.raises(SandboxError, match="health"):
                await sb.census()
            r = await sb.run("1")  # a failure around one call stays a typed result
            s = RemoteSession(sb, "gone")
            lost = await s.run("1")
            await s.close()  # the DELETE fails too: the server's TTL would reap it
            return r, lost

    r, lost = asyncio.run(go())
    assert r.status == "sandbox_error" and "unreachable" in r.detail
    assert lost.status == "session_lost" and lost.infrastructure_failure


def test_remote_client_before_start_and_after_close_raises_sandbox_closed():
    async def go():
        sb = RemoteSandbox(f"http://127.0.0.1:{_closed_port()}", retries=0)
        for call in (sb.run("1"), sb.open_session(), sb.health()):
            with pytest.raises(SandboxClosed):
                await call
        await sb.start()
        s = RemoteSession(sb, "sid")
        await sb.close()
        with pytest.raises(SandboxClosed):
            await sb.run("1")
        with pytest.raises(SandboxClosed):
            await s.run("1")
        await s.close()  # closing a session of a closed client is quiet
        with pytest.raises(SandboxClosed, match="session is closed"):
            await s.run("1")

    asyncio.run(go())


def test_local_pool_before_start_raises_sandbox_closed():
    sb = LocalSandbox(workers=1)

    async def go():
        with pytest.raises(SandboxClosed, match="not started"):
            await sb.run("1")
        with pytest.raises(SandboxClosed, match="not started"):
            await sb.open_session()

    asyncio.run(go())


def test_local_pool_after_close_raises_sandbox_closed_and_sessions_close_quietly():
    async def go():
        sb = LocalSandbox(workers=1, preload=(), warmup=())
        async with sb:
            session = await sb.open_session()
            assert (await session.run("x = 1")).ok
        with pytest.raises(SandboxClosed):
            await sb.run("1")
        with pytest.raises(SandboxClosed):
            await sb.open_session()
        with pytest.raises(SandboxClosed, match="sandbox holding this session is closed"):
            await session.run("x")
        await session.close()  # its worker is gone with the pool: nothing to do, no error
        with pytest.raises(SandboxClosed, match="session is closed"):
            await session.run("x")

    asyncio.run(go())


def test_a_worker_that_cannot_be_spawned_is_sandbox_unavailable_not_oserror(tmp_path):
    missing = str(tmp_path / "no-such-runner")
    w = _Worker(0, [missing], None, None, {"op": "hello", "config": {}})
    with pytest.raises(SandboxUnavailable, match="could not be started: FileNotFoundError"):
        asyncio.run(w.start())


def test_docker_worker_whose_engine_refuses_is_sandbox_unavailable():
    import collections

    import docker.errors
    import requests

    from sandboxes.docker import DockerSandbox, _DockerWorker, connect

    def worker(exc):
        class Containers:
            def run(self, **kwargs):
                raise exc

        class Client:
            containers = Containers()

        w = _DockerWorker(0, [], None, None, {}, stderr_tail=collections.deque(maxlen=5))
        w.client = Client()
        return w

    for exc in (
        docker.errors.APIError("500 Server Error: no space left on device"),
        requests.exceptions.ConnectionError("Connection aborted"),
    ):
        with pytest.raises(SandboxUnavailable, match="could not be started"):
            asyncio.run(worker(exc).start())
    with pytest.raises(TypeError):  # a bug in the SDK call is not the engine failing
        asyncio.run(worker(TypeError("run() got an unexpected keyword argument")).start())

    try:
        connect()
    except SandboxUnavailable:
        pass  # no engine here (the usual case): a SandboxError, not a docker/requests error
    else:
        pytest.skip("a Docker engine answers here")
    with pytest.raises(SandboxError, match="no Docker engine answers"):
        asyncio.run(DockerSandbox(workers=1).start())
