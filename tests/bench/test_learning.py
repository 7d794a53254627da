"""`agent-spo bench learning` end to end at toy size: runs, aggregates, reuses finished runs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app

pytestmark = pytest.mark.slow

TOY = ["learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=2",
       "rollout.max_response_tokens=96", "data.synthetic_tasks=24", "train.total_steps=2",
       "train.eval_every=1", "algo.init.n0=1", "train.plot=false"]  # fmt: skip


def test_learning_bench_runs_every_variant_and_seed_then_reuses_them(tmp_path):
    args = ["bench", "learning", *TOY, "--seeds", "0,1", "--variants", "spo,grpo,no_baseline",
            "--out", str(tmp_path)]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads((tmp_path / "learning.json").read_text())
    assert set(result["variants"]) == {"spo", "grpo", "no_baseline"}
    for v in result["variants"].values():
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert list(v["curve"]) == ["0", "1", "2"]  # eval before and after each step
        assert v["trained_trajectories"] == 8  # 2 steps x 4: equal for every variant
        finals = [r["final"] for r in v["runs"]]
        assert v["final_mean"] == pytest.approx(sum(finals) / 2)
    # no_baseline reused spo's offline estimate instead of sampling its own
    assert not (tmp_path / "no_baseline-s0" / "values.jsonl").exists()
    assert (tmp_path / "spo-s0" / "values.jsonl").exists()
    assert result["variants"]["grpo"]["runs"][0]["estimate_prompts"] == 0
    assert "| grpo |" in (tmp_path / "learning.md").read_text()
    assert (tmp_path / "learning.png").read_bytes()[:4] == b"\x89PNG"

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("reused") == 6


def test_learning_bench_rejects_an_unknown_variant_before_work(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "learning", "--variants", "spo,ppo", "--out", str(tmp_path)]
    )
    assert result.exit_code == EXIT_CONFIG and "ppo" in result.output
    assert not any(tmp_path.iterdir())
