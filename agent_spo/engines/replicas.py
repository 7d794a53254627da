"""Start engine replicas on this machine, each in its own process (benchmarks, tests, and a
one-machine fleet): ``agent-spo engine serve`` with a chosen port, ready when it answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalReplica:
    """One ``agent-spo engine serve`` process on 127.0.0.1:``port`` (a free port if None).

    ``start()`` returns once ``/health`` answers (or raises with the process's output);
    ``kill()`` is SIGKILL; ``start()`` again restarts it on the same port."""

    def __init__(
        self,
        model_dir: str | Path,
        port: int | None = None,
        *,
        threads: int = 1,
        extra: list[str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.threads = threads
        self.extra = list(extra or [])
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> LocalReplica:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "agent_spo.cli", "engine", "serve", self.model_dir,
               "--port", str(self.port), *self.extra]  # fmt: skip
        # its own process group: a vLLM server's engine-core process dies with it
        if self.log_path is None:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        else:
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"replica on port {self.port} exited with code {self.proc.returncode}"
                    + (f"; its output is in {self.log_path}" if self.log_path else "")
                )
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"replica on port {self.port} did not answer in {timeout_s:g} s")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def _group(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # the whole group is gone already
                pass

    def kill(self) -> None:
        """SIGKILL the replica and every process it started (vLLM's engine core)."""
        if self.proc is not None:
            self._group(signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self._group(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever of its group is left

    def __enter__(self) -> LocalReplica:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
