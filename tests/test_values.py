"""Offline value estimation: the values file, resumable estimation, and the tracker prior."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent_spo.algo import ValueTracker
from agent_spo.data.problems import Problem
from agent_spo.episode.runner import EpisodeDropped
from agent_spo.values import ValuesFileError, estimate_values, load_values, value_summary


class _Outcome:
    def __init__(self, reward):
        self.reward = reward


class _ScriptedRunner:
    """Rewards by prompt and sample index; 'drop' raises EpisodeDropped, None is unscored."""

    def __init__(self, script: dict[str, list]):
        self.script = script
        self.calls: list[tuple[str, int]] = []

    async def run(self, problem, *, seed=None, info=None):
        j = info["estimate"]
        self.calls.append((problem.id, j))
        await asyncio.sleep(0.001 * (j % 3))  # finish out of order
        r = self.script[problem.id][j]
        if r == "drop":
            raise EpisodeDropped("sandbox", "scripted failure", retryable=True)
        return _Outcome(r)


def _problems(*ids):
    return [Problem(id=i, problem=f"q {i}", answer="1") for i in ids]


def _key(pid: str) -> str:
    return Problem(id=pid, problem=f"q {pid}", answer="1").key


def test_estimate_counts_scores_and_never_scores_a_drop_as_zero(tmp_path):
    runner = _ScriptedRunner({"a": [1.0, 0.0, "drop", 1.0], "b": [None, 0.0, 0.0, 0.0],
                              "c": ["drop"] * 4})  # fmt: skip
    out = tmp_path / "values.jsonl"
    state = asyncio.run(estimate_values(runner, _problems("a", "b", "c"), 4, out, workers=3))
    rows = {r["prompt"]: r for r in map(json.loads, out.read_text().splitlines())}
    a, b, c = rows[_key("a")], rows[_key("b")], rows[_key("c")]
    assert sorted(a["rewards"]) == [0.0, 1.0, 1.0] and a["dropped"] == 1
    assert b["rewards"] == [0.0, 0.0, 0.0] and b["unscored"] == 1
    assert c["rewards"] == [] and c["dropped"] == 4
    assert (state.episodes, state.dropped, state.unscored) == (6, 5, 1)
    values = load_values(out)
    assert set(values) == {_key("a"), _key("b")}  # c keeps the tracker's prior
    assert value_summary(values)["never_solved"] == 0.5


def test_estimate_resumes_without_resampling_finished_prompts(tmp_path):
    out = tmp_path / "values.jsonl"
    out.write_text(f'{{"prompt": "{_key("a")}", "rewards": [1.0, 1.0]}}\n{{"prompt": "b", "rew')
    runner = _ScriptedRunner({"a": [0.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]})
    asyncio.run(estimate_values(runner, _problems("a", "b", "c"), 2, out, workers=2))
    assert sorted({k for k, _ in runner.calls}) == ["b", "c"]  # the torn "b" is redone
    values = load_values(out)
    assert values[_key("a")] == [1.0, 1.0]  # kept, not redone
    assert sorted(values[_key("b")]) == [0.0, 1.0] and values[_key("c")] == [1.0, 1.0]
    assert all(line.startswith("{") for line in out.read_text().splitlines())


def test_load_values_rejects_bad_files_naming_the_line(tmp_path):
    p = tmp_path / "v.jsonl"
    with pytest.raises(ValuesFileError, match="does not exist"):
        load_values(p)
    p.write_text('{"prompt": "a", "rewards": [1.0]}\nnot json\n{"prompt": "b", "rewards": []}\n')
    with pytest.raises(ValuesFileError, match="v.jsonl:2"):
        load_values(p)
    p.write_text('{"prompt": "a", "rewards": [1.5]}\n')
    with pytest.raises(ValuesFileError, match=r"\[0, 1\]"):
        load_values(p)
    p.write_text('{"prompt": "a", "rewards": [1.0]}\n{"prompt": "zz", "rewards": [0.0]}\n')
    with pytest.raises(ValuesFileError, match="'zz'"):
        load_values(p, known=["a", "b"])


def test_tracker_prior_from_the_values_file(tmp_path):
    p = tmp_path / "v.jsonl"
    p.write_text('{"prompt": "a", "rewards": [1.0, 0.0, 0.0, 0.0]}\n')
    tracker = ValueTracker(rho_min=0.875)
    tracker.init_from_scores(load_values(p), form="paper")
    assert tracker.alpha_beta("a") == pytest.approx((2.0, 6.0))  # N0 = 8, v0 = 1/4
    assert tracker.value("b") == 0.5  # not in the file: the prior


def _train_size(tasks: int) -> int:
    from agent_spo import builders
    from agent_spo.config import load_config

    cfg = load_config(None, [f"data.synthetic_tasks={tasks}"])
    return len(builders.build_datasets(cfg.data, cfg.run.seed)[0])


@pytest.mark.slow
def test_training_estimates_values_first_then_reuses_the_file(tmp_path):
    """A real run: n0 episodes per training prompt before step 1, the tracker's prior set
    from them; a second run given the file estimates nothing."""
    from typer.testing import CliRunner

    from agent_spo.cli import app

    common = ["learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=2",
              "rollout.max_response_tokens=128", "data.synthetic_tasks=30",
              "train.total_steps=1", "train.eval_every=0", "algo.init.n0=2",
              f"run.output_dir={tmp_path}"]  # fmt: skip
    first = CliRunner().invoke(app, ["train", *common, "run.name=a"])
    assert first.exit_code == 0, first.output
    run = tmp_path / "a"
    values = load_values(run / "values.jsonl")
    assert len(values) == _train_size(30) and all(len(r) == 2 for r in values.values())
    state = json.loads((run / "checkpoints" / "ckpt-000001" / "state.json").read_text())
    tracker = ValueTracker.from_state_dict(state["tracker"])
    unvisited = [k for k in values if k not in state["tracker"]["visits"]]
    assert unvisited, "every prompt was visited in one step of 4 episodes?"
    for k in unvisited:
        assert tracker.value(k) == pytest.approx(sum(values[k]) / 2)
        assert sum(tracker.alpha_beta(k)) == pytest.approx(8.0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["values"]["prompts"] == _train_size(30)

    again = CliRunner().invoke(
        app, ["train", *common, "run.name=b", f"algo.init.values_path={run / 'values.jsonl'}"]
    )
    assert again.exit_code == 0, again.output
    assert not (tmp_path / "b" / "values.jsonl").exists()
    assert "estimating" not in again.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["values"]["source"] == str(run / "values.jsonl")


@pytest.mark.slow
def test_estimate_values_command_writes_a_file_training_accepts(tmp_path):
    from typer.testing import CliRunner

    from agent_spo.cli import app

    out = tmp_path / "v.jsonl"
    result = CliRunner().invoke(app, ["estimate-values", "data.synthetic_tasks=20",
                                      "algo.init.n0=2", "rollout.workers=8",
                                      "rollout.max_response_tokens=128", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    values = load_values(out)
    n = _train_size(20)
    assert len(values) == n and f"{n} prompts" in result.output
    assert "algo.init.values_path=" in result.output


def test_estimate_values_refuses_to_overwrite_or_silently_reuse_a_file(tmp_path):
    from typer.testing import CliRunner

    from agent_spo.cli import EXIT_CONFIG, app

    out = tmp_path / "v.jsonl"
    out.write_text('{"prompt": "a", "rewards": [1.0]}\n')
    result = CliRunner().invoke(app, ["estimate-values", "--out", str(out)])
    assert result.exit_code == EXIT_CONFIG and "--resume" in result.output
    assert out.read_text() == '{"prompt": "a", "rewards": [1.0]}\n'


def test_a_bad_values_path_fails_training_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from agent_spo.cli import EXIT_CONFIG, app

    result = CliRunner().invoke(app, ["train", f"run.output_dir={tmp_path}",
                                      f"algo.init.values_path={tmp_path / 'missing.jsonl'}"])  # fmt: skip
    assert result.exit_code == EXIT_CONFIG
    assert "algo.init.values_path" in result.output and "does not exist" in result.output
