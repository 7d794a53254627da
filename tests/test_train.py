"""`agent-spo train` end to end on the demo model: logs, checkpoints, resume, summary."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent_spo.cli import EXIT_CONFIG, app

pytestmark = pytest.mark.slow

SMALL = [
    "learner.batch_size=4", "rollout.workers=4", "sandbox.pool_size=2",
    "rollout.max_response_tokens=128", "data.synthetic_tasks=40", "learner.lr=1e-4",
    "train.checkpoint_every=1", "train.eval_every=0", "algo.init.mode=none",
]  # fmt: skip


def _train(tmp_path, steps: int, *extra: str):
    args = ["train", *SMALL, f"run.output_dir={tmp_path}", "run.name=t",
            f"train.total_steps={steps}", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_train_then_resume_continues_without_replaying_a_step(tmp_path):
    import torch

    threads = torch.get_num_threads()
    first = _train(tmp_path, 2, "train.torch_threads=3")
    assert first.exit_code == 0, first.output
    assert torch.get_num_threads() == threads  # the run's thread count is not left behind
    run = tmp_path / "t"
    for name in ("config.yaml", "metrics.jsonl", "episodes.jsonl", "summary.json"):
        assert (run / name).exists(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    episodes = (run / "episodes.jsonl").read_text().splitlines()
    assert len(episodes) == 8 and json.loads(episodes[0])["train"]["step"] == 1
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt-000002"
    state = json.loads((run / "checkpoints" / "ckpt-000002" / "state.json").read_text())
    visits = sum(state["tracker"]["visits"].values())
    assert visits >= 8  # every trained trajectory (and maybe more) updated the tracker

    again = _train(tmp_path, 2)  # same name without --resume: refused, nothing lost
    assert again.exit_code == EXIT_CONFIG and "--resume" in again.output

    resumed = _train(tmp_path, 3, "--resume")  # torch_threads may change on resume
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    lines = (run / "episodes.jsonl").read_text().splitlines()
    assert len(lines) == 12 and lines[:8] == episodes  # the log only grew
    state3 = json.loads((run / "checkpoints" / "ckpt-000003" / "state.json").read_text())
    assert state3["learner_version"] == 3
    assert sum(state3["tracker"]["visits"].values()) > visits  # tracker state carried on
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_at"] == 2
    assert "held_out" not in summary  # train.eval_every=0: no held-out evaluation at all


def test_sigkill_mid_run_then_resume_loses_nothing(tmp_path):
    """Kill the whole training process group with SIGKILL after a checkpoint; --resume
    finishes the run with the tracker state, the episode log and the step count intact."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "k"
    args = [sys.executable, "-m", "agent_spo.cli", "train", *SMALL, f"run.output_dir={tmp_path}",
            "run.name=k", "train.total_steps=6", "train.checkpoint_every=3"]  # fmt: skip
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    latest = run / "checkpoints" / "latest"
    episodes = run / "episodes.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # kill once a step after the checkpoint at step 3 is in the episode log, so the
        # resume has something to cut back
        if latest.exists() and latest.read_text().strip() == "ckpt-000003":
            state = json.loads((run / "checkpoints" / "ckpt-000003" / "state.json").read_text())
            if episodes.stat().st_size > state["episode_log_offset"]:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    size_at_kill = episodes.stat().st_size

    name = latest.read_text().strip()
    saved = json.loads((run / "checkpoints" / name / "state.json").read_text())
    log_before = (run / "episodes.jsonl").read_bytes()[: saved["episode_log_offset"]]
    assert name == "ckpt-000003" and size_at_kill > saved["episode_log_offset"]

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no step twice, none lost
    log_after = (run / "episodes.jsonl").read_bytes()
    assert log_after.startswith(log_before)  # what the checkpoint had seen is untouched
    lines = log_after.decode().splitlines()
    assert all(json.loads(x)["train"]["step"] >= 1 for x in lines)  # no torn line
    steps = [json.loads(x)["train"]["step"] for x in lines]
    assert steps == sorted(steps) and len(lines) == 6 * 4  # each batch logged once
    final = json.loads((run / "checkpoints" / "ckpt-000006" / "state.json").read_text())
    assert final["learner_version"] == 6
    for key, n in saved["tracker"]["visits"].items():  # tracker state carried through
        assert final["tracker"]["visits"][key] >= n
    assert final["tracker"]["steps"] == 6


@pytest.mark.parametrize(
    "override, message",
    [("loss.kl_coef=0.1", "loss.kl_coef"),
     ("rollout.workers=900", "lower rollout.workers"),
     ("data.max_prompt_tokens=16", "every training prompt is longer than 16 tokens")],
)  # fmt: skip
def test_settings_training_cannot_honour_are_refused_before_work(tmp_path, override, message):
    result = _train(tmp_path, 1, override)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert message in result.output
    assert not (tmp_path / "t" / "metrics.jsonl").exists()


def test_resume_refuses_a_changed_learning_setting_but_may_run_longer(tmp_path):
    assert _train(tmp_path, 1, "train.eval_every=1").exit_code == 0
    changed = _train(tmp_path, 2, "--resume", "learner.lr=1e-3", "algo.rho.mode=constant")
    assert changed.exit_code == EXIT_CONFIG
    assert "learner.lr: 0.0001 -> 0.001" in changed.output and "algo.rho.mode" in changed.output
    longer = _train(tmp_path, 2, "--resume", "train.eval_every=1")
    assert longer.exit_code == 0, longer.output
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # the evaluation before training is kept
    assert all("eval/accuracy" in r for r in rows)
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["held_out_before"]["accuracy"] == rows[0]["eval/accuracy"]


def test_torch_threads_auto_splits_the_cores_only_where_engine_and_learner_share_them():
    import os

    import torch

    from agent_spo.config import load_config
    from agent_spo.train import torch_threads_for

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    hf = load_config(None)
    if torch.cuda.is_available():
        assert torch_threads_for(hf) is None
    else:
        assert torch_threads_for(hf) == max(1, cores // 2)
    assert torch_threads_for(load_config(None, ["rollout.engine=vllm"])) is None
    assert torch_threads_for(load_config(None, ["train.torch_threads=5"])) == 5
    with pytest.raises(Exception, match="torch_threads"):
        load_config(None, ["train.torch_threads=0"])


def test_kl_exact_trains_checkpoints_its_kept_trajectories_and_resumes_with_them(tmp_path):
    from agent_spo.exact_drift import FILE, ExactDrift

    few = ("algo.rho.mode=kl_exact", "data.synthetic_tasks=8")  # prompts come back
    first = _train(tmp_path, 2, *few)
    assert first.exit_code == 0, first.output
    run = tmp_path / "t"
    kept = ExactDrift.load(run / "checkpoints" / "ckpt-000002" / FILE)
    episodes = [json.loads(x) for x in (run / "episodes.jsonl").read_text().splitlines()]
    trained = {e["info"]["prompt_key"] for e in episodes}
    assert len(kept) == len(trained) and all(k in kept for k in trained)
    more = _train(tmp_path, 3, *few, "--resume")
    assert more.exit_code == 0, more.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # step 3 measured D on trajectories kept before the resume
    assert sum(r["tracker/kl_exact_scored"] for r in rows) > 0
    assert rows[2]["tracker/kl_exact_unkept"] == 0
    assert len(ExactDrift.load(run / "checkpoints" / "ckpt-000003" / FILE)) >= len(kept)


def test_the_decoupled_objective_and_the_entropy_bonus_train_and_report(tmp_path):
    result = _train(tmp_path, 1, "loss.logp_old=decoupled", "loss.tis_cap=2",
                    "loss.entropy_coef=0.01")  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert 0.5 < row["loss/is_weight"] < 2.0 and 0.0 <= row["loss/tis_frac"] <= 1.0
    assert row["loss/entropy"] > 0  # nats, over the demo's 400-token vocabulary


def test_train_logs_to_weights_and_biases_and_one_that_cannot_start_stops_the_run_first(
    tmp_path, monkeypatch
):
    """train.wandb: every step's row reaches the W&B run (offline here); a W&B that cannot
    start stops the run before the model loads or any value is estimated."""
    pytest.importorskip("wandb", reason="W&B is the wandb extra (installed by make test)")
    from tests.test_metrics_plot import _wandb_records

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "bogus")
    bad = CliRunner().invoke(app, ["train", *SMALL, "algo.init.mode=paper", "train.wandb=true",
                                   f"run.output_dir={tmp_path}", "run.name=bad"])  # fmt: skip
    assert bad.exit_code == 1, bad.output
    assert "error: train.wandb: Weights & Biases did not start" in " ".join(bad.output.split())
    assert not (tmp_path / "bad" / "values.jsonl").exists()  # nothing estimated

    monkeypatch.setenv("WANDB_MODE", "offline")
    ok = CliRunner().invoke(app, ["train", *SMALL, "train.total_steps=2", "train.wandb=true",
                                  f"run.output_dir={tmp_path}", "run.name=ok"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    [run_file] = (tmp_path / "ok" / "wandb").glob("offline-run-*/run-*.wandb")
    steps, names = [], []
    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}  # fmt: skip
            steps.append((items["_step"], "reward/mean" in items, "loss/pg" in items))
        elif kind == "run":
            names.append((r.run.display_name, r.run.run_group))
    assert steps == [(1, True, True), (2, True, True)]
    assert set(names) == {("ok", "ok")}


def test_lora_trains_syncs_the_adapter_checkpoints_it_and_resumes(tmp_path):
    """learner.lora on the demo: the adapter alone trains and reaches the hf engine, the
    checkpoint holds the adapter (peft form, no full weights), and the run resumes."""
    lora = ["learner.lora.rank=8", "learner.lr=2e-3"]
    first = _train(tmp_path, 2, *lora)
    assert first.exit_code == 0, first.output
    out = " ".join(first.output.split())
    assert "learner: LoRA rank 8 (alpha 16) on 28 linear layers" in out
    assert "each sync sends the adapter alone" in out
    ckpt = tmp_path / "t" / "checkpoints" / "ckpt-000002"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((ckpt / "model").glob("*.safetensors"))  # the base model is not copied
    changed = _train(tmp_path, 3, "--resume", "learner.lora.rank=16", "learner.lr=2e-3")
    assert changed.exit_code == EXIT_CONFIG and "learner.lora.rank: 8 -> 16" in changed.output
    resumed = _train(tmp_path, 3, "--resume", *lora)
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from ckpt-000002" in resumed.output
    state = json.loads((tmp_path / "t" / "checkpoints" / "ckpt-000003" / "state.json").read_text())
    assert state["learner_version"] == 3
    exported = CliRunner().invoke(app, ["export", str(tmp_path / "t"), "--out",
                                        str(tmp_path / "adapter")])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
