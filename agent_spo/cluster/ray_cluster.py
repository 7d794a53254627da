"""``cluster.backend: ray``: place the run's processes on a Ray cluster, watch them, and stop
them all when the run ends.

Ray only places and supervises. Each process is an ordinary ``agent-spo`` command (``engine
serve``, ``sandbox serve``, ``python -m agent_spo.dist.rank``) started by a small actor on the
node of its placement-group bundle; data keeps to the paths a one-machine run uses: HTTP
for generations and tool calls, gloo/NCCL (or the disk path) for weights, the learner's
own process group for gradients. Nothing goes through Ray's object store.

Lifecycle: the servers get a fresh bearer token each run; ``start`` returns once every
server answers its health route (or raises :class:`ClusterError` naming the one that did
not, with the tail of its log); leaving the context stops every process (SIGTERM to its
process group, SIGKILL after a grace), kills the actors, removes the placement groups, and
stops the Ray cluster if the run started it. A child also dies with its actor
(``PR_SET_PDEATHSIG``), and Ray kills a driver's actors when the driver dies, so a trainer
that is killed outright leaves nothing running either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from agent_spo.cluster.plan import Bundle, Node, PlacementError, bundles, describe, place

if TYPE_CHECKING:
    from agent_spo.config import TrainConfig

SANDBOX_TOKEN_ENV = "AGENT_SPO_SANDBOX_TOKEN"  # `sandbox serve` reads its --token from it
ENGINE_KEY_ENV = "AGENT_SPO_ENGINE_KEY"  # `engine serve` reads its --api-key from it


class ClusterError(RuntimeError):
    """The cluster could not place or start the run's processes."""


class ProcessActor:
    """Runs one command on its node (as a Ray actor): started on ``start``, polled,
    and stopped with its whole process group."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str) -> None:
        self.argv, self.env, self.log_path = argv, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        """Start the command, ``{port}`` in its arguments replaced by a free port of this
        node; returns where it runs."""
        import ray

        port = _free_port()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        # logical GPUs (a CPU machine declaring some) leave the process on the CPU
        device = "cuda" if gpus and os.path.exists("/dev/nvidiactl") else "cpu"
        argv = [a.replace("{port}", str(port)).replace("{device}", device) for a in self.argv]
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        return {
            "ip": ray.util.get_node_ip_address(),
            "port": port,
            "pid": self.proc.pid,
            "gpus": gpus,
            "device": device,
        }

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # what the process started, too
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return self.proc.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _libc_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_PRCTL = _libc_prctl()  # looked up here: a Ray worker is threaded, so the child only calls


def _die_with_parent() -> None:  # in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Member:
    """A process the cluster started: its bundle, actor and where it runs."""

    bundle: Bundle
    actor: Any
    info: dict
    url: str | None = None


class RayRank:
    """A learner rank started by an actor, with the part of ``subprocess.Popen`` that
    :mod:`agent_spo.dist.group` uses (``poll``, ``wait``, ``kill``, ``pid``)."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.pid = member.info["pid"]
        self.returncode: int | None = None
        self._checked = 0.0

    def poll(self) -> int | None:
        import ray

        if self.returncode is not None or time.monotonic() - self._checked < 0.5:
            return self.returncode
        self._checked = time.monotonic()
        try:
            self.returncode = ray.get(self.member.actor.poll.remote(), timeout=30)
        except ray.exceptions.GetTimeoutError:
            return None  # no answer yet: a hung rank is the collective timeout's to find
        except ray.exceptions.RayActorError:
            self.returncode = -signal.SIGKILL  # its actor (and so the rank) is gone
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"learner rank pid {self.pid}", timeout or 0)
            time.sleep(0.2)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        import ray

        try:
            self.returncode = ray.get(self.member.actor.stop.remote(0.0), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self.member.actor)  # the actor, and with it the rank (PDEATHSIG)
            self.returncode = -signal.SIGKILL


@dataclass
class RayCluster:
    """A run's processes on Ray: what :func:`start` placed and started."""

    cfg: TrainConfig
    log: Callable[[str], None]
    log_dir: Path
    started_ray: bool = False
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    groups: dict[str, Any] = field(default_factory=dict)
    members: list[Member] = field(default_factory=list)
    wanted: dict[str, list[Bundle]] = field(default_factory=dict)
    driver_ip: str = "127.0.0.1"
    nodes: list[Node] = field(default_factory=list)
    rank0_gpus: list[str] = field(default_factory=list)  # the GPUs Ray gave the trainer
    holders: list[Any] = field(default_factory=list)  # actors that only hold a bundle

    def rank0_device(self) -> int | None:
        """The CUDA device index (in this process) of the GPU Ray reserved for learner
        rank 0, the trainer; None without GPUs."""
        if not self.rank0_gpus:
            return None
        import torch

        if not torch.cuda.is_available():
            return None  # logical GPUs on a CPU machine
        gpu = self.rank0_gpus[0]
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        visible = [v for v in visible if v]
        if visible and gpu in visible:
            index = visible.index(gpu)
        elif not visible and gpu.isdigit():
            index = int(gpu)
        else:
            index = -1
        if not 0 <= index < torch.cuda.device_count():
            raise ClusterError(
                f"cluster: Ray reserved GPU {gpu} for the trainer (learner rank 0), which "
                f"this process cannot use (CUDA_VISIBLE_DEVICES={','.join(visible) or 'unset'}, "
                f"{torch.cuda.device_count()} device(s)); declare no more GPUs than the "
                "machine has (cluster.num_gpus)"
            )
        return index

    # ------------------------------------------------------------------ what it offers
    def urls(self, role: str) -> list[str]:
        return [m.url for m in self.members if m.bundle.role == role and m.url]

    def env(self) -> dict[str, str]:
        """The environment the trainer needs to reach the servers (their tokens)."""
        return {self.cfg.sandbox.token_env: self.token, ENGINE_KEY_ENV: self.token}

    def launch_rank(self, rank: int, env: dict[str, str]) -> RayRank:
        """Start learner rank ``rank`` (>= 1) on its bundle; for ``group.start``."""
        argv = [sys.executable, "-m", "agent_spo.dist.rank", str(rank)]
        member = self._start(self.wanted["learner"][rank], argv, env)
        return RayRank(member)

    def apply(self, cfg):
        """``cfg`` as the pipeline must see it: engines and sandboxes at the started
        servers' URLs, learner ranks placed by this cluster."""
        rollout = {"engine": "openai_http", "urls": self.urls("engine"),
                   "api_key_env": ENGINE_KEY_ENV}  # fmt: skip
        if cfg.rollout.weight_sync == "gloo" and cfg.rollout.trainer_host == "127.0.0.1":
            rollout["trainer_host"] = self.driver_ip  # where the replicas reach the trainer
        return cfg.model_copy(update={
            "rollout": cfg.rollout.model_copy(update=rollout),
            "sandbox": cfg.sandbox.model_copy(update={"backend": "remote",
                                                      "urls": self.urls("sandbox")}),
        })  # fmt: skip

    # ------------------------------------------------------------------ lifecycle
    def start(self, model_path: str) -> RayCluster:
        import ray
        from ray.util.placement_group import placement_group

        c = self.cfg.cluster
        if c.address is None:
            ray.init(
                address="local", num_cpus=c.num_cpus or os.cpu_count(), num_gpus=c.num_gpus,
                include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
            )  # fmt: skip
            self.started_ray = True
            where = "a Ray cluster started for this run"
        else:
            where = f"the Ray cluster at {c.address}"
            try:
                ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
                raise ClusterError(
                    f"cluster.address: could not join {where}: {e}. Is it running (`ray "
                    "status`)? Ray clusters use token authentication by default: joining by "
                    "an explicit address needs RAY_AUTH_MODE=token and the cluster's token "
                    "(~/.ray/auth_token or RAY_AUTH_TOKEN); on the head node, address auto "
                    "finds both"
                ) from e
        self.driver_ip = ray.util.get_node_ip_address()
        self.nodes = _ray_nodes(self.driver_ip)
        self.wanted = bundles(c, self.cfg.learner.world_size)
        try:  # the same placement Ray will make, so a layout that cannot fit fails now
            place(self.wanted, [Node(n.name, n.cpus, n.gpus) for n in self.nodes],
                  spread_sandboxes=c.sandbox_spread)  # fmt: skip
        except PlacementError as e:
            raise ClusterError(f"cluster: the processes do not fit {where}: {e}") from e
        self.log(f"cluster: {where}, {len(self.nodes)} node(s); placing "
                 f"{len(self.wanted['learner'])} learner rank(s), {c.engine_replicas} engine "
                 f"replica(s), {c.sandbox_servers} sandbox server(s)")  # fmt: skip
        strategy = {"learner": "PACK", "engine": "PACK",
                    "sandbox": "SPREAD" if c.sandbox_spread else "PACK"}  # fmt: skip
        for role, wanted in self.wanted.items():
            specs = [_resources(b) for b in wanted]
            if role == "learner":  # rank 0 is this process: its bundle stays on this node
                specs[0][f"node:{self.driver_ip}"] = 0.001
            self.groups[role] = placement_group(
                specs, strategy=strategy[role], name=f"agent-spo-{role}"
            )
        for role, pg in self.groups.items():
            if not _ready(pg, c.start_timeout_s):
                raise ClusterError(
                    f"cluster: Ray did not place the {role} bundles within "
                    f"{c.start_timeout_s:g}s (cluster.start_timeout_s); free resources: "
                    f"{ray.available_resources()}"
                )
        b0 = self.wanted["learner"][0]
        if b0.gpus:  # learner rank 0 is this process: hold its bundle, learn its GPUs
            remote: Any = ray.remote(_Holder)
            holder = remote.options(
                num_cpus=b0.cpus,
                num_gpus=b0.gpus,
                scheduling_strategy=_in(self.groups["learner"], 0),
            ).remote()
            self.holders.append(holder)
            try:
                self.rank0_gpus = ray.get(holder.gpu_ids.remote(), timeout=c.start_timeout_s)
            except ray.exceptions.RayError as e:
                raise ClusterError(
                    f"cluster: learner rank 0's bundle could not be held: {e}"
                ) from e
        deadline = time.monotonic() + c.start_timeout_s
        for b in self.wanted["engine"]:  # the tokens go by environment, not on argv (ps)
            self._start(b, self._engine_argv(model_path),
                        {"OMP_NUM_THREADS": _threads(b), ENGINE_KEY_ENV: self.token})  # fmt: skip
        for b in self.wanted["sandbox"]:
            self._start(b, self._sandbox_argv(), {SANDBOX_TOKEN_ENV: self.token})
        for m in self.members:
            self._wait_healthy(m, deadline)
        self.log("cluster: " + ", ".join(
            f"{len(self.urls(r))} {r} server(s) up" for r in ("engine", "sandbox")))  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop every process, actor and placement group; the Ray cluster too if this run
        started it. Safe to call more than once."""
        import ray

        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        stops = [m.actor.stop.remote(5.0) for m in self.members]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(stops, timeout=60)
        for actor in [m.actor for m in self.members] + self.holders:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
        self.holders.clear()
        for pg in self.groups.values():
            with contextlib.suppress(ray.exceptions.RayError):
                remove_placement_group(pg)
        self.members.clear()
        self.groups.clear()
        ray.shutdown()  # stops the cluster's own processes when this run started it

    # ------------------------------------------------------------------ helpers
    def _start(self, b: Bundle, argv: list[str], env: dict[str, str]) -> Member:
        import ray

        log_path = self.log_dir / f"{b.role}{b.index}.log"
        remote: Any = ray.remote(ProcessActor)
        actor = remote.options(
            num_cpus=b.cpus,
            num_gpus=b.gpus,
            max_restarts=0,
            scheduling_strategy=_in(self.groups[b.role], b.index),
        ).remote(argv, env, str(log_path))  # fmt: skip
        try:
            info: dict = ray.get(actor.start.remote(), timeout=self.cfg.cluster.start_timeout_s)
        except ray.exceptions.RayError as e:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
            raise ClusterError(f"cluster: {b.name} could not start: {e}") from e
        scheme_host = f"http://{_url_host(info['ip'])}:{info['port']}"
        url = scheme_host if b.role != "learner" else None
        member = Member(b, actor, info, url)
        self.members.append(member)
        self._write_processes()
        return member

    def _write_processes(self) -> None:
        """RUN/cluster/processes.json: every process started, where, and its log."""
        rows = [
            {"role": m.bundle.role, "index": m.bundle.index, "url": m.url,
             "node": m.info["ip"], "pid": m.info["pid"], "gpus": m.info["gpus"],
             "device": m.info["device"], "log": str(self.log_dir / f"{m.bundle.role}{m.bundle.index}.log")}
            for m in self.members
        ]  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.log_dir / "processes.json.tmp"
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(self.log_dir / "processes.json")

    def _engine_argv(self, model_path: str) -> list[str]:
        c = self.cfg.cluster
        m, r = self.cfg.model, self.cfg.rollout
        argv = [sys.executable, "-m", "agent_spo.cli", "engine", "serve", model_path,
                "--host", "0.0.0.0", "--port", "{port}", "--backend", c.engine_backend,
                "--dtype", m.dtype, "--seed", str(self.cfg.run.seed),
                "--max-batch", str(r.max_batch)]  # fmt: skip
        if r.max_model_len is not None:
            argv += ["--max-model-len", str(r.max_model_len)]
        if c.engine_backend == "hf":
            argv += ["--device", "{device}"]
        if c.engine_backend == "vllm" and c.engine_gpus > 1:
            argv.append(f"--vllm-arg=--tensor-parallel-size={c.engine_gpus}")
        if self.cfg.learner.lora.rank:  # replicas hold the adapter: syncs send it alone
            from agent_spo.lora import cli_args

            argv += cli_args(self.cfg.learner.lora)
        return argv + list(c.engine_args)

    def _sandbox_argv(self) -> list[str]:
        from tools.refs import is_builtin

        s = self.cfg.sandbox
        argv = [sys.executable, "-m", "agent_spo.cli", "sandbox", "serve",
                "--host", "0.0.0.0", "--port", "{port}",
                "--workers", str(s.pool_size), "--timeout", str(s.timeout_s),
                "--memory-mb", str(s.memory_mb)]  # fmt: skip
        for ref in self.cfg.rollout.tools:
            if not is_builtin(ref):
                argv += ["--tools", ref]
        return argv

    def _wait_healthy(self, m: Member, deadline: float) -> None:
        import ray

        route = "/health" if m.bundle.role == "engine" else "/v1/health"
        headers = {"Authorization": f"Bearer {self.token}"}
        while True:
            try:
                code = ray.get(m.actor.poll.remote(), timeout=30)
            except ray.exceptions.RayError as e:
                raise ClusterError(f"cluster: {m.bundle.name}'s actor died: {e}") from e
            if code is not None:
                tail = ray.get(m.actor.tail.remote())
                raise ClusterError(
                    f"cluster: {m.bundle.name} exited with code {code} while starting; "
                    f"the end of its log ({self.log_dir / f'{m.bundle.role}{m.bundle.index}.log'}"
                    f"):\n{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{m.url}{route}", headers=headers, timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"cluster: {m.bundle.name} at {m.url} did not answer {route} within "
                    f"cluster.start_timeout_s ({self.cfg.cluster.start_timeout_s:g}s)"
                )
            time.sleep(0.25)


class _Holder:
    """Holds a bundle for a process Ray did not start (the trainer) and says its GPUs."""

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]


def _in(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def _resources(b: Bundle) -> dict[str, float]:
    out = {"CPU": float(b.cpus)}
    if b.gpus:
        out["GPU"] = float(b.gpus)
    return out


def _threads(b: Bundle) -> str:
    return str(max(1, int(b.cpus)))


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _ready(pg, timeout_s: float) -> bool:
    import ray

    try:
        ray.get(pg.ready(), timeout=timeout_s)
        return True
    except ray.exceptions.GetTimeoutError:
        return False


@dataclass
class _LiveNode:
    node_id: str
    name: str
    cpus: float
    gpus: int


def _ray_node_ids() -> list[_LiveNode]:
    import ray

    return [
        _LiveNode(n["NodeID"], f"node {n['NodeManagerAddress']}",
                  float(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]  # fmt: skip


def _ray_nodes(driver_ip: str) -> list[Node]:
    """The live nodes, the trainer's first."""
    nodes = [Node(n.name, n.cpus, n.gpus) for n in _ray_node_ids()]
    nodes.sort(key=lambda n: n.name != f"node {driver_ip}")
    return nodes


@contextlib.contextmanager
def ray_cluster(cfg, model_path: str, run_dir: Path, log=print) -> Iterator[RayCluster]:
    """Start the run's processes on Ray (``cluster.backend: ray``), yield the cluster, and
    stop everything on exit, error or Ctrl-C."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ClusterError("cluster.backend ray needs Ray: pip install 'agent-spo[cluster]'") from e
    # every path an actor on another node is given is absolute: its working directory
    # is wherever `ray start` ran
    cluster = RayCluster(cfg, log, Path(os.path.abspath(run_dir)) / "cluster")
    env_before = {k: os.environ.get(k) for k in cluster.env()}
    main = threading.current_thread() is threading.main_thread()
    term_before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        cluster.start(os.path.abspath(model_path))  # not resolved: a link may differ per node
        if main:
            # SIGTERM (a scheduler cancelling the job) unwinds like Ctrl-C, so the
            # processes on the cluster are stopped, not orphaned (set after ray.init,
            # whose own handler exits in the middle of the event loop)
            signal.signal(signal.SIGTERM, _interrupt)
        os.environ.update(cluster.env())
        log("cluster: placement\n" + describe(_placed(cluster)))
        yield cluster
    finally:
        if main:  # a second SIGTERM does not cut the teardown short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cluster.stop()
        finally:
            if main:
                signal.signal(
                    signal.SIGTERM, signal.SIG_DFL if term_before is None else term_before
                )
            for k, v in env_before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _placed(cluster: RayCluster) -> list[Node]:
    """The nodes with the bundles Ray placed on them (for the log)."""
    from ray.util import placement_group_table

    nodes = {n.node_id: Node(n.name, n.cpus, n.gpus) for n in _ray_node_ids()}
    for role, pg in cluster.groups.items():
        where = placement_group_table(pg).get("bundles_to_node_id", {})
        for b in cluster.wanted[role]:
            node = nodes.get(where.get(b.index))
            if node is not None:
                node.take(b)
    driver = f"node {cluster.driver_ip}"
    return sorted(nodes.values(), key=lambda n: n.name != driver)


__all__ = ["ClusterError", "ENGINE_KEY_ENV", "RayCluster", "RayRank", "ray_cluster"]
