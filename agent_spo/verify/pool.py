"""Run `check` in killable worker processes, each call under a hard wall clock.

Why processes: sympy can run for minutes on adversarial input, and `signal.alarm`
works only in the main thread (math-verify's weak point; see
shared/notes/verifier.md). A thread cannot be stopped at all. A process can be killed.

How: workers are forked from multiprocessing's fork server after it has imported sympy
and the LaTeX parser and warmed the parser's caches (`preload.py`), so a fresh worker
starts in milliseconds, not in the second an import takes. Each call sends (gold,
response) to an idle worker and waits at most `timeout_s`; on expiry the worker is
SIGKILLed, replaced, and the call returns a Verdict with status `timeout`. A worker
that dies (out of memory, crash) gives a `timeout` verdict the same way.

No worker outlives the pool: `close()` (also on `with`, garbage collection and
interpreter exit) kills them, and on Linux each worker asks the kernel to SIGKILL it
when its parent, the fork server, exits; the fork server exits when this process does.
Each worker keeps its own cache of parsed golds, so the k samples of one problem parse
the gold once per worker.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from agent_spo.verify.verdict import Verdict

# Imported once by the fork server; workers forked from it start warm. multiprocessing
# still re-imports the main *script* in each worker, so a script that creates a pool
# must guard its work with `if __name__ == "__main__":` (console scripts and pytest do).
PRELOAD = ["agent_spo.verify.preload"]


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _worker_main(conn, memory_mb: int | None) -> None:
    """Worker loop: receive (gold, response), send back check()'s Verdict; None stops."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_mb:
        try:
            import resource

            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    import agent_spo.verify.preload  # noqa: F401  (a no-op when the fork server ran it)
    from agent_spo.verify.check import check

    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "sleep":  # a stuck worker on demand, to test the kill path
            time.sleep(message[1])
            continue
        if message[0] == "exit":  # a worker that dies mid-check, to test the retry path
            os._exit(3)
        _, gold, response = message
        conn.send(check(gold, response))


def _context() -> mp.context.ForkServerContext | mp.context.SpawnContext:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


class _Worker:
    def __init__(
        self, ctx: mp.context.ForkServerContext | mp.context.SpawnContext, memory_mb: int | None
    ) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child, memory_mb), daemon=True, name="agent-spo-verifier"
        )
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        try:
            if not self.ready and self.conn.poll(timeout):
                message = self.conn.recv()
                self.ready = isinstance(message, tuple) and message[0] == "ready"
        except (EOFError, OSError):
            return False
        return self.ready

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=1)
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for w in list(workers):
        try:
            w.stop()
        except Exception:  # noqa: BLE001 - one worker that fails to stop must not keep
            pass  # the others running
    workers.clear()


class VerifierPool:
    """`check` in `workers` killable processes with a per-call wall clock.

    Thread-safe: calls from several threads use different workers. `check_many` spreads
    a batch over all workers and keeps the input order; `acheck` is the asyncio form.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 2.0,
        memory_mb: int | None = 4096,
        start_timeout_s: float = 120.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.start_timeout_s = start_timeout_s
        self.n_workers = workers
        self.checks = 0
        self.timeouts = 0  # includes worker deaths
        self.restarts = 0
        self._ctx = _context()
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(workers):
            w = self._spawn()
            self._idle.put(w)
        if not all(w.wait_ready(start_timeout_s) for w in list(self._workers)):
            self.close()
            raise RuntimeError(
                "verifier workers failed to start; a script that creates a VerifierPool "
                'must guard its work with `if __name__ == "__main__":` (multiprocessing)'
            )

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self.memory_mb)
        with self._lock:
            self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            self.restarts += 1
        return self._spawn()

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        with self._lock:
            return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def check(self, gold: str, response: str, timeout_s: float | None = None) -> Verdict:
        """check(gold, response) in a worker; a Verdict with status timeout past the limit."""
        return self._call(
            ("check", "" if gold is None else str(gold), "" if response is None else str(response)),
            timeout_s,
        )

    def _call(self, message: tuple, timeout_s: float | None) -> Verdict:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        limit = self.timeout_s if timeout_s is None else timeout_s
        w = self._idle.get()
        start = time.monotonic()
        try:
            # Two tries: a worker that died while idle can still look alive for a moment
            # (the fork server reports deaths asynchronously), so a first death is retried
            # on a fresh worker; an input that kills two workers is a failed check.
            for attempt in range(2):
                try:
                    if not w.proc.is_alive():  # died while idle: replace it, nothing lost
                        w = self._replace(w)
                    if not w.wait_ready(self.start_timeout_s):
                        w = self._replace(w)
                        return self._failed("a verifier worker failed to start", 0.0)
                    start = time.monotonic()
                    w.conn.send(message)
                    if w.conn.poll(limit):
                        verdict = w.conn.recv()
                        with self._lock:
                            self.checks += 1
                        return verdict
                    w = self._replace(w)
                    return self._failed(
                        f"no verdict within {limit:g} s; the worker was killed", limit
                    )
                except (EOFError, OSError, BrokenPipeError):
                    code = w.proc.exitcode
                    w = self._replace(w)
                    if attempt == 1:
                        return self._failed(
                            f"the verifier worker died (exit code {code})",
                            time.monotonic() - start,
                        )
            raise AssertionError("unreachable")
        finally:
            self._idle.put(w)

    def _failed(self, reason: str, elapsed: float) -> Verdict:
        with self._lock:
            self.checks += 1
            self.timeouts += 1
        return Verdict(False, "timeout", reason, elapsed_s=elapsed)

    def check_many(
        self, pairs: Iterable[tuple[str, str]], timeout_s: float | None = None
    ) -> list[Verdict]:
        """Check (gold, response) pairs on all workers; verdicts in input order."""
        executor = self._pool_threads()
        return list(executor.map(lambda p: self.check(p[0], p[1], timeout_s), pairs))

    async def acheck(self, gold: str, response: str, timeout_s: float | None = None) -> Verdict:
        """`check` for asyncio code: waits in a thread, never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool_threads(), self.check, gold, response, timeout_s
        )

    def _pool_threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.n_workers, "verifier-wait")
            return self._executor

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
