"""Serve any :class:`~agent_spo.engines.base.Engine` over HTTP in vLLM's OpenAI dialect.

A small OpenAI-compatible server (stdlib + asyncio only) that answers the requests
:class:`~agent_spo.engines.openai_http.OpenAIHTTPEngine` sends, the way ``vllm serve`` does,
so a transformers engine on one machine can feed trainers on others, and the HTTP client is
tested against a real server:

* ``POST /v1/completions``: one choice (``n == 1``, no streaming); the prompt is a list of
  token ids (or one such list, or a string when the server has a tokenizer). Understood
  fields: ``model``, ``prompt``, ``max_tokens`` (default 16), ``temperature``, ``top_p``,
  ``top_k`` (0 or -1 = off), ``seed``, ``stop``, ``stop_token_ids``, ``logprobs``,
  ``return_tokens_as_token_ids``, ``return_token_ids``, ``include_stop_str_in_output``,
  ``skip_special_tokens``; neutral values of ``min_p``, ``repetition_penalty``,
  ``presence_penalty``, ``frequency_penalty``, ``ignore_eos``, ``min_tokens``, ``echo`` are
  accepted, anything else of theirs is a 400. Other unknown fields are ignored (as vLLM does).
  The response carries ``choices[0].logprobs.{tokens, token_logprobs, top_logprobs,
  text_offset}`` (``tokens`` as ``"token_id:<id>"`` with ``return_tokens_as_token_ids``;
  ``top_logprobs`` holds only the sampled token, whatever ``logprobs`` asks for),
  ``finish_reason`` (``stop``/``length``), ``stop_reason`` (the stop string or token id;
  unlike vLLM also the end-of-sequence id), and with ``return_token_ids`` the ``token_ids``
  and ``prompt_token_ids``. Log-probs are the engine's, i.e. the raw model's.
* ``GET /v1/models``: the served model with its ``max_model_len``.
* ``GET /health``: 200 while serving. ``GET /weight_info``:
  ``{"weight_version": "<v>", "paused": bool, "asleep": bool, "instance": "<id>",
  "adapter": null | {"rank", "alpha", "targets"}}`` (``adapter``: the LoRA layers the
  engine holds, so weight updates may be the adapter alone, under peft's names).

The routes a fleet of replicas needs (:mod:`agent_spo.engines.pool` drives them):

* ``POST /pause`` ``{"timeout_s": 300}``: decoding stops after the step in progress; every
  request and its cache is kept, new ones queue. The pause is a lease: it ends by itself
  after ``timeout_s``, so a trainer that dies mid-update cannot leave a replica paused.
* ``POST /resume``: decoding continues.
* ``POST /sleep`` ``{"timeout_s": 300}`` / ``POST /wake_up``: colocated training. The
  engine pauses and, on a GPU, moves its weights and caches to CPU memory; requests in
  flight are kept. The sleep is a lease like the pause.
* ``POST /update_weights`` ``{"path": DIR, "version": v}``: load the weights written at
  ``DIR`` by :func:`~agent_spo.engines.weights.write_weights` (checked against the model
  from its manifest before the first copy; a mismatch is a 400 and changes nothing);
  generations from then on carry version ``v``.
* ``POST /transfer/init`` ``{"host", "port", "timeout_s"}``: join the trainer's two-process
  gloo group (:mod:`agent_spo.engines.transfer`), replacing any earlier link; answers once
  joined. ``POST /update_weights`` ``{"transport": "gloo", "version": v}`` then receives
  an update over it, bucket by bucket, and answers once it has loaded. A failure part-way
  drops the link (the trainer makes a new one) and leaves the engine refusing to
  generate until a whole update lands (``weight_version`` -1).
* ``"return_token_versions": true`` in a completion request adds
  ``choices[0].token_versions``: the policy version of each generated token (a weight
  update can land mid-generation).

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: bad JSON,
bad fields, an out-of-vocabulary id or a prompt that leaves no room under ``max_model_len``
are 400, an unknown model 404, a missing/wrong ``Authorization: Bearer`` key (when the
server has one) 401, an engine failure 500.

Every connection is served by its own task on one event loop, which also runs the engine,
so concurrent requests reach ``engine.generate`` together and the engine batches them.

Run it: ``python -m agent_spo.engines.serve MODEL_DIR --port 8000`` (a transformers engine),
or in-process on a background thread: ``with serve_in_thread(engine) as srv: srv.url``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from agent_spo.engines.base import Engine, EngineError, Generation, Sampling

_MAX_BODY = 64 * 1024 * 1024
_MAX_HEADERS = 100
_IDLE_S = 300.0  # a keep-alive connection idle this long is closed


class _BadRequest(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        405: "MethodNotAllowedError",
        413: "BadRequestError",
    }.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise _BadRequest("request body must be a JSON object")
    return req


class CompletionServer:
    """An OpenAI-compatible (vLLM dialect) HTTP server in front of one engine.

    ``tokenizer`` (optional; defaults to ``engine.tokenizer`` when the engine has one) is
    only used for the response's ``text``, non-id ``tokens`` and string prompts; without
    one, ``text`` is empty and tokens are always ``"token_id:<id>"``. ``vocab_size``
    (defaults to the engine model's config) rejects out-of-range prompt ids with a 400
    instead of crashing the engine's batch.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        model_name: str = "agent-spo",
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        tokenizer: Any = None,
        vocab_size: int | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.host = host
        self.port = port
        self.api_key = api_key
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        if vocab_size is None:
            config = getattr(getattr(engine, "model", None), "config", None)
            vocab_size = getattr(config, "vocab_size", None)
        self.vocab_size = vocab_size
        self.requests = 0  # completions served (any status)
        self.lease_expired = 0  # pauses that ended by themselves
        self._lease: asyncio.TimerHandle | None = None
        self._link: Any = None  # the gloo link to a trainer: a future, once one asked
        self.instance = uuid.uuid4().hex  # tells a trainer this server was restarted
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting; with ``port=0`` the chosen port is in ``self.port``."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None  # start() bound it
        await self._server.serve_forever()

    async def stop(self) -> None:
        self._drop_link()
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ HTTP/1.1
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each connection's handler as a task
        self._conns.add(task)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), _IDLE_S)
                except (TimeoutError, ConnectionError, ValueError):
                    return
                if not line:
                    return
                if line in (b"\r\n", b"\n"):  # tolerate a stray CRLF between requests
                    continue
                keep_alive = await self._one_request(line, reader, writer)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return  # a dropped connection, or a line over the stream's limit
        except asyncio.CancelledError:
            raise
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _one_request(self, line: bytes, reader, writer) -> bool:
        try:
            method, target, version = line.decode("latin-1").strip().split(" ", 2)
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
        except ValueError:
            await self._send(writer, 400, _error_body("malformed request line", 400), False)
            return False
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep:
                await self._send(writer, 400, _error_body("malformed header", 400), False)
                return False
            headers[name.strip().lower()] = value.strip()
        else:
            await self._send(writer, 400, _error_body("too many headers", 400), False)
            return False
        conn = headers.get("connection", "").lower()
        keep_alive = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn

        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await self._read_body(headers, reader)
        except _BadRequest as e:
            await self._send(writer, e.status, _error_body(str(e), e.status), False)
            return False

        path = target.split("?", 1)[0]
        try:
            status, payload = await self._route(method.upper(), path, headers, body)
        except _BadRequest as e:
            status, payload = e.status, _error_body(str(e), e.status, e.param)
        except Exception as e:  # noqa: BLE001 - a server answers, it does not crash
            status = 500
            payload = _error_body(f"internal error: {type(e).__name__}: {e}", 500)
        await self._send(writer, status, payload, keep_alive, head=method.upper() == "HEAD")
        return keep_alive

    async def _read_body(self, headers: dict[str, str], reader) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest("malformed chunked body") from None
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > _MAX_BODY:
                    raise _BadRequest("request body too large", status=413)
                parts.append(await reader.readexactly(size))
                await reader.readline()
        try:
            n = int(headers.get("content-length", "0"))
        except ValueError:
            raise _BadRequest("malformed Content-Length") from None
        if n < 0 or n > _MAX_BODY:
            raise _BadRequest("request body too large", status=413)
        return await reader.readexactly(n) if n else b""

    async def _send(self, writer, status: int, payload, keep_alive: bool, head=False) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        reason = HTTPStatus(status).phrase
        head_lines = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    # ------------------------------------------------------------------ routes
    async def _route(self, method: str, path: str, headers, body: bytes):
        path = path.rstrip("/") or "/"
        routes: dict[str, tuple[str, Callable[[bytes], Awaitable[tuple[int, Any]]]]] = {
            "/health": ("GET", self._health),
            "/v1/models": ("GET", self._models),
            "/weight_info": ("GET", self._weight_info),
            "/v1/completions": ("POST", self._completions),
            "/pause": ("POST", self._pause),
            "/resume": ("POST", self._resume),
            "/update_weights": ("POST", self._update_weights),
            "/transfer/init": ("POST", self._transfer_init),
            "/sleep": ("POST", self._sleep),
            "/wake_up": ("POST", self._wake_up),
        }
        if path not in routes:
            raise _BadRequest(f"no route {path}", status=404)
        want, handler = routes[path]
        if method != want and not (method == "HEAD" and want == "GET"):
            raise _BadRequest(f"{method} not allowed on {path}", status=405)
        if self.api_key is not None and path != "/health":
            if headers.get("authorization", "") != f"Bearer {self.api_key}":
                raise _BadRequest("Unauthorized", status=401)
        return await handler(body)

    async def _health(self, body: bytes):
        return 200, None

    async def _weight_info(self, body: bytes):
        paused = bool(getattr(self.engine, "paused", False))
        asleep = bool(getattr(self.engine, "asleep", False))
        return 200, {"weight_version": str(self.engine.version), "paused": paused,
                     "asleep": asleep, "instance": self.instance,
                     "adapter": self._adapter}  # fmt: skip

    @property
    def _adapter(self) -> dict[str, Any] | None:
        """The LoRA layers the engine holds (rank, alpha, targets), or None."""
        config = getattr(getattr(self.engine, "model", None), "_agent_spo_lora", None)
        if config is None:
            return None
        from agent_spo.lora import shape_of

        return shape_of(config)

    def _control(self, name: str):
        method = getattr(self.engine, name, None)
        if method is None:
            raise _BadRequest(f"this server's engine ({type(self.engine).__name__}) cannot {name}")
        return method

    async def _pause(self, body: bytes):
        lease = self._lease_of(_json_object(body or b"{}"))
        await self._control("pause")()
        self._hold(lease)
        return 200, {"paused": True, "weight_version": str(self.engine.version)}

    async def _expire(self) -> None:
        self._lease = None
        self.lease_expired += 1
        if getattr(self.engine, "asleep", False):
            await self._control("wake")()
        await self._control("resume")()

    async def _sleep(self, body: bytes):
        lease = self._lease_of(_json_object(body or b"{}"))
        await self._control("sleep")()
        self._hold(lease)
        return 200, {"asleep": True}

    async def _wake_up(self, body: bytes):
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None
        await self._control("wake")()
        return 200, {"asleep": False}

    @staticmethod
    def _lease_of(req: dict[str, Any]) -> float:
        lease = req.get("timeout_s", 300.0)
        if not isinstance(lease, int | float) or isinstance(lease, bool) or not lease > 0:
            raise _BadRequest(f"timeout_s must be a number > 0, got {lease!r}", param="timeout_s")
        return float(lease)

    def _hold(self, lease: float) -> None:
        """A pause or a sleep that ends by itself after ``lease`` seconds."""
        if self._lease is not None:
            self._lease.cancel()
        self._lease = asyncio.get_running_loop().call_later(
            lease, lambda: asyncio.ensure_future(self._expire())
        )

    async def _resume(self, body: bytes):
        if self._lease is not None:
            self._lease.cancel()
            self._lease = None
        if getattr(self.engine, "asleep", False):  # its weights are off the device
            await self._control("wake")()
        await self._control("resume")()
        return 200, {"paused": False, "weight_version": str(self.engine.version)}

    async def _transfer_init(self, body: bytes):
        from agent_spo.engines.transfer import GlooReceiver

        req = _json_object(body)
        host, port, lease = req.get("host"), req.get("port"), req.get("timeout_s", 300.0)
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise _BadRequest("host (a string) and port (an integer) name the trainer's end")
        if not isinstance(lease, int | float) or isinstance(lease, bool) or not lease > 0:
            raise _BadRequest(f"timeout_s must be a number > 0, got {lease!r}", param="timeout_s")
        self._drop_link()
        # joined in the background: the trainer joins its end once this answers
        self._link = asyncio.ensure_future(
            asyncio.to_thread(GlooReceiver, host, port, timeout_s=float(lease))
        )
        return 200, {"joining": True}

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if link.done() and not link.cancelled() and link.exception() is None:
            link.result().close()
        else:
            link.cancel()  # the joining thread itself ends at its timeout

    async def _update_over_link(self, version: int):
        from agent_spo.engines.transfer import IncomingUpdate

        if self._link is None:
            raise _BadRequest("no gloo link: POST /transfer/init first")
        update = self._control("update_weights")
        try:
            link = await asyncio.shield(self._link)
        except Exception as e:  # noqa: BLE001 - the trainer never joined
            self._link = None
            return 500, _error_body(f"the gloo link failed: {type(e).__name__}: {e}", 500)
        incoming = IncomingUpdate(link, version)
        try:
            await update(incoming, version)
        except Exception as e:  # noqa: BLE001 - the link is out of step now: drop it
            self._drop_link()
            return 500, _error_body(f"weight update failed: {type(e).__name__}: {e}", 500)
        return 200, {"weight_version": str(self.engine.version), "bytes": incoming.bytes}

    async def _update_weights(self, body: bytes):
        from agent_spo.engines.weights import read_weights

        req = _json_object(body)
        path, version = req.get("path"), req.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise _BadRequest(f"version must be an integer >= 0, got {version!r}", param="version")
        if req.get("transport", "disk") == "gloo":
            return await self._update_over_link(version)
        if not isinstance(path, str) or not path:
            raise _BadRequest("path must name the folder of a written update", param="path")
        try:
            weights = read_weights(path)
        except (OSError, ValueError, KeyError) as e:
            raise _BadRequest(f"cannot read the update at {path}: {e}", param="path") from None
        if weights.version != version:
            raise _BadRequest(f"{path} holds version {weights.version}, not {version}")
        update = self._control("update_weights")
        try:
            await update(weights, version)
        except Exception as e:  # noqa: BLE001 - told apart below
            if isinstance(e, KeyError | ValueError) and self.engine.version >= 0:
                # found by the check before the first copy: nothing changed
                raise _BadRequest(f"the update does not fit the model: {e}") from None
            return 500, _error_body(
                f"weight update failed part-way ({type(e).__name__}: {e}); the weights are "
                "mixed and the engine refuses to generate until a whole update lands",
                500,
            )
        return 200, {"weight_version": str(self.engine.version), "bytes": weights.bytes}

    async def _models(self, body: bytes):
        card = {
            "id": self.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "agent-spo",
            "root": None,
            "parent": None,
            "max_model_len": self.engine.max_model_len,
            "permission": [],
        }
        return 200, {"object": "list", "data": [card]}

    async def _completions(self, body: bytes):
        self.requests += 1
        req = _json_object(body)
        model = req.get("model")
        if model is not None and model != self.model_name:
            raise _BadRequest(f"The model `{model}` does not exist.", status=404, param="model")
        prompt = self._prompt(req.get("prompt"))
        sampling = self._sampling(req)
        limit = self.engine.max_model_len
        if len(prompt) >= limit:
            raise _BadRequest(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt contains {len(prompt)} input tokens, which leaves no room for output. "
                f"Please reduce the length of the input prompt.",
                param="input_tokens",
            )
        try:
            gen = await self.engine.generate(prompt, sampling)
        except ValueError as e:
            raise _BadRequest(str(e)) from None
        except EngineError as e:
            return 500, _error_body(f"engine error: {e}", 500)
        return 200, self._response(req, prompt, gen)

    def _prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if self.tokenizer is None or not prompt:
                raise _BadRequest("a string prompt needs a non-empty string", param="prompt")
            prompt = list(self.tokenizer(prompt).input_ids)
        if not isinstance(prompt, list) or not prompt:
            raise _BadRequest(
                "prompt must be a non-empty list of token ids (one prompt per request)",
                param="prompt",
            )
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise _BadRequest(f"prompt token {t!r} is not a token id", param="prompt")
            if self.vocab_size is not None and t >= self.vocab_size:
                raise _BadRequest(f"Token id {t} is out of vocabulary", param="prompt")
        return prompt

    def _sampling(self, req: dict) -> Sampling:
        def num(name: str, default, kind=float):
            v = req.get(name)
            if v is None:
                return default
            ok = (int,) if kind is int else (int, float)
            if not isinstance(v, ok) or isinstance(v, bool):
                raise _BadRequest(f"`{name}` must be a number", param=name)
            return kind(v)

        if num("n", 1, int) != 1:
            raise _BadRequest("only n=1 is supported", param="n")
        if req.get("stream"):
            raise _BadRequest("streaming is not supported", param="stream")
        if req.get("echo"):
            raise _BadRequest("echo is not supported", param="echo")
        if req.get("use_beam_search"):
            raise _BadRequest("beam search is not supported", param="use_beam_search")
        for name, neutral in (
            ("min_p", 0.0),
            ("repetition_penalty", 1.0),
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("min_tokens", 0),
        ):
            if num(name, neutral) != neutral:
                raise _BadRequest(f"`{name}` is not supported by this server", param=name)
        if req.get("ignore_eos"):
            raise _BadRequest("`ignore_eos` is not supported by this server", param="ignore_eos")
        lp = req.get("logprobs")
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or lp < -1):
            raise _BadRequest("`logprobs` must be a non-negative integer or -1", param="logprobs")

        stop = req.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _BadRequest("`stop` must be a string or a list of strings", param="stop")
        stop_ids = req.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
        ):
            raise _BadRequest("`stop_token_ids` must be a list of ints", param="stop_token_ids")
        top_k = num("top_k", -1, int)
        seed = req.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _BadRequest("`seed` must be an integer", param="seed")
        try:
            return Sampling(
                max_tokens=num("max_tokens", 16, int),
                temperature=num("temperature", 1.0),
                top_p=num("top_p", 1.0),
                top_k=-1 if top_k == 0 else top_k,
                stop=tuple(stop),
                stop_token_ids=tuple(stop_ids),
                seed=seed,
            )
        except ValueError as e:
            raise _BadRequest(str(e)) from None

    def _response(self, req: dict, prompt: list[int], gen: Generation) -> dict[str, Any]:
        ids = list(gen.token_ids)
        tok = self.tokenizer
        as_ids = bool(req.get("return_tokens_as_token_ids")) or tok is None
        skip_special = req.get("skip_special_tokens", True) is not False
        text = tok.decode(ids, skip_special_tokens=skip_special) if tok is not None else ""
        if (
            isinstance(gen.stop, str)
            and req.get("include_stop_str_in_output") is not True
            and gen.stop in text
        ):
            text = text[: text.index(gen.stop)]
        logprobs = None
        if req.get("logprobs") is not None:
            tokens = [
                f"token_id:{t}"
                if as_ids or tok is None  # as_ids already covers tok is None
                else tok.decode([t], skip_special_tokens=False)
                for t in ids
            ]
            offsets, pos = [], 0
            for s in tokens:
                offsets.append(pos)
                pos += 0 if as_ids else len(s)
            token_logprobs = [max(float(x), -9999.0) for x in gen.logprobs]
            logprobs = {
                "text_offset": offsets,
                "token_logprobs": token_logprobs,
                "tokens": tokens,
                "top_logprobs": [{s: x} for s, x in zip(tokens, token_logprobs, strict=True)],
            }
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": gen.finish_reason,
            "stop_reason": gen.stop,
        }
        if req.get("return_token_ids"):
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = prompt
        if req.get("return_token_versions"):
            choice["token_versions"] = list(gen.versions or [gen.policy_version] * len(ids))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(ids),
                "total_tokens": len(prompt) + len(ids),
            },
        }


class ServerThread:
    """A :class:`CompletionServer` on its own event loop in a daemon thread.

    The engine is driven only from that loop, so build it before (an engine that binds
    its asyncio state lazily, like the transformers engine, is fine) and do not call it
    from other loops meanwhile. ``close()`` stops the server (and closes the engine when
    ``close_engine``).
    """

    def __init__(self, engine: Engine, *, close_engine: bool = True, **server_kwargs) -> None:
        self.server = CompletionServer(engine, **server_kwargs)
        self.close_engine = close_engine
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="agent-spo-serve", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the server did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the server failed to start: {self._error}") from self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def close(self, timeout_s: float = 30.0) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown():
            await self.server.stop()
            if self.close_engine:
                await self.server.engine.close()

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_in_thread(engine: Engine, **kwargs) -> ServerThread:
    """Start serving ``engine`` on a background thread; ``.url`` is where (use ``with``)."""
    return ServerThread(engine, **kwargs).start()


def serve_model(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 64,
    max_model_len: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    lora=None,
    log=print,
) -> None:
    """Serve a model directory with the transformers engine until interrupted; with
    ``lora`` (a peft LoraConfig) its model holds those adapter layers."""
    from agent_spo.engines.hf import HFEngine

    engine = HFEngine.from_pretrained(
        model_dir, dtype=dtype, max_batch=max_batch, max_model_len=max_model_len,
        device=device, seed=seed, lora=lora,
    )  # fmt: skip
    server = CompletionServer(
        engine, model_name=model_name or model_dir, host=host, port=port, api_key=api_key
    )

    async def run():
        await server.start()
        log(f"serving {server.model_name!r} on {server.url}")
        try:
            await server.serve_forever()
        finally:
            await server.stop()
            await engine.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m agent_spo.engines.serve",
        description="Serve a Hugging Face model directory with the transformers engine, "
        "OpenAI/vLLM-compatible (/v1/completions, /v1/models, /health).",
    )
    p.add_argument("model_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="served name (default: model_dir)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    serve_model(
        a.model_dir, host=a.host, port=a.port, model_name=a.model_name, api_key=a.api_key,
        max_batch=a.max_batch, max_model_len=a.max_model_len, device=a.device,
        dtype=a.dtype, seed=a.seed, log=lambda m: print(m, flush=True),
    )  # fmt: skip


if __name__ == "__main__":
    main()
