"""The `agent-spo` CLI skeleton: help texts, `config`, `train --dry-run`, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
runner = CliRunner()

TOP_COMMANDS = [
    "config", "train", "eval", "replay", "verify", "estimate-values", "demo-model",
    "rollout", "plot", "sandbox", "tools", "bench",
]  # fmt: skip
ALL_HELP = [[c] for c in TOP_COMMANDS] + [
    ["sandbox", "serve"],
    ["sandbox", "run"],
    ["sandbox", "bench"],
    ["tools", "list"],
    ["tools", "show"],
    ["tools", "test"],
    ["bench", "throughput"],
    ["bench", "learning"],
    ["bench", "bandit"],
    ["bench", "verify"],
]


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in TOP_COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("args", ALL_HELP, ids=" ".join)
def test_each_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_config_prints_resolved_yaml_with_overrides():
    result = runner.invoke(app, ["config", DEMO, "algo.rho.mode=constant", "learner.lr=1e-5"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["algo"]["rho"]["mode"] == "constant"
    assert float(data["learner"]["lr"]) == 1e-5
    assert data["loss"]["eps_high"] == 0.28  # defaults filled


def test_overrides_without_a_config_file():
    result = runner.invoke(app, ["config", "learner.batch_size=8"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["learner"]["batch_size"] == 8


def test_train_dry_run_prints_config():
    result = runner.invoke(app, ["train", DEMO, "--dry-run", "rollout.max_turns=1"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["rollout"]["max_turns"] == 1


def test_train_bad_override_exits_2_and_names_key():
    result = runner.invoke(app, ["train", DEMO, "algo.rho.mdoe=constant"])
    assert result.exit_code == EXIT_CONFIG
    assert "algo.rho.mdoe" in result.stderr and "did you mean 'mode'?" in result.stderr
    assert "not built" not in result.output  # failed before any work


def test_train_missing_config_exits_2():
    result = runner.invoke(app, ["train", "no/such.yaml"])
    assert result.exit_code == EXIT_CONFIG
    assert "not found" in result.stderr


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "agent-spo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent_spo.cli"]


def test_console_script_help():
    proc = subprocess.run(
        [*_console_script(), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "estimate-values" in proc.stdout


def test_help_and_config_do_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from agent_spo.cli import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['--help']).exit_code == 0\n"
        f"assert r.invoke(app, ['train', {DEMO!r}, '--dry-run']).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_version():
    from agent_spo import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"agent-spo {__version__}"


def test_verify_one_pair():
    result = runner.invoke(app, ["verify", "\\frac{1}{2}", "so the answer is \\boxed{0.5}"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("correct") and "extracted: 0.5" in result.stdout


def test_verify_json_near_miss():
    import json

    result = runner.invoke(app, ["verify", "--json", "\\frac{1}{3}", "\\boxed{0.333}"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["status"] == "incorrect" and verdict["reward"] == 0.0
    assert verdict["prediction"] == "0.333" and verdict["gold_parsed"] == "1/3"


def test_verify_file(tmp_path):
    import json

    rows = [
        {"id": "a", "gold": "204", "response": "\\boxed{204}", "label": True},
        {"id": "b", "gold": "x \\le 3", "response": "\\boxed{(-\\infty, 3]}", "label": True},
        {"id": "c", "gold": "-2, 2", "response": "\\boxed{2}", "label": False},
    ]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["verify", "--file", str(cases), "--json"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["id"], o["correct"]) for o in out] == [("a", True), ("b", True), ("c", False)]
    assert "accuracy 1.000, FP 0, FN 0" in result.stderr


@pytest.mark.parametrize("args", [["verify"], ["verify", "1"], ["verify", "1", "1", "--file", "x"]])
def test_verify_bad_usage_exits_2(args):
    assert runner.invoke(app, args).exit_code == EXIT_CONFIG


def test_bench_verify_small(tmp_path):
    import json

    result = runner.invoke(
        app,
        ["bench", "verify", "--integer", "20", "--latex", "10", "--workers", "1",
         "--mathverify-python", "", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    ours = summary["verifiers"]["ours"]
    assert ours["labelled"]["all"]["n"] == summary["n_cases"] > 100
    assert ours["throughput"]["integer"]["n"] == 20
    # 10 from MATH-500 when ../shared/data is present, else all 8 synthetic pairs
    assert ours["throughput"]["latex"]["n"] in (8, 10)
    assert (tmp_path / "per_case.jsonl").is_file()


def test_demo_model_refuses_a_directory_that_is_not_a_demo_build(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["demo-model", str(tmp_path)])
    assert result.exit_code == EXIT_CONFIG
    assert "not a demo-model directory" in result.output
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_openai_http_engine_needs_the_model_path_for_its_tokenizer():
    result = runner.invoke(app, ["config", "rollout.engine=openai_http", "rollout.url=http://x"])
    assert result.exit_code == EXIT_CONFIG
    assert "model.path is required" in result.output


def test_the_closing_line_of_train_says_what_was_evaluated():
    from agent_spo.cli.train import done_line as _done_line

    base = {"steps": 8, "train_s": 33.2, "run_dir": "/r"}
    full = {
        **base,
        "held_out_before": {"accuracy": 0.25},
        "held_out": {"accuracy": 0.9, "episodes": 223},
    }
    assert _done_line(full) == (
        "done: 8 steps in 33 s; held-out accuracy 0.250 -> 0.900 over 223 episodes; "
        "run directory /r"
    )
    only_after = {**base, "held_out": {"accuracy": 0.866, "episodes": 223}}  # eval_every=0
    assert "held-out accuracy 0.866 over 223" in _done_line(only_after)
    assert "nan" not in _done_line(only_after)
    assert "no held-out evaluation" in _done_line({**base, "plot": "/r/curves.png"})
    assert _done_line({**base, "plot": "/r/curves.png"}).endswith("; curves /r/curves.png")
