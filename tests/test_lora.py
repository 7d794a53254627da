"""LoRA: only the adapter trains, the merged weights are peft's, an adapter-only sync makes
the engine sample the learner's policy, checkpoints hold the adapter and resume exactly."""

from __future__ import annotations

import asyncio
import copy
import json
import math

import pytest
import torch
from test_learner import _model, _trajectories

from agent_spo import lora
from agent_spo.config import LoraConfig
from agent_spo.episode.trajectory import Segment, Trajectory
from agent_spo.learner import Learner

ADV = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0]
SETTINGS = LoraConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def tok():
    from agent_spo.demo.tokenizer import train_tokenizer

    return train_tokenizer([f"What is {i} times {i + 7}? {i * (i + 7)}" for i in range(300)],
                           vocab_size=400)  # fmt: skip


def _lora_model(tok, settings=SETTINGS, dtype=torch.float32):
    return lora.inject(_model(tok, dtype), settings)


def _randomise_adapters(model, seed: int = 0) -> None:
    """Non-zero B matrices (peft starts them at zero, which would hide a wrong merge)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def test_names_round_trip_to_peft_form():
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    wire = lora.adapter_name(name)
    assert wire == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert lora.model_name(wire) == name
    assert lora.is_adapter(wire) and not lora.is_adapter("model.layers.0.mlp.up_proj.weight")


def test_only_the_adapter_trains_and_the_optimizer_holds_only_it(tok):
    model = _lora_model(tok)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = Learner(model, lr=1e-2)
    adapter = [n for n in base if lora.is_adapter(n)]
    assert adapter and len(adapter) == 2 * 7 * 2  # A and B on 7 linear layers x 2 layers
    held = {id(p) for group in learner.opt.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if lora.is_adapter(n)}
    summary = learner.summary()
    trainable = sum(base[n].numel() for n in adapter)
    assert summary["trainable_params"] == trainable
    assert summary["total_params"] == sum(t.numel() for t in base.values())
    assert summary["optimizer_bytes"] == 2 * 4 * trainable
    assert summary["lora"] == {"rank": 4, "alpha": 8, "layers": 14}
    trajs = _trajectories(learner, 6, len(tok), seed=1)
    learner.step(trajs, ADV)
    for n, p in model.named_parameters():  # the base is frozen, every adapter matrix moved
        assert (not torch.equal(p, base[n])) == lora.is_adapter(n), n
    line = lora.describe(summary, adapter_sync=True)
    assert "LoRA rank 4 (alpha 8) on 14 linear layers" in line and "adapter alone" in line


def test_merged_weights_equal_peft_merge_and_unload(tok):
    from peft import get_peft_model

    base = _model(tok, torch.float64)
    ours = lora.inject(copy.deepcopy(base), SETTINGS)
    _randomise_adapters(ours)
    merged = dict(Learner(ours).named_weights())
    reference = get_peft_model(copy.deepcopy(base), lora.peft_config(SETTINGS))
    reference.load_state_dict(
        {f"base_model.model.{n}": p for n, p in ours.state_dict().items()}, strict=True
    )
    expected = reference.merge_and_unload().state_dict()
    plain = dict(Learner(copy.deepcopy(base)).named_weights())
    assert merged.keys() == plain.keys()  # the base model's own names, nothing else
    for name, t in merged.items():
        assert torch.allclose(t, expected[name], rtol=0, atol=1e-12), name
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                           plain["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def _greedy_and_score(learner, engine_model, tok, weights_of, prompt):
    """Push ``weights_of(learner)`` into an engine on ``engine_model``, sample greedily,
    and return the generation and the learner's log-probs of the same tokens."""
    from agent_spo.engines.base import Sampling
    from agent_spo.engines.hf import HFEngine

    async def main():
        engine = HFEngine(engine_model, tok)
        try:
            await engine.update_weights(weights_of(learner, engine), learner.version)
            return engine, await engine.generate(prompt, Sampling(max_tokens=8, temperature=0))
        finally:
            await engine.close()

    engine, gen = asyncio.run(main())
    probe = Trajectory("x", prompt, [Segment("model", gen.token_ids, gen.logprobs, 1)])
    return engine, gen, learner.token_logprobs([probe])[0]


def _trained(tok, seed: int):
    """The base model, and a LoRA learner on it after three updates, with its batch."""
    base = _model(tok)
    learner = Learner(lora.inject(copy.deepcopy(base), SETTINGS), lr=5e-2)
    trajs = _trajectories(learner, 6, len(tok), seed=seed)
    for _ in range(3):
        learner.step(trajs, ADV)
    return base, learner, trajs


def test_adapter_only_sync_makes_the_hf_engine_sample_the_learners_policy(tok):
    base, learner, trajs = _trained(tok, seed=2)
    prompt = list(trajs[0].prompt_token_ids)
    sent: list[str] = []

    def adapter_only(learner, engine):
        assert lora.sends_adapter(learner, engine)
        for name, t in lora.policy_weights(learner, engine):
            sent.append(name)
            yield name, t

    engine_model = lora.inject(copy.deepcopy(base), SETTINGS)  # adapter at zero: the base
    engine, gen, lp = _greedy_and_score(learner, engine_model, tok, adapter_only, prompt)
    assert engine.version == 3 and gen.policy_version == 3
    assert sent and all(n.startswith(lora.PEFT_PREFIX) and lora.is_adapter(n) for n in sent)
    assert torch.allclose(lp, torch.tensor(gen.logprobs), atol=1e-5)
    # the same generation scored by the base model is not the learner's: had the adapter
    # not arrived, the log-probs above would not match
    base_learner = Learner(copy.deepcopy(base))
    probe = Trajectory("x", prompt, [Segment("model", gen.token_ids, gen.logprobs, 1)])
    assert not torch.allclose(base_learner.token_logprobs([probe])[0], lp, atol=1e-3)


def test_merged_sync_makes_a_plain_engine_sample_the_learners_policy(tok):
    base, learner, trajs = _trained(tok, seed=3)
    engine, gen, lp = _greedy_and_score(
        learner, copy.deepcopy(base), tok, lora.policy_weights, list(trajs[1].prompt_token_ids)
    )
    assert not engine.loads_adapters and gen.policy_version == 3
    assert torch.allclose(lp, torch.tensor(gen.logprobs), atol=1e-5)


def test_an_adapter_update_for_other_layers_is_refused_before_any_copy(tok):
    base = _model(tok)
    learner = Learner(lora.inject(copy.deepcopy(base), SETTINGS), lr=5e-2)
    learner.step(_trajectories(learner, 6, len(tok), seed=4), ADV)
    narrow = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    engine_model = lora.inject(copy.deepcopy(base), narrow)
    before = {n: p.detach().clone() for n, p in engine_model.named_parameters()}
    from agent_spo.engines.hf import HFEngine

    async def main():
        engine = HFEngine(engine_model, tok)
        try:
            await engine.update_weights(learner.named_weights(adapter_only=True), 1)
        finally:
            await engine.close()

    with pytest.raises(KeyError, match="no weight named 'base_model.model.model.layers.0"):
        asyncio.run(main())
    assert all(torch.equal(p, before[n]) for n, p in engine_model.named_parameters())


def test_checkpoint_holds_the_adapter_and_resumes_exactly(tok, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    def fresh():
        return Learner(_lora_model(tok, dtype=torch.float64), lr=1e-2)

    a, b = fresh(), fresh()
    trajs = _trajectories(a, 6, len(tok), seed=5)
    for learner in (a, b):
        learner.step(trajs, ADV)
    b.save_state(tmp_path / "ckpt")
    a.step(trajs, ADV)  # the uninterrupted run's next step
    c = fresh()  # a new process: base weights from the model, the adapter from the checkpoint
    c.load_state(tmp_path / "ckpt")
    c.version = b.version
    c.step(trajs, ADV)
    for (n, p), (_, q) in zip(a.model.named_parameters(), c.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # the shards hold the adapter and its optimizer state only
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(tmp_path / "ckpt" / "state")).read_metadata()
    model_keys = [k for k in keys.state_dict_metadata if k.startswith("model.")]
    assert model_keys and [k for k in model_keys if not lora.is_adapter(k)] == []
    # and the adapter directory is one peft loads onto the base model
    adapter = tmp_path / "ckpt" / "adapter"
    config = lora.read_adapter_config(adapter)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    with safe_open(str(adapter / lora.ADAPTER_WEIGHTS), "pt") as f:
        assert all(k.startswith(lora.PEFT_PREFIX) for k in f.keys())
    peft_model = PeftModel.from_pretrained(_model(tok, torch.float64), str(adapter))
    theirs = peft_model.merge_and_unload().state_dict()
    for name, t in b.named_weights():
        assert torch.allclose(t, theirs[name], atol=1e-12), name


def test_a_full_checkpoint_is_refused_by_a_lora_learner_by_name(tok, tmp_path):
    full = Learner(_model(tok), lr=1e-2)
    full.save_state(tmp_path / "full")
    with pytest.raises(ValueError, match="learner.lora"):
        Learner(_lora_model(tok), lr=1e-2).load_state(tmp_path / "full")


def test_targets_that_are_missing_or_not_linear_are_refused_by_key(tok):
    with pytest.raises(ValueError, match="learner.lora.target_modules"):
        lora.inject(_model(tok), LoraConfig(rank=4, target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="learner.lora.target_modules.*Embedding"):
        lora.inject(_model(tok), LoraConfig(rank=4, target_modules=["embed_tokens", "q_proj"]))
    # the demo model ties its LM head to the embedding: neither may be adapted
    with pytest.raises(ValueError, match="learner.lora.target_modules.*not the LM head"):
        lora.inject(_model(tok), LoraConfig(rank=4, target_modules=["lm_head", "q_proj"]))


def test_a_transposed_conv1d_layer_is_refused_rather_than_merged_wrong():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="transposed Conv1D layer \\(transformer.h.0.attn"):
        lora.inject(gpt2, LoraConfig(rank=2, target_modules=["c_attn"]))


def test_the_config_section_defaults_off_and_checks_its_values():
    from pydantic import ValidationError

    from agent_spo.config import TrainConfig

    assert TrainConfig().learner.lora.rank == 0
    for bad in (
        {"rank": -1},
        {"rank": 513},
        {"dropout": 1.0},
        {"alpha": 0},
        {"target_modules": []},
    ):
        with pytest.raises(ValidationError, match="lora"):
            TrainConfig.model_validate({"learner": {"lora": bad}})
    assert lora.peft_config(LoraConfig(rank=16)).lora_alpha == 32  # alpha = 2 x rank
    cfg = json.loads(LoraConfig(rank=8, target_modules=["q_proj"]).model_dump_json())
    assert lora.peft_config(cfg).target_modules == {"q_proj"}


def test_under_bf16_one_process_holds_a_bf16_base_in_bf16_and_trains_fp32_adapters(
    tmp_path,
):
    from agent_spo.builders import learner_rank
    from agent_spo.config import LearnerConfig, LossConfig
    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer

    tok = train_tokenizer([f"{i} plus {i} is {2 * i}" for i in range(200)], vocab_size=300)
    model = random_model(tok, hidden=32, layers=1, heads=2)
    cfg = LearnerConfig(lr=1e-2, precision="bfloat16", lora={"rank": 4})

    def build(path):
        return learner_rank(rank=0, world_size=1, model_path=str(path),
                            learner=cfg.model_dump(mode="json"),
                            loss=LossConfig().model_dump(mode="json"))  # fmt: skip

    # a float32 model keeps a float32 base: the engine samples from float32 weights
    fp32 = build(save_model_dir(model, tok, tmp_path / "fp32"))
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    learner = build(save_model_dir(model.to(torch.bfloat16), tok, tmp_path / "bf16"))
    dtypes = {n: p.dtype for n, p in learner.model.named_parameters()}
    assert {d for n, d in dtypes.items() if lora.is_adapter(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not lora.is_adapter(n)} == {torch.bfloat16}
    trajs = _trajectories(learner, 4, 300, seed=1)
    stats = learner.step(trajs, ADV[:4])
    assert math.isfinite(stats.loss) and stats.grad_norm > 0
    merged = dict(learner.named_weights())
    assert merged["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert learner.summary()["optimizer_bytes"] == 8 * learner.summary()["trainable_params"]
