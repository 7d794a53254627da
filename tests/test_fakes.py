"""The shared fake engine (tests/fakes.py) keeps the Engine protocol and a real engine's cuts."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes import ScriptedEngine

from agent_spo.engines.base import Engine, EngineError, Sampling


class CharTokenizer:
    """One token per character: id = code point."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids):
        return "".join(map(chr, ids))


def _gen(engine, sampling, prompt=(1,)):
    return asyncio.run(engine.generate(list(prompt), sampling))


def test_replies_are_cut_like_a_real_engine_cuts_them():
    tok = CharTokenizer()
    e = ScriptedEngine(["ab</x>cd", [7, 3, 9], "abcdef", "ab"], tokenizer=tok)
    assert isinstance(e, Engine)
    g = _gen(e, Sampling(max_tokens=50, stop=("</x>",)))  # the completing token is kept
    assert (tok.decode(g.token_ids), g.finish_reason, g.stop) == ("ab</x>", "stop", "</x>")
    g = _gen(e, Sampling(max_tokens=50, stop_token_ids=(3,)))
    assert (g.token_ids, g.finish_reason, g.stop) == ((7, 3), "stop", 3)
    g = _gen(e, Sampling(max_tokens=4))
    assert (len(g.token_ids), g.finish_reason, g.stop) == (4, "length", None)
    g = _gen(e, Sampling(max_tokens=4))  # the "model" ended it before any limit
    assert (len(g.token_ids), g.finish_reason, g.stop) == (2, "stop", None)
    assert g.logprobs == (-0.5, -0.5) and g.policy_version == 0
    with pytest.raises(AssertionError, match="script ran out"):
        _gen(e, Sampling(max_tokens=4))
    assert e.calls == 5 and e.contexts == [[1]] * 5


def test_failures_delays_versions_and_per_token_logprobs():
    e = ScriptedEngine(reply=lambda ids: ids[::-1], logprob=(-1.0, -2.0, -3.0), fail_at={1},
                       delays={2: 0.05})  # fmt: skip
    assert _gen(e, Sampling(max_tokens=3), (4, 5)).logprobs == (-1.0, -2.0)
    with pytest.raises(EngineError, match="scripted engine failure"):
        _gen(e, Sampling(max_tokens=3), (6,))
    asyncio.run(e.update_weights([], 7))
    t0 = time.perf_counter()
    g = _gen(e, Sampling(max_tokens=3), (1, 2, 3))
    assert time.perf_counter() - t0 >= 0.05
    assert (g.token_ids, g.policy_version) == ((3, 2, 1), 7)
    assert e.contexts == [[4, 5], [6], [1, 2, 3]]  # a failed call is still recorded
    asyncio.run(e.close())
    assert e.closed
