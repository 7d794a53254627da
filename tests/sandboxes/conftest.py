"""A real local sandbox pool shared by the sandbox tests (started once per module)."""

import asyncio

import pytest

from sandboxes.local import Limits, LocalSandbox
from sandboxes.remote import RemoteSandbox, SandboxServer


class SyncSandbox:
    """Drive an async sandbox from plain tests on one private event loop.

    backend "local": a LocalSandbox. backend "remote": a LocalSandbox served over HTTP on
    127.0.0.1 by a real SandboxServer, reached through RemoteSandbox (httpx).
    """

    def __init__(self, backend="local", **kwargs):
        self.loop = asyncio.new_event_loop()
        self.local = LocalSandbox(**kwargs)
        self.server = None
        if backend == "remote":
            self.server = SandboxServer(self.local, port=0).start()
            self.sb = RemoteSandbox(self.server.url)
        else:
            self.sb = self.local
        self.loop.run_until_complete(self.sb.start())

    def run(self, code, **kw):
        return self.loop.run_until_complete(self.sb.run(code, **kw))

    def session(self):
        return SyncSession(self, self.loop.run_until_complete(self.sb.open_session()))

    def gather(self, coros):
        async def all_():
            return await asyncio.gather(*coros)

        return self.loop.run_until_complete(all_())

    def census(self):
        return self.loop.run_until_complete(self.sb.census())

    def strays(self):
        return self.census()["strays"]

    def footprint(self):
        self.census()  # each runner answers only after its next spare exists: a settled count
        return self.local.footprint()

    def close(self):
        self.loop.run_until_complete(self.sb.close())
        if self.server is not None:
            self.server.stop()
        self.loop.close()


class SyncSession:
    def __init__(self, owner, session):
        self.owner, self.s = owner, session

    def run(self, code, **kw):
        return self.owner.loop.run_until_complete(self.s.run(code, **kw))

    def close(self):
        self.owner.loop.run_until_complete(self.s.close())


@pytest.fixture(scope="module", params=["local", "remote"])
def sandbox(request):
    """The adversarial suite runs against every backend that can run here. A docker
    variant needs a Docker engine, which these machines lack (see test_docker.py)."""
    sb = SyncSandbox(request.param, workers=2, limits=Limits(timeout_s=3.0, memory_mb=512))
    yield sb
    sb.close()


@pytest.fixture
def make_sandbox():
    """Factory for a private pool with custom settings; closed after the test."""
    made = []

    def make(**kwargs):
        sb = SyncSandbox(**kwargs)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.close()
