"""`agent-spo export`: a checkpoint back as the model it came from (dtype, generation
config, tokenizer), loadable by transformers; clear errors for what is not a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from agent_spo.builders import learner_rank
from agent_spo.checkpoint import save_checkpoint
from agent_spo.cli import EXIT_CONFIG, app
from agent_spo.config import LearnerConfig, LossConfig


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A tiny model directory as a hub model comes: bf16 weights, a generation config."""
    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer

    tok = train_tokenizer([f"{i} plus {i} is {2 * i}" for i in range(200)], vocab_size=300)
    model = random_model(tok, hidden=32, layers=1, heads=2).to(torch.bfloat16)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    return save_model_dir(model, tok, tmp_path_factory.mktemp("bf16") / "model")


def test_export_writes_the_model_as_it_came(bf16_model, tmp_path):
    learner = learner_rank(rank=0, world_size=1, model_path=str(bf16_model),
                           learner=LearnerConfig().model_dump(mode="json"),
                           loss=LossConfig().model_dump(mode="json"))  # fmt: skip
    assert next(learner.model.parameters()).dtype == torch.float32  # float32 masters
    save_checkpoint(tmp_path / "ckpts", step=3, learner=learner, tokenizer=None, tracker={},
                    sampler={}, learner_version=3)  # fmt: skip
    result = CliRunner().invoke(app, ["export", str(tmp_path / "ckpts"), "--out",
                                      str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "exported ckpt-000003 (step 3)" in result.output
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert out.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert GenerationConfig.from_pretrained(str(tmp_path / "out")).temperature == 0.6
    for (name, a), b in zip(learner.named_weights(), out.state_dict().values(), strict=False):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_export_refuses_what_is_not_a_checkpoint_and_a_taken_destination(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_CONFIG and "no checkpoint" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    ckpt = tmp_path / "ckpt-000001"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 1}))
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "taken")])
    assert result.exit_code == EXIT_CONFIG and "exists and is not empty" in result.output


@pytest.fixture(scope="module")
def lora_checkpoint(bf16_model, tmp_path_factory):
    """A LoRA learner (built as `train` builds it) after two updates, checkpointed."""
    from test_learner import _trajectories

    cfg = LearnerConfig(lr=5e-2, lora={"rank": 4, "alpha": 8})
    learner = learner_rank(rank=0, world_size=1, model_path=str(bf16_model),
                           learner=cfg.model_dump(mode="json"),
                           loss=LossConfig().model_dump(mode="json"))  # fmt: skip
    trajs = _trajectories(learner, 6, 300, seed=4)
    for _ in range(2):
        learner.step(trajs, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lora") / "ckpts"
    save_checkpoint(root, step=2, learner=learner, tokenizer=AutoTokenizer.from_pretrained(
        str(bf16_model)), tracker={}, sampler={}, learner_version=2)  # fmt: skip
    return learner, root


def test_a_lora_checkpoint_exports_as_a_peft_adapter_or_merged(lora_checkpoint, bf16_model,
                                                                tmp_path):  # fmt: skip
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner, root = lora_checkpoint
    merged = dict(learner.named_weights())
    result = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "adapter"),
                                      "--dtype", "float32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "LoRA adapter (rank 4, torch.float32)" in result.output
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # the adapter alone
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(bf16_model)  # fmt: skip
    moved = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "moved"),
                                     "--base", str(tmp_path / "elsewhere")])  # fmt: skip
    assert moved.exit_code == 0, moved.output  # the adapter alone needs no base model
    assert json.loads((tmp_path / "moved" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tmp_path / "elsewhere")  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(str(bf16_model), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    for name, t in theirs.state_dict().items():
        if name in merged:
            assert torch.allclose(t, merged[name], atol=1e-6), name
    result = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "full"),
                                      "--merge"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bfloat16 with the adapter merged" in result.output
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    assert out.dtype == torch.bfloat16  # as the base model came
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(tmp_path / "full")).temperature == 0.6
    state = out.state_dict()
    for name, t in merged.items():
        assert torch.equal(t.to(torch.bfloat16), state[name]), name


def test_export_merge_and_base_refused_where_they_do_not_apply(bf16_model, lora_checkpoint,
                                                               tmp_path):  # fmt: skip
    full = learner_rank(rank=0, world_size=1, model_path=str(bf16_model),
                        learner=LearnerConfig().model_dump(mode="json"),
                        loss=LossConfig().model_dump(mode="json"))  # fmt: skip
    save_checkpoint(tmp_path / "ckpts", step=1, learner=full, tokenizer=None, tracker={},
                    sampler={}, learner_version=1)  # fmt: skip
    result = CliRunner().invoke(app, ["export", str(tmp_path / "ckpts"), "--out",
                                      str(tmp_path / "o"), "--merge"])  # fmt: skip
    assert result.exit_code == EXIT_CONFIG and "holds no LoRA adapter" in result.output
    _, root = lora_checkpoint
    result = CliRunner().invoke(app, ["export", str(root), "--out", str(tmp_path / "o"),
                                      "--merge", "--base", str(tmp_path / "nowhere")])  # fmt: skip
    assert result.exit_code == EXIT_CONFIG and "name it with --base PATH" in result.output
