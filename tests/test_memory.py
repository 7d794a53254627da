"""The learner's memory plan: exact parameter counts, sharding arithmetic, and a dry run
that prints the plan and refuses one that does not fit learner.gpu_memory_gb."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app
from agent_spo.memory import GIB, Shape, plan

# Qwen3-8B's published config.json (the decoder shape fields)
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "num_hidden_layers": 36, "intermediate_size": 12288, "vocab_size": 151936,
    "tie_word_embeddings": False,
}  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_models_own(tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      vocab_size=500, tie_word_embeddings=tied)  # fmt: skip
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    assert Shape.from_config(cfg.to_dict()).params == sum(p.numel() for p in model.parameters())


def test_qwen3_8b_is_8_2b_and_its_state_shards_over_ranks():
    shape = Shape.from_config(QWEN3_8B)
    assert shape.params == 8_190_735_360
    kw = dict(micro_batch_tokens=32768, longest_row=20480, bf16=True, checkpointing=True,
              logprob_chunk=1024, gpu_memory_gb=80)  # fmt: skip
    one, eight = plan(shape, world_size=1, **kw), plan(shape, world_size=8, **kw)
    state = lambda p: sum(b for name, b in p.rows.items() if "fp32" in name)  # noqa: E731
    assert state(one) == 16 * shape.params  # 4 + 4 + 8 bytes a parameter
    assert state(eight) == 16 * shape.params // 8
    assert one.rows["activations"] == eight.rows["activations"]  # per rank, not sharded
    assert not one.fits and one.total > 128 * GIB  # the "~128 GB cannot start"
    assert eight.fits and eight.total < 40 * GIB
    off = plan(shape, world_size=8, cpu_offload=True, **kw)
    assert off.offloaded == state(eight) and off.total < eight.total


def test_the_log_prob_rows_grow_with_the_chunk_not_the_sequence():
    shape = Shape.from_config(QWEN3_8B)
    kw = dict(world_size=8, bf16=True, checkpointing=True)
    short = plan(shape, micro_batch_tokens=4096, longest_row=4096, logprob_chunk=1024, **kw)
    long = plan(shape, micro_batch_tokens=32768, longest_row=32768, logprob_chunk=1024, **kw)
    full = plan(shape, micro_batch_tokens=32768, longest_row=32768, logprob_chunk=None, **kw)
    assert short.rows["log-prob logits"] == long.rows["log-prob logits"]
    assert full.rows["log-prob logits"] == 32 * long.rows["log-prob logits"]


def test_dry_run_prints_the_plan_and_refuses_one_that_does_not_fit(tmp_path):
    model = tmp_path / "qwen3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_8B))
    data = tmp_path / "train.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}
            for i in range(400)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "configs/qwen3_8b_spo.yaml", f"model.path={model}", "--dry-run",
            f"data.train={data}"]  # fmt: skip
    small = CliRunner().invoke(app, [*args, "learner.world_size=1", "learner.gpu_memory_gb=80"])
    text = " ".join(small.output.split())
    assert small.exit_code == EXIT_CONFIG
    assert "memory plan per GPU: 8.19B parameters, 1 learner rank(s)" in text
    assert "DOES NOT FIT learner.gpu_memory_gb = 80" in text
    assert "learner.gpu_memory_gb: the learner needs" in text
    fits = CliRunner().invoke(app, [*args, "learner.world_size=8", "learner.gpu_memory_gb=80"])
    text = " ".join(fits.output.split())
    assert "fits learner.gpu_memory_gb = 80" in text
    assert "learner.gpu_memory_gb:" not in text  # only the missing weights are refused
    assert "has no tokenizer.json" in text
    # the setting, as the paper ran it (spec §3, §6)
    assert ("rollout: spo, thinking on, retool tool calls, up to 9 turns and 16384 generated "
            "tokens in all") in text  # fmt: skip
    assert ("reward: the verifier's, and 0 unless exactly one </think> and no tool call "
            "after </think>") in text  # fmt: skip
    assert ("regime: fresh batches (learner.max_staleness 0), old log-probs recomputed by "
            "the learner: the paper's") in text  # fmt: skip
    streaming = CliRunner().invoke(app, [*args, "learner.world_size=8", "learner.max_staleness=4",
                                         "loss.logp_old=decoupled", "loss.tis_cap=2"])  # fmt: skip
    text = " ".join(streaming.output.split())
    assert ("regime: streaming (episodes up to 4 versions stale), decoupled: the clip centred "
            "on the learner's recomputed log-probs, each token weighted by pi_recomputed / "
            "pi_behaviour capped at 2") in text  # fmt: skip


def test_under_torchrun_the_plan_uses_the_launchers_world_size(tmp_path, monkeypatch):
    from agent_spo.config import load_config
    from agent_spo.memory import check_memory

    model = tmp_path / "qwen3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_8B))
    cfg = load_config("configs/qwen3_8b_spo.yaml",
                      [f"model.path={model}", "learner.world_size=1"])  # fmt: skip
    assert check_memory(cfg)[1]  # one rank: refused
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    plan8, problems = check_memory(cfg)
    assert plan8.world_size == 8 and not problems


def test_a_colocated_engine_is_counted_beside_the_learners_state_and_refused_when_too_big(
    tmp_path,
):
    from agent_spo.config import load_config
    from agent_spo.memory import check_memory

    model = tmp_path / "qwen3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_8B))

    def cfg(*extra):
        return load_config("configs/qwen3_8b_spo.yaml", [f"model.path={model}", *extra])

    alone, _ = check_memory(cfg())
    shared, problems = check_memory(cfg("rollout.colocate=true"))
    assert problems == [] and alone.engine_weights == 0
    assert shared.total == alone.total  # the engine sleeps through the learner's step
    assert shared.engine_weights == 2 * shared.shape.params  # bf16, the whole model
    state = 16 * shared.shape.params // 8  # fp32 weights, gradients, AdamW moments, 1/8
    assert shared.resident == state + 2 * GIB  # plus the CUDA/NCCL reserve
    assert "while generating" in shared.table()
    # many ranks and short rows: the learner's step needs 15.5 GiB, generation 21.1
    small = ["learner.world_size=32", "learner.micro_batch_tokens=4096",
             "rollout.max_response_tokens=2048", "rollout.colocate=true"]  # fmt: skip
    plan18, refused = check_memory(cfg(*small, "learner.gpu_memory_gb=18"))
    assert plan18.total < 18 * GIB < plan18.generating
    assert len(refused) == 1 and refused[0].startswith("rollout.colocate: with the engine's")


def test_the_single_gpu_lora_config_fits_one_80gb_gpu_beside_its_colocated_engine(tmp_path):
    """configs/qwen3_8b_spo_lora.yaml: Qwen3-8B, LoRA rank 32 on every linear layer, one
    GPU shared with a sleeping vLLM engine. Full fine-tuning on that GPU does not fit."""
    from agent_spo.config import load_config
    from agent_spo.memory import check_memory

    model = tmp_path / "qwen3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_8B))
    cfg = load_config("configs/qwen3_8b_spo_lora.yaml", [f"model.path={model}"])
    assert (cfg.learner.world_size, cfg.rollout.colocate, cfg.learner.lora.rank) == (1, True, 32)
    found, problems = check_memory(cfg)
    assert problems == [] and found.fits
    shape = found.shape
    # rank x (in + out) of q, k, v, o, gate, up, down, in each of 36 blocks
    per_block = 32 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 12288) * 3)
    assert found.lora_params == 36 * per_block == 87_293_952
    assert found.rows["frozen base (bf16)"] == 2 * shape.params
    assert found.rows["AdamW moments (fp32)"] == 8 * found.lora_params
    assert "bf16 weight copies" not in found.rows  # bf16 weights need no autocast copy
    assert found.engine_weights == 2 * shape.params
    assert found.total < 40 * GIB and found.generating < 40 * GIB  # room for the KV cache
    full, refused = check_memory(load_config(
        "configs/qwen3_8b_spo_lora.yaml", [f"model.path={model}", "learner.lora.rank=0"]))  # fmt: skip
    assert not full.fits and refused and refused[0].startswith("learner.gpu_memory_gb")
    table = found.table()
    assert "8.19B parameters + 87.3M LoRA, 1 learner rank(s)" in table
    # targets the plan names by their last part; ones it cannot place count as all-linear
    attention = 36 * 32 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    for targets, expected in ((["self_attn.q_proj", "k_proj", "v_proj", "o_proj"], attention),
                              ([r".*\.(q|v)_proj"], 87_293_952)):  # fmt: skip
        assert shape.lora_params(32, targets) == expected
