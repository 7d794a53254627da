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
import uuid
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
    kind: str = "agent-spo"  # or "vllm": vLLM's own server (other control routes)
    instance: str | None = None  # the server process's id: a new one means a restart
    stale: bool = False  # answers, but holds other weights: the next sync brings it in
    link: Any = None  # gloo: the trainer's end of its two-process group
    adapter: dict[str, Any] | None = None  # the LoRA layers it holds (vLLM: {"rank": max})
    adapters: dict[str, int] = field(default_factory=dict)  # vLLM: loaded -> requests on it
    outstanding: int = 0  # requests in flight
    pending_tokens: int = 0  # most tokens those requests may still generate
    requests: int = 0  # generations it returned
    drops: int = 0  # requests that failed on it and moved elsewhere
    probe_fails: int = 0  # failed admissions in a row (they space out the next probe)
    next_probe: float = 0.0  # time.monotonic() before which the probe leaves it alone
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
        lora=None,
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
        # absolute: the replicas resolve it against their own working directory
        self.sync_dir = Path(sync_dir).resolve() if sync_dir is not None else None
        self.route = route
        self.transport = transport
        self.advertise_host = advertise_host
        self.sync_timeout_s = float(sync_timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.probe_s = float(probe_s)
        self._version = int(version)
        self._given_len = max_model_len
        self._max_model_len = max_model_len
        self._log = log or (lambda msg: None)
        self._affinity: collections.OrderedDict[object, Replica] = collections.OrderedDict()
        self._probe: asyncio.Task | None = None
        self._sync_lock: asyncio.Lock | None = None
        self._closed = False
        self._started = False
        self._asleep = False  # colocated: between sleep() and wake()
        # LoRA: the learner's adapter config (peft's); with replicas that hold the same
        # layers, each sync is the adapter alone (decided at start, see loads_adapters)
        self.lora = None
        if lora is not None:
            from agent_spo.lora import peft_config

            self.lora = lora if not hasattr(lora, "model_dump") else peft_config(lora)
        self._adapter_mode = False
        self._adapter_names = 0  # vLLM adapters loaded so far (each gets its own name)
        self._adapter_tag = uuid.uuid4().hex[:6]  # this pool's, in its adapters' names
        self._starting: asyncio.Future | None = None
        self.replica_drops = 0
        self.last_sync: dict[str, float] = {}

    # ------------------------------------------------------------------ protocol
    @property
    def version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        """The smallest context of the replicas (asked of each now if the pool has not
        started: a blocking call, once)."""
        if self._max_model_len is None:
            lens = []
            for r in self.replicas:
                try:
                    lens.append(r.client.max_model_len)
                except EngineError:
                    continue
            if not lens:
                raise EngineError(f"no replica answered: {self._why_none()}")
            self._max_model_len = min(lens)
        return self._max_model_len

    @property
    def needs_sync(self) -> bool:
        """Some replica answers but holds other weights than the pool's version: the
        caller should push the current weights (``update_weights``) before generating."""
        return any(r.stale for r in self.replicas)

    @property
    def loads_adapters(self) -> bool:
        """Whether each sync sends the LoRA adapter alone: the learner trains one and every
        replica the pool started with holds the same layers (transformers replicas started
        with ``--lora-rank``..., vLLM replicas with LoRA on and a large enough rank)."""
        return self._adapter_mode

    def _holds_adapter(self, r: Replica) -> bool:
        if self.lora is None or r.adapter is None:
            return False
        from agent_spo.lora import shape_of

        want = shape_of(self.lora)
        if r.kind == "vllm":  # it reads rank and alpha from each adapter's config
            return r.adapter["rank"] >= want["rank"]
        return r.adapter == want

    async def start(self) -> ReplicaPool:
        """Contact every replica. Those that hold the pool's version join the rotation;
        those that hold others wait for the next sync (see :attr:`needs_sync`). Raises
        :class:`EngineError` when none answers. With LoRA, the replicas decide how the
        weights travel: every one holds the adapter's layers (adapters), or none does
        (merged weights); a mix is refused."""
        if self.lora is not None:  # the mode first: admission syncs by it
            answered = await asyncio.gather(*(self._ask(r) for r in self.replicas))
            reachable = [r for r, a in zip(self.replicas, answered, strict=True) if a is not None]
            holding = [r for r in reachable if self._holds_adapter(r)]
            if holding and len(holding) < len(reachable):
                from agent_spo.lora import cli_args

                raise EngineError(
                    "replicas " + ", ".join(f"{r.index} ({r.url})" for r in reachable
                                            if r not in holding)
                    + " hold no adapter like the learner's (learner.lora) and the others do:"
                    f" start every replica with `agent-spo engine serve ... "
                    f"{' '.join(cli_args(self.lora))}`, or none"
                )  # fmt: skip
            self._adapter_mode = bool(holding)
            if self._adapter_mode and self.sync_dir is None:
                raise EngineError(
                    "the replicas hold adapters, which travel as files: set rollout.sync_dir "
                    "to a folder every replica sees at the same path"
                )
        await asyncio.gather(*(self._admit(r, connect=True) for r in self.replicas))
        reachable = [r for r in self.replicas if r.live or r.stale]
        if not reachable:
            raise EngineError(f"no replica can serve: {self._why_none()}")
        if self._given_len is None:
            self._max_model_len = min(r.client.max_model_len for r in reachable)
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
            r = self._pick(key, tried)
            r.outstanding += 1
            r.pending_tokens += sampling.max_tokens
            adapter = r.client.model if r.client.model in r.adapters else None
            if adapter is not None:  # vLLM: not unloaded while this request runs on it
                r.adapters[adapter] += 1
            try:
                gen = await r.client.generate(prompt_ids, sampling)
            except HTTPEngineError as e:
                if adapter is not None and e.status_code == 404:  # it lost the adapter
                    self._fail(r, f"it no longer serves adapter {adapter}: {e}", tried)
                    continue
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
                if adapter is not None and adapter in r.adapters:
                    r.adapters[adapter] -= 1
            r.requests += 1
            return gen

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load the weights on every replica in rotation and every one waiting for
        them; see the module doc. Raises :class:`EngineError` when no replica took them."""
        if (self.transport == "disk" or self._adapter_mode) and self.sync_dir is None:
            raise EngineError(
                "this replica pool has no sync_dir, so it cannot take weights "
                "(rollout.sync_dir names a folder every replica can read)"
            )
        if self._closed:
            raise EngineError("the engine is closed")
        async with self._lock():
            t0 = time.perf_counter()
            if self._links:
                targets, results, size, t_write = await self._sync_gloo(weights, version)
            else:  # files (adapters too: small, written once, each replica loads them)
                targets, results, size, t_write = await self._sync_disk(weights, version)
            failed = []
            for r, res in zip(targets, results, strict=True):
                if res is None and self._links and r.link is None:
                    res = EngineError("its link was dropped during the sync")
                if isinstance(res, BaseException):
                    r.stale = False
                    self._take_out(r, f"weight sync to v{version} failed: {res}")
                    failed.append(f"replica {r.index} ({r.url}): {res}")
                else:
                    r.version, r.stale = int(version), False
                    r.client.set_version(int(version))
                    if not r.live:
                        self._log(f"replica {r.index} ({r.url}) in rotation at v{version}")
                    r.live, r.why_out, r.probe_fails = True, "", 0
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

    @property
    def _links(self) -> bool:
        """Whether syncs stream over gloo links (adapters always go as files)."""
        return self.transport == "gloo" and not self._adapter_mode

    def _targets(self) -> list[Replica]:
        ok = [r for r in self.replicas if r.live or r.stale]
        return [r for r in ok if r.link is not None] if self._links else ok

    async def _sync_disk(self, weights, version: int):
        from agent_spo.engines.weights import prune, write_weights

        assert self.sync_dir is not None  # update_weights checked
        t0 = time.perf_counter()
        if self._adapter_mode:
            written = await asyncio.to_thread(self._write_adapter, weights, version)
        else:
            written = await asyncio.to_thread(
                write_weights, weights, self.sync_dir, version, bucket_bytes=self.bucket_bytes
            )
        t_write = time.perf_counter() - t0
        targets = self._targets()
        results = await asyncio.gather(
            *(self._sync_one(r, written.path, version) for r in targets), return_exceptions=True
        )
        results = [x if isinstance(x, BaseException) else None for x in results]
        if any(x is None for x in results):  # adapters in use on vLLM replicas stay
            prune(self.sync_dir, keep=self._oldest_adapter(version))
        return targets, results, written.bytes, t_write

    def _write_adapter(self, weights, version: int):
        """The adapter as version ``version``: the buckets a transformers replica reads
        (:func:`write_weights`) and, in the same folder, the peft files vLLM's LoRA
        loader reads (``adapter_config.json``, ``adapter_model.safetensors``)."""
        from agent_spo.engines.weights import write_weights
        from agent_spo.lora import is_adapter, save_adapter

        assert self.sync_dir is not None and self.lora is not None  # adapter mode
        named = [(n, t.detach().cpu()) for n, t in weights]
        if not named or not all(is_adapter(n) for n, _ in named):
            raise EngineError("the replicas hold adapters: a sync must be the adapter alone")
        written = write_weights(named, self.sync_dir, version, bucket_bytes=self.bucket_bytes)
        # after the manifest: under the sync lock no replica reads it before the load
        save_adapter(written.path, named, self.lora, None)
        return written

    async def _sync_gloo(self, weights, version: int):
        """Pause every linked replica, stream the buckets to all of them at once (one
        pass over the weights), then collect each replica's answer and resume it. If the
        weights fail to come (or this is cancelled) part-way, every link is dropped (the
        replicas are out of step) and every replica resumed before the error goes on."""
        from agent_spo.engines.transfer import pack_buckets

        targets = self._targets()
        t = self.sync_timeout_s
        errors: dict[int, BaseException] = {}

        opened: set[int] = set()  # vLLM: updates started and not finished
        received: set[int] = set()  # vLLM: updates whose worker took every bucket

        async def pause(r: Replica) -> None:
            try:
                if r.kind == "vllm":  # vLLM's weight-transfer routes, our gloo backend
                    await r.client.control("POST", "/pause?mode=keep", None, timeout_s=t)
                    await r.client.control("POST", "/start_weight_update", None, timeout_s=t)
                    opened.add(r.index)
                else:
                    await r.client.control("POST", "/pause", {"timeout_s": t}, timeout_s=t)
            except EngineError as e:
                errors[r.index] = e

        def receive(r: Replica):
            body: dict[str, Any]
            if r.kind == "vllm":
                body = {"update_info": {"version": int(version)}}
            else:
                body = {"transport": "gloo", "version": int(version)}
            return r.client.control("POST", "/update_weights", body, timeout_s=t)

        async def answered(r: Replica) -> None:
            try:
                await answers[r.index]
            except EngineError:
                opened.discard(r.index)  # its worker failed the receive and finalised
                raise
            if r.kind == "vllm":
                received.add(r.index)
                await r.client.control("POST", "/finish_weight_update",
                                       {"weight_version": str(int(version))}, timeout_s=t)  # fmt: skip
                opened.discard(r.index)

        await asyncio.gather(*(pause(r) for r in targets))
        answers = {
            r.index: asyncio.create_task(receive(r)) for r in targets if r.index not in errors
        }

        def send_all() -> int:
            count = total = 0
            try:
                for entries, flat in pack_buckets(weights, self.bucket_bytes):
                    header = {"version": int(version), "tensors": entries}
                    count, total = count + len(entries), total + flat.numel()
                    self._post_all(targets, errors, header, flat)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the abort header
                # the weights failed between two buckets: say so on every link, so each
                # replica ends its update now instead of waiting out its timeout (a link
                # dropped here may close only when the last reference to it goes)
                why = f"{type(e).__name__}: {e}"[:500]
                self._post_all(targets, errors, {"version": int(version), "abort": why})
                raise
            end = {"version": int(version), "end": True, "count": count, "bytes": total}
            self._post_all(targets, errors, end)
            return total

        size = 0
        done = False
        try:
            if answers:
                size = await asyncio.to_thread(send_all)
            for r in targets:
                if r.index not in errors and r.index in answers:
                    try:
                        await answered(r)
                    except EngineError as e:
                        errors[r.index] = e
            done = True
        finally:
            for task in answers.values():
                task.cancel()
            broken = [r for r in targets if not done or r.index in errors]
            for r in broken:
                if r.link is not None:
                    r.link.close()  # out of step with the replica: a new one on rejoin
                    r.link = None
                if not done:  # it holds part of an update: out until a whole one comes
                    self._take_out(r, f"the update to v{version} broke off part-way")
            # an update to finish: its worker took the weights, or was never sent any (a
            # worker still receiving when the sync ended fails and finalises by itself)
            await asyncio.gather(*(
                self._unsynced(r, finish=r.index in opened
                               and (r.index in received or r.index not in answers))
                for r in broken if r.kind == "vllm"))  # fmt: skip
            await asyncio.gather(*(self._resume(r) for r in targets))
        return targets, [errors.get(r.index) for r in targets], size, 0.0

    def _post_all(self, targets, errors: dict, header: dict, flat=None) -> None:
        """Send one message to every replica still in step, all at once (runs in a thread)."""
        works = {}
        for r in targets:
            if r.index in errors or r.link is None:
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

    async def _unsynced(self, r: Replica, *, finish: bool) -> None:
        """A vLLM replica whose update broke part-way holds a mix of two versions. With
        ``finish``, end its update, still open (a sync cancelled or timed out after its
        worker took the weights, or before it was sent any, would leave its layers on the
        meta device and refuse every later start; finishing puts the old tensors back
        where none came). Never otherwise: a worker whose receive failed has finalised
        already, and vLLM's server does not survive a failing ``finish`` well. Then mark
        it -1 so it is not admitted until a whole update reaches it (a transformers
        replica marks itself)."""
        t = min(self.sync_timeout_s, 30.0)
        if finish:
            try:
                await r.client.control("POST", "/finish_weight_update", {}, timeout_s=t)
            except EngineError:
                pass
        try:
            await r.client.control("POST", "/update_weight_version", {"new_version": "-1"},
                                   timeout_s=t)  # fmt: skip
        except EngineError:
            pass  # unreachable: a restarted server starts from its own weights, at 0

    async def _resume(self, r: Replica) -> None:
        try:
            await r.client.control("POST", "/resume", {}, timeout_s=min(self.sync_timeout_s, 5.0))
        except EngineError:
            pass  # its pause lease ends by itself

    async def sleep(self) -> None:
        """Colocated training: every replica in rotation sleeps (frees its GPU memory,
        keeps its requests) until :meth:`wake`; no replica is admitted meanwhile. One
        that does not answer within ``sync_timeout_s`` leaves the rotation."""
        async with self._lock():
            self._asleep = True
            await self._each([r for r in self.replicas if r.live], self._sleep_one, "sleep")

    async def wake(self) -> None:
        async with self._lock():
            await self._each([r for r in self.replicas if r.live], self._wake_one, "wake")
            self._asleep = False

    async def _sleep_one(self, r: Replica) -> None:
        t = self.sync_timeout_s
        if r.kind == "vllm":
            await r.client.control("POST", "/sleep?level=1&mode=keep", None, timeout_s=t)
        else:
            await r.client.control("POST", "/sleep", {"timeout_s": t}, timeout_s=t)

    async def _wake_one(self, r: Replica) -> None:
        t = self.sync_timeout_s
        await r.client.control("POST", "/wake_up", {}, timeout_s=t)
        if r.kind == "vllm":  # its sleep paused the scheduler
            await r.client.control("POST", "/resume", {}, timeout_s=t)

    async def _each(self, replicas: list[Replica], step, what: str) -> None:
        results = await asyncio.gather(*(step(r) for r in replicas), return_exceptions=True)
        for r, res in zip(replicas, results, strict=True):
            if isinstance(res, BaseException):
                self._take_out(r, f"{what} failed: {res}")

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
            if r.link is not None:
                r.link.close()
                r.link = None
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
    def _pick(self, key: object | None, tried: set[int]) -> Replica:
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
        # its gloo link, if any, stays: a sync may be using it (a restart is found by the
        # server's instance id when the replica is admitted again)
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
                if r.kind == "vllm" and self._adapter_mode:  # vLLM's LoRA routes
                    await self._load_adapter(r, path, version)
                elif r.kind == "vllm":  # vLLM's own server: its routes, our worker extension
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
                await self._resume(r)

        try:
            await asyncio.wait_for(run(), self.sync_timeout_s)
        except TimeoutError:
            raise EngineError(
                f"no answer within sync_timeout_s = {self.sync_timeout_s:g} s"
            ) from None

    async def _load_adapter(self, r: Replica, path: Path, version: int) -> None:
        """Load version ``version``'s adapter into vLLM replica ``r`` as ``policy-vN-K``
        and send its requests there; requests in flight finish on the one they began
        with. An older adapter is unloaded once no request runs on it (vLLM would reload
        one a running request needs from its directory, which the pool prunes)."""
        c, t = r.client, self.sync_timeout_s
        self._adapter_names += 1  # a version loaded twice gets a new name (prefix cache),
        # and another pool's adapters on the same replica other names (the tag)
        name = f"policy-v{int(version)}-{self._adapter_tag}{self._adapter_names}"
        try:
            await c.control("POST", "/v1/load_lora_adapter",
                            {"lora_name": name, "lora_path": str(path)}, timeout_s=t, text=True)  # fmt: skip
        except HTTPEngineError as e:
            if e.status_code != 404:
                raise
            raise EngineError(  # not "no weight-update routes": _sync_one reads 404 so
                f"it could not load the adapter at {path} ({e.message}): rollout.sync_dir "
                "must be a folder every replica sees at the same path, and a vLLM replica "
                "needs runtime LoRA loading (`agent-spo engine serve --backend vllm "
                "--lora-rank ...` turns it on)"
            ) from None
        r.adapters[name] = 0
        c.model = name  # its requests and their version move together
        c.set_version(int(version))
        await c.control("POST", "/update_weight_version", {"new_version": str(int(version))},
                        timeout_s=t)  # fmt: skip
        for old in [n for n, held in r.adapters.items() if n != name and not held]:
            del r.adapters[old]
            try:
                await c.control("POST", "/v1/unload_lora_adapter", {"lora_name": old},
                                timeout_s=t, text=True)  # fmt: skip
            except EngineError as e:  # it stays loaded: vLLM evicts the least recent
                self._log(f"replica {r.index}: could not unload adapter {old}: {e}")

    def _oldest_adapter(self, version: int) -> int:
        """The oldest version whose adapter a request still runs on, or a replica in
        rotation serves (vLLM reads its directory again when it needs it back); else
        ``version`` (the one just written). A replica out of rotation pins nothing: it
        reloads when it rejoins."""
        held = [_adapter_version(n) for r in self.replicas for n, k in r.adapters.items()
                if k > 0 or (n == r.client.model and (r.live or r.stale))]  # fmt: skip
        return min([*held, version])

    async def _ask(self, r: Replica) -> dict[str, Any] | None:
        """The replica's state (``/weight_info``, ``/v1/models``), or None, with the
        reason in ``why_out``. A replica whose server restarted loses its gloo link."""
        t = self.probe_s + 5
        try:
            info = await r.client.control("GET", "/weight_info", timeout_s=t)
            models = await r.client.control("GET", "/v1/models", timeout_s=t)
            kind = "vllm" if models["data"][0].get("owned_by") == "vllm" else "agent-spo"
            held = info["weight_version"]
            instance = info.get("instance")
            if kind == "vllm":  # a fresh vLLM server holds no version: its start weights
                held = int(held) if str(held).lstrip("-").isdigit() else 0
                where = await r.client.control("POST", "/collective_rpc", {
                    "method": "agent_spo_platform"}, timeout_s=t)  # fmt: skip
                where = where["results"][0]
                # vLLM-CPU's engine core dies on concurrent seeded requests
                r.client.send_seed = not where["cpu"]
                instance = where["instance"]  # its worker process: a restart changes it
                rank = int(where.get("max_lora_rank") or 0)
                r.adapter = {"rank": rank} if rank else None
            else:
                r.adapter = info.get("adapter")
            held = int(held)
        except HTTPEngineError as e:
            if e.status_code == 404:  # e.g. vllm serve without its development routes
                r.why_out = (f"{e}; a replica needs the weight routes: start it with "
                             "`agent-spo engine serve` (--backend hf or vllm)")  # fmt: skip
            else:
                r.why_out = f"no answer: {e}"
            return None
        except (EngineError, KeyError, IndexError, TypeError, ValueError) as e:
            r.why_out = f"no answer: {e}"
            return None
        if r.link is not None and (instance is None or instance != r.instance):
            r.link.close()  # a new server process: its end of the link is gone
            r.link = None
        if instance is None or instance != r.instance:  # a new process holds no adapter
            if r.adapters:
                r.client.model = None  # the base model's name is read again
            r.adapters = {}
        r.kind, r.instance = kind, instance
        return {"held": held}

    async def _admit(self, r: Replica, *, connect: bool) -> None:
        """Bring a replica into rotation if it answers and holds (or can be given) the
        pool's weights; one that holds others and cannot be given them now is marked
        stale (the next sync brings it in). Gloo links are made here only if ``connect``
        (the probe makes them before it takes the lock)."""
        state = await self._ask(r)
        if state is None:
            self._take_out(r, r.why_out)
            return
        held = state["held"]
        if self._adapter_mode and not self._holds_adapter(r):
            from agent_spo.lora import cli_args

            self._take_out(r, "it holds no adapter like the learner's (learner.lora): start it "
                              f"with `agent-spo engine serve ... {' '.join(cli_args(self.lora))}`")  # fmt: skip
            return
        if not self._adapter_mode and r.kind != "vllm" and r.adapter is not None:
            self._take_out(r, "it holds LoRA adapters but the syncs send full weights (the "
                              "learner trains none, or the other replicas hold none): start "
                              "it without --lora-rank")  # fmt: skip
            return
        if r.kind == "vllm" and self._adapter_mode:
            serving = r.client.model if r.client.model in r.adapters else None
            if serving is None or _adapter_version(serving) != held:
                # not the adapter of the version it reports (a sync that ended between
                # the two, or a restart): the base model until the pool's adapter loads
                r.client.model = None
                held = -1 if self._version else held
        try:
            if r.kind == "vllm":
                # a trainer that died mid-sync may have left it paused (vLLM's pause has
                # no lease): resuming is harmless otherwise
                t = self.probe_s + 5
                await r.client.control("POST", "/resume", {}, timeout_s=t)
            await r.client.start()  # the model's name and context
        except (EngineError, KeyError, IndexError, TypeError) as e:
            self._take_out(r, f"no answer: {e}")
            return
        r.version = held
        r.client.set_version(held)
        if self._links and r.link is None:
            if not connect:
                self._take_out(r, "no gloo link yet")
                return
            try:
                r.link = await self._connect(r)
            except EngineError as e:
                self._take_out(r, f"no gloo link: {e}")
                return
        if held != self._version:
            from agent_spo.engines.weights import MANIFEST, version_dir

            written = None
            if not self._links and self.sync_dir is not None:  # written files to load
                written = version_dir(self.sync_dir, self._version)
                if not (written / MANIFEST).is_file():
                    written = None
            if written is None:  # nothing to load now: the next sync brings it in
                r.stale = True
                self._take_out(r, f"holds weights v{held}, the pool is at v{self._version}; "
                                  "it rejoins at the next sync")  # fmt: skip
                return
            try:
                await self._sync_one(r, written, self._version)
            except EngineError as e:
                self._take_out(r, f"could not load v{self._version}: {e}")
                return
        if not r.live:
            self._log(f"replica {r.index} ({r.url}) in rotation at v{r.version}")
        r.live, r.stale, r.why_out, r.probe_fails = True, False, "", 0

    async def _connect(self, r: Replica):
        """A new two-process gloo group with replica ``r``: the replica starts joining when
        asked (``/transfer/init`` answers at once), then this end joins within the
        timeout. A refusal starts no thread here."""
        from agent_spo.engines.transfer import GlooSender

        t = self.sync_timeout_s
        try:
            sender = GlooSender(self.advertise_host, timeout_s=t)
        except Exception as e:  # noqa: BLE001 - e.g. trainer_host is not this machine's
            raise EngineError(
                f"cannot listen on {self.advertise_host} (rollout.trainer_host): {e}"
            ) from e
        where = {"host": self.advertise_host, "port": sender.port, "timeout_s": t}
        joining = None
        try:
            if r.kind == "vllm":  # vLLM's init answers once both ends have joined
                joining = asyncio.create_task(r.client.control(
                    "POST", "/init_weight_transfer_engine", {"init_info": where}, timeout_s=t))  # fmt: skip
            else:
                await r.client.control("POST", "/transfer/init", where, timeout_s=t)
            connecting = asyncio.create_task(asyncio.to_thread(sender.connect))
            # its error is read below, or not at all when the other side failed first
            connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
            waiting = {connecting} if joining is None else {connecting, joining}
            # a refusal of vLLM's init (no such route, no backend) ends the wait at once
            done, _ = await asyncio.wait(waiting, timeout=t, return_when=asyncio.FIRST_EXCEPTION)
            for x in done:
                if (error := x.exception()) is not None:
                    raise error
            if connecting not in done:
                raise TimeoutError
            if joining is not None:
                await asyncio.wait_for(joining, t)
        except TimeoutError:
            sender.close()
            raise EngineError(f"the replica did not join within {t:g} s") from None
        except EngineError as e:
            sender.close()
            if getattr(e, "status_code", None) == 404:
                raise EngineError(
                    "it has no weight-transfer routes: start it with `agent-spo engine serve`"
                ) from None
            raise
        except Exception as e:  # noqa: BLE001 - gloo's rendezvous failed
            sender.close()
            raise EngineError(f"{type(e).__name__}: {e}") from e
        finally:
            if joining is not None and not joining.done():
                joining.cancel()
        return sender

    def _lock(self) -> asyncio.Lock:
        """Held by a sync and by a probe round's admissions: a replica is never admitted
        at a version a concurrent sync is replacing."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        return self._sync_lock

    def _ensure_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.probe_s)
            now = time.monotonic()
            down = [r for r in self.replicas if not r.live and now >= r.next_probe]
            if not down or self._asleep:  # colocated: none wakes while the learner steps
                continue
            # ask and link without the lock (a dead replica takes its connect timeout to
            # fail, and a sync must not wait on that); admit the ones that answered
            states = await asyncio.gather(*(self._ask(r) for r in down))
            back = [r for r, st in zip(down, states, strict=True) if st is not None]
            for r in down:
                if r not in back:
                    self._backoff(r)
            if self._links:
                for r in back:
                    if r.link is None:
                        try:
                            r.link = await self._connect(r)
                        except EngineError as e:
                            r.why_out = f"no gloo link: {e}"
                            self._backoff(r)
                back = [r for r in back if r.link is not None]
            if back:
                async with self._lock():
                    for r in back:
                        if not r.live:
                            await self._admit(r, connect=False)

    def _backoff(self, r: Replica) -> None:
        """A replica that keeps failing is asked less often: probe_s, 2x, 4x, ... 60 s."""
        r.probe_fails += 1
        r.next_probe = time.monotonic() + min(60.0, self.probe_s * 2 ** (r.probe_fails - 1))


def _adapter_version(name: str) -> int:
    """The version in an adapter's name, ``policy-v{N}-{tag}{K}``."""
    return int(name.split("-")[1][1:])


def status(pool: ReplicaPool) -> list[dict[str, Any]]:
    """One row per replica, for a status line or a test."""
    return [{"index": r.index, "url": r.url, "live": r.live, "version": r.version,
             "stale": r.stale, "outstanding": r.outstanding, "requests": r.requests,
             "drops": r.drops, "why_out": r.why_out} for r in pool.replicas]  # fmt: skip
