"""The `agent-spo` CLI skeleton: help texts, `config`, `train --dry-run`, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, EXIT_NOT_BUILT, app

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
runner = CliRunner()

TOP_COMMANDS = [
    "config", "train", "eval", "replay", "verify", "estimate-values", "demo-model",
    "sandbox", "tools", "bench",
]  # fmt: skip
ALL_HELP = [[c] for c in TOP_COMMANDS] + [
    ["sandbox", "serve"],
    ["sandbox", "run"],
    ["sandbox", "bench"],
    ["tools", "list"],
    ["tools", "show"],
    ["tools", "test"],
    ["bench", "throughput"],
    ["bench", "bandit"],
]
NOT_BUILT = [
    ["train", DEMO],
    ["eval", "configs/eval.yaml"],
    ["replay", "runs/demo"],
    ["replay", "runs/demo", "ep-1", "--rerun"],
    ["verify", "\\boxed{1/2}", "0.5"],
    ["estimate-values", DEMO],
    ["demo-model", "out"],
    ["sandbox", "serve"],
    ["bench", "throughput"],
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


@pytest.mark.parametrize("args", NOT_BUILT, ids=lambda a: " ".join(a[:2]))
def test_unbuilt_commands_exit_3(args):
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_NOT_BUILT, result.output
    assert "not built" in result.stderr


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
