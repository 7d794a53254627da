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
    kind: str = "agent-spo"  # or "vllm": vLLM's own server (other control routes)
    stale: bool = False  # answers, but holds other weights: the next gloo sync brings it in
    link: Any = None  # gloo: the trainer's end of its two-process group
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
        transport: Literal["disk", "gloo"] = "disk",
        advertise_host: str = "127.0.0.1",
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
        if transport not in ("disk", "gloo"):
            raise ValueError(f"transport must be 'disk' or 'gloo', got {transport!r}")
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
        self.transport = transport
        self.advertise_host = advertise_host
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
        """Load the weights on every replica in rotation (and, over gloo, every replica
        waiting for them); see the module doc. Raises :class:`EngineError` when no replica
        took them."""
        if self.transport == "disk" and self.sync_dir is None:
            raise EngineError(
                "this replica pool has no sync_dir, so it cannot take weights "
                "(rollout.sync_dir names a folder every replica can read)"
            )
        if self._closed:
            raise EngineError("the engine is closed")
        async with self._lock():
            t0 = time.perf_counter()
            if self.transport == "gloo":
                targets, results, size, t_write = await self._sync_gloo(weights, version)
            else:
                targets, results, size, t_write = await self._sync_disk(weights, version)
            failed = []
            for r, res in zip(targets, results, strict=True):
                if isinstance(res, BaseException):
                    self._take_out(r, f"weight sync to v{version} failed: {res}")
                    failed.append(f"replica {r.index} ({r.url}): {res}")
                else:
                    r.version, r.stale = int(version), False
                    r.client.set_version(int(version))
                    if not r.live:
                        self._log(f"replica {r.index} ({r.url}) in rotation at v{version}")
                    r.live, r.why_out = True, ""
            if len(failed) == len(targets):
                raise EngineError(
                    f"weight sync to version {version} reached no replica: "
                    + ("; ".join(failed) or self._why_none())
                )
            self._version = int(version)
            self.last_sync = {
                "perf/weight_sync_s": time.perf_counter() - t0,
                "perf/weight_write_s": t_write,
                "perf/weight_sync_bytes": float(size),
            }

    async def _sync_disk(self, weights, version: int):
        from agent_spo.engines.weights import prune, write_weights

        assert self.sync_dir is not None  # update_weights checked
        t0 = time.perf_counter()
        written = await asyncio.to_thread(
            write_weights, weights, self.sync_dir, version, bucket_bytes=self.bucket_bytes
        )
        t_write = time.perf_counter() - t0
        targets = [r for r in self.replicas if r.live]
        results = await asyncio.gather(
            *(self._sync_one(r, written.path, version) for r in targets), return_exceptions=True
        )
        if any(not isinstance(x, BaseException) for x in results):
            prune(self.sync_dir, keep=version)
        return targets, results, written.bytes, t_write

    async def _sync_gloo(self, weights, version: int):
        """Pause every linked replica, stream the buckets to all of them at once (one
        pass over the weights), then collect each replica's answer and resume it."""
        from agent_spo.engines.transfer import pack_buckets

        targets = [r for r in self.replicas if r.link is not None and (r.live or r.stale)]
        t = self.sync_timeout_s
        errors: dict[int, BaseException] = {}

        async def pause(r: Replica) -> None:
            try:
                await r.client.control("POST", "/pause", {"timeout_s": t}, timeout_s=t)
            except EngineError as e:
                errors[r.index] = e

        await asyncio.gather(*(pause(r) for r in targets))
        answers = {
            r.index: asyncio.create_task(
                r.client.control(
                    "POST",
                    "/update_weights",
                    {"transport": "gloo", "version": int(version)},
                    timeout_s=t,
                )
            )  # fmt: skip
            for r in targets
            if r.index not in errors
        }

        def send_all() -> int:
            count = total = 0
            for entries, flat in pack_buckets(weights, self.bucket_bytes):
                header = {"version": int(version), "tensors": entries}
                count, total = count + len(entries), total + flat.numel()
                self._post_all(targets, errors, header, flat)
            end = {"version": int(version), "end": True, "count": count, "bytes": total}
            self._post_all(targets, errors, end)
            return total

        size = 0
        if answers:
            size = await asyncio.to_thread(send_all)
        results: list[Any] = []
        for r in targets:
            if r.index not in errors and r.index in answers:
                try:
                    await answers[r.index]
                except EngineError as e:
                    errors[r.index] = e
            if r.index in errors and r.link is not None:
                r.link.close()  # out of step with the replica now: a new one on rejoin
                r.link = None
            results.append(errors.get(r.index, None))
        await asyncio.gather(*(self._resume(r) for r in targets))
        return targets, results, size, 0.0

    def _post_all(self, targets, errors: dict, header: dict, flat=None) -> None:
        """Send one message to every replica still in step, all at once (runs in a thread)."""
        works = {}
        for r in targets:
            if r.index in errors:
                continue
            try:
                works[r.index] = r.link.post(header, flat)
            except Exception as e:  # noqa: BLE001 - this replica's link broke
                errors[r.index] = EngineError(f"gloo send failed: {e}")
        for index, ws in works.items():
            try:
                for w in ws:
                    w.wait()
            except Exception as e:  # noqa: BLE001 - a dead or stuck peer: gloo says which
                errors[index] = EngineError(f"gloo send failed: {e}")

    async def _resume(self, r: Replica) -> None:
        try:
            await r.client.control("POST", "/resume", {}, timeout_s=min(self.sync_timeout_s, 5.0))
        except EngineError:
            pass  # its pause lease ends by itself

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
        if r.link is not None:  # most likely dead: a new link when it answers again
            r.link.close()
            r.link = None
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
                if r.kind == "vllm":  # vLLM's own server: its routes, our worker extension
                    await c.control("POST", "/pause?mode=keep", None, timeout_s=t)
                    await c.control("POST", "/collective_rpc", {
                        "method": "agent_spo_load_weights_from", "args": [str(path)],
                        "timeout": t}, timeout_s=t)  # fmt: skip
                    await c.control("POST", "/update_weight_version",
                                    {"new_version": str(int(version))}, timeout_s=t)  # fmt: skip
                else:
                    await c.control("POST", "/pause", {"timeout_s": t}, timeout_s=t)
                    await c.control("POST", "/update_weights",
                                    {"path": str(path), "version": int(version)}, timeout_s=t)  # fmt: skip
                r.version = int(version)
                r.client.set_version(int(version))
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
            models = await r.client.control("GET", "/v1/models", timeout_s=self.probe_s + 5)
            r.kind = "vllm" if models["data"][0].get("owned_by") == "vllm" else "agent-spo"
            held = info["weight_version"]
            if r.kind == "vllm":  # a fresh vLLM server holds no version: its start weights
                held = int(held) if str(held).lstrip("-").isdigit() else 0
                # a trainer that died mid-sync may have left it paused (vLLM's pause has
                # no lease): resuming is harmless otherwise
                await r.client.control("POST", "/resume", {}, timeout_s=self.probe_s + 5)
                where = await r.client.control("POST", "/collective_rpc", {
                    "method": "agent_spo_platform"}, timeout_s=self.probe_s + 5)  # fmt: skip
                # vLLM-CPU's engine core dies on concurrent seeded requests
                r.client.send_seed = not where["results"][0]["cpu"]
            held = int(held)
            await r.client.start()  # the model's name and context
        except HTTPEngineError as e:
            if e.status_code == 404:  # e.g. vllm serve without its development routes
                self._take_out(r, f"{e}; a replica needs the weight routes: start it with "
                                  "`agent-spo engine serve` (--backend hf or vllm)")  # fmt: skip
            else:
                self._take_out(r, f"no answer: {e}")
            return
        except (EngineError, KeyError, IndexError, TypeError, ValueError) as e:
            self._take_out(r, f"no answer: {e}")
            return
        r.version = held
        r.client.set_version(held)
        if r.kind == "vllm" and self.transport == "gloo":
            self._take_out(r, "a vLLM replica syncs through the disk path only "
                              "(rollout.weight_sync=disk)")  # fmt: skip
            return
        if self.transport == "gloo":
            if r.link is None:
                try:
                    r.link = await self._connect(r)
                except EngineError as e:
                    self._take_out(r, f"no gloo link: {e}")
                    return
            if held != self._version:  # no copy of the current weights is kept: wait
                r.stale = True
                self._take_out(r, f"holds weights v{held}; it rejoins at the next sync")
                return
        elif held != self._version:
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

    async def _connect(self, r: Replica):
        """A new two-process gloo group with replica ``r`` (its end joins over HTTP)."""
        from agent_spo.engines.transfer import GlooSender

        t = self.sync_timeout_s
        sender = GlooSender(self.advertise_host, timeout_s=t)
        joined = asyncio.create_task(asyncio.to_thread(sender.connect))
        try:
            await r.client.control("POST", "/transfer/init", {
                "host": self.advertise_host, "port": sender.port, "timeout_s": t,
            }, timeout_s=t)  # fmt: skip
            await asyncio.wait_for(joined, t)
        except BaseException as e:
            joined.cancel()  # the thread itself ends at the store's timeout
            if isinstance(e, EngineError):
                raise
            if isinstance(e, TimeoutError):
                raise EngineError(f"the replica did not join within {t:g} s") from None
            raise EngineError(f"{type(e).__name__}: {e}") from e
        return sender

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
