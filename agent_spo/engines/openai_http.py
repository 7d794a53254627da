"""An engine behind an OpenAI-compatible HTTP server, as ``vllm serve`` runs it (DESIGN §5).

``OpenAIHTTPEngine`` speaks vLLM's dialect of ``POST /v1/completions`` (checked against
vLLM 0.32's ``CompletionRequest`` / ``CompletionResponseChoice``): the prompt goes out as a
list of token ids and every sampling knob is sent explicitly (so the server's
``generation_config`` defaults never apply)::

    {"model", "prompt": [ids], "max_tokens", "temperature", "top_p", "top_k" (-1 = off),
     "min_p": 0, "repetition_penalty": 1, "presence_penalty": 0, "frequency_penalty": 0,
     "seed" (when set), "stop", "stop_token_ids", "include_stop_str_in_output": true,
     "skip_special_tokens": false, "spaces_between_special_tokens": false, "n": 1,
     "logprobs": 0, "return_tokens_as_token_ids": true, "return_token_ids": true}

and the sampled ids come back token-exactly: ``choices[0].token_ids`` (vLLM's
``return_token_ids``), else ``choices[0].logprobs.tokens`` as ``"token_id:<id>"`` strings
(``return_tokens_as_token_ids``); both, when present, must agree. ``logprobs: 0`` returns the
sampled token's log-prob in ``choices[0].logprobs.token_logprobs``. ``finish_reason`` is
``stop``/``length``; ``stop`` is vLLM's ``stop_reason`` (the stop string or stop token id),
or, on a ``stop`` without one (the end-of-sequence token), the last token id. vLLM keeps the
token that completed a stop string in ``token_ids`` and drops any sampled after it.

The log-probs must be the raw model's: start vLLM with the default
``--logprobs-mode raw_logprobs`` (not ``processed_logprobs``, which would fold in
temperature/top-k/top-p, nor the ``*_logits`` modes). ``agent_spo.engines.serve`` serves any
engine (e.g. the transformers one) in the same dialect.

Weights live in the server, so ``update_weights`` is not available here: sync the server by
its own means (restart it on the new checkpoint, or vLLM's weight-transfer endpoints, enabled
with ``VLLM_SERVER_DEV_MODE=1``: ``/pause``, ``/update_weights``, ``/resume``) and then tell
this engine with ``set_version(v)``; generations carry the version current when they were
requested.

Failures are infrastructure faults (:class:`~agent_spo.engines.base.EngineError`): a refused
connection, a timeout, a 5xx/429 or a malformed response is retried ``retries`` times with
exponential backoff; a 4xx (a prompt over the server's context, an unknown model) fails at
once with the server's message. A prompt that leaves no room under ``max_model_len`` is a
``ValueError`` before any request, as with the other engines.

A request that runs out of retries because no connection could be made (refused, or the
connect timed out) marks the server down; a read timeout or a broken reply does not (the
server is alive, only slow or failing, and other requests may still get through). Down: from then on requests fail at once ("unreachable"), except one single try
every ``down_probe_s``, and the first answer marks it up again. So when the server dies,
the requests in flight spend one round of retries and the rest of a rollout drains in
moments instead of each episode retrying its own way through the backoff.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from agent_spo.engines.base import EngineError, Generation, Sampling

if TYPE_CHECKING:
    import torch

_TOKEN_ID_PREFIX = "token_id:"


class HTTPEngineError(EngineError):
    """The server answered with an error status; ``status_code`` and its ``message``."""

    def __init__(self, text: str, *, status_code: int | None = None, message: str = "") -> None:
        super().__init__(text)
        self.status_code = status_code
        self.message = message


class _Retry(Exception):
    """A transient failure: worth another attempt."""


class OpenAIHTTPEngine:
    """Generate through an OpenAI-compatible ``/v1/completions`` server (vLLM dialect).

    ``base_url`` is the server's root, with or without ``/v1``. ``model`` is the served
    model's name (default: the first one ``GET /v1/models`` lists). ``max_model_len`` is
    read from ``/v1/models`` unless given (then prompts that leave no room are rejected
    locally and ``max_tokens`` is clamped to the room left, as the other engines do).
    ``token_versions`` asks an agent-spo replica for each token's policy version
    (``return_token_versions``); without it, a generation carries the version this
    client knew when it sent the request. ``timeout_s`` bounds each attempt; ``retries`` is how many times a transient failure
    is retried; ``down_probe_s`` is how often a server marked down (see the module
    docstring) is tried again. One pooled ``httpx.AsyncClient`` (``max_connections``)
    serves all concurrent requests of an event loop.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_model_len: int | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        down_probe_s: float = 5.0,
        max_connections: int = 512,
        version: int = 0,
        extra_body: dict[str, Any] | None = None,
        token_versions: bool = False,
    ) -> None:
        root = base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.base_url = root
        self.model = model
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.down_probe_s = float(down_probe_s)
        self.max_connections = int(max_connections)
        self.extra_body = dict(extra_body or {})
        self.token_versions = token_versions
        self.send_seed = True  # False: requests go without their seed (see ReplicaPool)
        self._headers = {"User-Agent": "agent-spo"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_model_len = max_model_len
        self._version = int(version)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._info_lock: asyncio.Lock | None = None
        self._closed = False
        self._down: str | None = None  # why the server is marked down (no answer), if it is
        self._down_since = 0.0  # time.monotonic() when it was marked down
        self._probe_at = 0.0  # time.monotonic() from which one request may try it again

    # ------------------------------------------------------------------ protocol
    @property
    def version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        """The policy version the server now holds (after the caller synced its weights)."""
        self._version = int(version)

    @property
    def max_model_len(self) -> int:
        """Given, or read from ``GET /v1/models`` (blocking, once; ``await start()`` avoids it)."""
        if self._max_model_len is None:
            self._apply_models(self._get_models_sync())
        assert self._max_model_len is not None  # _apply_models sets it or raises
        return self._max_model_len

    async def start(self) -> OpenAIHTTPEngine:
        """Resolve ``model`` and ``max_model_len`` from the server now (optional)."""
        await self._ensure_info()
        return self

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation:
        if self._closed:
            raise EngineError("the engine is closed")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        await self._ensure_info()
        assert self._max_model_len is not None  # _ensure_info sets it or raises
        room = self._max_model_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room under max_model_len "
                f"{self._max_model_len}"
            )
        version = self._version
        body = self._request_body(prompt, sampling, min(sampling.max_tokens, room))
        data = await self._call("POST", "/v1/completions", body, parse=_parse_completion)
        ids, logprobs, reason, stop, versions = data
        if versions is not None:  # the server says which weights sampled each token
            return Generation(ids, logprobs, reason, min(versions, default=version), stop,
                              versions if ids else None)  # fmt: skip
        return Generation(ids, logprobs, reason, version, stop)

    async def control(
        self, method: str, path: str, body: Any = None, *, timeout_s: float, text: bool = False
    ) -> Any:
        """One request to a control route (``/weight_info``, ``/pause``, ``/resume``,
        ``/update_weights``): a single attempt within ``timeout_s``, connection included;
        any failure is an :class:`EngineError`, a refusal an :class:`HTTPEngineError`."""
        url = self.base_url + path
        if self._closed:
            raise EngineError(f"{method} {url}: the engine is closed")
        try:
            resp = await self._http().request(
                method, url, json=body, timeout=httpx.Timeout(timeout_s)
            )
        except httpx.TimeoutException:
            raise EngineError(f"{method} {url}: no answer within {timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise EngineError(
                f"{method} {url} failed: {type(e).__name__}: {e or 'no detail'}"
            ) from e
        self._down = None  # it answered: requests may go to it again at once
        if text and resp.status_code == 200:  # a route that answers in plain text
            return resp.text
        try:
            return _check(resp, url, _json)
        except _Retry as e:
            raise EngineError(f"{method} {url} failed: {e}") from None

    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        raise NotImplementedError(
            "OpenAIHTTPEngine cannot load weights: they live in the server. Sync the server "
            "yourself (restart it on the new checkpoint, or use vLLM's weight-transfer "
            "endpoints under VLLM_SERVER_DEV_MODE=1), then call engine.set_version(version)."
        )

    async def close(self) -> None:
        self._closed = True
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            try:
                await client.aclose()
            except RuntimeError:  # made on another, now closed, event loop
                pass

    async def __aenter__(self) -> OpenAIHTTPEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ requests
    def _request_body(self, prompt: list[int], s: Sampling, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop": list(s.stop),
            "stop_token_ids": list(s.stop_token_ids),
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "n": 1,
            "stream": False,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        if s.seed is not None and self.send_seed:
            body["seed"] = s.seed
        if self.token_versions:
            body["return_token_versions"] = True
        body.update(self.extra_body)
        return body

    def _timeout(self) -> httpx.Timeout:
        # pool=None: requests beyond max_connections wait for a free connection.
        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s, pool=None)

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=self._timeout(),
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                ),
            )
            self._client_loop = loop
            self._info_lock = asyncio.Lock()
        return self._client

    async def _call(self, method: str, path: str, body: Any, *, parse):
        url = self.base_url + path
        attempts = self.retries + 1
        if self._down is not None:  # marked down: fail at once, but for a try now and then
            if time.monotonic() < self._probe_at:
                raise EngineError(f"{method} {url}: {self._unreachable()}")
            self._probe_at = time.monotonic() + self.down_probe_s
            attempts = 1
        reason, answered, unreachable = "", False, False
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff(attempt))
                if self._down is not None:  # another request ran out of retries meanwhile
                    raise EngineError(f"{method} {url}: {self._unreachable()}")
            if self._closed:
                raise EngineError(f"{method} {url}: the engine is closed")
            try:
                resp = await self._http().request(method, url, json=body)
            except httpx.TransportError as e:
                reason, answered = f"{type(e).__name__}: {e or 'no detail'}", False
                # no connection at all; a read timeout or a broken reply is a live but
                # slow or failing server, which must not fail everyone else's requests
                unreachable = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
                continue
            except httpx.HTTPError as e:  # e.g. a malformed URL: no point retrying
                raise EngineError(f"{method} {url} failed: {type(e).__name__}: {e}") from e
            self._down, answered = None, True
            try:
                return _check(resp, url, parse)
            except _Retry as e:
                reason = str(e)
        if not answered and unreachable and self._down is None:
            now = time.monotonic()
            self._down, self._down_since, self._probe_at = reason, now, now + self.down_probe_s
        raise EngineError(f"{method} {url} failed after {attempts} attempt(s): {reason}")

    def _unreachable(self) -> str:
        ago = time.monotonic() - self._down_since
        return f"the server is unreachable ({self._down}; no answer for {ago:.0f} s)"

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    # ------------------------------------------------------------------ /v1/models
    async def _ensure_info(self) -> None:
        if self.model is not None and self._max_model_len is not None:
            return
        self._http()
        assert self._info_lock is not None  # created with the client by _http()
        async with self._info_lock:
            if self.model is None or self._max_model_len is None:
                self._apply_models(await self._call("GET", "/v1/models", None, parse=_json))

    def _get_models_sync(self) -> Any:
        url = self.base_url + "/v1/models"
        reason = ""
        with httpx.Client(headers=self._headers, timeout=self._timeout()) as client:
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(self._backoff(attempt))
                try:
                    return _check(client.get(url), url, _json)
                except _Retry as e:
                    reason = str(e)
                except httpx.TransportError as e:
                    reason = f"{type(e).__name__}: {e or 'no detail'}"
        raise EngineError(f"GET {url} failed after {self.retries + 1} attempt(s): {reason}")

    def _apply_models(self, data: Any) -> None:
        url = self.base_url + "/v1/models"
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) for c in cards):
            raise EngineError(f"GET {url}: no models listed in {str(data)[:200]!r}")
        if self.model is None:
            card = cards[0]
        else:
            card = next((c for c in cards if c.get("id") == self.model), None)
            if card is None:
                names = [c.get("id") for c in cards]
                raise EngineError(f"GET {url}: model {self.model!r} is not served (only {names})")
        if self.model is None:
            self.model = str(card.get("id"))
        if self._max_model_len is None:
            n = card.get("max_model_len")
            if not isinstance(n, int) or isinstance(n, bool) or n < 2:
                raise EngineError(
                    f"GET {url}: the server reports no max_model_len for {self.model!r}; "
                    "pass max_model_len= to OpenAIHTTPEngine"
                )
            self._max_model_len = n


# ---------------------------------------------------------------------- parsing
def _check(resp: httpx.Response, url: str, parse):
    """Parse a 2xx body, or sort the failure into retryable and final."""
    code = resp.status_code
    if code >= 500 or code in (408, 429):
        raise _Retry(f"HTTP {code}: {_server_message(resp)}")
    if code >= 400:
        msg = _server_message(resp)
        raise HTTPEngineError(
            f"{resp.request.method} {url} was rejected (HTTP {code}): {msg}",
            status_code=code,
            message=msg,
        )
    if code != 200:
        raise _Retry(f"unexpected HTTP {code}")
    try:
        data = resp.json()
    except ValueError:
        raise _Retry(f"malformed response (not JSON): {resp.text[:200]!r}") from None
    try:
        return parse(data)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _Retry(f"malformed response ({e}): {resp.text[:300]!r}") from None


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "error"):
                if isinstance(err.get(key), str):
                    return err[key]
        elif isinstance(err, str):
            return err
        if isinstance(data.get("detail"), str):
            return data["detail"]
    return str(data)[:500]


def _json(data: Any) -> Any:
    return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_completion(data: Any):
    choice = data["choices"][0]
    reason = choice["finish_reason"]
    if reason not in ("stop", "length"):
        raise ValueError(f"finish_reason {reason!r}")  # e.g. 'abort': try again
    lp = choice["logprobs"]
    if not isinstance(lp, dict):
        raise ValueError("no logprobs")
    values = lp["token_logprobs"]
    tokens = lp.get("tokens")
    ids = choice.get("token_ids")
    from_tokens = None
    if isinstance(tokens, list) and all(
        isinstance(t, str) and t.startswith(_TOKEN_ID_PREFIX) for t in tokens
    ):
        from_tokens = [int(t[len(_TOKEN_ID_PREFIX) :]) for t in tokens]
    if ids is None:
        if from_tokens is None:
            raise ValueError("neither token_ids nor 'token_id:<id>' tokens")
        ids = from_tokens
    if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError("token_ids is not a list of ids")
    if from_tokens is not None and from_tokens != ids:
        raise ValueError("token_ids and logprobs.tokens disagree")
    if not isinstance(values, list) or len(values) != len(ids):
        raise ValueError(f"{len(ids)} tokens but {values!r:.80} log-probs")
    logprobs = []
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v) or v > 1e-3:
            raise ValueError(f"log-prob {v!r}")
        logprobs.append(float(v))
    stop = choice.get("stop_reason")
    if reason == "length":
        stop = None
    elif stop is None and ids:
        stop = ids[-1]  # vLLM reports no stop_reason for the end-of-sequence token
    elif stop is not None and not isinstance(stop, str) and not _is_int(stop):
        raise ValueError(f"stop_reason {stop!r}")
    versions = choice.get("token_versions")
    if versions is not None:
        if not isinstance(versions, list) or len(versions) != len(ids):
            raise ValueError(f"{len(ids)} tokens but token_versions {versions!r:.80}")
        if not all(_is_int(v) and v >= 0 for v in versions):
            raise ValueError(f"token_versions {versions!r:.80}")
        versions = tuple(versions)
    return tuple(ids), tuple(logprobs), reason, stop, versions
