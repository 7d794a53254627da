"""Bad data files and bad model paths: refused before the run directory is made, with one
line naming the key and exit code 2 (the README's code for bad input), by `train` and by
`train --dry-run` alike; nothing ever reaches for a model hub."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app

GOOD = '{"id": "a", "problem": "What is 1+1?", "answer": "2"}\n'
DATA = {
    "missing": (None, "not found"),
    "empty": ("", "no usable problems"),
    "malformed": (GOOD + "{bad\n", "not valid JSON"),
    "no_answer": ('{"id": "a", "problem": "What is 1+1?"}\n', "missing field(s) answer"),
}


def _invoke(tmp_path, *overrides, dry_run=False):
    args = ["train", *(["--dry-run"] if dry_run else []), f"run.output_dir={tmp_path / 'runs'}",
            "run.name=r", *overrides]  # fmt: skip
    t0 = time.monotonic()
    result = CliRunner().invoke(app, args)
    return result, time.monotonic() - t0


@pytest.mark.parametrize("dry_run", [False, True], ids=["train", "dry-run"])
@pytest.mark.parametrize("case", sorted(DATA))
def test_bad_data_file_exits_2_with_one_line(tmp_path, case, dry_run):
    content, message = DATA[case]
    path = tmp_path / f"{case}.jsonl"
    if content is not None:
        path.write_text(content)
    result, _ = _invoke(tmp_path, f"data.train={path}", dry_run=dry_run)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "data.train" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "r").exists()


def _model_dirs(tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "tokenizer_config.json").write_text("{}")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    a_file = tmp_path / "weights.bin"
    a_file.write_text("")
    return {
        "missing": (str(tmp_path / "nope"), "does not exist"),
        "hub_name": ("Qwen/Qwen3-8B", "never downloads"),
        "a_file": (str(a_file), "not a directory"),
        "no_config": (str(no_config), "has no config.json"),
        "no_weights": (str(no_weights), "no tokenizer.json or tokenizer_config.json; no weights"),
    }


@pytest.mark.parametrize("dry_run", [False, True], ids=["train", "dry-run"])
@pytest.mark.parametrize("case", ["missing", "hub_name", "a_file", "no_config", "no_weights"])
def test_bad_model_path_is_refused_at_once_before_the_run_dir(tmp_path, case, dry_run):
    path, message = _model_dirs(tmp_path)[case]
    result, wall = _invoke(tmp_path, f"model.path={path}", dry_run=dry_run)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "model.path" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert wall < 20  # no hub lookups (they took ~50 s against an unreachable hub)
    assert not (tmp_path / "runs" / "r").exists()  # no config.yaml to break a later --resume


@pytest.mark.parametrize("command", ["rollout", "estimate-values"])
def test_other_commands_refuse_bad_inputs_the_same_way(tmp_path, command):
    for override, message in [(f"data.train={tmp_path / 'nope.jsonl'}", "not found"),
                              (f"model.path={tmp_path / 'nope'}", "model.path")]:  # fmt: skip
        result = CliRunner().invoke(app, [command, override, f"run.output_dir={tmp_path}"])
        assert result.exit_code == EXIT_CONFIG, result.output
        assert message in result.output and "Traceback" not in result.output
