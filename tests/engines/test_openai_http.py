"""The OpenAI-compatible HTTP engine against a real server (serve.py over the transformers
engine on 127.0.0.1), plus a stdlib server for broken answers."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest
import torch
from fakes import ScriptedEngine

from agent_spo.engines.base import Engine, EngineError, Generation, Sampling
from agent_spo.engines.hf import HFEngine
from agent_spo.engines.openai_http import HTTPEngineError, OpenAIHTTPEngine
from agent_spo.engines.serve import serve_in_thread

MAX_LEN = 256


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    engine = HFEngine(copy.deepcopy(model), tok, max_batch=32, max_model_len=MAX_LEN)
    with serve_in_thread(engine, model_name="tiny") as srv:
        yield SimpleNamespace(url=srv.url, engine=engine, server=srv.server, model=model, tok=tok)


def _client(url: str, **kw) -> OpenAIHTTPEngine:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("retries", 2)
    return OpenAIHTTPEngine(url, **kw)


def _forward_logprobs(model, prompt, tokens) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return lp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def _prompt(tok, i: int = 0) -> list[int]:
    return tok(f"What is {100 + i} multiplied by {7 * i + 3}?").input_ids


def _via_http(url: str, requests: list[tuple[list[int], Sampling]]) -> list[Generation]:
    async def main():
        async with _client(url) as e:
            return [await e.generate(p, s) for p, s in requests]

    return asyncio.run(main())


def _direct(served, requests: list[tuple[list[int], Sampling]]) -> list[Generation]:
    async def main():
        e = HFEngine(copy.deepcopy(served.model), served.tok, max_model_len=MAX_LEN)
        try:
            return [await e.generate(p, s) for p, s in requests]
        finally:
            await e.close()

    return asyncio.run(main())


def test_model_and_max_model_len_come_from_v1_models(served):
    e = _client(served.url)
    assert isinstance(e, Engine)
    assert e.max_model_len == MAX_LEN and e.model == "tiny"  # sync path, on first use

    async def main():
        async with _client(served.url + "/v1/") as e2:
            await e2.start()
            return e2.model, e2.max_model_len

    assert asyncio.run(main()) == ("tiny", MAX_LEN)
    assert _client(served.url, max_model_len=100).max_model_len == 100


def test_tokens_and_logprobs_equal_the_engine_and_a_forward_pass(served):
    tok = served.tok
    reqs = [
        (_prompt(tok, 0), Sampling(max_tokens=12, temperature=0)),
        (_prompt(tok, 1), Sampling(max_tokens=16, seed=7)),
        (_prompt(tok, 2), Sampling(max_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=3)),
    ]
    http = _via_http(served.url, reqs)
    direct = _direct(served, reqs)
    for (p, _), h, d in zip(reqs, http, direct, strict=True):
        assert h.token_ids == d.token_ids
        assert (h.finish_reason, h.stop, h.policy_version) == (d.finish_reason, d.stop, 0)
        assert torch.allclose(torch.tensor(h.logprobs), torch.tensor(d.logprobs), atol=1e-6)
        ref = _forward_logprobs(served.model, p, h.token_ids)
        assert torch.allclose(ref, torch.tensor(h.logprobs), atol=1e-4), (ref, h.logprobs)


def _sampled(served, prompt, min_len=12) -> tuple[int, Generation]:
    for seed in range(20):
        (g,) = _via_http(served.url, [(prompt, Sampling(max_tokens=24, seed=seed))])
        if len(g.token_ids) >= min_len:
            return seed, g
    raise AssertionError("no seed gave a long enough sample")


def test_stop_token_ids_end_on_the_stop_token(served):
    prompt = _prompt(served.tok, 3)
    seed, g = _sampled(served, prompt)
    t = g.token_ids[6]
    j = g.token_ids.index(t)
    s = Sampling(max_tokens=24, seed=seed, stop_token_ids=(t,))
    (h,) = _via_http(served.url, [(prompt, s)])
    assert h.token_ids == g.token_ids[: j + 1]
    assert (h.finish_reason, h.stop) == ("stop", t)
    assert h == _direct(served, [(prompt, s)])[0]


def test_stop_strings_end_on_the_completing_token(served):
    tok = served.tok
    prompt = _prompt(tok, 4)
    seed, g = _sampled(served, prompt)
    stop = None
    for k in range(6, len(g.token_ids)):
        cand = tok.decode(g.token_ids[:k], skip_special_tokens=False)[-2:]
        if cand.strip() and "\ufffd" not in cand:
            stop = cand
            break
    assert stop is not None
    s = Sampling(max_tokens=24, seed=seed, stop=(stop,))
    (h,) = _via_http(served.url, [(prompt, s)])
    assert (h.finish_reason, h.stop) == ("stop", stop)
    assert h.token_ids == g.token_ids[: len(h.token_ids)]
    assert stop in tok.decode(h.token_ids, skip_special_tokens=False)
    assert stop not in tok.decode(h.token_ids[:-1], skip_special_tokens=False)
    assert h == _direct(served, [(prompt, s)])[0]


def test_max_tokens_and_the_context_limit_give_length(served):
    short = _prompt(served.tok, 5)
    long = (short * 100)[: MAX_LEN - 6]  # 6 tokens of room: max_tokens is clamped
    a, b = _via_http(
        served.url,
        [
            (short, Sampling(max_tokens=5, temperature=0, stop_token_ids=())),
            (long, Sampling(max_tokens=50, temperature=0)),
        ],
    )
    assert (len(a.token_ids), a.finish_reason, a.stop) == (5, "length", None)
    assert (len(b.token_ids), b.finish_reason) == (6, "length")

    async def full():
        async with _client(served.url) as e:
            await e.generate(short * 100, Sampling(max_tokens=1))

    with pytest.raises(ValueError, match="no room"):
        asyncio.run(full())


def test_concurrent_requests_complete_and_are_batched(served):
    prompts = [_prompt(served.tok, i) for i in range(16)]
    served.engine.stats["max_rows"] = 0

    async def main():
        async with _client(served.url) as e:
            return await asyncio.gather(
                *(e.generate(p, Sampling(max_tokens=8 + i, seed=i)) for i, p in enumerate(prompts))
            )

    t0 = time.perf_counter()
    gens = asyncio.run(main())
    assert time.perf_counter() - t0 < 10
    assert served.engine.stats["max_rows"] > 1
    for p, g in zip(prompts, gens, strict=True):
        ref = _forward_logprobs(served.model, p, g.token_ids)
        assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)


def test_the_server_speaks_vllms_dialect(served):
    url = served.url
    prompt = _prompt(served.tok, 6)
    body = _client(url)._request_body(prompt, Sampling(max_tokens=4, temperature=0), 4)
    body["model"] = "tiny"
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = choice["token_ids"]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) == 4
    assert choice["prompt_token_ids"] == prompt
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
    assert choice["text"] == served.tok.decode(ids, skip_special_tokens=False)
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt), 4)
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == MAX_LEN

    def err(payload, status, content=None):
        r = httpx.post(url + "/v1/completions", json=payload, content=content)
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert e["code"] == status and e["message"]
        return e["message"]

    assert "JSON" in err(None, 400, content=b"{not json")
    assert "prompt" in err({"max_tokens": 3}, 400)
    assert "vocabulary" in err({"prompt": [10**6]}, 400)
    assert "context length" in err({"prompt": [5] * MAX_LEN}, 400)
    assert "n=1" in err({"prompt": prompt, "n": 2}, 400)
    assert "top_p" in err({"prompt": prompt, "top_p": 0}, 400)
    assert "does not exist" in err({"prompt": prompt, "model": "other"}, 404)


def test_server_down_is_an_engine_error_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"

    async def main():
        async with _client(url, model="m", max_model_len=64, retries=2) as e:
            await e.generate([1, 2, 3], Sampling(max_tokens=2))

    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=f"{url}/v1/completions failed after 3 attempt"):
        asyncio.run(main())
    assert time.perf_counter() - t0 < 5
    with pytest.raises(EngineError, match="/v1/models"):
        _ = _client(url, retries=0).max_model_len


def test_a_4xx_is_an_engine_error_with_the_servers_message(served):
    before = served.server.requests

    async def main(**kw):
        async with _client(served.url, retries=3, **kw) as e:
            await e.generate([5] * (MAX_LEN + 10), Sampling(max_tokens=2))

    with pytest.raises(HTTPEngineError, match="maximum context length is 256") as info:
        asyncio.run(main(max_model_len=10_000))  # the client believes there is room
    assert info.value.status_code == 400 and "prompt" in info.value.message
    assert served.server.requests == before + 1  # not retried
    with pytest.raises(HTTPEngineError, match="does not exist"):
        asyncio.run(main(model="other", max_model_len=10_000))


class _Canned:
    """A stdlib HTTP server answering /v1/completions from a list of (status, body)."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers, self.hits = answers, 0
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, body = canned.answers[min(canned.hits, len(canned.answers) - 1)]
                canned.hits += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def generate(self, retries=2) -> Generation:
        async def main():
            async with _client(self.url, model="m", max_model_len=64, retries=retries) as e:
                return await e.generate([1, 2, 3], Sampling(max_tokens=3))

        try:
            return asyncio.run(main())
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


def _vllm_body(**choice) -> bytes:
    base = {
        "index": 0,
        "text": "",
        "finish_reason": "stop",
        "stop_reason": None,
        "token_ids": [7, 8, 2],
        "logprobs": {
            "tokens": ["token_id:7", "token_id:8", "token_id:2"],
            "token_logprobs": [-0.5, -1.25, -0.125],
            "top_logprobs": None,
            "text_offset": [0, 0, 0],
        },
    }
    base.update(choice)
    return json.dumps({"choices": [base]}).encode()


@pytest.mark.parametrize(
    "status, body",
    [
        (200, b"garbage, not JSON"),
        (200, b'{"object": "text_completion"}'),
        (200, _vllm_body(token_ids=None, logprobs={"tokens": ["a"], "token_logprobs": [-1.0]})),
        (200, _vllm_body(token_ids=[7, 8, 9])),  # disagrees with logprobs.tokens
        (200, _vllm_body(logprobs={"tokens": ["token_id:7"], "token_logprobs": [None]})),
        (200, _vllm_body(finish_reason="abort")),
        (503, b'{"error": {"message": "overloaded"}}'),
    ],
    ids=["not-json", "no-choices", "text-tokens", "ids-disagree", "null-logprob", "abort", "503"],
)
def test_malformed_answers_are_retried_then_an_engine_error(status, body):
    canned = _Canned([(status, body)])
    with pytest.raises(EngineError, match="failed after 3 attempt"):
        canned.generate(retries=2)
    assert canned.hits == 3


def test_vllm_shaped_answers_parse_and_a_retry_recovers():
    canned = _Canned([(502, b"bad gateway"), (200, _vllm_body())])
    g = canned.generate()
    assert canned.hits == 2
    assert g.token_ids == (7, 8, 2) and g.logprobs == (-0.5, -1.25, -0.125)
    assert (g.finish_reason, g.stop) == ("stop", 2)  # EOS: vLLM sends no stop_reason
    # older vLLM: ids only as 'token_id:<id>' tokens; a stop string in stop_reason
    canned = _Canned([(200, _vllm_body(token_ids=None, stop_reason="</code>"))])
    g = canned.generate()
    assert (g.token_ids, g.stop) == ((7, 8, 2), "</code>")


def test_version_api_key_and_close():
    fake = ScriptedEngine(reply=lambda ids: (1, 2), max_model_len=32, logprob=(-0.25, -0.5))
    with serve_in_thread(fake, api_key="sekret") as srv:

        async def main():
            async with _client(srv.url, api_key="wrong", model="agent-spo") as bad:
                with pytest.raises(HTTPEngineError, match="Unauthorized"):
                    await bad.generate([3], Sampling(max_tokens=2))
            e = _client(srv.url, api_key="sekret")
            g0 = await e.generate([3], Sampling(max_tokens=2))
            e.set_version(4)
            g4 = await e.generate([3], Sampling(max_tokens=2))
            with pytest.raises(NotImplementedError, match="set_version"):
                await e.update_weights([], 5)
            await e.close()
            with pytest.raises(EngineError, match="closed"):
                await e.generate([3], Sampling(max_tokens=2))
            return g0, g4, e.max_model_len

        g0, g4, limit = asyncio.run(main())
    assert (g0.token_ids, g0.logprobs, g0.policy_version) == ((1, 2), (-0.25, -0.5), 0)
    assert g4.policy_version == 4 and limit == 32
