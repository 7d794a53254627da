"""Fake engines for the tests: the real Engine protocol, scripted replies, no model.

Import with ``from fakes import ScriptedEngine``. ``tests/conftest.py`` is the suite's
top-level conftest and ``tests/`` is not a package, so pytest (default ``prepend`` import
mode) puts ``tests/`` on ``sys.path`` before it imports any test module, whichever test
files are selected and however pytest is started.

A reply is a text (tokenised with the engine's tokenizer, no special tokens added) or a
sequence of token ids. The engine cuts it the way a real engine cuts a sample (see
``agent_spo/engines/base.py``): at the first token in ``sampling.stop_token_ids`` or the
first token whose text completes a stop string (that token kept, ``finish_reason`` "stop",
``stop`` set), else at ``sampling.max_tokens`` ("length"); a reply that ends before either
is a "stop" with ``stop`` None, as if the model had ended it. tests/test_fakes.py checks
these rules and the protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from agent_spo.engines.base import EngineError, Generation, Sampling, find_stop

Reply = str | Sequence[int]


class ScriptedEngine:
    """An Engine that answers each call with the next scripted reply, or with reply(prompt_ids).

    script: replies in call order; a call past its end fails the test (AssertionError).
    reply: chooses each call's reply from its context instead (e.g. by problem or turn).
    logprob: every token's log-prob, or one per token position.
    fail_at: call indices (from 0) that raise EngineError (their context is still recorded).
    delays: {call index: seconds} to wait before that call is recorded and answered.

    Records every context it was given in ``contexts`` and counts calls in ``calls``;
    ``update_weights`` records the version (weights are ignored), ``close`` sets ``closed``.
    """

    def __init__(
        self,
        script: Sequence[Reply] = (),
        *,
        reply: Callable[[list[int]], Reply] | None = None,
        tokenizer: Any = None,
        version: int = 0,
        max_model_len: int = 4096,
        logprob: float | Sequence[float] = -0.5,
        fail_at: Collection[int] = (),
        delays: Mapping[int, float] | None = None,
    ) -> None:
        self.script = list(script)
        self.reply = reply
        self.tokenizer = tokenizer
        self.version = version
        self.max_model_len = max_model_len
        self.logprob = logprob
        self.fail_at = set(fail_at)
        self.delays = dict(delays or {})
        self.contexts: list[list[int]] = []
        self.calls = 0
        self.closed = False

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> Generation:
        """The next reply, cut at a stop or at max_tokens."""
        call, self.calls = self.calls, self.calls + 1
        if call in self.delays:
            await asyncio.sleep(self.delays[call])
        self.contexts.append(list(prompt_ids))
        if call in self.fail_at:
            raise EngineError("scripted engine failure")
        if self.reply is not None:
            reply = self.reply(list(prompt_ids))
        else:
            assert self.script, f"the script ran out: call {call} has no reply"
            reply = self.script.pop(0)
        ids, reason, stop = self._cut(self._ids(reply), sampling)
        if isinstance(self.logprob, float | int):
            logprobs = tuple(float(self.logprob) for _ in ids)
        else:
            logprobs = tuple(self.logprob[: len(ids)])
        return Generation(ids, logprobs, reason, self.version, stop)

    def _ids(self, reply: Reply) -> list[int]:
        if isinstance(reply, str):
            return list(self.tokenizer(reply, add_special_tokens=False).input_ids)
        return list(reply)

    def _cut(self, ids: list[int], sampling: Sampling) -> tuple[tuple[int, ...], str, Any]:
        out: list[int] = []
        for t in ids:
            out.append(t)
            if t in sampling.stop_token_ids:
                return tuple(out), "stop", t
            if sampling.stop:
                hit = find_stop(self.tokenizer.decode(out), sampling.stop)
                if hit:
                    return tuple(out), "stop", hit
            if len(out) >= sampling.max_tokens:
                return tuple(out), "length", None
        return tuple(out), "stop", None

    async def update_weights(self, weights, version: int) -> None:
        """Take the new version; the weights themselves are ignored."""
        self.version = version

    async def close(self) -> None:
        """Mark the engine closed."""
        self.closed = True
