"""One :class:`~agent_spo.engines.base.Engine` over many engine replicas (the rollout fleet).

Each replica is a server started by ``agent-spo engine serve`` (or anything that answers
the same routes, see :mod:`agent_spo.engines.serve`). The pool:

* **routes** each generation to the replica with the fewest requests in flight
  (``route="requests"``) or the fewest tokens still to generate (``route="tokens"``),
  except that the turns of one episode (one :func:`~agent_spo.engines.base.affinity`
  block) stay on the replica that took the first, whose prefix cache holds the
  conversation;
* **takes a failing replica out**: a request that fails for a reason of the replica's
  (no connection, a dropped connection, a 5xx, a broken reply) moves to another replica
  at once (a request is stateless: the prompt is token ids), is counted in
  ``rollout/replica_drops``, and the replica leaves the rotation. When no replica is left
  the request fails with :class:`EngineError`, and the episode is dropped and counted,
  never scored. A refusal (4xx: a prompt over the context) is the caller's and is raised
  as it is;
* **re-admits** a replica when it answers again (a probe every ``probe_s``), after
  bringing it to the pool's weights if it holds others (a restarted replica comes back
  with the weights it was started from);
* **syncs weights** (``update_weights``, the ``disk`` path): the learner's weights are
  written once under ``sync_dir`` in size-capped buckets
  (:func:`~agent_spo.engines.weights.write_weights`), then every replica in rotation, in
  parallel, is paused (requests and caches kept), loads them, and resumes. Each replica's
  sync runs under ``sync_timeout_s``; one that fails or times out leaves the rotation
  (its pause is a lease that ends by itself) and rejoins later through the probe. The
  pool's ``version`` moves once every replica still in rotation has acknowledged; if none
  could, ``update_weights`` raises :class:`EngineError`. ``sync_dir`` must be visible to
  every replica at the same path (a shared file system across machines). Only the newest
  version is kept on disk.

Generations carry each token's policy version as the replica reports it, so a generation
that spans an update is split exactly where the new weights took over.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent_spo.engines.base import EngineError, Generation, Sampling, affinity_key
from agent_spo.engines.openai_http import HTTPEngineError, OpenAIHTTPEngine

if TYPE_CHECKING:
    import torch

_AFFINITY_CAP = 100_000  # episodes remembered (the oldest are forgotten first)


@dataclass
class Replica:
    index: int
    url: str
    client: OpenAIHTTPEngine
    version: int | None = None  # the weights it acknowledged last; None = never heard from
    live: bool = False  # in rotation
    why_out: str = "not contacted yet"
    outstanding: int = 0  # requests in flight
    pending_tokens: int = 0  # most tokens those requests may still generate
    requests: int = 0  # generations it returned
    drops: int = 0  # requests that failed on it and moved elsewhere
    out_since: float = field(default_factory=time.monotonic)


class ReplicaPool:
    """Generate on many replicas as one engine; sync their weights; see the module doc."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        sync_dir: str | Path | None = None,
        model: str | None = None,
        api_key: str | None = None,
        max_model_len: int | None = None,
        route: Literal["requests", "tokens"] = "requests",
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        sync_timeout_s: float = 300.0,
        bucket_bytes: int = 512 * 2**20,
        probe_s: float = 2.0,
        version: int = 0,
        log=None,
    ) -> None:
        if not urls:
            raise ValueError("a replica pool needs at least one URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a replica is listed twice in {list(urls)}")
        if route not in ("requests", "tokens"):
            raise ValueError(f"route must be 'requests' or 'tokens', got {route!r}")
        self.replicas = [
            Replica(
                i,
                u,
                OpenAIHTTPEngine(
                    u,
                    model,
                    api_key=api_key,
                    max_model_len=max_model_len,
                    timeout_s=timeout_s,
                    connect_timeout_s=connect_timeout_s,
                    retries=0,
                    token_versions=True,
                ),
            )  # fmt: skip
            for i, u in enumerate(urls)
        ]
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        self.route = route
        self.sync_timeout_s = float(sync_timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.probe_s = float(probe_s)
        self._version = int(version)
        self._max_model_len = max_model_len
        self._log = log or (lambda msg: None)
        self._affinity: collections.OrderedDict[object, Replica] = collections.OrderedDict()
        self._probe: asyncio.Task | None = None
        self._sync_lock: asyncio.Lock | None = None
        self._closed = False
        self._started = False
        self._starting: asyncio.Future | None = None
        self.replica_drops = 0
        self.last_sync: dict[str, float] = {}

    # ------------------------------------------------------------------ protocol
    @property
    def version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        """The smallest context of the replicas (read when the pool started)."""
        if self._max_model_len is None:
            for r in self.replicas:
                try:
                    n = r.client.max_model_len
                except EngineError:
                    continue
                self._max_model_len = n
                break
            else:
                raise EngineError(f"no replica answered: {self._why_none()}")
        return self._max_model_len

    async def start(self) -> ReplicaPool:
        """Contact every replica; those that answer with the pool's version join the
        rotation. Raises :class:`EngineError` when none can."""
        await asyncio.gather(*(self._admit(r) for r in self.replicas))
        if not any(r.live for r in self.replicas):
            raise EngineError(f"no replica can serve: {self._why_none()}")
        lens = [r.client.max_model_len for r in self.replicas if r.live]
        if self._max_model_len is None:
            self._max_model_len = min(lens)
        self._started = True
        self._ensure_probe()
        return self

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation:
        if self._closed:
            raise EngineError("the engine is closed")
        if not self._started:  # the first requests start the pool, once
            if self._starting is None or self._starting.done():
                self._starting = asyncio.ensure_future(self.start())
            await asyncio.shield(self._starting)
        self._ensure_probe()
        key = affinity_key()
        tried: set[int] = set()
        while True:
            r = self._pick(key, tried, sampling.max_tokens)
            r.outstanding += 1
            r.pending_tokens += sampling.max_tokens
            try:
                gen = await r.client.generate(prompt_ids, sampling)
            except HTTPEngineError as e:
                if e.status_code is not None and e.status_code < 500:
                    raise  # the request's fault (4xx), not the replica's
                self._fail(r, str(e), tried)
                continue
            except EngineError as e:
                self._fail(r, str(e), tried)
                continue
            finally:
                r.outstanding -= 1
                r.pending_tokens -= sampling.max_tokens
            r.requests += 1
            return gen

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Write the weights once, load them on every replica in rotation; see the module
        doc. Raises :class:`EngineError` when no replica took them."""
        if self.sync_dir is None:
            raise EngineError(
                "this replica pool has no sync_dir, so it cannot take weights "
                "(rollout.sync_dir names a folder every replica can read)"
            )
        if self._closed:
            raise EngineError("the engine is closed")
        from agent_spo.engines.weights import prune, write_weights

        async with self._lock():
            t0 = time.perf_counter()
            written = await asyncio.to_thread(
                write_weights, weights, self.sync_dir, version, bucket_bytes=self.bucket_bytes
            )
            t_write = time.perf_counter() - t0
            targets = [r for r in self.replicas if r.live]
            results = await asyncio.gather(
                *(self._sync_one(r, written.path, version) for r in targets),
                return_exceptions=True,
            )
            failed = []
            for r, res in zip(targets, results, strict=True):
                if isinstance(res, BaseException):
                    why = f"weight sync to v{version} failed: {res}"
                    self._take_out(r, why)
                    failed.append(f"replica {r.index} ({r.url}): {res}")
            if len(failed) == len(targets):
                raise EngineError(
                    f"weight sync to version {version} reached no replica: "
                    + ("; ".join(failed) or self._why_none())
                )
            self._version = int(version)
            prune(self.sync_dir, keep=version)
            self.last_sync = {
                "perf/weight_sync_s": time.perf_counter() - t0,
                "perf/weight_write_s": t_write,
                "perf/weight_sync_bytes": float(written.bytes),
            }

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except (asyncio.CancelledError, RuntimeError):  # made on a loop now closed
                pass
            self._probe = None
        for r in self.replicas:
            await r.client.close()

    async def __aenter__(self) -> ReplicaPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """For the step's metrics: the last sync, drops, and each replica's state."""
        out: dict[str, float] = dict(self.last_sync)
        out["rollout/replica_drops"] = float(self.replica_drops)
        out["rollout/replicas_live"] = float(sum(r.live for r in self.replicas))
        for r in self.replicas:
            out[f"rollout/replica{r.index}_requests"] = float(r.requests)
            out[f"rollout/replica{r.index}_version"] = float(-1 if r.version is None else r.version)
        return out

    def __repr__(self) -> str:
        live = sum(r.live for r in self.replicas)
        return f"ReplicaPool({live}/{len(self.replicas)} live, version={self._version})"

    # ------------------------------------------------------------------ routing
    def _pick(self, key: object | None, tried: set[int], max_tokens: int) -> Replica:
        if key is not None:
            r = self._affinity.get(key)
            if r is not None and r.live and r.index not in tried:
                self._affinity.move_to_end(key)
                return r
        live = [r for r in self.replicas if r.live and r.index not in tried]
        if not live:
            raise EngineError(f"no replica can serve: {self._why_none()}")
        if self.route == "tokens":
            r = min(live, key=lambda x: (x.pending_tokens, x.outstanding, x.requests))
        else:
            r = min(live, key=lambda x: (x.outstanding, x.pending_tokens, x.requests))
        if key is not None:
            self._affinity[key] = r
            self._affinity.move_to_end(key)
            if len(self._affinity) > _AFFINITY_CAP:
                self._affinity.popitem(last=False)
        return r

    def _fail(self, r: Replica, why: str, tried: set[int]) -> None:
        tried.add(r.index)
        r.drops += 1
        self.replica_drops += 1
        self._take_out(r, why)

    def _take_out(self, r: Replica, why: str) -> None:
        if r.live:
            self._log(f"replica {r.index} ({r.url}) out of rotation: {why}")
            r.out_since = time.monotonic()
        r.live, r.why_out = False, why

    def _why_none(self) -> str:
        return "; ".join(f"replica {r.index} ({r.url}): {r.why_out}" for r in self.replicas)

    # ------------------------------------------------------------------ sync and probe
    async def _sync_one(self, r: Replica, path: Path, version: int) -> None:
        async def run() -> None:
            c, t = r.client, self.sync_timeout_s
            try:
                await c.control("POST", "/pause", {"timeout_s": t}, timeout_s=t)
                await c.control("POST", "/update_weights",
                                {"path": str(path), "version": int(version)}, timeout_s=t)  # fmt: skip
                r.version = int(version)
            except HTTPEngineError as e:
                if e.status_code == 404:
                    raise EngineError(
                        f"{r.url} has no weight-update routes (a plain `vllm serve`?); start "
                        "replicas with `agent-spo engine serve`"
                    ) from None
                raise
            finally:  # resume even after a failed load: the lease would, later
                try:
                    await c.control("POST", "/resume", {}, timeout_s=min(t, 5.0))
                except EngineError:
                    pass

        try:
            await asyncio.wait_for(run(), self.sync_timeout_s)
        except TimeoutError:
            raise EngineError(
                f"no answer within sync_timeout_s = {self.sync_timeout_s:g} s"
            ) from None

    async def _admit(self, r: Replica) -> None:
        """Bring a replica into rotation if it answers and holds (or can be given) the
        pool's weights."""
        try:
            info = await r.client.control("GET", "/weight_info", timeout_s=self.probe_s + 5)
            held = int(info["weight_version"])
            await r.client.start()  # the model's name and context
        except (EngineError, KeyError, TypeError, ValueError) as e:
            self._take_out(r, f"no answer: {e}")
            return
        r.version = held
        if held != self._version:
            from agent_spo.engines.weights import MANIFEST, version_dir

            have = (
                self.sync_dir is not None
                and (version_dir(self.sync_dir, self._version) / MANIFEST).is_file()
            )
            if not have:
                self._take_out(
                    r, f"holds weights v{held}, the pool is at v{self._version}, and no written "
                    "copy of those is left to load",
                )  # fmt: skip
                return
            assert self.sync_dir is not None  # `have` says so
            try:
                await self._sync_one(r, version_dir(self.sync_dir, self._version), self._version)
            except EngineError as e:
                self._take_out(r, f"could not load v{self._version}: {e}")
                return
        if not r.live:
            self._log(f"replica {r.index} ({r.url}) in rotation at v{r.version}")
        r.live, r.why_out = True, ""

    def _lock(self) -> asyncio.Lock:
        """Held by a sync and by a probe round: a replica is never admitted at a version
        a concurrent sync is replacing."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        return self._sync_lock

    def _ensure_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.probe_s)
            down = [r for r in self.replicas if not r.live]
            if not down:
                continue
            # ask without the lock (a dead replica takes its connect timeout to fail, and
            # a sync must not wait on that); admit the ones that answered under it
            alive = await asyncio.gather(*(self._answers(r) for r in down))
            back = [r for r, ok in zip(down, alive, strict=True) if ok]
            if back:
                async with self._lock():
                    await asyncio.gather(*(self._admit(r) for r in back if not r.live))

    async def _answers(self, r: Replica) -> bool:
        try:
            await r.client.control("GET", "/weight_info", timeout_s=self.probe_s + 2)
            return True
        except EngineError as e:
            r.why_out = f"no answer: {e}"
            return False


def status(pool: ReplicaPool) -> list[dict[str, Any]]:
    """One row per replica, for a status line or a test."""
    return [{"index": r.index, "url": r.url, "live": r.live, "version": r.version,
             "outstanding": r.outstanding, "requests": r.requests, "drops": r.drops,
             "why_out": r.why_out} for r in pool.replicas]  # fmt: skip
