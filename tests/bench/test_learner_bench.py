"""`agent-spo bench learner`: replays logged batches through one learner per probe setting."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent_spo.bench.learner import logged_batches, run_learner_bench
from agent_spo.cli import EXIT_CONFIG, app


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny model directory and an episode log of 4 steps x 6 trained trajectories."""
    import random

    from agent_spo.demo.model import random_model, save_model_dir
    from agent_spo.demo.tokenizer import train_tokenizer
    from agent_spo.episode.trajectory import Segment, Trajectory

    tmp = tmp_path_factory.mktemp("bench_learner")
    tok = train_tokenizer([f"{i} times {i + 3} is {i * (i + 3)}" for i in range(200)],
                          vocab_size=300)  # fmt: skip
    model_dir = save_model_dir(random_model(tok, seed=0, hidden=32, layers=1, heads=2), tok,
                               tmp / "model")  # fmt: skip
    rng = random.Random(0)
    lines = []
    for step in range(1, 5):
        for j in range(6):
            resp = [rng.randrange(3, 300) for _ in range(rng.randint(4, 12))]
            t = Trajectory(f"p{j}", [rng.randrange(3, 300) for _ in range(10)],
                           [Segment("model", resp, [-5.0] * len(resp), step - 1)])  # fmt: skip
            rec = json.loads(t.to_json())
            rec["train"] = {"step": step, "adv": 1.0 if j % 2 else -1.0}
            lines.append(json.dumps(rec))
    log = tmp / "episodes.jsonl"
    log.write_text("\n".join(lines) + "\n")
    return model_dir, log


def test_logged_batches_come_back_by_step_with_their_advantages(logged):
    _, log = logged
    batches = logged_batches(log, limit=3)
    assert [len(t) for t, _ in batches] == [6, 6, 6]
    assert batches[0][1] == [-1.0, 1.0] * 3


def test_every_probe_setting_is_timed_against_the_whole_batch(logged):
    model_dir, log = logged
    report = run_learner_bench(log, model_path=str(model_dir), probes=(None, 8, 10_000),
                               batches=3)  # fmt: skip
    rows = {r["probe_tokens"]: r for r in report["rows"]}
    assert report["batches"] == 3 and rows[None]["vs_full"] == 1.0
    assert rows[None]["drift_rel_error_median"] == 0.0  # compared with itself
    assert rows[10_000]["drift_rel_error_max"] == 0.0  # a probe over the batch is the batch
    assert rows[8]["step_s_median"] > 0 and rows[8]["drift_mean"] > 0
    assert report["plain_loop_step_s_median"] > 0 and report["plain_loop_vs_full"] > 0


def test_plain_loop_raises_the_likelihood_of_positively_advantaged_tokens(logged):
    import torch
    from transformers import AutoModelForCausalLM

    from agent_spo.bench.learner import PlainLoop
    from agent_spo.learner import Learner

    model_dir, log = logged
    trajs, _ = logged_batches(log, limit=1)[0]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    scorer = Learner(model)
    before = scorer.token_logprobs(trajs[:1])[0].sum()
    loop = PlainLoop(model, lr=1e-2, pad=0)
    for _ in range(3):
        loop.step(trajs[:1], [1.0])
    assert scorer.token_logprobs(trajs[:1])[0].sum() > before  # the loss's sign and shift


def test_cli_refuses_bad_probe_sizes_and_a_log_without_training(tmp_path, logged):
    model_dir, log = logged
    bad = CliRunner().invoke(app, ["bench", "learner", "--episodes", str(log), "--probes", "x"])
    assert bad.exit_code == EXIT_CONFIG and "--probes" in bad.output
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    result = CliRunner().invoke(
        app, ["bench", "learner", "--episodes", str(empty), "--model", str(model_dir)]
    )
    assert result.exit_code == EXIT_CONFIG and "no trained trajectories" in result.output


def test_scale_rows_time_the_plain_loop_and_each_world_size(logged):
    """The ~24M-parameter model on the logged batches: the plain loop, one process and two
    gloo ranks, each with tokens/s and every process's peak memory; the first step's loss
    is the same at both world sizes (the same update, sharded)."""
    from agent_spo.bench.learner import run_scale_bench

    model_dir, log = logged
    report = run_scale_bench(log, model_path=str(model_dir), world_sizes=(1, 2), batches=1)
    assert 20e6 < report["parameters"] < 30e6
    plain, one, packed, adapted, two = report["rows"]
    assert [r["world_size"] for r in report["rows"]] == [1, 1, 1, 1, 2]
    # LoRA: the adapter alone trains and is synced; the first loss is the base model's
    assert adapted["setting"] == "learner, 1 process, LoRA rank 16"
    assert adapted["trainable"] < one["trainable"] / 10 == report["parameters"] / 10
    assert 0 < adapted["sync_mib"] < one["sync_mib"] / 10
    assert abs(one["sync_mib"] - 4 * report["parameters"] / 2**20) < 0.01
    assert abs(one["first_loss"] - adapted["first_loss"]) < 1e-5
    assert packed["pad_frac"] == 0 < one["pad_frac"]
    assert abs(one["first_loss"] - packed["first_loss"]) < 1e-5
    assert all(r["tokens_per_s"] > 0 for r in report["rows"])
    assert len(two["peak_rss_mib"]) == 2 and all(m > 100 for m in two["peak_rss_mib"])
    assert abs(one["first_loss"] - two["first_loss"]) < 1e-5
