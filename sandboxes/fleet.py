"""The sandbox fleet: one sandbox client over N `agent-spo sandbox serve` servers.

It has the interface of every backend (``run``, ``open_session``, ``health``,
``census``), so episodes do not know how many servers there are. A stateless call goes
to the live server with the fewest calls in flight; a transport failure marks that
server down and the call is tried once on another (it is idempotent). A session lives
on one server for its whole life (sticky), chosen as the live server with the fewest
open sessions; a server that dies turns its open sessions' next calls into
``session_lost`` results, which the episode runner drops and counts, never scores.

Bounds over the whole fleet: ``max_in_flight`` calls at once, ``max_sessions`` open
sessions (None: no cap), and ``sessions_per_s`` new sessions per second (a token bucket;
None: no limit), so a burst of episodes cannot overrun the servers' process tables. A
background check reads every server's health every ``health_interval_s``: a live one that
does not answer leaves the rotation before an episode has to find out, and a down one
comes back when it answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from sandboxes.errors import SandboxClosed, SandboxError, SandboxUnavailable
from sandboxes.remote import RemoteSandbox, RemoteSession
from sandboxes.result import ExecResult, infra_result

log = logging.getLogger(__name__)


class _Member:
    def __init__(self, index: int, client: RemoteSandbox) -> None:
        self.index, self.client = index, client
        self.live = False
        self.calls = 0  # in flight now
        self.sessions = 0  # open now
        self.served = 0  # calls answered in all
        self.why_down = "not checked yet"

    @property
    def url(self) -> str:
        return self.client.url


class _Bucket:
    """At most ``rate`` acquisitions per second, with bursts up to ``rate`` (one second)."""

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.t = rate, rate, time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.rate, self.tokens + (now - self.t) * self.rate)
                self.t = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class SandboxFleet:
    """One sandbox over several `agent-spo sandbox serve` servers (see the module doc)."""

    backend = "fleet"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None = None,
        default_timeout_s: float = 10.0,
        max_in_flight: int = 256,
        max_sessions: int | None = None,
        sessions_per_s: float | None = None,
        health_interval_s: float = 2.0,
        required_tools: list[dict] | None = None,
        **client_kwargs: Any,
    ) -> None:
        if not urls:
            raise ValueError("a sandbox fleet needs at least one server url")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a sandbox server is listed twice in {list(urls)}")
        self.members = [
            _Member(i, RemoteSandbox(u, token=token, default_timeout_s=default_timeout_s,
                                     max_in_flight=max_in_flight, **client_kwargs))
            for i, u in enumerate(urls)
        ]  # fmt: skip
        self.url = ", ".join(urls)
        self.required_tools = required_tools  # checked per server by check_sandbox
        self.max_in_flight = max_in_flight
        self._calls = asyncio.Semaphore(max_in_flight)
        self._sessions = asyncio.Semaphore(max_sessions) if max_sessions else None
        self._bucket = _Bucket(sessions_per_s) if sessions_per_s else None
        self.health_interval_s = health_interval_s
        self._watch: asyncio.Task | None = None
        self.started = False

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> SandboxFleet:
        if self.started:
            return self
        for m in self.members:
            await m.client.start()
        await asyncio.gather(*(self._probe(m) for m in self.members))
        if not any(m.live for m in self.members):
            await self.close()
            raise SandboxUnavailable(
                "no sandbox server of the fleet answers: "
                + "; ".join(f"{m.url}: {m.why_down}" for m in self.members)
            )
        self.started = True
        self._watch = asyncio.create_task(self._watch_all())
        return self

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        for m in self.members:
            await m.client.close()
        self.started = False

    async def __aenter__(self) -> SandboxFleet:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _probe(self, m: _Member) -> None:
        try:
            await m.client.health()
        except SandboxError as e:
            self._down(m, str(e))
            return
        if not m.live:
            log.info("sandbox server %s is in rotation", m.url)
        m.live = True

    def _down(self, m: _Member, why: str) -> None:
        if m.live:
            log.warning("sandbox server %s is out of rotation: %s", m.url, why)
        m.live, m.why_down = False, why

    async def _watch_all(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self._probe(m) for m in self.members))

    # ---------------------------------------------------------------- health
    async def member_healths(self) -> list[tuple[str, dict | None, str | None]]:
        """(url, health or None, error or None) of every server, read now."""

        async def one(m: _Member):
            try:
                return m.url, await m.client.health(), None
            except SandboxError as e:
                return m.url, None, str(e)

        return list(await asyncio.gather(*(one(m) for m in self.members)))

    async def health(self) -> dict:
        """Every server's health; raises SandboxError when none answers."""
        healths = await self.member_healths()
        if all(h is None for _, h, _ in healths):
            raise SandboxError(
                "no sandbox server of the fleet answers: "
                + "; ".join(f"{u}: {e}" for u, _, e in healths)
            )
        return {
            "status": "ok",
            "servers": {u: h if h is not None else {"error": e} for u, h, e in healths},
            "tools": next(h.get("tools") for _, h, _ in healths if h is not None),
        }

    async def census(self) -> dict:
        sessions, strays = 0, []
        for _, h, _ in await self.member_healths():
            census = (h or {}).get("census", {})
            sessions += census.get("sessions", 0)
            strays += census.get("strays", [])
        return {"sessions": sessions, "strays": strays}

    def stats(self) -> dict[str, float]:
        """Per-server load for the metrics: live, calls in flight, sessions, calls served."""
        out: dict[str, float] = {"sandbox/servers_live": float(sum(m.live for m in self.members))}
        for m in self.members:
            out[f"sandbox/server{m.index}_live"] = float(m.live)
            out[f"sandbox/server{m.index}_calls"] = m.calls
            out[f"sandbox/server{m.index}_sessions"] = m.sessions
            out[f"sandbox/server{m.index}_served"] = m.served
        return out

    # ---------------------------------------------------------------- calls
    def _pick(self, key, exclude: set[int]) -> _Member | None:
        live = [m for m in self.members if m.live and m.index not in exclude]
        return min(live, key=key) if live else None

    def _check_started(self) -> None:
        if not self.started:
            raise SandboxClosed(
                "the sandbox fleet is not started (or was closed): use `async with` or "
                "`await start()`"
            )

    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """A stateless call on the least-loaded live server; once more elsewhere when
        that server cannot be reached."""
        self._check_started()
        tried: set[int] = set()
        result: ExecResult | None = None
        async with self._calls:
            for _ in range(2):
                m = self._pick(lambda m: (m.calls, m.served), tried)
                if m is None:
                    break
                tried.add(m.index)
                m.calls += 1
                try:
                    result = await m.client.run(code, timeout_s=timeout_s)
                finally:
                    m.calls -= 1
                if result.status == "sandbox_error" and "unreachable" in (result.detail or ""):
                    self._down(m, result.detail or "unreachable")
                    continue
                m.served += 1
                return result
        return result or infra_result(
            "sandbox_error",
            "no sandbox server of the fleet is live: "
            + "; ".join(f"{m.url}: {m.why_down}" for m in self.members),
            self.backend,
        )

    async def open_session(self) -> FleetSession:
        """A session on the live server with the fewest open sessions (it stays there)."""
        self._check_started()
        if self._bucket is not None:
            await self._bucket.acquire()
        if self._sessions is not None:
            await self._sessions.acquire()
        opened = False
        try:
            tried: set[int] = set()
            errors = []
            while (m := self._pick(lambda m: (m.sessions, m.calls, m.served), tried)) is not None:
                tried.add(m.index)
                try:
                    inner = await m.client.open_session()
                except SandboxError as e:
                    errors.append(f"{m.url}: {e}")
                    self._down(m, str(e))
                    continue
                m.sessions += 1
                opened = True
                return FleetSession(self, m, inner)
            raise SandboxUnavailable(
                "no sandbox server of the fleet could open a session: "
                + ("; ".join(errors) or "none is live")
            )
        finally:
            if not opened and self._sessions is not None:  # the slot goes back
                self._sessions.release()


class FleetSession:
    """A session on one server of the fleet; releases its slot when closed."""

    def __init__(self, fleet: SandboxFleet, member: _Member, inner: RemoteSession) -> None:
        self._fleet, self._member, self._inner = fleet, member, inner
        self.id = f"{member.index}/{inner.id}"
        self.server = member.url

    @property
    def closed(self) -> bool:
        return self._inner.closed

    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        m = self._member
        async with self._fleet._calls:
            m.calls += 1
            try:
                result = await self._inner.run(code, timeout_s=timeout_s)
            finally:
                m.calls -= 1
        m.served += 1
        if result.status in ("session_lost", "sandbox_error") and "unreachable" in (
            result.detail or ""
        ):
            self._fleet._down(m, result.detail or "unreachable")
        return result

    async def close(self) -> None:
        if self._inner.closed:
            return
        await self._inner.close()
        self._member.sessions -= 1
        if self._fleet._sessions is not None:
            self._fleet._sessions.release()

    async def __aenter__(self) -> FleetSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = ["FleetSession", "SandboxFleet"]
