"""The cluster-scale throughput model (`bench throughput --scale-gpus`): it reduces to the
paper's 6 x 8 example when learning and syncing are free, charges the learner and the
sync where they are not, and the CLI prints and writes it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from agent_spo.bench.cluster_model import ClusterAssumptions, cluster_timeline, scale_report
from agent_spo.bench.stragglers import PAPER_GROUP_READY_S, PAPER_STREAM_READY_S
from agent_spo.cli import app

FREE = ClusterAssumptions(batch=24, per_replica=48, learner_tokens_per_gpu_s=1e15,
                          sync_broadcast=True, sync_mib_s=1e15, steps=1)  # fmt: skip


def test_with_free_learning_and_sync_the_first_batch_is_the_papers_example():
    """One replica holding the paper's 48 episodes, B = 24: the stream's batch is ready at
    the 24th finish (112 s), GRPO's at the 3rd-fastest group's slowest member (486 s)."""
    spo, grpo = cluster_timeline("spo", 2, FREE), cluster_timeline("grpo", 2, FREE)
    assert spo.first_batch_s == pytest.approx(PAPER_STREAM_READY_S)
    assert grpo.first_batch_s == pytest.approx(PAPER_GROUP_READY_S)
    assert spo.learner_step_s == pytest.approx(0, abs=1e-6) and spo.sync_s < 1e-6


def test_the_learner_step_and_a_per_replica_sync_take_their_modelled_time():
    a = ClusterAssumptions(steps=3)
    p = cluster_timeline("spo", 16, a)
    assert p.replicas == p.learner_gpus == 8 and p.in_flight == 8 * a.per_replica
    assert p.sync_s == pytest.approx(8 * a.model_gib * 1024 / a.sync_mib_s)  # one replica at a time
    one = cluster_timeline("spo", 16, replace(a, sync_broadcast=True))
    assert one.sync_s == pytest.approx(a.model_gib * 1024 / a.sync_mib_s)
    # a step's time is its tokens over the learner GPUs' rate: 2 x the GPUs, ~half the time
    twice = cluster_timeline("spo", 32, a)
    assert twice.learner_step_s == pytest.approx(p.learner_step_s / 2, rel=0.15)
    # a slower learner makes fewer trajectories per second and idles less
    slow = cluster_timeline("spo", 16, replace(a, learner_tokens_per_gpu_s=600.0))
    assert slow.traj_per_s < p.traj_per_s and slow.idle_frac <= p.idle_frac
    # the sampling budget, as in the pipeline: with no staleness allowed one batch is
    # sampled per version, so nothing is sampled only to be dropped, and the learner
    # waits for each batch (all of it sampled after the last sync)
    strict = cluster_timeline("spo", 16, replace(a, max_staleness=0))
    assert strict.dropped_stale == 0 and strict.traj_per_s < p.traj_per_s
    with pytest.raises(ValueError, match="even number of GPUs"):
        cluster_timeline("spo", 3, a)


def test_the_stream_beats_the_barrier_until_the_sync_dominates():
    rows = scale_report([8, 32, 128], replace(ClusterAssumptions(), sync_broadcast=True,
                                              sync_mib_s=25 * 1024))["rows"]  # fmt: skip
    assert all(r["traj_per_s_ratio"] > 2 for r in rows)
    assert all(r["spo"]["idle_frac"] < r["grpo"]["idle_frac"] for r in rows)
    assert [r["spo"]["dropped_stale"] for r in rows[:2]] == [0, 0]
    gloo = scale_report([8, 128])["rows"]  # the sync to 64 replicas in turn swamps both
    assert gloo[1]["spo"]["sync_s"] > 10 * gloo[1]["spo"]["learner_step_s"]
    assert gloo[1]["traj_per_s_ratio"] < gloo[0]["traj_per_s_ratio"]
    # the sampling budget holds the workers through the 20-minute syncs: nothing is
    # generated only to be dropped, and the learner, not generation, sets the pace
    assert gloo[1]["spo"]["dropped_stale"] == 0 and gloo[1]["spo"]["idle_frac"] < 0.02
    assert gloo[1]["spo"]["traj_per_s"] == pytest.approx(
        2048 / (gloo[1]["spo"]["learner_step_s"] + gloo[1]["spo"]["sync_s"]), rel=0.05
    )


def test_the_cli_prints_and_writes_the_model_alone(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "throughput", "--cases", "", "--no-demo",
                                      "--scale-gpus", "8,32", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["cluster_model"]
    assert [r["spo"]["gpus"] for r in report["gloo"]["rows"]] == [8, 32]
    assert report["broadcast"]["assumptions"]["sync_broadcast"] is True
    assert "(modelled)" in result.output and "learner_tokens_per_gpu_s=6000.0" in result.output
    bad = CliRunner().invoke(app, ["bench", "throughput", "--cases", "", "--no-demo",
                                   "--scale-gpus", "8,9", "--out", str(out)])  # fmt: skip
    assert bad.exit_code != 0 and "--scale-gpus: every count must be even" in bad.output
