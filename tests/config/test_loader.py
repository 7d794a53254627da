"""Config loading: overrides, round trip, error messages, and the loader's public API."""

from pathlib import Path

import pytest
from pydantic import Field

from agent_spo.config import (
    ConfigError,
    Section,
    TrainConfig,
    load_config,
    load_yaml_config,
    write_resolved,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ROOT = CONFIGS.parent


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


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


def test_on_and_off_are_words_for_choices_and_booleans_for_flags(tmp_path):
    # YAML 1.1 would read `on` as true and fail the 'auto'/'on'/'off' choice.
    cfg = load_config(None, ["learner.gradient_checkpointing=on", "algo.baseline=no"])
    assert cfg.learner.gradient_checkpointing == "on" and cfg.algo.baseline is False
    path = _yaml(
        tmp_path, "learner:\n  gradient_checkpointing: off\nrollout:\n  prefix_cache: off\n"
    )
    cfg = load_config(path)
    assert cfg.learner.gradient_checkpointing == "off" and cfg.rollout.prefix_cache is False


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
    assert (
        "allowed keys under 'algo.rho': constant, d_half, mode, probe_tokens, rho_max, rho_min"
        in msg
    )
    assert "did you mean 'mode'?" in msg
    assert "line 3" in msg


def test_unknown_override_key_with_suggestion():
    msg = _error(None, ["algo.rho.mdoe=constant"])
    assert (
        "unknown key 'algo.rho.mdoe'; allowed keys under 'algo.rho': "
        "constant, d_half, mode, probe_tokens, rho_max, rho_min (did you mean 'mode'?)"
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


# --- any schema: load_yaml_config ------------------------------------------------------


class _Item(Section):
    path: str
    """A file."""

    weight: float = Field(1.0, gt=0)
    """A weight. > 0."""


class _Part(Section):
    items: list[_Item] = Field(min_length=1)
    """Items, at least one."""

    n: int = Field(2, ge=1)
    """A count. >= 1."""


class _Top(Section):
    part: _Part
    """A required section."""


def test_load_yaml_config_validates_any_section_schema(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("part:\n  items:\n    - path: a\n")
    cfg = load_yaml_config(_Top, path, ["part.n=3"])
    assert isinstance(cfg, _Top) and cfg.part.n == 3 and cfg.part.items[0].path == "a"


def test_load_yaml_config_names_keys_in_lists_with_their_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("part:\n  items:\n    - path: a\n      wieght: 2\n    - weight: 0\n    - 5\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_config(_Top, path, ["part.nn=1"])
    problems = info.value.problems
    assert problems[0] == (
        "unknown key 'part.nn'; allowed keys under 'part': items, n (did you mean 'n'?)"
    )
    assert (
        "unknown key 'part.items[0].wieght'; allowed keys under 'part.items[0]': path, weight "
        f"(did you mean 'weight'?) ({path} line 4)"
    ) in problems
    assert f"part.items[1].path: required; expected a string ({path} line 5)" in problems
    assert f"part.items[1].weight: expected a number > 0, got 0 ({path} line 5)" in problems
    assert f"part.items[2]: expected a mapping with keys path, weight, got 5 ({path} line 6)" in (
        problems
    )
    assert len(problems) == 5


def test_load_yaml_config_reports_a_missing_required_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_yaml_config(_Top, path)
    assert info.value.problems == ["part: required; expected a mapping with keys items, n"]
    with pytest.raises(ConfigError) as info:
        load_yaml_config(_Top, None, ["part.n=1"])
    assert info.value.problems == [
        "part.items: required; expected a list of mappings with keys path, weight (at least 1 item)"
    ]  # not blamed on the override, which set another key


def test_eval_config_errors_name_the_file_line(tmp_path):
    from agent_spo.evaluate.config import load_eval_config

    data = tmp_path / "d.jsonl"
    data.write_text('{"id": 1, "problem": "p", "answer": "1"}\n')
    path = tmp_path / "e.yaml"
    path.write_text(f"eval:\n  datasets:\n    - path: {data}\n  n: 0\nrollout:\n  tmp: 1\n")
    with pytest.raises(ConfigError) as info:
        load_eval_config(path, ["eval.k=[1]"])
    problems = info.value.problems
    assert f"eval.n: expected an integer >= 1, got 0 ({path} line 4)" in problems
    (unknown,) = [p for p in problems if p.startswith("unknown key 'rollout.tmp'")]
    assert "allowed keys under 'rollout': " in unknown and unknown.endswith(f"({path} line 6)")
    assert len(problems) == 2


def test_no_module_imports_private_names_from_the_config_package():
    import ast

    bad = []
    for py in sorted((ROOT / "agent_spo").rglob("*.py")):
        if "config" in py.relative_to(ROOT / "agent_spo").parts[:1]:
            continue
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "agent_spo.config"
            ):
                bad += [f"{py.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert bad == []
