"""Shared pieces of the fault-injection suite: real trainers and real sandbox servers in
their own processes, so a test can kill one the way an operator or the kernel would.

A plain module (``from faultkit import ...``), not a conftest: several folders have a
``conftest.py``, so ``from conftest import`` would find whichever was loaded first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# A training run small enough for a test: a handful of episodes per step on the demo model.
SMALL = [
    "learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=2",
    "rollout.max_response_tokens=128", "data.synthetic_tasks=40", "learner.lr=1e-4",
    "train.checkpoint_every=1", "train.eval_every=0", "algo.init.mode=none",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> list[str]:
    """argv running the agent-spo command line in this interpreter."""
    return [sys.executable, "-m", "agent_spo.cli", *args]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {out}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its group (its jailed sandbox workers included)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


class ServedSandbox:
    """`agent-spo sandbox serve` in its own process group on a free loopback port."""

    def __init__(self, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("AGENT_SPO_SANDBOX_TOKEN", None)
        args = ["sandbox", "serve", "--port", str(self.port), "--workers", "2"]
        if token:
            args += ["--token", token]
        self.proc = subprocess.Popen(
            cli(*args), env=env, start_new_session=True, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/v1/health", headers=headers, timeout=2).is_success
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the sandbox server to answer", self.proc)

    def kill(self) -> None:
        kill(self.proc)


@pytest.fixture
def served_sandbox():
    servers: list[ServedSandbox] = []

    def start(token: str | None = None) -> ServedSandbox:
        servers.append(ServedSandbox(token))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()


def train_argv(out: Path, name: str, *extra: str) -> list[str]:
    return cli("train", *SMALL, f"run.output_dir={out}", f"run.name={name}", *extra)
