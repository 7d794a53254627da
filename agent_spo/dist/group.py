"""Learner ranks: start them, join them into one process group, and notice when one fails.

Two ways to get N ranks:

* **local launch** (``learner.world_size=N``): the trainer is rank 0; it hosts a TCP store
  on 127.0.0.1 and starts ranks 1..N-1 as child processes of
  ``python -m agent_spo.dist.rank`` (one per GPU with CUDA, gloo processes on CPU). A child
  dies with its parent (``PR_SET_PDEATHSIG``).
* **torchrun**: every rank is started by ``torchrun``; rank 0 runs the trainer, the others
  only the learner (see :mod:`agent_spo.dist.rank`), joined through torchrun's own store
  (``MASTER_ADDR``/``MASTER_PORT``).

The process group is gloo on CPU and ``cuda:nccl,cpu:gloo`` on GPUs (weights move over
NCCL, small Python objects over gloo). Every collective has ``timeout_s``: a rank that hangs
makes the others fail after it; a rank that dies makes them fail as soon as its sockets
close.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from datetime import timedelta

import torch

from agent_spo.dist import torchrun_env

SPEC_ENV = "AGENT_SPO_RANK_SPEC"
TORCHRUN_SPEC_KEY = "agent_spo/spec"  # rank 0 publishes the spec in torchrun's store


Launch = Callable[[int, dict], Any]  # (rank, environment) -> a Popen-like handle


class RankFailed(RuntimeError):
    """A learner rank died, hung past the timeout, or could not start."""


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to join the group and build its learner: ``factory``
    (``module:function``) is called on every rank with ``kwargs`` plus ``rank`` and
    ``world_size``, and returns the rank's :class:`~agent_spo.learner.Learner`."""

    factory: str
    kwargs: dict
    world_size: int
    host: str = "127.0.0.1"
    port: int = 0
    timeout_s: float = 600.0  # one collective or command: past it a rank has hung
    torchrun: bool = False
    start_timeout_s: float = 600.0  # starting and building: imports and weights take a while
    rank0_device: int | None = None  # rank 0's CUDA device when a cluster chose it

    @property
    def start_bound_s(self) -> float:
        """How long the ranks may take to check in and build their learners."""
        return max(self.timeout_s, self.start_timeout_s)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        return cls(**json.loads(text))


@dataclass
class Group:
    """Rank 0's view of the group: the store commands go through and the local children
    (empty under torchrun)."""

    spec: RankSpec
    store: torch.distributed.Store
    children: dict[int, subprocess.Popen] = field(default_factory=dict)

    def failed(self) -> str | None:
        """One line naming every local child that has exited, or None."""
        dead = [
            f"rank {r} (pid {p.pid}) exited with {_exit_text(p.returncode)}"
            for r, p in sorted(self.children.items())
            if p.poll() is not None
        ]
        return "; ".join(dead) or None

    def stop_children(self, grace_s: float = 10.0) -> None:
        for p in self.children.values():
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def connect(spec: RankSpec, rank: int) -> torch.distributed.Store:
    """The store of the group (rank 0 of a local launch hosts it)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=spec.timeout_s)
    if spec.torchrun:  # torchrun's agent hosts the store
        return dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), spec.world_size,
            is_master=False, timeout=timeout,
        )  # fmt: skip
    return dist.TCPStore(
        spec.host, spec.port, spec.world_size, is_master=rank == 0, timeout=timeout,
        wait_for_workers=False,
    )  # fmt: skip


def join(spec: RankSpec, rank: int, store: torch.distributed.Store) -> torch.distributed.Store:
    """Join the default process group as ``rank``; returns the store commands go through."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        if rank == 0 and spec.rank0_device is not None:
            torch.cuda.set_device(spec.rank0_device)
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(
        _backend(), store=dist.PrefixStore("agent_spo/pg", store), rank=rank,
        world_size=spec.world_size, timeout=timedelta(seconds=spec.timeout_s),
    )  # fmt: skip
    return dist.PrefixStore("agent_spo/cmd", store)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start(spec: RankSpec, launch: Launch | None = None) -> Group:
    """As rank 0: start ranks 1..N-1 (local launch) or join torchrun's, and form the group.
    ``launch(rank, env)`` starts a rank elsewhere (a cluster's placement) and returns a
    handle with Popen's poll/wait/kill/pid; by default ranks are child processes here.
    Raises RankFailed when a child exits or the group does not form within start_bound_s."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process is already in a process group (one learner group each)")
    if spec.torchrun:  # the other ranks wait in `agent-spo train` for this spec
        store = connect(spec, 0)
        store.set(TORCHRUN_SPEC_KEY, spec.to_json())
        return Group(spec, join(spec, 0, store))
    spec = RankSpec(**{**spec.__dict__, "port": spec.port or free_port()})
    store = connect(spec, 0)
    env = {SPEC_ENV: spec.to_json(), "PYTHONPATH": os.pathsep.join(sys.path)}
    children: dict = {}
    group = Group(spec, store, children)
    try:
        for rank in range(1, spec.world_size):
            if launch is not None:
                children[rank] = launch(rank, env)
            else:
                children[rank] = subprocess.Popen(
                    [sys.executable, "-m", "agent_spo.dist.rank", str(rank)],
                    env={**os.environ, **env}, preexec_fn=_die_with_parent,
                )  # fmt: skip
        # every child checks in before anyone enters the group, so a child that dies on
        # the way (bad import, bad model path) fails the start at once, not at the timeout
        deadline = time.monotonic() + spec.start_bound_s
        for rank in children:
            while not store.check([f"ready/{rank}"]):
                if group.failed() or time.monotonic() > deadline:
                    raise RankFailed(group.failed() or f"rank {rank} did not check in")
                time.sleep(0.05)
        group.store = join(spec, 0, store)
    except Exception as e:
        for p in children.values():
            p.kill()
        group.stop_children()
        raise RankFailed(
            f"learner ranks did not form a group within {spec.start_bound_s:g}s: "
            f"{group.failed() or e}"
        ) from e
    return group


__all__ = ["Group", "Launch", "RankFailed", "RankSpec", "connect", "free_port", "join", "start"]
