"""The docker backend: the same runner in long-lived, locked-down containers (docker SDK).

One container per worker, started once and reused for thousands of calls (never one per
call): no network, read-only root, a size-capped tmpfs at /tmp, pids/memory/CPU limits,
every capability dropped, no-new-privileges, uid 65534, optionally the gVisor runtime
(`runtime="runsc"`). The controller talks to the runner through the container's
attached stdin/stdout. With a non-TTY attach, Docker multiplexes the output into frames
(an 8-byte header: stream id, 3 zero bytes, big-endian payload length), which
:class:`FrameDemuxer` undoes; stdin is passed through raw.

Build the image from the repository root:

    docker build -f sandboxes/Dockerfile -t agent-spo-sandbox .
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from sandboxes.errors import SandboxUnavailable
from sandboxes.jail import ENV, PKG_ROOT, bootstrap
from sandboxes.local import Limits, LocalSandbox, _Worker

DEFAULT_IMAGE = "agent-spo-sandbox:latest"
# Which trainer process started a container: a container whose owner died is reaped by
# the next DockerSandbox on the same host (an attached stdin stays open after its client
# is gone, so a killed trainer would otherwise leave its containers running).
OWNER = f"{socket.gethostname()}:{os.getpid()}"
_FRAME = struct.Struct(">BxxxI")
STDOUT, STDERR = 1, 2


def docker_errors() -> tuple[type[BaseException], ...]:
    """What the Docker SDK raises when the engine fails: its own errors, and requests' and
    the socket's (both OSError). Anything else from it is a bug, and is not caught."""
    from docker.errors import DockerException

    return (DockerException, OSError)


class FrameDemuxer:
    """Split Docker's multiplexed attach stream into (stream id, payload) pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= _FRAME.size:
            stream, size = _FRAME.unpack_from(self._buf)
            if stream not in (0, STDOUT, STDERR):
                raise ValueError(f"not a Docker stream frame (stream id {stream})")
            if len(self._buf) < _FRAME.size + size:
                break
            out.append((stream, bytes(self._buf[_FRAME.size : _FRAME.size + size])))
            del self._buf[: _FRAME.size + size]
        return out


def frame(stream: int, payload: bytes) -> bytes:
    """Encode one frame as Docker does (used by tests that play the engine)."""
    return _FRAME.pack(stream, len(payload)) + payload


@dataclass(frozen=True)
class ContainerSpec:
    image: str = DEFAULT_IMAGE
    memory_mb: int = 2048  # container cap (covers the tmpfs too); per-call RLIMIT_AS is lower
    cpus: float = 1.0
    pids: int = 512
    tmp_mb: int = 256
    runtime: str | None = None  # "runsc" for gVisor
    # User tool modules: (name under /sbx, host file or package directory), read-only.
    sources: tuple[tuple[str, str], ...] = ()


def container_kwargs(spec: ContainerSpec, name: str) -> dict:
    """Arguments for `docker.from_env().containers.run(**kwargs)`."""
    kwargs = {
        "image": spec.image,
        "command": ["python", "-s", "-c", bootstrap(PKG_ROOT)],
        "name": name,
        "detach": True,
        "stdin_open": True,
        "tty": False,
        "auto_remove": True,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"size={spec.tmp_mb}m,mode=1777,exec"},
        "pids_limit": spec.pids,
        "mem_limit": f"{spec.memory_mb}m",
        "memswap_limit": f"{spec.memory_mb}m",  # no swap beyond the memory cap
        "nano_cpus": int(spec.cpus * 1e9),
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "user": "65534:65534",
        "working_dir": "/tmp",
        "environment": dict(ENV),
        "labels": {"agent-spo": "sandbox", "agent-spo.owner": OWNER},
        "init": False,  # the runner reaps its own children (it is a subreaper)
    }
    if spec.runtime:
        kwargs["runtime"] = spec.runtime
    if spec.sources:  # bind mounts (not "host:bind:mode" strings: a path may hold ':')
        from docker.types import Mount

        kwargs["mounts"] = [
            Mount(target=f"{PKG_ROOT}/{name}", source=path, type="bind", read_only=True)
            for name, path in spec.sources
        ]
    return kwargs


class _DockerWorker(_Worker):
    """A pool worker whose runner lives in a container reached through the attach socket."""

    client: Any = None  # docker.DockerClient (the SDK has no type hints)
    spec: ContainerSpec = ContainerSpec()
    container: Any = None  # docker.models.containers.Container
    _sock: socket.socket | None = None
    _demux: FrameDemuxer | None = None
    _stdout: bytearray | None = None

    async def _spawn(self) -> None:
        name = f"agent-spo-sandbox-{id(self):x}-{self.generation}"
        try:
            self.container = await asyncio.to_thread(
                self.client.containers.run, **container_kwargs(self.spec, name)
            )
            attached = await asyncio.to_thread(
                self.container.attach_socket,
                params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1},
            )
            self._sock = sock = getattr(attached, "_sock", attached)
            sock.setblocking(False)
        except docker_errors() as e:
            await self.kill()
            raise SandboxUnavailable(
                f"sandbox container {self.index} could not be started: {type(e).__name__}: {e}"
            ) from e
        self._demux = FrameDemuxer()
        self._stdout = bytearray()

    def _alive(self) -> bool:
        return self._sock is not None

    async def _send(self, data: bytes) -> None:
        assert self._sock is not None  # callers check _alive()
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def _recv_exact(self, n: int) -> bytes:
        # set by _spawn; callers check _alive()
        assert self._sock is not None and self._demux is not None and self._stdout is not None
        loop = asyncio.get_running_loop()
        while len(self._stdout) < n:
            chunk = await loop.sock_recv(self._sock, 65536)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(self._stdout), n)
            for stream, payload in self._demux.feed(chunk):
                if stream == STDERR:
                    self.stderr_tail.extend(payload.decode("utf-8", "replace").splitlines())
                else:
                    self._stdout += payload
        out = bytes(self._stdout[:n])
        del self._stdout[:n]
        return out

    async def kill(self) -> None:
        sock, container = self._sock, self.container
        self._sock = None
        if sock is not None:
            sock.close()
        if container is not None:
            try:
                await asyncio.to_thread(container.kill)
            except docker_errors():  # already gone / auto-removed
                pass
        self.container = None

    async def shutdown(self) -> None:
        await self.kill()


class DockerSandbox(LocalSandbox):
    """The local backend's pool and sessions, with each worker in its own container."""

    backend = "docker"

    def __init__(
        self,
        *,
        spec: ContainerSpec | None = None,
        workers: int = 2,
        limits: Limits | None = None,
        **kwargs,
    ) -> None:
        super().__init__(workers=workers, limits=limits or Limits(), **kwargs)
        self.spec = dataclasses.replace(spec or ContainerSpec(), sources=tuple(self._spec.sources))
        # the container is the jail: the runner may sweep every other process it sees
        self._hello["config"]["jailed"] = True

    async def _make_workers(self) -> list[_Worker]:
        client = await asyncio.to_thread(connect)
        try:
            await asyncio.to_thread(client.images.get, self.spec.image)
        except docker_errors() as e:  # docker.errors.ImageNotFound and friends
            raise SandboxUnavailable(
                f"docker image {self.spec.image!r} is missing ({e}); build it with "
                "`docker build -f sandboxes/Dockerfile -t agent-spo-sandbox .`"
            ) from None
        try:
            await asyncio.to_thread(reap_orphans, client)
        except docker_errors() as e:
            raise SandboxUnavailable(
                f"could not list this host's sandbox containers: {type(e).__name__}: {e}"
            ) from e
        workers: list[_Worker] = []
        for i in range(self._n):
            w = _DockerWorker(
                i, [], None, None, self._hello, stderr_tail=collections.deque(maxlen=50)
            )
            w.client, w.spec = client, self.spec
            workers.append(w)
        return workers


def reap_orphans(client) -> int:
    """Kill this host's sandbox containers whose owning trainer process is gone."""
    host = socket.gethostname()
    killed = 0
    for c in client.containers.list(filters={"label": "agent-spo=sandbox"}):
        owner = (c.labels or {}).get("agent-spo.owner", "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                c.kill()
                killed += 1
            except docker_errors():  # already gone
                pass
    return killed


def connect():
    """A docker client that answers a ping, or SandboxUnavailable saying why not."""
    try:
        import docker
    except ImportError as e:
        raise SandboxUnavailable(f"the docker SDK is not installed: {e}") from None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except docker_errors() as e:  # DockerException, requests' connection errors, ...
        raise SandboxUnavailable(f"no Docker engine answers: {type(e).__name__}: {e}") from None
