"""Config loading: defaults, shipped YAMLs, overrides, round trip, and error messages."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from agent_spo.config import ConfigError, TrainConfig, load_config, write_resolved

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def _sections(model: type[BaseModel]):
    yield model
    for info in model.model_fields.values():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _sections(info.annotation)


# --- defaults and shipped files --------------------------------------------------------


def test_defaults_validate_and_match_spec():
    cfg = load_config(None)
    assert cfg == TrainConfig()
    assert cfg.algo.name == "spo"
    assert (cfg.algo.rho.rho_min, cfg.algo.rho.rho_max, cfg.algo.rho.d_half) == (0.875, 0.96, 0.06)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.dual_clip_c) == (0.2, 0.28, 10.0)
    assert cfg.algo.sampler.eps == 0.05 and cfg.algo.init.n0 == 4  # demo size; paper 8 (qwen3_8b)
    assert cfg.learner.betas == (0.9, 0.999)


def test_every_field_is_documented_and_sections_forbid_extras():
    for model in _sections(TrainConfig):
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize(
    "name", ["demo.yaml", "demo_grpo.yaml", "qwen3_8b_spo.yaml", "qwen3_8b_grpo.yaml"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig)


def test_demo_yaml_equals_defaults():
    # `agent-spo train` with no config promises to run the demo.
    assert load_config(CONFIGS / "demo.yaml") == TrainConfig()


def test_grpo_demo_matches_spo_demo_budget():
    spo = load_config(CONFIGS / "demo.yaml")
    grpo = load_config(CONFIGS / "demo_grpo.yaml")
    assert grpo.algo.name == "grpo" and grpo.algo.sampler.mode == "uniform"
    assert grpo.learner.batch_size == spo.learner.batch_size  # 8 prompts x 4 = 32 x 1
    assert grpo.learner.batch_size % grpo.algo.grpo.group_size == 0


def test_paper_config_values():
    cfg = load_config(CONFIGS / "qwen3_8b_spo.yaml")
    assert cfg.learner.batch_size == 2048 and cfg.learner.mini_batches == 8
    assert cfg.learner.lr == 1e-6
    assert (
        cfg.rollout.max_response_tokens == 16384 and cfg.rollout.max_turns == 9
    )  # 8 tool calls + the answer turn
    assert cfg.rollout.engine == "vllm" and cfg.rollout.tool_format == "retool"
    assert cfg.rollout.temperature == 1.0
    assert cfg.algo.name == "spo" and cfg.algo.init.mode == "paper" and cfg.algo.init.n0 == 8
    assert (cfg.algo.rho.rho_min, cfg.algo.rho.rho_max, cfg.algo.rho.d_half) == (0.875, 0.96, 0.06)
    assert (cfg.loss.eps_low, cfg.loss.eps_high) == (0.2, 0.28)
    assert cfg.algo.sampler.mode == "prioritized" and cfg.algo.sampler.eps == 0.05


def test_held_out_evaluation_samples_as_the_paper_evaluates():
    t = TrainConfig().train  # spec §7: T 0.6, top_p 0.95, top_k 20
    assert (t.eval_temperature, t.eval_top_p, t.eval_top_k) == (0.6, 0.95, 20)


def test_paper_grpo_config_is_matched_to_spo():
    """Spec §5: the same everything except the algorithm: 256 prompts x 8 vs 2048 x 1."""
    spo = load_config(CONFIGS / "qwen3_8b_spo.yaml")
    grpo = load_config(CONFIGS / "qwen3_8b_grpo.yaml")
    assert grpo.algo.name == "grpo" and grpo.algo.grpo.group_size == 8
    assert grpo.algo.sampler.mode == "uniform"
    assert grpo.learner.batch_size // grpo.algo.grpo.group_size == 256
    for section in ("model", "data", "loss", "learner", "rollout", "sandbox", "verifier"):
        assert getattr(grpo, section) == getattr(spo, section), section
    assert grpo.train.model_dump() == spo.train.model_dump()


# --- overrides --------------------------------------------------------------------------


def test_issue_example_overrides():
    cfg = load_config(CONFIGS / "demo.yaml", ["algo.rho.mode=constant", "learner.lr=1e-5"])
    assert cfg.algo.rho.mode == "constant"
    assert cfg.learner.lr == 1e-5


def test_override_value_types():
    cfg = load_config(
        None,
        [
            "learner.lr=1e-5",
            "learner.betas=[0.9,0.95]",
            "learner.batch_size=32",
            "algo.baseline=false",
            "loss.dual_clip_c=null",
            "data.max_prompts=100",
            "run.name=123",  # a string field keeps the text
            "rollout.temperature=1",  # an int for a float field becomes a float
        ],
    )
    assert type(cfg.learner.lr) is float and cfg.learner.lr == 1e-5
    assert cfg.learner.betas == (0.9, 0.95)
    assert type(cfg.learner.batch_size) is int and cfg.learner.batch_size == 32
    assert cfg.algo.baseline is False
    assert cfg.loss.dual_clip_c is None
    assert cfg.data.max_prompts == 100
    assert cfg.run.name == "123"
    assert type(cfg.rollout.temperature) is float


def test_yaml_file_reads_exponent_without_dot_as_float(tmp_path):
    cfg = load_config(_yaml(tmp_path, "learner:\n  lr: 3e-5\n"))
    assert type(cfg.learner.lr) is float and cfg.learner.lr == 3e-5


def test_overrides_apply_on_top_of_file(tmp_path):
    path = _yaml(tmp_path, "learner:\n  lr: 0.5\n  batch_size: 8\n")
    cfg = load_config(path, ["learner.lr=0.25"])
    assert cfg.learner.lr == 0.25 and cfg.learner.batch_size == 8


def test_whole_section_override():
    cfg = load_config(None, ["algo.rho={mode: constant, constant: 0.9}"])
    assert cfg.algo.rho.mode == "constant" and cfg.algo.rho.constant == 0.9


# --- round trip -------------------------------------------------------------------------


def test_write_resolved_round_trip(tmp_path):
    cfg = load_config(
        CONFIGS / "qwen3_8b_spo.yaml", ["loss.dual_clip_c=null", "learner.betas=[0.8,0.9]"]
    )
    out = write_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml"
    assert load_config(out) == cfg
    text = out.read_text()
    # Keys in model order, every default filled.
    tops = [line[:-1] for line in text.splitlines() if line[:1].isalpha()]
    assert tops == list(TrainConfig.model_fields)
    assert "rho_max: 0.96" in text


# --- errors -----------------------------------------------------------------------------


def test_unknown_yaml_key(tmp_path):
    msg = _error(_yaml(tmp_path, "algo:\n  rho:\n    mdoe: constant\n"))
    assert "unknown key 'algo.rho.mdoe'" in msg
    assert "allowed keys under 'algo.rho': constant, d_half, mode, rho_max, rho_min" in msg
    assert "did you mean 'mode'?" in msg
    assert "line 3" in msg


def test_unknown_override_key_with_suggestion():
    msg = _error(None, ["algo.rho.mdoe=constant"])
    assert (
        "unknown key 'algo.rho.mdoe'; allowed keys under 'algo.rho': "
        "constant, d_half, mode, rho_max, rho_min (did you mean 'mode'?)"
    ) in msg


def test_unknown_top_level_section():
    msg = _error(None, ["lerner.lr=1"])
    assert "unknown key 'lerner'" in msg and "did you mean 'learner'?" in msg


def test_bad_literal():
    msg = _error(None, ["algo.rho.mode=konstant"])
    assert (
        "algo.rho.mode: got 'konstant'; allowed values: 'kl_version', 'kl_exact', 'constant'" in msg
    )


def test_wrong_type():
    msg = _error(None, ["learner.lr=abc"])
    assert "learner.lr: expected a number > 0, got 'abc'" in msg


def test_out_of_range(tmp_path):
    msg = _error(_yaml(tmp_path, "algo:\n  sampler:\n    gamma: 1.5\n"))
    assert "algo.sampler.gamma: expected a number >= 0 and <= 1, got 1.5" in msg
    assert "line 3" in msg
    assert "loss.dual_clip_c: expected a number > 1 or null, got 0.5" in _error(
        None, ["loss.dual_clip_c=0.5"]
    )

    assert "learner.batch_tokens: expected an integer >= 1 or null, got 0" in _error(
        None, ["learner.batch_tokens=0"]
    )
    assert load_config(None, ["learner.batch_tokens=4096"]).learner.batch_tokens == 4096
    assert load_config(None, []).learner.batch_tokens is None  # by count, as the paper


def test_rho_min_above_rho_max():
    msg = _error(None, ["algo.rho.rho_min=0.99"])
    assert "algo.rho.rho_min (0.99) must be <= algo.rho.rho_max (0.96)" in msg


def test_cross_section_rule_names_both_keys():
    msg = _error(None, ["algo.name=grpo", "algo.grpo.group_size=5"])
    assert "learner.batch_size" in msg and "algo.grpo.group_size" in msg


def test_override_without_equals():
    msg = _error(None, ["learner.lr"])
    assert "override 'learner.lr' has no '='" in msg and "key.path=value" in msg


def test_override_into_a_value():
    msg = _error(None, ["learner.lr.x=1"])
    assert "'learner.lr' is a value, not a section" in msg


def test_override_into_a_non_mapping_in_the_file(tmp_path):
    msg = _error(_yaml(tmp_path, "algo:\n  rho: 5\n"), ["algo.rho.mode=constant"])
    assert "'algo.rho' holds 5, not a mapping" in msg


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.yaml")
    assert "config file not found" in msg and "nope.yaml" in msg


def test_malformed_yaml_reports_line(tmp_path):
    msg = _error(_yaml(tmp_path, "run:\n  name: demo\nlearner:\n  lr: [1e-5\n  batch_size: 4\n"))
    assert "not valid YAML" in msg and "line " in msg


def test_top_level_not_a_mapping(tmp_path):
    msg = _error(_yaml(tmp_path, "- a\n- b\n"))
    assert "top level must be a mapping" in msg


def test_section_given_as_scalar(tmp_path):
    msg = _error(_yaml(tmp_path, "learner: 5\n"))
    assert "learner: expected a mapping" in msg and "got 5" in msg


def test_duplicate_yaml_key(tmp_path):
    msg = _error(_yaml(tmp_path, "learner:\n  lr: 0.1\n  lr: 0.2\n"))
    assert "duplicate key 'learner.lr'" in msg and "lines 2 and 3" in msg


def test_empty_file_means_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == TrainConfig()


def test_all_errors_reported_together(tmp_path):
    path = _yaml(tmp_path, "learner:\n  lr: -1\n  bacth_size: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["algo.rho.mode=konstant", "rollout.top_k=0", "oops"])
    err = info.value
    assert len(err.problems) == 5
    msg = str(err)
    for needle in (
        "learner.lr: expected a number > 0, got -1",
        "unknown key 'learner.bacth_size'",
        "algo.rho.mode: got 'konstant'",
        "rollout.top_k",
        "override 'oops' has no '='",
    ):
        assert needle in msg
    assert len(msg.splitlines()) == 1 + 5  # a header, then one line per problem


def test_assignment_is_validated():
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.learner.lr = -1.0
