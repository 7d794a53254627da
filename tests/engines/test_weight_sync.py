"""The pieces of a weight sync in one process: bucketed weights on disk, a paused engine,
per-token versions across an update, and the replica routes of the HTTP server."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from agent_spo.engines.base import EngineError, Generation, Sampling
from agent_spo.engines.hf import HFEngine
from agent_spo.engines.openai_http import OpenAIHTTPEngine
from agent_spo.engines.serve import serve_in_thread
from agent_spo.engines.weights import MANIFEST, prune, read_weights, version_dir, write_weights

MAX_LEN = 256


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return SimpleNamespace(tok=tok, model=model, other=other)


def _forward_logprobs(model, prompt, tokens) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return lp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def _prompt(tok) -> list[int]:
    return tok("What is 123 multiplied by 45?").input_ids


LONG = Sampling(max_tokens=40, temperature=1.0, seed=3)


# ---------------------------------------------------------------------- weights on disk
def test_weights_go_to_disk_in_capped_buckets_and_come_back_equal(models, tmp_path):
    state = models.model.state_dict()
    biggest = max(t.numel() * t.element_size() for t in state.values())
    written = write_weights(state.items(), tmp_path, 7, bucket_bytes=biggest)
    assert written.path == version_dir(tmp_path, 7)
    assert written.tensors == len(state)
    assert written.bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert 1 < written.buckets <= len(state)
    for f in written.path.glob("bucket-*.safetensors"):  # none holds more than the cap,
        from safetensors import safe_open  # except a tensor bigger than it alone

        with safe_open(str(f), "pt") as sf:
            sizes = [sf.get_tensor(k).numel() * 4 for k in sf.keys()]  # noqa: SIM118
        assert sum(sizes) <= biggest or len(sizes) == 1
    back = read_weights(written.path)
    assert back.version == 7 and len(back) == len(state) and back.bytes == written.bytes
    assert back.shapes == {k: tuple(v.shape) for k, v in state.items()}
    got = dict(back)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_an_unfinished_write_is_never_read_and_old_versions_are_pruned(models, tmp_path):
    items = list(models.model.state_dict().items())
    write_weights(items, tmp_path, 1)
    write_weights(items, tmp_path, 2)
    (version_dir(tmp_path, 2) / MANIFEST).unlink()  # as if the writer died before the end
    with pytest.raises(FileNotFoundError, match="no finished weight update"):
        read_weights(version_dir(tmp_path, 2))
    write_weights(items, tmp_path, 3)
    prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003"]
    with pytest.raises(ValueError, match="listed twice"):
        write_weights(items + items[:1], tmp_path, 4)


# ---------------------------------------------------------------------- the engine
def test_a_generation_spanning_an_update_records_each_tokens_version(models):
    """Paused after a few tokens, updated, resumed: the tokens before carry version 0
    and the old model's log-probs; the ones after carry version 1."""

    async def main():
        e = HFEngine(copy.deepcopy(models.model), models.tok, max_model_len=MAX_LEN)
        try:
            task = asyncio.create_task(e.generate(_prompt(models.tok), LONG))
            while e.stats["tokens"] < 6:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.001)
            await e.pause()
            done_at = e.stats["tokens"]
            await asyncio.sleep(0.2)
            assert e.stats["tokens"] == done_at and not task.done()  # paused, kept
            await e.update_weights(models.other.state_dict().items(), version=1)
            await e.resume()
            return await task, done_at
        finally:
            await e.close()

    gen, done_at = asyncio.run(main())
    assert isinstance(gen, Generation) and len(gen.token_ids) > done_at
    # the token sampled right after the pause used logits the old weights computed
    assert gen.versions == (0,) * (done_at + 1) + (1,) * (len(gen.token_ids) - done_at - 1)
    assert gen.policy_version == 0
    assert gen.runs() == [(0, done_at + 1, 0), (done_at + 1, len(gen.token_ids), 1)]
    old = _forward_logprobs(models.model, _prompt(models.tok), gen.token_ids[: done_at + 1])
    assert torch.allclose(torch.tensor(gen.logprobs[: done_at + 1]), old, atol=1e-4)


def test_generation_validates_its_versions():
    with pytest.raises(ValueError, match="2 tokens but 1 versions"):
        Generation((1, 2), (-0.1, -0.2), "stop", 0, versions=(0,))
    with pytest.raises(ValueError, match="not the oldest"):
        Generation((1, 2), (-0.1, -0.2), "stop", 1, versions=(0, 1))
    one = Generation((1, 2), (-0.1, -0.2), "stop", 3, versions=(3, 3))
    assert one.versions is None and one.runs() == [(0, 2, 3)]


# ---------------------------------------------------------------------- replica routes
@pytest.fixture()
def replica(models):
    engine = HFEngine(copy.deepcopy(models.model), models.tok, max_model_len=MAX_LEN)
    with serve_in_thread(engine, model_name="tiny") as srv:
        yield SimpleNamespace(url=srv.url, engine=engine, server=srv.server)


def test_update_weights_route_loads_a_written_version(models, replica, tmp_path):
    written = write_weights(models.other.state_dict().items(), tmp_path, 4)
    r = httpx.post(replica.url + "/update_weights", json={"path": str(written.path), "version": 4})
    assert r.status_code == 200, r.text
    assert r.json()["weight_version"] == "4" and r.json()["bytes"] == written.bytes
    info = httpx.get(replica.url + "/weight_info").json()
    assert info["weight_version"] == "4" and info["paused"] is False
    assert info["instance"] == replica.server.instance  # a restart would change it
    prompt = _prompt(models.tok)

    async def sample():
        async with OpenAIHTTPEngine(replica.url, token_versions=True) as c:
            return await c.generate(prompt, Sampling(max_tokens=12, seed=1))

    gen = asyncio.run(sample())
    assert gen.policy_version == 4
    want = _forward_logprobs(models.other, prompt, gen.token_ids)
    assert torch.allclose(torch.tensor(gen.logprobs), want, atol=1e-4)


def test_a_bad_update_is_refused_and_changes_nothing(models, replica, tmp_path):
    before = {k: v.clone() for k, v in replica.engine.model.state_dict().items()}
    bad = dict(models.other.state_dict())
    name = next(iter(bad))
    bad[name] = torch.zeros(3, 3)
    written = write_weights(bad.items(), tmp_path, 2)
    cases = [
        ({"path": str(written.path), "version": 2}, "does not fit the model"),
        ({"path": str(tmp_path / "nowhere"), "version": 2}, "cannot read the update"),
        ({"path": str(written.path), "version": 3}, "holds version 2, not 3"),
        ({"path": str(written.path), "version": -1}, "version must be"),
    ]
    for body, message in cases:
        r = httpx.post(replica.url + "/update_weights", json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    after = replica.engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert replica.engine.version == 0


def test_a_pause_holds_requests_and_ends_by_itself_after_its_lease(models, replica):
    r = httpx.post(replica.url + "/pause", json={"timeout_s": 1.0})
    assert r.status_code == 200 and r.json()["paused"] is True
    assert httpx.get(replica.url + "/weight_info").json()["paused"] is True
    body = {"prompt": _prompt(models.tok), "max_tokens": 4, "logprobs": 0,
            "return_token_ids": True, "return_token_versions": True}  # fmt: skip
    t0 = time.monotonic()
    reply = httpx.post(replica.url + "/v1/completions", json=body, timeout=30)
    waited = time.monotonic() - t0
    assert reply.status_code == 200 and waited >= 0.8  # held until the lease ended
    choice = reply.json()["choices"][0]
    assert choice["token_versions"] == [0] * len(choice["token_ids"])
    assert replica.server.lease_expired == 1
    assert httpx.post(replica.url + "/pause", json={"timeout_s": 0}).status_code == 400
    assert httpx.post(replica.url + "/pause", json={}).status_code == 200
    assert httpx.post(replica.url + "/resume", json={}).json()["paused"] is False


def test_control_routes_need_the_api_key(models):
    engine = HFEngine(copy.deepcopy(models.model), models.tok, max_model_len=MAX_LEN)
    with serve_in_thread(engine, api_key="k") as srv:
        assert httpx.post(srv.url + "/pause", json={}).status_code == 401
        assert httpx.post(srv.url + "/update_weights", json={}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        ok = httpx.post(srv.url + "/resume", json={}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
        assert json.loads(ok.text)["paused"] is False


# ---------------------------------------------------------------------- the gloo link
def test_a_gloo_link_carries_an_update_bucket_by_bucket(models):
    import threading

    from agent_spo.engines.transfer import GlooReceiver, GlooSender, IncomingUpdate, pack_buckets

    state = dict(models.other.named_parameters())
    sender = GlooSender(timeout_s=20)
    got: dict = {}

    def replica():
        link = GlooReceiver("127.0.0.1", sender.port, timeout_s=20)
        update = IncomingUpdate(link, 5)
        got.update({k: v.clone() for k, v in update})
        got["__bytes"] = update.bytes

    t = threading.Thread(target=replica)
    t.start()
    sender.connect()
    count = total = buckets = 0
    for entries, flat in pack_buckets(state.items(), bucket_bytes=64 * 1024):
        sender.send_message({"version": 5, "tensors": entries}, flat)
        count, total, buckets = count + len(entries), total + flat.numel(), buckets + 1
    sender.send_message({"version": 5, "end": True, "count": count, "bytes": total})
    t.join(30)
    assert buckets > 1 and got.pop("__bytes") == total
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k].detach()) for k in state)


def test_an_update_refused_part_way_leaves_the_engine_refusing_to_generate(models):
    class Stream:
        streaming = True

        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

    good = list(models.other.state_dict().items())

    async def main():
        e = HFEngine(copy.deepcopy(models.model), models.tok, max_model_len=MAX_LEN)
        try:
            running = asyncio.create_task(e.generate(_prompt(models.tok), LONG))
            while e.stats["tokens"] < 3:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.001)
            with pytest.raises(KeyError, match="no weight named 'nope'"):
                await e.update_weights(Stream([good[0], ("nope", torch.zeros(1))]), 3)
            assert e.version == -1
            with pytest.raises(EngineError, match="mixed"):  # the row in flight stops too
                await running
            with pytest.raises(EngineError, match="weights are mixed"):
                await e.generate(_prompt(models.tok), LONG)
            await e.update_weights(Stream(good), 4)  # a whole update: generates again
            return e.version, await e.generate(_prompt(models.tok), LONG)
        finally:
            await e.close()

    version, gen = asyncio.run(main())
    assert version == 4 and gen.policy_version == 4


def test_buckets_align_each_tensor_so_any_dtype_views_in_place():
    from agent_spo.engines.transfer import pack_buckets

    weights = [("a", torch.arange(3, dtype=torch.bfloat16)),
               ("b", torch.arange(2, dtype=torch.float32)),
               ("c", torch.arange(5, dtype=torch.int64))]  # fmt: skip
    ((entries, flat),) = pack_buckets(weights, bucket_bytes=1 << 20)
    assert [e[3] % 16 for e in entries] == [0, 0, 0]
    for (name, dt, shape, offset), (want, t) in zip(entries, weights, strict=True):
        assert name == want
        n = t.numel() * t.element_size()
        assert torch.equal(flat[offset : offset + n].view(getattr(torch, dt)).view(shape), t)


def test_an_update_that_fails_mid_copy_is_a_500_and_stops_the_rows_in_flight(
    models, replica, tmp_path
):
    """The manifest matches the model, a bucket does not: found only while copying, so
    the replica says its weights are mixed and refuses to generate."""
    from safetensors.torch import load_file, save_file

    written = write_weights(models.other.state_dict().items(), tmp_path, 6, bucket_bytes=1)
    last = sorted(written.path.glob("bucket-*.safetensors"))[-1]
    ((name, t),) = load_file(str(last)).items()
    save_file({name: torch.zeros(t.numel() + 1)}, str(last))  # the wrong shape
    r = httpx.post(replica.url + "/update_weights", json={"path": str(written.path), "version": 6})
    assert r.status_code == 500 and "weights are mixed" in r.json()["error"]["message"]
    assert httpx.get(replica.url + "/weight_info").json()["weight_version"] == "-1"
    body = {"prompt": _prompt(models.tok), "max_tokens": 4, "logprobs": 0}
    refused = httpx.post(replica.url + "/v1/completions", json=body)
    assert refused.status_code == 500 and "mixed" in refused.json()["error"]["message"]


def test_a_sleep_is_a_lease_too_and_a_resume_wakes_the_engine(replica):
    assert httpx.post(replica.url + "/sleep", json={"timeout_s": 0.5}).json() == {"asleep": True}
    assert httpx.get(replica.url + "/weight_info").json()["asleep"] is True
    time.sleep(1.0)
    info = httpx.get(replica.url + "/weight_info").json()
    assert info["asleep"] is False and info["paused"] is False  # the lease ended it
    httpx.post(replica.url + "/sleep", json={})
    httpx.post(replica.url + "/resume", json={})  # e.g. a sync's resume: wakes it first
    info = httpx.get(replica.url + "/weight_info").json()
    assert info["asleep"] is False and info["paused"] is False
    assert replica.engine.stats["sleeps"] == 2
