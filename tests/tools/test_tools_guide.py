"""docs/tools.md's four commands, from an empty directory, as the guide writes them.

The first three run exactly. The fourth, `agent-spo train digits_demo.yaml`, is checked
as written with --dry-run (every reference resolved, the tool demo's settings accepted),
then run for real at test size: the tool demo's warm start shortened, two SPO steps on
the tool's tasks, and the tool called through the sandbox in those episodes. Its full
run (400 warm-start steps, 40 SPO steps) is measured in the guide.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "tools.md"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, however it is installed
SMALL = [
    "learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=2",
    "rollout.max_response_tokens=128", "data.synthetic_tasks=40", "train.eval_every=0",
    "algo.init.mode=none", "train.total_steps=2", "train.checkpoint_every=2",
]  # fmt: skip


def guide_commands() -> list[list[str]]:
    """The commands of the guide's first bash block, without their comments."""
    block = re.search(r"```bash\n(.*?)```", GUIDE.read_text(), re.S)
    assert block is not None, "docs/tools.md lost its commands"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line]


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    if argv[0] == "agent-spo":
        argv = [sys.executable, "-m", "agent_spo.cli", *argv[1:]]
    elif argv[0] == "pytest":
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_the_guides_four_commands_go_from_an_empty_directory_to_training(tmp_path):
    from agent_spo.demo.tool_demo import ToolDemoSettings, build_tool_demo_model

    new, test, pytest_, train = guide_commands()
    assert new == ["agent-spo", "tools", "new", "digits"]
    assert train == ["agent-spo", "train", "digits_demo.yaml"]

    r = run(new, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits.py", "digits_demo.yaml", "test_digits.py",
    ]  # fmt: skip
    r = run(test, tmp_path)
    assert r.returncode == 0 and "5621 in base 7; digit sum 14" in r.stdout, r.stderr
    r = run(pytest_, tmp_path)
    assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout + r.stderr
    r = run([*train, "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"demo_tool: {tmp_path}/digits.py" in r.stdout  # recorded absolute

    # the fourth command at test size: a short warm start, two SPO steps
    model = build_tool_demo_model(
        tmp_path / "model", str(tmp_path / "digits.py"),
        ["python", str(tmp_path / "digits.py")], 256,
        ToolDemoSettings(tasks=300, copy_steps=60, steps=20, batch_size=16),
        log=lambda _: None,
    )  # fmt: skip
    r = run([*train, f"model.path={model}", "model.demo_tool=null", *SMALL,
             f"run.output_dir={tmp_path}/runs"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    episodes = [
        json.loads(x)
        for x in (tmp_path / "runs/digits-demo/episodes.jsonl").read_text().splitlines()
    ]
    assert len(episodes) == 8
    calls = [c for e in episodes for c in e["tool_calls"]]
    assert calls, "no episode called a tool"
    digits = [c for c in calls if c["name"] == "digits"]
    assert digits and all(c["fault"] != "infrastructure" for c in calls)
    assert all(set(c["arguments"] or {}) <= {"n", "base"} for c in digits)
    assert any("in base" in c["observation"] for c in digits)  # the user's code answered
