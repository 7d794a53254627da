"""The in-sandbox runner: a fork server ("zygote") that executes untrusted Python cells.

Runs inside the jail (or, opted in, without one), speaks length-prefixed JSON on two
private file descriptors, and never imports anything outside the standard library except
the optional preloads (sympy, numpy, ...) and pyseccomp. One zygote serves one call at a
time; the controller runs a pool of them.

Executors. Every cell runs in an *executor*, a process forked from the zygote with its
own process group, work directory (on the jail's private tmpfs), rlimits and Landlock
domain, that receives the cell's code and its output pipes over a socketpair:

* stateless calls use a *spare* executor forked before the request arrives (off the
  critical path); it runs one cell in fresh globals and exits;
* a session is a persistent executor that keeps its globals across cells. Before each
  cell it forks a *backup* of itself; if the cell finishes (even by raising), the
  backup is discarded; if the cell is killed (deadline, output cap, crash), the backup
  takes over, so the session keeps the state it had before that cell.

The zygote enforces the wall-clock deadline and the output cap from outside, kills the
executor's process group, and after every call kills every process in the jail that
is not the zygote, a session holder or the spare (background jobs, daemons, zombies).
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import gc
import io
import json
import linecache
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

_HDR = struct.Struct(">I")
_MAX_MSG = 64 << 20
_PR_SET_CHILD_SUBREAPER = 36
_CELL = "<cell>"
_GRACE_S = 0.05  # how long to wait for output EOF after the cell reported


# --------------------------------------------------------------------------- framing
def read_msg(fd: int) -> dict | None:
    head = _read_exact(fd, _HDR.size)
    if head is None:
        return None
    (n,) = _HDR.unpack(head)
    if n > _MAX_MSG:
        raise ValueError(f"message of {n} bytes exceeds the protocol limit")
    body = _read_exact(fd, n)
    if body is None:
        return None
    return json.loads(body)


def write_msg(fd: int, obj: dict) -> None:
    body = json.dumps(obj).encode("ascii")  # escapes keep lone surrogates transportable
    data = _HDR.pack(len(body)) + body
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


# ------------------------------------------------------------------------ cell execution
def run_cell(code: str, g: dict) -> dict:
    """Execute a notebook-style cell in globals ``g``; echo a trailing expression's repr."""
    linecache.cache[_CELL] = (len(code), None, code.splitlines(True), _CELL)
    try:
        tree = ast.parse(code, _CELL, "exec")
        last = None
        final = tree.body[-1] if tree.body else None
        if isinstance(final, ast.Expr):
            tree.body.pop()
            last = ast.Expression(final.value)
        body = compile(tree, _CELL, "exec")
        tail = compile(last, _CELL, "eval") if last is not None else None
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        return _exc_status(e, with_traceback=False)
    try:
        exec(body, g)
        if tail is not None:
            value = eval(tail, g)
            if value is not None:
                print(repr(value))
    except SystemExit as e:
        if e.code in (None, 0):
            return {"ok": True}
        return _exc_status(e)
    except BaseException as e:  # noqa: BLE001 - everything the cell raises is reported
        return _exc_status(e)
    return {"ok": True}


def _exc_status(e: BaseException, with_traceback: bool = True) -> dict:
    out = {"ok": False, "exc_type": type(e).__name__}
    try:
        out["exc_message"] = str(e)[:4000]
        if with_traceback:
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == _CELL]
            lines = ["Traceback (most recent call last):\n"]
            lines += traceback.format_list(frames)
            lines += traceback.format_exception_only(type(e), e)
            out["traceback"] = "".join(lines)[-8000:]
        else:
            out["traceback"] = "".join(traceback.format_exception_only(type(e), e))[-8000:]
    except BaseException:  # noqa: BLE001 - formatting can fail under MemoryError
        out.setdefault("exc_message", "")
    return out


_NULL_FD = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def _with_call_fds(out_fd: int, err_fd: int, fn):
    """Run fn() with fds 1/2 and sys.stdout/err pointed at the call's pipes."""
    sys.stdout.flush() if sys.stdout else None
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.close(out_fd)
    os.close(err_fd)
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        write_through=True,
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        write_through=True,
    )
    try:
        return fn()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed/broken stream must not kill us
                pass
        # the cell may have used up every fd: restore from the one reserved at start-up
        os.dup2(_NULL_FD, 1)
        os.dup2(_NULL_FD, 2)


# ------------------------------------------------------------------------ executors
def _fresh_globals() -> dict:
    return {"__name__": "__main__", "__builtins__": builtins}


def _apply_limits(limits: dict, cpu_s: float | None) -> None:
    mb = 1 << 20
    pairs = [
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, limits["fsize_mb"] * mb),
        (resource.RLIMIT_NOFILE, limits["nofile"]),
        (resource.RLIMIT_NPROC, limits["nproc"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for res, value in pairs:
        resource.setrlimit(res, (value, value))
    if cpu_s is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1))


def _executor_main(sock: socket.socket, workdir: str, limits: dict, persistent: bool) -> None:
    """Body of a spare (one cell) or session holder (many cells, rollback on kill)."""
    global _NULL_FD
    _NULL_FD = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)  # the fork closed the zygote's
    for fd in (0, 1, 2):  # nothing of the controller's (its stderr pipe) stays reachable
        os.dup2(_NULL_FD, fd)
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    os.environ["TMPDIR"] = workdir
    if limits.get("landlock"):
        from sandboxes import landlock

        # read everything in the (minimal) jail except other calls' and sessions' work dirs
        root = limits["workroot"]
        top = [f"/{e}" for e in os.listdir("/") if f"/{e}" != root]
        # the interpreter and its packages may live under the work root (a venv in /tmp)
        top += [
            p
            for p in {sys.prefix, sys.base_prefix, *sys.path}
            if p.startswith(root + "/") and os.path.isdir(p)
        ]
        landlock.restrict_self(writable=[workdir, "/dev/null"], readable=top)
    # Session holders get a CPU budget for their whole life; the wall clock is the per-cell bound.
    _apply_limits(limits, None if not persistent else limits["session_cpu_s"])
    g = _fresh_globals()
    if persistent:
        _ensure_backup(sock)
    while True:
        msg, fds = _recv(sock)
        if msg is None or msg.get("op") == "close":
            os._exit(0)
        out_fd, err_fd, st_fd = fds
        os.set_inheritable(st_fd, False)
        if persistent:
            used = _cpu_self()
            resource.setrlimit(
                resource.RLIMIT_CPU,
                (int(used + msg["timeout"] + 1), resource.getrlimit(resource.RLIMIT_CPU)[1]),
            )
        else:
            sock.close()  # one-shot: the cell gets no channel to the zygote
            _apply_limits(limits, msg["timeout"] + 1)
        status = _with_call_fds(out_fd, err_fd, lambda code=msg["code"]: run_cell(code, g))
        try:  # record separator first: anything the cell itself wrote here is skipped
            os.write(
                st_fd, b"\x1e" + json.dumps(status, ensure_ascii=False).encode("utf-8", "replace")
            )
        finally:
            os.close(st_fd)
        if not persistent:
            os._exit(0)
        # The next cell's backup is this state: fork it now, while the zygote is already
        # replying, so no fork sits on the critical path of a session call.
        _release_backup()
        _ensure_backup(sock)


_backup: dict[str, int | None] = {"pid": None, "pipe": None}


def _ensure_backup(sock: socket.socket) -> None:
    """Fork a backup of the current state and announce it to the zygote. In a backup that
    later takes over, this returns only after it has forked its own backup."""
    while not _fork_backup(sock):
        pass  # we are a backup that just took over the session


def _fork_backup(sock: socket.socket) -> bool:
    """Fork a copy of this session's state. True in the holder, False in a backup that
    has just taken over the session (its holder died during a cell)."""
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no process slot: the next cell runs without rollback protection
        os.close(r)
        os.close(w)
        _send(sock, {"op": "backup", "pid": None})
        return True
    if pid == 0:  # backup: wait until discarded (byte) or until the holder dies (EOF)
        os.setpgid(0, 0)
        os.close(w)
        if os.read(r, 1):
            os._exit(0)
        os.close(r)
        try:
            _send(sock, {"op": "ready", "pid": os.getpid()})
        except OSError:
            os._exit(1)
        return False
    os.close(r)
    try:  # also from this side: the backup must leave our group before the cell can die
        os.setpgid(pid, pid)
    except OSError:
        pass
    _backup["pid"], _backup["pipe"] = pid, w
    _send(sock, {"op": "backup", "pid": pid})
    return True


def _release_backup() -> None:
    pid, w = _backup["pid"], _backup["pipe"]
    _backup["pid"] = _backup["pipe"] = None
    if w is not None:
        try:
            os.write(w, b"x")
        except OSError:
            pass
        os.close(w)
    if pid is not None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _send(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    body = json.dumps(obj).encode()
    socket.send_fds(sock, [_HDR.pack(len(body)) + body], list(fds))


def _recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 22, 8)
    except OSError:
        return None, []
    if len(data) < _HDR.size:
        return None, fds
    (n,) = _HDR.unpack(data[: _HDR.size])
    body = data[_HDR.size :]
    while len(body) < n:  # long code: the rest arrives without fds
        more = sock.recv(n - len(body))
        if not more:
            return None, fds
        body += more
    try:
        return json.loads(body), fds
    except ValueError:
        return None, fds


def _recv_small(session: dict, deadline: float) -> dict | None:
    """Zygote side: the next small control message from a session, or None by the deadline.

    Messages can arrive back to back (a backup may report in before the zygote has read
    the holder's previous message), so unread bytes stay in the session's buffer.
    """
    sock, buf = session["sock"], session.setdefault("rbuf", bytearray())
    try:
        while True:
            if len(buf) >= _HDR.size:
                (n,) = _HDR.unpack_from(buf)
                if n > 4096:
                    return None  # not a control message: the channel is garbage
                if len(buf) >= _HDR.size + n:
                    body = bytes(buf[_HDR.size : _HDR.size + n])
                    del buf[: _HDR.size + n]
                    msg = json.loads(body)
                    return msg if isinstance(msg, dict) else None
            if len(buf) > 1 << 16:
                return None
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
            for fd in fds:
                os.close(fd)
            if not data:
                return None
            buf += data
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


# --------------------------------------------------------------------------- zygote
class Zygote:
    def __init__(self, cfg: dict, pin: int, pout: int) -> None:
        self.cfg = cfg
        self.pin, self.pout = pin, pout
        self.limits = cfg["limits"]
        self.spare: tuple[int, socket.socket, str] | None = None
        self.sessions: dict[str, dict] = {}  # sid -> {"pid", "sock", "workdir"}
        self.calls = 0

    # -- process bookkeeping
    def _fork_executor(self, workdir: str, persistent: bool) -> tuple[int, socket.socket]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            try:
                parent.close()
                for s in self.sessions.values():
                    s["sock"].close()
                if self.spare is not None:
                    self.spare[1].close()
                os.closerange(3, child.fileno())
                os.closerange(child.fileno() + 1, 1 << 16)
                _executor_main(child, workdir, self.limits, persistent)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            os._exit(70)
        child.close()
        return pid, parent

    def _make_spare(self) -> None:
        self.calls += 1
        # runners may share one work root (the unisolated mode's, a test's /tmp): the
        # zygote's pid keeps one runner from removing another's fresh directory
        workdir = f"{self.limits['workroot']}/call-{os.getpid()}-{self.calls}"
        pid, sock = self._fork_executor(workdir, persistent=False)
        self.spare = (pid, sock, workdir)

    def _known(self) -> set[int]:
        known = {1, os.getpid()}
        if self.spare is not None:
            known.add(self.spare[0])
        for s in self.sessions.values():
            known.add(s["pid"])
            if s.get("backup"):
                known.add(s["backup"])
        return known

    def _await_announcement(self, session: dict) -> None:
        """Read the holder's announcement of its next backup (sent after each cell)."""
        msg = _recv_small(session, time.monotonic() + 2.0)
        while msg is not None and msg.get("op") != "backup":
            msg = _recv_small(session, time.monotonic() + 2.0)
        backup = msg.get("pid") if msg else None
        # it must be a child of the holder: anything else is a forgery (or a lost holder)
        ok = isinstance(backup, int) and _ppid(backup) == session["pid"]
        session["backup"] = backup if ok else None

    def strays(self) -> list[str]:
        """Jail processes that are not the zygote, the spare or a session (should be none)."""
        if not self.cfg.get("jailed"):
            return []
        known = self._known()
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in known:
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        out.append(f.read(120).decode("ascii", "replace"))
                except OSError:
                    pass
        return out

    def sweep(self) -> int:
        """Kill every jail process that is not known and reap it. Returns kills."""
        if not self.cfg.get("jailed"):
            self._reap()
            return 0
        killed = 0
        known = self._known()
        deadline = time.monotonic() + 1.0
        me = os.getpid()
        while True:
            stray = []
            for n in os.listdir("/proc"):
                if not n.isdigit() or int(n) in known:
                    continue
                fields = _stat_fields(int(n))
                # a zombie whose parent is a live holder is that holder's to reap (it does,
                # right after a cell): killing it is a no-op, and waiting on it here would spin
                if fields and fields[0] == b"Z" and int(fields[1]) != me:
                    continue
                stray.append(int(n))
            if not stray or time.monotonic() > deadline:
                break
            for pid in stray:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except (ProcessLookupError, PermissionError):
                    pass
            # killed children of ours (orphans are reparented to us) become zombies: reap
            for pid in stray:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            self._reap()
            time.sleep(0.001)
        self._reap()
        return killed

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    # -- calls
    def run_stateless(self, code: str, timeout: float) -> dict:
        if self.spare is None or not _alive(self.spare[0]):
            self._make_spare()
        assert self.spare is not None  # _make_spare() sets it
        pid, sock, workdir = self.spare
        self.spare = None
        t0 = time.monotonic()
        result = self._dispatch(pid, sock, code, timeout, t0, session=None)
        sock.close()
        result["swept"] = self.sweep()  # first: a leftover writer could refill the dir
        shutil.rmtree(workdir, ignore_errors=True)
        return result

    def _dispatch(
        self,
        pid: int,
        sock: socket.socket,
        code: str,
        timeout: float,
        t0: float,
        session: dict | None,
    ) -> dict:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        cpu0 = _cpu_of(pid) if session is not None else 0.0
        try:
            sock.settimeout(5.0)  # a stopped or hostile session must not block the zygote
            _send(sock, {"op": "run", "code": code, "timeout": timeout}, [out_w, err_w, st_w])
            sent = True
        except OSError:
            sent = False
        finally:
            sock.settimeout(None)
            for fd in (out_w, err_w, st_w):
                os.close(fd)

        if not sent:
            for fd in (out_r, err_r, st_r):
                os.close(fd)
            if session is not None:
                session["lost"] = True
                return {"status": "session_lost", "detail": "session process is gone"}
            return {"status": "sandbox_error", "detail": "executor did not accept the call"}
        pidfd = os.pidfd_open(pid)
        try:
            res = self._supervise(pid, pidfd, out_r, err_r, st_r, t0 + timeout)
        finally:
            os.close(pidfd)
            for fd in (out_r, err_r, st_r):
                os.close(fd)
        status = res["cell"]
        if session is None:
            if res["killed"] is None and not res["exited"]:
                # it reported; give it a moment to exit on its own before killing it
                select.select([pidfd2 := os.pidfd_open(pid)], [], [], 0.5)
                os.close(pidfd2)
                _killpg(pid)
            _, wstatus, ru = os.wait4(pid, 0)
            res["cpu_s"] = ru.ru_utime + ru.ru_stime
            res["exit_code"] = os.waitstatus_to_exitcode(wstatus)
        else:
            res["cpu_s"] = max(_cpu_of(pid) - cpu0, 0.0) if res["killed"] is None else None
            # no status means the runner died before reporting, even if its exit is not
            # yet visible on the pidfd (all its pipes closed first)
            if res["killed"] is not None or res["exited"] or status is None:
                _killpg(pid)  # the runner may have died only in part; finish it
                try:  # holders are always our children (forked, or reparented to us)
                    _, wstatus = os.waitpid(pid, 0)
                    res["exit_code"] = os.waitstatus_to_exitcode(wstatus)
                except ChildProcessError:
                    res["exit_code"] = None
                new_holder = self._await_backup(session)
                res["session_kept"] = new_holder is not None
        return _finish(res, status)

    def _supervise(self, pid, pidfd, out_r, err_r, st_r, deadline) -> dict:
        """Collect a cell's output and status until it reports, dies, or is killed."""
        lim = self.limits
        cap = {
            out_r: _Capture(lim["max_output"], lim["tail_output"]),
            err_r: _Capture(lim["max_output"], lim["tail_output"]),
        }
        status_raw = b""
        open_fds = {out_r, err_r, st_r}
        exited = False
        killed = None
        settle_from = None  # once the cell reported or died, wait only briefly for EOFs
        poller = select.poll()
        for fd in (out_r, err_r, st_r, pidfd):
            poller.register(fd, select.POLLIN)
        while open_fds:
            now = time.monotonic()
            if killed is None and now >= deadline:
                killed, settle_from = "timeout", now
                _killpg(pid)
            if settle_from is None and (exited or st_r not in open_fds):
                settle_from = now
            if settle_from is not None:
                # after a kill, give the process time to die; otherwise a short grace
                limit = 1.0 if killed is not None and not exited else _GRACE_S
                if now - settle_from > limit:
                    break
                wait_s = limit - (now - settle_from)
            else:
                wait_s = deadline - now
            for fd, _ev in poller.poll(max(wait_s, 0.0) * 1000 + 1):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif fd == st_r:
                    status_raw = (status_raw + chunk)[-(1 << 18) :]
                else:
                    cap[fd].add(chunk)
                    if killed is None and cap[out_r].total + cap[err_r].total > lim["hard_output"]:
                        killed, settle_from = "output_limit", time.monotonic()
                        _killpg(pid)
        cell = None
        if b"\x1e" in status_raw:  # one write; a background process may still hold the pipe
            cell = _valid_status(status_raw.rsplit(b"\x1e", 1)[1])
        return {
            "out": cap[out_r],
            "err": cap[err_r],
            "cell": cell,
            "killed": killed,
            "exited": exited,
        }

    def _await_backup(self, session: dict) -> int | None:
        """After a killed/crashed session cell: wait for the named backup to take over.

        Only the backup the holder named before the cell ran is accepted, and only once
        it has become our child; anything else on the socket is ignored.
        """
        backup = session.get("backup")
        deadline = time.monotonic() + 2.0
        while backup is not None and time.monotonic() < deadline:
            msg = self._recv_ready(session, deadline)
            if msg is None:
                break
            if msg.get("pid") == backup and _ppid(backup) == os.getpid() and _alive(backup):
                session["pid"] = backup
                session["backup"] = None  # it announces its own backup next
                return backup
        session["lost"] = True
        return None

    def _recv_ready(self, session: dict, deadline: float) -> dict | None:
        msg = _recv_small(session, deadline)
        while msg is not None and msg.get("op") != "ready":
            msg = _recv_small(session, deadline)
        return msg

    def open_session(self, sid: str) -> dict:
        workdir = f"{self.limits['workroot']}/session-{sid}"
        pid, sock = self._fork_executor(workdir, persistent=True)
        self.sessions[sid] = {
            "pid": pid,
            "sock": sock,
            "workdir": workdir,
            "lost": False,
            "backup": None,
        }
        self._await_announcement(self.sessions[sid])
        return {"status": "ok"}

    def run_session(self, sid: str, code: str, timeout: float) -> dict:
        s = self.sessions.get(sid)
        if s is None or s["lost"] or not _alive(s["pid"]):
            self._drop_session(sid)
            return {"status": "session_lost", "detail": f"no live session {sid!r}"}
        t0 = time.monotonic()
        res = self._dispatch(s["pid"], s["sock"], code, timeout, t0, session=s)
        if s["lost"]:
            self._drop_session(sid)
            res["detail"] = "the session process died and no backup took over"
            res["session_lost"] = True
        return res

    def close_session(self, sid: str) -> dict:
        self._drop_session(sid)
        return {"status": "ok"}

    def _drop_session(self, sid: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        try:
            s["sock"].settimeout(1.0)
            _send(s["sock"], {"op": "close"})
        except OSError:
            pass
        s["sock"].close()
        for pid in (s["pid"], s.get("backup")):
            if pid:
                _kill_and_reap(pid)
        shutil.rmtree(s["workdir"], ignore_errors=True)

    def close(self) -> None:
        """End every session and the spare and remove their work dirs: a work root that
        outlives this runner (the unisolated mode's, a shared /tmp) keeps nothing of it."""
        for sid in list(self.sessions):
            self._drop_session(sid)
        if self.spare is not None:
            pid, sock, workdir = self.spare
            self.spare = None
            sock.close()
            _kill_and_reap(pid)
            shutil.rmtree(workdir, ignore_errors=True)

    # -- loop
    def serve(self) -> None:
        self._make_spare()
        while True:
            req = read_msg(self.pin)
            if req is None or req.get("op") == "shutdown":
                self.close()
                return
            op = req.get("op")
            t0 = time.monotonic()
            try:
                reply = self._handle(op, req)
            except Exception as e:  # noqa: BLE001 - keep serving; this call failed
                traceback.print_exc()
                reply = {"status": "sandbox_error", "detail": f"runner: {type(e).__name__}: {e}"}
            reply["id"] = req.get("id")
            reply.setdefault("wall_s", time.monotonic() - t0)
            write_msg(self.pout, reply)
            # off the critical path (the reply is already out): learn the session's next
            # backup, sweep what the cell left behind, and fork the next spare
            if op == "srun":
                s = self.sessions.get(req["session"]) if "session" in req else None
                if s is not None and not s["lost"]:
                    self._await_announcement(s)
                self.sweep()
            if op in ("run", "srun") and self.spare is None:
                self._make_spare()

    def _handle(self, op: str | None, req: dict) -> dict:
        if op == "run":
            reply = self.run_stateless(req["code"], float(req["timeout"]))
        elif op == "open":
            reply = self.open_session(req["session"])
        elif op == "srun":
            reply = self.run_session(req["session"], req["code"], float(req["timeout"]))
        elif op == "close":
            reply = self.close_session(req["session"])
        elif op == "ping":
            reply = {
                "status": "ok",
                "sessions": len(self.sessions),
                "strays": self.strays(),
                "spare": self.spare is not None,
            }
        else:
            reply = {"status": "sandbox_error", "detail": f"unknown op {op!r}"}
        return reply


class _Capture:
    """Keep the first `head` and last `tail` bytes of a stream, and count the rest."""

    def __init__(self, head: int, tail: int) -> None:
        self.head_cap, self.tail_cap = head, tail
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk and self.tail_cap:
            self.tail += chunk
            del self.tail[: max(len(self.tail) - self.tail_cap, 0)]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        if not self.truncated:  # one piece: never split a character at the seam
            return bytes(self.head + self.tail).decode("utf-8", "replace")
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        skipped = self.total - len(self.head) - len(self.tail)
        return f"{head}\n...[{skipped} bytes truncated]...\n{tail}"


def _finish(res: dict, cell: dict | None) -> dict:
    out, err = res["out"], res["err"]
    reply = {
        "stdout": out.text(),
        "stderr": err.text(),
        "stdout_bytes": out.total,
        "stderr_bytes": err.total,
        "stdout_truncated": out.truncated,
        "stderr_truncated": err.truncated,
        "cpu_s": res.get("cpu_s") or 0.0,
        "exit_code": None,
        "signal": None,
    }
    code = res.get("exit_code")
    if code is not None:
        if code < 0:
            reply["signal"] = -code
        else:
            reply["exit_code"] = code
    if res["killed"] == "timeout":
        reply["status"] = "timeout"
    elif res["killed"] == "output_limit":
        reply["status"] = "output_limit"
    elif cell is None:
        # the process died before reporting: a crash (signal, os._exit, CPU limit)
        sig = reply["signal"]
        reply["status"] = "timeout" if sig == signal.SIGXCPU else "crashed"
    elif cell.get("ok"):
        reply["status"] = "ok"
    else:
        reply["status"] = "memory" if cell.get("exc_type") == "MemoryError" else "error"
        reply["exc_type"] = cell.get("exc_type")
        reply["exc_message"] = cell.get("exc_message")
        reply["traceback"] = cell.get("traceback")
    if "session_kept" in res:
        reply["session_kept"] = res["session_kept"]
    return reply


def _valid_status(raw: bytes) -> dict | None:
    """The executor's status record, or None if it is not one (the cell may forge it)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        return None
    out = {"ok": obj["ok"]}
    for key, cap in (("exc_type", 200), ("exc_message", 4000), ("traceback", 8000)):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            return None
        if value is not None:
            out[key] = value[:cap]
    return out


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name (which the cell controls)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def _killpg(pid: int) -> None:
    for fn in (os.killpg, os.kill):
        try:
            fn(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_and_reap(pid: int) -> None:
    """Kill an executor (and its group) and reap it if it is our child: no zombie left."""
    _killpg(pid)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # not our child (a backup still under its holder)
        pass


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    try:
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (TypeError, IndexError, ValueError):
        return 0.0


# -------------------------------------------------------------------------- seccomp
_DENY = [
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "chroot", "swapon",
    "swapoff", "reboot", "acct", "open_by_handle_at", "name_to_handle_at", "fsopen",
    "fsmount", "move_mount", "open_tree", "mount_setattr", "quotactl", "pidfd_getfd",
    "kcmp", "process_madvise",
]  # fmt: skip
_CLONE_NS = (
    0x10000000
    | 0x20000000
    | 0x40000000
    | 0x04000000
    | 0x08000000
    | 0x00020000
    | 0x02000000
    | 0x00000080
)  # NEWUSER|NEWPID|NEWNET|NEWUTS|NEWIPC|NEWNS|NEWCGROUP|NEWTIME
_TIOCSTI = 0x5412
_AF_UNIX = 1


def install_seccomp() -> bool:
    """Deny-list filter for the zygote and everything it forks; False if unavailable."""
    try:
        import errno

        import pyseccomp as sc
    except (ImportError, OSError):
        return False
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in _DENY:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError, OSError):
            pass  # syscall unknown to this libseccomp / arch
    f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_NS, _CLONE_NS))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone(), filtered above
    f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.EQ, _TIOCSTI))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, _AF_UNIX))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socketpair", sc.Arg(0, sc.NE, _AF_UNIX))
    f.load()
    return True


# ---------------------------------------------------------------------------- main
def main() -> None:
    # Move the protocol channel off 0/1 so no executor can inherit or write to it.
    pin = os.dup(0)
    pout = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.set_inheritable(pin, False)
    os.set_inheritable(pout, False)
    # a stream that owns no fd: executors close the zygote's fds, and a file object that
    # owned one would later close whatever took over its number (a call's status pipe)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
    hello = read_msg(pin)
    if hello is None:
        return
    cfg = hello["config"]
    failed = []
    for name in cfg.get("preload", []):
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            failed.append(f"{name}: {type(e).__name__}: {e}")
    required = []
    for name in cfg.get("require", []):  # the tool modules: a failure stops the worker
        try:
            __import__(name)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported; the controller fails
            required.append(f"{name}: {type(e).__name__}: {e}")
    for code in cfg.get("warmup", []):  # fill lazy imports and caches before any fork
        try:
            exec(compile(code, "<warmup>", "exec"), _fresh_globals())
        except Exception as e:  # noqa: BLE001 - report, keep serving
            failed.append(f"warmup: {type(e).__name__}: {e}")
    caps: dict[str, Any] = {
        "pid": os.getpid(),
        "preload_failed": failed,
        "require_failed": required,
        "landlock_abi": 0,
        "seccomp": False,
    }
    if cfg["limits"].get("landlock"):
        from sandboxes import landlock

        caps["landlock_abi"] = landlock.abi()
        cfg["limits"]["landlock"] = caps["landlock_abi"] > 0
    if cfg.get("seccomp"):
        caps["seccomp"] = install_seccomp()
    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    gc.collect()
    gc.freeze()  # keep the preloaded heap shared copy-on-write with every executor
    write_msg(pout, {"status": "ok", "caps": caps})
    Zygote(cfg, pin, pout).serve()


if __name__ == "__main__":
    main()
