"""The config schema: defaults, shipped YAMLs, section rules, and what validation refuses."""

from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app
from agent_spo.config import ConfigError, TrainConfig, check_trainable, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = ["demo.yaml", "demo_grpo.yaml", "qwen3_8b_spo.yaml", "qwen3_8b_grpo.yaml"]


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


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


@pytest.mark.parametrize("name", SHIPPED)
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
    # the paper ran Qwen3 thinking, with the reference reward's conditions (spec §6)
    assert cfg.rollout.enable_thinking is True
    assert cfg.reward.one_think_close and cfg.reward.no_tool_call_after_think
    assert cfg.sandbox.timeout_s == 30.0  # the reference's per-call limit
    assert cfg.data.max_prompt_tokens == 2048  # the paper's prompt cap
    assert cfg.data.held_out == 0 and cfg.data.held_out_file.endswith("aime2024.jsonl")
    # the paper's regime: fresh batches, old log-probs recomputed, no importance weight
    assert cfg.learner.max_staleness == 0 and cfg.loss.logp_old == "recompute"
    assert cfg.loss.tis_cap is None
    demo = load_config(CONFIGS / "demo.yaml")
    assert not demo.reward.one_think_close and not demo.reward.no_tool_call_after_think


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
    for section in ("model", "data", "loss", "learner", "rollout", "sandbox", "verifier",
                    "reward"):  # fmt: skip
        assert getattr(grpo, section) == getattr(spo, section), section
    assert grpo.train.model_dump() == spo.train.model_dump()


def test_rho_min_above_rho_max():
    msg = _error(None, ["algo.rho.rho_min=0.99"])
    assert "algo.rho.rho_min (0.99) must be <= algo.rho.rho_max (0.96)" in msg


def test_cross_section_rule_names_both_keys():
    msg = _error(None, ["algo.name=grpo", "algo.grpo.group_size=5"])
    assert "learner.batch_size" in msg and "algo.grpo.group_size" in msg


def test_assignment_is_validated():
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.learner.lr = -1.0


# --- options no command honours: schema errors ------------------------------------------


def test_the_removed_kl_coef_says_why_wherever_it_is_set(tmp_path):
    msg = _error(None, ["loss.kl_coef=0.1"])
    assert "'loss.kl_coef' was removed: a KL penalty to a reference policy is not offered" in msg
    assert "'loss.kl_coef' was removed" in _error(None, ["loss.kl_coef=0"])  # even off
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  eps_low: 0.2\n  kl_coef: 0.05\n")
    msg = _error(path)
    assert "'loss.kl_coef' was removed" in msg and "line 3" in msg


def test_the_entropy_bonus_is_an_option():
    assert load_config(None, ["loss.entropy_coef=0.01"]).loss.entropy_coef == 0.01
    assert "loss.entropy_coef: expected a number >= 0, got -1" in _error(
        None, ["loss.entropy_coef=-1"]
    )


@pytest.mark.parametrize("override", ["loss.kl_coef=0.1"])
@pytest.mark.parametrize("command", [["config"], ["train", "--dry-run"], ["train"]])
def test_commands_refuse_the_loss_terms_before_any_work(tmp_path, command, override):
    args = [*command, override, f"run.output_dir={tmp_path}", "run.name=t"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert override.split("=")[0] in result.output
    assert not any(tmp_path.iterdir())  # no run directory, no resolved config


def test_a_tis_cap_needs_the_decoupled_objective_and_names_both_keys():
    msg = _error(None, ["loss.tis_cap=2"])
    assert "loss.tis_cap = 2" in msg and "needs loss.logp_old = decoupled" in msg
    assert "(from override 'loss.tis_cap=2')" in msg
    cfg = load_config(None, ["loss.tis_cap=2", "loss.logp_old=decoupled"])
    assert cfg.loss.tis_cap == 2.0
    assert "loss.tis_cap: expected a number > 0" in _error(
        None, ["loss.tis_cap=0", "loss.logp_old=decoupled"]
    )


# --- options only training cannot honour: check_trainable -------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_trainable(name):
    assert check_trainable(load_config(CONFIGS / name)) == []


def test_kl_exact_is_trainable():
    cfg = load_config(None, ["algo.rho.mode=kl_exact"])
    assert cfg.algo.rho.mode == "kl_exact" and check_trainable(cfg) == []


def test_openai_http_takes_one_url_or_a_pool_and_trains_on_either():
    http = ["rollout.engine=openai_http", "model.path=m"]
    one = load_config(None, [*http, "rollout.url=http://x"])
    assert check_trainable(one) == []  # train syncs it as a pool of one
    pool = load_config(None, [*http, "rollout.urls=[http://a:1, http://b:2]"])
    assert pool.rollout.urls == ["http://a:1", "http://b:2"] and check_trainable(pool) == []
    for extra, message in [
        ([], "rollout.url or rollout.urls is required"),
        (["rollout.url=http://x", "rollout.urls=[http://a]"], "not both"),
        (["rollout.urls=[http://a, http://a]"], "listed twice"),
        (["rollout.urls=[http://a]", "rollout.sync_timeout_s=0"], "rollout.sync_timeout_s"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*http, *extra])


def test_workers_are_checked_against_the_training_prompts_when_known():
    cfg = load_config(None, ["rollout.workers=40"])
    assert check_trainable(cfg) == []  # the split's size is not known from the config
    assert check_trainable(cfg, train_prompts=40) == []
    (problem,) = check_trainable(cfg, train_prompts=39)
    assert problem == (
        "rollout.workers keeps 40 prompts in flight but there are only 39 training "
        "prompts; lower rollout.workers"
    )
    grpo = load_config(None, ["algo.name=grpo", "algo.grpo.group_size=4", "rollout.workers=40"])
    assert check_trainable(grpo, train_prompts=10) == []  # 40 workers = 10 groups


def test_every_refusal_is_listed_at_once():
    cfg = load_config(
        None,
        ["rollout.workers=4", "rollout.engine=openai_http", "rollout.url=http://x",
         "model.path=m"],
    )  # fmt: skip
    problems = check_trainable(cfg, train_prompts=1)
    assert [p.split(" ")[0] for p in problems] == ["rollout.workers"]
