"""The local backend: a pool of jailed, pre-imported runners driven from asyncio.

    async with LocalSandbox(workers=2) as sb:
        r = await sb.run("print(2 ** 100)")
        s = await sb.open_session()
        await s.run("x = 41")
        r = await s.run("x + 1")        # r.stdout == "42\\n"
        await s.close()

Each worker is one jail running the fork server in `sandboxes.runner`; a worker serves
one call at a time. Stateless calls go to any free worker (waiting at most
`queue_timeout_s`, then `queue_timeout`); a session sticks to the worker that holds its
process. Every call has a deadline at two layers: the runner kills the cell at
`timeout_s`, and this controller gives the runner `timeout_s + grace_s` to answer before
it kills and restarts the whole worker (`sandbox_error`; that worker's sessions are
lost and say so).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sandboxes import cgroup
from sandboxes.errors import SandboxClosed, SandboxError, SandboxUnavailable
from sandboxes.jail import JailSpec, bwrap_command, probe_bwrap, unisolated_command
from sandboxes.result import ExecResult, infra_result

if TYPE_CHECKING:
    from tools.refs import ToolSource

log = logging.getLogger(__name__)

_HDR = struct.Struct(">I")
MAX_CODE_BYTES = 1 << 20
NOT_RESTORED = "the cell was killed and the session could not be restored; it is lost"


# Run once in each runner before it forks anything: later calls then start with sympy's
# lazily imported modules loaded and its caches warm (a cold factor() costs ~25 ms).
DEFAULT_WARMUP = (
    "from tools import algebra as a\n"
    "a.factor(expression='x**4 - 1'); a.factor(expression='360')\n"
    "a.simplify(expression='sin(x)**2 + cos(x)**2'); a.expand(expression='(x + 1)**3')\n"
    "a.solve(equations=['x**2 = 2', 'y = x']); a.integrate(expression='x*exp(x)')\n"
    "a.integrate(expression='x', lower='0', upper='1'); a.evaluate(expression='pi')\n",
)


@dataclass(frozen=True)
class Limits:
    """Per-call limits applied inside the sandbox."""

    timeout_s: float = 10.0  # wall clock per call
    memory_mb: int = 1024  # address space per executor (RLIMIT_AS)
    max_output: int = 16384  # bytes of each stream kept from the start
    tail_output: int = 4096  # bytes of each stream kept from the end
    hard_output: int = 1 << 20  # total output at which the call is killed
    fsize_mb: int = 64  # largest file a call may write
    nofile: int = 256  # open files per process
    nproc: int = 256  # processes of the sandbox user, sessions included
    session_cpu_s: int = 3600  # CPU budget of one session over its whole life

    def wire(self, landlock: bool) -> dict:
        return {
            "memory_mb": self.memory_mb, "max_output": self.max_output,
            "tail_output": self.tail_output, "hard_output": self.hard_output,
            "fsize_mb": self.fsize_mb, "nofile": self.nofile, "nproc": self.nproc,
            "session_cpu_s": self.session_cpu_s, "landlock": landlock, "workroot": "/tmp",
        }  # fmt: skip


class _WorkerFailed(Exception):
    """The channel to one worker broke; never leaves this module (the pool restarts the
    worker and answers with a typed result, or raises a SandboxError)."""


@dataclass
class _Worker:
    index: int
    argv: list[str]
    env: dict[str, str] | None
    cwd: str | None
    hello: dict
    proc: asyncio.subprocess.Process | None = None
    generation: int = 0
    caps: dict = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))
    restarts: int = 0
    sessions: int = 0
    pids_max: int = 512
    cgroup: Path | None = None
    dirty: bool = False
    _ids: itertools.count = field(default_factory=itertools.count)
    _drain: asyncio.Task | None = None

    async def _spawn(self) -> None:
        """Start the runner process (the transport); subclasses start containers instead."""
        group = self.cgroup = cgroup.create(
            f"agent-spo-{os.getpid()}-{self.index}-{self.generation}", self.pids_max
        )
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group: one kill takes the whole jail
                preexec_fn=(lambda: cgroup.join_self(group)) if group is not None else None,
            )
        except (OSError, subprocess.SubprocessError) as e:  # no fds, no memory, no binary
            cgroup.remove(group)
            raise SandboxUnavailable(
                f"sandbox worker {self.index} could not be started: {type(e).__name__}: {e}"
            ) from e
        self._drain = asyncio.create_task(self._drain_stderr(self.proc))

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _send(self, data: bytes) -> None:
        proc = self.proc
        assert proc is not None and proc.stdin is not None  # callers check _alive(); piped
        proc.stdin.write(data)
        await proc.stdin.drain()

    async def _recv_exact(self, n: int) -> bytes:
        proc = self.proc
        assert proc is not None and proc.stdout is not None  # callers check _alive(); piped
        return await proc.stdout.readexactly(n)

    async def start(self) -> None:
        await self._spawn()
        self.generation += 1
        try:
            reply = await self._exchange(self.hello, timeout=60.0)
        except _WorkerFailed as e:
            await self.kill()
            raise SandboxUnavailable(
                f"sandbox worker {self.index} did not start: {e}; "
                f"its stderr: {' | '.join(self.stderr_tail) or '(empty)'}"
            ) from None
        self.caps = reply.get("caps", {})
        if self.caps.get("require_failed"):
            await self.kill()
            raise SandboxUnavailable(
                "a tool module cannot be imported inside the sandbox: "
                + "; ".join(self.caps["require_failed"])
                + " (its imports must be installed in the Python environment the sandbox "
                "runs: this one for the local backend, the image for docker)"
            )
        if self.caps.get("preload_failed"):
            log.warning("sandbox preload failed: %s", self.caps["preload_failed"])

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            self.stderr_tail.extend(chunk.decode("utf-8", "replace")[-4000:].splitlines())

    async def _exchange(self, msg: dict, timeout: float) -> dict:
        if not self._alive():
            raise _WorkerFailed("worker is not running")
        body = json.dumps(msg).encode()
        try:
            await self._send(_HDR.pack(len(body)) + body)
            head = await asyncio.wait_for(self._recv_exact(_HDR.size), timeout)
            (n,) = _HDR.unpack(head)
            data = await asyncio.wait_for(self._recv_exact(n), timeout)
            reply = json.loads(data)
        except TimeoutError:
            raise _WorkerFailed(f"no answer within {timeout:.1f} s") from None
        except (asyncio.IncompleteReadError, OSError, ValueError) as e:  # pipes, sockets, JSON
            raise _WorkerFailed(f"worker channel broke: {type(e).__name__}: {e}") from None
        if not isinstance(reply, dict):
            raise _WorkerFailed(f"worker sent a {type(reply).__name__}, not a message")
        return reply

    async def request(self, msg: dict, timeout: float) -> dict:
        msg = {**msg, "id": next(self._ids)}
        try:
            reply = await self._exchange(msg, timeout)
        except asyncio.CancelledError:
            self.dirty = True  # its reply is still coming: the channel is out of step
            raise
        if reply.get("id") != msg["id"]:
            raise _WorkerFailed(f"reply id {reply.get('id')} for request {msg['id']}")
        return reply

    async def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
        if self._drain is not None:
            self._drain.cancel()
        cgroup.remove(self.cgroup)

    async def shutdown(self) -> None:
        if self._alive():
            try:
                body = json.dumps({"op": "shutdown"}).encode()
                await self._send(_HDR.pack(len(body)) + body)
                if self.proc is not None:
                    await asyncio.wait_for(self.proc.wait(), 2.0)
            except (TimeoutError, ConnectionError, BrokenPipeError, OSError):
                pass
        await self.kill()


class LocalSandbox:
    """Pool of isolated runners on this host (the default backend)."""

    backend = "local"

    def __init__(
        self,
        *,
        workers: int = 2,
        limits: Limits = Limits(),
        isolation: Literal["bwrap", "none"] = "bwrap",
        preload: Sequence[str] = ("sympy", "numpy"),
        packages: Sequence[str] = ("tools",),
        tool_sources: Sequence[ToolSource] = (),
        warmup: Sequence[str] | None = None,
        tmp_mb: int = 256,
        seccomp: bool = True,
        landlock: bool = True,
        queue_timeout_s: float = 60.0,
        grace_s: float = 5.0,
        session_ttl_s: float | None = 1800.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if isolation not in ("bwrap", "none"):
            raise ValueError(f"isolation must be 'bwrap' or 'none', got {isolation!r}")
        self.limits = limits
        self.isolation = isolation
        self.queue_timeout_s = queue_timeout_s
        self.grace_s = grace_s
        # A safety net for sessions their episode forgot to close: idle longer than this,
        # they are closed and their processes freed (None: never).
        self.session_ttl_s = session_ttl_s
        self._sessions: dict[str, LocalSession] = {}
        self._reaper: asyncio.Task | None = None
        self._n = workers
        self.tool_sources = tuple(tool_sources)
        self._spec = JailSpec(
            tmp_mb=tmp_mb,
            packages=tuple(packages),
            sources=tuple((s.name, s.path) for s in self.tool_sources if s.path is not None),
        )
        self._hello: dict[str, Any] = {
            "op": "hello",
            "config": {
                "limits": limits.wire(landlock),
                "preload": list(preload),
                "require": [s.module for s in self.tool_sources],
                "warmup": list(
                    DEFAULT_WARMUP if warmup is None and "tools" in packages else warmup or ()
                ),
                "seccomp": seccomp,
                "jailed": isolation == "bwrap",
            },
        }
        self._workers: list[_Worker] = []
        self._free = asyncio.Condition()
        self._workdir: str | None = None
        self.started = False

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> LocalSandbox:
        if self.started:
            return self
        self._workers = await self._make_workers()
        try:
            await asyncio.gather(*(w.start() for w in self._workers))
            no_landlock = any(not w.caps.get("landlock_abi") for w in self._workers)
            if self.isolation == "bwrap" and os.geteuid() == 0 and no_landlock:
                raise SandboxUnavailable(
                    "running as root on a kernel without Landlock: the jail's uid maps to "
                    "root outside, and nothing would stop writes to /proc/sys; run the "
                    "trainer as an ordinary user, or use the docker backend"
                )
        except BaseException:
            await asyncio.gather(*(w.kill() for w in self._workers), return_exceptions=True)
            raise
        self.started = True
        if self.session_ttl_s is not None:
            self._reaper = asyncio.create_task(self._reap_idle_sessions())
        return self

    async def _reap_idle_sessions(self) -> None:
        assert self.session_ttl_s is not None  # the reaper is started only with a TTL
        while True:
            await asyncio.sleep(min(30.0, self.session_ttl_s / 4))
            now = time.monotonic()
            for s in list(self._sessions.values()):
                if now - s.last_used > self.session_ttl_s and not s.busy:
                    log.warning(
                        "closing sandbox session %s: idle for over %.0f s", s.id, self.session_ttl_s
                    )
                    await s.close()
                    s.expired = True

    async def _make_workers(self) -> list[_Worker]:
        env = cwd = None
        if self.isolation == "bwrap":
            await asyncio.to_thread(probe_bwrap, self._spec)
            argv = bwrap_command(self._spec)
        else:
            log.warning(
                "sandbox isolation is OFF (isolation='none'): model-written code runs on this "
                "host with only rlimits, Landlock and seccomp between it and your files"
            )
            argv, env = unisolated_command(self._spec)
            self._workdir = cwd = tempfile.mkdtemp(prefix="agent-spo-sandbox-")
            env = {**env, "HOME": cwd, "TMPDIR": cwd}
            self._hello["config"]["limits"]["workroot"] = cwd  # work dirs under it, not /tmp
        return [
            _Worker(i, argv, env, cwd, self._hello, pids_max=self.limits.nproc)
            for i in range(self._n)
        ]

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self._sessions.clear()
        await asyncio.gather(*(w.shutdown() for w in self._workers), return_exceptions=True)
        self._workers = []
        self.started = False
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    async def __aenter__(self) -> LocalSandbox:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def capabilities(self) -> dict:
        """What isolation each worker got (Landlock ABI, seccomp) and its restarts."""
        return {
            "isolation": self.isolation,
            "workers": [
                {"landlock_abi": w.caps.get("landlock_abi"), "seccomp": w.caps.get("seccomp"),
                 "restarts": w.restarts, "sessions": w.sessions}
                for w in self._workers
            ],
        }  # fmt: skip

    async def census(self) -> dict:
        """Open sessions and stray processes across the jails (strays should be none)."""
        sessions, strays = 0, []
        for w in self._workers:
            if await self._acquire(w):
                try:
                    reply = await w.request({"op": "ping"}, timeout=self.grace_s)
                    sessions += reply["sessions"]
                    strays += reply["strays"]
                except _WorkerFailed as e:
                    strays.append(f"worker {w.index} failed: {e}")
                finally:
                    await self._release(w)
        return {"sessions": sessions, "strays": strays}

    # ---------------------------------------------------------------- calls
    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run one cell in fresh globals (no state kept)."""
        self._check_started()
        timeout = self.limits.timeout_s if timeout_s is None else timeout_s
        if (bad := _check_code(code)) is not None:
            return bad
        worker = await self._acquire_any()
        if worker is None:
            return infra_result(
                "queue_timeout", f"no free worker within {self.queue_timeout_s} s", self.backend
            )
        try:
            return await self._call(
                worker, {"op": "run", "code": code, "timeout": timeout}, timeout
            )
        finally:
            await self._release(worker)

    async def open_session(self) -> LocalSession:
        """A stateful session: variables persist across its calls; close it when done."""
        self._check_started()
        worker = min(self._workers, key=lambda w: w.sessions)
        sid = uuid.uuid4().hex
        if not await self._acquire(worker):
            raise SandboxUnavailable("no sandbox worker became free to open a session")
        try:
            gen = worker.generation
            await worker.request({"op": "open", "session": sid}, timeout=self.grace_s + 10)
        except _WorkerFailed as e:
            await self._restart(worker, str(e))
            raise SandboxUnavailable(f"could not open a session: {e}") from None
        finally:
            await self._release(worker)
        worker.sessions += 1
        session = LocalSession(self, worker, gen, sid)
        self._sessions[sid] = session
        return session

    async def _call(self, worker: _Worker, msg: dict, timeout: float) -> ExecResult:
        if worker.dirty:
            await self._restart(worker, "an earlier call was cancelled mid-flight")
            if msg["op"] == "srun":
                return infra_result(
                    "session_lost",
                    "the worker holding this session restarted",
                    self.backend,
                    worker.index,
                )
        t0 = time.monotonic()
        try:
            reply = await worker.request(msg, timeout=timeout + self.grace_s)
        except _WorkerFailed as e:
            await self._restart(worker, str(e))
            return infra_result(
                "sandbox_error",
                f"worker {worker.index}: {e}",
                self.backend,
                worker.index,
                time.monotonic() - t0,
            )
        return _to_result(reply, self.backend, worker.index, time.monotonic() - t0)

    async def _restart(self, worker: _Worker, why: str) -> None:
        log.warning("restarting sandbox worker %d: %s", worker.index, why)
        await worker.kill()
        worker.dirty = False
        worker.restarts += 1
        worker.sessions = 0
        try:
            await worker.start()
        except SandboxError as e:
            log.error("sandbox worker %d failed to restart: %s", worker.index, e)

    # ---------------------------------------------------------------- scheduling
    async def _acquire(self, worker: _Worker) -> bool:
        try:
            await asyncio.wait_for(worker.lock.acquire(), self.queue_timeout_s)
            return True
        except TimeoutError:
            return False

    async def _acquire_any(self) -> _Worker | None:
        deadline = time.monotonic() + self.queue_timeout_s
        async with self._free:
            while True:
                for w in sorted(self._workers, key=lambda w: w.sessions):
                    if not w.lock.locked():
                        await w.lock.acquire()
                        return w
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self._free.wait(), left)
                except TimeoutError:
                    return None

    async def _release(self, worker: _Worker) -> None:
        worker.lock.release()
        async with self._free:
            self._free.notify(1)

    def footprint(self) -> dict:
        """Processes and RSS inside the workers' jails, and this process's open fds (a leak
        shows as growth between two readings)."""
        procs = rss_kb = 0
        roots = {w.proc.pid for w in self._workers if w.proc is not None}
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().split(b") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
        stack = list(roots)
        while stack:
            pid = stack.pop()
            procs += 1
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss_kb += int(line.split()[1])
            except OSError:
                pass
            stack.extend(children.get(pid, []))
        return {
            "processes": procs,
            "rss_mb": rss_kb / 1024,
            "fds": len(os.listdir("/proc/self/fd")),
        }

    def _check_started(self) -> None:
        if not self.started:
            raise SandboxClosed(
                "the sandbox is not started (or was closed): use `async with` or `await start()`"
            )


class LocalSession:
    """One episode's interpreter state inside a local worker."""

    def __init__(self, sandbox: LocalSandbox, worker: _Worker, generation: int, sid: str):
        self._sb, self._worker, self._gen, self.id = sandbox, worker, generation, sid
        self.closed = False
        self.lost = False
        self.expired = False  # closed by the sandbox after sitting idle past its TTL
        self.busy = False
        self.last_used = time.monotonic()

    async def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        self.last_used = time.monotonic()
        self.busy = True
        try:
            return await self._run(code, timeout_s)
        finally:
            self.busy = False
            self.last_used = time.monotonic()

    async def _run(self, code: str, timeout_s: float | None) -> ExecResult:
        sb = self._sb
        if self.expired:
            return infra_result(
                "session_lost",
                "the session sat idle past its TTL and was closed",
                sb.backend,
                self._worker.index,
            )
        if self.closed:
            raise SandboxClosed("the session is closed")
        if not sb.started:
            raise SandboxClosed("the sandbox holding this session is closed")
        if self.lost or self._worker.generation != self._gen:
            return self._lost_result()
        if (bad := _check_code(code)) is not None:
            return bad
        timeout = sb.limits.timeout_s if timeout_s is None else timeout_s
        if not await sb._acquire(self._worker):
            return infra_result(
                "queue_timeout", "the session's worker stayed busy", sb.backend, self._worker.index
            )
        try:
            if self._worker.generation != self._gen:
                return self._lost_result()
            result = await sb._call(
                self._worker,
                {"op": "srun", "session": self.id, "code": code, "timeout": timeout},
                timeout,
            )
        finally:
            await sb._release(self._worker)
        if result.status in ("session_lost", "sandbox_error") or result.detail == NOT_RESTORED:
            self.lost = True
        return result

    def _lost_result(self) -> ExecResult:
        self.lost = True
        return infra_result(
            "session_lost",
            "the worker holding this session restarted",
            self._sb.backend,
            self._worker.index,
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        sb, w = self._sb, self._worker
        sb._sessions.pop(self.id, None)
        if w.generation != self._gen or not sb.started:
            return  # the worker restarted: the session died with it
        if await sb._acquire(w):
            try:
                await w.request({"op": "close", "session": self.id}, timeout=sb.grace_s)
                w.sessions = max(w.sessions - 1, 0)
            except _WorkerFailed as e:
                await sb._restart(w, str(e))
            finally:
                await sb._release(w)

    async def __aenter__(self) -> LocalSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _check_code(code: str) -> ExecResult | None:
    if not isinstance(code, str):
        return ExecResult(
            status="error",
            exc_type="TypeError",
            exc_message=f"code must be a string, got {type(code).__name__}",
        )
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
        return ExecResult(
            status="error",
            exc_type="ValueError",
            exc_message=f"code is longer than {MAX_CODE_BYTES} bytes",
        )
    return None


_FIELDS = ("status", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "stdout_truncated",
           "stderr_truncated", "exc_type", "exc_message", "traceback", "exit_code", "signal",
           "cpu_s", "detail")  # fmt: skip


def _to_result(reply: dict, backend: str, worker: int, wall_s: float) -> ExecResult:
    data = {k: reply[k] for k in _FIELDS if reply.get(k) is not None}
    for k in ("stdout", "stderr", "exc_message", "traceback", "detail"):
        if isinstance(data.get(k), str):  # lone surrogates from the code's own strings
            data[k] = data[k].encode("utf-8", "replace").decode("utf-8")
    if reply.get("session_kept") is False:
        data["detail"] = NOT_RESTORED
    try:
        return ExecResult(**data, wall_s=wall_s, backend=backend, worker=worker)
    except TypeError as e:
        return infra_result("sandbox_error", f"malformed reply: {e}", backend, worker, wall_s)
