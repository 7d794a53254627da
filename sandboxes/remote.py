"""The remote backend: any backend behind HTTP, and an httpx client with the same interface.

Server (`agent-spo sandbox serve`, loopback by default):

    GET    /v1/health                 pool state, capabilities, census, tools offered
    POST   /v1/run                    {"code", "timeout_s"?}          -> ExecResult
    POST   /v1/run_batch              {"calls": [{"code", ...}, ...]} -> [ExecResult]
    POST   /v1/sessions               {}                              -> {"session": id}
    POST   /v1/sessions/{id}/run      {"code", "timeout_s"?}          -> ExecResult
    DELETE /v1/sessions/{id}

Sessions idle for longer than `session_ttl_s` are closed. An optional bearer token
guards every route. A call's `timeout_s` over the server's own per-call limit
(`max_timeout_s`, `sandbox serve --timeout`) is clamped to it. The client (`RemoteSandbox`) bounds its in-flight calls with a
semaphore, gives every request a deadline (the call's timeout + a queue budget +
grace), and retries only transport failures of *stateless* calls, with backoff; a
session call is never retried (it is not idempotent) and a transport failure loses the
session explicitly. A failure around one call comes back as a result with an
infrastructure status; anything else the client cannot do (open a session, read the
server's health, run before `start()` or after `close()`) raises a
:class:`~sandboxes.errors.SandboxError`, never an httpx or OS error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from sandboxes.errors import SandboxClosed, SandboxError, SandboxUnavailable
from sandboxes.result import ExecResult, Status, infra_result

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20
MAX_TIMEOUT_S = 3600.0  # the most any call may ask for, on any server


# ----------------------------------------------------------------------------- server
class SandboxServer:
    """Serve a started backend (e.g. LocalSandbox) over HTTP from a background thread.

    The stdlib threaded server: one thread per connection (at most `max_connections`;
    more wait in a listen backlog of `backlog`), each handing its request to one asyncio
    loop that runs the backend. `max_timeout_s` caps every call: a client's larger
    `timeout_s` is clamped to it (a call that names none gets the backend's default;
    `agent-spo sandbox serve --timeout` sets both). A client that hangs up before its
    reply is a debug line, not a traceback.
    """

    def __init__(
        self,
        backend: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        session_ttl_s: float = 900.0,
        max_timeout_s: float = MAX_TIMEOUT_S,
        backlog: int = 1024,
        max_connections: int = 1024,
        idle_timeout_s: float = 120.0,
        tools: list[dict] | None = None,
    ) -> None:
        if not 0 < max_timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(
                f"max_timeout_s must be in (0, {MAX_TIMEOUT_S:g}], got {max_timeout_s}"
            )
        self.backend = backend
        # the tools its backend runs ({"schema", "target"}, Toolbox.offered); None: the
        # built-in ones
        self.tools = tools if tools is not None else _builtin_offer()
        self.token = token
        self.session_ttl_s = session_ttl_s
        self.max_timeout_s = max_timeout_s
        # touched only on the event loop (requests and the reaper), so no lock
        self.sessions: dict[str, tuple[Any, float]] = {}
        self._busy: set[str] = set()  # sessions with a call in flight are never reaped
        self._reaper: asyncio.Task | None = None
        self.loop = asyncio.new_event_loop()
        self._loop_stopped = False
        self._loop_thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="sandbox-server-loop"
        )
        handler = self._handler_class(idle_timeout_s)
        self.httpd = _ThreadedHTTPServer((host, port), handler, backlog, max_connections)
        self._http_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        # an AF_INET server: (host, port); typeshed also allows a Unix socket's path
        return cast(tuple[str, int], self.httpd.server_address[:2])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> SandboxServer:
        """Start the event loop, the backend (if needed), the session reaper and the HTTP thread."""
        self._loop_thread.start()
        if not getattr(self.backend, "started", True):
            self.call(self.backend.start())
        self.call(self._start_reaper())
        self._http_thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name="sandbox-server-http"
        )
        self._http_thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (starting first if needed), then stop cleanly."""
        if self._http_thread is None:
            self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop accepting, cancel the session reaper, close the backend, end the loop."""
        self.httpd.stopping.set()
        if self._http_thread is not None:  # shutdown() waits for serve_forever to return
            self.httpd.shutdown()
        self.httpd.server_close()
        if not self._loop_thread.is_alive():
            return
        try:
            self.call(self._stop_reaper(), timeout=10)
            self.call(self.backend.close(), timeout=30)
        finally:
            self._loop_stopped = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(timeout=5)

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread and wait for it."""
        if self._loop_stopped:  # nothing would ever run it
            coro.close()
            raise SandboxUnavailable("the sandbox server is stopped")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start_reaper(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="sandbox-server-reaper")

    async def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)

    async def _reap(self) -> None:
        """Close sessions idle for longer than `session_ttl_s` (never one mid-call)."""
        while True:
            await asyncio.sleep(min(30.0, self.session_ttl_s / 2))
            now = time.monotonic()
            expired = [
                sid
                for sid, (_, t) in self.sessions.items()
                if now - t > self.session_ttl_s and sid not in self._busy
            ]
            for session in [self.sessions.pop(sid)[0] for sid in expired]:
                try:
                    await session.close()
                except Exception:  # noqa: BLE001 - keep reaping the others
                    log.exception("closing an expired sandbox session failed")

    # -- request handling: on the event loop, while the request's HTTP thread waits
    async def handle(self, method: str, path: str, body: dict | None) -> tuple[int, Any]:
        """Route one request to the backend: (HTTP status, JSON payload)."""
        parts = [p for p in path.split("?")[0].split("/") if p]
        if parts[:1] != ["v1"]:
            return 404, {"error": f"no route {path}"}
        route = parts[1:]
        if method == "GET" and route == ["health"]:
            health = {
                "status": "ok",
                "sessions": len(self.sessions),
                "capabilities": getattr(self.backend, "capabilities", {}),
            }
            health["tools"] = self.tools
            if hasattr(self.backend, "census"):
                health["census"] = await asyncio.wait_for(self.backend.census(), 30)
            return 200, health
        if method == "POST" and route == ["run"]:
            code, timeout = self._call_args(body)
            return 200, (await self.backend.run(code, timeout_s=timeout)).to_dict()
        if method == "POST" and route == ["run_batch"]:
            calls = (body or {}).get("calls")
            if not isinstance(calls, list):
                return 400, {"error": "expected {'calls': [...]}"}
            args = [self._call_args(c) for c in calls]
            results = await asyncio.gather(*(self.backend.run(c, timeout_s=t) for c, t in args))
            return 200, [r.to_dict() for r in results]
        if method == "POST" and route == ["sessions"]:
            session = await self.backend.open_session()
            self.sessions[session.id] = (session, time.monotonic())
            return 200, {"session": session.id}
        if len(route) >= 2 and route[0] == "sessions":
            sid = route[1]
            entry = self.sessions.get(sid)
            if entry is None:
                if method == "DELETE":
                    return 200, {"status": "ok"}
                return 200, infra_result(
                    "session_lost", f"no session {sid!r} on this server", "remote"
                ).to_dict()
            session = entry[0]
            self.sessions[sid] = (session, time.monotonic())
            if method == "POST" and route[2:] == ["run"]:
                code, timeout = self._call_args(body)
                self._busy.add(sid)
                try:
                    return 200, (await session.run(code, timeout_s=timeout)).to_dict()
                finally:
                    self._busy.discard(sid)
                    if sid in self.sessions:
                        self.sessions[sid] = (session, time.monotonic())
            if method == "DELETE" and len(route) == 2:
                self.sessions.pop(sid, None)
                await session.close()
                return 200, {"status": "ok"}
        return 404, {"error": f"no route {method} {path}"}

    def _handler_class(self, idle_timeout_s: float) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out as separate writes: without TCP_NODELAY, Nagle plus
            # the client's delayed ACK add ~40 ms to every call
            disable_nagle_algorithm = True
            # the socket's timeout: an idle keep-alive connection is closed after this, so it
            # cannot hold a thread forever (httpx itself drops idle connections after 5 s)
            timeout = idle_timeout_s

            def log_message(self, fmt, *args):  # quiet; the trainer has its own logs
                log.debug("sandbox server: " + fmt, *args)

            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except ConnectionError as e:  # reset or broken pipe: nobody left to tell
                    log.debug(
                        "sandbox server: client %s went away before its reply (%r)",
                        self.client_address,
                        e,
                    )
                    self.close_connection = True

            def _serve(self, method: str) -> None:
                if server.httpd.stopping.is_set():  # a kept-alive connection after stop()
                    self.close_connection = True
                    return self._reply(503, {"error": "the sandbox server is stopping"})
                if server.token is not None:
                    got = self.headers.get("Authorization", "")
                    if not hmac.compare_digest(got, f"Bearer {server.token}"):
                        return self._reply(401, {"error": "missing or wrong bearer token"})
                body = None
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0:
                    return self._reply(400, {"error": "bad Content-Length"})
                if length > MAX_BODY:
                    return self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
                if length:
                    try:
                        body = json.loads(self.rfile.read(length))
                    except ValueError:
                        return self._reply(400, {"error": "body is not JSON"})
                try:
                    status, payload = server.call(server.handle(method, self.path, body))
                except ValueError as e:
                    status, payload = 400, {"error": str(e)}
                except SandboxError as e:  # the backend's own failure: no traceback to log
                    status, payload = 503, {"error": f"{type(e).__name__}: {e}"}
                except Exception as e:  # noqa: BLE001 - report, keep serving
                    log.exception("sandbox server error")
                    status = 500
                    payload = {"error": f"{type(e).__name__}: {e}"}
                self._reply(status, payload)

            def do_GET(self):  # noqa: N802 - http.server naming
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def do_DELETE(self):  # noqa: N802
                self._serve("DELETE")

        return Handler

    def _call_args(self, body: dict | None) -> tuple[str, float | None]:
        """The call's code and timeout; a timeout over this server's limit is clamped to it."""
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            raise ValueError("expected a JSON object with a string 'code'")
        timeout = body.get("timeout_s")
        if timeout is None:
            return body["code"], None
        if not (isinstance(timeout, int | float) and 0 < timeout <= MAX_TIMEOUT_S):
            raise ValueError(f"timeout_s must be a number in (0, {MAX_TIMEOUT_S:g}]")
        return body["code"], min(float(timeout), self.max_timeout_s)


def _builtin_offer() -> list[dict]:
    from tools import builtin_tools
    from tools.refs import offer

    return offer(builtin_tools())


class _ThreadedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep listen backlog and a bound on its threads.

    The stdlib's backlog of 5 overflowed under one client's 64 calls in flight: the
    kernel dropped connections and the client lost session calls to ReadError.
    Connections over `max_connections` wait in the backlog for a free thread. (The
    kernel caps the backlog at net.core.somaxconn: 4096 by default since Linux 5.4.)
    """

    daemon_threads = True

    def __init__(self, address, handler, backlog: int, max_connections: int) -> None:
        self.request_queue_size = backlog  # server_activate() listens with it
        self._slots = threading.BoundedSemaphore(max_connections)
        self.stopping = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(timeout=0.5):
            if self.stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread took the slot
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):  # reset or broken pipe: the client hung up
            log.debug("sandbox server: client %s went away (%r)", client_address, exc)
            return
        log.exception("sandbox server: error serving %s", client_address)


# ----------------------------------------------------------------------------- client
class RemoteSandbox:
    """httpx client for `agent-spo sandbox serve`, with the local backend's interface."""

    backend = "remote"

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        max_in_flight: int = 64,
        default_timeout_s: float = 10.0,
        queue_budget_s: float = 60.0,
        grace_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        required_tools: list[dict] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # the tools this client's episodes call ({"schema", "target"}, Toolbox.offered):
        # the server must offer each one (checked by agent_spo.builders.check_sandbox)
        self.required_tools = required_tools
        self.token = token
        self.default_timeout_s = default_timeout_s
        self.queue_budget_s = queue_budget_s
        self.grace_s = grace_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_in_flight = max_in_flight
        self._limit = asyncio.Semaphore(max_in_flight)
        self._client: httpx.AsyncClient | None = None
        self.started = False

    async def start(self) -> RemoteSandbox:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        # the semaphore bounds the calls; keep a connection alive per call in flight, so a
        # burst reuses them instead of opening (and the server accepting) a new one each
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=self.max_in_flight)
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=None, limits=limits
        )
        self.started = True
        return self

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self.started = False

    async def __aenter__(self) -> RemoteSandbox:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def health(self) -> dict:
        import httpx

        client = self._check_started()
        try:
            r = await client.get("/v1/health", timeout=self.grace_s + 30)
            if r.status_code != 200:
                hint = " (set the token: sandbox.token_env)" if r.status_code == 401 else ""
                raise SandboxError(
                    f"sandbox server health: HTTP {r.status_code}: {r.text[:200]}{hint}"
                )
            health = r.json()
        except (httpx.HTTPError, OSError) as e:
            raise SandboxError(f"sandbox server health: {type(e).__name__}: {e}") from e
        except ValueError as e:
            raise SandboxError(f"sandbox server health: malformed reply: {e}") from e
        if not isinstance(health, dict):
            raise SandboxError(f"sandbox server health: a {type(health).__name__}, not an object")
        return health

    async def census(self) -> dict:
        return (await self.health()).get("census", {"sessions": 0, "strays": []})

    def _check_started(self) -> httpx.AsyncClient:
        """The HTTP client, which exists while the sandbox is started."""
        if not self.started or self._client is None:
            raise SandboxClosed(
                "the remote sandbox is not started (or was closed): use `async with` or "
                "`await start()`"
            )
        return self._client

    def _deadline(self, timeout_s: float | None) -> float:
        t = self.default_timeout_s if timeout_s is None else timeout_s
        return t + self.queue_budget_s + self.grace_s

    async def _post(self, path: str, payload: dict, deadline: float, *, retry: bool):
        import httpx

        client = self._check_started()
        attempts = self.retries + 1 if retry else 1
        last = ""
        async with self._limit:
            for attempt in range(attempts):
                try:
                    r = await client.post(path, json=payload, timeout=deadline)
                except (httpx.HTTPError, OSError) as e:  # transport, timeout, decoding
                    last = f"{type(e).__name__}: {e}"
                    if attempt + 1 < attempts:
                        await asyncio.sleep(self.backoff_s * 2**attempt)
                    continue
                if r.status_code >= 500 and attempt + 1 < attempts:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    await asyncio.sleep(self.backoff_s * 2**attempt)
                    continue
                return r, None
        return None, last

    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Stateless call; transport failures are retried (the call is idempotent)."""
        payload = {"code": code, "timeout_s": timeout_s}
        t0 = time.monotonic()
        r, err = await self._post("/v1/run", payload, self._deadline(timeout_s), retry=True)
        return self._result(r, err, time.monotonic() - t0, lost_status="sandbox_error")

    async def open_session(self) -> RemoteSession:
        r, err = await self._post("/v1/sessions", {}, self.grace_s + 30, retry=True)
        if r is None or r.status_code != 200:
            why = err or f"HTTP {r.status_code}: {r.text[:200]}"
            raise SandboxUnavailable(f"could not open a remote session: {why}")
        try:
            sid = r.json()["session"]
        except (ValueError, TypeError, KeyError) as e:
            raise SandboxError(f"could not open a remote session: malformed reply: {e}") from e
        if not isinstance(sid, str):
            raise SandboxError(f"could not open a remote session: session id {sid!r}")
        return RemoteSession(self, sid)

    def _result(self, r, err: str | None, wall_s: float, lost_status: Status) -> ExecResult:
        if r is None:
            return infra_result(
                lost_status, f"sandbox server unreachable: {err}", self.backend, wall_s=wall_s
            )
        if r.status_code != 200:
            status: Status = "error" if r.status_code == 400 else lost_status
            detail = f"HTTP {r.status_code}: {r.text[:300]}"
            if status == "error":
                return ExecResult(
                    "error",
                    exc_type="ValueError",
                    exc_message=detail,
                    backend=self.backend,
                    wall_s=wall_s,
                )
            return infra_result(status, detail, self.backend, wall_s=wall_s)
        try:
            data = r.json()
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not an object")
            data["backend"] = f"{self.backend}/{data.get('backend', '')}"
            return ExecResult.from_dict(data)
        except (ValueError, TypeError) as e:
            return infra_result(
                "sandbox_error", f"malformed reply: {e}", self.backend, wall_s=wall_s
            )


class RemoteSession:
    def __init__(self, client: RemoteSandbox, sid: str) -> None:
        self._c, self.id = client, sid
        self.closed = False
        self.lost = False

    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        if self.closed:
            raise SandboxClosed("the session is closed")
        if self.lost:
            return infra_result("session_lost", "an earlier call lost this session", "remote")
        t0 = time.monotonic()
        r, err = await self._c._post(
            f"/v1/sessions/{self.id}/run",
            {"code": code, "timeout_s": timeout_s},
            self._c._deadline(timeout_s),
            retry=False,
        )
        result = self._c._result(r, err, time.monotonic() - t0, lost_status="session_lost")
        if result.status in ("session_lost", "sandbox_error"):
            self.lost = True
        return result

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        client = self._c._client
        if not self._c.started or client is None:
            return  # the client is closed: the server's TTL reaps the session
        import httpx

        try:
            await client.delete(f"/v1/sessions/{self.id}", timeout=self._c.grace_s)
        except (httpx.HTTPError, OSError):
            pass  # the server's TTL reaps it

    async def __aenter__(self) -> RemoteSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = ["RemoteSandbox", "RemoteSession", "SandboxServer"]
