"""transformers engine: continuous batching over a KV cache, in this process (DESIGN §5).

The light default for tiny models on CPU. Concurrent ``generate`` calls are batched:
between decode steps, waiting requests are prefilled and merged into the running batch
(their caches left-padded to a common length), and finished rows leave it, so a long
generation never holds up a short one. Each decode step runs in a worker thread, so the
event loop keeps serving sandbox calls while the model computes.

Most prompts open with the same tokens (system prompt, tool schema, chat markers). The
engine keeps the keys and values of that shared opening for the current weights and
prefills only the rest of each prompt: the opening is found by matching prompts against
each other (longest common prefix, at least ``min_prefix`` tokens) and recomputed once
after each weight update. Rows then hold ``[opening | padding | rest]``; positions come
from the attention mask, so the padding in the middle changes nothing.

Log-probs are the raw model's (``log_softmax`` of the logits in float32), which is what
the learner recomputes; temperature, top-k and top-p only shape the sampling.

Weight updates land between decode steps. A row that is mid-generation continues on the
new weights over a KV cache the old weights computed. Its generation records the version
whose weights computed each token's logits (``Generation.versions``), and its
``policy_version`` is the oldest of them, so staleness is never understated. Its recorded
log-probs are the ones it was actually sampled with, which is what the PPO ratio needs.
``pause()`` stops decoding between two steps, keeping every request and its cache, until
``resume()``; a weight update may land meanwhile. The engine runs on CPU or on a CUDA device (``device=``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import torch

from agent_spo.engines.base import EngineError, FinishReason, Generation, Sampling, find_stop

if TYPE_CHECKING:
    from transformers import DynamicCache


class _KVLayer(Protocol):
    """One attention layer of a DynamicCache: keys and values, [B, heads, T, dim]."""

    keys: torch.Tensor
    values: torch.Tensor


def _kv_layers(cache: DynamicCache) -> list[_KVLayer]:
    # transformers types a layer's tensors as Optional (None before the first update) and
    # allows linear-attention layers without them; every layer here is a filled KV layer
    return cast("list[_KVLayer]", cache.layers)


@dataclass
class _Request:
    prompt: list[int]
    sampling: Sampling
    future: asyncio.Future
    version: int
    max_new: int
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the weights behind each token's logits
    logits_version: int = 0  # the weights that computed the row's next-token logits
    stop_ids: frozenset[int] = frozenset()
    window: int = 0  # tokens to decode when looking for stop strings


class HFEngine:
    """A Hugging Face causal LM served to many concurrent episodes."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 64,
        max_model_len: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        prefix_cache: bool = True,
        min_prefix: int = 32,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch = max_batch
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_model_len = min(max_model_len or limit, limit)
        self._version = 0
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        eos = tokenizer.eos_token_id
        cfg_eos = model.config.eos_token_id
        self._eos = {eos} if eos is not None else set()
        self._eos |= set(
            cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else []
        )
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._weights_lock: asyncio.Lock | None = None
        self._running: asyncio.Event | None = None  # cleared while paused
        self._paused = False
        self._asleep = False  # colocated: weights and caches moved off the GPU
        self._batch: _Batch | None = None  # the running rows (for sleep to move)
        self._closed = False
        # Rows hold [opening | padding | rest]: right for full attention only (a sliding
        # window or a recurrent layer would see the padding as positions).
        layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
        full = all(t == "full_attention" for t in layer_types)
        self._prefix = _SharedPrefix(min_prefix) if prefix_cache and full else None
        self.last_update_s = 0.0
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "max_rows": 0, "prefix_tokens": 0,
                      "sleeps": 0}  # fmt: skip

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: str = "float32", lora=None, **kwargs
    ) -> HFEngine:
        """The model at ``path``; with ``lora`` (the learner.lora section) it also holds
        LoRA layers like the learner's, starting at zero, so updates carry the adapter
        alone (:attr:`loads_adapters`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        if lora is not None:
            from agent_spo import lora as adapters

            adapters.inject(model, lora)
        return cls(model, tok, **kwargs)

    @property
    def loads_adapters(self) -> bool:
        """Whether the model holds LoRA layers, so an update may be the adapter alone
        (names as peft saves them; see :mod:`agent_spo.lora`)."""
        from agent_spo import lora

        return lora.loads_adapters(self.model)

    # ------------------------------------------------------------------ protocol
    @property
    def version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation:
        if self._closed:
            raise EngineError("the engine is closed")
        if self._version < 0:
            raise EngineError(
                "the engine's weights are mixed after an update failed part-way; "
                "it generates again once a whole update has loaded"
            )
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        room = self._max_model_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room under max_model_len "
                f"{self._max_model_len}"
            )
        self._ensure_loop()
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        # a byte-level token holds at least one byte of text
        longest = max((len(s.encode()) for s in sampling.stop), default=0)
        req = _Request(
            prompt=prompt,
            sampling=sampling,
            future=asyncio.get_running_loop().create_future(),
            version=self._version,
            max_new=min(sampling.max_tokens, room),
            generator=gen,
            stop_ids=frozenset(sampling.stop_token_ids) | frozenset(self._eos),
            window=longest + 4 if longest else 0,
        )
        self._waiting.append(req)
        assert self._wake is not None  # made by _ensure_loop()
        self._wake.set()
        return await req.future

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Copy new weights in between decode steps; in-flight rows continue on them.

        Every name and shape is checked before anything is copied, so a bad update
        leaves the old weights intact. Weights that state their shapes up front (a
        ``shapes`` mapping, as :class:`~agent_spo.engines.weights.WeightsOnDisk` does) are
        checked from it and then copied as they stream in, never all held at once.
        Weights marked ``streaming`` (an update arriving over a link, whose names are not
        known up front) are checked and copied one by one; if one is refused part-way,
        the model holds a mix, so the engine refuses to generate (version -1) until a
        whole update lands.
        """
        if self._closed:
            raise EngineError("the engine is closed")
        self._ensure_loop()
        targets = self.model.state_dict(keep_vars=True)  # tied names included
        if self.loads_adapters:  # adapter updates name the adapter's weights as peft does
            from agent_spo import lora

            targets.update({lora.adapter_name(n): t for n, t in targets.items()
                            if lora.is_adapter(n)})  # fmt: skip

        def target_of(name: str, shape) -> torch.Tensor:
            target = targets.get(name)
            if target is None:
                raise KeyError(f"the engine's model has no weight named {name!r}")
            if tuple(shape) != tuple(target.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(shape)}, "
                    f"the engine's model expects {tuple(target.shape)}"
                )
            return target

        shapes = getattr(weights, "shapes", None)
        streaming = bool(getattr(weights, "streaming", False))
        if streaming:
            staged: Iterable[tuple[torch.Tensor, torch.Tensor]] = (
                (target_of(n, t.shape), t) for n, t in weights
            )
        elif shapes is not None:
            for name, shape in shapes.items():
                target_of(name, shape)
            staged = ((target_of(n, t.shape), t) for n, t in weights)
        else:
            staged = [(target_of(n, t.shape), t) for n, t in weights]
        assert self._weights_lock is not None  # made by _ensure_loop()
        async with self._weights_lock:
            t0 = time.perf_counter()

            def copy() -> None:
                with torch.no_grad():
                    for target, tensor in staged:
                        target.copy_(tensor.to(target.device, target.dtype))

            try:
                await asyncio.to_thread(copy)
            except BaseException:
                if streaming or shapes is not None:  # some weights may be copied already
                    self._version = -1
                    if self._prefix is not None:
                        self._prefix.invalidate()
                raise
            self._version = int(version)
            if self._prefix is not None:  # even under a reused version number
                self._prefix.invalidate()
            self.last_update_s = time.perf_counter() - t0

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop decoding after the step in progress; requests and their caches are kept
        (and new ones queue) until :meth:`resume`."""
        if self._closed:
            raise EngineError("the engine is closed")
        self._ensure_loop()
        assert self._running is not None and self._weights_lock is not None  # _ensure_loop
        self._paused = True
        self._running.clear()
        async with self._weights_lock:  # the step in progress, if any, has ended
            pass

    async def resume(self) -> None:
        self._paused = False
        if self._running is not None:
            self._running.set()

    @property
    def asleep(self) -> bool:
        return self._asleep

    async def sleep(self) -> None:
        """Pause, and on a GPU move the weights and every cache to CPU memory, freeing the
        device for a learner that shares it (colocated training). Requests in flight are
        kept; :meth:`wake` brings everything back and resumes."""
        await self.pause()
        assert self._weights_lock is not None  # made by pause()
        async with self._weights_lock:
            if not self._asleep and self.device.type != "cpu":
                await asyncio.to_thread(self._move_to, torch.device("cpu"))
                torch.cuda.empty_cache()
            self._asleep = True
            self.stats["sleeps"] += 1

    async def wake(self) -> None:
        if self._asleep:
            assert self._weights_lock is not None  # made by sleep()
            async with self._weights_lock:
                if self.device.type != "cpu":
                    await asyncio.to_thread(self._move_to, self.device)
                self._asleep = False
        await self.resume()

    def _move_to(self, device: torch.device) -> None:
        self.model.to(device)
        batch = self._batch
        if batch is not None and batch.cache is not None:
            for layer in _kv_layers(batch.cache):
                layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
        if self._prefix is not None:
            self._prefix.invalidate()  # recomputed on the device when next needed

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - _loop already
                # handed its failure to every waiting request as an EngineError
                pass
            self._task = None
        for r in self._waiting:
            if not r.future.done():
                r.future.set_exception(EngineError("the engine was closed"))
        self._waiting.clear()

    async def __aenter__(self) -> HFEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ the batch loop
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._weights_lock = asyncio.Lock()
            self._running = asyncio.Event()
            if not self._paused:
                self._running.set()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        batch = self._batch = _Batch(self)
        admit: list[_Request] = []
        # made by _ensure_loop() before it starts this task, and not replaced while it runs
        assert self._wake is not None and self._weights_lock is not None
        assert self._running is not None
        try:
            while True:
                if not batch.rows and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                await self._running.wait()  # paused: hold every row where it is
                async with self._weights_lock:
                    if self._version < 0:  # an update failed part-way: no row may go on
                        err = EngineError("the engine's weights are mixed after an update "
                                          "failed part-way")  # fmt: skip
                        for r in batch.rows + self._waiting:
                            if not r.future.done():
                                r.future.set_exception(err)
                        batch, self._waiting = _Batch(self), []
                        self._batch = batch
                        continue
                    admit = []
                    while self._waiting and len(batch.rows) + len(admit) < self.max_batch:
                        r = self._waiting.pop(0)
                        if not r.future.done():  # skip requests whose caller gave up
                            r.version = self._version  # the weights that will sample it
                            admit.append(r)
                    finished = await asyncio.to_thread(batch.step, admit)
                for r, gen in finished:
                    if not r.future.done():
                        r.future.set_result(gen)
                await asyncio.sleep(0)  # let callers queue their next turns
        except asyncio.CancelledError:  # close(): nobody may wait forever
            err = EngineError("the engine was closed")
            for r in batch.rows + admit + self._waiting:
                if not r.future.done():
                    r.future.set_exception(err)
            raise
        except Exception as e:  # an engine failure is an infrastructure fault
            err = EngineError(f"transformers engine failed: {type(e).__name__}: {e}")
            for r in batch.rows + admit + self._waiting:
                if not r.future.done():
                    r.future.set_exception(err)
            self._waiting.clear()
            raise


class _Batch:
    """The running rows and their left-padded KV cache; runs in a worker thread."""

    def __init__(self, engine: HFEngine) -> None:
        self.e = engine
        self.rows: list[_Request] = []
        # all three are set while there are rows, None when there are none
        self.cache: DynamicCache | None = None  # [B, heads, T, dim] per layer
        self.mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self.next_logits: torch.Tensor | None = None  # [B, V] for the next token

    @torch.no_grad()
    def step(self, admit: list[_Request]) -> list[tuple[_Request, Generation]]:
        live = [i for i, r in enumerate(self.rows) if not r.future.done()]
        if len(live) < len(self.rows):  # callers that gave up (cancelled) free their rows
            assert self.next_logits is not None  # there are rows
            self.next_logits = self.next_logits[live] if live else None
            self._select(live)
        if admit:
            self._prefill(admit)
        if not self.rows:
            return []
        assert self.next_logits is not None  # there are rows
        tokens, logps = self._sample(self.next_logits)
        finished: list[tuple[_Request, Generation]] = []
        keep: list[int] = []
        for i, r in enumerate(self.rows):
            tok = int(tokens[i])
            r.out.append(tok)
            r.logprobs.append(float(logps[i]))
            r.versions.append(r.logits_version)
            done = self._finish(r, tok)
            if done is None:
                keep.append(i)
            else:
                finished.append((r, done))
        self.e.stats["tokens"] += len(self.rows)
        self.e.stats["steps"] += 1
        if len(keep) < len(self.rows):
            self._select(keep)
            tokens = tokens[keep]
        if self.rows:
            self._decode(tokens)
        return finished

    def _finish(self, r: _Request, tok: int) -> Generation | None:
        reason: FinishReason | None = None
        stop: int | str | None = None
        if tok in r.stop_ids:
            reason, stop = "stop", tok
        elif r.window:
            tail = self.e.tokenizer.decode(r.out[-r.window :], skip_special_tokens=False)
            hit = find_stop(tail, r.sampling.stop)
            if hit is not None:
                reason, stop = "stop", hit
        if reason is None and len(r.out) >= r.max_new:
            reason = "length"
        if reason is None:
            return None
        return Generation(
            tuple(r.out), tuple(r.logprobs), reason, min(r.versions), stop, tuple(r.versions)
        )

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()  # [B, V]
        logp = torch.log_softmax(logits, dim=-1)
        out = torch.empty(len(self.rows), dtype=torch.long)
        for i, r in enumerate(self.rows):
            s = r.sampling
            if s.temperature == 0:
                out[i] = int(torch.argmax(logits[i]))
                continue
            z = logits[i] / s.temperature
            if s.top_k > 0 and s.top_k < z.numel():
                kth = torch.topk(z, s.top_k).values[-1]
                z = z.masked_fill(z < kth, float("-inf"))
            probs = torch.softmax(z, dim=-1)
            if s.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                drop = torch.cumsum(sp, 0) - sp > s.top_p
                sp = sp.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            g = r.generator or self.e._generator
            out[i] = int(torch.multinomial(probs, 1, generator=g))
        return out, logp.gather(1, out[:, None]).squeeze(1)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache):
        from transformers import DynamicCache

        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        cache = cache if cache is not None else DynamicCache()
        out = self.e.model(
            input_ids=ids.to(self.e.device),
            attention_mask=mask.to(self.e.device),
            position_ids=pos.to(self.e.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the next token's logits: a prefill of P tokens would
        )  # otherwise build [B, P, vocabulary] logits (10 GB for 64 x 512 x 151,936 in bf16)
        return out.logits[:, -1, :].float().cpu(), out.past_key_values

    def _prefill(self, admit: list[_Request]) -> None:
        shared = self.e._prefix
        n = shared.observe([r.prompt for r in admit]) if shared is not None else 0
        use: list[_Request] = []
        rest: list[_Request] = []
        for r in admit:
            cached = shared is not None and n and len(r.prompt) > n and shared.matches(r.prompt)
            (use if cached else rest).append(r)
        for group, after_prefix in ((use, True), (rest, False)):
            if not group:
                continue
            if after_prefix:
                assert shared is not None  # only prompts that match it are in `use`
                ids, mask, cache = self._after_prefix(group, shared)
            else:
                (ids, mask), cache = self._left_padded(group), None
            logits, cache = self._forward(ids, mask, cache)
            for r in group:
                r.logits_version = self.e._version
            self.e.stats["prefills"] += 1
            if self.rows:
                self._merge(group, cache, mask, logits)
            else:
                self.rows, self.cache = list(group), cache
                self.mask, self.next_logits = mask, logits
        self.e.stats["max_rows"] = max(self.e.stats["max_rows"], len(self.rows))

    def _left_padded(self, rows: list[_Request]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), n), self.e._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, n - len(r.prompt) :] = 1
        return ids, mask

    def _after_prefix(self, rows: list[_Request], shared: _SharedPrefix):
        """Inputs for the prompts' tails over the shared opening's cached keys and values."""
        from transformers import DynamicCache

        kv = shared.keys_values(self.e.model, self.e._version, self.e.device)
        p = len(shared.ids)
        tails = [r.prompt[p:] for r in rows]
        width = max(len(t) for t in tails)
        ids = torch.full((len(rows), width), self.e._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), p + width), dtype=torch.long)
        mask[:, :p] = 1
        for i, t in enumerate(tails):
            ids[i, width - len(t) :] = torch.tensor(t)
            mask[i, p + width - len(t) :] = 1
        cache = DynamicCache()
        for li, (k, v) in enumerate(kv):
            size = (len(rows), *k.shape[1:])
            cache.update(k.expand(size).contiguous(), v.expand(size).contiguous(), li)
        self.e.stats["prefix_tokens"] += p * len(rows)
        return ids, mask, cache

    def _merge(self, admit, cache, mask, logits) -> None:
        from transformers import DynamicCache

        # merged into existing rows only
        assert self.cache is not None and self.mask is not None and self.next_logits is not None
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        t = max(t_old, t_new)

        def lpad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
            if x.shape[dim] == length:
                return x
            shape = list(x.shape)
            shape[dim] = length - x.shape[dim]
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        merged = DynamicCache()
        for li, (a, b) in enumerate(zip(_kv_layers(self.cache), cache.layers, strict=True)):
            k = torch.cat([lpad(a.keys, t, 2), lpad(b.keys, t, 2)], dim=0)
            v = torch.cat([lpad(a.values, t, 2), lpad(b.values, t, 2)], dim=0)
            merged.update(k, v, li)
        self.cache = merged
        self.mask = torch.cat([lpad(self.mask, t, 1), lpad(mask, t, 1)], dim=0)
        self.next_logits = torch.cat([self.next_logits, logits], dim=0)
        self.rows.extend(admit)

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_logits = None
            return
        assert self.cache is not None and self.mask is not None  # rows are kept
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx.to(self.e.device))
        self.mask = self.mask[idx]
        # drop columns that are padding in every remaining row
        first = int((self.mask.cumsum(1) > 0).float().argmax(1).min()) if self.mask.numel() else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in _kv_layers(self.cache):
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

    def _decode(self, tokens: torch.Tensor) -> None:
        assert self.mask is not None  # there are rows
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], 1)
        self.next_logits, self.cache = self._forward(tokens[:, None], self.mask, self.cache)
        for r in self.rows:
            r.logits_version = self.e._version


class _SharedPrefix:
    """The opening tokens prompts share, and their keys/values under the current weights.

    The candidate starts as the first prompt seen and shrinks to its longest common prefix
    with each later prompt, as long as at least ``min_len`` tokens stay shared; a prompt
    that shares fewer is prefilled in full. A candidate no prompt has matched yet is
    replaced by the next prompt, so one odd first prompt cannot pin it.
    """

    def __init__(self, min_len: int) -> None:
        self.min_len = max(1, min_len)
        self.ids: list[int] = []
        self.hits = 0
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._version = -1

    def observe(self, prompts: list[list[int]]) -> int:
        """Update the candidate with these prompts; the usable shared length (0 = none)."""
        for prompt in prompts:
            room = len(prompt) - 1  # the last prompt token is prefilled for its logits
            if not self.ids:
                self.ids = prompt[:room]
                continue
            n = 0
            limit = min(len(self.ids), room)
            while n < limit and self.ids[n] == prompt[n]:
                n += 1
            if n == len(self.ids):
                self.hits += 1
            elif n >= self.min_len:
                self._shrink(n)
                self.hits += 1
            elif self.hits == 0:
                self.ids, self._kv = prompt[:room], None
        return len(self.ids) if self.hits and len(self.ids) >= self.min_len else 0

    def invalidate(self) -> None:
        """New weights arrived: the cached keys/values are recomputed on next use."""
        self._kv = None

    def matches(self, prompt: list[int]) -> bool:
        return prompt[: len(self.ids)] == self.ids

    def _shrink(self, n: int) -> None:
        self.ids = self.ids[:n]
        if self._kv is not None:
            self._kv = [(k[:, :, :n], v[:, :, :n]) for k, v in self._kv]

    def keys_values(self, model, version: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._kv is None or self._version != version:
            ids = torch.tensor([self.ids], device=device)
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # keys, values only
            self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            self._version = version
        return self._kv
